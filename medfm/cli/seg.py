"""``medfm seg``: SAM segmentation commands. Heavy modules are imported inside the commands."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from medfm.errors import MedfmError

F = TypeVar("F", bound=Callable)


def user_errors(fn: F) -> F:
    """``medfm.cli.main.user_errors``, looked up when the command runs, so that main.py can
    import this module at its top without a circular import."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from medfm.cli.main import user_errors as wrap

        return wrap(fn)(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


seg_app = typer.Typer(
    help="SAM segmentation: evaluate models and baselines on real data with box / point prompts.",
    no_args_is_help=True,
)


@seg_app.command("evaluate")
@user_errors
def seg_evaluate(
    data: Annotated[Path, typer.Option("--data", help="nnU-Net v2 raw dataset folder.")],
    prompt: Annotated[str, typer.Option("--prompt", help="box or point.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Report JSON to write.")],
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="medfm-tiny, vit_b, vit_l, vit_h, medsam, a run folder, "
            "or a baseline: box-ellipse, box-fill.",
        ),
    ] = "medfm-tiny",
    checkpoint: Annotated[
        str | None, typer.Option("--checkpoint", "-c", help="Weights file for the model.")
    ] = None,
    overlays: Annotated[
        Path | None,
        typer.Option("--overlays", help="Folder for one PNG per case: image, truth, prediction."),
    ] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    max_cases: Annotated[
        int | None, typer.Option("--max-cases", help="Evaluate the first N cases only.")
    ] = None,
) -> None:
    """Dice and surface Dice of a model with one prompt per label and image (DESIGN.md)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from medfm.seg.evaluate import (
        check_prompt,
        evaluate,
        list_eval_cases,
        load_predictor,
        write_report,
    )

    # Validate everything cheap before loading a model.
    check_prompt(prompt)
    list_eval_cases(data, max_cases)
    if out.is_dir():
        raise MedfmError(f"--out {out} is a folder; give a file name such as report.json")
    predictor = load_predictor(model, checkpoint, device=device)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=True,
        disable=not sys.stderr.isatty(),
    ) as bar:
        task = bar.add_task(f"evaluating {model}", total=None)
        report = evaluate(
            predictor,
            data,
            prompt,
            overlays=overlays,
            max_cases=max_cases,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    write_report(report, out)
    typer.echo(
        f"{report['model']}, {prompt} prompts, {report['n_cases']} cases: "
        f"mean Dice {report['mean_dice']:.4f}, NSD {report['mean_nsd']:.4f} -> {out}"
    )
