import math

import pytest
import torch

from medfm.kernels import (
    fftn_c,
    ghosting,
    ifftn_c,
    motion_lines,
    partial_fourier_mask,
    rician_magnitude,
    truncate_kspace,
    undersample,
)


@pytest.mark.parametrize("shape", [(2, 3, 17, 23), (1, 2, 10, 20, 30)])
def test_fft_round_trip_and_layout(gen, shape):
    x = torch.rand(*shape, generator=gen)
    k = fftn_c(x)
    assert k.is_complex() and k.shape == x.shape
    torch.testing.assert_close(ifftn_c(k).real, x, atol=1e-5, rtol=0)
    assert ifftn_c(k).imag.abs().max() < 1e-5
    # Orthonormal (Parseval) and DC at index L // 2 of every axis.
    torch.testing.assert_close(k.abs().square().sum(), x.square().sum(), rtol=1e-5, atol=0)
    dc = k[(slice(None), slice(None)) + tuple(n // 2 for n in shape[2:])]
    n_vox = math.prod(shape[2:])
    torch.testing.assert_close(dc.real, x.sum(dim=tuple(range(2, x.ndim))) / math.sqrt(n_vox))


def test_truncate_kspace(gen):
    x = torch.rand(3, 1, 17, 24, generator=gen)
    k = fftn_c(x)
    assert torch.equal(truncate_kspace(k, 1.0), k)
    t = truncate_kspace(k, 0.5)
    kept = t != 0
    # Rows: q = n - 8 in [-4.25, 4.25) -> 9 rows; cols: q = n - 12 in [-6, 6) -> 12 columns.
    assert kept[0, 0].sum() == 9 * 12
    assert kept[0, 0, 8, 12] and kept[0, 0, 4, 6] and not kept[0, 0, 3, 6]
    assert torch.equal(t[kept], k[kept])
    keep = torch.tensor([0.3, 0.7, 1.0])
    tb = truncate_kspace(k, keep)
    for b in range(3):
        assert torch.equal(tb[b : b + 1], truncate_kspace(k[b : b + 1], float(keep[b])))
    # Gibbs ringing: a step edge over- and undershoots after truncation.
    step = torch.zeros(1, 1, 8, 64)
    step[..., 16:48] = 1.0
    ringing = ifftn_c(truncate_kspace(fftn_c(step), 0.4)).real
    assert ringing.max() > 1.05 and ringing.min() < -0.05


def test_ghosting_mask_and_identity(gen):
    x = torch.rand(2, 2, 17, 24, generator=gen)
    k = fftn_c(x)
    assert torch.equal(ghosting(k, 4, 0.0), k)
    n = torch.tensor([3, 5])
    inten = torch.tensor([0.5, 0.8])
    out = ghosting(k, n, inten, axis=-1)
    for b in range(2):
        factor = torch.ones(24)
        for line in range(24):
            if line % int(n[b]) == 0 and line != 12:
                factor[line] = 1 - float(inten[b])
        torch.testing.assert_close(out[b], k[b] * factor)
        one = ghosting(k[b : b + 1], int(n[b]), float(inten[b]))
        torch.testing.assert_close(out[b : b + 1], one)
    # Along the rows (axis 2): the centre row 17 // 2 = 8 is untouched.
    rows = ghosting(k, 2, 1.0, axis=2)
    assert torch.equal(rows[:, :, 8], k[:, :, 8])
    assert torch.equal(rows[:, :, 0], torch.zeros_like(k[:, :, 0]))
    assert torch.equal(rows[:, :, 1], k[:, :, 1])


def test_ghosts_are_spaced_l_over_n(gen):
    # Scaling every n-th line is a comb in k-space: the change in the image repeats every L / n
    # voxels along the axis (the untouched centre line only adds a term constant along it).
    x = torch.rand(1, 1, 16, 24, generator=gen)
    k = fftn_c(x)
    diff = ifftn_c(ghosting(k, 4, 0.7, axis=-1) - k)
    torch.testing.assert_close(torch.roll(diff, 6, dims=-1), diff, atol=1e-5, rtol=0)
    assert diff.abs().max() > 0.01


def test_motion_lines_shift_theorem(gen):
    x = torch.rand(2, 1, 17, 24, generator=gen)
    k = fftn_c(x)
    all_lines = torch.ones(2, 24, dtype=torch.bool)
    assert torch.equal(motion_lines(k, all_lines, torch.zeros(2, 2)), k)
    shift = torch.tensor([[2.0, -3.0], [-5.0, 7.0]])
    moved = ifftn_c(motion_lines(k, all_lines, shift)).real
    for b in range(2):
        rolled = torch.roll(x[b], shifts=(2, -3) if b == 0 else (-5, 7), dims=(1, 2))
        torch.testing.assert_close(moved[b], rolled, atol=1e-5, rtol=0)
    # Only the masked lines change, along the chosen axis.
    mask = torch.zeros(2, 17, dtype=torch.bool)
    mask[:, 10:] = True
    part = motion_lines(k, mask, shift, axis=2)
    assert torch.equal(part[:, :, :10], k[:, :, :10])
    full = motion_lines(k, torch.ones(2, 17, dtype=torch.bool), shift, axis=2)
    torch.testing.assert_close(part[:, :, 10:], full[:, :, 10:])


def test_motion_lines_3d_fractional(gen):
    x = torch.rand(1, 1, 10, 20, 30, generator=gen)
    k = fftn_c(x)
    shift = torch.tensor([[1.0, 0.0, -4.0]])
    mask = torch.ones(1, 30, dtype=torch.bool)
    moved = ifftn_c(motion_lines(k, mask, shift)).real
    torch.testing.assert_close(moved, torch.roll(x, (1, -4), (2, 4)), atol=1e-5, rtol=0)
    # A half-voxel shift twice equals a one-voxel shift; the magnitude spectrum is unchanged.
    half = motion_lines(k, mask, torch.tensor([[0.5, 0.0, 0.0]]))
    twice = motion_lines(half, mask, torch.tensor([[0.5, 0.0, 0.0]]))
    torch.testing.assert_close(twice, motion_lines(k, mask, torch.tensor([[1.0, 0.0, 0.0]])))
    torch.testing.assert_close(half.abs(), k.abs())


def test_undersample(gen):
    k = fftn_c(torch.rand(2, 1, 17, 24, generator=gen))
    mask = torch.rand(2, 24, generator=gen) > 0.5
    out = undersample(k, mask)
    for b in range(2):
        assert torch.equal(out[b][..., mask[b]], k[b][..., mask[b]])
        assert torch.equal(out[b][..., ~mask[b]], torch.zeros_like(k[b][..., ~mask[b]]))


def test_partial_fourier_mask():
    m = partial_fourier_mask(24, 0.625)
    assert m.dtype == torch.bool and m.shape == (24,)
    assert m.sum() == 15 and m[:15].all() and not m[15:].any()
    for length in (16, 17, 24, 25):
        assert partial_fourier_mask(length, 0.5)[length // 2]
    assert partial_fourier_mask(24, 1.0).all()
    for bad in (0.4, 1.1):
        with pytest.raises(ValueError):
            partial_fourier_mask(24, bad)


def test_rician_rayleigh_statistics():
    g = torch.Generator().manual_seed(7)
    shape = (2, 1, 256, 256)
    nr, ni = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    sigma = torch.tensor([0.5, 2.0])
    out = rician_magnitude(torch.zeros(shape), nr, ni, sigma)
    mean = out.mean(dim=(1, 2, 3))
    torch.testing.assert_close(mean, sigma * math.sqrt(math.pi / 2), rtol=0.01, atol=0)
    # High SNR: nearly Gaussian around the signal.
    high = rician_magnitude(torch.full(shape, 10.0), nr, ni, 0.1)
    assert abs(float(high.mean()) - 10.0) < 0.01
    # Complex input and sigma 0.
    z = torch.complex(nr, ni)
    torch.testing.assert_close(rician_magnitude(z, ni, nr, 0.0), z.abs())
    ref = (z + 0.3 * torch.complex(ni, nr)).abs()
    torch.testing.assert_close(rician_magnitude(z, ni, nr, 0.3), ref)


@pytest.mark.gpu
def test_kspace_cuda_matches_cpu(gen, cuda):
    x = torch.rand(2, 1, 10, 20, 30, generator=gen)
    shift = torch.tensor([[1.0, 2.5, -3.0], [0.0, 0.0, 4.0]])
    mask = torch.rand(2, 30, generator=gen) > 0.5

    def chain(t, s, m):
        k = ghosting(fftn_c(t), 3, 0.4)
        k = truncate_kspace(motion_lines(k, m, s), 0.8)
        return ifftn_c(undersample(k, m)).abs()

    out = chain(x.to(cuda), shift.to(cuda), mask.to(cuda))
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), chain(x, shift, mask), atol=1e-5, rtol=1e-5)
