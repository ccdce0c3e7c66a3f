"""The ablation baseline for "does the physics matter?": MONAI's `create_test_image_2d`
(random discs on a flat background with Gaussian noise) written as a 2D nnU-Net dataset, so a
model trained on it is compared with one trained on medfm's synthetic CT / MRI / US."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from medfm.errors import MedfmError
from medfm.io import DatasetJson, Volume, case_complete, write_case, write_dataset_json


def generate_monai_shapes(
    out: str | os.PathLike,
    *,
    n: int = 1000,
    size: int = 256,
    seed: int = 0,
    num_objs: int = 8,
    num_classes: int = 5,
    noise_max: float = 0.3,
) -> int:
    """Write n cases; case i uses ``np.random.RandomState([seed, i])`` so runs are
    reproducible and resumable (finished cases are skipped). Returns the number written."""
    from monai.data import create_test_image_2d

    if n < 1 or size < 32:
        raise MedfmError(f"need n >= 1 and size >= 32, got n={n}, size={size}")
    out = Path(out)
    # create_test_image_2d labels its discs 1..num_classes (0 is background)
    labels = {"background": 0, **{f"structure_{i}": i for i in range(1, num_classes + 1)}}
    write_dataset_json(
        out,
        DatasetJson(
            channel_names={"0": "shapes"}, labels=labels, numTraining=n, file_ending=".png",
            name="monai_test_image_2d",
            description="MONAI create_test_image_2d discs (medfm's ablation baseline)",
        ),
    )  # fmt: skip
    written = 0
    for i in range(n):
        case = f"case_{i:05d}"
        if case_complete(out, case, ".png"):
            continue
        rs = np.random.RandomState([seed & 0xFFFFFFFF, i])
        im, seg = create_test_image_2d(
            size, size, num_objs=num_objs, rad_max=size // 8, rad_min=max(2, size // 50),
            noise_max=noise_max, num_seg_classes=num_classes, random_state=rs,
        )  # fmt: skip
        img = np.round(np.clip(im, 0, 1) * 255).astype(np.uint8)
        write_case(out, case, Volume.from_array(torch.from_numpy(img)),
                   Volume.from_array(torch.from_numpy(seg.astype(np.uint8))), ".png")  # fmt: skip
        written += 1
    return written
