"""A whole batch's plans and tokens in one vectorised pass (GlobalCom2, joint budgets).

:mod:`globalcom2.core.plans` decides for one image at a time; serving a batch that way costs one
Python pass, a few dozen kernel launches and one host sync per image. Here every image of the
batch is planned at once and every output token is gathered with one ``index_select``:

* **Padding and masks.** Images are padded to the batch's largest crop count ``Cm`` (views beyond
  an image's own are masked out) and their crop grids to the batch's largest joint grid
  ``Hm x Wm``; single-view images (no crops) ride along with ``C = 0``. Per-image integers (grid,
  unpadded rectangle, table offsets) are computed on the host from the geometries (never from
  tensor data) and reach the device in **one** non-blocking copy.
* **One sync.** The output lengths (and, for joint budgets, how many thumbnail tokens each image
  keeps) are the only data-dependent sizes: they are read with one ``.tolist()`` per batch, then
  everything is compacted with scatters of known size.
* **One gather, no second copy.** The per-image feature tensors are, in every family, consecutive
  slices of the tower's one output tensor; :func:`joint_rows` sees that and addresses them as one
  ``(sum V N, D)`` table without copying (otherwise it concatenates them). The output is one
  ``index_select`` from that table; the newline rows (whose output positions are known from the
  slot structure, without a sync) are then written with one ``index_copy_`` of a few rows, instead
  of the ``torch.where`` pass over all ``L x D`` of :func:`~globalcom2.core.plans.gather_features`.
  On the CPU the gather is cut into runs of images of at most :data:`GATHER_CHUNK_BYTES` of output
  (malloc hands larger blocks out as fresh, page-faulting memory on every call); elsewhere one.

**Bit-identical to the per-image functions** (``tests/test_batch.py`` checks it on random
geometries and quantised importances, ties included): every op below either acts elementwise or
reduces/sorts along an axis whose length is the same as in the per-image code (a crop's N tokens,
an image's views), which gives the same bits. Two steps cannot be written that way and are done
per *group* of images instead, each group being one call on a slice:

* the sums and means over an image's ``C`` crops (Step 2's softmax): a reduction over a padded
  axis of ``Cm`` entries adds in another order than one over ``C``, so images are grouped by
  crop count (at most a handful of groups: the family's pinpoints);
* the bilinear resize of the thumbnail's map to each unpadded area (Step 4): ``F.interpolate``
  takes one output size per call, so images are grouped by unpadded size (one call for a batch of
  equal-size images) and the results are placed with one gather. Writing the interpolation by hand
  would not reproduce the kernel's rounding.

Not batched here (the methods fall back to their per-image functions, one sync per image):
pooling (it makes new tokens, nothing to select), GlobalCom2 on LLaVA-OneVision's resized crop map
(:mod:`globalcom2.core.resized`: its per-crop step owns another geometry) and InternVL's
tiles-then-thumbnail order (``models/internvl.py``). On other backends than the CPU the float64
crop ratios agree with the per-image functions as well as the backend's own kernels agree across
shapes (the selections they feed are integer floors, so only an exact tie with an integer could
differ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .geometry import CropGeometry
from .plans import (
    SCORE_DTYPE,
    CompressionPlan,
    _check_count,
    _check_layout,
    _check_views,
    _floor_count,
    fixed_budgets,
    holistic_scores,
    keep_best,
)

__all__ = ["BatchPlan", "plan_batch", "gather_batch", "compress_batch", "joint_rows", "is_batchable"]

#: Column of each per-image integer in the host table sent to the device (see :class:`_Host`).
_FIELDS = ("gh", "gw", "row0", "row1", "col0", "col1", "crops", "offset", "k", "interp_base", "interp_w")


@dataclass
class BatchPlan:
    """The plans of a batch's images and what gathering their tokens needs.

    Attributes:
        plans: per image, its :class:`~globalcom2.core.plans.CompressionPlan` (equal to what the
            per-image functions return; ``index`` addresses the image's own table).
        index: (L,) long rows of the batch's joint table (:func:`joint_rows`); newline positions
            hold the image's first row and are overwritten after the gather.
        newline_positions: (M,) long output positions of the image-newline tokens.
        lengths: per image, its number of output tokens (host ints, read with the one sync).
        newline_counts: per image, how many of them are newlines (host ints, from the geometry).
    """

    plans: list[CompressionPlan]
    index: torch.Tensor
    newline_positions: torch.Tensor
    lengths: list[int]
    newline_counts: list[int]


def is_batchable(geom: CropGeometry | None, views: int) -> bool:
    """Whether :func:`plan_batch` handles an image: a single view, or a plain crop grid (not a
    :class:`~globalcom2.core.resized.ResizedCropGeometry`, whose per-crop step is its own)."""
    if geom is None or views == 1:
        return True
    return getattr(geom, "src_row1", None) is None


def joint_rows(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """The images' ``(V_i, N, D)`` features as one ``(sum V_i N, D)`` table, without a copy when they
    are consecutive slices of one contiguous tensor (``torch.split`` of the tower's output, as every
    family makes them); otherwise concatenated (one copy). The view keeps autograd intact: it is a
    slice of the tensor the features are views of."""
    first = features[0]
    d = first.shape[-1]
    rows = sum(int(f.shape[0]) * int(f.shape[1]) for f in features)
    base = first._base if first._base is not None else first
    offset = first.storage_offset()
    ok = base.is_contiguous() and base.numel() % d == 0
    for f in features:
        ok = ok and f.is_contiguous() and (f._base if f._base is not None else f) is base and f.storage_offset() == offset
        offset += f.numel()
    start = first.storage_offset() - base.storage_offset()
    if ok and start % d == 0:
        return base.reshape(-1, d)[start // d : start // d + rows]
    return torch.cat([f.reshape(-1, d) for f in features])


@dataclass
class _Host:
    """Host-side description of a batch (ints from the geometries, no tensor data)."""

    n: int  # tokens per view
    side: int
    crops: list[int]  # C_b (0: single view)
    views: list[int]
    geoms: list[CropGeometry | None]  # None for single views
    cm: int  # max crops
    hm: int  # max joint-grid rows
    wm: int  # max joint-grid columns


def _describe(importance: Sequence[torch.Tensor], geometries: Sequence[CropGeometry | None], joint: bool) -> _Host:
    if len(importance) != len(geometries):
        raise ValueError(f"{len(importance)} importance maps for {len(geometries)} geometries")
    n = int(importance[0].shape[-1])
    crops, views, geoms = [], [], []
    for imp, geom in zip(importance, geometries):
        if imp.dim() != 2 or int(imp.shape[1]) != n:
            raise ValueError(f"every image's importance must be (V, {n}); got {tuple(imp.shape)}")
        v = int(imp.shape[0])
        single = geom is None or v == 1
        if not single:
            _check_views(imp, geom)
            if not joint and not is_batchable(geom, v):
                raise ValueError("plan_batch plans GlobalCom2 on plain crop grids only (resized maps: globalcom2.core.resized)")
        crops.append(0 if single else geom.num_crops)
        views.append(v)
        geoms.append(None if single else geom)
    multi = [g for g in geoms if g is not None]
    side = multi[0].side if multi else math.isqrt(n)
    return _Host(
        n=n, side=side, crops=crops, views=views, geoms=geoms, cm=max(crops),
        hm=max((g.height for g in multi), default=0), wm=max((g.width for g in multi), default=0),
    )


def _groups(keys: list) -> tuple[list[int], list[tuple[object, int, int]]]:
    """A stable order of the images by ``keys`` and the contiguous (key, start, end) runs in it."""
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    runs: list[tuple[object, int, int]] = []
    for pos, i in enumerate(order):
        if runs and runs[-1][0] == keys[i]:
            runs[-1] = (keys[i], runs[-1][1], pos + 1)
        else:
            runs.append((keys[i], pos, pos + 1))
    return order, runs


def _permute(x: torch.Tensor, order: list[int], index: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` in ``order`` (``index`` is ``order`` on the device); no op for the identity."""
    return x if order == sorted(order) else x.index_select(0, index)


def plan_batch(
    importance: Sequence[torch.Tensor],
    geometries: Sequence[CropGeometry | None],
    retention_ratio: float,
    layout: str = "official",
    *,
    joint: bool = False,
    temperature: float = 10.0,
    allocation: str = "softmax_sum",
    scoring: str = "global_local",
    count: str = "published",
) -> BatchPlan:
    """Plan every image of a batch at once, with one host sync.

    ``joint=False`` is GlobalCom2 (what :func:`~globalcom2.core.plans.plan_image` /
    :func:`~globalcom2.core.plans.plan_single_view` decide per image, with the same
    ``allocation`` / ``scoring`` ablations); ``joint=True`` is one budget per image ranked by
    ``importance`` as scores (:func:`~globalcom2.core.plans.plan_joint`: FasterVLM, random).

    Args:
        importance: per image, (V_i, N) importance (or scores) of its views, thumbnail first; all
            on one device, with the same N.
        geometries: per image, its crop geometry (None, or one view: a single-view image).
        retention_ratio, layout, temperature, allocation, scoring, count: as the per-image functions.

    Returns:
        :class:`BatchPlan`.
    """
    _check_layout(layout)
    _check_count(count)
    if not importance:
        raise ValueError("plan_batch needs at least one image")
    host = _describe(importance, geometries, joint)
    dev = importance[0].device
    n, s, cm, hm, wm = host.n, host.side, host.cm, host.hm, host.wm
    b = len(host.views)
    spatial = layout == "spatial"
    k_t = _floor_count(n, float(retention_ratio))

    # ---- host integers -> one device table -------------------------------------------------
    per: dict[str, list[int]] = {f: [] for f in _FIELDS}
    view_rows: list[int] = []
    offset = view_start = 0
    size_keys = [(g.valid_rows, g.valid_cols) if g is not None and not g.is_empty else (0, 0) for g in host.geoms]
    size_order, size_runs = _groups(size_keys)
    interp_base = [0] * b
    pos = 0
    for key, start, end in size_runs:
        for p in range(start, end):
            interp_base[size_order[p]] = pos + (p - start) * key[0] * key[1]
        pos += (end - start) * key[0] * key[1]
    for i, (g, v, c) in enumerate(zip(host.geoms, host.views, host.crops)):
        gh, gw = (g.grid_h, g.grid_w) if g is not None else (1, 1)
        rect = (g.row0, g.row1, g.col0, g.col1) if g is not None else (0, 0, 0, 0)
        k = k_t if g is None or not joint else _floor_count(n + g.valid_rows * g.valid_cols, float(retention_ratio))
        vals = (gh, gw, *rect, c, offset, k, interp_base[i], size_keys[i][1])
        for f, val in zip(_FIELDS, vals):
            per[f].append(int(val))
        view_rows.extend(view_start + min(j, c) for j in range(1 + cm))
        offset += v * n
        view_start += v
    crop_order, crop_runs = _groups(host.crops)
    # Slots: per image [thumbnail T][crop grid hm x (wm + 1), newline last in each row][one trailing newline].
    t_slots = n if spatial else (max(per["k"]) if joint else k_t)
    width = wm + 1
    p_slots = t_slots + hm * width + 1
    nl_slots: list[int] = []
    nl_counts: list[int] = []
    for i, g in enumerate(host.geoms):
        base = i * p_slots + t_slots + wm
        before = len(nl_slots)
        if g is None:
            nl_slots.append(i * p_slots + p_slots - 1)
        elif spatial:
            nl_slots.extend(range(base + g.row0 * width, base + g.row1 * width, width))
        elif not g.is_empty:
            nl_slots.extend(range(base, base + g.height * width, width))
        nl_counts.append(len(nl_slots) - before)
    packed = torch.tensor(
        [x for f in _FIELDS for x in per[f]] + view_rows + crop_order + size_order + nl_slots, dtype=torch.long
    ).to(dev, non_blocking=True)
    cols = dict(zip(_FIELDS, packed[: len(_FIELDS) * b].view(len(_FIELDS), b, 1).unbind(0)))  # each (B, 1)
    rest = packed[len(_FIELDS) * b :]
    view_idx, rest = rest[: b * (1 + cm)], rest[b * (1 + cm) :]
    crop_perm, size_perm, nl_idx = rest[:b], rest[b : 2 * b], rest[2 * b :]

    # ---- importance, padded to (B, 1 + Cm, N) ----------------------------------------------
    imp_all = torch.cat(list(importance)) if b > 1 else importance[0]
    imp = imp_all.index_select(0, view_idx).reshape(b, 1 + cm, n)
    thumb = imp[:, 0]  # (B, N)
    j_idx = torch.arange(cm, device=dev)[None]  # (1, Cm)
    crop_ok = j_idx < cols["crops"]  # (B, Cm)
    t_idx = torch.arange(n, device=dev)
    rows = (j_idx // cols["gw"])[..., None] * s + (t_idx // s)[None, None]  # (B, Cm, N) joint-grid row
    colg = (j_idx % cols["gw"])[..., None] * s + (t_idx % s)[None, None]  # (B, Cm, N) joint-grid column
    valid = (
        crop_ok[..., None]
        & (rows >= cols["row0"][..., None]) & (rows < cols["row1"][..., None])
        & (colg >= cols["col0"][..., None]) & (colg < cols["col1"][..., None])
    )  # (B, Cm, N)

    if joint:
        thumb_flags, thumb_rows, keep, ratios, score = _joint(imp, valid, cols, n, cm, spatial, t_slots)
    else:
        order_t = torch.argsort(thumb, dim=1, descending=True, stable=True)
        thumb_keep = order_t[:, :k_t]  # (B, k_t), most important first
        if spatial:
            thumb_flags = torch.zeros((b, n), dtype=torch.bool, device=dev).scatter_(1, thumb_keep, True)
            thumb_rows = t_idx.expand(b, n)
        else:
            thumb_flags = torch.ones((b, k_t), dtype=torch.bool, device=dev)
            thumb_rows = thumb_keep
        if cm:
            ratios = _crop_ratios(thumb, thumb_keep, cols, crop_ok, host, crop_order, crop_runs, crop_perm,
                                  retention_ratio, temperature, allocation)
            glob = _global_scores(thumb, host, size_order, size_runs, size_perm, rows, colg, valid, cols)
            budgets = fixed_budgets(valid.sum(2), ratios, retention_ratio) if count == "fixed" else None
            keep, score = _select(imp[:, 1:], glob, valid, ratios, scoring, budgets)
        else:
            ratios = torch.zeros((b, 0), dtype=torch.float64, device=dev)
            keep = torch.zeros((b, 0, n), dtype=torch.bool, device=dev)
            score = torch.zeros((b, 0, n), dtype=SCORE_DTYPE, device=dev)

    # ---- slots of the sequence ----------------------------------------------------------------
    nl_local = (1 + cols["crops"]) * n  # (B, 1): the newline row of each image's own table (as plan_single_view's)
    parts_rows = [thumb_rows]
    parts_flags = [thumb_flags]
    if hm:
        r = torch.arange(hm, device=dev)[:, None]
        c = torch.arange(wm, device=dev)[None]
        in_grid = (r < cols["gh"][..., None] * s) & (c < cols["gw"][..., None] * s) & (cols["crops"][..., None] > 0)
        jt = ((r // s) * cols["gw"][..., None] + c // s) * n + (r % s) * s + (c % s)  # (B, Hm, Wm)
        jt = torch.where(in_grid, jt, torch.zeros((), dtype=jt.dtype, device=dev)).reshape(b, hm * wm)
        keep_flat = keep.reshape(b, cm * n)
        if spatial:
            flags = keep_flat.gather(1, jt)
            local = n + jt
            nl_flag = (r[:, 0][None] >= cols["row0"]) & (r[:, 0][None] < cols["row1"])  # (B, Hm)
        else:
            vidx = valid.long().cumsum(dim=2) - 1
            target = torch.where(keep, vidx, torch.full_like(vidx, n))  # dropped tokens go to a spare column
            placed = torch.zeros((b, cm, n + 1), dtype=torch.bool, device=dev).scatter_(2, target, True)[..., :n]
            src = torch.zeros((b, cm, n + 1), dtype=torch.long, device=dev).scatter_(2, target, t_idx.expand(b, cm, n))
            flags = placed.reshape(b, cm * n).gather(1, jt)
            j_of = jt // n
            local = n + j_of * n + src[..., :n].reshape(b, cm * n).gather(1, jt)
            nonempty = (cols["row1"] > cols["row0"]) & (cols["col1"] > cols["col0"])  # (B, 1)
            nl_flag = (r[:, 0][None] < cols["gh"] * s) & nonempty & (cols["crops"] > 0)
        flags = flags & in_grid.reshape(b, hm * wm)
        grid_rows = torch.cat([local.reshape(b, hm, wm), nl_local[..., None].expand(b, hm, 1)], dim=2)
        grid_flags = torch.cat([flags.reshape(b, hm, wm), nl_flag[..., None]], dim=2)
        parts_rows.append(grid_rows.reshape(b, hm * width))
        parts_flags.append(grid_flags.reshape(b, hm * width))
    parts_rows.append(nl_local)
    parts_flags.append(cols["crops"] == 0)
    slot_rows = torch.cat(parts_rows, dim=1)  # (B, P) rows of each image's own table
    slot_flags = torch.cat(parts_flags, dim=1)  # (B, P)

    # ---- the one host sync: output lengths (and kept thumbnail tokens) ------------------------
    lengths_t = slot_flags.sum(1)
    lengths, thumb_counts = torch.stack([lengths_t, thumb_flags.sum(1)]).tolist()
    total = sum(lengths)
    flat_flags = slot_flags.reshape(-1)
    dest = torch.where(flat_flags, flat_flags.long().cumsum(0) - 1, torch.full_like(lengths_t[:1], total))
    is_nl = slot_rows == nl_local
    joint_slots = torch.where(is_nl, cols["offset"], slot_rows + cols["offset"]).reshape(-1)
    local_index = torch.empty(total + 1, dtype=torch.long, device=dev).scatter_(0, dest, slot_rows.reshape(-1))[:total]
    index = torch.empty(total + 1, dtype=torch.long, device=dev).scatter_(0, dest, joint_slots)[:total]
    newline_positions = dest.index_select(0, nl_idx)

    plans: list[CompressionPlan] = []
    start = 0
    empty_bool = torch.zeros((0, n), dtype=torch.bool, device=dev)
    for i, (g, c) in enumerate(zip(host.geoms, host.crops)):
        idx = local_index[start : start + lengths[i]]
        start += lengths[i]
        thumb_keep_i = idx[: thumb_counts[i]]
        if g is None:
            plans.append(CompressionPlan(
                index=idx, thumb_keep=thumb_keep_i, crop_keep=empty_bool, crop_valid=empty_bool,
                crop_ratios=torch.zeros(0, dtype=torch.float64, device=dev), thumb_importance=importance[i][0].reshape(-1),
                crop_score=torch.zeros((0, n), dtype=SCORE_DTYPE, device=dev), geometry=None, layout=layout,
            ))
        else:
            plans.append(CompressionPlan(
                index=idx, thumb_keep=thumb_keep_i, crop_keep=keep[i, :c], crop_valid=valid[i, :c],
                crop_ratios=ratios[i, :c], thumb_importance=importance[i][0], crop_score=score[i, :c],
                geometry=g, layout=layout,
            ))
    return BatchPlan(
        plans=plans, index=index, newline_positions=newline_positions, lengths=lengths, newline_counts=nl_counts
    )


def _joint(imp, valid, cols, n, cm, spatial, t_slots):
    """One budget per image over its thumbnail and unpadded crop tokens (plan_joint, batched)."""
    b = imp.shape[0]
    dev = imp.device
    full_valid = torch.cat([torch.ones((b, 1, n), dtype=torch.bool, device=dev), valid], dim=1)  # (B, 1 + Cm, N)
    masked = imp.to(SCORE_DTYPE).masked_fill(~full_valid, float("-inf"))
    flat = masked.reshape(b, (1 + cm) * n)
    # Padded views sit after the image's own and are -inf: a stable sort leaves the image's own
    # ranking exactly as over its (1 + C) N tokens alone.
    order = torch.argsort(flat, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(flat.shape[1], device=dev).expand_as(order))
    kept = (rank < cols["k"]) & full_valid.reshape(b, -1)
    keep = kept[:, n:].reshape(b, cm, n)
    if spatial:
        thumb_flags, thumb_rows = kept[:, :n], torch.arange(n, device=dev).expand(b, n)
    else:
        top = order[:, :t_slots]
        thumb_flags = (torch.arange(t_slots, device=dev)[None] < cols["k"]) & (top < n)
        thumb_rows = torch.where(thumb_flags, top, torch.zeros((), dtype=top.dtype, device=dev))
    n_valid = valid.sum(2).to(torch.float64)
    ratios = keep.sum(2).to(torch.float64) / n_valid.clamp_min(1.0)
    return thumb_flags, thumb_rows, keep, ratios, masked[:, 1:]


def _crop_ratios(thumb, thumb_keep, cols, crop_ok, host, crop_order, crop_runs, crop_perm, ratio, tau, allocation):
    """Step 2 for every image (see :func:`~globalcom2.core.plans.crop_retention_ratios`)."""
    b, n = thumb.shape
    dev = thumb.device
    cm, s = host.cm, host.side
    if allocation == "uniform":
        return torch.full((b, cm), float(ratio), dtype=torch.float64, device=dev)
    idx = torch.arange(s, device=dev)[None]
    row_region = torch.minimum(idx // torch.clamp_min(s // cols["gh"], 1), cols["gh"] - 1)  # (B, S)
    col_region = torch.minimum(idx // torch.clamp_min(s // cols["gw"], 1), cols["gw"] - 1)  # (B, S)
    region = (row_region[:, :, None] * cols["gw"][..., None] + col_region[:, None, :]).reshape(b, n)  # (B, N)
    if allocation == "topk_count":
        kept_region = region.gather(1, thumb_keep)
        counts = torch.zeros((b, cm), dtype=torch.float64, device=dev).scatter_add_(
            1, kept_region, torch.ones(kept_region.shape, dtype=torch.float64, device=dev)
        )
        total = counts.sum(1, keepdim=True)  # integer-valued: exact in any order
        share = torch.where(total > 0, counts * cols["crops"].to(torch.float64) / total.clamp_min(1.0), torch.ones_like(counts))
        return torch.clamp(ratio * share, max=1.0)
    if allocation == "softmax_sum":
        sums = torch.zeros((b, cm), dtype=torch.float64, device=dev).scatter_add_(1, region, thumb.to(torch.float64))
    elif allocation == "softmax_max":
        sums = torch.full((b, cm), float("-inf"), dtype=torch.float64, device=dev).scatter_reduce(
            1, region, thumb.to(torch.float64), reduce="amax"
        )
    else:
        raise ValueError(f"allocation must be one of softmax_sum, softmax_max, uniform, topk_count; got {allocation!r}")
    neg = torch.full((), float("-inf"), dtype=torch.float64, device=dev)
    top = torch.where(crop_ok, sums, neg).amax(1, keepdim=True)
    e = torch.where(crop_ok, torch.exp((sums - top) / tau), torch.zeros((), dtype=torch.float64, device=dev))
    e_sum = _group_reduce(e, crop_order, crop_runs, crop_perm, "sum")
    sigma = e / (e_sum + 1e-8)
    mean = _group_reduce(sigma, crop_order, crop_runs, crop_perm, "mean")
    return torch.clamp(ratio * (1.0 + sigma - mean), max=1.0)


def _group_reduce(x, order, runs, perm, how):
    """(B, 1) sum or mean of each row's first ``C_b`` entries, reducing over exactly ``C_b`` of them
    (one call per crop count: the bits of a 1-D reduction of C values)."""
    xs = _permute(x, order, perm)
    outs = []
    for c, start, end in runs:
        if c == 0:
            outs.append(torch.zeros(end - start, dtype=x.dtype, device=x.device))
            continue
        part = xs[start:end, :c]
        outs.append(part.sum(1) if how == "sum" else part.mean(1))
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    if order != sorted(order):
        out = torch.empty_like(out).index_copy_(0, perm, out)
    return out[:, None]


def _global_scores(thumb, host, size_order, size_runs, size_perm, rows, colg, valid, cols):
    """Step 4's global guidance of every crop token: the thumbnail's map resized (bilinear, as
    ``F.interpolate`` does it, one call per distinct unpadded size) to the unpadded area."""
    b, n = thumb.shape
    s = host.side
    ts = _permute(thumb, size_order, size_perm).to(SCORE_DTYPE)
    maps = []
    for (h, w), start, end in size_runs:
        if h * w == 0:
            continue
        part = ts[start:end].reshape(end - start, 1, s, s)
        maps.append(F.interpolate(part, size=(h, w), mode="bilinear", align_corners=False).reshape(-1))
    if not maps:
        return torch.zeros(valid.shape, dtype=SCORE_DTYPE, device=thumb.device)
    flat = torch.cat(maps) if len(maps) > 1 else maps[0]
    pos = cols["interp_base"][..., None] + (rows - cols["row0"][..., None]) * cols["interp_w"][..., None] + (colg - cols["col0"][..., None])
    pos = torch.where(valid, pos, torch.zeros((), dtype=pos.dtype, device=pos.device))
    vals = flat.index_select(0, pos.reshape(-1)).reshape(pos.shape)  # (take runs multi-threaded on small inputs)
    return torch.where(valid, vals, torch.zeros((), dtype=vals.dtype, device=vals.device))


def _select(local, glob, valid, ratios, scoring, budgets=None):
    """Step 4's selection for every crop of every image (see :func:`~globalcom2.core.plans.select_crop_tokens`)."""
    score = holistic_scores(local.to(SCORE_DTYPE), glob, valid, scoring)  # (B, Cm, N)
    return keep_best(score, valid, ratios, budgets), score


#: Largest output one gather writes, by device type (None or absent: the whole batch at once).
#: On the CPU, glibc serves blocks above its largest mmap threshold (32 MiB on 64-bit systems) with
#: fresh pages from the kernel on every call, so one batch-sized output (200 MB for 16 2x2 images at
#: hidden 4096) spends most of its time in first-touch page faults: measured per image, 10 ms at 16
#: images against 2.6 ms in chunks of at most this size (``benchmarks/compression_step.py``).
#: Caching allocators (CUDA) have no such cliff: there the batch is one gather.
GATHER_CHUNK_BYTES: dict[str, int] = {"cpu": 32 << 20}


def _chunks(lengths: list[int], row_bytes: int, limit: int | None) -> list[tuple[int, int]]:
    """Runs ``[i, j)`` of consecutive images whose outputs fit in ``limit`` bytes (an image larger
    than it is a run of its own); one run without a limit."""
    if limit is None:
        return [(0, len(lengths))]
    runs, start, size = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and (size + n) * row_bytes > limit:
            runs.append((start, i))
            start, size = i, 0
        size += n
    runs.append((start, len(lengths)))
    return runs


def gather_batch(
    features: Sequence[torch.Tensor], newline: torch.Tensor | None, plan: BatchPlan, chunk_bytes: int | None = -1
) -> list[torch.Tensor]:
    """The batch's tokens: one ``index_select`` from :func:`joint_rows`, then the newline rows
    written in place (one ``index_copy_`` of M rows), split per image (views, no copy).

    On the CPU the gather runs in runs of consecutive images of at most
    :data:`GATHER_CHUNK_BYTES` output each (see there: the allocator, not the arithmetic, decides
    the cost of one huge output); elsewhere the whole batch is one gather.

    Args:
        features: per image, (V_i, N, D) features, in the order given to :func:`plan_batch`.
        newline: (D,) image-newline embedding (None: zero rows, for families without one).
        plan: the batch's :class:`BatchPlan`.
        chunk_bytes: the largest output of one gather (None: no limit; default: by device type,
            :data:`GATHER_CHUNK_BYTES`).
    """
    table = joint_rows(features)
    d = table.shape[1]
    limit = GATHER_CHUNK_BYTES.get(table.device.type) if chunk_bytes == -1 else chunk_bytes
    index = plan.index.to(table.device)
    positions = plan.newline_positions.to(table.device)
    nl = None
    if positions.shape[0]:
        nl = torch.zeros(d, dtype=table.dtype, device=table.device) if newline is None else newline.to(table.device, table.dtype)
    tokens: list[torch.Tensor] = []
    start = nl_start = 0
    for i, j in _chunks(plan.lengths, d * table.element_size(), limit):
        size, m = sum(plan.lengths[i:j]), sum(plan.newline_counts[i:j])
        part = table.index_select(0, index[start : start + size] if (i, j) != (0, len(plan.lengths)) else index)
        if m:
            where = positions[nl_start : nl_start + m]
            part.index_copy_(0, where - start if start else where, nl.expand(m, d))
        tokens.extend(torch.split(part, plan.lengths[i:j]))
        start, nl_start = start + size, nl_start + m
    return tokens


def compress_batch(
    features: Sequence[torch.Tensor],
    importance: Sequence[torch.Tensor],
    geometries: Sequence[CropGeometry | None],
    newline: torch.Tensor | None,
    retention_ratio: float,
    layout: str = "official",
    **options: object,
) -> tuple[list[torch.Tensor], list[CompressionPlan]]:
    """:func:`plan_batch` then :func:`gather_batch`: per image its tokens and plan, with one host
    sync for the whole batch (``options``: ``joint``, ``temperature``, ``allocation``, ``scoring``)."""
    plan = plan_batch(importance, geometries, retention_ratio, layout, **options)  # type: ignore[arg-type]
    return gather_batch(features, newline, plan), plan.plans
