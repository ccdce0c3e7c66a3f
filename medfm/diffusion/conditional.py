"""The ControlNet tasks, on volumes in model units ([-1, 1]).

- `superres`: through-plane super-resolution by a factor F along one axis. The output has
  F(n-1)+1 slices there; slice F*k is input slice k, unchanged. Every method walks a
  deterministic (DDIM) path from a noised start to step 0, each clean estimate's kept slices
  replaced by the input's (DiffPIR's data consistency for noise-free samples); with a
  superres ControlNet each noise estimate also sees the condition (the linear interpolation
  and the kept slices), without one the base model alone fills the gaps (zero-shot).
- `generate`: a volume whose structures lie where a label map says (mask ControlNet); with
  an image, the mask's voxels are generated inside it and the rest is kept (RePaint, guided).

Randomness comes from ``generator`` only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from medfm.diffusion.controlnet import (
    Controlled,
    ControlNet,
    mask_condition,
    superres_condition,
)
from medfm.diffusion.model import DiffusionModel
from medfm.diffusion.sampling import Windows, initial_noise, pad_to, predict_noise
from medfm.diffusion.schedulers import training_scheduler
from medfm.diffusion.tasks import _check_volume, _regions, _tweedie, inpaint, synthesize
from medfm.errors import MedfmError

__all__ = ["SUPERRES_DEFAULTS", "generate", "superres"]

#: `superres`'s start step, steps and samples by method, chosen on the 5 tuning volumes
#: (docs/models/medfm-diff-tiny-superres.md): one step from t (the ControlNet's or the base's
#: clean estimate, the kept slices enforced), averaged over 8 draws of the start noise
SUPERRES_DEFAULTS = {
    "controlnet": {"t_start": 600, "steps": 1, "samples": 8},
    "zeroshot": {"t_start": 300, "steps": 1, "samples": 8},
}

Progress = Callable[[int, int], None]


@torch.no_grad()
def superres(
    model: DiffusionModel,
    low: torch.Tensor,
    factor: int,
    *,
    axis: int = -1,
    controlnet: ControlNet | None = None,
    steps: int = 10,
    t_start: int = 999,
    samples: int = 1,
    region: str | None = None,
    overlap: float = 0.5,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """``low`` (B, C, *S) super-resolved ``factor`` times along ``axis``: (B, C, *S') with
    F(n-1)+1 slices on the axis, slice F*k equal to input slice k.

    From the linear interpolation noised to ``t_start`` (fresh noise from ``generator``),
    ``steps`` deterministic steps to 0; at each the clean estimate's kept slices are the
    input's. ``controlnet``: a superres ControlNet of ``model`` (None: zero-shot);
    ``samples``: that many walks from independent noise, averaged (an estimate of the
    posterior mean, which PSNR rewards; the cost grows with it)."""
    _check_volume(low, model, "the low-resolution volume")
    if samples < 1:
        raise MedfmError(f"--samples must be 1 or more, got {samples}")
    b = low.shape[0]
    low = low.repeat_interleave(samples, dim=0)
    cond = superres_condition(low, factor, axis)
    n_train = model.config.schedule.num_train_timesteps
    if not 0 <= t_start < n_train:
        raise MedfmError(f"the start step must lie in 0..{n_train - 1}, got {t_start}")
    if steps < 1:
        raise MedfmError(f"--steps must be 1 or more, got {steps}")
    net, condition = model, None
    if controlnet is not None:
        controlnet.check_task("superres")
        net = Controlled(model, controlnet)
    c = low.shape[1]
    y, keep = pad_to(cond[:, :c], model.config.patch)
    known = pad_to(cond[:, c:].expand_as(cond[:, :c]), model.config.patch)[0] > 0.5
    if controlnet is not None:
        condition = torch.cat([y, known.float()[:, :1]], dim=1)
    ab = training_scheduler(model.config.schedule).alphas_cumprod
    windows, positions = Windows.for_model(model, y, overlap)
    regions = _regions(model, region, y.shape[0], y.device)
    ts = torch.linspace(t_start, 0, steps).round().long().unique_consecutive().tolist()
    a0 = float(ab[ts[0]])
    noise = initial_noise(y.shape, generator=generator, device=y.device)
    xt = math.sqrt(a0) * y + math.sqrt(1 - a0) * noise
    x0 = y
    for i, t in enumerate(ts):
        a = float(ab[t])
        eps = predict_noise(net, xt, t, windows, positions=positions, regions=regions,
                            condition=condition)  # fmt: skip
        x0 = torch.where(known, y, _tweedie(xt, eps, a).clamp(-1, 1))
        if i + 1 < len(ts):
            a_next = float(ab[ts[i + 1]])
            eps_dc = (xt - math.sqrt(a) * x0) / math.sqrt(1 - a)
            xt = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps_dc
        if progress is not None:
            progress(i + 1, len(ts))
    x0 = x0[keep]
    return x0.reshape(b, samples, *x0.shape[1:]).mean(dim=1)


@torch.no_grad()
def generate(
    model: DiffusionModel,
    controlnet: ControlNet,
    mask: torch.Tensor,
    *,
    image: torch.Tensor | None = None,
    sampler: str = "ddim",
    steps: int = 50,
    jump_length: int = 10,
    jump_n_sample: int = 5,
    region: str | None = None,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """A volume (B, C, *S) whose structures follow the label map ``mask`` (B or 1, 1, *S;
    labels 0..K of the ControlNet): sampled whole (``sampler`` in ``steps`` steps), or with
    ``image`` (B, C, *S) only the mask's voxels generated inside it (guided RePaint) and the
    rest of the image kept."""
    controlnet.check_task("mask")
    net = Controlled(model, controlnet)
    cond = mask_condition(mask, controlnet.config.labels)
    if image is None:
        b = mask.shape[0]
        return synthesize(
            net, tuple(mask.shape[2:]), sampler=sampler, steps=steps, region=region, batch=b,
            generator=generator, device=mask.device, condition=cond, progress=progress,
        )  # fmt: skip
    if tuple(image.shape[2:]) != tuple(mask.shape[2:]):
        raise MedfmError(
            f"the mask's shape {tuple(mask.shape[2:])} differs from the image's "
            f"{tuple(image.shape[2:])}; give a mask of the same grid"
        )
    return inpaint(
        net, image, mask > 0.5, steps=steps, jump_length=jump_length,
        jump_n_sample=jump_n_sample, region=region, condition=cond, generator=generator,
        progress=progress,
    )  # fmt: skip
