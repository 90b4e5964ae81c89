"""The pooling baseline: every view average-pooled to about R of its tokens (none dropped)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from .._lazy import lazy_module
from ..core.config import COUNTS, Count, check_choice, check_ratio
from .base import VisionMethodConfig, register_method

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..core.geometry import CropGeometry

plans = lazy_module("globalcom2.core.plans")  # tensor code, imported when the method runs
layouts = lazy_module("globalcom2.core.layouts")
geometry = lazy_module("globalcom2.core.geometry")


@dataclass
class PoolingPlan:
    """What the pooling baseline did to one image (the counterpart of
    :class:`~globalcom2.core.layouts.CompressionPlan`).

    Attributes:
        thumb_hw: pooled thumbnail (rows, cols). crop_hw: pooled unpadded crop area (rows, cols).
        geometry: the crop geometry (None for one view). num_tokens: tokens handed to the LM.
        side: S, patches per side of one view.
    """

    thumb_hw: tuple[int, int]
    crop_hw: tuple[int, int]
    geometry: "CropGeometry | None"
    num_tokens: int
    layout: str = "pooled"
    side: int = 0

    def kept_masks(self) -> "layouts.KeptMasks":
        """Every (unpadded) token feeds one pooled token: nothing is dropped."""
        torch = lazy_module("torch")
        side, t, (ph, pw), geom = self.side, self.thumb_hw[0], self.crop_hw, self.geometry
        n = side * side
        note = f"pooling averages every token (none is dropped): thumbnail {side}x{side} -> {t}x{t}"
        thumb = torch.ones(n, dtype=torch.bool)
        if geom is None:
            empty = torch.zeros((0, n), dtype=torch.bool)
            return layouts.KeptMasks(thumb, empty, empty, torch.zeros(0, dtype=torch.float64), t * t, 0, True, note)
        valid = geometry.valid_mask(geom, torch.device("cpu"))  # (C, N)
        frac = (ph * pw) / max(1, int(valid.sum()))
        if ph:
            note += f", unpadded crop area {geom.valid_rows}x{geom.valid_cols} -> {ph}x{pw}"
        ratios = torch.full((geom.num_crops,), frac, dtype=torch.float64)
        return layouts.KeptMasks(thumb, valid, valid, ratios, t * t, ph * pw, True, note)


@register_method
@dataclass(frozen=True)
class PoolingConfig(VisionMethodConfig):
    """Uniform spatial average pooling of every view to the same budget.

    The thumbnail's S x S map is average-pooled (``adaptive_avg_pool2d``) to
    ``round(S * sqrt(R))`` x ``round(S * sqrt(R))`` (at least 1 x 1), the unpadded crop area
    ``h x w`` to ``round(h * sqrt(R))`` x ``round(w * sqrt(R))``; the pooled crop area is read row
    by row with one newline per pooled row (the vanilla arrangement at a lower resolution).

    Args:
        retention_ratio: R, ``0 < R <= 1``.
        count: ``"published"`` or ``"fixed"`` (SPEC.md "Fixed count"); this method's count is a
            function of the image size already, so both give the same tokens (accepted so that one
            setting serves every method).
    """

    method: ClassVar[str] = "pooling"

    retention_ratio: float = 0.25
    count: Count = "published"

    def __post_init__(self) -> None:
        self._reject_none()
        self._set("retention_ratio", check_ratio(self.retention_ratio))
        self._set("count", check_choice(self.count, COUNTS, "count"))

    layout_field: ClassVar[str | None] = None  # one arrangement: the pooled maps, row by row

    def compress(
        self, features: "torch.Tensor", importance: "torch.Tensor", geom: "CropGeometry | None", newline: "torch.Tensor | None"
    ) -> tuple["torch.Tensor", Any]:
        tokens, thumb_hw, crop_hw = plans.pool_image(features, geom, newline, self.retention_ratio)
        side = math.isqrt(features.shape[1])
        return tokens, PoolingPlan(thumb_hw, crop_hw, geom, int(tokens.shape[0]), side=side)
