import itertools

import numpy as np
import pytest
import torch

from medfm.errors import MedfmError
from medfm.kernels import bias_field, n_bias_coeffs


def numpy_bias(coeffs: np.ndarray, size, order: int) -> np.ndarray:
    """Explicit loop over the documented monomial order (first axis outermost)."""
    axes = np.meshgrid(*[np.linspace(-1, 1, n) for n in size], indexing="ij")
    out = np.zeros((coeffs.shape[0],) + tuple(size))
    for b in range(coeffs.shape[0]):
        m = 0
        for exps in itertools.product(range(order + 1), repeat=len(size)):
            if sum(exps) > order:
                continue
            mono = np.ones(tuple(size))
            for ax, e in zip(axes, exps, strict=True):
                mono = mono * ax**e
            out[b] += coeffs[b, m] * mono
            m += 1
    return np.exp(out)[:, None]


@pytest.mark.parametrize(("ndim", "order"), [(2, 0), (2, 3), (3, 1), (3, 3), (3, 5)])
def test_n_bias_coeffs_counts_monomials(ndim, order):
    brute = sum(1 for e in itertools.product(range(order + 1), repeat=ndim) if sum(e) <= order)
    assert n_bias_coeffs(ndim, order) == brute


@pytest.mark.parametrize(("size", "order"), [((17, 23), 3), ((10, 20, 30), 2)])
def test_bias_field_matches_numpy_loop(gen, size, order):
    n = n_bias_coeffs(len(size), order)
    coeffs = torch.randn(2, n, generator=gen) * 0.3
    out = bias_field(coeffs, size, order)
    assert out.shape == (2, 1, *size) and out.dtype == torch.float32
    ref = numpy_bias(coeffs.double().numpy(), size, order)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5)


def test_zero_coeffs_give_exact_ones():
    out = bias_field(torch.zeros(3, n_bias_coeffs(3, 3)), (10, 20, 30), 3)
    assert torch.equal(out, torch.ones(3, 1, 10, 20, 30))


def test_monomial_order_documented():
    # 2D, order 2: coefficient order 1, x1, x1^2, x0, x0*x1, x0^2.
    c = torch.zeros(1, 6)
    c[0, 1] = 1.0  # x1: varies along the last axis only
    out = bias_field(c, (17, 23), 2)[0, 0]
    torch.testing.assert_close(out, torch.exp(torch.linspace(-1, 1, 23)).expand(17, 23))
    c = torch.zeros(1, 6)
    c[0, 5] = 1.0  # x0^2
    out = bias_field(c, (17, 23), 2)[0, 0]
    ref = torch.exp(torch.linspace(-1, 1, 17) ** 2)[:, None].expand(17, 23)
    torch.testing.assert_close(out, ref)


def test_bias_rejects_bad_input():
    with pytest.raises(MedfmError):
        bias_field(torch.zeros(1, 5), (10, 20), 2)
    with pytest.raises(MedfmError):
        bias_field(torch.zeros(1, 4), (10,), 3)
    with pytest.raises(MedfmError):
        n_bias_coeffs(3, -1)


@pytest.mark.gpu
def test_bias_cuda_matches_cpu(gen, cuda):
    coeffs = torch.randn(2, n_bias_coeffs(3, 3), generator=gen) * 0.3
    out = bias_field(coeffs.to(cuda), (10, 20, 30), 3)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), bias_field(coeffs, (10, 20, 30), 3))
