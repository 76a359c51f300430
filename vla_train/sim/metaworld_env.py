"""MetaWorld (v3, 50 Sawyer tasks on MuJoCo) as a small, seeded, image-observation environment.

Observation (`MetaWorldEnv.reset` / `step`), `S = image_size`:
- `image`: uint8 `[S, S, 3]`, the third-person fixed camera `PRIMARY_CAMERA` ("corner": the whole table, the arm
  and the objects, seen from the front-left corner). MetaWorld's fixed corner cameras are mounted upside down
  (their image-up axis points below the horizon), so their frames are rotated by 180 degrees here, in
  `_render` only: the table and the floor end up at the bottom of the image.
- `wrist_image`: uint8 `[S, S, 3]`, `WRIST_CAMERA` ("gripperPOV", mounted on the hand, looking down between the
  fingers; moves with the gripper), as rendered (no flip: a hand camera has no fixed "up").
- `proprio`: float32 `[4]` = MetaWorld's observation vector `[0:4]`: end-effector (TCP) xyz in metres, world
  frame, then the gripper opening in [0, 1] (finger distance / 0.1 m; 1 = open).

Actions are MetaWorld's 4-D `[dx, dy, dz, grip]` in [-1, 1]: xyz move of the hand mocap (x 1/100 m per step) and
grip effort (+1 closes, -1 opens). Datasets store the gripper in the pipeline's convention (1 open, 0 closed):
`dataset_action` / `env_action` convert. Success is `info["success"]` of the step; an episode ends at success or
after `max_episode_steps` (MetaWorld's 500 by default).

Seeds: `reset(seed)` seeds MetaWorld's task randomization (object and goal positions), so a seed is one
reproducible initial state. Demonstrations use seeds in `DEMO_SEEDS`, evaluation `>= EVAL_SEED_START`, disjoint.
"""

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from vla_train.config.sim_eval import SIM_ACTION_DIM, SIM_MAX_EPISODE_STEPS, SIM_PROPRIO_DIM
from vla_train.sim.render import configure_rendering, make_renderer

# Every MetaWorld v3 task (metaworld.env_dict.ALL_V3_ENVIRONMENTS, in its order); kept here so that names can be
# checked without importing mujoco. tests/sim checks it against metaworld.
TASKS = (
    "assembly-v3", "basketball-v3", "bin-picking-v3", "box-close-v3", "button-press-topdown-v3",
    "button-press-topdown-wall-v3", "button-press-v3", "button-press-wall-v3", "coffee-button-v3", "coffee-pull-v3",
    "coffee-push-v3", "dial-turn-v3", "disassemble-v3", "door-close-v3", "door-lock-v3", "door-open-v3",
    "door-unlock-v3", "hand-insert-v3", "drawer-close-v3", "drawer-open-v3", "faucet-open-v3", "faucet-close-v3",
    "hammer-v3", "handle-press-side-v3", "handle-press-v3", "handle-pull-side-v3", "handle-pull-v3",
    "lever-pull-v3", "pick-place-wall-v3", "pick-out-of-hole-v3", "pick-place-v3", "plate-slide-v3",
    "plate-slide-side-v3", "plate-slide-back-v3", "plate-slide-back-side-v3", "peg-insert-side-v3",
    "peg-unplug-side-v3", "soccer-v3", "stick-push-v3", "stick-pull-v3", "push-v3", "push-wall-v3", "push-back-v3",
    "reach-v3", "reach-wall-v3", "shelf-place-v3", "sweep-into-v3", "sweep-v3", "window-open-v3",
    "window-close-v3",
)
MT10 = ("reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
        "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3")
# written per task; tasks without one get `default_instruction(task)`
INSTRUCTIONS = {
    "reach-v3": "reach the red goal position",
    "push-v3": "push the puck to the goal",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "door-open-v3": "open the door",
    "drawer-open-v3": "open the drawer",
    "drawer-close-v3": "close the drawer",
    "button-press-topdown-v3": "press the button down from the top",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
    "door-close-v3": "close the door",
    "button-press-v3": "press the button from the front",
    "coffee-button-v3": "press the button on the coffee machine",
    "plate-slide-v3": "slide the plate into the goal",
    "handle-press-v3": "press the handle down",
    "faucet-open-v3": "turn the faucet on",
    "faucet-close-v3": "turn the faucet off",
    "sweep-into-v3": "sweep the puck into the hole",
    "basketball-v3": "put the ball into the basket",
    "dial-turn-v3": "turn the dial",
}
PRIMARY_CAMERA = "corner"
WRIST_CAMERA = "gripperPOV"
PROPRIO_SLICE = slice(0, 4)  # of MetaWorld's 39-D observation: hand xyz (m), gripper opening [0, 1]
PROPRIO_DIM = SIM_PROPRIO_DIM
ACTION_DIM = SIM_ACTION_DIM
MAX_EPISODE_STEPS = SIM_MAX_EPISODE_STEPS  # MetaWorld's max_path_length
DEMO_SEEDS = range(0, 10_000)  # demonstrations draw their seeds here ...
EVAL_SEED_START = 10_000  # ... and evaluation from here on: never a demonstrated initial state


def default_instruction(task: str) -> str:
    """`INSTRUCTIONS[task]`, else the task name in words: "stick-pull-v3" -> "stick pull"."""
    return INSTRUCTIONS.get(task) or re.sub(r"-v\d+$", "", task).replace("-", " ")


def check_tasks(names: list[str] | tuple[str, ...]) -> list[str]:
    """The names if every one is a MetaWorld v3 task ("MT10" expands to its ten); else ValueError listing all."""
    expanded = [task for name in names for task in (MT10 if name == "MT10" else (name,))]
    unknown = [name for name in expanded if name not in TASKS]
    if unknown or not expanded:
        raise ValueError(f"Unknown MetaWorld task(s) {unknown or '(none given)'}; valid names (or MT10): "
                         f"{', '.join(sorted(TASKS))}.")
    return expanded


def dataset_action(env_action: np.ndarray) -> np.ndarray:
    """MetaWorld action `[..., 4]` (grip +1 closes) -> dataset action float32 (gripper 1 open, 0 closed)."""
    action = np.clip(np.asarray(env_action, np.float32), -1.0, 1.0)
    return np.concatenate([action[..., :3], (1.0 - action[..., 3:]) / 2.0], axis=-1)


def env_action(dataset_act: np.ndarray) -> np.ndarray:
    """Inverse of `dataset_action`: float32 `[..., 4]`, gripper 1 open -> -1, 0 closed -> +1, clipped to [-1, 1]."""
    action = np.asarray(dataset_act, np.float32)
    return np.clip(np.concatenate([action[..., :3], 1.0 - 2.0 * action[..., 3:]], axis=-1), -1.0, 1.0)


@dataclass
class StepResult:
    observation: dict[str, np.ndarray]  # image, wrist_image, proprio (see the module docstring)
    success: bool  # info["success"] of this step
    done: bool  # success, or max_episode_steps reached
    info: dict[str, Any]


class MetaWorldEnv:
    """One MetaWorld task with seeded resets and rendered observations (see the module docstring)."""

    def __init__(self, task: str, image_size: int = 128, camera: str = PRIMARY_CAMERA,
                 wrist_camera: str | None = WRIST_CAMERA, max_episode_steps: int = MAX_EPISODE_STEPS) -> None:
        check_tasks([task])
        if not 8 <= image_size <= 480:
            raise ValueError(f"image_size must be in [8, 480] px, got {image_size}.")
        if not 1 <= max_episode_steps <= MAX_EPISODE_STEPS:
            raise ValueError(f"max_episode_steps must be in [1, {MAX_EPISODE_STEPS}], got {max_episode_steps}.")
        configure_rendering()
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS

        self.task, self.image_size, self.max_episode_steps = task, image_size, max_episode_steps
        self.instruction = default_instruction(task)
        env = ALL_V3_ENVIRONMENTS[task]()
        env._partially_observable = False  # the goal is observed (the scripted experts read it)
        del env.sawyer_observation_space  # cached with the goal bounds zeroed; recomputed on access
        env._freeze_rand_vec = False  # a new random initial state per reset ...
        env.seeded_rand_vec = True  # ... drawn from env.np_random, which `reset(seed)` seeds
        env._set_task_called = True
        self._env = env
        cameras = [camera] + ([wrist_camera] if wrist_camera else [])
        names = [env.model.camera(i).name for i in range(env.model.ncam)]
        for name in cameras:
            if name not in names:
                raise ValueError(f"Unknown camera {name!r} for {task}; MetaWorld's cameras: {names}.")
        self.camera, self.wrist_camera = camera, wrist_camera
        self._renderer = make_renderer(env.model, image_size, image_size)
        self._upside_down = {name: self._is_upside_down(name) for name in cameras}
        self.state: np.ndarray | None = None  # MetaWorld's 39-D observation (the experts' input)
        self.steps = 0

    def _is_upside_down(self, camera: str) -> bool:
        """A fixed camera whose image-up axis (camera y, world frame) points downward renders upside down."""
        import mujoco

        cam = self._env.model.camera(camera)
        if int(cam.mode[0]) != mujoco.mjtCamLight.mjCAMLIGHT_FIXED:
            return False
        up = self._env.data.camera(camera).xmat.reshape(3, 3)[:, 1]
        return bool(up[2] < 0)

    def _render(self, camera: str, segmentation: bool = False) -> np.ndarray:
        """uint8 `[S, S, 3]` of `camera`, upright (or `[S, S, 2]` int32 (object id, type) with `segmentation`)."""
        if segmentation:
            self._renderer.enable_segmentation_rendering()
        self._renderer.update_scene(self._env.data, camera=camera)
        frame = self._renderer.render()
        if segmentation:
            self._renderer.disable_segmentation_rendering()
        return np.ascontiguousarray(frame[::-1, ::-1]) if self._upside_down[camera] else frame

    def _observation(self) -> dict[str, np.ndarray]:
        obs = {"image": self._render(self.camera)}
        if self.wrist_camera:
            obs["wrist_image"] = self._render(self.wrist_camera)
        obs["proprio"] = np.asarray(self.state[PROPRIO_SLICE], np.float32)
        return obs

    def reset(self, seed: int) -> dict[str, np.ndarray]:
        """Start an episode from the initial state of `seed` (object/goal positions); returns the observation."""
        self._env.seed(int(seed))
        self.state, _ = self._env.reset()
        self.steps = 0
        return self._observation()

    def step(self, action: np.ndarray) -> StepResult:
        """Apply one MetaWorld action float `[4]` in [-1, 1] (clipped); see the module docstring."""
        if self.state is None:
            raise RuntimeError("Call reset(seed) before step().")
        action = np.clip(np.asarray(action, np.float64).reshape(-1), -1.0, 1.0)
        if action.shape != (ACTION_DIM,):
            raise ValueError(f"A MetaWorld action has {ACTION_DIM} values (dx, dy, dz, grip), got {action.shape}.")
        self.state, _, _, _, info = self._env.step(action)
        self.steps += 1
        success = bool(info["success"])
        return StepResult(self._observation(), success, success or self.steps >= self.max_episode_steps, info)

    def expert(self) -> Any:
        """MetaWorld's scripted expert for this task: `.get_action(env.state)` -> MetaWorld action float `[4]`."""
        from metaworld.policies import ENV_POLICY_MAP

        return ENV_POLICY_MAP[self.task]()

    def segmentation(self, camera: str | None = None) -> np.ndarray:
        """Geom ids per pixel int32 `[S, S]` (-1: none) of `camera` (default: the primary), oriented as its images."""
        import mujoco

        frame = self._render(camera or self.camera, segmentation=True)
        ids = frame[..., 0].astype(np.int32)
        return np.where(frame[..., 1] == mujoco.mjtObj.mjOBJ_GEOM, ids, -1)

    def geom_heights(self) -> np.ndarray:
        """World z (m) of every geom's centre, float `[ngeom]` (for orientation checks)."""
        return np.asarray(self._env.data.geom_xpos[:, 2], np.float64)

    def close(self) -> None:
        """Free the renderer's GL context and the simulator."""
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        self._env.close()

    def __enter__(self) -> "MetaWorldEnv":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
