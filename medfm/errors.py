"""The one error type a user can cause (bad path, corrupt file, wrong shape, bad argument), and
the one translation of a pydantic validation error into its one-line message."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class MedfmError(ValueError):
    """A problem with the user's input, with a message that says what was wrong and what to do.

    The CLI prints it on one line and exits with code 2, without a traceback.
    """


def validation_message(error: ValidationError, *, as_option: bool = False) -> str:
    """The first problem of a pydantic validation as one line, ``WHERE: WHAT``.

    WHERE is the field's location, dotted (``steps.0.train.stepz``), or as a command-line
    option (``--grad-clip``) with ``as_option``; it is left out for a problem of the whole
    model (a check across fields). WHAT is pydantic's message less its "Value error, " prefix."""
    err = error.errors()[0]
    loc = [str(part) for part in err["loc"]]
    if not loc:
        where = ""
    elif as_option:
        where = "--" + "-".join(loc).replace("_", "-")
    else:
        where = ".".join(loc)
    what = err["msg"].removeprefix("Value error, ")
    return f"{where}: {what}" if where else what
