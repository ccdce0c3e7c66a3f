import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from medfm.errors import MedfmError
from medfm.kernels import gaussian_blur, gaussian_kernel1d


def scipy_blur(x: torch.Tensor, sigma, mode: str = "mirror") -> np.ndarray:
    """Reference: scipy per (b, c) image, float64."""
    a = x.double().numpy()
    out = np.empty_like(a)
    for b in range(a.shape[0]):
        s = sigma[b] if isinstance(sigma, list) and isinstance(sigma[0], list) else sigma
        for c in range(a.shape[1]):
            out[b, c] = ndi.gaussian_filter(a[b, c], s, mode=mode, truncate=3.0)
    return out


@pytest.mark.parametrize("sigma", [0.4, 1.0, 2.3])
def test_kernel1d_matches_scipy(sigma):
    k = gaussian_kernel1d(sigma)
    radius = int(3.0 * sigma + 0.5)
    assert k.shape == (2 * radius + 1,) and k.dtype == torch.float32
    delta = np.zeros(4 * radius + 1)
    delta[2 * radius] = 1.0
    ref = ndi.gaussian_filter1d(delta, sigma, truncate=3.0, mode="constant")
    np.testing.assert_allclose(k.numpy(), ref[radius : 3 * radius + 1], atol=1e-7)
    assert abs(float(k.sum()) - 1.0) < 1e-6
    assert torch.equal(gaussian_kernel1d(0.0), torch.ones(1))


def test_blur_2d_matches_scipy(gen):
    x = torch.rand(2, 3, 17, 23, generator=gen)
    out = gaussian_blur(x, 1.3)
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_allclose(out.numpy(), scipy_blur(x, 1.3), atol=1e-5)


def test_blur_3d_per_axis_matches_scipy(gen):
    x = torch.rand(1, 2, 10, 20, 30, generator=gen)
    sigma = [1.0, 2.0, 0.7]
    np.testing.assert_allclose(gaussian_blur(x, sigma).numpy(), scipy_blur(x, sigma), atol=1e-5)


def test_blur_zero_axis_untouched(gen):
    x = torch.rand(1, 1, 10, 20, 30, generator=gen)
    out = gaussian_blur(x, (0.0, 1.5, 0.0))
    np.testing.assert_allclose(out.numpy(), scipy_blur(x, [0.0, 1.5, 0.0]), atol=1e-5)
    # A sample constant along the only blurred axis comes back unchanged.
    const = x[:, :, :, :1, :].expand_as(x).contiguous()
    torch.testing.assert_close(gaussian_blur(const, (0.0, 1.5, 0.0)), const)


def test_blur_identity_at_zero(gen):
    x = torch.rand(2, 1, 17, 23, generator=gen)
    out = gaussian_blur(x, 0.0)
    assert torch.equal(out, x) and out is not x
    assert torch.equal(gaussian_blur(x, torch.zeros(2)), x)
    assert torch.equal(gaussian_blur(x, torch.zeros(2, 2)), x)


@pytest.mark.parametrize("shape", [(3, 2, 17, 23), (2, 1, 10, 20, 30)])
def test_per_sample_sigma_equals_separate_calls(gen, shape):
    x = torch.rand(*shape, generator=gen)
    nd = len(shape) - 2
    sig = torch.tensor([0.6, 2.1, 0.0][: shape[0]])
    out = gaussian_blur(x, sig)
    per_axis = torch.rand(shape[0], nd, generator=gen) * 2.0
    out_axes = gaussian_blur(x, per_axis)
    for b in range(shape[0]):
        torch.testing.assert_close(out[b : b + 1], gaussian_blur(x[b : b + 1], float(sig[b])))
        ref = gaussian_blur(x[b : b + 1], per_axis[b].tolist())
        torch.testing.assert_close(out_axes[b : b + 1], ref)
        s = per_axis[b].tolist()
        np.testing.assert_allclose(out_axes[b].numpy(), scipy_blur(x[b : b + 1], s)[0], atol=1e-5)


def test_blur_keeps_mean(gen):
    # Compact blob far from the borders: blurring only spreads it, the sum is kept.
    x = torch.zeros(2, 1, 30, 40)
    x[:, :, 12:18, 15:25] = torch.rand(2, 1, 6, 10, generator=gen)
    out = gaussian_blur(x, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(out.sum(dim=(2, 3)), x.sum(dim=(2, 3)), rtol=1e-5, atol=1e-5)
    assert out.std() < x.std()


def test_short_axis_falls_back_to_replicate(gen):
    x = torch.rand(1, 1, 3, 20, generator=gen)
    out = gaussian_blur(x, (2.0, 0.0))  # radius 6 >= length 3: 'reflect' impossible
    ref = scipy_blur(x, [2.0, 0.0], mode="nearest")
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-5)


def test_blur_rejects_bad_input(gen):
    x = torch.rand(2, 1, 10, 12, generator=gen)
    with pytest.raises(MedfmError):
        gaussian_blur(x, -1.0)
    with pytest.raises(MedfmError):
        gaussian_blur(x, [1.0, 1.0, 1.0])
    with pytest.raises(MedfmError):
        gaussian_blur(x, torch.ones(3))
    with pytest.raises(MedfmError):
        gaussian_blur(x.long(), 1.0)
    with pytest.raises(MedfmError):
        gaussian_blur(torch.rand(10, 12), 1.0)


@pytest.mark.gpu
def test_blur_cuda_matches_cpu(gen, cuda):
    x = torch.rand(2, 1, 10, 20, 30, generator=gen)
    sig = torch.tensor([0.8, 1.7])
    out = gaussian_blur(x.to(cuda), sig.to(cuda))
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), gaussian_blur(x, sig), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gaussian_blur(x.to(cuda), 1.2).cpu(), gaussian_blur(x, 1.2))
