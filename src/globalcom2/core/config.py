"""The validated-config base every method's config derives from, and its field validators.

One frozen dataclass per method (in ``globalcom2/methods/<name>.py``) holds every knob of that
method. Each validates itself on construction, so a bad value fails where it is written, with a
``ValueError`` that names the field. All of them round-trip through ``to_dict`` / ``from_dict``
(JSON-safe) and have a validated ``replace``. The method a config belongs to is its class
attribute ``method``; see :mod:`globalcom2.methods` for the registry. Importing this module
loads neither torch nor numpy.

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

#: The sequence layouts a selection method can hand to the language model (see :mod:`globalcom2.core.layouts`).
LAYOUTS: tuple[str, ...] = ("official", "spatial")

Count = Literal["published", "fixed"]

#: How many tokens an image keeps (``SPEC.md``, "Fixed count"): ``"published"``, each crop's
#: ``floor(n_j r_j)`` (the published code's count, known only after the tower ran), or ``"fixed"``,
#: ``floor(R * sum_j n_j)`` apportioned over the crops (a function of the image size alone).
COUNTS: tuple[str, ...] = ("published", "fixed")

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
