import math

import pytest
import torch

from medfm.diffusion.position import crop_box, position_embedding, whole_box


def test_whole_volume_centres_span_minus_one_to_one():
    pos = position_embedding(whole_box(1, 3), (4, 6, 8), frequencies=0)
    assert pos.shape == (1, 0, 4, 6, 8)
    pos = position_embedding(whole_box(2, 3), (4, 6, 8), frequencies=1)
    assert pos.shape == (2, 9, 4, 6, 8)
    x = pos[0, 0, :, 0, 0]  # axis 0's raw coordinate
    assert torch.allclose(x, torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    # the sinusoids of that coordinate
    assert torch.allclose(pos[0, 1, :, 0, 0], torch.sin(math.pi * x))
    assert torch.allclose(pos[0, 2, :, 0, 0], torch.cos(math.pi * x))
    # axis 2's channels vary along axis 2 only
    assert torch.equal(pos[0, 6, 0, 0], pos[0, 6, 3, 5])


def test_a_crop_has_the_whole_volumes_coordinates_where_it_lies():
    shape = (10, 12, 20)
    whole = position_embedding(whole_box(1, 3), shape, frequencies=3)
    start, size = (2, 3, 7), (4, 6, 8)
    crop = position_embedding(crop_box(start, size, shape)[None], size, frequencies=3)
    sl = tuple(slice(s, s + p) for s, p in zip(start, size, strict=True))
    assert torch.allclose(crop, whole[(slice(None), slice(None), *sl)], atol=1e-5)


def test_boxes_must_match_the_patch_axes():
    with pytest.raises(ValueError, match="axes"):
        position_embedding(whole_box(1, 2), (4, 4, 4), frequencies=1)
