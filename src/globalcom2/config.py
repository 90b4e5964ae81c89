"""The method configs and their validators, under the names of 0.1.

Each method's config now lives with its algorithm in ``globalcom2/methods/<name>.py`` and the
validated-config base in :mod:`globalcom2.core.config`; this module re-exports them (importing it
loads neither torch nor numpy).
"""

from __future__ import annotations

from .core.config import (  # noqa: F401
    LAYOUTS, Layout, MethodConfig, check_choice, check_int, check_positive, check_ratio, check_real, describe,
)
from .methods.fastervlm import FasterVLMConfig
from .methods.globalcom2 import ALLOCATIONS, SCORINGS, GlobalCom2Config
from .methods.pooling import PoolingConfig
from .methods.random import RandomConfig

__all__ = [
    "ALLOCATIONS", "LAYOUTS", "SCORINGS", "FasterVLMConfig", "GlobalCom2Config", "MethodConfig", "PoolingConfig",
    "RandomConfig",
]
