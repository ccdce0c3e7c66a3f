"""SynthFM: synthetic CT, MRI and ultrasound images with exact masks, in 2D and 3D.

Shapes (`anatomy`) -> textures (`texture`) -> modality physics (`ct`, `mri`, `us`), each a
``sample_params(cfg, generator) -> Params`` step and a deterministic render; `case` ties them
into one JSON-serialisable `CaseParams` per case, `dataset` writes nnU-Net v2 datasets.
"""

from medfm.synth.case import (
    MODALITIES,
    CaseParams,
    SynthConfig,
    render_cases,
    sample_case,
    to_output,
)
from medfm.synth.dataset import generate_dataset, read_manifest, replay

__all__ = [
    "MODALITIES",
    "CaseParams",
    "SynthConfig",
    "generate_dataset",
    "read_manifest",
    "render_cases",
    "replay",
    "sample_case",
    "to_output",
]
