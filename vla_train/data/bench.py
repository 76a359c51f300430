"""Data-pipeline benchmark (shared/reference/performance.md): throughput, time to first frame, memory, stage split.

Workload: a `fractal20220817_data`-structured dataset (one 256x320 JPEG camera) and a `jaco_play`-structured one (two
224x224 JPEG cameras, primary loaded), 200 episodes x 30 steps each, one TFRecord shard each, mixed at equal weight,
224x224 output, train mode, one process. The datasets are written once by `write_benchmark_datasets` with the real
OXE feature structures, so the real standardization transforms run.

`run_full_path` times the whole path to a padded (pinned on CUDA) torch batch in frames per CPU-second of the
process (all threads: TensorFlow's, the prefetch thread, the consumer), the stable figure on a shared machine.
"""

import itertools
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import tensorflow_datasets as tfds
import yaml

from vla_train.data.convert import dataset_exists, write_rlds_dataset
from vla_train.data.frame_rows import numpy_frames
from vla_train.data.interleave import PipelineConfig, build_frame_dataset, plan_mixture
from vla_train.data.prefetch import BatchPrefetcher
from vla_train.data.registry import load_registry

BENCH_MIXTURE = "bench_fractal_jaco"
_F32 = np.float32


def _tensor(*shape: int, dtype=_F32) -> tfds.features.Tensor:
    return tfds.features.Tensor(shape=shape, dtype=dtype)


def _rlds(action: dict[str, Any], observation: dict[str, Any]) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({"steps": tfds.features.Dataset({
        "action": action, "observation": observation, "is_first": np.bool_, "is_last": np.bool_,
        "is_terminal": np.bool_, "reward": _F32, "discount": _F32})})


def fractal_features() -> tfds.features.FeaturesDict:
    """`fractal20220817_data` steps (TFDS catalog): RT-1 action dict, one 256x320 camera, 512-D instruction embedding."""
    action = {"base_displacement_vector": _tensor(2), "base_displacement_vertical_rotation": _tensor(1),
              "gripper_closedness_action": _tensor(1), "rotation_delta": _tensor(3),
              "terminate_episode": _tensor(3, dtype=np.int32), "world_vector": _tensor(3)}
    observation = {
        "base_pose_tool_reached": _tensor(7), "gripper_closed": _tensor(1), "gripper_closedness_commanded": _tensor(1),
        "height_to_bottom": _tensor(1), "image": tfds.features.Image(shape=(256, 320, 3), encoding_format="jpeg"),
        "natural_language_embedding": _tensor(512), "natural_language_instruction": tfds.features.Text(),
        "orientation_box": _tensor(2, 3), "orientation_start": _tensor(4), "robot_orientation_positions_box":
        _tensor(3, 3), "rotation_delta_to_go": _tensor(3), "src_rotation": _tensor(4), "vector_to_go": _tensor(3),
        "workspace_bounds": _tensor(3, 3)}
    return _rlds(action, observation)


def jaco_features() -> tfds.features.FeaturesDict:
    """`jaco_play` steps (TFDS catalog): two 224x224 cameras, end-effector and joint state, 512-D embedding."""
    action = {"gripper_closedness_action": _tensor(1), "terminate_episode": _tensor(3, dtype=np.int32),
              "world_vector": _tensor(3)}
    image = tfds.features.Image(shape=(224, 224, 3), encoding_format="jpeg")
    observation = {"end_effector_cartesian_pos": _tensor(7), "end_effector_cartesian_velocity": _tensor(6),
                   "image": image, "image_wrist": image, "joint_pos": _tensor(8),
                   "natural_language_embedding": _tensor(512), "natural_language_instruction": tfds.features.Text()}
    return _rlds(action, observation)


def _photo(rng: np.random.Generator, height: int, width: int, step: int) -> np.ndarray:
    """A smooth scene with blobs and mild noise (compresses like a camera frame, ~20-30 KB as JPEG)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([x / width * 180 + 40, y / height * 160 + 50, (x + y) / (height + width) * 120 + 60], -1)
    for cx, cy, radius, color in rng.uniform(0, 1, size=(6, 4)) * [width, height, 40, 255]:
        mask = (x - cx - 2 * step) ** 2 + (y - cy) ** 2 < (radius + 10) ** 2
        image[mask] = color
    image += rng.normal(0, 6, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _episode(kind: str, index: int, length: int) -> dict[str, Any]:
    rng = np.random.default_rng(index)
    steps = []
    for t in range(length):
        flags = {"is_first": t == 0, "is_last": t == length - 1, "is_terminal": t == length - 1,
                 "reward": float(t == length - 1), "discount": 1.0}
        embedding = rng.normal(size=512).astype(_F32)
        text = f"pick the object {index % 7}"
        if kind == "fractal":
            action = {"base_displacement_vector": rng.normal(size=2).astype(_F32),
                      "base_displacement_vertical_rotation": rng.normal(size=1).astype(_F32),
                      "gripper_closedness_action": rng.choice([-1.0, 0.0, 1.0], size=1).astype(_F32),
                      "rotation_delta": rng.normal(0, 0.1, 3).astype(_F32),
                      "terminate_episode": np.array([0, 1, 0], np.int32), "world_vector": rng.normal(0, 0.1, 3)
                      .astype(_F32)}
            observation = {key: rng.normal(size=feature.shape).astype(_F32)
                           for key, feature in fractal_features()["steps"]["observation"].items()
                           if isinstance(feature, tfds.features.Tensor)}
            observation.update(image=_photo(rng, 256, 320, t), natural_language_embedding=embedding,
                               natural_language_instruction=text)
        else:
            action = {"gripper_closedness_action": rng.choice([-1.0, 0.0, 1.0], size=1).astype(_F32),
                      "terminate_episode": np.array([0, 1, 0], np.int32),
                      "world_vector": rng.normal(0, 0.1, 3).astype(_F32)}
            observation = {"end_effector_cartesian_pos": rng.normal(size=7).astype(_F32),
                           "end_effector_cartesian_velocity": rng.normal(size=6).astype(_F32),
                           "image": _photo(rng, 224, 224, t), "image_wrist": _photo(rng, 224, 224, -t),
                           "joint_pos": rng.normal(size=8).astype(_F32), "natural_language_embedding": embedding,
                           "natural_language_instruction": text}
        steps.append({"action": action, "observation": observation, **flags})
    return {"steps": steps}


def write_benchmark_datasets(data_root: str | Path, num_episodes: int = 200, episode_length: int = 30) -> Path:
    """Write both datasets (once) and a registry directory with the `bench_fractal_jaco` mixture; returns it."""
    data_root = Path(data_root)
    for name, kind, features in (("fractal20220817_data", "fractal", fractal_features()),
                                 ("jaco_play", "jaco", jaco_features())):
        if not dataset_exists(data_root, name):
            def examples(kind=kind):
                for index in range(num_episodes):
                    yield f"{index:06d}", _episode(kind, index, episode_length)

            write_rlds_dataset(data_root, name, features, {"train": examples},
                               description=f"benchmark workload ({kind}-structured)")
    registry_dir = data_root / "registry"
    (registry_dir / "datasets").mkdir(parents=True, exist_ok=True)
    mixture = {"mixtures": {BENCH_MIXTURE: [["fractal20220817_data", 1.0], ["jaco_play", 1.0]]}}
    (registry_dir / "mixtures.yaml").write_text(yaml.safe_dump(mixture))
    return registry_dir


@dataclass
class BenchResult:
    time_to_first_frame_s: float
    frames_per_second: float
    frames: int
    peak_rss_gib: float
    rss_slope_gib_per_min: float
    stage_seconds: dict[str, float] = field(default_factory=dict)


class _RSSSampler(threading.Thread):
    """Samples this process's resident memory every `interval` seconds."""

    def __init__(self, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval, self.samples, self._halt = interval, [], threading.Event()
        self._process = psutil.Process()

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append((time.perf_counter(), self._process.memory_info().rss / 2**30))
            self._halt.wait(self.interval)

    def stop(self) -> list[tuple[float, float]]:
        self._halt.set()
        self.join()
        return self.samples


def run_benchmark(cfg: PipelineConfig, *, seconds: float = 60.0, warmup_frames: int = 200,
                  batch_transform=None, collator=None, batch_size: int = 32) -> BenchResult:
    """Stream frames for `seconds` after the first; with `batch_transform`/`collator`, time each stage too."""
    registry = load_registry(*cfg.registry_dirs)
    plan = plan_mixture(cfg, registry)
    sampler = _RSSSampler()
    sampler.start()
    start = time.perf_counter()
    iterator = numpy_frames(build_frame_dataset(cfg, plan))
    next(iterator)
    first = time.perf_counter() - start
    for _ in itertools.islice(iterator, warmup_frames):
        pass
    stages = {"tf.data": 0.0, "batch transform": 0.0, "collate": 0.0}
    count, batch, begin = 0, [], time.perf_counter()
    while time.perf_counter() - begin < seconds:
        tick = time.perf_counter()
        frame = next(iterator)
        stages["tf.data"] += time.perf_counter() - tick
        count += 1
        if batch_transform is not None:
            tick = time.perf_counter()
            batch.append(batch_transform(frame))
            stages["batch transform"] += time.perf_counter() - tick
            if collator is not None and len(batch) == batch_size:
                tick = time.perf_counter()
                collator(batch)
                stages["collate"] += time.perf_counter() - tick
                batch = []
    elapsed = time.perf_counter() - begin
    samples = sampler.stop()
    times, rss = np.array([s[0] for s in samples]), np.array([s[1] for s in samples])
    late = times >= times[0] + (times[-1] - times[0]) / 2
    slope = float(np.polyfit(times[late] / 60.0, rss[late], 1)[0]) if late.sum() > 2 else 0.0
    return BenchResult(first, count / elapsed, count, float(rss.max()), slope,
                       {k: v for k, v in stages.items() if v > 0})


class FrameSource:
    """`build_frame_dataset`'s frames with the prefetcher's source protocol (`frames`, `state_dict`; no resume)."""

    def __init__(self, cfg: PipelineConfig, plan: Any) -> None:
        self.cfg, self.plan, self.frames_yielded = cfg, plan, 0

    def frames(self):
        for frame in numpy_frames(build_frame_dataset(self.cfg, self.plan)):
            self.frames_yielded += 1
            yield frame

    def state_dict(self) -> dict[str, int]:
        return {"frames_yielded": self.frames_yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.frames_yielded = state["frames_yielded"]


@dataclass
class FullPathResult:
    frames_per_cpu_second: float
    frames_per_second: float
    cpu_cores_used: float  # process CPU seconds per wall second
    time_to_first_batch_s: float
    frames: int


def run_full_path(cfg: PipelineConfig, batch_transform, collator, *, batch_size: int = 32, depth: int = 2,
                  device: str = "cpu", seconds: float = 60.0, warmup_batches: int = 8) -> FullPathResult:
    """Stream padded torch batches (`BatchPrefetcher`, `depth` 0 = on this thread) for `seconds` after a warm-up;
    a batch counts once delivered (collated, pinned on CUDA; uint8 pixels are not normalized here: the device
    does that). Process CPU time covers every thread. `batch_transform=None`: the decoded frames alone."""
    registry = load_registry(*cfg.registry_dirs)
    source = FrameSource(cfg, plan_mixture(cfg, registry))
    if batch_transform is None:  # tf.data alone, measured the same way: "batches" of raw frames
        stream = _RawBatches(source.frames(), batch_size)
    else:
        stream = BatchPrefetcher(source, batch_transform, collator, batch_size, depth=depth, device=device)
    start = time.perf_counter()
    try:
        next(stream)
        first = time.perf_counter() - start
        for _ in range(warmup_batches):
            next(stream)
        count, begin, cpu_begin = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - begin < seconds:
            count += len(next(stream)["input_ids"])
        elapsed, cpu = time.perf_counter() - begin, time.process_time() - cpu_begin
    finally:
        stream.close()
    return FullPathResult(count / cpu, count / elapsed, cpu / elapsed, first, count)


class _RawBatches:
    """Raw decoded frames in lists of `batch_size`, with the close() of a BatchPrefetcher."""

    def __init__(self, frames, batch_size: int) -> None:
        self.frames, self.batch_size = frames, batch_size

    def __next__(self) -> dict[str, list]:
        return {"input_ids": [next(self.frames) for _ in range(self.batch_size)]}

    def close(self) -> None:
        self.frames.close()
