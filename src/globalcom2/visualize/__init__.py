"""Pictures of what GlobalCom2 keeps, and why (matplotlib).

For one image and one or more retention ratios, :func:`visualize` draws, one row per ratio, the
thumbnail and the crop grid the way the model sees them (the processor's resizing, padding shown
hatched), with the kept tokens as they are and the dropped ones dimmed; every crop is labelled with
its retention ratio ``r_j`` and kept/unpadded counts, the thumbnail with its own. With
``heatmaps=True`` a last section shows the [CLS] importance maps that drove the decision: the
thumbnail's (global), the thumbnail's resized onto the crops' unpadded area (global guidance per
crop), the crops' own (local), and the combined score. Those maps depend neither on the ratio nor
on the prompt, so they are drawn once.

The package: :mod:`.data` (masks and importance maps from the plans, FastV's masks, the result
dataclasses), :mod:`.pixels` (the model's views with kept, dropped and padded tokens), :mod:`.draw`
(the figure, part by part), :mod:`.sheet` (text measurement, placement in inches) and
:mod:`.style` (colours, sizes, method names).

The image is encoded once; every ratio reuses the same features and importance. The model is left
exactly as it was (patched or not, with the same settings). Only matplotlib's object-oriented API is
used: no pyplot state, no backend switch, nothing is shown.

>>> vis = visualize(model, processor, image, retention_ratios=(0.5, 0.25, 0.1), heatmaps=True)  # doctest: +SKIP
>>> vis.save("kept.png"); vis.masks[1].crop_kept.sum()                                         # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .._extras import install_hint
from .._io import to_rgb
from ..methods import GlobalCom2Config
from .data import ImportanceMaps, RatioMasks, Visualization, _fastv_masks, _importance_maps, _masks
from .draw import _draw, _subtitle
from .pixels import _model_views
from .style import RANDOM_WEIGHTS_NOTE, method_title

# Re-exported: tests and callers import these from globalcom2.visualize.
from .data import _to_grid, _vanilla_plan  # noqa: F401
from .pixels import _grey_out, _kept_pixels  # noqa: F401

__all__ = ["RatioMasks", "ImportanceMaps", "Visualization", "visualize", "RANDOM_WEIGHTS_NOTE"]

PLOT_HINT = f"pictures need matplotlib: {install_hint('plot')}"


def visualize(
    model: Any,
    processor: Any,
    image: Any,
    retention_ratios: Sequence[float] = (0.25,),
    layout: str | None = None,
    heatmaps: bool = False,
    title: str | None = None,
    prompt: str | None = None,
    model_name: str | None = None,
    random_weights: bool = False,
    temperature: float | None = None,
    method: str = "globalcom2",
    options: dict[str, Any] | None = None,
) -> Visualization:
    """Draw what a method (GlobalCom2 by default) keeps of ``image`` at each retention ratio.

    Args:
        model: a LLaVA-NeXT model (patched by :func:`globalcom2.apply` or not; left exactly as it was).
        processor: its processor.
        image: a PIL image.
        retention_ratios: one row per ratio (each ``0 < R <= 1``).
        layout: layout of the selection methods (default: the method's own); it changes only the
            token counts, not which tokens are kept.
        heatmaps: add the [CLS] importance maps behind GlobalCom2's decisions.
        title: figure title (default: "<method>: kept visual tokens at R = ...").
        prompt: a question about the image, shown under the title. Vision-side methods do not
            depend on it; FastV does (its last token ranks the visual tokens), so with FastV the
            prompt is sent through the model (default ``"Describe the image."``).
        model_name: how to name the model (default: its ``name_or_path``, else its class).
        random_weights: mark the figure as made with a random-weights model (the tiny demo model).
        temperature: tau of GlobalCom2's crop budgets.
        method: any name of :func:`globalcom2.methods.method_names`. For FastV (alone or composed)
            a token counts as kept when it is still in the sequence after layer K.
        options: further method options (e.g. ``{"allocation": "uniform"}``, ``{"seed": 1}``).

    Returns:
        A :class:`Visualization` with the matplotlib figure, per-ratio masks and the importance maps.

    Raises:
        ValueError: a bad ratio, option or method, or an unsupported model.
        RuntimeError: matplotlib is not installed.
    """
    try:
        import matplotlib  # noqa: F401  (the object-oriented API only: no pyplot, no backend switch)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(PLOT_HINT) from exc
    from ..methods import vision_config

    retention_ratios, family, configs = _configs(model, method, retention_ratios, options, layout, temperature)
    method = configs[0].method
    vcfgs = [vision_config(c) for c in configs]
    shown_layout = _shown_layout(vcfgs[0])
    # A fresh, never-patched adapter used for encode/compress only: the model's own state (applied or
    # not, its config, its adapter's `.last`) is not touched.
    guide_cfg = family.with_default_layout(GlobalCom2Config())
    adapter = family(model, guide_cfg)
    adapter.validate()
    image = to_rgb(image)  # 16-bit and float images keep their range
    guide, plans, encoded = _compress_views(model, processor, image, family, adapter, guide_cfg, vcfgs)
    geom = encoded.geometries[0]
    view, side = adapter.view_geometry()
    masks = _ratio_masks(model, processor, image, prompt, adapter, configs, plans, guide, encoded, side)
    maps = _importance_maps(guide, encoded.importance[0][1:])
    thumb_px, canvas_px, lay = adapter.picture_views(image, geom, view)

    name = model_name or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    ratios = ", ".join(f"{r:g}" for r in retention_ratios)
    subtitle = _subtitle(name, (image.width, image.height), geom, lay, view)
    fig, notes = _draw(
        thumb_px=thumb_px, canvas_px=canvas_px, lay=lay, geom=geom, masks=masks, maps=maps, heatmaps=heatmaps,
        view=view, cell=view // side, side=side,
        title=title or f"{method_title(method)}: kept visual tokens at R = {ratios}", subtitle=subtitle, prompt=prompt, random_weights=random_weights, layout=shown_layout, method=method,
    )
    return Visualization(fig, masks, maps, geom, (image.height, image.width), shown_layout, notes, method)


def _configs(
    model: Any,
    method: str,
    retention_ratios: float | Sequence[float],
    options: dict[str, Any] | None,
    layout: str | None,
    temperature: float | None,
) -> tuple[list[float], Any, list[Any]]:
    """(the ratios as a list, the model's family, the method's config at each ratio): ``options``
    plus ``layout`` and ``temperature`` where given and the method has them; without a layout, the
    family's default where the method's is not available on it (as :func:`globalcom2.apply` does).
    ValueError for no ratio, a bad ratio or option, or an unsupported model."""
    from ..methods import make_config, option_names
    from ..models import family_for

    ratios = [retention_ratios] if isinstance(retention_ratios, (int, float)) else list(retention_ratios)
    if not ratios:
        raise ValueError("retention_ratios must hold at least one ratio")
    opts = dict(options or {})
    for key, value in (("layout", layout), ("temperature", temperature)):
        if value is not None and key in option_names(method):
            opts[key] = value
    family = family_for(model)
    configs = [make_config(method, retention_ratio=r, **opts) for r in ratios]
    if "layout" not in opts:
        configs = [family.with_default_layout(c) for c in configs]
    return ratios, family, configs


def _shown_layout(vcfg: Any) -> str:
    """The layout the token counts are for: the vision config's, ``"pooled"`` for a method without
    layouts (pooling), ``"vanilla"`` for none (FastV alone)."""
    if vcfg is None:
        return "vanilla"
    return vcfg.layout if hasattr(vcfg, "layout") else "pooled"


def _ratio_masks(
    model: Any, processor: Any, image: Any, prompt: str | None, adapter: Any, configs: Sequence[Any],
    plans: Sequence[Any], guide: Any, encoded: Any, side: int,
) -> list[RatioMasks]:
    """The kept / dropped masks of each config (with its vision ``plans``, None where it has
    none), ``side`` tokens per side of a view. With FastV a token is kept when still in the
    sequence after layer K: ``prompt`` (default "Describe the image.") is sent through the model;
    otherwise the plans say."""
    from ..methods import fastv_config

    vanilla = encoded.vanilla_counts[0]
    if fastv_config(configs[0]) is not None:
        return [
            _fastv_masks(model, processor, image, prompt or "Describe the image.", cfg, plan, guide, vanilla,
                         vanilla_plan=adapter.vanilla_plan(encoded))
            for cfg, plan in zip(configs, plans)
        ]
    return [_masks(p, cfg.retention_ratio, vanilla, side) for p, cfg in zip(plans, configs)]


def _compress_views(
    model: Any, processor: Any, image: Any, family: Any, adapter: Any, guide_cfg: Any, vcfgs: Sequence[Any]
) -> tuple[Any, list[Any], Any]:
    """Encode the RGB ``image`` once per importance signal the configs ask for and compress it
    with ``adapter`` (never applied: the model is not touched).

    Returns (GlobalCom2's plan under ``guide_cfg``, whose signals the importance maps show; the
    plan of each vision config of ``vcfgs``, None where a method has none; the encoding of the
    first vision config, GlobalCom2's when it has none)."""
    image_token = getattr(processor, "image_token", None) or "<image>"
    inputs = processor(images=[image], text=[image_token], return_tensors="pt")
    param = next(adapter.vision_tower().parameters())
    pixel_values = inputs[family.pixel_inputs].to(device=param.device, dtype=param.dtype)
    encodings: dict[str, Any] = {}

    def encoded_for(cfg: Any) -> Any:
        """The images encoded with the importance signal ``cfg`` asks for (one encoding per signal:
        a method that asks for another signal than GlobalCom2's default gets its own)."""
        key = str(getattr(cfg, "importance", "auto"))
        if key not in encodings:
            encoder = family(model, cfg)
            encoder.validate()
            encodings[key] = encoder.encode_inputs({**inputs, family.pixel_inputs: pixel_values})
        return encodings[key]

    with torch.no_grad():
        guide_encoded = encoded_for(guide_cfg)
        guide = adapter.compress(guide_encoded, guide_cfg).plans[0]
        plans = [adapter.compress(encoded_for(v), v).plans[0] if v is not None else None for v in vcfgs]
        encoded = encoded_for(vcfgs[0]) if vcfgs[0] is not None else guide_encoded
    return guide, plans, encoded
