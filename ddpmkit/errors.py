"""Errors that reach the user as one line, not a traceback."""


class UserError(Exception):
    """Bad input from the user (flag, path, file). The CLI prints the message and exits 2.

    The message should say what was wrong and what to do about it.
    """
