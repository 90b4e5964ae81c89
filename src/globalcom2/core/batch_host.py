"""The host half of a batch's plan (:mod:`globalcom2.core.batch`): everything that follows from the
images' geometries and the settings alone, built with numpy, no device op.

:func:`host_tables` makes the integer tables (which crop tokens are unpadded, where each sits in
its image's crop grid, which resized-map cell guides it, which output slot reads which table row,
where the newlines go) and packs them into three tensors (ints, bools, floats) that reach the
device in one copy each; :class:`~globalcom2.core.batch.BatchPrep` keeps them and runs the device
pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .budgets import _floor_count
from .geometry import CropGeometry

__all__ = ["HostTables", "host_tables"]


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


def _host(geoms: list[CropGeometry | None], views: list[int], n: int) -> _Host:
    crops = [0 if g is None else g.num_crops for g in geoms]
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


@dataclass
class HostTables:
    """A batch's plan as far as its geometries decide it (see :func:`host_tables`).

    Attributes:
        b: images. spatial: the layout is ``spatial``. k_t: kept thumbnail tokens (GlobalCom2).
        ks: per image, its joint budget (joint) or ``k_t``. t_slots, p_slots: output slots of a
            thumbnail and of a whole image. cw: a crop's columns in the slot source buffer.
        nl_counts: per image, its newlines. offsets: per image, its first row in the joint table.
        rows_total: rows of the joint table. lengths: per image, its output length when the
            geometry decides it (fixed count, joint budgets), else None. thumb_counts: per image,
            its kept thumbnail tokens when the geometry decides it (not for joint budgets).
        identity_views: the importance rows need no reordering.
        crop_order, crop_runs / size_order, size_runs: images grouped by crop count / unpadded size.
        ints, bools, floats: the packed tables, cut by ``int_sizes``, ``bool_sizes``, ``float_sizes``.
    """

    b: int
    spatial: bool
    k_t: int
    ks: list[int]
    t_slots: int
    p_slots: int
    cw: int
    nl_counts: list[int]
    offsets: list[int]
    rows_total: int
    lengths: list[int] | None
    thumb_counts: list[int] | None
    identity_views: bool
    crop_order: list[int]
    crop_runs: list[tuple[object, int, int]]
    size_order: list[int]
    size_runs: list[tuple[object, int, int]]
    int_sizes: list[int]
    bool_sizes: list[int]
    float_sizes: list[int]
    ints: torch.Tensor
    bools: torch.Tensor
    floats: torch.Tensor


def _interp_bases(size_keys: list[tuple[int, int]], order: list[int], runs: list) -> list[int]:
    """Per image, its first cell in the concatenated resized maps (images grouped by unpadded size)."""
    base = [0] * len(size_keys)
    at = 0
    for key, start, end in runs:
        for p in range(start, end):
            base[order[p]] = at + (p - start) * key[0] * key[1]
        at += (end - start) * key[0] * key[1]
    return base


def _crop_tables(g: CropGeometry, c: int, n: int, s: int, hm: int, wm: int, t_slots: int, cw: int, x_none: int,
                 cell0: int, size_w: int):
    """One image's crop tables: (C, N) unpadded mask, (C, N) resized-map cell of each crop token,
    (N,) crop region of each thumbnail token, and (Hm, Wm) the grid slots' source columns."""
    import numpy as np

    t = np.arange(n)
    gh, gw = g.grid_h, g.grid_w
    j = np.arange(c)[:, None]
    rows = (j // gw) * s + t[None] // s  # (C, N) joint-grid row of each crop token
    cols = (j % gw) * s + t[None] % s
    ok = (rows >= g.row0) & (rows < g.row1) & (cols >= g.col0) & (cols < g.col1)
    pos = np.where(ok, cell0 + (rows - g.row0) * size_w + (cols - g.col0), 0)
    idx = np.arange(s)
    row_region = np.minimum(idx // max(s // gh, 1), gh - 1)
    col_region = np.minimum(idx // max(s // gw, 1), gw - 1)
    region = (row_region[:, None] * gw + col_region[None, :]).reshape(-1)
    # grid slots: (r, c) of the joint grid reads crop j's position t (spatial: its true
    # position; official: the position's index in the crop's list of valid tokens)
    rr = np.arange(hm)[:, None]
    cc = np.arange(wm)[None, :]
    in_grid = (rr < g.height) & (cc < g.width)
    jj = (rr // s) * gw + cc // s
    tt = (rr % s) * s + cc % s
    grid = np.where(in_grid, t_slots + jj * cw + tt, x_none)  # (Hm, Wm)
    return ok, pos, region, grid


def _newline_rows(g: CropGeometry, spatial: bool) -> range:
    """The joint-grid rows that end with a newline: the unpadded ones (spatial), every row (official)."""
    if spatial:
        return range(g.row0, g.row1)
    return range(g.height) if not g.is_empty else range(0)


def host_tables(host: _Host, ratio: float, layout: str, joint: bool, count: str) -> HostTables:
    """The batch's host tables (see the module docstring), for ``retention_ratio`` ``ratio``."""
    import numpy as np

    n, s, cm, hm, wm = host.n, host.side, host.cm, host.hm, host.wm
    b = len(host.views)
    spatial = layout == "spatial"
    k_t = _floor_count(n, ratio)
    ks = [k_t if g is None or not joint else _floor_count(n + g.valid_rows * g.valid_cols, ratio) for g in host.geoms]
    # thumbnail slots: its kept tokens (official), or its N positions (spatial)
    t_slots = n if spatial else (max(ks) if joint else k_t)
    width = wm + 1
    p_slots = t_slots + hm * width + 1
    cw = n if spatial else n + 1  # crop part of the source buffer, per crop
    x_nl = t_slots + cm * cw  # buffer column holding the image's newline row
    x_none = x_nl + 1  # buffer column holding -1 (an empty slot)

    valid = np.zeros((b, cm, n), dtype=bool)
    pos = np.zeros((b, cm, n), dtype=np.int64)
    region = np.zeros((b, n), dtype=np.int64)
    crop_ok = np.zeros((b, cm), dtype=bool)
    slot_map = np.full((b, p_slots), x_none, dtype=np.int64)
    slot_map[:, :t_slots] = np.arange(t_slots)
    consts = np.zeros((b, 2), dtype=np.int64)
    consts[:, 1] = -1
    nl_slots: list[int] = []
    nl_counts: list[int] = []
    view_rows: list[int] = []
    offsets: list[int] = []
    lengths: list[int] = []
    size_keys = [(g.valid_rows, g.valid_cols) if g is not None and not g.is_empty else (0, 0) for g in host.geoms]
    size_order, size_runs = _groups(size_keys)
    interp_base = _interp_bases(size_keys, size_order, size_runs)
    offset = view_start = 0
    for i, (g, v, c) in enumerate(zip(host.geoms, host.views, host.crops)):
        view_rows.extend(view_start + min(j, c) for j in range(1 + cm))
        offsets.append(offset)
        offset += v * n
        view_start += v
        consts[i, 0] = (1 + c) * n
        before = len(nl_slots)
        if g is None:
            slot_map[i, -1] = x_nl
            nl_slots.append(i * p_slots + p_slots - 1)
            nl_counts.append(1)
            lengths.append(ks[i] + 1)
            continue
        crop_ok[i, :c] = True
        ok, pos[i, :c], region[i], grid = _crop_tables(
            g, c, n, s, hm, wm, t_slots, cw, x_none, interp_base[i], size_keys[i][1]
        )
        valid[i, :c] = ok
        block = slot_map[i, t_slots : t_slots + hm * width].reshape(hm, width)
        block[:, :wm] = grid
        for r in _newline_rows(g, spatial):
            block[r, wm] = x_nl
            nl_slots.append(i * p_slots + t_slots + r * width + wm)
        nl_counts.append(len(nl_slots) - before)
        if count == "fixed" or joint:
            crop_total = ks[i] - k_t if joint else int(math.floor(float(ok.sum()) * ratio))
            lengths.append((ks[i] if joint else k_t + crop_total) + nl_counts[-1])
    crop_order, crop_runs = _groups(host.crops)

    vidx = np.cumsum(valid, axis=2) - 1 if not spatial else np.zeros((b, cm, n), dtype=np.int64)
    tval = (n + np.arange(cm)[:, None] * n + np.arange(n)[None]).reshape(-1)  # (Cm N,) each crop token's own table row
    n_valid = valid.sum(2)
    ints = [np.asarray(view_rows, np.int64), region.reshape(-1), pos.reshape(-1), vidx.reshape(-1), tval,
            slot_map.reshape(-1), consts.reshape(-1), np.asarray(nl_slots, np.int64),
            np.asarray(crop_order, np.int64), np.asarray(size_order, np.int64), np.asarray(ks, np.int64),
            n_valid.reshape(-1).astype(np.int64)]
    full_valid = np.concatenate([np.ones((b, 1, n), dtype=bool), valid], axis=1)
    bools = [np.concatenate([valid.reshape(-1), ~valid.reshape(-1)]), ~crop_ok.reshape(-1), ~full_valid.reshape(-1)]
    floats = [n_valid.reshape(-1).astype(np.float64)]
    return HostTables(
        b=b, spatial=spatial, k_t=k_t, ks=ks, t_slots=t_slots, p_slots=p_slots, cw=cw, nl_counts=nl_counts,
        offsets=offsets, rows_total=offset,
        lengths=lengths if (count == "fixed" or joint) and len(lengths) == b else None,
        thumb_counts=None if joint else [k_t] * b,
        identity_views=view_rows == list(range(len(view_rows))),
        crop_order=crop_order, crop_runs=crop_runs, size_order=size_order, size_runs=size_runs,
        int_sizes=[a.size for a in ints], bool_sizes=[a.size for a in bools], float_sizes=[a.size for a in floats],
        ints=torch.from_numpy(np.concatenate(ints)), bools=torch.from_numpy(np.concatenate(bools)),
        floats=torch.from_numpy(np.concatenate(floats)),
    )
