"""SynthFM: synthetic CT, MRI and ultrasound images with exact masks, in 2D and 3D.

Shapes (`anatomy`) -> textures (`texture`) -> modality physics (`ct`, `mri`, `us`), each a
``sample_params(cfg, generator) -> Params`` step and a deterministic render; `case` ties them
into one JSON-serialisable `CaseParams` per case, `dataset` writes nnU-Net v2 datasets,
`manifest` reads and writes their ``manifest.jsonl`` (replayable parameters), `preview` draws
them.
"""

from medfm.synth.case import (
    MODALITIES,
    CaseParams,
    SynthConfig,
    render_cases,
    sample_case,
    to_output,
)
from medfm.synth.dataset import generate_dataset
from medfm.synth.manifest import read_manifest, replay
from medfm.synth.preview import write_preview

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
    "write_preview",
]
