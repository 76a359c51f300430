import itertools

import numpy as np
import pytest

from vla_train.data.shuffle import ProgressiveShuffleBuffer


def test_is_a_seeded_permutation_of_a_finite_source():
    shuffle = ProgressiveShuffleBuffer(capacity=50, seed=3, min_fill=10)
    out = list(shuffle(range(500)))
    assert sorted(out) == list(range(500)) and out != list(range(500))
    assert out == list(ProgressiveShuffleBuffer(capacity=50, seed=3, min_fill=10)(range(500)))
    assert out != list(ProgressiveShuffleBuffer(capacity=50, seed=4, min_fill=10)(range(500)))


def test_yields_once_min_fill_is_reached():
    consumed = []

    def source():
        for i in itertools.count():
            consumed.append(i)
            yield i

    shuffle = ProgressiveShuffleBuffer(capacity=100_000, seed=0, min_fill=100)
    first = next(iter(shuffle(source())))
    assert len(consumed) == 100 and 0 <= first < 100  # not 100,000 reads before the first frame


def test_buffer_never_exceeds_capacity_and_mixes_at_steady_state():
    shuffle = ProgressiveShuffleBuffer(capacity=1000, seed=1, min_fill=100)
    out = np.array(list(itertools.islice(shuffle(itertools.count()), 20_000)))
    steady = out[5000:]
    positions = np.arange(5000, 20_000)
    # each yielded item was read at most (capacity + fill backlog) items before it is yielded
    lag = positions * 1 - steady
    assert lag.min() >= -2000 and np.abs(lag).mean() > 100  # far from the input order
    assert len(set(out.tolist())) == len(out)


@pytest.mark.parametrize("kwargs", [{"capacity": 0, "seed": 0}, {"capacity": 5, "seed": 0, "fill_ratio": 0}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        ProgressiveShuffleBuffer(**kwargs)


def _items(n: int) -> list[bytes]:
    return [f"frame-{i}".encode() * (1 + i % 3) for i in range(n)]


@pytest.mark.parametrize("cut", [0, 7, 150, 999, 4321])
def test_snapshot_restore_continues_exactly(cut):
    source = _items(6000)
    straight = ProgressiveShuffleBuffer(capacity=300, seed=5, min_fill=20)
    outputs = []
    for item in source[:cut]:
        outputs.extend(straight.push(item))
    snapshot = straight.snapshot()
    rest = [out for item in source[cut:] for out in straight.push(item)]

    restored = ProgressiveShuffleBuffer(capacity=300, seed=5, min_fill=20)
    restored.restore(snapshot, {int(a): source[int(a)] for a in snapshot.arrivals})
    assert (restored.received, restored.emitted) == (cut, len(outputs))
    assert [out for item in source[cut:] for out in restored.push(item)] == rest


def test_no_frame_waits_longer_than_max_age():
    buffer = ProgressiveShuffleBuffer(capacity=100, seed=2, min_fill=10)  # max_age: 3 x capacity
    waited = []
    for i in range(20_000):
        for out in buffer.push(i.to_bytes(4, "little")):
            waited.append(buffer.received - 1 - int.from_bytes(out, "little"))
    assert max(waited) == 300
    assert 0.03 < sum(w == 300 for w in waited) / len(waited) < 0.08  # about e^-3 of the frames are forced out


def test_restore_refuses_different_items():
    buffer = ProgressiveShuffleBuffer(capacity=50, seed=1, min_fill=5)
    source = _items(200)
    for item in source:
        buffer.push(item)
    snapshot = buffer.snapshot()
    changed = {int(a): source[int(a)] + b"!" for a in snapshot.arrivals}
    with pytest.raises(ValueError, match="differ from those saved"):
        ProgressiveShuffleBuffer(capacity=50, seed=1, min_fill=5).restore(snapshot, changed)
    with pytest.raises(ValueError, match="were not re-read"):
        ProgressiveShuffleBuffer(capacity=50, seed=1, min_fill=5).restore(snapshot, {})


def test_max_age_below_capacity_is_refused():
    with pytest.raises(ValueError, match="max_age"):
        ProgressiveShuffleBuffer(capacity=10, seed=0, max_age=5)
