"""The patched ``forward`` and the input preparation of every family (:class:`PatchedForward`, a
mixin of :class:`~.base.Family`): encode and compress a call's images once, shorten its image
placeholders, pass the compressed features as ``mm_encoder_outputs``, and record each prefill's
visual-token counts (and tell FastV where the visual tokens are).

The mixin reads what :class:`~.base.Family` sets up: ``model``, ``config``, ``vision_config``,
``fastv`` / ``fastv_config``, ``image_inputs``, :meth:`~.base.Family.encode`,
:meth:`~.base.Family.compress`, ``hf_config`` and ``image_token_id``.

Importing this module loads neither torch nor transformers.
"""

from __future__ import annotations

import threading
import warnings
from contextvars import ContextVar
from typing import Any, Callable

from .._lazy import lazy_module
from . import calls as _calls
from .checks import EMBEDDINGS_KWARG, bind_arguments, check_call_inputs
from .images import CompressedImages, CompressionStats

torch = lazy_module("torch")
sequence = lazy_module("globalcom2.core.sequence")


class PatchedForward:
    """``forward`` of a patched model, and :meth:`prepare_inputs`, which ``generate`` uses too."""

    def _pad_token_id(self) -> int:
        return pad_token_id_of(self.model)

    def prepare_inputs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Turn a call's keyword arguments with ``pixel_values`` into compressed ones.

        Encodes and compresses the images, shortens ``input_ids``/``attention_mask``/``labels``,
        and passes the compressed features as ``mm_encoder_outputs``.
        """
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        kwargs = dict(kwargs)
        pixel_values = kwargs.pop(self.pixel_inputs, None)
        image_inputs = {name: kwargs.pop(name, None) for name in self.image_inputs}
        given = kwargs.pop(EMBEDDINGS_KWARG, None)
        input_ids = kwargs.get("input_ids")
        if kwargs.get("mm_encoder_outputs"):
            raise ValueError(f"pass either pixel_values / {EMBEDDINGS_KWARG} or mm_encoder_outputs, not both")
        if input_ids is None:
            raise ValueError(
                "GlobalCom2 needs input_ids with image placeholder tokens when pixel_values are given "
                "(inputs_embeds are not supported: the placeholders must be shortened)"
            )
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(mask.shape)} must match input_ids {tuple(input_ids.shape)} when pixel_values are given"
            )
        if given is not None:  # precomputed embeddings: no vision tower
            if pixel_values is not None and pixel_values.shape[0] > 0:
                raise ValueError(f"pass either pixel_values or {EMBEDDINGS_KWARG}, not both")
            compressed, prompt_counts, input_ids, mask, given_runs = self._given_images(given, input_ids, mask, kwargs)
            alt_counts = None
        else:
            encoded = self.encode(pixel_values, **image_inputs)
            compressed = self.compress(encoded)
            # The prompt holds the vanilla placeholders, or already the compressed count (a processor
            # patched with apply(..., processor=...) writes it): the one expected first, the other
            # accepted (told apart in shrink_placeholders' one sync).
            forms = [list(compressed.vanilla_counts), list(compressed.counts)]
            if self.processor_patch is not None:
                forms.reverse()
            prompt_counts, alt_counts = forms
        shrink_from, shrink_to = prompt_counts, compressed.counts
        runs = self.placeholder_runs(input_ids, compressed) if given is None else given_runs
        if runs is not None:  # one run per view (Family.placeholder_runs): each shortened to its view's count
            shrink_from, shrink_to, alt_counts = runs.prompt_flat, runs.kept_flat, None
            prompt_counts = runs.prompt_totals
        shrunk = sequence.shrink_placeholders(
            input_ids,
            self.image_token_id,
            shrink_from,
            shrink_to,
            attention_mask=mask,
            labels=kwargs.get("labels"),
            pad_token_id=self._pad_token_id(),
            alt_old_counts=alt_counts,
        )
        if shrunk.form == "alt":
            prompt_counts = alt_counts
        kwargs["input_ids"] = shrunk.input_ids
        if shrunk.attention_mask is not None:
            kwargs["attention_mask"] = shrunk.attention_mask
        if kwargs.get("labels") is not None:
            kwargs["labels"] = shrunk.labels
        if kwargs.get("position_ids") is not None and shrunk.attention_mask is not None:
            # Positions of the shortened sequence, counted over real tokens as HF does for padding.
            kwargs["position_ids"] = (shrunk.attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        elif kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = torch.arange(shrunk.input_ids.shape[1], device=input_ids.device)[None].expand_as(
                shrunk.input_ids
            )
        kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=compressed.tokens)}
        # Kept for inspection: detached, so that it never holds the caller's autograd graph.
        self.last = CompressedImages(
            tokens=[t.detach() for t in compressed.tokens], plans=compressed.plans, vanilla_counts=compressed.vanilla_counts
        )
        self._check_context(shrunk.input_ids.shape[1])
        placeholders = input_ids == self.image_token_id
        if list(prompt_counts) == list(compressed.vanilla_counts):
            self._vanilla_rows = placeholders.sum(1)
        else:  # the prompt may not hold the vanilla placeholders: add them up per row
            self._vanilla_rows = _rows_total(placeholders, prompt_counts, compressed.vanilla_counts)
        return kwargs

    def _given_images(
        self, given: Any, input_ids: "torch.Tensor", mask: "torch.Tensor | None", kwargs: dict[str, Any]
    ) -> tuple[CompressedImages, list[int], "torch.Tensor", "torch.Tensor | None", Any]:
        """Precomputed :class:`~globalcom2.embeddings.ImageEmbeddings` as this call's compressed images.

        Returns the images, the placeholders per image the prompt holds (the vanilla model's or
        ``n_i``; a prompt with one placeholder per image is expanded to ``n_i`` here, in
        ``input_ids`` / ``mask`` / ``kwargs``), the possibly expanded ``input_ids`` and ``mask``,
        and, for a family with one run per view, the prompt's and the kept runs
        (:class:`~globalcom2.core.sequence.ViewRuns`, from the embeddings' ``runs``; else None).
        A prompt with one placeholder per view is expanded to the kept runs here.
        """
        # Recognised by what it carries, not by its class: globalcom2.embeddings sits above the
        # model families (it uses the public API) and is not imported from here.
        if not all(hasattr(given, a) for a in ("embeddings", "counts", "vanilla_counts", "model_type", "hidden_size")):
            raise ValueError(
                f"{EMBEDDINGS_KWARG} must be ImageEmbeddings (globalcom2.compress_images or load_embeddings), "
                f"got {type(given).__name__}"
            )
        if given.model_type != self.model_type:
            raise ValueError(
                f"these image embeddings come from a {given.model_type!r} model, this is a {self.model_type!r} one"
            )
        width = getattr(self.text_config(self.hf_config), "hidden_size", None)
        if isinstance(width, int) and given.hidden_size not in (0, width):
            raise ValueError(
                f"these image embeddings are {given.hidden_size} wide, this model's language model {width}: "
                "they come from another model"
            )
        counts = given.counts
        kept_runs, vanilla_runs = getattr(given, "runs", None), getattr(given, "vanilla_runs", None)
        if self.per_view_runs() and (kept_runs is None or vanilla_runs is None):
            raise ValueError(
                f"these image embeddings carry no per-view placeholder runs, which {self.display_name} needs "
                "(one run per view): compute them with globalcom2.compress_images on this model"
            )
        if not self.per_view_runs():
            kept_runs = None
        views = None if kept_runs is None else sum(len(r) for r in kept_runs)
        found = int((input_ids == self.image_token_id).sum())
        form = sequence.prompt_form(found, counts, given.vanilla_counts, self.image_token_id, views=views)
        prompt_counts = list(given.vanilla_counts) if form == "vanilla" else counts
        runs = None
        if kept_runs is not None:
            runs = sequence.ViewRuns(prompt=[list(r) for r in (vanilla_runs if form == "vanilla" else kept_runs)],
                                     kept=[list(r) for r in kept_runs])
        if form == "one":
            if kwargs.get("labels") is not None:
                raise ValueError(
                    "labels need a prompt with the vanilla model's image placeholders (the processor's output), "
                    "not one placeholder per image"
                )
            input_ids, mask = sequence.expand_placeholders(
                input_ids, self.image_token_id, counts if runs is None else runs.kept_flat, attention_mask=mask,
                pad_token_id=self._pad_token_id(),
            )
            kwargs["input_ids"] = input_ids
            if mask is not None:
                kwargs["attention_mask"] = mask
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = torch.zeros_like(input_ids)  # rebuilt from the new mask below
        plans = list(given.plans) if given.plans is not None else [None] * len(counts)
        images = CompressedImages(tokens=list(given.embeddings), plans=plans, vanilla_counts=list(given.vanilla_counts))
        return images, prompt_counts, input_ids, mask, runs

    def _check_context(self, length: int) -> None:
        """Warn once per applied adapter when a prompt (visual tokens included) exceeds the language
        model's context window (``max_position_embeddings``)."""
        limit = getattr(self.text_config(self.hf_config), "max_position_embeddings", None)
        if self._warned_context or not isinstance(limit, int) or length <= limit:
            return
        self._warned_context = True
        warnings.warn(
            f"the prompt is {length} tokens long with its compressed visual tokens, more than the language model's "
            f"context window of {limit} (max_position_embeddings); expect degraded answers (this warning is shown once)",
            UserWarning,
            stacklevel=4,
        )

    def _has_images(self, kwargs: dict[str, Any]) -> bool:
        pv = kwargs.get(self.pixel_inputs)
        return pv is not None and pv.shape[0] > 0

    def _compresses(self, call: dict[str, Any]) -> bool:
        """Whether a call's images go through :meth:`prepare_inputs` (pixel_values for a vision
        method, or precomputed image embeddings for any method)."""
        return call.get(EMBEDDINGS_KWARG) is not None or (self.vision_config is not None and self._has_images(call))

    @property
    def _vanilla_rows(self) -> "torch.Tensor | None":
        """(B,) image tokens per row before compression, handed from :meth:`prepare_inputs` to the
        prefill of the same call: per thread / task (a context variable), never shared between calls."""
        held = _PENDING_ROWS.get()
        return held[1] if held is not None and held[0] == id(self) else None

    @_vanilla_rows.setter
    def _vanilla_rows(self, rows: "torch.Tensor | None") -> None:
        _PENDING_ROWS.set(None if rows is None else (id(self), rows))

    def _patched_forward(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.fastv is None:
            return self._forward(original, *args, **kwargs)
        with _FASTV_CALLS:  # FastV's layer patch holds the running call's state: one call at a time
            return self._forward(original, *args, **kwargs)

    def _forward(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``forward``: compress, then the original on the shorter sequence (in the caller's grad mode).

        Outside a patched ``generate`` (the caller's own prefill and decode steps), a compressing
        prefill leaves its :class:`~.calls.Turn` on the KV cache it fills, and a later step on that
        cache given in the caller's coordinates (the caller's growing ``attention_mask``) is
        translated to the cache's (:func:`~.calls.caller_step`)."""
        call = bind_arguments(original, args, kwargs)
        check_call_inputs(call, self.pixel_inputs)
        own = _calls.GENERATE_CALL.get() is None  # the caller's own call, not a step of a patched generate
        prefill = _calls.is_prefill(call)
        turn = None
        if self._compresses(call):
            before = call
            call = self.prepare_inputs(call)
            if own and prefill and torch.is_tensor(before.get("input_ids")):
                turn = _calls.Turn(before["input_ids"], call["input_ids"], before.get("attention_mask"), call.get("attention_mask"))
        elif own and not prefill:
            cache = _calls.given_cache(call)
            known = _calls.turn_of(cache)
            if known is not None:
                _calls.caller_step(call, known, _calls.cache_length(cache))
        if prefill and call.get("input_ids") is not None:
            self._on_prefill(call["input_ids"])
        if self.joins_image_rows:
            self._join_image_rows(call)
        out = original(**call)
        if turn is not None:
            cache = _calls.output_cache(out)
            _calls.remember_turn(cache if cache is not None else _calls.given_cache(call), turn)
        return out

    def _join_image_rows(self, call: dict[str, Any]) -> None:
        """The compressed rows of a call, one tensor per image (what ``generate`` expands per prompt
        for beams and ``num_return_sequences``), joined into the one (L, D) tensor the model's forward
        takes (:attr:`~globalcom2.models.base.Family.joins_image_rows`)."""
        image = (call.get("mm_encoder_outputs") or {}).get("image")
        rows = getattr(image, "pooler_output", None)
        if isinstance(rows, (list, tuple)):
            width = self.text_config(self.hf_config).hidden_size
            image.pooler_output = torch.cat(list(rows), dim=0) if rows else torch.zeros((0, width))

    def _on_prefill(self, input_ids: torch.Tensor) -> None:
        """Record the visual-token counts of a prefill and tell FastV where the visual tokens are."""
        visual = input_ids == self.image_token_id  # (B, T)
        self._last_visual = visual
        counts = visual.sum(1)  # (B,)
        before = self._vanilla_rows
        self._vanilla_rows = None
        if before is None or before.shape != counts.shape:  # no compression on this call
            before = counts
        rows, vanilla = torch.stack([counts, before.to(counts.device)]).tolist()  # one host sync
        lm_rows: list[int] | None = None
        effective = [float(r) for r in rows]
        if self.fastv is not None:
            self.fastv.prepare(visual)
            lm_rows = [self.fastv_config.kept(r) for r in rows]
            effective = [self.fastv_config.effective(r, kept, self.fastv.n_layers) for r, kept in zip(rows, lm_rows)]
        self.stats = CompressionStats(
            method=self.config.method,
            visual_tokens=rows,
            vanilla_visual_tokens=list(vanilla),
            lm_visual_tokens=lm_rows,
            effective_visual_tokens=effective,
        )


def pad_token_id_of(model: Any) -> int:
    """The id a shortened prompt is padded with: the model's generation config's, its text config's
    or its config's ``pad_token_id`` (the first that is set), else 0."""
    config = getattr(model, "config", None)
    for cfg in (getattr(model, "generation_config", None), getattr(config, "text_config", None), config):
        pad = getattr(cfg, "pad_token_id", None) if cfg is not None else None
        if isinstance(pad, int):
            return pad
    return 0

def _rows_total(placeholders: "torch.Tensor", prompt_counts: list[int], values: list[int]) -> "torch.Tensor":
    """(B,) per batch row, the sum of ``values[i]`` over the images ``i`` whose ``prompt_counts[i]``
    placeholders lie in that row (images in reading order of the (B, T) ``placeholders`` mask)."""
    dev = placeholders.device
    out = torch.zeros(placeholders.shape[0], dtype=torch.long, device=dev)
    if not prompt_counts:
        return out
    row_end = placeholders.sum(1).cumsum(0)  # (B,) placeholders up to and including each row
    starts = torch.tensor([0] + list(prompt_counts[:-1]), dtype=torch.long, device=dev).cumsum(0)  # (I,)
    rows = torch.searchsorted(row_end, starts, right=True).clamp_max(placeholders.shape[0] - 1)
    return out.index_add_(0, rows, torch.tensor(values, dtype=torch.long, device=dev))


#: Held by a call of a model patched with FastV, whose layer patch keeps the running call's state
#: (which visual tokens, which layer pruned them): threads take turns on such models (re-entrant:
#: generate's own forward calls, an assistant model).
_FASTV_CALLS = threading.RLock()

#: (id of the adapter, (B,) rows) from a call's prepare_inputs to its prefill, per thread / task.
_PENDING_ROWS: "ContextVar[tuple[int, Any] | None]" = ContextVar("globalcom2_pending_rows", default=None)
