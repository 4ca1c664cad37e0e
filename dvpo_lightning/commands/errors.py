"""How a command reports a failure: bad user input as one message, real bugs with a traceback.

:func:`reported_errors` wraps every command of ``python -m dvpo_lightning`` (``__main__``
applies it). A :class:`ValueError` or :class:`FileNotFoundError` raised by this package's own
checks (a :class:`~dvpo_lightning.data.errors.DataFormatError`, a config value, a path, a
tokenizer or batch-size mismatch, a strategy this machine cannot run) is a mistake in the input,
and its message already says the rule, the value and the fix: it is printed alone on stderr,
``error: <message>``, and the process exits with status 2 (what jsonargparse's own parse errors
use). So is a file this package opens that does not exist (``FileNotFoundError`` from the
standard library, named with its path). Any other exception, and these types raised inside a
third-party library, are bugs and propagate with their traceback. A pipeline stage run as a
subprocess has printed its own error (or traceback); its failure is then one line naming the
stage's command, and the process exits with the stage's status.

``DVPO_DEBUG=1`` in the environment (or ``--debug`` right after the command name, which
``__main__`` turns into this variable) lets every exception propagate with its traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

DEBUG_ENV = "DVPO_DEBUG"
USER_ERRORS = (ValueError, FileNotFoundError)
USAGE_EXIT = 2  # as argparse / jsonargparse exit on a bad command line
_PACKAGE = Path(__file__).resolve().parents[1]  # .../dvpo_lightning
_STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()


def debug_requested() -> bool:
    """Whether ``DVPO_DEBUG`` asks for tracebacks (any value but empty, ``0`` or ``false``)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _is_stdlib(filename: str) -> bool:
    if filename.startswith("<"):  # frozen modules (runpy, importlib)
        return True
    path = Path(filename).resolve()
    return path.is_relative_to(_STDLIB) and not {"site-packages", "dist-packages"} & set(
        path.parts)


def raised_in(tb: TracebackType | None, package: Path, through_stdlib: bool = False) -> bool:
    """Whether the innermost frame of ``tb`` (where the exception was raised) is in the
    directory ``package``. ``through_stdlib``: skip the standard library's frames first
    (``open`` of a path we were given, ``subprocess.run(check=True)``)."""
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    for filename in reversed(frames):
        if through_stdlib and _is_stdlib(filename):
            continue
        return Path(filename).resolve().is_relative_to(package)
    return False


def raised_here(tb: TracebackType | None, through_stdlib: bool = False) -> bool:
    """Whether this package raised it: one of our checks, not a library's internals."""
    return raised_in(tb, _PACKAGE, through_stdlib)


def unwrapped(exc: BaseException) -> BaseException:
    """The exception a class's ``__init__`` raised, when jsonargparse instantiating the class
    (LightningCLI's model) re-raised it as a ``ValueError`` of its own ("Does not validate
    against any of the Union subtypes", the original as its ``__cause__``)."""
    module = sys.modules.get("jsonargparse")
    if module is None or module.__file__ is None:
        return exc
    jsonargparse_dir = Path(module.__file__).resolve().parent
    while (isinstance(exc, ValueError) and exc.__cause__ is not None
           and raised_in(exc.__traceback__, jsonargparse_dir)):
        exc = exc.__cause__
    return exc


def user_message(exc: BaseException) -> str | None:
    """The line(s) to print for ``exc`` when it is a reported error, else None (a bug).

    A ``ValueError`` counts when this package raised it; a ``FileNotFoundError`` also when the
    standard library raised it for this package (a path from the user that does not exist);
    a ``CalledProcessError`` when a command of this package ran the failed subprocess. An
    error jsonargparse wrapped while building a class is judged (and printed) as the original
    (:func:`unwrapped`).
    """
    exc = unwrapped(exc)
    tb = exc.__traceback__
    if isinstance(exc, FileNotFoundError) and raised_here(tb, through_stdlib=True):
        if exc.filename is not None and exc.strerror:
            return f"error: {exc.strerror}: {exc.filename}"
        return f"error: {exc}"
    if isinstance(exc, ValueError) and raised_here(tb):
        return f"error: {exc}"
    if isinstance(exc, subprocess.CalledProcessError) and raised_here(tb, through_stdlib=True):
        cmd = exc.cmd if isinstance(exc.cmd, str) else " ".join(map(str, exc.cmd))
        return (f"error: the command `{cmd}` failed with exit status {exc.returncode} "
                "(its own error is printed above)")
    return None


@contextmanager
def reported_errors() -> Iterator[None]:
    """Turn the user errors raised inside into ``error: <message>`` on stderr and
    ``SystemExit(2)`` (see the module docstring); with ``DVPO_DEBUG`` set, change nothing."""
    try:
        yield
    except Exception as exc:
        message = None if debug_requested() else user_message(exc)
        if message is None:
            raise
        sys.stdout.flush()
        print(message, file=sys.stderr, flush=True)
        code = USAGE_EXIT
        if isinstance(exc, subprocess.CalledProcessError):  # the stage's own status (1: signal)
            code = exc.returncode if exc.returncode > 0 else 1
        raise SystemExit(code) from None
