"""The Volume type: an image or label array together with its voxel-to-world affine.

Axis order (the one rule for all of medfm)
------------------------------------------
``Volume.data`` is **channel-first**: ``(C, *spatial)`` with 2 or 3 spatial axes. The spatial
axes are the file's voxel axes **in storage order**, and nothing in medfm transposes them
silently:

- NIfTI: ``(i, j, k)`` exactly as nibabel's ``img.dataobj`` / ``img.get_fdata()`` return them
  (no transpose, no reorientation to RAS or LPS; the affine says where each axis points).
- PNG / JPEG (2D): ``(row, col) = (H, W)``: axis 0 goes down the image, axis 1 to the right,
  as ``numpy.asarray(PIL.Image.open(path))`` returns them. The affine is the identity
  (spacing 1), so "world" x is the row index and y the column index.
- DICOM series: ``(i, j, k) = (column, row, slice)``, i.e. each slice's ``pixel_array`` (which
  pydicom returns as ``(row, column)``) is stored transposed, and slices are sorted along the
  slice normal. Axis i thus follows the DICOM row direction (across columns), as in the NIfTI
  files dcm2niix or SimpleITK write from a series; dcm2niix additionally reverses the row axis
  j, see ``read_dicom_series``.

``Volume.affine`` is a float64 ``(4, 4)`` matrix mapping a voxel index ``(i, j, k, 1)`` to world
millimetres in RAS+, the nibabel convention: +x towards the patient's right, +y anterior,
+z superior (DICOM's LPS+ has x and y negated). For a 2D volume the affine is still ``(4, 4)``;
its third column is the (unused) direction of a virtual third axis, spacing 1 by default.

``Volume.spacing`` is the length of each spatial column of the affine (mm per voxel step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from medfm.errors import MedfmError

__all__ = ["Volume", "resample_volume"]

# numpy dtypes that torch cannot hold (or holds with gaps in operator support): widened.
_WIDEN = {np.dtype(np.uint16): np.int32, np.dtype(np.uint32): np.int64}


def _to_tensor(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A torch tensor sharing memory with ``array`` where possible (uint16/uint32 are widened)."""
    if isinstance(array, torch.Tensor):
        return array
    arr = np.asarray(array)
    if arr.dtype in _WIDEN:
        arr = arr.astype(_WIDEN[arr.dtype])
    elif arr.dtype == np.uint64:
        raise MedfmError("uint64 arrays are not supported; cast to int64 first")
    elif arr.dtype.byteorder not in ("=", "|"):
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype.kind not in "biuf":
        raise MedfmError(f"array dtype {arr.dtype} is not supported; use a real numeric dtype")
    return torch.from_numpy(np.ascontiguousarray(arr))


@dataclass(eq=False)
class Volume:
    """An image or label volume.

    Attributes:
        data: ``(C, *spatial)`` tensor with 2 or 3 spatial axes (see the module docstring for
            the axis order). Any real dtype; readers give uint8/int16/int32 for integer files
            and float32 for float files.
        affine: float64 ``(4, 4)`` voxel index -> world mm (RAS+, nibabel convention).

    ``==`` is identity (compare ``data`` and ``affine`` explicitly); ``dataclasses.replace(vol,
    data=...)`` gives a validated copy with the same affine.
    """

    data: torch.Tensor
    affine: np.ndarray

    def __post_init__(self) -> None:
        if not isinstance(self.data, torch.Tensor):
            raise MedfmError(
                f"Volume.data must be a torch.Tensor, got {type(self.data).__name__}; "
                "use Volume.from_array for numpy arrays"
            )
        if self.data.ndim not in (3, 4):
            raise MedfmError(
                f"Volume.data must be (C, *spatial) with 2 or 3 spatial axes, got shape "
                f"{tuple(self.data.shape)}; use Volume.from_array(..., has_channel=False) for "
                "an array without a channel axis"
            )
        if self.data.is_complex():
            raise MedfmError("Volume.data is complex; take .abs() or .real first")
        if any(s == 0 for s in self.data.shape):
            raise MedfmError(f"Volume.data has an empty axis: shape {tuple(self.data.shape)}")
        try:
            affine = np.array(self.affine, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise MedfmError(f"Volume.affine must be a (4, 4) float array ({e})") from None
        if affine.shape != (4, 4):
            raise MedfmError(f"Volume.affine must be (4, 4), got shape {affine.shape}")
        if not np.all(np.isfinite(affine)):
            raise MedfmError("Volume.affine contains NaN or inf")
        if not np.allclose(affine[3], [0, 0, 0, 1]):
            raise MedfmError(f"Volume.affine's last row must be [0, 0, 0, 1], got {affine[3]}")
        if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise MedfmError(
                "Volume.affine's 3x3 part is singular (a zero or repeated axis); "
                "give every axis a non-zero spacing"
            )
        self.affine = affine

    def __repr__(self) -> str:
        spacing = ", ".join(f"{s:.4g}" for s in self.spacing)
        return (
            f"Volume(data={tuple(self.data.shape)} {str(self.data.dtype).removeprefix('torch.')}"
            f" on {self.data.device}, spacing=({spacing}) mm)"
        )

    @property
    def ndim(self) -> int:
        """Number of spatial axes (2 or 3)."""
        return self.data.ndim - 1

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape (without the channel axis)."""
        return tuple(self.data.shape[1:])

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each spatial axis: the column norms of the affine."""
        norms = np.linalg.norm(self.affine[:3, : self.ndim], axis=0)
        return tuple(float(s) for s in norms)

    @classmethod
    def from_array(
        cls,
        array: np.ndarray | torch.Tensor,
        *,
        spacing: Sequence[float] | None = None,
        affine: np.ndarray | None = None,
        has_channel: bool = False,
    ) -> Volume:
        """Wrap a numpy array or tensor.

        Args:
            array: ``(*spatial)`` or, with ``has_channel=True``, ``(C, *spatial)``; 2 or 3
                spatial axes. numpy arrays share memory where possible (uint16 -> int32).
            spacing: mm per voxel along each spatial axis; the affine becomes
                ``diag(*spacing, 1)`` (2D: third axis spacing 1). Default all 1.
            affine: a full ``(4, 4)`` affine instead of ``spacing`` (not both).
            has_channel: whether ``array`` already has the leading channel axis.
        """
        data = _to_tensor(array)
        if not has_channel:
            data = data.unsqueeze(0)
        ndim = data.ndim - 1
        if affine is not None and spacing is not None:
            raise MedfmError("give either spacing or affine to Volume.from_array, not both")
        if affine is None:
            if spacing is None:
                spacing = (1.0,) * ndim
            spacing = tuple(float(s) for s in spacing)
            if len(spacing) != ndim or ndim not in (2, 3):
                raise MedfmError(
                    f"spacing {spacing} does not match the array's {ndim} spatial axes "
                    f"(array shape {tuple(data.shape)}, has_channel={has_channel})"
                )
            if not all(np.isfinite(s) and s > 0 for s in spacing):
                raise MedfmError(f"spacing must be positive mm values, got {spacing}")
            affine = np.diag([*spacing, *(1.0,) * (3 - ndim), 1.0])
        return cls(data=data, affine=affine)


def resample_volume(vol: Volume, spacing: Sequence[float], *, mode: str = "linear") -> Volume:
    """Resample ``vol`` to a new voxel spacing (mm), keeping voxel 0 where it is in the world.

    Uses ``medfm.kernels.resample_to_spacing`` (``align_corners=True``): the new shape is
    ``S'_j = max(1, round(S_j * in_j / out_j))`` and the first and last voxel centres stay on the
    old first and last voxel centres. The actual step along axis j is therefore
    ``in_j * (S_j - 1) / (S'_j - 1)``, which is close to but not always exactly ``out_j``; the
    returned affine records that actual step (its spatial columns are scaled by
    ``(S_j - 1) / (S'_j - 1)``), so world positions stay exact. Along an axis where ``S_j`` or
    ``S'_j`` is 1 the step is undefined and the column is scaled by ``out_j / in_j``.

    Args:
        vol: the volume, ``(C, *S)``.
        spacing: the target mm per voxel, one value per spatial axis.
        mode: "linear" (integer data is converted to float32 first) or "nearest" (dtype kept;
            use it for labels).
    """
    from medfm.kernels import resample_to_spacing

    out = tuple(float(s) for s in spacing)
    if len(out) != vol.ndim:
        raise MedfmError(f"spacing {out} must have one value per spatial axis ({vol.ndim})")
    if not all(np.isfinite(s) and s > 0 for s in out):
        raise MedfmError(f"spacing must be positive mm values, got {out}")
    spacing_in = vol.spacing
    x = vol.data.unsqueeze(0)
    if mode == "linear" and not x.is_floating_point():
        x = x.float()
    y = resample_to_spacing(x, spacing_in, out, mode=mode)[0]
    affine = vol.affine.copy()
    for j, (s_old, s_new) in enumerate(zip(vol.shape, y.shape[1:], strict=True)):
        if s_old > 1 and s_new > 1:
            scale = (s_old - 1) / (s_new - 1)
        else:
            scale = out[j] / spacing_in[j]
        affine[:3, j] *= scale
    return Volume(data=y, affine=affine)
