"""Async checkpoints (one in flight, committed after every rank's write, failures surfaced), the optional consolidated
`.pt` (written on demand, consolidated offline from the shards), the Stateful set, format-2 checkpoints.

Background writes are gated on events (no sleeps, no timing): the write of the shards blocks until the test lets it
go, so "training continues during the write" and "the save waits" are checked deterministically."""

import json
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.filesystem import _FileSystemWriter

from tests.conftest import build_tiny
from tests.training.test_checkpoint import (
    MODEL_ID,
    _assert_same_optimizer_state,
    _draw,
    _load,
    _optimizer_and_scheduler,
    _save,
    _seed_all,
    _sharded_tiny,
    _states,
    _train_step,
)
from vla_train.config.model import get_model_config
from vla_train.config.train import TrainConfig, validate_train_config
from vla_train.config.vla import TinyTest
from vla_train.export.hf import find_checkpoint
from vla_train.models.run_dir import LATEST_CHECKPOINT, load_run_dir, model_state_dicts, save_base_vlm
from vla_train.training.checkpoint import CheckpointManager, CheckpointWriteError
from vla_train.training.checkpoint_io import (
    COMPLETE_MARKER,
    checkpoint_name,
    consolidate_checkpoint,
    consolidated_path,
    rank_file_name,
)
from vla_train.training.distributed import free_port

REAL_WRITE = _FileSystemWriter.write_data


def _fresh_load(manager, path):
    vlm = build_tiny(MODEL_ID)
    optimizer, scheduler = _optimizer_and_scheduler(vlm)
    train_state, data_state = _load(manager, path, vlm, optimizer, scheduler)
    return vlm, optimizer, scheduler, train_state, data_state


def _assert_same_model(a, b) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


@pytest.fixture
def gated_write(monkeypatch):
    """Background (and foreground) shard writes wait for `gate`; `events` records their start and end."""
    gate, events = threading.Event(), []

    def write_data(self, plan, planner):
        events.append(("write-start", Path(self.path).name))
        assert gate.wait(timeout=120), "the test never released the write"
        result = REAL_WRITE(self, plan, planner)
        events.append(("write-end", Path(self.path).name))
        return result

    monkeypatch.setattr(_FileSystemWriter, "write_data", write_data)
    return gate, events


# ------------------------------------------------------------------------------------------------ async, one process
def test_async_save_loads_bit_equal_to_a_sync_save(tmp_path, process_group):
    vlm = build_tiny(MODEL_ID)
    optimizer, scheduler = _optimizer_and_scheduler(vlm)
    _seed_all(3)
    _train_step(vlm, optimizer, scheduler)
    sync_path = _save(CheckpointManager(tmp_path / "sync"), vlm, optimizer, scheduler, step=1)
    manager = CheckpointManager(tmp_path / "async", async_save=True)
    async_path = _save(manager, vlm, optimizer, scheduler, step=1)
    assert manager.in_flight == async_path.name and not async_path.exists()  # not committed yet
    assert manager.wait() == async_path and manager.in_flight is None
    CheckpointManager.verify(async_path)

    loaded_sync = _fresh_load(CheckpointManager(tmp_path / "sync"), sync_path)
    loaded_async = _fresh_load(manager, async_path)
    _assert_same_model(loaded_sync[0], loaded_async[0])
    _assert_same_model(vlm, loaded_async[0])
    _assert_same_optimizer_state(loaded_sync[1], loaded_async[1])
    _assert_same_optimizer_state(optimizer, loaded_async[1])
    assert loaded_sync[3:] == loaded_async[3:] == ({"tokens_seen": 10, "step": 1, "epoch": 0, "loss": 1.0},
                                                   {"frames_yielded": 1})
    assert loaded_async[2].state_dict() == scheduler.state_dict()


def test_training_continues_during_an_async_save_which_keeps_the_save_steps_state(tmp_path, process_group,
                                                                                  gated_write):
    gate, events = gated_write
    vlm = build_tiny(MODEL_ID)
    optimizer, scheduler = _optimizer_and_scheduler(vlm)
    _seed_all(4)
    _train_step(vlm, optimizer, scheduler)
    model_before = {k: v.detach().clone() for k, v in vlm.state_dict().items()}
    lr_before = scheduler.get_last_lr()
    manager = CheckpointManager(tmp_path, async_save=True)
    states, per_rank = _states(vlm, optimizer, scheduler, {"frames_yielded": 1}, {"tokens_seen": 10})
    saved_optimizer_state = {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
                             for k, s in optimizer.state_dict()["state"].items()}
    path = manager.save(1, 0, 1.0, states, per_rank)
    expected_draw = _draw()  # the RNG state at the save step is what a resume restores

    # training goes on while the write waits: parameters, optimizer moments, schedule, data position all move
    assert ("write-end", f".{path.name}.tmp") not in events  # the gate holds the write back
    losses_after = [_train_step(vlm, optimizer, scheduler) for _ in range(2)]
    per_rank["data"].obj.state["frames_yielded"] = 99
    assert any(not torch.equal(vlm.state_dict()[k], v) for k, v in model_before.items())
    assert not (tmp_path / "checkpoints" / path.name).exists() and manager.latest_complete() is None
    gate.set()
    assert manager.wait() == path and events[-1] == ("write-end", f".{path.name}.tmp")

    fresh, fresh_optimizer, fresh_scheduler, train_state, data_state = _fresh_load(manager, path)
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, model_before[name]), name
    loaded = fresh_optimizer.state_dict()["state"]
    assert loaded.keys() == saved_optimizer_state.keys()
    for key, state in saved_optimizer_state.items():
        assert all(torch.equal(torch.as_tensor(loaded[key][n]), torch.as_tensor(v)) for n, v in state.items())
    assert fresh_scheduler.get_last_lr() == lr_before and data_state == {"frames_yielded": 1}
    assert train_state["step"] == 1 and _draw() == expected_draw
    assert [_train_step(fresh, fresh_optimizer, fresh_scheduler) for _ in range(2)] == losses_after  # bit-equal


def test_a_second_save_waits_for_the_first_and_commits_it(tmp_path, process_group, gated_write, monkeypatch):
    gate, events = gated_write
    vlm = build_tiny(MODEL_ID)
    optimizer, scheduler = _optimizer_and_scheduler(vlm)
    manager = CheckpointManager(tmp_path, async_save=True)
    real_prepare = CheckpointManager._make_temporary
    monkeypatch.setattr(CheckpointManager, "_make_temporary", staticmethod(
        lambda tmp: (events.append(("prepare", tmp.name)), real_prepare(tmp))[1]))
    first = _save(manager, vlm, optimizer, scheduler, step=1)
    assert manager.in_flight == first.name and not first.exists()
    gate.set()
    second = _save(manager, vlm, optimizer, scheduler, step=2)
    # the second save started only after the first write ended, and committed it first
    assert events[:4] == [("prepare", f".{first.name}.tmp"), ("write-start", f".{first.name}.tmp"),
                          ("write-end", f".{first.name}.tmp"), ("prepare", f".{second.name}.tmp")]
    assert manager.complete_checkpoints() == [first] and manager.in_flight == second.name
    assert manager.wait() == second and manager.complete_checkpoints() == [first, second]
    assert manager.wait() is None  # nothing in flight


def test_a_failed_background_write_surfaces_at_the_next_save_and_at_wait(tmp_path, process_group, monkeypatch,
                                                                        log_records):
    vlm = build_tiny(MODEL_ID)
    optimizer, scheduler = _optimizer_and_scheduler(vlm)
    manager = CheckpointManager(tmp_path, async_save=True, keep_last_k=1)
    first = _save(manager, vlm, optimizer, scheduler, step=1, final=True)  # synchronous, committed
    before = {p.name: p.stat().st_size for p in first.iterdir()}

    def full_disk(self, plan, planner):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_FileSystemWriter, "write_data", full_disk)  # until the write is known to have failed
    failed = _save(manager, vlm, optimizer, scheduler, step=2)
    with pytest.raises(CheckpointWriteError, match=rf"Writing checkpoint {failed.name} in the background failed"):
        _save(manager, vlm, optimizer, scheduler, step=3)
    monkeypatch.undo()
    checkpoints = tmp_path / "checkpoints"
    assert manager.complete_checkpoints() == [first] and not failed.exists()
    assert {p.name: p.stat().st_size for p in first.iterdir()} == before  # the previous checkpoint is intact
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]  # the temporary directory is gone
    assert (checkpoints / LATEST_CHECKPOINT).samefile(consolidated_path(first))

    monkeypatch.setattr(_FileSystemWriter, "write_data", full_disk)
    failed = _save(manager, vlm, optimizer, scheduler, step=4)
    with pytest.raises(CheckpointWriteError, match=f"{failed.name}.*No space left on device"):
        manager.wait()  # what the trainer calls when the run ends
    monkeypatch.undo()
    assert manager.complete_checkpoints() == [first] and manager.in_flight is None

    monkeypatch.setattr(_FileSystemWriter, "write_data", full_disk)
    failed = _save(manager, vlm, optimizer, scheduler, step=5)
    manager.close()  # the error path (not collective): logged, not committed
    monkeypatch.undo()
    assert f"The background write of checkpoint {failed.name} failed" in log_records.text
    assert manager.complete_checkpoints() == [first] and manager.in_flight is None
    assert _save(manager, vlm, optimizer, scheduler, step=6) and manager.wait().name.startswith("step-000006")
    assert manager.complete_checkpoints()[-1].name.startswith("step-000006")


# ------------------------------------------------------------------------------------------- the consolidated `.pt`
def test_the_consolidated_pt_is_written_only_when_asked(tmp_path):
    vlm = build_tiny(MODEL_ID)
    optimizer, scheduler = _optimizer_and_scheduler(vlm)
    manager = CheckpointManager(tmp_path, save_consolidated="end")
    periodic = _save(manager, vlm, optimizer, scheduler, step=1)
    latest = tmp_path / "checkpoints" / LATEST_CHECKPOINT
    assert not consolidated_path(periodic).exists() and not latest.exists()
    assert json.loads((periodic / COMPLETE_MARKER).read_text())["consolidated_size"] is None
    CheckpointManager.verify(periodic)  # a checkpoint without `.pt` verifies
    last = _save(manager, vlm, optimizer, scheduler, step=2, final=True)
    assert consolidated_path(last).is_file() and latest.samefile(consolidated_path(last))
    stopped = _save(manager, vlm, optimizer, scheduler, step=3, final=True, consolidate=False)  # a signal stop
    assert not consolidated_path(stopped).exists() and latest.samefile(consolidated_path(last))

    never = CheckpointManager(tmp_path / "never", save_consolidated="never")
    assert not consolidated_path(_save(never, vlm, optimizer, scheduler, step=1, final=True)).exists()
    every = CheckpointManager(tmp_path / "every", save_consolidated="every")
    assert consolidated_path(_save(every, vlm, optimizer, scheduler, step=1)).is_file()
    with pytest.raises(ValueError, match="save_consolidated = 'sometimes'"):
        CheckpointManager(tmp_path, save_consolidated="sometimes")
    cfg = TrainConfig(vla=TinyTest(), save_consolidated="sometimes")
    with pytest.raises(ValueError, match="save_consolidated = 'sometimes' is not one of.*--save_consolidated end"):
        validate_train_config(cfg, 2)


def test_a_checkpoint_without_pt_is_consolidated_offline_in_fp32(tmp_path):
    vlm = build_tiny(MODEL_ID)
    save_base_vlm(vlm, get_model_config(MODEL_ID), tmp_path)  # config.json and a base latest-checkpoint.pt
    vlm.vision_backbone.requires_grad_(False)
    optimizer, scheduler = _optimizer_and_scheduler(vlm)
    _train_step(vlm, optimizer, scheduler)
    vlm.vision_backbone.to(torch.bfloat16)  # a frozen backbone trained in bf16 is stored as bf16
    manager = CheckpointManager(tmp_path, save_consolidated="never")
    path = _save(manager, vlm, optimizer, scheduler, step=1, loss=0.5)
    pt = consolidated_path(path)
    assert not pt.exists() and CheckpointManager.find_path(pt) == path  # --resume / --pretrained_checkpoint

    assert find_checkpoint(tmp_path) == pt and pt.is_file()  # export: the newer sharded checkpoint, consolidated
    saved = torch.load(pt, weights_only=True)["model"]
    reference = model_state_dicts(vlm)
    assert list(saved) == ["vision_backbone", "projector", "llm_backbone"]
    for key, state in saved.items():
        assert set(state) == set(reference[key]), key
        for name, tensor in state.items():
            assert tensor.dtype == torch.float32, name
            assert torch.equal(tensor, reference[key][name].float()), name
    assert reference["vision_backbone"][next(iter(reference["vision_backbone"]))].dtype == torch.bfloat16
    assert consolidate_checkpoint(path) == pt  # idempotent: an existing `.pt` is kept
    assert find_checkpoint(tmp_path, step=1) == pt
    loaded = load_run_dir(tmp_path, checkpoint=pt)
    assert torch.equal(loaded.projector.state_dict()["projector.0.weight"],
                       vlm.projector.state_dict()["projector.0.weight"])


def test_format_2_checkpoints_still_load(tmp_path):
    """A version-2 rank file (`data_state`, `rng` instead of `states`) loads into the per-rank states."""
    vlm = build_tiny(MODEL_ID)
    optimizer, scheduler = _optimizer_and_scheduler(vlm)
    _train_step(vlm, optimizer, scheduler)
    path = _save(CheckpointManager(tmp_path), vlm, optimizer, scheduler, step=1)
    rank_file = path / rank_file_name(0)
    state = torch.load(rank_file, weights_only=False)
    state = {"version": 2, "rank": 0, "world_size": 1, "data_state": state["states"]["data"],
             "rng": state["states"]["rng"]}
    torch.save(state, rank_file)
    marker = json.loads((path / COMPLETE_MARKER).read_text())
    marker = {k: v for k, v in marker.items() if k not in ("states", "per_rank_states", "model_id")}
    marker["files"][rank_file_name(0)] = rank_file.stat().st_size
    (path / COMPLETE_MARKER).write_text(json.dumps({**marker, "version": 2}))
    fresh, fresh_optimizer, _, train_state, data_state = _fresh_load(CheckpointManager(tmp_path), path)
    assert data_state == {"frames_yielded": 1} and train_state["tokens_seen"] == 10
    _assert_same_model(vlm, fresh)
    _assert_same_optimizer_state(optimizer, fresh_optimizer)


def test_loading_a_state_the_checkpoint_lacks_is_refused(tmp_path):
    vlm = build_tiny(MODEL_ID)
    optimizer, scheduler = _optimizer_and_scheduler(vlm)
    path = _save(CheckpointManager(tmp_path), vlm, optimizer, scheduler, step=1)
    states, per_rank = _states(vlm, optimizer, scheduler)
    per_rank["ema"] = per_rank["data"]
    with pytest.raises(ValueError, match=r"holds no \['ema'\] state"):
        CheckpointManager(tmp_path).load(path, states, per_rank)
    assert checkpoint_name(1, 0, 1.0) == path.name


# ------------------------------------------------------------------------------------------- two processes, async
def _async_worker(rank: int, root: str, port: int, fail_rank: int) -> None:
    """Save asynchronously while training on; rank `fail_rank` (if any) fails its background write."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        vlm = _sharded_tiny()
        optimizer, scheduler = _optimizer_and_scheduler(vlm)
        manager = CheckpointManager(Path(root) / "run", async_save=True, save_consolidated="end")
        _seed_all(2000 + rank)
        result: dict = {"before": [_train_step(vlm, optimizer, scheduler) for _ in range(2)]}
        if rank == fail_rank:
            def full_disk(self, plan, planner):
                raise OSError(28, "No space left on device")

            _FileSystemWriter.write_data = full_disk
        states, per_rank = _states(vlm, optimizer, scheduler, {"rank": rank}, {})
        result["path"] = str(manager.save(2, 0, result["before"][-1], states, per_rank))
        result["draw"] = _draw()
        result["losses"] = [_train_step(vlm, optimizer, scheduler) for _ in range(2)]  # during the write
        try:
            manager.wait()
            result["outcome"] = "committed"
        except RuntimeError as error:
            result["outcome"] = f"{type(error).__name__}: {error}"
        _FileSystemWriter.write_data = REAL_WRITE
        if fail_rank < 0:
            result["train_state"], result["data_state"] = _load(manager, manager.find(2, 0), vlm, optimizer,
                                                                 scheduler)
            result["resumed_draw"] = _draw()
            result["resumed"] = [_train_step(vlm, optimizer, scheduler) for _ in range(2)]
        torch.save(result, Path(root) / f"async-{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(600)
def test_two_process_async_save_while_training_resumes_exactly(tmp_path):
    mp.spawn(_async_worker, args=(str(tmp_path), free_port(), -1), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"async-{rank}.pt", weights_only=False) for rank in range(2)]
    for rank, result in enumerate(results):
        assert result["outcome"] == "committed"
        assert result["resumed"] == result["losses"]  # the state of the save step, not of the steps after it
        assert result["resumed_draw"] == result["draw"] and result["data_state"] == {"rank": rank}
    path = Path(results[0]["path"])
    assert sorted(p.name for p in path.glob("rank-*.pt")) == ["rank-00000.pt", "rank-00001.pt"]
    assert not consolidated_path(path).exists()  # save_consolidated="end": a periodic save has no `.pt`


@pytest.mark.timeout(600)
def test_two_process_background_failure_on_one_rank_raises_on_every_rank(tmp_path):
    mp.spawn(_async_worker, args=(str(tmp_path), free_port(), 1), nprocs=2, join=True)
    outcomes = [torch.load(tmp_path / f"async-{rank}.pt", weights_only=False)["outcome"] for rank in range(2)]
    name = Path(torch.load(tmp_path / "async-0.pt", weights_only=False)["path"]).name
    for outcome in outcomes:
        assert outcome.startswith("CheckpointWriteError") and name in outcome
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []  # nothing committed, no temporary left
