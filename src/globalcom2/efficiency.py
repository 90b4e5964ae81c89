"""Analytic cost of the language model's prefill and decode: FLOPs, KV cache, roofline time.

Method (LLM-Viewer's, which the GlobalCom2 paper follows):

* 2 FLOPs per multiply-add.
* Per decoder block: every linear layer (q, k, v, o projections; gate, up, down of a gated MLP or
  up, down of a plain one) plus the two attention matmuls ``Q K^T`` and ``A V``, over the full
  ``L x L`` score matrix (no causal halving). Norms, softmax, rotary embeddings, the embedding
  lookup and the LM head are not counted.
* KV cache: ``2 x layers x kv_heads x head_dim x bytes`` per token.
* Time: a per-operator roofline: each operator takes ``max(FLOPs / peak, bytes / bandwidth)``, with
  bytes = its weights + its inputs + its outputs, all in ``bytes_per_value`` (2 for bf16). The
  attention matmuls read and write the score matrix (no flash-attention fusion is assumed). Times
  also include the LM head on the one position whose logits generation needs.

The paper's convention counts only the retained visual tokens of one 4-crop image (``R x 2880``,
no text, no newlines); that is what :func:`analyze` does with ``text_tokens=0``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterable, Mapping, Sequence

MIB = 1024 * 1024

#: Model types whose MLP is plain (up, down) rather than gated (gate, up, down).
_PLAIN_MLP_TYPES = frozenset({"gpt2", "opt", "gpt_neox", "gptj", "phi", "falcon", "bloom", "mpt", "starcoder2"})


@dataclass(frozen=True)
class LMArch:
    """What the cost model needs to know about a decoder-only language model."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    gated_mlp: bool = True

    @classmethod
    def from_text_config(cls, cfg: Any, name: str = "") -> "LMArch":
        """Read an architecture from a transformers text config (object or dict)."""
        get = cfg.get if isinstance(cfg, Mapping) else (lambda k, d=None: getattr(cfg, k, d))
        missing = [k for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size") if get(k) is None]
        if missing:
            raise ValueError(f"config of {name or 'the model'} lacks {', '.join(missing)}")
        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        head_dim = get("head_dim") or hidden // heads
        model_type = str(get("model_type", "") or "")
        # LLaMA, Mistral, Qwen2, Yi, Gemma... have gated MLPs (gate, up, down); these families do not.
        gated = model_type not in _PLAIN_MLP_TYPES
        return cls(
            name=name or model_type or "model",
            num_layers=int(get("num_hidden_layers")),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            intermediate_size=int(get("intermediate_size")),
            vocab_size=int(get("vocab_size") or 0),
            gated_mlp=gated,
        )


#: Language models of the public LLaVA-NeXT checkpoints (from their config.json files).
KNOWN_MODELS: dict[str, LMArch] = {
    "llava-hf/llava-v1.6-vicuna-7b-hf": LMArch("vicuna-7b", 32, 4096, 32, 32, 128, 11008, 32064),
    "llava-hf/llava-v1.6-vicuna-13b-hf": LMArch("vicuna-13b", 40, 5120, 40, 40, 128, 13824, 32064),
    "llava-hf/llava-v1.6-mistral-7b-hf": LMArch("mistral-7b", 32, 4096, 32, 8, 128, 14336, 32064),
    "llava-hf/llama3-llava-next-8b-hf": LMArch("llama3-8b", 32, 4096, 32, 8, 128, 14336, 128320),
    "llava-hf/llava-v1.6-34b-hf": LMArch("yi-34b", 60, 7168, 56, 8, 128, 20480, 64064),
}

#: Visual tokens of one LLaVA-NeXT image with 4 crops, without newlines: 5 views x 576.
MAX_VISUAL_TOKENS = 5 * 576


@dataclass(frozen=True)
class Hardware:
    """Peak dense bf16 throughput and memory bandwidth of an accelerator."""

    name: str
    peak_tflops: float
    bandwidth_gbs: float

    @property
    def peak_flops(self) -> float:
        return self.peak_tflops * 1e12

    @property
    def bandwidth(self) -> float:
        return self.bandwidth_gbs * 1e9


#: Vendor datasheet figures, dense bf16 tensor-core FLOP/s (no sparsity), HBM bandwidth.
HARDWARE: dict[str, Hardware] = {
    "A100-40GB": Hardware("A100-40GB", 312.0, 1555.0),
    "A100-80GB": Hardware("A100-80GB", 312.0, 2039.0),
    "H100": Hardware("H100", 989.0, 3350.0),  # SXM5
    "H200": Hardware("H200", 989.0, 4800.0),
}


def resolve_hardware(name: str) -> Hardware:
    for key, hw in HARDWARE.items():
        if key.lower() == name.lower():
            return hw
    raise ValueError(f"unknown hardware {name!r}; choose one of {', '.join(HARDWARE)}")


def resolve_arch(model: str) -> LMArch:
    """The language model of a LLaVA-NeXT checkpoint: a known hub id (offline), a local
    ``config.json`` or a directory holding one, else the hub through ``AutoConfig``."""
    if model in KNOWN_MODELS:
        return KNOWN_MODELS[model]
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path} does not hold a JSON object")
        text = data.get("text_config", data)
        if "model_type" not in text and data.get("model_type") == "llava_next":
            text = {"model_type": "llama", **text}
        return LMArch.from_text_config(text, name=os.path.basename(os.path.dirname(os.path.abspath(path))))
    if os.path.exists(model) or model.startswith((".", "/")):
        raise ValueError(f"{model} has no config.json")
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model)
    except Exception as exc:  # noqa: BLE001 - any hub/network failure becomes one clear message
        known = ", ".join(KNOWN_MODELS)
        raise ValueError(f"cannot load the config of {model!r} ({type(exc).__name__}); known offline: {known}") from exc
    return LMArch.from_text_config(getattr(cfg, "text_config", cfg), name=model)


# ----------------------------------------------------------------------------------------------
# Operators
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One operator of one decoder block: FLOPs and bytes moved."""

    name: str
    flops: float
    bytes: float

    def seconds(self, hw: Hardware) -> float:
        return max(self.flops / hw.peak_flops, self.bytes / hw.bandwidth)


def block_ops(arch: LMArch, new_tokens: int, context: int, bytes_per_value: float = 2.0) -> list[Op]:
    """Operators of one decoder block processing ``new_tokens`` queries against ``context`` keys.

    Prefill: ``new_tokens == context == L``. One decode step: ``new_tokens == 1``, ``context`` =
    tokens in the cache plus one.
    """
    t, c, b = new_tokens, context, bytes_per_value
    d, hd, i = arch.hidden_size, arch.head_dim, arch.intermediate_size
    q_out, kv_out = arch.num_heads * hd, arch.num_kv_heads * hd

    def linear(name: str, d_in: int, d_out: int) -> Op:
        return Op(name, 2.0 * t * d_in * d_out, b * (d_in * d_out + t * d_in + t * d_out))

    ops = [
        linear("q_proj", d, q_out),
        linear("k_proj", d, kv_out),
        linear("v_proj", d, kv_out),
        # Q K^T: heads x t x c scores of hd-long dot products; reads Q and the K cache, writes scores.
        Op("qk_matmul", 2.0 * arch.num_heads * t * c * hd, b * (t * q_out + c * kv_out + arch.num_heads * t * c)),
        # A V: reads scores and the V cache, writes the attention output.
        Op("sv_matmul", 2.0 * arch.num_heads * t * c * hd, b * (arch.num_heads * t * c + c * kv_out + t * q_out)),
        linear("o_proj", q_out, d),
    ]
    if arch.gated_mlp:
        ops += [linear("gate_proj", d, i), linear("up_proj", d, i), linear("down_proj", i, d)]
    else:
        ops += [linear("up_proj", d, i), linear("down_proj", i, d)]
    return ops


def prefill_flops(arch: LMArch, tokens: int) -> float:
    """FLOPs of the whole language model's prefill over ``tokens`` tokens (LLM-Viewer rule)."""
    return arch.num_layers * sum(op.flops for op in block_ops(arch, tokens, tokens))


def kv_cache_bytes(arch: LMArch, tokens: int, bytes_per_value: float = 2.0) -> float:
    return 2.0 * arch.num_layers * arch.num_kv_heads * arch.head_dim * bytes_per_value * tokens


def lm_head_op(arch: LMArch, bytes_per_value: float = 2.0) -> Op:
    """The LM head on one position (generation computes logits for the last token only)."""
    d, v = arch.hidden_size, arch.vocab_size
    return Op("lm_head", 2.0 * d * v, bytes_per_value * (d * v + d + v))


def prefill_seconds(arch: LMArch, tokens: int, hw: Hardware, bytes_per_value: float = 2.0) -> float:
    """Roofline time of the prefill: every decoder block over ``tokens``, plus the LM head on the
    last position (counted in time, though not in :func:`prefill_flops`, like LLM-Viewer)."""
    blocks = arch.num_layers * sum(op.seconds(hw) for op in block_ops(arch, tokens, tokens, bytes_per_value))
    return blocks + lm_head_op(arch, bytes_per_value).seconds(hw)


def decode_seconds(arch: LMArch, context: int, hw: Hardware, bytes_per_value: float = 2.0) -> float:
    """Roofline time of one decode step with ``context`` tokens already in the cache (LM head included)."""
    blocks = arch.num_layers * sum(op.seconds(hw) for op in block_ops(arch, 1, context + 1, bytes_per_value))
    return blocks + lm_head_op(arch, bytes_per_value).seconds(hw)


@dataclass(frozen=True)
class Row:
    """One line of an efficiency table."""

    ratio: float
    visual_tokens: int
    text_tokens: int
    prefill_tflops: float
    kv_cache_mib: float
    prefill_ms: float
    decode_ms_per_token: float
    relative_tflops: float
    hardware: str
    model: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def visual_tokens_for(ratio: float, max_visual_tokens: int = MAX_VISUAL_TOKENS) -> int:
    """The paper's convention: ``R x 2880`` retained visual tokens (rounded to an integer)."""
    return int(round(ratio * max_visual_tokens))


def analyze(
    arch: LMArch,
    ratios: Iterable[float],
    text_tokens: int = 0,
    hardware: str | Hardware = "A100-80GB",
    bytes_per_value: float = 2.0,
    max_visual_tokens: int = MAX_VISUAL_TOKENS,
    fastv_layer: int | None = None,
) -> list[Row]:
    """Cost rows, one per retention ratio (``relative_tflops`` is relative to ratio 1.0).

    By default the ratio applies before the language model (GlobalCom2 and the other vision-side
    methods): every layer sees ``R x max_visual_tokens`` visual tokens. With ``fastv_layer=K`` it
    applies inside it, as FastV does: layers ``0..K-1`` see all ``max_visual_tokens``, layers
    ``K..L-1`` (and their KV cache) ``R x max_visual_tokens``; ``visual_tokens`` is then the
    count after layer K.
    """
    hw = hardware if isinstance(hardware, Hardware) else resolve_hardware(hardware)
    if text_tokens < 0:
        raise ValueError(f"text_tokens must be >= 0, got {text_tokens}")
    if fastv_layer is not None and not 1 <= fastv_layer <= arch.num_layers - 1:
        raise ValueError(f"fastv_layer must be in [1, {arch.num_layers - 1}] for {arch.name or 'this model'}, got {fastv_layer}")
    full_n = max_visual_tokens + text_tokens
    full = prefill_flops(arch, full_n)
    head_s = lm_head_op(arch, bytes_per_value).seconds(hw)
    # (layers, tokens) segments of the stack; the LM head is counted once.
    early = replace(arch, num_layers=fastv_layer) if fastv_layer else None
    late = replace(arch, num_layers=arch.num_layers - fastv_layer) if fastv_layer else arch
    rows = []
    for r in ratios:
        if not 0 < r <= 1:
            raise ValueError(f"ratios must be in (0, 1], got {r}")
        n = visual_tokens_for(r, max_visual_tokens) + text_tokens
        parts = [(late, n)] + ([(early, full_n)] if early is not None else [])
        flops = sum(prefill_flops(a, t) for a, t in parts)
        rows.append(
            Row(
                ratio=float(r),
                visual_tokens=n - text_tokens,
                text_tokens=text_tokens,
                prefill_tflops=flops / 1e12,
                kv_cache_mib=sum(kv_cache_bytes(a, t, bytes_per_value) for a, t in parts) / MIB,
                prefill_ms=(sum(prefill_seconds(a, t, hw, bytes_per_value) - head_s for a, t in parts) + head_s) * 1e3,
                decode_ms_per_token=(sum(decode_seconds(a, t, hw, bytes_per_value) - head_s for a, t in parts) + head_s) * 1e3,
                relative_tflops=flops / full if full else 0.0,
                hardware=hw.name,
                model=arch.name,
            )
        )
    return rows


def parse_ratios(text: str) -> list[float]:
    """``"1,0.5,0.25"`` -> ``[1.0, 0.5, 0.25]`` with a clear error for bad entries."""
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"ratio {part!r} is not a number") from None
        if not 0 < value <= 1:
            raise ValueError(f"ratio {part!r} is not in (0, 1]")
        out.append(value)
    if not out:
        raise ValueError("no ratio given")
    return out


def format_rows(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, str]], fmt: str) -> str:
    """Render rows as a Markdown-compatible table, JSON (array of objects) or CSV.

    ``columns`` lists ``(key, header, format spec)`` for the table and CSV.
    """
    if fmt == "json":
        return json.dumps([dict(r) for r in rows], indent=2)
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow([k for k, _, _ in columns])
        for r in rows:
            writer.writerow([r[k] for k, _, _ in columns])
        return buf.getvalue().rstrip("\n")
    if fmt != "table":
        raise ValueError(f"format must be table, json or csv, got {fmt!r}")
    cells = [[h for _, h, _ in columns]] + [[format(r[k], spec) for k, _, spec in columns] for r in rows]
    widths = [max(len(row[j]) for row in cells) for j in range(len(columns))]
    lines = ["| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    return "\n".join(lines)


#: Columns of the efficiency table.
EFFICIENCY_COLUMNS = [
    ("ratio", "ratio", "g"),
    ("visual_tokens", "visual tokens", "d"),
    ("prefill_tflops", "prefill TFLOPs", ".2f"),
    ("relative_tflops", "vs R=1", ".1%"),
    ("kv_cache_mib", "KV cache MiB", ".1f"),
    ("prefill_ms", "prefill ms", ".2f"),
    ("decode_ms_per_token", "decode ms/token", ".3f"),
]
