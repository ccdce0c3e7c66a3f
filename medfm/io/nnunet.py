"""nnU-Net v2 raw datasets: the on-disk contract every medfm dataset follows.

Layout (https://github.com/MIC-DKFZ/nnUNet/blob/master/documentation/dataset_format.md)::

    FOLDER/dataset.json                 channel_names, labels, numTraining, file_ending
    FOLDER/imagesTr/CASE_0000.ENDING    one file per channel (_0000, _0001, ...)
    FOLDER/labelsTr/CASE.ENDING         integer labels 0..K, same grid as the image

2D sets use ``.png`` (uint8 grey images, uint8 labels), 3D sets ``.nii.gz`` (image and label
carry the image's affine). ``write_case`` writes the image files first and the label last, each
atomically, so a case is complete iff its label file exists (``case_complete``): a killed run
resumes by rewriting the cases without a label.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from medfm.errors import MedfmError
from medfm.io.atomic import atomic_write_text, remove_temp_files
from medfm.io.nifti import cast_array, read_nifti, write_nifti
from medfm.io.png import read_png, write_png
from medfm.io.volume import Volume

__all__ = [
    "DatasetJson",
    "case_complete",
    "case_paths",
    "iter_dataset",
    "list_cases",
    "read_dataset_json",
    "write_case",
    "write_dataset_json",
]

FILE_ENDINGS = (".png", ".nii.gz", ".nii")


class DatasetJson(BaseModel):
    """The ``dataset.json`` of an nnU-Net v2 raw dataset.

    Unknown keys of foreign files are kept (``extra="allow"``) and written back.
    """

    model_config = ConfigDict(extra="allow")

    channel_names: dict[str, str]
    """Channel index ("0", "1", ...) -> name, e.g. ``{"0": "CT"}``."""
    labels: dict[str, int]
    """Label name -> value; must hold ``"background": 0`` and the values 0..K once each."""
    numTraining: int = Field(ge=0)
    file_ending: str
    """``".png"`` (2D) or ``".nii.gz"`` (3D); any ending nnU-Net reads is accepted."""
    name: str | None = None
    description: str | None = None
    reference: str | None = None
    licence: str | None = None
    overwrite_image_reader_writer: str | None = None

    @field_validator("channel_names")
    @classmethod
    def _channels_consecutive(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("channel_names is empty; give at least {'0': 'NAME'}")
        if sorted(v) != sorted(str(i) for i in range(len(v))):
            raise ValueError(f"channel_names keys must be '0'..'{len(v) - 1}', got {list(v)}")
        return v

    @field_validator("labels")
    @classmethod
    def _labels_consecutive(cls, v: dict[str, int]) -> dict[str, int]:
        if v.get("background") != 0:
            raise ValueError(f'labels must contain "background": 0, got {v}')
        values = sorted(v.values())
        if values != list(range(len(values))):
            raise ValueError(f"label values must be 0..K, each once, got {values}")
        return v

    @field_validator("file_ending")
    @classmethod
    def _ending_dot(cls, v: str) -> str:
        if not v.startswith(".") or len(v) < 2:
            raise ValueError(f'file_ending must start with a dot, like ".nii.gz", got {v!r}')
        return v

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)


def write_dataset_json(folder: str | os.PathLike, ds: DatasetJson) -> None:
    """Write ``FOLDER/dataset.json`` atomically (indent 2; unset optional keys left out)."""
    text = json.dumps(ds.model_dump(exclude_none=True), indent=2) + "\n"
    atomic_write_text(Path(folder) / "dataset.json", text)


def read_dataset_json(folder: str | os.PathLike) -> DatasetJson:
    """Read and validate ``FOLDER/dataset.json``."""
    path = Path(folder) / "dataset.json"
    if not path.is_file():
        raise MedfmError(f"{path} does not exist; is {folder} an nnU-Net raw dataset folder?")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MedfmError(f"{path} is not valid JSON ({e}); fix or rewrite it") from None
    except RecursionError:
        raise MedfmError(f"{path} is nested too deeply to be a dataset.json") from None
    try:
        return DatasetJson.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'file'}: {err['msg']}" for err in e.errors()
        )
        raise MedfmError(f"{path} is not a valid nnU-Net dataset.json: {problems}") from None


def _check_ending(file_ending: str) -> None:
    if file_ending not in FILE_ENDINGS:
        raise MedfmError(f"file_ending {file_ending!r} is not supported; use one of {FILE_ENDINGS}")


def case_paths(
    folder: str | os.PathLike, case_id: str, file_ending: str, channel: int = 0
) -> tuple[Path, Path]:
    """``(imagesTr/{case_id}_{channel:04d}{ending}, labelsTr/{case_id}{ending})`` under folder."""
    folder = Path(folder)
    return (
        folder / "imagesTr" / f"{case_id}_{channel:04d}{file_ending}",
        folder / "labelsTr" / f"{case_id}{file_ending}",
    )


def case_complete(folder: str | os.PathLike, case_id: str, file_ending: str) -> bool:
    """Whether the case's label file exists (``write_case`` writes it last, atomically)."""
    return case_paths(folder, case_id, file_ending)[1].is_file()


def _label_array(label: Volume, case_id: str) -> np.ndarray:
    """The label as uint8 (values 0..255) or int16, checked to be integer-valued."""
    t = label.data.detach().cpu()
    if t.dtype.is_floating_point or t.is_complex():
        raise MedfmError(
            f"case {case_id}: the label is {t.dtype}; labels must be an integer tensor "
            "(e.g. .to(torch.uint8))"
        )
    arr = t.numpy()
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0:
        raise MedfmError(f"case {case_id}: the label has negative values (min {lo}); use 0..K")
    dtype = np.uint8 if hi <= 255 else np.int16
    return cast_array(arr, dtype, f"case {case_id}'s label")


def write_case(
    folder: str | os.PathLike,
    case_id: str,
    image: Volume,
    label: Volume,
    file_ending: str,
    *,
    image_dtype: np.dtype | type | None = None,
) -> None:
    """Write one case: ``imagesTr/{case}_{c:04d}{ending}`` per channel c, then ``labelsTr``.

    Everything is checked before anything is written. An existing label of the case is removed
    first and the new one written last, each file atomically, so ``case_complete`` is true only
    once the whole case is on disk; leftover temporary files of an interrupted write of this case
    are removed too.

    Args:
        image: ``(C, *S)``; one file per channel. ``.png``: 2D, uint8 after ``image_dtype``.
            ``.nii.gz`` / ``.nii``: 2D or 3D, dtype kept unless ``image_dtype`` is given
            (e.g. ``np.int16`` for CT in HU).
        label: ``(1, *S)`` integer (or bool) tensor with values 0..K, same spatial shape as the
            image; stored as uint8 (int16 above 255). For NIfTI the label is written with the
            **image's** affine (the label's own affine is not used).
        file_ending: ``".png"``, ``".nii.gz"`` or ``".nii"`` (the dataset.json's file_ending).
        image_dtype: cast the image to this dtype before writing (floats are rounded for integer
            dtypes; out-of-range values raise MedfmError).
    """
    _check_ending(file_ending)
    if not isinstance(image, Volume) or not isinstance(label, Volume):
        raise MedfmError("write_case needs image and label as medfm.io.Volume")
    if label.data.shape[0] != 1:
        raise MedfmError(
            f"case {case_id}: the label has {label.data.shape[0]} channels; it must have one"
        )
    if image.shape != label.shape:
        raise MedfmError(
            f"case {case_id}: image shape {image.shape} and label shape {label.shape} differ"
        )
    if "/" in case_id or os.sep in case_id or not case_id:
        raise MedfmError(f"case id {case_id!r} must be a non-empty file name without slashes")
    label_arr = torch.from_numpy(_label_array(label, case_id))
    if file_ending == ".png":
        if image.ndim != 2:
            raise MedfmError(
                f"case {case_id}: .png datasets are 2D, the image is {image.ndim}D "
                f"(shape {image.shape}); use file_ending='.nii.gz'"
            )
        if label_arr.dtype != torch.uint8:
            raise MedfmError(f"case {case_id}: .png labels must be 0..255")
        arr = image.data.detach().cpu().numpy()
        if image_dtype is not None:
            arr = cast_array(arr, image_dtype, f"case {case_id}'s image")
        if arr.dtype != np.uint8:
            raise MedfmError(
                f"case {case_id}: .png images must be uint8, got {arr.dtype}; scale to 0..255 "
                "and cast, or pass image_dtype=np.uint8"
            )
        channels = [arr[c : c + 1] for c in range(arr.shape[0])]
    else:
        arr = image.data.detach().cpu().numpy()
        if image_dtype is not None:  # cast all channels before writing any file
            arr = cast_array(arr, image_dtype, f"case {case_id}'s image")
        channels = [Volume(torch.from_numpy(arr[c : c + 1]), image.affine) for c in range(len(arr))]

    image_paths = [case_paths(folder, case_id, file_ending, c)[0] for c in range(len(channels))]
    _, label_path = case_paths(folder, case_id, file_ending)
    # A rewritten case is incomplete until its new label lands; clear an interrupted write's
    # temporary files (a killed run leaves them; nnU-Net would take them for cases).
    label_path.unlink(missing_ok=True)
    for p in (*image_paths, label_path):
        remove_temp_files(p)
    if file_ending == ".png":
        for ch, p in zip(channels, image_paths, strict=True):
            write_png(ch, p)
        write_png(label_arr, label_path)
    else:
        for ch, p in zip(channels, image_paths, strict=True):
            write_nifti(ch, p)
        write_nifti(Volume(label_arr, image.affine), label_path)


def _read(path: Path) -> Volume:
    return read_png(path) if path.name.lower().endswith(".png") else read_nifti(path)


def list_cases(folder: str | os.PathLike, *, split: str = "Tr") -> list[str]:
    """Sorted case ids that have a label file in ``labels{split}`` (hidden files ignored)."""
    folder = Path(folder)
    ds = read_dataset_json(folder)
    labels_dir = folder / f"labels{split}"
    if not labels_dir.is_dir():
        raise MedfmError(f"{labels_dir} does not exist; is {folder} an nnU-Net raw dataset?")
    ending = ds.file_ending
    return sorted(
        p.name[: -len(ending)]
        for p in labels_dir.iterdir()
        if p.name.endswith(ending) and not p.name.startswith(".") and p.is_file()
    )


def iter_dataset(
    folder: str | os.PathLike, *, split: str = "Tr"
) -> Iterator[tuple[str, Volume, Volume]]:
    """Yield ``(case_id, image, label)`` for every labelled case, in sorted case order.

    ``image`` stacks the channel files ``_0000``, ``_0001``, ... (as many as dataset.json's
    channel_names) along C; an RGB ``.png`` channel file contributes 3 channels. ``label`` is
    ``(1, *S)``. Images and labels are read as medfm reads every file (see ``read_png``,
    ``read_nifti``); a missing image file raises MedfmError.
    """
    folder = Path(folder)
    ds = read_dataset_json(folder)
    for case_id in list_cases(folder, split=split):
        parts = []
        for c in range(ds.num_channels):
            img_path = folder / f"images{split}" / f"{case_id}_{c:04d}{ds.file_ending}"
            if not img_path.is_file():
                raise MedfmError(
                    f"case {case_id} has a label but no image {img_path}; rewrite the case or "
                    "remove its label"
                )
            parts.append(_read(img_path))
        label = _read(folder / f"labels{split}" / f"{case_id}{ds.file_ending}")
        data = parts[0].data if len(parts) == 1 else torch.cat([p.data for p in parts])
        image = Volume(data=data, affine=parts[0].affine)
        if image.shape != label.shape:
            raise MedfmError(
                f"case {case_id}: image shape {image.shape} and label shape {label.shape} differ"
            )
        yield case_id, image, label
