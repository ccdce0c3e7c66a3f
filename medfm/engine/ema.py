"""An exponential moving average of the trained weights (for diffusion models' inference)."""

from __future__ import annotations

import torch


class EMA:
    """Shadow copies of named parameters, moved towards them after each optimizer step.

    The decay at update t (0-based) is ``min(decay, (1 + t) / (10 + t))``, diffusers'
    ``EMAModel`` without its power warm-up: early weights are forgotten quickly.
    """

    def __init__(self, params: list[tuple[str, torch.nn.Parameter]], decay: float) -> None:
        self.decay = float(decay)
        self.names = [n for n, _ in params]
        self.params = [p for _, p in params]
        self.shadow = [p.detach().clone() for p in self.params]

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move every shadow weight by ``1 - decay_at(step)`` towards its parameter."""
        weight = 1 - self.decay_at(step)
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        pairs = zip(self.names, self.shadow, strict=True)
        return {n: t.detach().cpu().contiguous() for n, t in pairs}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.names) - set(state))
        if missing:
            raise KeyError(f"EMA weights miss {missing[:3]}")
        with torch.no_grad():
            for name, t in zip(self.names, self.shadow, strict=True):
                t.copy_(state[name])


__all__ = ["EMA"]
