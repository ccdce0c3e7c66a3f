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
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from medfm.errors import MedfmError
from medfm.io.atomic import atomic_path, atomic_write_text
from medfm.io.memory import check_memory

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "check_shapes",
    "few_keys",
    "file_sha256",
    "read_config_json",
    "read_family_config",
    "read_checked_weights",
    "read_state_dict",
    "safetensors_bytes",
    "safetensors_shapes",
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


# bytes per element of each safetensors dtype name
_ST_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2,
    "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip
_ST_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


def _safetensors_header(path: Path) -> dict[str, dict]:
    """The tensor entries of a .safetensors file's JSON header (name -> dtype, shape,
    data_offsets), read and checked without loading a tensor: a few KB. The header must be a
    JSON object whose entries have a known dtype, a shape of non-negative integers and data
    offsets that match the shape and lie inside the file."""
    size = path.stat().st_size

    def bad(why: str) -> MedfmError:
        return MedfmError(
            f"cannot read {path} as a safetensors file ({why}); is the file complete?"
        )

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad("shorter than its 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > min(_ST_MAX_HEADER, size - 8):
            raise bad(f"a {n}-byte header in a {size}-byte file")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise bad("its header is not JSON") from None
    except RecursionError:
        raise bad("its header is nested too deeply") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    data = size - 8 - n
    entries = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise bad(f"tensor {name} has no description")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _ST_DTYPES:
            raise bad(f"tensor {name} has an unknown dtype {dtype!r}")
        ints = isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
        pair = (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data
        )
        if not ints or not pair:
            raise bad(f"tensor {name} has shape {shape!r} at {offsets!r}")
        if math.prod(shape) * _ST_DTYPES[dtype] != offsets[1] - offsets[0]:
            raise bad(f"tensor {name}'s shape {tuple(shape)} does not match its data")
        entries[name] = entry
    return entries


def safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in a .safetensors file, from its JSON header alone (no tensor read).
    MedfmError names a file whose header is damaged."""
    header = _safetensors_header(Path(path))
    return {name: tuple(entry["shape"]) for name, entry in header.items()}


def safetensors_bytes(path: str | os.PathLike) -> int:
    """The bytes the tensors of a .safetensors file take once loaded, from its header."""
    header = _safetensors_header(Path(path))
    return sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values())


def check_shapes(
    expected: Mapping[str, Sequence[int]],
    path: str | os.PathLike,
    *,
    what: str = "the model",
    hint: str = "the weights are not those of this model",
) -> None:
    """Raise MedfmError unless the .safetensors file ``path`` holds exactly the tensors
    ``expected`` (name -> shape), read from its header before anything is loaded or built. The
    message names the first tensor of another shape (then the first missing or unexpected
    one) and counts the rest: "PATH does not fit WHAT: TENSOR is (768, 3, 16, 16) in the file,
    (16384, 3, 16, 16) expected (and 40 more of other shapes, 520 missing); HINT"."""
    path = Path(path)
    shapes = safetensors_shapes(path)
    want = {k: tuple(int(d) for d in v) for k, v in expected.items()}
    wrong = [k for k in want if k in shapes and shapes[k] != want[k]]
    missing = [k for k in want if k not in shapes]
    unexpected = [k for k in shapes if k not in want]
    if not (wrong or missing or unexpected):
        return
    if wrong:
        k = wrong[0]
        first = f"{k} is {shapes[k]} in the file, {want[k]} expected"
    elif missing:
        first = f"{missing[0]} {want[missing[0]]} is not in the file"
    else:
        first = f"the file's {unexpected[0]} is not expected"
    counts = [
        f"{n} {word}"
        for n, word in (
            (len(wrong) - bool(wrong), "more of other shapes"),
            (len(missing) - (not wrong and bool(missing)), "missing"),
            (len(unexpected) - (not wrong and not missing), "unexpected"),
        )
        if n > 0
    ]
    rest = f" (and {', '.join(counts)})" if counts else ""
    raise MedfmError(f"{path} does not fit {what}: {first}{rest}; {hint}")


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
        check_memory(
            safetensors_bytes(path),
            f"loading the weights {path}",
            hint="load them on a machine with more memory",
        )
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
        obj = _torch_load(path)
    except MedfmError:
        raise
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


def _torch_load(path: Path) -> object:
    """``torch.load(weights_only=True)`` of a .pth, memory-mapped: its tensors stay in the file
    (the page cache) until a model copies them, so a huge or foreign checkpoint costs nothing
    to look at. A file of the legacy (non-zip) format cannot be mapped: it is read whole, after
    checking that its size fits in memory."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e) and "zipfile" not in str(e):
            raise
    check_memory(
        path.stat().st_size,
        f"loading the checkpoint {path}",
        hint="load it on a machine with more memory",
    )
    return torch.load(path, map_location="cpu", weights_only=True)


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


def file_sha256(path: str | os.PathLike, *, chunk: int = 2**20) -> str:
    """The sha256 hex digest of a file's bytes, read in chunks (constant memory)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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


def read_family_config(folder: str | os.PathLike, family: str, model, what: str, hint: str):
    """``folder``'s config.json validated as the pydantic ``model`` of a medfm model
    ``family`` (its ``family`` field); one-line MedfmError otherwise (``what``: the kind of
    folder, ``hint``: what to give instead)."""
    from pydantic import ValidationError

    from medfm.errors import validation_message

    raw = read_config_json(folder)
    path = Path(folder) / CONFIG_NAME
    if raw.get("family") != family:
        raise MedfmError(
            f"{folder} is not a {what} folder ({path} has no family: {family}); {hint}"
        )
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise MedfmError(f"{path}: {validation_message(e)}") from None


def read_checked_weights(folder: str | os.PathLike, build, what: str, hint: str):
    """(the state dict, the sha256 of its file) of ``folder/model.safetensors``, its shapes
    checked first against ``build()`` (the module the weights are for) built on the meta
    device, so nothing is allocated for weights of another architecture. One-line
    MedfmError for a missing file or other shapes (``what`` / ``hint``: `check_shapes`')."""
    import torch

    with torch.device("meta"):
        skeleton = build()
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    weights = Path(folder) / WEIGHTS_NAME
    if not weights.is_file():
        raise MedfmError(f"{weights} is missing; a model folder needs {WEIGHTS_NAME}")
    check_shapes(expected, weights, what=what, hint=hint)
    return read_state_dict(folder), file_sha256(weights)
