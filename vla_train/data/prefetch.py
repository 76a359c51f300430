"""Background batch prefetch: the GPU never waits for the batch transform.

`BatchPrefetcher` turns a frame stream (an `RLDSDataset`: `frames()`, `state_dict()`, `load_state_dict()`) into
collated batches of `batch_size` frames. With `depth > 0` a daemon thread runs the batch transform and the collator
ahead of the trainer into a queue of at most `depth` batches; `depth == 0` does the same work on the training thread
(the reference's behaviour). A thread, not a process: with uint8 pixels the work is ~0.4 ms of CPU per frame, partly
under the GIL (prompt glue), which is little beside a training step; the pixel path runs no torch op (PIL and numpy),
so torch's intra-op thread pool is never involved. On CUDA the collator allocates pinned host memory and, when a
batch is delivered, the next one's host-to-device copy is issued on a side stream (`stage_ahead`); the delivered
batch's `DEVICE_INPUTS` entry hands its device tensors to the current stream, uint8 pixels normalized there
(`normalize`, e.g. `ImageTransform.normalize_on_device`).

Exact resume: the producer reads a copy of the dataset; each batch carries the copy's `state_dict()` taken after its
last frame, and on delivery that state becomes the position of the prefetcher AND of the original dataset, so
`state_dict()` of either is the position of the frames the trainer consumed, never of those produced ahead.
Errors raised in the producer are re-raised in the training thread (the same exception object, its traceback
starting in the producer); `close()` (also at interpreter exit and on garbage collection) stops the thread.
"""

import copy
import itertools
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch

from vla_train.log import logger

DEVICE_INPUTS = "device_inputs"  # the batch key of its StagedInputs (popped by the trainer's `device_inputs`)
_POLL_S = 0.1  # how often a blocked producer / consumer looks at the stop flag / the producer's liveness
_JOIN_S = 10.0  # how long close() waits for the producer to notice the stop flag

Normalizer = Callable[[Any], Any]  # uint8 pixels (tensor or dict) on the device -> float32


@dataclass
class _Item:
    """One produced batch with the dataset state after its last frame, or the producer's error, or the end."""

    batch: dict[str, Any] | None = None
    state: dict[str, Any] | None = None
    error: BaseException | None = None


_END = _Item()


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """A collated batch's model inputs: its tensors and dicts of tensors (metadata lists, e.g. dataset names, stay
    behind)."""
    return {key: value for key, value in batch.items() if isinstance(value, torch.Tensor) or (
        isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()))}


class StagedInputs:
    """A collated batch's model inputs (its tensors and dicts of tensors; metadata lists stay behind) copied to
    `device`: on CUDA non-blocking on `stream` (an event marks the end of the copies), else plainly. Tensors shared
    between keys are copied once."""

    def __init__(self, batch: dict[str, Any], device: torch.device, normalize: Normalizer | None,
                 stream: "torch.cuda.Stream | None") -> None:
        self.normalize, self.stream, self.device = normalize, stream, device
        self.event: torch.cuda.Event | None = None
        copies: dict[int, torch.Tensor] = {}

        def move(tensor: torch.Tensor) -> torch.Tensor:  # the collator shares one tensor object between keys
            if id(tensor) not in copies:
                copies[id(tensor)] = tensor.to(device, non_blocking=True)
            return copies[id(tensor)]

        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            self.inputs = {key: {k: move(v) for k, v in value.items()} if isinstance(value, dict) else move(value)
                           for key, value in model_inputs(batch).items()}
            if stream is not None:
                self.event = torch.cuda.Event()
                self.event.record(stream)
        self._tensors = list(copies.values())

    def take(self) -> dict[str, Any]:
        """The inputs for the current stream (which waits for the copies; no host sync), pixels as float32."""
        if self.event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.event)
            for tensor in self._tensors:  # allocated on the side stream, used on this one
                tensor.record_stream(current)
        inputs, pixels = dict(self.inputs), self.inputs["pixel_values"]
        is_uint8 = any(v.dtype == torch.uint8 for v in (pixels.values() if isinstance(pixels, dict) else [pixels]))
        if is_uint8:
            if self.normalize is None:
                raise ValueError("uint8 pixel_values need a normalizer (ImageTransform.normalize_on_device).")
            inputs["pixel_values"] = self.normalize(pixels)
        return inputs


class BatchPrefetcher:
    """Iterator of collated batches (see the module docstring); each carries `DEVICE_INPUTS` (its `StagedInputs`).

    `collate_fn` is `collator` as given (unpinned), for other loaders over the same data (e.g. evaluation).
    `stage_ahead` (default: on CUDA, with `depth > 0`): when a batch is delivered, the copy of the next one, if
    already produced, is issued at once.
    """

    def __init__(self, dataset: Any, batch_transform: Callable[[dict[str, Any]], dict[str, Any]],
                 collator: Callable[[list[dict[str, Any]]], dict[str, Any]], batch_size: int, *, depth: int = 2,
                 device: torch.device | str = "cpu", normalize: Normalizer | None = None,
                 stage_ahead: bool | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0 (0 = synchronous), got {depth}.")
        self.dataset, self.batch_transform, self.collate_fn = dataset, batch_transform, collator
        self.batch_size, self.depth, self.device = batch_size, depth, torch.device(device)
        self.normalize = normalize
        is_cuda = self.device.type == "cuda"
        self._collate = replace(collator, pin_memory=True) if is_cuda and hasattr(collator, "pin_memory") \
            else collator
        self._stream = torch.cuda.Stream(self.device) if is_cuda else None
        self.stage_ahead = is_cuda if stage_ahead is None else stage_ahead
        self._state: dict[str, Any] | None = None
        self._reset()

    def _reset(self) -> None:
        self._started, self._finished = False, False
        self._staged: tuple[dict[str, Any], dict[str, Any]] | None = None  # (batch, state) copied ahead
        self._pending: _Item | None = None  # the end or an error met while looking ahead
        self._sync: Iterator[_Item] | None = None
        self._queue: queue.Queue[_Item] | None = None
        self._thread: threading.Thread | None = None
        self._stop: threading.Event | None = None
        self._finalizer: weakref.finalize | None = None

    # === Producer side ===

    def _start(self) -> None:
        self._state = self.dataset.state_dict()
        items = _produce(copy.copy(self.dataset), self.batch_transform, self._collate, self.batch_size)
        self._started = True
        if self.depth == 0:
            self._sync = items
            return
        self._queue, self._stop = queue.Queue(maxsize=self.depth), threading.Event()
        self._thread = threading.Thread(target=_run_producer, args=(items, self._queue, self._stop, self.device),
                                        name="vla-batch-prefetch", daemon=True)
        self._finalizer = weakref.finalize(self, _shutdown, self._stop, self._thread)
        self._thread.start()

    # === Consumer side (the training thread) ===

    def _next_item(self, block: bool = True) -> _Item | None:
        if self._sync is not None:
            return next(self._sync, _END)
        assert self._queue is not None and self._thread is not None
        while True:
            try:
                return self._queue.get(timeout=_POLL_S) if block else self._queue.get_nowait()
            except queue.Empty:
                if not block:
                    return None
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("The batch prefetch thread ended without a result.") from None

    def _stage(self, item: _Item) -> tuple[dict[str, Any], dict[str, Any]]:
        assert item.batch is not None and item.state is not None
        item.batch[DEVICE_INPUTS] = StagedInputs(item.batch, self.device, self.normalize, self._stream)
        return item.batch, item.state

    def __iter__(self) -> "BatchPrefetcher":
        return self

    def __next__(self) -> dict[str, Any]:
        if self._finished:
            raise StopIteration
        if not self._started:
            self._start()
        if self._staged is None:
            item, self._pending = self._pending or self._next_item(), None
            if item is _END or item.error is not None:
                self.close()
                self._finished = True
                if item.error is not None:
                    raise item.error
                raise StopIteration
            self._staged = self._stage(item)
        batch, state = self._staged
        self._staged = None
        if self.stage_ahead and self._sync is None:  # copy the next batch while this one computes
            ahead = self._next_item(block=False)
            if ahead is not None and ahead is not _END and ahead.error is None:
                self._staged = self._stage(ahead)
            else:
                self._pending = ahead  # the end or an error: reported at the next call, after this batch
        self._state = state
        self.dataset.load_state_dict(state)  # the original dataset reports the consumed position too
        return batch

    # === Position and lifetime ===

    def state_dict(self) -> dict[str, Any]:
        """The data position after the last delivered batch (before any: the dataset's own)."""
        return dict(self._state) if self._state is not None else self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at `state`: stops any producer and discards what it produced ahead."""
        self.close()
        self.dataset.load_state_dict(state)
        self._state = None

    def close(self) -> None:
        """Stop the producer thread and drop the batches produced ahead (idempotent). Iterating again restarts
        the producer at the consumed position."""
        if self._finalizer is not None:
            self._finalizer()
        if self._sync is not None:
            self._sync.close()
        self._reset()


def _produce(source: Any, transform: Callable, collate: Callable, batch_size: int) -> Iterator[_Item]:
    """Batches from `source` (the dataset copy), each with `source.state_dict()` after its last frame. A function,
    not a method: the producer thread holds no reference to the prefetcher (which can then be collected)."""
    frames = source.frames()
    try:
        while True:
            chunk = list(itertools.islice(frames, batch_size))
            if not chunk:
                return
            batch = collate([transform(frame) for frame in chunk])
            yield _Item(batch, source.state_dict())
            if len(chunk) < batch_size:
                return
    finally:
        frames.close()


def _run_producer(items: Iterator[_Item], out: queue.Queue, stop: threading.Event, device: torch.device) -> None:
    """The thread body: put every item, then the end marker (or the error); give up when `stop` is set."""
    if device.type == "cuda":
        torch.cuda.set_device(device)  # pinned allocations and streams of this thread use the training device
    try:
        for item in items:
            if not _put(out, stop, item):
                return
        _put(out, stop, _END)
    except BaseException as error:  # re-raised in the training thread
        _put(out, stop, _Item(error=error))
    finally:
        items.close()  # type: ignore[attr-defined]  # closes the frame generator in its own thread


def _put(out: queue.Queue, stop: threading.Event, item: _Item) -> bool:
    while not stop.is_set():
        try:
            out.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _shutdown(stop: threading.Event, thread: threading.Thread) -> None:
    stop.set()
    if thread.is_alive() and thread is not threading.current_thread():
        thread.join(_JOIN_S)
        if thread.is_alive():
            logger.warning("The batch prefetch thread did not stop within %.0f s (left as a daemon).", _JOIN_S)
