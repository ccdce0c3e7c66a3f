"""Recipes: a YAML file of steps (synthetic data, training, weight averaging, calibration,
evaluation), validated by pydantic and run in order by ``medfm run RECIPE``. Every step resumes:
running a recipe again after a kill continues where it stopped. Relative paths are relative to
the working directory.

A step is a mapping with one key, its kind. The kinds are a registry (`STEP_KINDS`, filled by
`register_step`): each has the pydantic model of its arguments, the function that runs it and
the check of its outputs (`medfm.io.check_outputs`, writable places), which `run_recipe` makes
for every step before the first one runs, so a model family adds its steps without touching
`run_recipe`. A step replaces its own earlier output only when its inputs changed (a report, an
average), atomically.

    name: medfm-tiny
    steps:
      - synth: {out: runs/tiny/synth, modalities: [ct, mri, us], dim: 2, n: 6000, size: 256}
      - train: {model: medfm-tiny, data: [runs/tiny/synth], out: runs/tiny/train, steps: 20000}
      - evaluate: {model: runs/tiny/train/model, data: data/us_hc18, prompt: point,
                   out: runs/tiny/eval_us_hc18_point.json}
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    SerializeAsAny,
    ValidationError,
    create_model,
)

from medfm import __version__
from medfm.diffusion.control_train import ControlNetTrainConfig
from medfm.diffusion.train import DiffusionTrainConfig
from medfm.errors import MedfmError, validation_message
from medfm.io import (
    atomic_folder,
    check_new,
    check_outputs,
    check_writable,
    read_dataset_json,
    write_dataset_json,
)
from medfm.seg.models import (
    BUNDLED_DIR,
    CONFIG_NAME,
    WEIGHTS_NAME,
    model_folder,
    read_config,
    run_model_dir,
)
from medfm.seg.train import TrainConfig
from medfm.synth.case import SynthConfig


class SynthArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    out: str
    modalities: tuple[Literal["ct", "mri", "us"], ...] = ("ct", "mri", "us")
    dim: Literal[2, 3] = 2
    n: int = Field(1000, ge=1)
    size: int | tuple[int, ...] = 256
    seed: int = 0
    device: str = "cpu"
    batch: int | None = None
    workers: int = Field(1, ge=1)
    preview: bool = True
    config: SynthConfig = SynthConfig()


class MonaiShapesArgs(BaseModel):
    """MONAI's create_test_image_2d discs as a dataset (the physics ablation)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    out: str
    n: int = Field(1000, ge=1)
    size: int = Field(256, ge=32)
    seed: int = 0


class EvaluateArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = "medfm-tiny"
    checkpoint: str | None = None
    data: str
    prompt: Literal["box", "point", "box3d"] = "box"
    out: str
    overlays: str | None = None
    device: str = "cpu"
    mirror: bool = Field(False, description="test-time mirroring (medfm seg evaluate --mirror)")
    mask_threshold: float | None = Field(
        None, description="the masks' logit threshold instead of the model's (--mask-threshold)"
    )
    box_crop: bool | None = Field(
        None, description="box masks kept inside their box, or not, instead of the model's"
    )
    skip_missing: bool = Field(True, description="skip (with a message) when data is absent")


class CalibrateArgs(BaseModel):
    """`medfm.seg.calibrate.calibrate`'s arguments: the mask thresholds of a trained model,
    chosen on held-out synthetic sets and written into its config.json."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    data: tuple[str, ...] = Field(min_length=1)
    prompts: tuple[Literal["box", "point"], ...] = Field(("box", "point"), min_length=1)
    grid: tuple[float, ...] | None = Field(None, min_length=1)
    device: str = "cpu"
    box_crop: tuple[bool, ...] = Field(
        (False, True), min_length=1, description="box crop settings tried for box prompts"
    )


class AverageArgs(BaseModel):
    """`medfm.seg.average.average_models`'s arguments: the weight average of models."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: tuple[str, ...] = Field(min_length=2)
    out: str


class VolumeSource(BaseModel):
    """Some volumes of one folder (nnU-Net raw or NIfTI files, sorted by name): those whose
    file name matches ``include`` (globs; None: all), of those the ``last`` N, of those the
    ``first`` N."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: str
    include: tuple[str, ...] | None = None
    first: int | None = Field(None, ge=1)
    last: int | None = Field(None, ge=1)
    prefix: str = Field("", pattern=r"^[A-Za-z0-9_.-]*$")


class VolumesArgs(BaseModel):
    """A training folder made of links to chosen volumes of other folders (a split that holds
    cases back, or several sets as one source), each named ``prefix`` + its file name.
    ``labels``: the sources are nnU-Net raw sets and the folder is one too (imagesTr and
    labelsTr links, the first source's dataset.json with the new case count)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    out: str
    sources: tuple[VolumeSource, ...] = Field(min_length=1)
    labels: bool = False


class MakeDatasetArgs(BaseModel):
    """``medfm diffusion make-dataset``'s arguments: ``masks`` a folder of label maps or
    ``synth:N``, ``n`` cases (None: one per mask), ``size`` the synth masks' size (None: the
    model's patch)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    out: str
    masks: str
    controlnet: str
    model: str | None = None
    dim: Literal[2, 3] = 3
    n: int | None = Field(None, ge=1)
    size: tuple[int, int, int] | None = None
    steps: int = Field(50, ge=1)
    region: str | None = None
    seed: int = 0
    device: str = "cpu"


class SlicesArgs(BaseModel):
    """A 3D nnU-Net set's labelled slices (along the last axis) as a 2D PNG set, as
    ``medfm seg train`` reads them (the volume's 0.5 / 99.5 percentiles to 0..255)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: str
    out: str


# ------------------------------------------------------------------ the step registry


Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class StepContext:
    """What a step's runner gets beside its arguments: its place in the recipe, the log and
    ``progress(done, total)``, the step's own progress (cases, steps), or None."""

    index: int
    total: int
    log: Callable[[str], None]
    progress: Progress | None = None

    def header(self, text: str) -> None:
        """The step's first line: ``[i/n] text``."""
        self.log(f"[{self.index}/{self.total}] {text}")

    def note(self, text: str) -> None:
        """A line about the step, indented under its header."""
        self.log(f"    {text}")


@dataclass(frozen=True)
class StepKind:
    """A kind of recipe step: the model of its arguments, the model of the step (a mapping
    ``{kind: args}``), ``run(args, context)`` and ``check(args)``, which refuses outputs that
    are inputs or cannot be written before any step runs (None: nothing to check)."""

    args: type[BaseModel]
    step: type[BaseModel]
    run: Callable[[Any, StepContext], None]
    check: Callable[[Any], None] | None = None


STEP_KINDS: dict[str, StepKind] = {}
"""kind -> StepKind, in the order the kinds were registered."""


def register_step(
    kind: str,
    args: type[BaseModel],
    run: Callable[[Any, StepContext], None],
    check: Callable[[Any], None] | None = None,
) -> type[BaseModel]:
    """Add the step kind ``kind`` (arguments validated by ``args``, run by ``run(args,
    context)``, outputs checked by ``check(args)``) and return its step model, whose one field
    ``kind`` holds the arguments."""
    if kind in STEP_KINDS:
        raise ValueError(f"recipe step kind {kind!r} is registered already")
    name = "".join(part.title() for part in kind.split("_")) + "Step"
    step = create_model(
        name,
        __config__=ConfigDict(extra="forbid", frozen=True),
        __doc__=f"A recipe step ``{kind}: {{...}}`` holding `{args.__name__}`.",
        __module__=__name__,
        **{kind: (args, ...)},
    )
    STEP_KINDS[kind] = StepKind(args=args, step=step, run=run, check=check)
    return step


def step_kind(step: BaseModel) -> str:
    """The kind of a validated step (the name of its one field)."""
    return next(iter(type(step).model_fields))


def _validate_step(value: Any) -> BaseModel:
    """A step is a mapping with one key naming its kind: validate it by that kind's model."""
    if isinstance(value, BaseModel) and any(type(value) is k.step for k in STEP_KINDS.values()):
        return value
    kind = next(iter(value), None) if isinstance(value, dict) else None
    if kind not in STEP_KINDS:
        raise ValueError(
            f"a step is one of {', '.join(STEP_KINDS)} with its arguments, got {value!r}"
        )
    return STEP_KINDS[kind].step.model_validate(value)


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    steps: list[Annotated[SerializeAsAny[BaseModel], PlainValidator(_validate_step)]]


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise MedfmError(f"recipe {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise MedfmError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise MedfmError(f"recipe {path} is nested too deeply to be a recipe") from None
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise MedfmError(f"recipe {path}: {validation_message(e)}") from None


# ------------------------------------------------------------------ steps already done

FINGERPRINT_KEY = "inputs_sha256"
"""Where an evaluate step's report and a calibrate step's ``calibration`` record keep the
sha256 of what made them (`_fingerprint`): a recipe run again skips a step whose output holds
the fingerprint of its inputs as they are now."""

_CALIBRATION_KEYS = ("mask_thresholds", "box_crop", "calibration")  # what calibrate writes


def _fingerprint(args: BaseModel, files: list[Path], configs: list[Path], data: list[Path]) -> str:
    """sha256 of a step's arguments, medfm's version, the contents of ``files``, the
    ``configs`` (model config.json files, less what calibration writes into them) and the
    names and contents of the files under each ``data`` folder (contents, not times, so that a
    dataset made again the same way, or copied, is the same)."""
    h = hashlib.sha256(f"{__version__}\n{args.model_dump_json()}\n".encode())

    def add_file(path: Path, name: str) -> None:
        h.update(f"file {name}\n".encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)

    for path in files:
        add_file(path, path.name)
    for path in configs:
        config = json.loads(path.read_text())
        kept = {k: v for k, v in config.items() if k not in _CALIBRATION_KEYS}
        h.update(f"config {json.dumps(kept, sort_keys=True)}\n".encode())
    for root in data:
        read_dataset_json(root)  # a dataset folder, checked before anything under it is read
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            add_file(path, path.relative_to(root).as_posix())
    return h.hexdigest()


def _model_files(model: str, checkpoint: str | None) -> list[Path]:
    """The weight and config.json files that ``model`` (a name, a model folder or a training
    run's folder) and ``checkpoint`` stand for."""
    files: list[Path] = []
    for given in (model, checkpoint):
        if given is None:
            continue
        path = Path(given)
        if given == "medfm-tiny" and not path.exists():
            path = BUNDLED_DIR
        if path.is_file():
            files.append(path)
            path = path.parent  # a model folder's model.safetensors brings its config.json
        elif path.is_dir():
            path = run_model_dir(path)
            files += [w for w in [path / WEIGHTS_NAME] if w.is_file()]
        files += [c for c in [path / CONFIG_NAME] if c.is_file()]
    return files


def _evaluated(a: EvaluateArgs) -> tuple[str, bool]:
    """(the fingerprint of an evaluate step's inputs, whether ``a.out`` is a report made from
    them, with its overlays there). The whole config.json counts: its thresholds and box crop
    make the masks."""
    fingerprint = _fingerprint(a, _model_files(a.model, a.checkpoint), [], [Path(a.data)])
    try:
        report = json.loads(Path(a.out).read_text())
    except (OSError, ValueError):
        return fingerprint, False
    if a.overlays is not None and not Path(a.overlays).is_dir():
        return fingerprint, False
    return fingerprint, isinstance(report, dict) and report.get(FINGERPRINT_KEY) == fingerprint


def _calibrated(a: CalibrateArgs) -> tuple[str, bool]:
    """(the fingerprint of a calibrate step's inputs, whether the model's config.json holds a
    calibration made from them, with the thresholds (and box crop) it chose still in place)."""
    folder = model_folder(a.model, purpose="calibration writes into its config.json")
    config_file = folder / CONFIG_NAME
    fingerprint = _fingerprint(a, [folder / WEIGHTS_NAME], [config_file], [Path(d) for d in a.data])
    config = read_config(folder)
    record = config.get("calibration")
    if not isinstance(record, dict) or record.get(FINGERPRINT_KEY) != fingerprint:
        return fingerprint, False
    thresholds = config.get("mask_thresholds") or {}
    chosen = record.get("prompts") or {}
    return fingerprint, all(
        thresholds.get(p) == entry.get("threshold")
        and (p != "box" or config.get("box_crop") == entry.get("box_crop"))
        for p, entry in chosen.items()
    )


# ------------------------------------------------------------------ running


def run_recipe(
    recipe: Recipe,
    *,
    log: Callable[[str], None] = print,
    progress: Callable[[int, int], Progress | None] | None = None,
) -> None:
    """Check every step's outputs (`StepKind.check`), then run every step in order (each one
    resumes where a previous run stopped; a calibrate or evaluate step whose output was made
    from the same inputs, `_fingerprint`, is skipped). ``progress(i, n)`` is called as step i
    of n starts (and ``(n, n)`` at the end) and returns that step's own ``progress(done,
    total)`` callback, or None."""
    total = len(recipe.steps)
    for step in recipe.steps:
        kind = step_kind(step)
        if STEP_KINDS[kind].check is not None:
            STEP_KINDS[kind].check(getattr(step, kind))
    for i, step in enumerate(recipe.steps, 1):
        kind = step_kind(step)
        own = progress(i - 1, total) if progress is not None else None
        STEP_KINDS[kind].run(getattr(step, kind), StepContext(i, total, log, own))
    if progress is not None:
        progress(total, total)


def _check_folder(out: str, what: str = "out") -> None:
    """A step's output folder: not a file, in a writable place."""
    if Path(out).exists() and not Path(out).is_dir():
        raise MedfmError(f"{what} {out} is a file; give a folder")
    check_writable(out, what)


def _check_synth(a: SynthArgs | MonaiShapesArgs) -> None:
    _check_folder(a.out)


def _check_train(cfg: TrainConfig | DiffusionTrainConfig) -> None:
    """A training step (seg or diffusion): its run folder is none of its data folders (a
    ``synth:`` source is made on the fly) and can be written."""
    for d in cfg.data:
        if not d.startswith("synth:"):
            check_outputs({"out": cfg.out}, {"data": d})
    _check_folder(cfg.out)


def _check_average(a: AverageArgs) -> None:
    for m in a.models:
        check_outputs({"out": a.out}, {"models": m})
    _check_folder(a.out)


def _check_evaluate(a: EvaluateArgs) -> None:
    inputs = {"data": a.data, "checkpoint": a.checkpoint}
    if Path(a.model).exists():
        inputs["model"] = a.model
    check_outputs({"out": a.out, "overlays": a.overlays}, inputs)
    # the report and overlays are the step's own: replaced (atomically) when its inputs change
    check_new(a.out, "out", overwrite=True, endings=(".json",))
    check_new(a.overlays, "overlays", overwrite=True, folder=True)


def _run_synth(a: SynthArgs, ctx: StepContext) -> None:
    from medfm.synth.dataset import generate_dataset

    ctx.header(f"synth -> {a.out}")
    size = a.size if isinstance(a.size, int) else ",".join(map(str, a.size))
    tick = ctx.progress
    rep = generate_dataset(
        a.out, modalities=a.modalities, dim=a.dim, n=a.n, size=size, seed=a.seed,
        device=a.device, batch=a.batch, workers=a.workers, preview=a.preview, config=a.config,
        progress=None if tick is None else lambda done: tick(done, a.n),
    )  # fmt: skip
    ctx.note(f"{rep.written} cases written, {rep.skipped} already there")


def _run_monai_shapes(a: MonaiShapesArgs, ctx: StepContext) -> None:
    from medfm.synth.monai_shapes import generate_monai_shapes

    ctx.header(f"monai_shapes -> {a.out}")
    written = generate_monai_shapes(a.out, n=a.n, size=a.size, seed=a.seed)
    ctx.note(f"{written} cases written")


def _training(cfg: Any, ctx: StepContext, what: str, train: Callable[..., Path]) -> None:
    """A training step: resumed when its run folder holds a run, its progress in steps."""
    ctx.header(f"{what} -> {cfg.out}")
    resume = (Path(cfg.out) / "train_config.json").exists()
    tick = ctx.progress
    final = train(
        resume=resume, log=ctx.note,
        progress=None if tick is None else lambda step, metrics: tick(step, cfg.steps),
    )  # fmt: skip
    ctx.note(f"model in {final}")


def _run_train(cfg: TrainConfig, ctx: StepContext) -> None:
    from medfm.seg.train import train

    _training(cfg, ctx, f"train {cfg.model}", lambda **kw: train(cfg, **kw))


def _run_average(a: AverageArgs, ctx: StepContext) -> None:
    from medfm.seg.average import average_models

    ctx.header(f"average {', '.join(a.models)} -> {a.out}")
    out = Path(a.out)
    with atomic_folder(out) as tmp:  # the old average stays whole until the new one is
        if out.is_dir():  # the same average again keeps the folder, calibration and all
            for f in out.iterdir():
                if f.is_file():
                    _link_or_copy(f, tmp / f.name)
        average_models(a.models, tmp)


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (the file is replaced by a rename, never written through it), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _run_calibrate(a: CalibrateArgs, ctx: StepContext) -> None:
    from medfm.seg.calibrate import DEFAULT_GRID, calibrate

    ctx.header(f"calibrate {a.model} on {', '.join(a.data)}")
    fingerprint, done = _calibrated(a)
    if done:
        ctx.note("calibrated from the same model and data already, skipped")
        return
    grid = DEFAULT_GRID if a.grid is None else a.grid
    calibrate(
        a.model, a.data, a.prompts, grid, device=a.device, log=ctx.note, box_crop=a.box_crop,
        fingerprint=fingerprint, progress=ctx.progress,
    )  # fmt: skip


def _run_evaluate(a: EvaluateArgs, ctx: StepContext) -> None:
    from medfm.seg.evaluate import check_overlays, evaluate, load_predictor, write_report

    if not Path(a.data).is_dir():
        if a.skip_missing:
            ctx.header(f"evaluate: {a.data} is absent, skipped")
            return
        raise MedfmError(f"evaluation data {a.data} not found")
    ctx.header(f"evaluate {a.model} on {a.data} ({a.prompt})")
    fingerprint, done = _evaluated(a)
    if done:
        ctx.note(f"{a.out} was made from the same model and data, skipped")
        return
    check_overlays(a.overlays)
    predictor = load_predictor(
        a.model, a.checkpoint, device=a.device, mirror=a.mirror,
        mask_threshold=a.mask_threshold, box_crop=a.box_crop,
    )  # fmt: skip
    report = evaluate(
        predictor, a.data, a.prompt, overlays=Path(a.overlays) if a.overlays else None,
        progress=ctx.progress,
    )  # fmt: skip
    write_report({**report, FINGERPRINT_KEY: fingerprint}, a.out)
    ctx.note(f"mean Dice {report['mean_dice']:.3f}, NSD {report['mean_nsd']:.3f} -> {a.out}")


def _chosen_volumes(a: VolumesArgs) -> dict[str, Path]:
    """{link name: the volume it points to} for a volumes step."""
    from fnmatch import fnmatch

    from medfm.diffusion.data import list_volume_files

    chosen: dict[str, Path] = {}
    for src in a.sources:
        files = list_volume_files(src.data)
        if src.include is not None:
            files = [f for f in files if any(fnmatch(f.name, g) for g in src.include)]
        if src.last is not None:
            files = files[-src.last :]
        if src.first is not None:
            files = files[: src.first]
        if not files:
            raise MedfmError(f"volumes: nothing of {src.data} is chosen; check include/first/last")
        for f in files:
            name = src.prefix + f.name
            if name in chosen:
                raise MedfmError(f"volumes: two volumes would be named {name}; give a prefix")
            chosen[name] = f.resolve()
    return chosen


def _check_volumes(a: VolumesArgs) -> None:
    for src in a.sources:
        check_outputs({"out": a.out}, {"data": src.data})
    _check_folder(a.out)


def _labelled_links(a: VolumesArgs, chosen: dict[str, Path]) -> dict[str, Path]:
    """{relative link path: target} of a ``labels`` volumes step: each chosen image of an
    nnU-Net set under imagesTr/ and its label under labelsTr/."""
    from medfm.diffusion.data import _case_name

    links: dict[str, Path] = {}
    for name, image in chosen.items():
        if image.parent.name != "imagesTr":
            raise MedfmError(f"volumes: labels needs nnU-Net raw sources; {image} is not one")
        ending = image.name[len(_case_name(image)) + len("_0000") :]
        label = image.parent.parent / "labelsTr" / f"{_case_name(image)}{ending}"
        if not label.is_file():
            raise MedfmError(f"volumes: {image} has no label {label}")
        links[f"imagesTr/{name}"] = image
        links[f"labelsTr/{name[: -len(ending)][: -len('_0000')]}{ending}"] = label.resolve()
    return links


def _run_volumes(a: VolumesArgs, ctx: StepContext) -> None:
    ctx.header(f"volumes -> {a.out}")
    chosen = _chosen_volumes(a)
    out = Path(a.out)
    links = _labelled_links(a, chosen) if a.labels else chosen
    if out.is_dir():
        present = {str(p.relative_to(out)): p.resolve() for p in out.rglob("*") if p.is_symlink()}
        if present == links:
            ctx.note(f"{a.out} holds the same {len(chosen)} volumes already, skipped")
            return
    with atomic_folder(out) as tmp:
        for name, target in links.items():
            (tmp / name).parent.mkdir(exist_ok=True)
            (tmp / name).symlink_to(target)
        if a.labels:
            meta = read_dataset_json(a.sources[0].data)
            write_dataset_json(tmp, meta.model_copy(update={"numTraining": len(chosen)}))
    ctx.note(f"{len(chosen)} volumes linked" + (" with their labels" if a.labels else ""))


def _run_diffusion_train(cfg: DiffusionTrainConfig, ctx: StepContext) -> None:
    from medfm.diffusion.train import train

    _training(cfg, ctx, "diffusion_train", lambda **kw: train(cfg, diffusion_sources(cfg), **kw))


def _run_controlnet_train(cfg, ctx: StepContext) -> None:
    from medfm.diffusion.control_train import controlnet_sources, controlnet_train

    loader = controlnet_sources(cfg)
    _training(cfg, ctx, f"controlnet_train ({cfg.task})",
              lambda **kw: controlnet_train(cfg, loader, **kw))  # fmt: skip


def _check_make_dataset(a: MakeDatasetArgs) -> None:
    inputs = {"controlnet": a.controlnet, "model": a.model}
    if not a.masks.startswith("synth:"):
        inputs["masks"] = a.masks
    check_outputs({"out": a.out}, inputs)
    _check_folder(a.out)


def _run_make_dataset(a: MakeDatasetArgs, ctx: StepContext) -> None:
    from medfm.devices import parse_device
    from medfm.diffusion.bridge import make_dataset
    from medfm.diffusion.files import load_controlnet, load_diffusion_model

    ctx.header(f"make_dataset {a.masks} -> {a.out}")
    model = load_diffusion_model(a.model, device=parse_device(a.device))
    cn = load_controlnet(a.controlnet, model, "mask", required=True)
    shape = a.size or model.config.patch
    masks, n = mask_source(a.masks, n=a.n, labels=cn.config.labels, shape=shape, seed=a.seed)
    rep = make_dataset(
        model, cn, masks, a.out, n=n, masks_name=a.masks, dim=a.dim, seed=a.seed,
        steps=a.steps, region=a.region, progress=ctx.progress,
    )  # fmt: skip
    ctx.note(f"{rep.written} cases written, {rep.skipped} already there")


def _check_slices(a: SlicesArgs) -> None:
    check_outputs({"out": a.out}, {"data": a.data})
    _check_folder(a.out)


def _run_slices(a: SlicesArgs, ctx: StepContext) -> None:
    from medfm.io import iter_dataset, list_cases
    from medfm.io.dataset import write_slices

    ctx.header(f"slices {a.data} -> {a.out}")
    out = Path(a.out)
    meta = read_dataset_json(a.data)
    if (out / "dataset.json").is_file():
        ctx.note(f"{a.out} is complete already, skipped")
        return
    with atomic_folder(out) as tmp:
        n, cases = 0, list_cases(a.data)
        for i, (case, image, label) in enumerate(iter_dataset(a.data)):
            if image.ndim != 3:
                raise MedfmError(f"slices: {a.data} is not a 3D set ({case} is 2D)")
            n += len(write_slices(tmp, case, image.data[:1], label.data.long()))
            if ctx.progress is not None:
                ctx.progress(i + 1, len(cases))
        write_dataset_json(tmp, meta.model_copy(update={
            "numTraining": n, "file_ending": ".png", "channel_names": {"0": "image"}}))  # fmt: skip
    ctx.note(f"{n} labelled slices of {len(cases)} volumes")


SynthStep = register_step("synth", SynthArgs, _run_synth, _check_synth)
MonaiShapesStep = register_step("monai_shapes", MonaiShapesArgs, _run_monai_shapes, _check_synth)
TrainStep = register_step("train", TrainConfig, _run_train, _check_train)
AverageStep = register_step("average", AverageArgs, _run_average, _check_average)
CalibrateStep = register_step("calibrate", CalibrateArgs, _run_calibrate)
EvaluateStep = register_step("evaluate", EvaluateArgs, _run_evaluate, _check_evaluate)
VolumesStep = register_step("volumes", VolumesArgs, _run_volumes, _check_volumes)
DiffusionTrainStep = register_step(
    "diffusion_train", DiffusionTrainConfig, _run_diffusion_train, _check_train
)
ControlNetTrainStep = register_step(
    "controlnet_train", ControlNetTrainConfig, _run_controlnet_train, _check_train
)
MakeDatasetStep = register_step(
    "make_dataset", MakeDatasetArgs, _run_make_dataset, _check_make_dataset
)
SlicesStep = register_step("slices", SlicesArgs, _run_slices, _check_slices)


# ---------------------------------------------------------------------- diffusion data sources


class SynthVolumes(Sequence):
    """Synthetic 3D volumes made on the fly for diffusion training (`medfm.synth`): item i is
    case i of a run with ``seed`` (a function of (seed, i) alone), its modality cycling through
    ``modalities``, mapped to [-1, 1] by that modality's rule (CT: the "other" window). A pool
    of ``pool`` cases, each made once when first drawn and kept (fp16), so that rendering does
    not dominate a training step."""

    def __init__(
        self, modalities: Sequence[str], shape: Sequence[int], seed: int, pool: int = 256
    ) -> None:
        self.modalities, self.shape, self.seed = tuple(modalities), tuple(shape), int(seed)
        self.config = SynthConfig()
        self.pool = int(pool)
        self._made: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.pool

    def __getitem__(self, i: int):
        if not 0 <= i < self.pool:
            raise IndexError(i)
        if i not in self._made:
            self._made[i] = self._make(i)
        return self._made[i]

    def _make(self, i: int):
        import torch

        from medfm.diffusion.data import TrainVolume
        from medfm.diffusion.intensity import intensity_map
        from medfm.synth import render_cases, sample_case, to_output

        modality = self.modalities[i % len(self.modalities)]
        case = sample_case(self.config, modality, self.shape, self.seed, i)
        image = to_output([case], render_cases([case]).image)[0].float()
        scaled = intensity_map(image, modality, None).forward(image, clip=True)
        return TrainVolume(scaled.to(torch.float16), None, f"synth_{modality}_{i}")


class SynthMasks(Sequence):
    """``n`` SynthFM 3D anatomy label maps of ``shape`` (labels 1..``labels`` at most) as
    masks for ``medfm diffusion make-dataset``: item i is case i of a synth run with ``seed``
    (MRI), its label map only. This is where the two seed models meet: SynthFM's shapes,
    rendered as scans by a mask ControlNet."""

    def __init__(self, n: int, shape: Sequence[int], labels: int, seed: int) -> None:
        from medfm.synth.anatomy import AnatomyConfig

        self.n, self.shape, self.seed = int(n), tuple(int(s) for s in shape), int(seed)
        self.config = SynthConfig(anatomy=AnatomyConfig(n_labels=(1, int(labels))))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        import numpy as np

        from medfm.diffusion.bridge import MaskCase
        from medfm.synth import render_cases, sample_case

        case = sample_case(self.config, "mri", self.shape, self.seed, i)
        label = render_cases([case]).label[0].long()
        return MaskCase(label, np.eye(4), f"synth:{self.seed}:{i}")


def mask_source(spec: str, *, n: int | None, labels: int, shape: Sequence[int], seed: int):
    """The masks ``--masks`` names: ``synth:N`` (`SynthMasks` of ``shape``) or a folder of
    label maps (`FolderMasks`: as they are, then elastic variants up to ``n``). Returns (the
    masks, how many cases to make)."""
    from medfm.diffusion.bridge import FolderMasks

    if spec.startswith("synth:"):
        try:
            count = int(spec[len("synth:") :])
        except ValueError:
            raise MedfmError(f"--masks {spec!r}: write synth:N with N a number") from None
        if count < 1:
            raise MedfmError(f"--masks {spec!r}: N must be 1 or more")
        return SynthMasks(count, shape, labels, seed), n or count
    if not Path(spec).is_dir():
        raise MedfmError(f"--masks {spec} is not a folder; give a folder of label maps or synth:N")
    masks = FolderMasks(spec, n, seed=seed)
    return masks, len(masks)


def diffusion_sources(cfg) -> Callable[[], list]:
    """Check a `DiffusionTrainConfig`'s ``data`` now (folders hold volumes, ``synth:`` names
    modalities; nothing is read) and return the function that loads them: each folder a
    source, each ``synth:M1,M2`` one of synthetic volumes twice the patch's size (at most 128)."""
    from medfm.diffusion.data import list_volume_files, load_training_volumes
    from medfm.synth.dataset import parse_modalities

    plans: list[tuple[str, Any]] = []
    for entry in cfg.data:
        if entry.startswith("synth:"):
            mods = parse_modalities(entry[len("synth:") :])
            if "us" in mods:
                raise MedfmError("synth:us is 2D-only for diffusion; use synth:ct,mri")
            plans.append(("synth", mods))
        else:
            list_volume_files(entry)
            plans.append(("folder", entry))
    m = cfg.model
    shape = tuple(min(128, 2 * p) for p in m.patch)

    def load() -> list:
        sources: list = []
        for kind, arg in plans:
            if kind == "synth":
                sources.append(SynthVolumes(arg, shape, cfg.seed))
            else:
                sources.append(load_training_volumes(
                    [arg], modality=m.modality, spacing=m.spacing, region=cfg.region,
                    dims=m.unet.spatial_dims,
                ))  # fmt: skip
        return sources

    return load
