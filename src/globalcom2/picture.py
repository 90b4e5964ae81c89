"""A simple picture of which visual tokens GlobalCom2 kept, drawn with PIL only.

The picture shows the image the way LLaVA-NeXT's processor hands it to the vision tower:

* the **thumbnail**: the whole image squeezed to one ``view x view`` square (336 px), and
* the **crops**: the image resized, aspect ratio kept, into the AnyRes best resolution
  (``grid_h * view`` by ``grid_w * view`` pixels), centred on a black padded canvas and cut into
  ``view x view`` crops.

Every ViT patch (14 x 14 px for CLIP-336/14) is one visual token. Kept tokens are drawn as they
are, dropped tokens are dimmed, and padding that the model removes before the language model
sees it (unpadding) is hatched. Each crop is labelled with its retention ratio ``r_j`` and how
many of its unpadded tokens it keeps. Given ``retention_ratio=1``, the picture also says why some
crops still lose tokens (:func:`full_ratio_note`): GlobalCom2 gives crop j
``r_j = min(1, R * (1 + sigma_j - mean(sigma)))``, below 1 for the crops the thumbnail rates below
average, even at R = 1.

>>> plan = globalcom2.get_family(model).last.plans[0]               # doctest: +SKIP
>>> save_png(render_kept_tokens(image, plan), "kept.png")            # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, List, NamedTuple, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ._io import atomic_path, to_rgb
from .models.llava_next import canvas_layout  # noqa: F401  (LLaVA-NeXT's crop canvas; the name of 0.1)

if TYPE_CHECKING:  # pragma: no cover
    from .core.layouts import CompressionPlan

__all__ = ["canvas_layout", "full_ratio_note", "picture_notes", "render_kept_tokens", "save_png"]

# Colours (RGB).
_BACKGROUND = (255, 255, 255)
_TEXT = (25, 25, 35)
_MUTED = (95, 95, 110)
_DIM = (40, 40, 48)  # dropped tokens are blended towards this
_DIM_KEEP = 0.28  # how much of the image shows through a dropped token
_PAD_BG = (18, 18, 22)
_PAD_HATCH = (80, 80, 92)
_CROP_LINE = (255, 255, 255)
_LABEL_BG = (255, 255, 255, 225)
_NOTE = (170, 40, 30)

_MARGIN = 24

_EXPLANATION = (
    "How to read: each cell is one visual token (a ViT patch). Bright cells are kept and reach the "
    "language model; dim cells are dropped. Hatched areas are padding, removed by the model before "
    "the language model (unpadding).\n\n"
    "GlobalCom2 lets the thumbnail command: the thumbnail's importance ([CLS] attention, or feature "
    "similarity on towers without [CLS]) summed over each crop's region sets that crop's retention "
    "ratio r; the crop then keeps its floor(r x unpadded) tokens with the best score (own importance "
    "+ the thumbnail's, resized). The thumbnail "
    "itself keeps floor(R x {n}) of its {n} tokens."
)
_GAP = 32

# How each allocation sets r_j (see globalcom2.core.budgets.crop_retention_ratios), for full_ratio_note.
_ALLOCATION_RULES = {
    "softmax_sum": (
        "r_j = min(1, R x (1 + sigma_j - mean(sigma))), sigma = softmax over the crops of the thumbnail's "
        "importance summed over each crop's region (tau = {tau:g})",
        "A crop the thumbnail rates below average (sigma_j < mean(sigma)) gets r_j < 1",
    ),
    "softmax_max": (
        "r_j = min(1, R x (1 + sigma_j - mean(sigma))), sigma = softmax over the crops of the thumbnail's "
        "largest importance inside each crop's region (tau = {tau:g})",
        "A crop the thumbnail rates below average (sigma_j < mean(sigma)) gets r_j < 1",
    ),
    "topk_count": (
        "r_j = min(1, R x C x c_j / sum(c)), c_j = how many of the thumbnail's kept tokens fall in crop j's region",
        "A crop whose region holds fewer of them than the average crop gets r_j < 1",
    ),
}


def full_ratio_note(
    retention_ratio: float,
    crop_ratios: Sequence[float],
    crop_kept: Sequence[int],
    crop_total: Sequence[int],
    *,
    temperature: float = 10.0,
    allocation: str = "softmax_sum",
) -> str | None:
    """Why some crop tokens are dropped at ``R = 1``, or None when that needs no explaining.

    At ``R = 1`` GlobalCom2 still gives every crop its own ratio ``r_j`` (for the method,
    ``min(1, R * (1 + sigma_j - mean(sigma)))``): the crops the thumbnail rates below average get
    ``r_j < 1`` and keep ``floor(r_j * n_j) < n_j`` tokens, while the ratios above 1 are capped,
    so R = 1 keeps fewer tokens than vanilla. The note says so and names the crops it concerns.
    It is None for ``R < 1`` (dropping tokens is then what was asked for) and when every crop
    keeps all its tokens.

    Args:
        retention_ratio: R.
        crop_ratios, crop_kept, crop_total: per crop (row by row), ``r_j``, the kept and the
            unpadded token counts.
        temperature, allocation: the config's, to state the rule that set ``r_j``.
    """
    if retention_ratio < 1.0:
        return None
    short = [(j, r, k, t) for j, (r, k, t) in enumerate(zip(crop_ratios, crop_kept, crop_total)) if k < t]
    if not short:
        return None
    rule, who = _ALLOCATION_RULES.get(allocation, ("each crop gets its own ratio r_j", "A crop"))
    crops = ", ".join(f"crop {j + 1} (r = {r:.3f}, kept {k}/{t})" for j, r, k, t in short)
    return (
        f"Why tokens are dropped at R = 1: GlobalCom2 still gives each crop j its own retention ratio, "
        f"{rule.format(tau=temperature)}. {who} and keeps floor(r_j x n_j) < n_j of its n_j tokens; "
        f"the crops above average are capped at r_j = 1, so R = 1 keeps fewer tokens than vanilla. "
        f"Here: {crops}."
    )


def picture_notes(
    plan: "CompressionPlan",
    *,
    note: str | None = None,
    retention_ratio: float | None = None,
    temperature: float = 10.0,
    allocation: str = "softmax_sum",
) -> list[str]:
    """The paragraphs :func:`render_kept_tokens` writes under the legend, in order: the
    :func:`full_ratio_note` of ``plan`` at ``retention_ratio`` (when there is one) and ``note``."""
    notes: list[str] = []
    if retention_ratio is not None and plan.geometry is not None:
        why = full_ratio_note(
            retention_ratio,
            [float(v) for v in plan.crop_ratios.tolist()],
            [int(v) for v in plan.crop_keep.sum(dim=1).tolist()],
            [int(v) for v in plan.crop_valid.sum(dim=1).tolist()],
            temperature=temperature,
            allocation=allocation,
        )
        if why:
            notes.append(why)
    if note:
        notes.append(note)
    return notes


@lru_cache(maxsize=None)
def _font(size: int, bold: bool = False) -> Any:
    names = ("DejaVuSans-Bold.ttf", "Arial Bold.ttf") if bold else ("DejaVuSans.ttf", "Arial.ttf")
    for name in names:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow < 10.1
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return int(right - left), int(bottom - top)


def wrap_words(text: str, too_wide: Callable[[str], bool]) -> list[str]:
    """Greedy word wrap: each ``"\\n"``-separated paragraph filled word by word while
    ``too_wide(line)`` is false (a word longer than a line stays whole on its own line)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            trial = word if not line else f"{line} {word}"
            if line and too_wide(trial):
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> list[str]:
    """Greedy word wrap of ``text`` to lines at most ``width`` pixels wide."""
    return wrap_words(text, lambda line: _text_size(draw, line, font)[0] > width)


def model_views(image: Any, geom: Any, view: int, family: Any = None) -> tuple[np.ndarray, np.ndarray | None, dict[str, int] | None]:
    """(thumbnail pixels, crop canvas pixels, canvas layout) as ``family``'s processor builds them
    (its ``picture_views``; default: the first registered family, LLaVA-NeXT). ``geom`` is the
    :class:`~globalcom2.core.geometry.CropGeometry` (None for a single view: no canvas)."""
    return _family(family).picture_views(image, geom, view)


def _family(family: Any) -> Any:
    from .models import families

    return family if family is not None else families()[0]


def joint_grid(x: np.ndarray, geom: Any) -> np.ndarray:
    """(C, N) crop-major -> (H, W) joint token grid of ``geom`` (crops row by row): token
    ``(row, col)`` is token ``(row % S) * S + col % S`` of crop ``(row // S) * grid_w + col // S``."""
    s = geom.side
    return x.reshape(geom.grid_h, geom.grid_w, s, s).transpose(0, 2, 1, 3).reshape(geom.height, geom.width)


def paint_tokens(
    pixels: np.ndarray,
    keep: np.ndarray,
    valid: np.ndarray,
    cell: int,
    dropped: Callable[[np.ndarray], np.ndarray],
    padding: Callable[[int, int], np.ndarray],
) -> np.ndarray:
    """Token cells painted by what became of them (float32, not clipped).

    Args:
        pixels: (h, w, 3) uint8 view(s) as the model sees them; h, w multiples of ``cell``.
        keep: (h // cell, w // cell) bool, kept tokens (drawn as they are).
        valid: same shape, True where a token exists after unpadding.
        dropped: how a dropped token looks, ``dropped(pixels)`` (float, (h, w, 3)).
        padding: how padding looks, ``padding(h, w)`` (float, broadcast to (h, w, 3)).
    """
    up = np.ones((cell, cell), dtype=bool)
    keep_px = np.kron(keep, up).astype(bool)[..., None]
    valid_px = np.kron(valid, up).astype(bool)[..., None]
    h, w = keep_px.shape[:2]
    return np.where(valid_px, np.where(keep_px, pixels.astype(np.float32), dropped(pixels)), padding(h, w))


def gradient(width: int, height: int, start: Sequence[float], end: Sequence[float]) -> np.ndarray:
    """A (height, width, 3) float left-to-right colour ramp from ``start`` to ``end`` (RGB 0-255),
    for legend swatches."""
    t = np.linspace(0.0, 1.0, width)[None, :, None]
    return ((1 - t) * np.array(start, float) + t * np.array(end, float)).repeat(height, axis=0)


def _dim(pixels: np.ndarray) -> np.ndarray:
    """How a dropped token looks: the image blended towards dark grey (float32)."""
    return pixels.astype(np.float32) * _DIM_KEEP + np.array(_DIM, np.float32) * (1 - _DIM_KEEP)


def _hatch(height: int, width: int) -> np.ndarray:
    """How padding looks: dark diagonal hatching (float32, (height, width, 3))."""
    yy, xx = np.mgrid[0:height, 0:width]
    lines = ((yy + xx) % 10 < 2)[..., None]
    return np.where(lines, np.array(_PAD_HATCH, np.float32), np.array(_PAD_BG, np.float32))


def _token_image(pixels: np.ndarray, keep: np.ndarray, valid: np.ndarray, cell: int) -> Image.Image:
    """Dim dropped token cells and hatch padded ones.

    Args:
        pixels: (h, w, 3) uint8 view(s) as the model sees them; h, w multiples of ``cell``.
        keep: (h // cell, w // cell) bool, kept tokens.
        valid: same shape, True where a token exists after unpadding.
    """
    out = paint_tokens(pixels, keep, valid, cell, _dim, _hatch)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def _label(draw: ImageDraw.ImageDraw, xy: tuple[int, int], lines: list[str], fonts: list[Any]) -> None:
    """A small white box with one or more lines of text, top-left corner at ``xy``."""
    pad = 4
    sizes = [_text_size(draw, t, f) for t, f in zip(lines, fonts)]
    width = max(s[0] for s in sizes) + 2 * pad
    height = sum(s[1] for s in sizes) + 3 * (len(lines) - 1) + 2 * pad + 2
    x, y = xy
    draw.rounded_rectangle([x, y, x + width, y + height], radius=4, fill=_LABEL_BG, outline=(60, 60, 70, 255))
    ty = y + pad
    for (t, f), (_, th) in zip(zip(lines, fonts), sizes):
        draw.text((x + pad, ty), t, font=f, fill=_TEXT, anchor="la")
        ty += th + 3


#: The legend's entries, in order, and the remark after them (on a line of its own when the row is
#: too narrow for it).
_LEGEND_NAMES = ("kept token", "dropped token", "padding (no token)")
_LEGEND_NOTE = "one cell = one visual token (a ViT patch)"


class _Fonts(NamedTuple):
    """The picture's fonts and, for those of the text lines above and below the panels, their line
    heights in pixels."""

    title: Any
    sub: Any
    head: Any
    small: Any
    small_b: Any

    @classmethod
    def load(cls) -> "_Fonts":
        return cls(_font(22, True), _font(15), _font(15, True), _font(13), _font(13, True))

    def line_height(self, font: Any) -> int:
        """Pixels from one line in ``font`` (title, sub, small or small_b) to the next."""
        return {id(self.title): 30, id(self.sub): 21, id(self.small): 18, id(self.small_b): 18}[id(font)]


#: Lines of text: (text, font, colour).
_Lines = List[Tuple[str, Any, Tuple[int, int, int]]]


@dataclass(frozen=True)
class _Panels:
    """The two pictures of one plan, tokens painted, and what their captions and labels say.

    ``thumb`` is (view, view) px; ``crops`` the crop canvas (None for a single view), whose tokens
    ``keep`` and ``valid`` are (C, N) bool, crop-major; ``lay`` is the canvas layout
    (:func:`model_views`); ``n`` tokens per view, ``thumb_kept`` of them kept in the thumbnail."""

    thumb: Image.Image
    crops: Image.Image | None
    geom: Any
    lay: dict[str, int] | None
    keep: np.ndarray | None
    valid: np.ndarray | None
    n: int
    thumb_kept: int


def _token_panels(image: Image.Image, plan: "CompressionPlan", view: int, family: Any) -> _Panels:
    """The thumbnail (the whole image squeezed to one view) and the crops' canvas as ``family``'s
    processor makes them from the RGB ``image``, with ``plan``'s dropped tokens dimmed and padding
    hatched. Raises ValueError when a view's tokens do not tile the pixels they cover (``view`` px,
    or fewer where the tower's patches leave a margin out: OneVision's 27 x 14 = 378 of 384)."""
    n = int(plan.thumb_importance.shape[-1])
    side = math.isqrt(n)
    geom = plan.geometry
    thumb_px, canvas, lay = model_views(image, geom, view, family)
    covered = int(thumb_px.shape[0])
    if side * side != n or covered % side:
        raise ValueError(f"cannot draw {n} tokens per view on {covered} px views")
    cell = covered // side
    thumb_keep = np.zeros(n, dtype=bool)
    thumb_keep[plan.thumb_keep.detach().cpu().numpy()] = True
    thumb = _token_image(thumb_px, thumb_keep.reshape(side, side), np.ones((side, side), bool), cell)
    crops = keep = valid = None
    if geom is not None:
        keep = plan.crop_keep.detach().cpu().numpy().astype(bool)  # (C, N)
        valid = plan.crop_valid.detach().cpu().numpy().astype(bool)
        crops = _token_image(canvas, joint_grid(keep, geom), joint_grid(valid, geom), cell)
    return _Panels(thumb, crops, geom, lay, keep, valid, n, int(thumb_keep.sum()))


def _header_lines(
    probe: ImageDraw.ImageDraw, fonts: _Fonts, title: str | None, subtitle: str | None, width: int
) -> _Lines:
    """``title`` (large) then ``subtitle`` (muted), each wrapped to ``width`` px; either may be None."""
    header: _Lines = []
    if title:
        header += [(line, fonts.title, _TEXT) for line in _wrap(probe, title, fonts.title, width)]
    if subtitle:
        header += [(line, fonts.sub, _MUTED) for line in _wrap(probe, subtitle, fonts.sub, width)]
    return header


def _captions(
    probe: ImageDraw.ImageDraw, fonts: _Fonts, panels: _Panels, view: int, width: int
) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """The (text, font) lines above the thumbnail and above the crops (none for a single view),
    for a picture ``width`` px wide."""
    n, kept, geom, lay = panels.n, panels.thumb_kept, panels.geom, panels.lay
    thumb_caption = [(f"Thumbnail ({view}x{view}, whole image)", fonts.head),
                     (f"kept {kept}/{n} tokens ({kept / n:.0%})", fonts.small)]
    crop_caption: list[tuple[str, Any]] = []
    if geom is not None:
        # Wrapped to the room right of the thumbnail: a tall image's one-column grid is narrow.
        room = width - _MARGIN - (_MARGIN + view + _GAP)
        crop_caption = [
            (line, font)
            for text, font in (
                (f"Crops: {geom.grid_h}x{geom.grid_w} grid (rows x columns) of {view}px views", fonts.head),
                (f"canvas {lay['width']}x{lay['height']} px (width x height), image resized to "
                 f"{lay['new_width']}x{lay['new_height']}, padded; kept {int(panels.keep.sum())}/{int(panels.valid.sum())} "
                 "unpadded tokens", fonts.small),
            )
            for line in _wrap(probe, text, font, room)
        ]
    return thumb_caption, crop_caption


def _footer_lines(probe: ImageDraw.ImageDraw, fonts: _Fonts, notes: Sequence[str], note: str | None, width: int) -> _Lines:
    """``notes`` wrapped to ``width`` px: ``note`` (the caller's warning) bold in red, the others plain."""
    lines: _Lines = []
    for text in notes:
        font, colour = (fonts.small_b, _NOTE) if text == note else (fonts.small, _TEXT)
        lines += [(line, font, colour) for line in _wrap(probe, text, font, width)]
    return lines


def _draw_lines(draw: ImageDraw.ImageDraw, fonts: _Fonts, lines: _Lines, y: int) -> int:
    """Draw ``lines`` one under the other from (``_MARGIN``, ``y``); returns the y below them."""
    for text, font, colour in lines:
        draw.text((_MARGIN, y), text, font=font, fill=colour)
        y += fonts.line_height(font)
    return y


def _draw_crop_grid(
    out: Image.Image, draw: ImageDraw.ImageDraw, fonts: _Fonts, panels: _Panels, ratios: Sequence[float],
    x: int, y: int, view: int,
) -> None:
    """Paste the crop canvas at (``x``, ``y``), rule the crops apart and label each with its
    retention ratio (``ratios``, one per crop) and its kept/unpadded tokens."""
    crops, geom = panels.crops, panels.geom
    out.paste(crops, (x, y))
    for r in range(1, geom.grid_h):
        yy = y + r * view
        draw.line([(x, yy), (x + crops.width - 1, yy)], fill=_CROP_LINE, width=3)
    for c in range(1, geom.grid_w):
        xx = x + c * view
        draw.line([(xx, y), (xx, y + crops.height - 1)], fill=_CROP_LINE, width=3)
    draw.rectangle([x - 1, y - 1, x + crops.width, y + crops.height], outline=(60, 60, 70))
    for j in range(geom.num_crops):
        gy, gx = divmod(j, geom.grid_w)
        kept_j, total_j = int(panels.keep[j].sum()), int(panels.valid[j].sum())
        _label(
            draw,
            (x + gx * view + 6, y + gy * view + 6),
            [f"crop {j + 1}: r = {ratios[j]:.3f}", f"kept {kept_j}/{total_j}"],
            [fonts.small_b, fonts.small],
        )


def _draw_explanation(draw: ImageDraw.ImageDraw, font: Any, n: int, x: int, top: int, bottom: int, view: int) -> None:
    """The "how to read" text (``n`` tokens per view), ``view`` px wide, from ``top`` down to no
    lower than ``bottom`` (the lines that do not fit are left out)."""
    ey = top
    for line in _wrap(draw, _EXPLANATION.format(n=n), font, view):
        if ey + 18 > bottom:
            break
        draw.text((x, ey), line, font=font, fill=_MUTED)
        ey += 18


def _legend_note_wraps(probe: ImageDraw.ImageDraw, font: Any, width: int) -> bool:
    """Whether the legend's last remark needs a line of its own in a picture ``width`` px wide."""
    legend_end = _MARGIN + sum(30 + _text_size(probe, t, font)[0] + 28 for t in _LEGEND_NAMES)
    return legend_end + _text_size(probe, _LEGEND_NOTE, font)[0] > width - _MARGIN


def _draw_legend(out: Image.Image, draw: ImageDraw.ImageDraw, font: Any, y: int, note_wraps: bool) -> int:
    """The legend at ``y``: swatches drawn the same way as the tokens, then its remark (on the
    next line when ``note_wraps``). Returns the y below it."""
    swatch_px = gradient(22, 16, (80, 150, 225), (250, 205, 110)).astype(np.uint8)
    x = _MARGIN
    swatches = dict(zip(_LEGEND_NAMES, (swatch_px.astype(np.float32), _dim(swatch_px), _hatch(16, 22))))
    for text, sw_px in swatches.items():
        sw = Image.fromarray(np.clip(sw_px, 0, 255).astype(np.uint8))
        out.paste(sw, (x, y + 2))
        draw.rectangle([x - 1, y + 1, x + 22, y + 18], outline=(60, 60, 70))
        draw.text((x + 30, y + 2), text, font=font, fill=_TEXT)
        x += 30 + _text_size(draw, text, font)[0] + 28
    if note_wraps:
        x, y = _MARGIN, y + 20
    draw.text((x, y + 2), _LEGEND_NOTE, font=font, fill=_MUTED)
    return y + 28


def render_kept_tokens(
    image: Image.Image,
    plan: "CompressionPlan",
    *,
    view: int = 336,
    title: str | None = None,
    subtitle: str | None = None,
    note: str | None = None,
    explain: bool = True,
    retention_ratio: float | None = None,
    temperature: float = 10.0,
    allocation: str = "softmax_sum",
    family: Any = None,
) -> Image.Image:
    """Draw the thumbnail and crop grid of ``image`` with GlobalCom2's kept tokens highlighted.

    Args:
        image: the original image (any mode; converted to RGB).
        plan: the image's :class:`~globalcom2.core.layouts.CompressionPlan` (e.g.
            ``get_family(model).last.plans[0]``).
        view: pixels per side of one ViT view (336 for the llava-hf checkpoints).
        title, subtitle: text above the picture.
        note: an optional warning printed in red under the legend.
        explain: write a short "how to read" text under the thumbnail when there is room.
        retention_ratio: the R the plan was made with; at R = 1 the picture explains (under the
            legend) why some crop tokens are still dropped (see :func:`full_ratio_note`).
        temperature, allocation: the config's, for that explanation.
        family: the model family whose processor's views are drawn (a :class:`~globalcom2.models.Family`
            class or instance; default: the first registered, LLaVA-NeXT).

    Returns:
        An RGB :class:`PIL.Image.Image`.
    """
    panels = _token_panels(to_rgb(image), plan, view, family)
    crops, geom = panels.crops, panels.geom

    # -- layout of the whole picture ---------------------------------------------------------
    probe = ImageDraw.Draw(Image.new("RGB", (8, 8)))
    fonts = _Fonts.load()
    crops_h = crops.height if crops is not None else 0
    width = max(_MARGIN * 2 + view + (_GAP + crops.width if crops is not None else 0), 640)
    text_w = width - 2 * _MARGIN
    header = _header_lines(probe, fonts, title, subtitle, text_w)
    header_h = sum(fonts.line_height(f) for _, f, _ in header) + (10 if header else 0)
    thumb_caption, crop_caption = _captions(probe, fonts, panels, view, width)
    caption_h = max(len(thumb_caption), len(crop_caption)) * 20 + 8
    panels_h = max(view, crops_h)
    notes = picture_notes(plan, note=note, retention_ratio=retention_ratio, temperature=temperature,
                          allocation=allocation)
    footer = _footer_lines(probe, fonts, notes, note, text_w)
    note_wraps = _legend_note_wraps(probe, fonts.small, width)
    footer_h = (48 if note_wraps else 28) + sum(fonts.line_height(f) for _, f, _ in footer) + (6 if footer else 0)

    height = _MARGIN + header_h + caption_h + panels_h + 14 + footer_h + _MARGIN
    out = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(out, "RGBA")
    y = _draw_lines(draw, fonts, header, _MARGIN) + (10 if header else 0)
    x_thumb, x_crops = _MARGIN, _MARGIN + view + _GAP
    for captions, x in ((thumb_caption, x_thumb), (crop_caption, x_crops)):  # above the panels
        for i, (text, font) in enumerate(captions):
            draw.text((x, y + i * 20), text, font=font, fill=_TEXT if font is fonts.head else _MUTED)
    y += caption_h
    out.paste(panels.thumb, (x_thumb, y))
    draw.rectangle([x_thumb - 1, y - 1, x_thumb + view, y + view], outline=(60, 60, 70))
    if crops is not None:
        _draw_crop_grid(out, draw, fonts, panels, plan.crop_ratios.detach().cpu().tolist(), x_crops, y, view)
    if explain and geom is not None and crops_h - view >= 140:
        _draw_explanation(draw, fonts.small, panels.n, x_thumb, y + view + 16, y + panels_h, view)
    y = _draw_legend(out, draw, fonts.small, y + panels_h + 14, note_wraps)
    _draw_lines(draw, fonts, footer, y)
    return out


def save_png(picture: Image.Image, path: str | os.PathLike[str]) -> Path:
    """Write ``picture`` to ``path`` as PNG atomically (a temporary file, then ``os.replace``).

    Creates the parent folder. Returns the path. On failure nothing is left at ``path``.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
    return path
