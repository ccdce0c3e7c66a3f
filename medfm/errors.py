"""The one error type a user can cause (bad path, corrupt file, wrong shape, bad argument)."""


class MedfmError(ValueError):
    """A problem with the user's input, with a message that says what was wrong and what to do.

    The CLI prints it on one line and exits with code 2, without a traceback.
    """
