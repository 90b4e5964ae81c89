"""Pictures of what GlobalCom2 keeps, and why (matplotlib).

For one image and one or more retention ratios, :func:`visualize` draws, one row per ratio, the
thumbnail and the crop grid the way the model sees them (the processor's resizing, padding shown
hatched), with the kept tokens as they are and the dropped ones dimmed; every crop is labelled with
its retention ratio ``r_j`` and kept/unpadded counts, the thumbnail with its own. With
``heatmaps=True`` a last section shows the [CLS] importance maps that drove the decision: the
thumbnail's (global), the thumbnail's resized onto the crops' unpadded area (global guidance per
crop), the crops' own (local), and the combined score. Those maps depend neither on the ratio nor
on the prompt, so they are drawn once.

The image is encoded once; every ratio reuses the same features and importance. The model is left
exactly as it was (patched or not, with the same settings). Only matplotlib's object-oriented API is
used: no pyplot state, no backend switch, nothing is shown.

>>> vis = visualize(model, processor, image, retention_ratios=(0.5, 0.25, 0.1), heatmaps=True)  # doctest: +SKIP
>>> vis.save("kept.png"); vis.masks[1].crop_kept.sum()                                         # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import ops
from ._io import atomic_path, to_rgb
from .config import GlobalCom2Config
from .picture import canvas_layout, wrap_words

__all__ = ["RatioMasks", "ImportanceMaps", "Visualization", "visualize", "RANDOM_WEIGHTS_NOTE"]

RANDOM_WEIGHTS_NOTE = (
    "Random weights (tiny demo model): the kept positions are meaningless; the counts and crop budgets are real."
)
PLOT_HINT = "pictures need matplotlib: pip install 'globalcom2[plot]'"

# Colours (RGB 0-255 for pixels, matplotlib colours for the rest).
_PAD_FACE = (0.97, 0.97, 0.98)  # padding: near white, hatched (the same in the heat maps)
_PAD_HATCH = (0.5, 0.5, 0.58)
_TEXT = "0.1"
_MUTED = "0.35"
_NOTE = (0.72, 0.12, 0.08)
_CMAP = "magma"

# Layout (inches).
_MARGIN = 0.35
_GAP = 0.4  # between the thumbnail and the crops
_THUMB = 2.6  # thumbnail panel side
_VIEW_MAX = 2.5  # side of one crop, at most
_CROPS_MAX_W, _CROPS_MAX_H = 10.5, 6.3
_MIN_W, _MIN_W_HEAT = 6.8, 11.0  # width of the text block, at least
_ROW_SPACE = 0.35
_CBAR = 0.95  # room right of a heat map: gap, colour bar, its tick labels, gap to the next map


@dataclass
class RatioMasks:
    """What GlobalCom2 keeps at one retention ratio, as arrays on the token grids.

    Attributes:
        retention_ratio: R.
        thumb_kept: (S, S) bool, kept thumbnail tokens (``thumb_kept.reshape(-1)[plan.thumb_keep]``).
        crop_kept: (H, W) bool on the crops' joint token grid, H = gh * S, W = gw * S: token
            ``(row, col)`` is token ``(row % S) * S + col % S`` of crop ``(row // S) * gw + col // S``;
            empty (0, 0) without crops.
        valid: (H, W) bool, tokens that survive unpadding.
        crop_ratios: (C,) retention ratio ``r_j`` of each crop.
        crop_kept_counts, crop_valid_counts: per crop, kept and unpadded tokens.
        num_tokens: visual tokens handed to the language model (newlines included).
        vanilla_tokens: the same for the vanilla model.
    """

    retention_ratio: float
    thumb_kept: np.ndarray
    crop_kept: np.ndarray
    valid: np.ndarray
    crop_ratios: np.ndarray
    crop_kept_counts: list[int]
    crop_valid_counts: list[int]
    num_tokens: int
    vanilla_tokens: int
    thumb_tokens: int | None = None
    crop_tokens: int | None = None
    note: str | None = None
    pooled: bool = False  # tokens averaged (pooling, none dropped) rather than selected

    def __post_init__(self) -> None:
        # Tokens the language model gets from each part: the kept ones for selection methods,
        # the pooled ones for pooling (which drops nothing but averages).
        if self.thumb_tokens is None:
            self.thumb_tokens = int(self.thumb_kept.sum())
        if self.crop_tokens is None:
            self.crop_tokens = int(sum(self.crop_kept_counts))

    @property
    def thumb_kept_count(self) -> int:
        return int(self.thumb_kept.sum())

    @property
    def newlines(self) -> int:
        """Image-newline tokens in the sequence (what is neither thumbnail nor crop token)."""
        return self.num_tokens - int(self.thumb_tokens) - int(self.crop_tokens)


@dataclass
class ImportanceMaps:
    """The [CLS] importance behind the decisions (float arrays, NaN where padded).

    Attributes:
        thumbnail: (S, S) the thumbnail's importance (global).
        global_on_crops: (H, W) the thumbnail's map bilinearly resized onto the unpadded area.
        local: (H, W) each crop's own importance.
        score: (H, W) the combined score (normalised global + normalised local, per crop).
    """

    thumbnail: np.ndarray
    global_on_crops: np.ndarray
    local: np.ndarray
    score: np.ndarray


@dataclass
class Visualization:
    """A rendered figure and the data behind it.

    Attributes:
        figure: the matplotlib ``Figure`` (displayed by notebooks; :meth:`save` writes it).
        masks: one :class:`RatioMasks` per retention ratio, in the order given.
        importance: the :class:`ImportanceMaps` (the same for every ratio).
        geometry: the crop geometry (None for a single-view image).
        image_size: (height, width) of the original image.
        layout: the layout used for the token counts (``"pooled"`` for pooling).
        notes: remarks about the case drawn (e.g. no crop token survives unpadding).
        method: the method drawn.
    """

    figure: Any
    masks: list[RatioMasks]
    importance: ImportanceMaps
    geometry: ops.CropGeometry | None
    image_size: tuple[int, int]
    layout: str
    notes: list[str] = field(default_factory=list)
    method: str = "globalcom2"

    def save(self, path: str, dpi: int = 110) -> None:
        """Write the figure as PNG, atomically (nothing half-written on failure)."""
        with atomic_path(path) as tmp:
            self.figure.savefig(tmp, dpi=dpi, format="png", facecolor="white")


# ------------------------------------------------------------------------------------------------
# Data: masks and maps from the plans
# ------------------------------------------------------------------------------------------------


def _to_grid(x: np.ndarray, geom: ops.CropGeometry) -> np.ndarray:
    """(C, N) crop-major -> (H, W) joint grid."""
    s = geom.side
    return x.reshape(geom.grid_h, geom.grid_w, s, s).transpose(0, 2, 1, 3).reshape(geom.height, geom.width)


def _pooled_masks(plan: Any, side: int, ratio: float, vanilla: int) -> RatioMasks:
    """Pooling drops no token: every token (unpadded) feeds one pooled token."""
    t, (ph, pw) = plan.thumb_hw[0], plan.crop_hw
    thumb = np.ones((side, side), dtype=bool)
    geom = plan.geometry
    note = f"pooling averages every token (none is dropped): thumbnail {side}x{side} -> {t}x{t}"
    if geom is None:
        empty = np.zeros((0, 0), dtype=bool)
        return RatioMasks(ratio, thumb, empty, empty, np.zeros(0), [], [], plan.num_tokens, vanilla, t * t, 0, note, True)
    valid = ops._valid_mask(geom, torch.device("cpu")).numpy()  # (C, N)
    counts = [int(v) for v in valid.sum(1)]
    frac = (ph * pw) / max(1, sum(counts))
    if ph:
        note += f", unpadded crop area {geom.valid_rows}x{geom.valid_cols} -> {ph}x{pw}"
    return RatioMasks(
        ratio, thumb, _to_grid(valid, geom), _to_grid(valid, geom), np.full(len(counts), frac), counts, counts,
        plan.num_tokens, vanilla, t * t, ph * pw, note, True,
    )


def _masks(plan: Any, ratio: float, vanilla: int, side: int | None = None) -> RatioMasks:
    if not isinstance(plan, ops.CompressionPlan):  # pooling
        return _pooled_masks(plan, int(side or 0), ratio, vanilla)
    n = int(plan.thumb_importance.shape[-1])
    side = math.isqrt(n)
    thumb = np.zeros(n, dtype=bool)
    thumb[plan.thumb_keep.cpu().numpy()] = True
    geom = plan.geometry
    if geom is None:
        empty = np.zeros((0, 0), dtype=bool)
        return RatioMasks(ratio, thumb.reshape(side, side), empty, empty, np.zeros(0), [], [], plan.num_tokens, vanilla)
    keep = plan.crop_keep.cpu().numpy()
    valid = plan.crop_valid.cpu().numpy()
    return RatioMasks(
        retention_ratio=ratio,
        thumb_kept=thumb.reshape(side, side),
        crop_kept=_to_grid(keep, geom),
        valid=_to_grid(valid, geom),
        crop_ratios=plan.crop_ratios.cpu().numpy(),
        crop_kept_counts=[int(v) for v in keep.sum(1)],
        crop_valid_counts=[int(v) for v in valid.sum(1)],
        num_tokens=plan.num_tokens,
        vanilla_tokens=vanilla,
    )


def _importance_maps(plan: ops.CompressionPlan, local: torch.Tensor) -> ImportanceMaps:
    """Maps from a plan (scores) and the crops' own importance ``local`` (C, N)."""
    n = int(plan.thumb_importance.shape[-1])
    side = math.isqrt(n)
    thumb = plan.thumb_importance.float().cpu().numpy().reshape(side, side)
    geom = plan.geometry
    if geom is None:
        nothing = np.zeros((0, 0))
        return ImportanceMaps(thumb, nothing, nothing, nothing)
    valid = _to_grid(plan.crop_valid.cpu().numpy(), geom)
    glob = np.full((geom.height, geom.width), np.nan)
    if not geom.is_empty:
        resized = torch.nn.functional.interpolate(
            plan.thumb_importance.float().cpu().reshape(1, 1, side, side),
            size=(geom.valid_rows, geom.valid_cols), mode="bilinear", align_corners=False,
        )[0, 0].numpy()
        glob[geom.row0 : geom.row1, geom.col0 : geom.col1] = resized
    loc = np.where(valid, _to_grid(local.float().cpu().numpy(), geom), np.nan)
    score = plan.crop_score.float().cpu().numpy()
    score = np.where(valid, _to_grid(np.where(np.isfinite(score), score, np.nan), geom), np.nan)
    return ImportanceMaps(thumb, glob, loc, score)


def _model_views(image: Any, geom: ops.CropGeometry | None, view: int) -> tuple[np.ndarray, np.ndarray | None, dict[str, int] | None]:
    """(thumbnail pixels, crop canvas pixels, canvas layout) as the LLaVA-NeXT processor builds them:
    the thumbnail is the whole image squeezed to one view; the crops cover the image resized (aspect
    kept) into the best resolution and centred on a zero-padded canvas."""
    from PIL import Image

    image = to_rgb(image)
    thumb = np.asarray(image.resize((view, view), Image.Resampling.BICUBIC))
    if geom is None:
        return thumb, None, None
    lay = canvas_layout((image.height, image.width), (geom.grid_h, geom.grid_w), view)
    canvas = np.zeros((lay["height"], lay["width"], 3), np.uint8)
    resized = image.resize((lay["new_width"], lay["new_height"]), Image.Resampling.BICUBIC)
    canvas[lay["top"] : lay["top"] + lay["new_height"], lay["left"] : lay["left"] + lay["new_width"]] = np.asarray(resized)
    return thumb, canvas, lay


def _grey_out(pixels: np.ndarray) -> np.ndarray:
    """How a dropped token looks: its luminance squeezed into a flat grey band (float32, RGB).

    Kept tokens keep their colours and full contrast; greyed-out ones stay distinguishable from
    them on dark and on bright images alike (a dark blend would hide them in a night sky).
    """
    lum = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.repeat((125.0 + 0.3 * lum)[..., None], 3, axis=-1)


def _kept_pixels(pixels: np.ndarray, keep: np.ndarray, valid: np.ndarray, cell: int) -> np.ndarray:
    """Kept token cells as they are, dropped ones greyed out, padded ones flat (hatched later). uint8."""
    up = np.ones((cell, cell), dtype=bool)
    keep_px = np.kron(keep, up).astype(bool)[..., None]
    valid_px = np.kron(valid, up).astype(bool)[..., None]
    pad = np.array(_PAD_FACE, np.float32) * 255
    out = np.where(valid_px, np.where(keep_px, pixels.astype(np.float32), _grey_out(pixels)), pad)
    return np.clip(out, 0, 255).astype(np.uint8)


def _pad_rects(geom: ops.CropGeometry) -> list[tuple[int, int, int, int]]:
    """The padded parts of the joint token grid as (row0, col0, rows, cols) rectangles."""
    if geom.is_empty:
        return [(0, 0, geom.height, geom.width)]
    rects = [
        (0, 0, geom.row0, geom.width),
        (geom.row1, 0, geom.height - geom.row1, geom.width),
        (geom.row0, 0, geom.valid_rows, geom.col0),
        (geom.row0, geom.col1, geom.valid_rows, geom.width - geom.col1),
    ]
    return [r for r in rects if r[2] > 0 and r[3] > 0]


# ------------------------------------------------------------------------------------------------
# Drawing helpers: text measured with the Agg renderer, everything placed in inches
# ------------------------------------------------------------------------------------------------


class _Type:
    """Text measurement (in inches) with matplotlib's own renderer, so that wrapping is exact."""

    def __init__(self) -> None:
        from matplotlib.backends.backend_agg import RendererAgg
        from matplotlib.font_manager import FontProperties

        self._renderer = RendererAgg(10, 10, 72)  # 72 dpi: pixels are points
        self._props = FontProperties

    def width(self, text: str, size: float, weight: str = "normal") -> float:
        prop = self._props(size=size, weight=weight)
        w, _, _ = self._renderer.get_text_width_height_descent(text, prop, ismath=False)
        return w / 72 * 1.03  # a little slack for hinting at other resolutions

    @staticmethod
    def line(size: float) -> float:
        """Line height in inches."""
        return size * 1.32 / 72

    def wrap(self, text: str, width: float, size: float, weight: str = "normal") -> list[str]:
        """Greedy word wrap to at most ``width`` inches per line (a longer word stays whole)."""
        return wrap_words(text, lambda line: self.width(line, size, weight) > width)


class _Sheet:
    """Collects drawing steps at inch positions (from the top left); builds the Figure at the end,
    when its height is known."""

    def __init__(self, width: float) -> None:
        self.width = width
        self.height = 0.0
        self.steps: list[Callable[[Any], None]] = []

    def rect(self, x: float, y: float, w: float, h: float) -> tuple[float, float, float, float]:
        """Figure fractions of a box whose top-left corner is (x, y) inches from the top left."""
        return (x / self.width, (self.height - y - h) / self.height, w / self.width, h / self.height)

    def axes(self, x: float, y: float, w: float, h: float, setup: Callable[[Any], None]) -> None:
        """An axes of ``w`` x ``h`` inches at (x, y), handed to ``setup`` once the figure exists."""
        self.steps.append(lambda fig: setup(fig.add_axes(self.rect(x, y, w, h))))

    def text(self, x: float, y: float, text: str, **kw: Any) -> None:
        """Text whose top (``va='top'``) left corner is at (x, y) inches (``ha`` may change x's role)."""
        kw.setdefault("va", "top")
        kw.setdefault("ha", "left")
        kw.setdefault("color", _TEXT)
        self.steps.append(lambda fig: fig.text(x / self.width, 1 - y / self.height, text, **kw))

    def build(self, height: float) -> Any:
        from matplotlib.figure import Figure

        self.height = height
        fig = Figure(figsize=(self.width, height), facecolor="white")
        for step in self.steps:
            step(fig)
        return fig


def _bare(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color("0.3")
        spine.set_linewidth(0.8)


def _hatch_rect(ax: Any, x: float, y: float, w: float, h: float, zorder: float = 2) -> None:
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((x, y), w, h, facecolor=_PAD_FACE, edgecolor=_PAD_HATCH, hatch="///", linewidth=0, zorder=zorder))


def _crop_lines(ax: Any, geom: ops.CropGeometry, unit: float, color: str = "white", lw: float = 1.6) -> None:
    for r in range(1, geom.grid_h):
        ax.axhline(r * unit - 0.5, color=color, lw=lw, zorder=4)
    for c in range(1, geom.grid_w):
        ax.axvline(c * unit - 0.5, color=color, lw=lw, zorder=4)


def _swatches() -> dict[str, np.ndarray]:
    t = np.linspace(0.0, 1.0, 24)[None, :, None]
    kept = ((1 - t) * np.array([70, 140, 220.0]) + t * np.array([250, 205, 110.0])).repeat(12, axis=0)
    return {"kept": kept.astype(np.uint8), "dropped": np.clip(_grey_out(kept), 0, 255).astype(np.uint8)}


# ------------------------------------------------------------------------------------------------
# The figure
# ------------------------------------------------------------------------------------------------


def _heat_arrangement(aspect: float, width: float) -> tuple[list[list[int]], float]:
    """Rows of heat-map panels (indices 0..3, 0 = thumbnail) and the panel height, in inches.

    One row ``[1, a, a, a]`` (a = the crop grid's width / height) while the maps stay readable
    (square and tall grids), else two rows ``[1, a], [a, a]`` (wide grids).
    """
    cap = 2.6 if aspect >= 1 else 4.0
    one = min((width - 4 * _CBAR) / (1 + 3 * aspect), cap)
    if one >= 1.5:
        return [[0, 1, 2, 3]], one
    return [[0, 1], [2, 3]], min((width - 2 * _CBAR) / max(2 * aspect, 1 + aspect), cap)


def _draw(
    *,
    thumb_px: np.ndarray,
    canvas_px: np.ndarray | None,
    lay: dict[str, int] | None,
    geom: ops.CropGeometry | None,
    masks: list[RatioMasks],
    maps: ImportanceMaps,
    heatmaps: bool,
    view: int,
    cell: int,
    side: int,
    title: str,
    subtitle: str,
    prompt: str | None,
    random_weights: bool,
    layout: str,
    method: str = "globalcom2",
) -> tuple[Any, list[str]]:
    """Lay the figure out in inches (text measured, so nothing overlaps) and build it."""
    import matplotlib

    ty = _Type()
    sw = _swatches()

    # -- sizes ------------------------------------------------------------------------------------
    if geom is not None:
        view_in = min(_VIEW_MAX, _CROPS_MAX_W / geom.grid_w, _CROPS_MAX_H / geom.grid_h)
        crop_w, crop_h = view_in * geom.grid_w, view_in * geom.grid_h
    else:
        view_in, crop_w, crop_h = _THUMB, 0.0, 0.0
    thumb_in = _THUMB if geom is None else min(_THUMB, max(crop_h, 1.8))
    content_w = thumb_in + (_GAP + crop_w if geom is not None else 0.0)
    block_w = max(content_w, _MIN_W_HEAT if heatmaps else _MIN_W)
    fig_w = block_w + 2 * _MARGIN
    x0 = _MARGIN
    sheet = _Sheet(fig_w)
    y = _MARGIN * 0.8

    # -- header: title, subtitle, prompt, note, legend ---------------------------------------------
    for line in ty.wrap(title, block_w, 14, "bold"):
        sheet.text(fig_w / 2, y, line, ha="center", fontsize=14, fontweight="bold")
        y += ty.line(14)
    y += 0.04
    for line in ty.wrap(subtitle, block_w, 10):
        sheet.text(fig_w / 2, y, line, ha="center", fontsize=10, color=_MUTED)
        y += ty.line(10)
    if prompt:
        text = f'prompt: "{" ".join(prompt.split())}"' + (
            " (FastV's choice depends on it: the prompt's last token ranks the visual tokens)" if "fastv" in method
            else f" ({_METHOD_TITLES.get(method, method)}'s choice does not depend on it: only the vision side decides)"
        )
        for line in ty.wrap(text, block_w, 10):
            sheet.text(fig_w / 2, y, line, ha="center", fontsize=10, color=_MUTED, fontstyle="italic")
            y += ty.line(10)
    if random_weights:
        y += 0.06
        for line in ty.wrap(RANDOM_WEIGHTS_NOTE, block_w, 10.5, "bold"):
            sheet.text(fig_w / 2, y, line, ha="center", fontsize=10.5, fontweight="bold", color=_NOTE)
            y += ty.line(10.5)
    y += 0.16

    # Legend: swatches drawn like the tokens, items flowing onto a second line if needed.
    items = [
        ("kept", "kept token (reaches the language model)"),
        ("dropped", "dropped token (greyed out)"),
        ("padding", "padding (removed by unpadding)"),
        (None, f"one cell = one visual token ({cell}x{cell} px patch)"),
    ]
    sw_w, sw_h, size = 0.34, 0.17, 9
    x = x0
    for kind, label in items:
        need = (sw_w + 0.08 if kind else 0) + ty.width(label, size)
        if x > x0 and x + need > x0 + block_w:
            x, y = x0, y + 0.3
        if kind is not None:

            def setup(ax: Any, kind: str = kind) -> None:
                _bare(ax)
                if kind == "padding":
                    ax.set_xlim(0, 1)
                    ax.set_ylim(0, 1)
                    _hatch_rect(ax, 0, 0, 1, 1)
                else:
                    ax.imshow(sw[kind], aspect="auto", interpolation="nearest")

            sheet.axes(x, y + 0.01, sw_w, sw_h, setup)
            x += sw_w + 0.08
        sheet.text(x, y + 0.01, label, fontsize=size, color=_TEXT if kind else _MUTED)
        x += ty.width(label, size) + 0.3
    y += 0.45

    # -- one row per ratio --------------------------------------------------------------------------
    notes: list[str] = []
    label_size = 8 if view_in >= 1.5 else 6.5
    for m in masks:
        # Row header: the ratio, then what the language model gets.
        head = f"R = {m.retention_ratio:g}"
        head_w = ty.width(head, 12.5, "bold") + 0.15
        sheet.text(x0, y - 0.02, head, fontsize=12.5, fontweight="bold")
        crop_total = int(m.crop_tokens)
        parts = f"{int(m.thumb_tokens):,} thumbnail"
        if geom is not None:
            parts += f" + {crop_total:,} crop tokens"
        parts += f" + {m.newlines:,} row newline{'s' if m.newlines != 1 else ''}"
        summary = (
            f"the language model gets {m.num_tokens:,} of {m.vanilla_tokens:,} visual tokens "
            f"({m.num_tokens / m.vanilla_tokens:.0%}): {parts} ({layout} layout)"
        )
        if m.note:
            summary += f"; {m.note}"
        lines = ty.wrap(summary, block_w - head_w, 9.5)
        for k, line in enumerate(lines):
            sheet.text(x0 + head_w, y + k * ty.line(9.5), line, fontsize=9.5, color=_MUTED)
        y += max(ty.line(12.5), len(lines) * ty.line(9.5)) + 0.1

        # Panel titles.
        n_thumb = m.thumb_kept.size
        t_title = ty.wrap(f"thumbnail: {'pooled to' if m.pooled else 'kept'} {m.thumb_tokens}/{n_thumb} "
                          f"({int(m.thumb_tokens) / n_thumb:.0%})", thumb_in, 9.5)
        c_title: list[str] = []
        if geom is not None and lay is not None:
            valid_total = sum(m.crop_valid_counts)
            share = f" ({crop_total / valid_total:.0%})" if valid_total else ""
            c_title = ty.wrap(
                f"crops: {geom.grid_h}x{geom.grid_w} grid, {'pooled to' if m.pooled else 'kept'} "
                f"{crop_total:,}/{valid_total:,} unpadded tokens{share}",
                block_w - thumb_in - _GAP, 9.5,  # nothing is right of the crops: the title may use that room
            )
        for k, line in enumerate(t_title):
            sheet.text(x0, y + k * ty.line(9.5), line, fontsize=9.5)
        for k, line in enumerate(c_title):
            sheet.text(x0 + thumb_in + _GAP, y + k * ty.line(9.5), line, fontsize=9.5)
        y += max(len(t_title), len(c_title)) * ty.line(9.5) + 0.05

        # Thumbnail.
        thumb_img = _kept_pixels(thumb_px, m.thumb_kept, np.ones_like(m.thumb_kept), cell)

        def thumb_setup(ax: Any, img: np.ndarray = thumb_img) -> None:
            _bare(ax)
            ax.imshow(img, interpolation="antialiased")

        sheet.axes(x0, y, thumb_in, thumb_in, thumb_setup)
        if geom is None or canvas_px is None:
            y += thumb_in + _ROW_SPACE
            continue

        # Crops.
        crop_img = _kept_pixels(canvas_px, m.crop_kept, m.valid, cell)
        empty_text = "\n".join(
            ty.wrap("no unpadded crop tokens: the image contributes its thumbnail tokens only", crop_w * 0.8 - 0.2, 9.5)
        )

        def crop_setup(ax: Any, img: np.ndarray = crop_img, m: RatioMasks = m, empty_text: str = empty_text) -> None:
            _bare(ax)
            ax.imshow(img, interpolation="antialiased", zorder=1)
            for r0, c0, nr, nc in _pad_rects(geom):
                _hatch_rect(ax, c0 * cell - 0.5, r0 * cell - 0.5, nc * cell, nr * cell)
            ax.set_xlim(-0.5, img.shape[1] - 0.5)
            ax.set_ylim(img.shape[0] - 0.5, -0.5)
            _crop_lines(ax, geom, view)
            for j in range(geom.num_crops):
                gy, gx = divmod(j, geom.grid_w)
                if m.crop_valid_counts[j]:
                    label = (f"{m.crop_valid_counts[j]} tokens, all pooled" if m.pooled else
                             f"r={m.crop_ratios[j]:.2f} · {m.crop_kept_counts[j]}/{m.crop_valid_counts[j]}")
                else:
                    label = "all padding"
                ax.annotate(
                    label, (gx * view, gy * view), xytext=(4, -4), textcoords="offset points", va="top", ha="left",
                    fontsize=label_size, color=_TEXT, zorder=6,
                    bbox=dict(boxstyle="round,pad=0.25", fc="white", ec="0.35", lw=0.6, alpha=0.92),
                )
            if geom.is_empty:
                ax.text(0.5, 0.5, empty_text, transform=ax.transAxes, ha="center", va="center", fontsize=9.5,
                        color="white", zorder=7, bbox=dict(boxstyle="round,pad=0.5", fc="0.2", ec="white"))

        sheet.axes(x0 + thumb_in + _GAP, y, crop_w, crop_h, crop_setup)
        if geom.is_empty and not notes:
            notes.append("no crop token survives unpadding: the image contributes its thumbnail tokens only")
        y += max(thumb_in, crop_h) + _ROW_SPACE

    # -- heat maps -----------------------------------------------------------------------------------
    if heatmaps:
        y += 0.1
        sheet.text(x0, y, "What drove the decision (the same for every R)", fontsize=12.5, fontweight="bold")
        y += ty.line(12.5) + 0.02
        explain = (
            "[CLS] attention logits of the vision tower's last layer (pre-softmax, mean over heads). The thumbnail's "
            "map, summed over each crop's region, sets the crop budgets r_j; inside a crop, tokens are ranked by the "
            "combined score. Hatched grey: padding (no token)."
        )
        for line in ty.wrap(explain, block_w, 9.5):
            sheet.text(x0, y, line, fontsize=9.5, color=_MUTED)
            y += ty.line(9.5)
        y += 0.12
        aspect = (geom.width / geom.height) if geom is not None else 1.0
        rows, h = _heat_arrangement(aspect, block_w)
        names = [
            "global: the thumbnail's [CLS] logits",
            "global guidance: the thumbnail's map resized onto the crops",
            "local: each crop's own [CLS] logits",
            "combined score: normalised global + normalised local",
        ]
        datas = [maps.thumbnail, maps.global_on_crops, maps.local, maps.score]
        for row in rows:
            widths = [min(h, _THUMB) if k == 0 else h * aspect for k in row]  # a square thumbnail map
            titles = [ty.wrap(names[k], w + _CBAR - 0.3, 9) for k, w in zip(row, widths)]
            title_h = max(len(t) for t in titles) * ty.line(9) + 0.05
            x = x0
            for k, w, tl in zip(row, widths, titles):
                for i, line in enumerate(tl):
                    sheet.text(x, y + i * ty.line(9), line, fontsize=9)
                data = datas[k]
                has = data.size > 0 and bool(np.isfinite(data).any())
                ph = w if k == 0 else h  # panel height
                cax_box = (x + w + 0.08, y + title_h, 0.12, ph)

                def heat_setup(ax: Any, data: np.ndarray = data, k: int = k, has: bool = has, cax_box: tuple = cax_box) -> None:
                    _bare(ax)
                    fig = ax.figure
                    if k > 0 and geom is None:
                        ax.text(0.5, 0.5, "single view:\nno crops", transform=ax.transAxes, ha="center", va="center", fontsize=9)
                        return
                    shape = data.shape if data.size else (side, side)
                    ax.set_xlim(-0.5, shape[1] - 0.5)
                    ax.set_ylim(shape[0] - 0.5, -0.5)
                    if has:
                        cmap = matplotlib.colormaps[_CMAP]
                        im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, interpolation="nearest", aspect="auto", zorder=1)
                        cax = fig.add_axes(sheet.rect(*cax_box))
                        bar = fig.colorbar(im, cax=cax)
                        bar.ax.tick_params(labelsize=7, length=2, pad=1.5)
                        bar.outline.set_linewidth(0.5)
                    if k > 0 and geom is not None:
                        for r0, c0, nr, nc in _pad_rects(geom):
                            _hatch_rect(ax, c0 - 0.5, r0 - 0.5, nc, nr)
                        _crop_lines(ax, geom, side, lw=1.0)
                        if not has:
                            ax.text(0.5, 0.5, "no unpadded\ncrop tokens", transform=ax.transAxes, ha="center", va="center",
                                    fontsize=9, zorder=7, bbox=dict(boxstyle="round", fc="white", ec="0.4"))

                sheet.axes(x, y + title_h, w, ph, heat_setup)
                x += w + _CBAR
            y += title_h + h + 0.25

    return sheet.build(y + _MARGIN * 0.6), notes


_METHOD_TITLES = {
    "globalcom2": "GlobalCom2",
    "fastervlm": "FasterVLM",
    "random": "Random pruning",
    "pooling": "Pooling",
    "fastv": "FastV",
}


def _method_title(method: str) -> str:
    return " + ".join(_METHOD_TITLES.get(part, part) for part in method.split("+"))


def visualize(
    model: Any,
    processor: Any,
    image: Any,
    retention_ratios: Sequence[float] = (0.25,),
    layout: str | None = None,
    heatmaps: bool = False,
    title: str | None = None,
    prompt: str | None = None,
    model_name: str | None = None,
    random_weights: bool = False,
    temperature: float | None = None,
    method: str = "globalcom2",
    options: dict[str, Any] | None = None,
) -> Visualization:
    """Draw what a method (GlobalCom2 by default) keeps of ``image`` at each retention ratio.

    Args:
        model: a LLaVA-NeXT model (patched by :func:`globalcom2.apply` or not; left exactly as it was).
        processor: its processor.
        image: a PIL image.
        retention_ratios: one row per ratio (each ``0 < R <= 1``).
        layout: layout of the selection methods (default: the method's own); it changes only the
            token counts, not which tokens are kept.
        heatmaps: add the [CLS] importance maps behind GlobalCom2's decisions.
        title: figure title (default: "<method>: kept visual tokens at R = ...").
        prompt: a question about the image, shown under the title. Vision-side methods do not
            depend on it; FastV does (its last token ranks the visual tokens), so with FastV the
            prompt is sent through the model (default ``"Describe the image."``).
        model_name: how to name the model (default: its ``name_or_path``, else its class).
        random_weights: mark the figure as made with a random-weights model (the tiny demo model).
        temperature: tau of GlobalCom2's crop budgets.
        method: any name of :func:`globalcom2.methods.method_names`. For FastV (alone or composed)
            a token counts as kept when it is still in the sequence after layer K.
        options: further method options (e.g. ``{"allocation": "uniform"}``, ``{"seed": 1}``).

    Returns:
        A :class:`Visualization` with the matplotlib figure, per-ratio masks and the importance maps.

    Raises:
        ValueError: a bad ratio, option or method, or an unsupported model.
        RuntimeError: matplotlib is not installed.
    """
    try:
        import matplotlib  # noqa: F401  (the object-oriented API only: no pyplot, no backend switch)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(PLOT_HINT) from exc
    from .adapters import adapter_for
    from .methods import fastv_config, make_config, option_names, vision_config

    retention_ratios = [retention_ratios] if isinstance(retention_ratios, (int, float)) else list(retention_ratios)
    if not retention_ratios:
        raise ValueError("retention_ratios must hold at least one ratio")
    opts = dict(options or {})
    for key, value in (("layout", layout), ("temperature", temperature)):
        if value is not None and key in option_names(method):
            opts[key] = value
    configs = [make_config(method, retention_ratio=r, **opts) for r in retention_ratios]
    method = configs[0].method
    vcfgs = [vision_config(c) for c in configs]
    uses_fastv = fastv_config(configs[0]) is not None
    shown_layout = vcfgs[0].layout if vcfgs[0] is not None and hasattr(vcfgs[0], "layout") else (
        "pooled" if vcfgs[0] is not None else "vanilla")
    # A fresh, never-patched adapter used for encode/compress only: the model's own state (applied or
    # not, its config, its adapter's `.last`) is not touched.
    adapter = adapter_for(model)(model, GlobalCom2Config())
    adapter.validate()
    image = to_rgb(image)  # 16-bit and float images keep their range
    image_token = getattr(processor, "image_token", None) or "<image>"
    inputs = processor(images=[image], text=[image_token], return_tensors="pt")
    param = next(adapter.inner.vision_tower.parameters())
    pixel_values = inputs["pixel_values"].to(device=param.device, dtype=param.dtype)
    with torch.no_grad():
        encoded = adapter.encode(pixel_values, inputs["image_sizes"])
        guide = adapter.compress(encoded, GlobalCom2Config()).plans[0]  # GlobalCom2's signals, for the maps
        plans = [adapter.compress(encoded, v).plans[0] if v is not None else None for v in vcfgs]
    vanilla = encoded.vanilla_counts[0]
    geom = encoded.geometries[0]
    vc = adapter.hf_config.vision_config
    view, side = int(vc.image_size), int(vc.image_size) // int(vc.patch_size)
    if uses_fastv:
        masks = [
            _fastv_masks(model, processor, image, prompt or "Describe the image.", cfg, plan, guide, vanilla)
            for cfg, plan in zip(configs, plans)
        ]
    else:
        masks = [_masks(p, cfg.retention_ratio, vanilla, side) for p, cfg in zip(plans, configs)]
    maps = _importance_maps(guide, encoded.importance[0][1:])

    cell = view // side
    thumb_px, canvas_px, lay = _model_views(image, geom, view)

    name = model_name or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    ratios = ", ".join(f"{r:g}" for r in retention_ratios)
    if geom is not None and lay is not None:
        seen = (
            f"thumbnail {view}x{view} + {geom.grid_h}x{geom.grid_w} crops of {view}x{view} (image resized to "
            f"{lay['new_width']}x{lay['new_height']} on a {lay['width']}x{lay['height']} canvas)"
        )
    else:
        seen = f"one {view}x{view} view"
    subtitle = f"{name} · image {image.width}x{image.height} px, seen as {seen}"
    fig, notes = _draw(
        thumb_px=thumb_px, canvas_px=canvas_px, lay=lay, geom=geom, masks=masks, maps=maps, heatmaps=heatmaps,
        view=view, cell=cell, side=side, title=title or f"{_method_title(method)}: kept visual tokens at R = {ratios}",
        subtitle=subtitle, prompt=prompt, random_weights=random_weights, layout=shown_layout, method=method,
    )
    return Visualization(fig, masks, maps, geom, (image.height, image.width), shown_layout, notes, method)


def _vanilla_plan(guide: ops.CompressionPlan) -> ops.CompressionPlan:
    """The vanilla sequence as a plan: every token kept, spatial layout (SPEC: equals vanilla)."""
    n = int(guide.thumb_importance.shape[-1])
    dev = guide.thumb_importance.device
    if guide.geometry is None:
        return ops.plan_single_view(guide.thumb_importance, 1.0, "spatial")
    return ops.assemble_plan(
        torch.arange(n, device=dev), guide.crop_valid.clone(), guide.crop_valid, guide.geometry, "spatial",
        torch.ones(guide.geometry.num_crops, dtype=torch.float64, device=dev), guide.thumb_importance, guide.crop_score,
    )


def _fastv_masks(
    model: Any, processor: Any, image: Any, prompt: str, config: Any, plan: Any, guide: ops.CompressionPlan, vanilla: int
) -> RatioMasks:
    """Which visual tokens are still in the sequence after FastV's layer K, on the thumbnail/crop grids.

    The model runs once on ``prompt`` with the method applied (on a copy of its patch state:
    whatever was applied before is restored). Every image token of the language model's input is
    traced back, through the vision-side plan (or the vanilla arrangement), to its view and position.
    """
    import globalcom2

    from .generation import build_prompt
    from .methods import fastv_config

    if plan is not None and not isinstance(plan, ops.CompressionPlan):
        raise ValueError("drawing FastV after pooling is not supported (pooled tokens have no single source)")
    text = build_prompt(processor, prompt)
    inputs = processor(images=[image], text=[text], return_tensors="pt").to(next(model.parameters()).device)
    with globalcom2.compressed(model, config), torch.no_grad():
        adapter = globalcom2.get_adapter(model)
        model(**inputs)
        kept_positions = adapter.fastv.last_kept_positions[0].cpu()  # (k,) sorted positions in the LM input
        visual_positions = adapter.last_visual_positions[0].cpu()  # (n,) positions of the image tokens
        used = adapter.last.plans[0] if plan is not None else _vanilla_plan(guide)
    index = used.index.cpu()
    kept_visual = torch.isin(visual_positions, kept_positions)  # (n,)
    rows = index[kept_visual]  # table rows that survive layer K
    n = int(guide.thumb_importance.shape[-1])
    geom = guide.geometry
    c = 0 if geom is None else geom.num_crops
    side = math.isqrt(n)
    thumb = np.zeros(n, dtype=bool)
    thumb[rows[rows < n].numpy()] = True
    crop = np.zeros((c, n), dtype=bool)
    in_crop = rows[(rows >= n) & (rows < n + c * n)] - n
    crop.reshape(-1)[in_crop.numpy()] = True
    ratio = float(config.retention_ratio)
    note = f"kept = still in the sequence after layer {fastv_config(config).layer} ({int(kept_visual.sum())} of {index.numel()} visual tokens)"
    if geom is None:
        empty = np.zeros((0, 0), dtype=bool)
        return RatioMasks(ratio, thumb.reshape(side, side), empty, empty, np.zeros(0), [], [],
                          int(kept_visual.sum()), vanilla, note=note)
    valid = guide.crop_valid.cpu().numpy()
    counts = [int(v) for v in valid.sum(1)]
    kept_counts = [int(v) for v in crop.sum(1)]
    return RatioMasks(
        retention_ratio=ratio, thumb_kept=thumb.reshape(side, side), crop_kept=_to_grid(crop, geom),
        valid=_to_grid(valid, geom), crop_ratios=np.array([k / max(1, v) for k, v in zip(kept_counts, counts)]),
        crop_kept_counts=kept_counts, crop_valid_counts=counts, num_tokens=int(kept_visual.sum()),
        vanilla_tokens=vanilla, note=note,
    )
