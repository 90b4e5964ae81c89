"""``globalcom2 visualize``: a figure of the kept tokens (and the attention maps behind them) for
one image (see :mod:`globalcom2.visualize`)."""

from __future__ import annotations

import argparse
from typing import Any

from . import arguments, loading
from .arguments import (
    LAYOUT_CHOICES,
    add_device_arguments,
    add_method_arguments,
    add_visual_tokens_argument,
    device_and_dtype,
    method_settings,
    need_matplotlib,
    parse_budget,
)
from .loading import EXAMPLE_MODEL, TINY_MODEL, load_image
from .output import PROG, CLIError, cannot_write, echo, one_line, output_file, para, status


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``visualize`` command to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    vis = subparsers.add_parser(
        "visualize",
        help="figure of the kept tokens (and the attention maps behind them) for an image",
        description=para(
            "Draw the thumbnail and the crop grid as the model sees them (resized onto the AnyRes "
            "canvas, padding hatched), with the tokens GlobalCom2 keeps in colour and the dropped ones "
            "greyed out, each crop labelled with its retention ratio r_j and kept/unpadded tokens, the "
            "thumbnail with its own; one row per retention ratio. With --heatmaps, the [CLS] importance "
            "maps that drove the decision are added: the thumbnail's (global), the thumbnail's resized "
            "onto the crops (global guidance), the crops' own (local) and the combined score. The image "
            "is encoded once for all ratios. The default model is the tiny random demo model (offline; "
            "the figure says its kept positions are meaningless); pass a checkpoint for a real picture."
        ),
        epilog=(
            "examples:\n  globalcom2 visualize --image photo.jpg --retention-ratio 0.5,0.25,0.1 --heatmaps\n"
            f"  globalcom2 visualize --model {EXAMPLE_MODEL} --image photo.jpg \\\n"
            '      --prompt "What is on the sign?" --output kept.png\n'
            "  globalcom2 visualize --image photo.jpg --method fastervlm --retention-ratio 0.25\n"
            "  globalcom2 visualize --image photo.jpg --method globalcom2+fastv --prompt \"What is written?\""
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    vis.add_argument("--image", required=True, metavar="PATH_OR_URL", help="an image file, or an http(s) URL")
    vis.add_argument("--model", default=TINY_MODEL, metavar="ID_OR_PATH",
                     help="'tiny' (default: the built-in random demo model), a hub id or a checkpoint directory")
    ratio_group = vis.add_mutually_exclusive_group()
    ratio_group.add_argument("--retention-ratio", default="0.25", metavar="R[,R...]",
                             help="one or more comma-separated ratios in (0, 1], one row each (default: 0.25)")
    add_visual_tokens_argument(ratio_group, "--retention-ratio")
    vis.add_argument("--layout", choices=LAYOUT_CHOICES, default=None,
                     help="layout used for the token counts (the kept tokens are the same in both; default: the "
                          "method's own, official for globalcom2)")
    add_method_arguments(vis, several=False, what="the method whose kept tokens are drawn")
    vis.add_argument("--output", default="globalcom2-visualize.png", metavar="OUT.png",
                     help="PNG to write (default: globalcom2-visualize.png)")
    vis.add_argument("--heatmaps", action="store_true", help="add the [CLS] importance maps behind the decisions")
    vis.add_argument("--prompt", default=None, metavar="TEXT",
                     help="a question about the image, shown under the title (GlobalCom2's choice does not depend on "
                          "it: the importance comes from the vision tower alone)")
    vis.add_argument("--title", default=None, metavar="TEXT", help="figure title (default: 'GlobalCom2: kept visual tokens at R = ...')")
    vis.add_argument("--dpi", type=int, default=110, metavar="N", help="resolution of the PNG (default: 110)")
    add_device_arguments(vis, "auto: cuda when available (default: auto)")
    vis.set_defaults(func=run)
    return vis


def run(args: argparse.Namespace) -> int:
    """Execute ``globalcom2 visualize`` (raises :class:`CLIError` on bad input)."""
    # 1. Cheap checks first: arguments, the output path, matplotlib, the image.
    loading.check_model(args.model, "visualize")  # no torch yet: a mistyped --model ends here at once
    ratios = parse_budget(args, "--retention-ratio", args.model)
    methods, options, settings = method_settings(args, ratios, "--retention-ratio", several=False)
    if args.prompt is not None:
        arguments.check_prompt(args.prompt, "--prompt")
    if not 20 <= args.dpi <= 600:
        raise CLIError(f"--dpi must be between 20 and 600, got {args.dpi}")
    out = output_file(args.output, "--output")
    need_matplotlib("visualize")
    image = load_image(args.image)
    device, dtype = device_and_dtype(args)

    # 2. The model ('tiny' or a checked, loaded checkpoint), then the figure.
    builtin = loading.builtin_model(args.model)  # ('tiny' | 'wide-random', layers) or None
    random_weights = builtin is not None
    label = "tiny random demo model" if args.model == TINY_MODEL else f"{args.model} (random weights)"
    if random_weights:
        status(f"{PROG}: building the {label} (no download) ...")
    model, processor = loading.get_model(args.model, device, dtype, settings=settings)
    from ..visualize import visualize

    ratio_text = ", ".join(f"{r:g}" for r in ratios)
    status(f"{PROG}: encoding the image once and compressing it at R = {ratio_text} ...")
    try:
        vis = visualize(
            model, processor, image, ratios, heatmaps=args.heatmaps, title=args.title,
            prompt=args.prompt, model_name=label if random_weights else args.model,
            random_weights=random_weights, method=methods[0], options=options,
        )
    except ValueError as e:  # an unsupported model (e.g. no [CLS] token)
        raise CLIError(f"cannot visualize with {args.model!r}: {one_line(str(e))}") from None
    status(f"{PROG}: drawing {out} ...")
    try:
        vis.save(str(out), dpi=args.dpi)
    except OSError as e:
        raise cannot_write(args.output, e) from None

    # 3. Report: the file, then one line per ratio.
    echo(f"wrote {out}")
    for m in vis.masks:
        crops = ", ".join(f"{r:.2f} ({k}/{n})" for r, k, n in zip(m.crop_ratios, m.crop_kept_counts, m.crop_valid_counts))
        echo(
            f"R={m.retention_ratio:g}: {m.num_tokens:,} of {m.vanilla_tokens:,} visual tokens "
            f"({m.num_tokens / m.vanilla_tokens:.1%}); thumbnail {m.thumb_tokens}/{m.thumb_kept.size}"
            + (f"; crops r_j (kept/unpadded): {crops}" if crops and not m.pooled else "")
            + (f"; {m.note}" if m.note else "")
        )
    for note in vis.notes:
        echo(f"note: {note}")
    if random_weights:
        echo(f"NOTE: {label}: which tokens are kept is meaningless; pass --model for a real checkpoint.")
    return 0
