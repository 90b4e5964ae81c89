"""GlobalCom2: training-free visual-token compression for high-resolution VLMs (arXiv 2501.05179).

>>> import globalcom2
>>> globalcom2.apply(model, retention_ratio=0.25)   # doctest: +SKIP
>>> model.generate(**inputs)                          # doctest: +SKIP
>>> globalcom2.remove(model)                          # doctest: +SKIP
"""

from .api import apply, compressed, get_adapter, get_config, is_applied, remove
from .config import LAYOUTS, GlobalCom2Config

__version__ = "0.1.0"

__all__ = [
    "GlobalCom2Config",
    "LAYOUTS",
    "apply",
    "compressed",
    "get_adapter",
    "get_config",
    "is_applied",
    "remove",
    "__version__",
]
