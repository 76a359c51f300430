"""BatchPrefetcher: the same batches in the same order as synchronous iteration, the consumed (not produced) data
position for exact resume, producer errors re-raised in the training thread, a bounded queue, no leaked thread."""

import gc
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tests.conftest import build_tiny
from tests.data.test_torch_side import _batch_transform
from vla_train.config.policy import OpenVLAPolicyConfig
from vla_train.data.collator import PaddedCollatorForActionPrediction
from vla_train.data.interleave import PipelineConfig, plan_mixture
from vla_train.data.prefetch import DEVICE_INPUTS, BatchPrefetcher
from vla_train.data.torch_dataset import RLDSDataset
from vla_train.training.trainer import device_inputs

POLICY = OpenVLAPolicyConfig().build()  # the `openvla` policy's inputs

THREAD_NAME = "vla-batch-prefetch"


class _Counter:
    """Frames `{"i": n}` from the position (forever, or up to `length`), with RLDSDataset's state protocol; `pulled`
    (shared by copies) counts the frames read."""

    def __init__(self, length: int | None = None, check=None) -> None:
        self.position, self.length, self.pulled, self.check = 0, length, [0], check

    def frames(self):
        while self.length is None or self.position < self.length:
            self.position += 1
            self.pulled[0] += 1
            if self.check is not None:
                self.check(self.pulled[0])
            yield {"i": self.position - 1}

    def state_dict(self) -> dict:
        return {"frames_yielded": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["frames_yielded"]


def _item(frame: dict) -> dict:
    i = frame["i"]
    return {"input_ids": torch.tensor([1, i]), "labels": torch.tensor([-100, i]),
            "pixel_values": torch.full((3, 2, 2), i % 256, dtype=torch.uint8), "dataset_name": b"counter"}


def _prefetcher(dataset, depth: int, transform=_item, batch_size: int = 4, stage_ahead: bool = False
                ) -> BatchPrefetcher:
    return BatchPrefetcher(dataset, transform, PaddedCollatorForActionPrediction(8, 0), batch_size, depth=depth,
                           normalize=lambda pixels: pixels.to(torch.float32), stage_ahead=stage_ahead)


def _ids(batches) -> list[list[int]]:
    return [batch["input_ids"][:, 1].tolist() for batch in batches]


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME and t.is_alive()]


@pytest.mark.parametrize("stage_ahead", [False, True])
@pytest.mark.parametrize("depth", [1, 3])
def test_batches_come_in_the_synchronous_order_with_the_last_partial_batch(depth, stage_ahead):
    sync = list(_prefetcher(_Counter(length=23), depth=0))
    ahead = list(_prefetcher(_Counter(length=23), depth=depth, stage_ahead=stage_ahead))
    expected = [list(range(start, min(start + 4, 23))) for start in range(0, 23, 4)]
    assert _ids(sync) == _ids(ahead) == expected
    inputs = device_inputs(POLICY, ahead[1], torch.device("cpu"))
    assert DEVICE_INPUTS not in ahead[1] and inputs["pixel_values"].dtype == torch.float32
    assert inputs["pixel_values"][:, 0, 0, 0].tolist() == [4.0, 5.0, 6.0, 7.0]
    assert not _prefetch_threads()


@pytest.mark.parametrize("stage_ahead", [False, True])
def test_the_state_is_the_consumed_position_and_resumes_the_same_batches(stage_ahead):
    sync, ahead = _prefetcher(_Counter(), depth=0), _prefetcher(_Counter(), depth=3, stage_ahead=stage_ahead)
    assert ahead.state_dict() == {"frames_yielded": 0}
    for k in range(1, 4):
        next(sync), next(ahead)
        assert ahead.state_dict() == sync.state_dict() == ahead.dataset.state_dict() == {"frames_yielded": 4 * k}
    state = ahead.state_dict()
    ahead.close()
    resumed = _prefetcher(_Counter(), depth=2)
    resumed.load_state_dict(state)
    assert _ids([next(resumed) for _ in range(2)]) == _ids([next(sync) for _ in range(2)]) == [
        [12, 13, 14, 15], [16, 17, 18, 19]]
    resumed.close()
    assert not _prefetch_threads()


@pytest.fixture
def rlds_dataset(fixture_root, fixture_registry):
    vlm = build_tiny("tiny-dinosiglip+tiny-llama")
    cfg = PipelineConfig(data_root_dir=fixture_root / "data", data_mix="mix", resize_resolution=(64, 64),
                         shuffle_buffer_size=8, deterministic=True)
    plan = plan_mixture(cfg, fixture_registry)
    tokenizer = vlm.llm_backbone.get_tokenizer()
    collate = PaddedCollatorForActionPrediction(tokenizer.model_max_length, tokenizer.pad_token_id)
    return lambda: RLDSDataset(cfg, _batch_transform(vlm), plan=plan), collate, vlm.vision_backbone


def _training_stream(dataset: RLDSDataset, collate, vision, depth: int) -> BatchPrefetcher:
    return BatchPrefetcher(dataset, replace(dataset.batch_transform, uint8_pixels=True), collate, 3, depth=depth,
                           normalize=vision.get_image_transform().normalize_on_device)


def _same(a, b) -> bool:
    """Deep equality of data states (dicts, lists, numpy arrays, bytes, scalars)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(a, b)
    return a == b


def _assert_same_batch(loaded: dict, prefetched: dict) -> None:
    """A DataLoader batch (float pixels) and a prefetched one (uint8, normalized by `_to_device`): bit-equal."""
    inputs = device_inputs(POLICY, prefetched, torch.device("cpu"))
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(loaded[key], inputs[key])
    assert set(loaded["pixel_values"]) == set(inputs["pixel_values"]) == {"dino", "siglip"}
    for key, pixels in loaded["pixel_values"].items():
        assert inputs["pixel_values"][key].dtype == torch.float32 and torch.equal(pixels, inputs["pixel_values"][key])
    assert loaded["dataset_names"] == prefetched["dataset_names"]


def test_rlds_prefetch_matches_the_dataloader_and_resumes_exactly(rlds_dataset):
    """The real stream: the same batches (bit-equal model inputs) as `DataLoader(num_workers=0)`, the same data
    position after k batches, and a resume from it continues with the same batches."""
    make, collate, vision = rlds_dataset
    reference = make()
    loaded = iter(DataLoader(reference, batch_size=3, collate_fn=collate, num_workers=0))
    dataset = make()
    stream = _training_stream(dataset, collate, vision, depth=2)
    for _ in range(3):
        _assert_same_batch(next(loaded), next(stream))
    assert _same(stream.state_dict(), reference.state_dict()) and _same(dataset.state_dict(), reference.state_dict())
    assert stream.state_dict()["frames_yielded"] == 9
    resumed_dataset = make()
    resumed_dataset.load_state_dict(stream.state_dict())  # as the checkpoint code does, before iterating
    stream.close()
    resumed = _training_stream(resumed_dataset, collate, vision, depth=2)
    for _ in range(2):
        _assert_same_batch(next(loaded), next(resumed))
    assert _same(resumed.state_dict(), reference.state_dict()) and reference.state_dict()["frames_yielded"] == 15
    resumed.close()


@pytest.mark.parametrize("depth", [0, 2])
@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_a_producer_error_is_raised_in_the_consumer_with_its_traceback(depth, error):
    """Also with the next batch staged ahead: the error comes after the batches produced before it."""
    def transform(frame: dict) -> dict:
        if frame["i"] == 5:
            raise error(f"bad frame {frame['i']}")
        return _item(frame)

    stream = _prefetcher(_Counter(), depth=depth, transform=transform, stage_ahead=depth > 0)
    assert _ids([next(stream)]) == [[0, 1, 2, 3]]  # the batch before the error is delivered
    with pytest.raises(error, match="bad frame 5") as caught:
        next(stream)
    assert "transform" in [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)]
    assert stream.state_dict() == {"frames_yielded": 4}
    with pytest.raises(StopIteration):
        next(stream)
    assert not _prefetch_threads()


def test_the_queue_is_bounded_and_close_stops_the_thread():
    depth, batch_size, consumed, violations = 2, 4, [0], []

    def check(pulled: int) -> None:  # runs in the producer: delivered + queued + the one being put, no more
        # `consumed` is counted by this thread after `next` returns, so it may lag the delivered batches by one
        if pulled > (consumed[0] + 1 + depth + 1) * batch_size:
            violations.append(pulled)

    source = _Counter(check=check)
    stream = _prefetcher(source, depth=depth, batch_size=batch_size)
    try:
        for _ in range(6):
            next(stream)
            consumed[0] += 1
        bound = (consumed[0] + depth + 1) * batch_size
        deadline = time.monotonic() + 60
        while source.pulled[0] < bound and time.monotonic() < deadline:  # wait for the producer to fill the queue
            time.sleep(0.01)
        time.sleep(0.2)  # a producer that ignored the bound would pull more now
        assert source.pulled[0] == bound and not violations
        assert len(_prefetch_threads()) == 1
    finally:
        stream.close()  # a failed assertion must not leave the thread to the next test
    assert not _prefetch_threads()
    assert _ids([next(stream)]) == [[24, 25, 26, 27]]  # iterating again restarts at the consumed position
    stream.close()


def test_an_abandoned_prefetcher_is_collected_and_its_thread_stopped():
    stream = _prefetcher(_Counter(), depth=2)
    next(stream)
    assert len(_prefetch_threads()) == 1
    del stream
    gc.collect()
    assert not _prefetch_threads()


def test_the_process_exits_with_a_running_prefetcher():
    code = ("import torch\nfrom tests.data.test_prefetch import _Counter, _prefetcher\n"
            "stream = _prefetcher(_Counter(), depth=2)\nnext(stream)\nprint('ok', flush=True)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="depth must be >= 0"):
        _prefetcher(_Counter(), depth=-1)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        _prefetcher(_Counter(), depth=1, batch_size=0)
    with pytest.raises(ValueError, match="need device normalization"):
        device_inputs(POLICY, {**next(_prefetcher(_Counter(), depth=0)), DEVICE_INPUTS: None}, torch.device("cpu"))
