"""``manifest.jsonl``: one JSON line per case of a synthetic dataset, holding every parameter
drawn for it, so that any case can be re-rendered (`replay`) without the run that made it.

A line is ``{"case", "index", "run_seed", "seed", "modality", "params"}``, ``params`` being the
case's `CaseParams` as JSON; line i describes case i.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from medfm.errors import MedfmError
from medfm.io import atomic_path
from medfm.synth.case import CaseParams, render_cases, to_output

__all__ = ["MANIFEST_NAME", "manifest_line", "read_manifest", "replay", "write_manifest"]

MANIFEST_NAME = "manifest.jsonl"


def manifest_line(case: str, index: int, run_seed: int, params: CaseParams) -> str:
    """The manifest line (compact JSON, no newline) of case ``index`` named ``case``."""
    return json.dumps(
        {
            "case": case,
            "index": index,
            "run_seed": run_seed,
            "seed": params.seed,
            "modality": params.modality,
            "params": params.model_dump(mode="json"),
        },
        separators=(",", ":"),
    )


def write_manifest(
    folder: str | os.PathLike, cases: Iterable[tuple[str, CaseParams]], run_seed: int
) -> Path:
    """Write ``FOLDER/manifest.jsonl`` atomically: line i is the i-th of ``cases`` = (case id,
    params). Lines are written as they come, so a generator of cases keeps one in memory."""
    path = Path(folder) / MANIFEST_NAME
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for i, (case, p) in enumerate(cases):
            f.write(manifest_line(case, i, run_seed, p) + "\n")
    return path


def read_manifest(folder: str | os.PathLike) -> list[dict]:
    """The manifest lines of the dataset ``folder`` as dicts, in case order."""
    path = Path(folder) / MANIFEST_NAME
    if not path.exists():
        raise MedfmError(f"{path} not found: is {folder} a medfm synthetic dataset?")
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def replay(line: str | dict, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Re-render one manifest line: returns (image as written, label) with no batch axis."""
    rec = json.loads(line) if isinstance(line, str) else line
    params = CaseParams.model_validate(rec["params"])
    r = render_cases([params], device)
    return to_output([params], r.image)[0].cpu(), r.label[0].cpu()
