import json

import nibabel as nib
import numpy as np
import pytest
import torch

from medfm.diffusion.data import (
    draw_patches,
    list_volume_files,
    load_training_volumes,
    sample_patch,
)
from medfm.diffusion.intensity import CT_WINDOWS, intensity_map
from medfm.errors import MedfmError


def _nifti(path, array, spacing=(1.0, 1.0, 2.0)):
    nib.save(nib.Nifti1Image(array.astype(np.float32), np.diag([*spacing, 1.0])), str(path))


def test_intensity_maps_are_exact_round_trips():
    x = torch.linspace(-1500, 1500, 1000).view(10, 10, 10)
    for region in (*CT_WINDOWS, None):
        m = intensity_map(x, "ct", region)
        assert torch.allclose(m.inverse(m.forward(x)), x, atol=1e-3)
    chest = intensity_map(x, "ct", "chest")
    assert (chest.lo, chest.hi) == (-1400.0, 400.0)
    y = chest.forward(x, clip=True)
    assert float(y.min()) == -1.0 and float(y.max()) == 1.0
    assert type(y) is torch.Tensor
    mri = intensity_map(x, "mri")
    assert abs(float(mri.forward(torch.tensor(mri.hi))) - 1.0) < 1e-6
    assert abs(chest.to_model_sigma(90.0) - 0.1) < 1e-9
    with pytest.raises(MedfmError, match="unknown modality"):
        intensity_map(x, "pet")


def test_folders_nnunet_and_plain_with_regions(tmp_path):
    raw = tmp_path / "raw"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps({"region": "chest", "regions": {"b": "abdomen"}}))
    for case in ("a", "b"):
        _nifti(raw / "imagesTr" / f"{case}_0000.nii.gz", np.random.rand(6, 8, 5) * 100)
    plain = tmp_path / "plain"
    plain.mkdir()
    _nifti(plain / "c.nii", np.random.rand(6, 8, 5))
    (plain / "notes.txt").write_text("x")
    assert [p.name for p in list_volume_files(raw)] == ["a_0000.nii.gz", "b_0000.nii.gz"]
    vols = load_training_volumes([raw, plain], modality="ct", spacing=(1.0, 1.0, 1.0))
    assert [(v.name, v.region) for v in vols] == [("a", "chest"), ("b", "abdomen"), ("c", None)]
    assert vols[0].image.shape == (1, 6, 8, 10)  # 5 slices of 2 mm -> 10 of 1 mm
    assert vols[0].image.dtype == torch.float16 and float(vols[0].image.abs().max()) <= 1
    forced = load_training_volumes([raw], modality="mri", region="other")
    assert {v.region for v in forced} == {"other"}
    with pytest.raises(MedfmError, match="holds no NIfTI"):
        list_volume_files(tmp_path)
    with pytest.raises(MedfmError, match="is not a folder"):
        list_volume_files(tmp_path / "nope")


def test_patches_and_their_boxes():
    g = torch.Generator().manual_seed(0)
    image = torch.linspace(-1, 1, 10 * 12 * 30).view(1, 10, 12, 30)
    whole, box = sample_patch(image, (8, 8, 8), "whole", g)
    assert whole.shape == (1, 8, 8, 8) and torch.equal(box, torch.tensor([[-1.0, 1.0]] * 3))
    crop, box = sample_patch(image, (8, 8, 8), "crop", g)
    start = [int(round((box[a, 0].item() + 1) / 2 * n)) for a, n in enumerate((10, 12, 30))]
    sl = tuple(slice(s, s + 8) for s in start)
    assert torch.equal(crop, image[(slice(None), *sl)])
    zoom, box = sample_patch(image, (8, 8, 8), "zoom", g)
    assert zoom.shape == (1, 8, 8, 8)
    # axis 0: a 16-voxel crop of 10 voxels covers all of it (padded), box width 2 * 16 / 10
    assert float(box[0, 0]) <= -1 and float(box[0, 1]) >= 1
    assert abs(float(box[0, 1] - box[0, 0]) - 2 * 16 / 10) < 1e-6
    x, boxes, regions = draw_patches([[_vol(image)]], (8, 8, 8), 3, g)
    assert x.shape == (3, 1, 8, 8, 8) and boxes.shape == (3, 3, 2) and regions == ["chest"] * 3


def _vol(image):
    from medfm.diffusion.data import TrainVolume

    return TrainVolume(image.half(), "chest", "v")


def test_draws_depend_only_on_the_generator():
    image = torch.randn(1, 10, 12, 30)
    a = draw_patches([[_vol(image)]], (8, 8, 8), 4, torch.Generator().manual_seed(3))
    b = draw_patches([[_vol(image)]], (8, 8, 8), 4, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
