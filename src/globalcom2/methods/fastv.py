"""FastV: drop the least-attended visual tokens inside the language model.

FastV (Chen et al. 2024, "An Image is Worth 1/2 Tokens After Layer 2") runs the first ``K``
decoder layers of the language model on the full sequence. At layer ``K - 1`` it reads the
attention that the *last* prompt token pays to every visual token (post-softmax, averaged over
heads, RoPE applied as the model does) and ranks the visual tokens by it. Layers ``K .. L-1``
then run on a *shorter* sequence: the top ``round(R * n_visual)`` visual tokens of each sample
(at least one when the sample has any) plus all of its non-visual tokens. Kept tokens keep
their original RoPE positions.

:class:`FastVPatch` implements this as a reversible, per-instance patch of one decoder-only base
model (``LlamaModel``, ``MistralModel``, ``Qwen2Model``...; for LLaVA-NeXT that is
``model.model.language_model``). Its config, :class:`FastVConfig`, is registered as the
language-model-side method ``fastv``::

    patch = FastVPatch(model.model.language_model, FastVConfig(retention_ratio=0.5, layer=2))
    patch.install()
    patch.prepare(inputs["input_ids"] == model.config.image_token_id)   # (B, T) bool
    out = model.generate(**inputs, max_new_tokens=32)
    patch.uninstall()

How it works (``B`` batch, ``T`` prompt length, ``L'`` the longest pruned row):

* The language model's ``forward`` is wrapped (instance attribute) to read the 2D padding
  ``attention_mask`` and the KV cache of each call, and to tell a *prefill* (no cache, or an empty
  one) from a *decode* step (a non-empty cache). Each call gets fresh per-call state.
* On a prefill with prepared visual tokens, forward hooks on layer ``K-1``'s ``self_attn.q_proj``
  / ``k_proj`` and a forward pre-hook on its ``self_attn`` capture the projections and the
  ``(cos, sin)`` position embeddings; the ranking is recomputed from them (rotary, GQA head
  grouping, ``scaling``, causal + padding mask, float32 softmax, mean over heads) for the last
  token only, i.e. ``O(T)`` work, never a ``T x T`` attention map.
* Layer ``K`` receives the full ``(B, T, d)`` hidden states and gathers the kept positions into
  ``(B, L', d)`` (per row sorted by original position, right-padded to ``L'``; padding tokens of
  the input are dropped as well). Layers ``K .. L-1`` get their own 4D mask (causal by original
  position, padded slots masked out) and ``(cos, sin)`` gathered at the kept positions.
* The last layer scatters its output back to ``(B, T, d)``; a pruned position takes the hidden
  state it had *entering layer K* (its residual stream is frozen). So the final norm, ``lm_head``,
  logits and ``labels`` keep the input's length. **Logits at kept positions (and at the last
  token) are exact; logits at pruned positions are not meaningful.**
* KV cache (``DynamicCache``): layers ``< K`` hold the full ``T`` prompt, layers ``>= K`` hold the
  ``L'`` pruned slots. Transformers sizes masks and positions from layer 0 (full length), which
  stays right. During decode the new tokens' keys in layers ``>= K`` are masked with the stored
  validity of the ``L'`` prompt slots concatenated with the call's 2D ``attention_mask`` after the
  prompt; the queries' position embeddings are used as given (they are not pruned).
* Beam search: the prefill batch may be ``B * e`` rows for a ``(B, T)`` prepared mask (generate
  expands inputs with ``repeat_interleave``); the ranking of the first row of every group is used
  for the whole group, so all beams of one sample share the same pruning and the per-row decode
  state is invariant under ``Cache.reorder_cache``.

Limitations: only the ``"sdpa"`` and ``"eager"`` attention implementations (they take an
arbitrary 4D mask); dynamic (non-static, non-compiled) caches; a prefill must be a single call
(no chunked prefill); sliding-window attention only while the whole sequence fits in the window;
``output_hidden_states`` of layers ``K .. L-2`` have the pruned length; cache surgery other than
``reorder_cache`` (``crop``, ``batch_select_indices``...) is not supported.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from .._lazy import lazy_module
from .._patching import PatchedMethod
from ..core.config import check_int, check_ratio
from .base import LanguageMethodConfig, register_method

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

torch = lazy_module("torch")  # imported when FastV runs, not when the method registry is read
rotary = lazy_module("globalcom2.core.rotary")

__all__ = ["FastVConfig", "FastVPatch", "kept_count"]

_SUPPORTED_ATTN = ("sdpa", "eager")


@register_method
@dataclass(frozen=True)
class FastVConfig(LanguageMethodConfig):
    """Settings of FastV (:class:`FastVPatch`).

    Attributes:
        retention_ratio: ``R`` in ``(0, 1]``, the fraction of each sample's visual tokens that
            layers ``>= layer`` keep (``round(R * n_visual)``, at least 1 when ``n_visual > 0``).
            Default 0.5.
        layer: ``K >= 1``, the index of the first pruned decoder layer; the ranking uses the
            attention of layer ``K - 1``. Checked against the model at install
            (``K <= num_layers - 1``). Default 2, as in the FastV paper.
    """

    method: ClassVar[str] = "fastv"

    retention_ratio: float = 0.5
    layer: int = 2

    def __post_init__(self) -> None:
        # Numeric options as in :mod:`globalcom2.core.config` (NumPy / 0-d torch scalars accepted,
        # stored as plain float / int; None, bools and integral floats for ``layer`` rejected).
        self._reject_none()
        self._set("retention_ratio", check_ratio(self.retention_ratio))
        self._set("layer", check_int(self.layer, "layer", minimum=1))

    def make_patch(self, language_model: Any) -> "FastVPatch":
        return FastVPatch(language_model, self)

    def kept(self, visual_tokens: int) -> int:
        return kept_count(visual_tokens, self.retention_ratio)

    def effective(self, visual_tokens: int, kept: int, n_layers: int) -> float:
        """``(K n + (L - K) kept) / L``: layers before K see every visual token, the others ``kept``."""
        return (self.layer * visual_tokens + (n_layers - self.layer) * kept) / n_layers


def _pairing(attn: Any) -> Callable | None:
    """How the layer's rotary pairs dimensions: Llama's, or its modeling module's own ``rotate_half``
    where that pairs adjacent ones (Cohere / Cohere 2; None on Cohere 2's full layers, which apply none)."""
    import sys

    own = getattr(sys.modules.get(type(attn).__module__), "rotate_half", None)
    if not (callable(own) and torch.equal(own(torch.arange(4.0)), rotary.rotate_interleaved(torch.arange(4.0)))):
        return rotary.rotate_half
    windowless = getattr(attn, "sliding_window", 0) is None and not getattr(attn, "force_rope", False)
    return None if windowless and "cohere2" in type(attn).__module__ else rotary.rotate_interleaved


def kept_count(n_visual: int, retention_ratio: float) -> int:
    """Visual tokens FastV keeps of ``n_visual``: ``round(R * n)``, at least 1 when ``n > 0``."""
    return max(1, round(retention_ratio * n_visual)) if n_visual > 0 else 0


def _llama4_qk(
    attn: nn.Module, q: torch.Tensor, k: torch.Tensor, freqs: torch.Tensor, last: torch.Tensor, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama 4's attention on q (B, H, D: the last token's) and k (B, T, G, D), as its layer does it:
    the rotation by complex ``freqs`` (B, T, D/2) of consecutive pairs where the layer uses rope, then
    its weightless q/k norm where it has one; on a layer without rope, the temperature of the query's
    position (``attn_temperature_tuning``)."""
    if getattr(attn, "use_rope", True):
        f = rotary.batched(freqs, batch)  # (B, T, D/2)
        f_l = f.gather(1, last.view(batch, 1, 1).expand(batch, 1, f.shape[-1]))  # (B, 1, D/2)
        q = torch.view_as_real(torch.view_as_complex(q.float().reshape(*q.shape[:-1], -1, 2)) * f_l).flatten(-2)
        k = torch.view_as_real(torch.view_as_complex(k.float().reshape(*k.shape[:-1], -1, 2)) * f[:, :, None]).flatten(-2)
    norm = getattr(attn, "qk_norm", None)
    if norm is not None:
        q, k = norm(q), norm(k)
    if getattr(attn, "attn_temperature_tuning", False) and not getattr(attn, "use_rope", True):
        scale = torch.log1p(torch.floor((last.float() + 1.0) / attn.floor_scale)) * attn.attn_scale + 1.0  # (B,)
        q = q * scale[:, None, None]
    return q, k


@dataclass
class _Prompt:
    """What a pruned prefill leaves for the decode steps that follow it (per-row tensors).

    Attributes:
        cache_ref: weak reference to the ``Cache`` the prefill filled.
        prompt_len: ``T``, the prefill's full length (what layers ``< K`` hold).
        slot_valid: ``(B, L')`` bool, which of the ``L'`` slots layers ``>= K`` hold are real tokens.
    """

    cache_ref: Callable[[], Any]
    prompt_len: int
    slot_valid: torch.Tensor


class _Call:
    """Per-call state of one language-model forward (reset on every call)."""

    def __init__(self) -> None:
        self.mode: str | None = None  # None (pass-through) | "prefill" | "decode"
        self.valid: torch.Tensor | None = None  # (B, T) bool padding validity (prefill)
        self.visual: torch.Tensor | None = None  # (B, T) bool visual & valid (prefill)
        self.group: int = 1  # rows per prepared row (beam / return-sequence expansion)
        self.n_vis: list[int] = []  # per prepared row
        self.keep_n: list[int] = []  # per prepared row
        self.n_valid: list[int] = []  # per prefill row
        # captured at layer K-1 (prefill)
        self.q: torch.Tensor | None = None  # (B, T, H*D) q_proj output
        self.k: torch.Tensor | None = None  # (B, T, Hkv*D) k_proj output
        self.cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None  # (1|B, T, D) each
        # built at layer K, used by layers K..L-1
        self.mask: torch.Tensor | None = None  # (B, 1, q, kv) bool (sdpa) or additive (eager)
        self.kept_idx: torch.Tensor | None = None  # (B, L') original positions of the slots
        self.slot_valid: torch.Tensor | None = None  # (B, L') bool
        self.pos_emb: tuple[torch.Tensor, torch.Tensor] | None = None  # gathered (B, L', D)
        self.pos_ids: torch.Tensor | None = None  # gathered (B, L') or None
        self.h_in: torch.Tensor | None = None  # (B, T, d) hidden states entering layer K
        self.cache: Any = None
        # decode
        self.prompt: _Prompt | None = None
        self.attn2d: torch.Tensor | None = None  # (B, S) call's 2D mask or None
        self.past_k: int = 0  # cache length of layer K before this call


class FastVPatch:
    """FastV pruning of visual tokens inside a decoder-only language model (per-instance patch).

    Args:
        language_model: the base decoder (``LlamaModel`` / ``MistralModel`` / ``Qwen2Model``...,
            for LLaVA-NeXT ``model.model.language_model``) exposing ``.layers`` (decoder layers
            with ``.self_attn.q_proj`` / ``.k_proj``) and ``.config`` (``num_attention_heads``,
            ``num_key_value_heads``, ``head_dim`` or ``hidden_size``, ``_attn_implementation``).
        config: the :class:`FastVConfig`.

    Attributes:
        last_visual: visual tokens (inside the padding mask) per prepared row at the last
            prefill, before pruning; None when that prefill had no prepared mask.
        last_kept: visual tokens per prepared row that layers ``>= K`` kept at that prefill
            (equal to ``last_visual`` when nothing was pruned, e.g. ``R = 1``).
            With beam / ``num_return_sequences`` expansion the counts are per *prepared* row (all
            expanded copies share the pruning).
    """

    def __init__(self, language_model: nn.Module, config: FastVConfig) -> None:
        if not isinstance(config, FastVConfig):
            raise TypeError(f"config must be a FastVConfig, got {type(config).__name__}")
        if not hasattr(language_model, "layers"):
            raise ValueError(
                f"language_model ({type(language_model).__name__}) has no `.layers`; pass the decoder base "
                "model (e.g. `model.model.language_model` for LLaVA-NeXT)"
            )
        self.language_model = language_model
        self._config = config
        self.last_kept: list[int] | None = None
        self.last_visual: list[int] | None = None
        #: (B0, T) bool: the visual positions still in the sequence after layer K, per prepared row,
        #: at the last prefill (all visual positions when nothing was pruned).
        self.last_kept_mask: torch.Tensor | None = None
        self._installed = False
        self._saved: list[tuple[nn.Module, bool, Any, Any]] = []  # (module, had_instance, previous, ours)
        self._hooks: list[Any] = []
        self._pending: torch.Tensor | None = None
        self._prompt: _Prompt | None = None
        self._call: _Call | None = None

    @property
    def n_layers(self) -> int:
        """The decoder layers FastV counts (the first ``config.num_hidden_layers`` of them)."""
        return len(self._decoder_layers())

    def _decoder_layers(self) -> list[nn.Module]:
        lm = self.language_model
        return list(lm.layers[: getattr(lm.config, "num_hidden_layers", len(lm.layers))])

    @property
    def last_kept_positions(self) -> list[torch.Tensor] | None:
        """Per prepared row, the (k,) sorted positions of the visual tokens kept at the last prefill."""
        if self.last_kept_mask is None:
            return None
        return [row.nonzero().flatten() for row in self.last_kept_mask]

    # ------------------------------------------------------------------ install / uninstall
    @property
    def config(self) -> FastVConfig:
        """The :class:`FastVConfig` (read-only: build a new patch to change it)."""
        return self._config

    @property
    def installed(self) -> bool:
        """Whether the patch is currently installed."""
        return self._installed

    def _attn_impl(self) -> str | None:
        return getattr(self.language_model.config, "_attn_implementation", None)

    def _check_attn_impl(self) -> None:
        impl = self._attn_impl()
        if impl not in _SUPPORTED_ATTN:
            raise ValueError(
                f"FastV needs an attention implementation that takes an arbitrary 4D mask "
                f"({' or '.join(_SUPPORTED_ATTN)}); the language model's config._attn_implementation "
                f"is {impl!r}"
            )

    def validate(self) -> tuple[list[nn.Module], nn.Module]:
        """Check that this patch fits the language model (without patching anything).

        Returns:
            The decoder layers and layer ``K - 1``'s attention module.

        Raises:
            ValueError: as :meth:`install`.
        """
        layers = self._decoder_layers()
        n_layers = len(layers)
        k = self.config.layer
        if k > n_layers - 1:
            raise ValueError(
                f"layer must be <= num_layers - 1 = {n_layers - 1} for this model ({n_layers} decoder layers), got {k}"
            )
        self._check_attn_impl()
        attn = getattr(layers[k - 1], "self_attn", None)
        fused = attn is not None and hasattr(attn, "qkv_proj")  # Phi-3-style fused projection
        if attn is None or not fused and (not hasattr(attn, "q_proj") or not hasattr(attn, "k_proj")):
            raise ValueError(f"decoder layer {k - 1} has no `self_attn.q_proj` / `self_attn.k_proj` (or a fused `qkv_proj`)")
        return layers, attn

    def install(self) -> None:
        """Patch the language model (instance attributes and hooks only; idempotent).

        Raises:
            ValueError: ``layer`` is not below the number of decoder layers, the attention
                implementation (``config._attn_implementation``) is not ``"sdpa"`` / ``"eager"``,
                or layer ``K - 1``'s attention lacks ``q_proj`` / ``k_proj``.
        """
        if self._installed:
            return
        lm = self.language_model
        layers, attn = self.validate()
        n_layers, k = len(layers), self.config.layer
        cfg = lm.config
        n_heads = cfg.num_attention_heads
        n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
        head_dim = getattr(attn, "head_dim", None) or getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        self._n_heads, self._n_kv, self._head_dim = n_heads, n_kv, head_dim
        self._scaling = getattr(attn, "scaling", None) or head_dim**-0.5
        self._rank_attn = attn
        window = getattr(cfg, "sliding_window", None)
        self._window = int(window) if window else None
        self._window_name = "sliding_window"
        chunk = getattr(cfg, "attention_chunk_size", None)  # Llama 4: attention within chunks of this many tokens
        if chunk and "chunked_attention" in (getattr(cfg, "layer_types", None) or ()) and (self._window is None or chunk < self._window):
            self._window, self._window_name = int(chunk), "attention_chunk_size"

        if hasattr(attn, "q_proj") and hasattr(attn, "k_proj"):
            projections = [attn.q_proj.register_forward_hook(self._hook_q), attn.k_proj.register_forward_hook(self._hook_k)]
        else:  # fused ``qkv_proj`` (Phi-3 / Phi-4-multimodal): q, k, v side by side on the last dimension
            projections = [attn.qkv_proj.register_forward_hook(self._hook_qkv)]
        self._hooks = [*projections, attn.register_forward_pre_hook(self._hook_attn_pre, with_kwargs=True)]
        self._saved = []
        try:
            self._set_forward(lm, self._make_lm_forward(lm.forward))
            for i in range(k, n_layers):
                layer = layers[i]
                self._set_forward(layer, self._make_layer_forward(layer.forward, first=i == k, last=i == n_layers - 1))
        except Exception:
            self._restore()
            raise
        self._installed = True

    def _set_forward(self, module: nn.Module, fn: Callable) -> None:
        had = "forward" in module.__dict__
        prev = module.__dict__.get("forward")
        module.forward = fn
        self._saved.append((module, had, prev, fn))

    def _restore(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for module, had, prev, _ in reversed(self._saved):
            if had:
                module.forward = prev
            else:
                module.__dict__.pop("forward", None)
        self._saved = []

    def uninstall(self) -> None:
        """Remove the patch, restoring exactly the previous ``forward`` attributes (idempotent).

        Raises:
            RuntimeError: something else replaced one of the patched ``forward`` attributes after
                :meth:`install` (restoring would silently drop it); nothing is changed then.
        """
        if not self._installed:
            return
        for module, _, _, ours in self._saved:
            if module.__dict__.get("forward") is not ours:
                raise RuntimeError(
                    f"the `forward` of {type(module).__name__} was replaced after FastVPatch.install(); "
                    "uninstall that patch first"
                )
        self._restore()
        self._installed = False
        self._pending = None
        self._prompt = None
        self._call = None

    # ------------------------------------------------------------------ prepare
    def prepare(self, visual_mask: torch.Tensor | None) -> None:
        """Declare which positions of the NEXT prefill's input sequence are visual tokens.

        Args:
            visual_mask: ``(B, T)`` bool (or 0/1) tensor over the next prefill's sequence, or None
                to clear. Consumed by the next prefill call (a call without a cache or with an
                empty one). Its batch may be a divisor of the prefill's batch (generate's
                ``num_beams`` / ``num_return_sequences`` expansion, ``repeat_interleave``
                order). Without a prepared mask, or without visual tokens, layers run unpruned.
        """
        if visual_mask is None:
            self._pending = None
            return
        if not isinstance(visual_mask, torch.Tensor) or visual_mask.dim() != 2:
            raise ValueError("visual_mask must be a (B, T) tensor")
        self._pending = visual_mask.bool()

    # ------------------------------------------------------------------ hooks (layer K-1)
    def _hook_q(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        call = self._call
        if call is not None and call.mode == "prefill" and call.q is None:
            call.q = output

    def _hook_k(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        call = self._call
        if call is not None and call.mode == "prefill" and call.k is None:
            call.k = output

    def _hook_qkv(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        q = self._n_heads * self._head_dim
        self._hook_q(module, args, output[..., :q])
        self._hook_k(module, args, output[..., q : q + self._n_kv * self._head_dim])

    def _hook_attn_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = self._call
        if call is not None and call.mode == "prefill" and call.cos_sin is None:
            pe = kwargs.get("position_embeddings")
            if pe is None and len(args) > 1:
                pe = args[1]
            call.cos_sin = pe
        return None

    # ------------------------------------------------------------------ language model forward
    def _make_lm_forward(self, orig: Callable) -> Callable:
        try:
            sig = inspect.signature(orig)
        except (TypeError, ValueError):  # pragma: no cover - builtins only
            sig = None
        # An object, not a closure: a deep copy of the model gets a forward bound to its own patch.
        return PatchedMethod(self, "_lm_forward", orig, (sig,))

    def _lm_forward(self, orig: Callable, sig: inspect.Signature | None, *args: Any, **kwargs: Any) -> Any:
        values = dict(kwargs)
        if args and sig is not None:
            try:
                values = {**sig.bind_partial(*args, **kwargs).arguments, **kwargs}
            except TypeError:
                values = dict(kwargs)
        call = self._begin_call(values)
        self._call = call
        try:
            return orig(*args, **kwargs)
        finally:
            self._call = None
            if call.mode == "prefill":
                cache = call.cache
                if cache is not None and call.slot_valid is not None:
                    self._prompt = _Prompt(weakref.ref(cache), call.valid.shape[1], call.slot_valid)

    def _begin_call(self, values: dict) -> _Call:
        """Classify the call (prefill / decode / pass-through) and set up its state."""
        call = _Call()
        cache = values.get("cache", values.get("past_key_values"))
        inputs = values.get("inputs_embeds")
        if inputs is None:
            inputs = values.get("input_ids")
        if inputs is None:
            return call
        batch, seq = inputs.shape[0], inputs.shape[1]
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        attn2d = values.get("attention_mask")
        if past == 0:
            visual = self._pending
            self._pending = None
            self._prompt = None
            if visual is None:
                self.last_kept = self.last_visual = None
                self.last_kept_mask = None
                return call
            self._setup_prefill(call, visual, attn2d, cache, batch, seq, inputs.device)
            return call
        prompt = self._prompt
        if prompt is None or cache is None or prompt.cache_ref() is not cache:
            return call
        self._check_runtime(attn2d, cache, past + seq)
        if prompt.slot_valid.shape[0] != batch:
            raise RuntimeError(
                f"FastV: the decode batch ({batch}) differs from the pruned prefill's ({prompt.slot_valid.shape[0]}); "
                "cache batch surgery is not supported"
            )
        call.mode = "decode"
        call.prompt = prompt
        call.attn2d = attn2d
        call.past_k = cache.get_seq_length(self.config.layer)
        return call

    def _check_runtime(self, attn2d: Any, cache: Any, total: int) -> None:
        self._check_attn_impl()
        if attn2d is not None and (not isinstance(attn2d, torch.Tensor) or attn2d.dim() != 2):
            raise ValueError("FastV needs a 2D (B, S) padding attention_mask (or None), not a prepared 4D mask")
        if cache is not None and getattr(cache, "is_compileable", False):
            raise ValueError(
                "FastV needs a dynamic KV cache (DynamicCache); static / compileable caches are not supported"
            )
        if self._window is not None and total > self._window:
            raise ValueError(
                f"FastV: the sequence ({total} tokens) exceeds the model's {self._window_name} ({self._window}); "
                "sliding-window / chunked attention is only supported while the whole sequence fits in the window"
            )

    def _setup_prefill(
        self, call: _Call, visual: torch.Tensor, attn2d: Any, cache: Any, batch: int, seq: int, device: torch.device
    ) -> None:
        """Validate the prepared mask against the prefill and decide whether anything is pruned.

        One host sync reads the per-row visual / valid counts (data-dependent lengths).
        """
        b0 = visual.shape[0]
        if visual.shape[1] != seq or b0 == 0 or batch % b0 != 0:
            raise ValueError(
                f"prepared visual_mask has shape {tuple(visual.shape)} but the prefill input is ({batch}, {seq}) "
                "(its batch must divide the prefill batch)"
            )
        self._check_runtime(attn2d, cache, seq)
        group = batch // b0
        visual = visual.to(device)
        if group > 1:
            visual = visual.repeat_interleave(group, dim=0)
        valid = attn2d.to(device).bool() if attn2d is not None else torch.ones_like(visual)
        visual = visual & valid
        counts = torch.stack([visual.sum(1), valid.sum(1)]).tolist()  # one sync: (2, B)
        n_vis_rows, n_valid = counts
        n_vis = n_vis_rows[::group]
        r = self.config.retention_ratio
        keep_n = [kept_count(n, r) for n in n_vis]
        self.last_visual = list(n_vis)
        self.last_kept = list(n_vis)
        self.last_kept_mask = visual[::group]
        if all(k == n for k, n in zip(keep_n, n_vis)):
            return  # nothing to prune: run unpruned (bit-identical to the plain model)
        call.mode = "prefill"
        call.valid, call.visual, call.group = valid, visual, group
        call.n_vis, call.keep_n, call.n_valid = n_vis, keep_n, n_valid
        self.last_kept = list(keep_n)

    # ------------------------------------------------------------------ ranking
    def _select(self, call: _Call) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank the visual tokens and choose the kept positions.

        Returns:
            kept_idx: ``(B, L')`` long, per row the kept original positions in increasing order,
                then (padded slots) arbitrary distinct non-kept positions.
            slot_valid: ``(B, L')`` bool, which slots hold a kept token.
        """
        if call.q is None or call.k is None or call.cos_sin is None:
            raise RuntimeError(
                f"FastV could not capture layer {self.config.layer - 1}'s q/k projections or position embeddings"
            )
        valid = call.valid
        batch, seq = valid.shape
        device = valid.device
        pos = torch.arange(seq, device=device)
        # last real token: left padding -> T-1; right padding -> the last 1 of the mask
        last = torch.where(valid, pos, -1).amax(dim=1).clamp_min(0)  # (B,)
        h, g, d = self._n_heads, self._n_kv, self._head_dim
        q = call.q.gather(1, last.view(batch, 1, 1).expand(batch, 1, call.q.shape[-1]))  # (B, 1, H*D)
        q = q.view(batch, h, d)
        k = call.k.view(batch, seq, g, d)
        attn = self._rank_attn
        if hasattr(attn, "q_norm") and hasattr(attn, "k_norm"):  # Qwen3-style per-head norms
            q, k = attn.q_norm(q), attn.k_norm(k)
        if torch.is_tensor(call.cos_sin) and call.cos_sin.is_complex():  # Llama 4
            q, k = _llama4_qk(attn, q, k, call.cos_sin, last, batch)
        elif (pairing := _pairing(attn)) is not None:
            q, k = rotary.rotate_last_and_all(q, k, call.cos_sin, last, batch, d, pairing)
        q = q.view(batch, g, h // g, d)  # head i uses kv head i // (H/G) (repeat_kv order)
        logits = torch.einsum("bgrd,btgd->bgrt", q, k.to(q.dtype)) * self._scaling  # (B, G, H/G, T)
        return self._keep(call, logits, last, pos)

    def _keep(self, call: _Call, logits: torch.Tensor, last: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept positions from layer K-1's logits of the last token (see :meth:`_select`)."""
        valid, visual = call.valid, call.visual
        batch, seq = valid.shape
        device = valid.device
        allowed = valid & (pos[None, :] <= last[:, None])  # (B, T)
        logits = logits.float().masked_fill(~allowed[:, None, None, :], float("-inf"))
        scores = torch.softmax(logits, dim=-1).mean(dim=(1, 2))  # (B, T) float32
        scores = scores.masked_fill(~visual, float("-inf"))
        grp = call.group
        if grp > 1:  # every expanded copy uses its group's first row (identical pruning per group)
            scores = scores.view(batch // grp, grp, seq)[:, :1].expand(-1, grp, -1).reshape(batch, seq)
        order = torch.argsort(scores, dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, pos.expand(batch, seq))
        keep_n = torch.tensor(call.keep_n, device=device).repeat_interleave(grp)  # (B,)
        kept = (valid & ~visual) | (visual & (rank < keep_n[:, None]))  # (B, T)
        self.last_kept_mask = (visual & kept)[::grp]
        # per prefill row r (prepared row r // grp): valid tokens - visual + kept visual
        lengths = [nv - call.n_vis[r // grp] + call.keep_n[r // grp] for r, nv in enumerate(call.n_valid)]
        max_len = max(max(lengths), 1)
        sort_key = torch.where(kept, pos, pos + seq)  # kept first, each group in original order
        kept_idx = torch.sort(sort_key, dim=1).indices[:, :max_len]  # (B, L')
        slot_valid = torch.arange(max_len, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
        return kept_idx, slot_valid

    # ------------------------------------------------------------------ masks
    @staticmethod
    def _to_mask(allowed: torch.Tensor, dtype: torch.dtype, impl: str) -> torch.Tensor:
        """``(B, q, kv)`` bool -> the 4D ``(B, 1, q, kv)`` mask the attention implementation takes."""
        allowed = allowed[:, None]
        if impl == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )

    def _prefill_mask(self, call: _Call, dtype: torch.dtype) -> torch.Tensor:
        """Causal-by-original-position mask over the ``L'`` slots; padded slots masked as keys.

        Every slot may attend to itself so that padded query rows stay finite.
        """
        p = call.kept_idx  # (B, L')
        allowed = (p[:, None, :] <= p[:, :, None]) & call.slot_valid[:, None, :]
        allowed = allowed | torch.eye(p.shape[1], dtype=torch.bool, device=p.device)
        return self._to_mask(allowed, dtype, self._attn_impl())

    def _decode_mask(self, call: _Call, q_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Key mask of the new tokens over layers ``>= K``' cache: ``[L' prompt slots | after-prompt tokens]``."""
        prompt = call.prompt
        kv_len = call.past_k + q_len
        n_after = kv_len - prompt.slot_valid.shape[1]
        batch = prompt.slot_valid.shape[0]
        if call.attn2d is not None:
            if call.attn2d.shape[1] != prompt.prompt_len + n_after:
                raise RuntimeError(
                    f"FastV: attention_mask length {call.attn2d.shape[1]} does not match the pruned cache "
                    f"(prompt {prompt.prompt_len} + {n_after} later tokens); was the cache modified?"
                )
            after = call.attn2d[:, prompt.prompt_len:].to(device).bool()
        else:
            after = torch.ones(batch, n_after, dtype=torch.bool, device=device)
        key_valid = torch.cat([prompt.slot_valid.to(device), after], dim=1)  # (B, kv)
        kpos = torch.arange(kv_len, device=device)
        qpos = kpos[kv_len - q_len:]
        causal = kpos[None, :] <= qpos[:, None]  # (q, kv)
        allowed = (key_valid[:, None, :] & causal[None]) | (kpos[None, :] == qpos[:, None])[None]
        return self._to_mask(allowed, dtype, self._attn_impl())

    # ------------------------------------------------------------------ decoder layers K..L-1
    def _make_layer_forward(self, orig: Callable, first: bool, last: bool) -> Callable:
        return PatchedMethod(self, "_layer_forward", orig, (first, last))

    def _layer_forward(self, orig: Callable, first: bool, last: bool, *args: Any, **kwargs: Any) -> Any:
        call = self._call
        if call is None or call.mode is None:
            return orig(*args, **kwargs)
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        if rest:
            raise RuntimeError("FastV expects decoder layers to be called as layer(hidden_states, **kwargs)")
        if call.mode == "prefill":
            if first:
                self._enter_prefill(call, hidden, kwargs)
                hidden = rotary.gather_seq(hidden, call.kept_idx)
            kwargs["position_embeddings"] = call.pos_emb
            if call.pos_ids is not None:
                kwargs["position_ids"] = call.pos_ids
        else:  # decode
            if first:
                call.mask = self._decode_mask(call, hidden.shape[1], hidden.dtype, hidden.device)
        kwargs["attention_mask"] = call.mask
        out = orig(hidden, **kwargs)
        if call.mode == "prefill" and last:
            if isinstance(out, tuple):
                return (self._scatter_back(call, out[0]), *out[1:])
            return self._scatter_back(call, out)
        return out

    def _enter_prefill(self, call: _Call, hidden: torch.Tensor, kwargs: dict) -> None:
        """At layer K (prefill): rank, choose, and build the pruned layers' mask and positions."""
        call.kept_idx, call.slot_valid = self._select(call)
        call.h_in = hidden
        call.cache = kwargs.get("cache", kwargs.get("past_key_values"))
        pe = kwargs.get("position_embeddings")
        if pe is None:
            raise ValueError("FastV needs decoder layers that receive `position_embeddings` (cos, sin)")
        if torch.is_tensor(pe):  # Llama 4: one complex tensor of rotations
            call.pos_emb = rotary.gather_seq(pe, call.kept_idx)
        else:
            call.pos_emb = tuple(rotary.gather_seq(t, call.kept_idx) for t in pe)
        pid = kwargs.get("position_ids")
        if isinstance(pid, torch.Tensor) and pid.dim() == 2 and pid.shape[-1] == hidden.shape[1]:
            call.pos_ids = rotary.gather_seq(pid, call.kept_idx)
        call.mask = self._prefill_mask(call, hidden.dtype)
        call.q = call.k = None  # release

    @staticmethod
    def _scatter_back(call: _Call, out: torch.Tensor) -> torch.Tensor:
        """``(B, L', d) -> (B, T, d)``: kept slots take the layer output, every other position the
        hidden state it had entering layer K."""
        idx = call.kept_idx
        h_in = call.h_in
        src = torch.where(call.slot_valid[..., None], out, rotary.gather_seq(h_in, idx))
        return h_in.scatter(1, idx[..., None].expand(-1, -1, out.shape[-1]), src)
