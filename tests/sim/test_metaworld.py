"""MetaWorld simulation: task names, rendering configuration, the environment wrapper (in a spawned process: Mesa's
renderer cannot run beside TensorFlow, which other tests load into this process) and expert demos -> RLDS read by
the training pipeline. This module must stay importable without TensorFlow (spawned workers import it)."""

import itertools
import multiprocessing
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from vla_train.sim import render
from vla_train.sim.demos import demo_seeds, make_metaworld_demos, summary_table
from vla_train.sim.metaworld_env import (
    DEMO_SEEDS,
    EVAL_SEED_START,
    MT10,
    TASKS,
    MetaWorldEnv,
    check_tasks,
    dataset_action,
    default_instruction,
    env_action,
)

SIZE = 64
DEMO_TASKS = ["reach-v3", "button-press-topdown-v3"]  # the experts' shortest episodes (~50-70 steps)


def _in_spawned_process(function, *args):
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def test_task_registry_matches_metaworld_and_bad_names_list_the_valid_ones():
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS
    from metaworld.policies import ENV_POLICY_MAP

    assert list(TASKS) == list(ALL_V3_ENVIRONMENTS) and set(TASKS) == set(ENV_POLICY_MAP)
    assert check_tasks(["MT10", "push-v3"]) == [*MT10, "push-v3"]
    with pytest.raises(ValueError, match=r"Unknown MetaWorld task\(s\) \['push-v2'\].*assembly-v3.*window-open-v3"):
        check_tasks(["reach-v3", "push-v2"])
    assert default_instruction("push-v3") == "push the puck to the goal"
    assert default_instruction("stick-pull-v3") == "stick pull"


def test_rendering_errors_name_the_backends_tried_and_the_fix(monkeypatch):
    tried = []

    def failing(backend):
        tried.append(backend)
        return f"cannot open {backend}"

    monkeypatch.setattr(render, "_configured", None)
    monkeypatch.delenv("MUJOCO_GL", raising=False)
    with pytest.raises(render.RenderingError, match=r"egl: cannot open egl; osmesa: cannot open osmesa.*apt install"):
        render.configure_rendering(probe=failing)
    assert tried == ["egl", "osmesa"]
    monkeypatch.setenv("MUJOCO_GL", "osmesa")  # a user's choice is the only one tried
    with pytest.raises(render.RenderingError, match="MUJOCO_GL set in the environment: osmesa"):
        render.configure_rendering(probe=failing)
    assert tried[2:] == ["osmesa"]
    monkeypatch.setenv("MUJOCO_GL", "egl")
    assert render.configure_rendering(probe=lambda backend: None) == "egl" and os.environ["MUJOCO_GL"] == "egl"
    monkeypatch.setitem(sys.modules, "tensorflow", object())  # Mesa's renderer segfaults beside TensorFlow
    monkeypatch.delenv("VLA_TRAIN_SIM_ALLOW_TF", raising=False)
    with pytest.raises(render.RenderingError, match="TensorFlow is loaded in this process"):
        render.make_renderer(None, 8, 8)


def _observe(task: str) -> dict:
    """In a fresh process: observations of two resets and a step, and how image rows relate to world heights."""
    with MetaWorldEnv(task, image_size=SIZE) as env:
        first, again, other = env.reset(3), env.reset(3), env.reset(4)
        step = env.step(np.zeros(4))
        ids, heights = env.segmentation(), env.geom_heights()
        rows = np.nonzero(ids >= 0)[0]
        z = heights[ids[ids >= 0]]
        env._upside_down[env.camera] = not env._upside_down[env.camera]  # as MetaWorld renders it
        flipped = env.segmentation()
        rows_flipped, z_flipped = np.nonzero(flipped >= 0)[0], heights[flipped[flipped >= 0]]
        return {"first": first, "again": again, "other": other, "step": step.observation, "success": step.success,
                "done": step.done, "corr": float(np.corrcoef(rows, z)[0, 1]),
                "corr_as_rendered": float(np.corrcoef(rows_flipped, z_flipped)[0, 1]),
                "instruction": env.instruction, "max_steps": env.max_episode_steps}


def test_wrapper_observations_are_seeded_upright_and_typed():
    seen = _in_spawned_process(_observe, "push-v3")
    first = seen["first"]
    assert set(first) == {"image", "wrist_image", "proprio"}
    for key in ("image", "wrist_image"):
        assert first[key].shape == (SIZE, SIZE, 3) and first[key].dtype == np.uint8 and first[key].std() > 5
    assert first["proprio"].shape == (4,) and first["proprio"].dtype == np.float32
    assert 0.0 <= first["proprio"][3] <= 1.0  # gripper opening
    np.testing.assert_array_equal(first["image"], seen["again"]["image"])  # a seed is one initial state
    assert not np.array_equal(first["image"], seen["other"]["image"])  # another seed moves the puck
    assert seen["step"]["image"].shape == (SIZE, SIZE, 3) and not seen["success"] and not seen["done"]
    # upright: higher geoms (the arm) lie higher in the image (smaller rows) than the table and floor
    assert seen["corr"] < -0.2 < 0.2 < seen["corr_as_rendered"], (seen["corr"], seen["corr_as_rendered"])
    assert seen["instruction"] == "push the puck to the goal" and seen["max_steps"] == 500


def test_actions_round_trip_and_demo_seeds_never_reach_evaluation_seeds():
    native = np.array([[0.3, -1.5, 0.2, 1.0], [0.0, 0.0, 0.0, -1.0]], np.float32)
    stored = dataset_action(native)
    np.testing.assert_allclose(stored[:, 3], [0.0, 1.0])  # closing -> 0, opening -> 1 (the pipeline's gripper)
    np.testing.assert_allclose(env_action(stored), np.clip(native, -1, 1))
    assert DEMO_SEEDS.stop <= EVAL_SEED_START
    assert demo_seeds(9_998, 2) == [9_998, 9_999]
    with pytest.raises(ValueError, match=r"must lie in \[0, 10000\).*evaluation"):
        demo_seeds(9_999, 2)


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    root = tmp_path_factory.mktemp("metaworld")
    result = make_metaworld_demos(root, DEMO_TASKS, name="tiny", episodes_per_task=2, seed_start=0,
                                  image_size=SIZE, workers=2)
    return root, result


def test_expert_demos_succeed_and_are_recorded(demos):
    root, result = demos
    assert result.mixture == "metaworld_tiny" and [s.task for s in result.summaries] == DEMO_TASKS
    for summary in result.summaries:
        assert summary.seeds == [0, 1] and summary.successful_seeds == [0, 1], summary
        assert all(5 < length < 200 for length in summary.lengths)
    assert "reach-v3" in summary_table(result.summaries)
    mixtures = yaml.safe_load((result.registry_dir / "mixtures.yaml").read_text())["mixtures"]
    assert mixtures["metaworld_tiny"] == [["metaworld_reach_v3", 1.0], ["metaworld_button_press_topdown_v3", 1.0]]
    assert (root / "metaworld_tiny_demos.json").is_file()


def test_the_pipeline_reads_the_demos(demos):
    from vla_train.data.interleave import PipelineConfig, build_frame_dataset, plan_mixture

    root, result = demos
    cfg = PipelineConfig(data_root_dir=Path(root), data_mix=result.mixture, registry_dirs=(result.registry_dir,),
                         resize_resolution=(SIZE, SIZE), shuffle_buffer_size=16, camera_views=("primary", "wrist"),
                         load_proprio=True, continuous_actions=True, threads=2)
    plan = plan_mixture(cfg)
    assert sorted(spec.name for spec in plan.specs) == ["metaworld_button_press_topdown_v3", "metaworld_reach_v3"]
    frames = list(itertools.islice(build_frame_dataset(cfg, plan).as_numpy_iterator(), 40))
    instructions = {frame["task"]["language_instruction"].decode() for frame in frames}
    assert instructions <= {"reach the red goal position", "press the button down from the top"}
    assert len(instructions) == 2
    for frame in frames:
        assert frame["observation"]["image_primary"].shape == (1, SIZE, SIZE, 3)
        assert frame["observation"]["image_wrist"].shape == (1, SIZE, SIZE, 3)
        assert frame["observation"]["proprio"].shape == (1, 4)
        assert frame["action"].shape == (1, 4) and 0.0 <= frame["action"][0, 3] <= 1.0  # gripper: not normalized
    assert plan.statistics["metaworld_reach_v3"]["action"]["mask"] == [True, True, True, False]


@pytest.mark.parametrize("vla_id", ["metaworld-oft-tiny", "metaworld-oft-tiny-b7"])
def test_metaworld_recipes_act_in_the_simulator(vla_id):
    """The benchmark recipes' policies have MetaWorld's action and proprio sizes and read rendered cameras only; their
    mixtures are the ones make_sim_data.py names (`metaworld_<name>`)."""
    from vla_train.config.vla import VLAConfig
    from vla_train.sim.metaworld_env import ACTION_DIM, PROPRIO_DIM
    from vla_train.sim.policy_runner import CAMERA_FIELDS

    cfg = VLAConfig.get_choice_class(vla_id)()
    cfg.validate(cfg.expected_world_size)
    assert cfg.policy.action_dim == ACTION_DIM and cfg.policy.proprio_dim == PROPRIO_DIM
    assert set(cfg.policy.camera_roles()) <= set(CAMERA_FIELDS) and cfg.data_mix.startswith("metaworld_")
