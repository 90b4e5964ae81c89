"""Kept for code written against 0.1: FastV now lives in :mod:`globalcom2.methods.fastv`."""

from __future__ import annotations

from .methods.fastv import *  # noqa: F401,F403
from .methods.fastv import FastVConfig, FastVPatch, kept_count  # noqa: F401
