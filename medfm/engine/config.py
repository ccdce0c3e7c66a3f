"""The engine's settings: what every training run has, whatever it trains."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class EngineConfig(BaseModel):
    """Loop, optimiser, schedule, checkpoints and hardware of one run.

    - AdamW (``lr``, ``weight_decay``) with ``warmup`` linear warm-up steps, then cosine decay
      to 0 at ``steps`` (`lr_factor`); optional gradient-norm clipping (``grad_clip``).
    - ``accumulate``: micro-steps (each its own batch) whose gradients are summed into one
      optimizer step; micro-step ``s = step * accumulate + i`` draws from
      ``step_generator(seed, s)``, so with ``accumulate=1`` step s draws what it always did.
    - ``ema_decay``: keep an exponential moving average of the trained weights (diffusers'
      warm-up: the decay at step t is ``min(ema_decay, (1 + t) / (10 + t))``).
    - A checkpoint every ``checkpoint_every`` steps and at the end; the newest
      ``keep_checkpoints`` are kept.
    - bf16 autocast when ``amp`` and the device is CUDA; ``compile``: the task's
      `Task.compile` (torch.compile).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    out: str
    steps: int = Field(ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup: int = Field(100, ge=0)
    grad_clip: float | None = Field(None, gt=0)
    accumulate: int = Field(1, ge=1)
    ema_decay: float | None = Field(None, gt=0, lt=1)
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 0
    device: str = "cpu"
    amp: bool = True
    compile: bool = False

    @classmethod
    def of(cls, settings) -> EngineConfig:
        """The engine's part of a family's settings (a model with these fields, e.g. a
        subclass of this one)."""
        return cls(**{name: getattr(settings, name) for name in cls.model_fields})


__all__ = ["EngineConfig"]
