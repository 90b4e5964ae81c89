"""How much does the GlobalCom2 compression step cost next to the vision encoder, per image and per batch?

Builds a LLaVA-NeXT with random weights and real sizes (CLIP ViT-L/14-336 tower, projector to
hidden size 4096 by default; the language model is shrunk to one layer since it is not timed),
encodes one image that becomes a 2 x 2 crop grid, and times, in one run:

* the vision side (tower + projector + [CLS]-logit capture)      ``adapter.encode(...).projected()``
* GlobalCom2's compression step on those features                 ``adapter.compress``
* the projector and the step together, interleaved: every token projected then selected,
  against the selection on the projector's input with the kept rows projected (issue 28)
* vanilla LLaVA-NeXT packing (unpad + newlines) of the same ones   ``adapter.vanilla_pack``

then the compression step and the vanilla packing per image for batches of ``--batches`` images
(1, 4 and 16 by default: the encoded image repeated, as one contiguous tensor like the tower's
output; GlobalCom2 plans and gathers a batch in one pass, so its time per image should stay flat),
the aten ops the compression step dispatches per batch, *counted* (``globalcom2._opcount.OpCounter``:
all ops, and the kernels among them, i.e. the ops that are not views; on a GPU each kernel is a
launch), and the host synchronisations of one prefill with one image, vanilla vs patched, *counted* as ops
(``globalcom2._syncs.SyncCounter``: scalar reads, ``.tolist()``, data-dependent output sizes,
blocking host/device copies; what a GPU would wait for, counted on any device).

Warm-up runs are excluded, CUDA is synchronised before each timer read, and the median of
``--runs`` runs is reported (five times as many for the cheap steps); the compression step and
the vanilla packing of a batch run interleaved (one of each per round). ``--clock cpu`` reads the
process's CPU time instead of the wall clock (on a shared CPU: leaves out other processes' time).

    python benchmarks/compression_step.py                 # CPU, float32, real sizes
    python benchmarks/compression_step.py --device cuda --dtype float16
    python benchmarks/compression_step.py --tiny          # seconds-fast smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch


def build_model(tiny: bool, hidden_size: int, dtype: torch.dtype, device: str):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    from globalcom2.models.llava_next import LLAVA_NEXT_PINPOINTS
    from globalcom2.tiny import build_tiny_llava_next

    if tiny:
        return build_tiny_llava_next(dtype=dtype, device=device)[0]
    vision = CLIPVisionConfig(  # openai/clip-vit-large-patch14-336
        image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
        num_hidden_layers=24, num_attention_heads=16, projection_dim=768, hidden_act="quick_gelu",
    )
    text = LlamaConfig(  # only hidden_size matters here: the language model is not run
        hidden_size=hidden_size, intermediate_size=256, num_hidden_layers=1, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=320,
    )
    config = LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_id=319, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    return LlavaNextForConditionalGeneration(config).to(device=device, dtype=dtype).eval()


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn: Callable[[], object], device: str, runs: int, warmup: int, clock: str = "wall") -> tuple[float, object]:
    """Median time in ms over ``runs`` calls after ``warmup`` untimed ones."""
    median, out = interleaved([fn], device, runs, warmup, clock)[0]
    return median, out


def interleaved(fns: list[Callable[[], object]], device: str, runs: int, warmup: int, clock: str = "wall") -> list[tuple[float, object]]:
    """Each of ``fns`` once per round, in turn (``warmup`` untimed rounds first); per function its
    median time in ms and last output."""
    read = CLOCK[clock]
    outs: list[object] = [None] * len(fns)
    times: list[list[float]] = [[] for _ in fns]
    for r in range(warmup + runs):
        for i, fn in enumerate(fns):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = read()
            outs[i] = fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if r >= warmup:
                times[i].append((read() - t0) * 1e3)
    return [(statistics.median(t), o) for t, o in zip(times, outs)]


def repeat_encoded(encoded, images: int):
    """``encoded`` (one image) as a batch of ``images`` copies whose features and importance are
    consecutive slices of one tensor each, as the vision tower makes them."""
    from globalcom2.models import EncodedImages

    views = [encoded.features[0].shape[0]] * images
    feats = torch.cat([encoded.features[0]] * images)
    imp = torch.cat([encoded.importance[0]] * images)
    return EncodedImages(
        features=list(torch.split(feats, views)), importance=list(torch.split(imp, views)),
        geometries=encoded.geometries * images, image_sizes=encoded.image_sizes * images,
        vanilla_counts=encoded.vanilla_counts * images,
    )


def prefill_syncs(model, adapter_state: bool, pixel_values, image_sizes, placeholders: int, args) -> int:
    """Host syncs of one prefill (``forward``) with one image, counted."""
    import globalcom2
    from globalcom2._syncs import SyncCounter

    image_id = model.config.image_token_id
    ids = torch.tensor([[1] + [image_id] * placeholders + [2, 3]], device=args.device)
    if adapter_state:
        globalcom2.apply(model, retention_ratio=args.retention_ratio, layout=args.layout)
    try:
        with torch.no_grad(), SyncCounter() as syncs:
            model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values, image_sizes=image_sizes)
    finally:
        if adapter_state:
            globalcom2.remove(model)
    return syncs.count


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--hidden-size", type=int, default=4096, help="language-model hidden size (projector output)")
    p.add_argument("--image-size", default="672x672", help="HxW of the image (672x672 gives a 2x2 grid)")
    p.add_argument("--retention-ratio", type=float, default=0.25)
    p.add_argument("--layout", default="official", choices=["official", "spatial"])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batches", default="1,4,16", help="images per batch for the per-image times")
    p.add_argument("--tiny", action="store_true", help="use the tiny demo model (smoke test)")
    p.add_argument("--clock", default="wall", choices=sorted(CLOCK), help="wall clock or process CPU time")
    args = p.parse_args(argv)

    import globalcom2

    dtype = getattr(torch, args.dtype)
    h, w = (int(v) for v in args.image_size.lower().split("x"))
    batches = [int(v) for v in args.batches.split(",") if v.strip()]
    model = build_model(args.tiny, args.hidden_size, dtype, args.device)
    globalcom2.apply(model, retention_ratio=args.retention_ratio, layout=args.layout)
    adapter = globalcom2.get_family(model)
    views = adapter.num_views((h, w))
    grid = adapter.grid_shape((h, w))
    g = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(1, views, 3, 336, 336, generator=g).to(args.device, dtype)
    image_sizes = torch.tensor([[h, w]])

    from globalcom2._opcount import OpCounter

    with torch.no_grad():
        t_vision, encoded = timed(lambda: adapter.encode(pixel_values, image_sizes).projected(), args.device, args.runs,
                                  args.warmup, args.clock)
        # The projector and the step together: every token projected then selected (as before issue
        # 28), against the selection on the projector's input and the projector on the kept rows.
        lazy = adapter.encode(pixel_values, image_sizes)
        (t_project_all, _), (t_project_kept, _) = interleaved(
            [lambda: adapter.compress(lazy.projected()), lambda: adapter.compress(lazy)], args.device, args.runs,
            args.warmup, args.clock,
        )
        (t_compress, compressed), (t_pack, packed) = interleaved(
            [lambda: adapter.compress(encoded), lambda: adapter.vanilla_pack(encoded)], args.device, args.runs * 5,
            args.warmup, args.clock,
        )
        per_image, ops = [], []
        for images in batches:
            enc = repeat_encoded(encoded, images)
            (tc, _), (tp, _) = interleaved(
                [lambda: adapter.compress(enc), lambda: adapter.vanilla_pack(enc)], args.device, args.runs * 5,
                args.warmup, args.clock,
            )
            per_image.append((images, tc / images, tp / images))
            with OpCounter() as counted:
                adapter.compress(enc)
            ops.append((images, counted.total, counted.kernels))
    globalcom2.remove(model)
    placeholders = encoded.vanilla_counts[0]
    syncs_vanilla = prefill_syncs(model, False, pixel_values, image_sizes, placeholders, args)
    syncs_patched = prefill_syncs(model, True, pixel_values, image_sizes, placeholders, args)

    d = encoded.features[0].shape[-1]
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} clock={args.clock} image={h}x{w} "
          f"grid={grid[0]}x{grid[1]} views={views} hidden={d} R={args.retention_ratio} layout={args.layout}")
    print(f"visual tokens: vanilla {packed[0].shape[0]} -> GlobalCom2 {compressed.tokens[0].shape[0]}")
    print(f"{'step':<34}{'median ms':>12}{'x vision':>10}")
    for name, t in [("vision tower + projector + CLS", t_vision), ("GlobalCom2 compression step", t_compress),
                    ("vanilla packing (unpad+newline)", t_pack)]:
        print(f"{name:<34}{t:>12.3f}{t / t_vision:>10.4f}")
    print(f"projector + step (interleaved): every token projected then selected {t_project_all:.3f} ms, "
          f"the kept rows projected {t_project_kept:.3f} ms ({t_project_kept / t_project_all:.3f}x)")
    print(f"per image (ms), batches of {', '.join(str(b) for b in batches)} images (vision tower: {t_vision:.3f} per image)")
    print(f"{'images':>8}{'GlobalCom2 step':>18}{'vanilla packing':>18}")
    for images, tc, tp in per_image:
        print(f"{images:>8}{tc:>18.3f}{tp:>18.3f}")
    print("aten ops of the GlobalCom2 step per batch (counted; all / kernels): "
          + ", ".join(f"{images} image(s): {total} / {kernels}" for images, total, kernels in ops))
    print(f"host syncs per prefill (counted, one image): vanilla {syncs_vanilla}, GlobalCom2 {syncs_patched}")


if __name__ == "__main__":
    main()
