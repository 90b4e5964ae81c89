"""GlobalCom2 (arXiv 2501.05179): the thumbnail commands how many tokens each crop keeps, and which.

For an image of a thumbnail plus C crops, at retention ratio R: the thumbnail keeps its
``floor(N R)`` most important tokens; crop j gets ``r_j = min(1, R (1 + sigma_j - mean sigma))``
from a softmax over the thumbnail importance summed in its region, and keeps its
``floor(n_j r_j)`` best unpadded tokens by global (thumbnail, resized) + local (its own [CLS])
score. ``SPEC.md`` gives every step; the tensor code is :mod:`globalcom2.core.plans`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from .._lazy import lazy_module
from ..core.config import COUNTS, LAYOUTS, Count, Layout, check_choice, check_positive, check_ratio
from .base import VisionMethodConfig, register_method

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..core.geometry import CropGeometry

plans = lazy_module("globalcom2.core.plans")  # tensor code, imported when the method runs
resized = lazy_module("globalcom2.core.resized")
batch = lazy_module("globalcom2.core.batch")

#: How GlobalCom2 splits the crop budget (paper's ablation; ``softmax_sum`` is the method).
ALLOCATIONS: tuple[str, ...] = ("softmax_sum", "softmax_max", "uniform", "topk_count")

#: How GlobalCom2 scores crop tokens (paper's ablation; ``global_local`` is the method).
SCORINGS: tuple[str, ...] = ("global_local", "global_only", "local_only")

#: The importance signal of the methods that rank tokens by importance: ``"auto"`` (the family's
#: default for its tower: ``"cls"`` with a [CLS] token, ``"similarity"`` without), ``"cls"`` (the
#: [CLS] query's last-layer logits), ``"similarity"`` (``-cos`` of each patch's feature-layer
#: features to the view's mean, the paper's signal for towers without [CLS]; defined on every
#: tower) or ``"attention_received"`` (mean softmax attention each patch receives at the last
#: layer, an ablation). SPEC.md, "Importance without a [CLS] token". The family reads it when it
#: encodes the images; one that cannot give it raises at ``apply``.
IMPORTANCES: tuple[str, ...] = ("auto", "cls", "similarity", "attention_received")


@register_method
@dataclass(frozen=True)
class GlobalCom2Config(VisionMethodConfig):
    """Settings of GlobalCom2 (arXiv 2501.05179).

    Args:
        retention_ratio: R, the fraction of visual tokens kept, ``0 < R <= 1``. The thumbnail keeps
            ``floor(N * R)`` of its ``N`` tokens; each crop ``j`` keeps ``floor(n_j * r_j)`` of its
            ``n_j`` unpadded tokens with ``r_j = min(1, R * (1 + sigma_j - mean(sigma)))``.
        layout: how the kept tokens are arranged for the language model. ``"official"`` (default)
            reproduces the published implementation token for token, quirks included;
            ``"spatial"`` keeps every token at its true position (the vanilla LLaVA-NeXT
            arrangement with the dropped tokens removed).
        temperature: tau of the softmax over the crops' summed thumbnail importance (paper: 10).
        allocation: how the crop budget is split (an ablation; the method is ``"softmax_sum"``):
            ``"softmax_sum"``: sigma over each crop region's *summed* thumbnail importance;
            ``"softmax_max"``: the same over each region's *maximum*;
            ``"uniform"``: every crop keeps ``r_j = R``;
            ``"topk_count"``: ``r_j = min(1, R * C * c_j / sum(c))`` where ``c_j`` counts the
            thumbnail's kept (global top-``floor(N*R)``) tokens that fall in crop j's region
            (``R`` for every crop when none is kept).
        scoring: how crop tokens are ranked (an ablation; the method is ``"global_local"``):
            the L2-normalised local [CLS] importance plus the L2-normalised global guidance,
            ``"global_only"`` or ``"local_only"`` one of the two.
        importance: the importance signal, one of :data:`IMPORTANCES` (default ``"auto"``: the
            family's default, ``"cls"`` on LLaVA-NeXT and InternVL, ``"similarity"`` on LLaVA-OneVision).
        count: ``"published"`` (default: crop j keeps ``floor(n_j r_j)``, token for token the
            published code; the count depends on the image's content) or ``"fixed"`` (SPEC.md
            "Fixed count": the crops keep ``floor(R * sum_j n_j)`` in all, apportioned over them by
            ``n_j r_j``, so an image's token count is a function of its size alone:
            :func:`globalcom2.visual_token_count`; what serving engines and a processor that writes
            the compressed count need).
    """

    #: A selection. The exception, LLaVA-OneVision's resized crop map (its features are interpolated),
    #: is never handed the projector's input: that family projects in its encode.
    gathers_rows: ClassVar[bool] = True

    method: ClassVar[str] = "globalcom2"

    retention_ratio: float = 0.25
    layout: Layout = "official"
    temperature: float = 10.0
    allocation: str = "softmax_sum"
    scoring: str = "global_local"
    importance: str = "auto"
    count: Count = "published"

    def __post_init__(self) -> None:
        self._reject_none()
        # Store plain floats so that equal configs compare (and serialise) equal.
        self._set("retention_ratio", check_ratio(self.retention_ratio))
        self._set("layout", check_choice(self.layout, LAYOUTS, "layout"))
        self._set("temperature", check_positive(self.temperature, "temperature"))
        self._set("allocation", check_choice(self.allocation, ALLOCATIONS, "allocation"))
        self._set("scoring", check_choice(self.scoring, SCORINGS, "scoring"))
        self._set("importance", check_choice(self.importance, IMPORTANCES, "importance"))
        self._set("count", check_choice(self.count, COUNTS, "count"))

    def compress(
        self, features: "torch.Tensor", importance: "torch.Tensor", geom: "CropGeometry | None", newline: "torch.Tensor | None"
    ) -> tuple["torch.Tensor", Any]:
        if isinstance(geom, resized.ResizedCropGeometry) and features.shape[0] > 1:
            # LLaVA-OneVision's anyres_max_K resized crop map: select on it (SPEC.md, "LLaVA-OneVision").
            return resized.compress_resized(
                features, importance, newline, geom, self.retention_ratio, self.layout, self.temperature,
                allocation=self.allocation, scoring=self.scoring, count=self.count,
            )
        return plans.compress_image(
            features, importance, geom, newline, self.retention_ratio, self.layout, self.temperature,
            allocation=self.allocation, scoring=self.scoring, count=self.count,
        )

    def compress_batch(
        self,
        features: "Sequence[torch.Tensor]",
        importance: "Sequence[torch.Tensor]",
        geometries: "Sequence[CropGeometry | None]",
        newline: "torch.Tensor | None",
    ) -> tuple[list["torch.Tensor"], list[Any]]:
        """The batch in one vectorised pass with one host sync (:mod:`globalcom2.core.batch`);
        images on LLaVA-OneVision's resized crop map are compressed one by one (their per-crop
        step works on another geometry), the others still in one pass."""
        single = [batch.is_batchable(g, int(f.shape[0])) for f, g in zip(features, geometries)]
        options = dict(temperature=self.temperature, allocation=self.allocation, scoring=self.scoring, count=self.count)
        return _batched_where_possible(self, single, features, importance, geometries, newline, options)

    @property
    def fixed_count(self) -> bool:
        """``count="fixed"`` (or the ``uniform`` ablation, whose ``floor(n_j R)`` needs no content)."""
        return self.count == "fixed" or self.allocation == "uniform"

    @classmethod
    def keep_all(cls, **options: Any) -> "GlobalCom2Config":
        """R = 1 and every crop at ``r_j = 1`` (uniform allocation: the softmax rule gives some crops less)."""
        return cls(retention_ratio=1.0, allocation="uniform", **options)


def _batched_where_possible(
    config: VisionMethodConfig,
    batched: "Sequence[bool]",
    features: "Sequence[torch.Tensor]",
    importance: "Sequence[torch.Tensor]",
    geometries: "Sequence[CropGeometry | None]",
    newline: "torch.Tensor | None",
    options: dict[str, Any],
) -> tuple[list["torch.Tensor"], list[Any]]:
    """:func:`globalcom2.core.batch.compress_batch` on the images marked in ``batched`` (one pass,
    one sync), :meth:`compress` on the others; results in the images' order."""
    tokens: list[Any] = [None] * len(features)
    plan_list: list[Any] = [None] * len(features)
    picked = [i for i, ok in enumerate(batched) if ok]
    if picked:
        toks, ps = batch.compress_batch(
            [features[i] for i in picked], [importance[i] for i in picked], [geometries[i] for i in picked],
            newline, config.retention_ratio, getattr(config, "layout"), **options,
        )
        for i, t, p in zip(picked, toks, ps):
            tokens[i], plan_list[i] = t, p
    for i, ok in enumerate(batched):
        if not ok:
            tokens[i], plan_list[i] = config.compress(features[i], importance[i], geometries[i], newline)
    return tokens, plan_list
