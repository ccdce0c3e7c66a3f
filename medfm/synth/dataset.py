"""Write a synthetic nnU-Net v2 raw dataset: deterministic, shardable, resumable.

Layout: ``imagesTr/case_00000_0000.png`` (2D) or ``.nii.gz`` (3D), ``labelsTr/case_00000.*``,
``dataset.json``, ``manifest.jsonl`` (one line per case: index, seed, modality and every drawn
parameter), and ``synth_run.json`` (the arguments that define the content, checked on resume).

Case i of a run depends only on (seed, i): its modality is ``modalities[i % len(modalities)]``,
its parameters come from `sample_case`, its noise from its own generator. A case is complete
once its label file exists (written last, atomically), so a killed run resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from medfm.devices import parse_device
from medfm.errors import MedfmError
from medfm.io import (
    LOCK_NAME,
    DatasetJson,
    RunLock,
    Volume,
    atomic_write_text,
    case_complete,
    check_writable,
    remove_temp_files,
    write_case,
    write_dataset_json,
)
from medfm.io.memory import available_memory, check_memory, format_bytes
from medfm.synth.case import (
    MODALITIES,
    CaseParams,
    SynthConfig,
    render_cases,
    sample_case,
    to_output,
)
from medfm.synth.manifest import write_manifest
from medfm.synth.preview import write_preview
from medfm.workers import WorkerPool

FORMAT_VERSION = 1
RUN_FILE = "synth_run.json"
MIN_SIZE = 32
# Anatomy knobs added after datasets were made, with the value that draws what the generator
# drew before each existed: a synth_run.json without one was made with that value.
ADDED_KNOBS = {"p_large": 0.0, "p_split": 0.0}


class RunSpec(BaseModel):
    """The arguments that define a dataset's content (device type included: CPU and CUDA
    random streams differ). Batch size, workers and shard do not change any file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: int = FORMAT_VERSION
    modalities: tuple[Literal["ct", "mri", "us"], ...]
    dim: Literal[2, 3]
    n: int
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    seed: int
    device_type: Literal["cpu", "cuda"]
    config: SynthConfig = SynthConfig()

    @property
    def file_ending(self) -> str:
        return ".png" if self.dim == 2 else ".nii.gz"

    def case_id(self, index: int) -> str:
        return f"case_{index:05d}"

    @classmethod
    def read(cls, text: str) -> RunSpec:
        """A ``synth_run.json`` as written by any version: anatomy knobs it lacks (made before
        they existed) are read as ``ADDED_KNOBS``, the values that gave its cases."""
        raw = json.loads(text)
        config = raw.get("config") if isinstance(raw, dict) else None
        anatomy = config.get("anatomy") if isinstance(config, dict) else None
        if isinstance(anatomy, dict):
            for knob, value in ADDED_KNOBS.items():
                anatomy.setdefault(knob, value)
        return cls.model_validate(raw)

    def modality(self, index: int) -> str:
        return self.modalities[index % len(self.modalities)]

    def sample(self, index: int) -> CaseParams:
        return sample_case(self.config, self.modality(index), self.shape, self.seed, index)


def parse_modalities(text: str | Sequence[str]) -> tuple[str, ...]:
    items = text.split(",") if isinstance(text, str) else list(text)
    mods = tuple(m.strip().lower() for m in items if m.strip())
    bad = [m for m in mods if m not in MODALITIES]
    if not mods or bad:
        raise MedfmError(
            f"unknown modality {', '.join(bad) or repr(text)}; choose from {', '.join(MODALITIES)}"
        )
    return mods


def parse_size(text: str | int | Sequence[int] | None, dim: int) -> tuple[int, ...]:
    """'256' -> (256, 256) in 2D or a cube in 3D; '96,128,128' -> that shape."""
    if dim not in (2, 3):
        raise MedfmError(f"--dim must be 2 or 3, got {dim}")
    if text is None:
        text = 256 if dim == 2 else 128
    try:
        if isinstance(text, int):
            vals = [text]
        elif isinstance(text, str):
            vals = [int(v) for v in text.replace("x", ",").split(",")]
        else:
            vals = [int(v) for v in text]
    except ValueError:
        raise MedfmError(f"--size must be N or comma-separated integers, got {text!r}") from None
    if len(vals) == 1:
        vals = vals * dim
    if len(vals) != dim:
        raise MedfmError(f"--size {text!r} has {len(vals)} values; a {dim}D size needs 1 or {dim}")
    if min(vals) < MIN_SIZE:
        raise MedfmError(f"--size {text!r} is too small: every side must be >= {MIN_SIZE}")
    return tuple(vals)  # no fixed upper bound: `fit_batch` checks it against the memory


# Peak bytes per voxel of rendering and writing one case, by modality: ru_maxrss of a fresh
# process minus its warmed-up baseline, for one case of 512^2 and 1024^2 (2D) and 128^3 (3D),
# rounded up (measured 75-80 for CT, 108-117 for MRI and ultrasound, linear in the batch).
BYTES_PER_VOXEL = {"ct": 80, "mri": 120, "us": 120}

BYTES_PER_CASE_RECORD = 128
"""Memory a pending case takes in a run's bookkeeping (its index in the lists of cases to do)."""


def fit_batch(
    shape: tuple[int, ...],
    modalities: Sequence[str],
    batch: int,
    workers: int,
    device: torch.device,
    *,
    explicit: bool = True,
) -> int:
    """The batch to render with: ``batch``, lowered to what fits in the available memory when
    ``workers`` batches of it do not (the batch changes no file; a warning when the user
    chose it, ``explicit``). MedfmError with the estimate when one case per worker does not
    fit; nothing has been written then."""
    per_case = math.prod(shape) * max(BYTES_PER_VOXEL[m] for m in modalities)
    size = "x".join(map(str, shape))
    per_worker = f" per worker ({workers} workers)" if workers > 1 else ""
    check_memory(
        per_case * workers,
        f"rendering one {size} case{per_worker}",
        hint="choose a smaller --size" + (" or fewer --workers" if workers > 1 else ""),
        device=device if device.type == "cuda" else None,
    )
    avail = available_memory(device if device.type == "cuda" else None)
    if avail is None or per_case * batch * workers <= avail:
        return batch
    fits = max(1, avail // (per_case * workers))
    if explicit:
        warnings.warn(
            f"--batch {batch} of {size} cases needs ~{format_bytes(per_case * batch * workers)}, "
            f"{format_bytes(avail)} available: rendering {fits} at a time (no file changes)",
            stacklevel=2,
        )
    return int(fits)


def parse_shard(text: str | tuple[int, int] | None) -> tuple[int, int]:
    """'K/N' -> (K, N) with 0 <= K < N."""
    if text is None:
        return (0, 1)
    if isinstance(text, tuple):
        k, n = text
    else:
        try:
            k, n = (int(v) for v in text.split("/"))
        except ValueError:
            raise MedfmError(f"--shard must look like K/N (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= k < n:
        raise MedfmError(f"--shard {k}/{n} is invalid: need 0 <= K < N")
    return (k, n)


def dataset_json(spec: RunSpec) -> DatasetJson:
    k = spec.config.anatomy.n_labels[1]
    labels = {"background": 0, **{f"structure_{i}": i for i in range(1, k + 1)}}
    channel = "+".join(MODALITIES[m].channel_name for m in spec.modalities)
    return DatasetJson(
        channel_names={"0": channel},
        labels=labels,
        numTraining=spec.n,
        file_ending=spec.file_ending,
        name="medfm_synthetic",
        description=f"medfm SynthFM synthetic {spec.dim}D {'/'.join(spec.modalities)} data",
    )


def write_rendered(
    out: Path, spec: RunSpec, indices: list[int], cases: list[CaseParams], device: torch.device
) -> None:
    """Render ``cases`` as one batch and write them."""
    r = render_cases(cases, device)
    image = to_output(cases, r.image).cpu()
    label = r.label.cpu()
    for j, i in enumerate(indices):
        img = Volume.from_array(image[j], spacing=spec.spacing, has_channel=True)
        lab = Volume.from_array(label[j], spacing=spec.spacing, has_channel=True)
        write_case(out, spec.case_id(i), img, lab, spec.file_ending)


def _batches(spec: RunSpec, indices: list[int], batch: int) -> list[list[int]]:
    """Group pending cases by modality (a batch renders one modality), then chunk."""
    out: list[list[int]] = []
    for m in spec.modalities:
        sel = [i for i in indices if spec.modality(i) == m]
        out += [sel[s : s + batch] for s in range(0, len(sel), batch)]
    return out


def _worker_run(out: str, spec_json: str, indices: list[int], device: str) -> int:
    spec = RunSpec.model_validate_json(spec_json)
    write_rendered(
        Path(out), spec, indices, [spec.sample(i) for i in indices], torch.device(device)
    )
    return len(indices)


@dataclass
class GenerateReport:
    out: Path
    written: int
    skipped: int
    total: int
    preview: Path | None


def generate_dataset(
    out: str | os.PathLike,
    *,
    modalities: str | Sequence[str] = ("ct",),
    dim: int = 2,
    n: int = 8,
    size: str | int | Sequence[int] | None = None,
    seed: int = 0,
    shard: str | tuple[int, int] | None = None,
    device: str = "cpu",
    batch: int | None = None,
    workers: int = 1,
    preview: bool = False,
    spacing: Sequence[float] | None = None,
    config: SynthConfig | None = None,
    progress: Callable[[int], None] | None = None,
) -> GenerateReport:
    """Generate (or resume) a synthetic dataset in ``out``; see the module docstring.

    ``batch`` cases are rendered together (default 16 in 2D, 2 in 3D); neither it nor
    ``workers`` changes any file. ``progress(k)`` is called with the number of cases finished
    after each batch.
    """
    mods = parse_modalities(modalities)
    shape = parse_size(size, dim)
    k, n_shards = parse_shard(shard)
    if n < 1:
        raise MedfmError(f"-n must be >= 1, got {n}")
    # the run's own bookkeeping (its list of pending cases) must fit, before anything is written
    check_memory(
        len(range(k, n, n_shards)) * BYTES_PER_CASE_RECORD,
        f"keeping track of {n} cases",
        hint="give a smaller -n, or split the run with --shard",
    )
    explicit = batch is not None
    if batch is None:
        batch = 16 if dim == 2 else 2
    if batch < 1 or workers < 1:
        raise MedfmError("--batch and --workers must be >= 1")
    dev = parse_device(device)
    batch = fit_batch(shape, mods, min(batch, n), workers, dev, explicit=explicit)
    spacing = tuple(float(s) for s in (spacing or (1.0,) * dim))
    if len(spacing) != dim or min(spacing) <= 0:
        raise MedfmError(f"spacing {spacing} must be {dim} positive values")
    spec = RunSpec(
        modalities=mods,
        dim=dim,
        n=n,
        shape=shape,
        spacing=spacing,
        seed=seed,
        device_type=dev.type,
        config=config or SynthConfig(),
    )
    out = Path(out)
    check_writable(out, "--out")
    if out.exists() and not out.is_dir():
        raise MedfmError(f"--out {out} exists and is not a folder")

    # one writer per folder, or per shard of it: a second run is refused while one runs
    lock_name = LOCK_NAME if n_shards == 1 else f"{LOCK_NAME}-shard-{k}-of-{n_shards}"
    try:
        lock = RunLock(out, name=lock_name).acquire()
    except OSError as e:
        raise MedfmError(f"cannot write to {out}: {e.strerror or e}") from None
    try:
        return _generate(out, spec, k, n_shards, dev, device, batch, workers, preview, progress)
    finally:
        lock.release()


def _generate(
    out: Path,
    spec: RunSpec,
    k: int,
    n_shards: int,
    dev: torch.device,
    device: str,
    batch: int,
    workers: int,
    preview: bool,
    progress: Callable[[int], None] | None,
) -> GenerateReport:
    """`generate_dataset`'s work, with ``out`` locked."""
    n = spec.n
    run_file = out / RUN_FILE
    spec_text = spec.model_dump_json(indent=2)
    if run_file.exists():
        try:
            old = RunSpec.read(run_file.read_text())
        except (ValueError, RecursionError):
            raise MedfmError(f"{run_file} is unreadable; use a new --out") from None
        if old != spec:
            diff = [f for f in RunSpec.model_fields if getattr(old, f) != getattr(spec, f)]
            raise MedfmError(
                f"{out} holds a dataset made with different arguments ({', '.join(diff)}); "
                "rerun with the same arguments to resume, or use a new --out"
            )
    elif any(p.name != ".DS_Store" and not p.name.startswith(LOCK_NAME) for p in out.iterdir()):
        raise MedfmError(
            f"--out {out} is not empty and was not made by medfm synth; use a new folder"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        # a run killed while writing one of these leaves a temporary file: clear it
        for name in (RUN_FILE, "dataset.json", "manifest.jsonl", "preview.png"):
            remove_temp_files(out / name)
        atomic_write_text(run_file, spec_text)
    except OSError as e:
        raise MedfmError(f"cannot write to {out}: {e.strerror or e}") from None
    write_dataset_json(out, dataset_json(spec))

    mine = list(range(k, n, n_shards))
    todo = [i for i in mine if not case_complete(out, spec.case_id(i), spec.file_ending)]
    batches = _batches(spec, todo, batch)
    done = 0
    if workers == 1 or len(batches) <= 1:
        for b in batches:
            write_rendered(out, spec, b, [spec.sample(i) for i in b], dev)
            done += len(b)
            if progress:
                progress(done)
    else:
        # a bounded window of batches in flight: Ctrl-C stops the workers within a moment
        tasks = ((str(out), spec_text, b, device) for b in batches)
        with WorkerPool(workers) as pool:
            for written in pool.imap(_worker_run, tasks):
                done += written
                if progress:
                    progress(done)

    # every shard writes the same manifest, of all n cases (one case's parameters at a time)
    write_manifest(out, ((spec.case_id(i), spec.sample(i)) for i in range(spec.n)), spec.seed)
    prev = None
    if preview:
        prev = write_preview(out, out / "preview.png")
    return GenerateReport(
        out=out, written=len(todo), skipped=len(mine) - len(todo), total=n, preview=prev
    )
