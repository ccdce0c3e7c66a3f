"""``medfm``: the command line. Heavy modules are imported inside the commands so that
``medfm --help`` stays instant."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from medfm.cli._common import DeviceOption, OverwriteOption, SeedOption, user_errors
from medfm.cli.diffusion import diffusion_app
from medfm.cli.seg import seg_app
from medfm.errors import MedfmError

app = typer.Typer(
    name="medfm",
    help="Synthetic medical images, SAM segmentation and 3D diffusion foundation models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
synth_app = typer.Typer(help="SynthFM synthetic CT / MRI / ultrasound data.", no_args_is_help=True)
app.add_typer(synth_app, name="synth")


@app.callback()
@user_errors
def _startup() -> None:
    """Before any command: warnings as one line each; thread settings that hold up on a busy
    machine, set before torch loads (`medfm.threads`); SIGTERM handled like Ctrl-C, and either
    ends the process within 2 seconds (`medfm.workers`; installed once per process)."""
    from medfm.cli._common import one_line_warnings
    from medfm.threads import configure_threads
    from medfm.workers import exit_soon_after_interrupt, stop_on_sigterm

    one_line_warnings()
    configure_threads()
    stop_on_sigterm()
    exit_soon_after_interrupt()


@app.command()
@user_errors
def info() -> None:
    """Versions, torch devices and threads."""
    import platform

    import torch

    from medfm import __version__

    lines = [
        f"medfm {__version__}",
        f"python {platform.python_version()} ({sys.executable})",
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"interop threads {torch.get_num_interop_threads()}",
    ]
    for name in ("torchvision", "monai", "segment_anything", "diffusers", "nibabel", "pydantic"):
        try:
            mod = __import__(name)
            lines.append(f"{name} {getattr(mod, '__version__', 'installed')}")
        except ImportError:
            lines.append(f"{name} not installed")
    lines.append("devices: cpu")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB")
    else:
        lines.append("  cuda: not available")
    typer.echo("\n".join(lines))


@synth_app.command("generate")
@user_errors
def synth_generate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Dataset folder (nnU-Net v2 raw).")],
    modality: Annotated[str, typer.Option(help="Comma-separated: ct, mri, us.")] = "ct,mri,us",
    dim: Annotated[int, typer.Option(help="2 (PNG slices) or 3 (NIfTI volumes).")] = 2,
    n: Annotated[int, typer.Option("-n", help="Number of cases.")] = 12,
    size: Annotated[
        str | None, typer.Option(help="N or comma-separated shape, e.g. 256 or 96,128,128.")
    ] = None,
    seed: SeedOption = 0,
    shard: Annotated[str | None, typer.Option(help="K/N: write cases i with i % N == K.")] = None,
    device: DeviceOption = "cpu",
    batch: Annotated[
        int | None, typer.Option(help="Cases rendered together (default 16 in 2D, 2 in 3D).")
    ] = None,
    workers: Annotated[int, typer.Option(help="Worker processes (changes no file).")] = 1,
    preview: Annotated[bool, typer.Option("--preview", help="Write preview.png.")] = False,
) -> None:
    """Generate (or resume) a synthetic dataset with exact masks."""
    from medfm.cli.progress import progress_bar
    from medfm.devices import parse_device
    from medfm.synth.dataset import (
        generate_dataset,
        parse_modalities,
        parse_shard,
        parse_size,
    )

    # Validate everything before anything is written.
    mods = parse_modalities(modality)
    parse_device(device)
    parse_size(size, dim)
    k, n_shards = parse_shard(shard)
    total = len(range(k, n, n_shards)) if n >= 1 else 0
    with progress_bar() as bar:
        task = bar.add_task("generating", total=total)
        report = generate_dataset(
            out,
            modalities=mods,
            dim=dim,
            n=n,
            size=size,
            seed=seed,
            shard=shard,
            device=device,
            batch=batch,
            workers=workers,
            preview=preview,
            progress=lambda done: bar.update(task, completed=done),
        )
    msg = f"{report.out}: {report.written} cases written, {report.skipped} already there"
    if report.preview:
        msg += f"; preview {report.preview}"
    typer.echo(msg)


@synth_app.command("preview")
@user_errors
def synth_preview(
    folder: Annotated[Path, typer.Argument(help="A dataset folder.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="PNG to write.")] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Write a grid of images with mask outlines (default FOLDER/preview.png, which is made
    again each time)."""
    from medfm.io import check_new, check_outputs
    from medfm.synth.preview import write_preview

    if not folder.is_dir():
        raise MedfmError(f"{folder} is not a folder")
    own = folder / "preview.png"  # the dataset's own preview, made again by design
    if out is not None and out.resolve() != own.resolve():
        check_outputs({"--out": out}, {"dataset folder": folder})
        check_new(out, "--out", overwrite=overwrite, endings=(".png",))
    path = write_preview(folder, out or own)
    typer.echo(str(path))


@app.command("run")
@user_errors
def run(
    recipe: Annotated[Path, typer.Argument(help="A recipe YAML file (see recipes/).")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and list steps.")] = False,
) -> None:
    """Run a pydantic-validated YAML recipe (synthetic data, training, evaluation); resumes."""
    from medfm.recipe import load_recipe, run_recipe

    r = load_recipe(recipe)
    if dry_run:
        for i, step in enumerate(r.steps, 1):
            kind, args = next(iter(step.model_dump().items()))
            typer.echo(f"{i}. {kind}: {args.get('out')}")
        return
    from medfm.cli.progress import bar_callback, progress_bar

    with progress_bar() as bar:
        recipe_task = bar.add_task(f"recipe {r.name} (steps)", total=len(r.steps))
        step_task: list = []

        def progress(i: int, n: int):
            """Step i + 1 of n starts: the recipe's bar moves, the last step's bar goes."""
            bar.update(recipe_task, completed=i, total=n)
            while step_task:
                bar.remove_task(step_task.pop())
            if i >= n:
                return None
            callback = bar_callback(bar, f"  step {i + 1}/{n}")
            step_task.append(bar.task_ids[-1])
            return callback

        run_recipe(r, log=lambda m: typer.echo(m), progress=progress)


app.add_typer(seg_app, name="seg")
app.add_typer(diffusion_app, name="diffusion")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
