"""Checks every command makes on its outputs before any work (before a model is loaded or a
file read in full): an output is never one of the inputs (`check_outputs`), an existing report,
mask or model is replaced only when asked (`check_new`, ``--overwrite``), and the place it goes
is a writable folder (`check_writable`), so that nothing fails after the work was done."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from medfm.errors import MedfmError

__all__ = ["check_new", "check_outputs", "check_writable"]

PathLike = str | os.PathLike


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_outputs(
    outputs: Mapping[str, PathLike | None], inputs: Mapping[str, PathLike | None]
) -> None:
    """Refuse, in one line, an output (``{"--out": path}``, None: none) that is, or lies inside,
    one of the inputs (``{"--data": folder, "--image": file}``)."""
    resolved_in = {k: Path(v).resolve() for k, v in inputs.items() if v is not None}
    for name, out in outputs.items():
        if out is None:
            continue
        o = Path(out).resolve()
        for key, inp in resolved_in.items():
            if _inside(o, inp):
                where = "is" if o == inp else "lies inside"
                raise MedfmError(
                    f"{name} {out} {where} the input {key} {inputs[key]}; write it elsewhere"
                )


def check_writable(path: PathLike, what: str) -> None:
    """Refuse, in one line, an output ``path`` (named ``what``, e.g. "--out") that cannot be
    written: the nearest existing folder above it is a file, or is not writable (read-only,
    /proc), or ``path`` is an existing folder that is not writable. A folder is probed by
    creating and removing a hidden file, because permission bits say nothing of read-only mounts
    for root. Folders that do not exist yet are made by the writer."""
    out = Path(path)
    p = out.absolute().parent
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise MedfmError(f"cannot write {what} {out}: {p} is a file, not a folder")
    for folder in [p, out] if out.is_dir() else [p]:
        try:
            fd, probe = tempfile.mkstemp(prefix=".medfm-write-check-", dir=folder)
        except OSError as e:
            why = "" if e.errno == errno.ENOENT else f" ({e.strerror or e})"
            raise MedfmError(
                f"cannot write {what} {out}: {folder} is not writable{why}; choose another place"
            ) from None
        os.close(fd)
        os.unlink(probe)


def check_new(
    path: PathLike | None,
    what: str,
    *,
    overwrite: bool = False,
    folder: bool = False,
    endings: Sequence[str] | None = None,
) -> Path | None:
    """Check an output before any work: a file (``folder=False``, ending in one of ``endings``
    when given, e.g. ``(".png", ".nii.gz")``) or a folder (``folder=True``: a model folder, the
    overlays folder) that, when it exists, is of that kind and is replaced only with
    ``overwrite``; then `check_writable`. ``what`` names the option in messages ("--out").
    Returns ``path`` as a Path (None for None: no such output)."""
    if path is None:
        return None
    out = Path(path)
    if folder and out.exists() and not out.is_dir():
        raise MedfmError(f"{what} {out} is a file; give a folder")
    if not folder and out.is_dir():
        raise MedfmError(f"{what} {out} is a folder; give a file name")
    if endings is not None and not out.name.lower().endswith(tuple(e.lower() for e in endings)):
        raise MedfmError(f"{what} {out} must end in {_or(endings)}; rename the output")
    if out.exists() and not overwrite and not (folder and not any(out.iterdir())):
        kind = "folder" if folder else "file"
        raise MedfmError(
            f"{what} {out} exists; pass --overwrite to replace it, or give a new {kind}"
        )
    check_writable(out, what)
    return out


def _or(endings: Sequence[str]) -> str:
    endings = list(endings)
    return endings[0] if len(endings) == 1 else f"{', '.join(endings[:-1])} or {endings[-1]}"
