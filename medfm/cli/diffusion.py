"""``medfm diffusion``: train a 3D diffusion model and use it zero-shot (sample, denoise,
anomaly, inpaint). Heavy modules are imported inside the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medfm.cli._common import DeviceOption, OverwriteOption, SeedOption, user_errors
from medfm.errors import MedfmError, validation_message

diffusion_app = typer.Typer(
    help="MedDiff-FM 3D diffusion: train, sample, denoise, find anomalies, inpaint.",
    no_args_is_help=True,
)

ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model", "-m", help="A diffusion run or model folder (default: the bundled model)."
    ),
]
RegionOption = Annotated[
    str | None,
    typer.Option(help="Anatomical region: head-neck, chest, abdomen or other (the model's)."),
]
InputOption = Annotated[Path, typer.Option("--input", "-i", help="A 3D NIfTI volume.")]
OutOption = Annotated[Path, typer.Option("--out", "-o", help="NIfTI file to write.")]
StepsOption = Annotated[int, typer.Option(help="Sampler steps over the whole schedule.")]

_NIFTI = (".nii.gz", ".nii")


def _numbers(text: str, what: str, n: int) -> list[float]:
    from medfm.seg.segment import parse_numbers

    values = parse_numbers(text, what)
    if len(values) == 1:
        values = values * n
    if len(values) != n:
        raise MedfmError(f"{what} {text!r} needs 1 or {n} numbers")
    return values


def _generator(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


def _prepare(model, device, *, input_=None, outputs=(), overwrite=False, inputs=None):
    """Check the outputs (new, writable, NIfTI, not an input: ``--input``, the model, and
    ``inputs`` {option: path}) before the model loads, then load it; returns the model."""
    from medfm.devices import parse_device
    from medfm.diffusion.files import diffusion_model_folder, load_diffusion_model
    from medfm.io import check_new, check_outputs

    dev = parse_device(device)
    if input_ is not None and not Path(input_).is_file():
        raise MedfmError(f"--input {input_} does not exist; give a NIfTI volume")
    folder = diffusion_model_folder(model)
    for what, path, endings in outputs:
        check_new(path, what, overwrite=overwrite, endings=endings)
        check_outputs({what: path}, {"--input": input_, "--model": folder, **(inputs or {})})
    return load_diffusion_model(folder, device=dev)


def _bar(description: str):
    from medfm.cli.progress import progress_bar

    bar = progress_bar()
    task = bar.add_task(description, total=None)
    return bar, lambda done, total: bar.update(task, completed=done, total=total)


@diffusion_app.command("sample")
@user_errors
def diffusion_sample(
    shape: Annotated[str, typer.Option(help="Volume size D,H,W in voxels (or one number).")],
    out: OutOption,
    model: ModelOption = None,
    spacing: Annotated[str, typer.Option(help="Voxel size in mm written to the file.")] = "1",
    region: RegionOption = None,
    sampler: Annotated[str, typer.Option(help="ddpm, ddim, dpm++ or unipc.")] = "ddim",
    steps: StepsOption = 50,
    seed: SeedOption = 0,
    device: DeviceOption = "cpu",
    overwrite: OverwriteOption = False,
) -> None:
    """Generate a new volume (CT in HU; MRI scaled to [0, 1])."""
    import numpy as np

    from medfm.diffusion.intensity import intensity_map
    from medfm.diffusion.tasks import synthesize
    from medfm.io import Volume, save_volume

    size = [int(v) for v in _numbers(shape, "--shape", 3)]
    if any(v < 1 or v != int(v) for v in size):
        raise MedfmError(f"--shape {shape!r} must be positive whole numbers")
    mm = _numbers(spacing, "--spacing", 3)
    if any(v <= 0 for v in mm):
        raise MedfmError(f"--spacing {spacing!r} must be positive mm")
    net = _prepare(model, device, outputs=[("--out", out, _NIFTI)], overwrite=overwrite)
    bar, progress = _bar("sampling")
    with bar:
        y = synthesize(
            net, size, sampler=sampler, steps=steps, region=region, generator=_generator(seed),
            device=next(net.parameters()).device, progress=progress,
        )  # fmt: skip
    if net.config.modality == "ct":
        data = intensity_map(y, "ct", region).inverse(y[0].cpu())
    else:
        data = (y[0].cpu().float() + 1) / 2
    save_volume(Volume(data=data, affine=np.diag([*mm, 1.0])), out)
    typer.echo(
        f"{out}: a {'x'.join(map(str, size))} volume ({sampler}, {steps} steps, seed {seed})"
    )


@diffusion_app.command("denoise")
@user_errors
def diffusion_denoise(
    input_: InputOption,
    out: OutOption,
    model: ModelOption = None,
    noise_std: Annotated[
        str, typer.Option(help="The input's noise std in its own units, or auto (estimated).")
    ] = "auto",
    method: Annotated[
        str,
        typer.Option(
            help="posterior (one model step at the matching noise level), diffpir (data "
            "consistency from there to 0) or reverse (the sampler from there)."
        ),
    ] = "posterior",
    guidance: Annotated[
        float, typer.Option(help="diffpir: the prior's weight against the data term.")
    ] = 7.0,
    sampler: Annotated[str, typer.Option(help="ddpm, ddim, dpm++ or unipc.")] = "ddim",
    steps: StepsOption = 50,
    region: RegionOption = None,
    seed: SeedOption = 0,
    device: DeviceOption = "cpu",
    overwrite: OverwriteOption = False,
) -> None:
    """Remove Gaussian noise from a volume; the output keeps its grid, affine and units."""
    from medfm.diffusion.files import read_scaled, write_unscaled
    from medfm.diffusion.tasks import denoise, estimate_noise_std

    sigma = None if noise_std == "auto" else _numbers(noise_std, "--noise-std", 1)[0]
    if sigma is not None and sigma <= 0:
        raise MedfmError(f"--noise-std {noise_std!r} must be positive, or auto")
    net = _prepare(model, device, input_=input_, outputs=[("--out", out, _NIFTI)],
                   overwrite=overwrite)  # fmt: skip
    scaled = read_scaled(input_, net, region=region)
    if sigma is None:
        s_model = estimate_noise_std(scaled.x)
        sigma = s_model / scaled.imap.to_model_sigma(1.0)
    else:
        s_model = scaled.imap.to_model_sigma(sigma)
    bar, progress = _bar("denoising")
    with bar:
        y = denoise(
            net, scaled.x, s_model, method=method, sampler=sampler, steps=steps, region=region,
            guidance=guidance, generator=_generator(seed), progress=progress,
        )  # fmt: skip
    write_unscaled(y, scaled, out)
    typer.echo(f"{out}: denoised (noise std {sigma:.4g} in the input's units, {method})")


@diffusion_app.command("anomaly")
@user_errors
def diffusion_anomaly(
    input_: InputOption,
    out: Annotated[Path, typer.Option("--out", "-o", help="Anomaly map NIfTI to write.")],
    model: ModelOption = None,
    t: Annotated[
        int,
        typer.Option(
            "--t", help="Noise to this step of the 1000 (the paper: 950; 50 measured best)."
        ),
    ] = 50,
    steps: StepsOption = 50,
    mask: Annotated[
        Path | None, typer.Option(help="Ground-truth anomaly mask: scores go to --report.")
    ] = None,
    report: Annotated[Path | None, typer.Option(help="JSON report (with --mask).")] = None,
    region: RegionOption = None,
    seed: SeedOption = 0,
    device: DeviceOption = "cpu",
    overwrite: OverwriteOption = False,
) -> None:
    """Map how anomalous each voxel is: noise, reconstruct, smoothed residual."""
    import json

    from medfm.diffusion.files import read_scaled, write_unscaled
    from medfm.diffusion.metrics import anomaly_scores
    from medfm.diffusion.tasks import anomaly_map
    from medfm.io import load_volume
    from medfm.io.atomic import atomic_write_text

    if report is not None and mask is None:
        raise MedfmError("--report needs --mask (the ground truth it scores against)")
    outputs = [("--out", out, _NIFTI)] + ([("--report", report, (".json",))] if report else [])
    net = _prepare(model, device, input_=input_, outputs=outputs, overwrite=overwrite,
                   inputs={"--mask": mask})  # fmt: skip
    scaled = read_scaled(input_, net, region=region)
    truth = None
    if mask is not None:
        truth = load_volume(mask).data
        if tuple(truth.shape[1:]) != tuple(scaled.x.shape[2:]):
            raise MedfmError(
                f"--mask {mask} has shape {tuple(truth.shape[1:])}, the image "
                f"{tuple(scaled.x.shape[2:])}; give a mask on the image's grid"
            )
    bar, progress = _bar("anomaly map")
    with bar:
        amap = anomaly_map(net, scaled.x, t=t, steps=steps, region=region,
                           generator=_generator(seed), progress=progress)  # fmt: skip
    write_unscaled(amap, scaled, out, units=False)
    msg = f"{out}: anomaly map (t={t})"
    if truth is not None:
        scores = anomaly_scores(amap[0, 0].cpu(), truth[0] != 0)
        if report is not None:
            atomic_write_text(
                report, json.dumps({"input": str(input_), "t": t, **scores}, indent=2) + "\n"
            )
        msg += f"; AUROC {scores['auroc']:.4f}, best Dice {scores['best_dice']:.4f}"
    typer.echo(msg)


@diffusion_app.command("inpaint")
@user_errors
def diffusion_inpaint(
    input_: InputOption,
    mask: Annotated[Path, typer.Option(help="Region to regenerate (non-zero voxels).")],
    out: OutOption,
    model: ModelOption = None,
    steps: StepsOption = 50,
    jump_length: Annotated[int, typer.Option(help="RePaint: steps per resampling jump.")] = 10,
    jump_n_sample: Annotated[int, typer.Option(help="RePaint: resamplings per jump.")] = 5,
    controlnet: Annotated[
        Path | None,
        typer.Option(help="A mask ControlNet: guided inpainting (default: the base alone)."),
    ] = None,
    condition: Annotated[
        Path | None,
        typer.Option(
            help="With --controlnet: the label map the hole should hold "
            "(default: --mask as label 1)."
        ),
    ] = None,
    region: RegionOption = None,
    seed: SeedOption = 0,
    device: DeviceOption = "cpu",
    overwrite: OverwriteOption = False,
) -> None:
    """Regenerate the masked region of a volume from its surroundings (RePaint; guided by a
    mask ControlNet with --controlnet)."""
    from medfm.diffusion.controlnet import Controlled, mask_condition
    from medfm.diffusion.files import load_controlnet, read_scaled, write_unscaled
    from medfm.diffusion.tasks import inpaint

    if condition is not None and controlnet is None:
        raise MedfmError("--condition needs --controlnet (a mask ControlNet reads it)")
    net = _prepare(model, device, input_=input_, outputs=[("--out", out, _NIFTI)],
                   overwrite=overwrite, inputs={"--mask": mask, "--condition": condition,
                                                "--controlnet": controlnet})  # fmt: skip
    scaled = read_scaled(input_, net, region=region)
    hole = _grid_mask(mask, "--mask", scaled.x) != 0
    cond = None
    if controlnet is not None:
        cn = load_controlnet(controlnet, net, "mask", required=True)
        labels = hole.float() if condition is None else _grid_mask(condition, "--condition",
                                                                  scaled.x)  # fmt: skip
        cond = mask_condition(labels, cn.config.labels)
        net = Controlled(net, cn)
    bar, progress = _bar("inpainting")
    with bar:
        y = inpaint(net, scaled.x, hole, steps=steps, jump_length=jump_length,
                    jump_n_sample=jump_n_sample, region=region, condition=cond,
                    generator=_generator(seed), progress=progress)  # fmt: skip
    write_unscaled(y, scaled, out)
    guided = " (guided by the ControlNet)" if cond is not None else ""
    typer.echo(f"{out}: {int(hole.sum())} voxels inpainted{guided}")


def _grid_mask(path: Path, what: str, like):
    """A label map file as (1, 1, *S) on ``like``'s device, refused unless on its grid."""
    from medfm.io import load_volume

    if not Path(path).is_file():
        raise MedfmError(f"{what} {path} does not exist; give a NIfTI label map")
    data = load_volume(path).data
    if tuple(data.shape[1:]) != tuple(like.shape[2:]) or data.shape[0] != 1:
        raise MedfmError(
            f"{what} {path} has shape {tuple(data.shape[1:])}, the image "
            f"{tuple(like.shape[2:])}; give a mask on the image's grid"
        )
    return data[None].float().to(like.device)


@diffusion_app.command("train")
@user_errors
def diffusion_train(
    data: Annotated[
        list[str],
        typer.Option("--data", help="nnU-Net raw or NIfTI folder, or synth:ct,mri; repeat."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder.")],
    patch: Annotated[int, typer.Option(help="Training patch edge (voxels).")] = 64,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 10000,
    batch: Annotated[int, typer.Option(help="Patches per step.")] = 2,
    channels: Annotated[str, typer.Option(help="UNet channels per level.")] = "32,64,128,256",
    modality: Annotated[str, typer.Option(help="mri or ct (intensity scaling).")] = "mri",
    region: RegionOption = None,
    loss: Annotated[str, typer.Option(help="l1 (MedDiff-FM's) or l2.")] = "l1",
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-4,
    warmup: Annotated[int, typer.Option(help="Steps of linear learning-rate warm-up.")] = 500,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 500,
    sample_every: Annotated[
        int | None, typer.Option(help="Steps between sample montages (OUT/samples/).")
    ] = None,
    checkpointing: Annotated[
        bool, typer.Option("--checkpointing", help="Activation checkpointing (less memory).")
    ] = False,
    seed: SeedOption = 0,
    device: DeviceOption = "cpu",
    resume: Annotated[bool, typer.Option("--resume", help="Continue a killed run.")] = False,
) -> None:
    """Pre-train a diffusion model on volumes (image and patch level, position embedding)."""
    from pydantic import ValidationError

    from medfm.cli.progress import progress_bar
    from medfm.devices import parse_device
    from medfm.diffusion.config import DiffusionConfig, UNetConfig
    from medfm.diffusion.train import DiffusionTrainConfig, train
    from medfm.io import check_outputs
    from medfm.recipe import diffusion_sources

    parse_device(device)
    widths = [int(c) for c in _numbers(channels, "--channels", len(channels.split(",")))]
    levels = len(widths)
    try:
        cfg = DiffusionTrainConfig(
            out=str(out), data=tuple(data), steps=steps, batch=batch, loss=loss, lr=lr,
            warmup=warmup, checkpoint_every=checkpoint_every, seed=seed, device=device,
            region=region, sample_every=sample_every, checkpointing=checkpointing,
            model=DiffusionConfig(
                unet=UNetConfig(
                    channels=tuple(widths),
                    attention_levels=tuple(i == levels - 1 for i in range(levels)),
                    norm_num_groups=min(32, *widths),
                    num_head_channels=min(32, widths[-1]),
                ),
                patch=(patch,) * 3, modality=modality,
            ),
        )  # fmt: skip
    except ValidationError as e:
        raise MedfmError(validation_message(e, as_option=True)) from None
    for d in data:
        if not d.startswith("synth:"):
            check_outputs({"--out": out}, {"--data": d})
    loader = diffusion_sources(cfg)
    with progress_bar(info=True) as bar:
        task = bar.add_task("training", total=steps, info="")

        def progress(step: int, metrics: dict) -> None:
            bar.update(task, completed=step, info=f"loss {metrics.get('loss', 0):.4f}")

        final = train(cfg, loader, resume=resume, log=lambda m: typer.echo(m, err=True),
                      progress=progress)  # fmt: skip
    typer.echo(f"model saved in {final}")


@diffusion_app.command("controlnet-train")
@user_errors
def diffusion_controlnet_train(
    task: Annotated[str, typer.Option(help="superres or mask.")],
    data: Annotated[
        list[str],
        typer.Option("--data", help="NIfTI or nnU-Net raw folder (mask: nnU-Net); repeat."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (its model/: the CN).")],
    model: ModelOption = None,
    factor: Annotated[int, typer.Option(help="superres: the slice factor trained for.")] = 4,
    axis: Annotated[int, typer.Option(help="superres: the thinned axis (0, 1, 2).")] = 2,
    labels: Annotated[
        int | None, typer.Option(help="mask: label count K (default: the data's largest).")
    ] = None,
    steps: Annotated[
        int, typer.Option(help="Optimizer steps (3000: under an hour on 2 CPU cores).")
    ] = 3000,
    batch: Annotated[int, typer.Option(help="Patches per step.")] = 4,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-4,
    warmup: Annotated[int, typer.Option(help="Steps of linear learning-rate warm-up.")] = 100,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 250,
    region: RegionOption = None,
    seed: SeedOption = 0,
    device: DeviceOption = "cpu",
    resume: Annotated[bool, typer.Option("--resume", help="Continue a killed run.")] = False,
) -> None:
    """Fine-tune a ControlNet on the frozen model: super-resolution or mask conditioning."""
    from pydantic import ValidationError

    from medfm.cli.progress import progress_bar
    from medfm.devices import parse_device
    from medfm.diffusion.control_train import (
        ControlNetTrainConfig,
        controlnet_sources,
        controlnet_train,
    )
    from medfm.diffusion.files import diffusion_model_folder
    from medfm.io import check_outputs

    parse_device(device)
    axis = axis % 3 if -3 <= axis < 3 else axis
    try:
        cfg = ControlNetTrainConfig(
            out=str(out), data=tuple(data), base=model, task=task, factor=factor, axis=axis,
            labels=labels, steps=steps, batch=batch, lr=lr, warmup=warmup,
            checkpoint_every=checkpoint_every, region=region, seed=seed, device=device,
        )  # fmt: skip
    except ValidationError as e:
        raise MedfmError(validation_message(e, as_option=True)) from None
    folder = diffusion_model_folder(model)
    for d in data:
        check_outputs({"--out": out}, {"--data": d, "--model": folder})
    loader = controlnet_sources(cfg)
    with progress_bar(info=True) as bar:
        job = bar.add_task(f"ControlNet ({task})", total=steps, info="")

        def progress(step: int, metrics: dict) -> None:
            bar.update(job, completed=step, info=f"loss {metrics.get('loss', 0):.4f}")

        final = controlnet_train(
            cfg, loader, resume=resume, log=lambda m: typer.echo(m, err=True), progress=progress
        )
    typer.echo(f"ControlNet saved in {final}")


@diffusion_app.command("superres")
@user_errors
def diffusion_superres(
    input_: Annotated[
        Path, typer.Option("--input", "-i", help="The low-resolution 3D NIfTI volume.")
    ],
    factor: Annotated[int, typer.Option(help="Slices made per input slice gap (>= 2).")],
    out: OutOption,
    axis: Annotated[int, typer.Option(help="The thick-slice axis (0, 1, 2; -1: the last).")] = -1,
    model: ModelOption = None,
    controlnet: Annotated[
        Path | None,
        typer.Option(
            help="A superres ControlNet (default: the one shipped with the bundled "
            "model; none: zero-shot)."
        ),
    ] = None,
    zero_shot: Annotated[
        bool, typer.Option("--zero-shot", help="No ControlNet: the base model alone.")
    ] = False,
    steps: Annotated[
        int | None, typer.Option(help="Deterministic steps to step 0 (default: measured best).")
    ] = None,
    t_start: Annotated[
        int | None, typer.Option(help="The noised start step (default: the measured best).")
    ] = None,
    samples: Annotated[
        int | None,
        typer.Option(help="Walks from independent noise, averaged (default: measured best)."),
    ] = None,
    region: RegionOption = None,
    seed: SeedOption = 0,
    device: DeviceOption = "cpu",
    overwrite: OverwriteOption = False,
) -> None:
    """Through-plane super-resolution: F(n-1)+1 slices on the axis, slice F*k the input's
    slice k, spacing divided by F; the other slices made by the model."""
    from medfm.diffusion.conditional import SUPERRES_DEFAULTS, superres
    from medfm.diffusion.files import load_controlnet, read_scaled, write_unscaled
    from medfm.io import Volume

    if factor < 2:
        raise MedfmError(f"--factor must be 2 or more, got {factor}")
    if zero_shot and controlnet is not None:
        raise MedfmError("give --controlnet or --zero-shot, not both")
    net = _prepare(model, device, input_=input_, outputs=[("--out", out, _NIFTI)],
                   overwrite=overwrite, inputs={"--controlnet": controlnet})  # fmt: skip
    scaled = read_scaled(input_, net, region=region, what="--input")
    dims = scaled.x.ndim - 2
    if not -dims <= axis < dims:
        raise MedfmError(f"--axis {axis} is not an axis of a {dims}D volume (0..{dims - 1})")
    axis %= dims
    if scaled.x.shape[2 + axis] < 2:
        raise MedfmError(
            f"--input {input_} has {scaled.x.shape[2 + axis]} slice on axis {axis}; "
            "super-resolution needs at least 2"
        )
    cn = None if zero_shot else load_controlnet(controlnet, net, "superres", required=False)
    given = {"t_start": t_start, "steps": steps, "samples": samples}
    settings = SUPERRES_DEFAULTS["controlnet" if cn is not None else "zeroshot"] | {
        k: v for k, v in given.items() if v is not None
    }
    bar, progress = _bar("super-resolution")
    with bar:
        y = superres(net, scaled.x, factor, axis=axis, controlnet=cn, region=region,
                     generator=_generator(seed), progress=progress, **settings)  # fmt: skip
    affine = scaled.volume.affine.copy()
    affine[:3, axis] = affine[:3, axis] / factor  # slice F*k lies where input slice k lay
    scaled.volume = Volume(data=scaled.volume.data[:, :1], affine=affine)
    write_unscaled(y, scaled, out)
    shape = "x".join(str(s) for s in y.shape[2:])
    how = "with the ControlNet" if cn is not None else "zero-shot"
    typer.echo(f"{out}: {shape} ({factor}x along axis {axis}, {how})")


@diffusion_app.command("generate")
@user_errors
def diffusion_generate(
    mask: Annotated[Path, typer.Option(help="Label map the structures follow (0 background).")],
    out: OutOption,
    controlnet: Annotated[
        Path | None,
        typer.Option(help="A mask ControlNet of the model (default: the shipped one, if any)."),
    ] = None,
    image: Annotated[
        Path | None,
        typer.Option(help="A volume to generate the mask's region inside (the rest is kept)."),
    ] = None,
    model: ModelOption = None,
    steps: StepsOption = 50,
    region: RegionOption = None,
    seed: SeedOption = 0,
    device: DeviceOption = "cpu",
    overwrite: OverwriteOption = False,
) -> None:
    """Generate a volume whose structures lie where --mask says, or add them to --image."""
    from medfm.diffusion.conditional import generate
    from medfm.diffusion.files import ScaledVolume, load_controlnet, read_scaled, write_unscaled
    from medfm.diffusion.intensity import IntensityMap, intensity_map
    from medfm.io import load_volume

    if not Path(mask).is_file():
        raise MedfmError(f"--mask {mask} does not exist; give a NIfTI label map")
    ins = {"--mask": mask, "--controlnet": controlnet}
    net = _prepare(model, device, input_=image, outputs=[("--out", out, _NIFTI)],
                   overwrite=overwrite, inputs=ins)  # fmt: skip
    cn = load_controlnet(controlnet, net, "mask", required=True)
    device_ = next(net.parameters()).device
    if image is not None:
        scaled = read_scaled(image, net, region=region, what="--image")
        labels = _grid_mask(mask, "--mask", scaled.x)
    else:
        vol = load_volume(mask)
        if vol.data.shape[0] != 1 or vol.ndim != net.config.unet.spatial_dims:
            raise MedfmError(f"--mask {mask} must be a single-channel "
                             f"{net.config.unet.spatial_dims}D label map")  # fmt: skip
        labels = vol.data[None].float().to(device_)
        imap = (
            intensity_map(labels, "ct", region)
            if net.config.modality == "ct"
            else IntensityMap(0.0, 1.0)  # MRI is written scaled to [0, 1]
        )
        scaled = ScaledVolume(vol, imap, labels)
    bar, progress = _bar("generating")
    with bar:
        y = generate(net, cn, labels, image=None if image is None else scaled.x, steps=steps,
                     region=region, generator=_generator(seed), progress=progress)  # fmt: skip
    write_unscaled(y, scaled, out)
    where = f"inside {image}" if image is not None else "a new volume"
    typer.echo(f"{out}: {where} following {mask} (seed {seed})")


@diffusion_app.command("make-dataset")
@user_errors
def diffusion_make_dataset(
    masks: Annotated[
        str, typer.Option(help="A folder of label maps (nnU-Net or NIfTI), or synth:N.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="nnU-Net raw folder to write.")],
    controlnet: Annotated[
        Path | None, typer.Option(help="A mask ControlNet of the model (default: shipped).")
    ] = None,
    model: ModelOption = None,
    dim: Annotated[int, typer.Option(help="3: volumes; 2: their labelled slices (PNG).")] = 3,
    n: Annotated[
        int | None,
        typer.Option("-n", help="Cases (default: one per mask; more: elastic variants)."),
    ] = None,
    size: Annotated[
        str | None, typer.Option(help="synth:N masks' size D,H,W (default: the model's patch).")
    ] = None,
    steps: StepsOption = 50,
    shard: Annotated[str | None, typer.Option(help="K/N: write cases i with i % N == K.")] = None,
    region: RegionOption = None,
    seed: SeedOption = 0,
    device: DeviceOption = "cpu",
) -> None:
    """Render label maps into scans with a mask ControlNet: an nnU-Net dataset that trains the
    segmenter (medfm seg train --data)."""
    from medfm.diffusion.bridge import make_dataset
    from medfm.diffusion.files import load_controlnet
    from medfm.io import check_outputs, check_writable
    from medfm.recipe import mask_source
    from medfm.synth.dataset import parse_shard

    k, n_shards = parse_shard(shard)
    if n is not None and n < 1:
        raise MedfmError(f"-n must be 1 or more, got {n}")
    ins = {"--controlnet": controlnet}
    if not masks.startswith("synth:"):
        ins["--masks"] = masks
    check_writable(out, "--out")
    net = _prepare(model, device, inputs=ins)
    check_outputs({"--out": out}, ins)
    cn = load_controlnet(controlnet, net, "mask", required=True)
    shape = net.config.patch
    if size is not None:
        shape = tuple(int(v) for v in _numbers(size, "--size", 3))
        if any(v < 8 for v in shape):
            raise MedfmError(f"--size {size!r}: each side must be 8 voxels or more")
    source, count = mask_source(masks, n=n, labels=cn.config.labels, shape=shape, seed=seed)
    bar, progress = _bar("rendering masks")
    with bar:
        report = make_dataset(
            net, cn, source, out, n=count, masks_name=masks, dim=dim, seed=seed,
            shard=(k, n_shards), steps=steps, region=region, progress=progress,
        )  # fmt: skip
    extra = f", {report.slices} slices" if dim == 2 else ""
    typer.echo(
        f"{out}: {report.written} cases written, {report.skipped} already there{extra} "
        f"(of {report.total})"
    )
