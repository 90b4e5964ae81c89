"""GlobalCom2: training-free visual-token compression for high-resolution VLMs (arXiv 2501.05179).

>>> import globalcom2
>>> globalcom2.apply(model, retention_ratio=0.25)   # doctest: +SKIP
>>> model.generate(**inputs)                          # doctest: +SKIP
>>> globalcom2.remove(model)                          # doctest: +SKIP

The API functions are imported lazily, so that ``import globalcom2`` (and ``globalcom2 --help``)
does not load torch until it is needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .core.config import LAYOUTS
from .methods import FasterVLMConfig, GlobalCom2Config, PoolingConfig, RandomConfig

__version__ = "0.1.0"

_API = ("apply", "compressed", "get_family", "get_config", "is_applied", "last_stats", "remove")
_LAZY = {
    "FastVConfig": ".methods", "ComposedConfig": ".methods", "method_names": ".methods",
    "compress_images": ".embeddings", "load_embeddings": ".embeddings", "embed_prompt": ".embeddings",
    "visual_token_counts": ".embeddings",
    "ImageEmbeddings": ".embeddings",
}

if TYPE_CHECKING:  # pragma: no cover
    from .api import apply, compressed, get_family, get_config, is_applied, last_stats, remove
    from .methods import FastVConfig
    from .methods import ComposedConfig, method_names
    from .embeddings import ImageEmbeddings, compress_images, embed_prompt, load_embeddings, visual_token_counts


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(".api", __name__), name)
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'globalcom2' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_API) + list(_LAZY))


__all__ = [
    "GlobalCom2Config", "FasterVLMConfig", "RandomConfig", "PoolingConfig", "LAYOUTS", "__version__", *_API, *_LAZY,
]
