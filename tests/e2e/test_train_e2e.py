"""torchrun, 2 processes, gloo: every freezing stage and sharding strategy (frozen parameters bit-unchanged,
trainable ones trained), hybrid sharding over 2 nodes x 2, exact resume, SIGTERM, bad configs."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from tests.e2e.conftest import REPO, assert_ok, step_losses, torchrun, torchrun_nodes, train_args
from vla_train.config.train import load_train_config
from vla_train.export.hf import find_checkpoint
from vla_train.models.run_dir import load_base_vlm, load_run_dir
from vla_train.models.vlm import ALL_MODULE_KEYS, PrismaticVLM

RUN_ID = "tiny-test+n0+b2+x7"
BASE_VLM = "tiny-dinosiglip+tiny-llama"  # tiny-test's base_vlm: built from its seeded initialization

# every VLA freezing stage and every sharding strategy appears at least once
CASES = [
    ("vla-full-train", "full-shard", []),
    ("vla-train", "shard-grad-op", ["--vla.freeze_vision_backbone", "true"]),
    ("vla-sandwich-train", "hybrid-shard", ["--vla.freeze_llm_backbone", "true", "--vla.unfreeze_last_llm_layer",
                                            "true"]),
    ("vla-last-layer-train", "fsdp-full-shard", ["--vla.freeze_vision_backbone", "true", "--vla.freeze_llm_backbone",
                                                 "true", "--vla.unfreeze_last_llm_layer", "true",
                                                 "--vla.global_batch_size", "8"]),
]

# what each strategy runs as on one node of 2 processes (the reference id is full sharding there)
RUNS_AS = {"full-shard": "full-shard on mesh (2,)", "shard-grad-op": "shard-grad-op on mesh (2,)",
           "hybrid-shard": "hybrid-shard on mesh (1, 2)", "fsdp-full-shard": "full-shard on mesh (2,)"}


@pytest.mark.parametrize(("stage", "strategy", "flags"), CASES, ids=[c[0] for c in CASES])
def test_each_stage_and_strategy_trains_and_writes_a_loadable_run(stage, strategy, flags, demo_data, tmp_path):
    result = torchrun(train_args(demo_data, tmp_path, "--vla.train_strategy", strategy, "--vla.max_steps", "3",
                                 *flags))
    assert_ok(result)
    run_dir = tmp_path / RUN_ID
    assert f"Stage {stage}" in result.stderr
    assert f"train_strategy {strategy} ran as {RUNS_AS[strategy]}" in result.stderr
    losses = step_losses(run_dir)
    assert sorted(losses) == [1, 2, 3] and all(v == v for v in losses.values())
    # reference run-directory layout
    for name in ("config.yaml", "config.json", "dataset_statistics.json", "run-metrics.jsonl"):
        assert (run_dir / name).is_file(), name
    config = json.loads((run_dir / "config.json").read_text())
    assert next(iter(config["vla"])) == "type" and config["vla"]["type"] == "tiny-test"
    assert load_train_config(run_dir).vla.max_steps == 3  # config round trip
    statistics = json.loads((run_dir / "dataset_statistics.json").read_text())
    assert set(statistics) == {"demo_bridge", "demo_libero"} and "mask" in statistics["demo_bridge"]["action"]
    checkpoints = run_dir / "checkpoints"
    consolidated = sorted(checkpoints.glob("step-000003-epoch-*.pt"))
    assert len(consolidated) == 1 and (checkpoints / "latest-checkpoint.pt").is_file()
    state = torch.load(checkpoints / "latest-checkpoint.pt", weights_only=True)
    assert set(state["model"]) == {"vision_backbone", "projector", "llm_backbone"}
    vlm = load_run_dir(run_dir)  # a VLA run directory reloads through its base_vlm
    assert all(p.dtype == torch.float32 for p in vlm.parameters())
    _assert_trained_as_staged(stage, state["model"], load_base_vlm(BASE_VLM))


def _trains(stage: str, key: str, name: str, last_layer: int) -> bool:
    """Whether `stage` trains parameter `name` of module `key` (the freezing table, written out independently)."""
    if key == "vision_backbone":
        return stage in ("vla-full-train", "vla-sandwich-train")
    if key == "projector":
        return stage != "vla-last-layer-train"
    if stage in ("vla-full-train", "vla-train"):
        return True
    return name.startswith(("llm.model.embed_tokens.", f"llm.model.layers.{last_layer}.", "llm.lm_head."))


def _unreached_parameters(vlm: PrismaticVLM) -> set[str]:
    """Parameters no loss gradient reaches, from one backward of the plain (unsharded) model: the featurizers return
    their penultimate block, so the last block, final norm and SigLIP's pooling head are unused."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vlm.llm_backbone.llm.config.vocab_size, (2, 8), generator=generator)
    size = vlm.vision_backbone.default_image_resolution
    pixels = {key: torch.randn(2, *size, generator=generator) for key in vlm.vision_backbone.keys}
    vlm(input_ids=input_ids, pixel_values=pixels, labels=input_ids).loss.backward()
    unreached = {name for name, p in vlm.named_parameters() if p.grad is None or not p.grad.any()}
    vlm.zero_grad(set_to_none=True)
    return unreached


def _assert_trained_as_staged(stage: str, saved: dict, base: PrismaticVLM) -> None:
    """Compare the consolidated checkpoint (FP32) with the base model, parameter by parameter. Frozen parameters
    (and trainable ones no gradient reaches: AdamW skips them) are bit-unchanged. Outside the stages that train it
    the vision backbone is cast to bf16 before sharding (mixed precision, as the reference does), so there
    "unchanged" means equal to the bf16-rounded original. Every other trainable parameter changed."""
    last_layer = len(base.llm_backbone.llm.model.layers) - 1
    unreached = _unreached_parameters(base)
    assert unreached and all(name.startswith("vision_backbone.") for name in unreached), unreached
    cast_vision = not _trains(stage, "vision_backbone", "", last_layer)
    changed = {key: 0 for key in ALL_MODULE_KEYS}
    for key in ALL_MODULE_KEYS:
        original = getattr(base, key).state_dict()
        assert set(saved[key]) == set(original), key  # same keys as the base model (checkpoint compatibility)
        for name, tensor in original.items():
            if key == "vision_backbone" and cast_vision:
                tensor = tensor.to(torch.bfloat16).float()
            if _trains(stage, key, name, last_layer) and f"{key}.{name}" not in unreached:
                assert not torch.equal(saved[key][name], tensor), f"{stage}: trainable {key}.{name} did not change"
                changed[key] += 1
            else:
                assert torch.equal(saved[key][name], tensor), f"{stage}: frozen {key}.{name} changed"
    trained = {key for key in ALL_MODULE_KEYS if any(_trains(stage, key, n, last_layer) for n in saved[key])}
    assert {key for key, count in changed.items() if count} == trained
    if cast_vision:  # the bf16 rounding is real: the saved frozen vision weights are not the FP32 originals
        original = base.vision_backbone.state_dict()
        assert any(not torch.equal(saved["vision_backbone"][n], t) for n, t in original.items())


def test_hybrid_shard_replicates_across_two_nodes(demo_data, tmp_path):
    """4 processes as 2 nodes x 2: the reference id `fsdp-full-shard` runs hybrid sharding on a (2, 2) mesh, each
    parameter replicated across the nodes and sharded within one; it trains and its checkpoint reloads."""
    node0, node1 = torchrun_nodes(train_args(demo_data, tmp_path, "--vla.train_strategy", "fsdp-full-shard",
                                             "--vla.max_steps", "2", "--vla.expected_world_size", "4",
                                             "--vla.global_batch_size", "8"))
    assert_ok(node0)
    assert_ok(node1)
    assert ("train_strategy fsdp-full-shard ran as hybrid-shard on mesh (2, 2) ('replicate', 'shard'), parameter "
            "placements (Replicate(), Shard(dim=0)) (2 node(s)") in node0.stderr
    assert "global batch 8 = 2 per device x 4 ranks x 1 accumulation" in node0.stderr
    run_dir = tmp_path / RUN_ID
    losses = step_losses(run_dir)
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())
    (sharded,) = [p for p in (run_dir / "checkpoints").glob("step-000002-epoch-*") if p.is_dir()]
    metadata = FileSystemReader(sharded).read_metadata().state_dict_metadata
    for name in ("model.llm_backbone.llm.model.embed_tokens.weight", "model.projector.projector.0.weight"):
        rows = metadata[name].size[0]  # 2 distinct shards (one per rank of a node), not 4 as full sharding saves
        assert sorted((c.offsets[0], c.sizes[0]) for c in metadata[name].chunks) == [(0, rows // 2), (rows // 2,
                                                                                                     rows // 2)]
    vlm = load_run_dir(run_dir)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in vlm.parameters())
    saved = torch.load(run_dir / "checkpoints" / "latest-checkpoint.pt", weights_only=True)["model"]
    _assert_trained_as_staged("vla-full-train", saved, load_base_vlm(BASE_VLM))  # every reached parameter trained


def test_resume_reproduces_a_straight_run_exactly(demo_data, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["--vla.max_steps", "6", "--vla.lr_scheduler_type", "linear-warmup+cosine-decay",
              "--vla.warmup_ratio", "0.34", "--save_interval", "2"]  # async saves at steps 2 and 4 while training
    assert_ok(torchrun(train_args(demo_data, straight, *common)))
    first = torchrun(train_args(demo_data, split, *common, "--stop_after_steps", "3"))
    assert_ok(first)
    assert "writing in the background" in first.stderr
    assert sorted(step_losses(split / RUN_ID)) == [1, 2, 3]
    checkpoints = split / RUN_ID / "checkpoints"  # --save_consolidated end: a `.pt` for the last save only
    assert sorted(p.name[:11] for p in checkpoints.glob("step-*")) == ["step-000002", "step-000003", "step-000003"]
    resumed = torchrun(train_args(demo_data, split, *common, "--resume", "auto"))
    assert_ok(resumed)
    assert "Resumed exactly from" in resumed.stderr
    expected, got = step_losses(straight / RUN_ID), step_losses(split / RUN_ID)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    assert got == expected  # bit-identical per-step losses


def test_sigterm_finishes_the_step_saves_and_exits_cleanly(demo_data, tmp_path):
    process = torchrun(train_args(demo_data, tmp_path, "--vla.max_steps", "500", "--save_interval", "1000"),
                       popen=True)
    run_dir = tmp_path / RUN_ID
    deadline = time.time() + 300
    while time.time() < deadline and not (run_dir / f"{RUN_ID}.jsonl").exists():
        time.sleep(0.5)
    assert (run_dir / f"{RUN_ID}.jsonl").exists(), "training never logged a step"
    workers = psutil.Process(process.pid).children()
    assert len(workers) == 2
    for worker in workers:  # as a cluster scheduler does: every process of the job gets SIGTERM
        worker.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-4000:]
    last_step = max(step_losses(run_dir))
    assert last_step < 500
    # a signal stop saves the sharded checkpoint only (--save_consolidated end: no `.pt` within the time budget)
    saved = sorted((run_dir / "checkpoints").glob(f"step-{last_step:06d}-epoch-*"))
    assert len(saved) == 1 and (saved[0] / "complete.json").is_file()
    assert not (run_dir / "checkpoints" / "latest-checkpoint.pt").exists()
    assert torch.load(find_checkpoint(run_dir), weights_only=True)["model"]  # export consolidates it


def test_bad_configs_fail_before_any_work(demo_data, tmp_path):
    result = torchrun(train_args(demo_data, tmp_path, "--vla.expected_world_size", "8"))
    assert result.returncode != 0 and "Expected World Size = 8" in result.stdout + result.stderr
    result = torchrun(train_args(demo_data, tmp_path, "--vla.global_batch_size", "5"))
    assert result.returncode != 0 and "global_batch_size" in result.stdout + result.stderr
    assert not (tmp_path / RUN_ID).exists()  # nothing half-written


def test_reference_resume_flags_and_fine_tuning_from_a_checkpoint(demo_data, tmp_path):
    first, tuned = tmp_path / "first", tmp_path / "tuned"
    assert_ok(torchrun(train_args(demo_data, first, "--vla.max_steps", "4", "--stop_after_steps", "2")))
    checkpoints = first / RUN_ID / "checkpoints"
    (step_two,) = checkpoints.glob("step-000002-epoch-*.pt")
    epoch = int(step_two.name.split("epoch-")[1][:2])
    resumed = torchrun(train_args(demo_data, first, "--vla.max_steps", "4", "--pretrained_checkpoint", str(step_two),
                                  "--resume_step", "2", "--resume_epoch", str(epoch)))
    assert_ok(resumed)
    assert "Resumed exactly from" in resumed.stderr
    losses = step_losses(first / RUN_ID)
    assert sorted(losses) == [1, 2, 3, 4]
    (step_four,) = checkpoints.glob("step-000004-epoch-*.pt")
    tuned_run = torchrun(train_args(demo_data, tuned, "--vla.max_steps", "1", "--pretrained_checkpoint",
                                    str(step_four), "--is_resume", "false"))
    assert_ok(tuned_run)
    assert step_losses(tuned / RUN_ID)[1] < losses[1]  # starts from the trained weights, not the base VLM


def test_plain_python_runs_as_world_size_one(demo_data, tmp_path):
    command = [sys.executable, "vla-scripts/train.py", *train_args(demo_data, tmp_path, "--vla.max_steps", "2",
                                                                  "--vla.expected_world_size", "1")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "WANDB_MODE": "offline"})
    assert_ok(result)
    assert sorted(step_losses(tmp_path / RUN_ID)) == [1, 2]
    assert "global batch 4 = 2 per device x 1 ranks x 2 accumulation" in result.stderr


def _metric_steps(run_dir) -> list[int]:
    lines = (run_dir / f"{RUN_ID}.jsonl").read_text().splitlines()
    return [int(json.loads(line)["VLA Train/Step"]) for line in lines]


def test_run_directory_safety_lock_sighup_budget_resume_and_refused_fresh_run(demo_data, tmp_path):
    """One job per run directory; SIGHUP stops it (no save: the budget is 0 s), `--resume auto` continues from the
    last periodic checkpoint with each step logged once; a fresh run into the directory is refused."""
    run_dir = tmp_path / RUN_ID
    process = torchrun(train_args(demo_data, tmp_path, "--vla.max_steps", "500", "--save_interval", "2",
                                  "--signal_save_budget_s", "0"), popen=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((run_dir / f"{RUN_ID}.jsonl").exists() and len(_metric_steps(run_dir)) >= 3):
        time.sleep(0.5)
    second = torchrun(train_args(demo_data, tmp_path, "--resume", "auto"))  # while the first job runs
    assert second.returncode != 0 and "is in use by another job" in second.stdout + second.stderr
    for worker in psutil.Process(process.pid).children():
        worker.send_signal(signal.SIGHUP)  # an ssh hang-up, as torchrun forwards it
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-4000:]
    assert "Received SIGHUP" in output and "WITHOUT saving" in output
    last_logged = max(_metric_steps(run_dir))
    newest = max(int(p.name[5:11]) for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir())
    assert newest < last_logged and newest % 2 == 0
    assert not (run_dir / "run.lock").exists()

    config_before = (run_dir / "config.yaml").read_text()
    fresh = torchrun(train_args(demo_data, tmp_path, "--vla.max_steps", "500", "--save_interval", "2",
                                "--signal_save_budget_s", "0"))
    assert fresh.returncode != 0 and "already holds an earlier run" in fresh.stdout + fresh.stderr
    assert (run_dir / "config.yaml").read_text() == config_before

    resumed = torchrun(train_args(demo_data, tmp_path, "--vla.max_steps", str(last_logged + 1), "--save_interval",
                                  "2", "--signal_save_budget_s", "0", "--resume", "auto"))
    assert_ok(resumed)
    assert f"Resumed exactly from {run_dir / 'checkpoints'}/step-{newest:06d}" in resumed.stderr
    assert _metric_steps(run_dir) == list(range(1, last_logged + 2))  # each step once
    assert len(list(run_dir.glob(f"{RUN_ID}.jsonl.before-resume-*"))) == 1
