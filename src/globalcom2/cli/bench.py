"""``globalcom2 bench``: vanilla vs the methods at each retention ratio, measured side by side in
one process (see :mod:`globalcom2.bench`)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from ..generation import build_prompt, to_model
from . import arguments, loading
from .arguments import (
    FORMAT_CHOICES,
    LAYOUT_CHOICES,
    add_device_arguments,
    add_method_arguments,
    add_visual_tokens_argument,
    check_positive,
    device_and_dtype,
    method_settings,
    need_matplotlib,
    parse_budget,
)
from .loading import BUILTIN_MODELS_HELP, EXAMPLE_MODEL, TINY_MODEL, WIDE_MODEL, builtin_model, load_image
from .output import PROG, CLIError, cannot_write, echo, one_line, output_file, para, status


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` command to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    bench = subparsers.add_parser(
        "bench",
        help="measure vanilla vs GlobalCom2 (and baselines): prefill, LM prefill, decode, memory, KV cache, tokens",
        description=para(
            "Run the vanilla model and GlobalCom2 (or any --method, several for a comparison table) at each "
            "retention ratio side by side in one process on the same inputs, with the same calls, and report: "
            "prefill latency (one forward with logits for the last position only, as generate's first step), "
            "the language model's part of it (LM prefill) next to its analytic FLOPs ratio (globalcom2 "
            "efficiency's LLM-Viewer model, for the token counts each decoder layer received), vision-encoder "
            "and compression-step time, end-to-end generate latency, decode time per generated token after "
            "the prefill (read at every step of the same generate runs), peak memory above the loaded weights "
            "(CUDA max allocated minus the allocation after loading; on CPU the peak RSS minus the RSS after "
            "loading), KV-cache size and visual tokens, with ratios to vanilla. The calls run in your grad mode "
            "(autograd on, as a plain model(...) call; generate always runs without a graph): --no-grad runs "
            "them under torch.no_grad(). The settings run interleaved round-robin (each round runs every setting "
            "once), warm-up rounds are excluded, CUDA is synchronised before every clock read; medians of --runs "
            "rounds with their spread, ratios as medians of per-round ratios; vision and compression times are "
            "read inside the same timed prefill. The default model is the tiny random demo model (offline); "
            "--model wide-random measures real widths offline; pass a checkpoint for real numbers."
        ),
        epilog=(
            "examples:\n  globalcom2 bench                                   # tiny random model, shipped sample image\n"
            f"  globalcom2 bench --model {EXAMPLE_MODEL} --image photo.jpg --ratios 0.5,0.25,0.1 --plot bench.png\n"
            "  globalcom2 bench --method globalcom2,fastervlm,fastv,pooling --ratios 0.25\n"
            "  globalcom2 bench --model wide-random:2 --dtype bfloat16 --no-grad --ratios 0.25 --runs 1 --max-new-tokens 4"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("--model", default=TINY_MODEL, metavar="ID_OR_PATH",
                       help=f"a built-in random model: {BUILTIN_MODELS_HELP}; or a hub id or a checkpoint directory "
                            "(default: tiny)")
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
    bench.add_argument("--no-grad", action="store_true",
                       help="run every measured call under torch.no_grad() (default: in the caller's grad mode, "
                            "autograd on, as a plain model(...) call runs; generate has its own no_grad either way)")
    bench.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                       help="what times are read on: wall (time.perf_counter) or cpu (the process's CPU time, "
                            "all threads: on a shared CPU it leaves out the time other processes hold the cores) "
                            "(default: wall)")
    add_device_arguments(bench, "auto: cuda when available (default: auto)")
    bench.add_argument("--format", choices=FORMAT_CHOICES, default="table", help="output format (default: table)")
    bench.add_argument("--plot", default=None, metavar="OUT.png", help="also write a PNG of latency and tokens vs ratio")
    bench.set_defaults(func=run)
    return bench


def run(args: argparse.Namespace) -> int:
    """Execute ``globalcom2 bench`` (raises :class:`CLIError` on bad input)."""
    from ..efficiency import format_rows

    loading.check_model(args.model, "bench")  # no torch yet: a mistyped --model ends here at once
    ratios = parse_budget(args, "--ratios", args.model)
    for name in ("batch_size", "max_new_tokens", "runs"):
        check_positive("--" + name.replace("_", "-"), getattr(args, name))
    if args.warmup < 0:
        raise CLIError(f"--warmup must be >= 0, got {args.warmup}")
    methods, options, settings = method_settings(args, ratios, "--ratios")
    arguments.check_prompt(args.prompt, "--prompt")
    if args.plot is not None:
        need_matplotlib("--plot")
        output_file(args.plot, "--plot")
    from ..demo import sample_image_path

    sources = args.image or [str(sample_image_path())]
    images = [load_image(src) for src in sources]
    device, dtype = device_and_dtype(args)

    import torch

    from ..bench import BENCH_COLUMNS, BENCH_CSV_COLUMNS, plot_rows, run_bench

    model, processor = loading.get_model(args.model, device, dtype, settings=settings)
    arguments.check_prompt(args.prompt, "--prompt", getattr(processor, "image_token", None))

    batch_images = [images[i % len(images)] for i in range(max(args.batch_size, len(images)))]
    text = build_prompt(processor, args.prompt)
    tok = getattr(processor, "tokenizer", None)
    if tok is not None:
        tok.padding_side = "left"
    try:
        inputs = processor(images=[[im] for im in batch_images], text=[text] * len(batch_images), return_tensors="pt", padding=True)
    except Exception as e:
        raise CLIError(f"the processor failed on these images/prompt: {one_line(str(e))}") from None
    inputs = to_model(inputs, model)

    from tqdm import tqdm

    def progress(items: Any) -> Any:
        return tqdm(items, desc=f"{PROG} bench (interleaved rounds)", unit="round", file=sys.stderr, leave=False)

    grad = "torch.no_grad()" if args.no_grad else "grad mode on"
    status(
        f"{PROG}: bench on {args.model} ({str(model.dtype).replace('torch.', '')} on {device}), "
        f"{len(batch_images)} prompt(s), {args.max_new_tokens} new tokens, {args.runs} runs + {args.warmup} warm-up, {grad}"
    )
    try:
        rows = run_bench(model, dict(inputs), ratios, max_new_tokens=args.max_new_tokens, runs=args.runs,
                         warmup=args.warmup, progress=progress, methods=methods, options=options,
                         no_grad=args.no_grad, clock=args.clock)
    except ValueError as e:  # e.g. FastV on an attention implementation it cannot mask
        raise CLIError(one_line(str(e))) from None
    except (torch.cuda.OutOfMemoryError, MemoryError) as e:
        hint = "" if args.no_grad else "; the calls run with autograd on by default (their graphs count): try --no-grad"
        raise CLIError(f"out of memory while measuring ({one_line(str(e)) or type(e).__name__}){hint}") from None
    data = [r.to_dict() for r in rows]
    builtin = builtin_model(args.model)
    note = None
    if builtin is not None:
        if builtin[0] == TINY_MODEL:
            note = "tiny random demo model: timings show the pipeline's overheads, not a real model's speed-up."
        else:
            layers = model.config.text_config.num_hidden_layers
            note = (f"{WIDE_MODEL}: random weights at real widths (CLIP ViT-L/14-336 + Vicuna-7B-wide LM with "
                    f"{layers} of 32 layers): times and memory are real sizes', answers are noise.")
    if args.format == "table" and note is not None:
        echo(f"NOTE: {note}")
    if args.format == "json":  # no NaN in JSON: an unmeasurable figure (decode with 1 new token) is null
        data = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in data]
    echo(format_rows(data, BENCH_CSV_COLUMNS if args.format == "csv" else BENCH_COLUMNS, args.format))
    if args.format == "table":
        memory = "CUDA max allocated" if str(device).startswith("cuda") else "peak RSS"
        echo(f"+MiB: {memory} above the {rows[0].baseline_mib:.0f} MiB in use after loading; x LM FLOPs: analytic "
             f"(LLM-Viewer); {'torch.no_grad()' if args.no_grad else 'grad mode on (--no-grad to turn it off)'}; "
             f"decode: per new token after the prefill ({args.max_new_tokens} generated); {args.clock} clock, "
             f"median of {args.runs} interleaved round(s), ±%: half the range.")
    if args.plot is not None:
        try:
            plot_rows(rows, str(Path(args.plot).expanduser()), title=_plot_title(args, model, device), note=note)
        except OSError as e:
            raise cannot_write(args.plot, e) from None
        status(f"{PROG}: plot written to {args.plot}")
    return 0


def _plot_title(args: argparse.Namespace, model: Any, device: str) -> str:
    """What the plot shows: the model, its dtype and device, the runs behind each median, the grad mode."""
    dtype = str(model.dtype).replace("torch.", "")
    images = len(args.image or [None])
    return (f"globalcom2 bench: {args.model} ({dtype} on {device}), median of {args.runs} run(s) (settings "
            f"interleaved, {args.clock} clock) after "
            f"{args.warmup} warm-up, batch {max(args.batch_size, images)}, {args.max_new_tokens} new tokens, "
            f"{'no_grad' if args.no_grad else 'grad mode on'}")
