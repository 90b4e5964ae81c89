"""Selection on a resized crop map (LLaVA-OneVision's ``vision_aspect_ratio="anyres_max_K"``).

When the crops' unpadded area ``h x w`` is large, the model resizes that feature map bilinearly
to ``(h', w')`` before the language model (Hugging Face ``pack_image_features``: with
``s = sqrt(h w / (K N))``, resized when ``s > 1.1``, to ``(int(h // s), int(w // s))``).
``SPEC.md`` ("LLaVA-OneVision") says how GlobalCom2 selects on that map: the crops' local
importance (the unpadded ``h x w`` map) and the thumbnail's ``S x S`` map are resized to
``(h', w')`` with the same interpolation; resized position ``(y, x)`` belongs to the crop that
holds unpadded cell ``(floor((y + 0.5) h / h'), floor((x + 0.5) w / w'))``; ``n_j`` counts those
positions, and Step 4 runs on them as usual.

Representation. A :class:`ResizedCropGeometry` *is* a :class:`~.geometry.CropGeometry` whose
unpadded rectangle is the resized map placed at the top-left of the joint ``gh S x gw S`` grid
(rows ``[0, h')``, columns ``[0, w')``; ``h' <= h`` and ``w' <= w`` always), and it remembers the
true unpadded rectangle in ``src_*``. The family writes the resized features and the resized local
importance at those "pseudo" positions of its ``(C, N)`` crop rows (:func:`to_crop_rows`). So
every generic routine (the ``spatial`` layout, joint budgets, pooling, the vanilla count
``N + h' (w' + 1)``) works unchanged on the resized map, and only GlobalCom2's per-crop step
needs :func:`plan_resized`, which knows which true crop each resized position comes from.
Plans made on it address pseudo positions; ``crop_keep`` is in those coordinates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .geometry import CropGeometry, crop_geometry, crops_to_grid, grid_to_crops
from .budgets import _check_count, crop_retention_ratios, fixed_budgets, thumbnail_keep_indices
from .importance import SCORE_DTYPE
from .layouts import CompressionPlan, assemble_plan, gather_features

__all__ = [
    "ResizedCropGeometry", "anyres_max_size", "parse_anyres_max", "resize_map", "resized_geometry", "to_crop_rows",
    "resized_owners", "select_resized_tokens", "plan_resized",
]

#: Hugging Face resizes only when the area ratio's square root exceeds this (``ratio > 1.1``).
RESIZE_THRESHOLD = 1.1


@dataclass(frozen=True)
class ResizedCropGeometry(CropGeometry):
    """A crop geometry whose unpadded area was resized to ``(h', w')`` (see the module docstring).

    Attributes (besides :class:`CropGeometry`'s, where ``row0, row1, col0, col1 = 0, h', 0, w'``):
        src_row0, src_row1, src_col0, src_col1: the true unpadded rectangle of the joint grid
            before resizing (``h = src_row1 - src_row0``, ``w = src_col1 - src_col0``).
    """

    src_row0: int = 0
    src_row1: int = 0
    src_col0: int = 0
    src_col1: int = 0

    @property
    def src_rows(self) -> int:
        return self.src_row1 - self.src_row0

    @property
    def src_cols(self) -> int:
        return self.src_col1 - self.src_col0


def parse_anyres_max(vision_aspect_ratio: str) -> int:
    """``K`` of ``"anyres_max_K"`` (as Hugging Face reads it: ``int(s.strip("anyres_max_"))``)."""
    try:
        return int(str(vision_aspect_ratio).strip("anyres_max_"))
    except ValueError:
        raise ValueError(f"vision_aspect_ratio must look like 'anyres_max_9', got {vision_aspect_ratio!r}") from None


def anyres_max_size(h: int, w: int, side: int, max_views: int) -> tuple[int, int] | None:
    """The resized ``(h', w')`` of an ``h x w`` unpadded map, or None when it is not resized.

    Same arithmetic as Hugging Face ``LlavaOnevisionModel.pack_image_features`` and the
    processor's token count: ``s = sqrt(h w / (K S^2))``; resized when ``s > 1.1`` to
    ``(int(h // s), int(w // s))``. (SPEC.md writes ``int(h / s)``: the same for positive values.)
    """
    ratio = math.sqrt(h * w / (max_views * side * side))
    if ratio > RESIZE_THRESHOLD:
        return int(h // ratio), int(w // ratio)
    return None


def resized_geometry(geom: CropGeometry, max_views: int) -> CropGeometry:
    """``geom`` itself, or its :class:`ResizedCropGeometry` when ``anyres_max_K`` resizes its area."""
    size = anyres_max_size(geom.valid_rows, geom.valid_cols, geom.side, max_views)
    if geom.is_empty or size is None:
        return geom
    hr, wr = size
    return ResizedCropGeometry(
        side=geom.side, grid_h=geom.grid_h, grid_w=geom.grid_w, row0=0, row1=hr, col0=0, col1=wr,
        src_row0=geom.row0, src_row1=geom.row1, src_col0=geom.col0, src_col1=geom.col1,
    )


def anyres_geometry(image_hw: tuple[int, int], grid_hw: tuple[int, int], side: int, max_views: int) -> CropGeometry:
    """:func:`~.geometry.crop_geometry`, then :func:`resized_geometry`."""
    return resized_geometry(crop_geometry(image_hw, grid_hw, side), max_views)


def resize_map(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(K, h, w) -> (K, h', w'): ``F.interpolate(mode="bilinear")`` (align_corners=False), as the model."""
    return F.interpolate(x[None], list(size), mode="bilinear")[0]


def unpadded_map(crop_rows: torch.Tensor, geom: ResizedCropGeometry) -> torch.Tensor:
    """(..., C, N) crop rows -> (..., h, w) the true unpadded area (before resizing)."""
    grid = crops_to_grid(crop_rows, geom)
    return grid[..., geom.src_row0 : geom.src_row1, geom.src_col0 : geom.src_col1]


def to_crop_rows(resized: torch.Tensor, geom: ResizedCropGeometry) -> torch.Tensor:
    """(..., h', w') resized map -> (..., C, N) crop rows with the map at its pseudo positions
    (zeros elsewhere). Inverse of reading ``crops_to_grid(rows)[..., :h', :w']``."""
    lead = resized.shape[:-2]
    grid = resized.new_zeros(*lead, geom.height, geom.width)
    grid[..., : geom.row1, : geom.col1] = resized
    return grid_to_crops(grid, geom)


def resized_owners(geom: ResizedCropGeometry, device: torch.device | None = None) -> torch.Tensor:
    """(h', w') long: the crop (row-major) that each resized position comes from.

    Position ``(y, x)`` belongs to the crop holding unpadded cell
    ``(floor((y + 0.5) h / h'), floor((x + 0.5) w / w'))`` of the true unpadded area.
    """
    hr, wr, h, w, s = geom.row1, geom.col1, geom.src_rows, geom.src_cols, geom.side
    ys = torch.floor((torch.arange(hr, device=device, dtype=torch.float64) + 0.5) * h / hr).long().clamp(max=h - 1)
    xs = torch.floor((torch.arange(wr, device=device, dtype=torch.float64) + 0.5) * w / wr).long().clamp(max=w - 1)
    crop_row = (geom.src_row0 + ys) // s  # (h',)
    crop_col = (geom.src_col0 + xs) // s  # (w',)
    return crop_row[:, None] * geom.grid_w + crop_col[None, :]


def select_resized_tokens(
    local: torch.Tensor,
    thumb_importance: torch.Tensor,
    geom: ResizedCropGeometry,
    crop_ratios: torch.Tensor,
    scoring: str = "global_local",
    retention_ratio: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 3-4 on the resized map: which resized positions each crop keeps.

    Args:
        local: (h', w') the crops' local importance, resized like the features.
        thumb_importance: (N,) thumbnail importance.
        geom: the resized geometry.
        crop_ratios: (C,) ``r_j``.
        scoring: ``"global_local"`` (the method), ``"global_only"`` or ``"local_only"``.
        retention_ratio: R for ``count="fixed"`` (the crops keep ``floor(R * sum n_j)`` in all,
            :func:`~globalcom2.core.budgets.fixed_budgets`); None: ``floor(n_j r_j)`` each.

    Returns:
        keep: (C, N) bool at pseudo positions; valid: (C, N) bool, the resized map's positions;
        score: (C, N) holistic score (``-inf`` off the map). Crop j keeps the ``floor(n_j r_j)``
        best of the ``n_j`` positions it owns (ties: raster order of the resized map).
    """
    hr, wr, s = geom.row1, geom.col1, geom.side
    dev = local.device
    c = geom.num_crops
    glob = resize_map(thumb_importance.to(SCORE_DTYPE).reshape(1, s, s), (hr, wr))[0].reshape(-1)  # (P,)
    loc = local.to(SCORE_DTYPE).reshape(-1)  # (P,)
    owner = resized_owners(geom, dev).reshape(-1)  # (P,)
    member = owner[None, :] == torch.arange(c, device=dev)[:, None]  # (C, P)

    def norm(x: torch.Tensor) -> torch.Tensor:  # per-crop L2 over the crop's own positions
        sq = torch.zeros(c, dtype=x.dtype, device=dev).index_add_(0, owner, x * x)
        return x / sq.sqrt().clamp_min(1e-12)[owner]

    if scoring == "global_local":
        score = norm(loc) + norm(glob)
    elif scoring == "global_only":
        score = norm(glob)
    elif scoring == "local_only":
        score = norm(loc)
    else:
        raise ValueError(f"scoring must be one of global_local, global_only, local_only; got {scoring!r}")
    n_own = member.sum(1)  # (C,)
    if retention_ratio is None:
        k = torch.floor(n_own.to(torch.float64) * crop_ratios.to(device=dev, dtype=torch.float64)).long()  # (C,)
    else:
        k = fixed_budgets(n_own, crop_ratios.to(device=dev, dtype=torch.float64), retention_ratio)  # (C,)
    masked = torch.where(member, score[None, :], torch.full_like(score, float("-inf"))[None, :])  # (C, P)
    order = torch.argsort(masked, dim=1, descending=True, stable=True)
    p = loc.shape[0]
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(p, device=dev).expand(c, p))
    keep_flat = ((rank < k[:, None]) & member).any(0)  # (P,)
    keep = to_crop_rows(keep_flat.reshape(hr, wr), geom)
    valid = to_crop_rows(torch.ones((hr, wr), dtype=torch.bool, device=dev), geom)
    score_rows = to_crop_rows(score.reshape(hr, wr), geom).masked_fill(~valid, float("-inf"))
    return keep, valid, score_rows


def plan_resized(
    importance: torch.Tensor,
    geom: ResizedCropGeometry,
    retention_ratio: float,
    layout: str = "spatial",
    temperature: float = 10.0,
    crop_ratios: torch.Tensor | None = None,
    allocation: str = "softmax_sum",
    scoring: str = "global_local",
    count: str = "published",
) -> CompressionPlan:
    """GlobalCom2's decisions for an image whose crop map was resized (``spatial`` only).

    Args:
        importance: (1 + C, N): the thumbnail (row 0), then the crops' rows holding the resized
            local importance at pseudo positions (:func:`to_crop_rows`).
        geom: the resized geometry.
        retention_ratio, temperature, allocation, scoring: as :func:`globalcom2.core.plans.plan_image`
            (Step 2 is unchanged: the thumbnail's S x S map split into the gh x gw grid).
        crop_ratios: (C,) override of ``r_j`` (tests).
        count: ``"published"`` or ``"fixed"`` (see :func:`~globalcom2.core.plans.plan_image`).
    """
    _check_count(count)
    if layout != "spatial":
        raise ValueError(f"a resized (anyres_max) crop map has only the 'spatial' layout, got {layout!r}")
    thumb = importance[0]
    if crop_ratios is None:
        crop_ratios = crop_retention_ratios(thumb, (geom.grid_h, geom.grid_w), retention_ratio, temperature, allocation)
    local = crops_to_grid(importance[1:], geom)[: geom.row1, : geom.col1]  # (h', w')
    fixed = retention_ratio if count == "fixed" else None
    keep, valid, score = select_resized_tokens(local, thumb, geom, crop_ratios, scoring, fixed)
    thumb_keep = thumbnail_keep_indices(thumb, retention_ratio)
    return assemble_plan(thumb_keep, keep, valid, geom, layout, crop_ratios, thumb, score)


def compress_resized(
    features: torch.Tensor,
    importance: torch.Tensor,
    newline: torch.Tensor | None,
    geom: ResizedCropGeometry,
    retention_ratio: float,
    layout: str = "spatial",
    temperature: float = 10.0,
    allocation: str = "softmax_sum",
    scoring: str = "global_local",
    count: str = "published",
) -> tuple[torch.Tensor, CompressionPlan]:
    """:func:`plan_resized`, then gather (the counterpart of :func:`~.plans.compress_image`)."""
    plan = plan_resized(
        importance, geom, retention_ratio, layout, temperature, allocation=allocation, scoring=scoring, count=count
    )
    return gather_features(features, newline, plan.index), plan
