"""The figure, laid out in inches so that nothing overlaps (text is measured before it is placed):

* the header (:func:`_header`): title, subtitle, prompt, the random-weights warning;
* the legend (:func:`_legend`);
* one row per retention ratio (:func:`_ratio_row`): what the language model gets, then the
  thumbnail and the crops panels with the kept tokens as they are and the dropped ones greyed out;
* with ``heatmaps``, the importance maps behind the decisions (:func:`_heatmaps`).

matplotlib is imported only while drawing (see :mod:`.sheet`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from ..core.geometry import CropGeometry
from .data import ImportanceMaps, RatioMasks
from .pixels import _kept_pixels, _swatches
from .sheet import _bare, _crop_lines, _hatch_rect, _Sheet, _Type
from .style import (
    CBAR,
    CMAP,
    CROPS_MAX_H,
    CROPS_MAX_W,
    GAP,
    MARGIN,
    METHOD_TITLES,
    MIN_W,
    MIN_W_HEAT,
    MUTED,
    NOTE,
    RANDOM_WEIGHTS_NOTE,
    ROW_SPACE,
    TEXT,
    THUMB,
    VIEW_MAX,
)

__all__ = ["_draw", "_heat_arrangement", "_pad_rects", "_subtitle"]

_LEGEND = (
    ("kept", "kept token (reaches the language model)"),
    ("dropped", "dropped token (greyed out)"),
    ("padding", "padding (removed by unpadding)"),
)
_EMPTY_CROPS = "no unpadded crop tokens: the image contributes its thumbnail tokens only"
_HEAT_TITLE = "What drove the decision (the same for every R)"
_HEAT_EXPLANATION = (
    "[CLS] attention logits of the vision tower's last layer (pre-softmax, mean over heads). The thumbnail's "
    "map, summed over each crop's region, sets the crop budgets r_j; inside a crop, tokens are ranked by the "
    "combined score. Hatched grey: padding (no token)."
)
_HEAT_NAMES = (
    "global: the thumbnail's [CLS] logits",
    "global guidance: the thumbnail's map resized onto the crops",
    "local: each crop's own [CLS] logits",
    "combined score: normalised global + normalised local",
)


def _subtitle(
    name: str, image_wh: tuple[int, int], geom: CropGeometry | None, lay: dict[str, int] | None, view: int
) -> str:
    """The header's subtitle: the model, the image's size and how the model sees it (the views)."""
    if geom is not None and lay is not None:
        seen = (
            f"thumbnail {view}x{view} + {geom.grid_h}x{geom.grid_w} crops (rows x columns) of {view}x{view} (image "
            f"resized to {lay['new_width']}x{lay['new_height']} on a {lay['width']}x{lay['height']} canvas)"
        )
    else:
        seen = f"one {view}x{view} view"
    return f"{name} · image {image_wh[0]}x{image_wh[1]} px (sizes: width x height), seen as {seen}"


def _pad_rects(geom: CropGeometry) -> list[tuple[int, int, int, int]]:
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


def _heat_arrangement(aspect: float, width: float) -> tuple[list[list[int]], float]:
    """Rows of heat-map panels (indices 0..3, 0 = thumbnail) and the panel height, in inches.

    One row ``[1, a, a, a]`` (a = the crop grid's width / height) while the maps stay readable
    (square and tall grids), else two rows ``[1, a], [a, a]`` (wide grids).
    """
    cap = 2.6 if aspect >= 1 else 4.0
    one = min((width - 4 * CBAR) / (1 + 3 * aspect), cap)
    if one >= 1.5:
        return [[0, 1, 2, 3]], one
    return [[0, 1], [2, 3]], min((width - 2 * CBAR) / max(2 * aspect, 1 + aspect), cap)


# -- the page: what every part shares ----------------------------------------------------------------


@dataclass
class _Page:
    """What every part of the figure shares: text measurement, the sheet it is drawn on, the views,
    and the sizes of the text block and of the panels (inches)."""

    ty: _Type
    sheet: _Sheet
    geom: CropGeometry | None
    view: int  # pixels per side of one view
    cell: int  # pixels per side of one token
    side: int  # tokens per side of one view
    x0: float  # left edge of the text block
    block_w: float  # width of the text block
    thumb_in: float  # side of the thumbnail panel
    view_in: float  # side of one crop in the crops panel
    crop_w: float  # the crops panel's width
    crop_h: float  # and height


def _page(geom: CropGeometry | None, heatmaps: bool, *, view: int, cell: int, side: int) -> _Page:
    """The sizes: crops as large as fit (``VIEW_MAX`` a crop at most), the thumbnail no taller than
    the crops (but at least 1.8 in), the text block at least ``MIN_W`` wide (``MIN_W_HEAT`` with
    the heat maps) and the figure that plus its margins."""
    if geom is not None:
        view_in = min(VIEW_MAX, CROPS_MAX_W / geom.grid_w, CROPS_MAX_H / geom.grid_h)
        crop_w, crop_h = view_in * geom.grid_w, view_in * geom.grid_h
    else:
        view_in, crop_w, crop_h = THUMB, 0.0, 0.0
    thumb_in = THUMB if geom is None else min(THUMB, max(crop_h, 1.8))
    content_w = thumb_in + (GAP + crop_w if geom is not None else 0.0)
    block_w = max(content_w, MIN_W_HEAT if heatmaps else MIN_W)
    sheet = _Sheet(block_w + 2 * MARGIN)
    return _Page(_Type(), sheet, geom, view, cell, side, MARGIN, block_w, thumb_in, view_in, crop_w, crop_h)


def _wrapped(
    page: _Page, x: float, y: float, text: str, width: float, size: float, weight: str = "normal", **kw: Any
) -> float:
    """``text`` wrapped to ``width`` inches at ``size`` points, line under line from (x, y); returns
    y under the last line. ``weight`` measures the text (and is its ``fontweight`` unless normal);
    ``kw`` goes to each text."""
    if weight != "normal":
        kw["fontweight"] = weight
    for line in page.ty.wrap(text, width, size, weight):
        page.sheet.text(x, y, line, fontsize=size, **kw)
        y += page.ty.line(size)
    return y


def _block(page: _Page, x: float, y: float, lines: list[str], size: float, **kw: Any) -> None:
    """Lines already wrapped, at ``size`` points, the first one's top left at (x, y)."""
    for k, line in enumerate(lines):
        page.sheet.text(x, y + k * page.ty.line(size), line, fontsize=size, **kw)


# -- header and legend --------------------------------------------------------------------------------


def _prompt_line(prompt: str, method: str) -> str:
    """The prompt as the header quotes it (white space folded), and whether the method's choice depends on it."""
    return f'prompt: "{" ".join(prompt.split())}"' + (
        " (FastV's choice depends on it: the prompt's last token ranks the visual tokens)" if "fastv" in method
        else f" ({METHOD_TITLES.get(method, method)}'s choice does not depend on it: only the vision side decides)"
    )


def _header(
    page: _Page, y: float, title: str, subtitle: str, prompt: str | None, method: str, random_weights: bool
) -> float:
    """The centred header from ``y`` down: the title, the subtitle, the prompt (:func:`_prompt_line`)
    and the random-weights warning. Returns y under it."""
    mid, width = page.sheet.width / 2, page.block_w
    y = _wrapped(page, mid, y, title, width, 14, "bold", ha="center")
    y += 0.04
    y = _wrapped(page, mid, y, subtitle, width, 10, ha="center", color=MUTED)
    if prompt:
        y = _wrapped(page, mid, y, _prompt_line(prompt, method), width, 10, ha="center", color=MUTED, fontstyle="italic")
    if random_weights:
        y += 0.06
        y = _wrapped(page, mid, y, RANDOM_WEIGHTS_NOTE, width, 10.5, "bold", ha="center", color=NOTE)
    y += 0.16
    return y


def _legend(page: _Page, y: float) -> float:
    """The legend from ``y``: swatches drawn like the tokens (kept, dropped, padding) and what one
    cell is, the items flowing onto a second line when the first is full. Returns y under it."""
    ty, sheet, x0 = page.ty, page.sheet, page.x0
    items = [*_LEGEND, (None, f"one cell = one visual token ({page.cell}x{page.cell} px patch)")]
    swatches = _swatches()
    sw_w, sw_h, size = 0.34, 0.17, 9
    x = x0
    for kind, label in items:
        need = (sw_w + 0.08 if kind else 0) + ty.width(label, size)
        if x > x0 and x + need > x0 + page.block_w:
            x, y = x0, y + 0.3
        if kind is not None:
            sheet.axes(x, y + 0.01, sw_w, sw_h, partial(_swatch_axes, kind=kind, swatches=swatches))
            x += sw_w + 0.08
        sheet.text(x, y + 0.01, label, fontsize=size, color=TEXT if kind else MUTED)
        x += ty.width(label, size) + 0.3
    y += 0.45
    return y


def _swatch_axes(ax: Any, kind: str, swatches: dict[str, np.ndarray]) -> None:
    """Draws one legend swatch: hatched for padding, else ``swatches[kind]``."""
    _bare(ax)
    if kind == "padding":
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        _hatch_rect(ax, 0, 0, 1, 1)
    else:
        ax.imshow(swatches[kind], aspect="auto", interpolation="nearest")


# -- one row per retention ratio -----------------------------------------------------------------------


def _ratio_row(
    page: _Page,
    y: float,
    m: RatioMasks,
    thumb_px: np.ndarray,
    canvas_px: np.ndarray | None,
    lay: dict[str, int] | None,
    layout: str,
    notes: list[str],
) -> float:
    """One retention ratio from ``y``: its summary (:func:`_row_summary`), the panel titles
    (:func:`_panel_titles`), the thumbnail and, with crops, the crops panel (:func:`_crops_panel`).
    Adds to ``notes`` (once) that no crop token survives unpadding, where so. Returns y under the row."""
    y = _row_summary(page, y, m, layout)
    y = _panel_titles(page, y, m, lay)
    thumb_img = _kept_pixels(thumb_px, m.thumb_kept, np.ones_like(m.thumb_kept), page.cell)
    page.sheet.axes(page.x0, y, page.thumb_in, page.thumb_in, partial(_thumb_axes, img=thumb_img))
    geom = page.geom
    if geom is None or canvas_px is None:
        y += page.thumb_in + ROW_SPACE
        return y
    _crops_panel(page, y, m, canvas_px)
    if geom.is_empty and not notes:
        notes.append("no crop token survives unpadding: the image contributes its thumbnail tokens only")
    y += max(page.thumb_in, page.crop_h) + ROW_SPACE
    return y


def _token_summary(m: RatioMasks, crops: bool, layout: str) -> str:
    """What the language model gets at this ratio: its visual tokens (the share of vanilla's), part
    by part (thumbnail, ``crops``' tokens, row newlines), in the ``layout``; then the masks' note."""
    parts = f"{int(m.thumb_tokens):,} thumbnail"
    if crops:
        parts += f" + {int(m.crop_tokens):,} crop tokens"
    parts += f" + {m.newlines:,} row newline{'s' if m.newlines != 1 else ''}"
    summary = (
        f"the language model gets {m.num_tokens:,} of {m.vanilla_tokens:,} visual tokens "
        f"({m.num_tokens / m.vanilla_tokens:.0%}): {parts} ({layout} layout)"
    )
    if m.note:
        summary += f"; {m.note}"
    return summary


def _row_summary(page: _Page, y: float, m: RatioMasks, layout: str) -> float:
    """The row's header: ``R = ...`` in bold, and right of it :func:`_token_summary`. Returns y under it."""
    ty = page.ty
    head = f"R = {m.retention_ratio:g}"
    head_w = ty.width(head, 12.5, "bold") + 0.15
    page.sheet.text(page.x0, y - 0.02, head, fontsize=12.5, fontweight="bold")
    lines = ty.wrap(_token_summary(m, page.geom is not None, layout), page.block_w - head_w, 9.5)
    _block(page, page.x0 + head_w, y, lines, 9.5, color=MUTED)
    y += max(ty.line(12.5), len(lines) * ty.line(9.5)) + 0.1
    return y


def _panel_titles(page: _Page, y: float, m: RatioMasks, lay: dict[str, int] | None) -> float:
    """The titles over the thumbnail (kept, or pooled, of its tokens) and over the crops (the grid,
    kept of the unpadded tokens). Returns y under the longer."""
    ty, geom = page.ty, page.geom
    n_thumb = m.thumb_kept.size
    t_title = ty.wrap(f"thumbnail: {'pooled to' if m.pooled else 'kept'} {m.thumb_tokens}/{n_thumb} "
                      f"({int(m.thumb_tokens) / n_thumb:.0%})", page.thumb_in, 9.5)
    c_title: list[str] = []
    if geom is not None and lay is not None:
        crop_total = int(m.crop_tokens)
        valid_total = sum(m.crop_valid_counts)
        share = f" ({crop_total / valid_total:.0%})" if valid_total else ""
        c_title = ty.wrap(
            f"crops: {geom.grid_h}x{geom.grid_w} grid (rows x columns), {'pooled to' if m.pooled else 'kept'} "
            f"{crop_total:,}/{valid_total:,} unpadded tokens{share}",
            page.block_w - page.thumb_in - GAP, 9.5,  # nothing is right of the crops: the title may use that room
        )
    _block(page, page.x0, y, t_title, 9.5)
    _block(page, page.x0 + page.thumb_in + GAP, y, c_title, 9.5)
    y += max(len(t_title), len(c_title)) * ty.line(9.5) + 0.05
    return y


def _thumb_axes(ax: Any, img: np.ndarray) -> None:
    """Draws the thumbnail panel: its token pixels."""
    _bare(ax)
    ax.imshow(img, interpolation="antialiased")


def _crops_panel(page: _Page, y: float, m: RatioMasks, canvas_px: np.ndarray) -> None:
    """The crops panel at ``y``, right of the thumbnail (:func:`_crop_axes`)."""
    crop_img = _kept_pixels(canvas_px, m.crop_kept, m.valid, page.cell)
    empty_text = "\n".join(page.ty.wrap(_EMPTY_CROPS, page.crop_w * 0.8 - 0.2, 9.5))
    setup = partial(_crop_axes, page=page, img=crop_img, m=m, empty_text=empty_text)
    page.sheet.axes(page.x0 + page.thumb_in + GAP, y, page.crop_w, page.crop_h, setup)


def _crop_axes(ax: Any, page: _Page, img: np.ndarray, m: RatioMasks, empty_text: str) -> None:
    """Draws the crops panel: the canvas's token pixels, the padding hatched, lines between the
    crops, each crop's label (``r_j`` and kept/unpadded tokens, or pooled, or all padding), and
    ``empty_text`` across it when no crop token survives unpadding."""
    geom, cell, view = page.geom, page.cell, page.view
    label_size = 8 if page.view_in >= 1.5 else 6.5
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
            fontsize=label_size, color=TEXT, zorder=6,
            bbox=dict(boxstyle="round,pad=0.25", fc="white", ec="0.35", lw=0.6, alpha=0.92),
        )
    if geom.is_empty:
        ax.text(0.5, 0.5, empty_text, transform=ax.transAxes, ha="center", va="center", fontsize=9.5,
                color="white", zorder=7, bbox=dict(boxstyle="round,pad=0.5", fc="0.2", ec="white"))


# -- the importance maps -------------------------------------------------------------------------------


def _heatmaps(page: _Page, y: float, maps: ImportanceMaps) -> float:
    """The last section from ``y``: its title, what the maps are, then the four maps
    (:func:`_heat_row`) in one row or two (:func:`_heat_arrangement`). Returns y under it."""
    ty, geom = page.ty, page.geom
    y += 0.1
    page.sheet.text(page.x0, y, _HEAT_TITLE, fontsize=12.5, fontweight="bold")
    y += ty.line(12.5) + 0.02
    y = _wrapped(page, page.x0, y, _HEAT_EXPLANATION, page.block_w, 9.5, color=MUTED)
    y += 0.12
    aspect = (geom.width / geom.height) if geom is not None else 1.0
    rows, h = _heat_arrangement(aspect, page.block_w)
    datas = [maps.thumbnail, maps.global_on_crops, maps.local, maps.score]
    for row in rows:
        y = _heat_row(page, y, row, h, aspect, datas)
    return y


def _heat_row(page: _Page, y: float, row: list[int], h: float, aspect: float, datas: list[np.ndarray]) -> float:
    """One row of heat maps (indices into ``datas``; 0, the thumbnail's, is square), ``h`` inches
    high, each with its title above and its colour bar on the right. Returns y under the row."""
    ty = page.ty
    widths = [min(h, THUMB) if k == 0 else h * aspect for k in row]  # a square thumbnail map
    titles = [ty.wrap(_HEAT_NAMES[k], w + CBAR - 0.3, 9) for k, w in zip(row, widths)]
    title_h = max(len(t) for t in titles) * ty.line(9) + 0.05
    x = page.x0
    for k, w, lines in zip(row, widths, titles):
        _block(page, x, y, lines, 9)
        data = datas[k]
        has = data.size > 0 and bool(np.isfinite(data).any())
        ph = w if k == 0 else h  # panel height
        cax_box = (x + w + 0.08, y + title_h, 0.12, ph)
        page.sheet.axes(x, y + title_h, w, ph, partial(_heat_axes, page=page, data=data, k=k, has=has, cax_box=cax_box))
        x += w + CBAR
    y += title_h + h + 0.25
    return y


def _heat_axes(ax: Any, page: _Page, data: np.ndarray, k: int, has: bool, cax_box: tuple) -> None:
    """Draws heat map ``k``: ``data`` (NaN hidden) with its colour bar at ``cax_box`` (inches) where
    it ``has`` values; on the crop maps (k > 0), the padding hatched and lines between the crops;
    a remark instead where there is nothing to show."""
    import matplotlib

    geom, side = page.geom, page.side
    _bare(ax)
    fig = ax.figure
    if k > 0 and geom is None:
        ax.text(0.5, 0.5, "single view:\nno crops", transform=ax.transAxes, ha="center", va="center", fontsize=9)
        return
    shape = data.shape if data.size else (side, side)
    ax.set_xlim(-0.5, shape[1] - 0.5)
    ax.set_ylim(shape[0] - 0.5, -0.5)
    if has:
        cmap = matplotlib.colormaps[CMAP]
        im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, interpolation="nearest", aspect="auto", zorder=1)
        cax = fig.add_axes(page.sheet.rect(*cax_box))
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


# -- the whole figure ----------------------------------------------------------------------------------


def _draw(
    *,
    thumb_px: np.ndarray,
    canvas_px: np.ndarray | None,
    lay: dict[str, int] | None,
    geom: CropGeometry | None,
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
    """Lay the figure out in inches (text measured, so nothing overlaps) and build it: the header
    (:func:`_header`), the legend (:func:`_legend`), one row per ratio (:func:`_ratio_row`) and,
    with ``heatmaps``, the importance maps (:func:`_heatmaps`). Returns the Figure and the notes."""
    page = _page(geom, heatmaps, view=view, cell=cell, side=side)
    y = MARGIN * 0.8
    y = _header(page, y, title, subtitle, prompt, method, random_weights)
    y = _legend(page, y)
    notes: list[str] = []
    for m in masks:
        y = _ratio_row(page, y, m, thumb_px, canvas_px, lay, layout, notes)
    if heatmaps:
        y = _heatmaps(page, y, maps)
    return page.sheet.build(y + MARGIN * 0.6), notes
