"""Timed generation: one batch of samples answered with greedy decoding, with its visual-token
counts and per-sample latency (the batch's ``generate`` wall time, CUDA synchronised before each
clock read, divided by the batch size).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

from ..generation import build_prompt, greedy_kwargs, sync, to_model
from .base import Sample


@dataclass
class Answer:
    """One generated answer and its costs."""

    prediction: str
    visual_tokens: int | None
    effective_visual_tokens: float | None
    latency_ms: float


def generate_batch(model: Any, processor: Any, samples: Sequence[Sample], max_new_tokens: int) -> list[Answer]:
    """Answer a batch of samples with greedy decoding (left padding), timing ``generate``."""
    import torch

    import globalcom2

    images = []
    texts = []
    for s in samples:
        img = s.load_image()
        images.append([img] if img is not None else [])  # nested per prompt
        texts.append(build_prompt(processor, s.prompt, num_images=int(img is not None)))
    tok = getattr(processor, "tokenizer", processor)
    old_side = getattr(tok, "padding_side", None)
    try:
        if old_side is not None:
            tok.padding_side = "left"
        try:
            inputs = processor(images=images if any(images) else None, text=texts, return_tensors="pt", padding=True)
        except Exception as e:
            ids = ", ".join(repr(s.id) for s in samples)
            raise RuntimeError(f"the processor failed on sample(s) {ids}: {' '.join(str(e).split())}") from e
    finally:
        if old_side is not None:
            tok.padding_side = old_side
    inputs = to_model(inputs, model)
    input_ids = inputs["input_ids"]
    kwargs = greedy_kwargs(tok, max_new_tokens)

    applied = globalcom2.is_applied(model)
    before = globalcom2.last_stats(model) if applied else None
    with torch.no_grad():
        sync(model.device)
        t0 = time.perf_counter()
        out = model.generate(**inputs, **kwargs)
        sync(model.device)
        seconds = time.perf_counter() - t0
    seqs = out if torch.is_tensor(out) else out.sequences
    texts_out = processor.batch_decode(seqs[:, input_ids.shape[1] :], skip_special_tokens=True)

    n = len(samples)
    visual: list[int | None]
    effective: list[float | None]
    stats = globalcom2.last_stats(model) if applied else None
    if not applied:
        image_token_id = getattr(model.config, "image_token_id", None)
        if image_token_id is None:
            image_token_id = getattr(model.config, "image_token_index", None)
        counts = (input_ids == image_token_id).sum(1).tolist() if image_token_id is not None else [None] * n
        visual, effective = list(counts), [None if c is None else float(c) for c in counts]
    elif stats is not None and stats is not before and len(stats.visual_tokens) == n:
        visual = [int(v) for v in stats.visual_tokens]
        effective = [float(v) for v in stats.effective_visual_tokens]
    else:  # the method reported nothing for this call: leave the counts out rather than guess
        visual, effective = [None] * n, [None] * n
    per_sample_ms = seconds * 1000.0 / n
    return [
        Answer(text.strip(), v, e, per_sample_ms) for text, v, e in zip(texts_out, visual, effective)
    ]
