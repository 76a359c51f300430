import dataclasses
import json
from pathlib import Path

import draccus
import pytest
import yaml

from vla_train.config.train import (
    TrainConfig,
    checkpoint_step_epoch,
    load_train_config,
    resolve_hf_token,
    resolve_run_id,
    validate_train_config,
    write_run_configs,
)
from vla_train.config.vla import TinyTest

CKPT_NAME = "step-000010-epoch-01-loss=0.5000.pt"


def tiny(**changes) -> TrainConfig:
    return dataclasses.replace(TrainConfig(vla=TinyTest()), **changes)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "checkpoints" / CKPT_NAME
    path.parent.mkdir()
    path.write_bytes(b"not a real checkpoint")
    return path


def test_defaults_match_reference():
    cfg = TrainConfig()
    assert cfg.vla.vla_id == "prism-dinosiglip-224px+mx-oxe-magic-soup-plus"
    assert (cfg.data_root_dir, cfg.run_root_dir, cfg.pretrained_checkpoint, cfg.is_resume, cfg.resume_step,
            cfg.resume_epoch, cfg.run_id, cfg.run_id_note, cfg.save_interval, cfg.image_aug, cfg.seed, cfg.hf_token,
            cfg.trackers, cfg.wandb_project, cfg.wandb_entity) == (
        Path("datasets/open-x-embodiment"), Path("runs"), None, True, None, None, None, None, 2500, False, 7,
        Path(".hf_token"), ("jsonl", "wandb"), "openvla", "stanford-voltron")
    assert (cfg.resume, cfg.keep_last_k, cfg.deterministic_data, cfg.registry_dirs, cfg.log_interval) == (
        None, None, True, (), 10)  # deterministic by default: exact resume
    with pytest.raises(ValueError, match="Expected World Size = 64 but Found 8"):
        validate_train_config(cfg, 8)


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), float("nan")])
def test_peak_device_tflops_must_be_finite_and_positive(value):
    with pytest.raises(ValueError, match=rf"peak_device_tflops = {value} must be a finite positive number"):
        validate_train_config(tiny(peak_device_tflops=value), 2)


def test_run_id_naming():
    assert resolve_run_id(TrainConfig()) == "prism-dinosiglip-224px+mx-oxe-magic-soup-plus+n8+b32+x7"
    assert resolve_run_id(tiny(seed=3), world_size=2) == "tiny-test+n0+b2+x3"
    assert resolve_run_id(tiny(run_id_note="abl")) == "tiny-test+n0+b2+x7--abl"
    assert resolve_run_id(tiny(image_aug=True)) == "tiny-test+n0+b2+x7--image_aug"
    assert resolve_run_id(tiny(run_id_note="abl", image_aug=True)) == "tiny-test+n0+b2+x7--abl--image_aug"
    assert resolve_run_id(tiny(run_id="mine")) == "mine"
    assert resolve_run_id(tiny(run_id="mine", run_id_note="v2", image_aug=True)) == "mine--v2--image_aug"
    with pytest.raises(ValueError, match="Expected World Size = 2 but Found 1"):
        resolve_run_id(tiny(), world_size=1)


def test_cli_parse_selects_vla_type():
    cfg = draccus.parse(TrainConfig, args=["--vla.type", "tiny-test", "--vla.max_steps", "3", "--seed", "11",
                                           "--hf_token", "MY_HF_TOKEN", "--trackers", "[jsonl]"])
    assert isinstance(cfg.vla, TinyTest) and cfg.vla.max_steps == 3 and cfg.vla.global_batch_size == 4
    assert (cfg.seed, cfg.hf_token, cfg.trackers) == (11, "MY_HF_TOKEN", ("jsonl",))
    validate_train_config(cfg, 2)


@pytest.mark.parametrize("args", [
    ["--vla.type", "tiny-test", "--vla.max_steps", "3"],
    ["--vla.type", "tiny-demo", "--hf_token", "HF_TOKEN", "--registry_dirs", "[a, b/c]", "--resume", "auto",
     "--keep_last_k", "2", "--run_id_note", "x", "--image_aug", "true", "--data_root_dir", "/data/oxe"],
    [],
])
def test_config_files_round_trip(tmp_path, args):
    cfg = draccus.parse(TrainConfig, args=args)
    write_run_configs(cfg, tmp_path / "run")
    yaml_text = (tmp_path / "run" / "config.yaml").read_text()
    as_json = json.loads((tmp_path / "run" / "config.json").read_text())
    assert as_json == yaml.safe_load(yaml_text)
    assert next(iter(as_json["vla"])) == "type" and as_json["vla"]["type"] == cfg.vla.vla_id
    assert list(as_json["vla"])[1:] == [f.name for f in dataclasses.fields(cfg.vla)]
    assert list(as_json) == [f.name for f in dataclasses.fields(TrainConfig)]
    assert isinstance(as_json["data_root_dir"], str) and isinstance(as_json["trackers"], list)
    assert (tmp_path / "run" / "config.json").read_text() == json.dumps(as_json, indent=2)
    loaded = load_train_config(tmp_path / "run")
    assert loaded == cfg and type(loaded.vla) is type(cfg.vla) and type(loaded.hf_token) is type(cfg.hf_token)
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no temporary files left


def test_token_never_written(tmp_path, monkeypatch):
    secret = "hf_" + "s3cr3t" * 6
    (tmp_path / "token").write_text(f"  {secret}\n")
    monkeypatch.setenv("MY_HF_TOKEN", secret)
    for hf_token in (tmp_path / "token", "MY_HF_TOKEN"):
        cfg = tiny(hf_token=hf_token)
        assert resolve_hf_token(cfg) == secret
        write_run_configs(cfg, tmp_path / "run")
        for name in ("config.yaml", "config.json"):
            text = (tmp_path / "run" / name).read_text()
            assert secret not in text and str(hf_token) in text
        assert load_train_config(tmp_path / "run").hf_token == hf_token
    with pytest.raises(ValueError, match=r"hf_token = hf_\.\.\. is not an environment variable name"):
        validate_train_config(tiny(hf_token=secret), 2)


def test_resolve_hf_token_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_TOKEN_VAR", raising=False)
    assert resolve_hf_token(tiny(hf_token=tmp_path / "absent")) is None
    assert resolve_hf_token(tiny(hf_token="NO_SUCH_TOKEN_VAR")) is None


def test_load_train_config_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.yaml does not exist"):
        load_train_config(tmp_path)


@pytest.mark.parametrize("changes, message", [
    ({"seed": 0}, r"seed = 0 is outside \(0, 2\*\*32 - 1\)\. Fix: pass --seed"),
    ({"seed": 2**32 - 1}, r"seed = 4294967295 is outside"),
    ({"trackers": ("jsonl", "tensorboard")}, r"Unknown trackers \['tensorboard'\]\. Fix: pass --trackers as a subset"),
    ({"save_interval": 0}, r"save_interval = 0 must be positive\. Fix: pass --save_interval >= 1"),
    ({"log_interval": -1}, r"log_interval = -1 must be positive\. Fix: pass --log_interval >= 1"),
    ({"keep_last_k": 0}, r"keep_last_k = 0 must be >= 1\. Fix"),
    ({"run_id": "a/b"}, r"run_id = 'a/b' cannot be part of a directory name"),
    ({"hf_token": "not a name"}, r"is not an environment variable name"),
    ({"registry_dirs": (Path("/no/such/registry"),)}, r"registry_dirs: /no/such/registry is not a directory"),
    ({"vla": dataclasses.replace(TinyTest(), global_batch_size=5)}, r"global_batch_size = 5 is not a positive mult"),
    ({"resume": "/no/such/ckpt.pt"}, r"--resume /no/such/ckpt.pt: no such checkpoint\. Fix.*--resume auto"),
    ({"resume_step": 10}, r"--resume_step only apply with --pretrained_checkpoint and --is_resume true"),
    ({"pretrained_checkpoint": Path("/no/such/step-000010-epoch-01-loss=0.5000.pt"), "resume_step": 10,
      "resume_epoch": 1}, r"--pretrained_checkpoint /no/such/\S+ does not exist"),
])
def test_validation_errors(changes, message):
    validate_train_config(tiny(), 2)
    with pytest.raises(ValueError, match=message):
        validate_train_config(tiny(**changes), 2)


def test_resume_flag_rules(ckpt):
    assert checkpoint_step_epoch(ckpt) == (10, 1)
    validate_train_config(tiny(pretrained_checkpoint=ckpt, resume_step=10, resume_epoch=1), 2)
    validate_train_config(tiny(pretrained_checkpoint=ckpt, is_resume=False), 2)  # fine-tune without resuming
    validate_train_config(tiny(resume="auto"), 2)
    validate_train_config(tiny(resume=str(ckpt)), 2)

    with pytest.raises(ValueError, match=r"--resume auto and --pretrained_checkpoint \S+ are exclusive"):
        validate_train_config(tiny(resume="auto", pretrained_checkpoint=ckpt, is_resume=False), 2)
    with pytest.raises(ValueError, match=r"needs --resume_step and --resume_epoch\. Fix: .*--is_resume false to "
                                         r"fine-tune from it without resuming"):
        validate_train_config(tiny(pretrained_checkpoint=ckpt), 2)
    with pytest.raises(ValueError, match=r"needs --resume_epoch\. Fix"):
        validate_train_config(tiny(pretrained_checkpoint=ckpt, resume_step=10), 2)
    with pytest.raises(ValueError, match=r"--resume_step 20 does not match the checkpoint file name "
                                         r"step-000010-epoch-01-loss=0.5000.pt \(10\)\. Fix: pass --resume_step 10, "
                                         r"or --is_resume false"):
        validate_train_config(tiny(pretrained_checkpoint=ckpt, resume_step=20, resume_epoch=1), 2)
    with pytest.raises(ValueError, match=r"--resume_epoch 2 does not match .* \(1\)\. Fix: pass --resume_epoch 1"):
        validate_train_config(tiny(pretrained_checkpoint=ckpt, resume_step=10, resume_epoch=2), 2)
    with pytest.raises(ValueError, match=r"--resume_step and --resume_epoch only apply with --pretrained_checkpoint"):
        validate_train_config(tiny(pretrained_checkpoint=ckpt, is_resume=False, resume_step=10, resume_epoch=1), 2)


def test_resume_reads_step_through_links(ckpt):
    latest = ckpt.parent / "latest-checkpoint.pt"
    latest.symlink_to(ckpt.name)
    validate_train_config(tiny(pretrained_checkpoint=latest, resume_step=10, resume_epoch=1), 2)
    hard = ckpt.parent / "latest-hard.pt"
    hard.hardlink_to(ckpt)
    assert checkpoint_step_epoch(hard) == (10, 1)
    plain = ckpt.parent / "weights.pt"
    plain.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"the file name has no 'step-XXXXXX-' to check --resume_step against\. "
                                         r"Fix: pass --is_resume false"):
        validate_train_config(tiny(pretrained_checkpoint=plain, resume_step=10, resume_epoch=1), 2)


def test_negative_prefetch_depth_is_refused_before_any_work():
    with pytest.raises(ValueError, match="prefetch_batches = -1 is negative"):
        validate_train_config(tiny(prefetch_batches=-1), 2)


def test_unknown_save_consolidated_is_refused():
    with pytest.raises(ValueError, match="save_consolidated = 'sometimes' is not one of"):
        validate_train_config(tiny(save_consolidated="sometimes"), 2)
