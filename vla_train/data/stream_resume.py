"""Exact resume of a rank's shuffled frame stream at a cost bounded by the shuffle buffer, not the position.

The stream is: a reader (tf.data: read, standardize, normalize, chunk, interleave by weight; frames serialized with
images still encoded, in batches) -> `ProgressiveShuffleBuffer` -> decode/augment. A checkpoint cannot hold the
buffer's frames (256,000 x ~30 KB per rank), and replaying every consumed frame (`skip(n)`) costs time that grows with
the position (hours late in an Open-X run). Instead `ResumableShuffle` keeps, while it streams:
- reader anchors: the tf.data iterator's own checkpoint (file read positions, sampler RNG, in-flight elements;
  `tf.train.Checkpoint` written to TensorFlow's in-memory `ram://` file system) every `anchor_interval` frames read
  (half a buffer, at least 8,192: one costs ~0.2 s of CPU and holds the pipeline's in-flight trajectories, ~35 MB
  on the benchmark workload, ~1 MB on the demo's);
- shuffle snapshots: the buffer as arrival indices plus its RNG state (`ShuffleSnapshot`) every `interval` frames
  given out.
`state_at(n)` pairs the newest snapshot taken at or before output `n` with the newest anchor at or before that
snapshot's oldest buffered frame. A resume restores the reader at the anchor, re-reads frames (images still encoded:
no decoding) up to the snapshot, keeping the buffered ones, restores the buffer, and replays its outputs up to `n`.
The shuffle yields any frame that waited `max_age` (3 x capacity) arrivals, so the re-read is at most about
`max_age + anchor_interval + interval` frames whatever the position. The stream must be ordered deterministically
(tf.data `deterministic=True`): a snapshot's fingerprint catches a re-read that differs.
"""

import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np

from vla_train.data.shuffle import ProgressiveShuffleBuffer, ShuffleSnapshot
from vla_train.data.tf_setup import tf
from vla_train.log import logger

STATE_FORMAT = 1
# Snapshots are kept from the newest one a `state_at` call used (positions only grow) to the newest taken, at most
# SNAPSHOTS_CAP (then the oldest go: the consumer would lag the shuffle by more than SNAPSHOTS_CAP x interval frames).
SNAPSHOTS_CAP = 16
MIN_INTERVAL = 1024  # snapshots (cheap: ~1 ms per 10,000 buffered frames)
MIN_ANCHOR_INTERVAL = 8192  # reader anchors (costly: see the module docstring)


def save_iterator_state(iterator: Any) -> dict[str, bytes]:
    """A tf.data iterator's checkpoint as `{file name: bytes}` (written to and removed from `ram://`)."""
    directory = f"ram://vla-train-stream/{uuid.uuid4().hex}"
    tf.train.Checkpoint(iterator=iterator).write(f"{directory}/state")
    files = {name: tf.io.gfile.GFile(f"{directory}/{name}", "rb").read() for name in tf.io.gfile.listdir(directory)}
    tf.io.gfile.rmtree(directory)
    return files


def restore_iterator_state(iterator: Any, files: dict[str, bytes]) -> None:
    """Restore a fresh iterator of the same tf.data pipeline from `save_iterator_state`'s output."""
    directory = f"ram://vla-train-stream/{uuid.uuid4().hex}"
    tf.io.gfile.makedirs(directory)
    for name, content in files.items():
        with tf.io.gfile.GFile(f"{directory}/{name}", "wb") as handle:
            handle.write(content)
    try:
        tf.train.Checkpoint(iterator=iterator).read(f"{directory}/state").assert_consumed()
    finally:
        tf.io.gfile.rmtree(directory)


@dataclass(frozen=True)
class ReaderAnchor:
    """The reader before frame `arrival`; `files` None means the stream's start (a fresh iterator)."""

    arrival: int
    files: dict[str, bytes] | None


def _numpy_rows(batch: tf.Tensor) -> Iterable[Any]:
    return batch.numpy()


def _parse_state(state: dict[str, Any]) -> tuple[ReaderAnchor, ShuffleSnapshot]:
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"Unsupported stream state format {state.get('format')!r} (this version reads "
                         f"{STATE_FORMAT}).")
    snapshot = ShuffleSnapshot(**{**state["snapshot"], "arrivals": np.asarray(state["snapshot"]["arrivals"])})
    return ReaderAnchor(int(state["anchor_arrival"]), state["anchor_files"]), snapshot


def _interval(capacity: int) -> int:
    return max(MIN_INTERVAL, capacity // 4)


def _anchor_interval(capacity: int) -> int:
    return max(MIN_ANCHOR_INTERVAL, capacity // 2)


class ResumableShuffle:
    """Shuffle the items of `make_reader()` (a tf.data dataset of batches; `rows(batch)` splits one into items,
    `size_of(item)` fingerprints an item) through a `ProgressiveShuffleBuffer`, resumable from `state_at()`'s output.
    Iterate it once. The defaults suit 1-D batches of serialized items.

    Iteration runs on TensorFlow's generator thread while `state_at` is called from the training loop: both hold
    `self._lock` around the anchor and snapshot lists.
    """

    def __init__(self, make_reader: Callable[[], tf.data.Dataset], capacity: int, seed: int,
                 resume: dict[str, Any] | None = None, *, rows: Callable[[Any], Iterable[Any]] = _numpy_rows,
                 size_of: Callable[[Any], int] = len) -> None:
        self.make_reader, self.capacity, self.seed = make_reader, capacity, seed
        self.rows, self.size_of = rows, size_of
        self.interval, self.anchor_interval = _interval(capacity), _anchor_interval(capacity)
        self.resume = resume
        self.frames_read = 0  # from the reader by this instance (a resume's re-read included)
        self._lock = threading.Lock()
        self._anchors: list[ReaderAnchor] = []
        self._snapshots: deque[ShuffleSnapshot] = deque(maxlen=SNAPSHOTS_CAP)
        if resume is None:  # describable before the first frame: the start
            self._start(ReaderAnchor(0, None), self._new_buffer().snapshot())
        else:
            self._start(*_parse_state(resume))

    def __iter__(self) -> Iterator[bytes]:
        reader = iter(self.make_reader())
        buffer = self._new_buffer()
        if self.resume is None:
            items, skip_until = self._read(reader, 0), 0
        else:
            items, skip_until = self._restore(reader, buffer, self.resume)
        for _, item in items:
            for released in buffer.push(item):
                yield from self._give(buffer, released, skip_until)
        for released in buffer.drain():  # finite (evaluation) streams
            if buffer.emitted > skip_until:
                yield released

    def _new_buffer(self) -> ProgressiveShuffleBuffer:
        return ProgressiveShuffleBuffer(self.capacity, self.seed, size_of=self.size_of)

    def _give(self, buffer: ProgressiveShuffleBuffer, released: bytes, skip_until: int) -> Iterator[bytes]:
        """Yield output `buffer.emitted - 1` unless it was consumed before the resume; snapshot every interval."""
        if buffer.emitted % self.interval == 0:
            self._add_snapshot(buffer.snapshot())
        if buffer.emitted > skip_until:
            yield released

    def _read(self, reader: Any, arrival: int) -> Iterator[tuple[int, bytes]]:
        """`(arrival index, serialized frame)` from `reader`, anchored every `anchor_interval` frames (between
        batches)."""
        last_anchor = arrival
        while True:
            if arrival - last_anchor >= self.anchor_interval:
                self._add_anchor(ReaderAnchor(arrival, save_iterator_state(reader)))
                last_anchor = arrival
            try:
                batch = next(reader)
            except StopIteration:
                return
            for item in self.rows(batch):
                self.frames_read += 1
                yield arrival, item
                arrival += 1

    def _restore(self, reader: Any, buffer: ProgressiveShuffleBuffer,
                 state: dict[str, Any]) -> tuple[Iterator[tuple[int, bytes]], int]:
        """Re-read from the saved anchor to the snapshot, restore the buffer; returns the items to continue with and
        the output position to resume at."""
        anchor, snapshot = _parse_state(state)
        if anchor.files is not None:
            restore_iterator_state(reader, anchor.files)
        needed = set(snapshot.arrivals.tolist())
        items = self._read(reader, anchor.arrival)
        kept: dict[int, bytes] = {}
        pending: list[tuple[int, bytes]] = []
        for arrival, item in items:
            if arrival >= snapshot.received:
                pending.append((arrival, item))
                break
            if arrival in needed:
                kept[arrival] = item
        buffer.restore(snapshot, kept)
        self._start(anchor, snapshot)
        logger.info("Resumed the data stream at frame %d: re-read %d frames from the reader anchor at %d, restored "
                    "the shuffle buffer (%d frames)", state["position"], self.frames_read, anchor.arrival,
                    len(snapshot.arrivals))
        return chain(pending, items), int(state["position"])

    def _start(self, anchor: ReaderAnchor, snapshot: ShuffleSnapshot) -> None:
        with self._lock:
            self._anchors, self._snapshots = [anchor], deque([snapshot], maxlen=SNAPSHOTS_CAP)

    def _add_anchor(self, anchor: ReaderAnchor) -> None:
        with self._lock:
            self._anchors.append(anchor)

    def _add_snapshot(self, snapshot: ShuffleSnapshot) -> None:
        with self._lock:
            self._snapshots.append(snapshot)
            self._prune()

    def _prune(self) -> None:
        """Drop the anchors older than the one the oldest kept snapshot needs (call with the lock held)."""
        needed = self._anchor_for(self._snapshots[0])
        self._anchors = [a for a in self._anchors if a.arrival >= needed.arrival]

    def _anchor_for(self, snapshot: ShuffleSnapshot) -> ReaderAnchor:
        oldest = snapshot.oldest_arrival()
        return max((a for a in self._anchors if a.arrival <= oldest), key=lambda a: a.arrival)

    def state_at(self, position: int) -> dict[str, Any]:
        """What a resume at output `position` (frames consumed downstream) needs: a snapshot at or before it, and
        the reader anchor that snapshot's oldest buffered frame needs. No frame content. Positions asked
        for only grow: the snapshots and anchors older than this answer's are released."""
        with self._lock:
            usable = [s for s in self._snapshots if s.emitted <= position]
            if not usable:
                oldest = self._snapshots[0].emitted if self._snapshots else None
                raise RuntimeError(
                    f"The shuffled stream cannot describe position {position}: its oldest kept snapshot is at output "
                    f"{oldest} (positions asked for must not decrease, and the pipeline must not run more than "
                    f"{SNAPSHOTS_CAP * self.interval} frames ahead of the training loop).")
            snapshot = max(usable, key=lambda s: s.emitted)
            while self._snapshots[0].emitted < snapshot.emitted:
                self._snapshots.popleft()
            self._prune()
            anchor = self._anchor_for(snapshot)
        # no copies: snapshots and anchors are never mutated
        snapshot_state = {"received": snapshot.received, "emitted": snapshot.emitted, "rng_state": snapshot.rng_state,
                          "arrivals": snapshot.arrivals, "fingerprint": snapshot.fingerprint}
        return {"format": STATE_FORMAT, "position": position, "anchor_arrival": anchor.arrival,
                "anchor_files": anchor.files, "snapshot": snapshot_state}
