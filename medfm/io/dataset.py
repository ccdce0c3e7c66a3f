"""Write an nnU-Net v2 raw dataset from (case id, image, label) items: the small writer behind
any dataset medfm makes from arrays (``medfm.io.nnunet`` holds the format itself)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from pydantic import ValidationError

from medfm.errors import MedfmError
from medfm.io.nnunet import DatasetJson, write_case, write_dataset_json
from medfm.io.volume import Volume

__all__ = ["write_dataset"]


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
