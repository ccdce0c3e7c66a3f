"""What several ``medfm`` commands share: the one-line handler of user errors and the options
declared by more than one command (``Annotated`` aliases; each command gives its own default).
A pydantic validation error becomes one line through `medfm.errors.validation_message`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, TypeVar

import typer

from medfm.errors import MedfmError

__all__ = [
    "BoxCropOption",
    "CheckpointOption",
    "DeviceOption",
    "MirrorOption",
    "ModelNameOption",
    "OverwriteOption",
    "PredictorOption",
    "SeedOption",
    "ThresholdOption",
    "one_line_warnings",
    "user_errors",
]

F = TypeVar("F", bound=Callable)


def one_line_warnings() -> None:
    """Show each warning as one line, ``warning: MESSAGE``, on stderr (not Python's two lines
    with the file and source line of where it was raised)."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        typer.echo(f"warning: {message}", err=True)

    warnings.showwarning = show


def user_errors(fn: F) -> F:
    """Print a MedfmError, or an OSError a path caused (missing, a file where a folder is
    needed, a read-only or full disk), on one line and exit with code 2 (no traceback); Ctrl-C
    exits with 130 and says how to resume."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MedfmError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except OSError as e:  # a path the user gave: missing, a file for a folder, no space
            where = f"{e.filename}: " if e.filename else ""
            typer.echo(f"error: {where}{e.strerror or e}; check the path", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            from medfm.workers import say_interrupted

            say_interrupted()
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


DeviceOption = Annotated[str, typer.Option("--device", help="cpu or cuda.")]

OverwriteOption = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace an existing output (report, mask, model folder); the old one stays "
        "until the new one is complete.",
    ),
]

SeedOption = Annotated[
    int, typer.Option("--seed", help="Run seed: the same seed gives the same result.")
]

ModelNameOption = Annotated[
    str,
    typer.Option("--model", "-m", help="Model name: medfm-tiny, vit_b, vit_l, vit_h or medsam."),
]

PredictorOption = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="medfm-tiny, vit_b, vit_l, vit_h, medsam, a run folder, "
        "or a baseline: box-ellipse, box-fill.",
    ),
]

CheckpointOption = Annotated[
    str | None,
    typer.Option(
        "--checkpoint",
        "-c",
        help="Weights for the model: an official SAM / MedSAM .pth, or a medfm model folder.",
    ),
]

MirrorOption = Annotated[
    bool,
    typer.Option(
        "--mirror",
        help="Test-time mirroring (nnU-Net's): also predict on the image flipped left-right "
        "and average the probabilities.",
    ),
]

ThresholdOption = Annotated[
    float | None,
    typer.Option(
        "--mask-threshold",
        help="Logit above which a pixel is in the mask, instead of the model's own "
        "(config.json's mask_thresholds, from medfm seg calibrate; else 0).",
    ),
]

BoxCropOption = Annotated[
    bool | None,
    typer.Option(
        "--box-crop/--no-box-crop",
        help="Keep each box-prompted mask inside its box, or not, instead of the model's own "
        "setting (config.json's box_crop, from medfm seg calibrate; else not).",
        show_default=False,
    ),
]
