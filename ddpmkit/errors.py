"""Errors that reach the user as one line, not a traceback."""

import signal


class UserError(Exception):
    """Bad input from the user (flag, path, file). The CLI prints the message and exits 2.

    The message should say what was wrong and what to do about it.
    """


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# How torch's DataLoader re-raises an exception from a worker process: it builds a new exception
# of the same type whose message is this header and the worker's whole traceback.
_WORKER_HEADER = "Caught "


def user_message(exc: UserError) -> str:
    """The one-line message of a UserError, also when a DataLoader worker raised it (torch then
    re-raises it with the worker's traceback as the message: its last line holds the original)."""
    text = str(exc).strip()
    if text.startswith(_WORKER_HEADER) and "Traceback" in text:
        last = text.splitlines()[-1]
        name, sep, message = last.partition(": ")
        if sep and name.rsplit(".", 1)[-1] == type(exc).__name__:
            return message.strip()
    return text
