"""The per-image plans of the selection methods: GlobalCom2 (crop scores and selection), one joint
budget (FasterVLM, random), a single view, and the pooling baseline.

Their parts live next door: importance in :mod:`~globalcom2.core.importance`, the crop ratios and
budgets in :mod:`~globalcom2.core.budgets`, the layouts and :class:`~globalcom2.core.layouts.CompressionPlan`
in :mod:`~globalcom2.core.layouts`.

Nothing here knows about a model class. Every function works on plain tensors, on whatever
device and dtype they come in, with no Python loop over tokens and no ``.item()``. The only host
synchronisation is the boolean selection at the very end of :func:`compress_image`, which is
unavoidable because the number of kept tokens depends on the data.

These per-image functions are the reference: :mod:`globalcom2.core.batch` plans a whole batch in
one vectorised pass (one host sync per batch, one gather) and must agree with them bit for bit
(``tests/test_batch.py``); ``Family.compress`` runs that batched path.

Notation (shapes in comments):
    S   patches per side of one ViT view (LLaVA-NeXT, CLIP-L/14-336: 24)
    N   = S * S tokens per view
    gh, gw  rows and columns of the crop grid; C = gh * gw crops
    H, W    = gh * S, gw * S: the crops' joint token grid
    D   feature size after the projector

A view's tokens are always in raster order. Crops are numbered row by row: crop ``j`` sits at grid
row ``j // gw`` and column ``j % gw``. See ``SPEC.md`` in the project's documentation and the
README for the method; the step numbers below follow it.

Determinism: every score is computed in :data:`~globalcom2.core.importance.SCORE_DTYPE` (float64) and every selection or
ordering is a *stable* descending sort, so exact ties go to the lower index (position) first, on
every device. Given the same importance, the same tokens are kept, in the same order, everywhere.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .budgets import _floor_count, crop_budgets, crop_retention_ratios, keep_best, thumbnail_keep_indices
from .geometry import CanvasCropGeometry, CropGeometry, crops_to_grid, grid_to_crops, valid_mask
from .importance import SCORE_DTYPE
from .layouts import CompressionPlan, _check_layout, assemble_plan, gather_features

__all__ = [
    "holistic_scores",
    "select_crop_tokens",
    "plan_image",
    "plan_joint",
    "plan_single_view",
    "pool_image",
    "compress_image",
    "compress_by_scores",
]


# ----------------------------------------------------------------------------------------------
# Step 4: the crops' holistic scores and selection
# ----------------------------------------------------------------------------------------------


def _l2_normalize_masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise ``F.normalize(p=2)`` over the masked entries only; masked-out entries become 0."""
    x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def holistic_scores(local: torch.Tensor, glob: torch.Tensor, valid: torch.Tensor, scoring: str) -> torch.Tensor:
    """Step 4's score of every crop token: the L2-normalised local importance plus the
    L2-normalised global piece (each over the crop's valid tokens), or one of the two for the
    ``scoring`` ablations; ``-inf`` where padded.

    Args:
        local, glob: (..., N) float64 local and global importance of each crop's N tokens.
        valid: (..., N) bool, unpadded positions.
        scoring: ``"global_local"``, ``"global_only"`` or ``"local_only"``.

    Returns:
        (..., N) float64 (elementwise and per crop: any leading shape gives the same bits).
    """
    if scoring == "global_local":
        score = _l2_normalize_masked(local, valid) + _l2_normalize_masked(glob, valid)
    elif scoring == "global_only":
        score = _l2_normalize_masked(glob, valid)
    elif scoring == "local_only":
        score = _l2_normalize_masked(local, valid)
    else:
        raise ValueError(f"scoring must be one of global_local, global_only, local_only; got {scoring!r}")
    return score.masked_fill(~valid, float("-inf"))


def select_crop_tokens(
    crop_importance: torch.Tensor,
    thumb_importance: torch.Tensor,
    geom: CropGeometry,
    crop_ratios: torch.Tensor,
    scoring: str = "global_local",
    budgets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 3-4: which unpadded tokens each crop keeps, by holistic (global + local) score.

    The thumbnail's S x S importance is bilinearly resized (``align_corners=False``) to the
    unpadded rectangle and cut into per-crop pieces; a token's score is the L2-normalised local
    importance plus the L2-normalised global piece (each normalised over the crop's valid tokens).
    Crop ``j`` keeps its ``floor(n_j * r_j)`` best valid tokens.

    Args:
        crop_importance: (C, N) importance of every crop token (from the crop's own CLS).
        thumb_importance: (N,) thumbnail importance.
        geom: the image's crop geometry.
        crop_ratios: (C,) retention ratio ``r_j`` of each crop.
        scoring: ``"global_local"`` (the method), or the ablations ``"global_only"`` /
            ``"local_only"`` (one of the two normalised terms).
        budgets: (C,) long tokens each crop keeps (``count="fixed"``); None: ``floor(n_j r_j)``.

    Returns:
        keep: (C, N) bool, True at the true positions of the kept tokens.
        valid: (C, N) bool, True at unpadded positions.
        score: (C, N) float64 holistic score (``-inf`` at padded positions).
    """
    dev = crop_importance.device
    c, n = crop_importance.shape
    valid = valid_mask(geom, dev)  # (C, N)
    glob = torch.zeros(geom.height, geom.width, dtype=SCORE_DTYPE, device=dev)  # (H, W)
    canvas = isinstance(geom, CanvasCropGeometry)  # the thumbnail shows the padded canvas: stretch it over H x W
    if not geom.is_empty:
        s = geom.side
        resized = F.interpolate(
            thumb_importance.to(SCORE_DTYPE).reshape(1, 1, s, s),
            size=(geom.height, geom.width) if canvas else (geom.valid_rows, geom.valid_cols),
            mode="bilinear",
            align_corners=False,
        )[0, 0]  # (H, W) or (valid_rows, valid_cols)
        if canvas:
            resized = resized[geom.row0 : geom.row1, geom.col0 : geom.col1]
        glob[geom.row0 : geom.row1, geom.col0 : geom.col1] = resized
    glob = grid_to_crops(glob, geom)  # (C, N)
    score = holistic_scores(crop_importance.to(SCORE_DTYPE), glob, valid, scoring)
    return keep_best(score, valid, crop_ratios, budgets), valid, score


# ----------------------------------------------------------------------------------------------
# Plans of one image
# ----------------------------------------------------------------------------------------------


def plan_image(
    importance: torch.Tensor,
    geom: CropGeometry,
    retention_ratio: float,
    layout: str = "official",
    temperature: float = 10.0,
    crop_ratios: torch.Tensor | None = None,
    allocation: str = "softmax_sum",
    scoring: str = "global_local",
    count: str = "published",
) -> CompressionPlan:
    """Run GlobalCom2's decisions for one thumbnail-plus-crops image.

    Args:
        importance: (1 + C, N) CLS importance of the thumbnail (row 0) and the C crops.
        geom: crop geometry of the image (``geom.num_crops == C``).
        retention_ratio: R.
        layout: "official" or "spatial".
        temperature: tau.
        crop_ratios: (C,) override of the per-crop ratios (for tests); by default they come from
            :func:`crop_retention_ratios` with ``allocation``.
        allocation: crop budget allocation (see :func:`crop_retention_ratios`).
        scoring: crop token scoring (see :func:`select_crop_tokens`).
        count: ``"published"`` (crop j keeps ``floor(n_j r_j)``) or ``"fixed"`` (the crops keep
            ``floor(R * sum n_j)`` in all, :func:`fixed_budgets`).

    Returns:
        A :class:`CompressionPlan`; its ``index`` addresses the table
        ``[thumbnail (N), crops (C * N), newline (1)]``.
    """
    _check_layout(layout)
    _check_views(importance, geom)
    thumb, crops = importance[0], importance[1:]  # (N,), (C, N)
    if crop_ratios is None:
        crop_ratios = crop_retention_ratios(thumb, (geom.grid_h, geom.grid_w), retention_ratio, temperature, allocation)
    budgets = crop_budgets(geom, crop_ratios, retention_ratio, count)
    keep, valid, score = select_crop_tokens(crops, thumb, geom, crop_ratios, scoring, budgets)
    thumb_keep = thumbnail_keep_indices(thumb, retention_ratio)  # descending importance
    return assemble_plan(thumb_keep, keep, valid, geom, layout, crop_ratios, thumb, score)


def _check_views(importance: torch.Tensor, geom: CropGeometry) -> None:
    views, n = importance.shape
    c = geom.num_crops
    if views != 1 + c or n != geom.side * geom.side:
        raise ValueError(
            f"importance has shape {tuple(importance.shape)}, expected (1 + {c}, {geom.side * geom.side}) for a "
            f"{geom.grid_h}x{geom.grid_w} crop grid of {geom.side}x{geom.side} views"
        )


def plan_joint(scores: torch.Tensor, geom: CropGeometry, retention_ratio: float, layout: str = "spatial") -> CompressionPlan:
    """One budget for the whole image: keep the ``floor(R * (N + sum_j n_j))`` best tokens.

    The ranking runs jointly over the thumbnail's N tokens and every crop's unpadded tokens (the
    FasterVLM baseline with [CLS] importance as ``scores``; random pruning with random scores).

    Args:
        scores: (1 + C, N) score of every token of the thumbnail (row 0) and the crops.
        geom: crop geometry.
        retention_ratio: R.
        layout: "official" or "spatial" (see :func:`assemble_plan`).

    Returns:
        A :class:`CompressionPlan` (``crop_ratios`` holds each crop's realised kept fraction).
    """
    _check_layout(layout)
    _check_views(scores, geom)
    v, n = scores.shape
    dev = scores.device
    valid = torch.cat([torch.ones((1, n), dtype=torch.bool, device=dev), valid_mask(geom, dev)])  # (V, N)
    masked = scores.to(SCORE_DTYPE).masked_fill(~valid, float("-inf"))  # (V, N)
    k = _floor_count(n + geom.valid_rows * geom.valid_cols, float(retention_ratio))  # host int: no sync
    order = torch.argsort(masked.reshape(-1), descending=True, stable=True)  # (V * N,)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(v * n, device=dev))
    crop_keep = ((rank < k) & valid.reshape(-1)).reshape(v, n)[1:]  # (C, N)
    # Thumbnail tokens among the top k, most important first (the official order), like GlobalCom2's.
    top = order[:k]
    thumb_keep = top[top < n]
    n_valid = valid[1:].sum(1).to(torch.float64)
    crop_ratios = crop_keep.sum(1).to(torch.float64) / n_valid.clamp_min(1.0)
    return assemble_plan(thumb_keep, crop_keep, valid[1:], geom, layout, crop_ratios, scores[0], masked[1:])


def plan_single_view(importance: torch.Tensor, retention_ratio: float, layout: str = "official") -> CompressionPlan:
    """Plan for an image seen as one view only (no crops): keep its ``floor(N * R)`` most important
    tokens (most important first for ``official``, raster order for ``spatial``), then the one
    trailing newline the vanilla model appends.

    Args:
        importance: (1, N) or (N,) importance of the view.
    """
    _check_layout(layout)
    imp = importance.reshape(-1)  # (N,)
    n = imp.shape[0]
    dev = imp.device
    keep_idx = thumbnail_keep_indices(imp, retention_ratio)
    if layout == "spatial":
        keep_idx = torch.sort(keep_idx).values
    index = torch.cat([keep_idx, torch.full((1,), n, dtype=torch.long, device=dev)])  # newline row = N
    empty = torch.zeros((0, n), dtype=torch.bool, device=dev)
    return CompressionPlan(
        index=index,
        thumb_keep=keep_idx,
        crop_keep=empty,
        crop_valid=empty,
        crop_ratios=torch.zeros(0, dtype=torch.float64, device=dev),
        thumb_importance=imp,
        crop_score=torch.zeros((0, n), dtype=SCORE_DTYPE, device=dev),
        geometry=None,
        layout=layout,
    )


def compress_image(
    features: torch.Tensor,
    importance: torch.Tensor,
    geom: CropGeometry | None,
    newline: torch.Tensor | None,
    retention_ratio: float,
    layout: str = "official",
    temperature: float = 10.0,
    allocation: str = "softmax_sum",
    scoring: str = "global_local",
    count: str = "published",
) -> tuple[torch.Tensor, CompressionPlan]:
    """GlobalCom2 for one image: decide, then gather.

    Args:
        features: (V, N, D) projected features, thumbnail first then crops (V = 1 + C), or one view.
        importance: (V, N) CLS importance of the same views.
        geom: crop geometry (None for a single view).
        newline: (D,) image-newline embedding.

    Returns:
        tokens: (L, D) the sequence for the language model.
        plan: the :class:`CompressionPlan` behind it.
    """
    if geom is None or features.shape[0] == 1:
        plan = plan_single_view(importance[0], retention_ratio, layout)
    else:
        plan = plan_image(
            importance, geom, retention_ratio, layout, temperature, allocation=allocation, scoring=scoring, count=count
        )
    return gather_features(features, newline, plan.index), plan


def compress_by_scores(
    features: torch.Tensor,
    scores: torch.Tensor,
    geom: CropGeometry | None,
    newline: torch.Tensor | None,
    retention_ratio: float,
    layout: str = "spatial",
) -> tuple[torch.Tensor, CompressionPlan]:
    """One joint budget by ``scores`` (FasterVLM with [CLS] importance, random pruning with random
    scores): :func:`plan_joint` (or :func:`plan_single_view` for one view), then gather.

    Args:
        features: (V, N, D) projected features, thumbnail first. scores: (V, N).

    Returns:
        tokens: (L, D). plan: the :class:`CompressionPlan`.
    """
    if geom is None or features.shape[0] == 1:
        plan = plan_single_view(scores[0], retention_ratio, layout)
    else:
        plan = plan_joint(scores, geom, retention_ratio, layout)
    return gather_features(features, newline, plan.index), plan


# ----------------------------------------------------------------------------------------------
# The pooling baseline
# ----------------------------------------------------------------------------------------------


def pooled_side(n: int, retention_ratio: float) -> int:
    """Side of a pooled map: ``max(1, round(n * sqrt(R)))`` (pooling baseline)."""
    return max(1, int(round(n * math.sqrt(retention_ratio))))


def pool_image(
    features: torch.Tensor, geom: CropGeometry | None, newline: torch.Tensor | None, retention_ratio: float
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """The pooling baseline for one image: average-pool every view to about R of its tokens.

    The thumbnail's S x S map goes to ``s' x s'`` with ``s' = pooled_side(S, R)``; the unpadded
    crop area (``h x w`` tokens, the crops stitched together) to ``pooled_side(h, R) x
    pooled_side(w, R)``, read row by row with one newline per pooled row. A single-view image is
    its pooled thumbnail plus the one trailing newline the vanilla model appends.

    Args:
        features: (V, N, D) projected features, thumbnail first.
        geom: crop geometry (None for a single view).
        newline: (D,) image-newline embedding (None: a zero row).
        retention_ratio: R.

    Returns:
        tokens: (L, D) the image's sequence.
        thumb_hw: the pooled thumbnail's (rows, cols).
        crop_hw: the pooled crop area's (rows, cols) ((0, 0) without crops).
    """
    v, n, d = features.shape
    side = math.isqrt(n)
    nl = torch.zeros(d, dtype=features.dtype, device=features.device) if newline is None else newline
    nl = nl.to(features.device, features.dtype)
    t = pooled_side(side, retention_ratio)
    thumb = F.adaptive_avg_pool2d(features[0].reshape(side, side, d).permute(2, 0, 1), (t, t))  # (D, t, t)
    parts = [thumb.permute(1, 2, 0).reshape(t * t, d)]
    if geom is None or v == 1:
        return torch.cat(parts + [nl[None]]), (t, t), (0, 0)
    if geom.is_empty:
        return parts[0], (t, t), (0, 0)
    grid = crops_to_grid(features[1:].permute(2, 0, 1), geom)  # (D, H, W)
    grid = grid[:, geom.row0 : geom.row1, geom.col0 : geom.col1]  # (D, h, w)
    h, w = geom.valid_rows, geom.valid_cols
    ph, pw = pooled_side(h, retention_ratio), pooled_side(w, retention_ratio)
    pooled = F.adaptive_avg_pool2d(grid, (ph, pw)).permute(1, 2, 0)  # (ph, pw, D)
    rows = torch.cat([pooled, nl.expand(ph, 1, d)], dim=1).reshape(ph * (pw + 1), d)
    parts.append(rows)
    return torch.cat(parts), (t, t), (ph, pw)
