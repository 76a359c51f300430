"""Closed-loop evaluation options (MetaWorld), shared by `vla-scripts/eval_sim.py` and the periodic evaluation during
training (`TrainConfig.sim_eval`, run every `--eval_interval` steps by `vla_train/training/closed_loop.py`).

Task names are checked against MetaWorld's list by `validate_sim_eval` (imported lazily: `vla_train.sim` names the
tasks without importing the simulator).
"""

from dataclasses import dataclass, field

# MetaWorld's sizes, here so that configs (recipes) name them without importing the simulator package
SIM_MAX_EPISODE_STEPS = 500  # max_path_length (vla_train.sim.metaworld_env.MAX_EPISODE_STEPS)
SIM_ACTION_DIM = 4  # dx, dy, dz, gripper
SIM_PROPRIO_DIM = 4  # end-effector xyz, gripper opening


@dataclass
class SimEvalConfig:
    tasks: list[str] = field(default_factory=lambda: ["MT10"])  # MetaWorld v3 task names, or MT10
    episodes: int = 10  # episodes per task
    seed: int = 0  # evaluation seed: episode i uses reset seed 10000 + seed * 100000 + i
    workers: int = 2  # simulator processes (spawned)
    open_loop_steps: int | None = None  # actions executed per chunk (default: OFT chunk length; openvla 1)
    max_steps: int = SIM_MAX_EPISODE_STEPS  # steps before an episode counts as a failure
    # Where the policy runs ("cpu", "cuda", "cuda:1"); None: eval_sim.py uses "cpu", training rank 0's device
    device: str | None = None
    videos_per_task: int = 1  # GIF rollouts of the first episodes of each task (success/failure marked)


def validate_sim_eval(cfg: SimEvalConfig, option: str = "--") -> list[str]:
    """Check the options (`option`: their command-line prefix, e.g. "--sim_eval."); returns the expanded task list.
    A ValueError names the bad value and the fix."""
    from vla_train.sim.metaworld_env import check_tasks

    tasks = check_tasks(cfg.tasks)
    for name, low in (("episodes", 1), ("workers", 1), ("max_steps", 1), ("videos_per_task", 0), ("seed", 0)):
        if getattr(cfg, name) < low:
            raise ValueError(f"{option}{name} = {getattr(cfg, name)} must be >= {low}.")
    if cfg.max_steps > SIM_MAX_EPISODE_STEPS:
        raise ValueError(f"{option}max_steps = {cfg.max_steps} exceeds MetaWorld's episode limit "
                         f"{SIM_MAX_EPISODE_STEPS}. Fix: pass a value in [1, {SIM_MAX_EPISODE_STEPS}].")
    if cfg.open_loop_steps is not None and cfg.open_loop_steps < 1:
        raise ValueError(f"{option}open_loop_steps = {cfg.open_loop_steps} must be >= 1 (or null: the chunk "
                         "length).")
    return tasks
