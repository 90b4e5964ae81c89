"""VisionZip (Yang et al. 2024, arXiv 2412.04467): dominant tokens plus merged contextual tokens.

Per view (the thumbnail and every crop, each over its unpadded tokens), at retention ratio R the
view keeps ``k = floor(n R)`` tokens, split as VisionZip's own settings split them (54 dominant +
10 contextual of 64: ``k_c = floor(k * 10 / 64)`` contextual, the rest dominant):

* **dominant**: the ``k - k_c`` tokens of highest importance (the family's signal: the [CLS]
  attention where the tower has [CLS], else ``similarity``), ties to the lower position;
* **contextual**: of the remaining tokens, ``k_c`` targets evenly spaced in raster order (every
  ``floor(m / k_c)``-th of the ``m`` remaining); every other remaining token joins the target most
  similar to it (cosine of their features) and each target becomes the mean of itself and the
  tokens that joined it.

The kept tokens stay at their positions, so the family's layouts (the vanilla arrangement with
the dropped tokens removed; ``official`` on LLaVA-NeXT) apply unchanged, and with every token
kept (R = 1) the language model gets the vanilla sequence. Decisions where this differs from the
published code, which targets LLaVA-1.5's single view: VisionZip ranks by the attention its tower
exposes and merges by *key* similarity before the projector; here a method receives what every
family hands every method (projected features, importance, geometry), so the merge averages
projected features by their cosine similarity. Per image (a Python pass and a few host syncs per
image, as pooling): there is no batched form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from .._lazy import lazy_module
from ..core.config import COUNTS, LAYOUTS, Count, Layout, check_choice, check_ratio
from .base import VisionMethodConfig, register_method
from .globalcom2 import IMPORTANCES

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..core.geometry import CropGeometry

torch = lazy_module("torch")
geometry = lazy_module("globalcom2.core.geometry")
importance_ops = lazy_module("globalcom2.core.importance")
layouts = lazy_module("globalcom2.core.layouts")

#: VisionZip's split of a budget: 54 dominant and 10 contextual tokens of 64.
CONTEXTUAL_SHARE = (10, 64)


@register_method
@dataclass(frozen=True)
class VisionZipConfig(VisionMethodConfig):
    """VisionZip: dominant tokens by importance, the rest merged into a few contextual tokens.

    Args:
        retention_ratio: R, ``0 < R <= 1``: each view keeps ``floor(n R)`` of its ``n`` unpadded tokens.
        layout: arrangement of the kept tokens (default ``"spatial"``).
        importance: the signal the dominant tokens are ranked by (default ``"auto"``: the family's).
        count: ``"published"`` or ``"fixed"``; the count is a function of the size either way.
    """

    method: ClassVar[str] = "visionzip"

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

    def compress(
        self, features: "torch.Tensor", importance: "torch.Tensor", geom: "CropGeometry | None", newline: "torch.Tensor | None"
    ) -> tuple["torch.Tensor", Any]:
        v, n, _ = features.shape
        single = geom is None or v == 1
        valid = torch.ones((v, n), dtype=torch.bool, device=features.device)
        if not single:
            valid[1:] = geometry.valid_mask(geom, features.device)
        table = features.clone()
        keep = torch.zeros_like(valid)
        for view in range(v):
            keep[view] = _zip_view(table[view], importance[view], valid[view], self.retention_ratio)
        thumb_keep = torch.nonzero(keep[0]).reshape(-1)
        if self.layout == "official":  # most important first, as GlobalCom2's official thumbnail
            order = torch.argsort(importance[0][thumb_keep].to(importance_ops.SCORE_DTYPE), descending=True, stable=True)
            thumb_keep = thumb_keep[order]
        if single:  # the kept tokens, then the one trailing newline (as plan_single_view)
            thumb = thumb_keep if self.layout == "official" else torch.sort(thumb_keep).values
            empty = torch.zeros((0, n), dtype=torch.bool, device=features.device)
            plan = layouts.CompressionPlan(
                index=torch.cat([thumb, torch.full((1,), n, dtype=torch.long, device=thumb.device)]),
                thumb_keep=thumb, crop_keep=empty, crop_valid=empty,
                crop_ratios=torch.zeros(0, dtype=torch.float64, device=features.device),
                thumb_importance=importance[0], crop_score=torch.zeros((0, n), dtype=importance_ops.SCORE_DTYPE, device=features.device),
                geometry=None, layout=self.layout, table=table,
            )
        else:
            n_valid = valid[1:].sum(1).to(torch.float64)
            ratios = keep[1:].sum(1).to(torch.float64) / n_valid.clamp_min(1.0)
            score = importance[1:].to(importance_ops.SCORE_DTYPE).masked_fill(~valid[1:], float("-inf"))
            plan = layouts.assemble_plan(thumb_keep, keep[1:], valid[1:], geom, self.layout, ratios, importance[0], score)
            plan.table = table
        return layouts.gather_features(table, newline, plan.index), plan


def _zip_view(feats: "torch.Tensor", importance: "torch.Tensor", valid: "torch.Tensor", ratio: float) -> "torch.Tensor":
    """One view: which of its tokens survive (dominant + contextual targets); the targets' rows of
    ``feats`` (N, D) are overwritten in place with their merged means. Returns (N,) bool."""
    n = int(valid.shape[0])
    n_valid = int(valid.sum())
    k = int(n_valid * ratio)
    k_c = k * CONTEXTUAL_SHARE[0] // CONTEXTUAL_SHARE[1]
    k_d = k - k_c
    score = importance.to(importance_ops.SCORE_DTYPE).masked_fill(~valid, float("-inf"))
    order = torch.argsort(score, descending=True, stable=True)
    keep = torch.zeros(n, dtype=torch.bool, device=feats.device)
    keep[order[:k_d]] = True
    if k_c == 0:
        return keep
    rest = torch.nonzero(valid & ~keep).reshape(-1)  # raster order
    step = max(1, rest.numel() // k_c)
    targets = rest[::step][:k_c]
    keep[targets] = True
    others = rest[~torch.isin(rest, targets)]
    if others.numel():
        x = feats.float()
        t_unit = torch.nn.functional.normalize(x[targets], dim=-1)  # (k_c, D)
        o_unit = torch.nn.functional.normalize(x[others], dim=-1)  # (m, D)
        joined = (o_unit @ t_unit.T).argmax(dim=-1)  # (m,) the most similar target (ties: the first)
        sums = x[targets].index_add(0, joined, x[others])
        counts = torch.ones(k_c, device=feats.device).index_add(0, joined, torch.ones(others.numel(), device=feats.device))
        feats[targets] = (sums / counts[:, None]).to(feats.dtype)
    return keep
