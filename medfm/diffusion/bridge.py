"""The bridge: label maps rendered by a mask ControlNet into an nnU-Net v2 raw dataset that
trains the segmenter (``medfm diffusion make-dataset``).

Case i takes mask i of the masks given (any iterable of `MaskCase`; `FolderMasks` gives a
folder's label maps as they are and as smooth elastic variants, the CLI and recipes add
SynthFM's label maps) and is generated with its own generator, a function of (seed, i): the
same arguments give the same files, whatever the shard or a resume. A case is complete once
its label file is written (last, atomically), so a killed run resumes where it stopped; shards
(``K/N``: cases i with i % N == K) may run at once into one folder.

Layout (``dim`` 3): ``imagesTr/diff_00000_0000.nii.gz`` (MRI in [0, 1], CT in HU) and
``labelsTr/diff_00000.nii.gz`` (the mask), on the mask's grid and affine. ``dim`` 2: the slices
along the last axis that hold a label, ``diff_00000_k012_0000.png`` (uint8, the volume's
0.5 / 99.5 percentiles to 0..255, as ``medfm seg evaluate`` shows a 3D scan) and their labels,
as ``medfm seg train`` reads them. ``manifest.jsonl``: per case its seed, the mask it came
from, the files written and the hashes of the model and the ControlNet; ``diffusion_run.json``:
the arguments, checked on resume.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from medfm.diffusion.conditional import generate
from medfm.diffusion.controlnet import ControlNet
from medfm.diffusion.model import DiffusionModel
from medfm.errors import MedfmError
from medfm.io import (
    LOCK_NAME,
    DatasetJson,
    RunLock,
    Volume,
    atomic_write_text,
    case_complete,
    load_volume,
    remove_temp_files,
    write_case,
    write_dataset_json,
)
from medfm.io.dataset import slice_case_ids, write_slices

__all__ = ["FolderMasks", "MaskCase", "make_dataset"]

RUN_FILE = "diffusion_run.json"
MANIFEST = "manifest.jsonl"


@dataclass(frozen=True)
class MaskCase:
    """One mask to render: ``label`` (1, *S) integer label map, its ``affine`` (4, 4) and
    ``source``, what it came from (kept in the manifest)."""

    label: torch.Tensor
    affine: np.ndarray
    source: str


def _seed(seed: int, index: int) -> int:
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index), 0xD1FF]).generate_state(
        2, dtype=np.uint32
    )
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFFFFFFFFFFFFFF


def _label_files(folder: Path) -> list[Path]:
    if (folder / "labelsTr").is_dir():
        folder = folder / "labelsTr"
    files = sorted(
        p for p in folder.iterdir()
        if p.name.lower().endswith((".nii.gz", ".nii")) and not p.name.startswith(".")
    )  # fmt: skip
    if not files:
        raise MedfmError(f"--masks {folder} holds no NIfTI label maps")
    return files


class FolderMasks(Sequence[MaskCase]):
    """``n`` masks from a folder of label maps (NIfTI, or an nnU-Net set's labelsTr), sorted by
    name: mask i is file i % M, as it is for i < M, else a smooth elastic variant (medfm's warp
    kernels: a displacement of std ``magnitude`` voxels at a coarse grid of ``grid`` nodes per
    axis, nearest-neighbour on the labels) drawn from (seed, i)."""

    def __init__(
        self,
        folder: str | os.PathLike,
        n: int | None = None,
        *,
        seed: int = 0,
        magnitude: float = 2.0,
        grid: int = 4,
    ) -> None:
        self.files = _label_files(Path(folder))
        self.n = len(self.files) if n is None else int(n)
        self.seed, self.magnitude, self.grid = seed, float(magnitude), int(grid)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> MaskCase:  # type: ignore[override]
        if not 0 <= i < self.n:
            raise IndexError(i)
        from medfm.kernels.warp import elastic_displacement, warp_labels

        path = self.files[i % len(self.files)]
        vol = load_volume(path)
        label = vol.data.round().long()
        if i < len(self.files):
            return MaskCase(label, vol.affine, path.name)
        g = torch.Generator().manual_seed(_seed(self.seed, i))
        nd = label.ndim - 1
        coarse = torch.randn((1, nd, *(self.grid,) * nd), generator=g)
        disp = elastic_displacement(coarse, label.shape[1:], self.magnitude)
        warped = warp_labels(label[None], disp)[0]
        return MaskCase(warped, vol.affine, f"{path.name}~elastic{i // len(self.files)}")


class BridgeRun(BaseModel):
    """What defines a make-dataset run's content (``diffusion_run.json``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_sha256: str
    controlnet_sha256: str
    masks: str
    n: int
    dim: int
    seed: int
    steps: int
    region: str | None


@dataclass
class BridgeReport:
    out: Path
    written: int
    skipped: int
    total: int
    slices: int


def _case_files(i: int, label: torch.Tensor, dim: int) -> list[str]:
    """The case ids mask i gives: one volume, or its labelled slices along the last axis."""
    return [f"diff_{i:05d}"] if dim == 3 else slice_case_ids(f"diff_{i:05d}", label)


def make_dataset(
    model: DiffusionModel,
    controlnet: ControlNet,
    masks: Iterable[MaskCase],
    out: str | os.PathLike,
    *,
    n: int,
    masks_name: str = "masks",
    dim: int = 3,
    seed: int = 0,
    shard: tuple[int, int] = (0, 1),
    steps: int = 50,
    region: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BridgeReport:
    """Render the first ``n`` of ``masks`` into ``out`` (see the module docstring);
    ``masks_name``: how the masks were given (checked on resume)."""
    if dim not in (2, 3):
        raise MedfmError(f"--dim must be 2 or 3, got {dim}")
    if n < 1:
        raise MedfmError(f"-n must be 1 or more, got {n}")
    controlnet.check_task("mask")
    controlnet.check_base(model)
    k_shard, n_shards = shard
    cn_sha = controlnet.weights_sha256 or "unsaved"
    run = BridgeRun(
        model_sha256=model.weights_sha256 or "unsaved", controlnet_sha256=cn_sha,
        masks=masks_name, n=n, dim=dim, seed=seed, steps=steps, region=region,
    )  # fmt: skip
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MedfmError(f"--out {out} exists and is not a folder")
    lock_name = LOCK_NAME if n_shards == 1 else f"{LOCK_NAME}-shard-{k_shard}-of-{n_shards}"
    with RunLock(out, name=lock_name):
        _check_run(out, run)
        ending = ".nii.gz" if dim == 3 else ".png"
        labels = controlnet.config.labels
        write_dataset_json(out, DatasetJson(
            channel_names={"0": "MRI" if model.config.modality == "mri" else "CT"},
            labels={"background": 0, **{f"structure_{k}": k for k in range(1, labels + 1)}},
            numTraining=0, file_ending=ending, name="medfm_diffusion",
            description=f"medfm: {masks_name} rendered by a mask ControlNet "
                        f"({controlnet.config.base_name})",
        ))  # fmt: skip
        device = next(model.parameters()).device
        records, written, skipped, slices = [], 0, 0, 0
        mine = len(range(k_shard, n, n_shards))
        for i, case in enumerate(masks):
            if i >= n:
                break
            ids = _case_files(i, case.label, dim)
            record = {"index": i, "seed": _seed(seed, i), "mask": case.source, "cases": ids,
                      "model_sha256": run.model_sha256, "controlnet_sha256": cn_sha}  # fmt: skip
            records.append(record)
            if i % n_shards != k_shard:
                continue
            if ids and all(case_complete(out, c, ending) for c in ids):
                skipped += 1
            elif ids:
                g = torch.Generator().manual_seed(record["seed"])
                mask = case.label[None].float().to(device)
                y = generate(model, controlnet, mask, steps=steps, region=region, generator=g)
                slices += _write(out, ids, y[0].cpu(), case, model, region, dim)
                written += 1
            if progress is not None:
                progress(written + skipped, mine)
        if len(records) < n:
            raise MedfmError(f"--masks gave {len(records)} masks, fewer than -n {n}")
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        remove_temp_files(out / MANIFEST)
        atomic_write_text(out / MANIFEST, text)
        total = sum(len(r["cases"]) for r in records)
        ds = json.loads((out / "dataset.json").read_text())
        ds["numTraining"] = total
        atomic_write_text(out / "dataset.json", json.dumps(ds, indent=2) + "\n")
    return BridgeReport(out, written, skipped, n, slices)


def _check_run(out: Path, run: BridgeRun) -> None:
    path = out / RUN_FILE
    if path.is_file():
        try:
            old = BridgeRun.model_validate_json(path.read_text())
        except ValueError:
            raise MedfmError(f"{path} is unreadable; use a new --out") from None
        if old != run:
            diff = [f for f in BridgeRun.model_fields if getattr(old, f) != getattr(run, f)]
            raise MedfmError(
                f"{out} holds a dataset made with different arguments ({', '.join(diff)}); "
                "rerun with the same arguments to resume, or use a new --out"
            )
        return
    if any(not p.name.startswith(LOCK_NAME) for p in out.iterdir()):
        raise MedfmError(f"--out {out} is not empty and was not made by make-dataset")
    atomic_write_text(path, run.model_dump_json(indent=2) + "\n")


def _write(out: Path, ids: list[str], y: torch.Tensor, case: MaskCase, model, region, dim) -> int:
    """Write the generated volume ``y`` (1, *S, model units) as the case(s) ``ids``."""
    from medfm.diffusion.intensity import intensity_map

    label = case.label.to(torch.uint8)
    if model.config.modality == "ct":
        image = intensity_map(y, "ct", region).inverse(y)
    else:
        image = ((y.float() + 1) / 2).clamp(0, 1)
    if dim == 3:
        write_case(out, ids[0], Volume(image, case.affine), Volume(label, case.affine), ".nii.gz")
        return 0
    return len(write_slices(out, ids[0].rsplit("_k", 1)[0], image, label))
