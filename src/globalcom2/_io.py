"""Small file helpers shared by the commands: atomic writes, output-path checks, the one
conversion of any PIL image to 8-bit RGB, and the checks of image files before any model work.

EXIF orientation, per loader (a deliberate difference):

* the command line's images (``generate``, ``embed``, ``bench``, ``visualize``, ``demo --image``:
  :func:`globalcom2.cli.loading.load_image`) are turned upright by their EXIF orientation
  (:func:`upright`), as an image viewer shows a phone photo;
* the evaluation loaders (:func:`globalcom2.eval.base.decode_image`, the lmms-eval plugin) read
  the pixels as stored, as LLaVA's evaluation scripts do (``Image.open(f).convert("RGB")``), so
  that scores stay comparable with the published ones.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Any, Iterator


#: A temporary file of :func:`atomic_path` older than this (seconds) is left over by a process
#: that was killed mid-write; the next write to the same file removes it.
STALE_TMP_SECONDS = 3600.0


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}."


def remove_stale_tmp(path: str | os.PathLike[str], max_age: float = STALE_TMP_SECONDS) -> list[Path]:
    """Remove the temporary files of :func:`atomic_path` for ``path`` that a killed process left
    behind: those of a process that no longer runs, or older than ``max_age`` seconds. Returns them."""
    import time

    path = Path(path)
    removed = []
    try:
        candidates = [p for p in path.parent.iterdir() if p.name.startswith(_tmp_prefix(path)) and p.name.endswith(".tmp")]
    except OSError:
        return removed
    now = time.time()
    for tmp in candidates:
        pid_text = tmp.name[len(_tmp_prefix(path)):].split(".", 1)[0]
        try:
            alive = _pid_alive(int(pid_text))
            old = now - tmp.stat().st_mtime > max_age
        except (ValueError, OSError):
            continue  # not one of ours, or already gone
        if not alive or old:
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or a platform that cannot tell: keep its file
    return True


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one step.

    Whatever fails inside the block, nothing half-written is left at ``path`` (the temporary file
    is removed). A process killed inside the block cannot remove its temporary file: the next
    write to ``path`` does (:func:`remove_stale_tmp`). The parent folder is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(path)
    tmp = path.with_name(f"{_tmp_prefix(path)}{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        _chmod_for_umask(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _chmod_for_umask(path: Path) -> None:
    """Give a written file the mode a new file gets from the user's umask (0644 under umask 022):
    some writers create theirs 0600 (safetensors' ``save_file``), and every file a command writes
    should be as readable as the others."""
    mask = os.umask(0)
    os.umask(mask)
    with contextlib.suppress(OSError):  # a file system without modes (some mounts): leave it
        os.chmod(path, 0o666 & ~mask)


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


def upright(image: Any) -> Any:
    """``image`` turned as its EXIF orientation says (a new image; unchanged without one): what
    the command line's loader does, not the evaluation loaders (see the module's docstring)."""
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a damaged EXIF block: the pixels as stored
        return image


def image_file_problem(path: str | os.PathLike[str]) -> str | None:
    """Why the image file at ``path`` cannot be read, from its header alone (no decoding, so
    cheap enough for thousands of files before a model loads), or None when it looks fine: an
    empty file, a format PIL cannot open, or more pixels than PIL's decompression-bomb limit.
    A file truncated after its header is only found when decoded."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        if os.path.getsize(path) == 0:
            return "an empty file (0 bytes)"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
    except UnidentifiedImageError:
        return "not an image format PIL can open"
    except Image.DecompressionBombError:
        return f"more pixels than PIL's decompression-bomb limit ({2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels)"
    except (OSError, ValueError, SyntaxError) as e:
        return f"unreadable ({' '.join(str(e).split()) or type(e).__name__})"
    if width < 1 or height < 1:
        return f"an image of {width}x{height} pixels"
    return None
