"""The zero-shot tasks of a diffusion model, on volumes in model units ([-1, 1]).

- `synthesize`: pure noise to a volume of any shape (sliding windows beyond the patch).
- `denoise`: the input's noise std sigma matches the level of a timestep t* (a clean volume
  noised to t* and divided by sqrt(alpha_bar) carries noise of std sqrt((1 - a) / a)). The
  default, ``posterior``, takes the model's one-step estimate of the clean volume there
  (Tweedie's formula); ``diffpir`` walks from t* to 0 pulling each estimate toward the input
  (DiffPIR's data consistency); ``reverse`` tops the input up to the nearest sampler timestep
  at or above t* and runs the reverse process. The default is the one that measured best
  (docs/models/medfm-diff-tiny.md).
- `anomaly_map`: noise the volume to step t, reconstruct, and the smoothed absolute residual
  is the map (higher = more anomalous).
- `inpaint`: RePaint (diffusers' RePaintScheduler): known voxels are re-noised from the input
  at every step, unknown ones come from the model, with resampling jumps.

Every task pads a volume smaller than the patch (repeating its edges) and cuts the result back.
Randomness comes from ``generator`` only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from medfm.diffusion.model import DiffusionModel
from medfm.diffusion.sampling import (
    Windows,
    check_work_memory,
    initial_noise,
    pad_to,
    predict_noise,
    reverse_process,
)
from medfm.diffusion.schedulers import make_scheduler, repaint_scheduler, training_scheduler
from medfm.errors import MedfmError

__all__ = [
    "DENOISE_METHODS",
    "anomaly_map",
    "denoise",
    "estimate_noise_std",
    "inpaint",
    "matching_timestep",
    "synthesize",
]

DENOISE_METHODS = ("posterior", "diffpir", "reverse")
Progress = Callable[[int, int], None]


def _regions(model: DiffusionModel, region: str | None, batch: int, device) -> torch.Tensor | None:
    index = model.region_index(region)
    return None if index is None else torch.full((batch,), index, dtype=torch.long, device=device)


def _check_volume(x: torch.Tensor, model: DiffusionModel, what: str = "the input") -> None:
    dims = model.config.unet.spatial_dims
    if x.ndim != dims + 2:
        raise MedfmError(f"{what} has {x.ndim - 2} spatial axes; this model takes {dims}D volumes")
    if not bool(torch.isfinite(x).all()):
        raise MedfmError(f"{what} holds NaN or infinite values")


@torch.no_grad()
def synthesize(
    model: DiffusionModel,
    shape: Sequence[int],
    *,
    sampler: str = "ddim",
    steps: int = 50,
    region: str | None = None,
    batch: int = 1,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    condition: torch.Tensor | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """``batch`` new volumes (B, C, *shape) in model units; with a ControlNet (``model`` a
    `Controlled`), ``condition`` (1 or B, K, *shape) steers them."""
    c = model.config.unet.image_channels
    full = [max(s, p) for s, p in zip(shape, model.config.patch, strict=True)]
    check_work_memory(model, full, batch=batch)
    if condition is not None:
        condition = pad_condition(condition.to(device), full)
    x = initial_noise((batch, c, *full), generator=generator, device=device)
    sched = make_scheduler(sampler, steps, model.config.schedule)
    x = x * sched.init_noise_sigma
    y = reverse_process(
        model, x, sched, regions=_regions(model, region, batch, device), generator=generator,
        condition=condition, progress=progress,
    )  # fmt: skip
    return y[(slice(None), slice(None), *(slice(0, s) for s in shape))]


def estimate_noise_std(x: torch.Tensor, dims: int = 3) -> float:
    """The std of white Gaussian noise in ``x`` (..., *spatial; ``dims`` spatial axes): the
    median absolute value of the finest all-diagonal Haar wavelet coefficients over 0.6745
    (Donoho's estimator), which an image's edges barely move."""
    v = x.detach().float().reshape(-1, *x.shape[-dims:])
    for axis in range(1, dims + 1):
        n = v.shape[axis] // 2 * 2
        if n == 0:
            raise MedfmError("the volume is too small to estimate its noise; give --noise-std")
        even = torch.arange(0, n, 2, device=v.device)
        v = (v.index_select(axis, even) - v.index_select(axis, even + 1)) / math.sqrt(2)
    return float(v.abs().flatten().median()) / 0.6745


def matching_timestep(sigma: float, alphas_cumprod: torch.Tensor) -> int:
    """The training timestep whose noise level sqrt((1 - a) / a) is nearest ``sigma``."""
    level = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
    return int((level - sigma).abs().argmin())


def _tweedie(xt: torch.Tensor, eps: torch.Tensor, a: float) -> torch.Tensor:
    """The clean-volume estimate from ``x_t`` and the model's noise at alpha_bar ``a``."""
    return (xt - math.sqrt(1 - a) * eps) / math.sqrt(a)


@torch.no_grad()
def denoise(
    model: DiffusionModel,
    x: torch.Tensor,
    sigma: float,
    *,
    method: str = "posterior",
    sampler: str = "ddim",
    steps: int = 50,
    region: str | None = None,
    guidance: float = 7.0,
    overlap: float = 0.5,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """``x`` (B, C, *S, model units) with Gaussian noise of std ``sigma`` (model units)
    removed.

    ``posterior``: the model's one-step estimate at the timestep t* whose noise level matches
    ``sigma`` (Tweedie's formula; the input is used as x_t* scaled by sqrt(alpha_bar), no noise
    added). ``diffpir``: from t* down to 0 in ``steps`` steps, each clean estimate pulled
    toward the input by the exact Gaussian data term (weight ``guidance`` / level**2 against
    1 / sigma**2, DiffPIR), re-noised deterministically; both blend windows overlapping by
    ``overlap``. ``reverse``: the input is brought to the nearest ``sampler`` timestep at or
    above t* (fresh noise tops it up) and the reverse process runs from there."""
    _check_volume(x, model)
    if method not in DENOISE_METHODS:
        raise MedfmError(f"unknown method {method!r}; choose {', '.join(DENOISE_METHODS)}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise MedfmError(f"the noise std must be a positive number, got {sigma}")
    if not (math.isfinite(guidance) and guidance >= 0):
        raise MedfmError(f"--guidance must be a number >= 0, got {guidance}")
    ab = training_scheduler(model.config.schedule).alphas_cumprod
    t_star = matching_timestep(sigma, ab)
    regions = _regions(model, region, x.shape[0], x.device)
    xp, keep = pad_to(x, model.config.patch)
    if method == "reverse":
        sched = make_scheduler(sampler, steps, model.config.schedule)
        later = [int(t) for t in sched.timesteps if int(t) >= t_star]
        t0 = min(later) if later else int(sched.timesteps[0])
        level = math.sqrt((1 - float(ab[t0])) / float(ab[t0]))
        extra = math.sqrt(max(level**2 - sigma**2, 0.0))
        if extra > 0:
            xp = xp + extra * initial_noise(xp.shape, generator=generator, device=x.device)
        todo = [int(t) for t in sched.timesteps if int(t) <= t0]
        out = reverse_process(
            model, math.sqrt(float(ab[t0])) * xp, sched, timesteps=todo, regions=regions,
            generator=generator, progress=progress,
        )  # fmt: skip
        return out[keep]
    windows, positions = Windows.for_model(model, xp, overlap)
    n = 1 if method == "posterior" else max(1, min(steps, t_star + 1))
    ts = torch.linspace(t_star, 0, n).round().long().unique_consecutive().tolist()
    xt = math.sqrt(float(ab[ts[0]])) * xp
    for i, t in enumerate(ts):
        a = float(ab[t])
        eps = predict_noise(model, xt, t, windows, positions=positions, regions=regions)
        x0 = _tweedie(xt, eps, a)
        if method == "diffpir":  # the proximal step of ||y - x||^2 / 2 sigma^2
            rho = guidance * a / (1 - a)  # guidance / level**2
            x0 = (xp / sigma**2 + rho * x0) / (1 / sigma**2 + rho)
            if i + 1 < len(ts):  # to the next step along the data-consistent estimate
                a_next = float(ab[ts[i + 1]])
                eps_dc = (xt - math.sqrt(a) * x0) / math.sqrt(1 - a)
                xt = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps_dc
        if progress is not None:
            progress(i + 1, len(ts))
    return x0[keep]


@torch.no_grad()
def anomaly_map(
    model: DiffusionModel,
    x: torch.Tensor,
    *,
    t: int = 50,
    steps: int = 50,
    smoothing: float = 1.0,
    region: str | None = None,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """The anomaly map (B, 1, *S) of ``x`` (B, C, *S): noised to step ``t`` (of the training
    steps), reconstructed with DDIM in ``steps`` steps over the whole schedule, the absolute
    residual (mean over channels) smoothed by a Gaussian of ``smoothing`` voxels (0: none)."""
    from monai.transforms import GaussianSmooth

    _check_volume(x, model)
    n_train = model.config.schedule.num_train_timesteps
    if not 0 <= t < n_train:
        raise MedfmError(f"--t must lie in 0..{n_train - 1}, got {t}")
    ab = training_scheduler(model.config.schedule).alphas_cumprod
    sched = make_scheduler("ddim", steps, model.config.schedule)
    todo = [int(s) for s in sched.timesteps if int(s) <= t] or [t]
    start = todo[0]
    xp, keep = pad_to(x, model.config.patch)
    noise = initial_noise(xp.shape, generator=generator, device=x.device)
    xt = math.sqrt(float(ab[start])) * xp + math.sqrt(1 - float(ab[start])) * noise
    recon = reverse_process(
        model, xt, sched, timesteps=todo, regions=_regions(model, region, x.shape[0], x.device),
        generator=generator, progress=progress,
    )  # fmt: skip
    residual = (recon - xp).abs().mean(dim=1, keepdim=True)[keep]
    if smoothing > 0:
        smooth = GaussianSmooth(sigma=smoothing)
        maps = [smooth(r) for r in residual]
        residual = torch.stack([m.as_tensor() if hasattr(m, "as_tensor") else m for m in maps])
    return residual


@torch.no_grad()
def inpaint(
    model: DiffusionModel,
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    steps: int = 50,
    jump_length: int = 10,
    jump_n_sample: int = 5,
    region: str | None = None,
    condition: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """``x`` (B, C, *S) with the voxels where ``mask`` (B or 1, 1, *S) is true regenerated
    (RePaint: ``jump_n_sample`` resamplings every ``jump_length`` steps); the rest is kept.
    Guided inpainting: ``model`` a `Controlled` with a mask ControlNet and ``condition``
    (1 or B, K, *S) its condition (what the hole should hold)."""
    _check_volume(x, model)
    if mask.shape[2:] != x.shape[2:]:
        raise MedfmError(
            f"the mask's shape {tuple(mask.shape[2:])} differs from the image's "
            f"{tuple(x.shape[2:])}; give a mask of the same grid"
        )
    hole = mask.bool()
    if not bool(hole.any()):
        return x.clone()
    sched = repaint_scheduler(steps, jump_length, jump_n_sample, model.config.schedule)
    check_work_memory(model, x.shape[2:], batch=x.shape[0])
    xp, keep = pad_to(x, model.config.patch)
    known, _ = pad_to((~hole).float().expand(x.shape[0], 1, *x.shape[2:]), model.config.patch)
    windows, positions = Windows.for_model(model, xp)
    # only the windows near the hole matter (every other voxel is the input's): work on the
    # hole's box grown by a quarter patch each side (at least a patch), in the volume's frame
    box = _around((known < 0.5).any(0).any(0), model.config.patch)
    if box != tuple(slice(0, n) for n in xp.shape[2:]):
        windows = Windows.plan([r.stop - r.start for r in box], model.config.patch)
        positions = positions[(slice(None), slice(None), *box)]
    sub = (slice(None), slice(None), *box)
    xs, ks = xp[sub], known[sub]
    if condition is not None:
        condition = pad_condition(condition.to(x.device), xp.shape[2:])[sub]
    regions = _regions(model, region, x.shape[0], x.device)
    sample = initial_noise(xs.shape, generator=generator, device=x.device)
    ts = [int(t) for t in sched.timesteps]
    t_last = ts[0] + 1
    for i, t in enumerate(ts):
        if t < t_last:  # a reverse step from t
            eps = predict_noise(model, sample, t, windows, positions=positions, regions=regions,
                                condition=condition)  # fmt: skip
            sample = sched.step(eps, t, sample, xs, ks, generator=generator).prev_sample
        else:  # a jump back up: re-noise from t_last to t
            sample = sched.undo_step(sample, t_last, generator=generator)
        t_last = t
        if progress is not None:
            progress(i + 1, len(ts))
    filled = xp.clone()
    filled[sub] = sample
    out = torch.where(known.bool(), xp, filled)
    return out[keep]


def pad_condition(condition: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A condition (B, K, *s) padded with zeros at the end of each axis to ``shape`` (a
    volume padded by `pad_to`: a mask must not grow into the padding)."""
    pads: list[int] = []
    for n, p in zip(reversed(condition.shape[2:]), reversed(tuple(shape)), strict=True):
        pads += [0, max(0, int(p) - n)]
    return torch.nn.functional.pad(condition, pads) if any(pads) else condition


def _around(hole: torch.Tensor, patch: Sequence[int]) -> tuple[slice, ...]:
    """The box of the true voxels of ``hole`` (*S) grown by a quarter ``patch`` each side and
    to at least ``patch``, kept inside the volume (whose axes are >= the patch's)."""
    idx = hole.nonzero()
    out = []
    for axis, (n, p) in enumerate(zip(hole.shape, patch, strict=True)):
        lo, hi = int(idx[:, axis].min()) - p // 4, int(idx[:, axis].max()) + 1 + p // 4
        if hi - lo < p:
            lo -= (p - (hi - lo)) // 2
            hi = lo + p
        lo, hi = max(lo, 0), min(hi, n)
        if hi - lo < p:  # pushed against an edge
            lo, hi = (0, p) if lo == 0 else (n - p, n)
        out.append(slice(lo, hi))
    return tuple(out)
