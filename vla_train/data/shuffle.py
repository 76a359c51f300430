"""A seeded frame shuffle buffer that starts yielding before it is full, bounds how long a frame waits, and can be
snapshotted and restored for exact resume.

TensorFlow's `shuffle(n)` yields nothing until its buffer holds `n` elements: with the reference's 256,000-frame
buffer that is ~1 minute of reading before the first batch (shared/reference/performance.md). This buffer yields its
first frame once it holds `min_fill` frames and keeps growing to `capacity` while it yields: during the fill it takes
`fill_ratio` new frames per frame it gives out, then it works like a classic shuffle buffer (each new frame replaces
a uniformly chosen buffered one, which is yielded). A frame that has waited `max_age` arrivals is yielded next instead
of a random one (default 3 x capacity: about 5 % of frames at steady state, e^-3): this bounds how far back a resume
must re-read (`stream_resume.py`) without changing the mixing of the other 95 %.

It is a pure function of its input order and seed. `snapshot()` records its state as arrival indices (the position
of each buffered item in the input stream) plus the RNG state; `restore()` rebuilds it from a snapshot and the
re-read items, so the state of a multi-gigabyte buffer is a few megabytes. Frames are buffered with their images still
encoded.
"""

import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_MAX_AGE_FACTOR = 3


@dataclass(frozen=True)
class ShuffleSnapshot:
    """The buffer after `received` inputs and `emitted` outputs: `arrivals[i]` is the input index of slot i."""

    received: int
    emitted: int
    rng_state: dict[str, Any]
    arrivals: np.ndarray  # [len(buffer)] int64, slot order
    fingerprint: int  # crc32 of the buffered items' sizes, in slot order: catches a stream that changed

    def oldest_arrival(self) -> int:
        """The earliest input index a restore must re-read (`received` when the buffer is empty)."""
        return int(self.arrivals.min()) if len(self.arrivals) else self.received


def _fingerprint(items: Iterable[Any], size_of: Callable[[Any], int]) -> int:
    return zlib.crc32(np.asarray([size_of(item) for item in items], dtype=np.int64).tobytes())


class ProgressiveShuffleBuffer:
    """Iterate a source in a seeded random order drawn from a buffer of at most `capacity` items.

    Use `buffer(source)` for a whole stream, or `push(item)` / `drain()` step by step (what resumable streams do).
    Snapshots fingerprint the items by `size_of(item)` (default `len`; frames: their encoded size).
    """

    def __init__(self, capacity: int, seed: int, min_fill: int = 1000, fill_ratio: int = 2,
                 max_age: int | None = None, size_of: Callable[[Any], int] = len) -> None:
        if capacity < 1:
            raise ValueError(f"Shuffle buffer capacity must be positive, got {capacity}.")
        if fill_ratio < 1:
            raise ValueError(f"fill_ratio must be >= 1, got {fill_ratio}.")
        max_age = DEFAULT_MAX_AGE_FACTOR * capacity if max_age is None else max_age
        if max_age < capacity:
            raise ValueError(f"max_age ({max_age} arrivals) must be >= capacity ({capacity}).")
        self.capacity, self.seed, self.max_age, self.size_of = capacity, seed, max_age, size_of
        self.min_fill, self.fill_ratio = min(min_fill, capacity), fill_ratio
        self._rng = np.random.default_rng(seed)
        self._items: list[Any] = []
        self._arrivals: list[int] = []
        self._slot_of: dict[int, int] = {}  # arrival -> slot
        self._order: deque[int] = deque()  # arrivals in insertion (= increasing) order; stale ones skipped lazily
        self.received = self.emitted = 0

    def __call__(self, source: Iterable[Any]) -> Iterator[Any]:
        for item in source:
            yield from self.push(item)
        yield from self.drain()

    def push(self, item: Any) -> list[Any]:
        """Take one input; returns the zero or one items it releases."""
        arrival = self.received
        self.received += 1
        if len(self._items) < self.capacity:
            self._insert(arrival, item)
            if len(self._items) >= self.min_fill and self.received % self.fill_ratio == 0:
                return [self._take(self._choose())]
            return []
        slot = self._choose()
        released = self._items[slot]
        del self._slot_of[self._arrivals[slot]]
        self._items[slot], self._arrivals[slot] = item, arrival
        self._slot_of[arrival] = slot
        self._order.append(arrival)
        self.emitted += 1
        return [released]

    def drain(self) -> Iterator[Any]:
        """A finite source ended (evaluation): yield what is buffered, in random order."""
        while self._items:
            yield self._take(self._choose())

    def _choose(self) -> int:
        """The slot of a frame that waited `max_age` arrivals, else a uniformly random slot."""
        while self._order and self._order[0] not in self._slot_of:
            self._order.popleft()
        if self._order and self.received - self._order[0] > self.max_age:
            return self._slot_of[self._order[0]]
        return int(self._rng.integers(len(self._items)))

    def _insert(self, arrival: int, item: Any) -> None:
        self._slot_of[arrival] = len(self._items)
        self._items.append(item)
        self._arrivals.append(arrival)
        self._order.append(arrival)

    def _take(self, slot: int) -> Any:
        """Remove and return the item in `slot` (the last slot moves into it)."""
        last = len(self._items) - 1
        for values in (self._items, self._arrivals):
            values[slot], values[last] = values[last], values[slot]
        self._slot_of[self._arrivals[slot]] = slot
        del self._slot_of[self._arrivals[last]]
        self._arrivals.pop()
        self.emitted += 1
        return self._items.pop()

    # ----------------------------------------------------------------------------------------- snapshot / restore
    def snapshot(self) -> ShuffleSnapshot:
        return ShuffleSnapshot(self.received, self.emitted, self._rng.bit_generator.state,
                               np.asarray(self._arrivals, dtype=np.int64), _fingerprint(self._items, self.size_of))

    def restore(self, snapshot: ShuffleSnapshot, items: Mapping[int, Any]) -> None:
        """Set this (fresh) buffer to `snapshot`, with `items[arrival]` the re-read input of every buffered arrival.

        Raises ValueError when an item is missing or the re-read items differ from those snapshotted (the data files
        changed, or the input stream is not deterministic).
        """
        missing = [int(a) for a in snapshot.arrivals if int(a) not in items]
        if missing:
            raise ValueError(f"Cannot restore the shuffle buffer: {len(missing)} buffered frame(s) were not re-read "
                             f"(first arrival indices {missing[:5]}).")
        restored = [items[int(a)] for a in snapshot.arrivals]
        if _fingerprint(restored, self.size_of) != snapshot.fingerprint:
            raise ValueError("Cannot resume the data stream exactly: the frames re-read for the shuffle buffer differ "
                             "from those saved (the dataset files changed since the checkpoint, or the stream is not "
                             "deterministic). Fix: resume with the same data, or start a new run.")
        self._items, self._arrivals = restored, [int(a) for a in snapshot.arrivals]
        self._slot_of = {arrival: slot for slot, arrival in enumerate(self._arrivals)}
        self._order = deque(sorted(self._arrivals))
        self._rng = np.random.default_rng()
        self._rng.bit_generator.state = snapshot.rng_state
        self.received, self.emitted = snapshot.received, snapshot.emitted
