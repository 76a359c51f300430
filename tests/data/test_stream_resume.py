"""ResumableShuffle: exact continuation from `state_at`, at a re-read cost that does not grow with the position."""


import pytest

from vla_train.data import stream_resume
from vla_train.data.stream_resume import ResumableShuffle
from vla_train.data.tf_setup import tf


def reader() -> tf.data.Dataset:
    """A deterministic, infinite tf.data reader of serialized items in batches of 64 (like the pipeline's crossing),
    with a seeded shuffle and a map: stateful tf.data ops that the iterator checkpoint must capture."""
    def serialize(i: tf.Tensor) -> tf.Tensor:
        return tf.strings.join(["item-", tf.strings.as_string(i), "-", tf.strings.as_string(i % 7)])

    return tf.data.Dataset.range(10**9).shuffle(50, seed=3).map(serialize).batch(64)


def _take(shuffle: ResumableShuffle, n: int) -> tuple[list[bytes], object]:
    iterator = iter(shuffle)
    return [next(iterator) for _ in range(n)], iterator


@pytest.fixture(autouse=True)
def small_interval(monkeypatch):
    monkeypatch.setattr(stream_resume, "MIN_INTERVAL", 64)
    monkeypatch.setattr(stream_resume, "MIN_ANCHOR_INTERVAL", 64)


@pytest.mark.parametrize("position", [0, 5, 300, 2_500])
def test_resume_continues_the_straight_stream_exactly(position):
    straight = ResumableShuffle(reader, capacity=200, seed=11)
    iterator = iter(straight)
    consumed = [next(iterator) for _ in range(position)]
    state = straight.state_at(position)
    expected = [next(iterator) for _ in range(300)]

    resumed = ResumableShuffle(reader, capacity=200, seed=11, resume=state)
    got, _ = _take(resumed, 300)
    assert got == expected
    assert len(set(consumed) & set(got)) == 0  # nothing consumed before the checkpoint comes again
    # and a checkpoint taken after the resume resumes exactly too
    later = resumed.state_at(position + 300)
    again, _ = _take(ResumableShuffle(reader, capacity=200, seed=11, resume=later), 50)
    continued, _ = _take(ResumableShuffle(reader, capacity=200, seed=11), position + 350)
    assert again == continued[position + 300:]


def test_resume_cost_is_bounded_by_the_buffer_not_the_position():
    rereads = {}
    for position in (3_000, 30_000):
        straight = ResumableShuffle(reader, capacity=200, seed=1)
        iterator = iter(straight)
        for _ in range(position):
            next(iterator)
        state = straight.state_at(position)
        resumed = ResumableShuffle(reader, capacity=200, seed=1, resume=state)
        next(iter(resumed))
        rereads[position] = resumed.frames_read
    # re-read <= max_age (3 x 200) + the anchor interval (100) + the snapshot interval (64) + a batch or two of 64
    # read ahead, at both positions
    assert all(count <= 600 + 100 + 64 + 3 * 64 for count in rereads.values()), rereads
    assert rereads[30_000] < 2 * rereads[3_000] + 256


def test_positions_asked_for_must_not_decrease_and_old_snapshots_are_released():
    shuffle = ResumableShuffle(reader, capacity=100, seed=0)
    iterator = iter(shuffle)
    for _ in range(64 * 6):
        next(iterator)
    assert len(shuffle._snapshots) == 7  # outputs 0, 64, ..., 384: nothing asked for yet
    assert shuffle.state_at(10)["snapshot"]["emitted"] == 0
    assert shuffle.state_at(200)["snapshot"]["emitted"] == 192
    assert [s.emitted for s in shuffle._snapshots] == [192, 256, 320, 384]
    with pytest.raises(RuntimeError, match="must not decrease"):
        shuffle.state_at(150)
    fresh = ResumableShuffle(reader, capacity=100, seed=0).state_at(0)  # before the first frame
    assert fresh["position"] == 0 and fresh["anchor_files"] is None and fresh["snapshot"]["received"] == 0


def test_resume_from_a_different_stream_is_refused():
    straight = ResumableShuffle(reader, capacity=100, seed=4)
    iterator = iter(straight)
    for _ in range(500):
        next(iterator)
    state = straight.state_at(500)

    def other_reader() -> tf.data.Dataset:
        return tf.data.Dataset.range(10**9).map(lambda i: tf.strings.as_string(i * 1000)).batch(64)

    with pytest.raises(ValueError, match="differ from those saved"):
        next(iter(ResumableShuffle(other_reader, capacity=100, seed=4, resume={**state, "anchor_files": None,
                                                                              "anchor_arrival": 0})))
