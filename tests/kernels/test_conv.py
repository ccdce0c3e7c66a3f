import pytest
import torch
import torch.nn.functional as F

from medfm.kernels import winograd_conv3x3, winograd_weights


@pytest.mark.parametrize(
    ("b", "cin", "cout", "h", "w"),
    [(1, 8, 16, 16, 16), (2, 5, 3, 13, 10), (3, 1, 1, 4, 7), (1, 16, 8, 1, 1)],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_equals_direct_convolution(b, cin, cout, h, w, channels_last):
    g = torch.Generator().manual_seed(h * 31 + w)
    x = torch.randn(b, cin, h, w, generator=g)
    weight = torch.randn(cout, cin, 3, 3, generator=g)
    bias = torch.randn(cout, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = F.conv2d(x, weight, bias, padding=1)
    got = winograd_conv3x3(x, winograd_weights(weight), bias)
    assert got.shape == expected.shape
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 2e-5 * scale + 1e-6


@pytest.mark.parametrize(("h", "w"), [(8, 12), (7, 10)])  # tile-aligned and not
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("add_shape", ["full", "broadcast"])
def test_add_is_summed_into_the_output(h, w, with_bias, add_shape):
    g = torch.Generator().manual_seed(h + 2 * with_bias)
    x = torch.randn(2, 5, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(6, 5, 3, 3, generator=g)
    bias = torch.randn(6, generator=g) if with_bias else None
    shape = (2, 6, h, w) if add_shape == "full" else (1, 6, h, w)
    add = torch.randn(*shape, generator=g).contiguous(memory_format=torch.channels_last)
    got = winograd_conv3x3(x, winograd_weights(weight), bias, add=add)
    expected = F.conv2d(x, weight, bias, padding=1) + add
    assert got.shape == (2, 6, h, w)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, atol=2e-5 * float(expected.abs().max()), rtol=0)


def test_float64_is_exact_to_rounding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 9, 12, generator=g, dtype=torch.float64)
    weight = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)
    got = winograd_conv3x3(x, winograd_weights(weight))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, F.conv2d(x, weight, padding=1), atol=1e-12, rtol=1e-12)


def test_linear_and_translation_equivariant():
    # shifting the input by one 4x4 tile shifts the output (away from the zero border)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 16, 16, generator=g)
    u = winograd_weights(torch.randn(2, 3, 3, 3, generator=g))
    y = winograd_conv3x3(x, u)
    shifted = winograd_conv3x3(torch.roll(x, (4, 4), (2, 3)), u)
    torch.testing.assert_close(shifted[..., 5:-1, 5:-1], y[..., 1:-5, 1:-5], atol=1e-5, rtol=0)
    torch.testing.assert_close(winograd_conv3x3(2 * x, u), 2 * y, atol=1e-5, rtol=1e-5)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"\(C_out, C_in, 3, 3\)"):
        winograd_weights(torch.zeros(2, 3, 5, 5))
    with pytest.raises(ValueError, match="do not fit 4 input channels"):
        winograd_conv3x3(torch.zeros(1, 4, 8, 8), winograd_weights(torch.zeros(2, 3, 3, 3)))
