import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from medfm.errors import MedfmError
from medfm.kernels import resample_to_spacing


def scipy_zoom(x: torch.Tensor, out_spatial, order: int) -> np.ndarray:
    a = x.double().numpy() if x.is_floating_point() else x.numpy()
    zoom = [1.0, 1.0] + [o / n for o, n in zip(out_spatial, x.shape[2:], strict=True)]
    return ndi.zoom(a, zoom, order=order, grid_mode=False, mode="nearest")


def test_equal_spacing_is_identity(gen):
    x = torch.rand(2, 1, 10, 20, 30, generator=gen)
    out = resample_to_spacing(x, (1.5, 1.0, 2.0), (1.5, 1.0, 2.0))
    assert torch.equal(out, x) and out is not x
    labels = (x * 5).to(torch.uint8)
    assert torch.equal(resample_to_spacing(labels, (1, 1, 1), (1, 1, 1), mode="nearest"), labels)


def test_output_size_rule(gen):
    x = torch.rand(1, 1, 10, 20, 30, generator=gen)
    out = resample_to_spacing(x, (1.0, 1.0, 1.0), (2.0, 0.7, 100.0))
    # 10 * 1 / 2 = 5, 20 / 0.7 = 28.57 -> 29, 30 / 100 = 0.3 -> max(1, 0) = 1
    assert out.shape == (1, 1, 5, 29, 1)


@pytest.mark.parametrize(
    ("shape", "sp_in", "sp_out"),
    [((2, 2, 17, 23), (1.0, 0.8), (0.6, 1.7)), ((1, 1, 10, 20, 30), (2.5, 1.0, 0.9), (1, 1.3, 2))],
)
def test_linear_matches_scipy_zoom(gen, shape, sp_in, sp_out):
    x = torch.rand(*shape, generator=gen)
    out = resample_to_spacing(x, sp_in, sp_out)
    expect = tuple(
        max(1, round(n * a / b)) for n, a, b in zip(shape[2:], sp_in, sp_out, strict=True)
    )
    assert out.shape[2:] == expect
    np.testing.assert_allclose(out.numpy(), scipy_zoom(x, expect, order=1), atol=1e-5)
    # Corner voxel centres stay put.
    nd = len(shape) - 2
    for corner in (0, -1):
        idx = (slice(None), slice(None)) + (corner,) * nd
        torch.testing.assert_close(out[idx], x[idx])


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.float32])
def test_nearest_matches_scipy_and_keeps_dtype(gen, dtype):
    labels = torch.randint(0, 6, (2, 1, 10, 20, 30), generator=gen).to(dtype)
    out = resample_to_spacing(labels, (1.0, 1.0, 1.0), (0.4, 1.5, 2.0), mode="nearest")
    assert out.dtype == dtype and out.shape == (2, 1, 25, 13, 15)
    np.testing.assert_array_equal(out.numpy(), scipy_zoom(labels, (25, 13, 15), order=0))
    assert set(out.unique().tolist()) <= set(labels.unique().tolist())


def test_resample_rejects_bad_input(gen):
    x = torch.rand(1, 1, 10, 20, generator=gen)
    with pytest.raises(MedfmError):
        resample_to_spacing(x, (1.0,), (1.0,))
    with pytest.raises(MedfmError):
        resample_to_spacing(x, (1.0, 0.0), (1.0, 1.0))
    with pytest.raises(MedfmError):
        resample_to_spacing(x.long(), (1.0, 1.0), (2.0, 2.0))
    with pytest.raises(MedfmError):
        resample_to_spacing(x, (1.0, 1.0), (2.0, 2.0), mode="cubic")


@pytest.mark.gpu
def test_resample_cuda_matches_cpu(gen, cuda):
    x = torch.rand(1, 1, 10, 20, 30, generator=gen)
    args = ((1.0, 1.0, 1.0), (0.7, 1.3, 2.0))
    torch.testing.assert_close(
        resample_to_spacing(x.to(cuda), *args).cpu(), resample_to_spacing(x, *args)
    )
    labels = (x * 5).long()
    near = resample_to_spacing(labels.to(cuda), *args, mode="nearest").cpu()
    assert torch.equal(near, resample_to_spacing(labels, *args, mode="nearest"))
