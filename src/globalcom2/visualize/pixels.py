"""The pixels of the figure's panels: the views the model sees, with its kept tokens as they are,
the dropped ones greyed out and the padding flat (hatched later, by the drawing)."""

from __future__ import annotations

import numpy as np

from ..picture import gradient, model_views, paint_tokens
from .style import KEPT_RAMP, PAD_FACE

__all__ = ["_grey_out", "_kept_pixels", "_model_views", "_swatches"]

# (thumbnail pixels, crop canvas pixels, canvas layout) as the LLaVA-NeXT processor builds them.
_model_views = model_views


def _grey_out(pixels: np.ndarray) -> np.ndarray:
    """How a dropped token looks: its luminance squeezed into a flat grey band (float32, RGB).

    Kept tokens keep their colours and full contrast; greyed-out ones stay distinguishable from
    them on dark and on bright images alike (a dark blend would hide them in a night sky).
    """
    lum = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.repeat((125.0 + 0.3 * lum)[..., None], 3, axis=-1)


def _kept_pixels(pixels: np.ndarray, keep: np.ndarray, valid: np.ndarray, cell: int) -> np.ndarray:
    """Kept token cells as they are, dropped ones greyed out, padded ones flat (hatched later). uint8."""
    pad = np.array(PAD_FACE, np.float32) * 255
    out = paint_tokens(pixels, keep, valid, cell, _grey_out, lambda h, w: pad)
    return np.clip(out, 0, 255).astype(np.uint8)


def _swatches() -> dict[str, np.ndarray]:
    """The legend's token swatches (uint8 RGB): a colour ramp ``"kept"``, and greyed out (``"dropped"``)."""
    kept = gradient(24, 12, *KEPT_RAMP)
    return {"kept": kept.astype(np.uint8), "dropped": np.clip(_grey_out(kept), 0, 255).astype(np.uint8)}
