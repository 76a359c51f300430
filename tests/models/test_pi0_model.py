"""The π0 network (`vla_train/models/pi0/model.py`): the flow-matching loss over valid steps and unpadded dims,
KV-cached sampling equal to uncached, absent cameras masked out, and the full-size architecture's parameter count
against the figure computed from its sizes."""

import torch

from vla_train.models.pi0.model import PADDED_DIM, Pi0Model, pi0_architecture

B, C, T = 2, 2, 5


def _inputs(model: Pi0Model, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    size = model.architecture.vision.image_size
    token_mask = torch.tensor([[True] * T, [True] * (T - 2) + [False] * 2])
    return {"images": torch.rand(B, C, 3, size, size, generator=generator) * 2 - 1,
            "image_masks": torch.tensor([[True, True], [True, False]]),  # row 1 has no wrist camera
            "tokens": torch.randint(0, model.architecture.vlm.vocab_size, (B, T), generator=generator) * token_mask,
            "token_mask": token_mask, "state": torch.randn(B, PADDED_DIM, generator=generator)}


def _model() -> Pi0Model:
    torch.manual_seed(0)
    return Pi0Model(pi0_architecture("tiny")).eval()


def test_the_loss_is_the_masked_mse_and_reaches_every_tower():
    model = _model()
    actions = torch.randn(B, model.chunk_length, PADDED_DIM)
    mask = torch.ones(B, model.chunk_length, dtype=torch.bool)
    mask[1, -2:] = False
    total, count = model(**_inputs(model), actions=actions, action_mask=mask, action_dim=7,
                         generator=torch.Generator().manual_seed(1))
    assert count.item() == (2 * model.chunk_length - 2) * 7 and torch.isfinite(total)
    total.backward()
    for module in (model.vision_tower, model.multi_modal_projector, model.joint.vlm.layers[0], model.joint.expert,
                   model.state_proj, model.action_time_mlp_in, model.action_out_proj):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), type(module)


def test_kv_cached_sampling_equals_the_uncached_computation():
    model, inputs = _model(), _inputs(_model())
    cached = model.sample_actions(**inputs, generator=torch.Generator().manual_seed(2), num_steps=4)
    uncached = model.sample_actions(**inputs, generator=torch.Generator().manual_seed(2), num_steps=4,
                                    use_cache=False)
    assert cached.shape == (B, model.chunk_length, PADDED_DIM)
    torch.testing.assert_close(cached, uncached, rtol=1e-5, atol=1e-5)


def test_an_absent_camera_and_padding_tokens_do_not_reach_the_chunk():
    model = _model()
    inputs = _inputs(model)
    expected = model.sample_actions(**inputs, generator=torch.Generator().manual_seed(3), num_steps=2)
    inputs["images"][1, 1] = torch.rand_like(inputs["images"][1, 1])  # row 1's masked camera
    inputs["tokens"][1, -2:] = 7  # row 1's padding tokens
    got = model.sample_actions(**inputs, generator=torch.Generator().manual_seed(3), num_steps=2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    inputs["images"][0, 1] = torch.rand_like(inputs["images"][0, 1])  # a real camera does matter
    assert not torch.allclose(model.sample_actions(**inputs, generator=torch.Generator().manual_seed(3),
                                                   num_steps=2)[0], expected[0])


def _expected_parameters() -> int:
    """π0's parameters from its published sizes: SigLIP So400m/14 at 224 px, the projector, Gemma 2B (embeddings,
    no separate head: tied), Gemma 300M (no embeddings) and the five suffix projections."""
    v, v_mlp, v_layers, patches = 1152, 4304, 27, (224 // 14) ** 2
    siglip = (3 * 14 * 14 * v + v) + patches * v + v_layers * (4 * v + 4 * (v * v + v) + v * v_mlp + v_mlp
                                                                + v_mlp * v + v) + 2 * v
    projector = v * 2048 + 2048

    def gemma(width: int, mlp: int, heads: int = 8, kv: int = 1, head_dim: int = 256, depth: int = 18) -> int:
        attention = width * heads * head_dim * 2 + width * kv * head_dim * 2
        return depth * (attention + 3 * width * mlp + 2 * width) + width

    e = 1024
    heads = 2 * (PADDED_DIM * e + e) + (2 * e * e + e) + (e * e + e) + (e * PADDED_DIM + PADDED_DIM)
    return siglip + projector + 257152 * 2048 + gemma(2048, 16384) + gemma(1024, 4096) + heads


def test_the_full_size_model_builds_on_the_meta_device_with_the_expected_parameter_count():
    with torch.device("meta"):
        model = Pi0Model(pi0_architecture("full"))
    count = sum(p.numel() for p in model.parameters())
    assert count == _expected_parameters()
    assert 3.2e9 < count < 3.4e9  # "about 3.3 B"
    assert model.joint.expert.embed_tokens is None
