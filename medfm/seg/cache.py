"""Image-embedding cache: each image is encoded once per model, then read from disk.

With the image encoder frozen (SynthFM's recipe) training needs only the embeddings, so
``medfm seg embed`` or training fills this cache (`EmbeddingCache.fill`, with the encoder of
`medfm.seg.embed`) and every later epoch and run reads it.

Layout under ``root``::

    <model dir>/<key[:2]>/<key>.npy    embedding (C, h, w) float16, plain .npy (no pickle)
    <model dir>/<key[:2]>/<key>.json   {"model_id", "shape", "original_size", "input_size"}

``key`` = sha256 of the model id, the image's shape and dtype and its bytes; ``<model dir>`` is
the model id made filename-safe plus a short hash of it. Both files are written atomically
(temporary file, then rename), the ``.npy`` first: an entry exists once its ``.json`` does.
Entries are read memory-mapped (``np.load(mmap_mode="r", allow_pickle=False)``). An entry that
cannot be read, or whose array does not match its ``.json`` (a truncated file, a half-copied
folder), counts as a miss and is recomputed; bit flips inside a whole file are not detected.
Several processes (DDP ranks) may fill one cache: they write the same bytes under one key.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medfm.errors import MedfmError
from medfm.io.atomic import atomic_path, atomic_write_text

__all__ = ["CacheEntry", "CacheStats", "EmbeddingCache"]

SizeFn = Callable[[tuple[int, int]], tuple[int, int]]


@dataclass(frozen=True)
class CacheEntry:
    """What the decoder needs beside an embedding: original_size (H, W) of the image,
    input_size (h, w) of the resized image before padding (SAM's ``input_size``, None if the
    writer did not give it), shape (C, h', w') of the embedding."""

    model_id: str
    shape: tuple[int, ...]
    original_size: tuple[int, int]
    input_size: tuple[int, int] | None


@dataclass(frozen=True)
class CacheStats:
    """Counts since the cache object was made: hits, misses (lookups), writes (entries put)."""

    hits: int
    misses: int
    writes: int


def _as_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise MedfmError(f"image must be a numpy array, got {type(image).__name__}")
    if image.ndim not in (2, 3) or image.size == 0:
        raise MedfmError(f"image must be (H, W) or (H, W, C) and non-empty, got {image.shape}")
    return np.ascontiguousarray(image)


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise MedfmError(f"batch_size must be >= 1, got {batch_size}")


class EmbeddingCache:
    """Embeddings of one model (``model_id``, e.g. ``"vit_b:sam_vit_b_01ec64"``) under ``root``.

    The model id must name the weights as well as the architecture: a different checkpoint
    needs a different id, since the key cannot see the weights. ``shape``: the (C, h, w) every
    embedding of this model has; a stored entry of another shape (a foreign or damaged file)
    is a miss, computed again, never handed to training.
    """

    def __init__(
        self, root: str | Path, model_id: str, *, shape: tuple[int, int, int] | None = None
    ) -> None:
        if not model_id:
            raise MedfmError("model_id must be a non-empty string naming the encoder and weights")
        self.root = Path(root)
        self.model_id = model_id
        self.shape = None if shape is None else tuple(int(v) for v in shape)
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id)[:64]
        tag = hashlib.sha256(model_id.encode()).hexdigest()[:8]
        self.dir = self.root / f"{safe}-{tag}"
        self._hits = 0
        self._misses = 0
        self._writes = 0

    # ------------------------------------------------------------------ keys and paths

    def key(self, image: np.ndarray) -> str:
        """sha256 hex of (model id, image shape, dtype, bytes)."""
        image = _as_image(image)
        header = json.dumps(
            {"model_id": self.model_id, "shape": list(image.shape), "dtype": image.dtype.str}
        )
        h = hashlib.sha256(header.encode())
        h.update(b"\n")
        h.update(image.data)
        return h.hexdigest()

    def _paths(self, key: str) -> tuple[Path, Path]:
        folder = self.dir / key[:2]
        return folder / f"{key}.npy", folder / f"{key}.json"

    # ------------------------------------------------------------------ reading

    def _load(self, key: str) -> tuple[np.memmap, CacheEntry] | None:
        """The memory-mapped embedding and its entry, or None if absent or unreadable."""
        npy, meta = self._paths(key)
        try:
            info = json.loads(meta.read_text())
            entry = CacheEntry(
                model_id=str(info["model_id"]),
                shape=tuple(int(s) for s in info["shape"]),
                original_size=(int(info["original_size"][0]), int(info["original_size"][1])),
                input_size=None
                if info.get("input_size") is None
                else (int(info["input_size"][0]), int(info["input_size"][1])),
            )
            arr = np.load(npy, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, KeyError, TypeError, IndexError, EOFError):
            return None  # missing, truncated or malformed: a miss
        if (
            entry.model_id != self.model_id
            or not isinstance(arr, np.memmap)
            or arr.dtype != np.float16
            or arr.shape != entry.shape
            or (self.shape is not None and arr.shape != self.shape)
        ):
            return None
        return arr, entry

    def get_array(self, image: np.ndarray) -> np.memmap | None:
        """The stored embedding (C, h, w) float16 as a read-only memory map, or None (a miss)."""
        found = self._load(self.key(image))
        if found is None:
            self._misses += 1
            return None
        self._hits += 1
        return found[0]

    def get(self, image: np.ndarray, *, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """image (H, W[, C]) -> embedding (C, h, w) as a new CPU tensor of ``dtype``, or None."""
        arr = self.get_array(image)
        return None if arr is None else torch.from_numpy(np.array(arr)).to(dtype)

    def entry(self, image: np.ndarray) -> CacheEntry | None:
        """The sizes stored with the image's embedding, or None (not counted in `stats`)."""
        found = self._load(self.key(image))
        return None if found is None else found[1]

    def __contains__(self, image: np.ndarray) -> bool:
        return self._load(self.key(image)) is not None

    # ------------------------------------------------------------------ writing

    def put(
        self,
        image: np.ndarray,
        embedding: torch.Tensor | np.ndarray,
        *,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        """Store embedding (C, h, w) for image (H, W[, C]), as float16, atomically.

        ``input_size``: the (h, w) the image was resized to before padding (SAM's
        ``input_size``), kept for the decoder's post-processing.
        """
        image = _as_image(image)
        if isinstance(embedding, torch.Tensor):
            embedding = embedding.detach().to("cpu", torch.float32).numpy()
        with np.errstate(over="ignore", invalid="ignore"):  # checked just below
            emb = np.ascontiguousarray(np.asarray(embedding, dtype=np.float32).astype(np.float16))
        if emb.ndim != 3:
            raise MedfmError(f"embedding must have shape (C, h, w), got {emb.shape}")
        if not np.isfinite(emb).all():
            raise MedfmError(
                "embedding has values that are not finite in float16 (|x| > 65504 or NaN); "
                "check the encoder's output"
            )
        npy, meta = self._paths(self.key(image))
        with atomic_path(npy) as tmp:
            np.save(tmp, emb, allow_pickle=False)
        info = {
            "model_id": self.model_id,
            "shape": list(emb.shape),
            "original_size": [int(image.shape[0]), int(image.shape[1])],
            "input_size": None if input_size is None else [int(input_size[0]), int(input_size[1])],
        }
        atomic_write_text(meta, json.dumps(info))
        self._writes += 1

    def get_or_compute(
        self,
        images: Sequence[np.ndarray],
        encode: Callable[[list[np.ndarray]], torch.Tensor],
        batch_size: int = 8,
        *,
        input_size: SizeFn | None = None,
    ) -> torch.Tensor:
        """Embeddings (B, C, h, w) float32 of ``images``, encoding only the misses.

        ``encode`` gets lists of at most ``batch_size`` missing images (each distinct image
        once) and returns their embeddings (b, C, h, w); ``input_size`` maps an image's (H, W)
        to its resized size, stored with the entry. The result is what the cache holds (values
        rounded to float16) for hits and misses alike, so a first run and a rerun see the same
        numbers.
        """
        _check_batch_size(batch_size)
        if len(images) == 0:
            raise MedfmError("get_or_compute needs at least one image")
        keys = [self.key(im) for im in images]
        found = self._compute_missing(images, keys, encode, batch_size, input_size)
        return torch.stack([torch.from_numpy(np.array(found[k], dtype=np.float32)) for k in keys])

    def fill(
        self,
        images: Sequence[np.ndarray],
        encode: Callable[[list[np.ndarray]], torch.Tensor],
        *,
        batch_size: int = 8,
        rank: int = 0,
        world: int = 1,
        log: Callable[[str], None] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Store the embedding of every image (H, W[, C]) of ``images`` not cached yet; returns
        how many this process wrote. ``progress(done, total)``: this process's misses encoded
        so far of its share, from 0 to the share, after each round.

        The misses, in order, are shared among ``world`` processes: process ``rank`` encodes
        misses rank, rank + world, ... (each process calls ``fill`` with the same images),
        ``batch_size`` images per ``encode`` call (as in `get_or_compute`), under
        ``torch.inference_mode``. ``log`` gets one line when there are misses. Waiting for the
        other processes to finish is the caller's business.
        """
        _check_batch_size(batch_size)
        if world < 1 or not 0 <= rank < world:
            raise MedfmError(f"rank {rank} of world {world}: need 0 <= rank < world")
        todo = [im for im in images if self.get_array(im) is None]
        if todo and log is not None:
            log(f"embedding {len(todo)} images (cached for later epochs and runs)")
        mine = todo[rank::world]
        before = self._writes
        chunk = 2 * batch_size  # images looked up again and encoded per round
        if progress is not None:
            progress(0, len(mine))
        with torch.inference_mode():
            for s in range(0, len(mine), chunk):
                part = mine[s : s + chunk]
                self._compute_missing(part, [self.key(im) for im in part], encode, batch_size)
                if progress is not None:
                    progress(s + len(part), len(mine))
        return self._writes - before

    def _compute_missing(
        self,
        images: Sequence[np.ndarray],
        keys: list[str],
        encode: Callable[[list[np.ndarray]], torch.Tensor],
        batch_size: int,
        input_size: SizeFn | None = None,
    ) -> dict[str, np.ndarray]:
        """key -> (C, h, w) float16 embedding of each of ``images`` (whose keys are ``keys``):
        hits read, each distinct miss encoded once and stored."""
        found: dict[str, np.ndarray] = {}
        todo: dict[str, np.ndarray] = {}
        for key, image in zip(keys, images, strict=True):
            if key in found or key in todo:
                continue
            hit = self._load(key)
            if hit is None:
                self._misses += 1
                todo[key] = image
            else:
                self._hits += 1
                found[key] = hit[0]
        pending = list(todo.items())
        for start in range(0, len(pending), batch_size):
            chunk = pending[start : start + batch_size]
            batch = [image for _, image in chunk]
            out = encode(batch)
            if not isinstance(out, torch.Tensor) or out.ndim != 4 or out.shape[0] != len(batch):
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise MedfmError(
                    f"encode must return a tensor (B, C, h, w) with B = {len(batch)}, got {shape}"
                )
            out = out.detach().to("cpu", torch.float32)
            for (key, image), emb in zip(chunk, out, strict=True):
                size = None if input_size is None else input_size(tuple(image.shape[:2]))
                self.put(image, emb, input_size=size)
                found[key] = emb.numpy().astype(np.float16)
        return found

    # ------------------------------------------------------------------ bookkeeping

    def stats(self) -> CacheStats:
        return CacheStats(hits=self._hits, misses=self._misses, writes=self._writes)
