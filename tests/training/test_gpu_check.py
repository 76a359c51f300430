"""The GPU check on CPU: arguments, the fail-fast path without CUDA, its configs, and its whole training path run
with a tiny model on CPU (the real measurement needs a GPU)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vla_train.config.train import validate_train_config
from vla_train.models.freezing import freeze_backbones
from vla_train.training import gpu_check, session, trainer
from vla_train.training.flops import flops_model_for_vlm

REPO = Path(__file__).resolve().parents[2]


def test_parse_args_defaults_and_errors(tmp_path):
    args = gpu_check.parse_args([])
    assert args.models == ("minivla", "7b") and args.steps == 200 and args.batch_size is None
    args = gpu_check.parse_args(["--models", "7b", "--steps", "40", "--peak_tflops", "989", "--json",
                                 str(tmp_path / "r.json")])
    assert args.models == ("7b",) and args.peak_tflops == 989.0 and args.json_path == tmp_path / "r.json"
    for argv, match in ((["--steps", "10"], "--steps 10 leaves no logging window"),
                        (["--batch_size", "0"], "--batch_size 0"), (["--peak_tflops", "-1"], "--peak_tflops"),
                        (["--log_interval", "0"], "--log_interval")):
        with pytest.raises(ValueError, match=match):
            gpu_check.parse_args(argv)
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--models", "13b"])


def test_fails_fast_without_cuda(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    work = tmp_path / "work"
    with pytest.raises(gpu_check.CudaUnavailableError, match="needs a CUDA GPU"):
        gpu_check.main(["--work_dir", str(work)])
    assert not work.exists()  # nothing written before the check
    assert gpu_check.cli(["--work_dir", str(work)]) == 2
    assert "gpu_check: gpu_check needs a CUDA GPU" in capsys.readouterr().err
    assert gpu_check.cli(["--steps", "3"]) == 2  # argument errors: one line too
    assert "--steps 3 leaves no logging window" in capsys.readouterr().err


def test_script_exits_2_with_the_message_without_cuda(tmp_path):
    result = subprocess.run([sys.executable, "vla-scripts/gpu_check.py", "--work_dir", str(tmp_path / "w")],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "needs a CUDA GPU" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("name", list(gpu_check.CHECK_MODELS))
def test_train_configs_are_valid_for_one_process(tmp_path, name):
    args = gpu_check.parse_args(["--work_dir", str(tmp_path)])
    cfg = gpu_check.train_config(args, name, tmp_path / "data")
    validate_train_config(cfg, 1)
    assert cfg.vla.base_vlm == gpu_check.CHECK_MODELS[name][0]
    assert cfg.vla.enable_gradient_checkpointing and cfg.vla.enable_mixed_precision_training
    assert cfg.trackers == ("jsonl",) and cfg.vla.max_steps == 200


def test_summary_and_table():
    logged = [{"VLA Train/Step": 10, "VLA Train/Samples per Second": 1.0, "VLA Train/MFU": 0.9},
              {"VLA Train/Step": 20, "VLA Train/Samples per Second": 10.0, "VLA Train/MFU": 0.4,
               "VLA Train/Peak Device Memory GiB": 30.0, "VLA Train/Data Wait Fraction": 0.01},
              {"VLA Train/Step": 30, "VLA Train/Samples per Second": 20.0, "VLA Train/MFU": 0.5,
               "VLA Train/Peak Device Memory GiB": 20.0, "VLA Train/Data Wait Fraction": 0.03}]
    summary = gpu_check.summarize_windows(logged, warmup_steps=10)  # the step-10 window is warm-up
    assert summary == pytest.approx({"windows": 2, "samples/s": 15.0, "MFU": 0.45, "peak mem GiB": 30.0,
                                     "data wait": 0.02})
    table = gpu_check.format_table([{"model": "7b", "batch": 8, **summary}])
    assert table.splitlines()[0].split()[:3] == ["model", "batch", "samples/s"]
    assert "45.0%" in table and "15.00" in table and "30.00" in table and "-" in table  # no TFLOP/s figure


def test_the_check_runs_the_real_training_path_on_cpu(tmp_path, monkeypatch):
    """A tiny model through `run_model` on CPU: the substitutions apply (random model, no checkpoint) and are undone,
    and the logged figures include model TFLOP/s and MFU (from the given peak), but no device memory on CPU."""
    from vla_train.data.demo import write_demo_datasets

    data_root = tmp_path / "data"
    write_demo_datasets(data_root, num_episodes=4, episode_length=6, image_size=64, seed=0, val_fraction=0.25)
    monkeypatch.setitem(gpu_check.CHECK_MODELS, "tiny", ("tiny-dinosiglip+tiny-llama", 2))
    args = gpu_check.parse_args(["--steps", "4", "--warmup_steps", "2", "--log_interval", "2", "--peak_tflops",
                                 "0.001", "--llm_layers", "1", "--work_dir", str(tmp_path / "work")])
    original = (session.load_model, trainer.ThroughputMeter, trainer.Trainer._save)
    result = gpu_check.run_model(args, "tiny", data_root, torch.device("cpu"))
    assert (session.load_model, trainer.ThroughputMeter, trainer.Trainer._save) == original
    assert result["windows"] == 1 and result["device"] == "cpu" and result["peak_tflops"] == 0.001
    assert result["samples/s"] > 0 and "peak mem GiB" not in result
    assert result["MFU"] == pytest.approx(result["TFLOP/s/dev"] / 0.001)
    run_dir = tmp_path / "work" / "runs" / "gpu-check-tiny"
    assert (run_dir / "config.yaml").is_file() and not list(run_dir.glob("checkpoints/step-*"))
    # FLOPs per sample implied by the figures: within the range a demo sample's text length allows.
    vlm = gpu_check._build_random_vlm("tiny-dinosiglip+tiny-llama", torch.device("meta"), llm_layers=1)
    freeze_backbones(vlm, "vla-full-train")
    per_sample = result["TFLOP/s/dev"] * 1e12 / result["samples/s"]
    model = flops_model_for_vlm(vlm)
    assert model.sample_flops(10) < per_sample < model.sample_flops(200)


def test_full_size_models_get_the_real_vocabulary_and_a_tiny_tokenizer():
    """7B id on the meta device: no local Llama-2 tokenizer, so the project's tiny one; embeddings as the released
    tokenizer sizes them (32000 + pad -> 32064 rows); `--llm_layers` cuts the depth only."""
    with gpu_check.project_substitutions("prism-dinosiglip-224px+7b", torch.device("meta"), None, llm_layers=2):
        vlm = session.load_model(None)
    llm = vlm.llm_backbone.llm
    assert len(llm.model.layers) == 2 and llm.config.hidden_size == 4096
    assert llm.get_input_embeddings().weight.shape == (32064, 4096)
    assert llm.get_output_embeddings().weight.shape == (32064, 4096)
    assert vlm.llm_backbone.action_vocab_end == 512  # the tiny llama tokenizer's last 256 ids are the action bins
    with gpu_check.project_substitutions("prism-qwen25-extra-dinosiglip-224px+0_5b", torch.device("meta"), None):
        mini = session.load_model(None)
    tokenizer = mini.llm_backbone.get_tokenizer()
    assert "<|extra_255|>" in tokenizer.get_vocab() and len(mini.llm_backbone.llm.model.layers) == 24
    assert mini.llm_backbone.llm.get_input_embeddings().weight.shape == (151936, 896)
