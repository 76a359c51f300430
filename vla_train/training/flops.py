"""Model FLOPs of a PrismaticVLM training sample, and the peak bf16 FLOP/s of known accelerators (for MFU).

Conventions (those of MFU, PaLM appendix B / Megatron-LM):
- only matrix multiplications count, a multiply-add being 2 FLOPs: `[m, k] @ [k, n]` costs `2 m k n`. Norms,
  activations, softmax, RoPE, residual adds, biases and embedding lookups are left out (a few %).
- attention scores and the weighted sum are counted in full, `QK^T` and `AV` at `2 S^2 d_attn` each per layer, with
  no halving for the causal mask (PaLM's `12 L H Q T` term, so figures compare with published MFU).
- padding is not counted: a sample of `T` text tokens (its attention-mask sum) occupies `S = T + P` LLM positions,
  `P` the vision patches spliced after BOS.
- activation-checkpointing recompute is NOT counted (model FLOPs, not hardware FLOPs).
- backward: a part whose parameters train costs 3x its forward (forward, input gradient, weight gradient: the usual
  `6 N D`, which also counts the input gradient of the first layer of a tower, that autograd skips); a frozen part
  that gradients pass through (something before it trains, or its input requires grad) costs 2x (forward + input
  gradient); a frozen part that nothing before it needs gradients from costs 1x (forward only). Attention's `QK^T` /
  `AV` have no weights: 3x when gradients pass through the layer (grads of both operands), else 1x.

Forward FLOPs, per part (D model width, H MLP hidden, N tokens, dims of each featurizer / the LLM config):
- ViT featurizer, per image: patch embedding `2 Np (3 p^2) D`; per block used, `N = Np + prefix tokens`:
  `2 N (4 D^2)` (QKV + out projections) + `2 N (m D H)` (MLP, m = 2 matrices, 3 if gated) + `4 N^2 D` (attention).
  Blocks used: the featurizer's output is block `depth - 2` (the reference's penultimate layer), so `depth - 1`
  blocks (the last block is not run).
- projector, per image: `2 P sum(in * out)` over its Linear layers.
- LLM, per sample of `S` positions, per decoder layer: `2 S d (q + 2 kv + q)` (Q, K, V, O projections, with
  `q = heads * head_dim`, `kv = kv_heads * head_dim`) + `2 S (m d I)` (MLP, m = 3 gated, 2 for Phi) + `4 S^2 q`
  (attention); the output head `2 d V` (V the embedding rows) per supervised token only: training computes logits
  only where a label is supervised (`LLMBackbone.forward`).

So one sample costs `c0 + c1 S + c2 S^2 + cs N` FLOPs (`FlopsModel`; N its supervised tokens), a polynomial the
meter evaluates on device from the micro-batch's attention-mask sums and supervised-token count (no host sync).
"""

from dataclasses import dataclass

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from transformers import PretrainedConfig

from vla_train.log import logger

GATED_MLP_FAMILIES = ("llama", "mistral", "qwen2", "gemma")
PLAIN_MLP_FAMILIES = ("phi",)

# Dense (no sparsity) bf16 tensor-core peaks per device, from NVIDIA's datasheets (FLOP/s). Matched against
# torch.cuda.get_device_name() in order, most specific first ("NVIDIA H100 80GB HBM3" is the SXM part).
# A100 (SXM and PCIe): 312 TFLOPS; H100 SXM / H800 SXM: 989.4; H100 PCIe: 756; H100 NVL: 835; H200 (SXM, same
# tensor cores and clocks as H100 SXM): 989.4; H200 NVL: 835; GH200: 989.4 (its H100 is the SXM part).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIE", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("GH200", 989e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
)


def peak_bf16_flops(device: torch.device | str | int) -> float | None:
    """The dense bf16 peak FLOP/s of a CUDA device from `PEAK_BF16_FLOPS`, or None (CPU, unknown name)."""
    device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device).upper()
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def resolve_peak_flops(device: torch.device | str, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s per device: `override_tflops * 1e12` when given (it must be > 0), else the table's, else None."""
    if override_tflops is not None:
        if not override_tflops > 0:
            raise ValueError(f"peak_device_tflops = {override_tflops} must be > 0 (TFLOP/s per device). Fix: pass "
                             "the accelerator's dense bf16 peak, e.g. 989 for an H100 SXM, or null to look it up.")
        return override_tflops * 1e12
    peak = peak_bf16_flops(device)
    if peak is None and torch.device(device).type == "cuda":
        logger.warning("No bf16 peak known for %s: MFU is not logged. Pass peak_device_tflops to set one.",
                       torch.cuda.get_device_name(torch.device(device)))
    return peak


# === Forward FLOPs of each part ===


@dataclass(frozen=True)
class VitDims:
    """The dimensions of one timm ViT featurizer that set its FLOPs."""

    num_patches: int  # Np
    prefix_tokens: int  # CLS + registers
    dim: int  # D
    mlp_hidden: int  # H
    mlp_matrices: int  # 2 (fc1, fc2), 3 when gated (SwiGLU)
    patch_size: int  # p
    in_chans: int
    blocks_used: int  # depth - 1 (the output is block depth - 2), or depth for a final-layer featurizer (PaliGemma)

    @classmethod
    def of(cls, vit: VisionTransformer) -> "VitDims":
        block = vit.blocks[0]
        mlp = getattr(block, "block", block).mlp  # a FiLM-wrapped timm Block keeps it as `.block`
        gated = hasattr(mlp, "fc1_g") or type(mlp).__name__ in ("SwiGLU", "GluMlp", "SwiGLUPacked")
        hidden = mlp.fc2.in_features
        patch = vit.patch_embed.patch_size
        return cls(num_patches=vit.patch_embed.num_patches, prefix_tokens=vit.num_prefix_tokens, dim=vit.embed_dim,
                   mlp_hidden=hidden, mlp_matrices=3 if gated else 2, patch_size=patch[0], in_chans=vit.patch_embed
                   .proj.in_channels, blocks_used=len(vit.blocks) - (0 if getattr(vit, "final_layer", False) else 1))

    def patch_embed_flops(self) -> int:
        return 2 * self.num_patches * self.in_chans * self.patch_size ** 2 * self.dim

    def block_dense_flops(self) -> int:
        tokens = self.num_patches + self.prefix_tokens
        return 2 * tokens * (4 * self.dim ** 2 + self.mlp_matrices * self.dim * self.mlp_hidden)

    def block_attention_flops(self) -> int:
        tokens = self.num_patches + self.prefix_tokens
        return 4 * tokens ** 2 * self.dim


@dataclass(frozen=True)
class LlmDims:
    """The dimensions of a Hugging Face decoder-only LLM that set its FLOPs (from its config)."""

    hidden: int  # d
    intermediate: int  # I
    mlp_matrices: int  # 3 gated (Llama, Mistral, Qwen2), 2 (Phi)
    q_dim: int  # heads * head_dim
    kv_dim: int  # kv_heads * head_dim
    layers: int
    vocab_rows: int  # V, the output head's rows

    @classmethod
    def of(cls, config: PretrainedConfig, vocab_rows: int | None = None) -> "LlmDims":
        family = config.model_type
        if family not in GATED_MLP_FAMILIES + PLAIN_MLP_FAMILIES:
            raise ValueError(f"No FLOPs formula for LLM family {family!r}. Fix: add it to GATED_MLP_FAMILIES or "
                             f"PLAIN_MLP_FAMILIES in {__name__} (known: {GATED_MLP_FAMILIES + PLAIN_MLP_FAMILIES}).")
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(hidden=config.hidden_size, intermediate=config.intermediate_size,
                   mlp_matrices=3 if family in GATED_MLP_FAMILIES else 2, q_dim=heads * head_dim,
                   kv_dim=kv_heads * head_dim, layers=config.num_hidden_layers,
                   vocab_rows=vocab_rows if vocab_rows is not None else config.vocab_size)

    def layer_dense_per_token(self) -> int:
        return 2 * (self.hidden * (2 * self.q_dim + 2 * self.kv_dim) + self.mlp_matrices * self.hidden
                    * self.intermediate)

    def layer_attention_per_token_pair(self) -> int:
        return 4 * self.q_dim

    def head_per_token(self) -> int:
        return 2 * self.hidden * self.vocab_rows


def linear_shapes(module: nn.Module) -> list[tuple[int, int]]:
    """(in_features, out_features) of every nn.Linear in `module`, in order (works on meta / FSDP modules)."""
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, nn.Linear)]


# === The per-sample polynomial ===


@dataclass(frozen=True)
class FlopsModel:
    """Training FLOPs of one sample of `S = T + num_patches` LLM positions and N supervised tokens:
    `per_sample + per_token S + per_token_pair S^2 + per_supervised_token N` (forward and backward, multipliers
    applied; see the module docstring)."""

    per_sample: float  # c0: vision towers + projector
    per_token: float  # c1: LLM dense layers
    per_token_pair: float  # c2: LLM attention
    num_patches: int
    per_supervised_token: float = 0.0  # cs: the output head (logits only where a label is supervised)

    def sample_flops(self, text_tokens: int, supervised_tokens: int = 0) -> float:
        """FLOPs of one sample with `text_tokens` (unpadded) text tokens, `supervised_tokens` of them labelled."""
        positions = text_tokens + self.num_patches
        return (self.per_sample + self.per_token * positions + self.per_token_pair * positions ** 2
                + self.per_supervised_token * supervised_tokens)

    def batch_flops(self, text_lengths: torch.Tensor, supervised_tokens: torch.Tensor | int = 0) -> torch.Tensor:
        """Sum over a micro-batch: `text_lengths [B]` unpadded text tokens per sample (attention-mask sums, any
        device) and the batch's supervised-token count -> a 0-d float64 tensor on the same device. No host sync."""
        positions = text_lengths.to(torch.float64) + self.num_patches
        dense = (self.per_sample + positions * self.per_token + positions.square() * self.per_token_pair).sum()
        return dense + self.per_supervised_token * supervised_tokens


def _multiplier(trains: bool, gradient_passes: bool) -> int:
    """3 (trains), 2 (frozen, gradients pass through), 1 (frozen, forward only)."""
    return 3 if trains else 2 if gradient_passes else 1


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def vision_flops(vlm: nn.Module) -> tuple[float, bool]:
    """(training FLOPs per image of all featurizers, whether any featurizer trains). Pixels need no gradient, so a
    frozen featurizer costs its forward only (it runs under no_grad when the vision backbone is frozen)."""
    total, any_trains = 0.0, False
    for vit in vlm.vision_backbone.featurizers:
        dims = VitDims.of(vit)
        used = [vit.patch_embed, *list(vit.blocks)[:dims.blocks_used]]
        trains = vlm.vision_backbone_requires_grad and any(_trains(m) for m in used)
        any_trains |= trains
        forward = dims.patch_embed_flops() + dims.blocks_used * (dims.block_dense_flops()
                                                                 + dims.block_attention_flops())
        total += _multiplier(trains, False) * forward
    return total, any_trains


def flops_model_for_vlm(vlm: nn.Module, llm_input_requires_grad: bool = True) -> FlopsModel:
    """The FlopsModel of a PrismaticVLM as frozen for training (call after `freeze_backbones`; shapes come from the
    configs and module attributes, so a meta-device or FSDP-sharded model works).

    `llm_input_requires_grad`: True in training, where `LLMBackbone` enables input-require-grads (and a trainable
    projector needs them anyway), so every LLM layer is on the gradient path.
    """
    vision, vision_trains = vision_flops(vlm)
    num_patches = vlm.vision_backbone.num_patches
    projector_trains = _trains(vlm.projector)
    projector = 2 * num_patches * sum(i * o for i, o in linear_shapes(vlm.projector))
    per_sample = vision + _multiplier(projector_trains, vision_trains) * projector

    llm = vlm.llm_backbone.llm
    dims = LlmDims.of(llm.config, vocab_rows=llm.get_output_embeddings().weight.shape[0])
    upstream = vision_trains or projector_trains or llm_input_requires_grad or _trains(llm.get_input_embeddings())
    per_token = per_token_pair = 0.0
    for layer in llm.model.layers:
        trains = _trains(layer)
        per_token += _multiplier(trains, upstream) * dims.layer_dense_per_token()
        per_token_pair += (3 if trains or upstream else 1) * dims.layer_attention_per_token_pair()
        upstream |= trains
    head = _multiplier(_trains(llm.get_output_embeddings()), upstream) * dims.head_per_token()
    return FlopsModel(per_sample=float(per_sample), per_token=float(per_token),
                      per_token_pair=float(per_token_pair), num_patches=num_patches, per_supervised_token=float(head))
