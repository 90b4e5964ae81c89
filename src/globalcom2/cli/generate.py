"""``globalcom2 generate``: answer a prompt about one image with a checkpoint, compressed by a
method (GlobalCom2 by default), optionally against the vanilla model (``--compare``)."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from ..generation import build_prompt, greedy_kwargs, sync, to_model
from . import arguments, loading
from .arguments import (
    add_device_arguments,
    add_method_arguments,
    add_ratio_and_layout_arguments,
    check_positive,
    device_and_dtype,
    method_settings,
)
from .loading import EXAMPLE_MODEL, load_image
from .output import PROG, CLIError, echo, one_line, para, status


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``generate`` command to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    gen = subparsers.add_parser(
        "generate",
        help="answer a prompt about an image with a checkpoint, compressed by GlobalCom2 (or --method)",
        description=para(
            "Load a checkpoint (a Hugging Face hub id or a local directory), apply "
            "GlobalCom2 and answer a prompt about one image with greedy decoding. Prints the answer "
            "and the number of visual tokens (vanilla vs kept). With --compare, the vanilla model "
            "answers too and the prefill times of both are measured."
        ),
        epilog=(
            "example:\n"
            f"  globalcom2 generate --model {EXAMPLE_MODEL} --image photo.jpg \\\n"
            '      --prompt "What is in this picture?" --retention-ratio 0.25 --compare\n\n'
            + para(f"supported: {_supported()}.")
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("--model", required=True, metavar="ID_OR_PATH", help=f"hub id or local directory (e.g. {EXAMPLE_MODEL})")
    gen.add_argument("--image", required=True, metavar="PATH_OR_URL", help="an image file, or an http(s) URL")
    gen.add_argument("--prompt", required=True, metavar="TEXT", help="the question or instruction about the image")
    add_ratio_and_layout_arguments(gen)
    add_method_arguments(gen, several=False, what="the method that compresses the image")
    gen.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="answer length limit (default: 128)")
    gen.add_argument(
        "--compare", action="store_true",
        help="also run the vanilla model; print both answers, visual-token counts and prefill times",
    )
    gen.add_argument(
        "--timing-runs", type=int, default=3, metavar="N",
        help="with --compare: prefill forward passes timed per model, the median is reported (default: 3)",
    )
    add_device_arguments(gen, "auto: cuda when available, else cpu (default: auto)")
    gen.set_defaults(func=run)
    return gen


def _printable(text: str) -> str:
    """Replace control characters (a random model emits any byte) so the terminal stays sane."""
    return "".join(ch if ch.isprintable() or ch in "\n\t" else "\ufffd" for ch in text)


def _prefill_ms(model: Any, inputs: Any, device: str, runs: int) -> float:
    """Median wall time of one forward pass over the whole prompt (image encoding included)."""
    import torch

    times = []
    with torch.no_grad():
        for _ in range(max(1, runs)):
            sync(device)
            t0 = time.perf_counter()
            model(**inputs, use_cache=False, logits_to_keep=1)
            sync(device)
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _generate(model: Any, processor: Any, inputs: Any, max_new_tokens: int) -> tuple[str, float]:
    import torch

    kwargs = greedy_kwargs(getattr(processor, "tokenizer", processor), max_new_tokens)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, **kwargs)
    seconds = time.perf_counter() - t0
    answer = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return _printable(answer.strip()), seconds


def _timings(r: dict[str, Any], runs: int) -> None:
    """The prefill (where measured) and generate lines of one model's results."""
    if "prefill_ms" in r:
        echo(f"prefill: {r['prefill_ms']:.1f} ms (median of {runs})")
    echo(f"generate: {r['generate_s']:.2f} s")


def run(args: argparse.Namespace) -> int:
    """Execute ``globalcom2 generate`` (raises :class:`CLIError` on bad input)."""
    from ..methods import fastv_config, vision_config

    # 1. Cheap checks first: arguments, the image, the model's config (no weights yet).
    _, _, planned = method_settings(args, [args.retention_ratio], "--retention-ratio", several=False)
    setting = planned[0]  # applied as apply(model, method=..., retention_ratio=..., **options): the family's default layout unless asked
    cfg = setting.config
    title = {"globalcom2": "GlobalCom2"}.get(cfg.method, cfg.method)
    check_positive("--max-new-tokens", args.max_new_tokens)
    check_positive("--timing-runs", args.timing_runs)
    arguments.check_prompt(args.prompt, "--prompt")
    image = load_image(args.image)
    loading.check_model(args.model, "generate")  # no torch yet: a mistyped --model ends here at once
    loading.check_model_type(args.model, [setting])  # its config, and the method validated on it (no weights)
    device, dtype = device_and_dtype(args)

    # 2. Load the model and processor.
    import globalcom2

    model, processor = loading.load_model(args.model, device, dtype)

    arguments.check_prompt(args.prompt, "--prompt", getattr(processor, "image_token", None))
    text = build_prompt(processor, args.prompt)
    try:
        inputs = processor(images=image, text=text, return_tensors="pt")
    except Exception as e:
        raise CLIError(f"the processor of {args.model!r} failed on this image/prompt: {one_line(str(e))}") from None
    inputs = to_model(inputs, model)

    # 3. The method.
    try:
        globalcom2.apply(model, method=setting.method, retention_ratio=setting.ratio, **setting.options)
    except (ValueError, RuntimeError) as e:
        raise CLIError(f"cannot apply {title} to {args.model!r}: {one_line(str(e))}") from None
    cfg = globalcom2.get_config(model)  # as applied (the family's default layout where none was asked for)
    vcfg = vision_config(cfg)
    settings = f"retention ratio {cfg.retention_ratio:g}" + (
        f", layout {vcfg.layout}" if vcfg is not None and hasattr(vcfg, "layout") else "")
    status(f"{PROG}: generating with {title} ({settings}) ...")
    answer, gen_s = _generate(model, processor, inputs, args.max_new_tokens)
    stats = globalcom2.last_stats(model)
    last = globalcom2.get_family(model).last
    kept, vanilla = int(stats.visual_tokens[0]), int(stats.vanilla_visual_tokens[0])
    lm_kept = None if stats.lm_visual_tokens is None else int(stats.lm_visual_tokens[0])
    plan = last.plans[0] if last is not None and vcfg is not None else None
    masks = plan.kept_masks() if plan is not None and plan.geometry is not None else None
    adapter = globalcom2.get_family(model)
    family = adapter.display_name
    grid = adapter.view_grid(inputs)

    results = {"globalcom2": {"answer": answer, "kept": kept, "vanilla": vanilla, "generate_s": gen_s}}
    if args.compare:
        status(f"{PROG}: timing the prefill with {title} ({args.timing_runs} runs) ...")
        results["globalcom2"]["prefill_ms"] = _prefill_ms(model, inputs, device, args.timing_runs)
        globalcom2.remove(model)
        status(f"{PROG}: generating with the vanilla model ...")
        v_answer, v_gen_s = _generate(model, processor, inputs, args.max_new_tokens)
        status(f"{PROG}: timing the vanilla prefill ({args.timing_runs} runs) ...")
        v_prefill = _prefill_ms(model, inputs, device, args.timing_runs)
        results["vanilla"] = {"answer": v_answer, "kept": vanilla, "vanilla": vanilla, "generate_s": v_gen_s, "prefill_ms": v_prefill}

    # 4. Report.
    dtype_name = str(model.dtype).replace("torch.", "")
    echo(f"model:   {args.model} ({dtype_name} on {device})")
    views = "1 view" if grid is None else f"thumbnail + {grid[0]}x{grid[1]} crops (rows x columns)"
    echo(f"image:   {args.image} ({image.width}x{image.height} px, width x height; {views})")
    echo(f"prompt:  {_printable(args.prompt)}")
    echo("")
    r = results["globalcom2"]
    echo(f"== {title} ({settings}) ==")
    echo(f"visual tokens: {kept:,} of {vanilla:,} ({kept / vanilla:.1%})")
    if lm_kept is not None:
        echo(f"after layer {fastv_config(cfg).layer} (FastV): {lm_kept:,} visual tokens; "
             f"layer average {stats.effective_visual_tokens[0]:,.1f}")
    if masks is not None and not masks.pooled:
        crops = ", ".join(
            f"{ratio:.2f} ({int(k)}/{int(t)})"
            for ratio, k, t in zip(masks.crop_ratios.tolist(), masks.crop.sum(1).tolist(), masks.valid.sum(1).tolist())
        )
        echo(f"per-crop retention r_j (kept/unpadded): {crops}")
    _timings(r, args.timing_runs)
    echo(f"answer: {r['answer']}")
    if args.compare:
        v = results["vanilla"]
        echo("")
        echo(f"== vanilla {family} ==")
        echo(f"visual tokens: {vanilla:,}")
        _timings(v, args.timing_runs)
        echo(f"answer: {v['answer']}")
        echo("")
        speedup = v["prefill_ms"] / r["prefill_ms"] if r["prefill_ms"] > 0 else float("inf")
        echo(
            f"summary: {title} keeps {kept:,} of {vanilla:,} visual tokens ({kept / vanilla:.1%}); "
            f"prefill {r['prefill_ms']:.1f} ms vs {v['prefill_ms']:.1f} ms ({speedup:.2f}x); "
            f"answers {'identical' if r['answer'] == v['answer'] else 'differ'}"
        )
    return 0


def _supported() -> str:
    """Every registered family's checkpoints, for the help (no torch)."""
    from ..models import families

    return "; ".join(
        f"{f.display_name} checkpoints (config model_type {f.model_type!r}), e.g. {', '.join(f.language_models) or f.example_checkpoint}"
        for f in families()
    )
