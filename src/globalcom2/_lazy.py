"""A module imported on first attribute access, so that importing ours stays cheap.

``torch = lazy_module("torch")`` lets a method or model-family module use ``torch.x`` in its
functions while ``import globalcom2``, ``globalcom2 --help`` and the registries (method names,
supported model types) never load torch.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule(ModuleType):
    """Stands for the module ``name`` and imports it when one of its attributes is first read."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__dict__["_lazy_target"] = name

    def _load(self) -> ModuleType:
        return importlib.import_module(self.__dict__["_lazy_target"])

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._load(), attr)

    def __dir__(self) -> list[str]:
        return dir(self._load())


def lazy_module(name: str) -> Any:
    """A stand-in for ``importlib.import_module(name)`` that imports on first use."""
    return LazyModule(name)
