"""What the families whose image is its crops (tiles) row by row and then the global view share:
InternVL, Idefics3 / SmolVLM, Llama 4 (and the next family of that shape).

* :class:`GlobalLastViews`: the methods get the views **global view first** (SPEC.md's order, with
  a no-padding :class:`~globalcom2.core.geometry.CropGeometry` of the crop grid);
  :meth:`~GlobalLastViews.compress` maps the result back to the model's order (crops row by row,
  each its kept tokens in raster order, then the global view's), so every method runs unchanged;
  ``pooling`` pools each view on its own (a view is a sequence of its own in these models).
* :class:`PerViewRuns`: for families that also give each view its own placeholder run in the
  prompt (Idefics3, Llama 4): the kept count of every view's run, from the plans or, with a count
  known from the size (``count="fixed"``), the split the grid alone gives (the planning on constant
  importance: what a count-first processor writes before the tower runs).

Mixins: list them before :class:`~globalcom2.models.base.Family` in the bases.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Sequence

from .. import methods as _methods
from .._lazy import lazy_module
from .images import CompressedImages, EncodedImages

torch = lazy_module("torch")
tiles = lazy_module("globalcom2.core.tiles")
layouts = lazy_module("globalcom2.core.layouts")
sequence = lazy_module("globalcom2.core.sequence")

if TYPE_CHECKING:
    from ..core.geometry import CropGeometry
    from ..methods.base import VisionMethodConfig


def _get(obj: Any, key: str, default: Any = None) -> Any:
    return obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)


def _pair(value: Any) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def max_tiled_tokens(config: Any, ratio: float, max_tiles: int) -> int:
    """(``max_tiles`` tiles + the global view when there is more than one tile) x tokens per view,
    a view's side being ``image_size / patch_size * ratio`` tokens (``ratio``: the pixel shuffle's,
    e.g. 0.5). ``config``: a model config or its dict, with ``vision_config.image_size`` /
    ``patch_size``."""
    vision = _get(config, "vision_config")
    size, patch = _get(vision, "image_size"), _get(vision, "patch_size")
    if size is None or patch is None:
        raise ValueError("the config has no vision_config.image_size/patch_size")
    side = int(round(_pair(size) // _pair(patch) * float(ratio)))
    return (int(max_tiles) + (1 if max_tiles > 1 else 0)) * side * side


class GlobalLastViews:
    """The model's order is crops row by row, then the global view; the methods get the global view
    first (see the module's docstring). Needs ``vision_config``, ``config``, ``display_name`` and
    ``hf_config`` (:class:`~globalcom2.models.base.Family`), and ``side``: tokens per view side
    after the family's pixel shuffle (or pooling)."""

    # -- geometry: square views of ``vision_config.image_size`` pixels -----------------------------
    @property
    def view_size(self) -> int:
        """A view's side in pixels."""
        return _pair(self.hf_config.vision_config.image_size)  # type: ignore[attr-defined]

    @property
    def patches(self) -> int:
        """P, patches per view side before the pixel shuffle."""
        vc = self.hf_config.vision_config  # type: ignore[attr-defined]
        return _pair(vc.image_size) // _pair(vc.patch_size)

    @property
    def tokens_per_view(self) -> int:
        return self.side * self.side  # type: ignore[attr-defined]

    def view_geometry(self) -> tuple[int, int]:
        """(view side in pixels, tokens per view side), e.g. InternVL's (448, 16): the token grid
        comes after the pixel shuffle, not from ``image_size / patch_size``."""
        return self.view_size, self.side  # type: ignore[attr-defined]

    def compress(self, encoded: EncodedImages, config: VisionMethodConfig | None = None, newline: Any = None) -> CompressedImages:
        """Any vision method on the global-view-first views, then the model's order (crops row by
        row, then the global view, each its kept tokens in raster order); ``pooling`` pools each
        view on its own. ``newline`` is accepted for the common signature (these models write none)."""
        cfg = config or self.vision_config  # type: ignore[attr-defined]
        if cfg is None:
            raise ValueError(f"method {self.config.method!r} has no vision-side compression")  # type: ignore[attr-defined]
        toks, plan_list = [], []
        for feats, imp, geom in zip(encoded.features, encoded.importance, encoded.geometries):
            if cfg.method == "pooling":
                t, p = self._pool_views(feats, geom, cfg.retention_ratio)
            else:
                _, p = _methods.compress_image(feats, imp, geom, None, cfg)
                if not isinstance(p, layouts.CompressionPlan):
                    raise ValueError(
                        f"method {cfg.method!r} is not supported on {self.display_name}: its plan "  # type: ignore[attr-defined]
                        f"({type(p).__name__}) has no kept tokens to put in the model's order"
                    )
                index = tiles.tiles_then_thumbnail_index(p.thumb_keep, p.crop_keep, feats.shape[1])
                p = dataclasses.replace(p, index=index, thumb_keep=torch.sort(p.thumb_keep).values, layout="spatial")
                t = layouts.gather_features(p.table if p.table is not None else feats, None, index)
            toks.append(t)
            plan_list.append(p)
        return CompressedImages(tokens=toks, plans=plan_list, vanilla_counts=encoded.vanilla_counts)

    @staticmethod
    def _pool_views(feats: "torch.Tensor", geom: CropGeometry | None, ratio: float) -> tuple["torch.Tensor", Any]:
        """Each (global-first) view of ``feats`` (V, N, D) pooled on its own, in the model's order."""
        tokens, t = tiles.pool_tiled_views(feats, ratio)
        crop_hw = (0, 0) if geom is None else (geom.grid_h * t, geom.grid_w * t)
        return tokens, _methods.PoolingPlan((t, t), crop_hw, geom, int(tokens.shape[0]), side=math.isqrt(feats.shape[1]))

    def vanilla_pack(self, encoded: EncodedImages) -> list["torch.Tensor"]:
        """The vanilla model's sequence of the same features: per image its crops, then the global
        view, flattened."""
        out = []
        for f in encoded.features:
            f = torch.cat([f[1:], f[:1]]) if f.shape[0] > 1 else f
            out.append(f.reshape(-1, f.shape[-1]))
        return out


class PerViewRuns(GlobalLastViews):
    """:class:`GlobalLastViews` for families with one placeholder run per view. A family provides
    ``tokens_per_view`` and ``side`` (tokens per view and per side), ``_grid_of(hw, processor)``
    (the (rows, cols) crop grid of one image size by the processor's rule; a product of at most 1:
    one view) and ``_processed_grids(image_inputs)`` (the grids a processor's image output
    reports); ``placeholder_runs`` stays the family's (it reads the family's prompt)."""

    # -- per-view runs ---------------------------------------------------------------------------
    def _layout(self, grids: Sequence[tuple[int, int]]) -> tuple[list[int], list[Any], int]:
        """Views, geometry (None for one view) and tokens per view of images of these crop grids."""
        grids = [tuple(int(v) for v in g) for g in grids]
        views = [1 if g[0] * g[1] <= 1 else 1 + g[0] * g[1] for g in grids]
        geoms = [None if v == 1 else tiles.full_geometry(g, self.side) for v, g in zip(views, grids)]  # type: ignore[attr-defined]
        return views, geoms, self.tokens_per_view  # type: ignore[attr-defined]

    @staticmethod
    def _plan_runs(plan: Any, views: int) -> "torch.Tensor":
        """(V,) kept tokens of each view of one plan, model order (crops, then the global view)."""
        if isinstance(plan, _methods.PoolingPlan):
            return torch.full((views,), plan.thumb_hw[0] * plan.thumb_hw[1], dtype=torch.long)
        thumb = torch.tensor([int(plan.thumb_keep.numel())], dtype=torch.long)
        crops = plan.crop_keep.reshape(views - 1, -1).sum(1).long().cpu() if views > 1 else thumb[:0]
        return torch.cat([crops, thumb])

    def _kept_runs(self, grids: Sequence[tuple[int, int]], plan_list: Sequence[Any], cfg: Any) -> list[list[int]]:
        """Per image, its views' kept counts (model order). With a count known from the size
        (``count="fixed"``), the split the grid alone gives (the planning on constant importance:
        what a count-first processor writes); else each plan's."""
        views, geoms, n = self._layout(grids)
        if cfg is not None and getattr(cfg, "fixed_count", False):
            encoded = EncodedImages(
                features=[torch.zeros((v, n, 1)) for v in views], importance=[torch.zeros((v, n), dtype=torch.float64) for v in views],
                geometries=geoms, image_sizes=[(0, 0)] * len(views), vanilla_counts=[0] * len(views),
            )
            plan_list = self.compress(encoded, cfg).plans
        runs = [self._plan_runs(p, v) for p, v in zip(plan_list, views)]
        flat = torch.cat(runs).tolist() if runs else []  # one read
        out, start = [], 0
        for v in views:
            out.append(flat[start : start + v])
            start += v
        return out

    @staticmethod
    def _plan_grids(compressed: CompressedImages) -> list[tuple[int, int]]:
        """Per image, (rows, cols) of its crops from its plan's geometry ((0, 0): one view)."""
        return [(0, 0) if getattr(p, "geometry", None) is None else (p.geometry.grid_h, p.geometry.grid_w) for p in compressed.plans]

    def image_runs(self, compressed: CompressedImages) -> Any:
        """The vanilla runs (``tokens_per_view`` each) and kept runs per image and view, from the plans alone (their grids)."""
        grids = self._plan_grids(compressed)
        views, _, n = self._layout(grids)
        kept = self._kept_runs(grids, list(compressed.plans), self.vision_config)  # type: ignore[attr-defined]
        return sequence.ViewRuns(prompt=[[n] * v for v in views], kept=kept)

    # -- counts from the size (count first) ------------------------------------------------------
    def size_layout(self, image_sizes: Any, processor: Any = None, **options: Any) -> tuple[list[int], list[Any], int]:
        """Views and geometry per image size, by the processor's rule (the family's ``_grid_of``)."""
        return self._layout([self._grid_of(hw, processor) for hw in image_sizes])  # type: ignore[attr-defined]

    def processed_layout(self, image_inputs: Any, processor: Any) -> tuple[list[int], list[Any], int]:
        """The grids the processor's image output reports (it keeps them while it writes the text)."""
        return self._layout(self._processed_grids(image_inputs))  # type: ignore[attr-defined]

    def processed_runs(self, image_inputs: Any, processor: Any, config: Any = None) -> list[list[int]]:
        """Per image of a processor's image output, the compressed count of each view's run."""
        cfg = config if config is not None else self.vision_config  # type: ignore[attr-defined]
        grids = self._processed_grids(image_inputs)  # type: ignore[attr-defined]
        return self._kept_runs(grids, [None] * len(grids), cfg)
