"""Analytic cost of the language model's prefill and decode: FLOPs, KV cache, roofline time.

The model follows LLM-Viewer (github.com/hahnyuan/LLM-Viewer, read at commit 472f71f), operator for
operator; the GlobalCom2 paper reports its efficiency the same way. References below are to that
commit: ``MA`` = ``model_analyzer.py``, ``LL`` = ``configs/Llama.py``, ``RM`` = ``roofline_model.py``,
``HP`` = ``hardwares/hardware_params.py``. ``t`` = query tokens, ``c`` = key/value tokens, ``d`` =
hidden size, ``h`` / ``h_kv`` = query / KV heads, ``hd`` = head dim, ``i`` = MLP width, ``b`` = bytes
per value.

Scope and precision

* Batch 1; weights, activations and KV cache all ``bytes_per_value`` (default 2: LLM-Viewer's
  ``w_bit = a_bit = kv_bit = 16``, MA 118-127, 178-188). The peak is the 16-bit one (LLM-Viewer
  switches to its INT8 peak only when every bit width is <= 8, MA 478-485; float32 here still uses
  the 16-bit peak).
* Only the decoder blocks and the LM head: no vision tower, projector, embedding lookup, rotary
  embedding or final norm (LL 13-14 lists just ``attn_norm`` and ``mlp_norm``; LL 25-38 adds only
  ``lm_head``). Block figures are multiplied by the layer count (MA 417-425).
* The LM head runs on one position in both stages and is part of both totals, FLOPs included
  (LL 25-38, MA 444-452): :func:`prefill_flops` includes it (``lm_head=False`` leaves it out).

Operators of one block, in LLM-Viewer's graph order (LL 56-74); FLOPs / bytes moved

* ``attn_norm``, ``mlp_norm`` (RMSNorm): ``7 t d`` FLOPs ("sum sub pow sum div mul add"); reads and
  writes ``t d`` activations, the norm weight is not counted: ``2 t d b`` (MA 291-302, 383-393).
* ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (LLM-Viewer's ``out_proj``), ``gate_proj``,
  ``up_proj``, ``down_proj``: ``2 t d_in d_out`` FLOPs; weight + input + output
  ``(d_in d_out + t d_in + t d_out) b``; k/v outputs are the KV cache writes (MA 197-221). Plain
  (non-gated) MLPs have no ``gate_proj``.
* ``qk_matmul``: ``2 h t c hd`` FLOPs over the full ``t x c`` score matrix (no causal halving);
  reads Q ``t h hd`` and K ``c h_kv hd``, writes the scores ``h t c`` (MA 226, 255-265, 328, 350-360).
* ``softmax``: ``5 h t c`` FLOPs (max, sub, exp, sum, div); reads and writes the scores:
  ``2 h t c b`` (MA 228-234, 278-289, 330, 372-382).
* ``sv_matmul``: ``2 h t c hd`` FLOPs; reads the scores and V ``c h_kv hd``, writes ``t h hd``
  (MA 227, 266-276, 329, 361-371).
* ``attn_add``, ``mlp_add``: ``t d`` FLOPs; LLM-Viewer reads one ``t d`` operand and writes ``t d``:
  ``2 t d b`` (MA 304-314, 394-404).
* ``mlp_act``: ``2 t d`` FLOPs, reads ``2 t d`` (gate and up) and writes ``t d``: ``3 t d b``
  (MA 315-325, 405-415). LLM-Viewer sizes it with the hidden size ``d``, not the MLP width ``i``,
  for gated and plain MLPs alike; we keep its count (with ``i`` it would be ~2.7x larger, about 1%
  of vicuna-7b's prefill time).

With ``flash_attention=True`` (LLM-Viewer's ``use_flashattention``, FlashAttention-2), ``qk_matmul``,
``softmax`` and ``sv_matmul`` become one ``fused_attention`` with no score-matrix traffic (MA
235-252, 331-348): FLOPs = the three summed (``4 h t c hd + 5 h t c``); reads Q ``t h hd``; writes O
twice ("initialize O and save O"); streams K and V once per block of ``B_r`` query rows:
``ceil(t / B_r) * 2 c h hd`` (query heads, not KV heads, as LLM-Viewer counts it), with
``B_r = min(ceil(on-chip buffer / (b hd)), hd)``, which is ``hd`` on every GPU listed here.

Roofline: each operator takes ``max(FLOPs / peak, bytes / bandwidth)`` and is memory bound when
``FLOPs / bytes`` is below ``peak / bandwidth`` (RM 1-19, MA 68-71); times add up operator by
operator.

Decode: one new token (``t = 1``) against ``c`` cached tokens; LLM-Viewer's decode at ``seqlen = n``
reads ``n`` keys (MA 226-276), and its generation loop costs the first new token after an
``n``-token prompt at ``seqlen = n`` (MA 470-476), so ``decode_seconds(arch, n)`` uses ``c = n``.

Where we differ from LLM-Viewer (each time, its own formula contradicts the tensor it costs):

* Fused attention's O is ``t h hd`` values; LLM-Viewer writes ``t t h`` in prefill and ``c h`` in
  decode (MA 338, 242), the score matrix's size, which leaves its flash attention with half the
  unfused score traffic: 1.06 ms per vicuna-7b layer at 2,880 tokens on an A100-80GB, against
  1.09 ms unfused and 0.57 ms with O sized as here.
* Prefill ``qk_matmul`` reads Q as ``t h hd``; LLM-Viewer uses ``h_kv`` there (MA 356) but ``h`` in
  its decode and fused branches (MA 261, 241, 337). Identical for multi-head models (vicuna).
* LM head FLOPs are ``2 d v``, like every other linear layer; LLM-Viewer counts ``d v`` (LL 33).
  Its time is memory bound either way.
* The head dim is the config's ``head_dim``; LLM-Viewer uses ``d // h`` (MA 224). Equal for the
  listed checkpoints.

KV cache: ``2 x layers x kv_heads x head_dim x bytes`` per token.

The paper's convention counts only the retained visual tokens of one 4-crop image (``R x 2880``,
no text, no newlines); that is what :func:`analyze` does with ``text_tokens=0``.
"""

from __future__ import annotations

import json
import math
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


def _known_models() -> dict[str, LMArch]:
    from .models import families

    return {ckpt: LMArch(*arch) for fam in families() for ckpt, arch in fam.language_models.items()}


#: Language models of the public checkpoints of every family (from their config.json files), by hub id.
KNOWN_MODELS: dict[str, LMArch] = _known_models()


def _default_max_visual_tokens() -> int:
    from .models import family_for_model_type

    return family_for_model_type("llava_next").default_max_visual_tokens()


#: Visual tokens of one image of the llava-hf LLaVA-NeXT checkpoints, without newlines (the
#: thumbnail and 4 crops of 576 tokens: 2,880): the default budget base of ``--visual-tokens``.
MAX_VISUAL_TOKENS = _default_max_visual_tokens()


@dataclass(frozen=True)
class Hardware:
    """Peak dense 16-bit throughput and memory bandwidth of an accelerator, with where they come from."""

    name: str
    peak_tflops: float
    bandwidth_gbs: float
    source: str = ""
    #: On-chip memory (registers + shared memory) in bytes; sizes flash attention's query blocks.
    #: 0 means unknown (blocks of ``head_dim`` rows, what LLM-Viewer gets on every GPU it lists).
    onchip_buffer_bytes: float = 0.0

    @property
    def peak_flops(self) -> float:
        return self.peak_tflops * 1e12

    @property
    def bandwidth(self) -> float:
        return self.bandwidth_gbs * 1e9


_LLM_VIEWER = "LLM-Viewer hardware_params"

#: Dense 16-bit tensor-core FLOP/s (sparse figure / 2) and HBM bandwidth. LLM-Viewer's figures
#: (hardwares/hardware_params.py: nvidia_A100_40G, nvidia_A100_80G, nvidia_H100 = its SXM entry,
#: nvidia_H100_PCIe) where it has the card; H200 from NVIDIA's datasheet (H200 SXM: 1,979 TFLOPS
#: with sparsity, 4.8 TB/s; same GH100 die as the H100 SXM, so LLM-Viewer's H100 on-chip buffer).
HARDWARE: dict[str, Hardware] = {
    "A100-40GB": Hardware("A100-40GB", 312.0, 1555.0, f"{_LLM_VIEWER} (nvidia_A100_40G)", 27648e3),
    "A100-80GB": Hardware("A100-80GB", 312.0, 2039.0, f"{_LLM_VIEWER} (nvidia_A100_80G)", 27648e3),
    "H100": Hardware("H100", 989.5, 3072.0, f"{_LLM_VIEWER} (nvidia_H100, SXM)", 33792e3),
    "H100-PCIe": Hardware("H100-PCIe", 756.5, 2048.0, f"{_LLM_VIEWER} (nvidia_H100_PCIe)", 29184e3),
    "H200": Hardware("H200", 989.5, 4800.0, "NVIDIA H200 datasheet (SXM)", 33792e3),
}


def resolve_hardware(name: str) -> Hardware:
    for key, hw in HARDWARE.items():
        if key.lower() == name.lower():
            return hw
    raise ValueError(f"unknown hardware {name!r}; choose one of {', '.join(HARDWARE)}")


def resolve_arch(model: str, **hub: Any) -> LMArch:
    """The language model of a checkpoint of a supported family: a known hub id (offline), a local
    ``config.json`` or a directory holding one, else the hub through ``AutoConfig`` (``hub``: its
    keyword arguments, e.g. ``local_files_only=True``).

    Raises:
        ValueError: no config, an unreadable one, or one whose ``model_type`` is not a supported
            family's (LLaVA-1.5's ``"llava"``, a text-only model...): costing it as LLaVA-NeXT
            would print a table for a model it is not.
    """
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
        family = _supported_family(data.get("model_type"), path)
        text = data.get("text_config", data)
        if not isinstance(text, dict):
            raise ValueError(f"{path}: text_config is not a JSON object")
        if "model_type" not in text:
            text = {"model_type": family.default_text_model_type, **text}
        return LMArch.from_text_config(text, name=os.path.basename(os.path.dirname(os.path.abspath(path))))
    if os.path.exists(model):
        raise ValueError(f"{model} has no config.json")
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ValueError(f"model directory not found: {model}")
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model, **hub)
    except Exception as exc:  # noqa: BLE001 - any hub/network failure becomes one clear message
        known = ", ".join(KNOWN_MODELS)
        raise ValueError(f"cannot load the config of {model!r} ({type(exc).__name__}); known offline: {known}") from exc
    family = _supported_family(getattr(cfg, "model_type", None), model)
    return LMArch.from_text_config(family.text_config(cfg), name=model)


def _supported_family(model_type: Any, where: str) -> Any:
    """The family of a config's ``model_type`` (ValueError naming ``where`` and what is supported)."""
    from .models import describe_supported, family_for_model_type

    try:
        return family_for_model_type(model_type)
    except ValueError:
        what = "no model_type" if model_type is None else f"model_type {model_type!r}"
        raise ValueError(
            f"{where}: {what} is not a supported vision-language model; globalcom2 supports {describe_supported()}"
        ) from None


# ----------------------------------------------------------------------------------------------
# Operators
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One operator: FLOPs and bytes moved (``matmul_flops``: the part of ``flops`` done by matrix
    multiplies, the only FLOPs ``torch.utils.flop_counter`` counts)."""

    name: str
    flops: float
    bytes: float
    matmul_flops: float = 0.0

    def seconds(self, hw: Hardware) -> float:
        return max(self.flops / hw.peak_flops, self.bytes / hw.bandwidth)

    def bound(self, hw: Hardware) -> str:
        """``"memory"`` when the arithmetic intensity is below the ridge point, else ``"compute"``."""
        return "memory" if self.flops / hw.peak_flops < self.bytes / hw.bandwidth else "compute"


def _flash_block_rows(arch: LMArch, bytes_per_value: float, hw: Hardware | None) -> int:
    """FlashAttention-2 query rows per block, LLM-Viewer's ``min(ceil(buffer / (b hd)), hd)``."""
    hd = arch.head_dim
    buffer = hw.onchip_buffer_bytes if hw is not None else 0.0
    if buffer <= 0:
        return hd
    return max(1, min(math.ceil(buffer / (bytes_per_value * hd)), hd))


def block_ops(
    arch: LMArch,
    new_tokens: int,
    context: int,
    bytes_per_value: float = 2.0,
    *,
    flash_attention: bool = False,
    hardware: str | Hardware | None = None,
) -> list[Op]:
    """Operators of one decoder block processing ``new_tokens`` queries against ``context`` keys,
    in LLM-Viewer's order (see the module docstring for each formula).

    Prefill: ``new_tokens == context == L``. One decode step: ``new_tokens == 1``, ``context`` =
    the keys it attends to. ``hardware`` only sizes flash attention's query blocks.
    """
    hw = resolve_hardware(hardware) if isinstance(hardware, str) else hardware
    t, c, b = new_tokens, context, bytes_per_value
    d, hd, i, h = arch.hidden_size, arch.head_dim, arch.intermediate_size, arch.num_heads
    q_out, kv_out = h * hd, arch.num_kv_heads * hd

    def linear(name: str, d_in: int, d_out: int) -> Op:
        flops = 2.0 * t * d_in * d_out
        return Op(name, flops, b * (d_in * d_out + t * d_in + t * d_out), flops)

    def norm(name: str) -> Op:
        return Op(name, 7.0 * t * d, b * 2 * t * d)

    def add(name: str) -> Op:
        return Op(name, 1.0 * t * d, b * 2 * t * d)

    scores = h * t * c
    qk_flops = sv_flops = 2.0 * scores * hd
    softmax_flops = 5.0 * scores
    if flash_attention:
        blocks = math.ceil(t / _flash_block_rows(arch, b, hw))
        attention = [
            Op("fused_attention", qk_flops + sv_flops + softmax_flops,
               b * (t * q_out + 2 * t * q_out + blocks * 2 * c * q_out), qk_flops + sv_flops),
        ]
    else:
        attention = [
            Op("qk_matmul", qk_flops, b * (t * q_out + c * kv_out + scores), qk_flops),
            Op("softmax", softmax_flops, b * 2 * scores),
            Op("sv_matmul", sv_flops, b * (scores + c * kv_out + t * q_out), sv_flops),
        ]
    ops = [
        norm("attn_norm"),
        linear("q_proj", d, q_out),
        linear("k_proj", d, kv_out),
        linear("v_proj", d, kv_out),
        *attention,
        linear("o_proj", q_out, d),
        add("attn_add"),
        norm("mlp_norm"),
    ]
    if arch.gated_mlp:
        ops += [linear("gate_proj", d, i), linear("up_proj", d, i)]
    else:
        ops += [linear("up_proj", d, i)]
    # LLM-Viewer sizes the activation with the hidden size (see the module docstring).
    ops += [Op("mlp_act", 2.0 * t * d, b * 3 * t * d), linear("down_proj", i, d), add("mlp_add")]
    return ops


def lm_head_op(arch: LMArch, bytes_per_value: float = 2.0) -> Op:
    """The LM head on one position (generation computes logits for the last token only)."""
    d, v = arch.hidden_size, arch.vocab_size
    flops = 2.0 * d * v
    return Op("lm_head", flops, bytes_per_value * (d * v + d + v), flops)


def prefill_flops(arch: LMArch, tokens: int, *, lm_head: bool = True, matmul_only: bool = False) -> float:
    """FLOPs of the language model's prefill over ``tokens`` tokens: every operator of every block,
    plus the LM head on the last position (LLM-Viewer's prefill total). ``matmul_only`` keeps the
    matrix-multiply FLOPs (what ``torch.utils.flop_counter`` counts); flash attention does not
    change FLOPs."""
    pick = (lambda op: op.matmul_flops) if matmul_only else (lambda op: op.flops)  # noqa: E731
    total = arch.num_layers * sum(pick(op) for op in block_ops(arch, tokens, tokens))
    return total + (pick(lm_head_op(arch)) if lm_head else 0.0)


def kv_cache_bytes(arch: LMArch, tokens: int, bytes_per_value: float = 2.0) -> float:
    return 2.0 * arch.num_layers * arch.num_kv_heads * arch.head_dim * bytes_per_value * tokens


def _blocks_seconds(arch: LMArch, t: int, c: int, hw: Hardware, b: float, flash: bool) -> float:
    ops = block_ops(arch, t, c, b, flash_attention=flash, hardware=hw)
    return arch.num_layers * sum(op.seconds(hw) for op in ops)


def prefill_seconds(
    arch: LMArch, tokens: int, hw: Hardware, bytes_per_value: float = 2.0, *, flash_attention: bool = False
) -> float:
    """Roofline time of the prefill: every decoder block over ``tokens``, plus the LM head on the
    last position."""
    blocks = _blocks_seconds(arch, tokens, tokens, hw, bytes_per_value, flash_attention)
    return blocks + lm_head_op(arch, bytes_per_value).seconds(hw)


def decode_seconds(
    arch: LMArch, context: int, hw: Hardware, bytes_per_value: float = 2.0, *, flash_attention: bool = False
) -> float:
    """Roofline time of one decode step attending to ``context`` cached tokens (LLM-Viewer's decode
    at ``seqlen = context``), LM head included."""
    blocks = _blocks_seconds(arch, 1, context, hw, bytes_per_value, flash_attention)
    return blocks + lm_head_op(arch, bytes_per_value).seconds(hw)


@dataclass(frozen=True)
class OpCost:
    """One line of a per-operator breakdown: one operator instance, and its share of the stage."""

    scope: str  # "block" (repeated ``count`` times, once per layer) or "lm_head"
    name: str
    count: int
    flops: float
    bytes: float
    intensity: float  # FLOPs per byte
    bound: str  # "compute" or "memory"
    seconds: float  # one instance
    total_ms: float  # count x seconds, in ms
    share: float  # of the stage's total time

    def to_dict(self) -> dict[str, Any]:
        """The fields, plus the table's units: ``gflops``, ``mbytes`` (1e6 bytes), ``us_each``."""
        return {**asdict(self), "gflops": self.flops / 1e9, "mbytes": self.bytes / 1e6, "us_each": self.seconds * 1e6}


def operator_breakdown(
    arch: LMArch,
    tokens: int,
    hardware: str | Hardware = "A100-80GB",
    *,
    stage: str = "prefill",
    bytes_per_value: float = 2.0,
    flash_attention: bool = False,
) -> list[OpCost]:
    """Every operator of one block, then the LM head, costed for one stage.

    ``stage="prefill"``: ``tokens`` queries against ``tokens`` keys; ``stage="decode"``: one query
    against ``tokens`` cached keys. The ``total_ms`` column sums to :func:`prefill_seconds` /
    :func:`decode_seconds` (x 1000). For a retention ratio, pass
    ``visual_tokens_for(ratio) + text_tokens``.
    """
    hw = hardware if isinstance(hardware, Hardware) else resolve_hardware(hardware)
    if stage not in ("prefill", "decode"):
        raise ValueError(f"stage must be prefill or decode, got {stage!r}")
    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
    t = tokens if stage == "prefill" else 1
    ops = [("block", arch.num_layers, op) for op in
           block_ops(arch, t, tokens, bytes_per_value, flash_attention=flash_attention, hardware=hw)]
    ops.append(("lm_head", 1, lm_head_op(arch, bytes_per_value)))
    total = sum(n * op.seconds(hw) for _, n, op in ops)
    return [
        OpCost(scope, op.name, n, op.flops, op.bytes, op.flops / op.bytes if op.bytes else math.inf,
               op.bound(hw), op.seconds(hw), n * op.seconds(hw) * 1e3, n * op.seconds(hw) / total if total else 0.0)
        for scope, n, op in ops
    ]


#: Columns of a per-operator breakdown table (rows from ``OpCost.to_dict``).
BREAKDOWN_COLUMNS = [
    ("scope", "scope", "s"),
    ("name", "operator", "s"),
    ("count", "x", "d"),
    ("gflops", "GFLOPs", ".4g"),
    ("mbytes", "MB", ".4g"),
    ("intensity", "FLOP/B", ".1f"),
    ("bound", "bound", "s"),
    ("us_each", "us each", ".1f"),
    ("total_ms", "total ms", ".3f"),
    ("share", "share", ".1%"),
]


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
    flash_attention: bool = False

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
    *,
    flash_attention: bool = False,
) -> list[Row]:
    """Cost rows, one per retention ratio (``relative_tflops`` is relative to ratio 1.0).

    By default the ratio applies before the language model (GlobalCom2 and the other vision-side
    methods): every layer sees ``R x max_visual_tokens`` visual tokens. With ``fastv_layer=K`` it
    applies inside it, as FastV does: layers ``0..K-1`` see all ``max_visual_tokens``, layers
    ``K..L-1`` (and their KV cache) ``R x max_visual_tokens``; ``visual_tokens`` is then the
    count after layer K. ``flash_attention`` costs LLM-Viewer's fused attention instead of the
    ``qk_matmul`` / ``softmax`` / ``sv_matmul`` trio (times change, FLOPs do not).
    """
    hw = hardware if isinstance(hardware, Hardware) else resolve_hardware(hardware)
    if text_tokens < 0:
        raise ValueError(f"text_tokens must be >= 0, got {text_tokens}")
    if fastv_layer is not None and not 1 <= fastv_layer <= arch.num_layers - 1:
        raise ValueError(f"fastv_layer must be in [1, {arch.num_layers - 1}] for {arch.name or 'this model'}, got {fastv_layer}")
    full_n = max_visual_tokens + text_tokens
    full = prefill_flops(arch, full_n)
    head = lm_head_op(arch, bytes_per_value)
    # (layers, tokens) segments of the stack; the LM head is counted once.
    early = replace(arch, num_layers=fastv_layer) if fastv_layer else None
    late = replace(arch, num_layers=arch.num_layers - fastv_layer) if fastv_layer else arch
    rows = []
    for r in ratios:
        if not 0 < r <= 1:
            raise ValueError(f"ratios must be in (0, 1], got {r}")
        n = visual_tokens_for(r, max_visual_tokens) + text_tokens
        parts = [(late, n)] + ([(early, full_n)] if early is not None else [])
        flops = sum(prefill_flops(a, t, lm_head=False) for a, t in parts) + head.flops
        prefill_s = sum(_blocks_seconds(a, t, t, hw, bytes_per_value, flash_attention) for a, t in parts)
        decode_s = sum(_blocks_seconds(a, 1, t, hw, bytes_per_value, flash_attention) for a, t in parts)
        rows.append(
            Row(
                ratio=float(r),
                visual_tokens=n - text_tokens,
                text_tokens=text_tokens,
                prefill_tflops=flops / 1e12,
                kv_cache_mib=sum(kv_cache_bytes(a, t, bytes_per_value) for a, t in parts) / MIB,
                prefill_ms=(prefill_s + head.seconds(hw)) * 1e3,
                decode_ms_per_token=(decode_s + head.seconds(hw)) * 1e3,
                relative_tflops=flops / full if full else 0.0,
                hardware=hw.name,
                model=arch.name,
                flash_attention=flash_attention,
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


def _family_of(model_type: Any) -> Any:
    from .models import family_for_model_type

    return family_for_model_type(model_type if isinstance(model_type, str) else "llava_next")


def max_visual_tokens_of(config: Any) -> int:
    """A checkpoint config's most visual tokens for one image, without newlines, as its family
    counts them (LLaVA-NeXT: the thumbnail plus the most crops any ``image_grid_pinpoints`` entry
    gives, times ``(image_size / patch_size)^2``: 5 x 576 = 2,880 for the llava-hf checkpoints).
    Takes a config object or its dict; a config without ``model_type`` is read as LLaVA-NeXT's."""
    model_type = config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)
    try:
        family = _family_of(model_type)
    except ValueError:
        family = _family_of(None)
    return family.max_visual_tokens(config)


def max_visual_tokens_for_model(model: str) -> int:
    """:func:`max_visual_tokens_of` a local checkpoint's ``config.json`` (a directory or the file);
    a known hub id's as its family counts it (``Family.checkpoint_max_visual_tokens``);
    :data:`MAX_VISUAL_TOKENS` for anything else."""
    from .models import families

    for fam in families():
        if model in fam.language_models:
            return fam.checkpoint_max_visual_tokens(model)
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as fh:
                return max_visual_tokens_of(json.load(fh))
        except (OSError, ValueError, TypeError, AttributeError):
            pass
    return MAX_VISUAL_TOKENS


def parse_visual_tokens(text: str, maximum: int) -> list[float]:
    """``"640,320,160"`` visual tokens per image -> retention ratios of ``maximum`` (e.g. 2,880):
    ``[0.2222..., 0.1111..., 0.0555...]``. The field's convention since 2025 for LLaVA-NeXT."""
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            raise ValueError(f"visual token count {part!r} is not a whole number") from None
        if not 1 <= value <= maximum:
            raise ValueError(f"visual token count {value} is not in [1, {maximum}] (this model's maximum per image)")
        out.append(value / maximum)
    if not out:
        raise ValueError("no visual token count given")
    return out


def describe_visual_tokens(ratios: Sequence[float], maximum: int) -> str:
    """``"640 = R 0.2222, 320 = R 0.1111 visual tokens of 2880"`` for status lines."""
    pairs = ", ".join(f"{visual_tokens_for(r, maximum)} = R {r:.4g}" for r in ratios)
    return f"visual tokens {pairs} (of {maximum} per image)"


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
