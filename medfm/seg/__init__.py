"""SAM segmentation: model zoo, embedding cache, prompt simulation, training, prediction,
evaluation and export to segment-anything's format.

Conventions shared by every module here (SAM's own):

- An image given to a predictor is a numpy array ``(H, W)`` grey or ``(H, W, 3)`` RGB, uint8;
  `medfm.seg.types.to_rgb_uint8` turns any 2D slice into one.
- Boxes are ``(N, 4)`` float ``x0, y0, x1, y1`` in pixels of the original image, x = column,
  y = row; points are ``(N, P, 2)`` ``x, y`` with labels ``(N, P)`` (1 positive, 0 negative).
- Masks are ``(N, H, W)`` bool at the original image size.

Public names: `Segmenter` (prediction), `list_models` (the zoo's names), `TrainConfig` and `train`
(training), `evaluate` (the evaluation protocol) with `write_report`, `calibrate` (mask
thresholds on synthetic data); the protocol's prompts of a mask, `tight_box` and
`innermost_point`; `to_rgb_uint8` (any 2D slice as a predictor's image); `load_predictor` (a
model or a no-learning baseline, e.g. ``box-ellipse``, by name).
They are imported here eagerly: ``evaluate``, ``calibrate`` and ``train`` share their names with
their modules, and a lazily bound name would be replaced by its module once that is imported.
"""

from medfm.seg.boxes import tight_box
from medfm.seg.calibrate import calibrate
from medfm.seg.evaluate import evaluate, innermost_point, load_predictor, write_report
from medfm.seg.models import list_models
from medfm.seg.predict import Segmenter
from medfm.seg.train import TrainConfig, train
from medfm.seg.types import to_rgb_uint8

__all__ = [
    "Segmenter",
    "TrainConfig",
    "calibrate",
    "evaluate",
    "innermost_point",
    "list_models",
    "load_predictor",
    "tight_box",
    "to_rgb_uint8",
    "train",
    "write_report",
]
