"""Closed-loop evaluation of a policy in MetaWorld: environments in spawned worker processes, the policy in the parent.

`evaluate_policy(policy_fn, tasks, episodes, seed, ...)` rolls out `episodes` episodes per task, episode `i` of a task
starting from seed `EVAL_SEED_START + seed * 100000 + i` (never a demonstration seed). Mesa's software renderer and
TensorFlow segfault in one process (see `experts.py`), so each of `workers` spawned processes (a pipe each, never
importing TensorFlow) owns one `MetaWorldEnv` and steps it; the parent calls
`policy_fn(observations, tasks) -> chunks` on the batch of every environment that needs a new chunk:
- `observations`: one dict per environment (`image`, `wrist_image` uint8 `[S, S, 3]`, `proprio` float32 `[4]`,
  see `metaworld_env`), `tasks`: the task of each;
- `chunks`: one float array per environment, `[H, 4]` (or `[4]`, a chunk of one), in the dataset convention
  (gripper 1 open, 0 closed; `env_action` converts).
The first `open_loop_steps` actions of a chunk are executed open-loop (as OpenVLA-OFT does; 1 = re-plan every
step). An episode ends at success or after `max_steps` steps.

This module must not import TensorFlow (nor anything that does): spawned workers import it.
"""

import math
import multiprocessing
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from vla_train.sim.metaworld_env import EVAL_SEED_START, MetaWorldEnv, check_tasks, env_action

PolicyFn = Callable[[list[dict[str, np.ndarray]], list[str]], Sequence[np.ndarray]]
SEED_STRIDE = 100_000  # evaluation seed s uses EVAL_SEED_START + s * SEED_STRIDE + i, i < episodes
WILSON_Z = 1.959963984540054  # the standard normal's 97.5 % quantile: a 95 % interval
MARKER_FRAMES = 5  # a video's last frames get a green (success) or red (failure) border ...
MARKER_WIDTH = 3  # ... this many pixels wide


def eval_seeds(seed: int, episodes: int) -> list[int]:
    """The `episodes` evaluation seeds of evaluation seed `seed` (the same for every task)."""
    if episodes < 1 or episodes > SEED_STRIDE or seed < 0:
        raise ValueError(f"Need 1 <= episodes <= {SEED_STRIDE} and seed >= 0; got episodes={episodes}, seed={seed}.")
    return [EVAL_SEED_START + seed * SEED_STRIDE + i for i in range(episodes)]


def wilson_interval(successes: int, trials: int, z: float = WILSON_Z) -> tuple[float, float]:
    """The Wilson score interval (default 95 %) of a success rate `successes / trials`; (0, 1) for no trials."""
    if trials <= 0:
        return 0.0, 1.0
    p, n = successes / trials, trials
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


# ---------------------------------------------------------------------------------------------------- worker side
def _worker_main(conn: Connection, image_size: int, max_steps: int) -> None:
    """A worker's loop: `("reset", task, seed)` -> observation; `("step", action [4])` -> `(observation, success,
    done)`; `("close",)` ends. One environment, re-created when the task changes. Errors are sent back as strings."""
    env: MetaWorldEnv | None = None
    try:
        while True:
            message = conn.recv()
            try:
                if message[0] == "close":
                    break
                if message[0] == "reset":
                    if env is None or env.task != message[1]:
                        if env is not None:
                            env.close()
                        env = MetaWorldEnv(message[1], image_size=image_size, max_episode_steps=max_steps)
                    conn.send(("ok", env.reset(message[2])))
                else:
                    result = env.step(message[1])
                    conn.send(("ok", (result.observation, result.success, result.done)))
            except Exception as error:  # reported to the parent, which raises it
                conn.send(("error", f"{type(error).__name__}: {error}"))
    finally:
        if env is not None:
            env.close()
        conn.close()


class _WorkerPool:
    """`workers` spawned processes, each with one pipe; `send` to several, then `receive` from each."""

    def __init__(self, workers: int, image_size: int, max_steps: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.processes = []
        for _ in range(workers):
            parent, child = context.Pipe()
            process = context.Process(target=_worker_main, args=(child, image_size, max_steps), daemon=True)
            process.start()
            child.close()
            self.conns.append(parent)
            self.processes.append(process)

    def send(self, index: int, message: tuple) -> None:
        self.conns[index].send(message)

    def receive(self, index: int) -> Any:
        try:
            status, payload = self.conns[index].recv()
        except EOFError as error:
            raise RuntimeError(f"Evaluation worker {index} died (exit code {self.processes[index].exitcode}).") \
                from error
        if status == "error":
            raise RuntimeError(f"Evaluation worker {index} failed: {payload}")
        return payload

    def close(self) -> None:
        for conn, process in zip(self.conns, self.processes, strict=True):
            try:
                conn.send(("close",))
            except (BrokenPipeError, OSError):
                pass
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
            conn.close()


# ---------------------------------------------------------------------------------------------------- parent side
@dataclass
class _Episode:
    """One running episode: its observation, the actions left of its chunk (dataset convention, `[k, 4]`)."""

    task: str
    index: int  # episode index within the task
    seed: int
    observation: dict[str, np.ndarray]
    record: bool  # keep the primary camera's frames for a video
    pending: list[np.ndarray] = field(default_factory=list)
    steps: int = 0
    policy_calls: int = 0
    frames: list[np.ndarray] = field(default_factory=list)


def _as_chunk(chunk: np.ndarray, open_loop_steps: int) -> list[np.ndarray]:
    """A policy's chunk `[H, 4]` or `[4]` -> its first `open_loop_steps` actions (at least one)."""
    array = np.asarray(chunk, np.float32)
    array = array[None] if array.ndim == 1 else array
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] != 4:
        raise ValueError(f"policy_fn must return one chunk [H, 4] (or action [4]) per environment; got {array.shape}.")
    return list(array[:open_loop_steps])


def _plan(pool_slots: dict[int, _Episode], policy_fn: PolicyFn, open_loop_steps: int) -> None:
    """Ask the policy, in one batch, for a chunk for every running episode whose chunk is used up."""
    needy = [worker for worker, episode in pool_slots.items() if not episode.pending]
    if not needy:
        return
    chunks = policy_fn([pool_slots[w].observation for w in needy], [pool_slots[w].task for w in needy])
    if len(chunks) != len(needy):
        raise ValueError(f"policy_fn returned {len(chunks)} chunks for {len(needy)} observations.")
    for worker, chunk in zip(needy, chunks, strict=True):
        pool_slots[worker].pending = _as_chunk(chunk, open_loop_steps)
        pool_slots[worker].policy_calls += 1


def _start(pool: _WorkerPool, worker: int, job: tuple[str, int, int], videos_per_task: int) -> _Episode:
    task, index, seed = job
    pool.send(worker, ("reset", task, seed))
    observation = pool.receive(worker)
    episode = _Episode(task, index, seed, observation, record=index < videos_per_task)
    if episode.record:
        episode.frames.append(observation["image"])
    return episode


def _run_episodes(pool: _WorkerPool, jobs: list[tuple[str, int, int]], policy_fn: PolicyFn, open_loop_steps: int,
                  videos_per_task: int, on_done: Callable[[_Episode, bool], None]) -> None:
    """Step every job's episode to its end, `len(pool.conns)` at a time; `on_done(episode, success)` for each."""
    queue = list(reversed(jobs))
    slots: dict[int, _Episode] = {}
    for worker in range(len(pool.conns)):
        if queue:
            slots[worker] = _start(pool, worker, queue.pop(), videos_per_task)
    while slots:
        _plan(slots, policy_fn, open_loop_steps)
        for worker, episode in slots.items():
            pool.send(worker, ("step", env_action(episode.pending.pop(0))))
        for worker, episode in list(slots.items()):
            observation, success, done = pool.receive(worker)
            episode.observation, episode.steps = observation, episode.steps + 1
            if episode.record:
                episode.frames.append(observation["image"])
            if done:
                on_done(episode, success)
                del slots[worker]
                if queue:
                    slots[worker] = _start(pool, worker, queue.pop(), videos_per_task)


def mark_frames(frames: list[np.ndarray], success: bool) -> list[np.ndarray]:
    """Copies of uint8 `[S, S, 3]` frames with a green (success) or red (failure) border on the last
    `MARKER_FRAMES`."""
    colour = np.array([0, 200, 0] if success else [220, 0, 0], np.uint8)
    marked = [np.array(frame, np.uint8) for frame in frames]
    for frame in marked[-MARKER_FRAMES:]:
        w = MARKER_WIDTH
        frame[:w], frame[-w:], frame[:, :w], frame[:, -w:] = colour, colour, colour, colour
    return marked


def write_video(frames: list[np.ndarray], path: Path, success: bool, fps: int = 20) -> Path:
    """A GIF of uint8 `[S, S, 3]` frames (one per step, the initial observation first) with the success marker."""
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.mimsave(path, mark_frames(frames, success), duration=1.0 / fps, loop=0)
    return path


def summarize_outcomes(outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    """Episodes, successes, success rate, 95 % Wilson interval and mean length of `{success, length}` outcomes."""
    successes = sum(o["success"] for o in outcomes)
    low, high = wilson_interval(successes, len(outcomes))
    return {"episodes": len(outcomes), "successes": successes,
            "success_rate": successes / max(1, len(outcomes)), "ci95": [low, high],
            "mean_length": float(np.mean([o["length"] for o in outcomes])) if outcomes else 0.0}


def evaluate_policy(policy_fn: PolicyFn, tasks: Sequence[str], episodes: int, seed: int, *, workers: int,
                    image_size: int, max_steps: int, open_loop_steps: int, video_dir: str | Path | None = None,
                    videos_per_task: int = 2) -> dict[str, Any]:
    """Roll `policy_fn` out for `episodes` episodes per task (see the module docstring). Returns
    `{"tasks": {task: {episodes, successes, success_rate, ci95: [low, high], mean_length, seeds, lengths,
    success_flags, policy_calls, videos}}, "overall": {...}, "episodes_per_s", "seconds", settings...}`."""
    tasks = check_tasks(list(tasks))
    if open_loop_steps < 1 or workers < 1 or max_steps < 1:
        raise ValueError(f"open_loop_steps, workers and max_steps must be >= 1; got {open_loop_steps}, {workers}, "
                         f"{max_steps}.")
    seeds = eval_seeds(seed, episodes)
    jobs = [(task, i, s) for task in tasks for i, s in enumerate(seeds)]
    outcomes: dict[str, dict[int, dict[str, Any]]] = {task: {} for task in tasks}
    video_root = Path(video_dir) if video_dir is not None else None

    def on_done(episode: _Episode, success: bool) -> None:
        outcome = {"seed": episode.seed, "success": bool(success), "length": episode.steps,
                   "policy_calls": episode.policy_calls}
        if video_root is not None and episode.record:
            name = f"{episode.task}_ep{episode.index:03d}_seed{episode.seed}_{'success' if success else 'fail'}.gif"
            outcome["video"] = str(write_video(episode.frames, video_root / name, success))
        outcomes[episode.task][episode.index] = outcome

    start = time.perf_counter()
    pool = _WorkerPool(min(workers, len(jobs)), image_size, max_steps)
    try:
        _run_episodes(pool, jobs, policy_fn, open_loop_steps, videos_per_task if video_root else 0, on_done)
    finally:
        pool.close()
    seconds = time.perf_counter() - start
    per_task = {}
    for task in tasks:
        ordered = [outcomes[task][i] for i in range(episodes)]
        per_task[task] = {**summarize_outcomes(ordered), "seeds": [o["seed"] for o in ordered],
                          "lengths": [o["length"] for o in ordered],
                          "success_flags": [o["success"] for o in ordered],
                          "policy_calls": [o["policy_calls"] for o in ordered],
                          "videos": [o["video"] for o in ordered if "video" in o]}
    everything = [outcomes[task][i] for task in tasks for i in range(episodes)]
    return {"tasks": per_task, "overall": summarize_outcomes(everything), "episodes_per_s": len(everything) / seconds,
            "seconds": seconds, "seed": seed, "episodes_per_task": episodes, "max_steps": max_steps,
            "open_loop_steps": open_loop_steps, "image_size": image_size, "workers": pool_size(workers, len(jobs))}


def pool_size(workers: int, jobs: int) -> int:
    """Worker processes actually started: no more than there are episodes."""
    return max(1, min(workers, jobs))


def results_table(results: dict[str, Any]) -> str:
    """A plain-text table: task, success rate with its 95 % interval, mean episode length."""
    rows = [f"{'task':<32} {'success':>9} {'95% CI':>15} {'mean len':>9}"]
    entries = [*results["tasks"].items(), ("overall", results["overall"])]
    for name, entry in entries:
        low, high = entry["ci95"]
        rows.append(f"{name:<32} {entry['successes']:>3}/{entry['episodes']:<5} [{low:5.2f}, {high:5.2f}]  "
                    f"{entry['mean_length']:>9.1f}")
    rows.append(f"{results['episodes_per_s']:.2f} episodes/s over {results['seconds']:.1f} s")
    return "\n".join(rows)
