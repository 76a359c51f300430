"""Projectors from vision features `[B, P, vision_dim]` to LLM embeddings `[B, P, llm_dim]`.

Each projector wraps an `nn.Sequential` named `projector`, so its state-dict keys (`projector.0.weight`, ...) are the
reference checkpoint's keys. The projector kind comes from the model's `arch_specifier` (`no-align+` prefixes and
friends are ignored): `linear`, `gelu-mlp` or `fused-gelu-mlp`.
"""

import torch
from torch import nn


class LinearProjector(nn.Module):
    """One Linear(vision_dim -> llm_dim)."""

    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.projector = nn.Sequential(nn.Linear(vision_dim, llm_dim, bias=True))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features)


class MLPProjector(nn.Module):
    """Linear(v -> d), GELU, Linear(d -> d); keys `projector.0`, `projector.2`."""

    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.projector = nn.Sequential(
            nn.Linear(vision_dim, llm_dim, bias=True), nn.GELU(), nn.Linear(llm_dim, llm_dim, bias=True)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features)


class FusedMLPProjector(nn.Module):
    """Linear(v -> 4v), GELU, Linear(4v -> d), GELU, Linear(d -> d); keys `projector.0/2/4` (fused backbones)."""

    def __init__(self, fused_vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        hidden = fused_vision_dim * 4
        self.projector = nn.Sequential(
            nn.Linear(fused_vision_dim, hidden, bias=True),
            nn.GELU(),
            nn.Linear(hidden, llm_dim, bias=True),
            nn.GELU(),
            nn.Linear(llm_dim, llm_dim, bias=True),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features)


PROJECTORS: dict[str, type[nn.Module]] = {
    # Longest suffix first: "fused-gelu-mlp" also ends with "gelu-mlp".
    "fused-gelu-mlp": FusedMLPProjector,
    "gelu-mlp": MLPProjector,
    "linear": LinearProjector,
}


def projector_kind(arch_specifier: str) -> str:
    """The projector registry key for an arch specifier such as `no-align+fused-gelu-mlp`."""
    for kind in PROJECTORS:
        if arch_specifier.endswith(kind):
            return kind
    raise ValueError(f"Unknown arch_specifier {arch_specifier!r}: it must end with one of {list(PROJECTORS)}.")


def build_projector(arch_specifier: str, vision_dim: int, llm_dim: int) -> nn.Module:
    """Build the projector named by `arch_specifier`."""
    return PROJECTORS[projector_kind(arch_specifier)](vision_dim, llm_dim)
