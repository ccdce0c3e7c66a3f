import pytest
import torch

from medfm.errors import MedfmError
from medfm.kernels import fractal_field, smooth_field


def test_smooth_field_reproduces_linear_ramps_2d():
    # Linear interpolation with align_corners=True maps a linear coarse ramp onto the same ramp.
    coarse = torch.stack(torch.meshgrid(torch.arange(3.0), torch.arange(4.0), indexing="ij"))
    coarse = (2.0 * coarse[0] - 0.5 * coarse[1])[None, None]  # (1, 1, 3, 4)
    out = smooth_field(coarse, (17, 23))
    r = torch.linspace(0, 2, 17)[:, None]
    c = torch.linspace(0, 3, 23)[None, :]
    assert out.shape == (1, 1, 17, 23)
    torch.testing.assert_close(out[0, 0], 2.0 * r - 0.5 * c)


def test_smooth_field_3d_corners_and_constant_axis(gen):
    coarse = torch.randn(2, 3, 4, 1, 5, generator=gen)
    out = smooth_field(coarse, (10, 20, 30))
    assert out.shape == (2, 3, 10, 20, 30)
    torch.testing.assert_close(out[:, :, 0, 0, 0], coarse[:, :, 0, 0, 0])
    torch.testing.assert_close(out[:, :, -1, 0, -1], coarse[:, :, -1, 0, -1])
    # A coarse axis of length 1 gives a field constant along that axis.
    torch.testing.assert_close(out, out[:, :, :, :1, :].expand_as(out))
    # Smooth: neighbouring voxels differ far less than the coarse nodes do.
    assert out.diff(dim=-1).abs().max() < coarse.diff(dim=-1).abs().max() / 4


def test_fractal_field_standardised(gen):
    octaves = [torch.randn(2, 3, 2**i + 1, 2**i + 2, generator=gen) for i in range(4)]
    out = fractal_field(octaves, (17, 23))
    assert out.shape == (2, 3, 17, 23)
    std, mean = torch.std_mean(out, dim=(2, 3), correction=0)
    torch.testing.assert_close(mean, torch.zeros(2, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(std, torch.ones(2, 3))


def test_fractal_field_weights(gen):
    octaves = [torch.randn(2, 1, 3 * 2**i, 4 * 2**i, 5, generator=gen) for i in range(3)]
    size = (10, 20, 30)
    # persistence 0: only the first octave (0 ** 0 = 1), standardised.
    only_first = fractal_field(octaves, size, persistence=0.0)
    ref = smooth_field(octaves[0], size)
    std, mean = torch.std_mean(ref, dim=(2, 3, 4), correction=0, keepdim=True)
    torch.testing.assert_close(only_first, (ref - mean) / std, atol=1e-5, rtol=1e-5)
    # Explicit weighted sum.
    p = 0.7
    total = sum(p**i * smooth_field(o, size) for i, o in enumerate(octaves))
    std, mean = torch.std_mean(total, dim=(2, 3, 4), correction=0, keepdim=True)
    out = fractal_field(octaves, size, persistence=p)
    torch.testing.assert_close(out, (total - mean) / std, atol=1e-5, rtol=1e-5)


def test_fractal_field_per_sample_persistence(gen):
    octaves = [torch.randn(3, 2, 2 + 2 * i, 3 + 2 * i, generator=gen) for i in range(3)]
    p = torch.tensor([0.2, 0.5, 0.9])
    out = fractal_field(octaves, (17, 23), persistence=p)
    for b in range(3):
        one = fractal_field([o[b : b + 1] for o in octaves], (17, 23), persistence=float(p[b]))
        torch.testing.assert_close(out[b : b + 1], one)


def test_fractal_field_constant_is_zero_not_nan():
    octaves = [torch.full((1, 1, 3, 3), 2.0), torch.full((1, 1, 5, 5), -1.0)]
    out = fractal_field(octaves, (17, 23))
    assert torch.isfinite(out).all()
    assert out.abs().max() < 1e-5


def test_noise_rejects_bad_input(gen):
    with pytest.raises(MedfmError):
        fractal_field([], (10, 10))
    with pytest.raises(MedfmError):
        smooth_field(torch.randn(1, 1, 3, 3), (10, 10, 10))
    with pytest.raises(MedfmError):
        fractal_field([torch.randn(2, 1, 3, 3), torch.randn(1, 1, 5, 5)], (10, 10))
    with pytest.raises(MedfmError):
        fractal_field([torch.randn(2, 1, 3, 3)], (10, 10), persistence=torch.ones(3))


@pytest.mark.gpu
def test_noise_cuda_matches_cpu(gen, cuda):
    octaves = [torch.randn(2, 1, 2**i + 1, 2**i + 1, 3, generator=gen) for i in range(3)]
    p = torch.tensor([0.3, 0.6])
    out = fractal_field([o.to(cuda) for o in octaves], (10, 20, 30), p.to(cuda))
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), fractal_field(octaves, (10, 20, 30), p))
