"""Intensities to the model's [-1, 1] and back, exactly.

CT: the window of the volume's region (MedDiff-FM's: head-neck W400/L50, chest W1800/L-500,
abdomen W360/L60; other W2000/L0), in HU. MRI: the volume's own 0.5 and 99.5 percentiles.
Either way the map is affine, so ``inverse(forward(x)) == x`` up to float rounding: outputs go
back to the input's own units. Training clips to [-1, 1]; inference does not (a denoised
volume keeps what lay outside the window).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import ScaleIntensityRange

from medfm.errors import MedfmError

__all__ = ["CT_WINDOWS", "IntensityMap", "intensity_map"]

#: region -> (level, width) in HU
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "head-neck": (50.0, 400.0),
    "chest": (-500.0, 1800.0),
    "abdomen": (60.0, 360.0),
    "other": (0.0, 2000.0),
}


@dataclass(frozen=True)
class IntensityMap:
    """The affine map of intensities [lo, hi] (input units) onto [-1, 1]."""

    lo: float
    hi: float

    def forward(self, x: torch.Tensor, *, clip: bool = False) -> torch.Tensor:
        """Input units -> model units ([-1, 1] for [lo, hi]; clipped there if ``clip``)."""
        scale = ScaleIntensityRange(self.lo, self.hi, -1.0, 1.0, clip=clip, dtype=None)
        y = scale(x.float())
        return y.as_tensor() if hasattr(y, "as_tensor") else y  # a plain tensor, no MetaTensor

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Model units -> input units."""
        return self.lo + (y.float() + 1.0) * (0.5 * (self.hi - self.lo))

    def to_model_sigma(self, sigma: float) -> float:
        """A noise std in input units as a std in model units."""
        return 2.0 * sigma / (self.hi - self.lo)


def intensity_map(image: torch.Tensor, modality: str, region: str | None = None) -> IntensityMap:
    """The map of ``image`` (any shape, input units) for a ``modality`` ("ct" or "mri");
    ``region``: the CT window's region (None: "other")."""
    if modality == "ct":
        name = region or "other"
        if name not in CT_WINDOWS:
            name = "other"
        level, width = CT_WINDOWS[name]
        return IntensityMap(level - width / 2, level + width / 2)
    if modality != "mri":
        raise MedfmError(f"unknown modality {modality!r}; choose ct or mri")
    values = image.detach().float().flatten().cpu().numpy()
    lo, hi = (float(v) for v in np.percentile(values, (0.5, 99.5)))
    if not hi > lo:
        hi = lo + 1.0  # a constant image: any unit scale keeps it exact
    return IntensityMap(lo, hi)
