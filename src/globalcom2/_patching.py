"""Reversible, deep-copyable per-instance method patches (used by the adapters and by FastV)."""

from __future__ import annotations

import inspect
from typing import Any, Callable


class PatchedMethod:
    """What a patched instance holds in place of one of its methods: a callable *object*.

    Calling it calls ``getattr(owner, handler)(original, *bound, *args, **kwargs)``. Being an object with
    plain attributes (not a closure) is what makes patching survive ``copy.deepcopy`` of the model:
    the copy gets its own owner (adapter or FastV patch, whose ``model`` is the copied model) and
    its ``original`` bound method is re-bound to the copied module, so a copy is an independent
    patched model. It keeps the original's name, docstring and ``inspect.signature`` (transformers
    inspects ``forward``'s signature).

    ``active = False`` turns it into a pass-through to ``original``: :meth:`Adapter.unpatch` does
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

    def __repr__(self) -> str:
        return f"<globalcom2 patched {getattr(self, '__qualname__', self.handler)}{'' if self.active else ' (inactive)'}>"
