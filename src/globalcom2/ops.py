"""Kept for code written against 0.1: the tensor operations now live in :mod:`globalcom2.core`
(:mod:`~globalcom2.core.geometry` and :mod:`~globalcom2.core.plans`); this module re-exports them."""

from __future__ import annotations

from .core.geometry import *  # noqa: F401,F403
from .core.geometry import crops_to_grid as _crops_to_grid, grid_to_crops as _grid_to_crops  # noqa: F401
from .core.geometry import valid_mask as _valid_mask  # noqa: F401
from .core.plans import *  # noqa: F401,F403
from .core.plans import _layout_official, _layout_spatial, crop_region_max, assemble_plan, plan_joint  # noqa: F401
from .core.plans import pool_image, pooled_side, _floor_count, _thumb_regions  # noqa: F401
