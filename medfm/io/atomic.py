"""Atomic file writes: write a temporary file beside the target, then rename it over the target.

A run killed mid-write leaves either the old target or the new one, never half a file; at most a
hidden temporary file ``.NAME.tmp-PID-RANDOM.ENDING`` stays behind, which ``remove_temp_files``
clears (``medfm.io.nnunet.write_case`` does so before it rewrites a case). The temporary name
keeps the target's file ending (``.nii.gz``, ``.png``) because nibabel and PIL choose the format
from it. Renames are atomic on POSIX and Windows within one filesystem; no fsync is done, so a
power cut (as opposed to a killed process) may still lose recent writes.

`atomic_folder` does the same for a folder of files that belong together (a model folder's
config.json and weights): it is written beside the target and swapped in whole.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "atomic_folder",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "remove_temp_files",
]

# Compression suffixes that belong to a double ending such as ".nii.gz" or ".tar.gz".
_COMPRESSION = {".gz", ".bz2", ".xz", ".zst", ".lz4"}


def _split_ending(name: str) -> tuple[str, str]:
    """``"x.nii.gz" -> ("x", ".nii.gz")``, ``"a.b.png" -> ("a.b", ".png")``."""
    suffixes = Path(name).suffixes
    if not suffixes:
        return name, ""
    n = 2 if len(suffixes) >= 2 and suffixes[-1].lower() in _COMPRESSION else 1
    ending = "".join(suffixes[-n:])
    stem = name[: -len(ending)]
    if not stem:  # a name like ".gz" or ".bashrc": no ending to keep
        return name, ""
    return stem, ending


def _temp_prefix(target: Path) -> tuple[str, str]:
    stem, ending = _split_ending(target.name)
    return f".{stem}.tmp-", ending


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    The parent folder is created. On an exception (any, KeyboardInterrupt included) the temporary
    file is removed, the target is left as it was, and the exception propagates.

    Example::

        with atomic_path("out/case.nii.gz") as tmp:   # tmp = out/.case.tmp-123-9f2c.nii.gz
            nib.save(img, tmp)
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix, ending = _temp_prefix(target)
    tmp = target.with_name(f"{prefix}{os.getpid()}-{secrets.token_hex(4)}{ending}")
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty temporary folder beside ``path``; on success it replaces ``path``.

    An existing ``path`` (e.g. a model folder given with ``--overwrite``) stays as it was until
    the new folder is complete: it is then renamed to a hidden ``.NAME.old-PID-RANDOM``, the new
    one renamed into its place, and the old one deleted. A kill between those two renames leaves
    the old folder under that hidden name, never half of either. On an exception the temporary
    folder is removed and ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = target.with_name(f".{target.name}.tmp-{token}")
    tmp.mkdir()
    old = target.with_name(f".{target.name}.old-{token}")
    moved = False
    try:
        yield tmp
        if target.exists():
            os.replace(target, old)
            moved = True
        os.replace(tmp, target)
    except BaseException:
        if moved and not target.exists():
            os.replace(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if moved:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (parent folders are created)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (parent folders are created)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def remove_temp_files(path: str | os.PathLike) -> list[Path]:
    """Remove temporary files that an interrupted ``atomic_path(path)`` left beside ``path``.

    Only files named like this target's temporaries are touched. Call it only when no other
    process is writing the same target. Returns the removed paths.
    """
    target = Path(path)
    if not target.parent.is_dir():
        return []
    prefix, ending = _temp_prefix(target)
    removed = []
    for entry in target.parent.iterdir():
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(ending)):
            continue
        middle = name[len(prefix) : len(name) - len(ending)]  # "PID-HEX"
        pid, _, token = middle.partition("-")
        if pid.isdigit() and len(token) == 8 and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
