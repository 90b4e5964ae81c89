"""What a family's vision side hands over (:class:`EncodedImages`), what a vision-side method
makes of it (:class:`CompressedImages`), and what a prefill reports (:class:`CompressionStats`).

Importing this module loads neither torch nor transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..core.geometry import CropGeometry


@dataclass
class CompressionStats:
    """Visual-token counts of the most recent prefill, one entry per batch row.

    Attributes:
        method: the method's name.
        visual_tokens: image placeholders entering the language model (after vision-side
            compression; newlines included).
        vanilla_visual_tokens: what the vanilla model would have used for the same prompts.
        lm_visual_tokens: for FastV, the visual tokens left in layers ``K..L-1``; else None.
        effective_visual_tokens: layer-averaged visual tokens (equals ``visual_tokens`` without FastV).
    """

    method: str
    visual_tokens: list[int]
    vanilla_visual_tokens: list[int]
    lm_visual_tokens: list[int] | None
    effective_visual_tokens: list[float]


@dataclass
class EncodedImages:
    """The vision side's output, per image.

    Attributes:
        features: per image, (V_i, N, D) projected features (in the family's view order).
        importance: per image, (V_i, N) importance (e.g. float64 [CLS] logits of the last vision layer).
        geometries: per image, its :class:`~globalcom2.core.geometry.CropGeometry` (None for one view).
        image_sizes: per image, (height, width) in pixels.
        vanilla_counts: per image, the placeholder tokens the vanilla model uses (what the processor wrote).
        project: None (``features`` are projected), or the model's projector, ``(..., C) -> (..., D)``
            row by row: ``features`` are then its input, (V_i, N, C), and only the rows a selecting
            method keeps are projected (:meth:`Family.compress`); :meth:`projected` projects all.
    """

    features: list["torch.Tensor"]
    importance: list["torch.Tensor"]
    geometries: "list[CropGeometry | None]"
    image_sizes: list[tuple[int, int]]
    vanilla_counts: list[int] = field(default_factory=list)
    project: "Callable[[torch.Tensor], torch.Tensor] | None" = None

    def projected(self) -> "EncodedImages":
        """These images with every view's features projected, (V_i, N, D) (itself when they are)."""
        if self.project is None:
            return self
        import torch

        flat = self.project(torch.cat(self.features, dim=0))  # one projector call for the batch
        features = list(torch.split(flat, [int(f.shape[0]) for f in self.features], dim=0))
        return replace(self, features=features, project=None)


@dataclass
class CompressedImages:
    """A vision-side method's output for a batch: tokens and the plans behind them, per image.

    ``plans`` hold what each image's method decided (a :class:`~globalcom2.core.plans.CompressionPlan`
    for the selection methods, :class:`~globalcom2.methods.PoolingPlan` for pooling); every plan
    has ``num_tokens`` and ``kept_masks()``.
    """

    tokens: list["torch.Tensor"]
    plans: list[Any]
    vanilla_counts: list[int] = field(default_factory=list)

    @property
    def counts(self) -> list[int]:
        return [t.shape[0] for t in self.tokens]
