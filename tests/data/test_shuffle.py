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
