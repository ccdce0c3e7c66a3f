import pytest
import torch
from monai.transforms import ScaleIntensityRange, ScaleIntensityRangePercentiles

from medfm.errors import MedfmError
from medfm.kernels import normalize_percentiles, window, zscore


def test_window_matches_monai(gen):
    x = torch.rand(3, 1, 17, 23, generator=gen) * 2000 - 1000  # HU
    level = torch.tensor([60.0, -500.0, 50.0])
    width = torch.tensor([360.0, 1800.0, 400.0])
    out = window(x, level, width, out_range=(-1.0, 1.0))
    for b in range(3):
        lo, hi = float(level[b] - width[b] / 2), float(level[b] + width[b] / 2)
        ref = ScaleIntensityRange(lo, hi, -1.0, 1.0, clip=True)(x[b])
        torch.testing.assert_close(out[b], torch.as_tensor(ref), atol=1e-5, rtol=1e-5)
        one = window(x[b : b + 1], float(level[b]), float(width[b]), (-1.0, 1.0))
        torch.testing.assert_close(out[b : b + 1], one)
    assert out.min() == -1.0 and out.max() == 1.0
    torch.testing.assert_close(
        window(torch.tensor([[[60.0]]]), 60.0, 360.0), torch.tensor([[[0.5]]])
    )


@pytest.mark.parametrize(
    ("lower", "upper", "out_range", "clip"),
    [
        (0.5, 99.5, (0.0, 1.0), True),
        (5.0, 90.0, (-1.0, 1.0), False),
        (0.0, 100.0, (0.0, 1.0), True),
    ],
)
def test_normalize_percentiles_matches_monai(gen, lower, upper, out_range, clip):
    x = torch.randn(2, 2, 10, 20, 30, generator=gen) ** 3
    out = normalize_percentiles(x, lower, upper, out_range, clip)
    for b in range(2):
        tf = ScaleIntensityRangePercentiles(lower, upper, out_range[0], out_range[1], clip=clip)
        ref = torch.as_tensor(tf(x[b]))
        torch.testing.assert_close(out[b], ref, atol=1e-5, rtol=1e-5)
        q = torch.quantile(x[b].flatten(), torch.tensor([lower, upper]) / 100)
        expect = (x[b] - q[0]) / (q[1] - q[0]) * (out_range[1] - out_range[0]) + out_range[0]
        if clip:
            expect = expect.clamp(*sorted(out_range))
        torch.testing.assert_close(out[b], expect, atol=1e-5, rtol=1e-5)


def test_normalize_percentiles_constant_sample():
    out = normalize_percentiles(torch.full((1, 1, 4, 5), 3.0))
    assert torch.equal(out, torch.zeros(1, 1, 4, 5))


@pytest.mark.slow
def test_normalize_percentiles_over_16m_elements():
    x = torch.linspace(0, 1, 17_000_000).reshape(1, 1, 17, 1000, 1000)
    out = normalize_percentiles(x, 1.0, 99.0)
    assert out.min() == 0.0 and out.max() == 1.0
    assert abs(float(out[0, 0, 8, 500, 0]) - 0.5) < 1e-3


def test_zscore(gen):
    x = torch.rand(2, 3, 17, 23, generator=gen) * 5 + 2
    out = zscore(x)
    std, mean = torch.std_mean(out, dim=(1, 2, 3), correction=0)
    torch.testing.assert_close(mean, torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(std, torch.ones(2))
    mask = torch.zeros(2, 1, 17, 23, dtype=torch.bool)
    mask[:, :, 3:10, 5:15] = True
    masked = zscore(x, mask)
    inside = masked[mask.expand_as(x)].reshape(2, -1)
    std, mean = torch.std_mean(inside, dim=1, correction=0)
    torch.testing.assert_close(mean, torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(std, torch.ones(2))
    # Constant sample and empty mask: finite (centred only).
    const = zscore(torch.full((1, 1, 4, 5), 7.0))
    assert torch.equal(const, torch.zeros(1, 1, 4, 5))
    empty = zscore(x, torch.zeros_like(mask))
    torch.testing.assert_close(empty, x)


def test_intensity_rejects_bad_input(gen):
    x = torch.rand(2, 1, 4, 5, generator=gen)
    with pytest.raises(MedfmError):
        window(x, 0.0, 0.0)
    with pytest.raises(MedfmError):
        window(x, torch.zeros(3), 1.0)
    with pytest.raises(MedfmError):
        normalize_percentiles(x, 90.0, 10.0)
    with pytest.raises(MedfmError):
        zscore(x.long())
    with pytest.raises(MedfmError):
        zscore(x, torch.ones(2, 1, 4, 6, dtype=torch.bool))


@pytest.mark.gpu
def test_intensity_cuda_matches_cpu(gen, cuda):
    x = torch.randn(2, 1, 10, 20, 30, generator=gen)
    xc = x.to(cuda)
    torch.testing.assert_close(normalize_percentiles(xc).cpu(), normalize_percentiles(x))
    lev, wid = torch.tensor([0.0, 0.5]), torch.tensor([2.0, 1.0])
    torch.testing.assert_close(window(xc, lev.to(cuda), wid.to(cuda)).cpu(), window(x, lev, wid))
    torch.testing.assert_close(zscore(xc).cpu(), zscore(x))
