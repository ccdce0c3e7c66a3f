import math

import pytest
import torch

from medfm.kernels import gaussian_blur, gaussian_kernel1d, rayleigh_speckle


def test_speckle_is_rayleigh_with_unit_power():
    g = torch.Generator().manual_seed(3)
    nr = torch.randn(1, 1, 512, 512, generator=g)
    ni = torch.randn(1, 1, 512, 512, generator=g)
    env = rayleigh_speckle(nr, ni, 1.5)[..., 8:-8, 8:-8]  # away from reflect-padded borders
    assert env.min() >= 0
    mean, std = float(env.mean()), float(env.std())
    assert abs(mean / std - math.sqrt(math.pi / (4 - math.pi))) < 0.05
    assert abs(mean - math.sqrt(math.pi) / 2) < 0.02
    assert abs(float(env.square().mean()) - 1.0) < 0.03


def test_speckle_scaling_is_analytic(gen):
    nr = torch.randn(2, 1, 17, 23, generator=gen)
    ni = torch.randn(2, 1, 17, 23, generator=gen)
    sigma = (1.0, 2.0)
    env = rayleigh_speckle(nr, ni, sigma)
    power = 2.0
    for s in sigma:
        power *= float(gaussian_kernel1d(s, dtype=torch.float64).square().sum())
    raw = torch.hypot(gaussian_blur(nr, sigma), gaussian_blur(ni, sigma))
    torch.testing.assert_close(env, raw / math.sqrt(power))


def test_speckle_per_sample_sigma_equals_separate_calls(gen):
    nr = torch.randn(3, 2, 10, 20, 30, generator=gen)
    ni = torch.randn(3, 2, 10, 20, 30, generator=gen)
    sigma = torch.tensor([0.0, 0.8, 1.6])
    env = rayleigh_speckle(nr, ni, sigma)
    for b in range(3):
        one = rayleigh_speckle(nr[b : b + 1], ni[b : b + 1], float(sigma[b]))
        torch.testing.assert_close(env[b : b + 1], one)
    # sigma 0: no PSF, the envelope of unit complex white noise scaled to unit power.
    torch.testing.assert_close(env[0], torch.hypot(nr[0], ni[0]) / math.sqrt(2))


@pytest.mark.gpu
def test_speckle_cuda_matches_cpu(gen, cuda):
    nr = torch.randn(2, 1, 10, 20, 30, generator=gen)
    ni = torch.randn(2, 1, 10, 20, 30, generator=gen)
    sigma = torch.tensor([0.7, 1.4])
    out = rayleigh_speckle(nr.to(cuda), ni.to(cuda), sigma.to(cuda))
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), rayleigh_speckle(nr, ni, sigma), atol=1e-5, rtol=1e-5)
