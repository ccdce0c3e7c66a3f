"""3x3 convolution by Winograd's minimal filtering F(4x4, 3x3) (Lavin & Gray, 2016).

Each 4x4 block of output is computed from a 6x6 tile of input with 36 multiplications per
input-output channel pair instead of 144: the tiles and the 3x3 kernels are taken to a 6x6
"Winograd domain" (``B^T d B`` and ``G g G^T``), multiplied there (one batched matrix product
over the 36 positions) and taken back (``A^T m A``). For the many-channel convolutions of a
CNN neck this needs ~2.5x fewer operations than direct convolution (measured against oneDNN's
convolution in docs/benchmarks.md). Float32 rounding errors are ~1e-5 of the output's magnitude
(the transform constants are small).

Stride 1, zero padding 1, dilation 1, any H and W (padded up to a multiple of 4 internally).
Batch-first and device-agnostic; the kernels are transformed once with `winograd_weights`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["winograd_conv3x3", "winograd_weights"]

_BT = (
    (4, 0, -5, 0, 1, 0),
    (0, -4, -4, 1, 1, 0),
    (0, 4, -4, -1, 1, 0),
    (0, -2, -1, 2, 1, 0),
    (0, 2, -1, -2, 1, 0),
    (0, 4, 0, -5, 0, 1),
)
_G = (
    (1 / 4, 0, 0),
    (-1 / 6, -1 / 6, -1 / 6),
    (-1 / 6, 1 / 6, -1 / 6),
    (1 / 24, 1 / 12, 1 / 6),
    (1 / 24, -1 / 12, 1 / 6),
    (0, 0, 1),
)
_AT = (
    (1, 1, 1, 1, 1, 0),
    (0, 1, -1, 2, -2, 0),
    (0, 1, 1, 4, 4, 0),
    (0, 1, -1, 8, -8, 1),
)


def winograd_weights(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) convolution kernels -> (36, C_in, C_out) in the Winograd domain,
    computed in float64 and returned in the kernels' dtype and device."""
    if weight.ndim != 4 or weight.shape[-2:] != (3, 3):
        raise ValueError(f"expected (C_out, C_in, 3, 3) kernels, got {tuple(weight.shape)}")
    g = torch.tensor(_G, dtype=torch.float64, device=weight.device)
    u = torch.einsum("ai,ocij,bj->abco", g, weight.double(), g)
    return u.reshape(36, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


_KRON: dict[tuple, torch.Tensor] = {}


def _kron(m: tuple, like: torch.Tensor) -> torch.Tensor:
    """kron(m, m): the 2D transform of a flattened tile, cached per dtype and device."""
    key = (m, like.dtype, like.device)
    if key not in _KRON:
        t = torch.tensor(m, dtype=torch.float64)
        _KRON[key] = torch.kron(t, t).to(dtype=like.dtype, device=like.device)
    return _KRON[key]


def winograd_conv3x3(
    x: torch.Tensor,
    weights: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.conv2d(x, w, bias, padding=1) + add`` for x (B, C_in, H, W), ``weights =
    winograd_weights(w)`` and an optional ``add`` broadcastable to (B, C_out, H, W): returns
    (B, C_out, H, W) in channels-last memory (fastest when x and ``add`` are too).

    Tiles are kept tile-major, (tiles, 36, C), so that both transforms are batched 36 x 36 and
    16 x 36 products over each tile's channels and the 36 per-position products read their
    matrices in place (strided); with H and W multiples of 4, ``add`` is summed in the same
    pass that puts the 4 x 4 output blocks back in image order. (Position-major tiles would
    need one (36 x 36) @ (36 x tiles*C) product, a long thin shape that BLAS runs slowly;
    docs/benchmarks.md has the timings of both layouts.)
    """
    b, c, h, w = x.shape
    if weights.ndim != 3 or weights.shape[:2] != (36, c):
        raise ValueError(f"weights {tuple(weights.shape)} do not fit {c} input channels")
    th, tw = -(-h // 4), -(-w // 4)
    # B x (4 th + 2) x (4 tw + 2) x C: zero padding 1, plus up to a multiple of 4
    xl = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1 + 4 * tw - w, 1, 1 + 4 * th - h))
    tiles = xl.unfold(1, 6, 4).unfold(2, 6, 4)  # B x th x tw x C x 6 x 6 (a view)
    tiles = tiles.permute(0, 1, 2, 4, 5, 3).reshape(b * th * tw, 36, c)
    v = torch.matmul(_kron(_BT, x), tiles)  # B^T d B: tiles x 36 x C
    m = torch.bmm(v.transpose(0, 1), weights)  # 36 x tiles x C_out
    out = torch.matmul(_kron(_AT, x), m.transpose(0, 1))  # A^T m A: tiles x 16 x C_out
    c_out = out.shape[-1]
    # B x th x 4 x tw x 4 x C_out: the output blocks in image order (a view)
    blocks = out.view(b, th, tw, 4, 4, c_out).permute(0, 1, 3, 2, 4, 5)
    extra = add
    if bias is not None:
        extra = bias.view(-1, 1, 1) if extra is None else extra + bias.view(-1, 1, 1)
    if extra is not None and 4 * th == h and 4 * tw == w:
        extra = torch.broadcast_to(extra, (b, c_out, h, w)).permute(0, 2, 3, 1)
        res = torch.empty((b, th, 4, tw, 4, c_out), dtype=out.dtype, device=out.device)
        torch.add(blocks, extra.view(b, th, 4, tw, 4, c_out), out=res)
        return res.view(b, h, w, c_out).permute(0, 3, 1, 2)
    res = blocks.reshape(b, 4 * th, 4 * tw, c_out)[:, :h, :w].permute(0, 3, 1, 2)
    return res if extra is None else res + extra
