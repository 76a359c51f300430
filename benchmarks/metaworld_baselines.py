"""Two reference success rates for the MetaWorld closed-loop benchmark, on the evaluation seeds of `eval_sim.py`.

    python benchmarks/metaworld_baselines.py --tasks '[button-press-v3,plate-slide-v3]' --statistics
        runs/<run>/dataset_statistics.json [--episodes 20] [--seed 0] [--max_steps 160] [--workers 2]
        [--image_size 64] [--out baselines.json]

- `expert`: MetaWorld's scripted expert (`metaworld.policies`, stepped as `vla_train/sim/experts.py` does), from the
  same reset seeds a trained policy is evaluated on (`evaluate.eval_seeds`), each episode cut at `--max_steps`: the
  ceiling. Rolled out in spawned workers that never import TensorFlow (Mesa's renderer and TensorFlow segfault in
  one process).
- `mean_action`: a policy that always outputs its task's dataset mean action (un-normalized, from a run's
  `dataset_statistics.json`, `[metaworld_<task>]["action"]["mean"]`), rolled out by `evaluate.evaluate_policy` with
  the same seeds and `--max_steps`: the trivial floor a trained policy has to beat. Skipped without `--statistics`.

Prints one row per task (k/n, 95 % Wilson interval, mean episode length, for both); `--out` writes the JSON.
"""

import vla_train  # noqa: F401  (fixes the torch/torchvision/timm-before-tensorflow import order)

# isort: split

import json
import multiprocessing
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import draccus
import numpy as np

from vla_train.sim.demos import dataset_name
from vla_train.sim.evaluate import PolicyFn, eval_seeds, evaluate_policy, summarize_outcomes
from vla_train.sim.metaworld_env import ACTION_DIM, MetaWorldEnv, check_tasks


@dataclass
class BaselinesConfig:
    tasks: list[str] = field(default_factory=lambda: ["MT10"])  # MetaWorld v3 task names, or MT10
    episodes: int = 20  # episodes per task (the evaluation seeds of eval_sim.py's --seed)
    seed: int = 0  # evaluation seed: episode i uses reset seed 10000 + seed * 100000 + i
    max_steps: int = 160  # steps before an episode counts as a failure (use the trained policy's value)
    workers: int = 2  # simulator processes (spawned)
    image_size: int = 64  # rendered image side (px); the baselines ignore the images
    statistics: Path | None = None  # a run's dataset_statistics.json (the mean-action baseline; None: skipped)
    out: Path | None = None  # write the results as JSON here


# ------------------------------------------------------------------------------------------------- expert baseline
_ENV: MetaWorldEnv | None = None  # a worker's cached environment (one task at a time)


def expert_episode(job: tuple[str, int, int, int]) -> tuple[str, int, bool, int]:
    """`(task, seed, image_size, max_steps)` -> `(task, seed, success, length)`: one scripted-expert episode, run in
    a spawned worker (its environment is kept while the task stays the same)."""
    global _ENV
    task, seed, image_size, max_steps = job
    if _ENV is None or _ENV.task != task:
        if _ENV is not None:
            _ENV.close()
        _ENV = MetaWorldEnv(task, image_size=image_size, wrist_camera=None, max_episode_steps=max_steps)
    expert = _ENV.expert()
    _ENV.reset(seed)
    while True:
        result = _ENV.step(np.clip(expert.get_action(_ENV.state), -1.0, 1.0))
        if result.done:
            return task, seed, result.success, _ENV.steps


def summarize(successes: Sequence[bool], lengths: Sequence[int]) -> dict[str, Any]:
    """k/n, rate, 95 % Wilson interval and mean length of one task's episodes (`evaluate.summarize_outcomes`), with
    the lengths and success flags."""
    outcomes = [{"success": bool(s), "length": int(n)} for s, n in zip(successes, lengths, strict=True)]
    return {**summarize_outcomes(outcomes), "lengths": list(lengths), "success_flags": list(successes)}


def expert_baseline(tasks: list[str], episodes: int, seed: int, *, workers: int, image_size: int,
                    max_steps: int) -> dict[str, dict[str, Any]]:
    """The scripted expert's per-task results from the evaluation seeds, in `workers` spawned processes."""
    seeds = eval_seeds(seed, episodes)
    jobs = [(task, s, image_size, max_steps) for task in tasks for s in seeds]
    outcomes: dict[str, dict[int, tuple[bool, int]]] = {task: {} for task in tasks}
    with multiprocessing.get_context("spawn").Pool(max(1, min(workers, len(jobs)))) as pool:
        for task, s, success, length in pool.imap_unordered(expert_episode, jobs, chunksize=max(1, episodes // 4)):
            outcomes[task][s] = (success, length)
    return {task: summarize([outcomes[task][s][0] for s in seeds], [outcomes[task][s][1] for s in seeds])
            for task in tasks}


# -------------------------------------------------------------------------------------------- mean-action baseline
def mean_actions(statistics: dict[str, Any], tasks: list[str]) -> dict[str, np.ndarray]:
    """Each task's dataset mean action float32 `[4]` (dataset convention, un-normalized) from a run's statistics."""
    missing = [dataset_name(task) for task in tasks if dataset_name(task) not in statistics]
    if missing:
        raise ValueError(f"The statistics have no entry for {missing}; they have {sorted(statistics)}.")
    means = {task: np.asarray(statistics[dataset_name(task)]["action"]["mean"], np.float32) for task in tasks}
    wrong = {task: mean.shape for task, mean in means.items() if mean.shape != (ACTION_DIM,)}
    if wrong:
        raise ValueError(f"Mean actions must have {ACTION_DIM} values (MetaWorld's); got shapes {wrong}.")
    return means


def mean_action_policy(means: dict[str, np.ndarray]) -> PolicyFn:
    """A `PolicyFn` returning, for every observation, its task's mean action as a chunk of one `[1, 4]`."""

    def policy_fn(observations: list[dict[str, np.ndarray]], tasks: list[str]) -> list[np.ndarray]:
        del observations  # the trivial baseline ignores what it sees
        return [means[task][None].copy() for task in tasks]

    return policy_fn


def mean_action_baseline(statistics_path: Path, tasks: list[str], episodes: int, seed: int, *, workers: int,
                         image_size: int, max_steps: int) -> dict[str, dict[str, Any]]:
    """The mean-action policy's per-task results (`evaluate_policy`, re-planned every step)."""
    means = mean_actions(json.loads(Path(statistics_path).read_text()), tasks)
    results = evaluate_policy(mean_action_policy(means), tasks, episodes, seed, workers=workers,
                              image_size=image_size, max_steps=max_steps, open_loop_steps=1)
    return {task: {**summarize(entry["success_flags"], entry["lengths"]), "mean_action": means[task].tolist()}
            for task, entry in results["tasks"].items()}


# ------------------------------------------------------------------------------------------------------- reporting
def cell(entry: dict[str, Any] | None) -> str:
    """`k/n [lo, hi] len` of one baseline's task entry (`-` when it did not run)."""
    if entry is None:
        return f"{'-':>27}"
    low, high = entry["ci95"]
    return f"{entry['successes']:>3}/{entry['episodes']:<3} [{low:4.2f}, {high:4.2f}] {entry['mean_length']:6.1f}"


def baselines_table(results: dict[str, Any]) -> str:
    """One row per task: the expert's and the mean-action policy's k/n, 95 % interval and mean episode length."""
    rows = [f"{'task':<28} {'expert k/n [95% CI] len':>27}   {'mean action k/n [95% CI] len':>27}"]
    for task in results["tasks"]:
        expert, mean = results["expert"].get(task), (results.get("mean_action") or {}).get(task)
        rows.append(f"{task:<28} {cell(expert)}   {cell(mean)}")
    return "\n".join(rows)


def run_baselines(cfg: BaselinesConfig) -> dict[str, Any]:
    """Both baselines (the mean action only with `statistics`); prints the table, writes `out` if set."""
    tasks = check_tasks(cfg.tasks)
    settings = {"episodes": cfg.episodes, "seed": cfg.seed, "max_steps": cfg.max_steps, "image_size": cfg.image_size}
    start = time.perf_counter()
    results: dict[str, Any] = {"tasks": tasks, **settings, "seeds": eval_seeds(cfg.seed, cfg.episodes),
                               "expert": expert_baseline(tasks, cfg.episodes, cfg.seed, workers=cfg.workers,
                                                         image_size=cfg.image_size, max_steps=cfg.max_steps)}
    results["expert_seconds"] = time.perf_counter() - start
    if cfg.statistics is not None:
        start = time.perf_counter()
        results["mean_action"] = mean_action_baseline(cfg.statistics, tasks, cfg.episodes, cfg.seed,
                                                      workers=cfg.workers, image_size=cfg.image_size,
                                                      max_steps=cfg.max_steps)
        results["mean_action_seconds"] = time.perf_counter() - start
        results["statistics"] = str(cfg.statistics)
    print(baselines_table(results))  # on purpose: the table is the script's output
    if cfg.out is not None:
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        cfg.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"Results: {cfg.out}")
    return results


@draccus.wrap()
def main(cfg: BaselinesConfig) -> None:
    run_baselines(cfg)


if __name__ == "__main__":
    main()
