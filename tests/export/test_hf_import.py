"""Import of an OpenVLA-format Hugging Face directory: import(export(x)) reproduces x exactly, the released layout
(reference-style config, sharded safetensors) imports, errors name the problem, and train.py fine-tunes the result."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from tests.export.test_hf_export import (
    PARITY_MODEL_IDS,
    RELEASED_OPENVLA_7B,
    REPO,
    load_native,
    make_run_dir,
    sample_images,
)
from vla_train.config.model import CustomModelConfig
from vla_train.export.hf import export_hf
from vla_train.export.hf_import import import_hf, match_model_config, read_hf_config
from vla_train.export.hf_remote.configuration_prismatic import OpenVLAConfig
from vla_train.export.hf_remote.modeling_prismatic import OpenVLAForActionPrediction
from vla_train.models.build import build_vlm
from vla_train.models.llm import LLM_BACKBONES
from vla_train.models.run_dir import read_model_config

CHECKPOINT = "step-000000-epoch-00-loss=inf.pt"


def assert_same_checkpoint(original: Path, imported: Path) -> None:
    a = torch.load(original, weights_only=True)["model"]
    b = torch.load(imported, weights_only=True)["model"]
    assert list(a) == list(b) or set(a) == set(b) == {"vision_backbone", "projector", "llm_backbone"}
    for module in a:
        assert set(a[module]) == set(b[module]), (module, set(a[module]) ^ set(b[module]))
        for key, tensor in a[module].items():
            assert b[module][key].dtype == torch.float32
            assert torch.equal(b[module][key], tensor), f"{module}.{key}"


def same_logits(run_a: Path, run_b: Path) -> bool:
    model_a, model_b = load_native(run_a), load_native(run_b)
    tokenizer = model_a.llm_backbone.get_tokenizer()
    ids = torch.tensor([tokenizer("In: What action should the robot take to wave?\nOut: ").input_ids])
    size = model_a.vision_backbone.spec.image_size
    pixels = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    pixel_values = {k: pixels for k in model_a.vision_backbone.keys} if model_a.vision_backbone.is_fused else pixels
    with torch.no_grad():
        return torch.equal(model_a(input_ids=ids, pixel_values=pixel_values).logits,
                           model_b(input_ids=ids, pixel_values=pixel_values).logits)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """(run_dir, hf_dir) of the demo model, exported once for the error tests."""
    root = tmp_path_factory.mktemp("tiny_export")
    run_dir = make_run_dir("tiny-dinosiglip+tiny-llama", root / "run")
    return run_dir, export_hf(run_dir, root / "hf")


def copy_dir(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


@pytest.mark.parametrize("model_id", PARITY_MODEL_IDS)
def test_import_of_export_reproduces_every_tensor(model_id, tmp_path):
    run_dir = make_run_dir(model_id, tmp_path / "run")
    hf_dir = export_hf(run_dir, tmp_path / "hf")
    checkpoint = import_hf(hf_dir, tmp_path / "imported")
    imported = tmp_path / "imported"
    assert checkpoint == imported / "checkpoints" / CHECKPOINT
    assert (imported / "checkpoints" / "latest-checkpoint.pt").samefile(checkpoint)
    assert_same_checkpoint(run_dir / "checkpoints" / "latest-checkpoint.pt", checkpoint)
    config = json.loads((imported / "config.json").read_text())
    assert config["vla"]["base_vlm"] == model_id and config["vla"]["type"] == "hf"
    assert json.loads((imported / "dataset_statistics.json").read_text()) == \
        json.loads((run_dir / "dataset_statistics.json").read_text())
    assert read_model_config(imported) == read_model_config(run_dir)
    assert same_logits(run_dir, imported)


def test_sharded_weights_and_a_reference_style_config_import(tiny_export, tmp_path):
    run_dir, _ = tiny_export
    sharded = export_hf(run_dir, tmp_path / "sharded", max_shard_size="200KB")
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    # The released openvla-7b's config.json: no model_id or fields of this project.
    config = json.loads((sharded / "config.json").read_text())
    for key in ("model_id", "action_vocab_end", "prompt_suffix_ids", "vla_prompt_template", "timm_model_kwargs"):
        config.pop(key)
    # What transformers 4.x writes in a config and 5.x drops when reading it: generation defaults, rope_scaling.
    config["text_config"].update(max_length=20, do_sample=False, temperature=1.0, rope_scaling=None, num_beams=1)
    (sharded / "config.json").write_text(json.dumps(config))
    checkpoint = import_hf(sharded, tmp_path / "imported", vla_id="released")
    assert_same_checkpoint(run_dir / "checkpoints" / "latest-checkpoint.pt", checkpoint)
    vla = json.loads((tmp_path / "imported" / "config.json").read_text())["vla"]
    assert vla == {"type": "released", "vla_id": "released", "base_vlm": "tiny-dinosiglip+tiny-llama"}


def test_the_released_openvla_7b_config_keeps_its_text_config_architecture(tmp_path):
    """The released config's minimal text_config means a default LlamaConfig (what its remote code builds:
    rms_norm_eps 1e-6, 2048 positions), not the registry's Llama-2 (1e-5, 4096): the import keeps that LLM."""
    (tmp_path / "config.json").write_text(json.dumps(RELEASED_OPENVLA_7B))
    model_cfg, registered = match_model_config(read_hf_config(tmp_path))
    assert not registered and model_cfg.model_id == "prism-dinosiglip-224px+7b"
    assert model_cfg.vision_backbone_id == "dinosiglip-vit-so-224px" and model_cfg.llm_backbone_id == "llama2-7b-pure"
    llm = model_cfg.llm_config
    assert (llm["rms_norm_eps"], llm["max_position_embeddings"], llm["vocab_size"]) == (1e-6, 2048, 32064)
    assert (llm["hidden_size"], llm["num_hidden_layers"], llm["pad_token_id"]) == (4096, 32, 32000)
    config = OpenVLAConfig(**{k: v for k, v in RELEASED_OPENVLA_7B.items() if k != "model_type"})
    with torch.device("meta"):
        native = build_vlm(model_cfg)
        remote = OpenVLAForActionPrediction(config)
    assert native.llm_backbone.llm.config.rms_norm_eps == remote.config.text_config.rms_norm_eps == 1e-6
    native_shapes = {f"language_model.{k.removeprefix('llm.')}": v.shape
                     for k, v in native.llm_backbone.state_dict().items()}
    assert native_shapes == {k: v.shape for k, v in remote.state_dict().items() if k.startswith("language_model.")}


def test_an_unregistered_base_model_gets_a_base_run_dir(tiny_export, tmp_path):
    run_dir, hf_dir = tiny_export
    custom = copy_dir(hf_dir, tmp_path / "custom")
    config = json.loads((custom / "config.json").read_text())
    config["llm_max_length"] = 256  # no registered ModelConfig has this
    (custom / "config.json").write_text(json.dumps(config))
    checkpoint = import_hf(custom, tmp_path / "imported")
    base_dir = Path(json.loads((tmp_path / "imported" / "config.json").read_text())["vla"]["base_vlm"])
    assert base_dir == (tmp_path / "imported" / "base_vlm").resolve()
    assert (base_dir / "checkpoints" / "latest-checkpoint.pt").samefile(checkpoint)
    model_cfg = read_model_config(tmp_path / "imported")
    assert model_cfg.llm_max_length == 256 and model_cfg.model_id == "tiny-dinosiglip+tiny-llama"
    assert load_native(tmp_path / "imported").llm_backbone.get_tokenizer().model_max_length == 256
    assert same_logits(run_dir, tmp_path / "imported")


# A tiny Llama outside the registry: other sizes and rms_norm_eps 1e-5 (the registry's tiny-llama has 1e-6).
TINY_LLAMA_VARIANT = {**LLM_BACKBONES["tiny-llama"].architecture, "model_type": "llama", "hidden_size": 48,
                      "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
                      "num_key_value_heads": 4, "rms_norm_eps": 1e-5}
TINY_QWEN_VARIANT = {**LLM_BACKBONES["tiny-qwen25"].architecture, "model_type": "qwen2", "hidden_size": 32,
                     "num_hidden_layers": 3, "rms_norm_eps": 1e-5, "rope_theta": 50000.0}
OFF_REGISTRY = {
    # registered vision/LLM combination and sizes, only rms_norm_eps differs
    "eps-only": CustomModelConfig(
        "tiny-dinosiglip+tiny-llama", "no-align+fused-gelu-mlp", "tiny-dinosiglip-vit", "tiny-llama", "resize-naive",
        512, llm_config={**LLM_BACKBONES["tiny-llama"].architecture, "model_type": "llama", "rms_norm_eps": 1e-5}),
    "sizes": CustomModelConfig("tiny-siglip+tiny-llama", "no-align+gelu-mlp", "tiny-siglip-vit", "tiny-llama",
                               "letterbox", 512, llm_config=TINY_LLAMA_VARIANT),
    # a vision/LLM combination no registered ModelConfig has, with a Qwen2 outside the registry
    "unregistered-combination": CustomModelConfig("my-siglip+qwen", "no-align+gelu-mlp", "tiny-siglip-vit",
                                                  "tiny-qwen25", "letterbox", 256, llm_config=TINY_QWEN_VARIANT),
}


def hf_logits(hf_dir: Path) -> torch.Tensor:
    model = AutoModelForImageTextToText.from_pretrained(hf_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(hf_dir, trust_remote_code=True)
    inputs = processor(model.config.vla_prompt_template.format(instruction="wave"), sample_images()[0])
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits


@pytest.mark.parametrize("case", sorted(OFF_REGISTRY))
def test_import_takes_the_llm_from_text_config_and_export_reproduces_it(case, tmp_path):
    run_dir = make_run_dir(OFF_REGISTRY[case], tmp_path / "run")
    hf_dir = export_hf(run_dir, tmp_path / "hf")
    checkpoint = import_hf(hf_dir, tmp_path / "imported")
    assert_same_checkpoint(run_dir / "checkpoints" / "latest-checkpoint.pt", checkpoint)
    base_vlm = json.loads((tmp_path / "imported" / "config.json").read_text())["vla"]["base_vlm"]
    assert Path(base_vlm) == (tmp_path / "imported" / "base_vlm").resolve()  # no registry id builds this model
    text_config = json.loads((hf_dir / "config.json").read_text())["text_config"]
    model_cfg = read_model_config(tmp_path / "imported")
    assert model_cfg.llm_config["rms_norm_eps"] == text_config["rms_norm_eps"] == 1e-5
    assert same_logits(run_dir, tmp_path / "imported")

    again = export_hf(tmp_path / "imported", tmp_path / "hf-again")
    assert json.loads((again / "config.json").read_text())["text_config"] == text_config
    assert json.loads((again / "config.json").read_text()) == json.loads((hf_dir / "config.json").read_text())
    assert torch.equal(hf_logits(again), hf_logits(hf_dir))


def test_import_errors_leave_nothing_behind(tiny_export, tmp_path):
    _, hf_dir = tiny_export

    def with_text_config(name: str, **changes) -> Path:
        directory = copy_dir(hf_dir, tmp_path / name)
        config = json.loads((directory / "config.json").read_text())
        config["text_config"] = {**config["text_config"], **changes}
        (directory / "config.json").write_text(json.dumps(config))
        return directory

    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"config.json: text_config.model_type='qwen2' does not match "
                                         r"llm_backbone_id='tiny-llama'.*Fix: pick a 'qwen2' backbone"):
        import_hf(with_text_config("family", model_type="qwen2"), out)
    with pytest.raises(ValueError, match=r"text_config would not survive the import .*pad_token_id: 7 vs 512"):
        import_hf(with_text_config("pad", pad_token_id=7), out)
    with pytest.raises(ValueError, match=r"rope_theta: 500000.0 vs 10000.0"):
        import_hf(with_text_config("rope", rope_theta=500000.0), out)
    with pytest.raises(ValueError, match=r"hidden_size=96, but language_model.model.embed_tokens.weight is "
                                         r"\(576, 64\).*Fix: write the LLM's full Hugging Face config"):
        import_hf(with_text_config("sizes", hidden_size=96), out)
    with pytest.raises(ValueError, match=r"num_hidden_layers=3, but the weights hold 2 layers"):
        import_hf(with_text_config("layers", num_hidden_layers=3), out)
    minimal = copy_dir(hf_dir, tmp_path / "minimal")  # a reference-style text_config: transformers' default Llama
    config = json.loads((minimal / "config.json").read_text())
    config["text_config"] = {"model_type": "llama", "pad_token_id": 512, "vocab_size": 576}
    (minimal / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"vocab_size=576 and hidden_size=4096"):
        import_hf(minimal, out)
    assert not out.exists()


def test_import_errors_name_the_problem(tiny_export, tmp_path):
    _, hf_dir = tiny_export
    with pytest.raises(FileNotFoundError, match=r"nowhere/config.json does not exist"):
        import_hf(tmp_path / "nowhere", tmp_path / "out")

    def broken(name: str, **changes) -> Path:
        directory = copy_dir(hf_dir, tmp_path / name)
        config = json.loads((directory / "config.json").read_text())
        config.update(changes)
        (directory / "config.json").write_text(json.dumps(config))
        return directory

    with pytest.raises(ValueError, match="vision_backbone_id: Unknown vision backbone 'dinov9-vit'"):
        import_hf(broken("vision", vision_backbone_id="dinov9-vit"), tmp_path / "out")
    with pytest.raises(ValueError, match="llm_backbone_id: Unknown LLM backbone 'llama9-70b'"):
        import_hf(broken("llm", llm_backbone_id="llama9-70b"), tmp_path / "out")
    with pytest.raises(ValueError, match="norm_stats is empty"):
        import_hf(broken("stats", norm_stats={}), tmp_path / "out")

    weights = broken("weights")
    state = load_file(weights / "model.safetensors")
    del state["projector.fc3.bias"]
    save_file(state, weights / "model.safetensors")
    with pytest.raises(ValueError, match=r"'projector' weights .* missing keys \['projector.4.bias'\]"):
        import_hf(weights, tmp_path / "out")
    state["projector.fc3.bias"], state["language_model.extra.weight"] = torch.zeros(64), torch.zeros(1)
    save_file(state, weights / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected keys \['llm.extra.weight'\]"):
        import_hf(weights, tmp_path / "out")
    state["vision_backbone.mystery.weight"] = torch.zeros(1)
    save_file(state, weights / "model.safetensors")
    with pytest.raises(ValueError, match=r"Unexpected weight keys \['vision_backbone.mystery.weight'\]"):
        import_hf(weights, tmp_path / "out")
    (weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has neither model.safetensors nor"):
        import_hf(weights, tmp_path / "out")

    import_hf(hf_dir, tmp_path / "ok")
    with pytest.raises(FileExistsError, match="--overwrite true"):
        import_hf(hf_dir, tmp_path / "ok")
    import_hf(hf_dir, tmp_path / "ok", overwrite=True)


def _fine_tune_one_step(checkpoint: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """`vla-scripts/train.py` (one process) for one step from `checkpoint` with `--is_resume false`, on demo data;
    the run lands in `tmp_path / "runs"`."""
    from vla_train.data.demo import write_demo_datasets

    data = tmp_path / "data"
    write_demo_datasets(data, num_episodes=4, episode_length=6, image_size=64, seed=0, val_fraction=0.25)
    command = [sys.executable, "vla-scripts/train.py", "--vla.type", "tiny-test", "--data_root_dir", str(data),
               "--run_root_dir", str(tmp_path / "runs"), "--trackers", "[jsonl]", "--vla.expected_world_size", "1",
               "--vla.max_steps", "1", "--vla.shuffle_buffer_size", "8", "--pretrained_checkpoint", str(checkpoint),
               "--is_resume", "false"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def test_import_script_output_fine_tunes_with_train_py(tiny_export, tmp_path):

    _, hf_dir = tiny_export
    imported = tmp_path / "imported"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "offline"}
    command = [sys.executable, "vla-scripts/import_hf.py", "--hf_dir", str(hf_dir), "--out_dir", str(imported)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--is_resume false" in result.stderr

    checkpoint = imported / "checkpoints" / CHECKPOINT
    result = _fine_tune_one_step(checkpoint, tmp_path)
    assert f"from {checkpoint}" in result.stderr  # the model came from the imported weights
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "checkpoints" / "latest-checkpoint.pt").is_file()


def test_an_imported_unregistered_model_fine_tunes_and_exports_its_architecture(tmp_path):
    """The imported base of a vision/LLM combination outside the registry is a run-directory config that training
    records (it used to fail with "Cannot find choice name for ModelConfig") and a later export reads back."""

    run_dir = make_run_dir(OFF_REGISTRY["unregistered-combination"], tmp_path / "run")
    hf_dir = export_hf(run_dir, tmp_path / "hf")
    checkpoint = import_hf(hf_dir, tmp_path / "imported")
    _fine_tune_one_step(checkpoint, tmp_path)
    (fine_tuned,) = (tmp_path / "runs").iterdir()
    model_cfg = read_model_config(fine_tuned)
    assert model_cfg == read_model_config(tmp_path / "imported") and model_cfg.model_id == "my-siglip+qwen"
    assert (model_cfg.llm_config["hidden_size"], model_cfg.llm_config["rms_norm_eps"]) == (32, 1e-5)
    exported = export_hf(fine_tuned, tmp_path / "hf-fine-tuned")
    assert json.loads((exported / "config.json").read_text())["text_config"] == \
        json.loads((hf_dir / "config.json").read_text())["text_config"]
