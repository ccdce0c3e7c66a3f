"""Write an nnU-Net v2 raw dataset from (case id, image, label) items: the small writer behind
any dataset medfm makes from arrays (``medfm.io.nnunet`` holds the format itself)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError

from medfm.errors import MedfmError
from medfm.io.nnunet import DatasetJson, write_case, write_dataset_json
from medfm.io.volume import Volume

__all__ = ["slice_case_ids", "volume_to_uint8", "write_dataset", "write_slices"]


def write_dataset(
    folder: str | os.PathLike,
    cases: Iterable[tuple[str, Volume, Volume]],
    *,
    labels: Mapping[str, int],
    channel_names: Mapping[str, str] | None = None,
    file_ending: str | None = None,
    name: str | None = None,
    description: str | None = None,
) -> DatasetJson:
    """Write every ``(case_id, image (C, *S), label (1, *S))`` of ``cases`` with `write_case`
    (label last, atomically), then ``dataset.json``; returns the dataset.json written.

    ``labels``: name -> value, ``"background": 0`` and 0..K once each. ``channel_names``: index
    -> name (default ``{"0": "image"}``). ``file_ending``: ``".png"`` (2D, uint8) or
    ``".nii.gz"``; default: from the first case, ``.png`` for a 2D uint8 image, else
    ``.nii.gz``. `iter_dataset` reads the folder back.
    """
    folder = Path(folder)
    meta = dict(
        channel_names=dict(channel_names or {"0": "image"}),
        labels=dict(labels),
        numTraining=0,
        file_ending=file_ending or ".nii.gz",
        name=name,
        description=description,
    )
    try:
        DatasetJson(**meta)  # check the metadata before any file is written
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise MedfmError(f"{folder}: dataset.json {where}: {err['msg']}") from None
    n = 0
    for case_id, image, label in cases:
        if file_ending is None and n == 0:
            two_d = image.ndim == 2 and image.data.dtype == torch.uint8
            meta["file_ending"] = ".png" if two_d else ".nii.gz"
        write_case(folder, case_id, image, label, meta["file_ending"])
        n += 1
    if n == 0:
        raise MedfmError(f"no cases to write into {folder}")
    ds = DatasetJson(**{**meta, "numTraining": n})
    write_dataset_json(folder, ds)
    return ds


def volume_to_uint8(x: torch.Tensor, lower: float = 0.5, upper: float = 99.5) -> torch.Tensor:
    """A volume mapped from its own ``lower`` / ``upper`` percentiles to 0..255 (uint8), as
    ``medfm seg evaluate`` shows a 3D scan to a 2D segmenter (one scale for all its slices)."""
    v = x.float()
    lo, hi = (float(t) for t in np.percentile(v.cpu().numpy(), (lower, upper)))
    if hi <= lo:
        return torch.zeros_like(v, dtype=torch.uint8)
    return ((v - lo) / (hi - lo)).clamp(0, 1).mul(255).round().to(torch.uint8)


def slice_case_ids(case_id: str, label: torch.Tensor) -> list[str]:
    """The 2D case ids of a 3D case's slices along the last axis that hold a label
    (``{case}_k{index:03d}``); ``label`` (1, *S)."""
    has = label[0].reshape(-1, label.shape[-1]).amax(0) > 0
    return [f"{case_id}_k{k:03d}" for k in torch.nonzero(has).flatten().tolist()]


def write_slices(
    folder: str | os.PathLike, case_id: str, image: torch.Tensor, label: torch.Tensor
) -> list[str]:
    """Write the slices along the last axis of a 3D case (``image``, ``label``: (1, *S)) that
    hold a label as 2D PNG cases (`slice_case_ids`; rows the first axis, columns the second,
    as ``medfm seg evaluate`` cuts a volume; the image mapped by `volume_to_uint8`); returns
    the ids written. dataset.json is the caller's."""
    grey = volume_to_uint8(image)
    ids = slice_case_ids(case_id, label)
    for cid in ids:
        k = int(cid.rsplit("_k", 1)[1])
        eye = np.eye(4)
        write_case(folder, cid, Volume(grey[..., k], eye),
                   Volume(label[..., k].to(torch.uint8), eye), ".png")  # fmt: skip
    return ids
