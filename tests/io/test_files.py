"""load_volume / save_volume: a file read and written by its name, round trips."""

import numpy as np
import pytest
import torch

from medfm.errors import MedfmError
from medfm.io import Volume, load_volume, read_nifti, read_png, save_volume


def test_nifti_round_trip_keeps_data_and_affine(tmp_path):
    data = torch.arange(10 * 20 * 30, dtype=torch.int16).reshape(1, 10, 20, 30)
    affine = np.diag([0.5, 1.5, 2.0, 1.0])
    affine[:3, 3] = (4.0, -2.0, 7.0)
    for name in ("v.nii.gz", "v.NII"):
        path = save_volume(Volume(data, affine), tmp_path / name)
        back = load_volume(path)
        assert torch.equal(back.data, data) and np.allclose(back.affine, affine)
        assert torch.equal(back.data, read_nifti(path).data)


def test_png_round_trip_grey_and_rgb(tmp_path):
    g = torch.Generator().manual_seed(0)
    for c in (1, 3):
        data = torch.randint(0, 256, (c, 10, 20), generator=g, dtype=torch.uint8)
        path = save_volume(Volume(data, np.eye(4)), tmp_path / f"x{c}.png")
        back = load_volume(path)
        assert back.data.shape == (c, 10, 20) and torch.equal(back.data, data)
        assert torch.equal(back.data, read_png(path).data)


def test_unknown_names_are_one_line_errors(tmp_path):
    vol = Volume(torch.zeros(1, 10, 20, dtype=torch.uint8), np.eye(4))
    with pytest.raises(MedfmError, match="writes .nii, .nii.gz or .png"):
        save_volume(vol, tmp_path / "x.mha")
    with pytest.raises(MedfmError, match="does not exist"):
        load_volume(tmp_path / "missing.mha")
    (tmp_path / "x.mha").write_bytes(b"?")
    with pytest.raises(MedfmError, match="unknown file type"):
        load_volume(tmp_path / "x.mha")
    with pytest.raises(MedfmError, match="does not exist"):
        load_volume(tmp_path / "missing.nii.gz")


def test_a_folder_or_one_of_its_dcm_files_is_read_as_a_dicom_series(tmp_path):
    pytest.importorskip("pydicom")
    from medfm.io import read_dicom_series

    from .test_dicom import write_series

    write_series(tmp_path / "s", np.random.default_rng(0))
    want = read_dicom_series(tmp_path / "s")
    one = next((tmp_path / "s").glob("*.dcm"))
    for given in (tmp_path / "s", one):
        got = load_volume(given)
        assert torch.equal(got.data, want.data) and np.array_equal(got.affine, want.affine)


def test_an_output_is_never_an_input_or_inside_one(tmp_path):
    from medfm.io import check_outputs

    data = tmp_path / "data"
    (data / "labelsTr").mkdir(parents=True)
    image = tmp_path / "img.png"
    image.write_bytes(b"x")
    with pytest.raises(MedfmError, match=r"--out .*dataset.json lies inside the input --data"):
        check_outputs({"--out": data / "dataset.json"}, {"--data": data})
    with pytest.raises(MedfmError, match=r"--overlays .*labelsTr lies inside the input --data"):
        check_outputs({"--out": None, "--overlays": data / "labelsTr"}, {"--data": data})
    with pytest.raises(MedfmError, match=r"--out .*img.png is the input --image"):
        check_outputs({"--out": tmp_path / "." / "img.png"}, {"--image": image})
    # beside an input, or holding one, is fine; so is an input that is not given
    check_outputs({"--out": tmp_path / "report.json", "--overlays": tmp_path}, {"--data": data})
    check_outputs({"--out": tmp_path / "data2"}, {"--data": data, "--model": None})
