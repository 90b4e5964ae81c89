"""Shortening a batch of token sequences whose image placeholders now stand for fewer tokens.

The model's processor writes, for every image, as many placeholder tokens as the *vanilla* model
feeds. After compression each image needs fewer. :func:`shrink_placeholders` drops the surplus
placeholders (and the old padding) and re-pads the batch, all with tensor ops: one host sync
reads the new maximum length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

IGNORE_INDEX = -100


@dataclass
class ShrunkInputs:
    """The rewritten batch.

    Attributes:
        input_ids: (B, L') token ids with ``new_counts[i]`` placeholders for image ``i``.
        attention_mask: (B, L') 1 on real tokens, 0 on padding; None when the batch needs none
            and the caller passed none.
        labels: (B, L') labels moved along with their tokens (``-100`` on padding), or None.
        keep: (B, L) bool, which of the original positions survive.
        padding_side: "left" or "right", the side the new padding is on.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    labels: torch.Tensor | None
    keep: torch.Tensor
    padding_side: str


def infer_padding_side(attention_mask: torch.Tensor | None, default: str = "left") -> str:
    """"right" if some row ends with padding, "left" if some row starts with it, else ``default``."""
    if attention_mask is None:
        return default
    m = attention_mask.bool()
    if not bool((~m[:, -1]).any()):
        return "left" if bool((~m[:, 0]).any()) else default
    return "right"


def shrink_placeholders(
    input_ids: torch.Tensor,
    image_token_id: int,
    old_counts: Sequence[int] | torch.Tensor,
    new_counts: Sequence[int] | torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    pad_token_id: int = 0,
    padding_side: str | None = None,
) -> ShrunkInputs:
    """Keep the first ``new_counts[i]`` placeholders of image ``i``'s run and drop the rest.

    Images are numbered in reading order of the flattened batch (row by row), which is the order
    in which LLaVA-style models scatter image features into placeholders.

    Args:
        input_ids: (B, L) token ids.
        image_token_id: the placeholder id.
        old_counts: (I,) placeholders each image has now (the vanilla count).
        new_counts: (I,) placeholders each image must have, ``<= old_counts``.
        attention_mask: (B, L) or None; padding (0) positions are dropped and padding is rebuilt.
        labels: (B, L) or None.
        pad_token_id: id written into new padding.
        padding_side: "left" or "right"; inferred from ``attention_mask`` when None (left when
            there is no padding, the convention for generation).

    Returns:
        :class:`ShrunkInputs`.

    Raises:
        ValueError: when the placeholders in ``input_ids`` do not add up to ``sum(old_counts)``.
    """
    dev = input_ids.device
    bsz, length = input_ids.shape
    old = torch.as_tensor(old_counts, dtype=torch.long, device=dev).reshape(-1)  # (I,)
    new = torch.as_tensor(new_counts, dtype=torch.long, device=dev).reshape(-1)  # (I,)
    if old.shape != new.shape:
        raise ValueError(f"old_counts and new_counts differ in length: {old.numel()} vs {new.numel()}")
    is_img = input_ids == image_token_id  # (B, L)
    found, expected = int(is_img.sum()), int(old.sum())
    if found != expected:
        raise ValueError(
            f"input_ids hold {found} image placeholder tokens but the {old.numel()} image(s) need {expected} "
            "(the vanilla model's count); prepare inputs with the model's own processor "
            "(for CLIP vision towers a hand-built LlavaNextProcessor needs num_additional_image_tokens=1)"
        )
    if padding_side is None:
        padding_side = infer_padding_side(attention_mask)
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")

    flat = is_img.reshape(-1)  # (B*L,)
    ordinal = torch.cumsum(flat.long(), 0) - 1  # global index of each placeholder
    ends = torch.cumsum(old, 0)  # (I,)
    image_of = torch.searchsorted(ends, ordinal.clamp_min(0), right=True).clamp_max(max(old.numel() - 1, 0))
    if old.numel():
        rank = ordinal - (ends - old)[image_of]
        keep_img = rank < new[image_of]
    else:
        keep_img = torch.zeros_like(flat)
    keep = (~flat | keep_img).reshape(bsz, length)  # (B, L)
    if attention_mask is not None:
        keep &= attention_mask.to(dev).bool()

    lengths = keep.sum(1)  # (B,)
    new_len = int(lengths.max()) if bsz else 0
    col = torch.cumsum(keep.long(), 1) - 1  # (B, L) target column for kept tokens (right padding)
    if padding_side == "left":
        col = col + (new_len - lengths)[:, None]
    rows = torch.arange(bsz, device=dev)[:, None].expand(bsz, length)
    r, c = rows[keep], col[keep]

    ids = torch.full((bsz, new_len), pad_token_id, dtype=input_ids.dtype, device=dev)
    ids[r, c] = input_ids[keep]
    mask = None
    if attention_mask is not None or bool((lengths != new_len).any()):
        mask_dtype = attention_mask.dtype if attention_mask is not None else torch.long
        mask = torch.zeros((bsz, new_len), dtype=mask_dtype, device=dev)
        mask[r, c] = 1
    new_labels = None
    if labels is not None:
        new_labels = torch.full((bsz, new_len), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
        new_labels[r.to(labels.device), c.to(labels.device)] = labels[keep.to(labels.device)]
    return ShrunkInputs(input_ids=ids, attention_mask=mask, labels=new_labels, keep=keep, padding_side=padding_side)
