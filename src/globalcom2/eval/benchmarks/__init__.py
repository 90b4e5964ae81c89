"""The built-in benchmarks, one module per benchmark family; importing this package registers them all.

The modules are discovered, not listed: every module of this package (except those whose name
starts with ``_``) is imported here, and each registers its classes with
:func:`~globalcom2.eval.base.register_benchmark`. Adding a benchmark is adding one file.
"""

from __future__ import annotations

import importlib
import pkgutil


def _import_all() -> list[str]:
    """Import every public module of this package (sorted by name); returns their names."""
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    for name in names:
        importlib.import_module(f"{__name__}.{name}")
    return names


__all__ = _import_all()
