"""``medfm seg``: SAM segmentation commands. Heavy modules are imported inside the commands."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from medfm.cli._common import (
    BoxCropOption,
    CheckpointOption,
    DeviceOption,
    MirrorOption,
    ModelNameOption,
    OverwriteOption,
    PredictorOption,
    SeedOption,
    ThresholdOption,
    user_errors,
)
from medfm.errors import MedfmError, validation_message

seg_app = typer.Typer(
    help="SAM segmentation: evaluate models and baselines on real data with box / point prompts.",
    no_args_is_help=True,
)


@seg_app.command("evaluate")
@user_errors
def seg_evaluate(
    data: Annotated[Path, typer.Option("--data", help="nnU-Net v2 raw dataset folder.")],
    prompt: Annotated[
        str,
        typer.Option(
            "--prompt",
            help="box or point (per image or slice), or box3d (3D sets: each label's 3D box "
            "propagated from its middle slice, MedSAM's).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Report JSON to write.")],
    model: PredictorOption = "medfm-tiny",
    checkpoint: CheckpointOption = None,
    overlays: Annotated[
        Path | None,
        typer.Option("--overlays", help="Folder for one PNG per case: image, truth, prediction."),
    ] = None,
    device: DeviceOption = "cpu",
    max_cases: Annotated[
        int | None, typer.Option("--max-cases", help="Evaluate the first N cases only.")
    ] = None,
    mirror: MirrorOption = False,
    mask_threshold: ThresholdOption = None,
    box_crop: BoxCropOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Dice and surface Dice of a model, one prompt per label and image (docs/evaluation.md)."""
    from medfm.cli.progress import bar_callback, progress_bar
    from medfm.io import check_new, check_outputs
    from medfm.seg.evaluate import (
        EVAL_PROMPTS,
        check_overlays,
        check_prompt,
        evaluate,
        list_eval_cases,
        load_predictor,
        write_report,
    )

    # Validate everything cheap before loading a model.
    check_prompt(prompt, EVAL_PROMPTS)
    list_eval_cases(data, max_cases)
    check_overlays(overlays)
    model_path = model if Path(model).exists() else None
    check_outputs({"--out": out, "--overlays": overlays}, {"--data": data, "--model": model_path})
    check_new(out, "--out", overwrite=overwrite, endings=(".json",))
    check_new(overlays, "--overlays", overwrite=overwrite, folder=True)
    predictor = load_predictor(
        model, checkpoint, device=device, mirror=mirror, mask_threshold=mask_threshold,
        box_crop=box_crop,
    )  # fmt: skip
    with progress_bar() as bar:
        report = evaluate(
            predictor,
            data,
            prompt,
            overlays=overlays,
            max_cases=max_cases,
            progress=bar_callback(bar, f"evaluating {model} (cases)"),
        )
    write_report(report, out)
    typer.echo(
        f"{report['model']}, {prompt} prompts, {report['n_cases']} cases: "
        f"mean Dice {report['mean_dice']:.4f}, NSD {report['mean_nsd']:.4f} -> {out}"
    )


@seg_app.command("calibrate")
@user_errors
def seg_calibrate(
    model: Annotated[
        Path,
        typer.Argument(help="A medfm model folder or training run; its config.json is updated."),
    ],
    data: Annotated[
        list[Path],
        typer.Option("--data", help="Held-out synthetic nnU-Net v2 folder (repeat for several)."),
    ],
    prompt: Annotated[
        list[str] | None, typer.Option("--prompt", help="box and/or point (default: both).")
    ] = None,
    grid: Annotated[
        str | None,
        typer.Option(help="Logit thresholds to try, comma-separated (default -8..1)."),
    ] = None,
    device: DeviceOption = "cpu",
    no_box_crop: Annotated[
        bool,
        typer.Option(
            "--no-box-crop",
            help="Do not try cropping box-prompted masks to their box (for boxes that may cut "
            "their object).",
        ),
    ] = False,
) -> None:
    """Choose the mask threshold of each prompt kind (and whether box-prompted masks are
    cropped to their box) on synthetic data (never the real sets)."""
    from medfm.cli.progress import bar_callback, progress_bar
    from medfm.seg.calibrate import DEFAULT_GRID, calibrate
    from medfm.seg.segment import parse_numbers

    thresholds = DEFAULT_GRID if grid is None else parse_numbers(grid, "--grid")
    prompts = tuple(prompt) if prompt else ("box", "point")
    crops = (False,) if no_box_crop else (False, True)
    with progress_bar() as bar:
        calibrate(
            model, data, prompts, thresholds, device=device, log=typer.echo, box_crop=crops,
            progress=bar_callback(bar, "calibrating (cases x prompt kinds)"),
        )  # fmt: skip


@seg_app.command("average")
@user_errors
def seg_average(
    models: Annotated[
        list[Path],
        typer.Argument(help="Two or more medfm model folders or training runs, of one model."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model folder to write.")],
    overwrite: OverwriteOption = False,
) -> None:
    """Average the weights of models fine-tuned from one model (a model soup)."""
    from medfm.io import atomic_folder, check_new, check_outputs
    from medfm.seg.average import average_models

    check_outputs({"--out": out}, {f"model {i + 1}": m for i, m in enumerate(models)})
    check_new(out, "--out", overwrite=overwrite, folder=True)
    with atomic_folder(out) as tmp:  # an old model stays whole until the average is
        average_models(models, tmp)
    typer.echo(f"average of {len(models)} models in {out}; calibrate it before use")


@seg_app.command("train")
@user_errors
def seg_train(
    data: Annotated[
        list[Path], typer.Option("--data", help="2D nnU-Net folder(s); repeat to mix sets.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder.")],
    data_weight: Annotated[
        list[float] | None,
        typer.Option(
            "--data-weight",
            help="Each --data set's share of the drawn images (repeat, one per --data; "
            "default: every image equally likely).",
        ),
    ] = None,
    model: ModelNameOption = "medfm-tiny",
    checkpoint: CheckpointOption = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 2000,
    batch: Annotated[int, typer.Option(help="Images per step.")] = 8,
    prompts_per_image: Annotated[int, typer.Option(help="Labels prompted per image.")] = 4,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-4,
    warmup: Annotated[int, typer.Option(help="Linear warm-up steps.")] = 100,
    loss: Annotated[
        str, typer.Option(help="sam (20 focal + Dice + IoU), dice, dice_iou, or dice_ce.")
    ] = "sam",
    grad_clip: Annotated[
        float | None, typer.Option(help="Clip the gradient norm to this value.")
    ] = None,
    train_encoder: Annotated[
        bool, typer.Option("--train-encoder", help="Train the image encoder too (medfm-tiny).")
    ] = False,
    keep_decoder: Annotated[
        bool, typer.Option("--keep-decoder", help="Start from the checkpoint's decoder.")
    ] = False,
    refine_iters: Annotated[int, typer.Option(help="Refinement clicks per prompt.")] = 2,
    multimask: Annotated[
        bool | None,
        typer.Option(
            "--multimask/--no-multimask",
            help="Single clicks train the best of SAM's three outputs (the IoU head picks one "
            "at prediction) or its single output. Default: three, but one with --loss dice.",
        ),
    ] = None,
    lowres_prob: Annotated[
        float,
        typer.Option(help="Share of images shrunk 1.5-6x first (simulated low resolution)."),
    ] = 0.0,
    lowres_labels: Annotated[
        bool,
        typer.Option(
            "--lowres-labels", help="Coarsen the shrunk images' label maps too (blocky masks)."
        ),
    ] = False,
    compile_model: Annotated[
        bool,
        typer.Option(
            "--compile", help="torch.compile the image encoder (for --train-encoder and the cache)."
        ),
    ] = False,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 500,
    cache: Annotated[Path | None, typer.Option(help="Embedding cache folder.")] = None,
    seed: SeedOption = 0,
    device: DeviceOption = "cpu",
    resume: Annotated[bool, typer.Option("--resume", help="Continue a killed run.")] = False,
) -> None:
    """Train SAM's prompt encoder and mask decoder on synthetic data (SynthFM recipe)."""
    from pydantic import ValidationError

    from medfm.devices import parse_device
    from medfm.seg.prompts import PromptConfig
    from medfm.seg.train import TrainConfig, train

    parse_device(device)  # before the run folder is made
    if not resume and (out / "model" / "config.json").is_file():
        raise MedfmError(
            f"--out {out} holds a finished run ({out / 'model'}); pass --resume to keep it, "
            "or give a new --out (delete the folder to train it again)"
        )
    try:
        cfg = TrainConfig(
            model=model, checkpoint=checkpoint, data=tuple(str(d) for d in data), out=str(out),
            steps=steps, batch=batch, prompts_per_image=prompts_per_image, lr=lr, warmup=warmup,
            loss=loss, grad_clip=grad_clip, train_encoder=train_encoder, keep_decoder=keep_decoder,
            checkpoint_every=checkpoint_every, cache=str(cache) if cache else None, seed=seed,
            device=device, compile=compile_model, prompt=PromptConfig(
                refine_iters=refine_iters,
                multimask=(loss != "dice") if multimask is None else multimask,
            ),
            lowres_prob=lowres_prob, lowres_labels=lowres_labels,
            data_weights=tuple(data_weight) if data_weight else None,
        )  # fmt: skip
    except ValidationError as e:
        raise MedfmError(validation_message(e, as_option=True)) from None
    from medfm.cli.progress import progress_bar

    with progress_bar(info=True) as bar:
        task = bar.add_task("training", total=steps, info="")

        def progress(step: int, metrics: dict) -> None:
            bar.update(task, completed=step, info=f"loss {metrics.get('loss', 0):.4f}")

        final = train(cfg, resume=resume, log=lambda m: typer.echo(m, err=True), progress=progress)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 speaks
        typer.echo(f"model saved in {final}")


@seg_app.command("embed")
@user_errors
def seg_embed(
    data: Annotated[list[Path], typer.Option("--data", help="2D nnU-Net folder(s).")],
    cache: Annotated[Path, typer.Option(help="Embedding cache folder.")],
    model: ModelNameOption = "vit_b",
    checkpoint: CheckpointOption = None,
    device: DeviceOption = "cpu",
) -> None:
    """Compute each image's embedding once into the cache (fp16, memory-mapped): what
    medfm seg train --cache then reads instead of encoding."""
    from pydantic import ValidationError

    from medfm.cli.progress import bar_callback, progress_bar
    from medfm.devices import parse_device
    from medfm.io import check_outputs, check_writable
    from medfm.seg.cache import EmbeddingCache
    from medfm.seg.embed import embedding_shape, encode_images, encoder_id
    from medfm.seg.train import TrainConfig, init_model, load_training_data

    dev = parse_device(device)
    for d in data:
        check_outputs({"--cache": cache}, {"--data": d})
    if cache.exists() and not cache.is_dir():
        raise MedfmError(f"--cache {cache} is a file; give a folder for the embeddings")
    check_writable(cache, "--cache")
    try:  # the model and images exactly as training builds them (out: nothing is written there)
        cfg = TrainConfig(
            model=model, checkpoint=checkpoint, data=tuple(str(d) for d in data),
            out=str(cache / ".embed"), cache=str(cache), device=device,
        )  # fmt: skip
    except ValidationError as e:
        raise MedfmError(validation_message(e, as_option=True)) from None
    if checkpoint is None:
        typer.echo(f"warning: no checkpoint: {model}'s image encoder has random weights", err=True)
    sam = init_model(cfg).to(dev)
    images = load_training_data(cfg.data, int(sam.image_encoder.img_size)).images
    store = EmbeddingCache(cache, encoder_id(sam, model), shape=embedding_shape(sam))
    with progress_bar() as bar:
        store.fill(
            images, lambda batch: encode_images(sam, batch, dev),
            log=lambda m: typer.echo(m, err=True), progress=bar_callback(bar, "embedding images"),
        )  # fmt: skip
    typer.echo(f"{len(images)} images embedded in {cache} ({store.stats()})")


@seg_app.command("predict")
@user_errors
def seg_predict(
    image: Annotated[Path, typer.Option("--image", "-i", help="PNG/JPEG or NIfTI file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Mask file (.png or .nii.gz).")],
    box: Annotated[
        list[str] | None,
        typer.Option(
            "--box",
            help="x0,y0,x1,y1 (2D); x0,y0,x1,y1,k (a box on slice k) or x0,y0,x1,y1,z0,z1 "
            "(a 3D box, propagated from its middle slice). Repeat for several objects.",
        ),
    ] = None,
    point: Annotated[
        list[str] | None,
        typer.Option("--point", help="x,y[,label] (2D) or x,y,k[,label] (3D); label 1 or 0."),
    ] = None,
    model: PredictorOption = "medfm-tiny",
    checkpoint: CheckpointOption = None,
    device: DeviceOption = "cpu",
    mirror: MirrorOption = False,
    mask_threshold: ThresholdOption = None,
    box_crop: BoxCropOption = None,
    overlay: Annotated[
        Path | None,
        typer.Option(
            "--overlay", help="Also write a PNG of the image with the prompts and mask outlines."
        ),
    ] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Segment an image from box or point prompts; object i gets label i in the output."""
    from medfm.cli.progress import bar_callback, progress_bar
    from medfm.seg.segment import segment_file

    with progress_bar() as bar:
        result = segment_file(
            image, out, boxes=box, points=point, model=model, checkpoint=checkpoint,
            device=device, mirror=mirror, mask_threshold=mask_threshold, box_crop=box_crop,
            overlay=overlay, overwrite=overwrite, progress=bar_callback(bar, "segmenting slices"),
        )  # fmt: skip
    unit = "voxels" if result.label.ndim == 3 else "pixels"
    shown = f"; overlay {overlay}" if overlay is not None else ""
    typer.echo(f"{out}: {result.n_voxels} {unit} in {result.n_objects} object(s){shown}")


@seg_app.command("export")
@user_errors
def seg_export(
    run: Annotated[Path, typer.Argument(help="A training run (or its model/ folder).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Official-format .pth to write.")],
    overwrite: OverwriteOption = False,
) -> None:
    """Write weights that segment-anything's sam_model_registry loads (ViT models)."""
    from medfm.io import check_new, check_outputs
    from medfm.seg.export import EXPORT_ENDINGS, export_notes, export_run
    from medfm.seg.models import read_config, run_model_dir

    folder = run_model_dir(run)
    check_outputs({"--out": out}, {"model folder": folder})
    check_new(out, "--out", overwrite=overwrite, endings=EXPORT_ENDINGS)
    typer.echo(str(export_run(folder, out)))
    for note in export_notes(read_config(folder)):
        typer.echo(
            f"note: the .pth holds the weights only; medfm's predictor of {folder} also "
            f"applies {note}",
            err=True,
        )
