"""NIfTI (.nii, .nii.gz) reading and writing with nibabel; axes as stored (see medfm.io.volume)."""

from __future__ import annotations

import gzip
import math
import os
import warnings
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medfm.errors import MedfmError
from medfm.io.atomic import atomic_path
from medfm.io.memory import check_memory
from medfm.io.volume import Volume

__all__ = ["read_nifti", "write_nifti"]

# Integer dtypes torch cannot hold are widened on reading.
_READ_WIDEN = {np.dtype(np.uint16): np.int32, np.dtype(np.uint32): np.int64}


def _check_exists(path: Path, what: str) -> None:
    if not path.exists():
        raise MedfmError(f"{what} file {path} does not exist; check the path")
    if path.is_dir():
        raise MedfmError(f"{path} is a folder, expected a {what} file")


def read_nifti(path: str | os.PathLike) -> Volume:
    """Read a 2D or 3D NIfTI file into a 1-channel Volume, axes exactly as nibabel stores them.

    Integer data without scaling keeps its dtype (uint8, int8, int16, int32, int64;
    uint16 -> int32, uint32 -> int64). Float data, and integer data with a scl_slope/scl_inter
    scaling, is read as float32 with the scaling applied, as nibabel's ``get_fdata`` does. A
    trailing singleton 4th (and higher) axis is dropped; the affine is ``img.affine`` (sform if
    set, else qform). Returns ``data (1, *spatial)``.
    """
    path = Path(path)
    _check_exists(path, "NIfTI")
    check_header(path)
    try:
        img = nib.load(path)
    except Exception as e:  # nibabel raises a zoo of types for bad files
        raise MedfmError(
            f"cannot read {path} as NIfTI ({type(e).__name__}: {e}); is it a complete .nii/.nii.gz?"
        ) from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise MedfmError(f"{path} is a {type(img).__name__}, not NIfTI; convert it to .nii.gz")
    shape = tuple(img.shape)
    spatial = shape
    while len(spatial) > 3 and spatial[-1] == 1:
        spatial = spatial[:-1]
    if len(spatial) > 3:
        raise MedfmError(
            f"{path} is {len(spatial)}D (shape {shape}); medfm reads 2D/3D volumes, "
            "split the channels/time points into separate files first"
        )
    if len(spatial) < 2:
        raise MedfmError(f"{path} has shape {shape}; medfm reads 2D/3D volumes")
    dtype = img.get_data_dtype()
    if dtype.kind == "c":
        raise MedfmError(
            f"{path} holds complex data ({dtype}); save its magnitude or real part instead"
        )
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise MedfmError(f"{path} holds {dtype} data; medfm reads real scalar images only")
    if not np.all(np.isfinite(img.affine)):
        raise MedfmError(
            f"{path}: the header's geometry (pixdim, qform or sform) holds NaN or inf; "
            "fix the header (e.g. with nibabel: img.set_sform(affine))"
        )
    proxy = img.dataobj
    slope = float(getattr(proxy, "slope", 1.0))
    inter = float(getattr(proxy, "inter", 0.0))
    scaled = not (dtype.kind in "biu" and slope == 1.0 and inter == 0.0)
    check_memory(
        math.prod(shape) * _bytes_per_voxel(dtype, scaled),
        f"{path}: reading its {'x'.join(map(str, shape))} {dtype} volume",
        hint="read it on a machine with more memory, or crop or downsample it first",
    )
    try:
        if not scaled:
            arr = np.asanyarray(proxy)
            if arr.dtype in _READ_WIDEN:
                arr = arr.astype(_READ_WIDEN[arr.dtype])
            elif arr.dtype == np.uint64:
                if arr.size and arr.max() > np.iinfo(np.int64).max:
                    raise MedfmError(f"{path} holds uint64 values beyond int64's range")
                arr = arr.astype(np.int64)
            elif arr.dtype == np.bool_:
                arr = arr.astype(np.uint8)
        else:
            arr = img.get_fdata(dtype=np.float32)
    except MedfmError:
        raise
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise MedfmError(
            f"cannot read the data of {path} ({type(e).__name__}: {e}); the file looks truncated "
            "or corrupt, write it again"
        ) from None
    arr = arr.reshape(spatial)
    if arr.dtype.kind == "f":
        arr = _finite(arr, path)
    if arr.dtype.byteorder not in ("=", "|"):
        arr = arr.astype(arr.dtype.newbyteorder("="))
    data = torch.from_numpy(np.ascontiguousarray(arr)).unsqueeze(0)
    return Volume(data=data, affine=img.affine)


def _bytes_per_voxel(stored: np.dtype, scaled: bool) -> int:
    """The peak bytes per voxel `read_nifti` allocates, measured with tracemalloc on .nii and
    .nii.gz files of each path: the stored data (and its decompressed copy), then an unscaled
    integer volume (widened for uint16/uint32), or on the float path nibabel's float64 and
    float32 results plus the NaN mask and its replaced copy (17 bytes)."""
    item = stored.itemsize
    if not scaled:
        return 2 * item + np.dtype(_READ_WIDEN.get(stored, stored)).itemsize
    return 2 * item + 17


def check_header(path: str | os.PathLike) -> None:
    """Refuse a single-file NIfTI (.nii, .nii.gz) whose header is absurd, before nibabel reads
    it: a dimension count outside 1..7, a zero or negative size, an unknown data type, a data
    offset inside the header, or header extensions that do not chain up to the data (nibabel
    reads an extension of size < 8 to the file's end: a small .nii.gz would decompress whole
    into memory). Other files are left to nibabel."""
    path = Path(path)
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    try:
        with (gzip.open if name.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read(540)
            head = _parse_header(raw, path)
            if head is None:
                return  # not NIfTI: nibabel names what it is
            size = len(head.binaryblock)
            f.seek(size)
            flag = f.read(4)
            if len(flag) == 4 and flag[:1] != b"\x00":
                _check_extensions(f, int(head["vox_offset"]) - size - 4, head.endianness, path)
    except (OSError, EOFError, zlib.error):
        return  # unreadable: nib.load says so in read_nifti's own message


def _parse_header(raw: bytes, path: Path) -> nib.Nifti1Header | nib.Nifti2Header | None:
    """The header in ``raw`` (its byte order told by sizeof_hdr), checked; None if not NIfTI."""
    for order in ("<", ">"):
        hdr_size = int(np.frombuffer(raw[:4], dtype=f"{order}i4")[0]) if len(raw) >= 4 else 0
        klass = {348: nib.Nifti1Header, 540: nib.Nifti2Header}.get(hdr_size)
        if klass is not None and len(raw) >= hdr_size:
            break
    else:
        return None
    head = klass(raw[:hdr_size], endianness=order, check=False)
    dim = [int(d) for d in head["dim"]]
    if not 1 <= dim[0] <= 7:
        raise MedfmError(
            f"{path}: the header declares {dim[0]} dimensions (dim[0] must be 1 to 7); "
            "the file is damaged or not NIfTI"
        )
    shape = dim[1 : dim[0] + 1]
    if min(shape) < 1:
        raise MedfmError(
            f"{path}: the header declares shape {tuple(shape)}, with a zero or negative size; "
            "the file is damaged"
        )
    try:
        head.get_data_dtype()
    except (KeyError, ValueError, TypeError):
        raise MedfmError(
            f"{path}: the header's data type code {int(head['datatype'])} is unknown; "
            "the file is damaged or not NIfTI"
        ) from None
    offset = float(head["vox_offset"])
    if not math.isfinite(offset) or (offset != 0 and offset < len(head.binaryblock)):
        raise MedfmError(
            f"{path}: the header's data offset {offset} lies inside the header; the file is damaged"
        )
    return head


def _check_extensions(f, size: int, endianness: str, path: Path) -> None:
    """Walk the header extensions (8 bytes of size and code, then the content) as nibabel
    does, without keeping them: each must be at least 8 bytes and end before the data (with no
    data offset nibabel would read extensions to the end of the file: refused)."""
    if size < 0:
        raise MedfmError(
            f"{path}: the header announces extensions but its data offset leaves no room for "
            "them; the file is damaged"
        )
    check_memory(size, f"{path}: its header extensions", hint="the file is damaged or hostile")
    while size >= 16:
        head = f.read(8)
        if len(head) < 8:
            return  # truncated: nibabel's own error
        esize = int(np.frombuffer(head[:4], dtype=f"{endianness}i4")[0])
        if esize < 8 or esize > size:
            raise MedfmError(
                f"{path}: a header extension declares {esize} bytes where {size} remain "
                "before the data; the file is damaged"
            )
        f.seek(esize - 8, 1)
        size -= esize


def _finite(arr: np.ndarray, path: Path) -> np.ndarray:
    """NaN or infinite voxels (common in real exports) replaced by a fixed rule, with a
    warning naming how many: NaN and -inf become the image's lowest finite value, +inf its
    highest. An image with no finite voxel is refused."""
    bad = ~np.isfinite(arr)
    n = int(bad.sum())
    if n == 0:
        return arr
    if n == arr.size:
        raise MedfmError(f"{path}: all {n} voxels are NaN or infinite; there is no image in it")
    finite = arr[~bad]
    lo, hi = float(finite.min()), float(finite.max())
    warnings.warn(
        f"{path}: {n} of {arr.size} voxels are NaN or infinite; NaN and -inf were set to the "
        f"image's lowest finite value ({lo:g}), +inf to its highest ({hi:g})",
        stacklevel=3,
    )
    return np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo)


def _integer_dtype_for(arr: np.ndarray) -> np.dtype:
    """The smallest of int16/int32 holding ``arr``'s range (used for int64 data by default)."""
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    for dt in (np.int16, np.int32):
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dt)
    raise MedfmError(
        f"values span [{lo}, {hi}], beyond int32's range; NIfTI cannot store int64 portably, "
        "pass dtype=np.float64 or rescale"
    )


def cast_array(arr: np.ndarray, dtype: np.dtype | type, what: str) -> np.ndarray:
    """Cast ``arr`` to ``dtype``; to an integer dtype floats are rounded, and values outside the
    dtype's range or non-finite values raise MedfmError instead of wrapping around."""
    dtype = np.dtype(dtype)
    if arr.dtype == dtype:
        return arr
    if dtype.kind in "iu":
        if arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)):
                raise MedfmError(f"{what} has NaN/inf values; they cannot be stored as {dtype}")
            arr = np.rint(arr)
        if arr.size:
            info = np.iinfo(dtype)
            lo, hi = arr.min(), arr.max()
            if lo < info.min or hi > info.max:
                raise MedfmError(
                    f"{what} has values in [{lo}, {hi}], outside {dtype}'s range "
                    f"[{info.min}, {info.max}]; rescale it or choose a wider dtype"
                )
    elif dtype.kind not in "fb":
        raise MedfmError(f"cannot store {what} as {dtype}; use an integer or float dtype")
    return arr.astype(dtype)


def write_nifti(
    vol: Volume, path: str | os.PathLike, *, dtype: np.dtype | type | None = None
) -> None:
    """Write a 1-channel Volume to ``path`` (.nii or .nii.gz) atomically, with its affine.

    The affine goes into both sform and qform (code 1, scanner) and the spacing into the header
    zooms (units mm). ``dtype`` overrides the stored dtype, e.g. ``np.uint8`` for labels or
    ``np.int16`` for CT in HU (floats are rounded; values out of range raise MedfmError). By
    default the data's dtype is kept, except bool -> uint8, float16/bfloat16 -> float32 and
    int64 -> int16/int32 (the smallest that holds the values).
    """
    path = Path(path)
    if not isinstance(vol, Volume):
        raise MedfmError(f"write_nifti needs a Volume, got {type(vol).__name__}")
    if vol.data.shape[0] != 1:
        raise MedfmError(
            f"write_nifti writes one channel, the volume has {vol.data.shape[0]} "
            f"(shape {tuple(vol.data.shape)}); write each channel to its own file"
        )
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        raise MedfmError(f"{path}: a NIfTI file name must end with .nii or .nii.gz")
    t = vol.data[0].detach().cpu()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    arr = t.numpy()
    if dtype is not None:
        arr = cast_array(arr, dtype, f"the volume written to {path}")
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    elif arr.dtype == np.int64:
        arr = arr.astype(_integer_dtype_for(arr))
    img = nib.Nifti1Image(arr, vol.affine, dtype=arr.dtype)
    img.set_sform(vol.affine, code=1)
    img.set_qform(vol.affine, code=1)
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
