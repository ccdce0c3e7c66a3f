import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from medfm.errors import MedfmError
from medfm.kernels import elastic_displacement, identity_grid, smooth_field, warp, warp_labels


def scipy_warp(x: torch.Tensor, d: torch.Tensor, order: int) -> np.ndarray:
    """Reference: map_coordinates at p + d(p) per (b, c), float64."""
    a, dd = x.double().numpy(), d.double().numpy()
    grid = identity_grid(x.shape[2:], dtype=torch.float64).numpy()
    out = np.empty_like(a)
    for b in range(a.shape[0]):
        for c in range(a.shape[1]):
            out[b, c] = ndi.map_coordinates(a[b, c], grid + dd[b], order=order, mode="nearest")
    return out


def inside(d: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """(B, *S) True where p + d(p) stays at least `margin` inside the grid on every axis."""
    coords = identity_grid(d.shape[2:]) + d
    ok = torch.ones(d.shape[0], *d.shape[2:], dtype=torch.bool)
    for j, n in enumerate(d.shape[2:]):
        ok &= (coords[:, j] >= margin) & (coords[:, j] <= n - 1 - margin)
    return ok


def test_identity_grid():
    g = identity_grid((10, 20, 30))
    assert g.shape == (3, 10, 20, 30) and g.dtype == torch.float32
    assert g[0, 4, 7, 9] == 4 and g[1, 4, 7, 9] == 7 and g[2, 4, 7, 9] == 9
    assert identity_grid((3, 4), dtype=torch.float64).dtype == torch.float64


# grid_sample takes float32 coordinates normalised to [-1, 1]; near the borders they resolve
# ~6e-8 * (L - 1) / 2 voxels, so "identity" holds to about 1e-7 * L times the local step.
@pytest.mark.parametrize(("shape", "atol"), [((2, 3, 17, 23), 1e-6), ((1, 2, 10, 20, 30), 5e-6)])
def test_zero_displacement_is_identity(gen, shape, atol):
    x = torch.rand(*shape, generator=gen)
    d = torch.zeros(shape[0], len(shape) - 2, *shape[2:])
    torch.testing.assert_close(warp(x, d), x, atol=atol, rtol=0)
    assert torch.equal(warp(x, d, mode="nearest"), x)
    labels = (x * 7).long()
    assert torch.equal(warp_labels(labels, d), labels)


@pytest.mark.parametrize("shape", [(2, 2, 17, 23), (1, 2, 10, 20, 30)])
def test_warp_matches_map_coordinates(gen, shape):
    x = torch.rand(*shape, generator=gen)
    nd = len(shape) - 2
    d = (torch.rand(shape[0], nd, *shape[2:], generator=gen) - 0.5) * 3.0
    ok = inside(d)[:, None].expand_as(x).numpy()
    out = warp(x, d).numpy()
    np.testing.assert_allclose(out[ok], scipy_warp(x, d, order=1)[ok], atol=1e-5)
    near = warp(x, d, mode="nearest").numpy()
    np.testing.assert_array_equal(near[ok], scipy_warp(x, d, order=0)[ok].astype(np.float32))


def test_constant_shift_equals_roll(gen):
    x = torch.rand(2, 1, 17, 23, generator=gen)
    d = torch.zeros(2, 2, 17, 23)
    d[:, 0], d[:, 1] = 2.0, -3.0  # axis 0 (rows) by +2, axis 1 (cols) by -3
    rolled = torch.roll(x, shifts=(-2, 3), dims=(2, 3))  # out(p) = x(p + d)
    for mode in ("bilinear", "nearest"):
        out = warp(x, d, mode=mode)
        torch.testing.assert_close(out[..., 3:-3, 3:-3], rolled[..., 3:-3, 3:-3], atol=1e-5, rtol=0)
    x3 = torch.rand(1, 1, 10, 20, 30, generator=gen)
    d3 = torch.zeros(1, 3, 10, 20, 30)
    d3[:, 2] = 4.0
    out3 = warp(x3, d3)
    torch.testing.assert_close(out3[..., :-4], x3[..., 4:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_label_warp_keeps_values_and_dtype(gen, dtype):
    labels = torch.randint(0, 2 if dtype == torch.bool else 5, (2, 1, 17, 23), generator=gen)
    labels = (labels * 3 + 1).to(dtype) if dtype != torch.bool else labels.bool()
    if dtype == torch.int64:
        labels[0, 0, 0, 0] = 2**40  # beyond float32's exact integers
    d = elastic_displacement(torch.randn(2, 2, 4, 5, generator=gen), (17, 23), 3.0)
    out = warp_labels(labels, d)
    assert out.dtype == dtype and out.shape == labels.shape
    assert set(out.unique().tolist()) <= set(labels.unique().tolist())
    assert not torch.equal(out, labels)
    ref = scipy_warp(labels.double(), d, order=0)
    ok = inside(d)[:, None].numpy()
    np.testing.assert_array_equal(out.double().numpy()[ok], ref[ok])


def test_elastic_displacement(gen):
    coarse = torch.randn(3, 3, 3, 4, 5, generator=gen)
    mag = torch.tensor([0.0, 1.5, 4.0])
    d = elastic_displacement(coarse, (10, 20, 30), mag)
    assert d.shape == (3, 3, 10, 20, 30)
    assert torch.equal(d[0], torch.zeros_like(d[0]))
    for b in range(3):
        one = elastic_displacement(coarse[b : b + 1], (10, 20, 30), float(mag[b]))
        torch.testing.assert_close(d[b : b + 1], one)
    torch.testing.assert_close(d[2:], smooth_field(coarse[2:], (10, 20, 30)) * 4.0)
    with pytest.raises(MedfmError):
        elastic_displacement(torch.randn(1, 2, 3, 3, 3), (10, 20, 30), 1.0)


def test_displacement_batch_one_is_broadcast(gen):
    x = torch.rand(3, 1, 17, 23, generator=gen)
    d = elastic_displacement(torch.randn(1, 2, 3, 4, generator=gen), (17, 23), 2.0)
    torch.testing.assert_close(warp(x, d), warp(x, d.expand(3, -1, -1, -1)))


def test_warp_rejects_bad_input(gen):
    x = torch.rand(2, 1, 17, 23, generator=gen)
    d = torch.zeros(2, 2, 17, 23)
    with pytest.raises(MedfmError):
        warp(x.long(), d)
    with pytest.raises(MedfmError):
        warp(x, d[:, :1])
    with pytest.raises(MedfmError):
        warp(x, d, mode="bicubic")
    with pytest.raises(MedfmError):
        warp(x, d, padding_mode="wrap")


@pytest.mark.gpu
def test_warp_cuda_matches_cpu(gen, cuda):
    x = torch.rand(2, 1, 10, 20, 30, generator=gen)
    d = elastic_displacement(torch.randn(2, 3, 3, 4, 5, generator=gen), (10, 20, 30), 2.0)
    out = warp(x.to(cuda), d.to(cuda))
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), warp(x, d), atol=1e-5, rtol=1e-5)
    labels = (x * 4).long()
    lab = warp_labels(labels.to(cuda), d.to(cuda)).cpu()
    assert set(lab.unique().tolist()) <= set(labels.unique().tolist())
