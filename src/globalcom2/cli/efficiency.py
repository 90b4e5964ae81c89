"""``globalcom2 efficiency``: analytic prefill FLOPs, KV cache and roofline times per retention
ratio, LLM-Viewer's way (see :mod:`globalcom2.efficiency`)."""

from __future__ import annotations

import argparse
from typing import Any

from . import loading
from .arguments import FORMAT_CHOICES, add_visual_tokens_argument, parse_budget
from .loading import EXAMPLE_MODEL
from .output import CLIError, echo, para


def _known_offline() -> tuple[str, ...]:
    """The checkpoints whose architecture is known without a download (every family's, named in the help)."""
    from ..models import families

    return tuple(ckpt for fam in families() for ckpt in fam.language_models)


KNOWN_OFFLINE = _known_offline()

#: ``--format csv`` columns after the table's: the settings the table prints in its header and the
#: JSON has in every row (the text tokens, the roofline's hardware, the language model, fused attention).
CSV_EXTRA_COLUMNS = [
    ("text_tokens", "text tokens", "d"), ("hardware", "hardware", "s"), ("model", "model", "s"),
    ("flash_attention", "flash attention", ""),
]


def _check_model(model: str) -> dict[str, Any]:
    """``--model`` through the same checks as every command (:func:`loading.check_model`: no
    network for a path or a bare name, one quick look at the hub for ``org/name``), except that a
    known checkpoint needs nothing and a ``config.json`` file or a folder with only a config is
    enough (no weights are read). Returns the hub keyword arguments for ``AutoConfig``."""
    from pathlib import Path

    if model in KNOWN_OFFLINE:
        return {}
    path = Path(model).expanduser()
    if path.is_file():  # a config.json itself: resolve_arch reads and checks it
        return {}
    try:
        where = loading.check_model(model, "efficiency", weights=False)
    except CLIError as e:
        if str(e).startswith("cannot load model"):  # the hub's answer: say what works offline
            raise CLIError(f"{e}; known offline: {', '.join(KNOWN_OFFLINE)}") from None
        raise
    return loading.hub_access(model) if where == "hub" else {}  # asked once: the answer is kept


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``efficiency`` command to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    eff = subparsers.add_parser(
        "efficiency",
        help="analytic prefill FLOPs, KV cache and roofline times per retention ratio",
        description=para(
            "Theoretical cost of the language model's prefill and decode for each retention ratio, "
            "LLM-Viewer's way, operator for operator: every decoder block's linear layers (2 FLOPs per "
            "multiply-add), QK^T, softmax, AV, both RMSNorms, both residual adds and the MLP activation, plus "
            "the LM head on one position; KV cache = 2 x layers x kv_heads x head_dim x bytes per token; a "
            "per-operator roofline on the chosen hardware (LLM-Viewer's figures where it has the card). By default (--text-tokens 0) it follows the "
            "paper's convention: only the R x 2880 retained visual tokens of one 4-crop image. Works "
            "offline for the public llava-hf LLaVA-NeXT checkpoints and for any local config.json."
        ),
        epilog=(
            "example:\n  globalcom2 efficiency --model llava-hf/llava-v1.6-vicuna-7b-hf --ratios 1,0.5,0.25,0.1 --hardware H100\n\n"
            "known offline: " + ", ".join(KNOWN_OFFLINE)
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    eff.add_argument("--model", default=EXAMPLE_MODEL, metavar="ID_OR_PATH",
                     help=f"hub id, checkpoint directory or config.json (default: {EXAMPLE_MODEL})")
    ratio_group = eff.add_mutually_exclusive_group()
    ratio_group.add_argument("--ratios", default="1,0.75,0.5,0.25,0.1", metavar="R[,R...]",
                             help="comma-separated retention ratios (default: 1,0.75,0.5,0.25,0.1)")
    add_visual_tokens_argument(ratio_group, "--ratios")
    eff.add_argument("--text-tokens", type=int, default=0, metavar="N",
                     help="text tokens added to every prompt (default: 0, the paper's convention)")
    eff.add_argument("--hardware", default="A100-80GB", metavar="NAME",
                     help="roofline profile: A100-40GB, A100-80GB, H100, H100-PCIe (LLM-Viewer's figures), "
                          "H200 (NVIDIA's datasheet) (default: A100-80GB)")
    eff.add_argument("--flash-attention", action="store_true",
                     help="cost LLM-Viewer's fused attention (no score-matrix traffic) instead of "
                          "qk_matmul, softmax and sv_matmul")
    eff.add_argument("--breakdown", action="store_true",
                     help="also print the per-operator roofline of one decoder block and the LM head, per ratio")
    eff.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                     help="weights/activations/KV cache precision (default: bfloat16)")
    eff.add_argument("--fastv-layer", type=int, default=None, metavar="K",
                     help="cost FastV instead: the ratio applies inside the language model from layer K on "
                          "(layers before K see every visual token)")
    eff.add_argument("--format", choices=FORMAT_CHOICES, default="table", help="output format (default: table)")
    eff.set_defaults(func=run)
    return eff


def run(args: argparse.Namespace) -> int:
    """Execute ``globalcom2 efficiency`` (raises :class:`CLIError` on bad input)."""
    from .. import efficiency as eff

    hub = _check_model(args.model)  # before anything else, without torch: as every command checks --model
    ratios = parse_budget(args, "--ratios", args.model)
    if args.breakdown and args.fastv_layer is not None:
        raise CLIError("--breakdown costs one stack of identical blocks; it cannot be combined with --fastv-layer")
    try:
        if args.text_tokens < 0:
            raise ValueError(f"--text-tokens must be >= 0, got {args.text_tokens}")
        hardware = eff.resolve_hardware(args.hardware)
        arch = eff.resolve_arch(args.model, **hub)
    except ValueError as e:
        raise CLIError(str(e)) from None
    bytes_per_value = 4.0 if args.dtype == "float32" else 2.0
    try:
        maximum = eff.max_visual_tokens_for_model(args.model)
        rows = [r.to_dict() for r in eff.analyze(arch, ratios, args.text_tokens, hardware, bytes_per_value, maximum,
                                                 fastv_layer=args.fastv_layer, flash_attention=args.flash_attention)]
    except ValueError as e:
        raise CLIError(f"--fastv-layer: {e}" if args.fastv_layer is not None else str(e)) from None
    if args.format == "table":
        echo(
            f"{args.model}: {arch.num_layers} layers, hidden {arch.hidden_size}, {arch.num_heads} heads "
            f"({arch.num_kv_heads} KV), MLP {arch.intermediate_size}{' gated' if arch.gated_mlp else ''}, vocab {arch.vocab_size}"
        )
        where = (f"FastV: layers 0-{args.fastv_layer - 1} see all {maximum} visual tokens, the rest R x "
                 f"{maximum}" if args.fastv_layer else f"R x {maximum} visual tokens")
        attention = "fused flash attention" if args.flash_attention else "unfused attention (scores written, softmax, read)"
        echo(
            f"prefill of {where} + {args.text_tokens} text tokens; "
            f"roofline on {hardware.name} ({hardware.peak_tflops:g} TFLOP/s, {hardware.bandwidth_gbs:g} GB/s; "
            f"{hardware.source or 'source not recorded'}), {args.dtype}, {attention}"
        )
        echo("")
    # CSV has no header lines: it carries what the table says above itself, as the JSON does.
    columns = eff.EFFICIENCY_COLUMNS + (CSV_EXTRA_COLUMNS if args.format == "csv" else [])
    echo(eff.format_rows(rows, columns, args.format))
    if args.breakdown:
        for row in rows:
            ops = eff.operator_breakdown(arch, row["visual_tokens"] + args.text_tokens, hardware,
                                         bytes_per_value=bytes_per_value, flash_attention=args.flash_attention)
            if args.format == "table":
                echo("")
                echo(f"per operator at R = {row['ratio']:g} ({row['visual_tokens']} visual + {args.text_tokens} text "
                     f"tokens), prefill; block operators run {arch.num_layers} times:")
            data = [{"ratio": row["ratio"], **op.to_dict()} for op in ops]
            echo(eff.format_rows(data, eff.BREAKDOWN_COLUMNS, args.format))
    return 0
