"""Tiled views with the thumbnail *last* and no padding or newlines (InternVL's arrangement).

The selection methods work on an image's views thumbnail first (``[thumbnail, crop 0, crop 1, ...]``)
with a :class:`~globalcom2.core.geometry.CropGeometry`. A tiled model such as InternVL feeds its
language model the tiles row by row, then the thumbnail (when there is more than one tile), every
token valid and no newline. This module converts between the two: views in, thumbnail-first;
a plan's kept masks out, in the model's order. Pure tensor code (no model class), no loop over
tokens.

Notation: ``S`` tokens per view side, ``N = S * S``, tile grid ``rows x cols`` (``C`` tiles).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .geometry import CropGeometry

__all__ = [
    "factor_grids",
    "full_geometry",
    "infer_tile_grid",
    "pool_tiled_views",
    "runs_per_image",
    "thumbnail_first",
    "tiles_then_thumbnail_index",
]


def thumbnail_first(x: torch.Tensor) -> torch.Tensor:
    """(V, ...) views in the model's order (tiles, then the thumbnail when V > 1) -> thumbnail first.

    A single view (V == 1) is returned as it is (it has no thumbnail)."""
    if x.shape[0] <= 1:
        return x
    return torch.cat([x[-1:], x[:-1]], dim=0)


def full_geometry(grid_hw: tuple[int, int], side: int) -> CropGeometry:
    """The geometry of a ``rows x cols`` tile grid whose every token is valid (no padding)."""
    rows, cols = (int(v) for v in grid_hw)
    if rows < 1 or cols < 1 or side < 1:
        raise ValueError(f"tile grid and side must be positive, got grid={grid_hw}, side={side}")
    return CropGeometry(side=int(side), grid_h=rows, grid_w=cols, row0=0, row1=rows * side, col0=0, col1=cols * side)


def tiles_then_thumbnail_index(thumb_keep: torch.Tensor, crop_keep: torch.Tensor, n: int) -> torch.Tensor:
    """The model-order sequence of a selection, as rows of the thumbnail-first table.

    The table is the one of :class:`~globalcom2.core.layouts.CompressionPlan` (``[thumbnail (N),
    crops (C * N)]``, no newline row is ever addressed): the kept tokens of tile 0 in raster order,
    then tile 1's, ... then the kept thumbnail tokens in raster order.

    Args:
        thumb_keep: (k_t,) long kept thumbnail indices (any order).
        crop_keep: (C, N) bool kept tile tokens at their true positions (C = 0: one view only).
        n: N, tokens per view.

    Returns:
        (L,) long table rows.
    """
    crop_rows = n + crop_keep.reshape(-1).nonzero().reshape(-1)  # crop-major, raster inside a tile
    thumb_rows = torch.sort(thumb_keep.reshape(-1).to(crop_rows.device)).values
    return torch.cat([crop_rows.long(), thumb_rows.long()])


def runs_per_image(input_ids: torch.Tensor, token_id: int) -> list[int]:
    """Lengths of the runs of ``token_id`` in ``input_ids`` (B, T), in reading order of the batch.

    An image written by InternVL's processor is one run of context tokens between ``<img>`` and
    ``</img>``, so this lists each image's placeholder count (one host sync).
    """
    mask = input_ids == token_id  # (B, T)
    pad = torch.zeros((mask.shape[0], 1), dtype=torch.bool, device=mask.device)
    flat = torch.cat([mask, pad], dim=1).reshape(-1)  # a False between rows: no run spans two rows
    prev = torch.cat([torch.zeros(1, dtype=torch.bool, device=flat.device), flat[:-1]])
    starts = flat & ~prev
    label = torch.cumsum(starts.long(), dim=0) - 1
    if not bool(flat.any()):
        return []
    return torch.bincount(label[flat]).tolist()


def factor_grids(n: int) -> list[tuple[int, int]]:
    """Every ``(rows, cols)`` with ``rows * cols == n``, fewest rows first."""
    return [(r, n // r) for r in range(1, n + 1) if n % r == 0]


def infer_tile_grid(
    tiles: torch.Tensor, thumbnail: torch.Tensor, candidates: Sequence[tuple[int, int]], size: int = 56
) -> tuple[int, int]:
    """The tile grid whose mosaic looks most like the thumbnail (when the image size is unknown).

    The processor resizes the image to ``(rows * h, cols * w)`` and cuts it into tiles, and squeezes
    the whole image into the thumbnail; so the right arrangement of the tiles, average-pooled to a
    ``size x size`` map, matches the thumbnail pooled the same way, and a wrong one scrambles it.
    The candidate with the smallest mean squared difference wins (ties: the first; an image that
    looks the same in every arrangement, e.g. one flat colour, is then read as the first).

    Args:
        tiles: (C, ch, h, w) the tiles in the processor's order (row by row).
        thumbnail: (ch, h, w) the thumbnail.
        candidates: (rows, cols) grids with ``rows * cols == C``.
        size: side of the compared maps.

    Returns:
        (rows, cols).
    """
    if len(candidates) == 1:
        return tuple(candidates[0])  # type: ignore[return-value]
    c, ch, h, w = tiles.shape
    thumb = F.adaptive_avg_pool2d(thumbnail.float()[None], (size, size))[0]  # (ch, size, size)
    errors = []
    for rows, cols in candidates:
        if rows * cols != c:
            raise ValueError(f"a {rows}x{cols} grid does not hold {c} tiles")
        mosaic = tiles.float().reshape(rows, cols, ch, h, w).permute(2, 0, 3, 1, 4).reshape(ch, rows * h, cols * w)
        pooled = F.adaptive_avg_pool2d(mosaic[None], (size, size))[0]
        errors.append(((pooled - thumb) ** 2).mean())
    best = int(torch.stack(errors).argmin())  # one host sync per image
    return tuple(candidates[best])  # type: ignore[return-value]


def pooled_side(n: int, retention_ratio: float) -> int:
    """Side of a pooled view map: ``max(1, round(n * sqrt(R)))`` (as the pooling baseline)."""
    return max(1, int(round(n * math.sqrt(retention_ratio))))


def pool_tiled_views(features: torch.Tensor, retention_ratio: float) -> tuple[torch.Tensor, int]:
    """The pooling baseline on tiled views: every view average-pooled on its own, model order.

    Each view's ``S x S`` map goes to ``t x t`` with ``t = pooled_side(S, R)``
    (``adaptive_avg_pool2d``); the sequence is the pooled tiles in order, then the pooled thumbnail,
    each in raster order, no newline (the model's arrangement at a lower resolution).

    Args:
        features: (V, N, D) thumbnail first (as the methods see them), or one view.
        retention_ratio: R.

    Returns:
        tokens: (V * t * t, D). t: the pooled side.
    """
    v, n, d = features.shape
    side = math.isqrt(n)
    t = pooled_side(side, retention_ratio)
    maps = features.reshape(v, side, side, d).permute(0, 3, 1, 2)  # (V, D, S, S)
    pooled = F.adaptive_avg_pool2d(maps, (t, t)).permute(0, 2, 3, 1).reshape(v, t * t, d)  # (V, t*t, D)
    if v > 1:
        pooled = torch.cat([pooled[1:], pooled[:1]], dim=0)  # tiles, then the thumbnail
    return pooled.reshape(v * t * t, d), t
