import gzip

import nibabel as nib
import numpy as np
import pytest
import torch

from medfm.errors import MedfmError
from medfm.io import Volume, read_nifti, write_nifti


def _oblique_affine(spacing, origin=(12.0, -7.5, 30.0)):
    a = np.deg2rad(25)
    rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(spacing)
    aff[:3, 3] = origin
    return aff


@pytest.mark.parametrize(
    "np_dtype, torch_dtype",
    [(np.int16, torch.int16), (np.uint8, torch.uint8), (np.float32, torch.float32)],
)
def test_round_trip_3d(tmp_path, np_dtype, torch_dtype):
    g = np.random.default_rng(0)
    arr = (g.random((10, 20, 30)) * 200 - (0 if np_dtype == np.uint8 else 100)).astype(np_dtype)
    affine = _oblique_affine((1.5, 0.7, 2.5))
    vol = Volume.from_array(arr, affine=affine)
    path = tmp_path / "v.nii.gz"
    write_nifti(vol, path)
    back = read_nifti(path)
    assert back.data.dtype == torch_dtype and back.data.shape == (1, 10, 20, 30)
    np.testing.assert_array_equal(back.data[0].numpy(), arr)
    np.testing.assert_allclose(back.affine, affine, atol=1e-6)
    np.testing.assert_allclose(back.spacing, (1.5, 0.7, 2.5), rtol=1e-6)
    # what nibabel sees: same array, same affine, zooms = spacing, sform/qform code 1
    img = nib.load(path)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), arr)
    np.testing.assert_allclose(img.header.get_zooms(), (1.5, 0.7, 2.5), rtol=1e-6)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    assert img.header.get_data_dtype() == np.dtype(np_dtype)


def test_round_trip_2d(tmp_path):
    arr = np.arange(10 * 20, dtype=np.float32).reshape(10, 20) / 7
    vol = Volume.from_array(arr, spacing=(0.8, 1.2))
    write_nifti(vol, tmp_path / "s.nii")
    back = read_nifti(tmp_path / "s.nii")
    assert back.ndim == 2 and back.shape == (10, 20)
    np.testing.assert_array_equal(back.data[0].numpy(), arr)
    np.testing.assert_allclose(back.spacing, (0.8, 1.2), rtol=1e-6)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-6)


def test_dtype_override_and_defaults(tmp_path):
    hu = torch.tensor([[[-1000.4, 0.6], [3000.2, 12.0]]]).reshape(1, 2, 2, 1).repeat(1, 1, 1, 3)
    write_nifti(Volume(hu, np.eye(4)), tmp_path / "ct.nii.gz", dtype=np.int16)
    back = read_nifti(tmp_path / "ct.nii.gz")
    assert back.data.dtype == torch.int16
    assert back.data[0, :, :, 0].tolist() == [[-1000, 1], [3000, 12]]
    with pytest.raises(MedfmError, match="outside uint8"):
        write_nifti(Volume(hu, np.eye(4)), tmp_path / "bad.nii.gz", dtype=np.uint8)
    # int64 labels default to the smallest int that holds them; bool to uint8
    lab = torch.zeros(1, 10, 20, 30, dtype=torch.int64)
    lab[0, 2:5] = 3
    write_nifti(Volume(lab, np.eye(4)), tmp_path / "lab.nii.gz")
    assert read_nifti(tmp_path / "lab.nii.gz").data.dtype == torch.int16
    write_nifti(Volume(lab > 0, np.eye(4)), tmp_path / "m.nii.gz")
    m = read_nifti(tmp_path / "m.nii.gz")
    assert m.data.dtype == torch.uint8 and m.data.sum() == 3 * 20 * 30


def test_uint16_and_scaled_files(tmp_path):
    arr = np.arange(10 * 20 * 30, dtype=np.uint16).reshape(10, 20, 30) * 10  # up to 59990
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / "u16.nii.gz")
    back = read_nifti(tmp_path / "u16.nii.gz")
    assert back.data.dtype == torch.int32
    np.testing.assert_array_equal(back.data[0].numpy(), arr)

    img = nib.Nifti1Image((arr // 100).astype(np.int16), np.eye(4), dtype=np.int16)
    img.header.set_slope_inter(0.5, -1024)
    nib.save(img, tmp_path / "scaled.nii.gz")
    back = read_nifti(tmp_path / "scaled.nii.gz")
    assert back.data.dtype == torch.float32
    expected = nib.load(tmp_path / "scaled.nii.gz").get_fdata()
    np.testing.assert_allclose(back.data[0].numpy(), expected)
    assert expected.min() == -1024


def test_trailing_singleton_4th_axis_is_dropped(tmp_path):
    arr = np.random.default_rng(1).random((10, 20, 30, 1)).astype(np.float32)
    nib.save(nib.Nifti1Image(arr, np.diag([2, 2, 2, 1])), tmp_path / "t.nii.gz")
    back = read_nifti(tmp_path / "t.nii.gz")
    assert back.data.shape == (1, 10, 20, 30)
    np.testing.assert_array_equal(back.data[0].numpy(), arr[..., 0])


def test_4d_and_complex_are_refused(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((10, 20, 30, 2), np.float32), np.eye(4)), tmp_path / "4d.nii")
    with pytest.raises(MedfmError, match=r"is 4D \(shape \(10, 20, 30, 2\)\).*split"):
        read_nifti(tmp_path / "4d.nii")
    img = nib.Nifti1Image(np.zeros((10, 20, 30), np.complex64), np.eye(4))
    nib.save(img, tmp_path / "c.nii.gz")
    with pytest.raises(MedfmError, match="complex"):
        read_nifti(tmp_path / "c.nii.gz")


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(MedfmError, match="does not exist"):
        read_nifti(tmp_path / "nope.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti at all")
    with pytest.raises(MedfmError, match="junk.nii.gz"):
        read_nifti(tmp_path / "junk.nii.gz")
    # a truncated gzip: the header reads fine, the data does not
    write_nifti(Volume(torch.rand(1, 10, 20, 30), np.eye(4)), tmp_path / "ok.nii.gz")
    raw = gzip.decompress((tmp_path / "ok.nii.gz").read_bytes())
    (tmp_path / "cut.nii.gz").write_bytes(gzip.compress(raw)[:-2000])
    with pytest.raises(MedfmError, match="cut.nii.gz"):
        read_nifti(tmp_path / "cut.nii.gz")


def test_write_refuses_multichannel_and_wrong_name(tmp_path):
    vol = Volume(torch.zeros(2, 10, 20, 30), np.eye(4))
    with pytest.raises(MedfmError, match="one channel"):
        write_nifti(vol, tmp_path / "x.nii.gz")
    with pytest.raises(MedfmError, match=r"\.nii"):
        write_nifti(Volume(torch.zeros(1, 4, 5), np.eye(4)), tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_nan_and_infinite_voxels_follow_a_stated_rule_or_are_refused(tmp_path):
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4) + 10.0
    arr[0, 0, 0], arr[0, 0, 1], arr[1, 2, 3] = np.nan, -np.inf, np.inf
    path = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.eye(4)), path)
    with pytest.warns(UserWarning, match=r"3 of 24 voxels are NaN or infinite.*\(12\).*\(32\)"):
        vol = read_nifti(path)
    out = vol.data[0].numpy()
    assert np.isfinite(out).all()
    assert out[0, 0, 0] == out[0, 0, 1] == 12.0 and out[1, 2, 3] == 32.0
    assert np.array_equal(out[np.isfinite(arr)], arr[np.isfinite(arr)])  # the rest unchanged
    nib.save(nib.Nifti1Image(np.full((2, 3), np.nan, np.float32), np.eye(4)), path)
    with pytest.raises(MedfmError, match="all 6 voxels are NaN or infinite"):
        read_nifti(path)
