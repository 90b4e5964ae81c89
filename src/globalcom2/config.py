"""The validated configurations of GlobalCom2 and of the methods it is compared with.

One frozen dataclass per method holds every knob of that method. Each validates itself on
construction, so a bad value fails where it is written, with a ``ValueError`` that names the
field. All of them round-trip through ``to_dict`` / ``from_dict`` (JSON-safe) and have a
validated ``replace``. The method a config belongs to is its class attribute ``method``; see
:mod:`globalcom2.methods` for the registry from method name to config and implementation.

What the numeric fields accept (the Python API takes what numerical code usually hands it):

* **Real-valued fields** (``retention_ratio``, ``temperature``): a Python ``int`` or ``float``,
  any other :class:`numbers.Real` (``Fraction``...), a NumPy scalar or 0-d array
  (``np.float32(0.25)``, ``np.int64(1)``) or a 0-d torch tensor (``torch.tensor(0.25)``). The
  config stores a plain Python ``float``. A float of less than double precision (``float32``,
  ``float16``, ``bfloat16``) is stored as the shortest decimal that reads back as the same value
  in its own precision, so ``np.float32(0.1)`` and ``torch.tensor(0.1)`` give ``0.1``, not
  ``0.10000000149011612`` (the config equals the one written with ``0.1``).
* **Integer fields** (``seed``, FastV's ``layer``): a Python ``int``, a NumPy integer scalar or
  0-d integer array (``np.int64(2)``), a 0-d integer torch tensor, or anything implementing
  ``__index__``. Stored as a plain Python ``int``. **Integral floats (``2.0``,
  ``np.float64(2)``, ``torch.tensor(2.0)``) are rejected**: a float where a count, an index or a
  seed is expected is usually a computed value gone wrong, and silently truncating it (or
  accepting ``2.0`` but not ``2.5``) would hide that; every path that writes these configs
  (``to_dict``/JSON, the CLI's ``KEY=VALUE`` options) already yields ints.
* **Always rejected**, with a ``ValueError`` that names the field and shows the offending value
  *with its type* (``got '0.25' (str)``): ``None`` (a config field has no "unset" value; leave
  the option out to get its default), ``bool`` (also NumPy / torch booleans), strings, complex
  numbers, NaN and infinities, and arrays or tensors that are not 0-dimensional (a shape-``(1,)``
  array included: pass ``x.item()`` or ``x[0]`` explicitly).

Range errors show the number as read (``retention_ratio must be in (0, 1], got 1.5``).
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import MISSING, asdict, dataclass, fields, replace
from typing import Any, ClassVar, Literal, Mapping, TypeVar

Layout = Literal["official", "spatial"]

#: The sequence layouts GlobalCom2 can hand to the language model (see ``globalcom2.ops``).
LAYOUTS: tuple[str, ...] = ("official", "spatial")

#: How GlobalCom2 splits the crop budget (paper's ablation; ``softmax_sum`` is the method).
ALLOCATIONS: tuple[str, ...] = ("softmax_sum", "softmax_max", "uniform", "topk_count")

#: How GlobalCom2 scores crop tokens (paper's ablation; ``global_local`` is the method).
SCORINGS: tuple[str, ...] = ("global_local", "global_only", "local_only")

C = TypeVar("C", bound="MethodConfig")


def describe(value: Any) -> str:
    """``value`` for an error message, with its type: ``'0.25' (str)``, ``True (bool)``,
    ``tensor([1., 2.]) (torch.Tensor of shape (2,))``."""
    if value is None:
        return "None"
    cls = type(value)
    kind = cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__.split('.')[0]}.{cls.__name__}"
    if _is_array_like(value):
        details = []
        if getattr(value, "ndim", 0) != 0:
            details.append(f"shape {tuple(value.shape)}")
        if cls.__name__ in ("ndarray", "Tensor", "Parameter") and hasattr(value, "dtype"):
            details.append(f"dtype {value.dtype}")
        kind += f", {', '.join(details)}" if details else ""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({kind})"


def _is_array_like(value: Any) -> bool:
    """A NumPy or torch object (scalar, array or tensor), recognised without importing either."""
    return type(value).__module__.split(".")[0] in ("numpy", "torch")


def _array_scalar(value: Any, name: str, what: str) -> Any:
    """A 0-d NumPy / torch ``value`` as the Python scalar it holds (``.item()``)."""
    ndim = getattr(value, "ndim", None)
    if ndim != 0:
        raise ValueError(f"{name} must be {what} (a single value, not an array), got {describe(value)}")
    try:
        return value.item()
    except Exception as e:  # e.g. a tensor on the meta device
        raise ValueError(f"{name} must be {what}, got {describe(value)} whose value cannot be read ({e})") from None


def _shortest_float(value: Any, number: float) -> float:
    """``number`` (read from the NumPy / torch ``value``) as the shortest decimal that rounds back
    to the same value in ``value``'s own precision, when that precision is below double."""
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return number
    if type(value).__module__.split(".")[0] == "numpy":
        if dtype.kind != "f" or dtype.itemsize >= 8:
            return number
        same = lambda c: float(dtype.type(c)) == number  # noqa: E731
    else:  # torch
        if not dtype.is_floating_point or value.element_size() >= 8:
            return number
        cpu = value.detach().cpu()
        same = lambda c: cpu.new_tensor(c).item() == number  # noqa: E731
    for digits in range(1, 18):
        candidate = float(f"{number:.{digits}g}")
        if same(candidate):
            return candidate
    return number  # pragma: no cover - 17 digits always round-trip


def _none(value: Any, name: str) -> None:
    if value is None:
        raise ValueError(f"{name} must not be None; leave it out to use its default")


def check_real(value: Any, name: str) -> float:
    """``value`` as a finite Python float (see the module docstring for what is accepted)."""
    _none(value, name)
    what = "a finite real number"
    number = value
    if _is_array_like(value):
        number = _array_scalar(value, name, what)
    if isinstance(number, bool) or not isinstance(number, numbers.Real):
        raise ValueError(f"{name} must be {what}, got {describe(value)}")
    result = float(number)
    if not math.isfinite(result):
        raise ValueError(f"{name} must be {what}, got {describe(value)}")
    return _shortest_float(value, result) if _is_array_like(value) else result


def check_ratio(value: Any, name: str = "retention_ratio") -> float:
    """``value`` as a float in (0, 1], or a ValueError naming ``name``."""
    ratio = check_real(value, name)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {ratio!r}")
    return ratio


def check_positive(value: Any, name: str) -> float:
    """``value`` as a finite float > 0, or a ValueError naming ``name``."""
    number = check_real(value, name)
    if not number > 0:
        raise ValueError(f"{name} must be a finite number > 0, got {number!r}")
    return number


def check_choice(value: Any, choices: tuple[str, ...], name: str) -> str:
    _none(value, name)
    if not isinstance(value, str) or value not in choices:
        shown = repr(value) if isinstance(value, str) else describe(value)
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {shown}")
    return str(value)


def check_int(value: Any, name: str, minimum: int | None = None) -> int:
    """``value`` as a Python int (integral floats rejected), or a ValueError naming ``name``."""
    _none(value, name)
    number = value
    if _is_array_like(value):
        number = _array_scalar(value, name, "an integer")
    if isinstance(number, (bool, float)):
        integral = isinstance(number, float) and math.isfinite(number) and number.is_integer()
        hint = "; integral floats are not accepted, write it as an int" if integral else ""
        raise ValueError(f"{name} must be an integer, got {describe(value)}{hint}")
    try:
        result = operator.index(number)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {describe(value)}") from None
    if minimum is not None and result < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {result!r}")
    return result


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

    def _reject_none(self) -> None:
        """No field takes ``None``: it is not "the default" (leave the field out for that)."""
        for f in fields(self):
            if getattr(self, f.name) is None:
                default = "" if f.default is MISSING else f" ({f.default!r})"
                raise ValueError(
                    f"{f.name} must not be None; leave it out to use its default{default}"
                )


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
        self._reject_none()
        # Store plain floats so that equal configs compare (and serialise) equal.
        self._set("retention_ratio", check_ratio(self.retention_ratio))
        self._set("layout", check_choice(self.layout, LAYOUTS, "layout"))
        self._set("temperature", check_positive(self.temperature, "temperature"))
        self._set("allocation", check_choice(self.allocation, ALLOCATIONS, "allocation"))
        self._set("scoring", check_choice(self.scoring, SCORINGS, "scoring"))


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
        self._reject_none()
        self._set("retention_ratio", check_ratio(self.retention_ratio))
        self._set("layout", check_choice(self.layout, LAYOUTS, "layout"))


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
        self._reject_none()
        self._set("retention_ratio", check_ratio(self.retention_ratio))
        self._set("layout", check_choice(self.layout, LAYOUTS, "layout"))
        self._set("seed", check_int(self.seed, "seed", minimum=0))


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
        self._reject_none()
        self._set("retention_ratio", check_ratio(self.retention_ratio))
