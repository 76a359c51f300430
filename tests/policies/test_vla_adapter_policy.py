"""The `vla-adapter` policy: its samples (the prompt answered by N placeholders, no stop ids), its data check, loss
weight and costs, and its training forward through the model."""

import pytest
import torch

from tests.conftest import build_tiny
from tests.policies.test_chunk_processor import ACTION_DIM, CHUNK, PROPRIO_DIM, _frame
from vla_train.config.policy import VLAAdapterPolicyConfig
from vla_train.data.collator import IGNORE_INDEX
from vla_train.models.vla_adapter.model import VLAAdapterVLM
from vla_train.models.vla_prompt import vla_prompt_prefix_ids

QUERIES = 6


def _config(**options) -> VLAAdapterPolicyConfig:
    return VLAAdapterPolicyConfig(**{"chunk_length": CHUNK, "action_dim": ACTION_DIM, "proprio_dim": PROPRIO_DIM,
                                     "num_action_queries": QUERIES, **options})


@pytest.fixture(scope="module")
def model() -> VLAAdapterVLM:
    torch.manual_seed(0)
    return _config().build_model(build_tiny("tiny-dinosiglip+tiny-qwen25", vla=True))


def test_the_prompt_is_answered_by_the_placeholders_only(model):
    policy = _config().build()
    item = policy.batch_transform(model)(_frame())
    tokenizer = model.llm_backbone.get_tokenizer()
    prefix = vla_prompt_prefix_ids(model.llm_backbone.prompt_builder_fn, tokenizer, "stack the blocks")
    assert item["input_ids"].tolist() == [*prefix, *[model.placeholder_id] * QUERIES]  # no stop ids after them
    assert (item["labels"] != IGNORE_INDEX).nonzero().flatten().tolist() == list(range(len(prefix),
                                                                                       len(prefix) + QUERIES))
    assert item["actions"].shape == (CHUNK, ACTION_DIM) and item["proprio"].shape == (PROPRIO_DIM,)
    batch = policy.collator(model)([item, policy.batch_transform(model)(_frame(1))])
    assert policy.loss_weight(batch) == 2 * 2 * ACTION_DIM  # two valid steps per sample (the frame's mask)
    counts = policy.token_counts(model, batch)
    assert counts.supervised == 2 * QUERIES
    assert int(counts.positions) == int(batch["attention_mask"].sum()) + 2 * 2 * model.num_patches
    output = policy.forward(model.train(), policy.device_inputs(batch, torch.device("cpu")), None)
    assert output.loss.ndim == 0 and float(output.loss_weight) == 2 * 2 * ACTION_DIM
    batch["labels"][0, :] = IGNORE_INDEX
    with pytest.raises(ValueError, match=f"at least {QUERIES} action positions"):
        policy.loss_weight(batch)


def test_mismatched_data_is_rejected_with_the_option_to_change():
    policy = _config().build()
    stats = {"demo": {"action": {"mean": [0.0] * ACTION_DIM, "q01": [-1.0] * ACTION_DIM, "q99": [1.0] * ACTION_DIM},
                      "proprio": {"mean": [0.0] * 3}}}
    with pytest.raises(ValueError, match="--vla.policy.proprio_dim 3"):
        policy.check_data(stats)
