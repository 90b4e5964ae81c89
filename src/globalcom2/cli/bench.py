"""``globalcom2 bench``: vanilla vs the methods at each retention ratio, measured side by side in
one process (see :mod:`globalcom2.bench`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..generation import build_prompt, to_model
from . import common
from .common import (
    EXAMPLE_MODEL, FORMAT_CHOICES, LAYOUT_CHOICES, PROG, TINY_MODEL, CLIError, add_device_arguments,
    add_method_arguments, add_visual_tokens_argument, cannot_write, check_positive, device_and_dtype, echo,
    load_image, method_settings, need_matplotlib, one_line, output_file, para, parse_budget, status,
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` command to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    bench = subparsers.add_parser(
        "bench",
        help="measure vanilla vs GlobalCom2 (and baselines): latency, throughput, memory, KV cache, tokens",
        description=para(
            "Run vanilla LLaVA-NeXT and GlobalCom2 (or any --method, several for a comparison table) at each "
            "retention ratio side by side in one process on the same inputs, and report median prefill latency, vision-encoder time, compression-step "
            "time, end-to-end generate latency and throughput, peak memory (CUDA max allocated on GPU, "
            "process RSS on CPU), KV-cache size and visual tokens, with ratios to vanilla. Warm-up runs "
            "are excluded and CUDA is synchronised before every timer read. The default model is the "
            "tiny random demo model (offline); pass a checkpoint for real numbers."
        ),
        epilog=(
            "examples:\n  globalcom2 bench                                   # tiny random model, shipped sample image\n"
            f"  globalcom2 bench --model {EXAMPLE_MODEL} --image photo.jpg --ratios 0.5,0.25,0.1 --plot bench.png\n"
            "  globalcom2 bench --method globalcom2,fastervlm,fastv,pooling --ratios 0.25"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("--model", default=TINY_MODEL, metavar="ID_OR_PATH",
                       help="'tiny' (default: the built-in random demo model), a hub id or a checkpoint directory")
    bench.add_argument("--image", action="append", default=None, metavar="PATH_OR_URL",
                       help="image(s) to use, repeat for several prompts (default: the shipped sample image)")
    bench.add_argument("--prompt", default="Describe the image in detail.", metavar="TEXT", help="the prompt of every image")
    ratio_group = bench.add_mutually_exclusive_group()
    ratio_group.add_argument("--ratios", default="0.5,0.25,0.1", metavar="R[,R...]",
                             help="retention ratios to compare with vanilla (default: 0.5,0.25,0.1)")
    add_visual_tokens_argument(ratio_group, "--ratios")
    bench.add_argument("--layout", choices=LAYOUT_CHOICES, default=None,
                       help="layout of the selection methods (default: each method's own: official for globalcom2)")
    add_method_arguments(bench)
    bench.add_argument("--batch-size", type=int, default=1, metavar="B",
                       help="prompts per batch: the images are repeated up to B (default: 1)")
    bench.add_argument("--max-new-tokens", type=int, default=16, metavar="N", help="tokens generated per prompt (default: 16)")
    bench.add_argument("--runs", type=int, default=3, metavar="N", help="timed runs per measurement, median reported (default: 3)")
    bench.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed warm-up runs (default: 1)")
    add_device_arguments(bench, "auto: cuda when available (default: auto)")
    bench.add_argument("--format", choices=FORMAT_CHOICES, default="table", help="output format (default: table)")
    bench.add_argument("--plot", default=None, metavar="OUT.png", help="also write a PNG of latency and tokens vs ratio")
    bench.set_defaults(func=run)
    return bench


def run(args: argparse.Namespace) -> int:
    """Execute ``globalcom2 bench`` (raises :class:`CLIError` on bad input)."""
    from ..efficiency import format_rows

    ratios = parse_budget(args, "--ratios", args.model)
    for name in ("batch_size", "max_new_tokens", "runs"):
        check_positive("--" + name.replace("_", "-"), getattr(args, name))
    if args.warmup < 0:
        raise CLIError(f"--warmup must be >= 0, got {args.warmup}")
    methods, options, _ = method_settings(args, ratios, "--ratios")
    if args.plot is not None:
        need_matplotlib("--plot")
        output_file(args.plot, "--plot")
    from ..demo import sample_image_path

    sources = args.image or [str(sample_image_path())]
    images = [load_image(src) for src in sources]
    device, dtype = device_and_dtype(args)

    from ..bench import BENCH_COLUMNS, plot_rows, run_bench

    model, processor = common.get_model(args.model, device, dtype)

    batch_images = [images[i % len(images)] for i in range(max(args.batch_size, len(images)))]
    text = build_prompt(processor, args.prompt)
    tok = getattr(processor, "tokenizer", None)
    if tok is not None:
        tok.padding_side = "left"
    try:
        inputs = processor(images=batch_images, text=[text] * len(batch_images), return_tensors="pt", padding=True)
    except Exception as e:
        raise CLIError(f"the processor failed on these images/prompt: {one_line(str(e))}") from None
    inputs = to_model(inputs, model)

    from tqdm import tqdm

    def progress(items: Any) -> Any:
        return tqdm(items, desc=f"{PROG} bench", unit="setting", file=sys.stderr, leave=False)

    status(
        f"{PROG}: bench on {args.model} ({str(model.dtype).replace('torch.', '')} on {device}), "
        f"{len(batch_images)} prompt(s), {args.max_new_tokens} new tokens, {args.runs} runs + {args.warmup} warm-up"
    )
    try:
        rows = run_bench(model, dict(inputs), ratios, max_new_tokens=args.max_new_tokens, runs=args.runs,
                         warmup=args.warmup, progress=progress, methods=methods, options=options)
    except ValueError as e:  # e.g. FastV on an attention implementation it cannot mask
        raise CLIError(one_line(str(e))) from None
    data = [r.to_dict() for r in rows]
    if args.format == "table" and args.model == TINY_MODEL:
        echo("NOTE: tiny random demo model: timings show the pipeline's overheads, not a real model's speed-up.")
    echo(format_rows(data, BENCH_COLUMNS, args.format))
    if args.plot is not None:
        try:
            plot_rows(rows, str(Path(args.plot).expanduser()))
        except OSError as e:
            raise cannot_write(args.plot, e) from None
        status(f"{PROG}: plot written to {args.plot}")
    return 0
