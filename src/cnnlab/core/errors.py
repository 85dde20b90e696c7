"""The one exception type for mistakes a user can fix.

Anything raised as ``UserError`` reaches the terminal as a single line and exit status 2;
every other exception is a bug in cnnlab and keeps its traceback.
"""


class UserError(ValueError):
    """A bad input: the message says what is wrong and how to fix it, in one line.

    A ``ValueError``, so that library callers can catch it as the bad value it is; messages name
    parameters as the command line spells them when the command line is the likely caller.
    """


def one_line(message: str) -> str:
    """``message`` with control characters escaped, so that a hostile file name cannot break the line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


class Interrupted(Exception):
    """A command stopped by a signal (SIGINT, SIGTERM): one line on stderr and exit status 128 + ``signum``.

    Training raises it at a step boundary once it has written a checkpoint, saying how to continue.
    """

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
