"""Kept for code written against 0.1: see :mod:`globalcom2.core.sequence`."""

from __future__ import annotations

from .core.sequence import IGNORE_INDEX, ShrunkInputs, infer_padding_side, shrink_placeholders  # noqa: F401
