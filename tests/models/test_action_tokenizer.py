import numpy as np
import pytest

from vla_train.models.action_tokenizer import ActionTokenizer
from vla_train.models.tokenizers import build_tiny_tokenizer


class _Llama2Sized:
    """Stands in for the Llama-2 tokenizer where only `vocab_size` matters."""

    vocab_size = 32000


def reference_encode(action: np.ndarray, vocab_size: int) -> np.ndarray:
    # facts §5, written independently: clip, digitize over linspace(-1, 1, 256), id = vocab_size - bin
    bins = np.linspace(-1, 1, 256)
    return vocab_size - np.digitize(np.clip(action, -1, 1), bins)


def reference_decode(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    bins = np.linspace(-1, 1, 256)
    centers = (bins[:-1] + bins[1:]) / 2
    return centers[np.clip(vocab_size - ids - 1, 0, 254)]


def test_llama2_constants_and_edge_bins():
    tok = ActionTokenizer(_Llama2Sized())
    assert tok.action_token_begin_idx == 31743
    assert tok.vocab_size == 256
    assert list(tok.encode_to_ids([-1.0, 1.0, 0.0])) == [31999, 31744, 31872]
    assert list(tok.action_token_ids) == list(range(31744, 32000))
    decoded = tok.decode_token_ids_to_actions(np.array([31999, 31744, 31745, 31872]))
    assert decoded[0] == pytest.approx(-0.996078431372549)
    assert decoded[1] == decoded[2] == pytest.approx(0.996078431372549)  # both top ids share the last centre
    assert decoded[3] == 0.0


def test_out_of_range_actions_clip_to_edge_bins():
    tok = ActionTokenizer(_Llama2Sized())
    assert list(tok.encode_to_ids([-7.0, 3.5])) == [31999, 31744]


def test_matches_reference_numerics_on_random_actions():
    rng = np.random.default_rng(1)
    actions = rng.uniform(-1.2, 1.2, size=(64, 7))
    tok = ActionTokenizer(_Llama2Sized())
    ids = tok.encode_to_ids(actions)
    assert ids.shape == (64, 7)
    np.testing.assert_array_equal(ids, reference_encode(actions, 32000))
    np.testing.assert_array_equal(tok.decode_token_ids_to_actions(ids), reference_decode(ids, 32000))
    inside = np.abs(actions) < 1 - 2 / 255
    error = np.abs(tok.decode_token_ids_to_actions(ids) - actions)[inside]
    assert error.max() <= 1 / 255 + 1e-12  # at most half a bin width


def test_string_round_trip_through_project_tokenizer():
    base = build_tiny_tokenizer("llama")
    tok = ActionTokenizer(base)
    actions = np.array([[-1.0, -0.5, 0.0, 0.25, 0.5, 0.99, 1.0], [0.1] * 7])
    strings = tok(actions)
    assert isinstance(strings, list) and len(strings) == 2
    for row, text in zip(actions, strings, strict=True):
        retokenized = base(text, add_special_tokens=False).input_ids
        assert retokenized == tok.encode_to_ids(row).tolist()
    assert isinstance(tok(actions[0]), str)


def test_is_action_token_and_custom_vocab_end():
    tok = ActionTokenizer(build_tiny_tokenizer("qwen"), vocab_end=1000)
    assert tok.action_token_begin_idx == 1000 - 257
    mask = tok.is_action_token(np.array([743, 744, 999, 1000]))
    assert mask.tolist() == [False, True, True, False]


@pytest.mark.parametrize("kwargs", [{"bins": 1}, {"min_action": 1.0, "max_action": -1.0}])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        ActionTokenizer(_Llama2Sized(), **kwargs)
