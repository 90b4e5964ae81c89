"""Model-family adapters: one small module per family, found through a registry.

An adapter knows how to (1) run a family's vision side while capturing the [CLS] logits,
(2) hand compressed features to its language model, and (3) patch/unpatch one model instance.
"""

from __future__ import annotations

from .base import Adapter, adapter_for, register_adapter, supported_model_names
from .llava_next import LlavaNextAdapter

register_adapter(LlavaNextAdapter)

__all__ = ["Adapter", "LlavaNextAdapter", "adapter_for", "register_adapter", "supported_model_names"]

