"""torchrun, 2 processes, gloo: `--vla.ema_decay` (with openpi's AdamW betas and warmup-steps+cosine-to-min schedule)
resumes exactly — the same per-step losses and bit-identical EMA shards in the final checkpoints as a straight run —
and the consolidated `.pt` holds the EMA weights."""

import json
import os
import signal
import subprocess

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.e2e.conftest import assert_ok, step_losses, torchrun, train_args

RUN_ID = "tiny-test+n0+b2+x7"
MIN_LR = 1e-4
OPTIONS = ["--vla.max_steps", "4", "--save_interval", "2", "--vla.ema_decay", "0.9", "--vla.adam_betas", "[0.9, 0.95]",
           "--vla.lr_scheduler_type", "warmup-steps+cosine-to-min", "--vla.warmup_steps", "1",
           "--vla.min_learning_rate", str(MIN_LR)]


def _finish(jobs: list[subprocess.Popen]) -> list[str]:
    """Wait for `torchrun(..., popen=True)` jobs (each killed after 240 s, all of them on a failure); their outputs,
    asserting that each succeeded."""
    try:
        outputs = [job.communicate(timeout=240)[0] for job in jobs]
    finally:
        for job in jobs:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()
    for job, output in zip(jobs, outputs, strict=True):
        assert job.returncode == 0, output[-8000:]
    return outputs


def _final_state(run_dir, tmp_path) -> dict:
    """The step-4 DCP checkpoint of `run_dir` read back whole (`{"model": ..., "ema": ..., ...}`, full tensors)."""
    (checkpoint,) = [path for path in (run_dir / "checkpoints").glob("step-000004-epoch-*") if path.is_dir()]
    target = tmp_path / f"{run_dir.parent.name}.pt"
    dcp_to_torch_save(checkpoint, target)
    return torch.load(target, weights_only=False)


@pytest.mark.timeout(300)
def test_ema_resume_is_exact_and_the_consolidated_checkpoint_holds_the_ema(demo_data, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    # the straight run and the first half of the split one are independent: run them side by side (wall time)
    jobs = [torchrun(train_args(demo_data, straight, *OPTIONS), popen=True),
            torchrun(train_args(demo_data, split, *OPTIONS, "--stop_after_steps", "2"), popen=True)]
    outputs = _finish(jobs)
    assert "EMA (decay 0.9) of" in outputs[1] and "betas=(0.9, 0.95)" in outputs[1]
    resumed = torchrun(train_args(demo_data, split, *OPTIONS, "--resume", "auto"))
    assert_ok(resumed)
    assert "Resumed exactly from" in resumed.stderr

    expected, got = step_losses(straight / RUN_ID), step_losses(split / RUN_ID)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
    assert got == expected  # bit-identical per-step losses
    records = [json.loads(line) for line in (straight / RUN_ID / f"{RUN_ID}.jsonl").read_text().splitlines()]
    lrs = {r["VLA Train/Step"]: r["VLA Train/Learning Rate"] for r in records if "VLA Train/Learning Rate" in r}
    assert lrs[4] == pytest.approx(MIN_LR)  # the schedule ends at its floor

    straight_state, split_state = _final_state(straight / RUN_ID, tmp_path), _final_state(split / RUN_ID, tmp_path)
    ema, model = straight_state["ema"], straight_state["model"]
    assert ema and set(ema) == set(split_state["ema"]) and set(ema) < set(model)
    assert all(torch.equal(split_state["ema"][key], tensor) for key, tensor in ema.items())  # bit for bit
    assert all(torch.equal(split_state["model"][key], tensor) for key, tensor in model.items())
    assert all(tensor.dtype == torch.float32 for tensor in ema.values())
    assert all(not torch.equal(tensor, model[key]) for key, tensor in ema.items())  # an average, not the weights

    consolidated = torch.load(straight / RUN_ID / "checkpoints" / "latest-checkpoint.pt", weights_only=True)["model"]
    flat = {f"{module}.{key}": tensor for module, state in consolidated.items() for key, tensor in state.items()}
    assert set(flat) == set(model)
    for key, tensor in flat.items():  # the EMA as the trainable weights, the model's own tensors elsewhere
        assert torch.equal(tensor, ema.get(key, model[key]).float()), key
    assert "the EMA weights (decay 0.9) are written as the model's trainable weights" in resumed.stderr
