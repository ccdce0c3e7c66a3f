"""Samplers: diffusers' schedulers chosen by name, on the model's own noise schedule.

``ddpm`` (ancestral, the training process run backwards), ``ddim`` (deterministic, eta 0),
``dpm++`` (DPM-Solver++ multistep, 2nd order) and ``unipc`` (UniPC multistep). The multistep
ones keep state between calls, so a sampling loop calls ``step()`` once per timestep on the
whole volume (`medfm.diffusion.sampling`), never once per window.
"""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    RePaintScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from medfm.diffusion.config import ScheduleConfig
from medfm.errors import MedfmError

__all__ = ["SAMPLERS", "make_scheduler", "repaint_scheduler", "training_scheduler"]

_BETAS = {"cosine": "squaredcos_cap_v2", "linear": "linear", "scaled_linear": "scaled_linear"}

SAMPLERS: dict[str, type[SchedulerMixin]] = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
}


def _common(schedule: ScheduleConfig) -> dict:
    return {
        "num_train_timesteps": schedule.num_train_timesteps,
        "beta_schedule": _BETAS[schedule.beta_schedule],
        "prediction_type": schedule.prediction_type,
    }


def training_scheduler(schedule: ScheduleConfig) -> DDPMScheduler:
    """The forward process (``add_noise``, ``alphas_cumprod``) of ``schedule``."""
    return DDPMScheduler(**_common(schedule), clip_sample=False)


def make_scheduler(name: str, steps: int, schedule: ScheduleConfig) -> SchedulerMixin:
    """A sampler of ``steps`` steps over ``schedule`` ("trailing" spacing, so the first step
    starts from pure noise at t = T - 1). Every step's estimate of the clean volume is clipped
    to [-1, 1], the range the model was trained on (improved DDPM's sampling): at T - 1 the
    cosine schedule's alpha_bar is ~2e-9, where the estimate (x - sqrt(1 - a) eps) / sqrt(a)
    multiplies the model's error by ~2e4, and unclipped samples reach +-8000."""
    if name not in SAMPLERS:
        raise MedfmError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    if not 1 <= steps <= schedule.num_train_timesteps:
        raise MedfmError(
            f"--steps must lie in 1..{schedule.num_train_timesteps} (the training steps), "
            f"got {steps}"
        )
    kwargs = _common(schedule) | {"timestep_spacing": "trailing"}
    if name in ("ddpm", "ddim"):
        kwargs |= {"clip_sample": True, "clip_sample_range": 1.0}
    else:  # dynamic thresholding whose threshold is held at 1: clipping to [-1, 1]
        kwargs |= {"thresholding": True, "sample_max_value": 1.0}
    if name == "dpm++":
        kwargs |= {"algorithm_type": "dpmsolver++", "solver_order": 2}
    scheduler = SAMPLERS[name](**kwargs)
    scheduler.set_timesteps(steps)
    return scheduler


def repaint_scheduler(
    steps: int, jump_length: int, jump_n_sample: int, schedule: ScheduleConfig
) -> RePaintScheduler:
    """RePaint over ``schedule``: ``steps`` steps, ``jump_n_sample`` resamplings every
    ``jump_length`` steps (its timesteps go back up at each jump)."""
    for name, v in (("--steps", steps), ("--jump-length", jump_length),
                    ("--jump-n-sample", jump_n_sample)):  # fmt: skip
        if v < 1:
            raise MedfmError(f"{name} must be >= 1, got {v}")
    kwargs = {k: v for k, v in _common(schedule).items() if k != "prediction_type"}
    sched = RePaintScheduler(**kwargs, clip_sample=True)  # as make_scheduler's
    sched.set_timesteps(steps, jump_length=jump_length, jump_n_sample=jump_n_sample)
    return sched
