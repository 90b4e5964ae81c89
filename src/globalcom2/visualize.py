"""Pictures of what GlobalCom2 keeps, and why (matplotlib).

For one image and one or more retention ratios, :func:`visualize` draws, one row per ratio, the
thumbnail and the crop grid the way the model sees them (resized; padding hatched), with the kept
tokens bright and the dropped ones dimmed, each crop labelled with its retention ratio ``r_j`` and
kept/unpadded counts. With ``heatmaps=True`` one more row shows the [CLS] importance maps that
drove the decision: the thumbnail's (global), the thumbnail's resized onto the crops' unpadded
area (global guidance per crop), the crops' own (local), and the combined score. Those maps do not
depend on the ratio, so they are drawn once.

The image is encoded once; every ratio reuses the same features. The model is left exactly as it
was (patched or not, with the same settings).

>>> vis = visualize(model, processor, image, retention_ratios=(0.5, 0.25, 0.1), heatmaps=True)  # doctest: +SKIP
>>> vis.save("kept.png"); vis.masks[1].crop_kept.sum()                                         # doctest: +SKIP
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from . import ops
from ._io import atomic_path
from .config import GlobalCom2Config
from .picture import _token_image, canvas_layout

__all__ = ["RatioMasks", "ImportanceMaps", "Visualization", "visualize"]

RANDOM_WEIGHTS_NOTE = "Random weights (demo model): which tokens are kept is meaningless; counts and budgets are real."


@dataclass
class RatioMasks:
    """What GlobalCom2 keeps at one retention ratio, as arrays on the token grids.

    Attributes:
        retention_ratio: R.
        thumb_kept: (S, S) bool, kept thumbnail tokens.
        crop_kept: (H, W) bool on the crops' joint token grid (crop j covers rows
            ``(j // gw) * S ...`` and columns ``(j % gw) * S ...``); empty (0, 0) without crops.
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
    """A rendered figure and the data behind it."""

    figure: Any
    masks: list[RatioMasks]
    importance: ImportanceMaps
    geometry: ops.CropGeometry | None
    image_size: tuple[int, int]
    layout: str
    notes: list[str] = field(default_factory=list)

    def save(self, path: str, dpi: int = 110) -> None:
        """Write the figure as PNG, atomically (nothing half-written on failure)."""
        with atomic_path(path) as tmp:
            self.figure.savefig(tmp, dpi=dpi, format="png", facecolor="white")


def _to_grid(x: np.ndarray, geom: ops.CropGeometry) -> np.ndarray:
    """(C, N) crop-major -> (H, W) joint grid."""
    s = geom.side
    return x.reshape(geom.grid_h, geom.grid_w, s, s).transpose(0, 2, 1, 3).reshape(geom.height, geom.width)


def _masks(plan: ops.CompressionPlan, ratio: float, vanilla: int) -> RatioMasks:
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


def _crop_caption(m: RatioMasks, geom: ops.CropGeometry | None, lay: dict[str, int] | None, layout: str, chars: int) -> str:
    if geom is None or lay is None:
        return ""
    caption = (
        f"crops: {geom.grid_h}x{geom.grid_w} grid, image resized to {lay['new_width']}x{lay['new_height']} on a "
        f"{lay['width']}x{lay['height']} canvas; kept {sum(m.crop_kept_counts):,}/{sum(m.crop_valid_counts):,} unpadded "
        f"tokens. The language model sees {m.num_tokens:,} of {m.vanilla_tokens:,} visual tokens "
        f"({m.num_tokens / m.vanilla_tokens:.0%}; {layout} layout, newlines included)."
    )
    return textwrap.fill(caption, chars)


def _model_views(image: Any, geom: ops.CropGeometry | None, view: int) -> tuple[np.ndarray, np.ndarray | None, dict[str, int] | None]:
    """(thumbnail pixels, crop canvas pixels, canvas layout) as the processor builds them."""
    from PIL import Image

    image = image.convert("RGB")
    thumb = np.asarray(image.resize((view, view), Image.Resampling.BICUBIC))
    if geom is None:
        return thumb, None, None
    lay = canvas_layout((image.height, image.width), (geom.grid_h, geom.grid_w), view)
    canvas = np.zeros((lay["height"], lay["width"], 3), np.uint8)
    resized = image.resize((lay["new_width"], lay["new_height"]), Image.Resampling.BICUBIC)
    canvas[lay["top"] : lay["top"] + lay["new_height"], lay["left"] : lay["left"] + lay["new_width"]] = np.asarray(resized)
    return thumb, canvas, lay


def visualize(
    model: Any,
    processor: Any,
    image: Any,
    retention_ratios: Sequence[float] = (0.25,),
    layout: str = "official",
    heatmaps: bool = False,
    title: str | None = None,
    random_weights: bool = False,
    temperature: float = 10.0,
) -> Visualization:
    """Draw what GlobalCom2 keeps of ``image`` at each retention ratio (one row each).

    Args:
        model: a LLaVA-NeXT model (patched or not; left as it was).
        processor: its processor.
        image: a PIL image.
        retention_ratios: one row per ratio.
        layout: GlobalCom2 layout (changes only the token count: the kept sets are the same).
        heatmaps: add a row with the importance maps behind the decisions.
        title: figure title (default: a description of the model and image).
        random_weights: mark the figure as made with a random-weights model.
        temperature: tau of the crop budgets.

    Returns:
        A :class:`Visualization` with the matplotlib figure, per-ratio masks and the maps.
    """
    try:
        # The object-oriented API: no pyplot state, no backend switch (notebooks keep theirs).
        import matplotlib
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("pictures need matplotlib: pip install 'globalcom2[plot]'") from exc
    from .adapters import adapter_for

    configs = [GlobalCom2Config(retention_ratio=r, layout=layout, temperature=temperature) for r in retention_ratios]
    if not configs:
        raise ValueError("retention_ratios must hold at least one ratio")
    adapter = adapter_for(model)(model, configs[0])  # not patched: used for encode/compress only
    inputs = processor(images=[image], text=[getattr(processor, "image_token", None) or "<image>"], return_tensors="pt")
    device = next(model.parameters()).device
    pixel_values = inputs["pixel_values"].to(device=device, dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        encoded = adapter.encode(pixel_values, inputs["image_sizes"])
        results = [adapter.compress(encoded, cfg) for cfg in configs]
    vanilla = encoded.vanilla_counts[0]
    plans = [res.plans[0] for res in results]
    masks = [_masks(p, cfg.retention_ratio, vanilla) for p, cfg in zip(plans, configs)]
    geom = plans[0].geometry
    maps = _importance_maps(plans[0], encoded.importance[0][1:])

    vc = model.config.vision_config
    view, side = vc.image_size, vc.image_size // vc.patch_size
    cell = view // side
    thumb_px, canvas_px, lay = _model_views(image, geom, view)

    # -- figure layout (inches): a caption band above every row; the crop canvas gets the row height --
    crop_aspect = (lay["width"] / lay["height"]) if lay else 1.0
    row_h, thumb_w, gap = 4.0, 2.6, 0.3
    if crop_aspect < 1:  # a tall canvas: taller rows, so that the crops are not tiny
        row_h = min(row_h / crop_aspect, 7.5)
    crop_w = min(max(row_h * crop_aspect, 2.0), 11.5)
    if crop_w >= 11.5:  # a very wide canvas: shorter rows instead of an endless figure
        row_h = max(1.6, crop_w / crop_aspect)
    chars = max(int(crop_w * 72 / (8.5 * 0.6)), 40)  # characters that fit over the crop panel at 8.5 pt
    captions = [_crop_caption(m, geom, lay, layout, chars) for m in masks]
    caption_h = 0.3 + 0.17 * max([2] + [c.count("\n") + 1 for c in captions])
    content_w = thumb_w + gap + crop_w
    heat_h = 2.6 if heatmaps else 0.0
    top_in, bottom_in = 0.75, 0.8
    fig_w = max(content_w + 0.6, 11.0 if heatmaps else 7.0)
    fig_h = top_in + (caption_h + row_h) * len(masks) + (caption_h + heat_h if heatmaps else 0.0) + bottom_in
    fig = Figure(figsize=(fig_w, fig_h))
    side_margin = (fig_w - content_w) / 2 / fig_w

    def band(index: int) -> tuple[float, float]:
        """(bottom, top) of ratio row ``index``'s image area, in figure fractions."""
        top = fig_h - top_in - index * (caption_h + row_h) - caption_h
        return (top - row_h) / fig_h, top / fig_h


    notes: list[str] = []
    for row, (m, plan) in enumerate(zip(masks, plans)):
        bottom, top = band(row)
        inner = fig.add_gridspec(
            1, 2, width_ratios=[thumb_w, crop_w], wspace=gap / (content_w / 2),
            left=side_margin, right=1 - side_margin, bottom=bottom, top=top,
        )
        ax_t = fig.add_subplot(inner[0])
        ax_t.imshow(np.asarray(_token_image(thumb_px, m.thumb_kept, np.ones_like(m.thumb_kept), cell)))
        kept_t = int(m.thumb_kept.sum())
        ax_t.set_title(
            f"R = {m.retention_ratio:g}\nthumbnail: kept {kept_t}/{m.thumb_kept.size} ({kept_t / m.thumb_kept.size:.0%})",
            fontsize=9.5, loc="left",
        )
        ax_t.axis("off")
        ax_t.set_anchor("NE")
        ax_c = fig.add_subplot(inner[1])
        ax_c.set_anchor("NW")
        ax_c.axis("off")
        if geom is None or canvas_px is None:
            ax_c.text(0.5, 0.5, "single view: no crops", ha="center", va="center", fontsize=11)
            continue
        ax_c.imshow(np.asarray(_token_image(canvas_px, m.crop_kept, m.valid, cell)))
        ax_c.set_title(captions[row], fontsize=8.5, loc="left")
        for r in range(1, geom.grid_h):
            ax_c.axhline(r * view - 0.5, color="white", lw=1.5)
        for c in range(1, geom.grid_w):
            ax_c.axvline(c * view - 0.5, color="white", lw=1.5)
        for j in range(geom.num_crops):
            y0, x0 = (j // geom.grid_w) * view, (j % geom.grid_w) * view
            label = f"r={m.crop_ratios[j]:.2f}  {m.crop_kept_counts[j]}/{m.crop_valid_counts[j]}"
            if m.crop_valid_counts[j] == 0:
                label = "all padding"
            ax_c.text(x0 + 8, y0 + 10, label, fontsize=8, va="top", ha="left",
                      bbox=dict(boxstyle="round,pad=0.25", fc="white", ec="0.3", alpha=0.9))
        if geom.is_empty:
            ax_c.text(lay["width"] / 2, lay["height"] / 2, "no unpadded crop tokens:\nthe image contributes its thumbnail only",
                      ha="center", va="center", fontsize=10, color="white",
                      bbox=dict(boxstyle="round", fc="0.15", ec="white"))
            if row == 0:
                notes.append("no crop token survives unpadding")

    if heatmaps:
        hm_top = fig_h - top_in - len(masks) * (caption_h + row_h) - caption_h * 0.8
        hm = fig.add_gridspec(1, 4, wspace=0.45, left=0.03, right=0.94, bottom=(hm_top - heat_h) / fig_h, top=hm_top / fig_h)
        panels = [
            (maps.thumbnail, "global: thumbnail [CLS] logits"),
            (maps.global_on_crops, "global guidance resized\nonto the unpadded crops"),
            (maps.local, "local: each crop's own\n[CLS] logits"),
            (maps.score, "combined score\n(normalised global + local)"),
        ]
        for k, (data, name) in enumerate(panels):
            ax = fig.add_subplot(hm[k])
            ax.axis("off")
            if data.size == 0 or not np.isfinite(data).any():
                ax.text(0.5, 0.5, "no unpadded crop tokens", ha="center", va="center", fontsize=9)
                ax.set_title(name, fontsize=9)
                continue
            cmap = matplotlib.colormaps["magma"].with_extremes(bad="0.85")
            im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, interpolation="nearest")
            if k > 0 and geom is not None:
                for r in range(1, geom.grid_h):
                    ax.axhline(r * side - 0.5, color="white", lw=1)
                for c in range(1, geom.grid_w):
                    ax.axvline(c * side - 0.5, color="white", lw=1)
            ax.set_title(name, fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=7)

    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    ratios = ", ".join(f"{r:g}" for r in retention_ratios)
    fig.suptitle(
        title or f"GlobalCom2: kept visual tokens at R = {ratios}\n{name}, image {image.width}x{image.height}",
        fontsize=12.5, fontweight="bold", y=1 - 0.12 / fig_h, va="top",
    )
    legend = [
        Patch(facecolor=(0.9, 0.75, 0.45), edgecolor="0.3", label="kept token (reaches the LM)"),
        Patch(facecolor=(0.2, 0.2, 0.23), edgecolor="0.3", label="dropped token (dimmed)"),
        Patch(facecolor=(0.1, 0.1, 0.12), edgecolor="0.5", hatch="///", label="padding (removed by unpadding)"),
    ]
    fig.legend(handles=legend, loc="lower left", ncol=3, fontsize=8.5, frameon=False, bbox_to_anchor=(0.01, 0.0))
    if random_weights:
        fig.text(0.015, 0.42 / fig_h, RANDOM_WEIGHTS_NOTE, ha="left", va="bottom", fontsize=8.5, color=(0.7, 0.15, 0.1), fontweight="bold")
    return Visualization(fig, masks, maps, geom, (image.height, image.width), layout, notes)
