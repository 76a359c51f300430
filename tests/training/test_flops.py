"""The FLOPs model against hand counts (tiny model, three freezing stages), module shapes, and the 7B scale."""

import pytest
import torch

from tests.conftest import build_tiny
from vla_train.config.model import get_model_config
from vla_train.models.build import build_vlm
from vla_train.models.freezing import freeze_backbones
from vla_train.training import flops as flops_module
from vla_train.training.flops import (
    FlopsModel,
    LlmDims,
    VitDims,
    flops_model_for_vlm,
    peak_bf16_flops,
    resolve_peak_flops,
)

TINY = "tiny-dinosiglip+tiny-llama"


def _tiny_forward_parts() -> dict[str, int]:
    """Forward FLOPs of tiny-dinosiglip+tiny-llama by hand (multiply-add = 2).

    Both featurizers: 64 px images, 8 px patches -> Np = 64 patches, D = 32, MLP hidden H = 64, depth 3, of which
    blocks 0 and 1 are used (the output is block depth - 2 = 1). DINO adds CLS + 4 registers (N = 69), SigLIP none.
    """
    patch_embed = 2 * 64 * (3 * 8 * 8) * 32  # = 786_432
    dino_block = 2 * 69 * (4 * 32 * 32 + 2 * 32 * 64) + 4 * 69 * 69 * 32  # dense 1_130_496 + attention 609_408
    siglip_block = 2 * 64 * (4 * 32 * 32 + 2 * 32 * 64) + 4 * 64 * 64 * 32  # dense 1_048_576 + attention 524_288
    vision = (patch_embed + 2 * dino_block) + (patch_embed + 2 * siglip_block)
    assert vision == 4_266_240 + 3_932_160
    # Fused projector 64 -> 256 -> 64 -> 64 on each of the 64 patches.
    projector = 2 * 64 * (64 * 256 + 256 * 64 + 64 * 64)
    # LLM: d = 64, I = 128, 4 heads x 16 (q = 64), 2 kv heads x 16 (kv = 32), 2 layers, 576 head rows (512 + pad,
    # padded to a multiple of 64). Per token: Q, O (64x64 each), K, V (64x32 each), gate/up/down (64x128 each).
    layer_per_token = 2 * (64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128)
    assert layer_per_token == 73_728
    head_per_token = 2 * 64 * 576
    attention_per_pair = 4 * 64  # QK^T and AV, 2 * S^2 * q each
    return dict(vision=vision, projector=projector, layer=layer_per_token, head=head_per_token,
                attention=attention_per_pair)


def _tiny(stage: str):
    vlm = build_tiny(TINY)
    freeze_backbones(vlm, stage)
    return vlm


def test_tiny_full_training_matches_the_hand_count():
    parts = _tiny_forward_parts()
    model = flops_model_for_vlm(_tiny("vla-full-train"))
    # Everything trains: 3x forward everywhere.
    assert model.num_patches == 64
    assert model.per_sample == 3 * parts["vision"] + 3 * parts["projector"] == 38_750_976
    assert model.per_token == 3 * 2 * parts["layer"] == 442_368
    assert model.per_supervised_token == 3 * parts["head"] == 221_184  # logits only where a label is supervised
    assert model.per_token_pair == 3 * 2 * parts["attention"] == 1_536
    text, supervised = 20, 8  # S = 20 + 64 = 84 positions, 8 of them supervised
    assert model.sample_flops(text, supervised) == 38_750_976 + 442_368 * 84 + 1_536 * 84 ** 2 + 221_184 * 8


def test_frozen_vision_costs_its_forward_only():
    parts = _tiny_forward_parts()
    model = flops_model_for_vlm(_tiny("vla-train"))  # vision frozen; projector and LLM train
    assert model.per_sample == 1 * parts["vision"] + 3 * parts["projector"]
    assert model.per_token == 3 * 2 * parts["layer"] and model.per_supervised_token == 3 * parts["head"]


def test_last_layer_stage_frozen_layers_cost_forward_plus_input_gradient():
    parts = _tiny_forward_parts()
    model = flops_model_for_vlm(_tiny("vla-last-layer-train"))
    # Vision and projector frozen, nothing before them trains: 1x. LLM: embeddings train (input gradients flow), so
    # frozen layer 0 costs 2x, the last layer and the head 3x; attention 3x wherever gradients pass.
    assert model.per_sample == parts["vision"] + parts["projector"]
    assert model.per_token == 2 * parts["layer"] + 3 * parts["layer"]
    assert model.per_supervised_token == 3 * parts["head"]
    assert model.per_token_pair == 3 * 2 * parts["attention"]


def test_batch_flops_is_the_sum_of_sample_flops_on_device_dtype():
    model = FlopsModel(per_sample=1e6, per_token=1e3, per_token_pair=10.0, num_patches=4)
    lengths = torch.tensor([3, 5, 0])
    got = model.batch_flops(lengths)
    assert got.dtype == torch.float64 and got.ndim == 0
    assert got.item() == model.sample_flops(3) + model.sample_flops(5) + model.sample_flops(0)
    assert model.sample_flops(3) == 1e6 + 1e3 * 7 + 10 * 49
    with_head = FlopsModel(per_sample=1e6, per_token=1e3, per_token_pair=10.0, num_patches=4, per_supervised_token=5.0)
    assert with_head.batch_flops(lengths, torch.tensor(6)).item() == got.item() + 5.0 * 6
    assert with_head.sample_flops(3, 2) == model.sample_flops(3) + 10.0


@pytest.mark.parametrize("model_id", [TINY, "tiny-dinosiglip+tiny-qwen25", "prism-dinosiglip-224px+7b",
                                      "prism-qwen25-extra-dinosiglip-224px+0_5b"])
def test_dims_match_the_modules_linear_shapes(model_id):
    """The config-derived per-token / per-block dense FLOPs equal 2 x the Linear weights of the built modules."""
    with torch.device("meta"):
        vlm = build_vlm(get_model_config(model_id))
    llm = vlm.llm_backbone.llm
    dims = LlmDims.of(llm.config, vocab_rows=llm.get_output_embeddings().weight.shape[0])
    layer_weights = sum(i * o for i, o in flops_module.linear_shapes(llm.model.layers[0]))
    assert dims.layer_dense_per_token() == 2 * layer_weights
    for vit in vlm.vision_backbone.featurizers:
        vit_dims = VitDims.of(vit)
        tokens = vit_dims.num_patches + vit_dims.prefix_tokens
        block_weights = sum(i * o for i, o in flops_module.linear_shapes(vit.blocks[0]))
        assert vit_dims.block_dense_flops() == 2 * tokens * block_weights
        assert vit_dims.patch_embed_flops() == 2 * vit_dims.num_patches * vit.patch_embed.proj.weight.numel()


def _params(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def test_7b_openvla_is_6_n_tokens_plus_attention():
    """prism-dinosiglip-224px+7b (meta device), full training, a sample of 30 text tokens (S = 286 positions).

    Reference: 6 x (parameters) x (tokens each part sees) + the attention terms (12 x layers x width x tokens^2),
    parameters counted from the built modules (so biases, norms, position and prefix embeddings are in; patch
    embedding weights are counted per patch). Within 0.1 % (what the matmul-only count leaves out); and within 5 % of
    the crude 6 x N_total x S (which also counts the embedding table, the unused last ViT block and SigLIP's pooling
    head, and no attention).
    """
    with torch.device("meta"):
        vlm = build_vlm(get_model_config("prism-dinosiglip-224px+7b"))
    freeze_backbones(vlm, "vla-full-train")
    model = flops_model_for_vlm(vlm)
    text, positions = 30, 30 + 256
    llm = vlm.llm_backbone.llm
    supervised = 8  # the output head runs at the supervised positions only
    llm_ref = (6 * _params(llm.model.layers) * positions + 6 * _params(llm.lm_head) * supervised
               + 12 * 32 * 4096 * positions ** 2)
    vision_ref = 0
    for vit in vlm.vision_backbone.featurizers:
        used = len(vit.blocks) - 1
        tokens = 256 + vit.num_prefix_tokens
        vision_ref += 6 * _params(*vit.blocks[:used]) * tokens + 12 * used * vit.embed_dim * tokens ** 2
        vision_ref += 6 * _params(vit.patch_embed) * 256
    reference = llm_ref + vision_ref + 6 * _params(vlm.projector) * 256
    got = model.sample_flops(text, supervised)
    assert got == pytest.approx(reference, rel=1e-3)
    assert got == pytest.approx(6 * _params(vlm) * positions, rel=0.05)
    assert 1.2e13 < got < 1.4e13  # ~13 TFLOPs per OpenVLA training sample


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA GH200 480GB", 989e12), ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_table_by_device_name(monkeypatch, name, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_bf16_flops("cuda:0") == expected
    assert peak_bf16_flops(0) == expected


def test_peak_is_none_on_cpu_and_override_wins():
    assert peak_bf16_flops("cpu") is None
    assert resolve_peak_flops("cpu") is None
    assert resolve_peak_flops("cpu", 100.0) == 100e12
    for bad in (0.0, -5.0, float("nan")):
        with pytest.raises(ValueError, match="peak_device_tflops"):
            resolve_peak_flops("cpu", bad)


def test_unknown_llm_family_is_a_clear_error():
    class _Config:
        model_type = "gpt2"

    with pytest.raises(ValueError, match="gpt2.*GATED_MLP_FAMILIES"):
        LlmDims.of(_Config())
