"""Per-case randomness: case i of a run depends only on (seed, i).

A case's parameters are drawn from one stream of uniforms made by a CPU `torch.Generator`
seeded from (seed, i); its noise tensors come from a second generator seeded with the
case's ``noise_seed`` (a drawn parameter), on the device that renders it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

_BLOCK = 256


def case_seed(seed: int, index: int) -> int:
    """A 63-bit seed for case ``index`` of a run with ``seed`` (independent of sharding)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFF, int(index)]).generate_state(
        2, dtype=np.uint32
    )
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFFFFFFFFFFFFFF


class Draw:
    """Draws scalars from a `torch.Generator` in blocks (one generator call per 256 draws).

    Every method consumes a fixed number of uniforms, so the sequence of draws is a pure
    function of the seed and of the order of calls.
    """

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        self._buf: list[float] = []
        self._pos = 0

    def _next(self) -> float:
        if self._pos >= len(self._buf):
            self._buf = torch.rand(_BLOCK, generator=self.generator, dtype=torch.float64).tolist()
            self._pos = 0
        u = self._buf[self._pos]
        self._pos += 1
        return u

    def uniform(self, low: float = 0.0, high: float = 1.0) -> float:
        return low + (high - low) * self._next()

    def log_uniform(self, low: float, high: float) -> float:
        return math.exp(self.uniform(math.log(low), math.log(high)))

    def bernoulli(self, p: float) -> bool:
        return self._next() < p

    def randint(self, low: int, high: int) -> int:
        """An integer in [low, high] (both included)."""
        return min(high, low + int(self._next() * (high - low + 1)))

    def normal(self, mean: float = 0.0, std: float = 1.0) -> float:
        u1 = max(self._next(), 1e-12)
        u2 = self._next()
        return mean + std * math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)

    def choice(self, options: Sequence, weights: Sequence[float] | None = None):
        if weights is None:
            return options[min(len(options) - 1, int(self._next() * len(options)))]
        total = float(sum(weights))
        u = self._next() * total
        acc = 0.0
        for option, w in zip(options, weights, strict=True):
            acc += w
            if u < acc:
                return option
        return options[-1]

    def unit_vector(self, ndim: int) -> list[float]:
        v = [self.normal() for _ in range(ndim)]
        n = math.sqrt(sum(x * x for x in v)) or 1.0
        return [x / n for x in v]

    def seed(self) -> int:
        """A fresh 53-bit seed (for a noise generator)."""
        return int(self._next() * 2**53)


def as_draw(generator: torch.Generator | Draw) -> Draw:
    """Wrap a `torch.Generator` (or pass a `Draw` through) for `sample_params` functions."""
    return generator if isinstance(generator, Draw) else Draw(generator)


def noise_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (CPU and CUDA streams differ)."""
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(int(seed))
    return g
