"""Calibrating a medfm model's mask thresholds on synthetic data: `calibrate`.

A mask is the model's logits above a threshold (0 in SAM). A model trained with Dice and
cross-entropy need not be best there: medfm-tiny draws box-prompted masks a little inside the
object. `calibrate` runs the evaluation protocol of `medfm.seg.evaluate` (one prompt per label
and image, Dice per label, averaged per case, then over cases) on held-out **synthetic** sets,
once per prompt kind, keeps every prompt's logits, scores each threshold of a grid, and writes
the threshold with the highest Dice (averaged over the sets) into the model folder's
config.json as ``mask_thresholds`` (with the whole sweep under ``calibration``). `Segmenter`
reads it. Never calibrate on the real sets a model is reported on: that would be tuning on them.
"""

from __future__ import annotations

import json
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

__all__ = ["DEFAULT_GRID", "calibrate", "threshold_dice"]

DEFAULT_GRID = (-4.0, -3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0)
"""Logit thresholds tried by default (sigmoid: 0.018 .. 0.73)."""


def threshold_dice(
    segmenter,
    data_dir: str | os.PathLike,
    prompt: str,
    grid: Sequence[float] = DEFAULT_GRID,
    *,
    max_cases: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[float]:
    """The protocol's mean Dice of ``segmenter`` (a `medfm.seg.predict.Segmenter`) on
    ``data_dir`` with ``prompt`` prompts, at each logit threshold of ``grid`` (the encoder and
    decoder run once; at the segmenter's own threshold this is `medfm.seg.evaluate.evaluate`'s
    ``mean_dice``)."""
    from medfm.io import iter_dataset

    check_prompt(prompt)
    grid = [float(t) for t in grid]
    if not grid:
        raise MedfmError("the threshold grid is empty; give at least one threshold")
    total = len(list_eval_cases(data_dir, max_cases))
    multimask = prompt == "point" and click_multimask(segmenter)
    per_case: list[np.ndarray] = []  # (len(grid),) mean Dice over the case's labels
    for done, (_, image, label) in enumerate(iter_dataset(Path(data_dir))):
        if done >= total:
            break
        lab = label.data.detach().cpu().numpy()[0]
        present = [int(v) for v in np.unique(lab) if v > 0]
        if present:
            logits = {v: np.full(lab.shape, -np.inf, dtype=np.float32) for v in present}
            for k, rgb, lab2d in _images(image.data, label.data):
                sp = slice_prompts(lab2d)
                segmenter.set_image(rgb)
                out = ask_prompts(segmenter.predict_logits, sp, prompt, multimask)
                for v, m in zip(sp.values.tolist(), out.numpy(), strict=True):
                    if lab.ndim == 2:
                        logits[v] = m
                    else:
                        logits[v][:, :, k] = m
            dice = np.zeros((len(present), len(grid)))
            for i, v in enumerate(present):
                truth = lab == v
                inside, n_truth = logits[v][truth], int(truth.sum())
                flat = logits[v].ravel()
                for j, t in enumerate(grid):
                    hit = int((inside > t).sum())
                    dice[i, j] = 2 * hit / (int((flat > t).sum()) + n_truth)
            per_case.append(dice.mean(axis=0))
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
) -> dict:
    """Choose the mask threshold of each prompt kind of the model folder (or training run)
    ``model`` on the synthetic sets ``data``: the threshold of ``grid`` with the highest mean
    over the sets of `threshold_dice` (ties: the one nearest 0, SAM's). Writes
    ``mask_thresholds`` ({prompt: threshold}) and ``calibration`` (the data, the grid and every
    Dice) into its config.json, atomically, and returns the ``calibration`` entry."""
    from medfm.io import atomic_write_text
    from medfm.seg.models import read_config
    from medfm.seg.predict import Segmenter

    folder = model_folder(model, purpose="calibration writes into its config.json")
    if not data:
        raise MedfmError("give at least one dataset to calibrate on (--data)")
    for p in prompts:
        check_prompt(p)
    grid = [float(t) for t in grid]
    if not grid:
        raise MedfmError("the threshold grid is empty; give at least one threshold")
    for d in data:
        list_eval_cases(d, None)  # a clear error for a missing or empty set, before any work
    segmenter = Segmenter.from_pretrained(folder, device=device)
    record: dict = {"data": [str(d) for d in data], "grid": grid, "prompts": {}}
    chosen: dict[str, float] = {}
    for p in prompts:
        sets = [threshold_dice(segmenter, d, p, grid) for d in data]
        mean = np.mean(sets, axis=0)
        best = max(range(len(grid)), key=lambda j: (round(float(mean[j]), 9), -abs(grid[j])))
        chosen[p] = grid[best]
        record["prompts"][p] = {
            "threshold": grid[best],
            "mean_dice": [round(float(x), 6) for x in mean],
            "per_set": [[round(float(x), 6) for x in s] for s in sets],
        }
        if log is not None:
            cells = ", ".join(f"{t:g}: {m:.4f}" for t, m in zip(grid, mean, strict=True))
            log(f"{p}: mean Dice by threshold {cells} -> {grid[best]:g}")
    config = read_config(folder)
    config["mask_thresholds"] = {**(config.get("mask_thresholds") or {}), **chosen}
    config["calibration"] = record
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")
    return record
