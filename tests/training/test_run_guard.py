"""Run-directory safety: the lock, refusing to train over an earlier run, resume validation before any write, the
recorded model of a fine-tuned run, and named errors for a bad --pretrained_checkpoint."""

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import build_tiny
from vla_train.config.model import get_model_config, model_config_section
from vla_train.config.train import TrainConfig, validate_train_config, write_run_configs
from vla_train.config.vla import TinyTest
from vla_train.models.run_dir import load_run_dir, read_model_config, save_base_vlm
from vla_train.training.checkpoint import CheckpointManager
from vla_train.training.checkpoint_io import consolidated_path
from vla_train.training.checkpoint_state import ModelState
from vla_train.training.distributed import DistributedContext
from vla_train.training.run_guard import RunDirectoryError, prepare_run_dir, write_run_files
from vla_train.training.run_lock import LOCK_NAME, acquire_run_lock

CTX = DistributedContext(rank=0, world_size=2, local_rank=0, local_world_size=2, device=torch.device("cpu"),
                         backend="gloo")
STATISTICS = {"demo_bridge": {"action": {"mean": [0.0]}}}


def tiny(tmp_path: Path, **changes) -> TrainConfig:
    return dataclasses.replace(TrainConfig(vla=TinyTest(), run_root_dir=tmp_path, trackers=("jsonl",)), **changes)


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _write_lock(run_dir: Path, **owner) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                 "started": 4e9, **owner}))


def _earlier_run(cfg: TrainConfig, run_dir: Path) -> None:
    write_run_configs(cfg, run_dir)
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-000002-epoch-00-loss=1.0000.pt").write_bytes(b"x")


# -------------------------------------------------------------------------------------------------------------- lock
def test_the_lock_records_its_owner_and_refuses_a_second_job(tmp_path):
    lock = acquire_run_lock(tmp_path / "run")
    owner = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
    assert (owner["host"], owner["pid"]) == (socket.gethostname(), os.getpid()) and owner["started"] > 0
    with pytest.raises(RunDirectoryError, match=rf"held by pid {os.getpid()} on host .* \(and it is running\)"):
        acquire_run_lock(tmp_path / "run")
    lock.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    acquire_run_lock(tmp_path / "run").release()


@pytest.mark.parametrize("owner", [{"pid": "dead"}, {"started": 0.0}], ids=["dead pid", "reused pid"])
def test_a_stale_lock_on_this_host_is_taken_over_with_a_warning(tmp_path, owner, log_records):
    owner = {**owner, "pid": _dead_pid()} if owner.get("pid") == "dead" else owner
    _write_lock(tmp_path / "run", **owner)
    lock = acquire_run_lock(tmp_path / "run")
    assert "Taking over the stale lock" in log_records.text and json.loads(lock.path.read_text())["pid"] == os.getpid()


def test_a_lock_from_another_host_is_refused_with_the_way_out(tmp_path):
    _write_lock(tmp_path / "run", host="gpu-node-17", pid=4242)
    with pytest.raises(RunDirectoryError, match=r"pid 4242 on host gpu-node-17 .*another host.*delete .*run\.lock"):
        acquire_run_lock(tmp_path / "run")


def test_release_never_removes_another_jobs_lock(tmp_path):
    lock = acquire_run_lock(tmp_path / "run")
    _write_lock(tmp_path / "run", host="gpu-node-17", pid=4242)  # e.g. taken over after this job was presumed dead
    lock.release()
    assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["host"] == "gpu-node-17"


def test_prepare_refuses_a_locked_run_dir_and_writes_nothing(tmp_path):
    cfg = tiny(tmp_path)
    run_dir = tmp_path / "tiny-test+n0+b2+x7"
    _write_lock(run_dir, host="gpu-node-17", pid=4242)
    with pytest.raises(RunDirectoryError, match="is in use by another job"):
        prepare_run_dir(cfg, CTX, run_dir)
    assert [p.name for p in run_dir.iterdir()] == [LOCK_NAME]


# ---------------------------------------------------------------------------------------------- fresh run, overwrite
def test_a_fresh_run_over_an_earlier_run_is_refused(tmp_path):
    cfg = tiny(tmp_path)
    run_dir = tmp_path / "run"
    _earlier_run(cfg, run_dir)
    before = (run_dir / "config.yaml").read_text()
    with pytest.raises(RunDirectoryError, match=r"run already holds an earlier run \(config.yaml, config.json, "
                                                r"checkpoints/step-000002.*--resume auto.*--run_id.*--overwrite true"):
        prepare_run_dir(cfg, CTX, run_dir)
    assert (run_dir / "config.yaml").read_text() == before and not (run_dir / LOCK_NAME).exists()


def test_a_failed_check_leaves_no_new_run_directory(tmp_path):
    cfg = tiny(tmp_path, resume=str(tmp_path / "elsewhere" / "checkpoints" / "step-000001-epoch-00-loss=1.0000"))
    with pytest.raises(FileNotFoundError):
        prepare_run_dir(cfg, CTX, tmp_path / "new-run")
    assert not (tmp_path / "new-run").exists()


def test_overwrite_deletes_the_earlier_run_after_the_checks_and_says_so(tmp_path, log_records):
    cfg = tiny(tmp_path, overwrite=True)
    run_dir = tmp_path / "run"
    _earlier_run(cfg, run_dir)
    (run_dir / "tiny-test+n0+b2+x7.jsonl").write_text("{}\n")
    plan = prepare_run_dir(cfg, CTX, run_dir)
    assert "--overwrite true: deleting the earlier run" in log_records.text
    assert "checkpoints/step-000002" in log_records.text
    assert [p.name for p in run_dir.iterdir()] == [LOCK_NAME] and plan.resume_from is None
    plan.release()
    with pytest.raises(RunDirectoryError, match="cannot be combined with a resume"):
        prepare_run_dir(tiny(tmp_path, overwrite=True, resume="auto"), CTX, run_dir)


# ------------------------------------------------------------------------------------------------------------ resume
def test_a_resume_that_differs_from_the_saved_run_is_refused_before_any_write(tmp_path):
    run_dir = tmp_path / "run"
    _earlier_run(tiny(tmp_path), run_dir)
    saved = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "config.json")}
    changed = dataclasses.replace(TinyTest(), data_mix="demo_bridge", base_vlm="tiny-siglip+tiny-llama",
                                  per_device_batch_size=1)
    with pytest.raises(RunDirectoryError) as error:
        prepare_run_dir(tiny(tmp_path, vla=changed, resume="auto", seed=8), CTX, run_dir)
    message = str(error.value)
    for expected in ("vla.base_vlm: 'tiny-dinosiglip+tiny-llama' in the saved run, 'tiny-siglip+tiny-llama' now",
                     "vla.data_mix: 'demo' in the saved run, 'demo_bridge' now", "vla.per_device_batch_size: 2",
                     "seed: 7 in the saved run, 8 now", "--run_id"):
        assert expected in message
    assert {name: (run_dir / name).read_bytes() for name in saved} == saved
    assert not (run_dir / LOCK_NAME).exists()


def test_a_resume_with_another_world_size_is_refused_before_any_write(tmp_path):
    run_dir = tmp_path / "run"
    cfg = tiny(tmp_path)
    write_run_configs(cfg, run_dir)
    vlm = build_tiny("tiny-dinosiglip+tiny-llama")
    checkpoint = CheckpointManager(run_dir).save(2, 0, 1.0, {"model": ModelState(vlm)})
    marker = json.loads((checkpoint / "complete.json").read_text())
    assert marker["world_size"] == 1  # saved by one process; this run has two
    with pytest.raises(RunDirectoryError, match="world size: 1 ranks saved step-000002.*, 2 now"):
        prepare_run_dir(tiny(tmp_path, resume="auto"), CTX, run_dir)
    plan = prepare_run_dir(tiny(tmp_path, resume="auto"), dataclasses.replace(CTX, world_size=1), run_dir)
    assert plan.resume_from == checkpoint
    plan.release()


def test_a_resume_with_another_model_is_refused_before_the_model_is_built(tmp_path):
    run_dir = tmp_path / "run"
    write_run_configs(tiny(tmp_path), run_dir)
    manager = CheckpointManager(run_dir, model_id="tiny-siglip+tiny-llama")  # what the marker records
    checkpoint = manager.save(2, 0, 1.0, {"model": ModelState(build_tiny("tiny-siglip+tiny-llama"))})
    assert json.loads((checkpoint / "complete.json").read_text())["model_id"] == "tiny-siglip+tiny-llama"
    expected = (r"model: tiny-siglip\+tiny-llama saved step-000002-epoch-00-loss=1.0000, tiny-dinosiglip\+tiny-llama "
                r"now \(--vla.base_vlm tiny-dinosiglip\+tiny-llama\).*Fix: resume with the saved settings")
    with pytest.raises(RunDirectoryError, match=f"(?s){expected}"):
        prepare_run_dir(tiny(tmp_path, resume=str(checkpoint)), dataclasses.replace(CTX, world_size=1), run_dir)
    assert not (run_dir / LOCK_NAME).exists()


def test_resume_and_fine_tuning_from_a_checkpoint_without_its_pt(tmp_path):
    source = _base_run(tmp_path, "tiny-siglip+tiny-llama")
    vlm = build_tiny("tiny-siglip+tiny-llama")
    torch.nn.init.normal_(vlm.projector.projector[0].weight)  # not the base weights
    checkpoint = CheckpointManager(source, save_consolidated="never").save(3, 0, 1.0, {"model": ModelState(vlm)})
    pt = consolidated_path(checkpoint)
    assert not pt.exists()
    for given in (checkpoint, pt):  # the directory, or the `.pt` name the checkpoint would have had
        validate_train_config(tiny(tmp_path, pretrained_checkpoint=given, is_resume=False), 2)
        validate_train_config(tiny(tmp_path, pretrained_checkpoint=given, resume_step=3, resume_epoch=0), 2)
    cfg = tiny(tmp_path, pretrained_checkpoint=checkpoint, is_resume=False)
    plan = prepare_run_dir(cfg, CTX, tmp_path / "tuned")
    plan.release()
    assert cfg.pretrained_checkpoint == pt and pt.is_file()  # consolidated before the model is built
    loaded = load_run_dir(source, checkpoint=cfg.pretrained_checkpoint)
    assert torch.equal(loaded.projector.projector[0].weight, vlm.projector.projector[0].weight)


# --------------------------------------------------------------------------------------- fine-tuning, recorded model
def _base_run(tmp_path: Path, model_id: str) -> Path:
    run_dir = tmp_path / "bases" / model_id
    save_base_vlm(build_tiny(model_id), get_model_config(model_id), run_dir)
    return run_dir


def test_fine_tuning_records_the_checkpoints_model_not_the_recipes(tmp_path):
    source = _base_run(tmp_path, "tiny-siglip+tiny-llama")
    cfg = tiny(tmp_path, pretrained_checkpoint=source / "checkpoints" / "latest-checkpoint.pt", is_resume=False)
    assert cfg.vla.base_vlm == "tiny-dinosiglip+tiny-llama"  # the recipe names another architecture
    plan = prepare_run_dir(cfg, CTX, tmp_path / "tuned")
    write_run_files(cfg, plan, STATISTICS)
    plan.release()
    recorded = json.loads((tmp_path / "tuned" / "config.json").read_text())["model"]
    assert recorded == model_config_section(get_model_config("tiny-siglip+tiny-llama"))
    assert read_model_config(tmp_path / "tuned").model_id == "tiny-siglip+tiny-llama"


def test_a_relative_base_vlm_does_not_tie_the_run_to_its_working_directory(tmp_path, monkeypatch):
    _base_run(tmp_path, "tiny-siglip+tiny-llama")
    monkeypatch.chdir(tmp_path)
    vla = dataclasses.replace(TinyTest(), base_vlm="bases/tiny-siglip+tiny-llama")
    cfg = tiny(tmp_path, vla=vla)
    plan = prepare_run_dir(cfg, CTX, tmp_path / "run")
    write_run_files(cfg, plan, STATISTICS)
    plan.release()
    monkeypatch.chdir(tmp_path / "run")  # export from elsewhere: the relative path no longer resolves
    assert read_model_config(tmp_path / "run").model_id == "tiny-siglip+tiny-llama"


def test_resume_rewrites_changed_run_files_keeping_the_previous_version(tmp_path):
    run_dir = tmp_path / "run"
    cfg = tiny(tmp_path)
    plan = prepare_run_dir(cfg, CTX, run_dir)
    write_run_files(cfg, plan, STATISTICS)
    plan.release()
    longer = tiny(tmp_path, vla=dataclasses.replace(TinyTest(), max_steps=12), resume="auto")
    plan = prepare_run_dir(longer, CTX, run_dir)
    write_run_files(longer, plan, STATISTICS)
    plan.release()
    backups = sorted(run_dir.glob("config.before-*.yaml"))
    assert len(backups) == 1 and "max_steps: 6" in backups[0].read_text()
    assert "max_steps: 12" in (run_dir / "config.yaml").read_text()
    assert not list(run_dir.glob("dataset_statistics.before-*"))  # unchanged files are not backed up


# ------------------------------------------------------------------------------------------- --pretrained_checkpoint
def test_a_pretrained_checkpoint_outside_a_run_directory_is_named(tmp_path):
    loose = tmp_path / "downloads" / "step-000010-epoch-01-loss=0.5000.pt"
    loose.parent.mkdir()
    torch.save({"model": {}}, loose)
    expected = rf"--pretrained_checkpoint {re.escape(str(loose))} is not inside a run directory"
    with pytest.raises(RunDirectoryError, match=expected):
        prepare_run_dir(tiny(tmp_path, pretrained_checkpoint=loose, is_resume=False), CTX, tmp_path / "run")


def test_a_truncated_pretrained_checkpoint_is_named(tmp_path):
    source = _base_run(tmp_path, "tiny-siglip+tiny-llama")
    checkpoint = source / "checkpoints" / "latest-checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    expected = rf"{re.escape(str(checkpoint))} is not a readable torch checkpoint.*truncated"
    with pytest.raises(RunDirectoryError, match=expected):
        prepare_run_dir(tiny(tmp_path, pretrained_checkpoint=checkpoint, is_resume=False), CTX, tmp_path / "run")
