"""The offline demo: GlobalCom2 on a shipped sample image and a tiny random model of a family
(LLaVA-NeXT unless asked).

Nothing is downloaded. The model comes from :func:`globalcom2.tiny.build_tiny`: it has the
family's real geometry (LLaVA-NeXT: 336 px views, 24 x 24 tokens each, the llava-hf AnyRes grids)
but random weights, so the visual-token counts, the crop budgets and the whole pipeline are real while
*which* tokens are kept is meaningless.

Run it with ``globalcom2 demo`` or :func:`run_demo`.
"""

from __future__ import annotations

import json
import os
import textwrap
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

from ._io import atomic_path, to_rgb
from .methods import GlobalCom2Config

__all__ = ["DEFAULT_RATIOS", "DemoRun", "RANDOM_WEIGHTS_NOTE", "real_checkpoint_hint", "run_demo", "sample_image_path"]

#: Retention ratios the demo shows.
DEFAULT_RATIOS: tuple[float, ...] = (1.0, 0.5, 0.25, 0.1)

RANDOM_WEIGHTS_NOTE = (
    "The demo model is a tiny model with RANDOM weights, built in code (nothing is downloaded). "
    "Its importance signal is noise, so WHICH tokens it keeps is meaningless; the token counts, the "
    "crop budgets and the pipeline are real."
)

def real_checkpoint_hint(checkpoint: str) -> str:
    """The command that runs ``checkpoint`` (a hub id) on a real image, as the demo suggests it."""
    return (
        f"globalcom2 generate --model {checkpoint} --image photo.jpg \\\n"
        '    --prompt "What is in this picture?" --retention-ratio 0.25 --compare'
    )

_PROMPT = "What is in this picture?"


def sample_image_path() -> Path:
    """Path of the sample image shipped with the package (640 x 480 JPEG)."""
    return Path(str(resources.files("globalcom2") / "data" / "sample.jpg"))


@dataclass
class DemoRun:
    """What GlobalCom2 did to the demo image for one retention ratio and layout."""

    retention_ratio: float
    layout: str
    vanilla_tokens: int
    kept_tokens: int
    thumbnail_kept: int
    thumbnail_total: int
    crop_ratios: list[float]
    crop_kept: list[int]
    crop_total: list[int]

    @property
    def fraction(self) -> float:
        return self.kept_tokens / self.vanilla_tokens


def _write_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _ratio_tag(r: float) -> str:
    return f"R{r:.2f}" if round(r, 2) == r else f"R{r:g}"


def run_demo(
    output_dir: str | os.PathLike[str] = "globalcom2-demo",
    image: str | os.PathLike[str] | None = None,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    layouts: Sequence[str] | None = None,
    echo: Callable[[str], Any] = print,
    model_type: str = "llava_next",
) -> dict[str, Any]:
    """Compress one image with a family's tiny random model (default: LLaVA-NeXT) and report what
    GlobalCom2 kept.

    Prints (through ``echo``) the visual-token counts before and after for every ratio and
    layout and the per-crop retention ratios, and writes one PNG per ratio (thumbnail and crop
    grid with the kept tokens highlighted) plus ``summary.json`` to ``output_dir``.

    Args:
        output_dir: created if missing.
        image: an image file; default: the shipped sample image.
        ratios: retention ratios to show (each validated like :class:`GlobalCom2Config`).
        layouts: layouts to show ("official" and/or "spatial"); default: every layout the family has.
        echo: where the report goes, one line per call.
        model_type: the family whose tiny model runs (see :func:`globalcom2.models.supported_model_types`).

    Returns:
        A summary dict (also written as ``summary.json``): ``runs`` (one dict per ratio and
        layout, see :class:`DemoRun`), ``pictures`` (paths), ``image`` and ``grid``.
    """
    from PIL import Image

    from .models import family_for_model_type

    family = family_for_model_type(model_type)
    layouts = tuple(family.layouts if layouts is None else layouts)
    configs = [GlobalCom2Config(retention_ratio=r, layout=l) for r in ratios for l in layouts]  # validate first
    if not configs:
        raise ValueError("the demo needs at least one retention ratio and one layout")
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image_path = Path(image) if image is not None else sample_image_path()
    with Image.open(image_path) as im:
        picture = to_rgb(im)

    _echo_intro(echo, family)
    model, processor, view = _build_model(family, echo)
    inputs, placeholders = _prepare_inputs(model, processor, picture, image_path, echo)
    names = ", ".join(f"{r:g}" for r in ratios)
    echo(f"[3/4] GlobalCom2 at R = {names} (layouts: {', '.join(layouts)}) ...")
    results = _compress(model, family, inputs, configs, echo)
    runs, plans, geometry = _collect_runs(results)
    if geometry is not None:
        _echo_grid(echo, geometry, view)
    vanilla = runs[0].vanilla_tokens
    if vanilla != placeholders:  # pragma: no cover - would be a bug in the adapter
        raise RuntimeError(f"vanilla token count {vanilla} differs from the processor's {placeholders} placeholders")

    echo("[4/4] drawing the kept tokens ...")
    pictures = _draw_pictures(picture, image_path, runs, plans, family, view, configs[0], out_dir)
    echo("")
    _echo_token_table(echo, family, runs, ratios, layouts, geometry, vanilla)
    if geometry is not None:
        echo("")
        _echo_crop_table(echo, runs, plans, geometry, configs[0])

    summary = {
        "image": str(image_path),
        "image_size": {"width": picture.width, "height": picture.height},
        "grid": None if geometry is None else {"rows": geometry.grid_h, "columns": geometry.grid_w},
        "vanilla_tokens": vanilla,
        "runs": [asdict(x) for x in runs],
        "pictures": [str(p) for p in pictures],
        "note": RANDOM_WEIGHTS_NOTE,
    }
    _write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    _echo_closing(echo, family, pictures, out_dir / "summary.json")
    return summary


def _echo_intro(echo: Callable[[str], Any], family: Any) -> None:
    """The demo's banner: what the model is, and the command for a real checkpoint."""
    echo("GlobalCom2 offline demo")
    echo("=======================")
    echo(f"NOTE: {RANDOM_WEIGHTS_NOTE}")
    echo("To run a real checkpoint instead:")
    echo("    " + real_checkpoint_hint(family.example_checkpoint).replace("\n", "\n    "))
    echo("")


def _build_model(family: Any, echo: Callable[[str], Any]) -> tuple[Any, Any, int]:
    """Step 1: ``family``'s tiny random model (seed 0); returns (model, processor, pixels per
    side of one view)."""
    t0 = time.perf_counter()
    echo(f"[1/4] building the tiny random {family.display_name} (no download) ...")
    model, processor = family.build_tiny(seed=0)
    view = family(model, family.with_default_layout(GlobalCom2Config())).view_geometry()[0]
    echo(f"      done in {time.perf_counter() - t0:.1f} s")
    return model, processor, view


def _prepare_inputs(
    model: Any, processor: Any, picture: Any, image_path: Path, echo: Callable[[str], Any]
) -> tuple[Any, int]:
    """Step 2: the processor's inputs for ``picture`` and the demo prompt; returns (inputs, how
    many ``<image>`` placeholders the processor wrote)."""
    text = f"{getattr(processor, 'image_token', '<image>')}\n{_PROMPT}"
    inputs = processor(images=picture, text=text, return_tensors="pt")
    placeholders = int((inputs["input_ids"] == model.config.image_token_id).sum())
    echo(f"[2/4] image: {image_path.name} ({picture.width}x{picture.height} px, width x height); the processor wrote {placeholders:,} "
         f"<image> placeholders (prompt: {inputs['input_ids'].shape[1]:,} tokens)")
    return inputs, placeholders


def _compress(
    model: Any, family: Any, inputs: Any, configs: Sequence[GlobalCom2Config], echo: Callable[[str], Any]
) -> list[tuple[GlobalCom2Config, Any]]:
    """Step 3: one real forward pass through the patched model (the default config) shows the
    shorter sequence the language model gets; every config of ``configs`` then reuses the same
    vision features (encoding is the slow part). Returns (config, the adapter's compression
    result) per config, in order."""
    import torch

    import globalcom2

    default = family.with_default_layout(GlobalCom2Config())
    with globalcom2.compressed(model, default), torch.no_grad():
        seq_len = int(model(**inputs).logits.shape[1])
        adapter = globalcom2.get_family(model)
        forward_count = int(adapter.last.counts[0])
        encoded = adapter.encode_inputs(inputs)
        results = [(cfg, adapter.compress(encoded, cfg)) for cfg in configs]
    echo(f"      a forward pass with the default R = {default.retention_ratio:g} ({default.layout}): the language model "
         f"sees {seq_len:,} tokens instead of {inputs['input_ids'].shape[1]:,} ({forward_count:,} visual)")
    return results


def _collect_runs(results: Sequence[tuple[GlobalCom2Config, Any]]) -> tuple[list[DemoRun], dict[float, Any], Any]:
    """The :class:`DemoRun` of each (config, compression result), the first plan of each
    retention ratio (kept positions do not depend on the layout) and the crop geometry (the
    last result's; None for a single view or no result)."""
    runs: list[DemoRun] = []
    plans: dict[float, Any] = {}
    geometry = None
    for cfg, last in results:
        plan = last.plans[0]
        geometry = plan.geometry
        runs.append(
            DemoRun(
                retention_ratio=cfg.retention_ratio,
                layout=cfg.layout,
                vanilla_tokens=int(last.vanilla_counts[0]),
                kept_tokens=int(last.counts[0]),
                thumbnail_kept=int(plan.thumb_keep.numel()),
                thumbnail_total=int(plan.thumb_importance.numel()),
                crop_ratios=[float(v) for v in plan.crop_ratios.tolist()],
                crop_kept=[int(v) for v in plan.crop_keep.sum(dim=1).tolist()],
                crop_total=[int(v) for v in plan.crop_valid.sum(dim=1).tolist()],
            )
        )
        plans.setdefault(cfg.retention_ratio, plan)
    return runs, plans, geometry


def _echo_grid(echo: Callable[[str], Any], geometry: Any, view: int) -> None:
    """How the model sees the image: a thumbnail and ``geometry``'s grid of ``view`` px crops."""
    echo(f"      the image is seen as a {view}x{view} thumbnail + a {geometry.grid_h}x{geometry.grid_w} grid "
         f"(rows x columns) of {view}x{view} crops ({geometry.grid_w * view}x{geometry.grid_h * view} px best "
         "resolution, width x height)")


def _draw_pictures(
    picture: Any,
    image_path: Path,
    runs: Sequence[DemoRun],
    plans: dict[float, Any],
    family: Any,
    view: int,
    config: GlobalCom2Config,
    out_dir: Path,
) -> list[Path]:
    """Step 4: one PNG of the kept tokens per retention ratio of ``plans``
    (``out_dir/kept_tokens_R<ratio>.png``); ``config`` gives the temperature and allocation the
    pictures explain. Returns the paths, in the order of ``plans``."""
    from .picture import render_kept_tokens, save_png

    pictures = []
    for r, plan in plans.items():
        run = next(x for x in runs if x.retention_ratio == r)
        layout_counts = ", ".join(
            f"{x.kept_tokens:,} ({x.layout})" for x in runs if x.retention_ratio == r
        )
        img = render_kept_tokens(
            picture,
            plan,
            family=family,
            view=view,
            title=f"GlobalCom2 at retention ratio R = {r:g}: kept visual tokens",
            subtitle=f"{image_path.name}, {picture.width}x{picture.height} px (width x height). Visual tokens for the language model: "
            f"{layout_counts} of {run.vanilla_tokens:,} in vanilla {family.display_name} (every view, with its separators).",
            note="Demo model with RANDOM weights: the importance pattern (which tokens are kept) is meaningless; "
            "the counts and per-crop budgets follow the method exactly.",
            retention_ratio=r,
            temperature=config.temperature,
            allocation=config.allocation,
        )
        pictures.append(save_png(img, out_dir / f"kept_tokens_{_ratio_tag(r)}.png"))
    return pictures


def _echo_token_table(
    echo: Callable[[str], Any],
    family: Any,
    runs: Sequence[DemoRun],
    ratios: Sequence[float],
    layouts: Sequence[str],
    geometry: Any,
    vanilla: int,
) -> None:
    """The visual tokens handed to the language model: one row per ratio, one column per layout."""
    echo(f"Visual tokens handed to the language model (vanilla {family.display_name}: {vanilla:,})")
    header = "      R  " + "".join(f"{l:>20}" for l in layouts)
    echo(header)
    for r in ratios:
        cells = []
        for l in layouts:
            x = next(x for x in runs if x.retention_ratio == float(r) and x.layout == l)
            cells.append(f"{f'{x.kept_tokens:,} ({x.fraction:.1%})':>20}")
        echo(f"  {float(r):5.2f}  " + "".join(cells))
    if geometry is not None and len(layouts) > 1:
        echo(f"  (counts include row newlines: official writes one per row of the padded crop grid "
             f"({geometry.height}), spatial one per unpadded row ({geometry.valid_rows}).)")


def _echo_crop_table(
    echo: Callable[[str], Any],
    runs: Sequence[DemoRun],
    plans: dict[float, Any],
    geometry: Any,
    config: GlobalCom2Config,
) -> None:
    """The per-crop retention ratios and kept/unpadded tokens of each ratio of ``plans``, the rule
    that set them (``config``'s temperature and allocation), and, where R = 1 still drops crop
    tokens, why."""
    from .picture import full_ratio_note

    echo("Per-crop retention ratios r_j and kept/unpadded tokens (the same in every layout;")
    echo("crops numbered row by row, crop 1 = top-left):")
    echo("      R  " + f"{'thumbnail':>11}" + "".join(f"{f'crop {j + 1}':>17}" for j in range(geometry.num_crops)))
    for r in plans:
        x = next(x for x in runs if x.retention_ratio == r)
        cells = "".join(
            f"{f'{cr:.3f} {k}/{t}':>17}" for cr, k, t in zip(x.crop_ratios, x.crop_kept, x.crop_total)
        )
        echo(f"  {r:5.2f}  {f'{x.thumbnail_kept}/{x.thumbnail_total}':>11}{cells}")
    echo("  r_j = min(1, R * (1 + sigma_j - mean(sigma))), sigma = softmax of the thumbnail's importance summed")
    echo(f"  over each crop's region (tau = {config.temperature:g}): crops the thumbnail rates low get less than R.")
    for r in plans:
        x = next(x for x in runs if x.retention_ratio == r)
        why = full_ratio_note(r, x.crop_ratios, x.crop_kept, x.crop_total,
                              temperature=config.temperature, allocation=config.allocation)
        if why:
            echo("")
            for line in textwrap.wrap(why, width=98, initial_indent="  ", subsequent_indent="  "):
                echo(line)


def _echo_closing(echo: Callable[[str], Any], family: Any, pictures: Sequence[Path], summary_path: Path) -> None:
    """Where the pictures and the JSON went, and the random-weights reminder."""
    echo("")
    echo("Pictures of the kept tokens (bright: kept, dim: dropped, hatched: padding):")
    for p in pictures:
        echo(f"  {p}")
    echo(f"Numbers as JSON: {summary_path}")
    echo("")
    echo("Reminder: random weights, so the kept positions say nothing about what matters in the image.")
    echo("Real checkpoint: " + real_checkpoint_hint(family.example_checkpoint).replace("\\\n    ", ""))
