"""Mask losses: SAM's (20 x focal + Dice + IoU-prediction MSE) and SynthFM's (Dice alone).

Both take mask logits ``(N, K, H, W)`` (K = 1, or SAM's 3 multimask outputs) and binary targets
``(N, 1, H, W)`` at the same size (upsample SAM's 256 x 256 low-resolution logits to the target
first, or downsample the target). Per prompt, only the output with the lowest mask loss is
trained (SAM: "we backpropagate only the minimum loss over masks").

The per-pixel terms are MONAI's, checked to match SAM's (the DETR / torchvision formulas):

- ``monai.losses.FocalLoss(use_softmax=False, gamma=2, alpha=0.25, reduction="none")`` is
  torchvision's ``sigmoid_focal_loss`` elementwise (alpha on positives, 1 - alpha on
  negatives); medfm averages it over the pixels of each mask.
- ``monai.losses.DiceLoss(sigmoid=True, smooth_nr=1, smooth_dr=1, reduction="none")`` is
  ``1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)`` per mask, SAM's Dice (MONAI's default
  smoothing is 1e-5; SAM's is 1).

Losses are computed in float32 whatever the logits' dtype (mixed precision).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, FocalLoss

from medfm.errors import MedfmError

__all__ = ["LossOutput", "dice_loss_only", "mask_iou", "sam_loss"]


@dataclass
class LossOutput:
    """total: scalar to backpropagate. focal, dice: scalar means over prompts of the chosen
    masks' terms, unweighted (0 where unused). iou: scalar MSE of the IoU head (0 where
    unused). best: (N,) int64 index of the trained output per prompt."""

    total: torch.Tensor
    focal: torch.Tensor
    dice: torch.Tensor
    iou: torch.Tensor
    best: torch.Tensor


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of bool masks over the last two axes: pred, target (..., H, W) -> (...) float32.

    Shapes broadcast (e.g. (N, K, H, W) against (N, 1, H, W)). Two empty masks agree: IoU 1.
    """
    pred, target = pred.bool(), target.bool()
    inter = (pred & target).sum(dim=(-2, -1)).float()
    union = (pred | target).sum(dim=(-2, -1)).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def _check(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> logits (N, K, H, W) float32, target (N, K, H, W) float32 in {0, 1} (expanded)."""
    if logits.ndim != 4:
        raise MedfmError(f"logits must have shape (N, K, H, W), got {tuple(logits.shape)}")
    if target.ndim == 3:
        target = target[:, None]
    n, k, h, w = logits.shape
    if (
        target.ndim != 4
        or target.shape[0] != n
        or target.shape[1] != 1
        or target.shape[2:] != (h, w)
    ):
        raise MedfmError(
            f"target must have shape (N, 1, H, W) = ({n}, 1, {h}, {w}) to match the logits, "
            f"got {tuple(target.shape)}; resize logits or target to one size first"
        )
    return logits.float(), target.float().expand(n, k, h, w)


def _focal(logits: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """(N, K, H, W) -> (N, K): sigmoid focal loss averaged over each mask's pixels."""
    loss = FocalLoss(gamma=gamma, alpha=alpha, reduction="none", use_softmax=False)
    return loss(logits, target).mean(dim=(2, 3))


def _dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, K, H, W) -> (N, K): SAM's soft Dice loss (smoothing 1) per mask."""
    loss = DiceLoss(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0, reduction="none")
    return loss(logits, target).reshape(logits.shape[:2])


def sam_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    iou_pred: torch.Tensor,
    *,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    iou_weight: float = 1.0,
    ce_weight: float = 0.0,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> LossOutput:
    """SAM's training loss.

    logits (N, K, H, W) mask logits; target (N, 1, H, W) bool or {0, 1}; iou_pred (N, K) the
    IoU head's outputs. Per prompt and output: mask loss = focal_weight * focal + dice_weight *
    Dice; the output with the lowest mask loss is trained (``best``). The IoU head is trained
    with the MSE between iou_pred and the actual IoU of each output thresholded at logit 0
    against the target, for all K outputs (so the scores rank SAM's three masks at inference);
    the actual IoU is a detached target. total = mean over prompts of the best mask loss +
    iou_weight * MSE. ``ce_weight`` adds binary cross-entropy to the mask loss (with
    ``focal_weight=0``: nnU-Net's Dice + CE, whose gradient does not vanish on confidently
    wrong pixels, so a run cannot settle on empty masks the way Dice alone can).
    """
    logits, target = _check(logits, target)
    n, k = logits.shape[:2]
    if iou_pred.shape != (n, k):
        raise MedfmError(
            f"iou_pred must have shape (N, K) = ({n}, {k}), got {tuple(iou_pred.shape)}"
        )
    focal = _focal(logits, target, alpha, gamma)
    dice = _dice(logits, target)
    mask_loss = focal_weight * focal + dice_weight * dice
    if ce_weight:
        ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=(2, 3))
        mask_loss = mask_loss + ce_weight * ce
    best = mask_loss.detach().argmin(dim=1)
    focal_b = focal.gather(1, best[:, None])[:, 0].mean()
    dice_b = dice.gather(1, best[:, None])[:, 0].mean()
    with torch.no_grad():
        actual = mask_iou(logits > 0, target > 0.5)
    iou = torch.mean((iou_pred.float() - actual) ** 2)
    total = mask_loss.gather(1, best[:, None])[:, 0].mean() + iou_weight * iou
    return LossOutput(total=total, focal=focal_b, dice=dice_b, iou=iou, best=best)


def dice_loss_only(logits: torch.Tensor, target: torch.Tensor) -> LossOutput:
    """SynthFM's loss: SAM's soft Dice alone, of the best output per prompt (lowest Dice).

    logits (N, K, H, W), target (N, 1, H, W). The IoU head gets no training signal (its
    scores are meaningless for choosing among multimask outputs); focal and iou are 0.
    """
    logits, target = _check(logits, target)
    dice = _dice(logits, target)
    best = dice.detach().argmin(dim=1)
    dice_b = dice.gather(1, best[:, None])[:, 0].mean()
    zero = torch.zeros((), device=logits.device)
    return LossOutput(total=dice_b, focal=zero, dice=dice_b, iou=zero.clone(), best=best)
