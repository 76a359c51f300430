"""A seeded frame shuffle buffer that starts yielding before it is full.

TensorFlow's `shuffle(n)` yields nothing until its buffer holds `n` elements: with the reference's 256,000-frame
buffer that is ~1 minute of reading before the first batch (shared/reference/performance.md). This buffer yields its
first frame once it holds `min_fill` frames and keeps growing to `capacity` while it yields: during the fill it takes
`fill_ratio` new frames per frame it gives out, then it works like a classic shuffle buffer (each new frame replaces
a uniformly chosen buffered one, which is yielded). It is a pure function of its input order and seed, so a
deterministic pipeline stays deterministic. Frames are buffered with their images still encoded.
"""

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np


class ProgressiveShuffleBuffer:
    """Iterate `source` in a seeded random order drawn from a buffer of at most `capacity` items."""

    def __init__(self, capacity: int, seed: int, min_fill: int = 1000, fill_ratio: int = 2) -> None:
        if capacity < 1:
            raise ValueError(f"Shuffle buffer capacity must be positive, got {capacity}.")
        if fill_ratio < 1:
            raise ValueError(f"fill_ratio must be >= 1, got {fill_ratio}.")
        self.capacity, self.seed = capacity, seed
        self.min_fill, self.fill_ratio = min(min_fill, capacity), fill_ratio

    def __call__(self, source: Iterable[Any]) -> Iterator[Any]:
        rng = np.random.default_rng(self.seed)
        buffer: list[Any] = []
        received = 0
        for item in source:
            received += 1
            if len(buffer) < self.capacity:
                buffer.append(item)
                if len(buffer) >= self.min_fill and received % self.fill_ratio == 0:
                    yield self._pop(buffer, rng)
                continue
            index = int(rng.integers(len(buffer)))
            buffer[index], item = item, buffer[index]
            yield item
        while buffer:  # a finite source (evaluation): drain in random order
            yield self._pop(buffer, rng)

    @staticmethod
    def _pop(buffer: list[Any], rng: np.random.Generator) -> Any:
        index = int(rng.integers(len(buffer)))
        buffer[index], buffer[-1] = buffer[-1], buffer[index]
        return buffer.pop()
