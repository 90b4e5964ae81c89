"""Count first: a model's processor writes each image's *compressed* count of placeholders.

``globalcom2.apply(model, processor=processor, ...)`` patches that one processor instance (two
instance attributes, removed by :func:`globalcom2.remove`): where it would write the vanilla
placeholders of an image (LLaVA-NeXT: 2,928 for a 672 x 672 image) it writes the number of visual
tokens the method keeps for an image of that size (``count="fixed"``: SPEC.md, "Fixed count"). The
prompt the caller holds is then the sequence the model runs: ``generate``'s lengths, logits
processors, stopping criteria, streamers, caches, attention masks, hand-written decode loops and
chat turns all see exactly what the language model sees, with no translation in between. The
patched model only computes the image features differently.

How a processor is patched (transformers 5): every processor of the supported families builds its
prompt through ``replace_image_token(image_inputs, image_idx)`` (the text standing for one image)
and reports counts through ``_get_num_multimodal_tokens(image_sizes)`` (what serving engines ask);
both are set on the instance, never on the class. The patch keeps no reference to the model: the
counts come from the model's config and the method's (:meth:`~globalcom2.models.base.Family.counter`),
so a patched processor stays small to deep-copy and pickles with its patch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ProcessorPatch", "attach", "detach", "is_patched"]

_ATTRIBUTES = ("replace_image_token", "_get_num_multimodal_tokens")
_MARK = "_globalcom2_patch"


class _Missing:
    """Marks an attribute the processor did not have before the patch (a class: survives pickling)."""


_MISSING = _Missing


class ProcessorPatch:
    """The compressed-count patch of one processor instance.

    Args:
        processor: the model's processor (a transformers ``ProcessorMixin``).
        family_cls: the model's family class (:mod:`globalcom2.models`).
        hf_config: the model's config (geometry: pinpoints, view size, ...).
        config: the applied method's config; its count must be known from the size
            (``config.fixed_count``).
    """

    def __init__(self, processor: Any, family_cls: type, hf_config: Any, config: Any) -> None:
        if not callable(getattr(processor, "replace_image_token", None)):
            raise TypeError(
                f"{type(processor).__name__} has no replace_image_token: pass the model's own processor "
                "(transformers >= 5; an image processor or a tokenizer alone cannot write the prompt)"
            )
        family_cls.check_transformers(processor=True)
        self.processor = processor
        self.family_cls = family_cls
        self.hf_config = hf_config
        self.config = config
        self._saved: dict[str, Any] = {}
        self._last: tuple[int, list[int]] | None = None
        self._last_runs: tuple[int, list[list[int]] | None] | None = None

    # -- what the processor calls -------------------------------------------------------------
    def counts(self, image_inputs: Any) -> list[int]:
        """Compressed count of every image of one processor call's image output."""
        key = id(image_inputs)
        if self._last is None or self._last[0] != key:  # one count per call, not one per image
            counter = self.family_cls.counter(self.hf_config, self.config)
            self._last = (key, counter.processed_counts(image_inputs, self.processor))
        return self._last[1]

    def runs(self, image_inputs: Any) -> list[list[int]] | None:
        """Per image, the compressed count of each view's run, for a family that writes one
        placeholder run per view (Idefics3 / SmolVLM: ``Family.processed_runs``); else None."""
        key = id(image_inputs)
        if self._last_runs is None or self._last_runs[0] != key:  # one count per call
            counter = self.family_cls.counter(self.hf_config, self.config)
            self._last_runs = (key, counter.processed_runs(image_inputs, self.processor))
        return self._last_runs[1]

    def replace_image_token(self, image_inputs: Any, image_idx: int, **kwargs: Any) -> str:
        runs = self.runs(image_inputs)
        if runs is not None:
            return self.family_cls.runs_text(self.processor, image_inputs, image_idx, runs[image_idx])
        return self.family_cls.placeholder_text(self.processor, self.counts(image_inputs)[image_idx])

    def num_multimodal_tokens(self, image_sizes: Any = None, **kwargs: Any) -> Any:
        """The processor's own report, its image token counts replaced by the compressed ones."""
        original = type(self.processor)._get_num_multimodal_tokens
        data = original(self.processor, image_sizes=image_sizes, **kwargs)
        if image_sizes is not None and getattr(data, "num_image_tokens", None) is not None:
            counter = self.family_cls.counter(self.hf_config, self.config)
            data.num_image_tokens = counter.count_visual_tokens(
                [tuple(s) for s in image_sizes], self.config, processor=self.processor
            )
        return data

    # -- patching -----------------------------------------------------------------------------
    def attach(self) -> "ProcessorPatch":
        previous = getattr(self.processor, _MARK, None)
        if isinstance(previous, ProcessorPatch):
            previous.detach()
        d = self.processor.__dict__
        self._saved = {name: d.get(name, _MISSING) for name in (*_ATTRIBUTES, _MARK)}
        d["replace_image_token"] = _Call(self, "replace_image_token")
        if hasattr(type(self.processor), "_get_num_multimodal_tokens"):
            d["_get_num_multimodal_tokens"] = _Call(self, "num_multimodal_tokens")
        d[_MARK] = self
        return self

    def detach(self) -> None:
        d = self.processor.__dict__
        if d.get(_MARK) is not self:
            return
        for name, value in self._saved.items():
            if value is _MISSING:
                d.pop(name, None)
            else:
                d[name] = value
        self._saved = {}

    def __deepcopy__(self, memo: dict[int, Any]) -> "ProcessorPatch":
        # ProcessorMixin.to_dict deep-copies the processor's __dict__ (then keeps only its
        # settings): a patch is shared, not copied, so that no tokenizer or config is copied for it.
        return self


class _Call:
    """A patched processor attribute: calls ``patch.<name>``; shared (not copied) by deepcopy."""

    def __init__(self, patch: ProcessorPatch, name: str) -> None:
        self.patch = patch
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.patch, self.name)(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> "_Call":
        return self


def attach(processor: Any, family: Any) -> ProcessorPatch:
    """Patch ``processor`` to write the compressed counts of ``family``'s method (a patched model's
    :class:`~globalcom2.models.base.Family`); returns the patch (its ``detach`` undoes it)."""
    return ProcessorPatch(processor, type(family), family.hf_config, family.vision_config).attach()


def detach(processor: Any) -> None:
    """Undo :func:`attach` on ``processor`` (harmless on an unpatched one)."""
    patch = getattr(processor, _MARK, None)
    if isinstance(patch, ProcessorPatch):
        patch.detach()


def is_patched(processor: Any) -> bool:
    """Whether ``processor`` currently writes compressed counts."""
    return isinstance(getattr(processor, _MARK, None), ProcessorPatch)
