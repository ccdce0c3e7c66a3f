"""Segmenting an image file from box or point prompts: what ``medfm seg predict`` does.

`segment_file` reads a 2D image (PNG / JPEG, or a 2D NIfTI) or a 3D NIfTI volume, segments it
with any predictor of `medfm.seg.evaluate.load_predictor` and writes the label map: object i
(the i-th box) gets label i; all clicks together make one object, label 1. `segment_image` does
the same on an array.

Prompts are given in pixels of the image, each as a sequence of numbers or as the text of one
(``"x0,y0,x1,y1"``):

- a 2D image: boxes ``x0, y0, x1, y1``; points ``x, y[, label]`` (label 1 positive, 0 negative);
- a 3D volume (i, j, k), slices along k (`medfm.seg.propagate`): boxes ``x0, y0, x1, y1, k``
  (a box on slice k) or ``x0, y0, x1, y1, z0, z1`` (a 3D box, propagated from its middle slice,
  MedSAM's); points ``x, y, k[, label]``, the clicks of each slice prompting it together.

A 3D volume is mapped to uint8 by its own percentiles (`medfm.seg.evaluate.volume_uint8`), as
evaluation does. The label map keeps the image's affine.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medfm.errors import MedfmError
from medfm.seg.boxes import check_box
from medfm.seg.propagate import propagate_box3d, segment_slice
from medfm.seg.types import Predictor

__all__ = ["MASK_ENDINGS", "Segmentation", "parse_numbers", "segment_file", "segment_image"]

Prompt = str | Sequence[float]
Progress = Callable[[int, int], None]

MASK_ENDINGS = (".png", ".nii", ".nii.gz")
"""What a mask is written as (`medfm.io.save_volume`'s formats); a 3D image's: NIfTI only."""


@dataclass(frozen=True)
class Segmentation:
    """label (H, W) or (i, j, k) uint8: 0 background, object i labelled i; path: where it was
    written (None for `segment_image`)."""

    label: np.ndarray
    path: Path | None = None

    @property
    def n_voxels(self) -> int:
        return int((self.label > 0).sum())

    @property
    def n_objects(self) -> int:
        return int(self.label.max()) if self.label.size else 0


def parse_numbers(text: str, what: str) -> list[float]:
    """``"1,2.5,3"`` -> [1.0, 2.5, 3.0]; MedfmError naming ``what`` (e.g. "--box") for
    anything else, NaN and infinities included."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise MedfmError(f"{what} {text!r} must be comma-separated numbers") from None
    _check_finite(values, what, text)
    return values


def _check_finite(values: list[float], what: str, text: str) -> None:
    if not all(math.isfinite(v) for v in values):
        raise MedfmError(f"{what} {text!r} must be finite numbers (no nan or inf)")


def _whole(value: float, what: str, text: str) -> int:
    """A slice index or a click's label: a whole number, never rounded."""
    if value != int(value):
        raise MedfmError(f"{what} {text!r}: {value:g} must be a whole number")
    return int(value)


def _numbers(prompt: Prompt, what: str) -> tuple[list[float], str]:
    """A prompt -> (its numbers, its text for messages)."""
    if isinstance(prompt, str):
        return parse_numbers(prompt, what), prompt
    values = [float(v) for v in np.asarray(prompt, dtype=np.float64).reshape(-1)]
    text = ",".join(f"{v:g}" for v in values)
    _check_finite(values, what, text)
    return values, text


def _check_prompts(boxes: Sequence[Prompt] | None, points: Sequence[Prompt] | None) -> None:
    if not boxes and not points:
        raise MedfmError("give at least one --box or --point")
    if boxes and points:
        raise MedfmError("give --box or --point prompts, not both")


def segment_image(
    predictor: Predictor,
    pixels: np.ndarray,
    *,
    three_d: bool,
    boxes: Sequence[Prompt] | None = None,
    points: Sequence[Prompt] | None = None,
    progress: Progress | None = None,
) -> np.ndarray:
    """pixels (H, W), (H, W, 3) uint8 (2D) or (i, j, k) uint8 (``three_d``) and box or point
    prompts (module docstring) -> label map (H, W) or (i, j, k) uint8.

    ``progress(done, total)`` is called with the slices segmented so far (a 2D image is one
    slice per box, or one for all clicks; a 3D box counts its slices z0..z1, those a
    propagation stopped before included), from 0 to the total."""
    _check_prompts(boxes, points)
    if three_d:
        h, w, depth = pixels.shape
        label = np.zeros((h, w, depth), dtype=np.uint8)
    else:
        h, w = pixels.shape[:2]
        depth = 0
        label = np.zeros(pixels.shape[:2], dtype=np.uint8)
    tick = progress or (lambda done, total: None)
    if boxes:
        counts = [_box_slices(prompt, three_d) for prompt in boxes]
        total, done = sum(counts), 0
        tick(0, total)
        for i, (prompt, n) in enumerate(zip(boxes, counts, strict=True), 1):

            def each(k: int, _n: int, base: int = done) -> None:
                tick(base + k, total)

            label[_box_mask(predictor, pixels, three_d, prompt, label.shape, each)] = i
            done += n
            tick(done, total)
        return label
    groups: dict[int, list[tuple[float, float, int]]] = {}
    for prompt in points:
        v, text = _numbers(prompt, "--point")
        n_xy = 3 if three_d else 2
        if len(v) not in (n_xy, n_xy + 1):
            want = "x,y,k[,label]" if three_d else "x,y[,label]"
            raise MedfmError(f"--point {text!r} must be {want}")
        x, y = v[0], v[1]
        k = _whole(v[2], "--point", text) if three_d else 0
        lab = _whole(v[n_xy], "--point", text) if len(v) > n_xy else 1
        if lab not in (0, 1):
            raise MedfmError(f"--point {text!r}: the label is 1 (positive) or 0 (negative)")
        if not (0 <= x < w and 0 <= y < h) or (three_d and not 0 <= k < depth):
            raise MedfmError(f"--point {text!r} lies outside the image")
        groups.setdefault(k, []).append((x, y, lab))
    tick(0, len(groups))
    for done, (k, pts) in enumerate(groups.items(), 1):
        p = np.array([[x, y] for x, y, _ in pts], np.float32)
        lab = np.array([c for _, _, c in pts], np.int64)
        if three_d:
            label[:, :, k][segment_slice(predictor, pixels[:, :, k], points=p, labels=lab)] = 1
        else:
            label[segment_slice(predictor, pixels, points=p, labels=lab)] = 1
        tick(done, len(groups))
    return label


def _box_slices(prompt: Prompt, three_d: bool) -> int:
    """The slices a box prompt segments: z0..z1 for a 3D box, else one (what `_box_mask`
    refuses is refused there)."""
    v, _ = _numbers(prompt, "--box")
    if three_d and len(v) == 6:
        return max(1, int(v[5]) - int(v[4]) + 1)
    return 1


def _box_mask(
    predictor: Predictor,
    pixels: np.ndarray,
    three_d: bool,
    prompt: Prompt,
    shape: tuple,
    progress: Progress | None = None,
) -> np.ndarray:
    """One box prompt (module docstring) -> its mask of the label map's ``shape``, bool;
    ``progress``: `propagate_box3d`'s, for a 3D box."""
    v, text = _numbers(prompt, "--box")
    h, w = pixels.shape[:2]
    if three_d and len(v) == 6:
        for z in v[4:]:  # slice indices, never rounded
            _whole(z, "--box", text)
        return propagate_box3d(predictor, pixels, np.array(v, np.float32), progress=progress)
    if three_d and len(v) == 5:
        depth = pixels.shape[2]
        k = _whole(v[4], "--box", text)
        if not 0 <= k < depth:
            raise MedfmError(f"--box slice {k} is outside 0..{depth - 1}")
        b = np.array(v[:4], np.float32)
        check_box(b, h, w)
        mask = np.zeros(shape, bool)
        mask[:, :, k] = segment_slice(predictor, pixels[:, :, k], box=b)
        return mask
    if not three_d and len(v) == 4:
        b = np.array(v, np.float32)
        check_box(b, h, w)
        return segment_slice(predictor, pixels, box=b)
    want = "x0,y0,x1,y1,k or x0,y0,x1,y1,z0,z1" if three_d else "x0,y0,x1,y1"
    raise MedfmError(f"--box {text!r}: a {'3D' if three_d else '2D'} box is {want}")


def segment_file(
    image: str | os.PathLike,
    out: str | os.PathLike,
    *,
    boxes: Sequence[Prompt] | None = None,
    points: Sequence[Prompt] | None = None,
    model: str = "medfm-tiny",
    checkpoint: str | None = None,
    device: str = "cpu",
    mirror: bool = False,
    mask_threshold: float | None = None,
    box_crop: bool | None = None,
    predictor: Predictor | None = None,
    overlay: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Segmentation:
    """Segment the image file ``image`` from ``boxes`` or ``points`` (module docstring) and
    write the label map to ``out`` (``.png``, ``.nii`` or ``.nii.gz``; a 3D image's as NIfTI).

    The predictor is ``predictor`` when given, else `medfm.seg.evaluate.load_predictor` of
    ``model`` with the other arguments (loaded after the image and the output name are
    checked). ``overlay``: also write a PNG picture of the image, the prompts and the masks'
    outlines there (`prompt_picture`). An existing ``out`` or ``overlay`` is replaced only with
    ``overwrite`` (atomically): a mask file may be someone's hand-corrected label. Every output
    is checked (name, place, writable) before the image is read or a model loaded.
    ``progress``: `segment_image`'s. Returns the label map and the path written.
    """
    from medfm.io import Volume, check_new, read_image, read_nifti, write_nifti, write_png
    from medfm.seg.evaluate import load_predictor, volume_uint8

    _check_prompts(boxes, points)
    image, out = Path(image), Path(out)
    if not image.is_file():
        raise MedfmError(f"image {image} not found")
    if out.resolve() == image.resolve():
        raise MedfmError(f"--out {out} is the input image; write the mask to another file")
    if overlay is not None:
        overlay = Path(overlay)
        if not overlay.name.lower().endswith(".png") or overlay.is_dir():
            raise MedfmError(f"--overlay {overlay} must be a .png file name")
        if overlay.resolve() in (image.resolve(), out.resolve()):
            raise MedfmError(f"--overlay {overlay} would overwrite the image or the mask")
    check_new(out, "--out", overwrite=overwrite, endings=MASK_ENDINGS)
    check_new(overlay, "--overlay", overwrite=overwrite, endings=(".png",))
    is_nifti = image.name.lower().endswith((".nii", ".nii.gz"))
    vol = read_nifti(image) if is_nifti else read_image(image)
    three_d = vol.ndim == 3
    out_name = out.name.lower()
    if three_d and not out_name.endswith((".nii", ".nii.gz")):
        raise MedfmError("a 3D image's mask is written as NIfTI: use --out mask.nii.gz")
    if three_d:
        pixels = volume_uint8(vol.data[0].numpy())
    else:
        data = vol.data
        pixels = data.numpy() if data.shape[0] == 3 else data[0].numpy()
        pixels = np.moveaxis(pixels, 0, -1) if pixels.ndim == 3 else pixels
    if predictor is None:
        predictor = load_predictor(
            model, checkpoint, device=device, mirror=mirror, mask_threshold=mask_threshold,
            box_crop=box_crop,
        )  # fmt: skip
    label = segment_image(
        predictor, pixels, three_d=three_d, boxes=boxes, points=points, progress=progress
    )
    mask_vol = Volume(torch.from_numpy(label)[None], vol.affine)
    if out_name.endswith(".png"):
        write_png(mask_vol, out)
    else:
        write_nifti(mask_vol, out)
    if overlay is not None:
        from PIL import Image

        from medfm.io import atomic_path

        picture = prompt_picture(pixels, label, three_d=three_d, boxes=boxes, points=points)
        with atomic_path(overlay) as tmp:
            Image.fromarray(picture).save(tmp, format="PNG")
    return Segmentation(label=label, path=out)


def prompt_picture(
    pixels: np.ndarray,
    label: np.ndarray,
    *,
    three_d: bool,
    boxes: Sequence[Prompt] | None = None,
    points: Sequence[Prompt] | None = None,
) -> np.ndarray:
    """`segment_image`'s inputs and label map -> an (h, w, 3) uint8 picture (`medfm.viz.
    prompt_overlay`): the image with the masks' outlines and the prompts. A volume is shown
    by its slice with the largest masked area (else its first prompted slice), with the
    prompts on that slice."""
    from medfm.viz import prompt_overlay

    parsed_boxes = [_numbers(b, "--box")[0] for b in boxes or []]
    parsed_points = [_numbers(p, "--point")[0] for p in points or []]
    n_xy = 3 if three_d else 2
    k = None
    if three_d:
        areas = (label > 0).sum(axis=(0, 1))
        if areas.any():
            k = int(areas.argmax())
        else:
            firsts = [int(v[4]) for v in parsed_boxes] + [int(v[2]) for v in parsed_points]
            k = firsts[0] if firsts else 0
        pixels, label = pixels[:, :, k], label[:, :, k]

    def on_slice(v: list[float], first: int, last: int | None = None) -> bool:
        return k is None or int(v[first]) <= k <= int(v[first if last is None else last])

    box_rows = [v[:4] for v in parsed_boxes
                if on_slice(v, 4, 5 if len(v) == 6 else None)]  # fmt: skip
    click_rows = [v for v in parsed_points if on_slice(v, 2)]
    return prompt_overlay(
        torch.from_numpy(np.ascontiguousarray(pixels)),
        torch.from_numpy(label.astype(np.int64)),
        boxes=np.array(box_rows, np.float64).reshape(-1, 4),
        points=np.array([v[:2] for v in click_rows], np.float64).reshape(-1, 2),
        point_labels=np.array([v[n_xy] if len(v) > n_xy else 1 for v in click_rows]),
    )
