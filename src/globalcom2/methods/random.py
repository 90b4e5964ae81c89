"""Random pruning: FasterVLM's joint budget, tokens drawn at random from a private seeded generator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from .._lazy import lazy_module
from ..core.config import COUNTS, LAYOUTS, Count, Layout, check_choice, check_int, check_ratio
from .base import ScoreSelectionConfig, register_method

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..core.geometry import CropGeometry

torch = lazy_module("torch")


def random_scores(views: int, n: int, seed: int, device: Any) -> "torch.Tensor":
    """(V, N) uniform scores from a private CPU generator seeded with ``seed`` (device-independent)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand((views, n), generator=gen).to(device)


@register_method
@dataclass(frozen=True)
class RandomConfig(ScoreSelectionConfig):
    """Random pruning: the same joint budget as :class:`FasterVLMConfig`, tokens drawn at random.

    The draw uses a private generator seeded with ``seed`` for every image (never the global RNG),
    so the same image is pruned the same way every call, alone or in a batch.

    Args:
        retention_ratio: R, ``0 < R <= 1``.
        layout: as for FasterVLM (default ``"spatial"``).
        seed: the generator's seed (default 0).
        count: ``"published"`` or ``"fixed"`` (SPEC.md "Fixed count"); this method's count is a
            function of the image size already, so both give the same tokens (accepted so that one
            setting serves every method).
    """

    method: ClassVar[str] = "random"

    retention_ratio: float = 0.25
    layout: Layout = "spatial"
    seed: int = 0
    count: Count = "published"

    def __post_init__(self) -> None:
        self._reject_none()
        self._set("retention_ratio", check_ratio(self.retention_ratio))
        self._set("layout", check_choice(self.layout, LAYOUTS, "layout"))
        self._set("seed", check_int(self.seed, "seed", minimum=0))
        self._set("count", check_choice(self.count, COUNTS, "count"))

    def score(self, features: "torch.Tensor", importance: "torch.Tensor", geom: "CropGeometry | None") -> "torch.Tensor":
        return random_scores(importance.shape[0], importance.shape[1], self.seed, importance.device)

    def scores_batch(
        self,
        features: "Sequence[torch.Tensor]",
        importance: "Sequence[torch.Tensor]",
        geometries: "Sequence[CropGeometry | None]",
    ) -> list["torch.Tensor"]:
        """The scores of every image drawn on the CPU exactly as :meth:`score` draws them (same
        generator, same seed, one draw per distinct view count), reaching the device in one
        non-blocking copy."""
        n = int(importance[0].shape[1])
        views = [int(imp.shape[0]) for imp in importance]
        drawn = {v: random_scores(v, n, self.seed, "cpu") for v in set(views)}
        on_host = torch.cat([drawn[v] for v in views])
        return list(torch.split(on_host.to(importance[0].device, non_blocking=True), views))
