"""Torch side of the pipeline: frames -> (pixel_values, input_ids, labels) and an IterableDataset with a position.

`RLDSBatchTransform` builds the prompt "What action should the robot take to {instruction}?" with the model's
prompt builder, tokenizes the action of window step 0 with the ActionTokenizer, supervises only the action ids and
the stop token, and applies the vision backbone's image transform. `RLDSDataset` streams one rank's frames and
exposes `state_dict()` / `load_state_dict()` (frames consumed, the shuffle stream's state, seed, rank, world size)
for an exact resume whose cost is bounded by the shuffle buffer, not the position (`stream_resume.py`).
"""

from dataclasses import dataclass, replace
from typing import Any

import torch
from PIL import Image
from torch.utils.data import IterableDataset
from transformers import PreTrainedTokenizerBase

from vla_train.data.frame_rows import numpy_frames
from vla_train.data.interleave import (
    MixturePlan,
    PipelineConfig,
    build_resumable_frames,
    find_corrupt_files,
    plan_mixture,
)
from vla_train.data.stream_resume import ResumableShuffle
from vla_train.data.tf_setup import tf
from vla_train.models.action_tokenizer import ActionTokenizer
from vla_train.models.prompts import PromptBuilder
from vla_train.models.vla_prompt import vla_training_ids

STATE_VERSION = 2  # 2: the shuffle stream's state (exact resume at a bounded cost)


@dataclass
class RLDSBatchTransform:
    action_tokenizer: ActionTokenizer
    base_tokenizer: PreTrainedTokenizerBase
    image_transform: Any  # PIL image -> tensor or dict of tensors (an ImageTransform for uint8_pixels)
    prompt_builder_fn: type[PromptBuilder]
    predict_stop_token: bool = True
    # True: pixel_values are channels-last `[S, S, 3]` uint8 after the geometry (`image_transform.to_uint8`),
    # normalized on the training device after the copy (`image_transform.normalize_on_device`); False: float32
    # `[3, S, S]`, normalized here.
    uint8_pixels: bool = False

    def __post_init__(self) -> None:
        if self.uint8_pixels and not hasattr(self.image_transform, "to_uint8"):
            raise TypeError(f"uint8_pixels needs an image transform with to_uint8 (an ImageTransform), got "
                            f"{type(self.image_transform).__name__}.")

    def __call__(self, frame: dict[str, Any]) -> dict[str, Any]:
        action = frame["action"][0]
        image = frame["observation"]["image_primary"][0]  # [H, W, 3] uint8
        instruction = frame["task"]["language_instruction"].decode()
        input_ids, labels = vla_training_ids(self.prompt_builder_fn, self.base_tokenizer, instruction,
                                             self.action_tokenizer.encode_to_ids(action), self.predict_stop_token)
        if self.uint8_pixels:
            pixels = self.image_transform.to_uint8(image)
        else:
            pixels = self.image_transform(Image.fromarray(image))
        return {
            "pixel_values": pixels,
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "dataset_name": frame["dataset_name"],
        }


class RLDSDataset(IterableDataset):
    """One rank's infinite (train) or single-pass (eval) stream of batch-transformed frames.

    Statistics are resolved at construction: call on every rank (the others poll for the main process's statistics
    cache file; no collective).
    """

    def __init__(self, cfg: PipelineConfig, batch_transform: RLDSBatchTransform | None = None, *,
                 is_main_process: bool = True, plan: MixturePlan | None = None) -> None:
        super().__init__()
        self.cfg, self.batch_transform = cfg, batch_transform
        self.plan = plan or plan_mixture(cfg, is_main_process=is_main_process)
        self.frames_yielded = 0
        self._resume: dict[str, Any] | None = None  # a saved stream state (exact) or {"frames_yielded": n} (reseed)
        self._shuffle: ResumableShuffle | None = None

    @property
    def dataset_statistics(self) -> dict[str, dict[str, Any]]:
        """`{dataset: statistics}` with action masks, the content of `dataset_statistics.json`."""
        return self.plan.statistics

    def __len__(self) -> int:
        """Frames per "epoch": the reference's balanced-mixture length."""
        return self.plan.dataset_length

    def frames(self):
        """Raw decoded frames (numpy dicts) from the current position."""
        start = int(self._resume["frames_yielded"]) if self._resume else 0
        if self.cfg.deterministic:  # exact: restore the stream state (bounded cost, see stream_resume.py)
            dataset, self._shuffle = build_resumable_frames(self.cfg, self.plan,
                                                            resume=self._resume["stream"] if self._resume else None)
        else:  # unordered parallelism cannot be replayed: a fresh, differently seeded stream
            dataset, self._shuffle = build_resumable_frames(self.cfg, self.plan, reseed=start)
        self.frames_yielded = start
        iterator = numpy_frames(dataset)
        while True:
            try:
                frame = next(iterator)
            except StopIteration:
                return
            except tf.errors.OpError as error:  # the shuffle's Python crossing reports data loss as UnknownError
                if "DataLossError" not in f"{type(error).__name__} {error.message}":
                    raise
                corrupt = [path for directory in self.plan.dataset_dirs for path in find_corrupt_files(directory)]
                raise ValueError(f"Corrupt dataset file(s) {corrupt or '(not found by a rescan)'}: "
                                 f"{error.message.splitlines()[0]}. Re-download or regenerate them.") from error
            self.frames_yielded += 1
            yield frame

    def __iter__(self):
        for frame in self.frames():
            yield frame if self.batch_transform is None else self.batch_transform(frame)

    def state_dict(self) -> dict[str, Any]:
        """The position after the frames yielded so far: frames consumed and, for a deterministic stream, the
        shuffle's state (`ResumableShuffle.state_at`: no frame content). Thread-safe against the stream."""
        stream = None
        if self.cfg.deterministic:
            if self._shuffle is not None:
                stream = self._shuffle.state_at(self.frames_yielded)
            elif self._resume is not None:
                stream = self._resume["stream"]
        return {"version": STATE_VERSION, "frames_yielded": self.frames_yielded, "seed": self.cfg.seed,
                "rank": self.cfg.rank, "world_size": self.cfg.world_size, "data_mix": self.cfg.data_mix,
                "deterministic": self.cfg.deterministic, "stream": stream}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved position; refuses a changed world size, rank, seed, mixture or ordering."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"Unsupported data-pipeline state version {state.get('version')!r} (this version reads "
                             f"{STATE_VERSION}); resume with the version that saved it.")
        for key in ("world_size", "rank", "seed", "data_mix", "deterministic"):
            if state[key] != getattr(self.cfg, key):
                raise ValueError(f"Cannot resume the data stream: saved {key}={state[key]!r}, now "
                                 f"{getattr(self.cfg, key)!r}. Resume with the same {key}.")
        self._resume = state
        self.frames_yielded = int(state["frames_yielded"])

    def with_config(self, **changes: Any) -> "RLDSDataset":
        """A dataset over the same plan with changed streaming options (e.g. train=False for evaluation)."""
        return RLDSDataset(replace(self.cfg, **changes), self.batch_transform, plan=self.plan)
