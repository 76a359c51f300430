"""VLA-Adapter's policy: an MLPResNet whose every block is a Bridge-Attention block reading one LLM layer.

Module and parameter names follow VLA-Adapter (`prismatic/models/action_heads.py`) so its `action_head--*` files load
with `strict=True` (less `film_gen`, see `UNUSED_UPSTREAM_KEYS`): `model.{layer_norm1, fc1, mlp_resnet_blocks.{i}.*,
layer_norm2, fc2}.*`. Shapes: B batch, H chunk length, A action dim, D LLM width (the head's width too), P raw-feature
tokens (BOS + the first C*P-1 patches, as upstream slices them), N ActionQuery tokens, d = D / heads.

A block (`BridgeAttentionBlockPro`, upstream `MLPResNetBlock_Pro`, the default) attends from the chunk's H step tokens
`x [B, H, D]` to three key sets in one softmax: the steps themselves (`k_self`/`v_self`), the "adapter" tokens
`[ActionQuery states; proprio token]` (`k_adapter`/`v_adapter`) and the layer's raw features (`k_task`/`v_task`),
whose attention scores are multiplied by `tanh(gating_factor)` (0 at init: the raw features start ignored). RoPE
(upstream's variant, `rotate_half_interleaved`) rotates q and the self keys by step, the adapter keys and the task keys
each by their own index. `x = ffn(o_proj(attention) + x)`, `ffn = LayerNorm -> Linear -> ReLU`.
The original block (`BridgeAttentionBlock`, upstream `MLPResNetBlock`) shares one `k_proj`/`v_proj` for all keys
and has no RoPE. Scaling a key set's scores by `g` equals scaling its keys by `g`, so the gated softmax runs as one
`scaled_dot_product_attention` (memory-efficient kernels) over the concatenated keys; tests check it against the
explicit formula.
"""

import torch
import torch.nn.functional as F
from torch import nn

ROPE_BASE = 10_000.0
UNUSED_UPSTREAM_KEYS = ("film_gen.0.weight", "film_gen.0.bias")  # upstream Pro blocks hold an unused FiLM Linear
QUERY_NOISE_STD = 0.02  # the zero query input gets N(0, 0.02) noise in training (upstream's "random perturbations")


def rope_cos_sin(length: int, head_dim: int, device: torch.device, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream's RoPE tables `[length, head_dim]`: angles `t * base^(-2k/d)` for k < d/2, repeated as
    `[freqs, freqs]` (computed per call: no buffer to lose when a model is built on the meta device)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {head_dim}.")
    inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    table = torch.cat([angles, angles], dim=-1)
    return table.cos().to(dtype), table.sin().to(dtype)


def rotate_half_interleaved(x: torch.Tensor) -> torch.Tensor:
    """Upstream's pairing: `(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)` (even/odd pairs, unlike the halves of
    HF's `rotate_half`); kept because the released weights were trained with it."""
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).reshape_as(x)


def apply_rope(x: torch.Tensor) -> torch.Tensor:
    """Rotate `[B, heads, L, d]` by positions 0..L-1 (upstream's `apply_rope` for one tensor)."""
    cos, sin = rope_cos_sin(x.shape[-2], x.shape[-1], x.device, x.dtype)
    return x * cos + rotate_half_interleaved(x) * sin


def _ffn(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())


class _BridgeBase(nn.Module):
    """Shared by both blocks: heads, the gate, the output projection, the FFN and the gated attention."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Bridge attention: width {dim} is not divisible by {num_heads} heads.")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.ffn = _ffn(dim)
        self.q_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)
        self.gating_factor = nn.Parameter(torch.zeros(1))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def _attend(self, x: torch.Tensor, q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                gated: int) -> torch.Tensor:
        """One softmax over the key sets (each `[B, heads, L_i, d]`), set `gated` scaled by tanh(gate); then
        `ffn(o_proj(out) + x)`."""
        keys = list(keys)
        keys[gated] = keys[gated] * torch.tanh(self.gating_factor).to(keys[gated].dtype)
        out = F.scaled_dot_product_attention(q, torch.cat(keys, dim=2), torch.cat(values, dim=2))  # [B, h, H, d]
        out = out.transpose(1, 2).reshape(x.shape)
        return self.ffn(self.o_proj(out) + x)


class BridgeAttentionBlockPro(_BridgeBase):
    """VLA-Adapter-Pro's block (module docstring): separate self / adapter / task projections, RoPE."""

    def __init__(self, dim: int, num_heads: int = 8) -> None:
        super().__init__(dim, num_heads)
        self.k_self, self.v_self = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.k_adapter, self.v_adapter = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.k_task, self.v_task = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, h_a: torch.Tensor, h_t: torch.Tensor,
                p: torch.Tensor | None = None) -> torch.Tensor:
        """`x [B, H, D]`, ActionQuery states `h_a [B, N, D]`, raw features `h_t [B, P, D]`, proprio token
        `p [B, 1, D]` (or None) -> `[B, H, D]`."""
        adapter = h_a if p is None else torch.cat([h_a, p.to(h_a.dtype)], dim=1)
        q = apply_rope(self._heads(self.q_proj(x)))
        keys = [apply_rope(self._heads(self.k_self(x))), apply_rope(self._heads(self.k_adapter(adapter))),
                apply_rope(self._heads(self.k_task(h_t)))]
        values = [self._heads(self.v_self(x)), self._heads(self.v_adapter(adapter)), self._heads(self.v_task(h_t))]
        return self._attend(x, q, keys, values, gated=2)


class BridgeAttentionBlock(_BridgeBase):
    """VLA-Adapter's original block: one `k_proj`/`v_proj` for every key set, no RoPE; key order
    `[self, ActionQuery+proprio, raw features * tanh(g)]`."""

    def __init__(self, dim: int, num_heads: int = 8) -> None:
        super().__init__(dim, num_heads)
        self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, h_a: torch.Tensor, h_t: torch.Tensor,
                p: torch.Tensor | None = None) -> torch.Tensor:
        """As `BridgeAttentionBlockPro.forward`."""
        adapter = h_a if p is None else torch.cat([h_a, p.to(h_a.dtype)], dim=1)
        sets = [x, adapter, h_t]
        keys = [self._heads(self.k_proj(s)) for s in sets]
        values = [self._heads(self.v_proj(s)) for s in sets]
        return self._attend(x, self._heads(self.q_proj(x)), keys, values, gated=2)


class BridgeMLPResNet(nn.Module):
    """`[B, H, A*D] -> [B, H, A]`: LayerNorm, Linear, ReLU, `num_blocks` Bridge blocks (block i reads LLM layer
    i + 1), LayerNorm, Linear (upstream `MLPResNet` with `use_pro_version`)."""

    def __init__(self, num_blocks: int, input_dim: int, hidden_dim: int, output_dim: int, pro: bool = True,
                 num_heads: int = 8) -> None:
        super().__init__()
        block = BridgeAttentionBlockPro if pro else BridgeAttentionBlock
        self.layer_norm1 = nn.LayerNorm(input_dim)
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.relu = nn.ReLU()
        self.mlp_resnet_blocks = nn.ModuleList(block(hidden_dim, num_heads) for _ in range(num_blocks))
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor, task_layers: list[torch.Tensor], query_layers: list[torch.Tensor],
                proprio: torch.Tensor | None = None) -> torch.Tensor:
        """`x [B, H, A*D]`; `task_layers` / `query_layers`: per hidden-state index 0..L (embeddings, then each LLM
        layer) the raw features `[B, P, D]` and ActionQuery states `[B, N, D]`; `proprio [B, 1, D]` or None."""
        if len(task_layers) < len(self.mlp_resnet_blocks) + 1 or len(query_layers) != len(task_layers):
            raise ValueError(f"The Bridge policy has {len(self.mlp_resnet_blocks)} blocks and reads layers 1.."
                             f"{len(self.mlp_resnet_blocks)}; got {len(task_layers)} raw-feature and "
                             f"{len(query_layers)} query layers (embeddings + one per LLM layer expected).")
        x = self.relu(self.fc1(self.layer_norm1(x)))
        for index, block in enumerate(self.mlp_resnet_blocks):
            x = block(x, h_a=query_layers[index + 1], h_t=task_layers[index + 1], p=proprio)
        return self.fc2(self.layer_norm2(x))


class BridgeActionHead(nn.Module):
    """VLA-Adapter's `L1RegressionActionHead`: keys `model.*`; `num_blocks` = the LLM's depth (24 for
    Qwen2.5-0.5B), width D = the LLM's."""

    def __init__(self, llm_dim: int, action_dim: int, chunk_length: int, num_blocks: int, pro: bool = True,
                 num_heads: int = 8) -> None:
        super().__init__()
        self.llm_dim, self.action_dim, self.chunk_length = llm_dim, action_dim, chunk_length
        self.model = BridgeMLPResNet(num_blocks, llm_dim * action_dim, llm_dim, action_dim, pro, num_heads)

    def query_input(self, batch: int, device: torch.device, dtype: torch.dtype,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """The chunk's input `[B, H, A*D]`: zeros, plus one `[H, A*D]` draw of N(0, 0.02) shared by the batch when a
        `generator` is given (training; upstream draws a fresh "learnable" parameter that never trains)."""
        x = torch.zeros(batch, self.chunk_length, self.action_dim * self.llm_dim, device=device, dtype=dtype)
        if generator is None:
            return x
        noise = torch.randn(x.shape[1:], generator=generator, device=generator.device, dtype=torch.float32)
        return x + (noise * QUERY_NOISE_STD).to(device=device, dtype=dtype)

    def predict_action(self, task_layers: list[torch.Tensor], query_layers: list[torch.Tensor],
                       proprio: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-layer features (as `BridgeMLPResNet.forward`) -> normalized actions `[B, H, A]`."""
        first = query_layers[0]
        x = self.query_input(first.shape[0], first.device, first.dtype, generator)
        return self.model(x, task_layers, query_layers, proprio)
