"""Pure tensor operations of the selection methods: importance, crop budgets, selection, layouts.

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

Determinism: every score is computed in :data:`SCORE_DTYPE` (float64) and every selection or
ordering is a *stable* descending sort, so exact ties go to the lower index (position) first, on
every device. Given the same importance, the same tokens are kept, in the same order, everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .geometry import CropGeometry, crop_geometry, crops_to_grid, grid_to_crops, unpad_bounds, valid_mask

#: Precision of every importance, crop ratio and selection score. float64 makes our own arithmetic
#: independent of the machine's summation order (float32 matmuls and norms differ by an ulp between
#: CPUs and GPUs, enough to swap near-equal tokens); the tensors are (V, N): the cost is nil.
SCORE_DTYPE = torch.float64

__all__ = [
    "SCORE_DTYPE",
    "CropGeometry",
    "CompressionPlan",
    "KeptMasks",
    "crop_geometry",
    "unpad_bounds",
    "cls_attention_logits",
    "crop_region_scores",
    "crop_retention_ratios",
    "thumbnail_keep_indices",
    "select_crop_tokens",
    "fixed_budgets",
    "plan_image",
    "plan_single_view",
    "gather_features",
    "compress_image",
    "compress_by_scores",
]


# ----------------------------------------------------------------------------------------------
# Importance
# ----------------------------------------------------------------------------------------------


def cls_attention_logits(q_cls: torch.Tensor, keys: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """The [CLS] query's pre-softmax attention logits to every patch, averaged over heads.

    ``(q_cls * scale) . k_patch`` per head, mean over heads, the CLS column dropped. Only the CLS
    row is computed: O(T * D) per view instead of the O(T^2 * D) of a full attention map.

    Computed in :data:`SCORE_DTYPE` (float64) whatever the model's dtype: the products of two
    float32 (or 16-bit) numbers are exact there, so the result no longer depends on the order in
    which a machine's matmul kernel sums them. In float32 that order (AVX2 vs AVX-512 blocking,
    GPU split-K) moves logits by an ulp, and the thumbnail order of the ``official`` layout or a
    top-k boundary between two near-equal patches then differed between machines.

    Args:
        q_cls: (V, D) the CLS token's query projection (before scaling) for V views.
        keys: (V, T, D) key projections of all T = 1 + N tokens of the same layer.
        num_heads: attention heads; D must be divisible by it.
        scale: the attention scale, ``head_dim ** -0.5`` for CLIP.

    Returns:
        (V, N) float64 importance of each patch token.
    """
    v, t, d = keys.shape
    hd = d // num_heads
    q = q_cls.to(SCORE_DTYPE).reshape(v, num_heads, hd) * scale  # (V, h, hd)
    out = torch.empty((v, t - 1), dtype=SCORE_DTYPE, device=keys.device)
    # A few views at a time: the float64 copy of the keys stays under ~64 MiB (InternViT-6B: 3200 wide).
    step = max(1, (64 << 20) // max(1, t * d * 8))
    for start in range(0, v, step):
        k = keys[start : start + step, 1:].to(SCORE_DTYPE).reshape(-1, t - 1, num_heads, hd)  # (v', N, h, hd)
        out[start : start + step] = torch.einsum("vnhd,vhd->vn", k, q[start : start + step]) / num_heads
    return out


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
# Steps 1, 3, 4: selection
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
    if not geom.is_empty:
        s = geom.side
        resized = F.interpolate(
            thumb_importance.to(SCORE_DTYPE).reshape(1, 1, s, s),
            size=(geom.valid_rows, geom.valid_cols),
            mode="bilinear",
            align_corners=False,
        )[0, 0]  # (valid_rows, valid_cols)
        glob[geom.row0 : geom.row1, geom.col0 : geom.col1] = resized
    glob = grid_to_crops(glob, geom)  # (C, N)
    score = holistic_scores(crop_importance.to(SCORE_DTYPE), glob, valid, scoring)
    return keep_best(score, valid, crop_ratios, budgets), valid, score


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


# ----------------------------------------------------------------------------------------------
# Step 5: layouts
# ----------------------------------------------------------------------------------------------


@dataclass
class CompressionPlan:
    """Everything GlobalCom2 decided for one image, before any feature is copied.

    ``index`` addresses a feature table made of the thumbnail's N rows, then the C crops' N rows
    each (crop-major, raster order), then one image-newline row (see :func:`gather_features`).

    Attributes:
        index: (L,) long, the table rows that form the image's sequence, in order.
        thumb_keep: (N,) long, kept thumbnail indices in the order they are emitted.
        crop_keep: (C, N) bool at the true positions of kept crop tokens (C = 0 without crops).
        crop_valid: (C, N) bool, unpadded crop positions.
        crop_ratios: (C,) float64 retention ratio of each crop.
        thumb_importance: (N,) importance used for the thumbnail.
        crop_score: (C, N) holistic score of every crop token (``-inf`` where padded).
        geometry: the crop geometry, or None for a single view.
        layout: "official" or "spatial".
        table: (V, N, D) the features to gather from when the method changed them (a merging
            method such as VisionZip writes its merged tokens there); None: the image's own.
    """

    index: torch.Tensor
    thumb_keep: torch.Tensor
    crop_keep: torch.Tensor
    crop_valid: torch.Tensor
    crop_ratios: torch.Tensor
    thumb_importance: torch.Tensor
    crop_score: torch.Tensor
    geometry: CropGeometry | None
    layout: str
    table: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        """Visual tokens this image hands to the language model (newlines included)."""
        return int(self.index.shape[0])

    def kept_masks(self) -> KeptMasks:
        """The kept thumbnail and crop tokens as masks (host copies; one sync, for reports)."""
        n = int(self.thumb_importance.shape[-1])
        thumb = torch.zeros(n, dtype=torch.bool)
        thumb[self.thumb_keep.cpu()] = True
        keep = self.crop_keep.cpu()
        return KeptMasks(
            thumb=thumb, crop=keep, valid=self.crop_valid.cpu(), crop_ratios=self.crop_ratios.cpu(),
            thumb_tokens=int(thumb.sum()), crop_tokens=int(keep.sum()),
        )


@dataclass
class KeptMasks:
    """Which tokens of one image feed the language model, the same for every plan type (pictures
    and reports read this, never the plan's class).

    Attributes:
        thumb: (N,) bool, thumbnail tokens that feed the language model (kept, or pooled into it).
        crop: (C, N) bool, crop tokens that feed it, crop-major (C = 0 without crops).
        valid: (C, N) bool, crop tokens that survive unpadding.
        crop_ratios: (C,) float64, each crop's retention ratio (its realised fraction for a joint
            budget or pooling).
        thumb_tokens, crop_tokens: tokens the language model gets from the thumbnail and from the
            crops (the kept ones when selecting, the pooled ones when pooling).
        pooled: tokens are averaged (pooling) rather than selected.
        note: a remark on how the tokens were made, for pictures (None when selecting).
    """

    thumb: torch.Tensor
    crop: torch.Tensor
    valid: torch.Tensor
    crop_ratios: torch.Tensor
    thumb_tokens: int
    crop_tokens: int
    pooled: bool = False
    note: str | None = None


def _layout_spatial(keep: torch.Tensor, geom: CropGeometry, base: int, newline: int) -> torch.Tensor:
    """Crop part of the ``spatial`` layout: true positions, unpadded rows only, one newline each.

    Args:
        keep: (C, N) bool at true positions. base: table row of crop 0 token 0. newline: its row.
    Returns:
        (L_c,) long table rows.
    """
    dev = keep.device
    c, n = keep.shape
    table = base + torch.arange(c * n, device=dev).reshape(c, n)  # (C, N)
    rows = crops_to_grid(table, geom)[geom.row0 : geom.row1, geom.col0 : geom.col1]  # (h, w)
    flags = crops_to_grid(keep, geom)[geom.row0 : geom.row1, geom.col0 : geom.col1]  # (h, w)
    h = rows.shape[0]
    rows = torch.cat([rows, torch.full((h, 1), newline, device=dev, dtype=rows.dtype)], dim=1)
    flags = torch.cat([flags, torch.ones((h, 1), device=dev, dtype=torch.bool)], dim=1)
    return rows.reshape(-1)[flags.reshape(-1)]


def _layout_official(keep: torch.Tensor, valid: torch.Tensor, geom: CropGeometry, base: int, newline: int) -> torch.Tensor:
    """Crop part of the ``official`` layout, reproducing the published implementation.

    Each kept token of crop j is written into the crop at its index *within the crop's list of
    valid tokens* (not at its true position); the full H x W grid is then read row by row, padded
    rows included, each row followed by one newline. An image with no valid crop token
    contributes nothing here (the published code crashes on it).
    """
    dev = keep.device
    c, n = keep.shape
    if geom.is_empty:
        return torch.empty(0, dtype=torch.long, device=dev)
    vidx = valid.long().cumsum(dim=1) - 1  # (C, N): index of each valid token in its crop's list
    target = torch.where(keep, vidx, torch.full_like(vidx, n))  # dropped tokens go to a spare column
    pos = torch.arange(n, device=dev).expand(c, n)
    placed = torch.zeros((c, n + 1), dtype=torch.bool, device=dev).scatter_(1, target, True)[:, :n]
    source = torch.zeros((c, n + 1), dtype=torch.long, device=dev).scatter_(1, target, pos)[:, :n]
    table = base + torch.arange(c, device=dev)[:, None] * n + source  # (C, N)
    rows = crops_to_grid(table, geom)  # (H, W)
    flags = crops_to_grid(placed, geom)  # (H, W)
    h = rows.shape[0]
    rows = torch.cat([rows, torch.full((h, 1), newline, device=dev, dtype=rows.dtype)], dim=1)
    flags = torch.cat([flags, torch.ones((h, 1), device=dev, dtype=torch.bool)], dim=1)
    return rows.reshape(-1)[flags.reshape(-1)]


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


def _check_layout(layout: str) -> None:
    if layout not in ("official", "spatial"):
        raise ValueError(f"layout must be 'official' or 'spatial', got {layout!r}")


def _check_views(importance: torch.Tensor, geom: CropGeometry) -> None:
    views, n = importance.shape
    c = geom.num_crops
    if views != 1 + c or n != geom.side * geom.side:
        raise ValueError(
            f"importance has shape {tuple(importance.shape)}, expected (1 + {c}, {geom.side * geom.side}) for a "
            f"{geom.grid_h}x{geom.grid_w} crop grid of {geom.side}x{geom.side} views"
        )


def assemble_plan(
    thumb_keep: torch.Tensor,
    crop_keep: torch.Tensor,
    crop_valid: torch.Tensor,
    geom: CropGeometry,
    layout: str,
    crop_ratios: torch.Tensor,
    thumb_importance: torch.Tensor,
    crop_score: torch.Tensor,
) -> CompressionPlan:
    """Step 5 for any selection: arrange kept thumbnail and crop tokens in ``layout``.

    Args:
        thumb_keep: (k_t,) long kept thumbnail indices, in the order ``official`` emits them
            (``spatial`` sorts them into raster order).
        crop_keep: (C, N) bool, kept crop tokens at their true positions.
        crop_valid: (C, N) bool, unpadded crop positions.
        geom, layout: the image's geometry and the layout.
        crop_ratios, thumb_importance, crop_score: recorded in the plan (for pictures and tests).
    """
    _check_layout(layout)
    n = geom.side * geom.side
    newline = n + geom.num_crops * n
    if layout == "official":
        crop_rows = _layout_official(crop_keep, crop_valid, geom, base=n, newline=newline)
    else:
        thumb_keep = torch.sort(thumb_keep).values  # raster order
        crop_rows = _layout_spatial(crop_keep, geom, base=n, newline=newline)
    return CompressionPlan(
        index=torch.cat([thumb_keep, crop_rows]),
        thumb_keep=thumb_keep,
        crop_keep=crop_keep,
        crop_valid=crop_valid,
        crop_ratios=crop_ratios,
        thumb_importance=thumb_importance,
        crop_score=crop_score,
        geometry=geom,
        layout=layout,
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


def gather_features(features: torch.Tensor, newline: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor:
    """Materialise a plan: rows of ``[features.flatten(0, 1); newline]`` picked by ``index``.

    Args:
        features: (V, N, D) projected features of the image's views (thumbnail first).
        newline: (D,) image-newline embedding (None: a zero row, only for models without one).
        index: (L,) table rows from a :class:`CompressionPlan`.

    Returns:
        (L, D) the image's visual tokens, in ``features``' dtype and device.
    """
    v, n, d = features.shape
    index = index.to(features.device)
    is_newline = index == v * n  # (L,)
    # Gather straight from the features (no copy of the whole table), then write the newlines.
    out = features.reshape(v * n, d).index_select(0, index.clamp(max=v * n - 1))  # (L, D)
    nl = torch.zeros(d, dtype=features.dtype, device=features.device) if newline is None else newline
    return torch.where(is_newline[:, None], nl.to(features.device, features.dtype)[None], out)


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
