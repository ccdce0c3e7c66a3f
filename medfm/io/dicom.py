"""DICOM series (a folder of single-frame slices) -> Volume, via pydicom (extra ``medfm[dicom]``).

Axes are ``(i, j, k) = (column, row, slice)``: pydicom gives each slice as ``(row, column)``, and
it is stored transposed so that axis 0 runs along the DICOM row direction cosine
(ImageOrientationPatient[:3], the direction of increasing column index) like in a NIfTI built
from the DICOM geometry. Slices are sorted along the slice normal. The affine maps to RAS+.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from medfm.errors import MedfmError
from medfm.io.memory import check_memory
from medfm.io.volume import Volume

__all__ = ["read_dicom_series"]

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _floats(value, n: int, what: str, path: Path) -> np.ndarray:
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        out = np.zeros(0)
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        raise MedfmError(f"{path} has an invalid {what} ({value!r}); the series cannot be placed")
    return out


def read_dicom_series(folder: str | os.PathLike, *, series_uid: str | None = None) -> Volume:
    """Read a folder of single-frame DICOM slices into a 3D Volume ``(1, columns, rows, slices)``.

    Every file in ``folder`` (not its subfolders) that pydicom recognises as a DICOM image is
    used; other files are ignored. Files are grouped by SeriesInstanceUID: with more than one
    series, pass ``series_uid=`` to pick one. Slices are sorted by their position along the slice
    normal (row cosine x column cosine of ImageOrientationPatient) and must be evenly spaced.

    Values get RescaleSlope/RescaleIntercept applied (CT -> HU). When every slope and intercept is
    an integer the result is int16 if the values fit, else int32; otherwise float32. Photometric
    MONOCHROME1 values are kept as stored (not inverted).

    The affine maps ``(i, j, k)`` to RAS+ mm: column ``i`` steps PixelSpacing[1] along the row
    cosine, row ``j`` steps PixelSpacing[0] along the column cosine, slice ``k`` steps from the
    first to the last slice position divided by ``N - 1`` (one slice: the normal times
    SpacingBetweenSlices or SliceThickness, else 1 mm); DICOM's LPS is turned into RAS by negating
    x and y. dcm2niix writes the same grid with the row axis ``j`` reversed.
    """
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError:
        raise MedfmError("reading DICOM needs pydicom: pip install 'medfm[dicom]'") from None

    folder = Path(folder)
    if not folder.is_dir():
        raise MedfmError(f"DICOM folder {folder} does not exist or is not a folder; check the path")

    series: dict[str, list[tuple[Path, object]]] = defaultdict(list)
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            continue  # not a DICOM file (no DICM preamble): ignored
        except Exception as e:
            raise MedfmError(
                f"{path} looks like DICOM but cannot be read ({type(e).__name__}: {e}); "
                "remove or replace it"
            ) from None
        if "Rows" not in ds or "Columns" not in ds:
            continue  # DICOMDIR, structured reports, ...: not images
        series[str(ds.get("SeriesInstanceUID", "") or "")].append((path, ds))

    if not series:
        raise MedfmError(f"no DICOM image files in {folder}; point to the folder of one series")
    if series_uid is None:
        if len(series) > 1:
            listing = "; ".join(
                f"{uid or '(no SeriesInstanceUID)'}: {len(v)} files"
                f" ({v[0][1].get('SeriesDescription', '')})"
                for uid, v in sorted(series.items())
            )
            raise MedfmError(
                f"{folder} holds {len(series)} DICOM series ({listing}); pick one with series_uid="
            )
        (files,) = series.values()
    else:
        if series_uid not in series:
            raise MedfmError(f"series {series_uid} not found in {folder}; found {sorted(series)}")
        files = series[series_uid]

    first_path, first = files[0]
    rows, cols = int(first.Rows), int(first.Columns)
    iop = _floats(first.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", first_path)
    pix = _floats(first.get("PixelSpacing"), 2, "PixelSpacing", first_path)
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise MedfmError(f"{first_path} has a non-orthonormal ImageOrientationPatient {iop}")

    positions = []
    for path, ds in files:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise MedfmError(
                f"{path} is a multi-frame DICOM; medfm reads series of single-frame slices "
                "(convert it with dcm2niix and use read_nifti)"
            )
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise MedfmError(f"{path} is a colour DICOM; medfm reads grey-level series only")
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise MedfmError(
                f"{path} is {ds.Rows}x{ds.Columns} but {first_path} is {rows}x{cols}; "
                "the folder mixes images of different sizes"
            )
        if not np.allclose(
            _floats(ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", path),
            iop,
            atol=1e-4,
        ) or not np.allclose(_floats(ds.get("PixelSpacing"), 2, "PixelSpacing", path), pix):
            raise MedfmError(
                f"{path} has another orientation or pixel spacing than {first_path}; "
                "the folder mixes acquisitions, pass series_uid= or split the folder"
            )
        positions.append(_floats(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient", path))

    positions = np.stack(positions)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    files = [files[i] for i in order]
    n = len(files)
    if n > 1:
        steps = np.diff(along)
        if steps.min() < 1e-3:
            raise MedfmError(
                f"{folder}: two slices share a position ({along[np.argmin(steps)]:.3f} mm along "
                "the normal); the folder holds repeated acquisitions, split it"
            )
        if steps.max() - steps.min() > max(1e-2 * steps.mean(), 1e-3):
            raise MedfmError(
                f"{folder}: slices are unevenly spaced (steps {steps.min():.3f} to "
                f"{steps.max():.3f} mm); a slice may be missing"
            )
        slice_step = (positions[-1] - positions[0]) / (n - 1)
    else:
        dz = first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0
        slice_step = normal * float(dz)

    if rows < 1 or cols < 1:
        raise MedfmError(f"{first_path} declares {rows}x{cols} pixels; there is no image in it")
    bits = int(first.get("BitsAllocated", 16) or 16)
    # peak: the pixels twice (the slices and their stack), then the int64 or float64 rescaling
    # with its temporaries (24 bytes a voxel, measured with tracemalloc)
    check_memory(
        rows * cols * n * (2 * max(1, bits // 8) + 24),
        f"{folder}: reading its {cols}x{rows}x{n} {bits}-bit series",
        hint="read it on a machine with more memory, or fewer slices at a time",
    )
    slices, slopes, inters = [], [], []
    for path, _ in files:
        try:
            ds = pydicom.dcmread(path)
            pixels = ds.pixel_array
        except Exception as e:
            raise MedfmError(
                f"cannot decode the pixels of {path} ({type(e).__name__}: {e}); for compressed "
                "DICOM install pylibjpeg with pylibjpeg-openjpeg/libjpeg, or gdcm"
            ) from None
        if pixels.shape != (rows, cols):
            raise MedfmError(f"{path} decodes to shape {pixels.shape}, expected ({rows}, {cols})")
        slices.append(pixels.T)  # (row, col) -> (col i, row j): the documented axis order
        slopes.append(float(ds.get("RescaleSlope", 1.0) or 1.0))
        inters.append(float(ds.get("RescaleIntercept", 0.0) or 0.0))

    raw = np.stack(slices, axis=-1)  # (i, j, k)
    slope = np.array(slopes)[None, None, :]
    inter = np.array(inters)[None, None, :]
    if all(float(v).is_integer() for v in slopes + inters):
        values = raw.astype(np.int64) * slope.astype(np.int64) + inter.astype(np.int64)
        lo, hi = int(values.min()), int(values.max())
        for dt in (np.int16, np.int32):
            if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
                values = values.astype(dt)
                break
        else:
            values = values.astype(np.float32)
    else:
        values = (raw.astype(np.float64) * slope + inter).astype(np.float32)

    lps = np.eye(4)
    lps[:3, 0] = row_cos * pix[1]
    lps[:3, 1] = col_cos * pix[0]
    lps[:3, 2] = slice_step
    lps[:3, 3] = positions[0]
    data = torch.from_numpy(np.ascontiguousarray(values)).unsqueeze(0)
    return Volume(data=data, affine=_LPS_TO_RAS @ lps)
