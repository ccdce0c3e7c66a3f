import numpy as np
import pytest
import torch
from pydantic import ValidationError

from medfm.errors import MedfmError
from medfm.seg.boxes import tight_boxes
from medfm.seg.prompts import (
    PromptConfig,
    Prompts,
    innermost_points,
    jitter_boxes,
    max_shift_for,
    random_label_masks,
    refinement_clicks,
    resize_boxes,
    resize_points,
    sample_points,
    sample_prompts,
)

H, W = 20, 30


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_masks(n: int, seed: int = 0, h: int = H, w: int = W) -> torch.Tensor:
    """n random non-empty rectangles-with-holes, (n, h, w) bool."""
    g = gen(seed)
    ys = torch.arange(h)[None, :, None]
    xs = torch.arange(w)[None, None, :]
    y0 = torch.randint(0, h - 2, (n, 1, 1), generator=g)
    x0 = torch.randint(0, w - 2, (n, 1, 1), generator=g)
    y1 = y0 + torch.randint(1, h, (n, 1, 1), generator=g)
    x1 = x0 + torch.randint(1, w, (n, 1, 1), generator=g)
    rect = (ys >= y0) & (ys <= y1) & (xs >= x0) & (xs <= x1)
    holes = torch.rand(n, h, w, generator=g) < 0.3
    masks = rect & ~holes
    masks[:, 0, 0] |= ~masks.flatten(1).any(1)  # never empty
    return masks


def contains(boxes: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(N,) bool: every mask pixel lies inside its box."""
    n, h, w = masks.shape
    ys = torch.arange(h)[None, :, None]
    xs = torch.arange(w)[None, None, :]
    x0, y0, x1, y1 = (boxes[:, i, None, None] for i in range(4))
    inside = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
    return ~(masks & ~inside).flatten(1).any(1)


def same(p: Prompts, q: Prompts) -> bool:
    return all(torch.equal(getattr(p, f), getattr(q, f)) for f in vars(p))


def at(masks: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """masks (N, H, W), points (N, P, 2) xy -> (N, P) mask value under each point."""
    n, p, _ = points.shape
    x = points[..., 0].long()
    y = points[..., 1].long()
    return masks[torch.arange(n)[:, None].expand(n, p), y, x]


# ----------------------------------------------------------------------------- boxes


def test_max_shift_for_scales_medsam():
    assert max_shift_for(1024) == 20.0
    assert max_shift_for(256) == 5.0
    assert max_shift_for(512, at_1024=10) == 5.0


def test_jitter_expand_contains_mask_and_stays_in_image():
    masks = random_masks(400, seed=1)
    tight = tight_boxes(masks)
    boxes = jitter_boxes(tight, (H, W), max_shift=5.7, generator=gen(2))
    assert contains(boxes, masks).all()
    assert (boxes[:, [0, 1]] >= 0).all() and (boxes[:, 2] <= W - 1).all()
    assert (boxes[:, 3] <= H - 1).all()
    d = (boxes - tight) * torch.tensor([-1, -1, 1, 1])
    assert (d >= 0).all() and (d <= 5).all()
    assert torch.equal(d, d.round())  # integer shifts
    inner = (tight[:, :2] >= 5).all(1) & (tight[:, 2] <= W - 6) & (tight[:, 3] <= H - 6)
    assert set(d[inner].flatten().tolist()) == {0.0, 1.0, 2.0, 3.0, 4.0, 5.0}


def test_jitter_shrink_moves_both_ways_and_keeps_order():
    masks = random_masks(400, seed=3)
    tight = tight_boxes(masks)
    boxes = jitter_boxes(tight, (H, W), max_shift=4, generator=gen(4), shrink=True)
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    assert (boxes >= 0).all() and (boxes[:, [2]] <= W - 1).all() and (boxes[:, 3] <= H - 1).all()
    assert ((boxes - tight).abs() <= 4).all()
    assert not contains(boxes, masks).all()  # some boxes got smaller


def test_jitter_same_generator_same_boxes_and_zero_shift_is_identity():
    tight = tight_boxes(random_masks(10))
    a = jitter_boxes(tight, (H, W), max_shift=3, generator=gen(5))
    b = jitter_boxes(tight, (H, W), max_shift=3, generator=gen(5))
    assert torch.equal(a, b)
    assert torch.equal(jitter_boxes(tight, (H, W), max_shift=0, generator=gen(5)), tight)


# ----------------------------------------------------------------------------- points


def test_sample_points_inside_outside_and_distinct():
    masks = random_masks(50, seed=6)
    pts, lab = sample_points(masks, 3, 4, generator=gen(7))
    assert pts.shape == (50, 7, 2) and lab.shape == (50, 7) and lab.dtype == torch.long
    valid = lab >= 0
    assert (lab[:, :3] != 0).all() and (lab[:, 3:] != 1).all()
    inside = at(masks, pts)
    assert (inside[lab == 1]).all() and not (inside[lab == 0]).any()
    assert (pts[~valid] == 0).all()
    flat = pts[..., 1] * W + pts[..., 0]
    for i in range(50):  # no pixel drawn twice among the valid positives
        f = flat[i, :3][valid[i, :3]]
        assert f.unique().numel() == f.numel()


def test_sample_points_pads_small_masks_and_band():
    m = torch.zeros(2, H, W, dtype=torch.bool)
    m[0, 5, 5] = m[0, 5, 6] = True  # 2 pixels, 4 asked for
    m[1, 10:12, 20:25] = True
    pts, lab = sample_points(m, 4, 3, generator=gen(8), band=2)
    assert lab[0, :4].tolist() == [1, 1, -1, -1]
    assert sorted(pts[0, :2, 0].tolist()) == [5.0, 6.0]
    assert (pts[0, 2:4] == 0).all()
    assert (lab[:, 4:] == 0).all()
    # negatives within the box grown by 2: rows 8..13, columns 18..26 for mask 1
    x, y = pts[1, 4:, 0], pts[1, 4:, 1]
    assert ((x >= 18) & (x <= 26) & (y >= 8) & (y <= 13)).all()
    assert not at(m, pts)[1, 4:].any()
    empty = torch.zeros(1, H, W, dtype=torch.bool)
    _, lab = sample_points(empty, 2, 2, generator=gen(0), band=3)
    assert lab.tolist() == [[-1, -1, -1, -1]]


def test_sample_points_uniform_over_mask():
    m = torch.zeros(4000, 10, 30, dtype=torch.bool)
    m[:, 2, 3] = m[:, 7, 20] = m[:, 9, 29] = m[:, 0, 0] = True
    pts, lab = sample_points(m, 1, 0, generator=gen(9))
    assert (lab == 1).all()
    counts = torch.unique(pts[:, 0, 1] * 30 + pts[:, 0, 0], return_counts=True)[1]
    assert counts.numel() == 4 and (counts - 1000).abs().max() < 120


def test_innermost_points():
    m = torch.zeros(3, H, W, dtype=torch.bool)
    m[0, 3:10, 4:11] = True  # 7 x 7 block: centre x 7, y 6
    m[1] = True  # whole image: the border counts as boundary
    m[2, 0:5, 0:5] = True
    m[2, 10:19, 10:27] = True  # the thicker of two blobs
    pts = innermost_points(m)
    assert pts[0].tolist() == [7.0, 6.0]
    # whole 20 x 30 image: distance 10 from row 9 and columns 9..20; first in raster order
    assert pts[1].tolist() == [9.0, 9.0]
    assert pts[2, 1] == 14 and 14 <= pts[2, 0] <= 22
    with pytest.raises(MedfmError, match="empty"):
        innermost_points(torch.zeros(1, H, W, dtype=torch.bool))


# ----------------------------------------------------------------------------- refinement


@pytest.mark.parametrize("mode", ["uniform", "center"])
def test_refinement_clicks_in_error_region_with_matching_label(mode):
    target = random_masks(200, seed=10)
    pred = random_masks(200, seed=11)
    pts, lab = refinement_clicks(pred, target, generator=gen(12), mode=mode)
    assert pts.shape == (200, 1, 2) and lab.shape == (200, 1)
    fn, fp = target & ~pred, pred & ~target
    has_err = (fn | fp).flatten(1).any(1)
    assert has_err.all()
    assert (at(fn, pts)[:, 0] == (lab[:, 0] == 1)).all()
    assert (at(fp, pts)[:, 0] == (lab[:, 0] == 0)).all()


def test_refinement_uniform_label_proportional_to_area():
    n = 3000
    target = torch.zeros(n, 10, 20, dtype=torch.bool)
    pred = torch.zeros(n, 10, 20, dtype=torch.bool)
    target[:, 0:6, 0:10] = True  # false negatives: 60 pixels
    pred[:, 8:10, 0:10] = True  # false positives: 20 pixels
    _, lab = refinement_clicks(pred, target, generator=gen(13))
    frac = (lab == 1).float().mean().item()
    assert abs(frac - 0.75) < 0.04


def test_innermost_pixel_on_each_masks_box_equals_the_full_image_transform():
    # the transform is taken on each mask's box grown by one pixel: same distances, same
    # first maximum in raster order, as scipy's on the whole image with its border outside
    import numpy as np
    from scipy import ndimage

    from medfm.seg.prompts import _edt_argmax

    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        coarse = torch.rand(20, 1, 12, 17, generator=g)
        level = 0.4 + 0.3 * torch.rand(20, 1, 1, generator=g)
        masks = torch.nn.functional.interpolate(coarse, size=(60, 85), mode="bilinear")[:, 0]
        masks = masks > level  # blobs, several parts, many touching the border
        masks[3], masks[4] = False, True  # empty, full
        idx, dist = _edt_argmax(masks)
        full = ndimage.distance_transform_edt(
            np.pad(masks.numpy(), ((0, 0), (1, 1), (1, 1))), sampling=(1000.0, 1.0, 1.0)
        )[:, 1:-1, 1:-1].reshape(20, -1)
        assert torch.equal(idx, torch.from_numpy(full.argmax(axis=1)))
        torch.testing.assert_close(dist, torch.from_numpy(full.max(axis=1)).float())


def test_refinement_center_picks_innermost_error():
    target = torch.zeros(2, H, W, dtype=torch.bool)
    pred = torch.zeros(2, H, W, dtype=torch.bool)
    target[0, 2:9, 2:9] = True  # 7 x 7 missed
    pred[0, 12:15, 20:23] = True  # 3 x 3 extra
    target[1, 5:15, 5:25] = True
    pred[1, 5:15, 5:25] = True
    pred[1, 6:13, 26:29] = True  # only false positives: 7 x 3
    pts, lab = refinement_clicks(pred, target, mode="center")
    assert pts[0, 0].tolist() == [5.0, 5.0] and lab[0, 0] == 1
    # rows 7..11 of column 27 tie (distance 2): the first in raster order wins
    assert pts[1, 0].tolist() == [27.0, 7.0] and lab[1, 0] == 0


@pytest.mark.parametrize("mode", ["uniform", "center"])
def test_refinement_without_error(mode):
    target = torch.zeros(2, H, W, dtype=torch.bool)
    target[0, 4:8, 10:20] = True
    pts, lab = refinement_clicks(target.clone(), target, generator=gen(14), mode=mode)
    assert lab[:, 0].tolist() == [1, -1]
    assert at(target, pts)[0, 0] and pts[1, 0].tolist() == [0.0, 0.0]


def test_refinement_uniform_needs_generator_and_shapes_match():
    t = random_masks(2)
    with pytest.raises(MedfmError, match="generator"):
        refinement_clicks(t, ~t)
    with pytest.raises(MedfmError, match="differ"):
        refinement_clicks(t, t[:, :10], generator=gen())


# ----------------------------------------------------------------------------- label maps


def test_random_label_masks_all_labels_when_room():
    lm = torch.zeros(3, 10, 20, dtype=torch.int64)
    lm[0, :3, :4] = 1
    lm[0, 5:, 10:] = 3
    lm[2, 2:4, 2:4] = 2
    idx, masks = random_label_masks(lm, generator=gen(15), max_per_image=5)
    assert idx.tolist()[:2] == [0, 0] and idx.tolist()[2:] == [2]
    assert masks.shape == (3, 10, 20) and masks.dtype == torch.bool
    got = {(int(i), int(lm[i][m].unique().item())) for i, m in zip(idx, masks, strict=True)}
    assert got == {(0, 1), (0, 3), (2, 2)}
    for i, m in zip(idx, masks, strict=True):  # each mask is exactly one label of its image
        lab = lm[i][m][0]
        assert torch.equal(m, lm[i] == lab)


def test_random_label_masks_uniform_choice_and_empty_images():
    lm = torch.zeros(600, 6, 10, dtype=torch.uint8)
    lm[:, 0, 0], lm[:, 1, 1], lm[:, 2, 2] = 1, 4, 7
    lm[::2] = 0  # half the images: background only
    idx, masks = random_label_masks(lm, generator=gen(16), max_per_image=1)
    assert idx.tolist() == list(range(1, 600, 2))
    labels = torch.stack([lm[i][m][0] for i, m in zip(idx, masks, strict=True)])
    counts = torch.stack([(labels == v).sum() for v in (1, 4, 7)])
    assert (counts - 100).abs().max() < 30
    with pytest.raises(MedfmError, match="integer"):
        random_label_masks(lm.float(), generator=gen(), max_per_image=1)


def test_random_label_masks_area_power_weights_by_area():
    lm = torch.zeros(2000, 8, 10, dtype=torch.uint8)
    lm[:, :6, :5] = 2  # 30 pixels
    lm[:, 7, 9] = 5  # 1 pixel
    lm[:, 7, :2] = 9  # 2 pixels
    areas = {2: 30.0, 5: 1.0, 9: 2.0}

    def freq(power):
        idx, masks = random_label_masks(lm, generator=gen(31), max_per_image=1, area_power=power)
        assert idx.tolist() == list(range(2000))
        labels = torch.stack([lm[i][m][0] for i, m in zip(idx, masks, strict=True)])
        return {v: float((labels == v).float().mean()) for v in areas}

    # area ** power over the image's labels, the sampling error of 2000 draws allowed
    for power in (0.5, 1.0, 2.0):
        weights = {v: a**power for v, a in areas.items()}
        total = sum(weights.values())
        got = freq(power)
        for v, w in weights.items():
            assert got[v] == pytest.approx(w / total, abs=0.035), (power, v)
    # power 0 is the uniform choice, draw for draw
    a = random_label_masks(lm, generator=gen(32), max_per_image=2)
    b = random_label_masks(lm, generator=gen(32), max_per_image=2, area_power=0.0)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # without replacement: with room for all three, each image gives each label once
    idx, masks = random_label_masks(lm[:5], generator=gen(33), max_per_image=3, area_power=1.0)
    assert idx.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    got = [int(lm[i][m][0]) for i, m in zip(idx, masks, strict=True)]
    assert all(sorted(got[k : k + 3]) == [2, 5, 9] for k in range(0, 15, 3))
    with pytest.raises(MedfmError, match="area_power"):
        random_label_masks(lm, generator=gen(), max_per_image=1, area_power=-1.0)


# ----------------------------------------------------------------------------- mixed prompts


def test_prompt_config_validation():
    assert PromptConfig().max_shift == 20.0
    with pytest.raises(ValidationError):
        PromptConfig(box_probability=0.5)  # extra="forbid"
    with pytest.raises(ValidationError):
        PromptConfig(n_pos=(0, 2))
    with pytest.raises(ValidationError):
        PromptConfig(n_neg=(3, 1))
    with pytest.raises(ValidationError):
        PromptConfig(box_prob=1.5)


def test_sample_prompts_mix_and_invariants():
    masks = random_masks(300, seed=17)
    cfg = PromptConfig(box_prob=0.4, n_pos=(1, 3), n_neg=(0, 2))
    p = sample_prompts(masks, cfg, input_size=512, generator=gen(18))
    assert isinstance(p, Prompts) and len(p) == 300
    assert p.points.shape == (300, 5, 2) and p.labels.shape == (300, 5)
    frac = p.has_box.float().mean().item()
    assert 0.3 < frac < 0.5
    b = p.has_box
    assert contains(p.boxes[b], masks[b]).all()
    assert (p.boxes[~b] == 0).all() and (p.labels[b] == -1).all()
    n_pos = (p.labels[~b] == 1).sum(1)
    n_neg = (p.labels[~b] == 0).sum(1)
    assert set(n_pos.tolist()) == {1, 2, 3} and set(n_neg.tolist()) == {0, 1, 2}
    inside = at(masks, p.points)
    assert inside[p.labels == 1].all() and not inside[p.labels == 0].any()
    assert (p.points[p.labels < 0] == 0).all()
    # boxes jitter at most 10 px at a 512 input
    assert ((p.boxes[b] - tight_boxes(masks[b])).abs() <= 10).all()
    q = sample_prompts(masks, cfg, input_size=512, generator=gen(18))
    assert same(p, q)


def test_prompts_helpers():
    masks = random_masks(20, seed=19)
    p = sample_prompts(
        masks, PromptConfig(n_pos=(1, 1), n_neg=(0, 0)), input_size=256, generator=gen(20)
    )
    assert torch.equal(p.ambiguous, ~p.has_box)
    sub = p.subset(p.has_box)
    assert len(sub) == int(p.has_box.sum()) and sub.has_box.all()
    clicks, labels = refinement_clicks(masks, masks, generator=gen(21))
    q = p.add_points(clicks, labels)
    assert q.points.shape == (20, 2, 2) and torch.equal(q.labels[:, 1], labels[:, 0])
    assert not q.ambiguous.any()


def test_sample_prompts_boxes_only_and_empty_mask_error():
    masks = random_masks(10, seed=22)
    p = sample_prompts(masks, PromptConfig(box_prob=1.0), input_size=1024, generator=gen(23))
    assert p.has_box.all() and (p.labels == -1).all()
    masks[3] = False
    with pytest.raises(MedfmError, match="empty"):
        sample_prompts(masks, PromptConfig(), input_size=1024, generator=gen(23))


@pytest.mark.gpu
def test_cpu_generator_gives_same_prompts_on_gpu():
    masks = random_masks(30, seed=24)
    cfg = PromptConfig(neg_band=3)
    a = sample_prompts(masks, cfg, input_size=256, generator=gen(25))
    b = sample_prompts(masks.cuda(), cfg, input_size=256, generator=gen(25)).to("cpu")
    assert same(a, b)
    la = random_label_masks(masks.long(), generator=gen(26), max_per_image=1)
    lb = random_label_masks(masks.long().cuda(), generator=gen(26), max_per_image=1)
    assert torch.equal(la[1], lb[1].cpu())


def test_sample_prompts_center_clicks():
    masks = random_masks(200, seed=27)
    base = PromptConfig(box_prob=0.3, n_pos=(1, 2), n_neg=(0, 1))
    p0 = sample_prompts(masks, base, input_size=256, generator=gen(28))
    p1 = sample_prompts(
        masks, base.model_copy(update={"center_prob": 1.0}), input_size=256, generator=gen(28)
    )
    pts = ~p1.has_box
    # the extra draw comes last: boxes, the box/point choice and the negatives are unchanged
    assert torch.equal(p0.has_box, p1.has_box) and torch.equal(p0.boxes, p1.boxes)
    assert torch.equal(p0.labels[:, 2:], p1.labels[:, 2:])
    # every point prompt's first click is the innermost pixel, a positive one
    assert torch.equal(p1.points[pts, 0], innermost_points(masks[pts]))
    assert (p1.labels[pts, 0] == 1).all()
    # a second positive is still a uniform pixel of the mask, never the innermost one again
    second = p1.labels[:, 1] == 1
    assert at(masks, p1.points)[second, 1].all()
    assert not (p1.points[second, 1] == p1.points[second, 0]).all(dim=-1).any()
    half = sample_prompts(
        masks, base.model_copy(update={"center_prob": 0.5}), input_size=256, generator=gen(28)
    )
    hit = (half.points[pts, 0] == innermost_points(masks[pts])).all(dim=-1).float().mean()
    assert 0.35 < hit.item() < 0.7
    with pytest.raises(ValidationError):
        PromptConfig(center_prob=1.5)


@pytest.mark.parametrize("s", [1, 2, 5])
def test_resize_boxes_and_points_follow_an_enlarged_mask(s):
    """Enlarging masks s-fold (each pixel an s x s block): the tight boxes of the enlarged masks
    are resize_boxes of the original tight boxes, and a one-pixel mask's centre moves to its
    block's centre (resize_points); numpy and torch give the same."""
    masks = random_masks(6)
    big = masks.repeat_interleave(s, dim=1).repeat_interleave(s, dim=2)
    boxes = tight_boxes(masks)
    torch.testing.assert_close(resize_boxes(boxes, s, s), tight_boxes(big))
    np.testing.assert_allclose(resize_boxes(boxes.numpy(), s, s), tight_boxes(big).numpy())
    assert torch.equal(boxes, tight_boxes(masks))  # the input is not modified
    one = torch.zeros((1, H, W), dtype=torch.bool)
    one[0, 7, 11] = True
    block = one.repeat_interleave(s, dim=1).repeat_interleave(s, dim=2)
    centre = innermost_points(block)[0]  # s odd: the block's centre pixel
    moved = resize_points(torch.tensor([[11.0, 7.0]]), s, s)[0]
    torch.testing.assert_close(moved, torch.tensor([11 * s + (s - 1) / 2, 7 * s + (s - 1) / 2]))
    if s % 2:
        torch.testing.assert_close(moved, centre.float())


def test_resize_boxes_shrinking_moves_corners_as_pixel_centres():
    boxes = torch.tensor([[10.0, 4.0, 10.0, 9.0], [0.0, 0.0, 29.0, 19.0]])
    out = resize_boxes(boxes, 0.25, 0.5)
    assert (out[:, 2] >= out[:, 0]).all() and (out[:, 3] >= out[:, 1]).all()
    torch.testing.assert_close(
        out.reshape(-1, 2, 2), resize_points(boxes.reshape(-1, 2, 2), 0.25, 0.5)
    )
    torch.testing.assert_close(out[1], torch.tensor([-0.375, -0.25, 6.875, 9.25]))
