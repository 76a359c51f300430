"""Periodic closed-loop evaluation during training (`--eval_interval N`, options `--sim_eval.*`).

Every N steps, and at the run's last step, every rank commits a checkpoint (synchronously: the evaluation reads
it); then rank 0 alone starts `python -m vla_train.sim.run_eval --run_dir <run> --step <step> ...` as a background
process (`eval/<step>/eval.log`) and training goes on at once: no rank ever waits for the simulator, so no
collective stalls. Each step rank 0 polls (no blocking); a finished evaluation's `eval/<step>/results.json` becomes
`Sim/<task> Success` and `Sim/Average Success` metrics of that step in the trackers (jsonl, wandb with `Sim/Step`
as their x-axis). At most one evaluation runs at a time: a step that comes due while one runs waits for it (only
the newest waiting step is kept). At the end rank 0 waits for the evaluations (after the ranks' last collective);
a stop signal or failure terminates them (evaluate later with `vla-scripts/eval_sim.py --step`).

The evaluation runs in its own process because the model is sharded across ranks during training (the process
loads the committed checkpoint whole) and because Mesa's renderer segfaults beside TensorFlow (loaded by the data
pipeline). The policy runs on `--sim_eval.device`, by default rank 0's training device.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from vla_train.config.sim_eval import SimEvalConfig, validate_sim_eval
from vla_train.log import logger
from vla_train.sim.demos import dataset_name
from vla_train.sim.run_eval import RESULTS_FILE, eval_dir
from vla_train.training.trackers import SIM_PREFIX, SIM_STEP_KEY

CAMERAS = ("primary", "wrist")  # the policy camera roles the simulator renders (vla_train.sim.policy_runner)
# torchrun's variables: the evaluation process is a plain process, never a member of the training's process group
_LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
                 "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
                 "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE", "GROUP_WORLD_SIZE", "ROLE_NAME")


def sim_metrics(step: int, results: dict[str, Any]) -> dict[str, float]:
    """`results.json` of `step` -> `{"Sim/<task> Success": rate, "Sim/Average Success": rate,
    "Sim/Episodes per Second": eps/s, "Sim/Step": step}`."""
    metrics = {f"{SIM_PREFIX}{task} Success": float(entry["success_rate"])
               for task, entry in results["tasks"].items()}
    metrics[f"{SIM_PREFIX}Average Success"] = float(results["overall"]["success_rate"])
    metrics[f"{SIM_PREFIX}Episodes per Second"] = float(results["episodes_per_s"])
    metrics[SIM_STEP_KEY] = step
    return metrics


def eval_command(run_dir: Path, step: int, cfg: SimEvalConfig, device: str) -> list[str]:
    """The evaluation process's command line (this interpreter, `vla_train.sim.run_eval`)."""
    args = [sys.executable, "-m", "vla_train.sim.run_eval", "--run_dir", str(run_dir), "--step", str(step),
            "--tasks", json.dumps(list(cfg.tasks)), "--episodes", str(cfg.episodes), "--seed", str(cfg.seed),
            "--workers", str(cfg.workers), "--max_steps", str(cfg.max_steps), "--device", device,
            "--videos_per_task", str(cfg.videos_per_task)]
    if cfg.open_loop_steps is not None:
        args += ["--open_loop_steps", str(cfg.open_loop_steps)]
    return args


def check_closed_loop_eval(cfg: SimEvalConfig, dataset_names: list[str], cameras: list[str] | None,
                           probe_rendering: bool) -> None:
    """Before training: every evaluated task's dataset is in the mixture (its statistics un-normalize the actions),
    the policy reads only cameras the simulator renders, the `sim` extra is installed and (`probe_rendering`, rank
    0) an offscreen renderer works. Raises ValueError / RenderingError naming the fix."""
    tasks = validate_sim_eval(cfg, "--sim_eval.")
    missing = [f"{task} ({dataset_name(task)})" for task in tasks if dataset_name(task) not in dataset_names]
    if missing:
        raise ValueError(f"--sim_eval.tasks: the training mixture has no dataset for {missing}; it has "
                         f"{sorted(dataset_names)}. Fix: evaluate tasks the run trains on (make_sim_data.py writes "
                         "dataset metaworld_<task> per task), or drop --eval_interval.")
    unknown = [role for role in cameras or [] if role not in CAMERAS]
    if unknown:
        raise ValueError(f"--eval_interval: the policy reads cameras {cameras}; the simulator renders only "
                         f"{list(CAMERAS)}. Fix: train with --vla.policy.cameras from those, or drop --eval_interval.")
    for module in ("metaworld", "mujoco"):
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"--eval_interval needs the simulator ({module} is not installed). Fix: "
                             "pip install -e '.[sim]' (make install installs it from the lock).")
    if probe_rendering:
        from vla_train.sim.render import configure_rendering

        configure_rendering()


@dataclass
class _Job:
    step: int
    process: subprocess.Popen
    log: IO[str]
    started: float


class ClosedLoopEvaluator:
    """Rank 0's background evaluations (see the module docstring). On other ranks `launch` and `poll` do nothing:
    only `due` (a pure function of the step, identical on every rank) matters there."""

    def __init__(self, cfg: SimEvalConfig, interval: int, run_dir: Path, device: str, is_main: bool) -> None:
        self.cfg, self.interval, self.run_dir, self.device, self.is_main = cfg, interval, Path(run_dir), device, is_main
        self._running: _Job | None = None
        self._waiting: int | None = None  # the newest step due while an evaluation ran

    def due(self, step: int, total_steps: int) -> bool:
        """Whether `step` is evaluated: every `interval` steps and the run's last step."""
        return step % self.interval == 0 or step >= total_steps

    def launch(self, step: int) -> None:
        """Rank 0: evaluate the committed checkpoint of `step` now, or once the running evaluation ends."""
        if not self.is_main:
            return
        if self._running is None:
            self._start(step)
        else:
            if self._waiting is not None:
                logger.warning("Closed-loop evaluation: step %d is not evaluated (steps %d and %d came due while "
                               "step %d's ran); evaluate it later with vla-scripts/eval_sim.py --step %d.",
                               self._waiting, self._waiting, step, self._running.step, self._waiting)
            self._waiting = step

    def _start(self, step: int) -> None:
        out = eval_dir(self.run_dir, step)
        out.mkdir(parents=True, exist_ok=True)
        (out / RESULTS_FILE).unlink(missing_ok=True)  # a resumed run re-evaluates: never read a stale result
        env = {key: value for key, value in os.environ.items() if key not in _LAUNCHER_ENV}
        log = (out / "eval.log").open("w")
        process = subprocess.Popen(eval_command(self.run_dir, step, self.cfg, self.device), stdout=log,
                                   stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self._running = _Job(step, process, log, time.monotonic())
        logger.info("Closed-loop evaluation of step %d started in the background (log: %s)", step, log.name)

    def poll(self) -> list[tuple[int, dict[str, Any]]]:
        """Rank 0, never blocking: `(step, results)` of the evaluation that finished since the last call, if any
        (a failed one is logged, not raised: training goes on); starts the waiting one."""
        job = self._running
        if job is None or job.process.poll() is None:
            return []
        self._running = None
        job.log.close()
        finished = self._collect(job)
        if self._waiting is not None:
            step, self._waiting = self._waiting, None
            self._start(step)
        return finished

    def _collect(self, job: _Job) -> list[tuple[int, dict[str, Any]]]:
        path = eval_dir(self.run_dir, job.step) / RESULTS_FILE
        if job.process.returncode != 0 or not path.is_file():
            tail = Path(job.log.name).read_text(errors="replace").strip().splitlines()[-3:]
            logger.error("Closed-loop evaluation of step %d failed (exit status %s): %s. Full log: %s",
                         job.step, job.process.returncode, " | ".join(tail) or "no output", job.log.name)
            return []
        results = json.loads(path.read_text())
        logger.info("Closed-loop evaluation of step %d: %.1f%% success over %d episodes (%.0f s)", job.step,
                    100 * results["overall"]["success_rate"], results["overall"]["episodes"],
                    time.monotonic() - job.started)
        return [(job.step, results)]

    def wait(self) -> list[tuple[int, dict[str, Any]]]:
        """Rank 0, blocking (call after the last collective): every running and waiting evaluation's results."""
        finished: list[tuple[int, dict[str, Any]]] = []
        while self._running is not None:
            logger.info("Waiting for the closed-loop evaluation of step %d (log: %s)", self._running.step,
                        self._running.log.name)
            self._running.process.wait()
            finished += self.poll()
        return finished

    def close(self) -> None:
        """Terminate a running evaluation (a stopped or failed run); its step can be evaluated later."""
        job, self._running, self._waiting = self._running, None, None
        if job is None:
            return
        if job.process.poll() is None:
            logger.warning("Terminating the closed-loop evaluation of step %d (evaluate it later with "
                           "vla-scripts/eval_sim.py --step %d).", job.step, job.step)
            os.killpg(job.process.pid, signal.SIGTERM)  # its own session: the simulator workers too
            try:
                job.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(job.process.pid, signal.SIGKILL)
                job.process.wait()
        job.log.close()
