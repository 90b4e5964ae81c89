"""GPU benchmark: vanilla vs GlobalCom2 on the wide random LLaVA-NeXT, bf16, in one run.

Builds ``wide-random`` (llava-v1.6-vicuna-7b's widths: CLIP ViT-L/14-336 tower, 1024 -> 4096
projector, a Vicuna-7B-wide language model with ``--text-layers`` decoder layers; random weights,
no download), makes one prompt with a ``--image-size`` image (672x672: a 2x2 crop grid, 2,928
visual tokens), and measures with :func:`globalcom2.bench.run_bench`, the settings interleaved
round-robin: prefill (and its language-model part), decode time per new token, ``generate``,
peak CUDA memory above the loaded weights, KV cache, visual tokens, each as a ratio to vanilla.

    python benchmarks/gpu_bench.py                                   # cuda, bf16, R = 0.25, 0.1
    python benchmarks/gpu_bench.py --text-layers 32 --runs 10 --json gpu.json
    python benchmarks/gpu_bench.py --model tiny --device cpu --dtype float32 --runs 1   # smoke run

Print the card (``nvidia-smi -L``) next to the numbers when you publish them.
"""

from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="wide-random", choices=["wide-random", "tiny"],
                   help="wide-random (real widths, the benchmark) or tiny (a seconds-fast smoke run)")
    p.add_argument("--text-layers", type=int, default=32, help="decoder layers of the wide model (Vicuna-7B: 32)")
    p.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--ratios", default="0.25,0.1", help="retention ratios next to vanilla (default: 0.25,0.1)")
    p.add_argument("--image-size", default="672x672", help="HxW of the image (default 672x672: a 2x2 grid)")
    p.add_argument("--batch", type=int, default=1, help="prompts per batch (default: 1)")
    p.add_argument("--runs", type=int, default=5, help="timed interleaved rounds (default: 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default: 2)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per prompt (default: 32)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every row as JSON")
    args = p.parse_args(argv)
    try:
        args.ratio_list = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        p.error(f"--ratios must be numbers separated by commas, got {args.ratios!r}")
    if not args.ratio_list or not all(0 < r <= 1 for r in args.ratio_list):
        p.error(f"--ratios must be in (0, 1], got {args.ratios!r}")
    try:
        args.hw = tuple(int(v) for v in args.image_size.lower().split("x"))
    except ValueError:
        args.hw = ()
    if len(args.hw) != 2 or min(args.hw) <= 0:
        p.error(f"--image-size must be HxW in pixels, got {args.image_size!r}")
    for name in ("text_layers", "batch", "runs", "max_new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device here (use --device cpu --model tiny for a smoke run)", file=sys.stderr)
        return 2
    from PIL import Image

    import globalcom2  # noqa: F401  (registers the families)
    from globalcom2.bench import BENCH_COLUMNS, run_bench
    from globalcom2.demo import sample_image_path
    from globalcom2.efficiency import format_rows
    from globalcom2.tiny import build_tiny_llava_next, build_wide

    dtype = getattr(torch, args.dtype)
    if args.model == "tiny":
        model, processor = build_tiny_llava_next(dtype=dtype, device=args.device)
    else:
        model, processor = build_wide(text_layers=args.text_layers, dtype=dtype, device=args.device)
    h, w = args.hw
    image = Image.open(sample_image_path()).convert("RGB").resize((w, h))
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=[image] * args.batch, text=[f"{processor.image_token}\nDescribe the image."] * args.batch,
                       return_tensors="pt", padding=True).to(args.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    rows = run_bench(model, dict(inputs), args.ratio_list, max_new_tokens=args.max_new_tokens, runs=args.runs,
                     warmup=args.warmup, no_grad=True)
    card = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else args.device
    layers = model.config.text_config.num_hidden_layers
    print(f"{args.model} ({layers} LM layers), {args.dtype} on {card}, image {h}x{w}, batch {args.batch}, "
          f"{args.runs} interleaved rounds after {args.warmup} warm-up, {args.max_new_tokens} new tokens, no_grad")
    keys = ("method", "visual_tokens", "prefill_ms", "prefill_spread", "prefill_x", "lm_prefill_ms", "lm_prefill_x",
            "lm_flops_x", "vision_ms", "compress_ms", "decode_ms_per_token", "decode_x", "generate_ms", "generate_x",
            "prefill_mem_mib", "peak_mem_mib", "kv_cache_mib", "kv_cache_x")
    columns = [c for c in BENCH_COLUMNS if c[0] in keys] + [("decode_x", "x decode", ".3f")]
    print(format_rows([r.to_dict() for r in rows], columns, "table"))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"card": card, "args": {k: v for k, v in vars(args).items() if k != "hw"},
                       "rows": [r.to_dict() for r in rows]}, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
