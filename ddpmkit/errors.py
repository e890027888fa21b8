"""Errors that reach the user as one line, not a traceback."""

import signal
from typing import Optional, Type, TypeVar

E = TypeVar("E", bound=BaseException)


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


def cause_of_type(exc: Optional[BaseException], kind: Type[E]) -> Optional[E]:
    """The first exception of type `kind` in `exc`'s chain (itself, its cause or context, ...):
    torch's C++ code reports a Python exception raised inside it (an OSError from a full disk,
    a KeyboardInterrupt) as a RuntimeError whose context is the original."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
