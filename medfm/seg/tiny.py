"""medfm-tiny: a small image encoder of medfm's own under SAM's prompt encoder and mask decoder,
and the encoder's inference path with folded weights.

`TinyImageEncoder` maps a Bx3x256x256 normalised image to a Bx256x64x64 embedding, the shape of
SAM's, so segment-anything's ``PromptEncoder`` and ``MaskDecoder`` run on it unchanged;
`build_medfm_tiny` assembles the three into a ``Sam``.

Fused inference
---------------

`TinyImageEncoder` runs `fused_forward` on CPU inputs when it and all its modules are in eval
mode and no gradient is being recorded (`medfm seg embed`, `Segmenter.set_image`, evaluation).
The plan of folded weights is built once and rebuilt when any parameter or buffer changes (a
new tensor, an in-place update, ``load_state_dict``, ``.to(device)``). Training, and anything
needing gradients, runs the modules themselves. The two paths agree to float rounding (tested
at 1e-4).

The folds, all exact algebra:

- **BatchNorm into the convolution before it** (running statistics):
  ``w' = w * g / sqrt(var + eps)``, ``b' = beta + (b - mean) * g / sqrt(var + eps)``.
- **The neck's 1x1 conv, LayerNorm2d and 3x3 conv into one 3x3 conv on 128 channels.** With
  ``z = W1 y`` (128 -> 256 channels, no bias) and ``P = I - 11^T / 256`` (removing the channel
  mean), LayerNorm2d gives ``u = g * (P W1 y) * r + b`` with ``r = 1 / sqrt(y^T M y + eps)``
  per pixel and ``M = W1^T P W1 / 256`` (128 x 128). So ``conv3x3(W3, u) = conv3x3(W3 Q, r y) +
  conv3x3(W3, b)`` with ``Q = diag(g) P W1``: a 3x3 conv from 128 channels instead of 256 (half
  the encoder's largest cost), plus a fixed map for the constant ``b`` (computed with the same
  zero padding), and ``y^T M y`` instead of the 1x1 conv. That 3x3 conv runs as Winograd's
  F(4x4, 3x3) (`medfm.kernels.conv`), with 2.25x fewer multiplications.
- **Channels-last memory**, oneDNN's native layout, where LayerNorm over channels is a plain
  ``layer_norm`` over the last, contiguous dimension.
- **GELU and residual sums inside the convolutions**: where torch has oneDNN's fused
  convolution ops (``torch.ops.mkldnn._convolution_pointwise``, what TorchInductor emits on
  CPU), each 3x3 / 1x1 convolution followed by GELU, and each 1x1 convolution whose output is
  added to a residual or an upsampled map, is one call, with no second pass over memory; other
  builds run the same sums with ``F.conv2d``. The neck's bias map is added as the Winograd
  output is put back in image order.

The weights are folded in float64 and stored in the parameters' dtype and device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling import PromptEncoder, Sam
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

from medfm.kernels.conv import winograd_conv3x3, winograd_weights
from medfm.seg.decoder import sam_mask_decoder

__all__ = ["TinyImageEncoder", "build_medfm_tiny", "fold_batchnorm", "fused_forward", "use_fused"]


def _conv_bn_act(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.GELU()
    )


class _ResBlock(nn.Module):
    """x + pw(gelu(pw(bn(depthwise 3x3 conv, dilated)))): a MobileNet/ConvNeXt-style block."""

    def __init__(self, channels: int, dilation: int = 1, ratio: int = 2) -> None:
        super().__init__()
        self.dw = nn.Conv2d(
            channels, channels, 3, padding=dilation, dilation=dilation, groups=channels, bias=False
        )
        self.norm = nn.BatchNorm2d(channels)
        self.pw1 = nn.Conv2d(channels, channels * ratio, 1)
        self.act = nn.GELU()
        self.pw2 = nn.Conv2d(channels * ratio, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pw2(self.act(self.pw1(self.norm(self.dw(x)))))


class _GlobalAttention(nn.Module):
    """One pre-norm transformer layer over all positions of a BxCxHxW map (global context)."""

    def __init__(self, channels: int, num_heads: int = 8) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(
            channels,
            num_heads,
            dim_feedforward=2 * channels,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.layer(x.flatten(2).transpose(1, 2))  # B x HW x C
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class TinyImageEncoder(nn.Module):
    """medfm-tiny's image encoder: Bx3x256x256 normalised image -> Bx256x64x64 embedding.

    A small CNN with a feature pyramid: a strided stem to 64x64, depthwise-separable residual
    blocks at 64x64 (64 channels), 32x32 (128) and 16x16 (192, dilations 1, 2, 4, 8, then one
    global self-attention layer over the 256 positions), merged top-down onto 64x64 and finished
    by a neck like SAM's (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d) to 256 channels.
    About 2.1 M parameters. On the CPU, in eval mode without gradients, it runs `fused_forward`
    (BatchNorm folded into convolutions, the neck's LayerNorm into its 3x3 conv; the module
    docstring), which gives the modules' result with less work. ``img_size`` is read by
    ``Sam.preprocess`` (pads to it) and ``ResizeLongestSide``.
    """

    img_size = 256
    fused = True  # False: always run the modules (see `use_fused`)

    def __init__(self, widths: tuple[int, int, int, int] = (32, 64, 128, 192)) -> None:
        super().__init__()
        w0, w1, w2, w3 = widths
        fuse = 128
        self.stem = nn.Sequential(_conv_bn_act(3, w0, 2), _conv_bn_act(w0, w1, 2))  # 64x64
        self.stage1 = nn.Sequential(_ResBlock(w1), _ResBlock(w1))
        self.down2 = _conv_bn_act(w1, w2, 2)  # 32x32
        self.stage2 = nn.Sequential(_ResBlock(w2), _ResBlock(w2))
        self.down3 = _conv_bn_act(w2, w3, 2)  # 16x16
        self.stage3 = nn.Sequential(*[_ResBlock(w3, dilation=d) for d in (1, 2, 4, 8)])
        self.context = _GlobalAttention(w3)
        self.lateral = nn.ModuleList([nn.Conv2d(c, fuse, 1) for c in (w1, w2, w3)])
        self.neck = nn.Sequential(
            nn.Conv2d(fuse, 256, kernel_size=1, bias=False),
            LayerNorm2d(256),
            nn.Conv2d(256, 256, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(256),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x Bx3x256x256 (normalised, padded) -> Bx256x64x64."""
        if use_fused(self, x):
            return fused_forward(self, x)
        f1 = self.stage1(self.stem(x))
        f2 = self.stage2(self.down2(f1))
        f3 = self.context(self.stage3(self.down3(f2)))
        y = self.lateral[2](f3)
        for feat, lateral in ((f2, self.lateral[1]), (f1, self.lateral[0])):
            y = lateral(feat) + F.interpolate(y, size=feat.shape[-2:], mode="nearest")
        return self.neck(y)


def build_medfm_tiny() -> Sam:
    """medfm-tiny, randomly initialised: TinyImageEncoder + SAM's prompt encoder and mask decoder
    at a 256x256 input (64x64 embedding, 256x256 low-resolution masks), eval mode."""
    sam = Sam(
        image_encoder=TinyImageEncoder(),
        prompt_encoder=PromptEncoder(
            embed_dim=256,
            image_embedding_size=(64, 64),
            input_image_size=(256, 256),
            mask_in_chans=16,
        ),
        mask_decoder=sam_mask_decoder(256),
    )
    return sam.eval()


# --------------------------------------------------------------------------------------------
# the fused inference path

_CL = torch.channels_last
_PLAN = "_medfm_fused_plan"


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of one convolution equal to ``bn(conv(x))`` with bn's running statistics."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    weight = conv.weight.double() * scale[:, None, None, None]
    bias = bn.bias.double() - bn.running_mean.double() * scale
    if conv.bias is not None:
        bias = bias + conv.bias.double() * scale
    dtype = conv.weight.dtype
    return weight.to(dtype).contiguous(memory_format=_CL), bias.to(dtype)


def _conv_bn(seq: nn.Sequential) -> tuple:
    conv, bn = seq[0], seq[1]
    return (*fold_batchnorm(conv, bn), conv.stride)


def _block(block: nn.Module) -> tuple:
    weight, bias = fold_batchnorm(block.dw, block.norm)
    return (
        weight,
        bias,
        block.dw.dilation,
        block.dw.groups,
        block.pw1.weight.contiguous(memory_format=_CL),
        block.pw1.bias,
        block.pw2.weight.contiguous(memory_format=_CL),
        block.pw2.bias,
    )


def _neck(encoder: TinyImageEncoder, size: tuple[int, int]) -> dict:
    conv1, ln1, conv3, _ = encoder.neck
    if conv1.bias is not None or conv3.bias is not None:
        raise ValueError("the neck fold assumes bias-free convolutions, as TinyImageEncoder's")
    w1 = conv1.weight[:, :, 0, 0].double()  # 256 x 128
    channels = w1.shape[0]
    centre = torch.eye(channels, dtype=torch.float64, device=w1.device) - 1.0 / channels
    q = ln1.weight.double()[:, None] * (centre @ w1)  # 256 x 128
    w3 = conv3.weight.double()
    dtype = conv3.weight.dtype
    bias_field = ln1.bias.double()[None, :, None, None].expand(1, channels, *size)
    return {
        "weight": winograd_weights(torch.einsum("ocij,ck->okij", w3, q).to(dtype)),
        "bias_map": F.conv2d(bias_field, w3, padding=1).to(dtype).contiguous(memory_format=_CL),
        "quad": (w1.T @ centre @ w1 / channels).to(dtype),  # y^T quad y = variance of W1 y
        "eps": ln1.eps,
        "size": size,
    }


def _key(encoder: nn.Module) -> tuple:
    return tuple(
        (t.data_ptr(), t._version, t.dtype, t.device)
        for t in (*encoder.parameters(), *encoder.buffers())
    )


def _plan(encoder: TinyImageEncoder, size: tuple[int, int]) -> dict:
    key = (_key(encoder), size)
    plan = encoder.__dict__.get(_PLAN)
    if plan is not None and plan["key"] == key:
        return plan
    with torch.inference_mode(False), torch.no_grad():  # plain tensors, usable in any mode
        plan = {
            "key": key,
            "stem": [_conv_bn(s) for s in encoder.stem],
            "down": [_conv_bn(encoder.down2), _conv_bn(encoder.down3)],
            "stages": [
                [_block(b) for b in stage]
                for stage in (encoder.stage1, encoder.stage2, encoder.stage3)
            ],
            "neck": _neck(encoder, size),
        }
    encoder.__dict__[_PLAN] = plan  # not a module attribute: no state dict entry
    return plan


def use_fused(encoder: nn.Module, x: torch.Tensor) -> bool:
    """True when the fused path gives the module's own result (eval mode, no gradients), the
    input is on the CPU, and the encoder's ``fused`` attribute is not False (set it False to
    time or debug the modules). On CUDA the modules run: cuDNN's convolutions gain nothing
    from the folds (docs/benchmarks.md)."""
    return (
        getattr(encoder, "fused", True)
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and not any(m.training for m in encoder.modules())
    )


# oneDNN's fused convolution ops (those TorchInductor emits on CPU), where this torch has them
_POINTWISE_OPS = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops, "mkldnn")
    and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
)


def _onednn_pointwise(x: torch.Tensor) -> bool:
    """True where oneDNN's fused convolution ops can run on ``x`` (float32, ops present)."""
    return _POINTWISE_OPS and x.dtype == torch.float32


def _conv_gelu(x: torch.Tensor, weight, bias, stride, padding=1, onednn=False) -> torch.Tensor:
    """gelu(conv2d(x)) (erf GELU); ``onednn``: in one oneDNN call, the GELU applied as each
    output block is written instead of in a second pass over memory."""
    if onednn:
        s = [stride, stride] if isinstance(stride, int) else list(stride)
        return torch.ops.mkldnn._convolution_pointwise(
            x, weight, bias, [padding, padding], s, [1, 1], 1, "gelu", [], "none"
        )
    return F.gelu(F.conv2d(x, weight, bias, stride, padding))


def _conv_add(x: torch.Tensor, weight, bias, other: torch.Tensor, onednn=False) -> torch.Tensor:
    """conv2d(x) + other for a 1x1 convolution; ``onednn``: the sum in the same oneDNN call."""
    if onednn:
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, other, weight, bias, [0, 0], [1, 1], [1, 1], 1, "add", 1.0, None, [], None
        )
    return F.conv2d(x, weight, bias) + other


def _stage(x: torch.Tensor, blocks: list[tuple], onednn: bool) -> torch.Tensor:
    for dw_w, dw_b, dilation, groups, pw1_w, pw1_b, pw2_w, pw2_b in blocks:
        h = F.conv2d(x, dw_w, dw_b, 1, dilation, dilation, groups)
        x = _conv_add(_conv_gelu(h, pw1_w, pw1_b, 1, 0, onednn), pw2_w, pw2_b, x, onednn)
    return x


def fused_forward(encoder: TinyImageEncoder, x: torch.Tensor) -> torch.Tensor:
    """encoder(x) from the folded plan: Bx3xHxW -> Bx256x(H/4)x(W/4), channels-last memory."""
    x = x.contiguous(memory_format=_CL)
    size = (x.shape[-2] // 4, x.shape[-1] // 4)
    plan = _plan(encoder, size)
    stem, down, stages = plan["stem"], plan["down"], plan["stages"]
    onednn = _onednn_pointwise(x)
    f1 = _conv_gelu(_conv_gelu(x, *stem[0], onednn=onednn), *stem[1], onednn=onednn)
    f1 = _stage(f1, stages[0], onednn)
    f2 = _stage(_conv_gelu(f1, *down[0], onednn=onednn), stages[1], onednn)
    f3 = encoder.context(_stage(_conv_gelu(f2, *down[1], onednn=onednn), stages[2], onednn))
    y = encoder.lateral[2](f3)
    for feat, lateral in ((f2, encoder.lateral[1]), (f1, encoder.lateral[0])):
        up = F.interpolate(y, size=feat.shape[-2:], mode="nearest")
        y = _conv_add(feat, lateral.weight, lateral.bias, up, onednn)
    neck = plan["neck"]
    y_last = y.permute(0, 2, 3, 1).contiguous()  # B x H x W x 128 (a view when channels-last)
    variance = ((y_last @ neck["quad"]) * y_last).sum(-1, keepdim=True)
    y = (y_last * torch.rsqrt(variance + neck["eps"])).permute(0, 3, 1, 2)
    u = winograd_conv3x3(y, neck["weight"], add=neck["bias_map"])
    ln2 = encoder.neck[3]
    out = F.layer_norm(u.permute(0, 2, 3, 1), (u.shape[1],), ln2.weight, ln2.bias, ln2.eps)
    return out.permute(0, 3, 1, 2)
