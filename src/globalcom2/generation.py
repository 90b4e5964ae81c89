"""Prompt and generation settings shared by the CLI, the eval harness, pictures and lmms-eval.

Importing this module is cheap (torch is imported inside the functions), so the CLI can use it
at start-up.
"""

from __future__ import annotations

from typing import Any


def build_prompt(processor: Any, prompt: str, num_images: int = 1, chat_template: str | None = None) -> str:
    """The checkpoint's chat prompt for ``prompt`` with ``num_images`` images before it.

    Args:
        processor: a LLaVA-NeXT processor (its ``chat_template`` and ``image_token`` are used).
        prompt: the user's text.
        num_images: image placeholders before the text (0 for a text-only question).
        chat_template: a template overriding the processor's own.

    Returns:
        The template applied with a generation prompt; without a template, ``<image>\\n`` (the
        processor's ``image_token``) per image, then ``prompt``.
    """
    template = chat_template or getattr(processor, "chat_template", None)
    if template:
        content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
        content.append({"type": "text", "text": prompt})
        # The processor's own template is not passed explicitly: it may be a dict of named templates.
        extra = {"chat_template": chat_template} if chat_template else {}
        return processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False, **extra
        )
    image_token = getattr(processor, "image_token", None) or "<image>"
    return f"{image_token}\n" * num_images + prompt


def pad_token_id(tokenizer: Any) -> int | None:
    """The tokenizer's pad token id, else its eos token id (what ``generate`` pads a batch with)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return getattr(tokenizer, "eos_token_id", None) if pad is None else pad


def greedy_kwargs(tokenizer: Any, max_new_tokens: int) -> dict[str, Any]:
    """``generate`` keyword arguments for greedy decoding (LLaVA's evaluation setting)."""
    kwargs: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "do_sample": False, "num_beams": 1}
    pad = pad_token_id(tokenizer)
    if pad is not None:
        kwargs["pad_token_id"] = pad
    return kwargs


def pixel_key(model: Any) -> str:
    """The processor's key of the images' pixels for ``model``'s family (``Family.pixel_inputs``:
    ``pixel_values``, Phi-4-multimodal's ``image_pixel_values``); ``pixel_values`` when no family handles it."""
    from .models import family_for

    try:
        return family_for(model).pixel_inputs
    except ValueError:
        return "pixel_values"


def to_model(inputs: Any, model: Any) -> Any:
    """Processor output moved to ``model``'s device, its pixels (:func:`pixel_key`) cast to its dtype."""
    inputs = inputs.to(model.device)
    key = pixel_key(model)
    if key in inputs:
        inputs[key] = inputs[key].to(model.dtype)
    return inputs


def sync(device: Any) -> None:
    """Wait for the device's queued work (a CUDA device; a no-op elsewhere) before reading a clock."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
