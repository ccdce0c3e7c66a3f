"""The rich progress bar every long command shows (only when stderr is a terminal)."""

from __future__ import annotations

import sys


def progress_bar(info: bool = False):
    """A transient bar: description, bar, done/total, time left (and ``info`` text if asked:
    ``bar.add_task(..., info="")`` then ``bar.update(task, info=...)``)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = ["[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn()]  # fmt: skip
    if info:
        columns.append(TextColumn("{task.fields[info]}"))
    return Progress(*columns, transient=True, disable=not sys.stderr.isatty())
