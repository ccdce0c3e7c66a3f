"""The evaluation protocol (docs/evaluation.md): one prompt per label and image, Dice and NSD.

Protocol
--------
- **Images.** A dataset is an nnU-Net v2 raw folder (``medfm.io.iter_dataset``). A 2D case is
  one image ``(H, W)`` (rows, columns). A 3D case ``(i, j, k)`` is cut into slices along the
  **last** axis k; slice ``k`` is the 2D image ``data[:, :, k]`` whose rows are i and columns j
  (so a box's x runs along j, y along i). Each image is given to the predictor as uint8 by
  ``to_rgb_uint8``: uint8 PNGs as they are (an RGB PNG stays RGB, a grey one is repeated to RGB);
  a 3D volume is first mapped from its own 0.5 / 99.5 percentiles to 0..255 **per volume**, so
  all its slices share one intensity scale. Only the first channel of a multi-channel image is
  used, except RGB PNGs.
- **Prompts.** For every image (every slice of a 3D case) and every label value present in it,
  one prompt (`slice_prompts`):

  - box: the tight box of the label's pixels, ``x0, y0, x1, y1 = min col, min row, max col,
    max row`` (pixel indices, ``x1``/``y1`` inclusive: SAM's and MedSAM's convention; see
    ``medfm.seg.baselines`` for how a box maps to pixels);
  - point: one positive click ``(x, y) = (c, r)`` at the label's innermost pixel, the maximum of
    the Euclidean distance transform of the label mask (``scipy.ndimage.distance_transform_edt``,
    the image border counting as background), ties broken by the first pixel in row-major order.

  - box3d (3D cases only; not one prompt per slice): each label's tight 3D box, segmented by
    MedSAM's propagation (`medfm.seg.propagate.propagate_box3d`: the 3D box on its middle slice,
    then each next slice prompted by the box of the previous slice's mask), which is what
    ``medfm seg predict --box x0,y0,x1,y1,z0,z1`` does.

  Slices without any label are not shown to the predictor. With point prompts the predictor is
  asked for SAM's three masks and keeps the best-scoring one (``multimask=True``, SAM's setting
  for a single ambiguous click), unless the model was trained with one output for single
  clicks (`medfm.seg.types.click_multimask`); with boxes, for one mask.
- **Metrics** (MONAI): Dice (``compute_dice``) and normalised surface Dice
  (``compute_surface_dice``, tolerance 2 in the units of the volume's spacing: 2 pixels for PNGs,
  whose spacing is 1; 2 mm for NIfTI, with the voxel spacing passed as ``spacing=``). Each label
  present in a case is scored once per case: a 2D case over its image, a 3D case over the whole
  volume, the 3D mask assembled from the per-slice predictions (each slice prompted on its own).
  A label present in the ground truth with an empty prediction scores Dice 0 and NSD 0 (MONAI
  would give NaN / warn); labels absent from a case's ground truth are not scored.
- **Averages.** Per case: the mean over its labels; the report's ``mean_dice`` / ``mean_nsd``: the
  mean over cases. ``per_label``: the mean over the cases holding that label. Cases without any
  label are listed under ``skipped`` and left out of every mean.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medfm.errors import MedfmError
from medfm.io import atomic_write_text, iter_dataset, list_cases, read_dataset_json, write_png
from medfm.seg.baselines import BASELINES
from medfm.seg.boxes import tight_box
from medfm.seg.models import SEG_MODELS, weights_for
from medfm.seg.propagate import propagate_box3d
from medfm.seg.types import Predictor, click_multimask, to_rgb_uint8

__all__ = [
    "NSD_TOLERANCE",
    "EVAL_PROMPTS",
    "PROMPTS",
    "SlicePrompts",
    "ask_prompts",
    "check_prompt",
    "evaluate",
    "innermost_point",
    "list_eval_cases",
    "load_predictor",
    "score_label",
    "slice_prompts",
    "volume_uint8",
    "write_report",
]

PROMPTS = ("box", "point")
EVAL_PROMPTS = (*PROMPTS, "box3d")
"""`evaluate`'s prompts: the 2D ones of `PROMPTS` (per image or slice) and 3D boxes."""
NSD_TOLERANCE = 2.0
"""Surface Dice tolerance in units of the spacing: pixels for PNG sets, mm for NIfTI sets."""


# ----------------------------------------------------------------------------- prompts


def innermost_point(mask: np.ndarray) -> np.ndarray:
    """mask (H, W) bool, not empty -> (2,) float32 ``x, y`` = ``c, r`` of the pixel farthest
    from the background (maximum of the Euclidean distance transform; pixels outside the image
    count as background; ties: the first pixel in row-major order)."""
    from scipy.ndimage import distance_transform_edt

    x0, y0, x1, y1 = (int(v) for v in tight_box(mask))
    crop = np.pad(mask[y0 : y1 + 1, x0 : x1 + 1], 1)  # zero border: the outside is background
    dist = distance_transform_edt(crop)
    r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)  # argmax: first in row-major order
    return np.array([x0 + c - 1, y0 + r - 1], dtype=np.float32)


@dataclass(frozen=True)
class SlicePrompts:
    """The protocol's prompts for one 2D image, one per label value present.

    values (N,) int label values; boxes (N, 4) float32 xyxy; points (N, 1, 2) float32 xy;
    point_labels (N, 1) int64, all 1 (positive).
    """

    values: np.ndarray
    boxes: np.ndarray
    points: np.ndarray
    point_labels: np.ndarray


def slice_prompts(label: np.ndarray) -> SlicePrompts:
    """label (H, W) integer map -> the box and point prompt of each label value > 0 present,
    in increasing label order."""
    label = np.asarray(label)
    values = np.unique(label)
    values = values[values > 0]
    masks = [label == v for v in values]
    boxes = np.stack([tight_box(m) for m in masks]) if masks else np.zeros((0, 4), np.float32)
    points = (
        np.stack([innermost_point(m) for m in masks])[:, None]
        if masks
        else np.zeros((0, 1, 2), np.float32)
    )
    return SlicePrompts(
        values=values.astype(np.int64),
        boxes=boxes,
        points=points,
        point_labels=np.ones((len(values), 1), dtype=np.int64),
    )


def ask_prompts(ask: Callable, sp: SlicePrompts, prompt: str, multimask: bool):
    """``ask`` (a predictor's ``predict``, or ``Segmenter.predict_logits``) with the image's
    protocol prompts of kind ``prompt``: its boxes, or its clicks with their labels."""
    if prompt == "box":
        return ask(boxes=sp.boxes, multimask=multimask)
    return ask(points=sp.points, labels=sp.point_labels, multimask=multimask)


# ----------------------------------------------------------------------------- metrics


def score_label(
    pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...], tolerance: float = NSD_TOLERANCE
) -> tuple[float, float]:
    """Dice and normalised surface Dice of one label: pred, gt (*S) bool (2D or 3D), gt not
    empty; spacing per axis (mm, or 1 for pixels); tolerance in the same units.

    An empty prediction scores (0, 0) without calling MONAI (whose NSD is 0 with a warning and
    whose Dice of an empty pair is NaN).
    """
    from monai.metrics import compute_dice, compute_surface_dice

    if not gt.any():
        raise ValueError("score_label needs a non-empty ground truth")
    if not pred.any():
        return 0.0, 0.0
    p = torch.from_numpy(np.ascontiguousarray(pred, dtype=np.float32))[None, None]
    g = torch.from_numpy(np.ascontiguousarray(gt, dtype=np.float32))[None, None]
    dice = compute_dice(p, g, include_background=True)
    with warnings.catch_warnings():  # MONAI 1.5-1.6 warns about its own internal argument
        warnings.filterwarnings(
            "ignore", message=".*always_return_as_numpy", category=FutureWarning
        )
        nsd = compute_surface_dice(
            p, g, class_thresholds=[tolerance], include_background=True, spacing=list(spacing)
        )
    return float(dice[0, 0]), float(nsd[0, 0])


# ----------------------------------------------------------------------------- inputs


def check_prompt(prompt: str, kinds: tuple[str, ...] = PROMPTS) -> str:
    """``prompt`` if it is one of ``kinds`` (``"box"`` or ``"point"``); else MedfmError."""
    if prompt not in kinds:
        raise MedfmError(f"unknown prompt {prompt!r}; use one of: {', '.join(kinds)}")
    return prompt


def list_eval_cases(data_dir: str | os.PathLike, max_cases: int | None = None) -> list[str]:
    """The case ids evaluated (sorted, the first ``max_cases``); MedfmError when ``data_dir`` is
    missing, not an nnU-Net v2 raw folder, or holds no labelled case."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise MedfmError(f"--data {folder} is not a folder; give an nnU-Net v2 raw dataset folder")
    if not (folder / "dataset.json").is_file():
        raise MedfmError(
            f"{folder} has no dataset.json; give an nnU-Net v2 raw dataset folder "
            "(dataset.json, imagesTr/, labelsTr/)"
        )
    if max_cases is not None and max_cases < 1:
        raise MedfmError(f"--max-cases must be at least 1, got {max_cases}")
    cases = list_cases(folder)
    if not cases:
        raise MedfmError(f"{folder}/labelsTr holds no cases; nothing to evaluate")
    return cases[:max_cases] if max_cases is not None else cases


def load_predictor(
    name: str,
    checkpoint: str | None = None,
    device: str = "cpu",
    *,
    mirror: bool = False,
    mask_threshold: float | None = None,
    box_crop: bool | None = None,
) -> Predictor:
    """A baseline by name (``box-ellipse``, ``box-fill``) or a SAM model / run folder through
    ``medfm.seg.predict.Segmenter.from_pretrained(name, checkpoint, device=device,
    mirror=mirror)`` (``mirror``: test-time mirroring; baselines have none). ``mask_threshold``:
    the logit threshold of every prompt kind, instead of the model's (`medfm.seg.calibrate`).
    ``box_crop``: whether box-prompted masks are kept inside their box, instead of the model's
    setting (`Segmenter`'s ``box_crop``). A zoo model with no weights to load (``vit_b``
    without ``checkpoint``) is refused: its masks would come from random weights."""
    if mask_threshold is not None and not math.isfinite(mask_threshold):
        raise MedfmError(f"--mask-threshold must be a finite number, got {mask_threshold}")
    if name in SEG_MODELS and weights_for(name, checkpoint) is None:
        raise MedfmError(
            f"--model {name} has no weights to predict with: pass its official checkpoint with "
            "--checkpoint (random weights give random masks)"
        )
    if name in BASELINES:
        if checkpoint is not None:
            raise MedfmError(f"the {name} baseline takes no checkpoint; drop --checkpoint")
        if mirror:
            raise MedfmError(f"the {name} baseline has no test-time mirroring; drop --mirror")
        if mask_threshold is not None:
            raise MedfmError(f"the {name} baseline has no mask threshold; drop --mask-threshold")
        if box_crop is not None:
            raise MedfmError(f"the {name} baseline draws inside its box; drop --box-crop")
        return BASELINES[name]()
    from medfm.seg.predict import Segmenter

    seg = Segmenter.from_pretrained(name, checkpoint, device=device, mirror=mirror)
    if mask_threshold is not None:
        seg.mask_thresholds = dict.fromkeys(seg.prompt_types, float(mask_threshold))
    if box_crop is not None:
        seg.box_crop = bool(box_crop)
    return seg


# ----------------------------------------------------------------------------- images


def volume_uint8(x: np.ndarray, lower: float = 0.5, upper: float = 99.5) -> np.ndarray:
    """A whole (i, j, k) volume -> uint8 by its own [lower, upper] percentiles (uint8 kept)."""
    if x.dtype == np.uint8:
        return x
    x = x.astype(np.float32)
    lo, hi = np.percentile(x, [lower, upper])
    if hi <= lo:
        return np.zeros(x.shape, dtype=np.uint8)
    return np.round(np.clip((x - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _images(
    image: torch.Tensor, label: torch.Tensor
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(C, *S) image and (1, *S) label -> ``(k, rgb (H, W, 3) uint8, label (H, W))`` per 2D image
    (2D: one, k = 0; 3D: each slice along the last axis that holds a label)."""
    img = image.detach().cpu().numpy()
    lab = label.detach().cpu().numpy()[0]
    if lab.ndim == 2:
        two_d = img if img.shape[0] == 3 and img.dtype == np.uint8 else img[0]
        yield 0, to_rgb_uint8(two_d), lab
        return
    vol = volume_uint8(img[0])
    for k in np.flatnonzero(lab.reshape(-1, lab.shape[-1]).any(axis=0)):
        yield int(k), to_rgb_uint8(vol[:, :, k]), lab[:, :, k]


# ----------------------------------------------------------------------------- overlays


def check_overlays(overlays: str | os.PathLike | None) -> Path | None:
    """The overlay folder (None: none), refused when it names an existing file or cannot be
    written (`medfm.io.check_writable`)."""
    from medfm.io import check_writable

    if overlays is None:
        return None
    folder = Path(overlays)
    if folder.exists() and not folder.is_dir():
        raise MedfmError(f"--overlays {folder} is a file; give a folder for the PNGs")
    check_writable(folder, "--overlays")
    return folder


def _overlay(rgb: np.ndarray, gt: np.ndarray, pred: np.ndarray, size: int = 256) -> np.ndarray:
    """(3, size, 3 * size) uint8: the image, ground-truth outlines, predicted outlines."""
    from medfm.viz import overlay_row

    return overlay_row(rgb, gt, pred, size)


# ----------------------------------------------------------------------------- evaluation


def evaluate(
    predictor: Predictor,
    data_dir: str | os.PathLike,
    prompt: str,
    *,
    overlays: str | os.PathLike | None = None,
    max_cases: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    multimask: bool | None = None,
) -> dict:
    """Run the protocol (module docstring) of ``predictor`` on the dataset ``data_dir``.

    Args:
        predictor: any `medfm.seg.types.Predictor`.
        data_dir: an nnU-Net v2 raw folder (2D ``.png`` or 3D ``.nii.gz``).
        prompt: ``"box"``, ``"point"`` or ``"box3d"`` (3D sets; module docstring).
        overlays: a folder to write ``CASE.png`` into, per case: the image (3D: the slice with
            the largest labelled area), the ground-truth outlines, the predicted outlines.
        max_cases: evaluate only the first cases in sorted order.
        progress: called as ``progress(done, total)`` before the first and after every case.
        multimask: ask for SAM's best-scoring of three masks; default: for point prompts, the
            predictor's `medfm.seg.types.click_multimask` (True but for a medfm model trained
            with one output for clicks), False for boxes.

    Returns:
        The report: ``model``, ``prompt``, ``mirror`` (test-time mirroring), ``mask_threshold``
        (the logit threshold of the prompt's masks, `medfm.seg.calibrate`; None for baselines),
        ``box_crop`` (box prompts: whether masks were kept inside their box; None for clicks),
        ``data``, ``nsd_tolerance``, ``n_cases``, ``mean_dice``, ``mean_nsd``, ``per_label`` ({name:
        {dice, nsd, n}}, labels present in at least one case), ``per_case`` ([{case, dice, nsd,
        labels: {name: {dice, nsd}}}]),
        ``skipped`` (ids of cases without any label).
    """
    check_prompt(prompt, EVAL_PROMPTS)
    allowed = getattr(predictor, "prompt_types", PROMPTS)
    name = getattr(predictor, "name", type(predictor).__name__)
    kind = "box" if prompt == "box3d" else prompt  # the prompts the predictor is asked
    if kind not in allowed:
        raise MedfmError(f"the {name} model takes {' / '.join(allowed)} prompts, not {prompt}")
    if multimask is None:
        multimask = prompt == "point" and click_multimask(predictor)
    cases = list_eval_cases(data_dir, max_cases)
    folder = Path(data_dir)
    meta = read_dataset_json(folder)
    if prompt == "box3d" and meta.file_ending == ".png":
        raise MedfmError(f"box3d prompts need 3D cases; {folder} holds 2D .png images")
    names = {v: k for k, v in meta.labels.items()}
    overlay_dir = check_overlays(overlays)

    per_case: list[dict] = []
    skipped: list[str] = []
    total = len(cases)
    if progress is not None:
        progress(0, total)
    done = 0
    for case_id, image, label in iter_dataset(folder):
        result = _evaluate_case(predictor, case_id, image, label, prompt, multimask, names)
        if result is None:
            skipped.append(case_id)
        else:
            entry, best = result
            per_case.append(entry)
            if overlay_dir is not None:
                write_png(torch.from_numpy(_overlay(*best)), overlay_dir / f"{case_id}.png")
        done += 1
        if progress is not None:
            progress(done, total)
        if done >= total:
            break
    if not per_case:
        raise MedfmError(f"{folder}: no case holds a label > 0; nothing to evaluate")

    per_label: dict[str, dict] = {}
    for value in sorted(names):
        scores = [c["labels"][names[value]] for c in per_case if names[value] in c["labels"]]
        if value == 0 or not scores:
            continue
        per_label[names[value]] = {
            "dice": float(np.mean([s["dice"] for s in scores])),
            "nsd": float(np.mean([s["nsd"] for s in scores])),
            "n": len(scores),
        }
    return {
        "model": name,
        "prompt": prompt,
        "mirror": bool(getattr(predictor, "mirror", False)),
        "mask_threshold": (getattr(predictor, "mask_thresholds", None) or {}).get(kind),
        "box_crop": bool(getattr(predictor, "box_crop", False)) if kind == "box" else None,
        "data": str(folder),
        "nsd_tolerance": NSD_TOLERANCE,
        "n_cases": len(per_case),
        "mean_dice": float(np.mean([c["dice"] for c in per_case])),
        "mean_nsd": float(np.mean([c["nsd"] for c in per_case])),
        "per_label": per_label,
        "per_case": per_case,
        "skipped": skipped,
    }


def _evaluate_case(
    predictor: Predictor,
    case_id: str,
    image,
    label,
    prompt: str,
    multimask: bool,
    names: dict[int, str],
) -> tuple[dict, tuple[np.ndarray, np.ndarray, np.ndarray]] | None:
    """One case -> (per-case entry, (rgb, gt, pred label map) of its overlay image), or None
    when the case has no label."""
    lab = label.data.detach().cpu().numpy()[0]
    present = [int(v) for v in np.unique(lab) if v > 0]
    if not present:
        return None
    unknown = [v for v in present if v not in names]
    if unknown:
        raise MedfmError(
            f"case {case_id} holds label values {unknown} that dataset.json does not name"
        )
    if prompt == "box3d":
        if lab.ndim != 3:
            raise MedfmError(f"box3d prompts need 3D cases; case {case_id} is 2D")
        return _evaluate_box3d(predictor, case_id, image, lab, present, names)
    pred = {v: np.zeros(lab.shape, dtype=bool) for v in present}
    best: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None  # (area, rgb, gt, pred)
    for k, rgb, lab2d in _images(image.data, label.data):
        sp = slice_prompts(lab2d)
        predictor.set_image(rgb)
        out = ask_prompts(predictor.predict, sp, prompt, multimask)
        masks = out.masks.detach().cpu().numpy() if torch.is_tensor(out.masks) else out.masks
        masks = np.asarray(masks)
        if masks.shape != (len(sp.values), *lab2d.shape):
            raise MedfmError(
                f"the model returned masks of shape {masks.shape} for {len(sp.values)} prompts on "
                f"a {lab2d.shape} image of case {case_id}; expected (N, H, W)"
            )
        pred_map = np.zeros(lab2d.shape, dtype=np.int64)
        for v, m in zip(sp.values.tolist(), masks.astype(bool), strict=True):
            if lab.ndim == 2:
                pred[v] = m
            else:
                pred[v][:, :, k] = m
            pred_map[m] = v
        area = int((lab2d > 0).sum())
        if best is None or area > best[0]:
            best = (area, rgb, lab2d, pred_map)
    assert best is not None
    return _case_entry(case_id, pred, lab, tuple(image.spacing), names), best[1:]


def _evaluate_box3d(
    predictor: Predictor,
    case_id: str,
    image,
    lab: np.ndarray,
    present: list[int],
    names: dict[int, str],
) -> tuple[dict, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`_evaluate_case` with box3d prompts: each label's tight 3D box propagated."""
    vol = volume_uint8(image.data.detach().cpu().numpy()[0])
    pred = {}
    for v in present:
        m = lab == v
        slices = np.flatnonzero(m.any(axis=(0, 1)))  # the box of its projection, its slices
        box = np.r_[tight_box(m.any(axis=2)), slices[0], slices[-1]].astype(np.float32)
        pred[v] = propagate_box3d(predictor, vol, box)
    k = int(np.argmax((lab > 0).sum(axis=(0, 1))))  # the overlay's slice
    pred_map = np.zeros(lab.shape[:2], dtype=np.int64)
    for v in present:
        pred_map[pred[v][:, :, k]] = v
    entry = _case_entry(case_id, pred, lab, tuple(image.spacing), names)
    return entry, (to_rgb_uint8(vol[:, :, k]), lab[:, :, k], pred_map)


def _case_entry(
    case_id: str,
    pred: dict[int, np.ndarray],
    lab: np.ndarray,
    spacing: tuple[float, ...],
    names: dict[int, str],
) -> dict:
    """A case's report entry: Dice and NSD of each label's mask ``pred[v]`` against ``lab ==
    v``, and their means."""
    labels = {}
    for v, mask in pred.items():
        dice, nsd = score_label(mask, lab == v, spacing)
        labels[names[v]] = {"dice": dice, "nsd": nsd}
    return {
        "case": case_id,
        "dice": float(np.mean([s["dice"] for s in labels.values()])),
        "nsd": float(np.mean([s["nsd"] for s in labels.values()])),
        "labels": labels,
    }


def write_report(report: dict, path: str | os.PathLike) -> Path:
    """Write the report as JSON (indent 2) atomically; returns the path."""
    path = Path(path)
    if path.is_dir():
        raise MedfmError(f"--out {path} is a folder; give a file name such as report.json")
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
    return path
