"""Closed-loop evaluation of a trained run directory in MetaWorld: `vla-scripts/eval_sim.py`, and the background
process the trainer starts every `--eval_interval` steps (`python -m vla_train.sim.run_eval --run_dir ...`).

Loads the run's checkpoint (`--step`, default the latest) with its `dataset_statistics.json`, checks it against the
simulator (cameras, image size, action/proprio width, statistics of every task's dataset), rolls out
`vla_train.sim.evaluate.evaluate_policy` and writes `<run_dir>/eval/<step|latest>/results.json` (+ GIF videos under
`videos/`), then prints the success table. The policy runs in this process; the environments in spawned workers.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import draccus

from vla_train.atomic_io import atomic_write_json
from vla_train.config.sim_eval import SimEvalConfig, validate_sim_eval
from vla_train.log import setup_logging

RESULTS_FILE = "results.json"
EVAL_SUBDIR = "eval"


@dataclass
class EvalSimConfig(SimEvalConfig):
    run_dir: Path = Path("runs/run")  # a training run directory (config.json, checkpoints/, dataset_statistics.json)
    step: int | None = None  # checkpoint step (default: the latest checkpoint)
    episodes: int = 50  # episodes per task
    videos_per_task: int = 2  # GIFs of the first episodes of each task
    image_size: int | None = None  # rendered image side (px); must equal the run's (default: the run's)


def eval_dir(run_dir: str | Path, step: int | None) -> Path:
    """`<run_dir>/eval/<step>` (`latest` without a step): where one evaluation's results and videos go."""
    return Path(run_dir) / EVAL_SUBDIR / (str(step) if step is not None else "latest")


def run_eval(cfg: EvalSimConfig) -> dict[str, Any]:
    """Load, check, evaluate, write `results.json` (and videos); returns the results."""
    from vla_train.sim.evaluate import evaluate_policy, results_table
    from vla_train.sim.policy_runner import check_image_size, check_statistics, load_sim_policy

    tasks = validate_sim_eval(cfg)  # before loading the model: a bad name fails fast, listing the valid ones
    device = cfg.device or "cpu"
    policy = load_sim_policy(cfg.run_dir, cfg.step, device)
    image_size = policy.image_size if cfg.image_size is None else cfg.image_size
    check_image_size(policy, image_size)
    check_statistics(policy, tasks)
    open_loop = cfg.open_loop_steps or policy.chunk_length
    if not 1 <= open_loop <= policy.chunk_length:
        raise ValueError(f"--open_loop_steps {open_loop} must be in [1, {policy.chunk_length}] (the chunk length).")
    out_dir = eval_dir(cfg.run_dir, cfg.step)
    results = evaluate_policy(policy, tasks, cfg.episodes, cfg.seed, workers=cfg.workers, image_size=image_size,
                              max_steps=cfg.max_steps, open_loop_steps=open_loop, video_dir=out_dir / "videos",
                              videos_per_task=cfg.videos_per_task)
    results.update(run_dir=str(cfg.run_dir), step=cfg.step, policy=policy.family, chunk_length=policy.chunk_length,
                   cameras=list(policy.cameras), device=device)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / RESULTS_FILE, results)  # atomic: the trainer polls for it
    print(results_table(results))
    print(f"Results: {out_dir / RESULTS_FILE}")
    return results


@draccus.wrap()
def main(cfg: EvalSimConfig) -> None:
    setup_logging()
    run_eval(cfg)


if __name__ == "__main__":
    main()
