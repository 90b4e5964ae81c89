"""Where an image's views sit: the AnyRes crop grid, its unpadded area, token-grid reshapes.

Host-side integers, derived from image sizes, never from tensor data (no host sync). Notation:
``S`` patches per view side, ``N = S * S``, crop grid ``gh x gw`` (``C = gh * gw`` crops), the
crops' joint token grid ``H x W = gh S x gw S``. Crops are numbered row by row; a view's tokens
are in raster order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CanvasCropGeometry", "CropGeometry", "crop_geometry", "crops_to_grid", "grid_to_crops", "unpad_bounds", "valid_mask"]




def unpad_bounds(image_hw: tuple[int, int], grid_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """The unpadded rectangle of a ``grid_hw`` token grid holding an image of size ``image_hw``.

    Same rule as Hugging Face ``unpad_image`` (and the LLaVA-NeXT processor's token count): if the
    image is relatively wider than the grid, rows ``[pad, H - pad)`` are valid, else columns
    ``[pad, W - pad)``.

    Args:
        image_hw: original image (height, width) in pixels.
        grid_hw: token grid (H, W) = (gh * S, gw * S).

    Returns:
        ``(row0, row1, col0, col1)``: valid rows ``[row0, row1)`` and columns ``[col0, col1)``.
        The rectangle may be empty (``row0 == row1`` or ``col0 == col1``) for extreme aspect ratios.
    """
    orig_h, orig_w = (int(v) for v in image_hw)
    cur_h, cur_w = (int(v) for v in grid_hw)
    if orig_h <= 0 or orig_w <= 0:
        raise ValueError(f"image size must be positive, got (height, width) = {image_hw}")
    if orig_w / orig_h > cur_w / cur_h:
        new_h = int(round(orig_h * (cur_w / orig_w), 7))
        pad = (cur_h - new_h) // 2
        return pad, cur_h - pad, 0, cur_w
    new_w = int(round(orig_w * (cur_h / orig_h), 7))
    pad = (cur_w - new_w) // 2
    return 0, cur_h, pad, cur_w - pad


@dataclass(frozen=True)
class CropGeometry:
    """Where one image's crops sit and which of their tokens are real image (not padding).

    Attributes:
        side: S, patches per side of one view.
        grid_h, grid_w: the crop grid (rows, columns).
        row0, row1, col0, col1: the unpadded rectangle in the joint ``(H, W)`` token grid.
    """

    side: int
    grid_h: int
    grid_w: int
    row0: int
    row1: int
    col0: int
    col1: int

    @property
    def num_crops(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def height(self) -> int:
        """H = gh * S, rows of the joint token grid (padded rows included)."""
        return self.grid_h * self.side

    @property
    def width(self) -> int:
        """W = gw * S, columns of the joint token grid."""
        return self.grid_w * self.side

    @property
    def valid_rows(self) -> int:
        return self.row1 - self.row0

    @property
    def valid_cols(self) -> int:
        return self.col1 - self.col0

    @property
    def is_empty(self) -> bool:
        """True when no crop token survives unpadding."""
        return self.valid_rows <= 0 or self.valid_cols <= 0

    def vanilla_num_tokens(self) -> int:
        """Visual tokens vanilla LLaVA-NeXT feeds for this image: thumbnail + unpadded rows, each
        followed by one newline (a zero-width area still gets its rows' newlines, as in HF)."""
        return self.side * self.side + self.valid_rows * (self.valid_cols + 1)


@dataclass(frozen=True)
class CanvasCropGeometry(CropGeometry):
    """A crop grid whose thumbnail is the whole padded canvas squeezed to one view (Phi-4-multimodal's
    global view), not the image alone: Step 4 stretches the thumbnail's map over the whole ``H x W``
    joint grid and cuts the unpadded rectangle out of it (:func:`globalcom2.core.plans.select_crop_tokens`),
    instead of stretching it over the unpadded rectangle. Step 2's regions are the crop grid's on
    the thumbnail either way."""


def crop_geometry(image_hw: tuple[int, int], grid_hw: tuple[int, int], side: int) -> CropGeometry:
    """Geometry of an image split into a ``grid_hw = (gh, gw)`` crop grid of ``side``-wide views."""
    gh, gw = (int(v) for v in grid_hw)
    if gh < 1 or gw < 1 or side < 1:
        raise ValueError(f"crop grid and side must be positive, got grid={grid_hw}, side={side}")
    r0, r1, c0, c1 = unpad_bounds(image_hw, (gh * side, gw * side))
    return CropGeometry(side=int(side), grid_h=gh, grid_w=gw, row0=r0, row1=r1, col0=c0, col1=c1)


def grid_to_crops(x: torch.Tensor, geom: CropGeometry) -> torch.Tensor:
    """(..., H, W) joint grid -> (..., C, N) crop-major, raster order inside each crop."""
    gh, gw, s = geom.grid_h, geom.grid_w, geom.side
    lead = x.shape[:-2]
    x = x.reshape(*lead, gh, s, gw, s).transpose(-3, -2)  # (..., gh, gw, S, S)
    return x.reshape(*lead, gh * gw, s * s)


def crops_to_grid(x: torch.Tensor, geom: CropGeometry) -> torch.Tensor:
    """(..., C, N) crop-major -> (..., H, W) joint grid. Inverse of :func:`grid_to_crops`."""
    gh, gw, s = geom.grid_h, geom.grid_w, geom.side
    lead = x.shape[:-2]
    x = x.reshape(*lead, gh, gw, s, s).transpose(-3, -2)  # (..., gh, S, gw, S)
    return x.reshape(*lead, gh * s, gw * s)


def valid_mask(geom: CropGeometry, device: torch.device) -> torch.Tensor:
    """(C, N) bool: which crop tokens lie inside the unpadded rectangle."""
    rows = torch.arange(geom.height, device=device)
    cols = torch.arange(geom.width, device=device)
    row_ok = (rows >= geom.row0) & (rows < geom.row1)
    col_ok = (cols >= geom.col0) & (cols < geom.col1)
    return grid_to_crops(row_ok[:, None] & col_ok[None, :], geom)
