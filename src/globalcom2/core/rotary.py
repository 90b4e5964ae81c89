"""Rotary position embeddings and sequence gathers as a decoder layer applies them, for code that
recomputes one layer's attention logits from captured q/k (FastV's ranking): pure tensor code.
"""

from __future__ import annotations

from typing import Any

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(..., D) -> (..., D)``: ``[x1, x2] -> [-x2, x1]`` (the HF / Llama rotary convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def batched(x: torch.Tensor, batch: int) -> torch.Tensor:
    """``(1 | B, ...) -> (B, ...)`` by broadcasting the leading dim (a view)."""
    return x.expand(batch, *x.shape[1:]) if x.shape[0] != batch else x


def gather_seq(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather along dim 1. ``x``: ``(1 | B, T, *F)``, ``idx``: ``(B, L)`` -> ``(B, L, *F)``."""
    x = batched(x, idx.shape[0])
    index = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:])
    return torch.gather(x, 1, index)


def rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    """``(..., D) -> (..., D)``: each pair ``(x[2i], x[2i + 1]) -> (-x[2i + 1], x[2i])`` (Cohere's
    rotary convention: adjacent dimensions paired, ``cos`` / ``sin`` repeated element-wise)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def rotate_last_and_all(
    q: torch.Tensor, k: torch.Tensor, cos_sin: Any, last: torch.Tensor, batch: int, d: int, rotate: Any = rotate_half
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (cos, sin) rotary embedding of ``q`` (B, H, D: each row's token at ``last`` (B,)) and
    ``k`` (B, T, G, D: every token's). ``cos_sin``: (1 | B, T, r) each, ``r <= d`` (partial rotary,
    Phi-3's ``partial_rotary_factor``: the first ``r`` dims only). ``rotate``: the layer's pairing of
    dimensions (:func:`rotate_half`, Llama's; :func:`rotate_interleaved`, Cohere's)."""
    cos, sin = cos_sin
    if cos.dim() != 3:
        raise ValueError(f"FastV expects (B, T, D) rotary cos/sin, got shape {tuple(cos.shape)}")
    cos, sin = batched(cos, batch), batched(sin, batch)  # (B, T, r)
    r = cos.shape[-1]
    cos_l = cos.gather(1, last.view(batch, 1, 1).expand(batch, 1, r))  # (B, 1, r)
    sin_l = sin.gather(1, last.view(batch, 1, 1).expand(batch, 1, r))
    q_r, k_r = q[..., :r], k[..., :r]
    q_r = q_r * cos_l + rotate(q_r) * sin_l  # (B, H, r)
    k_r = k_r * cos[:, :, None] + rotate(k_r) * sin[:, :, None]  # (B, T, G, r)
    if r == d:
        return q_r, k_r
    return torch.cat([q_r, q[..., r:]], dim=-1), torch.cat([k_r, k[..., r:]], dim=-1)
