"""A whole batch's plans and tokens in one vectorised pass (GlobalCom2, joint budgets).

:mod:`globalcom2.core.plans` decides for one image at a time; serving a batch that way costs one
Python pass, a few dozen kernel launches and one host sync per image. Here every image of the
batch is planned at once and every output token is gathered with one ``index_select``:

* **Padding and masks.** Images are padded to the batch's largest crop count ``Cm`` (views beyond
  an image's own are masked out) and their crop grids to the batch's largest joint grid
  ``Hm x Wm``; single-view images (no crops) ride along with ``C = 0``.
* **Geometry on the host.** Everything that follows from the geometries alone (unpadded masks,
  crop regions, resized-map cells, every output slot's source, newline positions) is built with
  numpy (:func:`globalcom2.core.batch_host.host_tables`, kept by :class:`BatchPrep`, cached per
  batch shape and settings) and reaches the device in
  three packed copies: the device pass runs only the ops that read the importance, about 60
  kernels for a batch whatever its size (``tests/test_batch_ops.py`` counts them; 150 before).
* **One sync, or none.** With the published count the output lengths are read with one
  ``.tolist()`` per batch (joint budgets: how many thumbnail tokens each image keeps); with
  ``count="fixed"`` they follow from the geometry, the step makes no sync and its shapes depend
  only on the image sizes (:meth:`BatchPrep.step` compiles with ``fullgraph=True``).
* **One gather, no second copy.** The per-image feature tensors are, in every family, consecutive
  slices of the tower's one output tensor; :func:`joint_rows` sees that and addresses them as one
  ``(sum V N, D)`` table without copying (otherwise it concatenates them). The output is one
  ``index_select`` from that table; the newline rows (whose output positions are known from the
  slot structure, without a sync) are then written with one ``index_copy_`` of a few rows, instead
  of the ``torch.where`` pass over all ``L x D`` of :func:`~globalcom2.core.layouts.gather_features`.
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

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .geometry import CanvasCropGeometry, CropGeometry
from .batch_host import _Host, _host, host_tables
from .budgets import _check_count, fixed_budgets
from .importance import SCORE_DTYPE
from .layouts import CompressionPlan, _check_layout
from .plans import _check_views

__all__ = [
    "BatchPlan", "BatchPrep", "prepare_batch", "plan_batch", "gather_batch", "compress_batch", "joint_rows",
    "joint_importance", "is_batchable",
]

@dataclass
class BatchPlan:
    """The plans of a batch's images and what gathering their tokens needs.

    Attributes:
        plans: per image, its :class:`~globalcom2.core.layouts.CompressionPlan` (equal to what the
            per-image functions return; ``index`` addresses the image's own table).
        index: (L,) long rows of the batch's joint table (:func:`joint_rows`); newline positions
            hold a row of the table and are overwritten after the gather.
        newline_positions: (M,) long output positions of the image-newline tokens.
        lengths: per image, its number of output tokens (host ints: from the geometry with
            ``count="fixed"`` and joint budgets, else read with the one sync).
        newline_counts: per image, how many of them are newlines (host ints, from the geometry).
    """

    plans: list[CompressionPlan]
    index: torch.Tensor
    newline_positions: torch.Tensor
    lengths: list[int]
    newline_counts: list[int]


def is_batchable(geom: CropGeometry | None, views: int) -> bool:
    """Whether :func:`plan_batch` handles an image: a single view, or a plain crop grid (not a
    :class:`~globalcom2.core.resized.ResizedCropGeometry`, whose per-crop step is its own, nor a
    :class:`~globalcom2.core.geometry.CanvasCropGeometry`, whose Step 4 map spans the padding)."""
    if geom is None or views == 1:
        return True
    return getattr(geom, "src_row1", None) is None and not isinstance(geom, CanvasCropGeometry)


def _consecutive(parts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """``parts`` as one tensor concatenated along dim 0 *without a copy* when they are consecutive
    slices of one contiguous tensor (``torch.split`` of one output), else None."""
    first = parts[0]
    base = first._base if first._base is not None else first
    if not base.is_contiguous():
        return None
    row = math.prod(first.shape[1:])
    offset = first.storage_offset()
    for f in parts:
        if not f.is_contiguous() or (f._base if f._base is not None else f) is not base or f.storage_offset() != offset:
            return None
        offset += f.numel()
    start = first.storage_offset() - base.storage_offset()
    rows = sum(int(f.shape[0]) for f in parts)
    if row == 0 or start % row or base.numel() % row:
        return None
    flat = base.reshape(-1, *first.shape[1:])
    return flat if start == 0 and rows == flat.shape[0] else flat[start // row : start // row + rows]


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


def _describe(importance: Sequence[torch.Tensor], geometries: Sequence[CropGeometry | None], joint: bool) -> _Host:
    if len(importance) != len(geometries):
        raise ValueError(f"{len(importance)} importance maps for {len(geometries)} geometries")
    n = int(importance[0].shape[-1])
    views, geoms = [], []
    for imp, geom in zip(importance, geometries):
        if imp.dim() != 2 or int(imp.shape[1]) != n:
            raise ValueError(f"every image's importance must be (V, {n}); got {tuple(imp.shape)}")
        v = int(imp.shape[0])
        single = geom is None or v == 1
        if not single:
            _check_views(imp, geom)
            if not joint and not is_batchable(geom, v):
                raise ValueError("plan_batch plans GlobalCom2 on plain crop grids only (resized maps: globalcom2.core.resized)")
        views.append(v)
        geoms.append(None if single else geom)
    return _host(geoms, views, n)


def _permute(x: torch.Tensor, order: list[int], index: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` in ``order`` (``index`` is ``order`` on the device); no op for the identity."""
    return x if order == sorted(order) else x.index_select(0, index)


class BatchPrep:
    """Everything about a batch's plan that follows from its geometries and settings alone, made on
    the host (numpy: no device op), and the device pass that completes it from the importance.

    The tables (which crop tokens are unpadded, where each sits in its image's crop grid, which
    resized-map cell guides it, which output slot reads which table row, where the newlines go)
    are integer functions of the geometry: they are built with numpy
    (:func:`~globalcom2.core.batch_host.host_tables`) and reach the device as three
    packed tensors (one copy each on an accelerator), so the device pass runs only the ops that
    read the importance, about 50 kernels for a batch whatever its size
    (``tests/test_batch_ops.py`` counts them).

    :meth:`run` is the device pass. With ``count="fixed"`` (and for joint budgets) every output
    length is known here (:attr:`lengths`); for GlobalCom2 with ``count="fixed"`` the thumbnail
    counts too, so :meth:`run` then makes no host sync at all and its shapes depend only on the
    geometries: ``torch.compile(prep.run, fullgraph=True)`` captures it in one graph.
    """

    def __init__(
        self,
        host: _Host,
        retention_ratio: float,
        layout: str,
        joint: bool,
        temperature: float,
        allocation: str,
        scoring: str,
        count: str,
    ) -> None:
        self.host = host
        self.ratio = float(retention_ratio)
        self.layout, self.joint, self.temperature = layout, joint, float(temperature)
        self.allocation, self.scoring, self.count = allocation, scoring, count
        if not joint and allocation not in ("softmax_sum", "softmax_max", "uniform", "topk_count"):
            raise ValueError(f"allocation must be one of softmax_sum, softmax_max, uniform, topk_count; got {allocation!r}")
        if not joint and scoring not in ("global_local", "global_only", "local_only"):
            raise ValueError(f"scoring must be one of global_local, global_only, local_only; got {scoring!r}")
        tables = host_tables(host, self.ratio, layout, joint, count)
        self.b, self.spatial, self.k_t, self.ks = tables.b, tables.spatial, tables.k_t, tables.ks
        self.t_slots, self.p_slots, self.cw = tables.t_slots, tables.p_slots, tables.cw
        self.nl_counts, self.offsets, self.rows_total = tables.nl_counts, tables.offsets, tables.rows_total
        #: per image, its output length when the geometry decides it (fixed count, joint budgets); else None
        self.lengths: list[int] | None = tables.lengths
        #: per image, its kept thumbnail tokens when the geometry decides it (not for joint budgets)
        self.thumb_counts: list[int] | None = tables.thumb_counts
        self.identity_views = tables.identity_views
        self.crop_order, self.crop_runs = tables.crop_order, tables.crop_runs
        self.size_order, self.size_runs = tables.size_order, tables.size_runs
        self._int_sizes, self._bool_sizes, self._float_sizes = tables.int_sizes, tables.bool_sizes, tables.float_sizes
        self._ints, self._bools, self._floats = tables.ints, tables.bools, tables.floats
        self._on: dict[str, dict[str, torch.Tensor]] = {}
        self._rep: tuple[list[int], torch.Tensor] | None = None
        if self.lengths is not None:
            self._offsets_of(self.lengths)

    # -- the tables on the device ---------------------------------------------------------------
    def _tables(self, device: torch.device) -> dict[str, torch.Tensor]:
        b, n, cm = self.b, self.host.n, self.host.cm
        key = str(device)
        cached = self._on.get(key)
        if cached is not None:
            return cached
        ints, bools, floats = (t.to(device, non_blocking=True) for t in (self._ints, self._bools, self._floats))
        (view_rows, region, pos, vidx, tval, slot_map, consts, nl_idx, crop_perm, size_perm, ks, n_valid_l) = torch.split(
            ints, self._int_sizes
        )
        valid, crop_off, full_invalid = torch.split(bools, self._bool_sizes)
        (n_valid,) = (floats,)
        tables = {
            "view_rows": view_rows, "region": region.view(b, n), "pos": pos, "vidx": vidx.view(b, cm, n),
            "tval": tval.view(1, cm, n), "slot_map": slot_map.view(b, self.p_slots), "consts": consts.view(b, 2),
            "nl_idx": nl_idx, "crop_perm": crop_perm, "size_perm": size_perm, "ks": ks.view(b, 1),
            "n_valid_l": n_valid_l.view(b, cm), "valid": valid[: b * cm * n].view(b, cm, n),
            "invalid": valid[b * cm * n :].view(b, cm, n), "crop_off": crop_off.view(b, cm),
            "full_invalid": full_invalid.view(b, 1 + cm, n), "n_valid": n_valid.view(b, cm),
        }
        self._on[key] = tables  # views of the one copy, made once per device
        return tables

    # -- the device pass ------------------------------------------------------------------------
    def run(self, importance_rows: torch.Tensor) -> tuple[dict[str, torch.Tensor], list[int], list[int]]:
        """The plan from the batch's importance as one ``(sum V_i, N)`` table (the images' maps in
        order, see :func:`joint_importance`): ``index`` (L,) rows of the joint feature table,
        ``local_index`` (L,) rows of each image's own table, ``newline_positions`` (M,), and
        ``thumb_keep`` / ``keep`` / ``ratios`` / ``score`` (padded per image) for the plans.
        Also returns the per-image lengths and kept thumbnail tokens (host ints): read with one host
        sync only when :attr:`lengths` or :attr:`thumb_counts` is unknown (published count, joint
        budgets). A prep is shared between calls (and threads): ``run`` changes nothing on it but
        caches."""
        host = self.host
        b, n, cm = self.b, host.n, host.cm
        dev = importance_rows.device
        tab = self._tables(dev)
        if self.identity_views:
            imp = importance_rows.view(b, 1 + cm, n)
        else:
            imp = importance_rows.index_select(0, tab["view_rows"]).view(b, 1 + cm, n)
        imp64 = imp.to(SCORE_DTYPE)
        out: dict[str, torch.Tensor] = {}
        if self.joint:
            thumb_vals, keep, ratios, score = self._joint(imp64, tab)
            drop = ~keep
        else:
            order_t = torch.argsort(imp64[:, 0], dim=1, descending=True, stable=True)
            thumb_keep = order_t[:, : self.k_t]  # (B, k_t), most important first
            out["thumb_keep"] = thumb_keep
            if self.spatial:
                thumb_vals = torch.full((b, n), -1, dtype=torch.long, device=dev).scatter_(1, thumb_keep, thumb_keep)
            else:
                thumb_vals = thumb_keep
            if cm:
                ratios = self._crop_ratios(imp64[:, 0], thumb_keep, tab)
                glob = self._global_scores(imp64[:, 0], tab)
                score = _holistic(imp64[:, 1:], glob, tab["invalid"], self.scoring)  # (B, Cm, N)
                if self.count == "fixed":
                    k = fixed_budgets(tab["n_valid_l"], ratios, self.ratio)
                else:
                    k = torch.floor(tab["n_valid"] * ratios).long()
                keep, drop = self._keep_best(score, tab["invalid"], k)
            else:
                ratios = torch.zeros((b, 0), dtype=torch.float64, device=dev)
                keep = drop = torch.zeros((b, 0, n), dtype=torch.bool, device=dev)
                score = torch.zeros((b, 0, n), dtype=SCORE_DTYPE, device=dev)
        out.update(keep=keep, ratios=ratios, score=score)

        # ---- every output slot's source row (-1: empty), one gather ------------------------------
        parts = [thumb_vals]
        if cm:
            if self.spatial:
                parts.append(tab["tval"].expand(b, cm, n).masked_fill(drop, -1).view(b, cm * n))
            else:
                target = tab["vidx"].masked_fill(drop, n)  # dropped tokens go to a spare column
                src = torch.full((b, cm, n + 1), -1, dtype=torch.long, device=dev)
                parts.append(src.scatter_(2, target, tab["tval"].expand(b, cm, n)).view(b, cm * (n + 1)))
        parts.append(tab["consts"])
        slots = torch.cat(parts, dim=1).gather(1, tab["slot_map"])  # (B, P)
        flags = slots >= 0

        # ---- lengths: from the geometry, or the one host sync ----------------------------------
        lengths, thumb_counts = self.lengths, self.thumb_counts
        if lengths is None or thumb_counts is None:
            if lengths is None:
                lengths = flags.sum(1).tolist()
            else:
                thumb_counts = flags[:, : self.t_slots].sum(1).tolist()
        total = sum(lengths)
        flat_flags = flags.view(-1)
        dest = torch.where(flat_flags, torch.cumsum(flat_flags, 0) - 1, total)
        local_index = torch.empty(total + 1, dtype=torch.long, device=dev).scatter_(0, dest, slots.view(-1))[:total]
        # rows of the joint table: each image's offset added (a host table: its lengths are known now);
        # a newline row (the image's table size) may point one past the table: overwritten after the gather
        index = local_index if self.b == 1 else local_index + self._offsets_of(lengths).to(dev, non_blocking=True)
        out["index"] = index.clamp(max=max(self.rows_total - 1, 0))
        out["local_index"] = local_index
        out["newline_positions"] = dest.index_select(0, tab["nl_idx"])
        if "thumb_keep" not in out:
            out["thumb_keep"] = thumb_vals
        return out, lengths, thumb_counts

    def step(self, features: torch.Tensor, importance_rows: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
        """The whole compression step as one function of tensors: the batch's ``(L, D)`` tokens
        from its joint feature table ``(sum V_i N, D)`` (:func:`joint_rows`), its joint importance
        table ``(sum V_i, N)`` (:func:`joint_importance`) and the ``(D,)`` newline row. With
        ``count="fixed"`` (GlobalCom2) nothing in it reads the device and every shape follows from
        the geometries, so ``torch.compile(prep.step, fullgraph=True)`` is one graph."""
        out, _, _ = self.run(importance_rows)
        tokens = features.index_select(0, out["index"])
        positions = out["newline_positions"]
        return tokens.index_copy(0, positions, newline.to(tokens.dtype)[None].expand(positions.shape[0], -1))

    def _offsets_of(self, lengths: list[int]) -> torch.Tensor:
        """(L,) long, each output position's image offset in the joint table (host)."""
        import numpy as np

        rep = self._rep
        if rep is None or rep[0] != lengths:
            rep = (list(lengths), torch.from_numpy(np.repeat(np.asarray(self.offsets, np.int64), lengths)))
            self._rep = rep
        return rep[1]

    def _keep_best(self, score: torch.Tensor, invalid: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each crop's ``k`` best valid tokens by ``score`` (stable on ties), as :func:`~globalcom2.core.budgets.keep_best`:
        (kept, not kept)."""
        order = torch.argsort(score, dim=-1, descending=True, stable=True)  # (B, Cm, N)
        ranks = torch.arange(score.shape[-1], device=score.device).expand(score.shape)
        rank = torch.empty_like(order).scatter_(-1, order, ranks)
        drop = (rank >= k[..., None]) | invalid
        return ~drop, drop

    def _joint(self, imp64, tab):
        """One budget per image over its thumbnail and unpadded crop tokens (plan_joint, batched)."""
        b, n, cm = self.b, self.host.n, self.host.cm
        dev = imp64.device
        full_invalid = tab["full_invalid"]
        masked = imp64.masked_fill(full_invalid, float("-inf"))
        flat = masked.view(b, (1 + cm) * n)
        # Padded views sit after the image's own and are -inf: a stable sort leaves the image's own
        # ranking exactly as over its (1 + C) N tokens alone.
        order = torch.argsort(flat, dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(flat.shape[1], device=dev).expand_as(order))
        kept = (rank < tab["ks"]) & ~full_invalid.view(b, -1)
        keep = kept[:, n:].view(b, cm, n)
        if self.spatial:
            thumb_vals = torch.where(kept[:, :n], torch.arange(n, device=dev), -1)
        else:
            top = order[:, : self.t_slots]
            ok = (torch.arange(self.t_slots, device=dev)[None] < tab["ks"]) & (top < n)
            thumb_vals = torch.where(ok, top, -1)
        ratios = keep.sum(2).to(torch.float64) / tab["n_valid"].clamp_min(1.0)
        return thumb_vals, keep, ratios, masked[:, 1:]

    def _crop_ratios(self, thumb, thumb_keep, tab):
        """Step 2 for every image (see :func:`~globalcom2.core.budgets.crop_retention_ratios`)."""
        b, cm = self.b, self.host.cm
        dev = thumb.device
        ratio, tau, allocation = self.ratio, self.temperature, self.allocation
        crop_off, region = tab["crop_off"], tab["region"]
        if allocation == "uniform":
            return torch.full((b, cm), ratio, dtype=torch.float64, device=dev)
        if allocation == "topk_count":
            kept_region = region.gather(1, thumb_keep)
            counts = torch.zeros((b, cm), dtype=torch.float64, device=dev).scatter_add_(
                1, kept_region, torch.ones(kept_region.shape, dtype=torch.float64, device=dev)
            )
            total = counts.sum(1, keepdim=True)  # integer-valued: exact in any order
            crops = (~crop_off).sum(1, keepdim=True).to(torch.float64)
            share = torch.where(total > 0, counts * crops / total.clamp_min(1.0), torch.ones_like(counts))
            return torch.clamp(ratio * share, max=1.0)
        if allocation == "softmax_sum":
            sums = torch.zeros((b, cm), dtype=torch.float64, device=dev).scatter_add_(1, region, thumb)
        else:
            sums = torch.full((b, cm), float("-inf"), dtype=torch.float64, device=dev).scatter_reduce(
                1, region, thumb, reduce="amax"
            )
        top = sums.masked_fill(crop_off, float("-inf")).amax(1, keepdim=True)
        e = torch.exp((sums - top) / tau).masked_fill(crop_off, 0.0)
        e_sum = self._group_reduce(e, tab["crop_perm"], "sum")
        sigma = e / (e_sum + 1e-8)
        mean = self._group_reduce(sigma, tab["crop_perm"], "mean")
        return torch.clamp(ratio * (1.0 + sigma - mean), max=1.0)

    def _group_reduce(self, x, perm, how):
        """(B, 1) sum or mean of each row's first ``C_b`` entries, reducing over exactly ``C_b`` of them
        (one call per crop count: the bits of a 1-D reduction of C values)."""
        order, runs = self.crop_order, self.crop_runs
        if len(runs) == 1:  # one crop count: no permutation, one reduction
            c = runs[0][0]
            part = x[:, :c] if c != x.shape[1] else x
            return part.sum(1, keepdim=True) if how == "sum" else part.mean(1, keepdim=True)
        xs = _permute(x, order, perm)
        outs = []
        for c, start, end in runs:
            if c == 0:
                outs.append(torch.zeros(end - start, dtype=x.dtype, device=x.device))
                continue
            part = xs[start:end, :c]
            outs.append(part.sum(1) if how == "sum" else part.mean(1))
        out = torch.cat(outs)
        if order != sorted(order):
            out = torch.empty_like(out).index_copy_(0, perm, out)
        return out[:, None]

    def _global_scores(self, thumb, tab):
        """Step 4's global guidance of every crop token: the thumbnail's map resized (bilinear, as
        ``F.interpolate`` does it, one call per distinct unpadded size) to the unpadded area."""
        b, n, cm, s = self.b, self.host.n, self.host.cm, self.host.side
        ts = _permute(thumb, self.size_order, tab["size_perm"])
        maps = []
        for (h, w), start, end in self.size_runs:
            if h * w == 0:
                continue
            part = ts[start:end].reshape(end - start, 1, s, s)
            maps.append(F.interpolate(part, size=(h, w), mode="bilinear", align_corners=False).reshape(-1))
        if not maps:
            return torch.zeros((b, cm, n), dtype=SCORE_DTYPE, device=thumb.device)
        flat = torch.cat(maps) if len(maps) > 1 else maps[0]
        # padded positions read cell 0: every score masks them
        return flat.index_select(0, tab["pos"]).view(b, cm, n)

    # -- per-image plans ------------------------------------------------------------------------
    def plans(
        self, run: tuple[dict[str, torch.Tensor], list[int], list[int]], importance: Sequence[torch.Tensor]
    ) -> BatchPlan:
        """The :class:`BatchPlan` of :meth:`run`'s output (views, no device op but slicing)."""
        host, n = self.host, self.host.n
        out, lengths, thumb_counts = run
        dev = out["index"].device
        cm = host.cm
        # one unbind per field for the whole batch; a slice only where an image has fewer crops
        fields = [x.unbind(0) for x in (out["keep"], self._tables(dev)["valid"], out["ratios"], out["score"])] if cm else None
        plans: list[CompressionPlan] = []
        single = None
        idxs = torch.split(out["local_index"], lengths)
        for i, (g, c) in enumerate(zip(host.geoms, host.crops)):
            idx = idxs[i]
            thumb_keep_i = idx[: thumb_counts[i]]
            if g is None:
                if single is None:
                    empty_bool = torch.zeros((0, n), dtype=torch.bool, device=dev)
                    single = dict(crop_keep=empty_bool, crop_valid=empty_bool,
                                  crop_ratios=torch.zeros(0, dtype=torch.float64, device=dev),
                                  crop_score=torch.zeros((0, n), dtype=SCORE_DTYPE, device=dev))
                plans.append(CompressionPlan(
                    index=idx, thumb_keep=thumb_keep_i, thumb_importance=importance[i][0].reshape(-1), geometry=None,
                    layout=self.layout, **single,
                ))
            else:
                keep_i, valid_i, ratios_i, score_i = (f[i] if c == cm else f[i][:c] for f in fields)
                plans.append(CompressionPlan(
                    index=idx, thumb_keep=thumb_keep_i, crop_keep=keep_i, crop_valid=valid_i, crop_ratios=ratios_i,
                    thumb_importance=importance[i][0], crop_score=score_i, geometry=g, layout=self.layout,
                ))
        return BatchPlan(
            plans=plans, index=out["index"], newline_positions=out["newline_positions"], lengths=list(lengths),
            newline_counts=self.nl_counts,
        )


def _normalized(x: torch.Tensor, invalid: torch.Tensor) -> torch.Tensor:
    """:func:`~globalcom2.core.plans._l2_normalize_masked` with the padded positions given (the same ops' bits)."""
    x = x.masked_fill(invalid, 0.0)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _holistic(local: torch.Tensor, glob: torch.Tensor, invalid: torch.Tensor, scoring: str) -> torch.Tensor:
    """:func:`~globalcom2.core.plans.holistic_scores` (the same arithmetic, bit for bit) with the
    padded positions from the host tables instead of negating the valid mask on the device."""
    if scoring == "global_local":
        score = _normalized(local, invalid) + _normalized(glob, invalid)
    elif scoring == "global_only":
        score = _normalized(glob, invalid)
    else:
        score = _normalized(local, invalid)
    return score.masked_fill(invalid, float("-inf"))


def prepare_batch(
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
) -> BatchPrep:
    """The host half of :func:`plan_batch` (its arguments; ``importance`` is read for its shapes only)."""
    _check_layout(layout)
    _check_count(count)
    if not importance:
        raise ValueError("plan_batch needs at least one image")
    host = _describe(importance, geometries, joint)
    key = (tuple(host.geoms), tuple(host.views), host.n, float(retention_ratio), layout, joint, float(temperature),
           allocation, scoring, count)
    return _prep(key)


#: Preps of recent batch shapes (sizes repeat: a server's images, a benchmark's loop).
PREP_CACHE_SIZE = 256


@functools.lru_cache(maxsize=PREP_CACHE_SIZE)
def _prep(key: tuple) -> BatchPrep:
    geoms, views, n = key[:3]
    return BatchPrep(_host(list(geoms), list(views), n), *key[3:])


def joint_importance(importance: Sequence[torch.Tensor]) -> torch.Tensor:
    """The images' ``(V_i, N)`` importance maps as one ``(sum V_i, N)`` table: a view when they are
    consecutive slices of one tensor (as the families make them), else one concatenation."""
    if len(importance) == 1:
        return importance[0]
    whole = _consecutive(importance)
    return whole if whole is not None else torch.cat(list(importance))


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
    """Plan every image of a batch at once, with at most one host sync.

    ``joint=False`` is GlobalCom2 (what :func:`~globalcom2.core.plans.plan_image` /
    :func:`~globalcom2.core.plans.plan_single_view` decide per image, with the same
    ``allocation`` / ``scoring`` ablations); ``joint=True`` is one budget per image ranked by
    ``importance`` as scores (:func:`~globalcom2.core.plans.plan_joint`: FasterVLM, random).
    :func:`prepare_batch` (host) then :meth:`BatchPrep.run` (device): no sync with
    ``count="fixed"``, one otherwise.

    Args:
        importance: per image, (V_i, N) importance (or scores) of its views, thumbnail first; all
            on one device, with the same N.
        geometries: per image, its crop geometry (None, or one view: a single-view image).
        retention_ratio, layout, temperature, allocation, scoring, count: as the per-image functions.

    Returns:
        :class:`BatchPlan`.
    """
    prep = prepare_batch(
        importance, geometries, retention_ratio, layout, joint=joint, temperature=temperature,
        allocation=allocation, scoring=scoring, count=count,
    )
    return prep.plans(prep.run(joint_importance(importance)), importance)


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
