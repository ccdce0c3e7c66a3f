"""The predictor interface every segmenter and baseline implements, and image conversion."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


@dataclass
class Prediction:
    """masks (N, H, W) bool at the image size; scores (N,) predicted IoU (baselines: 1);
    logits (N, h, w) float low-resolution mask logits, or None for baselines."""

    masks: torch.Tensor
    scores: torch.Tensor
    logits: torch.Tensor | None = None

    def __iter__(self) -> Iterator[torch.Tensor | None]:
        """``masks, scores, logits = prediction``, as segment-anything's ``SamPredictor.predict``
        returns them."""
        return iter((self.masks, self.scores, self.logits))


class Predictor(Protocol):
    """SAM-style interactive predictor: the image is set once, then prompted many times."""

    name: str

    def set_image(self, image: np.ndarray) -> None:
        """image (H, W) or (H, W, 3) uint8."""

    def predict(
        self,
        boxes: np.ndarray | None = None,
        points: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        *,
        multimask: bool = False,
    ) -> Prediction:
        """boxes (N, 4) xyxy, points (N, P, 2) xy, labels (N, P); N prompts -> N masks
        (with multimask=True the best-scoring of SAM's three masks per prompt)."""


def click_multimask(predictor: Predictor) -> bool:
    """Whether a single click asks the predictor for SAM's three masks (keeping the
    best-scoring): its ``multimask_clicks`` where it has one (False for a medfm model trained
    with one output for single clicks, `medfm.seg.train`'s ``prompt.multimask``), else True,
    SAM's setting for an ambiguous click."""
    return bool(getattr(predictor, "multimask_clicks", True))


def to_rgb_uint8(
    image: np.ndarray | torch.Tensor, *, lower: float = 0.5, upper: float = 99.5
) -> np.ndarray:
    """A 2D slice (H, W), (H, W, 3) or (C, H, W) with C in {1, 3} -> (H, W, 3) uint8.

    uint8 input is kept as is; anything else is mapped from its [lower, upper] percentiles to
    0..255 (MedSAM's pre-processing), a constant image to 0.
    """
    x = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if x.ndim == 3 and x.shape[0] in (1, 3) and x.shape[-1] not in (1, 3):
        x = np.moveaxis(x, 0, -1)
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[-1] != 3):
        raise ValueError(f"expected a 2D grey or RGB image, got shape {x.shape}")
    if x.dtype != np.uint8:
        x = x.astype(np.float32)
        lo, hi = np.percentile(x, [lower, upper])
        x = np.zeros_like(x) if hi <= lo else (np.clip((x - lo) / (hi - lo), 0, 1) * 255)
        x = np.round(x).astype(np.uint8)
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=-1)
    return np.ascontiguousarray(x)
