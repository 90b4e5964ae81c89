"""The generation and scoring core: prompts, batched generation, continuation scoring, on any
``(model, processor)`` pair of a registered family, with no lmms-eval types."""

from __future__ import annotations

import json
from typing import Any, Callable, Iterator, Sequence

from ...generation import build_prompt, pad_token_id, pixel_key
from ._common import DEFAULT_MAX_NEW_TOKENS
from .requests import GenerationRequest, LoglikelihoodRequest, Score, _load, generation_settings, truncate_at_stops


class Runner:
    """Prompt building, batched generation and continuation scoring for a model of any registered family.

    It uses the model and processor as usual (a compression method applied with
    :func:`globalcom2.apply`, or none), with no lmms-eval types, so it can be tested alone.

    Args:
        model: a model of a registered family (compressed or not), e.g. a
            ``LlavaNextForConditionalGeneration``.
        processor: its processor; its tokenizer is set to pad on the left.
        device: where inputs go (default: the model's device).
        batch_size: requests per ``generate`` call.
        chat_template: a Jinja template replacing the processor's (None: the processor's).
        use_cache: passed to ``generate``.
        max_new_tokens: used when a request's generation_kwargs have none.
        show_progress: a tqdm bar over the batches.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        device: Any = None,
        batch_size: int = 1,
        chat_template: str | None = None,
        use_cache: bool = True,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        show_progress: bool = False,
    ) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"  # batched generation continues every row at its end
        self.device = device if device is not None else model.device
        self.batch_size = int(batch_size)
        self.chat_template = chat_template
        self.use_cache = use_cache
        self.max_new_tokens = int(max_new_tokens)
        self.show_progress = show_progress
        #: Visual tokens the language model received, per generated request (from
        #: :func:`globalcom2.last_stats`; requests without an image are not counted).
        self.visual_tokens: list[int] = []

    @property
    def image_token(self) -> str:
        return getattr(self.processor, "image_token", None) or "<image>"

    def build_prompt(self, context: str, num_images: int) -> str:
        """The checkpoint's chat prompt for ``context`` with ``num_images`` images before it.

        A context that already holds the image token places its images itself. Without a chat
        template: the processor's image token and a newline per image, then the context.
        """
        images = 0 if self.image_token in context else num_images
        return build_prompt(self.processor, context, images, chat_template=self.chat_template)

    def _inputs(self, prompts: list[str], images: list[list[Any]]) -> Any:
        """The processor's batch for ``prompts``, ``images[i]`` the images of prompt ``i`` (nested per
        prompt: a processor such as Idefics3's cannot split a flat list between several prompts)."""
        any_image = any(len(v) for v in images)
        inputs = self.processor(images=[list(v) for v in images] if any_image else None, text=prompts, return_tensors="pt", padding=True)
        inputs = inputs.to(self.device)
        key = pixel_key(self.model)
        if key in inputs:
            inputs[key] = inputs[key].to(self.model.dtype)
        return inputs

    def _record_stats(self, rows_with_images: list[bool]) -> None:
        from ...api import last_stats

        stats = last_stats(self.model)
        if stats is None or not any(rows_with_images):
            return
        counts = list(getattr(stats, "visual_tokens", []) or [])
        if len(counts) == len(rows_with_images):
            self.visual_tokens.extend(int(c) for c, has in zip(counts, rows_with_images) if has)

    def _batches(self, requests: Sequence[GenerationRequest]) -> Iterator[list[int]]:
        """Indices of ``requests`` in batches: same generation_kwargs, longest contexts first."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            key = json.dumps(dict(req.gen_kwargs or {}), sort_keys=True, default=repr)
            groups.setdefault(key, []).append(i)
        for indices in groups.values():
            indices.sort(key=lambda i: -len(requests[i].context))
            for start in range(0, len(indices), self.batch_size):
                yield indices[start:start + self.batch_size]

    def generate_until(self, requests: Sequence[GenerationRequest], on_result: Callable[[int, str], None] | None = None) -> list[str]:
        """Answers to ``requests``, in their order (see :func:`generation_settings`).

        Args:
            requests: the requests.
            on_result: called with (request index, answer) as each answer is made.
        """
        import torch

        results: list[str | None] = [None] * len(requests)
        batches = list(self._batches(requests))
        pad_id = pad_token_id(self.tokenizer)
        bar = _progress(len(batches), self.show_progress)
        for batch in batches:
            hf_kwargs, stops = generation_settings(requests[batch[0]].gen_kwargs, self.max_new_tokens)
            visuals = [_load(requests[i].visuals) for i in batch]
            prompts = [self.build_prompt(requests[i].context, len(v)) for i, v in zip(batch, visuals)]
            inputs = self._inputs(prompts, [list(v) for v in visuals])
            if stops:
                hf_kwargs.update(stop_strings=stops, tokenizer=self.tokenizer)
            with torch.inference_mode():
                out = self.model.generate(**inputs, **hf_kwargs, use_cache=self.use_cache, pad_token_id=pad_id)
            self._record_stats([bool(v) for v in visuals])
            texts = self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, text in zip(batch, texts):
                results[i] = truncate_at_stops(text, stops)
                if on_result is not None:
                    on_result(i, results[i])
            bar.update(1)
        bar.close()
        return [r if r is not None else "" for r in results]

    def _token_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def score(self, request: LoglikelihoodRequest) -> Score:
        """How likely the model finds ``request.continuation`` after the prompt (one forward pass).

        The prompt is :meth:`build_prompt` of the context; the continuation's tokens are those
        the tokenizer makes of ``prompt + continuation`` beyond the prompt's. They sit at the end
        of the sequence, after every (compressed) image, so their logits are the last ones.
        """
        import torch

        visuals = _load(request.visuals)
        prompt = self.build_prompt(request.context, len(visuals))
        full = prompt + request.continuation
        prompt_ids, full_ids = self._token_ids(prompt), self._token_ids(full)
        common = 0
        for a, b in zip(prompt_ids, full_ids):
            if a != b:
                break
            common += 1
        n_cont = len(full_ids) - common
        if n_cont <= 0:
            return Score(0.0, 0, True)
        inputs = self._inputs([full], [list(visuals)])
        with torch.inference_mode():
            logits = self.model(**inputs, use_cache=False).logits
        # A first token with nothing before it (empty prompt, no BOS) has no prediction.
        n_cont = min(n_cont, logits.shape[1] - 1)
        if n_cont <= 0:
            return Score(0.0, 0, True)
        targets = inputs["input_ids"][0, -n_cont:]
        cont_logits = logits[0, -(n_cont + 1):-1].float()
        logprobs = torch.log_softmax(cont_logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
        greedy = bool((cont_logits.argmax(dim=-1) == targets).all())
        return Score(float(logprobs.sum()), int(n_cont), greedy)

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[Score]:
        """:meth:`score` of each request, in order."""
        bar = _progress(len(requests), self.show_progress)
        results = []
        for req in requests:
            results.append(self.score(req))
            bar.update(1)
        bar.close()
        return results


def _progress(total: int, show: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="Model Responding", disable=not show)

