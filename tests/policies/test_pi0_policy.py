"""The `pi0` policy: its prompt (BOS, the cleaned instruction, "\\n", at most 48 tokens), its samples (cameras with
image masks, no token labels), MEAN_STD normalization requested from the pipeline, its loss weight and costs, its
training forward through the model, and its validated options."""

import dataclasses

import pytest
import torch

from tests.policies.test_chunk_processor import ACTION_DIM, CHUNK, PROPRIO_DIM, _frame
from vla_train.config.model import get_model_config
from vla_train.config.policy import Pi0PolicyConfig
from vla_train.data.collator import IGNORE_INDEX
from vla_train.models.build import build_vlm
from vla_train.models.pi0.model import Pi0VLM
from vla_train.models.pi0.prompt import pi0_prompt_ids
from vla_train.models.tokenizers import build_tiny_tokenizer


def _config(**options) -> Pi0PolicyConfig:
    return Pi0PolicyConfig(**{"chunk_length": CHUNK, "action_dim": ACTION_DIM, "proprio_dim": PROPRIO_DIM,
                              "expert": "tiny", **options})


@pytest.fixture(scope="module")
def model() -> Pi0VLM:
    return _config().build_model(build_vlm(get_model_config("tiny-pi0-paligemma"), vla=True))


def test_the_prompt_is_bos_the_cleaned_instruction_and_a_newline():
    tokenizer = build_tiny_tokenizer("gemma")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 1, 0)  # PaliGemma's ids
    ids = pi0_prompt_ids(tokenizer, "  pick_up the\nbowl ")
    newline = tokenizer("\n", add_special_tokens=False).input_ids
    assert ids == [2, *tokenizer("pick up the bowl", add_special_tokens=False).input_ids, *newline]
    assert len(pi0_prompt_ids(tokenizer, "x" * 100, max_token_len=48)) == 48


def test_samples_batches_loss_weight_costs_and_forward(model):
    policy = _config().build()
    assert policy.pipeline_overrides()["normalization"] == "normal"  # MEAN_STD
    transform = policy.batch_transform(model)
    item = transform(_frame())
    tokenizer = model.llm_backbone.get_tokenizer()
    assert item["input_ids"].tolist() == pi0_prompt_ids(tokenizer, "Stack The Blocks")
    assert (item["labels"] == IGNORE_INDEX).all() and item["image_mask"].tolist() == [True, True]
    assert item["pixel_values"].shape == (2, 3, 64, 64) and item["actions"].shape == (CHUNK, ACTION_DIM)
    assert dataclasses.replace(transform, uint8_pixels=True)(_frame())["pixel_values"].dtype == torch.uint8
    batch = policy.collator(model)([item, transform(_frame(1))])
    assert policy.loss_weight(batch) == 2 * 2 * ACTION_DIM  # two valid steps per sample (the frame's mask)
    counts = policy.token_counts(model, batch)
    assert counts.supervised == 2 * CHUNK
    assert int(counts.positions) == int(batch["attention_mask"].sum()) + 2 * (2 * model.num_patches + 1 + CHUNK)
    output = policy.forward(model.train(), policy.device_inputs(batch, torch.device("cpu")), None)
    assert output.loss.ndim == 0 and float(output.loss_weight) == 2 * 2 * ACTION_DIM


@pytest.mark.parametrize(("option", "value", "message"), [
    ("expert", "huge", "--vla.policy.expert 'huge'"),
    ("action_dim", 33, "action_dim = 33: π0 pads actions and state to 32"),
    ("max_token_len", 1, "max_token_len = 1 must be an integer >= 2"),
    ("cameras", [], "must name 1 to 3 camera roles"),
])
def test_bad_options_are_refused_by_name(option, value, message):
    with pytest.raises(ValueError, match=message):
        _config(**{option: value}).validate()
