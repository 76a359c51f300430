"""π0's flow matching (`vla_train/models/pi0/flow.py`): the time embedding's formula, Beta(1.5, 1) times, the
interpolant and target, the masked loss, and the Euler sampler on problems whose exact velocity field is known."""

import math

import numpy as np
import pytest
import torch

from vla_train.models.pi0.flow import euler_sample, flow_loss_sum, sample_time, time_embedding, training_sample


def test_time_embedding_is_sines_then_cosines_over_log_spaced_periods():
    t = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    emb = time_embedding(t, 8)
    periods = [4e-3 * (4.0 / 4e-3) ** (k / 3) for k in range(4)]  # k / (dim/2 - 1)
    expected = [[math.sin(2 * math.pi * x / p) for p in periods] + [math.cos(2 * math.pi * x / p) for p in periods]
                for x in t.tolist()]
    np.testing.assert_allclose(emb.numpy(), expected, atol=1e-12)
    assert time_embedding(t.float(), 1024).shape == (3, 1024) and time_embedding(t.float(), 6).dtype == torch.float32
    with pytest.raises(ValueError, match="even"):
        time_embedding(t, 7)


def test_times_follow_the_scaled_beta_1_5_1():
    t = sample_time(200_000, torch.Generator().manual_seed(0)).double()
    assert 0.001 <= t.min() and t.max() <= 1.0
    u = (t - 0.001) / 0.999  # Beta(1.5, 1): mean 0.6, P(u < 0.5) = 0.5 ** 1.5
    assert abs(u.mean().item() - 0.6) < 0.003
    assert abs((u < 0.5).double().mean().item() - 0.5 ** 1.5) < 0.003
    first, again = (sample_time(4, torch.Generator().manual_seed(1)) for _ in range(2))
    assert torch.equal(first, again)


def test_training_sample_interpolates_noise_and_actions():
    actions = torch.randn(3, 5, 4)
    sample = training_sample(actions, torch.Generator().manual_seed(0))
    t = sample["time"][:, None, None]
    torch.testing.assert_close(sample["x_t"], t * sample["noise"] + (1 - t) * actions)
    torch.testing.assert_close(sample["target"], sample["noise"] - actions)


def test_the_loss_covers_valid_steps_and_unpadded_dimensions_only():
    predicted, target = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    target[..., 3] = float("nan")  # a padded dimension: never read
    target[1, 2] = float("inf")  # a step past the episode's end: selected out
    mask = torch.tensor([[True, True, True], [True, True, False]])
    total, count = flow_loss_sum(predicted, target, mask, action_dim=3)
    assert total.item() == 5 * 3 and count.item() == 5 * 3


def test_euler_reaches_a_point_mass_exactly():
    """Data = one chunk a*: the exact velocity at x_t is (x_t - a*) / t, and Euler's steps are exact on it."""
    target = torch.randn(2, 4, 3, dtype=torch.float64)
    noise = torch.randn(2, 4, 3, dtype=torch.float64)
    out = euler_sample(lambda x, t: (x - target) / t[:, None, None], noise, num_steps=10)
    torch.testing.assert_close(out, target)


def test_euler_on_a_gaussian_data_distribution_approaches_its_transport():
    """Data N(m, s^2) per element: the marginal velocity is known in closed form; with many steps Euler carries each
    noise sample to `m + s * noise` (the flow's deterministic coupling)."""
    m, s = 0.7, 0.3

    def velocity(x, t):
        t = t[:, None, None]
        var = t ** 2 + (1 - t) ** 2 * s ** 2  # x_t ~ N((1-t) m, var)
        return (t - (1 - t) * s ** 2) / var * (x - (1 - t) * m) - m

    noise = torch.randn(4, 5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = euler_sample(velocity, noise, num_steps=2000)
    torch.testing.assert_close(out, m + s * noise, rtol=0, atol=2e-3)
    with pytest.raises(ValueError, match="num_steps"):
        euler_sample(velocity, noise, num_steps=0)
