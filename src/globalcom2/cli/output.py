"""What the ``globalcom2`` commands share for output: :class:`CLIError` (one ``globalcom2: error:
...`` line), help text, the parser class, printing, and the output files and folders they write.

Importing this module is cheap (no torch, transformers or PIL).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import Any, NoReturn

PROG = "globalcom2"


# ------------------------------------------------------------------------------------------------
# Errors, help text and output
# ------------------------------------------------------------------------------------------------


class CLIError(Exception):
    """A failure to report as one ``globalcom2: error: ...`` line (exit status ``code``)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def one_line(text: str, limit: int = 400) -> str:
    """Collapse whitespace (a multi-line exception message becomes one line) and shorten."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def para(text: str) -> str:
    """A paragraph wrapped for help output (the raw formatter keeps it as written)."""
    return textwrap.fill(" ".join(text.split()), width=79, break_on_hyphens=False, break_long_words=False)


class Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one ``globalcom2: error:`` line too (the subcommands'
    parsers are of this class as well: ``add_subparsers`` uses the parent's class)."""

    def error(self, message: str) -> NoReturn:
        hint = f"see '{self.prog} --help'"
        self.exit(2, f"{PROG}: error: {one_line(message)} ({hint})\n")


def echo(text: str = "", stream: Any = None) -> None:
    """print() that never fails on a terminal that cannot encode some character."""
    stream = sys.stdout if stream is None else stream
    try:
        print(text, file=stream, flush=True)
    except UnicodeEncodeError:
        enc = getattr(stream, "encoding", None) or "ascii"
        print(text.encode(enc, errors="replace").decode(enc, errors="replace"), file=stream, flush=True)


def status(text: str) -> None:
    """Progress lines go to stderr, so that stdout holds the results only."""
    echo(text, sys.stderr)


def cannot_write(what: str, e: OSError) -> CLIError:
    """The error of a failed write to ``what`` (a file or folder option's value)."""
    return CLIError(f"cannot write {what}: {one_line(e.strerror or str(e))}")


def output_file(path: str, flag: str) -> Path:
    """A file option (``--output``, ``--plot``) checked before any work: its folder must exist
    (it is not created) and be writable, and it must not be a folder (see :mod:`globalcom2._io`)."""
    from .._io import check_output_file

    try:
        return check_output_file(path, flag)
    except ValueError as e:
        raise CLIError(str(e)) from None


def output_dir(path: str, flag: str, writable: bool = True) -> Path:
    """A folder option (``--output-dir``) checked before any work: it is, or can be created as, a
    writable folder (no file in the way); the command creates it (see :mod:`globalcom2._io`)."""
    from .._io import check_output_dir

    try:
        return check_output_dir(path, flag, writable=writable)
    except ValueError as e:
        raise CLIError(str(e)) from None
