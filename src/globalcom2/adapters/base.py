"""The adapter protocol, the registry, and reversible per-instance patching."""

from __future__ import annotations

import inspect
from typing import Any, Callable, ClassVar

from dataclasses import dataclass

from torch import nn

from .._patching import PatchedMethod

#: Attribute under which an applied adapter lives on a model instance.
STATE_ATTR = "_globalcom2_adapter"


class _Missing:
    """"No instance attribute was there before patching": one object that copies and pickles as itself
    (a plain ``object()`` sentinel would be duplicated by ``copy.deepcopy`` and then restored as the
    model's ``forward``)."""

    _instance: "_Missing | None" = None

    def __new__(cls) -> "_Missing":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __copy__(self) -> "_Missing":
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> "_Missing":
        return self

    def __reduce__(self) -> str:
        return "_MISSING"

    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


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


class Adapter:
    """Base class of a model-family adapter.

    Subclasses set :attr:`model_names` (the class names they handle, for error messages),
    implement :meth:`supports`, and list in :meth:`patched_methods` the instance methods they
    replace. Patching is per instance: the class, and every other model in the process, is left
    alone. :meth:`unpatch` restores exactly what was there before (including a method that an
    earlier wrapper such as accelerate's hooks had set on the instance).
    """

    model_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module, config: Any) -> None:
        self.model = model
        self.config = config
        self._saved: dict[str, Any] = {}

    # -- to implement -------------------------------------------------------------------------
    @classmethod
    def supports(cls, model: nn.Module) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def validate(self) -> None:
        """Raise ``ValueError`` if this model instance cannot be compressed (checked at apply)."""

    def patched_methods(self) -> dict[str, str]:  # pragma: no cover - abstract
        """Map of instance method name -> name of this adapter's handler, called as
        ``handler(original_bound_method, *args, **kwargs)`` (see :class:`PatchedMethod`)."""
        raise NotImplementedError

    # -- patching -------------------------------------------------------------------------------
    def patch(self) -> None:
        for name, handler in self.patched_methods().items():
            original = getattr(self.model, name)
            self._saved[name] = (self.model.__dict__.get(name, _MISSING), PatchedMethod(self, handler, original))
            setattr(self.model, name, self._saved[name][1])
        setattr(self.model, STATE_ATTR, self)

    def unpatch(self) -> None:
        """Restore what was there before :meth:`patch`. Where something else wrapped a patched
        method afterwards (accelerate's ``prepare`` wraps ``forward``), that wrapper stays and ours,
        inside it, becomes a pass-through to the original."""
        for name, (saved, ours) in self._saved.items():
            ours.active = False
            ours.owner = None  # a pass-through left inside someone's wrapper must not keep this adapter alive
            if self.model.__dict__.get(name) is not ours:
                continue  # wrapped by someone else since: keep their wrapper, ours now passes through
            if saved is _MISSING:
                self.model.__dict__.pop(name, None)
            else:
                setattr(self.model, name, saved)
        self._saved.clear()
        self.model.__dict__.pop(STATE_ATTR, None)


_REGISTRY: list[type[Adapter]] = []


def register_adapter(adapter_cls: type[Adapter]) -> type[Adapter]:
    """Register an adapter class (usable as a decorator). Later registrations take precedence."""
    if adapter_cls not in _REGISTRY:
        _REGISTRY.insert(0, adapter_cls)
    return adapter_cls


def supported_model_names() -> list[str]:
    return [name for cls in _REGISTRY for name in cls.model_names]


def adapter_for(model: Any) -> type[Adapter]:
    """The adapter class that handles ``model``, or a ``ValueError`` naming what is supported."""
    for cls in _REGISTRY:
        if cls.supports(model):
            return cls
    raise ValueError(
        f"GlobalCom2 does not support {type(model).__name__}; supported model classes: "
        f"{', '.join(supported_model_names())} (Hugging Face transformers)"
    )


def bind_arguments(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Name every argument of a call to ``fn`` (positional ones included), flattening ``**kwargs``."""
    if not args:
        return dict(kwargs)
    sig = inspect.signature(fn)
    bound = sig.bind_partial(*args, **kwargs)
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        param = sig.parameters[name]
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif param.kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"{getattr(fn, '__name__', 'function')}() got unexpected extra positional arguments")
        else:
            out[name] = value
    return out
