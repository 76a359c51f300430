import itertools
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from tests.data.rlds_fixtures import make_episodes, write_rlds
from vla_train.data.interleave import (
    PipelineConfig,
    allocate_threads,
    build_frame_dataset,
    dataset_length,
    plan_mixture,
)
from vla_train.data.registry import DatasetSpec
from vla_train.data.rlds import find_dataset_dir
from vla_train.data.torch_dataset import RLDSDataset


def _config(root, mix="mix", **kwargs) -> PipelineConfig:
    defaults = dict(resize_resolution=(8, 8), shuffle_buffer_size=16, deterministic=True, seed=3,
                    normalization="normal")
    return PipelineConfig(data_root_dir=root / "data", data_mix=mix, **{**defaults, **kwargs})


def _take(cfg, registry, n, **kwargs):
    plan = plan_mixture(cfg, registry)
    return list(itertools.islice(build_frame_dataset(cfg, plan, **kwargs).as_numpy_iterator(), n))


def _identity(frame) -> tuple:
    return (frame["dataset_name"], *np.round(frame["action"][0], 5).tolist())


def _episode_ids(frames, plan, name="ds_b") -> set[int]:
    stats = plan.statistics[name]["action"]
    ids = set()
    for frame in frames:
        if frame["dataset_name"] == name.encode():
            ids.add(round(frame["action"][0, 0] * (stats["std"][0] + 1e-8) + stats["mean"][0]))
    return ids


def test_deterministic_mode_reproduces_the_stream(fixture_root, fixture_registry):
    cfg = _config(fixture_root, image_aug=True)
    first, second = _take(cfg, fixture_registry, 30), _take(cfg, fixture_registry, 30)
    for a, b in zip(first, second, strict=True):
        assert _identity(a) == _identity(b)
        np.testing.assert_array_equal(a["observation"]["image_primary"], b["observation"]["image_primary"])
    other = _take(replace(cfg, seed=4), fixture_registry, 30)
    assert [_identity(f) for f in other] != [_identity(f) for f in first]


def test_two_ranks_read_disjoint_shards(fixture_root, fixture_registry):
    plans, seen = [], []
    for rank in (0, 1):
        cfg = _config(fixture_root, "only_b", rank=rank, world_size=2)
        plan = plan_mixture(cfg, fixture_registry)
        frames = list(itertools.islice(build_frame_dataset(cfg, plan).as_numpy_iterator(), 120))
        seen.append(_episode_ids(frames, plan))
        plans.append(plan)
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == 19  # every training episode is read by exactly one rank


def test_ranks_get_different_seeds(fixture_root, fixture_registry):
    a = _take(_config(fixture_root, rank=0, world_size=2), fixture_registry, 20)
    b = _take(_config(fixture_root, rank=1, world_size=2), fixture_registry, 20)
    assert {_identity(f) for f in a}.isdisjoint({_identity(f) for f in b})


def test_resume_from_a_saved_position_continues_exactly(fixture_root, fixture_registry):
    cfg = _config(fixture_root, image_aug=True)
    plan = plan_mixture(cfg, fixture_registry)
    straight = RLDSDataset(cfg, plan=plan)
    reference = list(itertools.islice(straight.frames(), 50))

    first = RLDSDataset(cfg, plan=plan)
    consumed = list(itertools.islice(first.frames(), 40))
    state = first.state_dict()
    assert state["frames_yielded"] == 40 and state["world_size"] == 1
    resumed = RLDSDataset(cfg, plan=plan)
    resumed.load_state_dict(state)
    continued = list(itertools.islice(resumed.frames(), 10))
    for got, want in zip(consumed + continued, reference, strict=True):
        assert _identity(got) == _identity(want)
        np.testing.assert_array_equal(got["observation"]["image_primary"], want["observation"]["image_primary"])


def test_resume_refuses_a_changed_world_size(fixture_root, fixture_registry):
    cfg = _config(fixture_root)
    plan = plan_mixture(cfg, fixture_registry)
    state = RLDSDataset(cfg, plan=plan).state_dict()
    other = RLDSDataset(replace(cfg, world_size=2), plan=plan)
    with pytest.raises(ValueError, match="saved world_size=1, now 2"):
        other.load_state_dict(state)


def test_balanced_weights_set_the_realized_mixture(fixture_root, fixture_registry):
    cfg = _config(fixture_root, shuffle_buffer_size=1)
    plan = plan_mixture(cfg, fixture_registry)
    sizes = plan.dataset_sizes
    assert sizes == [40, 76]
    raw = np.array([1.0, 0.5]) * sizes
    np.testing.assert_allclose(plan.weights, raw / raw.sum())
    assert plan.dataset_length == int(40 / plan.weights[0])  # ds_a is the only weight-1.0 dataset
    counts = Counter(f["dataset_name"] for f in _take(cfg, fixture_registry, 600))
    assert abs(counts[b"ds_a"] / 600 - plan.weights[0]) < 0.06


def test_dataset_length_and_thread_allocation():
    assert dataset_length([100, 50], [1.0, 0.5], [0.8, 0.2]) == 125
    assert dataset_length([100, 50], [0.3, 0.5], [0.5, 0.5]) == 200  # no 1.0 weight: every dataset counts
    assert allocate_threads(None, [0.5, 0.5]) == [None, None]
    assert allocate_threads(2, [0.9, 0.1]) == [1, 1]
    assert allocate_threads(10, [0.7, 0.2, 0.1]) == [7, 2, 1]
    assert sum(allocate_threads(7, [0.33, 0.33, 0.34])) == 7
    with pytest.raises(ValueError, match="cannot give each"):
        allocate_threads(1, [0.5, 0.5])


def test_frames_have_the_reference_structure(fixture_root, fixture_registry):
    cfg = _config(fixture_root, camera_views=("primary", "wrist"), load_proprio=True, window_size=2,
                  future_action_window_size=3)
    frame = _take(cfg, fixture_registry, 1)[0]
    assert frame["action"].shape == (5, 7)
    assert frame["observation"]["image_primary"].shape == (2, 8, 8, 3)
    assert frame["observation"]["image_wrist"].dtype == np.uint8
    assert frame["observation"]["proprio"].shape == (2, 5)
    assert frame["observation"]["pad_mask"].shape == (2,)
    assert frame["task"]["language_instruction"].startswith(b"task ")


def test_eval_mode_is_one_pass_over_the_held_out_split(fixture_root, fixture_registry):
    cfg = _config(fixture_root, "ds_a", train=False)
    frames = list(build_frame_dataset(cfg, plan_mixture(cfg, fixture_registry)).as_numpy_iterator())
    assert len(frames) == 10  # the val split: 2 episodes x 5 steps


def test_missing_dataset_and_version_errors(tmp_path, fixture_root):
    spec = DatasetSpec("nope", {}, {}, (), "NONE", "EEF_POS", "x")
    with pytest.raises(FileNotFoundError, match=r"looked for .*nope\. Datasets present in .*\['ds_a', 'ds_b'\]"):
        find_dataset_dir(fixture_root / "data", spec)
    with pytest.raises(FileNotFoundError, match=r"no version 9.9.9 .* versions present: \['1.0.0'\]"):
        find_dataset_dir(fixture_root / "data", replace(spec, name="ds_a", version="9.9.9"))
    with pytest.raises(FileNotFoundError, match="Data root .* does not exist"):
        find_dataset_dir(tmp_path / "missing", spec)


def test_action_dim_contradicting_the_config(tmp_path, fixture_registry):
    write_rlds(tmp_path / "data", "ds_a", {"train": make_episodes(2, 3, seed=0, action_dim=6)}, action_dim=6)
    with pytest.raises(ValueError, match=r"action_dim=7 \(EEF_POS\)"):
        plan_mixture(_config(tmp_path, "ds_a"), fixture_registry)


def test_missing_camera_view_is_an_error(fixture_root, fixture_registry):
    spec = replace(fixture_registry.datasets["ds_a"], image_obs_keys={"primary": "image", "secondary": None,
                                                                      "wrist": None})
    registry = replace(fixture_registry, datasets={**fixture_registry.datasets, "ds_a": spec})
    cfg = _config(fixture_root, "ds_a", camera_views=("primary", "wrist"))
    with pytest.raises(ValueError, match="has no 'wrist' camera"):
        build_frame_dataset(cfg, plan_mixture(cfg, registry))


def test_corrupt_tfrecord_is_named(tmp_path, fixture_registry):
    dataset_dir = write_rlds(tmp_path / "data", "ds_a", {"train": make_episodes(3, 4, seed=1)})
    record = sorted(dataset_dir.glob("*.tfrecord*"))[0]
    data = bytearray(record.read_bytes())
    data[40:80] = b"\x00" * 40
    record.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"corrupt file: .*{record.name}"):
        plan_mixture(_config(tmp_path, "ds_a"), fixture_registry)


def test_corruption_found_while_streaming_is_named(tmp_path, fixture_registry):
    dataset_dir = write_rlds(tmp_path / "data", "ds_a", {"train": make_episodes(3, 4, seed=2)})
    cfg = _config(tmp_path, "ds_a")
    dataset = RLDSDataset(cfg, plan=plan_mixture(cfg, fixture_registry))  # statistics computed and cached first
    record = sorted(dataset_dir.glob("*.tfrecord*"))[0]
    data = bytearray(record.read_bytes())
    data[40:80] = b"\x00" * 40
    record.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"Corrupt dataset file.*{record.name}"):
        list(itertools.islice(dataset.frames(), 5))


def test_resume_far_into_the_stream_restores_reader_and_buffer(fixture_root, fixture_registry, monkeypatch, tmp_path):
    """Past several reader anchors and buffer snapshots, through a torch.save round trip (as checkpoints store it)."""
    from vla_train.data import stream_resume

    monkeypatch.setattr(stream_resume, "MIN_INTERVAL", 64)
    monkeypatch.setattr(stream_resume, "MIN_ANCHOR_INTERVAL", 64)
    cfg = replace(_config(fixture_root, image_aug=True), shuffle_buffer_size=100)
    plan = plan_mixture(cfg, fixture_registry)
    first = RLDSDataset(cfg, plan=plan)
    stream = first.frames()
    for _ in range(700):
        next(stream)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    expected = list(itertools.islice(stream, 30))

    state = torch.load(tmp_path / "state.pt", weights_only=False)
    assert state["stream"]["anchor_files"] is not None and state["stream"]["anchor_arrival"] > 0
    assert state["stream"]["position"] == 700
    resumed = RLDSDataset(cfg, plan=plan)
    resumed.load_state_dict(state)
    continued = list(itertools.islice(resumed.frames(), 30))
    for got, want in zip(continued, expected, strict=True):
        assert _identity(got) == _identity(want)
        np.testing.assert_array_equal(got["observation"]["image_primary"], want["observation"]["image_primary"])
    assert resumed._shuffle.frames_read <= 3 * 100 + 4 * 64  # bounded by the buffer, not the 700 consumed


def test_a_data_state_of_another_version_or_format_is_refused(fixture_root, fixture_registry):
    """A version-1 state (frames consumed only: the old skip-based resume) or an unknown stream format is refused
    with the versions named, never silently restarted from the wrong place."""
    cfg = _config(fixture_root)
    plan = plan_mixture(cfg, fixture_registry)
    first = RLDSDataset(cfg, plan=plan)
    next(first.frames())
    state = first.state_dict()
    with pytest.raises(ValueError, match="Unsupported data-pipeline state version 1 .this version reads 2."):
        RLDSDataset(cfg, plan=plan).load_state_dict({**state, "version": 1})
    resumed = RLDSDataset(cfg, plan=plan)
    resumed.load_state_dict({**state, "stream": {**state["stream"], "format": 99}})
    with pytest.raises(ValueError, match="Unsupported stream state format 99 .this version reads 1."):
        next(resumed.frames())
