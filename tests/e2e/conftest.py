"""End-to-end runs: `torchrun --nproc-per-node 2 vla-scripts/train.py` on CPU (gloo) over small demo data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    from vla_train.data.demo import write_demo_datasets

    root = tmp_path_factory.mktemp("demo_data")
    write_demo_datasets(root, num_episodes=16, episode_length=10, image_size=64, seed=0, val_fraction=0.25)
    return root


def torchrun(args: list[str], *, nproc: int = 2, timeout: int = 600, env: dict | None = None,
             popen: bool = False):
    """Run the training entry point under torchrun on CPU; returns the CompletedProcess (or Popen)."""
    command = [str(TORCHRUN), "--standalone", f"--nproc-per-node={nproc}", "vla-scripts/train.py", *args]
    full_env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "offline", **(env or {})}
    if popen:
        return subprocess.Popen(command, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    return subprocess.run(command, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def train_args(data: Path, runs: Path, *extra: str) -> list[str]:
    return ["--vla.type", "tiny-test", "--data_root_dir", str(data), "--run_root_dir", str(runs), "--trackers",
            "[jsonl]", "--deterministic_data", "true", *extra]


def step_losses(run_dir: Path) -> dict[int, float]:
    """`{step: loss}` from the run's `<run_id>.jsonl` (the last entry per step wins)."""
    losses = {}
    for line in (run_dir / f"{run_dir.name}.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "VLA Train/Loss" in record:
            losses[int(record["VLA Train/Step"])] = record["VLA Train/Loss"]
    return losses


def assert_ok(result) -> None:
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
