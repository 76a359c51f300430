"""Standardization transforms, group A (Bridge, PPGM, RT-1-style Open-X datasets, Language Table, Stanford / NYU).

Each synthetic trajectory has the dataset's real feature structure: the `steps` features of its TensorFlow Datasets
catalog page (tensorflow/datasets `docs/catalog/<name>.md`) at the top level, plus the episode-level features under
`traj_metadata` (as the RLDS reader broadcasts them). Exceptions are noted next to the structure.
"""

import zlib

import numpy as np
import pytest

from tests.data.synthetic import Feature, check_standardized, run_in_graph, synthetic_trajectory
from vla_train.data.standardize import STANDARDIZE_TRANSFORMS, get_standardize_transform, load_all_transforms
from vla_train.data.tf_setup import tf

T = 10
IMAGE, TEXT, FLAG, SCALAR = Feature(dtype="image"), Feature(dtype="string"), Feature(dtype="bool"), Feature()
VEC3 = Feature((3,))
RLDS_FLAGS = {"is_first": FLAG, "is_last": FLAG, "is_terminal": FLAG, "reward": SCALAR}
EMBEDDING = Feature((512,))
FILE_PATH_METADATA = {"episode_metadata": {"file_path": TEXT}}

GROUP_A = [
    "bridge_oxe", "bridge_orig", "bridge_dataset", "ppgm", "ppgm_static", "ppgm_wrist", "fractal20220817_data", "kuka",
    "taco_play", "jaco_play", "berkeley_cable_routing", "roboturk", "nyu_door_opening_surprising_effectiveness",
    "viola", "berkeley_autolab_ur5", "toto", "language_table", "columbia_cairlab_pusht_real",
    "stanford_kuka_multimodal_dataset_converted_externally_to_rlds", "nyu_rot_dataset_converted_externally_to_rlds",
    "stanford_hydra_dataset_converted_externally_to_rlds",
]


def rt1_steps(action: dict, observation: dict) -> dict:
    """An RT-1-style step: action dict with `terminate_episode`, observation with the instruction and its embedding."""
    return {"action": {"terminate_episode": SCALAR, **action}, **RLDS_FLAGS,
            "observation": {"natural_language_embedding": EMBEDDING, "natural_language_instruction": TEXT,
                            **observation}}


def flat_steps(action_dim: int, observation: dict, **extra) -> dict:
    """An externally converted step: flat action, top-level instruction and embedding."""
    return {"action": Feature((action_dim,)), "discount": SCALAR, **RLDS_FLAGS, "language_embedding": EMBEDDING,
            "language_instruction": TEXT, "observation": observation, **extra}


# catalog `bridge`
BRIDGE_OXE = rt1_steps({"open_gripper": FLAG, "rotation_delta": VEC3, "world_vector": VEC3},
                       {"image": IMAGE, "state": Feature((7,))})
# bridge_dataset (original BridgeData V2 RLDS release; not in the TFDS catalog): its builder's features
BRIDGE_ORIG = {
    "action": Feature((7,)), "discount": SCALAR, **RLDS_FLAGS, "language_instruction": TEXT,
    "observation": {**{f"image_{i}": IMAGE for i in range(4)}, "state": Feature((7,))},
    "traj_metadata": {"episode_metadata": {"file_path": TEXT, "episode_id": Feature((), "int32"),
                                           **{f"has_image_{i}": FLAG for i in range(4)}, "has_language": FLAG}},
}
# PPGM has no catalog page (a private DROID-format dataset): structure derived from the reference transform, which
# reads a flat 7-D action, `cartesian_position`, `gripper_position` and a top-level instruction (DROID field shapes).
PPGM = flat_steps(7, {"exterior_image_1_left": IMAGE, "wrist_image_left": IMAGE, "cartesian_position": Feature((6,)),
                      "gripper_position": Feature((1,)), "joint_position": Feature((7,))})
RT1_ACTION = {"base_displacement_vector": Feature((2,)), "base_displacement_vertical_rotation": Feature((1,)),
              "gripper_closedness_action": Feature((1,)), "rotation_delta": VEC3,
              "terminate_episode": Feature((3,), "int32"), "world_vector": VEC3}
ATTRIBUTES = ("collection_mode", "data_type", "env", "location", "objects_family", "task_family")
FRACTAL = {
    **rt1_steps(RT1_ACTION, {
        "base_pose_tool_reached": Feature((7,)), "gripper_closed": Feature((1,)),
        "gripper_closedness_commanded": Feature((1,)), "height_to_bottom": Feature((1,)), "image": IMAGE,
        "orientation_box": Feature((2, 3)), "orientation_start": Feature((4,)),
        "robot_orientation_positions_box": Feature((3, 3)), "rotation_delta_to_go": VEC3,
        "src_rotation": Feature((4,)), "vector_to_go": VEC3, "workspace_bounds": Feature((3, 3))}),
    "traj_metadata": {
        "aspects": {k: FLAG for k in ("already_success", "feasible", "has_aspects", "success", "undesirable")},
        "attributes": {**{k: Feature((), "int64") for k in ATTRIBUTES}, **{f"{k}_name": TEXT for k in ATTRIBUTES}}},
}
# The catalog lists kuka's pose and gripper state as float32 tensors; the Open-X release the reference reads stores
# them as zlib-compressed float32 bytes (strings), hence the decoding. Both layouts are tested.
KUKA = {
    **rt1_steps(RT1_ACTION, {
        "clip_function_input/base_pose_tool_reached": TEXT, "clip_function_input/workspace_bounds": Feature((3, 3)),
        "gripper_closed": TEXT, "height_to_bottom": Feature((1,)), "image": IMAGE, "task_id": Feature((1,))}),
    "traj_metadata": {"success": FLAG},
}
TACO_PLAY = rt1_steps(
    {"actions": Feature((7,)), "rel_actions_gripper": Feature((7,)), "rel_actions_world": Feature((7,))},
    {"depth_gripper": Feature((84, 84)), "depth_static": Feature((150, 200)), "rgb_gripper": IMAGE,
     "rgb_static": IMAGE, "robot_obs": Feature((15,)), "structured_language_instruction": TEXT})
JACO_PLAY = rt1_steps(
    {"gripper_closedness_action": Feature((1,)), "terminate_episode": Feature((3,), "int32"), "world_vector": VEC3},
    {"end_effector_cartesian_pos": Feature((7,)), "end_effector_cartesian_velocity": Feature((6,)), "image": IMAGE,
     "image_wrist": IMAGE, "joint_pos": Feature((8,))})
CABLE_ROUTING = rt1_steps({"rotation_delta": VEC3, "world_vector": VEC3},
                          {"image": IMAGE, "robot_state": Feature((7,)), "top_image": IMAGE, "wrist225_image": IMAGE,
                           "wrist45_image": IMAGE})
ROBOTURK = rt1_steps({"gripper_closedness_action": Feature((1,)), "rotation_delta": VEC3, "world_vector": VEC3},
                     {"front_rgb": IMAGE})
NYU_DOOR = rt1_steps({"gripper_closedness_action": Feature((1,)), "rotation_delta": VEC3, "world_vector": VEC3},
                     {"image": IMAGE})
VIOLA = rt1_steps({"gripper_closedness_action": SCALAR, "rotation_delta": VEC3, "world_vector": VEC3},
                  {"agentview_rgb": IMAGE, "ee_states": Feature((16,)), "eye_in_hand_rgb": IMAGE,
                   "gripper_states": Feature((1,)), "joint_states": Feature((7,))})
UR5 = rt1_steps({"gripper_closedness_action": SCALAR, "rotation_delta": VEC3, "world_vector": VEC3},
                {"hand_image": IMAGE, "image": IMAGE, "image_with_depth": IMAGE, "robot_state": Feature((15,))})
TOTO = rt1_steps({"open_gripper": FLAG, "rotation_delta": VEC3, "world_vector": VEC3},
                 {"image": IMAGE, "state": Feature((7,))})
PUSHT = rt1_steps({"gripper_closedness_action": SCALAR, "rotation_delta": VEC3, "world_vector": VEC3},
                  {"image": IMAGE, "robot_state": Feature((2,)), "wrist_image": IMAGE})
# No catalog page for language_table in tensorflow/datasets: the structure of the Language-Table RLDS release
# (episode_id per episode; action (2,), instruction as 512 int32 code points).
LANGUAGE_TABLE = {
    "action": Feature((2,)), **RLDS_FLAGS,
    "observation": {"effector_target_translation": Feature((2,)), "effector_translation": Feature((2,)),
                    "instruction": Feature((512,), "int32"), "rgb": IMAGE},
    "traj_metadata": {"episode_id": TEXT},
}
STANFORD_KUKA = flat_steps(4, {
    "contact": Feature((50,)), "depth_image": Feature((128, 128, 1)), "ee_forces_continuous": Feature((50, 6)),
    "ee_orientation": Feature((4,)), "ee_orientation_vel": VEC3, "ee_position": VEC3, "ee_vel": VEC3,
    "ee_yaw": Feature((4,)), "ee_yaw_delta": Feature((4,)), "image": IMAGE, "joint_pos": Feature((7,)),
    "joint_vel": Feature((7,)), "optical_flow": Feature((128, 128, 2)), "state": Feature((8,))})
NYU_ROT = {**flat_steps(7, {"image": IMAGE, "state": Feature((7,))}), "traj_metadata": FILE_PATH_METADATA}
HYDRA = {**flat_steps(7, {"image": IMAGE, "state": Feature((27,)), "wrist_image": IMAGE}, is_dense=FLAG),
         "traj_metadata": FILE_PATH_METADATA}


# --- numpy references of the gripper helpers ---------------------------------------------------------------------

def np_binarize(a: np.ndarray) -> np.ndarray:
    out, carry = np.empty(len(a), np.float32), a[-1]
    for i in reversed(range(len(a))):
        if a[i] > 0.95 or a[i] < 0.05:
            carry = float(a[i] > 0.95)
        out[i] = carry
    return out


def np_rel2abs(a: np.ndarray) -> np.ndarray:
    commands = [1.0 if x < -0.1 else -1.0 if x > 0.1 else 0.0 for x in a]
    state = next((-c for c in commands if c != 0), 1.0)
    out = []
    for c in commands:
        state = c if c != 0 else state
        out.append(state / 2 + 0.5)
    return np.array(out, np.float32)


def texts(text: str, length: int = T) -> tf.Tensor:
    return tf.constant([text] * length)


def as_numpy(traj: dict) -> dict:
    return tf.nest.map_structure(lambda x: x.numpy(), traj)


def standardize(name: str, traj: dict) -> dict:
    return run_in_graph(get_standardize_transform(name), traj)


# --- registry --------------------------------------------------------------------------------------------------

def test_group_a_names_registered():
    registry = load_all_transforms()
    assert set(GROUP_A) <= set(registry)
    assert registry["bridge_orig"] is registry["bridge_dataset"]
    assert registry["ppgm"] is registry["ppgm_static"] is registry["ppgm_wrist"]
    assert registry["bridge_oxe"] is not registry["bridge_orig"]


# --- Bridge / PPGM ---------------------------------------------------------------------------------------------

def test_bridge_oxe_relabels_and_truncates():
    traj = synthetic_trajectory(BRIDGE_OXE, T, seed=1)
    open_gripper = np.array([0, 1, 1, 0, 0, 1, 0, 1, 1, 0], bool)
    traj["action"]["open_gripper"] = tf.constant(open_gripper)
    traj["observation"]["natural_language_instruction"] = texts("put the spoon in the pot")
    raw = as_numpy(traj)
    out = standardize("bridge_oxe", traj)

    check_standardized(out, T - 2)
    state = raw["observation"]["state"][1:]  # first (all-zero action) step dropped
    np.testing.assert_allclose(out["action"][:, :6], state[1:, :6] - state[:-1, :6], rtol=1e-6)
    np.testing.assert_array_equal(out["action"][:, 6], open_gripper[1:-1].astype(np.float32))
    np.testing.assert_allclose(out["observation"]["EEF_state"], state[:-1, :6])
    np.testing.assert_allclose(out["observation"]["gripper_state"], state[:-1, -1:])
    np.testing.assert_allclose(out["reward"], raw["reward"][1:-1])  # one step dropped at each end
    assert out["language_instruction"].tolist() == [b"put the spoon in the pot"] * (T - 2)


@pytest.mark.parametrize("name", ["bridge_orig", "bridge_dataset"])
def test_bridge_orig_binarizes_relabels_and_truncates(name):
    traj = synthetic_trajectory(BRIDGE_ORIG, T, seed=2)
    action = traj["action"].numpy()
    action[:, 6] = [0.5, 1.0, 0.3, 0.0, 0.02, 0.7, 0.97, 0.4, 0.6, 0.5]
    traj["action"] = tf.constant(action)
    episode_id = np.arange(T, dtype=np.int32)  # distinct per step, to see which steps survive
    traj["traj_metadata"]["episode_metadata"]["episode_id"] = tf.constant(episode_id)
    raw = as_numpy(traj)
    out = standardize(name, traj)

    check_standardized(out, T - 2)
    state = raw["observation"]["state"][1:]
    np.testing.assert_allclose(out["action"][:, :6], state[1:, :6] - state[:-1, :6], rtol=1e-6)
    gripper = np_binarize(action[1:, 6])[:-1]  # binarized over the steps left after dropping the first one
    np.testing.assert_array_equal(out["action"][:, 6], gripper)
    np.testing.assert_array_equal(gripper, [1, 0, 0, 0, 1, 1, 0.5, 0.5])  # trailing in-between run: last raw value
    np.testing.assert_allclose(out["observation"]["EEF_state"], state[:-1, :6])
    np.testing.assert_allclose(out["observation"]["gripper_state"], state[:-1, 6:])
    assert set(out["observation"]) == {"image_0", "image_1", "image_2", "image_3", "state", "EEF_state",
                                       "gripper_state"}
    np.testing.assert_array_equal(out["traj_metadata"]["episode_metadata"]["episode_id"], episode_id[1:-1])
    assert out["language_instruction"].shape == (T - 2,)


@pytest.mark.parametrize("name", ["ppgm", "ppgm_static", "ppgm_wrist"])
def test_ppgm(name):
    traj = synthetic_trajectory(PPGM, T, seed=3)
    action = traj["action"].numpy()
    action[:, 6] = [0.0, 0.5, 1.0, 0.99, 0.5, 0.5, 0.01, 0.2, 1.0, 0.9]
    traj["action"] = tf.constant(action)
    raw = as_numpy(traj)
    out = standardize(name, traj)

    check_standardized(out, T)
    np.testing.assert_array_equal(out["action"][:, :6], action[:, :6])
    np.testing.assert_array_equal(out["action"][:, 6], np.float32([0, 1, 1, 1, 0, 0, 0, 1, 1, 0.9]))
    np.testing.assert_array_equal(out["observation"]["EEF_state"], raw["observation"]["cartesian_position"])
    np.testing.assert_array_equal(out["observation"]["gripper_state"], raw["observation"]["gripper_position"])
    assert out["language_instruction"].tolist() == [b"pick up the red block"] * T


# --- RT-1-style action dicts -------------------------------------------------------------------------------------

RELATIVE_COMMANDS = np.array([0.0, 0.05, 1.0, 0.0, 0.0, -1.0, 0.0, 0.8, 0.0, -0.05], np.float32)
RELATIVE_EXPECTED = [1, 1, 0, 0, 0, 1, 1, 0, 0, 0]  # starts open (first command closes), zeros carry the last command


def test_relative_reference_agrees():
    np.testing.assert_array_equal(np_rel2abs(RELATIVE_COMMANDS), RELATIVE_EXPECTED)


@pytest.mark.parametrize("name, structure, gripper_shape", [
    ("fractal20220817_data", FRACTAL, (T, 1)),
    ("nyu_door_opening_surprising_effectiveness", NYU_DOOR, (T, 1)),
    ("berkeley_autolab_ur5", UR5, (T,)),
    ("jaco_play", JACO_PLAY, (T, 1)),
])
def test_relative_gripper_datasets(name, structure, gripper_shape):
    traj = synthetic_trajectory(structure, T, seed=4)
    traj["action"]["gripper_closedness_action"] = tf.constant(RELATIVE_COMMANDS.reshape(gripper_shape))
    traj["observation"]["natural_language_instruction"] = texts(f"{name} task")
    raw = as_numpy(traj)
    out = standardize(name, traj)

    check_standardized(out, T)
    rotation = np.zeros((T, 3)) if name == "jaco_play" else raw["action"]["rotation_delta"]  # jaco: no rotation
    np.testing.assert_array_equal(out["action"][:, :3], raw["action"]["world_vector"])
    np.testing.assert_array_equal(out["action"][:, 3:6], rotation)
    np.testing.assert_array_equal(out["action"][:, 6], RELATIVE_EXPECTED)
    assert out["language_instruction"].tolist() == [f"{name} task".encode()] * T

    observation = out["observation"]
    if name == "fractal20220817_data":
        for key in ("base_pose_tool_reached", "gripper_closed"):  # the state keys its config reads, as stored
            np.testing.assert_array_equal(observation[key], raw["observation"][key])
    if name == "berkeley_autolab_ur5":
        np.testing.assert_array_equal(observation["state"], raw["observation"]["robot_state"][:, 6:14])
        assert "image_with_depth" not in observation
        np.testing.assert_array_equal(observation["depth"], raw["observation"]["image_with_depth"])
    if name == "jaco_play":
        pose = raw["observation"]["end_effector_cartesian_pos"]
        np.testing.assert_array_equal(observation["state_eef"], pose[:, :6])
        np.testing.assert_array_equal(observation["state_gripper"], pose[:, 6:])


@pytest.mark.parametrize("compressed", [True, False])
def test_kuka_decodes_state(compressed):
    rng = np.random.default_rng(5)
    pose = rng.normal(size=(T, 7)).astype(np.float32)
    gripper_closed = rng.integers(0, 2, size=(T, 1)).astype(np.float32)
    structure = KUKA
    if not compressed:  # the catalog's layout
        structure = {**KUKA, "observation": {**KUKA["observation"], "gripper_closed": Feature((1,)),
                                             "clip_function_input/base_pose_tool_reached": Feature((7,))}}
    traj = synthetic_trajectory(structure, T, seed=5)
    encode = (lambda rows: tf.constant([zlib.compress(r.tobytes()) for r in rows])) if compressed else tf.constant
    traj["observation"]["clip_function_input/base_pose_tool_reached"] = encode(pose)
    traj["observation"]["gripper_closed"] = encode(gripper_closed)
    traj["action"]["gripper_closedness_action"] = tf.constant(RELATIVE_COMMANDS[:, None])
    traj["observation"]["natural_language_instruction"] = texts("pick anything")
    raw = as_numpy(traj)
    out = standardize("kuka", traj)

    check_standardized(out, T)
    np.testing.assert_array_equal(out["observation"]["clip_function_input/base_pose_tool_reached"], pose)
    np.testing.assert_array_equal(out["observation"]["gripper_closed"], gripper_closed)
    np.testing.assert_array_equal(out["action"][:, :3], raw["action"]["world_vector"])
    np.testing.assert_array_equal(out["action"][:, 3:6], raw["action"]["rotation_delta"])
    np.testing.assert_array_equal(out["action"][:, 6], RELATIVE_EXPECTED)
    assert out["language_instruction"].tolist() == [b"pick anything"] * T


@pytest.mark.parametrize("name, structure, gripper_shape", [("roboturk", ROBOTURK, (T, 1)), ("viola", VIOLA, (T,))])
def test_inverted_closedness_datasets(name, structure, gripper_shape):
    closedness = np.array([-0.5, 0.0, 0.25, 1.0, 1.7, 0.5, 0.0, 1.0, 0.9, 0.1], np.float32)
    traj = synthetic_trajectory(structure, T, seed=6)
    traj["action"]["gripper_closedness_action"] = tf.constant(closedness.reshape(gripper_shape))
    raw = as_numpy(traj)
    out = standardize(name, traj)

    check_standardized(out, T)
    np.testing.assert_array_equal(out["action"][:, :3], raw["action"]["world_vector"])
    np.testing.assert_array_equal(out["action"][:, 3:6], raw["action"]["rotation_delta"])
    np.testing.assert_allclose(out["action"][:, 6], [1, 1, 0.75, 0, 0, 0.5, 1, 0, 0.1, 0.9], rtol=1e-6)
    assert out["language_instruction"].tolist() == [b"pick up the red block"] * T


@pytest.mark.parametrize("name, structure, gripper", [
    ("berkeley_cable_routing", CABLE_ROUTING, None),
    ("toto", TOTO, np.array([1, 0, 1, 1, 0, 0, 1, 0, 1, 1], bool)),
    ("columbia_cairlab_pusht_real", PUSHT, np.array([-1, 0, 1, 0, 0, -1, 1, 0, 0, 1], np.float32)),
])
def test_passthrough_gripper_datasets(name, structure, gripper):
    traj = synthetic_trajectory(structure, T, seed=7)
    if gripper is not None:
        traj["action"]["open_gripper" if name == "toto" else "gripper_closedness_action"] = tf.constant(gripper)
    traj["observation"]["natural_language_instruction"] = texts(f"{name} task")
    raw = as_numpy(traj)
    out = standardize(name, traj)

    check_standardized(out, T)
    np.testing.assert_array_equal(out["action"][:, :3], raw["action"]["world_vector"])
    np.testing.assert_array_equal(out["action"][:, 3:6], raw["action"]["rotation_delta"])
    # cable routing: constant 0; toto: open_gripper as 0/1; push-T: the raw command, unconverted (as the reference)
    expected = np.zeros(T, np.float32) if gripper is None else gripper.astype(np.float32)
    np.testing.assert_array_equal(out["action"][:, 6], expected)
    assert out["language_instruction"].tolist() == [f"{name} task".encode()] * T


def test_taco_play():
    traj = synthetic_trajectory(TACO_PLAY, T, seed=8)
    rel = traj["action"]["rel_actions_world"].numpy()
    rel[:, 6] = [-1, 1, 1, -1, -1, 1, 0.5, -1, 1, 1]
    traj["action"]["rel_actions_world"] = tf.constant(rel)
    traj["observation"]["natural_language_instruction"] = texts("switch the blue light off")
    traj["observation"]["structured_language_instruction"] = texts("turn_off_led")
    raw = as_numpy(traj)
    out = standardize("taco_play", traj)

    check_standardized(out, T)
    np.testing.assert_array_equal(out["action"][:, :6], rel[:, :6])  # base-frame relative action, not `actions`
    np.testing.assert_array_equal(out["action"][:, 6], [0, 1, 1, 0, 0, 1, 0.5, 0, 1, 1])  # clipped to [0, 1]
    np.testing.assert_array_equal(out["observation"]["state_eef"], raw["observation"]["robot_obs"][:, :6])
    np.testing.assert_array_equal(out["observation"]["state_gripper"], raw["observation"]["robot_obs"][:, 7:8])
    assert out["language_instruction"].tolist() == [b"switch the blue light off"] * T


# --- Language Table -------------------------------------------------------------------------------------------

def code_points(text: str, width: int = 512) -> np.ndarray:
    codes = np.zeros(width, np.int32)
    codes[: len(text)] = [ord(c) for c in text]
    return codes


def test_language_table():
    instructions = ["push the red star to the left", "déplace l'étoile ☆", "", *["slide the blue cube"] * (T - 3)]
    traj = synthetic_trajectory(LANGUAGE_TABLE, T, seed=9)
    traj["observation"]["instruction"] = tf.constant(np.stack([code_points(s) for s in instructions]))
    raw = as_numpy(traj)
    out = standardize("language_table", traj)

    check_standardized(out, T)
    expected = np.zeros((T, 7), np.float32)
    expected[:, :2], expected[:, 6] = raw["action"], 1.0  # planar deltas, no z / rotation, gripper open
    np.testing.assert_array_equal(out["action"], expected)
    assert [s.decode() for s in out["language_instruction"]] == instructions
    np.testing.assert_array_equal(out["observation"]["effector_translation"],
                                  raw["observation"]["effector_translation"])


# --- Stanford / NYU (flat actions) ------------------------------------------------------------------------------

def test_stanford_kuka_multimodal():
    traj = synthetic_trajectory(STANFORD_KUKA, T, seed=10)
    traj["language_instruction"] = texts("insert the peg")
    raw = as_numpy(traj)
    out = standardize("stanford_kuka_multimodal_dataset_converted_externally_to_rlds", traj)

    check_standardized(out, T)
    action = raw["action"]
    np.testing.assert_array_equal(out["action"], np.concatenate([action[:, :3], np.zeros((T, 3)), action[:, 3:]], 1))
    assert out["observation"]["depth_image"].shape == (T, 128, 128)
    np.testing.assert_array_equal(out["observation"]["depth_image"], raw["observation"]["depth_image"][..., 0])
    np.testing.assert_array_equal(out["observation"]["ee_position"], raw["observation"]["ee_position"])
    assert out["language_instruction"].tolist() == [b"insert the peg"] * T


def test_nyu_rot():
    traj = synthetic_trajectory(NYU_ROT, T, seed=11)
    raw = as_numpy(traj)
    out = standardize("nyu_rot_dataset_converted_externally_to_rlds", traj)

    check_standardized(out, T)
    np.testing.assert_array_equal(out["action"], raw["action"])  # used as stored, gripper unconverted
    np.testing.assert_array_equal(out["observation"]["eef_state"], raw["observation"]["state"][:, :6])
    np.testing.assert_array_equal(out["observation"]["gripper_state"], raw["observation"]["state"][:, 6:])
    assert out["language_instruction"].tolist() == [b"pick up the red block"] * T


def test_stanford_hydra():
    traj = synthetic_trajectory(HYDRA, T, seed=12)
    action = traj["action"].numpy()
    action[:, 6] = [0, 1, 1, 0, 0, 1, 1, 1, 0, 0]  # 1 = close gripper
    traj["action"] = tf.constant(action)
    raw = as_numpy(traj)
    out = standardize("stanford_hydra_dataset_converted_externally_to_rlds", traj)

    check_standardized(out, T)
    np.testing.assert_array_equal(out["action"][:, :6], action[:, :6])
    np.testing.assert_array_equal(out["action"][:, 6], [1, 0, 0, 1, 1, 0, 0, 0, 1, 1])
    state = raw["observation"]["state"]
    np.testing.assert_array_equal(out["observation"]["eef_state"], state[:, [0, 1, 2, 7, 8, 9]])  # xyz + euler
    np.testing.assert_array_equal(out["observation"]["gripper_state"], state[:, 24:25])
    assert out["language_instruction"].tolist() == [b"pick up the red block"] * T


def test_transforms_leave_the_input_untouched():
    traj = synthetic_trajectory(HYDRA, T, seed=13)
    observation_keys = set(traj["observation"])
    STANDARDIZE_TRANSFORMS["stanford_hydra_dataset_converted_externally_to_rlds"](traj)
    assert set(traj["observation"]) == observation_keys and traj["action"].shape == (T, 7)
