"""Files whose headers ask for more memory than the machine has, or describe nothing sane, are
refused in one line before anything is allocated (NIfTI, PNG, DICOM)."""

import gzip
import struct
import zlib

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medfm.errors import MedfmError
from medfm.io import load_volume, read_dicom_series
from medfm.io.memory import MEMORY_LIMIT_ENV


def _header(shape, dtype=np.float32, vox_offset=352):
    h = nib.Nifti1Image(np.zeros((2, 2, 2), dtype), np.eye(4)).header.copy()
    h.set_data_shape(shape)
    h["vox_offset"] = vox_offset
    return h


def _write(path, block: bytes):
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(block)
    else:
        path.write_bytes(block)
    return path.read_bytes()


def _refused(path, match):
    before = path.read_bytes()
    with pytest.raises(MedfmError, match=match) as e:
        load_volume(path)
    assert "\n" not in str(e.value)
    assert path.read_bytes() == before
    return str(e.value)


@pytest.mark.parametrize("name", ["big.nii", "big.nii.gz"])
def test_a_nifti_declaring_2000_cubed_is_refused_with_the_estimate(tmp_path, monkeypatch, name):
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "18G")
    path = tmp_path / name
    _write(path, _header((2000, 2000, 2000)).binaryblock + b"\0" * 4 + b"\0" * 64)
    msg = _refused(path, "reading its 2000x2000x2000 float32 volume needs ~")
    # 2 x 4 stored bytes + 17 on the float path, per voxel
    assert msg.endswith(
        "needs ~186 GiB, 18 GiB memory available: read it on a machine with more memory, "
        "or crop or downsample it first"
    )


def test_a_volume_that_fits_is_read_and_one_that_does_not_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((10, 20, 30), np.int16), np.eye(4)), path)
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(10 * 20 * 30 * 6))  # 2 x 2 stored + 2 read
    assert load_volume(path).shape == (10, 20, 30)
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(10 * 20 * 30 * 6 - 1))
    _refused(path, r"10x20x30 int16 volume needs ~35 KiB, 35 KiB memory available")


@pytest.mark.parametrize(
    "dim, match",
    [
        ([3, 10, 0, 10, 1, 1, 1, 1], r"declares shape \(10, 0, 10\), with a zero or negative"),
        ([3, 10, -20, 10, 1, 1, 1, 1], r"declares shape \(10, -20, 10\), with a zero or negative"),
        ([9, 10, 10, 10, 10, 10, 10, 10], r"declares 9 dimensions \(dim\[0\] must be 1 to 7\)"),
        ([0, 10, 10, 10, 1, 1, 1, 1], r"declares 0 dimensions"),
    ],
)
def test_absurd_nifti_dimensions(tmp_path, dim, match):
    h = _header((10, 10, 10))
    h["dim"] = dim
    path = tmp_path / "bad.nii.gz"
    _write(path, h.binaryblock + b"\0" * 4 + b"\0" * 4000)
    _refused(path, match)


def test_unknown_datatype_and_offset_inside_the_header(tmp_path):
    h = _header((10, 10, 10))
    h["datatype"] = 9999
    path = tmp_path / "type.nii"
    _write(path, h.binaryblock + b"\0" * 4 + b"\0" * 4000)
    _refused(path, "data type code 9999 is unknown")
    h = _header((10, 10, 10), vox_offset=100)
    _write(path, h.binaryblock + b"\0" * 4 + b"\0" * 4000)
    _refused(path, "data offset 100.0 lies inside the header")


def test_nan_in_pixdim_is_refused_before_reading(tmp_path):
    img = nib.Nifti1Image(np.zeros((10, 20, 30), np.int16), None)
    img.header["pixdim"][1] = np.nan
    img.header["qform_code"] = img.header["sform_code"] = 0
    path = tmp_path / "nan.nii.gz"
    nib.save(img, path)
    _refused(path, r"geometry \(pixdim, qform or sform\) holds NaN or inf")


def test_an_extension_read_to_the_end_of_a_gzip_bomb_is_refused(tmp_path):
    # nibabel reads an extension of size 0 (less than its own 8 bytes) to the end of the
    # stream: a small .nii.gz of zeros would decompress whole into memory
    h = _header((10, 10, 10), vox_offset=368)
    path = tmp_path / "bomb.nii.gz"
    body = h.binaryblock + b"\x01\0\0\0" + struct.pack("<ii", 0, 0) + b"\0" * (1 << 20)
    _write(path, body)
    assert path.stat().st_size < 5000
    _refused(path, "a header extension declares 0 bytes where 16 remain before the data")
    h = _header((10, 10, 10), vox_offset=0)
    _write(path, h.binaryblock + b"\x01\0\0\0" + struct.pack("<ii", 2**30, 0) + b"\0" * 64)
    _refused(path, "announces extensions but its data offset leaves no room")


def test_a_valid_extension_still_reads(tmp_path):
    img = nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.eye(4))
    img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"hello medfm"))
    path = tmp_path / "ext.nii.gz"
    nib.save(img, path)
    assert load_volume(path).data.flatten().tolist() == list(range(24))


def _png(width, height, rows=4) -> bytes:
    """A 1-bit grey PNG whose header says width x height, with only ``rows`` rows of data."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    raw = (b"\0" + b"\0" * ((width + 7) // 8)) * rows
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def test_a_20000_squared_png_is_refused_when_it_does_not_fit(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    path.write_bytes(_png(20000, 20000))
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "1G")
    limit = Image.MAX_IMAGE_PIXELS
    msg = _refused(path, "reading its 20000x20000 1-mode image needs ~1.1 GiB, 1.0 GiB memory")
    assert "DecompressionBomb" not in msg
    assert Image.MAX_IMAGE_PIXELS == limit  # PIL's global is as it was


def test_a_png_beyond_pils_pixel_limit_is_read_when_it_fits(tmp_path, monkeypatch):
    # PIL's decompression-bomb limit (lowered here so the test stays small) does not apply:
    # the memory does, and PIL's global is left as it was
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = tmp_path / "wide.png"
    Image.fromarray(np.full((60, 90), 7, np.uint8)).save(path)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    vol = load_volume(path)
    assert vol.shape == (60, 90) and int(vol.data.min()) == int(vol.data.max()) == 7
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_a_zero_size_png_is_refused(tmp_path):
    path = tmp_path / "zero.png"
    path.write_bytes(_png(0, 10, rows=0))
    _refused(path, "cannot read .*zero.png as an image|0x10 pixels")


def test_a_dicom_series_too_large_is_refused(tmp_path, monkeypatch):
    pytest.importorskip("pydicom")
    from .test_dicom import COLS, ROWS, N, write_series

    write_series(tmp_path / "s", np.random.default_rng(0))
    per_voxel = 2 * 2 + 24  # the pixels twice, then the int64 rescaling
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(ROWS * COLS * N * per_voxel))
    assert read_dicom_series(tmp_path / "s").shape == (COLS, ROWS, N)
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(ROWS * COLS * N * per_voxel - 1))
    with pytest.raises(MedfmError, match=f"reading its {COLS}x{ROWS}x{N} 16-bit series needs"):
        read_dicom_series(tmp_path / "s")
