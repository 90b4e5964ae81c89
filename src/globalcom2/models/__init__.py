"""Model families: one module per family, registered by ``@register_family`` when imported below.

A family module (``globalcom2/models/<family>.py``) subclasses :class:`~.base.Family` with what is
specific to it (how to encode views and read the importance signal, the view geometry, the token
layout, its placeholder count, loading, its tiny test model's geometry, what pictures draw); everything
generic lives in :mod:`.base`. The CLI, bench, visualize, efficiency, eval and the lmms-eval plugin
ask this registry, never a family by name. Importing it loads neither torch nor transformers.
"""

from __future__ import annotations

from .base import (
    STATE_ATTR, Family, TinyGeometry, describe_supported, families, family_for, family_for_model_type, register_family,
    supported_model_names, supported_model_types,
)
from .images import CompressedImages, CompressionStats, EncodedImages

# The registry: one line per family.
from .llava_next import LlavaNextFamily  # noqa: E402
from .llava_onevision import LlavaOnevisionFamily  # noqa: E402
from .internvl import InternVLFamily  # noqa: E402
from .idefics3 import Idefics3Family, SmolVLMFamily  # noqa: E402
from .llama4 import Llama4Family  # noqa: E402
from .phi4_multimodal import Phi4MultimodalFamily  # noqa: E402
from .aya_vision import AyaVisionFamily, Cohere2VisionFamily  # noqa: E402

__all__ = [
    "STATE_ATTR", "CompressedImages", "CompressionStats", "EncodedImages", "Family", "LlavaNextFamily", "TinyGeometry",
    "describe_supported", "families", "family_for", "family_for_model_type", "register_family",
    "supported_model_names", "supported_model_types",
]
