"""FasterVLM-style [CLS] pruning (Zhang et al. 2024) on the AnyRes views: one joint budget.

Keeps the ``floor(R (N + sum_j n_j))`` most important tokens, ranked jointly over the
thumbnail's N tokens and every crop's unpadded tokens: no per-crop budget, no global guidance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ..core.config import COUNTS, LAYOUTS, Count, Layout, check_choice, check_ratio
from .base import ScoreSelectionConfig, register_method
from .globalcom2 import IMPORTANCES

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..core.geometry import CropGeometry


@register_method
@dataclass(frozen=True)
class FasterVLMConfig(ScoreSelectionConfig):
    """FasterVLM-style [CLS] pruning (Zhang et al. 2024), on the AnyRes views.

    Keeps the ``floor(R * (N + sum_j n_j))`` tokens with the highest [CLS] importance (the same
    last-layer logits GlobalCom2 uses), ranked jointly over the thumbnail's N tokens and every
    crop's unpadded tokens: no per-crop budget and no global guidance.

    Args:
        retention_ratio: R, ``0 < R <= 1``.
        layout: arrangement of the kept tokens, as for GlobalCom2 (default ``"spatial"``: true
            positions, the natural order for a baseline).
        importance: the importance signal (see :data:`globalcom2.methods.globalcom2.IMPORTANCES`;
            default ``"auto"``: the family's default for its tower).
        count: ``"published"`` or ``"fixed"`` (SPEC.md "Fixed count"); this method's count is a
            function of the image size already, so both give the same tokens (accepted so that one
            setting serves every method).
    """

    method: ClassVar[str] = "fastervlm"

    retention_ratio: float = 0.25
    layout: Layout = "spatial"
    importance: str = "auto"
    count: Count = "published"

    def __post_init__(self) -> None:
        self._reject_none()
        self._set("retention_ratio", check_ratio(self.retention_ratio))
        self._set("layout", check_choice(self.layout, LAYOUTS, "layout"))
        self._set("importance", check_choice(self.importance, IMPORTANCES, "importance"))
        self._set("count", check_choice(self.count, COUNTS, "count"))

    def score(self, features: "torch.Tensor", importance: "torch.Tensor", geom: "CropGeometry | None") -> "torch.Tensor":
        return importance  # the [CLS] logits (or the family's own signal)
