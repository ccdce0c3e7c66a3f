"""Checkpoints and the run folder.

A run folder ``OUT`` holds ``train_config.json`` (the settings that identify the run),
``metrics.jsonl`` (one line per step), ``checkpoints/step_NNNNNNN/`` and, once finished, the
final model in ``OUT/model/``. A checkpoint folder has ``config.json``, ``model.safetensors``
(the trained weights), ``optimizer.safetensors`` (the optimizer's tensors; the rest of its
state in ``state.json``), ``ema.safetensors`` when EMA weights are kept, and ``state.json``
written last. It is written as ``step_NNNNNNN.partial`` and renamed when whole, so a killed
run leaves only whole checkpoints; nothing is a pickle.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from medfm.errors import MedfmError
from medfm.io.atomic import atomic_write_text

SETTINGS_NAME = "train_config.json"


def flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state dict -> (tensors for safetensors, the JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    meta_state: dict[str, dict] = {}
    for pid, st in sd["state"].items():
        meta_state[str(pid)] = {}
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"{pid}.{key}"] = val.detach().cpu().contiguous()
            else:
                meta_state[str(pid)][key] = val
    return tensors, {"state": meta_state, "param_groups": sd["param_groups"]}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """`flatten_optimizer`'s inverse."""
    state: dict[int, dict] = {int(pid): dict(rest) for pid, rest in meta["state"].items()}
    for name, val in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = val
    return {"state": state, "param_groups": meta["param_groups"]}


def saved_checkpoints(out: str | os.PathLike) -> list[Path]:
    """OUT/checkpoints/step_NNNNNNN folders written whole (not ``.partial``), oldest first."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step_")
                  and not p.name.endswith(".partial") and (p / "state.json").exists())  # fmt: skip


@dataclass
class Checkpoint:
    """What `read_checkpoint` gives back."""

    path: Path
    step: int
    weights: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    ema: dict[str, torch.Tensor] | None


def write_checkpoint(
    out: str | os.PathLike,
    step: int,
    *,
    weights: dict[str, torch.Tensor],
    optimizer: dict,
    scheduler: dict,
    config: dict,
    ema: dict[str, torch.Tensor] | None = None,
    keep: int = 2,
) -> Path:
    """Write OUT/checkpoints/step_NNNNNNN whole (see the module docstring), then remove all but
    the newest ``keep`` checkpoints."""
    ck = Path(out) / "checkpoints" / f"step_{step:07d}"
    tmp = ck.with_name(ck.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / "model.safetensors"))
    opt_tensors, opt_meta = flatten_optimizer(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    if ema is not None:
        save_file(ema, str(tmp / "ema.safetensors"))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    state = {"step": step, "optimizer": opt_meta, "scheduler": scheduler}
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    shutil.rmtree(ck, ignore_errors=True)
    os.replace(tmp, ck)
    for p in saved_checkpoints(out)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    return ck


def read_checkpoint(ck: str | os.PathLike) -> Checkpoint:
    """One checkpoint folder, as `write_checkpoint` wrote it; a damaged or foreign file is a
    `MedfmError` naming it."""
    ck = Path(ck)
    name = "state.json"
    try:
        state = json.loads((ck / name).read_text())
        step, opt_meta, scheduler = int(state["step"]), state["optimizer"], state["scheduler"]
        name = "optimizer.safetensors"
        optimizer = unflatten_optimizer(load_file(str(ck / name)), opt_meta)
        name = "model.safetensors"
        weights = load_file(str(ck / name))
        name = "ema.safetensors"
        ema = load_file(str(ck / name)) if (ck / name).is_file() else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as e:
        reason = " ".join(str(e).split())[:120]
        raise MedfmError(
            f"{ck / name} is damaged or not medfm's ({type(e).__name__}: {reason})"
        ) from None
    return Checkpoint(ck, step, weights, optimizer, scheduler, ema)


def checkpoint_step(ck: str | os.PathLike) -> int:
    """The step a checkpoint was saved at; -1 when its state.json is damaged."""
    try:
        return int(json.loads((Path(ck) / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def finished_run(out: str | os.PathLike, steps: int) -> Path | None:
    """OUT/model when the run wrote its final model and its last checkpoint is at ``steps`` (a
    finished run: resuming it keeps the model as it is, with whatever was added to its
    config.json since, e.g. calibrated thresholds), else None."""
    final = Path(out) / "model"
    done = saved_checkpoints(out)
    if not (final / "config.json").is_file() or not done:
        return None
    return final if checkpoint_step(done[-1]) >= steps else None


def prepare_run_folder(
    out: str | os.PathLike,
    settings: BaseModel,
    *,
    resume: bool,
    location_fields: tuple[str, ...] = ("out",),
) -> None:
    """Create OUT, or check that an OUT with checkpoints was made with the same settings.

    What identifies a run is its recorded settings, not where its folder is: the fields in
    ``location_fields`` (the run folder's own path) are not compared, so a run resumes from a
    relative or absolute path, or after its folder was moved. A folder whose run never reached
    a checkpoint (a start that failed or was killed early) has nothing to keep and takes the
    new settings.
    """
    out = Path(out)
    saved = out / SETTINGS_NAME
    if saved.exists() and saved_checkpoints(out):
        old = type(settings).model_validate_json(saved.read_text())
        fields = [f for f in type(settings).model_fields if f not in location_fields]
        diff = [f for f in fields if getattr(old, f) != getattr(settings, f)]
        if diff:
            raise MedfmError(
                f"{out} holds a run with other settings ({', '.join(diff)}); use a new --out"
            )
        if not resume:
            raise MedfmError(f"{out} already holds a run; pass --resume to continue it")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, settings.model_dump_json(indent=2))


__all__ = [
    "Checkpoint",
    "SETTINGS_NAME",
    "checkpoint_step",
    "finished_run",
    "flatten_optimizer",
    "prepare_run_folder",
    "read_checkpoint",
    "saved_checkpoints",
    "unflatten_optimizer",
    "write_checkpoint",
]
