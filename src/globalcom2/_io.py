"""Small file helpers shared by the commands."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one step.

    Whatever fails inside the block, nothing half-written is left at ``path`` (the temporary file
    is removed). The parent folder is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


# ------------------------------------------------------------------------------------------------
# Output paths, checked before any work.
#
# The rule of every command: a *directory* option (``--output-dir``) is created with its parents
# when missing (demo at once; eval when it first writes); a *file* option (``--output``,
# ``--plot``) needs its folder to exist already (a typo in a folder name is reported, not turned
# into a new tree). Either way a file standing where a folder is needed is named ("... is a
# file"), and so is a folder that cannot be written to. Files themselves are written atomically
# (:func:`atomic_path`), so a failure never leaves one half-written.
# ------------------------------------------------------------------------------------------------


def _deepest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (``path`` made absolute)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_file(path: str | os.PathLike[str], flag: str) -> Path:
    """``path`` (``~`` expanded) if a file can be written there; else ``ValueError`` naming ``flag``.

    Its folder must exist and be writable; ``path`` must not be a folder.
    """
    out = Path(path).expanduser()
    if out.is_dir():
        raise ValueError(f"{flag}: {path} is a directory, expected a file name")
    parent = Path(os.path.abspath(out)).parent
    found = _deepest_existing(parent)
    if not found.is_dir():
        raise ValueError(f"{flag}: {found} is a file, not a directory (in {path})")
    if found != parent:
        raise ValueError(f"{flag}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}: directory {parent} is not writable")
    return out


def check_output_dir(path: str | os.PathLike[str], flag: str, writable: bool = True) -> Path:
    """``path`` (``~`` expanded) if it is, or can be created as, a folder; else ``ValueError``.

    Nothing is created here. ``writable``: also require that the folder (or its nearest existing
    ancestor, where it would be created) can be written to.
    """
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {path} exists and is not a directory")
    found = _deepest_existing(out)
    if not found.is_dir():
        raise ValueError(f"{flag}: {found} is a file, not a directory (in {path})")
    if writable and not os.access(found, os.W_OK | os.X_OK):
        what = f"directory {found} is not writable" if found == Path(os.path.abspath(out)) else (
            f"cannot create {path}: {found} is not writable")
        raise ValueError(f"{flag}: {what}")
    return out
