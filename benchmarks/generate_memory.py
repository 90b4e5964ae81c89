"""Peak memory of ``generate`` above the loaded weights: vanilla vs a GlobalCom2-patched model.

The model is random, built in code with real widths (a CLIP-L/336 tower, a Vicuna-7B-wide
language model; layer counts are flags so it fits a CPU), used exactly as the README shows:
``model.generate(**inputs)`` with no outer ``no_grad``. Each setting runs in its own process, so
one's allocations cannot hide another's.

* CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocation after loading.
* CPU (Linux): the peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` after
  loading) minus the resident set after loading.

Also reported: memory still held after ``generate`` returns, and after a second call (a graph
kept alive by the patched model showed up there). Run::

    python benchmarks/generate_memory.py [--device cuda] [--dtype bfloat16] [--vision-layers 24]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

MIB = 1024 * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class Meter:
    def __init__(self, device: str) -> None:
        import torch

        self.torch, self.cuda = torch, device.startswith("cuda")

    def base(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            self.start = self.torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (the peak RSS) to the current RSS
            self.start = _status_kib("VmRSS") * 1024

    def peak(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
            return (self.torch.cuda.max_memory_allocated() - self.start) / MIB
        return (_status_kib("VmHWM") * 1024 - self.start) / MIB

    def held(self) -> float:
        gc.collect()
        if self.cuda:
            return (self.torch.cuda.memory_allocated() - self.start) / MIB
        return (_status_kib("VmRSS") * 1024 - self.start) / MIB


def build(args: argparse.Namespace):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    from globalcom2.models.llava_next import LLAVA_NEXT_PINPOINTS
    from globalcom2.tiny import build_processor

    processor = build_processor()
    tok = processor.tokenizer
    vision = CLIPVisionConfig(
        image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
        num_hidden_layers=args.vision_layers, num_attention_heads=16, projection_dim=768,
    )
    text = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.text_layers, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=len(tok), max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
        bos_token_id=1, eos_token_id=2,
    )
    config = LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    with torch.device(args.device):
        model = LlavaNextForConditionalGeneration(config).to(dtype).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, processor


def one(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    import globalcom2

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, processor = build(args)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (672, 672, 3), dtype=np.uint8))
    inputs = processor(images=[image], text=["USER: <image>\nWhat is in the picture? ASSISTANT:"], return_tensors="pt")
    inputs = inputs.to(args.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(getattr(torch, args.dtype))
    if args.setting == "globalcom2":
        globalcom2.apply(model, retention_ratio=args.ratio)
    meter = Meter(args.device)
    meter.base()
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    model.generate(**inputs, **kw)
    peak, held = meter.peak(), meter.held()
    model.generate(**inputs, **kw)
    return {"setting": args.setting, "peak_mib": peak, "held_mib": held, "held_after_2nd_mib": meter.held()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--vision-layers", type=int, default=4, help="CLIP-L has 24")
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--setting", choices=("vanilla", "globalcom2"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.setting:
        print(json.dumps(one(args)))
        return
    rows = []
    for setting in ("vanilla", "globalcom2"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--setting", setting]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"CLIP-L/336 ({args.vision_layers} layers) + 4096-wide LM ({args.text_layers} layers), {args.dtype} on "
          f"{args.device}, 672x672 image, R={args.ratio:g}; MiB above the loaded weights")
    print("| setting | peak | held after generate | held after a 2nd call | peak vs vanilla |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['setting']} | {r['peak_mib']:.0f} | {r['held_mib']:.0f} | {r['held_after_2nd_mib']:.0f} | "
              f"{r['peak_mib'] / max(rows[0]['peak_mib'], 1e-9):.2f}x |")


if __name__ == "__main__":
    main()
