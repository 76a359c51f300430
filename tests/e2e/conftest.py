"""End-to-end runs: `torchrun --nproc-per-node 2 vla-scripts/train.py` on CPU (gloo) over small demo data."""

import json
import os
import signal
import socket
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


def worker_env(env: dict | None = None) -> dict:
    """The environment of every launched training job: CPU only (gloo), W&B offline, strict collectives (a direct
    torch.distributed tensor collective in the package raises, see vla_train/training/distributed.py), plus `env`."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "offline", "VLA_TRAIN_STRICT_COLLECTIVES": "1",
            **(env or {})}


def torchrun(args: list[str], *, nproc: int = 2, timeout: int = 600, env: dict | None = None,
             popen: bool = False):
    """Run the training entry point under torchrun on CPU; returns the CompletedProcess (or Popen)."""
    command = [str(TORCHRUN), "--standalone", f"--nproc-per-node={nproc}", "vla-scripts/train.py", *args]
    full_env = worker_env(env)
    if popen:
        return subprocess.Popen(command, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    return subprocess.run(command, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def torchrun_nodes(args: list[str], *, nnodes: int = 2, nproc: int = 2,
                   timeout: int = 600) -> list[subprocess.CompletedProcess]:
    """A multi-node launch on this host: `nnodes` torchrun agents (static rendezvous, explicit node ranks) of `nproc`
    processes each, so every worker sees LOCAL_WORLD_SIZE = nproc and WORLD_SIZE = nnodes * nproc. Returns each
    node's CompletedProcess, node rank 0 (which holds global rank 0) first."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = worker_env()
    processes = []
    for node_rank in range(nnodes):
        command = [str(TORCHRUN), f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--nproc-per-node={nproc}",
                   "--master-addr=127.0.0.1", f"--master-port={port}", "vla-scripts/train.py", *args]
        processes.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, start_new_session=True))
    try:
        outputs = [process.communicate(timeout=timeout) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return [subprocess.CompletedProcess(process.args, process.returncode, out, err)
            for process, (out, err) in zip(processes, outputs, strict=True)]


def train_args(data: Path, runs: Path, *extra: str) -> list[str]:
    return ["--vla.type", "tiny-test", "--data_root_dir", str(data), "--run_root_dir", str(runs), "--trackers",
            "[jsonl]", "--deterministic_data", "true", "--log_interval", "1", *extra]  # per-step metric lines


def recipe_args(data: Path, runs: Path, vla_type: str, *extra: str) -> list[str]:
    """`train.py` arguments for registry recipe `vla_type` on `data`, runs under `runs`, per-step metric lines."""
    return ["--vla.type", vla_type, "--data_root_dir", str(data), "--run_root_dir", str(runs), "--trackers",
            "[jsonl]", "--deterministic_data", "true", "--log_interval", "1", *extra]


def recipe_run_dir(runs: Path, vla_type: str) -> Path:
    """The one run directory of recipe `vla_type` under `runs`."""
    (run_dir,) = [path for path in runs.iterdir() if path.name.startswith(vla_type + "+")]
    return run_dir


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
