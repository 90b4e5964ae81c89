"""``globalcom2 demo``: GlobalCom2 fully offline, on the shipped sample image and a family's tiny
random model (LLaVA-NeXT unless ``--family`` says otherwise; see :mod:`globalcom2.demo`)."""

from __future__ import annotations

import argparse
from typing import Any

from .loading import load_image, quiet_transformers
from .output import CLIError, cannot_write, echo, output_dir


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``demo`` command to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    demo = subparsers.add_parser(
        "demo",
        help="offline demo on a shipped sample image with a tiny random model (writes PNGs)",
        description=(
            "Run GlobalCom2 fully offline on the sample image shipped with the package, with a tiny "
            "model of a family built in code (LLaVA-NeXT unless --family; real geometry, RANDOM weights: which tokens are kept is "
            "meaningless, the counts and crop budgets are real). Prints the visual-token counts "
            "before and after for several retention ratios and every layout the family has, the per-crop retention "
            "ratios, and writes pictures of the kept tokens."
        ),
    )
    demo.add_argument(
        "--output-dir", default="globalcom2-demo", metavar="DIR",
        help="where the PNG pictures and summary.json go (created; default: ./globalcom2-demo)",
    )
    demo.add_argument(
        "--image", default=None, metavar="PATH",
        help="use this image file instead of the shipped sample (still the tiny random model)",
    )
    demo.add_argument(
        "--ratios", default="1.0,0.5,0.25,0.1", metavar="R[,R...]",
        help="comma-separated retention ratios to show (default: 1.0,0.5,0.25,0.1)",
    )
    from ..models import supported_model_types

    demo.add_argument(
        "--family", default="llava_next", choices=supported_model_types(), metavar="MODEL_TYPE",
        help=f"whose tiny random model runs: {', '.join(supported_model_types())} (default: llava_next)",
    )
    demo.set_defaults(func=run)
    return demo


def run(args: argparse.Namespace) -> int:
    """Execute ``globalcom2 demo`` (raises :class:`CLIError` on bad input)."""
    from ..methods import GlobalCom2Config

    try:
        ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        raise CLIError(f"--ratios: expected comma-separated numbers, got {args.ratios!r}") from None
    for r in ratios:
        try:
            GlobalCom2Config(retention_ratio=r)
        except ValueError as e:
            raise CLIError(f"--ratios: {e}") from None
    if not ratios:
        raise CLIError("--ratios: give at least one retention ratio")
    if args.image is not None:
        load_image(args.image)  # a clear error for a missing or unreadable file
    out_dir = output_dir(args.output_dir, "--output-dir")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"cannot create output directory {args.output_dir}: {e.strerror or e}") from None

    from ..demo import run_demo

    try:
        with quiet_transformers():
            run_demo(out_dir, image=args.image, ratios=ratios, echo=echo, model_type=args.family)
    except OSError as e:
        raise cannot_write(f"to {args.output_dir}", e) from None
    return 0
