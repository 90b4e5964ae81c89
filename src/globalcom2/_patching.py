"""Reversible, deep-copyable per-instance method patches (used by the model families and by FastV)."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable, ClassVar

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

#: Attribute under which an applied family (the patch of a model instance) lives on that instance.
STATE_ATTR = "_globalcom2_family"


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


class PatchedMethod:
    """What a patched instance holds in place of one of its methods: a callable *object*.

    Calling it calls ``getattr(owner, handler)(original, *bound, *args, **kwargs)``. Being an object with
    plain attributes (not a closure) is what makes patching survive ``copy.deepcopy`` of the model:
    the copy gets its own owner (adapter or FastV patch, whose ``model`` is the copied model) and
    its ``original`` bound method is re-bound to the copied module, so a copy is an independent
    patched model. It keeps the original's name, docstring and ``inspect.signature`` (transformers
    inspects ``forward``'s signature).

    ``active = False`` turns it into a pass-through to ``original``: :meth:`InstancePatch.unpatch` does
    that when another wrapper (accelerate's ``prepare``, for example) was set on top of it after
    patching, so that removing GlobalCom2 keeps that wrapper working.
    """

    def __init__(self, owner: Any, handler: str, original: Callable[..., Any], bound: tuple[Any, ...] = ()) -> None:
        self.owner = owner
        self.handler = handler
        self.original = original
        self.bound = bound
        self.active = True
        for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
            try:
                setattr(self, attr, getattr(original, attr))
            except AttributeError:
                pass
        self.__wrapped__ = original
        try:
            self.__signature__ = inspect.signature(original)
        except (TypeError, ValueError):  # pragma: no cover - builtins only
            pass

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.active:
            return self.original(*args, **kwargs)
        return getattr(self.owner, self.handler)(self.original, *self.bound, *args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled (``pickle``, ``torch.save`` of the model) and deep-copied as its plain state,
        set after the object exists (its owner refers back to it).

        Its signature is left out (it holds the annotations' ForwardRefs, code objects included:
        "cannot pickle code objects") and read again when loaded. An ``original`` that is the
        class's method bound to the instance is stored as (instance, name) and bound again when
        loaded, to the loaded (or copied) instance."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("__signature__", "__wrapped__")}
        original = self.original
        if inspect.ismethod(original):
            name = getattr(original.__func__, "__name__", None)
            if name is not None and getattr(type(original.__self__), name, None) is original.__func__:
                state["original"] = _ClassMethodOf(original.__self__, name)
        return (_blank, (), state)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if isinstance(self.original, _ClassMethodOf):
            self.original = self.original.bind()
        self.__wrapped__ = self.original
        try:
            self.__signature__ = inspect.signature(self.original)
        except (TypeError, ValueError):  # pragma: no cover - builtins only
            pass

    def __repr__(self) -> str:
        return f"<globalcom2 patched {getattr(self, '__qualname__', self.handler)}{'' if self.active else ' (inactive)'}>"


class _ClassMethodOf:
    """(instance, name): the class's method ``name`` bound to ``instance``, as pickled."""

    def __init__(self, instance: Any, name: str) -> None:
        self.instance, self.name = instance, name

    def bind(self) -> Callable[..., Any]:
        return getattr(type(self.instance), self.name).__get__(self.instance, type(self.instance))


def _blank() -> PatchedMethod:
    """An empty :class:`PatchedMethod`, filled by its ``__setstate__`` (unpickling, deep copies)."""
    return PatchedMethod.__new__(PatchedMethod)


class InstancePatch:
    """Base class of what patches one model instance (:class:`globalcom2.models.Family` is the one there is).

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
        """Map of instance method name -> name of this patch's handler, called as
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
            ours.owner = None  # a pass-through left inside someone's wrapper must not keep this patch alive
            if self.model.__dict__.get(name) is not ours:
                continue  # wrapped by someone else since: keep their wrapper, ours now passes through
            if saved is _MISSING:
                self.model.__dict__.pop(name, None)
            else:
                setattr(self.model, name, saved)
        self._saved.clear()
        self.model.__dict__.pop(STATE_ATTR, None)
