"""The one error type that means "the user's input is wrong"."""


class UserError(Exception):
    """A bad path, option, config key or input record.

    The command line prints it as one line (``bertforge: error: ...``) and exits with code 2,
    so the message must name what to fix: the file and line, the key, or the flag.
    """
