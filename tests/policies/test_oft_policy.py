"""The `oft` policy: its model build, data checks, loss weighting (accumulation over uneven chunk ends equals one big
batch), camera layout and costs."""

import numpy as np
import pytest
import torch

from tests.conftest import batch_pixels, build_tiny
from vla_train.config.policy import OFTPolicyConfig
from vla_train.data.collator import PaddedCollatorForActionPrediction
from vla_train.models.oft.model import OFTVLM
from vla_train.models.vla_prompt import vla_training_ids
from vla_train.policies.chunk_policy import camera_list
from vla_train.policies.oft import OFTPolicy

H, A, Q = 3, 7, 5
MODEL_ID = "tiny-dinosiglip+tiny-llama"
INSTRUCTIONS = ("pick up the cup", "open the top drawer of the cabinet", "wave", "stack the red block on the blue one")


def _policy(**options) -> OFTPolicy:
    options = {"chunk_length": H, "action_dim": A, "proprio_dim": Q, "cameras": ["primary", "wrist"], **options}
    return OFTPolicyConfig(**options).build()


def _items(model: OFTVLM, rgb_image) -> list[dict]:
    """Four samples with two cameras, proprio, and chunks that end early by 0, 1, 2 and 0 steps."""
    tokenizer, rng = model.llm_backbone.get_tokenizer(), np.random.default_rng(0)
    pixels = batch_pixels(model, rgb_image)
    cameras = {k: torch.stack([v[0], v[0].flip(-1)]) for k, v in pixels.items()}  # [C=2, 3, S, S] per key
    items = []
    for index, instruction in enumerate(INSTRUCTIONS):
        actions = rng.uniform(-1, 1, size=(H, A)).astype(np.float32)
        ids, labels = vla_training_ids(model.llm_backbone.prompt_builder_fn, tokenizer, instruction,
                                       model.action_tokenizer.encode_to_ids(actions).reshape(-1))
        mask = torch.arange(H) < H - index % 3
        items.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": cameras,
                      "actions": torch.from_numpy(actions), "action_mask": mask,
                      "proprio": torch.from_numpy(rng.uniform(-1, 1, Q).astype(np.float32))})
    return items


@pytest.fixture(scope="module")
def model() -> OFTVLM:
    torch.manual_seed(0)
    return _policy().config.build_model(build_tiny(MODEL_ID, vla=True))


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_build_model_wraps_the_vlm_with_the_configured_heads():
    vlm = build_tiny(MODEL_ID, vla=True)
    model = OFTPolicyConfig(head="diffusion", chunk_length=H, action_dim=A, proprio_dim=0, film=True).build_model(vlm)
    assert isinstance(model, OFTVLM) and model.vision_backbone is vlm.vision_backbone and model.has_film
    assert (model.head_type, model.chunk_length, model.action_dim, model.proprio_projector) == ("diffusion", H, A, None)
    assert model.all_module_keys[3:] == ["action_head", "noisy_action_projector"]


def test_accumulated_uneven_micro_batches_equal_one_big_batch(model, rgb_image):
    """Each micro-batch's loss is its summed L1 / the global count of valid elements: the accumulated gradient is
    the big batch's mean-L1 gradient, whatever the chunk ends and paddings."""
    policy, items = _policy(), _items(model, rgb_image)
    collate = PaddedCollatorForActionPrediction(512, model.llm_backbone.get_tokenizer().pad_token_id)
    model.zero_grad()
    big = collate(items)
    policy.forward(model, big, normalizer=None).loss.backward()
    expected = _grads(model)
    model.zero_grad()
    micro = [collate(items[:1]), collate(items[1:])]
    total = sum(policy.loss_weight(batch) for batch in micro)
    assert total == float(sum(int(item["action_mask"].sum()) for item in items) * A)
    for batch in micro:
        policy.forward(model, batch, normalizer=total).loss.backward()
    got = _grads(model)
    assert len(got) == len(expected) > 0
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_loss_weight_checks_the_action_slots_on_the_cpu(model, rgb_image):
    items = _items(model, rgb_image)
    collate = PaddedCollatorForActionPrediction(512, model.llm_backbone.get_tokenizer().pad_token_id)
    batch = collate(items[:2])
    batch["labels"][1, :] = -100
    with pytest.raises(ValueError, match=f"at least {H * A} action positions"):
        _policy().loss_weight(batch)


def test_camera_list_splits_the_camera_axis():
    pixels = torch.arange(2 * 3 * 4).reshape(2, 3, 4)
    assert [c.tolist() for c in camera_list(pixels)] == [pixels[:, i].tolist() for i in range(3)]
    fused = camera_list({"dino": pixels, "siglip": pixels + 1})
    assert len(fused) == 3 and torch.equal(fused[2]["siglip"], pixels[:, 2] + 1)


def test_pipeline_overrides_and_data_checks_name_the_option():
    policy = _policy()
    assert policy.pipeline_overrides() == {"window_size": 1, "future_action_window_size": H - 1,
                                           "camera_views": ("primary", "wrist"), "load_proprio": True,
                                           "continuous_actions": True}
    stats = {"demo": {"action": _stats(A), "proprio": _stats(Q)}}
    policy.check_data(stats)
    assert policy.mean_actions["demo"].tolist() == [0.0] * A  # normalized: the middle of [-1, 1]
    with pytest.raises(ValueError, match=r"action dimension 6, but --vla.policy.action_dim = 7.*action_dim 6"):
        policy.check_data({"demo": {"action": {"mean": [0.0] * 6}, "proprio": {"mean": [0.0] * Q}}})
    with pytest.raises(ValueError, match=r"proprio dimension 9, but --vla.policy.proprio_dim = 5"):
        policy.check_data({"demo": {"action": {"mean": [0.0] * A}, "proprio": {"mean": [0.0] * 9}}})
    _policy(proprio_dim=0).check_data({"demo": {"action": _stats(A), "proprio": _stats(9)}})


def _stats(dim: int) -> dict:
    return {"mean": [0.0] * dim, "q01": [-1.0] * dim, "q99": [1.0] * dim, "min": [-2.0] * dim, "max": [2.0] * dim}


@pytest.mark.parametrize(("option", "value", "message"), [
    ("head", "mse", "not an OFT head"), ("chunk_length", 0, "chunk_length = 0"),
    ("cameras", ["primary", "secondary", "wrist", "primary"], "1 to 3 camera roles"),
    ("proprio_dim", -1, "proprio_dim = -1")])
def test_bad_options_are_refused_by_name(option, value, message):
    with pytest.raises(ValueError, match=message):
        OFTPolicyConfig(**{option: value}).validate()


def test_token_counts_include_every_camera_and_the_extra_tokens(model, rgb_image):
    collate = PaddedCollatorForActionPrediction(512, model.llm_backbone.get_tokenizer().pad_token_id)
    batch = collate(_items(model, rgb_image)[:2])
    counts = _policy().token_counts(model, batch)
    text = int(batch["attention_mask"].sum())
    assert counts.samples == 2 and counts.supervised == 2 * H * A
    assert int(counts.positions) == text + 2 * (2 * model.num_patches + 1)  # + the proprio token
    diffusion = _policy(head="diffusion").config.build_model(build_tiny(MODEL_ID, vla=True))
    assert diffusion.num_extra_prefix_tokens == 2  # proprio and timestep tokens
    assert int(_policy(head="diffusion").token_counts(diffusion, batch).positions) == \
        text + 2 * (2 * model.num_patches + 2)
