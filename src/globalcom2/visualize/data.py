"""The data behind the pictures: what a method keeps (:class:`RatioMasks`) and the importance that
drove GlobalCom2's decisions (:class:`ImportanceMaps`), as arrays on the token grids, from the plans.

The joint token grid of the crops is (H, W) = (gh * S, gw * S): token ``(row, col)`` is token
``(row % S) * S + col % S`` of crop ``(row // S) * gw + col // S`` (:func:`_to_grid`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..core.geometry import CropGeometry
from ..core.layouts import CompressionPlan, assemble_plan
from ..core.plans import plan_single_view
from .._io import atomic_path
from ..picture import joint_grid

__all__ = ["ImportanceMaps", "RatioMasks", "Visualization"]

# (C, N) crop-major -> (H, W) joint grid.
_to_grid = joint_grid


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
    geometry: CropGeometry | None
    image_size: tuple[int, int]
    layout: str
    notes: list[str] = field(default_factory=list)
    method: str = "globalcom2"

    def save(self, path: str, dpi: int = 110) -> None:
        """Write the figure as PNG, atomically (nothing half-written on failure)."""
        with atomic_path(path) as tmp:
            self.figure.savefig(tmp, dpi=dpi, format="png", facecolor="white")


# -- masks: one RatioMasks per plan (kept tokens on the grids) -------------------------------------


def _masks(plan: Any, ratio: float, vanilla: int, side: int | None = None) -> RatioMasks:
    """What ``plan`` keeps at ``ratio``, from its ``kept_masks()``, whatever the method (a pooling
    plan reports every unpadded token as feeding a pooled one). ``side`` is not needed any more
    (kept for callers of 0.1)."""
    m = plan.kept_masks()
    s = math.isqrt(int(m.thumb.shape[0]))
    thumb = m.thumb.numpy().reshape(s, s)
    geom = plan.geometry
    tail = dict(thumb_tokens=m.thumb_tokens, crop_tokens=m.crop_tokens, note=m.note, pooled=m.pooled)
    if geom is None:
        empty = np.zeros((0, 0), dtype=bool)
        return RatioMasks(ratio, thumb, empty, empty, np.zeros(0), [], [], plan.num_tokens, vanilla, **tail)
    keep, valid = m.crop.numpy(), m.valid.numpy()
    return RatioMasks(
        retention_ratio=ratio,
        thumb_kept=thumb,
        crop_kept=_to_grid(keep, geom),
        valid=_to_grid(valid, geom),
        crop_ratios=m.crop_ratios.numpy(),
        crop_kept_counts=[int(v) for v in keep.sum(1)],
        crop_valid_counts=[int(v) for v in valid.sum(1)],
        num_tokens=plan.num_tokens,
        vanilla_tokens=vanilla,
        **tail,
    )


# -- importance maps: the same for every ratio -----------------------------------------------------


def _importance_maps(plan: CompressionPlan, local: torch.Tensor) -> ImportanceMaps:
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


# -- FastV: kept = still in the sequence after layer K ---------------------------------------------


def _vanilla_plan(guide: CompressionPlan) -> CompressionPlan:
    """The vanilla sequence as a plan: every token kept, spatial layout (SPEC: equals vanilla)."""
    n = int(guide.thumb_importance.shape[-1])
    dev = guide.thumb_importance.device
    if guide.geometry is None:
        return plan_single_view(guide.thumb_importance, 1.0, "spatial")
    return assemble_plan(
        torch.arange(n, device=dev), guide.crop_valid.clone(), guide.crop_valid, guide.geometry, "spatial",
        torch.ones(guide.geometry.num_crops, dtype=torch.float64, device=dev), guide.thumb_importance, guide.crop_score,
    )


def _fastv_masks(
    model: Any, processor: Any, image: Any, prompt: str, config: Any, plan: Any, guide: CompressionPlan, vanilla: int,
    vanilla_plan: Any = None,
) -> RatioMasks:
    """Which visual tokens are still in the sequence after FastV's layer K, on the thumbnail/crop grids.

    The model runs once on ``prompt`` with the method applied (on a copy of its patch state:
    whatever was applied before is restored). Every image token of the language model's input is
    traced back, through the vision-side plan (or the vanilla arrangement), to its view and position.
    """
    import globalcom2

    from ..generation import build_prompt
    from ..methods import fastv_config

    if plan is not None and not isinstance(plan, CompressionPlan):
        raise ValueError("drawing FastV after pooling is not supported (pooled tokens have no single source)")
    text = build_prompt(processor, prompt)
    inputs = processor(images=[image], text=[text], return_tensors="pt").to(next(model.parameters()).device)
    with globalcom2.compressed(model, config), torch.no_grad():
        adapter = globalcom2.get_family(model)
        model(**inputs)
        kept_positions = adapter.fastv.last_kept_positions[0].cpu()  # (k,) sorted positions in the LM input
        visual_positions = adapter.last_visual_positions[0].cpu()  # (n,) positions of the image tokens
        used = adapter.last.plans[0] if plan is not None else (vanilla_plan if vanilla_plan is not None else _vanilla_plan(guide))
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
