"""Step 5: the sequence layouts, the :class:`CompressionPlan` they make, its
:class:`KeptMasks`, and gathering a plan's tokens (:func:`gather_features`).

A plan's ``index`` addresses a feature table made of the thumbnail's N rows, then the C crops' N
rows each (crop-major, raster order), then one image-newline row. Pure tensor code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .geometry import CropGeometry, crops_to_grid

__all__ = ["CompressionPlan", "KeptMasks", "assemble_plan", "gather_features"]


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


def _check_layout(layout: str) -> None:
    if layout not in ("official", "spatial"):
        raise ValueError(f"layout must be 'official' or 'spatial', got {layout!r}")


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
