"""The one exception type the command line turns into a one-line message instead of a traceback."""


class UserError(Exception):
    """A problem with what the user gave (a path, a checkpoint, a device, a prompt), not a bug.

    `fastgpt.cli.main` prints its message on one line and exits non-zero. Library code raises it only
    where the cause is the user's input; everything else keeps its own type and its traceback."""
