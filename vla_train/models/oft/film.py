"""FiLM language conditioning of the vision backbone (OpenVLA-OFT, `prismatic/models/film_vit_wrapper.py`).

`apply_film(backbone, llm_dim)` wraps every block of every featurizer in place in a `FiLMedBlock` and turns the backbone
into a `FiLMedVisionBackbone`, whose forward takes the language embeddings as an explicit argument:
`backbone(pixel_values, language_embeddings)`. Each block modulates its tokens between attention and MLP with
`(1 + gamma) * x + beta`, `gamma = scale(c)`, `beta = shift(c)`, `c` the mean language embedding `[B, llm_dim]`.

Condition passing: `c` travels as a forward argument of every block (`block(x, c)`), never as Python-side state, so an
activation-checkpointing wrapper (`CheckpointWrapper(FiLMedBlock)`, applied in place by `training/parallelize.py`)
saves it with the block's inputs and a recompute sees the same tensor.

State-dict keys (block `i` of a featurizer): our `<featurizer>.blocks.{i}.block.<timm Block key>` and
`<featurizer>.blocks.{i}.{scale,shift}.{weight,bias}`; OFT saves its `FiLMedPrismaticVisionBackbone` as
`vision_backbone.{featurizer,fused_featurizer}.blocks.{i}.block.*` / `.scale.*` / `.shift.*`. `to_oft_state_dict` and
`from_oft_state_dict` convert (the export's bijection: `featurizer` or the first fused one (DINO) -> `featurizer`, the
second (SigLIP) -> `fused_featurizer`, LayerScale `gamma` -> `scale_factor`). OFT trains the ViT with LoRA, so its saved
ViT linears are `<name>.base_layer.*` + `<name>.lora_{A,B}.default.*`: merge those before `from_oft_state_dict`.
"""

import types

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from vla_train.models.vision import VisionBackbone


class FiLMedBlock(nn.Module):
    """A timm ViT `Block` (kept as `block`) with FiLM projections `scale`, `shift`: `Linear(llm_dim -> vision_dim)`.

    `forward(x [B, N, vision_dim], condition [B, llm_dim]) -> [B, N, vision_dim]`:
    `x + attn` (with the block's norm1, layer scale, drop path), then `x * (1 + scale(c)) + shift(c)`, then `x + mlp`.
    `zero_init=True` zeroes `scale` and `shift` (exact identity at init); the default keeps PyTorch's Linear init, as
    OFT does.
    """

    def __init__(self, block: Block, vision_dim: int, llm_dim: int, zero_init: bool = False) -> None:
        super().__init__()
        self.block = block
        like = {"device": block.norm1.weight.device, "dtype": block.norm1.weight.dtype}  # the block's placement
        self.scale = nn.Linear(llm_dim, vision_dim, **like)
        self.shift = nn.Linear(llm_dim, vision_dim, **like)
        if zero_init:
            for linear in (self.scale, self.shift):
                nn.init.zeros_(linear.weight)
                nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        block, condition = self.block, condition.to(self.scale.weight.dtype)
        gamma, beta = self.scale(condition).to(x.dtype).unsqueeze(1), self.shift(condition).to(x.dtype).unsqueeze(1)
        x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
        x = x * (1 + gamma) + beta
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def _film_penultimate_forward(self: VisionTransformer, pixel_values: torch.Tensor,
                              condition: torch.Tensor) -> torch.Tensor:
    """`[B, 3, S, S]`, condition `[B, llm_dim]` -> `[B, P, D]`: the FiLMed output of block `depth - 2`, no final norm,
    prefix tokens removed; the same steps as timm's `forward_intermediates(stop_early=True)` (which cannot pass the
    condition to the blocks, hence this loop)."""
    x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(pixel_values))))
    for block in list(self.blocks)[: len(self.blocks) - 1]:
        x = block(x, condition)
    return x[:, self.num_prefix_tokens :]


def average_language_embedding(language_embeddings: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`[B, L, llm_dim]` language input embeddings (+ optional `[B, L]` mask, True = keep) -> mean `[B, llm_dim]`.
    OFT averages all positions it passes (no mask)."""
    if mask is None:
        return language_embeddings.mean(dim=1)
    weights = mask.to(language_embeddings.dtype).unsqueeze(-1)
    return (language_embeddings * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


class FiLMedVisionBackbone(VisionBackbone):
    """A `VisionBackbone` after `apply_film` (same modules and keys, plus FiLM in every block). Not constructed
    directly: `apply_film` converts an existing backbone in place (as OFT re-classes its ViTs)."""

    fsdp_unit_classes = (FiLMedBlock,)
    llm_dim: int

    def forward(self, pixel_values: torch.Tensor | dict[str, torch.Tensor], language_embeddings: torch.Tensor,
                language_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pixels as for `VisionBackbone.forward`, language embeddings `[B, L, llm_dim]` (optional mask `[B, L]`)
        -> patch features `[B, P, sum(D_i)]`."""
        condition = average_language_embedding(language_embeddings, language_mask)
        if not self.is_fused:
            if isinstance(pixel_values, dict):
                raise ValueError(f"{self.identifier} takes one pixel tensor, got a dict with {sorted(pixel_values)}.")
            return self.featurizer(pixel_values, condition)
        if not isinstance(pixel_values, dict) or set(pixel_values) != set(self.keys):
            got = sorted(pixel_values) if isinstance(pixel_values, dict) else type(pixel_values).__name__
            raise ValueError(f"{self.identifier} takes pixel values {{{', '.join(self.keys)}}}, got {got}.")
        features = [f(pixel_values[k], condition) for k, f in zip(self.keys, self.featurizers, strict=True)]
        return torch.cat(features, dim=2)

    def film_parameters(self) -> list[nn.Parameter]:
        """The FiLM projections' parameters (`scale`, `shift` of every block, the never-run last ones included)."""
        return [p for f in self.featurizers for b in f.blocks for m in (b.scale, b.shift) for p in m.parameters()]


def apply_film(vision_backbone: VisionBackbone, llm_dim: int, zero_init: bool = False) -> FiLMedVisionBackbone:
    """Wrap every block of every featurizer in a `FiLMedBlock` (in place; call before activation checkpointing and
    FSDP) and return the same object as a `FiLMedVisionBackbone`. New FiLM parameters are trainable, except those
    of each featurizer's never-run last block, which stay frozen with it."""
    if isinstance(vision_backbone, FiLMedVisionBackbone):
        raise ValueError(f"{vision_backbone.identifier} already has FiLM.")
    for featurizer in vision_backbone.featurizers:
        blocks = list(featurizer.blocks)
        if not all(type(block) is Block for block in blocks):
            raise TypeError(f"FiLM wraps timm Blocks; {vision_backbone.identifier} has "
                            f"{sorted({type(b).__name__ for b in blocks})} (apply FiLM before checkpoint wrappers).")
        for index, block in enumerate(blocks):  # in place: the container (a checkpointing target) stays the same
            featurizer.blocks[index] = FiLMedBlock(block, featurizer.embed_dim, llm_dim, zero_init)
        featurizer.forward = types.MethodType(_film_penultimate_forward, featurizer)
    vision_backbone.__class__ = FiLMedVisionBackbone
    vision_backbone.llm_dim = llm_dim
    for module in vision_backbone.unused_modules():
        module.requires_grad_(False)
    return vision_backbone
