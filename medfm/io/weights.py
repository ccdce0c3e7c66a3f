"""Model weights on disk: reading state dicts safely, and medfm's model folder format.

A medfm model folder holds ``config.json`` (the model's settings, a JSON object) and
``model.safetensors`` (its state dict). medfm writes no pickle here. Foreign checkpoints
(official SAM / MedSAM ``.pth`` files and the like) are read with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.

Every function raises `medfm.errors.MedfmError` with a one-line message for what a user can get
wrong (a missing, truncated or foreign file). Nothing here knows a model family: families check
the keys and shapes of what they read (e.g. `medfm.seg.models.load_sam_checkpoint`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from medfm.errors import MedfmError
from medfm.io.atomic import atomic_path, atomic_write_text

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "few_keys",
    "read_config_json",
    "read_state_dict",
    "save_weights",
    "write_config_json",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

_HINT = "give a PyTorch .pth state dict or a .safetensors file"
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def few_keys(keys: list[str], n: int = 3) -> str:
    """The first ``n`` keys joined by commas, with "and K more" when there are more."""
    shown = ", ".join(keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _unwrap(obj: object, path: Path, hint: str) -> dict[str, torch.Tensor]:
    """A state dict from a loaded checkpoint: plain, or under "model" / "state_dict"; a
    "module." prefix (DistributedDataParallel's) is removed."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise MedfmError(
            f"checkpoint {path} holds no state dict (got {type(obj).__name__}); {hint}"
        )
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise MedfmError(
            f"checkpoint {path} is not a plain state dict: {few_keys(bad)} are not tensors; {hint}"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def read_state_dict(
    path: str | os.PathLike, *, name: str = WEIGHTS_NAME, hint: str = _HINT
) -> dict[str, torch.Tensor]:
    """The tensors (on the CPU) of a ``.safetensors`` file, a PyTorch ``.pth`` file, or a medfm
    model folder (its ``name`` file).

    A ``.pth`` is read with ``torch.load(weights_only=True)``; a state dict nested under
    "model" or "state_dict" and a "module." key prefix are accepted. ``hint`` ends the message
    of a file that holds no state dict (what the caller wants instead).
    """
    path = Path(path)
    if path.is_dir():
        if not (path / name).is_file():
            raise MedfmError(
                f"{path} is a folder without {name}; give a medfm model folder "
                f"({CONFIG_NAME} + {name}) or a checkpoint file"
            )
        path = path / name
    if not path.is_file():
        raise MedfmError(f"checkpoint {path} does not exist; check the path")
    if path.suffix == ".safetensors":
        try:
            state = load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            reason = " ".join(str(e).split())[:160]
            raise MedfmError(
                f"cannot read {path} as a safetensors file ({type(e).__name__}: {reason}); "
                "is the file complete?"
            ) from None
        return _finite(state, path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load fails on a damaged file with many exception types
        found = _UNSUPPORTED_GLOBAL.search(str(e))
        if found:
            raise MedfmError(
                f"checkpoint {path} holds objects other than tensors ({found.group(1)}), which "
                "medfm does not load (torch.load weights_only=True); save its state dict alone"
            ) from None
        reason = " ".join(str(e).split(". ")[0].split())[:160]
        raise MedfmError(
            f"cannot read checkpoint {path} ({type(e).__name__}: {reason}); is the file complete "
            "and a PyTorch checkpoint?"
        ) from None
    return _finite(_unwrap(obj, path, hint), path)


def _finite(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """``state``, refused if a floating-point weight holds NaN or infinite values (a diverged
    run's weights give masks or samples of nothing)."""
    for key, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise MedfmError(
                f"{path}: weight {key} holds NaN or infinite values; these weights are damaged "
                "(a diverged training run?) and are not loaded"
            )
    return state


def save_weights(
    folder: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping,
    *,
    name: str = WEIGHTS_NAME,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``folder/name`` (the tensors, contiguous on the CPU) and ``folder/config.json``
    (``config`` as indented JSON), each atomically. The weights are written first, so a folder
    with a config.json is complete. ``metadata``: safetensors header strings (default
    ``{"format": "pt"}``). Returns the folder."""
    folder = Path(folder)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    with atomic_path(folder / name) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata or {"format": "pt"}))
    write_config_json(folder, config)
    return folder


def write_config_json(folder: str | os.PathLike, config: Mapping) -> Path:
    """Write ``config`` as ``folder/config.json`` (indented JSON, atomically); returns the path."""
    path = Path(folder) / CONFIG_NAME
    atomic_write_text(path, json.dumps(dict(config), indent=2) + "\n")
    return path


def read_config_json(folder: str | os.PathLike) -> dict:
    """The JSON object in ``folder/config.json``; MedfmError when the folder or the file is
    missing, or the file is not a JSON object."""
    folder = Path(folder)
    path = folder / CONFIG_NAME
    if not folder.is_dir():
        raise MedfmError(f"model folder {folder} does not exist; check the path")
    if not path.is_file():
        raise MedfmError(
            f"{folder} has no {CONFIG_NAME}; give a folder written by medfm "
            f"({CONFIG_NAME} + {WEIGHTS_NAME})"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MedfmError(f"{path} is not valid JSON ({e}); is the file complete?") from None
    except RecursionError:
        raise MedfmError(f"{path} is nested too deeply to be a model's config.json") from None
    if not isinstance(config, dict):
        raise MedfmError(f"{path} holds {type(config).__name__}, not a JSON object")
    return config
