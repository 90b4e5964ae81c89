"""Shortening a batch of token sequences whose image placeholders now stand for fewer tokens.

The model's processor writes, for every image, as many placeholder tokens as the *vanilla* model
feeds. After compression each image needs fewer. :func:`shrink_placeholders` drops the surplus
placeholders (and the old padding) and re-pads the batch, all with tensor ops: one host sync
reads every number the host needs at once (the placeholders found, the new maximum length, whether
rows differ in length, which side the padding is on). :func:`expand_placeholders` goes the other
way for prompts with one placeholder per image (precomputed image embeddings, serving engines'
prompts), and :func:`prompt_form` tells which of the forms a prompt holds.
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
        form: ``"old"`` (the prompt held ``old_counts``) or ``"alt"`` (``alt_old_counts``).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    labels: torch.Tensor | None
    keep: torch.Tensor
    padding_side: str
    form: str = "old"


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
    alt_old_counts: Sequence[int] | None = None,
) -> ShrunkInputs:
    """Keep the first ``new_counts[i]`` placeholders of image ``i``'s run and drop the rest; an
    image that needs *more* than it has (the ``official`` layout's padded-row newlines near R = 1:
    SPEC.md, "no method may produce more tokens than the prompt holds placeholders for") gets its
    last placeholder repeated.

    Images are numbered in reading order of the flattened batch (row by row), which is the order
    in which LLaVA-style models scatter image features into placeholders.

    Args:
        input_ids: (B, L) token ids.
        image_token_id: the placeholder id.
        old_counts: (I,) placeholders each image has now (the vanilla count).
        new_counts: (I,) placeholders each image must have (usually ``<= old_counts``).
        attention_mask: (B, L) or None; padding (0) positions are dropped and padding is rebuilt.
        labels: (B, L) or None.
        pad_token_id: id written into new padding.
        padding_side: "left" or "right"; inferred from ``attention_mask`` when None (left when
            there is no padding, the convention for generation).
        alt_old_counts: host ints, the other form the prompt may hold (e.g. ``new_counts`` for a
            prompt that already carries the compressed count): when the placeholders do not add up
            to ``old_counts`` but to these, the prompt is read with them (found in the same sync).

    Returns:
        :class:`ShrunkInputs` (``form``: ``"old"`` or ``"alt"``, the counts the prompt held).

    Raises:
        ValueError: when the placeholders in ``input_ids`` add up to neither.
    """
    dev = input_ids.device
    bsz, length = input_ids.shape
    old, old_total = _counts_on(old_counts, dev)  # (I,)
    new, _ = _counts_on(new_counts, dev)  # (I,)
    if old.shape != new.shape:
        raise ValueError(f"old_counts and new_counts differ in length: {old.numel()} vs {new.numel()}")
    if padding_side is not None and padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    is_img = input_ids == image_token_id  # (B, L)
    flat = is_img.reshape(-1)  # (B*L,)
    ordinal = torch.cumsum(flat.long(), 0) - 1  # global index of each placeholder
    ends = torch.cumsum(old, 0)  # (I,)
    image_of = torch.searchsorted(ends, ordinal.clamp_min(0), right=True).clamp_max(max(old.numel() - 1, 0))
    if old.numel():
        rank = ordinal - (ends - old)[image_of]
        keep_img = rank < new[image_of]
        # Copies of each position: 1 if kept; an image's last placeholder also carries its growth.
        grow = (new - old).clamp_min(0)[image_of]
        extra = torch.where(flat & (rank == old[image_of] - 1), grow, torch.zeros_like(grow))
    else:
        keep_img = torch.zeros_like(flat)
        extra = torch.zeros_like(flat, dtype=torch.long)
    keep = (~flat | keep_img).reshape(bsz, length)  # (B, L)
    mask_in = attention_mask.to(dev).bool() if attention_mask is not None else None
    if mask_in is not None:
        keep &= mask_in
    rep = keep.long() + extra.reshape(bsz, length) * keep.long()  # (B, L)
    lengths = rep.sum(1)  # (B,)

    # The one host sync: every number the host needs, read together.
    zero = torch.zeros((), dtype=torch.long, device=dev)
    longest = lengths.max() if bsz else zero
    wanted = [is_img.sum(), old.sum() if old_total is None else zero, longest, (lengths != longest).any().long(),
              extra.sum(), lengths.sum()]
    infer = padding_side is None and mask_in is not None and length > 0
    if infer:
        wanted += [(~mask_in[:, -1]).any().long(), (~mask_in[:, 0]).any().long()]
    numbers = torch.stack(wanted).tolist()
    found, new_len, ragged = numbers[0], numbers[2], bool(numbers[3])
    grows, total = numbers[4] > 0, numbers[5]
    expected = numbers[1] if old_total is None else old_total
    if found != expected and alt_old_counts is not None and found == sum(int(c) for c in alt_old_counts):
        out = shrink_placeholders(
            input_ids, image_token_id, alt_old_counts, new_counts, attention_mask, labels, pad_token_id, padding_side
        )
        out.form = "alt"
        return out
    if found != expected:
        raise ValueError(
            f"input_ids hold {found} image placeholder tokens but the {old.numel()} image(s) need {expected} "
            "(the vanilla model's count); prepare inputs with the model's own processor "
            "(for CLIP vision towers a hand-built LlavaNextProcessor needs num_additional_image_tokens=1)"
        )
    if padding_side is None:
        # infer_padding_side's rule: "right" if some row ends with padding, else "left".
        padding_side = "right" if infer and numbers[6] else "left"
    if grows:
        return _regrow(input_ids, attention_mask, labels, keep, rep, lengths, new_len, total, pad_token_id, padding_side, ragged)

    col = torch.cumsum(keep.long(), 1) - 1  # (B, L) target column for kept tokens (right padding)
    if padding_side == "left":
        col = col + (new_len - lengths)[:, None]
    # Flat target of every position; dropped ones go to one spare slot past the end (no boolean
    # indexing: that would read the number of kept tokens on the host once more).
    spare = bsz * new_len
    rows = torch.arange(bsz, device=dev)[:, None] * new_len
    target = torch.where(keep, rows + col, torch.full((), spare, dtype=torch.long, device=dev)).reshape(-1)

    def scatter(values: torch.Tensor, fill: int | float, dtype: torch.dtype) -> torch.Tensor:
        out = torch.full((spare + 1,), fill, dtype=dtype, device=values.device)
        out.scatter_(0, target.to(values.device), values.reshape(-1).to(dtype))
        return out[:spare].reshape(bsz, new_len)

    ids = scatter(input_ids, pad_token_id, input_ids.dtype)
    mask = None
    if attention_mask is not None or ragged:
        mask_dtype = attention_mask.dtype if attention_mask is not None else torch.long
        mask = scatter(torch.ones_like(input_ids, dtype=mask_dtype), 0, mask_dtype)
    new_labels = None
    if labels is not None:
        new_labels = scatter(labels, IGNORE_INDEX, labels.dtype)
    return ShrunkInputs(input_ids=ids, attention_mask=mask, labels=new_labels, keep=keep, padding_side=padding_side)


def _regrow(input_ids, attention_mask, labels, keep, rep, lengths, new_len, total, pad_token_id, padding_side, ragged):
    """:func:`shrink_placeholders` where some image grows: every position is written ``rep`` times
    (sizes known from the one sync, so no further one); repeated placeholders get ``-100`` labels."""
    dev = input_ids.device
    bsz, length = input_ids.shape
    start = rep.cumsum(1) - rep  # (B, L) first output column of each position (right padding)
    if padding_side == "left":
        start = start + (new_len - lengths)[:, None]
    flat_rep = rep.reshape(-1)
    src = torch.repeat_interleave(torch.arange(bsz * length, device=dev), flat_rep, output_size=total)  # (T,)
    first = torch.repeat_interleave(flat_rep.cumsum(0) - flat_rep, flat_rep, output_size=total)
    offset = torch.arange(total, device=dev) - first  # copy number within a run
    rows, cols = src // length, start.reshape(-1)[src] + offset

    def place(values: torch.Tensor, fill: int | float, dtype: torch.dtype, copies: int | float | None = None) -> torch.Tensor:
        out = torch.full((bsz, new_len), fill, dtype=dtype, device=dev)
        vals = values.reshape(-1).to(dtype)[src]
        if copies is not None:
            vals = torch.where(offset > 0, torch.full((), copies, dtype=dtype, device=dev), vals)
        out[rows, cols] = vals
        return out

    ids = place(input_ids, pad_token_id, input_ids.dtype)
    mask = None
    if attention_mask is not None or ragged:
        mask_dtype = attention_mask.dtype if attention_mask is not None else torch.long
        mask = place(torch.ones_like(input_ids, dtype=mask_dtype), 0, mask_dtype)
    new_labels = place(labels, IGNORE_INDEX, labels.dtype, copies=IGNORE_INDEX) if labels is not None else None
    return ShrunkInputs(input_ids=ids, attention_mask=mask, labels=new_labels, keep=keep, padding_side=padding_side)


def _counts_on(counts: Sequence[int] | torch.Tensor, device: torch.device) -> tuple[torch.Tensor, int | None]:
    """(I,) long counts on ``device`` and their sum when the host knows it (a sequence of ints;
    None for a tensor: then it is read with the one sync). Host values reach the device with a
    non-blocking copy (a blocking one would wait for the device)."""
    if torch.is_tensor(counts):
        return counts.to(device=device, dtype=torch.long, non_blocking=True).reshape(-1), None
    values = [int(c) for c in counts]
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True), sum(values)


def prompt_form(
    found: int, counts: Sequence[int], vanilla_counts: Sequence[int], image_token_id: int, views: int | None = None
) -> str:
    """Which placeholders a prompt with ``found`` of them holds for images of ``counts`` tokens:
    ``"compressed"`` (``n_i`` each), ``"vanilla"`` (the vanilla model's) or ``"one"`` (one each);
    ``ValueError`` for none of them (checked in this order). ``views``: the images' placeholder
    runs in all, for a model that writes one run per view (:class:`ViewRuns`); ``"one"`` is then
    one placeholder per view (the text between the runs kept), never one per image."""
    if found == sum(counts):
        return "compressed"
    if found == sum(vanilla_counts):
        return "vanilla"
    if found == (len(counts) if views is None else views):
        return "one"
    one = "one per image" if views is None else f"one per view ({views}: this model writes one placeholder run per view)"
    raise ValueError(
        f"the prompt holds {found} image placeholder tokens (id {image_token_id}), but these {len(counts)} image "
        f"embedding(s) need {sum(counts)} ({'+'.join(map(str, counts)) or '0'}), or {one}, or the vanilla "
        f"model's {sum(vanilla_counts)}"
    )


def expand_placeholders(
    input_ids: torch.Tensor,
    image_token_id: int,
    counts: Sequence[int] | torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int = 0,
    padding_side: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Repeat the one placeholder of image ``i`` ``counts[i]`` times (images in reading order).

    Args:
        input_ids: (B, L) with exactly one placeholder per image.
        image_token_id: the placeholder id.
        counts: (I,) placeholders each image must have.
        attention_mask: (B, L) or None; padding (0) is dropped and rebuilt on the same side.
        pad_token_id: id written into new padding.
        padding_side: "left"/"right"; inferred from ``attention_mask`` (left without padding).

    Returns:
        ``(input_ids, attention_mask)``, (B, L'); the mask is None when none was given and the
        rows come out equally long.
    """
    dev = input_ids.device
    bsz, length = input_ids.shape
    counts_t = torch.as_tensor(counts, dtype=torch.long, device=dev).reshape(-1)
    is_img = input_ids == image_token_id
    if int(is_img.sum()) != counts_t.numel():
        raise ValueError(f"expected one image placeholder per image ({counts_t.numel()}), found {int(is_img.sum())}")
    side = padding_side or infer_padding_side(attention_mask)
    rep = torch.ones_like(input_ids, dtype=torch.long)
    rep = rep.masked_scatter(is_img, counts_t)  # (B, L) copies of each position
    if attention_mask is not None:
        rep = rep * attention_mask.to(dev).bool().long()
    lengths = rep.sum(1)  # (B,)
    new_len = int(lengths.max()) if bsz else 0
    start = rep.cumsum(1) - rep  # (B, L) first output column of each position (right padding)
    if side == "left":
        start = start + (new_len - lengths)[:, None]
    flat_rep = rep.reshape(-1)
    src = torch.repeat_interleave(torch.arange(bsz * length, device=dev), flat_rep)  # (T,) source of each output
    first = torch.repeat_interleave(flat_rep.cumsum(0) - flat_rep, flat_rep)
    offset = torch.arange(src.numel(), device=dev) - first  # copy number within a run
    rows, cols = src // length, start.reshape(-1)[src] + offset
    ids = torch.full((bsz, new_len), pad_token_id, dtype=input_ids.dtype, device=dev)
    ids[rows, cols] = input_ids.reshape(-1)[src]
    mask = None
    if attention_mask is not None or bool((lengths != new_len).any()):
        mask = torch.zeros((bsz, new_len), dtype=attention_mask.dtype if attention_mask is not None else torch.long, device=dev)
        mask[rows, cols] = 1
    return ids, mask


# -- one placeholder run per view ---------------------------------------------------------------
# Some processors write an image as one placeholder run per view with text between the runs
# (Idefics3 / SmolVLM: ``<fake_token_around_image><row_1_col_1><image>*L ... <global-img><image>*L``;
# Llama 4's tiles likewise). SPEC.md: "every view keeps its own placeholder run, shortened to that
# view's kept count". :func:`shrink_placeholders` already keeps the first ``new[i]`` placeholders
# of run ``i`` and every other token, so a family hands it one count per *run* (``ViewRuns``'s flat
# lists) instead of one per image; the text between runs stays. :func:`tagged_runs` reads the runs.


@dataclass
class ViewRuns:
    """Per image, the length of each of its placeholder runs (one per view, in prompt order).

    Attributes:
        prompt: per image, the placeholders each run holds in the prompt (the vanilla count, or
            what a count-first processor wrote).
        kept: per image, the placeholders each run must hold for the language model (the view's
            kept count; with every token kept, ``prompt`` of a vanilla prompt).
    """

    prompt: list[list[int]]
    kept: list[list[int]]

    @property
    def prompt_flat(self) -> list[int]:
        return [c for runs in self.prompt for c in runs]

    @property
    def kept_flat(self) -> list[int]:
        return [c for runs in self.kept for c in runs]

    @property
    def prompt_totals(self) -> list[int]:
        return [sum(runs) for runs in self.prompt]


def tagged_runs(
    input_ids: torch.Tensor, image_token_id: int, tag_ids: Sequence[int] | None = None
) -> list[list[tuple[int, int, int]]]:
    """Per batch row, its views as ``(tag id, tag position, run length)`` in reading order (one
    host copy of ``input_ids``).

    With ``tag_ids`` (the ids of the text that opens a view, e.g. ``<row_1_col_1>`` and
    ``<global-img>``), every tag opens a view and its run is the placeholders right after it (0 when
    a view kept no token). Without, every maximal run of placeholders is a view and its tag is the
    token before it (-1 at the start of a row): enough for a prompt whose runs are all non-empty
    (the processor's vanilla prompt).
    """
    rows = input_ids.detach().cpu().tolist()
    tags = set(int(t) for t in tag_ids) if tag_ids is not None else None
    out: list[list[tuple[int, int, int]]] = []
    for row in rows:
        views: list[tuple[int, int, int]] = []
        i, n = 0, len(row)
        while i < n:
            tok = row[i]
            if tags is not None and tok in tags:
                j = i + 1
                while j < n and row[j] == image_token_id:
                    j += 1
                views.append((tok, i, j - i - 1))
                i = j
            elif tags is None and tok == image_token_id:
                j = i
                while j < n and row[j] == image_token_id:
                    j += 1
                views.append((row[i - 1] if i > 0 else -1, i - 1, j - i))
                i = j
            else:
                i += 1
        out.append(views)
    return out
