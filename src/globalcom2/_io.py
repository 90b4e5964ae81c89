"""Small file helpers shared by the commands: atomic writes, output-path checks, and the one
conversion of any PIL image to 8-bit RGB."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Any, Iterator


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


# ------------------------------------------------------------------------------------------------
# Images: every loader of the package converts with :func:`to_rgb`.
# ------------------------------------------------------------------------------------------------

#: Unsigned 16-bit PIL modes (16-bit greyscale PNG / TIFF): 0..65535.
_UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _grey_range(values: Any, mode: str) -> tuple[float, float]:
    """The (black, white) input values of a one-channel image of ``mode``, ``values`` (H, W)."""
    if mode in _UINT16_MODES:
        return 0.0, 65535.0
    finite = values[values == values]  # NaN dropped (float images)
    finite = finite[abs(finite) != float("inf")]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    if mode == "F" and lo >= 0 and hi <= 1:
        return 0.0, 1.0
    if mode != "F" and lo >= 0 and hi <= 65535:  # "I" (32-bit) holding 16-bit data, I;16S, ...
        return 0.0, 65535.0
    return lo, hi if hi > lo else lo + 1.0


def to_rgb(image: Any) -> Any:
    """``image`` as an 8-bit RGB PIL image (a new image; ``image`` is left as it was).

    ``Image.convert("RGB")`` clips wide modes to 0..255, so a 16-bit PNG becomes almost pure white
    (and a [0, 1] float image black); here every mode keeps its real range:

    * ``I;16`` / ``I;16B`` / ``I;16L`` / ``I;16N`` (16-bit greyscale): 0..65535 -> 0..255;
    * ``I`` (32-bit integers) and other integer modes: as 16-bit when every value is in 0..65535
      (what 16-bit files decode to), else stretched from their min..max;
    * ``F`` (32-bit float): [0, 1] -> 0..255 when every value is in [0, 1], else its min..max
      (NaN is black, infinities are ignored for the range and clipped);
    * a constant image outside those ranges is black;
    * everything else by PIL (``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``, ``RGBA``, ``LA``...).
      Transparency is *dropped*, never composited: RGBA / LA keep their colour channels and a
      palette image its palette colours, exactly as LLaVA's own evaluation
      (``Image.open(f).convert("RGB")``) and the Hugging Face image processors see the same
      file, so scores stay comparable with the published ones.

    Greyscale results are grey RGB (R = G = B).
    """
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode == "F" or mode.startswith("I"):
        import numpy as np

        values = np.asarray(image).astype(np.float64)  # (H, W)
        lo, hi = _grey_range(values, mode)
        scaled = (np.nan_to_num(values, nan=lo) - lo) * (255.0 / (hi - lo))
        grey = np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)  # (H, W)
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), "RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL's advice for palette transparency; the colours are the same
    return image.convert("RGB")
