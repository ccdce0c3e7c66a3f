"""medfm.seg.boxes: tight boxes, box regions and box checks."""

import numpy as np
import pytest
import torch

from medfm.errors import MedfmError
from medfm.seg.boxes import (
    box_extent,
    box_region,
    check_box,
    check_boxes,
    mask_box,
    tight_box,
    tight_boxes,
)

H, W = 20, 30


def test_tight_box_contains_the_mask_and_touches_it():
    g = np.random.default_rng(0)
    for _ in range(20):
        mask = g.random((17, 23)) < 0.02
        if not mask.any():
            continue
        x0, y0, x1, y1 = tight_box(mask).astype(int)
        r, c = np.nonzero(mask)
        assert (c >= x0).all() and (c <= x1).all() and (r >= y0).all() and (r <= y1).all()
        assert (c == x0).any() and (c == x1).any() and (r == y0).any() and (r == y1).any()
    one = np.zeros((5, 6), bool)
    one[2, 4] = True
    assert tight_box(one).tolist() == [4, 2, 4, 2]  # x1 is the last column, inclusive
    with pytest.raises(MedfmError, match="empty"):
        tight_box(np.zeros((3, 3), bool))


def test_tight_boxes_values_and_empty_error():
    m = torch.zeros(3, H, W, dtype=torch.bool)
    m[0, 2:5, 7:10] = True
    m[1, 4, 6] = True
    m[2] = True
    boxes = tight_boxes(m)
    assert boxes.dtype == torch.float32
    assert boxes.tolist() == [[7, 2, 9, 4], [6, 4, 6, 4], [0, 0, W - 1, H - 1]]
    m[1] = False
    with pytest.raises(MedfmError, match=r"empty mask at index \[1\]"):
        tight_boxes(m)
    with pytest.raises(MedfmError, match="threshold"):
        tight_boxes(m.float())


def test_mask_box_and_box_extent_of_empty_masks():
    m = np.zeros((10, 20), bool)
    assert mask_box(m) is None
    m[3:5, 7] = True
    assert mask_box(m).tolist() == [7, 3, 7, 4]
    stack = torch.zeros(2, 10, 20, dtype=torch.bool)
    stack[1] = torch.from_numpy(m)
    boxes, empty = box_extent(stack)
    assert empty.tolist() == [True, False]
    assert boxes[0].tolist() == [20, 10, -1, -1]  # inverted: contains no pixel
    assert boxes[1].tolist() == [7, 3, 7, 4]
    assert torch.equal(tight_boxes(stack[1:]), torch.tensor([[7.0, 3.0, 7.0, 4.0]]))


def test_box_region_of_tight_and_fractional_boxes():
    region = box_region(np.array([[2, 1, 4, 3], [2.5, 1.2, 3.1, 1.9]]), 10, 20)
    assert region.shape == (2, 10, 20) and region.dtype == torch.bool
    want = torch.zeros(10, 20, dtype=torch.bool)
    want[1:4, 2:5] = True  # x1 / y1 inclusive
    assert torch.equal(region[0], want)
    want = torch.zeros(10, 20, dtype=torch.bool)
    want[1:3, 2:5] = True  # every pixel the box touches
    assert torch.equal(region[1], want)


def test_check_box_and_check_boxes():
    check_box(np.array([0, 0, 19, 9], np.float32), 10, 20)
    with pytest.raises(MedfmError, match="x1 < x0"):
        check_box(np.array([5, 0, 4, 9], np.float32), 10, 20)
    with pytest.raises(MedfmError, match="outside the image"):
        check_box(np.array([0, 0, 20, 9], np.float32), 10, 20)  # the last column is 19
    b = check_boxes(np.array([0, 0, 20, 10.0]), 10, 20, who="m")  # the far edge is allowed
    assert b.shape == (1, 4)
    with pytest.raises(MedfmError, match=r"^m: boxes must be \(N, 4\)"):
        check_boxes(np.zeros((2, 3)), 10, 20, who="m")
    with pytest.raises(MedfmError, match="NaN or inf"):
        check_boxes(np.array([[0, 0, np.nan, 1]]), 10, 20, who="m")
    with pytest.raises(MedfmError, match=r"box 1 \[3.0, 0.0, 2.0, 1.0\] has x1 < x0"):
        check_boxes(np.array([[0, 0, 1, 1], [3, 0, 2, 1.0]]), 10, 20, who="m")
    with pytest.raises(MedfmError, match="outside the 20 x 10"):
        check_boxes(np.array([[0, 0, 21, 1.0]]), 10, 20, who="m")
