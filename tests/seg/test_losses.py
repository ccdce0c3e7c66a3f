import math

import pytest
import torch

from medfm.errors import MedfmError
from medfm.seg.losses import LossOutput, dice_loss_only, mask_iou, sam_loss


def ref_focal(x: torch.Tensor, t: torch.Tensor, alpha=0.25, gamma=2.0) -> torch.Tensor:
    """torchvision.ops.sigmoid_focal_loss (SAM's), mean over the pixels of each mask."""
    p = torch.sigmoid(x)
    ce = torch.nn.functional.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma * (alpha * t + (1 - alpha) * (1 - t))
    return loss.mean(dim=(-2, -1))


def ref_dice(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """SAM / DETR dice_loss per mask."""
    p = torch.sigmoid(x).flatten(-2)
    t = t.flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)


def blob(n: int = 2, h: int = 10, w: int = 20) -> torch.Tensor:
    t = torch.zeros(n, 1, h, w, dtype=torch.bool)
    t[0, 0, 2:6, 3:12] = True
    t[1:, 0, 5:9, 10:18] = True
    return t


def test_hand_computed_tiny_example():
    logits = torch.tensor([[[[0.0, 2.0]]]])  # (1, 1, 1, 2)
    target = torch.tensor([[[[1.0, 0.0]]]])
    iou_pred = torch.tensor([[0.3]])
    out = sam_loss(logits, target, iou_pred)
    p = 1 / (1 + math.exp(-2.0))
    focal = (0.25 * 0.5**2 * math.log(2) + 0.75 * p**2 * math.log(1 + math.exp(2))) / 2
    dice = 1 - (2 * 0.5 + 1) / (0.5 + p + 1 + 1)
    iou = 0.3**2  # prediction [F, T] against target [T, F]: IoU 0
    assert out.focal.item() == pytest.approx(focal, rel=1e-5)
    assert out.dice.item() == pytest.approx(dice, rel=1e-5)
    assert out.iou.item() == pytest.approx(iou, rel=1e-5)
    assert out.total.item() == pytest.approx(20 * focal + dice + iou, rel=1e-5)
    assert out.best.tolist() == [0]


def test_matches_sam_formulas_on_random_input():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 10, 20, generator=g) * 3
    target = torch.rand(3, 1, 10, 20, generator=g) < 0.3
    out = sam_loss(logits, target, torch.full((3, 1), 0.5))
    t = target.float()
    assert out.focal.item() == pytest.approx(ref_focal(logits, t).mean().item(), rel=1e-5)
    assert out.dice.item() == pytest.approx(ref_dice(logits, t).mean().item(), rel=1e-5)


def test_perfect_confident_prediction_is_near_zero():
    target = blob()
    logits = torch.where(target, 20.0, -20.0).float()
    out = sam_loss(logits, target, torch.ones(2, 1))
    assert out.total.item() < 1e-6
    assert dice_loss_only(logits, target).total.item() < 1e-6
    wrong = sam_loss(-logits, target, torch.ones(2, 1))
    assert wrong.total.item() > 1.0


def test_best_mask_selection_and_gradient_only_through_best():
    target = blob(3)
    good = torch.where(target, 5.0, -5.0)[:, 0]
    bad = torch.where(target, -5.0, 5.0)[:, 0]
    empty = torch.full_like(good, -5.0)
    best_at = [1, 2, 0]
    chans = []
    for i, b in enumerate(best_at):
        c = [bad[i], empty[i], empty[i]]
        c[b] = good[i]
        chans.append(torch.stack(c))
    logits = torch.stack(chans).requires_grad_(True)  # (3, 3, H, W)
    iou_pred = torch.rand(3, 3, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    out = sam_loss(logits, target, iou_pred)
    assert isinstance(out, LossOutput) and out.best.tolist() == best_at
    single = sam_loss(good[:, None], target, torch.zeros(3, 1))
    assert out.focal.item() == pytest.approx(single.focal.item(), rel=1e-6)
    assert out.dice.item() == pytest.approx(single.dice.item(), rel=1e-6)
    out.total.backward()
    grad = logits.grad
    assert torch.isfinite(grad).all() and torch.isfinite(iou_pred.grad).all()
    for i, b in enumerate(best_at):
        assert grad[i, b].abs().sum() > 0
        others = [k for k in range(3) if k != b]
        assert (grad[i, others] == 0).all()


def test_iou_target_is_detached_and_covers_all_outputs():
    target = blob()
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 10, 20, generator=g).requires_grad_(True)
    iou_pred = torch.rand(2, 3, generator=g).requires_grad_(True)
    out = sam_loss(logits, target, iou_pred)
    d_logits, d_iou = torch.autograd.grad(out.iou, (logits, iou_pred), allow_unused=True)
    assert d_logits is None
    actual = mask_iou(logits.detach() > 0, target)
    assert torch.allclose(out.iou, ((iou_pred - actual) ** 2).mean())
    assert torch.allclose(d_iou, 2 * (iou_pred - actual) / 6)


def test_mask_iou_values():
    a = torch.zeros(3, 4, 5, dtype=torch.bool)
    b = torch.zeros(3, 4, 5, dtype=torch.bool)
    a[0, :2] = True  # 10 pixels
    b[0, 1:3] = True  # 10 pixels, 5 shared
    a[1, 0, 0] = True  # against nothing
    iou = mask_iou(a, b)
    assert iou.tolist() == pytest.approx([5 / 15, 0.0, 1.0])
    assert mask_iou(a[:, None].expand(3, 2, 4, 5), b[:, None]).shape == (3, 2)


def test_dice_only_picks_lowest_dice_and_ignores_iou():
    target = blob()
    good = torch.where(target, 4.0, -4.0)
    logits = torch.cat([-good, good, torch.zeros_like(good)], dim=1).requires_grad_(True)
    out = dice_loss_only(logits, target)
    assert out.best.tolist() == [1, 1]
    assert out.focal.item() == 0 and out.iou.item() == 0
    assert out.total.item() == pytest.approx(ref_dice(good.float(), target.float()).mean().item())
    out.total.backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[:, [0, 2]] == 0).all()


def test_dice_ce_adds_binary_cross_entropy_and_keeps_a_gradient_on_empty_masks():
    target = blob()
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, *target.shape[-2:], generator=g)
    iou = torch.rand(2, 3, generator=g)
    out = sam_loss(logits, target, iou, focal_weight=0.0, ce_weight=1.0)
    t = target.float().expand_as(logits)
    ce = torch.nn.functional.binary_cross_entropy_with_logits(logits, t, reduction="none")
    per = ref_dice(logits, t) + ce.mean(dim=(2, 3))
    best = per.argmin(dim=1)
    assert out.best.tolist() == best.tolist()
    mse = ((iou - mask_iou(logits > 0, target)) ** 2).mean()
    assert out.total.item() == pytest.approx((per.gather(1, best[:, None]).mean() + mse).item())
    # a confidently empty prediction: Dice's gradient has vanished, cross-entropy's has not
    empty = torch.full((2, 1, *target.shape[-2:]), -30.0, requires_grad=True)
    dice_loss_only(empty, target).total.backward()
    assert float(empty.grad.abs().max()) < 1e-9
    empty.grad = None
    sam_loss(empty, target, torch.zeros(2, 1), focal_weight=0.0, ce_weight=1.0).total.backward()
    assert float(empty.grad[target.expand_as(empty)].abs().min()) > 1e-6


def test_half_precision_logits_give_float32_losses():
    target = blob()
    logits = torch.where(target, 3.0, -3.0).to(torch.bfloat16)
    out = sam_loss(logits, target, torch.ones(2, 1, dtype=torch.bfloat16))
    assert out.total.dtype == torch.float32 and torch.isfinite(out.total)


def test_shape_errors():
    with pytest.raises(MedfmError, match="target must have shape"):
        sam_loss(torch.zeros(2, 3, 8, 8), torch.zeros(2, 1, 4, 4), torch.zeros(2, 3))
    with pytest.raises(MedfmError, match="iou_pred"):
        sam_loss(torch.zeros(2, 3, 8, 8), torch.zeros(2, 1, 8, 8), torch.zeros(2, 1))
    with pytest.raises(MedfmError, match="logits"):
        dice_loss_only(torch.zeros(2, 8, 8), torch.zeros(2, 1, 8, 8))
