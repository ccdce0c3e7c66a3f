"""medfm.seg.segment: an image file or array segmented from box or point prompts."""

import numpy as np
import pytest
import torch

from medfm.errors import MedfmError
from medfm.io import Volume, read_nifti, read_png, write_nifti, write_png
from medfm.seg.baselines import BoxFill
from medfm.seg.segment import parse_numbers, segment_file, segment_image


def test_boxes_as_numbers_or_text_give_the_same_labels(tmp_path):
    img = np.full((60, 80), 40, np.uint8)
    write_png(torch.from_numpy(img)[None], tmp_path / "img.png")
    text = segment_file(
        tmp_path / "img.png", tmp_path / "a.png", boxes=["30,20,59,39", "0,0,9,9"], model="box-fill"
    )
    numbers = segment_file(
        tmp_path / "img.png",
        tmp_path / "b.nii.gz",
        boxes=[[30, 20, 59, 39], np.array([0, 0, 9, 9])],
        predictor=BoxFill(),
    )
    assert np.array_equal(text.label, numbers.label)
    assert (text.n_voxels, text.n_objects) == (20 * 30 + 100, 2)
    assert np.array_equal(read_png(tmp_path / "a.png").data[0].numpy(), text.label)
    assert np.array_equal(read_nifti(tmp_path / "b.nii.gz").data[0].numpy(), text.label)


def test_a_box_on_one_slice_of_a_volume(tmp_path):
    vol = np.zeros((30, 40, 12), np.float32)
    vol[10:20, 15:30, 3:9] = 500.0
    write_nifti(Volume(torch.from_numpy(vol)[None], np.eye(4)), tmp_path / "v.nii.gz")
    pixels = np.zeros((30, 40, 12), np.uint8)
    label = segment_image(BoxFill(), pixels, three_d=True, boxes=[[15, 10, 29, 19, 5]])
    assert label[:, :, 5].sum() == 150 and label.sum() == 150
    with pytest.raises(MedfmError, match="--box slice 12 is outside 0..11"):
        segment_image(BoxFill(), pixels, three_d=True, boxes=[[15, 10, 29, 19, 12]])
    with pytest.raises(MedfmError, match="written as NIfTI"):
        segment_file(tmp_path / "v.nii.gz", tmp_path / "m.png", boxes=["1,1,2,2,0"])


def test_prompt_errors():
    pixels = np.zeros((10, 20), np.uint8)
    with pytest.raises(MedfmError, match="at least one"):
        segment_image(BoxFill(), pixels, three_d=False)
    with pytest.raises(MedfmError, match="not both"):
        segment_image(BoxFill(), pixels, three_d=False, boxes=["1,1,2,2"], points=["1,1"])
    with pytest.raises(MedfmError, match=r"--box '1,2,3': a 2D box is x0,y0,x1,y1"):
        segment_image(BoxFill(), pixels, three_d=False, boxes=[[1, 2, 3]])
    with pytest.raises(MedfmError, match=r"--point '30,1' lies outside the image"):
        segment_image(BoxFill(), pixels, three_d=False, points=["30,1"])
    with pytest.raises(MedfmError, match="--box 'a,b' must be comma-separated numbers"):
        parse_numbers("a,b", "--box")
