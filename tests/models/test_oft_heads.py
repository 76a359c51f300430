import math

import numpy as np
import pytest
import torch
from torch import nn

from vla_train.models.oft.heads import (
    DiffusionActionHead,
    L1RegressionActionHead,
    MLPResNet,
    NoisyActionProjector,
    ProprioProjector,
    SinusoidalPositionalEncoding,
    masked_error_sum,
)

B, H, A, D = 3, 4, 2, 8  # batch, chunk length, action dim, LLM dim


def _mlp_resnet_keys(prefix: str) -> set[str]:
    """OFT's MLPResNet(num_blocks=2) parameter names under `prefix` (prismatic/models/action_heads.py)."""
    names = ["layer_norm1", "fc1", "mlp_resnet_blocks.0.ffn.0", "mlp_resnet_blocks.0.ffn.1",
             "mlp_resnet_blocks.1.ffn.0", "mlp_resnet_blocks.1.ffn.1", "layer_norm2", "fc2"]
    return {f"{prefix}{name}.{param}" for name in names for param in ("weight", "bias")}


def test_l1_head_keys_shapes_and_prediction():
    head = L1RegressionActionHead(input_dim=D, hidden_dim=D, action_dim=A)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert set(shapes) == _mlp_resnet_keys("model.")
    assert shapes["model.layer_norm1.weight"] == (D * A,)
    assert shapes["model.fc1.weight"] == (D, D * A)
    assert shapes["model.mlp_resnet_blocks.1.ffn.1.weight"] == (D, D)
    assert shapes["model.fc2.weight"] == (A, D)
    hidden = torch.randn(B, H * A, D)
    actions = head.predict_action(hidden)
    assert actions.shape == (B, H, A)
    # chunk step h reads slots h*A .. h*A+A-1, concatenated in slot order
    step = head.model(hidden[:, 2 * A: 3 * A].reshape(B, A * D))
    torch.testing.assert_close(actions[:, 2], step)
    with pytest.raises(ValueError, match=r"\[B, H\*A, D\]"):
        head.predict_action(torch.randn(B, H * A + 1, D))


def test_mlp_resnet_forward_order():
    net = MLPResNet(num_blocks=1, input_dim=6, hidden_dim=5, output_dim=3)
    x = torch.randn(4, 6)
    h = torch.relu(net.fc1(net.layer_norm1(x)))
    ffn = net.mlp_resnet_blocks[0].ffn
    h = h + torch.relu(ffn[1](ffn[0](h)))
    torch.testing.assert_close(net(x), net.fc2(net.layer_norm2(h)))


def test_masked_l1_sum_and_count_match_numpy():
    generator = torch.Generator().manual_seed(0)
    head = L1RegressionActionHead(input_dim=D, hidden_dim=D, action_dim=A)
    hidden, actions = torch.randn(B, H * A, D, generator=generator), torch.randn(B, H, A, generator=generator)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    actions[~mask] = float("nan")  # padded steps must not leak
    total, count = head.loss_sum(hidden, actions, mask)
    pred = head.predict_action(hidden).detach().numpy()
    errors = np.abs(pred - actions.numpy())[mask.numpy()]
    assert count.item() == 6 * A
    np.testing.assert_allclose(total.item(), errors.sum(), rtol=1e-5)
    np.testing.assert_allclose(head.loss(hidden, actions, mask).item(), errors.mean(), rtol=1e-5)


def test_l1_mean_equals_torch_l1_loss_when_all_valid():
    head = L1RegressionActionHead(input_dim=D, hidden_dim=D, action_dim=A)
    hidden, actions = torch.randn(B, H * A, D), torch.randn(B, H, A)
    expected = nn.L1Loss()(head.predict_action(hidden), actions)
    torch.testing.assert_close(head.loss(hidden, actions), expected)
    total, count = head.loss_sum(hidden, actions, torch.ones(B, H, dtype=torch.bool))
    assert count.item() == B * H * A
    torch.testing.assert_close(total / count, expected)


def test_masked_error_sum_rejects_bad_mask():
    with pytest.raises(ValueError, match="Mask must be"):
        masked_error_sum(torch.zeros(B, H, A), torch.ones(B, H + 1, dtype=torch.bool))


def test_l1_head_learns_a_fixed_mapping():
    torch.manual_seed(0)
    head = L1RegressionActionHead(input_dim=D, hidden_dim=16, action_dim=A)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(32, H * A, D, generator=generator)
    target = torch.tanh(hidden.reshape(32, H, A * D) @ torch.randn(A * D, A, generator=generator) / 4)
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        loss = head.loss(hidden, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])


def test_sinusoidal_encoding_formula():
    t = torch.tensor([0, 7, 49])
    emb = SinusoidalPositionalEncoding(dim=D)(t)
    assert emb.shape == (3, D)
    half = D // 2
    freqs = np.exp(-math.log(10000) * np.arange(half) / (half - 1))
    args = t.numpy()[:, None] * freqs[None]
    np.testing.assert_allclose(emb.numpy(), np.concatenate([np.sin(args), np.cos(args)], axis=1), atol=1e-6)


def test_diffusion_head_keys_scheduler_and_shapes():
    head = DiffusionActionHead(input_dim=D, hidden_dim=D, action_dim=A)
    assert set(head.state_dict()) == _mlp_resnet_keys("noise_predictor.mlp_resnet.")
    assert head.state_dict()["noise_predictor.mlp_resnet.fc1.weight"].shape == (D, D * A)
    config = head.noise_scheduler.config
    assert (config.num_train_timesteps, config.beta_schedule) == (50, "squaredcos_cap_v2")
    assert (config.prediction_type, config.clip_sample, config.set_alpha_to_one) == ("epsilon", True, True)
    assert head.num_diffusion_steps_inference == 50
    actions = torch.rand(B, H, A) * 2 - 1
    sample = head.sample_noisy_actions(actions, torch.Generator().manual_seed(0))
    assert sample["noise"].shape == sample["noisy_actions"].shape == (B, H, A)
    assert sample["diffusion_timestep_embeddings"].shape == (B, 1, D)
    assert sample["timesteps"].shape == (B,) and 0 <= sample["timesteps"].min() <= sample["timesteps"].max() < 50
    again = head.sample_noisy_actions(actions, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again["noisy_actions"], sample["noisy_actions"])  # the generator decides everything
    alpha_bar = head.noise_scheduler.alphas_cumprod[sample["timesteps"]].view(B, 1, 1)
    expected = alpha_bar.sqrt() * actions + (1 - alpha_bar).sqrt() * sample["noise"]
    torch.testing.assert_close(sample["noisy_actions"], expected)
    assert head.predict_noise(torch.randn(B, H * A, D)).shape == (B, H, A)


def test_diffusion_masked_mse():
    noise_pred, noise = torch.randn(B, H, A), torch.randn(B, H, A)
    mask = torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1], [0, 0, 0, 1]], dtype=torch.bool)
    total, count = DiffusionActionHead.loss_sum(noise_pred, noise, mask)
    squared = ((noise_pred - noise).numpy() ** 2)[mask.numpy()]
    assert count.item() == 7 * A
    np.testing.assert_allclose(total.item(), squared.sum(), rtol=1e-5)
    torch.testing.assert_close(DiffusionActionHead.loss(noise_pred, noise), nn.MSELoss()(noise_pred, noise))


def _oracle(head: DiffusionActionHead, clean: torch.Tensor, calls: list[int]):
    """The exact noise of `x_t` w.r.t. the clean actions: what a perfect predictor returns."""
    alphas_cumprod = head.noise_scheduler.alphas_cumprod.double()

    def noise_fn(noisy: torch.Tensor, embeddings: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        assert embeddings.shape == (clean.shape[0], 1, D) and timesteps.shape == (clean.shape[0],)
        calls.append(int(timesteps[0]))
        alpha_bar = alphas_cumprod[timesteps].view(-1, 1, 1)
        return ((noisy.double() - alpha_bar.sqrt() * clean.double()) / (1 - alpha_bar).sqrt()).float()

    return noise_fn


@pytest.mark.parametrize("steps", [None, 10])
def test_diffusion_inference_with_oracle_recovers_clean_actions(steps):
    head = DiffusionActionHead(input_dim=D, hidden_dim=D, action_dim=A)
    clean = torch.rand(B, H, A, generator=torch.Generator().manual_seed(3)) * 1.6 - 0.8
    calls: list[int] = []
    out = head.sample_actions(_oracle(head, clean, calls), (B, H, A), torch.Generator().manual_seed(4),
                              num_inference_steps=steps)
    assert len(calls) == (steps or 50) and calls[0] > calls[-1] == 0
    torch.testing.assert_close(out, clean, atol=1e-4, rtol=0)
    wrong = head.sample_actions(lambda x, e, t: torch.zeros_like(x), (B, H, A), torch.Generator().manual_seed(4))
    assert (wrong - clean).abs().max() > 0.1


def test_projector_keys_and_shapes():
    noisy = NoisyActionProjector(llm_dim=D)
    assert {k: tuple(v.shape) for k, v in noisy.state_dict().items()} == {
        "fc1.weight": (D, 1), "fc1.bias": (D,), "fc2.weight": (D, D), "fc2.bias": (D,)}
    actions = torch.randn(B, H, A)
    slots = noisy(actions)
    assert slots.shape == (B, H * A, D)
    torch.testing.assert_close(slots[:, A + 1], noisy.fc2(nn.functional.gelu(noisy.fc1(actions[:, 1, 1:2]))))
    proprio = ProprioProjector(llm_dim=D, proprio_dim=5)
    assert {k: tuple(v.shape) for k, v in proprio.state_dict().items()} == {
        "fc1.weight": (D, 5), "fc1.bias": (D,), "fc2.weight": (D, D), "fc2.bias": (D,)}
    assert proprio(torch.randn(B, 5)).shape == (B, D)
