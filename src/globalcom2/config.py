"""The validated configuration of GlobalCom2.

One frozen dataclass holds every knob of the method. It validates itself on construction, so a
bad value fails where it is written, with a ``ValueError`` that names the field.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal, Mapping

Layout = Literal["official", "spatial"]

#: The sequence layouts GlobalCom2 can hand to the language model (see ``globalcom2.ops``).
LAYOUTS: tuple[str, ...] = ("official", "spatial")


@dataclass(frozen=True)
class GlobalCom2Config:
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
    """

    retention_ratio: float = 0.25
    layout: Layout = "official"
    temperature: float = 10.0

    def __post_init__(self) -> None:
        r = self.retention_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
            raise ValueError(f"retention_ratio must be a number in (0, 1], got {r!r}")
        if not 0.0 < r <= 1.0:
            raise ValueError(f"retention_ratio must be in (0, 1], got {r!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {self.layout!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {t!r}")
        # Store plain floats so that equal configs compare (and serialise) equal.
        object.__setattr__(self, "retention_ratio", float(r))
        object.__setattr__(self, "temperature", float(t))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; ``GlobalCom2Config.from_dict(c.to_dict()) == c``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GlobalCom2Config":
        """Build a config from a mapping, rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown GlobalCom2Config field(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**dict(data))

    def replace(self, **changes: Any) -> "GlobalCom2Config":
        """A copy with some fields changed (validated like a new config)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown GlobalCom2Config field(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return replace(self, **changes)
