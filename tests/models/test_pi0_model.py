"""The π0 network (`vla_train/models/pi0/model.py`, `Pi0VLM` on the PaliGemma base from the registry): the
flow-matching loss over valid steps and unpadded dims reaching every tower, KV-cached sampling equal to uncached,
absent cameras and padding masked out, the seeded new modules reproducible from `added_state`, the full-size
architecture's parameter count against the figure computed from its sizes, and clear errors for wrong bases."""

import pytest
import torch

from vla_train.config.model import get_model_config
from vla_train.config.pi0 import pi0_lora
from vla_train.config.policy import Pi0PolicyConfig
from vla_train.models.build import build_vlm
from vla_train.models.freezing import freeze_backbones
from vla_train.models.lora import apply_lora, merge_lora_state
from vla_train.models.pi0.model import PADDED_DIM, Pi0VLM

B, C, T, H, A, Q = 2, 2, 5, 6, 7, 8


def tiny_pi0(seed: int = 0) -> Pi0VLM:
    """The tiny PaliGemma base (seeded by `seed`) with a tiny expert, chunk 6, 7-D actions, 8-D state."""
    vlm = build_vlm(get_model_config("tiny-pi0-paligemma"), init_seed=seed)
    policy = Pi0PolicyConfig(chunk_length=H, action_dim=A, proprio_dim=Q, expert="tiny")
    return policy.build_model(vlm).eval()


def pi0_inputs(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    attention_mask = torch.tensor([[True] * T, [True] * (T - 2) + [False] * 2])
    return {"pixel_values": torch.rand(B, C, 3, 64, 64, generator=generator) * 2 - 1,
            "image_mask": torch.tensor([[True, True], [True, False]]),  # row 1 has no wrist camera
            "input_ids": torch.randint(0, 512, (B, T), generator=generator) * attention_mask,
            "attention_mask": attention_mask, "proprio": torch.randn(B, Q, generator=generator)}


def test_the_loss_is_the_masked_mse_and_reaches_every_tower():
    model = tiny_pi0().train()
    mask = torch.ones(B, H, dtype=torch.bool)
    mask[1, -2:] = False
    output = model(**pi0_inputs(), actions=torch.randn(B, H, A), action_mask=mask,
                   generator=torch.Generator().manual_seed(1))
    assert output.count.item() == (2 * H - 2) * A and torch.isfinite(output.loss)
    assert output.predicted_actions.shape == (B, H, A)
    torch.testing.assert_close(output.loss, output.loss_sum / output.count)
    output.loss.backward()
    layer = model.llm_backbone.llm.model.layers[0]
    for module in (model.vision_backbone, model.projector, layer.self_attn, layer.expert, model.state_proj,
                   model.action_time_mlp_in, model.action_out_proj, model.expert_norm):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), type(module)


def test_exactly_the_declared_unused_parameters_get_no_gradient():
    model = tiny_pi0().train()
    model(**pi0_inputs(), actions=torch.randn(B, H, A), generator=torch.Generator().manual_seed(1)).loss.backward()
    unused = {id(p) for p in model.unused_parameters()}
    names = {name: p for name, p in model.named_parameters()}
    assert {name for name, p in names.items() if p.grad is None} == {n for n, p in names.items() if id(p) in unused}
    assert "llm_backbone.llm.model.layers.1.mlp.up_proj.weight" in {n for n, p in names.items() if id(p) in unused}
    assert "llm_backbone.llm.model.layers.1.self_attn.k_proj.weight" not in {n for n, p in names.items()
                                                                            if id(p) in unused}


def test_kv_cached_sampling_equals_the_uncached_computation():
    model, inputs = tiny_pi0(), pi0_inputs()
    cached = model.sample_actions(**inputs, generator=torch.Generator().manual_seed(2), num_steps=4)
    uncached = model.sample_actions(**inputs, generator=torch.Generator().manual_seed(2), num_steps=4,
                                    use_cache=False)
    assert cached.shape == (B, H, A)
    torch.testing.assert_close(cached, uncached, rtol=1e-5, atol=1e-5)


def test_an_absent_camera_and_padding_tokens_do_not_reach_the_chunk():
    model, inputs = tiny_pi0(), pi0_inputs()
    expected = model.sample_actions(**inputs, generator=torch.Generator().manual_seed(3), num_steps=2)
    inputs["pixel_values"][1, 1] = torch.rand_like(inputs["pixel_values"][1, 1])  # row 1's masked camera
    inputs["input_ids"][1, -2:] = 7  # row 1's padding tokens
    got = model.sample_actions(**inputs, generator=torch.Generator().manual_seed(3), num_steps=2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    inputs["pixel_values"][0, 1] = torch.rand_like(inputs["pixel_values"][0, 1])  # a real camera does matter
    assert not torch.allclose(model.sample_actions(**inputs, generator=torch.Generator().manual_seed(3),
                                                   num_steps=2)[0], expected[0])


def test_the_new_modules_are_seeded_and_added_state_rebuilds_them():
    model, again = tiny_pi0(), tiny_pi0()
    added = model.added_state()
    assert {"state_proj.weight", "expert_norm.weight", "llm_backbone.llm.model.layers.1.expert.mlp.up_proj.weight"} \
        <= set(added)
    state = model.state_dict()
    assert all(torch.equal(added[key], state[key]) and torch.equal(again.state_dict()[key], state[key])
               for key in added)
    assert "llm_backbone.llm.model.layers.0.self_attn.q_proj.weight" not in added  # the base VLM's own key
    trainable = {id(p) for p in model.always_trainable()}
    assert id(model.state_proj.weight) in trainable and id(model.expert_norm.weight) in trainable
    assert id(model.llm_backbone.llm.model.layers[1].expert.mlp.up_proj.weight) not in trainable  # the LLM's stage


def test_a_base_that_is_not_gemma_or_too_wide_actions_are_refused():
    with pytest.raises(ValueError, match="π0 runs a Gemma VLM .* 'llama' model"):
        Pi0PolicyConfig(expert="tiny").build_model(build_vlm(get_model_config("tiny-siglip+tiny-llama")))
    with pytest.raises(ValueError, match="action_dim=33 is larger"):
        Pi0PolicyConfig(expert="tiny", action_dim=33).build_model(build_vlm(get_model_config("tiny-pi0-paligemma")))
    with pytest.raises(ValueError, match="π0 reads at most 32"):
        tiny_pi0()(**pi0_inputs(), actions=torch.randn(B, H, PADDED_DIM + 1))


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
        model = Pi0PolicyConfig().build_model(build_vlm(get_model_config("pi0-paligemma-224px")))
    count = sum(p.numel() for p in model.parameters())
    assert count == _expected_parameters()
    assert 3.2e9 < count < 3.4e9  # "about 3.3 B"
    assert model.num_patches == 256 and model.expert_config.hidden_size == 1024
    layer = model.llm_backbone.llm.model.layers[17]
    assert layer.mlp.gate_proj.weight.shape == (16384, 2048) and layer.expert.mlp.gate_proj.weight.shape == (4096, 1024)
    assert layer.self_attn.k_proj.weight.shape == (256, 2048) and layer.expert.self_attn.q_proj.weight.shape == (2048,
                                                                                                                 1024)


def test_openpis_lora_variants_adapt_both_experts_with_their_ranks_and_merge_exactly():
    model = tiny_pi0()
    names = apply_lora(model, pi0_lora())
    freeze_backbones(model, "vla-full-train")
    layer = model.llm_backbone.llm.model.layers[0]
    assert layer.self_attn.q_proj.lora_A["default"].weight.shape == (16, 48)  # PaliGemma's Gemma: r=16
    assert layer.expert.self_attn.q_proj.lora_A["default"].weight.shape == (32, 32)  # the action expert: r=32
    assert names and all(name.startswith("llm_backbone.") for name in names)  # SigLIP and projector: no adapters
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {name for name, _ in model.named_parameters() if name.startswith(("vision_backbone.", "projector."))} \
        <= trainable  # trained in full beside the adapters, as openpi's LoRA recipe
    assert "llm_backbone.llm.model.layers.0.expert.mlp.up_proj.base_layer.weight" not in trainable
    assert "llm_backbone.llm.model.layers.0.self_attn.q_proj.base_layer.weight" not in trainable
    assert {"state_proj.weight", "llm_backbone.llm.model.layers.0.expert.mlp.up_proj.lora_B.default.weight"} \
        <= trainable
    added = model.added_state()  # std 1 / r per adapter, with the adapter's own rank
    expert_keys = {key for key in model.state_dict() if ".expert." in key}
    assert expert_keys <= set(added) <= set(model.state_dict())  # the expert's base weights under `base_layer` keys
    vlm_a = added["llm_backbone.llm.model.layers.0.mlp.up_proj.lora_A.default.weight"]
    expert_a = added["llm_backbone.llm.model.layers.0.expert.mlp.up_proj.lora_A.default.weight"]
    assert abs(vlm_a.std().item() - 1 / 16) < 0.01 and abs(expert_a.std().item() - 1 / 32) < 0.005
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
    merged = tiny_pi0(seed=5)
    merged.load_state_dict(merge_lora_state(model.state_dict(), model.lora.scaling), strict=True)
    inputs = pi0_inputs()
    expected = model.eval().sample_actions(**inputs, generator=torch.Generator().manual_seed(4), num_steps=2)
    got = merged.sample_actions(**inputs, generator=torch.Generator().manual_seed(4), num_steps=2)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_the_time_embedding_keeps_fp32_times_under_bf16_weights():
    """A bf16 t would move the 4e-3-period features by radians: the bf16 suffix must stay close to the FP32 one."""
    model = tiny_pi0()
    state, x_t = torch.randn(B, PADDED_DIM), torch.randn(B, H, PADDED_DIM)
    t = torch.tensor([0.9, 0.7])
    reference = model.embed_suffix(state, x_t, t)[0]
    model.to(torch.bfloat16)
    got = model.embed_suffix(state, x_t, t)[0].float()
    assert (got - reference).norm() / reference.norm() < 0.02
