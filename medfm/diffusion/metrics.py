"""How well an anomaly map finds a known anomaly: voxel AUROC (MONAI's) and the best Dice over
thresholds."""

from __future__ import annotations

import torch
from monai.metrics import compute_roc_auc

from medfm.errors import MedfmError

__all__ = ["anomaly_scores", "best_dice"]


def best_dice(score: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """(the best Dice of ``score >= threshold`` against ``truth`` over all thresholds, that
    threshold): voxels sorted by score, the k highest predicted for every k at once."""
    s = score.flatten().float()
    y = truth.flatten().bool()
    order = torch.argsort(s, descending=True)
    tp = y[order].cumsum(0).double()
    k = torch.arange(1, s.numel() + 1, dtype=torch.float64)
    dice = 2 * tp / (k + y.sum())
    i = int(dice.argmax())
    return float(dice[i]), float(s[order[i]])


def anomaly_scores(score: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Voxel AUROC and best Dice of an anomaly map ``score`` against a mask ``truth`` (same
    shape; any non-zero voxel is anomalous)."""
    if score.shape != truth.shape:
        raise MedfmError(
            f"the mask's shape {tuple(truth.shape)} differs from the map's {tuple(score.shape)}"
        )
    y = truth.flatten().bool()
    if not bool(y.any()) or bool(y.all()):
        raise MedfmError("the mask must mark some voxels, not none or all, to score a map")
    auroc = float(compute_roc_auc(score.flatten().float(), y.float()))
    dice, threshold = best_dice(score, truth)
    return {"auroc": auroc, "best_dice": dice, "dice_threshold": threshold}
