"""Serving benchmark of GlobalCom2 inside vLLM (issue 24): requests/s, output tokens/s and time to
first token (TTFT), vanilla vs retention ratios, at several concurrencies, in one run.

    python benchmarks/serving.py [--size medium|wide|tiny] [--ratios 0.25 0.1] [--concurrency 1 4 16]
                                 [--requests N] [--max-tokens 16] [--image 672x672] [--json out.json]

Needs vLLM in the environment (the vLLM venv of .ci/run). The model is a random LLaVA-NeXT built in
code and saved to a temporary folder (no download): ``tiny`` (the tests' widths), ``medium``
(CLIP-L geometry, widths 256 / 1024, head_dim 64, 4 + 4 layers: what a 2-core CPU serves in minutes)
or ``wide`` (llava-v1.6-vicuna-7b's widths, CLIP-L/336 with its 24 layers, 2 language layers:
about 0.7 B parameters, slow on a CPU). Every request is one image of ``--image`` size (the same
picture content varies per request, so that no cache serves it) and a short question; greedy,
``--max-tokens`` new tokens, EOS ignored. Two engines run one after the other: vanilla, then
GlobalCom2 (engine R = the first ratio, the others per request through ``mm_processor_kwargs``).

A request's TTFT is measured from its submission to its first streamed token, with ``AsyncLLM``
in this process; concurrency C means at most C requests in flight (a semaphore), ``max_num_seqs``
at least C. What a CPU number can tell: how much less work the engine does per request (prefill
tokens, KV cache) and the order of the gain; what it cannot: GPU timings (kernels, batching and the
vision tower's share differ; on a GPU the tower and the prefill are far cheaper relative to the
CPU's, and memory bandwidth, not FLOPs, bounds decoding).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

SIZES = {
    "tiny": None,
    "medium": dict(
        vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, projection_dim=256),
        text=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                  num_key_value_heads=16, max_position_embeddings=8192),
    ),
}


def build_checkpoint(size: str, folder: str) -> str:
    from globalcom2.integrations.vllm import checkpoints

    if size == "tiny":
        return str(checkpoints.save_tiny("llava_next", folder)[0])
    if size == "wide":
        return str(checkpoints.save_tiny("llava_next", folder, wide_layers=2, text={})[0])
    from globalcom2.tiny import build_tiny

    spec = SIZES[size]
    model, processor = build_tiny("llava_next", seed=0, vision=spec["vision"], text=spec["text"])
    return str(checkpoints.save(model, processor, folder))


def make_image(h: int, w: int, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


async def run_setting(engine, images, ratio, concurrency, max_tokens, tag):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    sem = asyncio.Semaphore(concurrency)
    ttfts, outs, prompt_lens = [], [], []

    async def one(i, image):
        req = {"prompt": "USER: <image>\nDescribe the picture. ASSISTANT:", "multi_modal_data": {"image": image}}
        if ratio is not None:
            req["mm_processor_kwargs"] = {"retention_ratio": ratio}
        async with sem:
            start = time.perf_counter()
            first = None
            final = None
            async for out in engine.generate(req, params, request_id=f"{tag}-{i}"):
                if first is None and out.outputs and out.outputs[0].token_ids:
                    first = time.perf_counter() - start
                final = out
            ttfts.append(first)
            outs.append(len(final.outputs[0].token_ids))
            prompt_lens.append(len(final.prompt_token_ids))

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i, im) for i, im in enumerate(images)))
    wall = time.perf_counter() - t0
    return {
        "requests": len(images), "concurrency": concurrency, "wall_s": wall,
        "requests_per_s": len(images) / wall, "output_tokens_per_s": sum(outs) / wall,
        "ttft_mean_s": statistics.mean(ttfts), "ttft_p50_s": statistics.median(ttfts),
        "prompt_tokens": statistics.mean(prompt_lens),
    }


async def bench_engine(path, overrides, settings, args, images_for):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    engine_args = AsyncEngineArgs(
        model=path, dtype=args.dtype, max_model_len=8192, enforce_eager=True, seed=0,
        max_num_seqs=max(args.concurrency), hf_overrides=overrides, enable_prefix_caching=False,
        mm_processor_cache_gb=0,
    )
    engine = AsyncLLM.from_engine_args(engine_args)
    rows = []
    try:
        for label, ratio in settings:
            await run_setting(engine, images_for("warm", 1), ratio, 1, 2, f"warm-{label}")  # warm-up
            for c in args.concurrency:
                n = max(args.requests, c)
                row = await run_setting(engine, images_for(f"{label}-{c}", n), ratio, c, args.max_tokens, f"{label}-{c}")
                row["setting"] = label
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        engine.shutdown()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "medium", "wide"], default="medium")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.1])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=8, help="requests per setting (at least the concurrency)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--image", default="672x672", help="HxW of every image")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--layout", default="spatial")
    parser.add_argument("--json", default=None, help="write every row to this file")
    args = parser.parse_args(argv)
    h, w = (int(v) for v in args.image.lower().split("x"))
    counter = iter(range(10**9))

    def images_for(_tag, n):
        return [make_image(h, w, next(counter)) for _ in range(n)]

    with tempfile.TemporaryDirectory() as folder:
        t = time.perf_counter()
        path = build_checkpoint(args.size, folder)
        print(f"checkpoint ({args.size}) built in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        rows = asyncio.run(bench_engine(path, {}, [("vanilla", None)], args, images_for))
        first = args.ratios[0]
        overrides = {"globalcom2": {"retention_ratio": first, "layout": args.layout}}
        rows += asyncio.run(bench_engine(path, overrides, [(f"R={r:g}", r) for r in args.ratios], args, images_for))
    print()
    print("| setting | concurrency | prompt tokens | requests/s | output tok/s | TTFT mean (s) | TTFT p50 (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['setting']} | {r['concurrency']} | {r['prompt_tokens']:.0f} | {r['requests_per_s']:.3f} | "
              f"{r['output_tokens_per_s']:.2f} | {r['ttft_mean_s']:.2f} | {r['ttft_p50_s']:.2f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
