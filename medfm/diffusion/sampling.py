"""The reverse process over volumes of any size: overlapping windows, one noise estimate.

At every timestep each window (a patch of the model's size, with the position channels of
where it lies) gets the model's noise estimate; the estimates are blended with Gaussian weights
(highest at a window's centre) into one estimate for the whole volume, and the scheduler takes
one step on the whole volume. Stateful schedulers (DPM-Solver++, UniPC) therefore see each
timestep once, and neighbouring windows agree at every step, so no seam forms.

Randomness: the starting noise and each stochastic step draw from the ``generator`` given
(a CPU generator also serves a CUDA volume), so a seed gives the same volume every run.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from medfm.diffusion.model import DiffusionModel
from medfm.diffusion.position import whole_box

__all__ = [
    "Windows",
    "check_work_memory",
    "initial_noise",
    "pad_to",
    "predict_noise",
    "reverse_process",
]

Progress = Callable[[int, int], None]
AfterStep = Callable[[int, int, torch.Tensor], torch.Tensor]


def _starts(n: int, p: int, overlap: float) -> list[int]:
    """Window starts along an axis of ``n`` voxels (n >= p): a stride of p * (1 - overlap),
    the last window flush with the end."""
    stride = max(1, int(p * (1 - overlap)))
    starts = list(range(0, n - p + 1, stride))
    if starts[-1] != n - p:
        starts.append(n - p)
    return starts


def _gaussian(patch: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """Blending weights (*patch): a separable Gaussian, sigma = ``sigma_scale`` x the patch,
    1 at the centre, never below 1e-3 (every voxel counts in some window)."""
    w = torch.ones(())
    for p in patch:
        x = torch.arange(p, dtype=torch.float32) - (p - 1) / 2
        g = torch.exp(-0.5 * (x / (sigma_scale * p)) ** 2)
        w = w[..., None] * g
    return (w / w.max()).clamp_min(1e-3)


@dataclass(frozen=True)
class Windows:
    """The windows tiling a volume of ``shape`` (each axis >= the patch's)."""

    shape: tuple[int, ...]
    patch: tuple[int, ...]
    starts: tuple[tuple[int, ...], ...]
    weight: torch.Tensor  # (*patch)

    @classmethod
    def plan(cls, shape: Sequence[int], patch: Sequence[int], overlap: float = 0.5) -> Windows:
        shape, patch = tuple(int(s) for s in shape), tuple(int(p) for p in patch)
        if len(shape) != len(patch) or any(s < p for s, p in zip(shape, patch, strict=True)):
            raise ValueError(f"volume {shape} is smaller than the patch {patch}: pad it first")
        if not 0 <= overlap < 1:
            raise ValueError(f"overlap must lie in [0, 1), got {overlap}")
        axes = [_starts(n, p, overlap) for n, p in zip(shape, patch, strict=True)]
        return cls(shape, patch, tuple(itertools.product(*axes)), _gaussian(patch))

    @classmethod
    def for_model(
        cls, model: DiffusionModel, x: torch.Tensor, overlap: float = 0.5
    ) -> tuple[Windows, torch.Tensor]:
        """The windows of ``model``'s patch over ``x`` (B, C, *shape) and the whole volume's
        position channels (1, P, *shape), on ``x``'s device and dtype."""
        windows = cls.plan(x.shape[2:], model.config.patch, overlap)
        box = whole_box(1, len(windows.shape))
        return windows, model.positions(box, windows.shape, like=x)

    def slices(self, start: tuple[int, ...]) -> tuple[slice, ...]:
        return (slice(None), slice(None)) + tuple(
            slice(s, s + p) for s, p in zip(start, self.patch, strict=True)
        )


def predict_noise(
    model: DiffusionModel,
    x: torch.Tensor,
    t: int | torch.Tensor,
    windows: Windows,
    *,
    positions: torch.Tensor,
    regions: torch.Tensor | None = None,
    condition: torch.Tensor | None = None,
    batch: int = 4,
) -> torch.Tensor:
    """The blended model output (B, C, *shape) for ``x`` (B, C, *shape) at timestep ``t``;
    ``positions`` (1 or B, P, *shape): the whole volume's position channels; ``condition``
    (1 or B, K, *shape): a ControlNet's condition (`medfm.diffusion.controlnet.Controlled`),
    cut into the same windows; ``batch``: windows per forward pass (times B volumes)."""
    b = x.shape[0]
    out = torch.zeros_like(x)
    norm = torch.zeros((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    weight = windows.weight.to(x.device, x.dtype)
    positions = positions.expand(b, *positions.shape[1:])
    if condition is not None:
        condition = condition.to(x.device, x.dtype).expand(b, *condition.shape[1:])
    for i in range(0, len(windows.starts), batch):
        chunk = windows.starts[i : i + batch]
        sl = [windows.slices(s) for s in chunk]
        xs = torch.cat([x[s] for s in sl])
        ps = torch.cat([positions[s] for s in sl])
        ts = torch.full((xs.shape[0],), int(t), dtype=torch.long, device=x.device)
        rs = None if regions is None else regions.repeat(len(chunk))
        extra = {} if condition is None else {"condition": torch.cat([condition[s] for s in sl])}
        eps = model(xs, ts, positions=ps, regions=rs, **extra).to(x.dtype)
        for j, s in enumerate(sl):
            out[s] += eps[j * b : (j + 1) * b] * weight
            norm[s] += weight
    return out / norm


def initial_noise(
    shape: Sequence[int],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise of ``shape``, drawn on the generator's device (CPU unless given
    otherwise) then moved, so a CPU seed gives the same volume on any device."""
    gen_device = generator.device if generator is not None else "cpu"
    noise = torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype)
    return noise.to(device)


def check_work_memory(
    model: DiffusionModel, shape: Sequence[int], *, batch: int = 1, window_batch: int = 4
) -> None:
    """Refuse, in one line with the estimate, a reverse process over ``batch`` volumes of
    ``shape`` whose buffers would not fit in memory: per voxel the sample, its model input,
    the blended estimate and its weights, noise and the scheduler's state (float32) and the
    whole volume's position channels; per window the UNet's activations (about a dozen
    tensors of each level's width)."""
    from medfm.io.memory import check_memory

    u = model.config.unet
    voxels = math.prod(int(s) for s in shape) * batch
    per_voxel = 4 * (8 * u.image_channels + u.position_channels)
    patch = math.prod(model.config.patch)
    acts = sum(c * patch / 8**level for level, c in enumerate(u.channels)) * 4 * 12
    shown = "x".join(str(int(s)) for s in shape)
    device = next(model.parameters()).device
    check_memory(
        voxels * per_voxel + acts * window_batch * batch,
        f"sampling a {shown} volume" + (f" ({batch} at once)" if batch > 1 else ""),
        hint="give a smaller volume or crop it",
        device=device,
    )


@torch.no_grad()
def reverse_process(
    model: DiffusionModel,
    x: torch.Tensor,
    scheduler,
    *,
    timesteps: Sequence[int] | torch.Tensor | None = None,
    regions: torch.Tensor | None = None,
    condition: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    overlap: float = 0.5,
    window_batch: int = 4,
    after_step: AfterStep | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Run ``scheduler`` (a diffusers scheduler, timesteps set) from ``x`` (B, C, *shape),
    which is the sample at the first of ``timesteps`` (default: all of the scheduler's), to
    the end. ``after_step(i, t, x) -> x`` may change the sample after each step (data
    consistency, RePaint); ``condition``: a ControlNet's (`predict_noise`); ``progress(done,
    total)`` is called after each step."""
    steps = scheduler.timesteps if timesteps is None else timesteps
    steps = [int(t) for t in steps]
    check_work_memory(model, x.shape[2:], batch=x.shape[0], window_batch=window_batch)
    windows, positions = Windows.for_model(model, x, overlap)
    stochastic = "generator" in inspect.signature(scheduler.step).parameters
    extra = {"generator": generator} if stochastic else {}
    for i, t in enumerate(steps):
        model_in = scheduler.scale_model_input(x, t)
        eps = predict_noise(
            model, model_in, t, windows, positions=positions, regions=regions,
            condition=condition, batch=window_batch,
        )  # fmt: skip
        x = scheduler.step(eps, t, x, **extra).prev_sample
        if after_step is not None:
            x = after_step(i, t, x)
        if progress is not None:
            progress(i + 1, len(steps))
    return x


def pad_to(x: torch.Tensor, shape: Sequence[int]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """``x`` (B, C, *s) padded at the end of each axis to at least ``shape`` by repeating its
    edge, and the slices that cut the original back out."""
    keep = (slice(None), slice(None)) + tuple(slice(0, n) for n in x.shape[2:])
    pads: list[int] = []
    for n, p in zip(reversed(x.shape[2:]), reversed(tuple(shape)), strict=True):
        pads += [0, max(0, p - n)]
    if any(pads):
        x = torch.nn.functional.pad(x, pads, mode="replicate")
    return x, keep
