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


def _recorder():
    calls: list[tuple[int, int]] = []
    return calls, lambda done, total: calls.append((done, total))


def test_progress_counts_the_slices_of_a_propagated_box():
    from medfm.seg.propagate import propagate_box3d

    pixels = np.zeros((30, 40, 12), np.uint8)
    pixels[10:20, 15:30, 3:9] = 200
    calls, progress = _recorder()
    # a 3D box over slices 2..9 (8 slices), then a box on slice 5: 9 slices in all
    segment_image(BoxFill(), pixels, three_d=True, boxes=["15,10,29,19,2,9", "15,10,29,19,5"],
                  progress=progress)  # fmt: skip
    done = [d for d, _ in calls]
    assert calls[0] == (0, 9) and calls[-1] == (9, 9) and {t for _, t in calls} == {9}
    assert done == sorted(done) and set(range(10)) <= set(done)
    # a propagation that stops early (an empty mask) still ends at its total
    calls, progress = _recorder()

    class StopsAfterTheMiddle(BoxFill):
        seen = 0

        def predict(self, **kw):
            StopsAfterTheMiddle.seen += 1
            pred = super().predict(**kw)
            if StopsAfterTheMiddle.seen > 1:
                pred.masks[:] = False
            return pred

    propagate_box3d(StopsAfterTheMiddle(), pixels, np.array([15, 10, 29, 19, 0, 11]), progress)
    assert calls[0] == (1, 12) and calls[-1] == (12, 12) and len(calls) < 12


def test_progress_of_clicks_and_2d_boxes(tmp_path):
    img = np.full((30, 40), 40, np.uint8)
    calls, progress = _recorder()
    segment_image(BoxFill(), img, three_d=False, boxes=["1,1,5,5", "10,10,20,20"],
                  progress=progress)  # fmt: skip
    assert calls == [(0, 2), (1, 2), (2, 2)]
    write_png(torch.from_numpy(img)[None], tmp_path / "i.png")
    calls, progress = _recorder()
    segment_file(tmp_path / "i.png", tmp_path / "m.png", boxes=["1,1,5,5"], model="box-fill",
                 progress=progress)  # fmt: skip
    assert calls == [(0, 1), (1, 1)]


def test_outputs_are_checked_before_the_image_is_read_or_a_model_loaded(tmp_path):
    vol = np.zeros((30, 40, 12), np.float32)
    write_nifti(Volume(torch.from_numpy(vol)[None], np.eye(4)), tmp_path / "v.nii.gz")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    existing = tmp_path / "old.nii.gz"
    existing.write_bytes(b"someone's corrected mask")
    # vit_b without weights is refused when loaded: these outputs are refused before that
    for out, message in [
        (tmp_path / "m.xyz", "must end in .png, .nii or .nii.gz"),
        (blocker / "m.nii.gz", "is a file, not a folder"),
        ("/proc/m.nii.gz", "/proc is not writable"),
        (tmp_path, "is a folder; give a file name"),
        (existing, "exists; pass --overwrite to replace it"),
    ]:
        with pytest.raises(MedfmError, match=message):
            segment_file(tmp_path / "v.nii.gz", out, boxes=["1,1,5,5,0"], model="vit_b")
    picture = tmp_path / "picture.png"
    picture.write_bytes(b"an earlier overlay")
    with pytest.raises(MedfmError, match="--overlay .* exists; pass --overwrite"):
        segment_file(tmp_path / "v.nii.gz", tmp_path / "n.nii.gz", boxes=["1,1,5,5,0"],
                     model="vit_b", overlay=picture)  # fmt: skip
    assert picture.read_bytes() == b"an earlier overlay"
    assert existing.read_bytes() == b"someone's corrected mask"
    assert not (tmp_path / "n.nii.gz").exists()
    segment_file(tmp_path / "v.nii.gz", existing, boxes=["1,1,5,5,0"], model="box-fill",
                 overwrite=True)  # fmt: skip
    assert read_nifti(existing).data[0, :, :, 0].sum() == 25
