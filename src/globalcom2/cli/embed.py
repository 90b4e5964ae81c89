"""``globalcom2 embed``: compress images once and write their visual tokens to a safetensors file,
for caching and for serving engines that take precomputed image embeddings (see
:mod:`globalcom2.embeddings`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import loading
from .arguments import (
    add_device_arguments,
    add_method_arguments,
    add_ratio_and_layout_arguments,
    check_positive,
    device_and_dtype,
    method_settings,
)
from .loading import BUILTIN_MODELS_HELP, EXAMPLE_MODEL, load_image
from .output import PROG, CLIError, cannot_write, echo, one_line, output_file, para, status

SUFFIX = ".safetensors"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``embed`` command to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    cmd = subparsers.add_parser(
        "embed",
        help="compress images and write their visual tokens to a .safetensors file (cache, serving)",
        description=para(
            "Run the vision side of a checkpoint once per image, compress it with a method (GlobalCom2 by "
            "default) and write, per image, the (n_i, D) visual tokens its language model would see (newlines "
            "included) to one safetensors file, with the method's config and the token counts in its metadata. "
            "Read it back with globalcom2.load_embeddings(FILE); feed it to the patched model "
            "(model.generate(..., image_embeddings=emb)), to the vanilla model (globalcom2.embed_prompt), or to a "
            "serving engine that takes image embeddings (README, Serving)."
        ),
        epilog=(
            "example:\n"
            f"  globalcom2 embed --model {EXAMPLE_MODEL} --image a.jpg b.png \\\n"
            "      --retention-ratio 0.25 --out images.safetensors\n\n"
            + para(
                "Tensors are named image.0, image.1, ... in the order of --image, in the model's dtype. "
                "--model tiny (a tiny random LLaVA-NeXT) works offline, for trying the format."
            )
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmd.add_argument("--model", required=True, metavar="ID_OR_PATH", help=f"hub id or local directory (e.g. {EXAMPLE_MODEL}), or a built-in random model: {BUILTIN_MODELS_HELP}")
    cmd.add_argument("--image", required=True, nargs="+", metavar="PATH_OR_URL", help="one or more image files or http(s) URLs")
    cmd.add_argument("--out", required=True, metavar="FILE.safetensors", help="the file to write (its folder must exist)")
    add_ratio_and_layout_arguments(cmd)
    add_method_arguments(cmd, several=False, what="the vision-side method that compresses the images (FastV, which "
                         "prunes inside the language model, has no image embeddings)", vision_only=True)
    cmd.add_argument(
        "--batch-size", type=int, default=1, metavar="N", help="images encoded together (default: 1)",
    )
    add_device_arguments(cmd, "auto: cuda when available, else cpu (default: auto)")
    cmd.set_defaults(func=run)
    return cmd


def run(args: argparse.Namespace) -> int:
    """Execute ``globalcom2 embed`` (raises :class:`CLIError` on bad input)."""
    from ..methods import language_config, vision_config

    # 1. Every cheap check before the model is loaded: method, images, output, model config.
    _, _, planned = method_settings(args, [args.retention_ratio], "--retention-ratio", several=False)
    setting = planned[0]  # used as compress_images(model, inputs, method=..., **options): the family's default layout
    cfg = setting.config
    if language_config(cfg) is not None:
        vision = vision_config(cfg)
        hint = f"--method {vision.method}" if vision is not None else "a vision-side method such as --method globalcom2"
        raise CLIError(
            f"--method {cfg.method}: FastV prunes inside the language model, which image embeddings cannot carry; use {hint}"
        )
    check_positive("--batch-size", args.batch_size)
    loading.check_model(args.model, "embed")  # no torch yet: a mistyped --model ends here at once
    if not str(args.out).endswith(SUFFIX):
        raise CLIError(f"--out must name a {SUFFIX} file, got {args.out!r}")
    out = output_file(args.out, "--out")
    for source in args.image:
        load_image(source)  # a clear error for a missing or unreadable image, before any loading
    device, dtype = device_and_dtype(args)

    # 2. The model, then the images in batches.
    import globalcom2

    from ..embeddings import ImageEmbeddings
    from ..generation import build_prompt, to_model

    model, processor = loading.get_model(args.model, device, dtype, settings=[setting])
    title = {"globalcom2": "GlobalCom2"}.get(cfg.method, cfg.method)
    parts: list[ImageEmbeddings] = []
    batches = [args.image[i : i + args.batch_size] for i in range(0, len(args.image), args.batch_size)]
    for batch in _progress(batches, len(args.image), f"compressing with {title}"):
        images = [load_image(source) for source in batch]
        text = [build_prompt(processor, "", 1) for _ in batch]
        try:
            inputs = processor(images=[[im] for im in images], text=text, return_tensors="pt", padding=True)  # one per prompt
        except Exception as e:
            raise CLIError(f"the processor of {args.model!r} failed on {batch[0]}: {one_line(str(e))}") from None
        try:
            parts.append(globalcom2.compress_images(model, to_model(inputs, model), method=setting.method,
                                                    retention_ratio=setting.ratio, **setting.options))
        except ValueError as e:
            raise CLIError(f"cannot compress with {title} on {args.model!r}: {one_line(str(e))}") from None
    first = parts[0]
    emb = ImageEmbeddings(
        embeddings=[t for p in parts for t in p.embeddings],
        vanilla_counts=[v for p in parts for v in p.vanilla_counts],
        config=first.config, model_type=first.model_type, image_token_id=first.image_token_id,
        model=str(args.model), images=[str(s) for s in args.image],
        runs=None if first.runs is None else [r for p in parts for r in p.runs or []],
        vanilla_runs=None if first.vanilla_runs is None else [r for p in parts for r in p.vanilla_runs or []],
    )

    # 3. Write (atomically), then report.
    try:
        emb.save(out)
    except OSError as e:
        raise cannot_write(str(args.out), e) from None
    width = max(len(Path(s).name) for s in args.image)
    for source, n, v in zip(args.image, emb.counts, emb.vanilla_counts):
        echo(f"{Path(source).name:<{width}}  {v:>6,} -> {n:>6,} visual tokens ({n / v:.1%})")
    kept, total = sum(emb.counts), sum(emb.vanilla_counts)
    size = out.stat().st_size / 2**20
    echo(
        f"wrote {out}: {len(emb)} image(s), {kept:,} of {total:,} visual tokens ({kept / total:.1%}), "
        f"hidden size {emb.hidden_size}, {str(emb.embeddings[0].dtype).replace('torch.', '')}, {size:.1f} MiB"
    )
    echo(f"read it back with: globalcom2.load_embeddings({str(out)!r})")
    return 0


def _progress(batches: list[list[str]], total: int, what: str) -> Any:
    """Yield the batches with a progress bar on stderr (counted in images), shown for several images."""
    from tqdm import tqdm

    status(f"{PROG}: {what} ...")
    with tqdm(total=total, unit="image", disable=total < 2, leave=False) as bar:
        for batch in batches:
            yield batch
            bar.update(len(batch))
