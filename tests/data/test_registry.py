"""Dataset / mixture registry: the shipped YAML matches the reference facts; bad YAML fails naming file and entry."""

import warnings
from collections import Counter
from pathlib import Path

import pytest
import yaml

from vla_train.data import registry as registry_module
from vla_train.data.registry import DEFAULT_REGISTRY_DIR, RegistryError, load_registry
from vla_train.data.standardize import FRAME_FILTERS, load_all_transforms

OXE_FILE = DEFAULT_REGISTRY_DIR / "datasets" / "oxe.yaml"
EXT = "_converted_externally_to_rlds"
JOINT_POS_DATASETS = {f"berkeley_mvp{EXT}", f"berkeley_rpt{EXT}", "roboset"}
LIBERO = ("libero_spatial_no_noops", "libero_object_no_noops", "libero_goal_no_noops", "libero_10_no_noops")
TDROID = ("tdroid_carrot_in_bowl", "tdroid_pour_corn_in_pot", "tdroid_flip_pot_upright",
          "tdroid_move_object_onto_plate", "tdroid_knock_object_over", "tdroid_cover_object_with_towel")

# Written out from the facts' tables (not from the YAML), so a transcription slip in either shows up.
RTX = [("fractal20220817_data", 0.54087122203), ("kuka", 0.8341046294), ("bridge_orig", 1.0), ("taco_play", 2.0),
       ("jaco_play", 2.0), ("berkeley_cable_routing", 3.0), ("roboturk", 1.0), ("viola", 2.0),
       ("berkeley_autolab_ur5", 1.0), ("toto", 1.0)]
RTX_FRANKA = [*RTX, (f"stanford_hydra_dataset{EXT}", 1.0), (f"austin_buds_dataset{EXT}", 3.0),
              (f"nyu_franka_play_dataset{EXT}", 3.0), (f"maniskill_dataset{EXT}", 0.1),
              (f"furniture_bench_dataset{EXT}", 0.1), (f"cmu_franka_exploration_dataset{EXT}", 5.0),
              (f"austin_sailor_dataset{EXT}", 1.0), (f"austin_sirius_dataset{EXT}", 1.0),
              (f"kaist_nonprehensile{EXT}", 3.0), (f"stanford_robocook{EXT}", 1.0),
              (f"iamlab_cmu_pickup_insert{EXT}", 1.0), ("utaustin_mutex", 1.0), ("cmu_play_fusion", 1.0)]
MAGIC_SOUP = [("fractal20220817_data", 0.54087122203), ("kuka", 0.8341046294), ("bridge_orig", 1.0),
              ("taco_play", 2.0), ("jaco_play", 1.0), ("berkeley_cable_routing", 1.0), ("roboturk", 2.0),
              ("viola", 2.0), ("berkeley_autolab_ur5", 2.0), ("toto", 1.0), ("language_table", 0.1),
              (f"stanford_hydra_dataset{EXT}", 2.0), (f"austin_buds_dataset{EXT}", 1.0),
              (f"nyu_franka_play_dataset{EXT}", 3.0), (f"furniture_bench_dataset{EXT}", 0.1),
              (f"ucsd_kitchen_dataset{EXT}", 2.0), (f"austin_sailor_dataset{EXT}", 1.0),
              (f"austin_sirius_dataset{EXT}", 1.0), (f"dlr_edan_shared_control{EXT}", 1.0),
              (f"iamlab_cmu_pickup_insert{EXT}", 1.0), ("utaustin_mutex", 1.0), ("berkeley_fanuc_manipulation", 2.0),
              ("cmu_stretch", 1.0)]
MAGIC_SOUP_PLUS = [*MAGIC_SOUP, ("bc_z", 0.2), ("fmb_dataset", 1.0), ("dobbe", 0.2), ("droid", 0.06)]
MAGIC_SOUP_PLUS_MINUS = [("fractal20220817_data", 1.0)] + [
    (name, weight) for name, weight in MAGIC_SOUP_PLUS[1:] if name not in ("language_table", "droid")]
EXPECTED_MIXTURES = {
    "bridge": [("bridge_orig", 1.0)],
    "bridge_rt_1": [("bridge_orig", 1.0), ("fractal20220817_data", 1.0)],
    "rtx": RTX,
    "rtx_franka": RTX_FRANKA,
    "oxe_magic_soup": MAGIC_SOUP,
    "oxe_magic_soup_plus": MAGIC_SOUP_PLUS,
    "oxe_magic_soup_plus_minus": MAGIC_SOUP_PLUS_MINUS,
    **{name: [(name, 1.0)] for name in (*TDROID, "droid_wipe", *LIBERO)},
}
# OpenVLA-OFT's ALOHA tasks (its `oxe/configs.py`; its mixtures name each alone, ours also together at equal weights)
ALOHA = ("aloha1_put_X_into_pot_300_demos", "aloha1_fold_shorts_20_demos", "aloha1_fold_shirt_30_demos",
         "aloha1_scoop_X_into_bowl_45_demos")
CONTINUOUS_ONLY_MIXTURES = {"aloha": [(name, 1.0) for name in ALOHA]}  # joint positions: continuous policies only


# ----------------------------------------------------------------------------------------------------------------------
# (a) the shipped registry
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        registry = load_registry()
    repeats = [str(warning.message) for warning in record if "keeping the first" in str(warning.message)]
    assert not repeats, repeats  # the shipped YAML lists nothing twice
    return registry


@pytest.fixture(scope="module")
def oxe(shipped):
    return {name: spec for name, spec in shipped.datasets.items() if spec.source == str(OXE_FILE)}


def test_oxe_has_the_70_reference_configs(oxe):
    assert len(oxe) == 70
    assert Counter(spec.action_encoding for spec in oxe.values()) == {"EEF_POS": 67, "JOINT_POS": 3}
    assert {name for name, spec in oxe.items() if spec.action_encoding == "JOINT_POS"} == JOINT_POS_DATASETS
    assert Counter(spec.state_encoding for spec in oxe.values()) == {
        "POS_EULER": 43, "POS_QUAT": 11, "JOINT": 11, "NONE": 5}
    assert all(spec.action_dim == (7 if spec.action_encoding == "EEF_POS" else 8) for spec in oxe.values())


def test_oxe_yaml_spells_out_every_camera_view(oxe):
    raw = yaml.safe_load(OXE_FILE.read_text())["datasets"]
    assert set(raw) == set(oxe)
    for name, entry in raw.items():
        assert set(entry["image_obs_keys"]) == set(entry["depth_obs_keys"]) == {"primary", "secondary", "wrist"}, name
        assert "standardize" not in entry, name  # every OXE transform carries the dataset's own name


def test_oxe_example_entries(oxe):
    bridge = oxe["bridge_orig"]
    assert bridge.image_obs_keys == {"primary": "image_0", "secondary": "image_1", "wrist": None}
    assert bridge.state_obs_keys == ("EEF_state", None, "gripper_state")
    assert (bridge.state_encoding, bridge.action_encoding) == ("POS_EULER", "EEF_POS")

    fractal = oxe["fractal20220817_data"]
    assert fractal.image_obs_keys == {"primary": "image", "secondary": None, "wrist": None}
    assert fractal.state_obs_keys == ("base_pose_tool_reached", "gripper_closed")
    assert fractal.state_encoding == "POS_QUAT"

    droid = oxe["droid"]
    assert droid.image_obs_keys == {"primary": "exterior_image_1_left", "secondary": "exterior_image_2_left",
                                    "wrist": "wrist_image_left"}
    assert droid.state_obs_keys == ("proprio",)
    assert droid.state_encoding == "POS_QUAT"
    assert droid.frame_filter == "droid_zero_action"
    assert [name for name, spec in oxe.items() if spec.frame_filter] == ["droid"]  # only DROID has aux_kwargs

    for name in LIBERO:
        assert oxe[name].image_obs_keys == {"primary": "image", "secondary": None, "wrist": "wrist_image"}
        assert oxe[name].state_obs_keys == ("EEF_state", "gripper_state")  # 8-D proprio, as OFT / VLA-Adapter
        assert (oxe[name].state_encoding, oxe[name].action_encoding) == ("POS_EULER", "EEF_POS")
    for name in TDROID:
        assert oxe[name].image_obs_keys["primary"] == "static_image"
        assert oxe[name].depth_obs_keys == {"primary": "static_depth_image", "secondary": None, "wrist": None}
    assert oxe["droid_wipe"].image_obs_keys["primary"] == "exterior_image_2_left"

    assert oxe["bc_z"].version == "0.1.0"
    assert [name for name, spec in oxe.items() if spec.version] == ["bc_z"]
    assert oxe["bridge_orig"].absolute_action_mask == [False] * 6 + [True]
    assert oxe["bridge_orig"].action_normalization_mask == [True] * 6 + [False]


def test_every_standardize_transform_and_frame_filter_is_registered(shipped):
    transforms = load_all_transforms()
    missing = sorted({spec.standardize for spec in shipped.datasets.values()} - set(transforms))
    assert not missing, f"datasets without a registered standardization transform: {missing}"
    assert all(spec.standardize == name for name, spec in shipped.datasets.items() if spec.source == str(OXE_FILE))
    assert "droid_zero_action" in FRAME_FILTERS


def test_named_mixtures_match_the_reference(shipped):
    assert set(shipped.mixtures) == {*EXPECTED_MIXTURES, *CONTINUOUS_ONLY_MIXTURES, "demo", "calvin_abc",
                                     "libero_4_task_suites_no_noops"}
    assert list(shipped.mixtures["calvin_abc"].entries) == [("calvin_abc", 1.0)]  # VLA-Adapter's CALVIN ABC
    assert list(shipped.mixtures["libero_4_task_suites_no_noops"].entries) == [(name, 1.0) for name in LIBERO]  # π0
    assert len(EXPECTED_MIXTURES) == 18
    for name, expected in {**EXPECTED_MIXTURES, **CONTINUOUS_ONLY_MIXTURES}.items():
        assert list(shipped.mixtures[name].entries) == expected, name
    assert list(shipped.mixtures["demo"].entries) == [("demo_bridge", 1.0), ("demo_libero", 1.0)]


def test_mixture_details_from_the_facts(shipped):
    entries = {name: dict(spec.entries) for name, spec in shipped.mixtures.items()}
    sizes = {name: len(spec.entries) for name, spec in shipped.mixtures.items()}
    # rtx_franka: 28 reference entries, minus 4 repeats (first weight kept) and the JOINT_POS berkeley_rpt.
    assert sizes["rtx_franka"] == 23
    assert entries["rtx_franka"]["taco_play"] == 2.0 and entries["rtx_franka"]["berkeley_cable_routing"] == 3.0
    assert f"berkeley_rpt{EXT}" not in entries["rtx_franka"]
    assert (sizes["oxe_magic_soup"], sizes["oxe_magic_soup_plus"], sizes["oxe_magic_soup_plus_minus"]) == (23, 27, 25)
    assert entries["oxe_magic_soup_plus"]["fractal20220817_data"] == 0.54087122203
    assert entries["oxe_magic_soup_plus_minus"]["fractal20220817_data"] == 1.0
    assert "language_table" not in entries["oxe_magic_soup_plus_minus"]
    assert "droid" not in entries["oxe_magic_soup_plus_minus"]
    assert entries["oxe_magic_soup_plus"]["droid"] == 0.06 and entries["oxe_magic_soup_plus"]["bc_z"] == 0.2


def test_every_mixture_resolves_to_trainable_datasets(shipped):
    for name in shipped.mixtures:
        if name in CONTINUOUS_ONLY_MIXTURES:
            with pytest.raises(RegistryError, match=f"entry '{name}': dataset .* has action_encoding"):
                shipped.resolve_mixture(name)
            resolved = shipped.resolve_mixture(name, continuous_actions=True)
        else:
            resolved = shipped.resolve_mixture(name)
            assert all(spec.action_encoding in ("EEF_POS", "EEF_R6") for spec, _ in resolved), name
        assert resolved and all(weight > 0 for _, weight in resolved), name
        assert len({spec.name for spec, _ in resolved}) == len(resolved), name


def test_oft_aloha_entries(shipped):
    for name in ALOHA:
        spec = shipped.dataset(name)
        assert spec.source == str(DEFAULT_REGISTRY_DIR / "datasets" / "oft.yaml")
        assert spec.image_obs_keys == {"primary": "image", "secondary": "left_wrist_image",
                                       "wrist": "right_wrist_image"}
        assert (spec.state_obs_keys, spec.state_encoding) == (("state",), "JOINT_BIMANUAL")
        assert (spec.action_encoding, spec.action_dim, spec.normalization) == ("JOINT_POS_BIMANUAL", 14, "bounds")
        assert spec.standardize == "passthrough"
        # OFT's masks: every joint (grippers included) is absolute and normalized
        assert spec.absolute_action_mask == spec.action_normalization_mask == [True] * 14
        [(alone, weight)] = shipped.resolve_mixture(name, continuous_actions=True)  # a data_mix on its own
        assert (alone, weight) == (spec, 1.0)
    assert all(spec.normalization is None for name, spec in shipped.datasets.items() if name not in ALOHA)


def test_resolve_plain_dataset_and_unknown_names(shipped):
    [(spec, weight)] = shipped.resolve_mixture("bridge_dataset")  # a dataset, not a mixture
    assert (spec.name, weight) == ("bridge_dataset", 1.0)
    with pytest.raises(RegistryError, match="neither a mixture nor a dataset.*oxe_magic_soup_plus"):
        shipped.resolve_mixture("oxe_magic_soup_plus_plus")
    with pytest.raises(RegistryError, match="Unknown dataset 'nope'"):
        shipped.dataset("nope")


def test_user_registry_directory_adds_a_dataset_and_a_mixture(tmp_path, shipped):
    write(tmp_path / "datasets" / "mine.yaml", {"datasets": {"my_robot": dataset_entry(standardize="bridge_orig")}})
    write(tmp_path / "mixtures.yaml", {"mixtures": {"my_mix": [["my_robot", 2.0], ["bridge_orig", 1.0]]}})
    registry = load_registry(tmp_path)
    assert registry.dataset("my_robot").standardize == "bridge_orig"
    assert registry.dataset("my_robot").source == str(tmp_path / "datasets" / "mine.yaml")
    assert [(spec.name, weight) for spec, weight in registry.resolve_mixture("my_mix")] == [
        ("my_robot", 2.0), ("bridge_orig", 1.0)]
    assert "oxe_magic_soup_plus" in registry.mixtures and len(registry.datasets) == len(shipped.datasets) + 1


# ----------------------------------------------------------------------------------------------------------------------
# (b) validation, on small registries under tmp_path with a fake transform registry
# ----------------------------------------------------------------------------------------------------------------------

FAKE_TRANSFORMS = ("toy", "toy_b", "toy_joint", "shared_fn")


@pytest.fixture
def fake_transforms(monkeypatch):
    monkeypatch.setattr(registry_module, "load_all_transforms", lambda: dict.fromkeys(FAKE_TRANSFORMS))


def dataset_entry(**overrides) -> dict:
    entry = {"image_obs_keys": {"primary": "image", "secondary": None, "wrist": "wrist_image"},
             "depth_obs_keys": {"primary": None, "secondary": None, "wrist": None},
             "state_obs_keys": ["EEF_state", None, "gripper_state"],
             "state_encoding": "POS_EULER", "action_encoding": "EEF_POS"}
    entry.update(overrides)
    return entry


def write(path: Path, content: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
    return path


def toy_registry(root: Path, mixtures: dict | str | None = None) -> tuple[Path, Path]:
    """`root/datasets/toys.yaml` with toy, toy_b (EEF_POS) and toy_joint (JOINT_POS); optional mixtures.yaml."""
    datasets = write(root / "datasets" / "toys.yaml", {"datasets": {
        "toy": dataset_entry(), "toy_b": dataset_entry(), "toy_joint": dataset_entry(action_encoding="JOINT_POS")}})
    mixture_file = root / "mixtures.yaml"
    if mixtures is not None:
        write(mixture_file, mixtures if isinstance(mixtures, str) else {"mixtures": mixtures})
    return datasets, mixture_file


def expect_error(base_dir: Path, path: Path, entry: str | None, match: str, *extra_dirs: Path) -> None:
    """Loading fails with a RegistryError that names the file, the entry (when there is one) and the problem."""
    with pytest.raises(RegistryError, match=match) as info:
        load_registry(*extra_dirs, base_dir=base_dir)
    assert str(info.value).startswith(f"{path}: "), info.value
    if entry is not None:
        assert f"entry {entry!r}" in str(info.value), info.value


def test_a_minimal_registry_loads(tmp_path, fake_transforms):
    datasets_file, _ = toy_registry(tmp_path, {"mix": [["toy", 0.5], ["toy_b", 2]]})
    write(tmp_path / "datasets" / "more.yaml", {"datasets": {"toy_c": {
        "image_obs_keys": {"primary": "rgb"}, "action_encoding": "EEF_R6", "standardize": "shared_fn"}}})
    registry = load_registry(base_dir=tmp_path)
    assert set(registry.datasets) == {"toy", "toy_b", "toy_joint", "toy_c"}
    toy = registry.dataset("toy")
    assert (toy.standardize, toy.source, toy.frame_filter, toy.version) == ("toy", str(datasets_file), None, None)
    toy_c = registry.dataset("toy_c")  # omitted views, state and encodings take their defaults
    assert toy_c.image_obs_keys == {"primary": "rgb", "secondary": None, "wrist": None}
    assert toy_c.depth_obs_keys == {"primary": None, "secondary": None, "wrist": None}
    assert (toy_c.state_obs_keys, toy_c.state_encoding, toy_c.action_dim) == ((), "NONE", 10)
    assert toy_c.absolute_action_mask == [False] * 9 + [True]
    assert registry.mixtures["mix"].entries == (("toy", 0.5), ("toy_b", 2.0))
    assert registry.resolve_mixture("toy_b") == [(registry.dataset("toy_b"), 1.0)]


def test_unknown_dataset_in_a_mixture(tmp_path, fake_transforms):
    _, mixtures = toy_registry(tmp_path, {"mix": [["toy", 1.0], ["toy_c", 1.0]]})
    expect_error(tmp_path, mixtures, "mix", "unknown dataset 'toy_c'")


@pytest.mark.parametrize("pair", [[["toy"], 1.0], ["toy"], "toy", ["toy", 1.0, 2.0]])
def test_malformed_mixture_pair(tmp_path, fake_transforms, pair):
    _, mixtures = toy_registry(tmp_path, {"mix": [pair]})
    expect_error(tmp_path, mixtures, "mix", "unknown dataset|pair")


@pytest.mark.parametrize("mixture", [[], None, "toy"])
def test_empty_or_non_list_mixture(tmp_path, fake_transforms, mixture):
    _, mixtures = toy_registry(tmp_path, {"mix": mixture})
    expect_error(tmp_path, mixtures, "mix", "non-empty list")


def test_unknown_transform(tmp_path, fake_transforms):
    datasets = write(tmp_path / "datasets" / "x.yaml", {"datasets": {"mystery": dataset_entry()}})
    expect_error(tmp_path, datasets, "mystery", "unknown standardization transform 'mystery'")
    write(datasets, {"datasets": {"toy": dataset_entry(standardize="toy_v2")}})
    expect_error(tmp_path, datasets, "toy", "unknown standardization transform 'toy_v2'")


def test_unknown_frame_filter(tmp_path, fake_transforms):
    datasets = write(tmp_path / "datasets" / "x.yaml", {"datasets": {"toy": dataset_entry(frame_filter="nope")}})
    expect_error(tmp_path, datasets, "toy", "unknown frame_filter 'nope'")


@pytest.mark.parametrize("weight", ["0", "0.0", "-1.5", "heavy", "true", "null", ".inf", ".nan", "[1.0]"])
def test_non_positive_or_non_numeric_weight(tmp_path, fake_transforms, weight):
    _, mixtures = toy_registry(tmp_path, f"mixtures:\n  mix:\n    - [toy, 1.0]\n    - [toy_b, {weight}]\n")
    expect_error(tmp_path, mixtures, "mix", "weight of 'toy_b' must be a positive number")


def test_joint_pos_dataset_in_a_mixture(tmp_path, fake_transforms):
    _, mixtures = toy_registry(tmp_path, {"mix": [["toy", 1.0], ["toy_joint", 1.0]]})
    registry = load_registry(base_dir=tmp_path)  # a valid registry: the mixture is refused when resolved for tokens
    with pytest.raises(RegistryError, match="'toy_joint' has action_encoding JOINT_POS") as info:
        registry.resolve_mixture("mix")
    assert str(info.value).startswith(f"{mixtures}: entry 'mix': "), info.value
    assert "continuous_actions=True" in str(info.value)
    resolved = registry.resolve_mixture("mix", continuous_actions=True)  # e.g. the oft policy
    assert [(spec.name, weight) for spec, weight in resolved] == [("toy", 1.0), ("toy_joint", 1.0)]
    assert registry.dataset("toy_joint").action_dim == 8
    assert registry.dataset("toy_joint").absolute_action_mask == [True] * 8


def test_joint_pos_dataset_named_as_data_mix_is_refused_with_the_same_message(tmp_path, fake_transforms):
    datasets, _ = toy_registry(tmp_path, {"mix": [["toy", 1.0], ["toy_joint", 1.0]]})
    registry = load_registry(base_dir=tmp_path)
    with pytest.raises(RegistryError) as in_mixture:
        registry.resolve_mixture("mix")
    with pytest.raises(RegistryError) as named_directly:
        registry.resolve_mixture("toy_joint")  # what plan_mixture does with data_mix="toy_joint"
    assert str(named_directly.value).startswith(f"{datasets}: entry 'toy_joint': ")
    problem = "dataset 'toy_joint' has action_encoding JOINT_POS (8-D actions), which VLA training does not support"
    assert problem in str(in_mixture.value) and problem in str(named_directly.value)
    assert str(in_mixture.value).split(": entry 'mix': ")[1] == str(named_directly.value).split(
        ": entry 'toy_joint': ")[1]
    assert registry.resolve_mixture("toy") == [(registry.dataset("toy"), 1.0)]
    assert registry.resolve_mixture("toy_joint", continuous_actions=True) == [(registry.dataset("toy_joint"), 1.0)]


def test_malformed_yaml(tmp_path, fake_transforms):
    broken = write(tmp_path / "datasets" / "broken.yaml", "datasets:\n  toy: {image_obs_keys: [\n")
    expect_error(tmp_path, broken, None, "not valid YAML")
    broken.unlink()
    _, mixtures = toy_registry(tmp_path, "mixtures:\n  mix: [[toy, 1.0]\n  other: 3\n")
    expect_error(tmp_path, mixtures, None, "not valid YAML")


@pytest.mark.parametrize("content", ["- toy\n- toy_b\n", "datasets: [toy]\n", "datasets: 3\n"])
def test_datasets_file_must_hold_a_mapping(tmp_path, fake_transforms, content):
    path = write(tmp_path / "datasets" / "x.yaml", content)
    expect_error(tmp_path, path, None, "expected a top-level mapping 'datasets:")


def test_empty_files_are_allowed(tmp_path, fake_transforms):
    write(tmp_path / "datasets" / "empty.yaml", "# nothing yet\n")
    write(tmp_path / "mixtures.yaml", "mixtures: {}\n")
    registry = load_registry(base_dir=tmp_path)
    assert (registry.datasets, registry.mixtures) == ({}, {})


def test_unknown_keys(tmp_path, fake_transforms):
    path = write(tmp_path / "datasets" / "x.yaml", {"datasets": {"toy": dataset_entry(camera="image")}})
    expect_error(tmp_path, path, "toy", r"unknown keys \['camera'\]")
    # a misspelt top-level key must not silently drop the file
    write(path, {"dataset": {"toy": dataset_entry()}})
    expect_error(tmp_path, path, None, r"unknown top-level keys \['dataset'\]")
    path.unlink()
    _, mixtures = toy_registry(tmp_path, "mixtures: {mix: [[toy, 1.0]]}\ndatasets: {}\n")
    expect_error(tmp_path, mixtures, None, r"unknown top-level keys \['datasets'\]")


@pytest.mark.parametrize("overrides", [
    {"image_obs_keys": {"front": "image"}},
    {"depth_obs_keys": {"primary": None, "top": "depth"}},
    {"image_obs_keys": ["image"]},
    {"image_obs_keys": {"primary": ["image"]}},
])
def test_bad_camera_view(tmp_path, fake_transforms, overrides):
    path = write(tmp_path / "datasets" / "x.yaml", {"datasets": {"toy": dataset_entry(**overrides)}})
    expect_error(tmp_path, path, "toy", "must map camera views")


@pytest.mark.parametrize(("overrides", "match"), [
    ({"action_encoding": "EEF_VEL"}, "unknown action_encoding 'EEF_VEL'"),
    ({"action_encoding": None}, "unknown action_encoding None"),
    ({"state_encoding": "QUAT"}, "unknown state_encoding 'QUAT'"),
    ({"state_obs_keys": "state"}, "state_obs_keys must be a list"),
    ({"state_obs_keys": ["state", 3]}, "state_obs_keys must be a list"),
    ({"action_dim": 1}, "action_dim must be an integer >= 2"),
    ({"action_dim": "7"}, "action_dim must be an integer >= 2"),
    ({"normalization": "minmax"}, r"unknown normalization 'minmax'; choose one of \['normal', 'bounds', 'bounds_q99'\]"),
])
def test_bad_dataset_fields(tmp_path, fake_transforms, overrides, match):
    path = write(tmp_path / "datasets" / "x.yaml", {"datasets": {"toy": dataset_entry(**overrides)}})
    expect_error(tmp_path, path, "toy", match)


@pytest.mark.parametrize("normalization", ["normal", "bounds", "bounds_q99", None])
def test_per_dataset_normalization(tmp_path, fake_transforms, normalization):
    extra = {} if normalization is None else {"normalization": normalization}
    write(tmp_path / "datasets" / "x.yaml", {"datasets": {"toy": dataset_entry(**extra)}})
    assert load_registry(base_dir=tmp_path).dataset("toy").normalization == normalization  # None: the pipeline's


def test_dataset_entry_must_be_a_mapping(tmp_path, fake_transforms):
    path = write(tmp_path / "datasets" / "x.yaml", "datasets:\n  toy: [image]\n")
    expect_error(tmp_path, path, "toy", "expected a mapping")


def test_dataset_defined_in_two_files_keeps_the_first(tmp_path, fake_transforms):
    first = write(tmp_path / "datasets" / "a.yaml", {"datasets": {"toy": dataset_entry(state_encoding="JOINT")}})
    second = write(tmp_path / "datasets" / "b.yaml", {"datasets": {"toy": dataset_entry(state_encoding="POS_QUAT")}})
    with pytest.warns(UserWarning, match=f"{second}: dataset 'toy' is already defined in {first}; keeping the first"):
        registry = load_registry(base_dir=tmp_path)
    assert (registry.dataset("toy").state_encoding, registry.dataset("toy").source) == ("JOINT", str(first))


def test_dataset_listed_twice_in_a_mixture_keeps_the_first_weight(tmp_path, fake_transforms):
    _, mixtures = toy_registry(tmp_path, {"mix": [["toy", 2.0], ["toy_b", 1.0], ["toy", 0.5]]})
    with pytest.warns(UserWarning, match=f"{mixtures}: mixture 'mix' lists 'toy' twice; keeping the first weight"):
        registry = load_registry(base_dir=tmp_path)
    assert registry.mixtures["mix"].entries == (("toy", 2.0), ("toy_b", 1.0))


def test_name_repeated_inside_one_file_keeps_the_first(tmp_path, fake_transforms):
    # plain PyYAML would silently keep the *last* of two equal keys
    datasets = write(tmp_path / "datasets" / "x.yaml",
                     "datasets:\n  toy: {action_encoding: EEF_POS, state_encoding: JOINT}\n"
                     "  toy: {action_encoding: EEF_POS, state_encoding: POS_QUAT}\n")
    write(tmp_path / "mixtures.yaml", "mixtures:\n  mix: [[toy, 1.0]]\n  mix: [[toy, 3.0]]\n")
    with pytest.warns(UserWarning, match="is repeated in the same mapping; keeping the first") as record:
        registry = load_registry(base_dir=tmp_path)
    messages = [str(warning.message) for warning in record]
    assert any(message.startswith(f"{datasets}: line 3: 'toy'") for message in messages), messages
    assert registry.dataset("toy").state_encoding == "JOINT"
    assert registry.mixtures["mix"].entries == (("toy", 1.0),)


def test_extra_registry_directory(tmp_path, fake_transforms):
    base, extra = tmp_path / "base", tmp_path / "extra"
    toy_registry(base, {"mix": [["toy", 1.0]]})
    write(extra / "datasets" / "mine.yaml", {"datasets": {
        "mine": dataset_entry(standardize="shared_fn"), "toy": dataset_entry(state_encoding="NONE")}})
    write(extra / "mixtures.yaml", {"mixtures": {"my_mix": [["mine", 3.0], ["toy", 1.0]], "mix": [["mine", 1.0]]}})
    with pytest.warns(UserWarning, match="already defined") as record:
        registry = load_registry(extra, base_dir=base)
    assert len(record) == 2  # the base directory's 'toy' and 'mix' win
    assert registry.dataset("mine").standardize == "shared_fn"
    assert registry.dataset("toy").state_encoding == "POS_EULER"
    assert registry.mixtures["mix"].entries == (("toy", 1.0),)
    assert registry.mixtures["my_mix"].entries == (("mine", 3.0), ("toy", 1.0))
    assert registry.mixtures["my_mix"].source == str(extra / "mixtures.yaml")
    with pytest.raises(RegistryError, match="does not exist"):
        load_registry(tmp_path / "missing", base_dir=base)


def test_mixture_may_only_use_datasets_known_to_some_directory(tmp_path, fake_transforms):
    base, extra = tmp_path / "base", tmp_path / "extra"
    toy_registry(base, {"mix": [["mine", 1.0]]})  # defined only by the extra directory: fine once it is loaded
    write(extra / "datasets" / "mine.yaml", {"datasets": {"mine": dataset_entry(standardize="toy")}})
    assert load_registry(extra, base_dir=base).mixtures["mix"].entries == (("mine", 1.0),)
    expect_error(base, base / "mixtures.yaml", "mix", "unknown dataset 'mine'")


def test_unknown_mixture_name(tmp_path, fake_transforms):
    toy_registry(tmp_path, {"mix": [["toy", 1.0]]})
    registry = load_registry(base_dir=tmp_path)
    with pytest.raises(RegistryError, match=r"'soup' is neither a mixture nor a dataset; mixtures: \['mix'\]"):
        registry.resolve_mixture("soup")
    [(spec, weight)] = registry.resolve_mixture("toy")
    assert (spec.name, weight) == ("toy", 1.0)
