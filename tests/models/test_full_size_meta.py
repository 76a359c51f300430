"""Full-size architectures build on the meta device (no memory) with the parameter counts of the published models."""

import torch

from vla_train.config.model import get_model_config
from vla_train.models.build import build_vlm
from vla_train.models.freezing import count_parameters, freeze_backbones


def vit_block(dim: int, mlp_hidden: int, layer_scale: bool) -> int:
    norms = 2 * (2 * dim)
    attention = (3 * dim * dim + 3 * dim) + (dim * dim + dim)
    mlp = (dim * mlp_hidden + mlp_hidden) + (mlp_hidden * dim + dim)
    return norms + attention + mlp + (2 * dim if layer_scale else 0)


def patch_embed(dim: int, patch: int) -> int:
    return 3 * patch * patch * dim + dim


def dinov2_vit_l_reg4_224() -> int:
    dim, patches = 1024, (224 // 14) ** 2
    tokens = dim + 4 * dim + patches * dim  # CLS, 4 registers, position embedding over patches only
    return patch_embed(dim, 14) + tokens + 24 * vit_block(dim, 4096, layer_scale=True) + 2 * dim


def siglip_attention_pool(dim: int = 1152, hidden: int = 4304) -> int:
    return dim + (dim * dim + dim) + (2 * dim * dim + 2 * dim) + (dim * dim + dim) + 2 * dim + (
        dim * hidden + hidden + hidden * dim + dim)


def siglip_so400m_224() -> int:
    dim, hidden, patches = 1152, 4304, (224 // 14) ** 2
    attention_pool = siglip_attention_pool(dim, hidden)
    return patch_embed(dim, 14) + patches * dim + 27 * vit_block(dim, hidden, False) + 2 * dim + attention_pool


def fused_gelu_mlp(vision_dim: int, llm_dim: int) -> int:
    hidden = 4 * vision_dim
    return (vision_dim * hidden + hidden) + (hidden * llm_dim + llm_dim) + (llm_dim * llm_dim + llm_dim)


def llama2_7b(vocab_rows: int) -> int:
    dim, hidden, layers = 4096, 11008, 32
    layer = 4 * dim * dim + 3 * dim * hidden + 2 * dim
    return vocab_rows * dim + layers * layer + dim + vocab_rows * dim  # embeddings, layers, final norm, untied head


def test_prism_dinosiglip_224px_7b_parameter_count_on_meta():
    with torch.device("meta"):
        vlm = build_vlm(get_model_config("prism-dinosiglip-224px+7b"))
    assert all(p.is_meta for p in vlm.parameters())
    expected = dinov2_vit_l_reg4_224() + siglip_so400m_224() + fused_gelu_mlp(2176, 4096) + llama2_7b(32064)
    total = sum(p.numel() for p in vlm.parameters())
    assert total == expected
    assert 7.4e9 < total < 7.6e9  # "OpenVLA 7B" is about 7.5 B parameters
    assert vlm.vision_backbone.embed_dim == 2176 and vlm.num_patches == 256
    assert vlm.llm_backbone.llm.get_input_embeddings().weight.shape == (32064, 4096)


def test_siglip_224px_7b_and_minivla_bases_build_on_meta():
    with torch.device("meta"):
        v01 = build_vlm(get_model_config("siglip-224px+7b"))
        mini = build_vlm(get_model_config("prism-qwen25-extra-dinosiglip-224px+0_5b"))
    assert v01.vision_backbone.embed_dim == 1152
    assert v01.projector.projector[0].weight.shape == (4096, 1152)
    assert mini.projector.projector[4].weight.shape == (896, 896)
    assert mini.llm_backbone.llm.get_input_embeddings().weight.shape == (151936, 896)


def test_openvla_7b_trainable_counts_leave_out_the_unused_vit_tail():
    """The never-run last block and final norm of both ViTs and SigLIP's attention pool never train (43.08 M)."""
    with torch.device("meta"):
        vlm = build_vlm(get_model_config("prism-dinosiglip-224px+7b"))
    unused = (vit_block(1024, 4096, True) + 2 * 1024) + (vit_block(1152, 4304, False) + 2 * 1152) + \
        siglip_attention_pool()
    assert unused == 43_080_480
    total = 7_541_237_184
    for stage, trainable in [("vla-full-train", total - unused), ("vla-sandwich-train", 1_267_348_928 - unused),
                             ("vla-train", 6_810_325_504)]:
        freeze_backbones(vlm, stage)
        assert count_parameters(vlm) == (total, trainable)
