"""The patched ``generate`` of every family (:class:`PatchedGenerate`, a mixin of
:class:`~.base.Family`): compress once, generate on the shorter prompt, and keep every count of
the prompt as it is on the vanilla model (``max_length``, the caller's logits processors and
stopping criteria, a streamer, the returned sequences); a later chat turn on the returned KV
cache is continued on the compressed cache (what a call keeps for that: :mod:`.calls`).

The mixin reads what :class:`~.base.Family` and :class:`~.patched_forward.PatchedForward` set up
(``model``, ``vision_config``, ``fastv``, ``image_inputs``, ``image_token_id``,
:meth:`~.patched_forward.PatchedForward.prepare_inputs`).

Importing this module loads neither torch nor transformers.
"""

from __future__ import annotations

from typing import Any, Callable

from .._lazy import lazy_module
from . import calls as _calls
from .checks import EMBEDDINGS_KWARG, bind_arguments
from .patched_forward import _FASTV_CALLS

torch = lazy_module("torch")


class PatchedGenerate:
    """``generate`` of a patched model (and ``generate``'s merge of its processors / criteria)."""

    def _patched_generate(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.fastv is None:
            return self._generate(original, *args, **kwargs)
        with _FASTV_CALLS:
            return self._generate(original, *args, **kwargs)

    def _generate(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``generate``: compress once (without a graph, as the vanilla ``generate`` runs), generate on
        the shorter prompt, and give the caller's prompt back in front of the new tokens.

        Everything that counts the prompt means what it means on the vanilla model: ``max_length`` /
        ``min_length`` (given or from the generation config), the caller's stopping criteria and
        logits processors (they see the vanilla prompt), and a streamer (its first ``put`` is the
        caller's prompt). A later turn that passes the returned ``past_key_values`` with the
        returned sequences (plus new text) is continued on the compressed cache.
        """
        call = bind_arguments(original, args, kwargs)
        _calls.cache_under_installed_name(call)
        input_ids = call.pop("inputs", None)
        if input_ids is None:
            input_ids = call.pop("input_ids", None)
        if (
            input_ids is not None
            and (self.vision_config is not None or call.get(EMBEDDINGS_KWARG) is not None)
            and _calls.cache_length(_calls.given_cache(call)) > 0
        ):
            return self._continue_turn(original, input_ids, call)
        if input_ids is None or not self._compresses(call):
            if input_ids is not None:
                call["inputs"] = input_ids
            return self._run_generate(original, (), call, _calls.GenerateCall(self))
        call["input_ids"] = input_ids
        with torch.no_grad():
            prepared = self.prepare_inputs(call)
        short_ids = prepared.pop("input_ids")
        return self._generate_short(original, input_ids, short_ids, prepared, call.get("attention_mask"))

    def _patched_merge(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``generate``'s merge of the processors / criteria it builds with the caller's (see
        :func:`~.calls.merge_lists`)."""
        return _calls.merge_lists(original, self, *args, **kwargs)

    @staticmethod
    def _run_generate(original: Callable[..., Any], args: tuple[Any, ...], call: dict[str, Any], state: Any) -> Any:
        """The original ``generate`` with ``state`` as this context's :data:`~.calls.GENERATE_CALL`."""
        token = _calls.GENERATE_CALL.set(state)
        try:
            return original(*args, **call)
        finally:
            _calls.GENERATE_CALL.reset(token)

    def _generate_short(
        self,
        original: Callable[..., Any],
        input_ids: torch.Tensor,
        short_ids: torch.Tensor,
        call: dict[str, Any],
        mask: "torch.Tensor | None",
    ) -> Any:
        """Run the original ``generate`` on ``short_ids`` (B, T1) standing for ``input_ids`` (B, T0)
        (whose attention mask is ``mask``; ``call`` holds the short one), and leave the turn on the
        KV cache it filled."""
        _calls.vanilla_lengths(call, input_ids.shape[1] - short_ids.shape[1], getattr(self.model, "generation_config", None))
        if call.get("streamer") is not None:
            call["streamer"] = _calls.PromptStreamer(call["streamer"], input_ids)
        out = self._run_generate(original, (short_ids,), call, _calls.GenerateCall(self, input_ids, short_ids.shape[1]))
        turn = _calls.Turn(input_ids, short_ids, mask, call.get("attention_mask"))
        for cache in (_calls.given_cache(call), _calls.output_cache(out)):
            _calls.remember_turn(cache, turn)
        return _calls.restore_prompt(out, input_ids, short_ids.shape[1])

    def _continue_turn(self, original: Callable[..., Any], input_ids: torch.Tensor, call: dict[str, Any]) -> Any:
        """A chat turn on the KV cache of an earlier compressed call (``generate``, or a prefill).

        ``input_ids`` (B, T) must start with the prompt of the call that filled that cache (the
        sequences it returned start with it): the prompt is swapped for its compressed form, which
        the cache holds (the :class:`~.calls.Turn` the call left on that very cache object, so that
        interleaved conversations never mix), and generation goes on from there, as running the
        whole conversation afresh with its images would. New images (placeholders past the cached
        tokens, their ``pixel_values`` given) are encoded and compressed as the first turn's were.
        """
        cache = _calls.given_cache(call)
        turn = _calls.turn_of(cache)
        if turn is not None and turn.matches(input_ids):
            if self.fastv is not None:
                raise ValueError(
                    "continuing a FastV generate from its past_key_values is not supported (its cache is pruned "
                    "per layer); pass the whole conversation with pixel_values and no past_key_values"
                )
            mask = call.get("attention_mask")
            short_ids = self._continued_prompt(input_ids, call, turn, _calls.cache_length(cache))
            return self._generate_short(original, input_ids, short_ids, call, mask)
        if turn is not None:
            raise ValueError(
                "these past_key_values hold a compressed conversation whose prompt the input_ids do not start with: "
                "pass the sequences returned with that cache (plus the new turn), or the whole conversation with "
                "pixel_values and no past_key_values"
            )
        cached = _calls.cache_length(cache)
        if bool((input_ids[:, cached:] == self.image_token_id).any()):
            raise ValueError(
                "past_key_values were given with image placeholders beyond the cached tokens, but they were not filled "
                "by a compressed call of this model: pass that call's returned sequences (plus the new turn) with its "
                "past_key_values, or the whole conversation with pixel_values and no past_key_values"
            )
        call["inputs"] = input_ids
        return self._run_generate(original, (), call, _calls.GenerateCall(self))

    def _continued_prompt(self, input_ids: torch.Tensor, call: dict[str, Any], turn: Any, cached: int) -> torch.Tensor:
        """The short sequence of a continued turn: the turn's short prompt, then what followed it in
        ``input_ids`` (B, T), whose new images (if their ``pixel_values`` or image embeddings are given)
        are compressed; ``call``'s attention mask and image arguments are rewritten to match."""
        t0 = turn.t0
        split = min(t0 + max(cached - turn.t1, 0), input_ids.shape[1])  # where the uncached tokens start
        head = torch.cat([turn.short_ids.to(input_ids.device), input_ids[:, t0:split]], dim=1)
        tail = input_ids[:, split:]
        mask = call.get("attention_mask")
        head_mask = tail_mask = None
        if mask is not None:
            head_mask = torch.cat([turn.head_mask().to(mask), mask[:, t0:split]], dim=1)
            tail_mask = mask[:, split:]
        images = {k: call.pop(k) for k in (self.pixel_inputs, EMBEDDINGS_KWARG, *self.image_inputs) if k in call}
        images = {k: v for k, v in images.items() if v is not None}
        if self._compresses(images) and bool((tail == self.image_token_id).any()):
            part = {"input_ids": tail, **images}
            if tail_mask is not None:
                part["attention_mask"] = tail_mask
            try:
                with torch.no_grad():
                    prepared = self.prepare_inputs(part)
            except ValueError as err:
                raise ValueError(
                    f"{err} (a continued chat turn takes the images whose placeholders follow the cached conversation, "
                    "and only those, as the vanilla model does; or pass the whole conversation with all its images and "
                    "no past_key_values)"
                ) from None
            self._vanilla_rows = None  # no prefill follows on a continued cache
            tail = prepared["input_ids"]
            if prepared.get("attention_mask") is not None:
                tail_mask = prepared["attention_mask"]
                head_mask = head_mask if head_mask is not None else torch.ones_like(head)
            call["mm_encoder_outputs"] = prepared["mm_encoder_outputs"]
        # Without new images given, those of the earlier turns are in the cache already (the vanilla
        # generate takes no pixel_values for a continued cache either).
        if head_mask is not None:
            call["attention_mask"] = torch.cat([head_mask, tail_mask], dim=1)
        return torch.cat([head, tail], dim=1)
