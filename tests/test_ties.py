"""Ties are broken by position, and the same tokens come out on every machine (issue 22).

SPEC terms: Step 1 keeps the ``floor(N R)`` thumbnail tokens of highest importance and the
``official`` layout writes them in descending importance; Step 4 keeps each crop's
``floor(n_j r_j)`` best valid tokens. Where two tokens score the same, the one at the lower
position comes first (and is kept first) -- in the library and in every reference here.

Why this needs more than a stable sort: importances that are equal in exact arithmetic come out
of a float32 matmul an ulp apart, and which one is larger depends on the order in which the
machine's kernel sums the products (AVX2 vs AVX-512 blocking, GPU split-K). The ``official``
thumbnail order then differed between machines (CI failed on one, passed on another). The library
computes every score in float64, where the products of float32 numbers are exact and such sums
keep their ties; the keys below are built so that float32 splits the ties on any machine.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import globalcom2
import reference as ref
from conftest import family_model, make_image
from globalcom2.core import budgets, importance
from globalcom2.models import families
from test_parity import PROMPT, _forward_matches_reference, _inputs

#: The smallest float32 step above 1 is 2 ** -23: adding 2 ** -24 twice to 1 rounds back to 1 in
#: one order, and gives 1 + 2 ** -23 in another. In float64 every order gives 1 + 2 ** -23.
E = 2.0**-24
SLOTS = (0, 7, 15)  # where a head's three non-zero key values sit (permuted per patch)
PERMS = list(itertools.permutations(range(3)))


def _tied_keys(t: int, heads: int, hd: int, levels: int = 3) -> torch.Tensor:
    """(T, heads * hd) keys: token p (p >= 1) holds, in every head, ``L_p * {1, E, E}`` at the three
    ``SLOTS`` in the order ``PERMS[p % 6]``, with ``L_p`` one of ``levels`` powers of two. With an
    all-ones query the [CLS] logits are ``L_p * (1 + 2E) * scale`` exactly: tied within a level."""
    k = torch.zeros(t, heads * hd)
    values = (1.0, E, E)
    for p in range(1, t):
        level = 2.0 ** ((p // 5) % levels)  # runs of 5 tokens: ties inside and across runs
        for h in range(heads):
            for slot, src in zip(SLOTS, PERMS[p % len(PERMS)]):
                k[p, h * hd + slot] = level * values[src]
    return k


def test_cls_logits_keep_exact_ties_whatever_the_summation_order():
    """Fails with float32 logits: some permutations round to 1, others to 1 + 2 ** -23."""
    heads, hd, t = 4, 16, 1 + 60  # scale 0.25: exact
    keys = _tied_keys(t, heads, hd)[None].repeat(2, 1, 1)  # (V=2, T, D)
    q = torch.ones(2, heads * hd)
    logits = importance.cls_attention_logits(q, keys, heads, hd**-0.5)  # (V, N)
    level = torch.tensor([2.0 ** ((p // 5) % 3) for p in range(1, t)], dtype=torch.float64)
    want = level * (1 + 2 * E) * 0.25
    assert torch.equal(logits, want.expand(2, -1))
    # Step 1 on them: within a level, lower positions first.
    order = budgets.thumbnail_keep_indices(logits[0], 1.0).tolist()
    assert order == sorted(range(t - 1), key=lambda i: (-float(want[i]), i))
    # The same importance in 16-bit (a bf16 model): the products stay exact in float64.
    assert torch.equal(importance.cls_attention_logits(q.bfloat16(), keys.bfloat16(), heads, hd**-0.5), logits)


# ----------------------------------------------------------------------------------------------
# LLaVA-NeXT end to end: the tower's last-layer q/k are replaced by the tied construction, and
# what reaches the language model must equal the reference (float64, ties by index) token for token.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tied_llava_next():
    """The tiny LLaVA-NeXT with 2 vision heads (head_dim 16: the attention scale 0.25 is exact),
    its last layer's [CLS] query all ones and its keys :func:`_tied_keys`."""
    from transformers import LlavaNextForConditionalGeneration

    from globalcom2.tiny import build_config, build_processor

    processor = build_processor()
    tok = processor.tokenizer
    config = build_config("llava_next", tok)
    config.vision_config.num_attention_heads = 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlavaNextForConditionalGeneration(config).eval()
    vc = config.vision_config
    heads, hd = vc.num_attention_heads, vc.hidden_size // vc.num_attention_heads
    assert hd**-0.5 == 0.25
    tower = model.model.vision_tower
    attn = (tower.encoder if hasattr(tower, "encoder") else tower.vision_model.encoder).layers[-1].self_attn
    t = 1 + (vc.image_size // vc.patch_size) ** 2
    keys = _tied_keys(t, heads, hd)
    hooks = [
        attn.q_proj.register_forward_hook(lambda _m, _i, out: torch.ones_like(out)),
        attn.k_proj.register_forward_hook(lambda _m, _i, out: keys.to(out)[None].expand_as(out).clone()),
    ]
    yield model, processor
    for h in hooks:
        h.remove()
    globalcom2.remove(model)


@pytest.mark.parametrize("layout", ["official", "spatial"])
@pytest.mark.parametrize("hw", [(1000, 300), (20, 4000), (480, 640), (336, 336)], ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_tied_importance_feeds_the_reference_sequence(tied_llava_next, hw, layout):
    """Fails on float32 logits: the ``official`` thumbnail order (R = 1) and the top-k boundaries
    (R = 0.25) follow the kernel's rounding instead of the positions."""
    model, processor = tied_llava_next
    inputs = _inputs(processor, [hw], [PROMPT])
    try:
        # R = 1 keeps every token of a tied 480x640 image, whose official layout then needs more
        # rows than the vanilla prompt has placeholders (issue 23): R = 0.5 there.
        for ratio in (1.0 if hw != (480, 640) else 0.5, 0.25, 0.1):
            expected = _forward_matches_reference(model, inputs, ratio, layout)
            thumb = expected.images[0].thumb_keep
            assert len(set(thumb)) == len(thumb)
    finally:
        globalcom2.remove(model)


def test_tied_importance_in_a_left_padded_batch(tied_llava_next):
    model, processor = tied_llava_next
    inputs = _inputs(processor, [(1000, 300), (480, 640)], [PROMPT, "USER: <image>\nAnd this one, in more words? ASSISTANT:"])
    try:
        for layout in ("official", "spatial"):
            _forward_matches_reference(model, inputs, 0.25, layout)
    finally:
        globalcom2.remove(model)


# ----------------------------------------------------------------------------------------------
# Every family x method x layout on constant importance (every token tied), with flat images and
# padded extremes: the kept tokens are the first ones by position, and a batch equals each image
# alone.
# ----------------------------------------------------------------------------------------------

SELECTING = ("globalcom2", "fastervlm")  # the methods that select by importance (random draws its own scores; pooling selects nothing)
SIZES = [(480, 640), (20, 4000), (4000, 20), (300, 300), (1000, 300)]
RATIO = 0.25


def _flat(h: int, w: int, value: int = 128):
    from PIL import Image

    return Image.new("RGB", (w, h), (value, value, value))


def _cells():
    for family in families():
        for method in SELECTING:
            for layout in family.layouts:
                yield pytest.param(family, method, layout, id=f"{family.model_type}-{method}-{layout}")


@pytest.fixture
def constant_importance(monkeypatch):
    """Every importance signal of every family returns zeros (float64): all tokens tied."""
    from globalcom2.core import importance

    def zeros_cls(q_cls, keys, num_heads, scale):
        return torch.zeros(keys.shape[0], keys.shape[1] - 1, dtype=importance.SCORE_DTYPE, device=keys.device)

    def zeros_received(queries, keys, num_heads, scale, chunk=importance.DEFAULT_CHUNK):
        return torch.zeros(keys.shape[0], keys.shape[1], dtype=torch.float32, device=keys.device)

    def zeros_similarity(features, eps=1e-8):
        return torch.zeros(features.shape[:2], dtype=importance.SCORE_DTYPE, device=features.device)

    monkeypatch.setattr(importance, "cls_attention_logits", zeros_cls)
    monkeypatch.setattr(importance, "attention_received", zeros_received)
    monkeypatch.setattr(importance, "feature_similarity", zeros_similarity)


def _first(mask: torch.Tensor, k: int) -> torch.Tensor:
    """The first ``k`` True positions of a 1-D mask, as a mask."""
    pos = torch.nonzero(mask).reshape(-1)[:k]
    out = torch.zeros_like(mask)
    out[pos] = True
    return out


def _assert_first_by_position(plan, method: str, ratio: float) -> None:
    n = plan.thumb_importance.shape[-1]
    valid = plan.crop_valid  # (C, N)
    if method == "globalcom2":
        k_t = int(n * ratio)
        assert plan.thumb_keep.tolist() == list(range(k_t))  # descending importance = ascending position
        # Equal regions: r_j = R up to the rounding of R * (1 + sigma_j - mean(sigma)).
        torch.testing.assert_close(plan.crop_ratios, torch.full_like(plan.crop_ratios, ratio), rtol=1e-12, atol=0)
        for j in range(valid.shape[0]):
            k = math.floor(int(valid[j].sum()) * float(plan.crop_ratios[j]))
            assert torch.equal(plan.crop_keep[j], _first(valid[j], k)), f"crop {j}"
    else:  # one budget over the thumbnail and the valid crop tokens, in table order
        total = n + int(valid.sum())
        k = math.floor(total * ratio)
        assert plan.thumb_keep.tolist() == list(range(min(k, n)))
        flat = valid.reshape(-1)
        assert torch.equal(plan.crop_keep.reshape(-1), _first(flat, max(0, k - n)))


@pytest.mark.parametrize("family, method, layout", list(_cells()))
def test_constant_importance_keeps_the_first_tokens_and_batches_agree(family, method, layout, constant_importance):
    model, processor = family_model(family)
    images = [_flat(*SIZES[0])] + [make_image(*hw, seed=i) for i, hw in enumerate(SIZES[1:])]
    text = [f"{processor.image_token}\nWhat is this?"] * len(images)
    batch = processor(images=[[im] for im in images], text=text, return_tensors="pt", padding=True)  # one list per prompt
    emb = globalcom2.compress_images(model, batch, method=method, retention_ratio=RATIO, layout=layout)
    for i, plan in enumerate(emb.plans):
        _assert_first_by_position(plan, method, RATIO)
        alone = processor(images=[images[i]], text=[text[i]], return_tensors="pt")
        one = globalcom2.compress_images(model, alone, method=method, retention_ratio=RATIO, layout=layout)
        assert one.counts == [emb.counts[i]]
        assert torch.equal(one.embeddings[0], emb.embeddings[i]), f"image {i}: the batch differs from the image alone"
