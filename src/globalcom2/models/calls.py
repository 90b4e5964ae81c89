"""What a patched call keeps so that the caller's view of the prompt stays the vanilla one.

A patched model takes the processor's vanilla prompt (T0 tokens) and runs a shorter one (T1) in
the language model. Everything that reads the prompt is translated here, per call and never
through state shared between calls (two threads may use one patched model):

* :class:`GenerateCall`, held in a context variable while a patched ``generate`` runs: the
  caller's prompt and the short length, for the caller's logits processors / stopping criteria
  and ``prefix_allowed_tokens_fn`` (:func:`merge_lists`), and to tell the patched ``forward``
  that its arguments are ``generate``'s own (already in the short sequence's coordinates).
* :class:`Turn`, remembered *on the KV cache object* a compressed call filled: the caller's
  prompt and the short prompt the cache holds. A chat turn or a hand-written decode step on that
  cache is translated with its own turn (never with another conversation's).
* :func:`vanilla_lengths`: ``max_length`` / ``min_length`` as ``generate`` merges them (argument,
  then the caller's generation config, then the model's), shifted by the tokens the prompt lost.

Importing this module loads neither torch nor transformers.
"""

from __future__ import annotations

import copy
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable

from .._lazy import lazy_module

torch = lazy_module("torch")

#: Attribute under which a KV cache filled by a compressed call keeps its :class:`Turn`.
TURN_ATTR = "_globalcom2_turn"


class GenerateCall:
    """A patched ``generate`` running in this thread / task (the value of :data:`GENERATE_CALL`).

    ``prompt`` (B, T0) is the caller's prompt and ``short_len`` the length of the sequence the
    language model runs in its place; both None for a call that compresses nothing (then the
    caller's objects see what they would see on the vanilla model without any translation)."""

    def __init__(self, adapter: Any, prompt: "torch.Tensor | None" = None, short_len: int = 0) -> None:
        self.adapter = adapter
        self.prompt = prompt
        self.short_len = short_len

    @property
    def delta(self) -> int:
        """Tokens the caller's prompt has beyond the short one."""
        return 0 if self.prompt is None else self.prompt.shape[1] - self.short_len


#: The patched ``generate`` call running in this context (None outside one). A context variable,
#: so that two threads generating on one model each see their own call.
GENERATE_CALL: ContextVar["GenerateCall | None"] = ContextVar("globalcom2_generate_call", default=None)


# -- KV caches ---------------------------------------------------------------------------------


def given_cache(call: dict[str, Any]) -> Any:
    """The KV cache a call was given (``cache``, or the older ``past_key_values``)."""
    cache = call.get("cache")
    return cache if cache is not None else call.get("past_key_values")


def output_cache(out: Any) -> Any:
    """The KV cache a ``forward`` / ``generate`` output carries (``cache`` or ``past_key_values``), or None."""
    if out is None or torch.is_tensor(out):
        return None
    fields = getattr(out, "__dataclass_fields__", None) or ()
    if "cache" in fields:  # a release that renamed it: reading past_key_values logs a deprecation
        return getattr(out, "cache", None)
    for name in ("cache", "past_key_values"):
        cache = getattr(out, name, None)
        if cache is not None:
            return cache
    return None


def cache_keyword() -> str:
    """The name the installed transformers' ``generate`` takes a KV cache by: ``"cache"`` from the
    release that renamed ``past_key_values`` (its generate outputs carry ``.cache``, and passing
    ``past_key_values`` gives a FutureWarning), else ``"past_key_values"`` (5.18)."""
    global _CACHE_KEYWORD
    if _CACHE_KEYWORD is None:
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        fields = getattr(GenerateDecoderOnlyOutput, "__dataclass_fields__", {})
        _CACHE_KEYWORD = "cache" if "cache" in fields else "past_key_values"
    return _CACHE_KEYWORD


_CACHE_KEYWORD: str | None = None


def cache_under_installed_name(call: dict[str, Any]) -> None:
    """A ``generate`` call's KV cache, given as ``cache`` or ``past_key_values``, passed on under
    :func:`cache_keyword`'s name (either works on every supported transformers, and no
    deprecation warning is raised from here). Both given: left to transformers."""
    want = cache_keyword()
    other = "past_key_values" if want == "cache" else "cache"
    if other in call and call.get(want) is None:
        call.pop(want, None)
        call[want] = call.pop(other)


def cache_length(cache: Any) -> int:
    get_len = getattr(cache, "get_seq_length", None)
    return int(get_len()) if get_len is not None else 0


def is_prefill(call: dict[str, Any]) -> bool:
    """Whether a forward call starts a sequence (no KV cache yet, or an empty one)."""
    cache = given_cache(call)
    if cache is None:
        return True
    get_len = getattr(cache, "get_seq_length", None)
    return get_len is not None and int(get_len()) == 0


@dataclass
class Turn:
    """The prompt of a compressed call whose KV cache can be continued: what the caller passed
    and what the language model (and so the cache) saw instead."""

    original_ids: "torch.Tensor"  # (B, T0)
    short_ids: "torch.Tensor"  # (B, T1)
    original_mask: "torch.Tensor | None"  # (B, T0)
    short_mask: "torch.Tensor | None"  # (B, T1)

    @property
    def t0(self) -> int:
        return self.original_ids.shape[1]

    @property
    def t1(self) -> int:
        return self.short_ids.shape[1]

    def matches(self, input_ids: "torch.Tensor") -> bool:
        """Whether ``input_ids`` (B, T) start with this turn's prompt."""
        t0 = self.t0
        return (
            input_ids.shape[0] == self.original_ids.shape[0]
            and input_ids.shape[1] >= t0
            and torch.equal(input_ids[:, :t0], self.original_ids.to(input_ids.device))
        )

    def head_mask(self) -> "torch.Tensor":
        """(B, T1) the short prompt's attention mask (ones where the call had none)."""
        return self.short_mask if self.short_mask is not None else torch.ones_like(self.short_ids)

    def removed(self) -> "torch.Tensor":
        """(B,) real (unpadded) tokens the compression removed from each row's prompt."""
        def real(mask: "torch.Tensor | None", ids: "torch.Tensor") -> "torch.Tensor":
            return mask.long().sum(1) if mask is not None else torch.full_like(ids[:, 0], ids.shape[1])

        real1 = real(self.short_mask, self.short_ids)
        return real(self.original_mask, self.original_ids).to(real1.device) - real1


def remember_turn(cache: Any, turn: Turn) -> None:
    """Keep ``turn`` on the cache object it describes (a cache that takes no attribute keeps none:
    continuing it is then refused or left to the vanilla model, see ``Family._continue_turn``)."""
    if cache is None:
        return
    try:
        setattr(cache, TURN_ATTR, turn)
    except (AttributeError, TypeError):  # pragma: no cover - a cache class with __slots__
        pass


def turn_of(cache: Any) -> Turn | None:
    """The :class:`Turn` a compressed call left on ``cache`` (None for any other cache)."""
    turn = getattr(cache, TURN_ATTR, None) if cache is not None else None
    return turn if isinstance(turn, Turn) else None


def caller_step(call: dict[str, Any], turn: Turn, cached: int) -> None:
    """A ``forward`` step on a cache a compressed call filled, given in the caller's coordinates
    (a hand-written decode loop: the caller's ``attention_mask`` covers the caller's prompt plus
    the tokens since), translated in place to the cache's (the short prompt plus the same tokens).

    The caller's coordinates are recognised by the mask's width: ``cached + new + (T0 - T1)``.
    ``position_ids`` given with it are read as counted over real tokens (``attention_mask.cumsum(-1)
    - 1``, as ``generate`` counts them) and lose the tokens the compression removed from each row;
    ``cache_position`` loses ``T0 - T1``."""
    ids = call.get("input_ids")
    embeds = call.get("inputs_embeds")
    new = ids if torch.is_tensor(ids) else embeds if torch.is_tensor(embeds) else None
    mask = call.get("attention_mask")
    if new is None or not torch.is_tensor(mask) or mask.dim() != 2:
        return
    t0, t1 = turn.t0, turn.t1
    rows = turn.original_ids.shape[0]
    if mask.shape[1] != cached + new.shape[1] + (t0 - t1) or mask.shape[0] % rows or mask.shape[1] < t0:
        return
    expand = mask.shape[0] // rows
    head = turn.head_mask().to(device=mask.device, dtype=mask.dtype).repeat_interleave(expand, dim=0)
    call["attention_mask"] = torch.cat([head, mask[:, t0:]], dim=1)
    pos = call.get("position_ids")
    if torch.is_tensor(pos) and pos.dim() == 2 and pos.shape[0] == mask.shape[0]:
        call["position_ids"] = pos - turn.removed().to(pos.device, pos.dtype).repeat_interleave(expand, dim=0)[:, None]
    cache_position = call.get("cache_position")
    if torch.is_tensor(cache_position):
        call["cache_position"] = cache_position - (t0 - t1)


# -- lengths -------------------------------------------------------------------------------------


def vanilla_lengths(call: dict[str, Any], delta: int, model_config: Any) -> None:
    """Shift ``max_length`` / ``min_length`` (total lengths, prompt included) by the ``delta``
    tokens the prompt lost, so that they allow as many new tokens as on the vanilla model.

    Read as ``generate`` merges them: an argument, else the caller's ``generation_config``, else
    the model's ``generation_config`` (the first that is set). ``max_new_tokens`` /
    ``min_new_tokens`` (which take precedence there too) need nothing, and neither does the
    model-agnostic default ``max_length`` (``generate`` adds the prompt length to it). A shifted
    value from a generation config is written into a copy of the caller's config (never into the
    caller's object), or passed as an argument when the caller gave no config."""
    if delta == 0:
        return
    from transformers import GenerationConfig

    given = call.get("generation_config")

    def merged(name: str) -> Any:
        if call.get(name) is not None:
            return call[name]
        for cfg in (given, model_config):
            value = getattr(cfg, name, None) if cfg is not None else None
            if value is not None:
                return value
        return None

    default_max = GenerationConfig().max_length  # None from 5.x's merged defaults; 20 on a release that sets it
    copied = None
    for key, new_key in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
        if merged(new_key) is not None:
            continue
        value = merged(key)
        if not value or (key == "max_length" and default_max is not None and value == default_max and call.get(key) is None):
            continue
        shifted = max(int(value) - delta, 0)
        if call.get(key) is not None or given is None:
            call[key] = shifted
        else:
            if copied is None:
                copied = copy.deepcopy(given)
                call["generation_config"] = copied
            setattr(copied, key, shifted)


# -- the caller's processors, criteria, prefix function and streamer ------------------------------


def merge_lists(original: Callable[..., Any], adapter: Any, *args: Any, **kwargs: Any) -> Any:
    """``generate``'s own merge of the lists it builds with the caller's, then the caller's view.

    transformers replaces a processor or criterion it builds itself by the caller's of the same
    type: the caller's objects are handed to it unchanged (so that the types match), and only
    after the merge are the caller's (and the processor made from ``prefix_allowed_tokens_fn``)
    wrapped to see the caller's prompt instead of the short one. A ``MaxLengthCriteria`` of the
    caller's becomes one of the same type counting the short prompt (``StoppingCriteriaList.max_length``
    still reads it)."""
    merged = original(*args, **kwargs)
    custom_list = args[1] if len(args) > 1 else kwargs.get("custom_list")
    state = GENERATE_CALL.get()
    if state is None or state.adapter is not adapter or state.prompt is None:
        return merged
    from transformers import LogitsProcessorList, StoppingCriteriaList
    from transformers.generation.logits_process import PrefixConstrainedLogitsProcessor
    from transformers.generation.stopping_criteria import MaxLengthCriteria

    custom = [id(item) for item in (custom_list or ())]
    out = type(merged)()
    for item in merged:
        if type(item) is MaxLengthCriteria and id(item) in custom:
            item = copy.copy(item)
            item.max_length = max(int(item.max_length) - state.delta, 0)
        elif id(item) in custom or isinstance(item, PrefixConstrainedLogitsProcessor):
            if isinstance(merged, StoppingCriteriaList):
                item = _CriteriaView(item, state.prompt, state.short_len)
            elif isinstance(merged, LogitsProcessorList):
                item = _ProcessorView(item, state.prompt, state.short_len)
        out.append(item)
    return out


def vanilla_ids(ids: "torch.Tensor", prompt: "torch.Tensor", short_len: int) -> "torch.Tensor":
    """(B', T1 + n) running sequences with the caller's (B, T0) prompt in place of the short one."""
    prefix = prompt.to(ids.device).repeat_interleave(ids.shape[0] // prompt.shape[0], dim=0)
    return torch.cat([prefix, ids[:, short_len:]], dim=1)


class _CriteriaView:
    def __init__(self, criteria: Any, prompt: "torch.Tensor", short_len: int) -> None:
        self.criteria, self.prompt, self.short_len = criteria, prompt, short_len

    def __call__(self, input_ids: "torch.Tensor", scores: "torch.Tensor", **kwargs: Any) -> Any:
        return self.criteria(vanilla_ids(input_ids, self.prompt, self.short_len), scores, **kwargs)


class _ProcessorView:
    def __init__(self, processor: Any, prompt: "torch.Tensor", short_len: int) -> None:
        self.processor, self.prompt, self.short_len = processor, prompt, short_len

    def __call__(self, input_ids: "torch.Tensor", scores: "torch.Tensor") -> "torch.Tensor":
        return self.processor(vanilla_ids(input_ids, self.prompt, self.short_len), scores)


class PromptStreamer:
    """A streamer whose first ``put`` (the prompt) is the caller's prompt, not the shortened one."""

    def __init__(self, streamer: Any, prompt: "torch.Tensor") -> None:
        self.streamer, self.prompt, self._first = streamer, prompt, True

    def put(self, value: "torch.Tensor") -> None:
        if self._first:
            self._first = False
            value = self.prompt.to(value.device)
        self.streamer.put(value)

    def end(self) -> None:
        self.streamer.end()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.streamer, name)


def restore_prompt(out: Any, original_ids: "torch.Tensor", short_len: int) -> Any:
    """Put the caller's own prompt ids back in front of the generated tokens."""
    seqs = out if torch.is_tensor(out) else getattr(out, "sequences", None)
    if seqs is None:  # pragma: no cover - unknown output type, leave it alone
        return out
    expand = seqs.shape[0] // original_ids.shape[0]
    prefix = original_ids.to(seqs.device).repeat_interleave(expand, dim=0)
    restored = torch.cat([prefix, seqs[:, short_len:]], dim=1)
    if torch.is_tensor(out):
        return restored
    out.sequences = restored
    return out
