"""The one error type that means "the user's input is wrong"."""


class UserError(Exception):
    """A bad path, option, config key or input record.

    The command line prints it as one line (``bertforge: error: ...``) and exits with code 2,
    so the message must name what to fix: the file and line, the key, or the flag.
    """


class RunError(Exception):
    """A run that failed for a reason outside the user's input (a worker killed, a disk full).

    The command line prints it as one line and exits with code 1; the message says what was
    kept and how to go on. ``quiet`` marks a copy raised on the other ranks of a multi-rank run
    for a failure they all agreed on: the exit code is the same, the line is printed once (rank 0).
    """

    def __init__(self, message: str, quiet: bool = False) -> None:
        super().__init__(message)
        self.quiet = quiet
