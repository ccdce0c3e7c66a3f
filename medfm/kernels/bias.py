"""Smooth multiplicative bias fields (MRI intensity inhomogeneity), TorchIO BiasField style."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from medfm.errors import MedfmError
from medfm.kernels._common import _check_size

__all__ = ["n_bias_coeffs", "bias_field"]


def n_bias_coeffs(ndim: int, order: int) -> int:
    """Number of monomials in `ndim` variables of total degree <= `order` (constant included).

    = C(order + ndim, ndim): 6 for (2, 2), 10 for (3, 2), 20 for (3, 3).
    """
    if ndim < 1 or order < 0:
        raise MedfmError(f"need ndim >= 1 and order >= 0, got ndim={ndim}, order={order}")
    return math.comb(order + ndim, ndim)


def _bias_exponents(ndim: int, order: int) -> list[tuple[int, ...]]:
    """Exponents of the monomials in coefficient order (see `bias_field`)."""

    def rec(dims: int, budget: int) -> list[tuple[int, ...]]:
        if dims == 0:
            return [()]
        return [(e,) + rest for e in range(budget + 1) for rest in rec(dims - 1, budget - e)]

    return rec(ndim, order)


def bias_field(coeffs: Tensor, size: Sequence[int], order: int) -> Tensor:
    """Bias field (B, 1, *size) = exp(sum_m coeffs[:, m] * monomial_m), positive, smooth.

    coeffs (B, n_bias_coeffs(ndim, order)), ndim = len(size) (2 or 3). Coordinates are
    linspace(-1, 1, size_j) along each spatial axis (x_0 = first axis, x_1, x_2). Monomial
    ordering (as in TorchIO): exponents (i, j[, k]) in nested loops, first axis outermost,
    each exponent from 0 up to what the total degree <= order leaves, e.g. for 2D order 2:
    1, x1, x1^2, x0, x0*x1, x0^2 (so m = 0 is the constant term). Zero coeffs give exactly ones.
    """
    nd = len(size)
    size = _check_size(size, nd)
    if nd not in (2, 3):
        raise MedfmError(f"bias_field supports 2 or 3 spatial dims, got size {size}")
    n = n_bias_coeffs(nd, order)
    if coeffs.ndim != 2 or coeffs.shape[1] != n:
        raise MedfmError(
            f"coeffs must have shape (B, {n}) for ndim={nd}, order={order}, "
            f"got {tuple(coeffs.shape)}"
        )
    if not coeffs.is_floating_point():
        coeffs = coeffs.float()
    batch = coeffs.shape[0]
    device, dtype = coeffs.device, coeffs.dtype
    # Dense coefficient tensor (B, order+1, ..., order+1), zero where the total degree > order.
    exps = torch.tensor(_bias_exponents(nd, order), device=device)
    dense = torch.zeros((batch,) + (order + 1,) * nd, device=device, dtype=dtype)
    flat_index = torch.zeros(n, dtype=torch.long, device=device)
    for j in range(nd):
        flat_index = flat_index * (order + 1) + exps[:, j]
    dense.view(batch, -1)[:, flat_index] = coeffs
    # Power tables (order+1, L_j): powers[e, t] = x_t ** e.
    powers = []
    for length in size:
        t = torch.linspace(-1.0, 1.0, length, device=device, dtype=dtype)
        powers.append(t[None, :] ** torch.arange(order + 1, device=device, dtype=dtype)[:, None])
    letters = "ijk"[:nd]
    out_letters = "xyz"[:nd]
    spec = "b" + letters + "," + ",".join(a + o for a, o in zip(letters, out_letters, strict=True))
    log_field = torch.einsum(spec + "->b" + out_letters, dense, *powers)
    return torch.exp(log_field).unsqueeze(1)
