"""2D images (PNG, and JPEG/BMP/TIFF for reading) with PIL; axes (row, col) = (H, W).

See medfm.io.volume for the axis order. 2D images carry no geometry: the affine is the identity
(spacing 1 along rows and columns).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from medfm.errors import MedfmError
from medfm.io.atomic import atomic_path
from medfm.io.memory import check_memory
from medfm.io.volume import Volume

__all__ = ["read_png", "read_image", "write_png"]

_CONVERT_TO_RGB = ("RGBA", "CMYK", "YCbCr", "RGBX", "LAB", "HSV")
_PIL_LIMIT = threading.Lock()


@contextmanager
def _no_pixel_limit() -> Iterator[None]:
    """PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, ~179 Mpx: a fixed number that
    refuses large scans with a traceback) lifted while medfm opens an image: `read_png` checks
    the size read from the header against the machine's memory instead (`check_memory`). The
    global is restored afterwards; a lock keeps two medfm readers from restoring it wrongly."""
    with _PIL_LIMIT:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


def _bytes_per_pixel(mode: str) -> int:
    """The peak bytes per pixel `read_png` allocates for a PIL ``mode``: PIL's decoded image
    (4 bytes for a multi-band mode, 2 for I;16, 4 for I/F, else 1), a converted copy, and the
    numpy array with its cast or channel-first copy (measured with tracemalloc)."""
    try:
        bands = Image.getmodebands(mode)
    except (KeyError, ValueError):
        bands = 4
    pil = 4 if bands > 1 or mode in ("I", "F") else 2 if mode.startswith("I;16") else 1
    out_channels = 3 if mode in _CONVERT_TO_RGB or mode == "RGB" else 1
    out_item = 4 if mode.startswith(("I", "F")) else 1
    return pil * (2 if mode in _CONVERT_TO_RGB else 1) + 2 * out_channels * out_item


def read_png(path: str | os.PathLike) -> Volume:
    """Read a 2D image file into a Volume ``(C, H, W)`` with an identity affine.

    By PIL mode:

    - ``L`` (8-bit grey) -> ``(1, H, W)`` uint8; ``I;16`` (16-bit grey) and ``I`` -> int32;
      ``F`` -> float32; ``1`` (bilevel) -> uint8 with values 0/1.
    - ``P`` / ``PA`` (palette) -> ``(1, H, W)`` uint8 holding the palette **indices**, not the
      colours: label masks are often saved as palette PNGs whose index is the label (nnU-Net
      accepts them), and a palette image's colours are not what one segments. Convert real
      palette photographs to RGB before saving them.
    - ``RGB`` -> ``(3, H, W)`` uint8; ``RGBA`` -> RGB (alpha dropped, not composited); ``LA`` ->
      grey (alpha dropped); ``CMYK`` / ``YCbCr`` (JPEG) -> RGB.

    JPEG and other formats PIL opens are read the same way (``read_image`` is this function).
    Multi-frame files: only the first frame.
    """
    path = Path(path)
    if not path.exists():
        raise MedfmError(f"image file {path} does not exist; check the path")
    if path.is_dir():
        raise MedfmError(f"{path} is a folder, expected an image file")
    try:
        with _no_pixel_limit(), Image.open(path) as img:
            width, height = img.size
            check_memory(
                width * height * _bytes_per_pixel(img.mode),
                f"{path}: reading its {width}x{height} {img.mode}-mode image",
                hint="read it on a machine with more memory, or crop or downsample it first",
            )
            if width < 1 or height < 1:
                raise MedfmError(f"{path} is {width}x{height} pixels; there is no image in it")
            img.load()
            mode = img.mode
            if mode in _CONVERT_TO_RGB:
                img = img.convert("RGB")
            elif mode == "LA":
                img = img.convert("L")
            elif mode == "PA":
                img = img.getchannel(0)  # the index band
            arr = np.array(img)
    except MedfmError:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
    ) as e:
        raise MedfmError(
            f"cannot read {path} as an image ({type(e).__name__}: {e}); is the file complete?"
        ) from None
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    elif arr.dtype.kind in "iu" and arr.dtype != np.uint8:
        arr = arr.astype(np.int32)  # 16-bit grey ("I;16") and "I"
    elif arr.dtype.kind == "f":
        arr = arr.astype(np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3:
        arr = np.moveaxis(arr, -1, 0)  # (H, W, C) -> (C, H, W): channels first, spatial untouched
    else:
        raise MedfmError(f"{path} decodes to shape {arr.shape}; expected a 2D grey or RGB image")
    data = torch.from_numpy(np.ascontiguousarray(arr))
    return Volume(data=data, affine=np.eye(4))


read_image = read_png


def write_png(vol_or_tensor: Volume | torch.Tensor | np.ndarray, path: str | os.PathLike) -> None:
    """Write a uint8 image ``(1, H, W)`` (grey), ``(3, H, W)`` (RGB) or ``(H, W)`` to a .png file.

    Anything else (another dtype or shape, a 3D volume) raises MedfmError: scale and cast to
    uint8 first. The write is atomic. A Volume's affine is not stored (PNG has no geometry).
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise MedfmError(f"write_png writes .png files (lossless); got {path.name}")
    data = vol_or_tensor.data if isinstance(vol_or_tensor, Volume) else vol_or_tensor
    if isinstance(data, torch.Tensor):
        arr = data.detach().cpu().numpy()
    elif isinstance(data, np.ndarray):
        arr = data
    else:
        raise MedfmError(f"write_png needs a Volume, tensor or array, got {type(data).__name__}")
    if arr.dtype != np.uint8:
        raise MedfmError(
            f"write_png writes uint8 images, got {arr.dtype}; scale to 0..255 and cast to uint8"
        )
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    elif arr.ndim == 3 and arr.shape[0] == 3:
        arr = np.moveaxis(arr, 0, -1)  # (3, H, W) -> (H, W, 3) as PIL stores RGB
    elif arr.ndim != 2:
        raise MedfmError(
            f"write_png writes (1, H, W), (3, H, W) or (H, W) images, got shape {arr.shape}"
        )
    img = Image.fromarray(np.ascontiguousarray(arr))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
