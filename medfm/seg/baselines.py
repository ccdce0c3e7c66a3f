"""Reference predictors that need no learning: a mask drawn from the box prompt alone.

Box convention (the one `medfm.seg.evaluate` uses, SAM's and MedSAM's): coordinates are pixel
indices, pixel ``(r, c)`` has its centre at ``x = c, y = r`` and covers ``[c - 0.5, c + 0.5] x
[r - 0.5, r + 0.5]``. The tight box of a mask whose pixels span columns ``c0..c1`` and rows
``r0..r1`` is ``x0, y0, x1, y1 = c0, r0, c1, r1`` (``x1`` = the last column, inclusive, as
``torchvision.ops.masks_to_boxes`` gives it). The box thus covers the continuous extent
``[x0 - 0.5, x1 + 0.5] x [y0 - 0.5, y1 + 0.5]``, of width ``w = x1 - x0 + 1`` pixels.

- ``box-fill``: pixel ``(r, c)`` is inside when its centre lies in that extent,
  ``x0 - 0.5 <= c < x1 + 0.5`` and ``y0 - 0.5 <= r < y1 + 0.5`` (integer boxes: ``c0..c1``).
- ``box-ellipse``: the ellipse inscribed in that extent, centre ``cx = (x0 + x1) / 2``,
  ``cy = (y0 + y1) / 2``, semi-axes ``w / 2`` and ``h / 2``; pixel ``(r, c)`` is inside when
  ``((c - cx) / (w / 2))**2 + ((r - cy) / (h / 2))**2 <= 1``. In pixel-edge coordinates
  (``X = c + 0.5``, box ``[c0, c1 + 1)``) this is the same ellipse.

Both take box prompts only; a point prompt raises MedfmError.
"""

from __future__ import annotations

import numpy as np
import torch

from medfm.errors import MedfmError
from medfm.seg.types import Prediction

__all__ = ["BASELINES", "BoxEllipse", "BoxFill"]


class _BoxBaseline:
    """Shared state and checks: the image size from ``set_image``, the boxes from ``predict``."""

    name = "box-baseline"
    prompt_types = ("box",)

    def __init__(self) -> None:
        self._size: tuple[int, int] | None = None

    def set_image(self, image: np.ndarray) -> None:
        """image (H, W) or (H, W, 3) uint8; only its size is used."""
        shape = np.shape(image)
        if len(shape) not in (2, 3) or (len(shape) == 3 and shape[-1] != 3):
            raise MedfmError(f"{self.name}: expected an (H, W) or (H, W, 3) image, got {shape}")
        self._size = (int(shape[0]), int(shape[1]))

    def predict(
        self,
        boxes: np.ndarray | None = None,
        points: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        *,
        multimask: bool = False,
    ) -> Prediction:
        """boxes (N, 4) x0, y0, x1, y1 (see the module docstring) -> masks (N, H, W) bool,
        scores (N,) ones. ``multimask`` changes nothing (one mask per box)."""
        if points is not None or labels is not None:
            raise MedfmError(
                f"the {self.name} baseline needs box prompts, not points (--box; in evaluate, "
                "--prompt box)"
            )
        if boxes is None:
            raise MedfmError(f"the {self.name} baseline needs box prompts (boxes=(N, 4))")
        if self._size is None:
            raise MedfmError(f"{self.name}: call set_image before predict")
        b = torch.as_tensor(np.asarray(boxes, dtype=np.float64))
        if b.ndim == 1 and b.shape[0] == 4:
            b = b[None]
        if b.ndim != 2 or b.shape[1] != 4:
            raise MedfmError(f"{self.name}: boxes must be (N, 4) x0, y0, x1, y1, got {b.shape}")
        if not torch.isfinite(b).all():
            raise MedfmError(f"{self.name}: boxes contain NaN or inf")
        if ((b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])).any():
            raise MedfmError(f"{self.name}: boxes need x1 >= x0 and y1 >= y0")
        h, w = self._size
        rows = torch.arange(h, dtype=torch.float64)[None, :, None]  # (1, H, 1)
        cols = torch.arange(w, dtype=torch.float64)[None, None, :]  # (1, 1, W)
        x0, y0, x1, y1 = (b[:, i, None, None] for i in range(4))  # each (N, 1, 1)
        masks = self._draw(rows, cols, x0, y0, x1, y1)
        return Prediction(masks=masks, scores=torch.ones(len(b)), logits=None)

    def _draw(self, rows, cols, x0, y0, x1, y1) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class BoxFill(_BoxBaseline):
    """Every pixel whose centre lies in the box: the box itself as the mask."""

    name = "box-fill"

    def _draw(self, rows, cols, x0, y0, x1, y1) -> torch.Tensor:
        inside_c = (cols >= x0 - 0.5) & (cols < x1 + 0.5)
        inside_r = (rows >= y0 - 0.5) & (rows < y1 + 0.5)
        return inside_r & inside_c


class BoxEllipse(_BoxBaseline):
    """The ellipse inscribed in the box's pixel extent (see the module docstring)."""

    name = "box-ellipse"

    def _draw(self, rows, cols, x0, y0, x1, y1) -> torch.Tensor:
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        a, b = (x1 - x0 + 1) / 2, (y1 - y0 + 1) / 2
        return ((cols - cx) / a) ** 2 + ((rows - cy) / b) ** 2 <= 1


BASELINES: dict[str, type[_BoxBaseline]] = {"box-ellipse": BoxEllipse, "box-fill": BoxFill}
