"""Outputs never overwrite inputs: the one check every command makes before any work."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from medfm.errors import MedfmError

__all__ = ["check_outputs"]

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
