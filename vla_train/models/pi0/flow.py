"""π0's flow matching: the time embedding, the training sample (time, noise, interpolant, target), the loss and the
Euler sampler (facts: docs/pi0_facts.md §3-4; openpi `PI0Pytorch`, LeRobot `modeling_pi0`).

Shapes: B batch, H chunk length (50), A padded action dim (32). Time runs from 1 (noise) to 0 (actions):
`x_t = t * noise + (1 - t) * actions`, whose velocity is `u = noise - actions`; the model predicts `v(x_t, t)` and
sampling integrates `dx/dt = v` from t = 1 to 0 with Euler steps `dt = -1 / num_steps`.
"""

import math
from collections.abc import Callable

import torch

MIN_PERIOD, MAX_PERIOD = 4e-3, 4.0
BETA_ALPHA = 1.5  # t ~ Beta(1.5, 1) * 0.999 + 0.001: more weight near t = 1 (high noise), as openpi
TIME_SCALE, TIME_OFFSET = 0.999, 0.001

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t [B, H, A], t [B]) -> v [B, H, A]


def time_embedding(t: torch.Tensor, dim: int, min_period: float = MIN_PERIOD,
                   max_period: float = MAX_PERIOD) -> torch.Tensor:
    """`t [B]` -> `[B, dim]`: `[sin(2 pi t / p_k), cos(2 pi t / p_k)]` (sines first) for `dim / 2` periods
    `p_k = min_period * (max_period / min_period) ** (k / (dim/2 - 1))`, computed in float64 and cast to t's dtype."""
    if dim % 2:
        raise ValueError(f"The time embedding's width must be even, got {dim}.")
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    angles = t.to(torch.float64)[:, None] * (2 * math.pi / period)[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).to(t.dtype)


def sample_time(batch: int, generator: torch.Generator, device: torch.device | None = None) -> torch.Tensor:
    """`[B]` float32 times `Beta(1.5, 1) * 0.999 + 0.001`, drawn from `generator` by the inverse CDF (Beta(a, 1) has
    CDF `x ** a`, so `U ** (1 / a)` is exact; torch's Beta sampler takes no generator)."""
    uniform = torch.rand(batch, generator=generator, device=generator.device, dtype=torch.float64)
    t = uniform ** (1.0 / BETA_ALPHA) * TIME_SCALE + TIME_OFFSET
    return t.to(device=device or generator.device, dtype=torch.float32)


def training_sample(actions: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Clean actions `[B, H, A]` -> `noise`, `time [B]`, the interpolant `x_t` and the target velocity `u`, all on
    `actions`' device (noise and time drawn from `generator`, on its device)."""
    noise = torch.randn(actions.shape, generator=generator, device=generator.device, dtype=torch.float32)
    noise = noise.to(device=actions.device, dtype=actions.dtype)
    t = sample_time(actions.shape[0], generator, actions.device).to(actions.dtype)
    x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * actions
    return {"noise": noise, "time": t, "x_t": x_t, "target": noise - actions}


def flow_loss_sum(predicted: torch.Tensor, target: torch.Tensor, step_mask: torch.Tensor | None,
                  action_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(sum of squared errors, element count)` over valid chunk steps (`step_mask [B, H]`, True = valid) and the
    first `action_dim` (unpadded) dimensions of `[B, H, A]`; fp32 sum, padded steps selected out (not multiplied)."""
    error = (predicted[..., :action_dim].float() - target[..., :action_dim].float()).square()
    if step_mask is None:
        return error.sum(), torch.tensor(error.numel(), device=error.device)
    valid = step_mask.to(device=error.device, dtype=torch.bool)
    return torch.where(valid[..., None], error, 0.0).sum(), valid.sum() * action_dim


@torch.no_grad()
def euler_sample(velocity: VelocityFn, noise: torch.Tensor, num_steps: int = 10) -> torch.Tensor:
    """Integrate from `noise` (t = 1) to t = 0 in `num_steps` Euler steps of `dt = -1 / num_steps`: the velocity is
    evaluated at t = 1, 1 - 1/n, ..., 1/n (openpi's loop). Returns the actions `[B, H, A]`."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    dt, x = -1.0 / num_steps, noise
    for step in range(num_steps):
        t = torch.full((x.shape[0],), 1.0 + step * dt, device=x.device, dtype=x.dtype)
        x = x + dt * velocity(x, t)
    return x
