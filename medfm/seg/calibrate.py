"""Calibrating a medfm model's mask thresholds on synthetic data: `calibrate`.

A mask is the model's logits above a threshold (0 in SAM). A model trained with Dice and
cross-entropy need not be best there: medfm-tiny draws box-prompted masks a little inside the
object. `calibrate` runs the evaluation protocol of `medfm.seg.evaluate` (one prompt per label
and image, Dice per label, averaged per case, then over cases) on held-out **synthetic** sets,
once per prompt kind, keeps every prompt's logits, scores each threshold of a grid, and writes
the threshold with the highest Dice (averaged over the sets) into the model folder's
config.json as ``mask_thresholds`` (with the whole sweep under ``calibration``). For box
prompts it also decides whether each mask is kept inside its box (``box_crop``: the box prompt
is the box around its object, so the model's pixels outside it are false positives): both are
swept from the same logits and the best pair is kept. `Segmenter` reads both. Never calibrate
on the real sets a model is reported on: that would be tuning on them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from medfm.errors import MedfmError
from medfm.seg.evaluate import (
    PROMPTS,
    _images,
    ask_prompts,
    check_prompt,
    list_eval_cases,
    slice_prompts,
)
from medfm.seg.models import model_folder
from medfm.seg.types import click_multimask

__all__ = ["DEFAULT_GRID", "calibrate", "sweep_dice", "threshold_dice"]

DEFAULT_GRID = (-8.0, -6.0, -5.0, -4.0, -3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0)
"""Logit thresholds tried by default (sigmoid: 0.00034 .. 0.73). Below -4 since box masks
cropped to their box chose the grid's lowest value (docs/models/medfm-tiny.md)."""


def threshold_dice(
    segmenter,
    data_dir: str | os.PathLike,
    prompt: str,
    grid: Sequence[float] = DEFAULT_GRID,
    *,
    max_cases: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    box_crop: bool | None = None,
) -> list[float]:
    """The protocol's mean Dice of ``segmenter`` (a `medfm.seg.predict.Segmenter`) on
    ``data_dir`` with ``prompt`` prompts, at each logit threshold of ``grid`` (the encoder and
    decoder run once; at the segmenter's own threshold this is `medfm.seg.evaluate.evaluate`'s
    ``mean_dice``). ``box_crop``: box-prompted masks kept inside their boxes or not; None: the
    segmenter's setting."""
    crop = bool(getattr(segmenter, "box_crop", False)) if box_crop is None else bool(box_crop)
    return sweep_dice(
        segmenter, data_dir, prompt, grid, (crop,), max_cases=max_cases, progress=progress
    )[0]


def sweep_dice(
    segmenter,
    data_dir: str | os.PathLike,
    prompt: str,
    grid: Sequence[float] = DEFAULT_GRID,
    crops: Sequence[bool] = (False,),
    *,
    max_cases: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[list[float]]:
    """`threshold_dice` for each box-crop setting of ``crops`` (rows; box prompts only: clicks
    are never cropped), from one run of the model: the uncropped logits, cropped to each
    prompt's box by `medfm.seg.predict.box_region` (-inf outside) as ``Segmenter`` does."""
    from medfm.io import iter_dataset
    from medfm.seg.predict import box_region

    check_prompt(prompt)
    grid = [float(t) for t in grid]
    if not grid:
        raise MedfmError("the threshold grid is empty; give at least one threshold")
    crops = [bool(c) for c in crops]
    if not crops or (prompt != "box" and any(crops)):
        raise MedfmError(f"crops must be given, and only box prompts are cropped, got {crops}")
    total = len(list_eval_cases(data_dir, max_cases))
    multimask = prompt == "point" and click_multimask(segmenter)
    ask = functools.partial(segmenter.predict_logits, box_crop=False)  # cropped below, per row
    per_case: list[np.ndarray] = []  # (len(crops), len(grid)) mean Dice over the case's labels
    for done, (_, image, label) in enumerate(iter_dataset(Path(data_dir))):
        if done >= total:
            break
        lab = label.data.detach().cpu().numpy()[0]
        present = [int(v) for v in np.unique(lab) if v > 0]
        if present:
            logits = [{v: np.full(lab.shape, -np.inf, np.float32) for v in present} for _ in crops]
            for k, rgb, lab2d in _images(image.data, label.data):
                sp = slice_prompts(lab2d)
                segmenter.set_image(rgb)
                out = ask_prompts(ask, sp, prompt, multimask)
                region = box_region(sp.boxes, *lab2d.shape) if any(crops) else None
                for c, crop in enumerate(crops):
                    cropped = out.masked_fill(~region, -np.inf) if crop else out
                    for v, m in zip(sp.values.tolist(), cropped.numpy(), strict=True):
                        if lab.ndim == 2:
                            logits[c][v] = m
                        else:
                            logits[c][v][:, :, k] = m
            dice = np.zeros((len(crops), len(present), len(grid)))
            truths = [lab == v for v in present]
            for c in range(len(crops)):
                for i, (v, truth) in enumerate(zip(present, truths, strict=True)):
                    inside, n_truth = logits[c][v][truth], int(truth.sum())
                    flat = logits[c][v].ravel()
                    for j, t in enumerate(grid):
                        hit = int((inside > t).sum())
                        dice[c, i, j] = 2 * hit / (int((flat > t).sum()) + n_truth)
            per_case.append(dice.mean(axis=1))
        if progress is not None:
            progress(done + 1, total)
    if not per_case:
        raise MedfmError(f"{data_dir}: no case holds a label > 0; nothing to calibrate on")
    return np.mean(per_case, axis=0).tolist()


def calibrate(
    model: str | os.PathLike,
    data: Sequence[str | os.PathLike],
    prompts: Sequence[str] = PROMPTS,
    grid: Sequence[float] = DEFAULT_GRID,
    *,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
    box_crop: Sequence[bool] = (False, True),
    fingerprint: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Choose the mask threshold of each prompt kind of the model folder (or training run)
    ``model`` on the synthetic sets ``data``: the threshold of ``grid`` with the highest mean
    over the sets of `threshold_dice` (ties: the one nearest 0, SAM's). For box prompts also
    whether masks are cropped to their box (`medfm.seg.predict.Segmenter`'s ``box_crop``): the
    best pair of ``box_crop`` x ``grid`` (ties: no crop). Writes ``mask_thresholds`` ({prompt:
    threshold}), with boxes ``box_crop``, and ``calibration`` (the data, the grid and every
    Dice) into its config.json, atomically, and returns the ``calibration`` entry.
    ``fingerprint``: kept in that entry as ``inputs_sha256`` (what a recipe run again checks,
    `medfm.recipe`). ``progress(done, total)``: cases run so far, over every prompt kind and
    set, from 0 to the total. The config.json is read again and replaced atomically at the end,
    so a killed calibration leaves the model as it was."""
    from medfm.seg.models import read_model_config, write_model_config
    from medfm.seg.predict import Segmenter

    folder = model_folder(model, purpose="calibration writes into its config.json")
    if not data:
        raise MedfmError("give at least one dataset to calibrate on (--data)")
    for p in prompts:
        check_prompt(p)
    grid = [float(t) for t in grid]
    if not grid:
        raise MedfmError("the threshold grid is empty; give at least one threshold")
    crops = sorted({bool(c) for c in box_crop})  # False first: it wins ties
    if not crops:
        raise MedfmError("give at least one box crop setting to try (False and/or True)")
    # a clear error for a missing or empty set, before any work
    sizes = [len(list_eval_cases(d, None)) for d in data]
    total, done = len(prompts) * sum(sizes), 0
    tick = progress or (lambda done, total: None)
    tick(0, total)
    segmenter = Segmenter.from_pretrained(folder, device=device)
    record: dict = {"data": [str(d) for d in data], "grid": grid, "prompts": {}}
    chosen: dict[str, float] = {}
    chosen_crop: bool | None = None
    for p in prompts:
        tried = crops if p == "box" else [False]
        per_set = []
        for d, size in zip(data, sizes, strict=True):

            def each(k: int, _n: int, base: int = done) -> None:
                tick(base + k, total)

            per_set.append(sweep_dice(segmenter, d, p, grid, tried, progress=each))
            done += size
            tick(done, total)
        sets = np.array(per_set)
        mean = sets.mean(axis=0)  # (crops, grid)
        c, j = max(
            ((c, j) for c in range(len(tried)) for j in range(len(grid))),
            key=lambda cj: (round(float(mean[cj]), 9), -cj[0], -abs(grid[cj[1]])),
        )
        chosen[p] = grid[j]
        entry: dict = {"threshold": grid[j]}
        if p == "box":
            chosen_crop = entry["box_crop"] = tried[c]
        rows = [
            {
                "box_crop": crop,
                "mean_dice": [round(float(x), 6) for x in mean[i]],
                "per_set": [[round(float(x), 6) for x in s[i]] for s in sets],
            }
            for i, crop in enumerate(tried)
        ]
        entry |= {k: v for k, v in rows[c].items() if k != "box_crop"}
        if len(tried) > 1:
            entry["sweep"] = rows
        record["prompts"][p] = entry
        if log is not None:
            for i, crop in enumerate(tried):
                cells = ", ".join(f"{t:g}: {m:.4f}" for t, m in zip(grid, mean[i], strict=True))
                what = f"{p}{' cropped to the box' if crop else ''}"
                log(f"{what}: mean Dice by threshold {cells}")
            log(f"{p}: threshold {grid[j]:g}" + ("" if p != "box" else f", box crop {tried[c]}"))
    config = read_model_config(folder)
    config.mask_thresholds = {**config.thresholds(), **chosen}
    if chosen_crop is not None:
        config.box_crop = chosen_crop
    if fingerprint is not None:
        record["inputs_sha256"] = fingerprint
    config.calibration = record
    write_model_config(folder, config)
    return record
