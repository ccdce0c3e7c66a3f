"""MedDiff-FM: a 3D diffusion foundation model for CT and MRI volumes (docs/diffusion.md).

Conventions shared by every module here:

- Volumes are tensors ``(B, C, D, H, W)`` (or ``(B, C, H, W)`` for a 2D model) in *model
  units*: [-1, 1] by the model's intensity rule (`intensity_map`: CT windows per region, MRI
  percentiles), which maps back to the input's own units exactly.
- A volume of any size is processed in overlapping windows of the model's patch, each with its
  position channels in the whole volume's frame, blended with Gaussian weights at every step.
- Randomness comes from a ``torch.Generator`` only: the same seed gives the same output.

Public names: `DiffusionConfig` and `UNetConfig` (a model's settings), `DiffusionModel`
(``save_pretrained`` / ``from_pretrained``), `load_diffusion_model` (a run or model folder, or
the bundled ``medfm-diff-tiny``), `DiffusionTrainConfig` and `train`; the zero-shot tasks
`synthesize`, `denoise` (with `estimate_noise_std`), `anomaly_map` and `inpaint`;
`intensity_map`, `read_scaled` and `write_unscaled` (a NIfTI file into model units and back);
`make_scheduler` (a sampler by name); `write_montage` (a PNG of volumes' middle slices).

ControlNet (fine-tuned tasks on the frozen model): `ControlNet` (``from_base``,
``save_pretrained`` / ``from_pretrained``, refused with another base), `Controlled` (base +
ControlNet as one noise predictor), `ControlNetTrainConfig` and `controlnet_train`,
`load_controlnet` (a folder, or the one shipped for a task); the tasks `superres` and
`generate` (guided inpainting: `inpaint` with a `Controlled` model and a condition); the bridge
`make_dataset` over masks (`MaskCase`, `FolderMasks`).
"""

from medfm.diffusion.bridge import FolderMasks, MaskCase, make_dataset
from medfm.diffusion.conditional import generate, superres
from medfm.diffusion.config import DiffusionConfig, UNetConfig
from medfm.diffusion.control_train import ControlNetTrainConfig, controlnet_train
from medfm.diffusion.controlnet import Controlled, ControlNet, mask_condition
from medfm.diffusion.files import (
    load_controlnet,
    load_diffusion_model,
    read_scaled,
    write_unscaled,
)
from medfm.diffusion.intensity import intensity_map
from medfm.diffusion.model import DiffusionModel
from medfm.diffusion.preview import write_montage
from medfm.diffusion.schedulers import make_scheduler
from medfm.diffusion.tasks import anomaly_map, denoise, estimate_noise_std, inpaint, synthesize
from medfm.diffusion.train import DiffusionTrainConfig, train

__all__ = [
    "ControlNet",
    "ControlNetTrainConfig",
    "Controlled",
    "DiffusionConfig",
    "DiffusionModel",
    "DiffusionTrainConfig",
    "FolderMasks",
    "MaskCase",
    "UNetConfig",
    "anomaly_map",
    "controlnet_train",
    "denoise",
    "estimate_noise_std",
    "generate",
    "inpaint",
    "intensity_map",
    "load_controlnet",
    "load_diffusion_model",
    "make_dataset",
    "make_scheduler",
    "mask_condition",
    "read_scaled",
    "superres",
    "synthesize",
    "train",
    "write_montage",
    "write_unscaled",
]
