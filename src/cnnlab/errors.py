"""The one exception type for mistakes a user can fix.

Anything raised as ``UserError`` reaches the terminal as a single line and exit status 2;
every other exception is a bug in cnnlab and keeps its traceback.
"""


class UserError(Exception):
    """A bad input: the message says what is wrong and how to fix it, in one line."""


def one_line(message: str) -> str:
    """``message`` with control characters escaped, so that a hostile file name cannot break the line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
