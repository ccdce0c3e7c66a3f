"""One image or volume file read or written by its name: NIfTI (``.nii``, ``.nii.gz``), 2D
images (``.png``; JPEG, BMP and TIFF for reading) and DICOM series (a folder of slices, or one
``.dcm`` file of it). The axis order is ``medfm.io.volume``'s."""

from __future__ import annotations

import os
from pathlib import Path

from medfm.errors import MedfmError
from medfm.io.dicom import read_dicom_series
from medfm.io.nifti import read_nifti, write_nifti
from medfm.io.png import read_png, write_png
from medfm.io.volume import Volume

__all__ = ["load_volume", "save_volume"]

NIFTI_ENDINGS = (".nii", ".nii.gz")
IMAGE_ENDINGS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def load_volume(path: str | os.PathLike) -> Volume:
    """Read ``path`` by its name: NIfTI -> ``(1, i, j, k)`` with its affine; a 2D image ->
    ``(C, H, W)``, identity affine; a folder or a ``.dcm`` file -> the DICOM series in that
    folder ``(1, columns, rows, slices)``."""
    path = Path(path)
    name = path.name.lower()
    if path.is_dir():
        return read_dicom_series(path)
    if name.endswith(".dcm"):
        return read_dicom_series(path.parent)
    if name.endswith(NIFTI_ENDINGS):
        return read_nifti(path)
    if name.endswith(IMAGE_ENDINGS):
        return read_png(path)
    if not path.exists():
        raise MedfmError(f"{path} does not exist; check the path")
    raise MedfmError(
        f"{path}: unknown file type; medfm reads {', '.join(NIFTI_ENDINGS + IMAGE_ENDINGS)}, "
        "and DICOM series (a folder)"
    )


def save_volume(volume: Volume, path: str | os.PathLike) -> Path:
    """Write ``volume`` to ``path`` by its name, atomically: ``.nii`` / ``.nii.gz`` (one
    channel, with its affine) or ``.png`` (uint8 ``(1, H, W)`` or ``(3, H, W)``). Returns
    ``path``."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(NIFTI_ENDINGS):
        write_nifti(volume, path)
    elif name.endswith(".png"):
        if not isinstance(volume, Volume):
            raise MedfmError(f"save_volume needs a Volume, got {type(volume).__name__}")
        write_png(volume, path)
    else:
        raise MedfmError(f"{path}: medfm writes .nii, .nii.gz or .png files; rename the output")
    return path
