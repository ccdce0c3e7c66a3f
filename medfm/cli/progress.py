"""The rich progress bar every long command shows (only when stderr is a terminal): what is
being done, the bar, items done of the total, time elapsed and time left. Library functions
report through a ``progress(done, total)`` callback (`bar_callback`); the CLI owns the bar."""

from __future__ import annotations

import sys
from collections.abc import Callable


def progress_bar(info: bool = False):
    """A transient bar: description, bar, done/total, time elapsed, time left (and ``info``
    text if asked: ``bar.add_task(..., info="")`` then ``bar.update(task, info=...)``)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = ["[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("elapsed,"), TimeRemainingColumn(),
               TextColumn("left")]  # fmt: skip
    if info:
        columns.append(TextColumn("{task.fields[info]}"))
    return Progress(*columns, transient=True, disable=not sys.stderr.isatty())


def bar_callback(bar, description: str) -> Callable[[int, int], None]:
    """A new task of ``bar`` (`progress_bar`) named ``description``, as the ``progress(done,
    total)`` callback the library functions take."""
    task = bar.add_task(description, total=None)

    def progress(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    return progress
