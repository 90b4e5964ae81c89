"""Steps 1-4's budgets: the thumbnail's kept count, the crops' retention ratios (adaptive
compression adjustment and its allocation ablations), the fixed-count apportioning and each crop's
best tokens by score.

Pure tensor code (see :mod:`globalcom2.core.plans` for the notation and the determinism rules):
no Python loop over tokens, no host sync, every ordering a stable descending sort.
"""

from __future__ import annotations

import math

import torch

from .geometry import CropGeometry, valid_mask

__all__ = [
    "crop_region_scores",
    "crop_region_max",
    "crop_retention_ratios",
    "thumbnail_keep_indices",
    "fixed_budgets",
    "crop_budgets",
    "keep_best",
]


# ----------------------------------------------------------------------------------------------
# Step 2: per-crop retention ratios
# ----------------------------------------------------------------------------------------------


def crop_region_scores(thumb_importance: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Sum the thumbnail's importance inside each crop's region of the thumbnail (float64).

    Row ``i`` of the S x S map belongs to grid row ``min(i // max(S // gh, 1), gh - 1)``, column
    ``j`` to grid column ``min(j // max(S // gw, 1), gw - 1)``.

    Args:
        thumb_importance: (N,) importance of the thumbnail's tokens, N = S * S.
        grid_hw: (gh, gw).

    Returns:
        (C,) float64 summed importance ``s_j`` per crop, crops in row-major order.
    """
    gh, gw = grid_hw
    region = _thumb_regions(thumb_importance.shape[-1], grid_hw, thumb_importance.device)  # (N,)
    dev = thumb_importance.device
    sums = torch.zeros(gh * gw, dtype=torch.float64, device=dev)
    return sums.index_add_(0, region, thumb_importance.to(torch.float64))


def crop_region_max(thumb_importance: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Like :func:`crop_region_scores` but the *maximum* importance of each crop's region (float64)."""
    region = _thumb_regions(thumb_importance.shape[-1], grid_hw, thumb_importance.device)  # (N,)
    gh, gw = grid_hw
    out = torch.full((gh * gw,), float("-inf"), dtype=torch.float64, device=thumb_importance.device)
    return out.scatter_reduce(0, region, thumb_importance.to(torch.float64), reduce="amax")


def _thumb_regions(n: int, grid_hw: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(N,) long: the crop region (row-major) each thumbnail token belongs to (SPEC step 2)."""
    gh, gw = grid_hw
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"thumbnail importance must hold a square number of tokens, got {n}")
    idx = torch.arange(side, device=device)
    row_region = torch.clamp(idx // max(side // gh, 1), max=gh - 1)  # (S,)
    col_region = torch.clamp(idx // max(side // gw, 1), max=gw - 1)  # (S,)
    return (row_region[:, None] * gw + col_region[None, :]).reshape(-1)


def crop_retention_ratios(
    thumb_importance: torch.Tensor,
    grid_hw: tuple[int, int],
    retention_ratio: float,
    temperature: float = 10.0,
    allocation: str = "softmax_sum",
) -> torch.Tensor:
    """Adaptive compression adjustment: the retention ratio ``r_j`` of every crop (float64).

    ``sigma = softmax((s - max s) / tau)`` (with the published ``+ 1e-8`` in the denominator) and
    ``r_j = min(1, R * (1 + sigma_j - mean(sigma)))``, where ``s_j`` is the thumbnail importance
    summed over crop j's region (``allocation="softmax_sum"``, the method) or its maximum
    (``"softmax_max"``). Ablations: ``"uniform"`` gives ``r_j = R``; ``"topk_count"`` gives
    ``r_j = min(1, R * C * c_j / sum(c))`` with ``c_j`` the number of the thumbnail's kept
    (top ``floor(N * R)``) tokens inside region j (``R`` everywhere when none is kept).

    Args:
        thumb_importance: (N,) thumbnail importance.
        grid_hw: (gh, gw).
        retention_ratio: R.
        temperature: tau.
        allocation: one of :data:`globalcom2.config.ALLOCATIONS`.

    Returns:
        (C,) float64 ratios in ``[0, 1]``.
    """
    c = grid_hw[0] * grid_hw[1]
    dev = thumb_importance.device
    if allocation == "uniform":
        return torch.full((c,), float(retention_ratio), dtype=torch.float64, device=dev)
    if allocation == "topk_count":
        keep = thumbnail_keep_indices(thumb_importance, retention_ratio)  # (k_t,)
        region = _thumb_regions(thumb_importance.shape[-1], grid_hw, dev)[keep]
        counts = torch.bincount(region, minlength=c).to(torch.float64)  # (C,)
        total = counts.sum()
        share = torch.where(total > 0, counts * c / total.clamp_min(1.0), torch.ones_like(counts))
        return torch.clamp(retention_ratio * share, max=1.0)
    if allocation == "softmax_sum":
        s = crop_region_scores(thumb_importance, grid_hw)  # (C,)
    elif allocation == "softmax_max":
        s = crop_region_max(thumb_importance, grid_hw)  # (C,)
    else:
        raise ValueError(f"allocation must be one of softmax_sum, softmax_max, uniform, topk_count; got {allocation!r}")
    e = torch.exp((s - s.max()) / temperature)
    sigma = e / (e.sum() + 1e-8)
    return torch.clamp(retention_ratio * (1.0 + sigma - sigma.mean()), max=1.0)


# ----------------------------------------------------------------------------------------------
# Steps 1, 3, 4: how many tokens each view keeps
# ----------------------------------------------------------------------------------------------


def _floor_count(n: torch.Tensor | int, ratio: torch.Tensor | float) -> torch.Tensor | int:
    """``floor(n * ratio)`` exactly as Python's ``int(n * ratio)`` on float64 (n, ratio >= 0)."""
    if isinstance(n, int) and isinstance(ratio, float):
        return int(n * ratio)
    return torch.floor(torch.as_tensor(n, dtype=torch.float64) * ratio).long()


def thumbnail_keep_indices(importance: torch.Tensor, retention_ratio: float) -> torch.Tensor:
    """Step 1: the ``floor(N * R)`` most important thumbnail tokens, most important first.

    Args:
        importance: (N,) thumbnail importance.

    Returns:
        (k_t,) long indices in descending order of importance (ties: lower index first).
    """
    k = _floor_count(importance.shape[-1], float(retention_ratio))
    order = torch.argsort(importance, descending=True, stable=True)
    return order[:k]


def fixed_budgets(n_valid: torch.Tensor, ratios: torch.Tensor, retention_ratio: float) -> torch.Tensor:
    """``count="fixed"`` (SPEC.md, "Fixed count"): the crops' total ``K = floor(R * sum_j n_j)``
    apportioned over the crops in proportion to the published budgets ``w_j = n_j r_j``, no crop
    above ``n_j`` (largest remainder; ties to the lower crop index).

    Quota ``q_j = K' w_j / sum w`` over the crops not yet capped; a crop whose quota exceeds
    ``n_j`` gets ``n_j`` and the rest is apportioned again. The capped crops are always those of
    the highest ``r_j = w_j / n_j`` (capping one raises every other quota), so they are found at
    once, without a data-dependent loop: sorted by ``r_j`` (descending, stable), the first ``m``
    crops are capped, ``m`` the first position whose crop fits, ``(K - sum_{i<m} n_i) r_m <=
    sum_{i>=m} w_i``. Then ``b_j = floor(q_j)`` and the ``K' - sum b_j`` leftover tokens go one
    each to the crops with the largest ``q_j - b_j`` (ties: lower crop index). No host sync.

    Args:
        n_valid: (..., C) valid tokens of each crop (padded crops of a batch: 0).
        ratios: (..., C) each crop's published ratio ``r_j`` (float64).
        retention_ratio: R.

    Returns:
        (..., C) long budgets ``b_j``, ``0 <= b_j <= n_j``, summing to ``K`` per image.
    """
    dev = ratios.device
    n = n_valid.to(device=dev, dtype=torch.float64)
    c = n.shape[-1]
    if c == 0:
        return torch.zeros(n.shape, dtype=torch.long, device=dev)
    w = n * ratios.to(torch.float64)  # (..., C)
    total = torch.floor(n.sum(-1, keepdim=True) * float(retention_ratio))  # (..., 1) K: sums of integers, exact
    has = n > 0
    rate = torch.where(has, w / n.clamp_min(1.0), torch.full_like(w, -1.0))  # empty crops sort last
    order = torch.argsort(rate, dim=-1, descending=True, stable=True)  # (..., C)
    n_s, w_s, r_s = n.gather(-1, order), w.gather(-1, order), rate.gather(-1, order)
    capped_before = torch.cumsum(n_s, -1) - n_s  # (..., C) sum of n over the crops ahead
    w_from = torch.flip(torch.cumsum(torch.flip(w_s, [-1]), -1), [-1])  # (..., C) sum of w from here on
    fits = ((total - capped_before) * r_s <= w_from) | (r_s < 0)  # (..., C)
    first_fit = torch.where(fits, torch.arange(c, device=dev), torch.full_like(order, c)).amin(-1, keepdim=True)
    capped_s = torch.arange(c, device=dev) < first_fit  # (..., C) in sorted order
    capped = torch.zeros_like(capped_s).scatter_(-1, order, capped_s)  # (..., C) in crop order
    free = ~capped & has
    left = total - torch.where(capped, n, torch.zeros_like(n)).sum(-1, keepdim=True)  # (..., 1) integers: exact
    # Sums of reals as running sums, left to right: a batch's padded crops (zeros at the end) then
    # give the same bits as the image alone.
    w_free = torch.where(free, w, torch.zeros_like(w))
    w_sum = torch.cumsum(w_free, -1)[..., -1:]
    # Every uncapped crop at w_j = 0 (an allocation ablation can give r_j = 0) but tokens left:
    # those go by size, n_j, so that the total is still K.
    w_free = torch.where(w_sum > 0, w_free, torch.where(free, n, torch.zeros_like(n)))
    w_sum = torch.cumsum(w_free, -1)[..., -1:]
    quota = torch.where(w_sum > 0, left * w_free / w_sum.clamp_min(1e-300), torch.zeros_like(w))
    base = torch.minimum(torch.floor(quota), n)
    base = torch.where(capped, n, torch.where(free, base, torch.zeros_like(base)))
    leftover = total - base.sum(-1, keepdim=True)  # (..., 1)
    eligible = free & (base < n)
    frac = torch.where(eligible, quota - torch.floor(quota), torch.full_like(quota, -1.0))
    rank_order = torch.argsort(frac, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(rank_order).scatter_(-1, rank_order, torch.arange(c, device=dev).expand_as(rank_order))
    extra = (rank < leftover) & eligible
    return (base + extra.to(base.dtype)).long()


def crop_budgets(geom: CropGeometry, crop_ratios: torch.Tensor, retention_ratio: float, count: str) -> torch.Tensor | None:
    """(C,) long budgets of the crops for ``count="fixed"`` (:func:`fixed_budgets` over each crop's
    valid tokens, from the geometry: no sync); None for ``"published"``."""
    _check_count(count)
    if count == "published":
        return None
    n_valid = valid_mask(geom, crop_ratios.device).sum(1)  # (C,)
    return fixed_budgets(n_valid, crop_ratios, retention_ratio)


def _check_count(count: str) -> None:
    if count not in ("published", "fixed"):
        raise ValueError(f"count must be 'published' or 'fixed', got {count!r}")


def keep_best(score: torch.Tensor, valid: torch.Tensor, ratios: torch.Tensor, budgets: torch.Tensor | None = None) -> torch.Tensor:
    """Each crop's ``floor(n_j * r_j)`` best valid tokens by ``score`` (stable on ties), or its
    ``budgets`` best when given (``count="fixed"``: :func:`fixed_budgets`).

    Args:
        score: (..., N) scores of each crop's tokens (``-inf`` where padded).
        valid: (..., N) bool, unpadded positions (``n_j`` = their count).
        ratios: (...) each crop's retention ratio ``r_j``.
        budgets: (...) long, tokens each crop keeps (None: ``floor(n_j * r_j)``).

    Returns:
        (..., N) bool, True at the kept tokens (per crop along the last axis: any leading shape
        gives the same selection).
    """
    dev = score.device
    if budgets is None:
        k = _floor_count(valid.sum(dim=-1), ratios.to(device=dev, dtype=torch.float64))  # (...)
    else:
        k = budgets.to(dev)
    order = torch.argsort(score, dim=-1, descending=True, stable=True)  # (..., N)
    ranks = torch.arange(score.shape[-1], device=dev).expand(score.shape)
    rank = torch.empty_like(order).scatter_(-1, order, ranks)
    return (rank < k[..., None]) & valid
