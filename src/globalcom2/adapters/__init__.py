"""Kept for code written against 0.1: model families now live in :mod:`globalcom2.models`."""

from __future__ import annotations

from ..models import Adapter, LlavaNextAdapter, adapter_for, register_family, supported_model_names
from ..models import register_family as register_adapter  # noqa: F401

__all__ = ["Adapter", "LlavaNextAdapter", "adapter_for", "register_adapter", "supported_model_names"]
