import warnings

import numpy as np
import pytest
import torch

from medfm.errors import MedfmError
from medfm.io import read_dicom_series, read_nifti

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import FileDataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

ROWS, COLS, N = 6, 5, 4
PIXEL_SPACING = (0.8, 0.6)  # (between rows, between columns), as DICOM orders it
SLICE_STEP = 2.5
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

with warnings.catch_warnings():  # nibabel.nicom warns that it is experimental on import
    warnings.simplefilter("ignore", UserWarning)
    from nibabel.nicom.dicomwrappers import wrapper_from_file


def _orientation():
    """An oblique ImageOrientationPatient: row and column cosines rotated about two axes."""
    a, b = np.deg2rad(20), np.deg2rad(-35)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    rot = rx @ rz
    return rot[:, 0], rot[:, 1]


def write_series(folder, rng, *, slope=1.0, intercept=-1024.0, series_uid=None, names=None):
    """Write N slices (int16 pixels) with shuffled file names; return raw pixels in slice order."""
    folder.mkdir(parents=True, exist_ok=True)
    row_cos, col_cos = _orientation()
    normal = np.cross(row_cos, col_cos)
    origin = np.array([-30.0, 12.5, 100.0])
    series_uid = series_uid or generate_uid()
    raw = rng.integers(0, 2000, (N, ROWS, COLS)).astype(np.int16)
    order = rng.permutation(N)  # file k on disk holds slice order[k]; names are random too
    for k, s in enumerate(order):
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        name = names[k] if names else f"{rng.integers(1 << 30):x}.dcm"
        ds = FileDataset(str(folder / name), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.SeriesInstanceUID, ds.StudyInstanceUID = series_uid, "1.2.3"
        ds.Modality, ds.InstanceNumber = "CT", int(N - s)  # misleading on purpose
        ds.Rows, ds.Columns = ROWS, COLS
        ds.PixelSpacing = list(PIXEL_SPACING)
        ds.ImageOrientationPatient = [*row_cos.tolist(), *col_cos.tolist()]
        ds.ImagePositionPatient = (origin + s * SLICE_STEP * normal).tolist()
        ds.SliceThickness = 3.0  # differs from the position step, which must win
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = raw[s].tobytes()
        ds.save_as(folder / name, enforce_file_format=True)
    (folder / "notes.txt").write_text("not DICOM")
    return raw, origin, normal, series_uid


def test_synthetic_series_values_order_and_affine(tmp_path):
    raw, origin, normal, _ = write_series(tmp_path / "s", np.random.default_rng(0))
    vol = read_dicom_series(tmp_path / "s")
    assert vol.data.shape == (1, COLS, ROWS, N)  # (i = column, j = row, k = slice)
    assert vol.data.dtype == torch.int16
    expected = np.stack([r.T for r in raw], -1).astype(np.int32) - 1024
    np.testing.assert_array_equal(vol.data[0].numpy(), expected)
    np.testing.assert_allclose(vol.spacing, (0.6, 0.8, SLICE_STEP))
    row_cos, col_cos = _orientation()
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = row_cos * 0.6, col_cos * 0.8
    lps[:3, 2], lps[:3, 3] = normal * SLICE_STEP, origin
    np.testing.assert_allclose(vol.affine, LPS_TO_RAS @ lps, atol=1e-9)


def test_affine_matches_nibabel_dicom_wrappers(tmp_path):
    """nibabel's per-slice wrapper stores (row, col) with an LPS affine; ours is its transpose
    in RAS, and slice k of ours sits where nibabel puts that file's slice."""
    write_series(tmp_path / "s", np.random.default_rng(1), slope=0.5, intercept=-10.25)
    vol = read_dicom_series(tmp_path / "s")
    assert vol.data.dtype == torch.float32
    seen = set()
    for path in (tmp_path / "s").glob("*.dcm"):
        w = wrapper_from_file(str(path))
        ras = LPS_TO_RAS @ w.affine
        np.testing.assert_allclose(vol.affine[:3, 0], ras[:3, 1], atol=1e-6)  # columns swapped
        np.testing.assert_allclose(vol.affine[:3, 1], ras[:3, 0], atol=1e-6)
        k_float = np.linalg.solve(vol.affine[:3, :3], ras[:3, 3] - vol.affine[:3, 3])
        np.testing.assert_allclose(k_float[:2], 0, atol=1e-6)
        k = int(round(k_float[2]))
        assert abs(k_float[2] - k) < 1e-6
        seen.add(k)
        np.testing.assert_allclose(vol.data[0, :, :, k].numpy(), w.get_data().T, rtol=1e-6)
    assert seen == set(range(N))


def test_several_series_need_a_choice(tmp_path):
    rng = np.random.default_rng(2)
    raw_a, *_, uid_a = write_series(tmp_path / "s", rng, names=[f"a{k}" for k in range(N)])
    write_series(tmp_path / "s", rng, intercept=0.0, names=[f"b{k}" for k in range(N)])
    with pytest.raises(MedfmError, match=rf"2 DICOM series.*{uid_a}.*series_uid="):
        read_dicom_series(tmp_path / "s")
    vol = read_dicom_series(tmp_path / "s", series_uid=uid_a)
    np.testing.assert_array_equal(vol.data[0, :, :, 0].numpy(), raw_a[0].T.astype(int) - 1024)
    with pytest.raises(MedfmError, match="not found"):
        read_dicom_series(tmp_path / "s", series_uid="9.9.9")


def test_errors(tmp_path):
    with pytest.raises(MedfmError, match="does not exist"):
        read_dicom_series(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(MedfmError, match="no DICOM image"):
        read_dicom_series(tmp_path / "empty")
    write_series(tmp_path / "gap", np.random.default_rng(3))
    files = sorted(
        (tmp_path / "gap").glob("*.dcm"), key=lambda p: wrapper_from_file(str(p)).slice_indicator
    )
    files[1].unlink()  # a missing slice in the middle
    with pytest.raises(MedfmError, match="unevenly spaced"):
        read_dicom_series(tmp_path / "gap")


def test_real_ct_series_matches_its_segmentation(shared_data):
    folder = shared_data / "ct_totalsegmentator_example"
    if not (folder / "example_ct_dicom").is_dir():
        pytest.skip("example_ct_dicom is absent")
    vol = read_dicom_series(folder / "example_ct_dicom")
    seg = read_nifti(folder / "example_seg_dicom.nii.gz")
    assert vol.data.shape == (1, 512, 512, 20) and seg.shape == vol.shape
    assert vol.data.dtype == torch.int16 and vol.data.min() >= -1024
    np.testing.assert_allclose(vol.spacing, (0.9765625, 0.9765625, 2.0), atol=1e-6)
    # The segmentation was converted by dcm2niix, which stores the same grid with the row axis
    # j reversed: seg voxel (i, J-1-j, k) is our voxel (i, j, k).
    flip_j = np.eye(4)
    flip_j[1, 1], flip_j[1, 3] = -1, vol.shape[1] - 1
    np.testing.assert_allclose(vol.affine @ flip_j, seg.affine, atol=1e-3)
    # ... and the labels land on the right tissue: liver (5) is soft tissue in HU, air is not.
    labels = seg.data[0].flip(1)
    hu = vol.data[0].float()
    assert 40 < hu[labels == 5].mean() < 150
    assert hu[labels == 0].mean() < -500
