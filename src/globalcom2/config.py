"""The validated configurations of GlobalCom2 and of the methods it is compared with.

One frozen dataclass per method holds every knob of that method. Each validates itself on
construction, so a bad value fails where it is written, with a ``ValueError`` that names the
field. All of them round-trip through ``to_dict`` / ``from_dict`` (JSON-safe) and have a
validated ``replace``. The method a config belongs to is its class attribute ``method``; see
:mod:`globalcom2.methods` for the registry from method name to config and implementation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, ClassVar, Literal, Mapping, TypeVar

Layout = Literal["official", "spatial"]

#: The sequence layouts GlobalCom2 can hand to the language model (see ``globalcom2.ops``).
LAYOUTS: tuple[str, ...] = ("official", "spatial")

#: How GlobalCom2 splits the crop budget (paper's ablation; ``softmax_sum`` is the method).
ALLOCATIONS: tuple[str, ...] = ("softmax_sum", "softmax_max", "uniform", "topk_count")

#: How GlobalCom2 scores crop tokens (paper's ablation; ``global_local`` is the method).
SCORINGS: tuple[str, ...] = ("global_local", "global_only", "local_only")

C = TypeVar("C", bound="MethodConfig")


def check_ratio(value: Any, name: str = "retention_ratio") -> float:
    """``value`` as a float in (0, 1], or a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


def check_choice(value: Any, choices: tuple[str, ...], name: str) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_int(value: Any, name: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class MethodConfig:
    """Shared behaviour of the method configs (not a method itself)."""

    method: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; ``type(c).from_dict(c.to_dict()) == c``."""
        return asdict(self)

    @classmethod
    def _check_names(cls, names: Any) -> None:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(names) - known)
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} field(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """Build a config from a mapping, rejecting unknown keys by name."""
        cls._check_names(data)
        return cls(**dict(data))

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (validated like a new config)."""
        self._check_names(changes)
        return replace(self, **changes)

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)


@dataclass(frozen=True)
class GlobalCom2Config(MethodConfig):
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
    """

    method: ClassVar[str] = "globalcom2"

    retention_ratio: float = 0.25
    layout: Layout = "official"
    temperature: float = 10.0
    allocation: str = "softmax_sum"
    scoring: str = "global_local"

    def __post_init__(self) -> None:
        # Store plain floats so that equal configs compare (and serialise) equal.
        self._set("retention_ratio", check_ratio(self.retention_ratio))
        check_choice(self.layout, LAYOUTS, "layout")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {t!r}")
        self._set("temperature", float(t))
        check_choice(self.allocation, ALLOCATIONS, "allocation")
        check_choice(self.scoring, SCORINGS, "scoring")


@dataclass(frozen=True)
class FasterVLMConfig(MethodConfig):
    """FasterVLM-style [CLS] pruning (Zhang et al. 2024), on the AnyRes views.

    Keeps the ``floor(R * (N + sum_j n_j))`` tokens with the highest [CLS] importance (the same
    last-layer logits GlobalCom2 uses), ranked jointly over the thumbnail's N tokens and every
    crop's unpadded tokens: no per-crop budget and no global guidance.

    Args:
        retention_ratio: R, ``0 < R <= 1``.
        layout: arrangement of the kept tokens, as for GlobalCom2 (default ``"spatial"``: true
            positions, the natural order for a baseline).
    """

    method: ClassVar[str] = "fastervlm"

    retention_ratio: float = 0.25
    layout: Layout = "spatial"

    def __post_init__(self) -> None:
        self._set("retention_ratio", check_ratio(self.retention_ratio))
        check_choice(self.layout, LAYOUTS, "layout")


@dataclass(frozen=True)
class RandomConfig(MethodConfig):
    """Random pruning: the same joint budget as :class:`FasterVLMConfig`, tokens drawn at random.

    The draw uses a private generator seeded with ``seed`` for every image (never the global RNG),
    so the same image is pruned the same way every call, alone or in a batch.

    Args:
        retention_ratio: R, ``0 < R <= 1``.
        layout: as for FasterVLM (default ``"spatial"``).
        seed: the generator's seed (default 0).
    """

    method: ClassVar[str] = "random"

    retention_ratio: float = 0.25
    layout: Layout = "spatial"
    seed: int = 0

    def __post_init__(self) -> None:
        self._set("retention_ratio", check_ratio(self.retention_ratio))
        check_choice(self.layout, LAYOUTS, "layout")
        check_int(self.seed, "seed", minimum=0)


@dataclass(frozen=True)
class PoolingConfig(MethodConfig):
    """Uniform spatial average pooling of every view to the same budget.

    The thumbnail's S x S map is average-pooled (``adaptive_avg_pool2d``) to
    ``round(S * sqrt(R))`` x ``round(S * sqrt(R))`` (at least 1 x 1), the unpadded crop area
    ``h x w`` to ``round(h * sqrt(R))`` x ``round(w * sqrt(R))``; the pooled crop area is read row
    by row with one newline per pooled row (the vanilla arrangement at a lower resolution).

    Args:
        retention_ratio: R, ``0 < R <= 1``.
    """

    method: ClassVar[str] = "pooling"

    retention_ratio: float = 0.25

    def __post_init__(self) -> None:
        self._set("retention_ratio", check_ratio(self.retention_ratio))
