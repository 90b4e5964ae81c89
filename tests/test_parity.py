"""Parity of the package with the independent reference implementation (tests/reference.py).

What reaches the language model (``inputs_embeds`` and attention mask, captured by a forward
pre-hook on ``model.model.language_model``) must be exactly what SPEC.md prescribes, token for
token, for both layouts, several retention ratios and aspect ratios, in ``forward`` and in the
prefill of ``generate``, for single images and for left-padded batches.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import globalcom2
import reference as ref
from conftest import make_image

LAYOUTS = ("official", "spatial")
RATIOS = (0.25, 0.1, 1.0)
#: (height, width): landscape, wide 1x3, tall 3x1, square, portrait, and two extremes where no
#: crop token survives unpadding (no valid row / no valid column).
SIZES = [(480, 640), (300, 900), (1000, 300), (336, 336), (700, 500), (20, 4000), (4000, 20)]
PROMPT = "USER: <image>\nWhat is shown here? ASSISTANT:"

ATOL = 1e-5


class LMCapture:
    """Records the keyword arguments of every call of the language model."""

    def __init__(self, model):
        self.calls: list[dict] = []
        self.handle = model.model.language_model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, _args, kwargs):
        self.calls.append({k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    @property
    def first(self) -> dict:
        assert self.calls, "the language model was not called"
        return self.calls[0]


def _inputs(processor, sizes, texts, seeds=None):
    seeds = seeds if seeds is not None else list(range(len(sizes)))
    images = [make_image(h, w, seed=s) for (h, w), s in zip(sizes, seeds)]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def _assert_same_lm_input(call: dict, expected: ref.RefBatch) -> None:
    emb, mask = call["inputs_embeds"], call["attention_mask"]
    assert emb.shape == expected.inputs_embeds.shape, (tuple(emb.shape), tuple(expected.inputs_embeds.shape))
    torch.testing.assert_close(emb, expected.inputs_embeds, atol=ATOL, rtol=0)
    if mask is None:  # HF passes no mask for an unpadded batch (generate does so for one prompt)
        assert bool(expected.attention_mask.all())
    else:
        assert torch.equal(mask.to(expected.attention_mask.dtype), expected.attention_mask)


def _spec_counts(image: ref.RefImage) -> tuple[int, list[int], int]:
    """The SPEC's kept counts of one image, from its geometry and the reference's ratios."""
    n = image.importance.shape[1]
    k_thumb = math.floor(n * image.ratio)
    geom = image.geometry
    k_crops = [math.floor(len(v) * r) for v, r in zip(image.crop_valid, image.crop_ratios)]
    if image.layout == "official":
        newlines = 0 if geom.valid_rows == 0 or geom.valid_cols == 0 else geom.gh * geom.side
    else:
        newlines = geom.valid_rows
    return k_thumb, k_crops, newlines


def _check_counts(model, expected: ref.RefBatch) -> None:
    """The package's per-image plan and the reference both keep the SPEC's counts."""
    adapter = globalcom2.get_family(model)
    assert adapter is not None and adapter.last is not None
    plans = adapter.last.plans
    assert len(plans) == len(expected.images)
    for plan, image in zip(plans, expected.images):
        k_thumb, k_crops, newlines = _spec_counts(image)
        geom = image.geometry
        # the reference itself
        assert len(image.thumb_keep) == k_thumb
        assert [len(k) for k in image.crop_keep] == k_crops
        assert image.num_newlines == newlines
        assert image.num_tokens == k_thumb + sum(k_crops) + newlines
        # the package
        v, n = image.importance.shape
        assert plan.thumb_keep.numel() == k_thumb
        assert plan.crop_valid.sum(1).tolist() == [len(x) for x in image.crop_valid]
        assert plan.crop_keep.sum(1).tolist() == k_crops
        torch.testing.assert_close(
            plan.crop_ratios.double().cpu(), torch.tensor(image.crop_ratios, dtype=torch.float64), atol=1e-6, rtol=0
        )
        assert int((plan.index == v * n).sum()) == newlines
        assert plan.num_tokens == image.num_tokens
        # the kept sets (order is checked through the embeddings)
        assert plan.thumb_keep.tolist() == image.thumb_keep
        for j in range(geom.num_crops):
            assert plan.crop_keep[j].nonzero().flatten().tolist() == image.crop_keep[j], f"crop {j}"
    assert adapter.last.counts == [im.num_tokens for im in expected.images]


# ----------------------------------------------------------------------------------------------
# The oracle's own foundations
# ----------------------------------------------------------------------------------------------


def test_reference_hidden_state_is_the_last_layer_input(tiny):
    """hidden_states[-2] is what enters the last CLIP encoder layer (transformers 5)."""
    model, processor = tiny
    views = ref.image_views(model, *_pv_sizes(processor, (480, 640)))[0]
    tower = model.model.vision_tower
    seen = {}

    def grab(_module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    handle = tower.encoder.layers[-1].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            out = tower(views, output_hidden_states=True, return_dict=True)
    finally:
        handle.remove()
    assert len(out.hidden_states) == len(tower.encoder.layers) + 1
    assert torch.equal(seen["x"], out.hidden_states[-2])


def _pv_sizes(processor, *sizes):
    inputs = _inputs(processor, list(sizes), [PROMPT] * len(sizes))
    return inputs["pixel_values"], inputs["image_sizes"]


def test_reference_importance_is_the_cls_logit_of_the_real_attention(tiny):
    """The hand-made CLS logits equal log of the eager attention probabilities up to a constant.

    mean_h(log softmax_h) = mean_h(logit_h) - mean_h(logsumexp_h): the same map shifted per view.
    """
    from globalcom2.tiny import build_tiny_llava_next

    model, processor = tiny
    eager, _ = build_tiny_llava_next(seed=0)  # same weights, a private copy we may switch to eager
    eager.model.vision_tower.config._attn_implementation = "eager"
    views = ref.image_views(model, *_pv_sizes(processor, (700, 500)))[0]
    _, imp = ref.vision_outputs(model, views)
    with torch.no_grad():
        out = eager.model.vision_tower(views, output_attentions=True, return_dict=True)
    probs = out.attentions[-1][:, :, 0, 1:].double()  # (V, heads, N): CLS row, CLS column dropped
    log_mean = probs.log().mean(dim=1)  # (V, N)
    shift = (imp - log_mean).mean(dim=1, keepdim=True)
    torch.testing.assert_close(imp - shift, log_mean, atol=1e-4, rtol=0)
    assert float(imp.std(dim=1).min()) > 1e-3  # not a degenerate constant map


def test_reference_bilinear_resize_matches_torch():
    g = torch.Generator().manual_seed(0)
    src = torch.rand(24, 24, generator=g, dtype=torch.float64)
    for size in [(36, 48), (48, 34), (24, 72), (72, 22), (1, 5), (24, 24), (13, 1)]:
        want = F.interpolate(src[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        got = torch.tensor(ref.bilinear_resize(src.tolist(), *size), dtype=torch.float64)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_reference_geometry_matches_hf_unpad_and_processor(tiny):
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    model, processor = tiny
    for hw in SIZES:
        geom = ref.geometry(model, hw)
        grid = torch.zeros(1, geom.H, geom.W)
        rows = torch.arange(geom.H, dtype=torch.float32)[:, None].expand(geom.H, geom.W)
        cols = torch.arange(geom.W, dtype=torch.float32)[None, :].expand(geom.H, geom.W)
        un_r = unpad_image(grid + rows, torch.tensor(hw))[0]
        un_c = unpad_image(grid + cols, torch.tensor(hw))[0]
        assert tuple(un_r.shape) == (geom.valid_rows, geom.valid_cols), hw
        if un_r.numel():
            assert (int(un_r[0, 0]), int(un_c[0, 0])) == (geom.r0, geom.c0)
        inputs = _inputs(processor, [hw], [PROMPT])
        assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == geom.vanilla_count(), hw
        assert ref.num_views(model, hw) == 1 + geom.num_crops


def test_extreme_sizes_really_have_no_valid_crop_token(tiny):
    model, _ = tiny
    wide = ref.geometry(model, (20, 4000))
    assert wide.valid_rows == 0 and wide.valid_cols == wide.W and wide.num_crops > 1
    assert all(len(wide.valid_positions(j)) == 0 for j in range(wide.num_crops))
    tall = ref.geometry(model, (4000, 20))
    assert tall.valid_cols == 0 and tall.valid_rows == tall.H and tall.num_crops > 1
    assert all(len(tall.valid_positions(j)) == 0 for j in range(tall.num_crops))


# ----------------------------------------------------------------------------------------------
# Parity: forward
# ----------------------------------------------------------------------------------------------


def _forward_matches_reference(model, inputs, ratio, layout):
    """Apply GlobalCom2, run a forward pass and check what reached the LM; returns the reference."""
    expected = ref.reference_batch(model, inputs, ratio, layout)
    globalcom2.apply(model, retention_ratio=ratio, layout=layout)
    with LMCapture(model) as cap, torch.no_grad():
        model(**inputs)
    _assert_same_lm_input(cap.first, expected)
    _check_counts(model, expected)
    return expected


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("hw", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_forward_feeds_the_reference_sequence(tiny, hw, layout):
    model, processor = tiny
    inputs = _inputs(processor, [hw], [PROMPT])
    try:
        for ratio in RATIOS:
            _forward_matches_reference(model, inputs, ratio, layout)
    finally:
        globalcom2.remove(model)


def test_layouts_differ_as_specified(tiny):
    """Same kept tokens, different arrangement: official = descending thumbnail + quirk grid."""
    model, processor = tiny
    for hw in [(480, 640), (700, 500)]:  # padded rows / padded columns
        inputs = _inputs(processor, [hw], [PROMPT])
        off = ref.reference_batch(model, inputs, 0.25, "official").images[0]
        spa = ref.reference_batch(model, inputs, 0.25, "spatial").images[0]
        assert sorted(off.thumb_keep) == spa.thumb_keep and off.thumb_keep != spa.thumb_keep
        imp = off.importance[0]
        assert all(imp[a] >= imp[b] for a, b in zip(off.thumb_keep, off.thumb_keep[1:]))
        assert off.crop_keep == spa.crop_keep
        geom = off.geometry
        off_tail = off.entries[len(off.thumb_keep) :]
        spa_tail = spa.entries[len(spa.thumb_keep) :]
        off_crop = [e for e in off_tail if e[0] == "crop"]
        spa_crop = [e for e in spa_tail if e[0] == "crop"]
        assert sorted(off_crop) == sorted(spa_crop) and off_tail != spa_tail
        assert off.num_newlines == geom.H and spa.num_newlines == geom.valid_rows
        if geom.c0 > 0:
            # padded columns: a valid-list index wraps rows differently from the true position
            assert off_crop != spa_crop


# ----------------------------------------------------------------------------------------------
# Parity: generate's prefill
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ratio", (0.25, 0.1))
def test_generate_prefill_feeds_the_reference_sequence(tiny, layout, ratio):
    model, processor = tiny
    sizes = [(480, 640), (1000, 300), (20, 4000)]
    try:
        for i, hw in enumerate(sizes):
            inputs = _inputs(processor, [hw], [PROMPT], seeds=[10 + i])
            expected = ref.reference_batch(model, inputs, ratio, layout)
            globalcom2.apply(model, retention_ratio=ratio, layout=layout)
            with LMCapture(model) as cap:
                out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
            _assert_same_lm_input(cap.first, expected)
            _check_counts(model, expected)
            assert len(cap.calls) == 2  # prefill + one decoding step
            assert cap.calls[1]["inputs_embeds"].shape[1] == 1
            assert out.shape == (1, inputs["input_ids"].shape[1] + 2)
            assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    finally:
        globalcom2.remove(model)


# ----------------------------------------------------------------------------------------------
# Batches: several prompts, left padding, two images in one prompt, a text-only prompt
# ----------------------------------------------------------------------------------------------

BATCH_SIZES = [(480, 640), (300, 900), (1000, 300), (20, 4000)]
BATCH_TEXTS = [
    "USER: <image> versus <image>\nWhich is brighter? ASSISTANT:",
    "Describe <image> briefly.",
    "Just some text without any picture at all.",
    "<image>\nhi",
]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_left_padded_batch_feeds_the_reference_sequences(tiny, layout):
    model, processor = tiny
    assert processor.tokenizer.padding_side == "left"
    inputs = _inputs(processor, BATCH_SIZES, BATCH_TEXTS)
    assert bool((inputs["attention_mask"] == 0).any())  # the batch really is padded
    try:
        for ratio in (0.25, 0.1):
            expected = _forward_matches_reference(model, inputs, ratio, layout)

            with LMCapture(model) as cap:
                out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
            _assert_same_lm_input(cap.first, expected)
            pos = cap.first.get("position_ids")
            if pos is not None:  # positions count real tokens only, as for any left-padded batch
                for b, n in enumerate(expected.lengths):
                    assert pos[b, -n:].tolist() == list(range(n))
            assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    finally:
        globalcom2.remove(model)


def test_batch_rows_equal_their_single_prompt_runs(tiny):
    """Each prompt of a padded batch gets exactly what it gets alone (real positions)."""
    model, processor = tiny
    batch = _inputs(processor, BATCH_SIZES, BATCH_TEXTS)
    image_of_prompt = [[0, 1], [2], [], [3]]
    try:
        globalcom2.apply(model, retention_ratio=0.25, layout="official")
        with LMCapture(model) as cap, torch.no_grad():
            model(**batch)
        full = cap.first
        for b, imgs in enumerate(image_of_prompt):
            sizes = [BATCH_SIZES[i] for i in imgs]
            if sizes:
                alone = _inputs(processor, sizes, [BATCH_TEXTS[b]], seeds=imgs)
            else:
                alone = processor(text=[BATCH_TEXTS[b]], return_tensors="pt", padding=True)
            with LMCapture(model) as cap, torch.no_grad():
                model(**alone)
            single = cap.first["inputs_embeds"][0]
            real = full["attention_mask"][b].bool()
            assert int(real.sum()) == single.shape[0]
            torch.testing.assert_close(full["inputs_embeds"][b][real], single, atol=ATOL, rtol=0)
    finally:
        globalcom2.remove(model)


# ----------------------------------------------------------------------------------------------
# spatial with every token kept is the vanilla sequence
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_spatial_keeping_everything_is_the_vanilla_sequence(tiny, hw):
    from globalcom2.core import geometry, layouts, plans

    model, processor = tiny
    inputs = _inputs(processor, [hw], [PROMPT])
    views = ref.image_views(model, inputs["pixel_values"], inputs["image_sizes"])[0]
    feats, imp = ref.vision_outputs(model, views)
    newline = model.model.image_newline.detach()
    with torch.no_grad():
        packed, lens = model.model.pack_image_features(
            [feats], inputs["image_sizes"], vision_feature_select_strategy="default", image_newline=newline
        )
    vanilla = packed[0]
    geom = ref.geometry(model, hw)
    ones = [1.0] * geom.num_crops

    # the reference
    plan = ref.plan(imp, geom, 1.0, "spatial", ratios_override=ones)
    assert torch.equal(ref.materialize(plan.entries, feats, newline), vanilla)

    # the package, on the same features and importance
    pgeom = geometry.crop_geometry(hw, (geom.gh, geom.gw), geom.side)
    pplan = plans.plan_image(
        imp.float(), pgeom, 1.0, layout="spatial", crop_ratios=torch.ones(geom.num_crops, dtype=torch.float64)
    )
    assert torch.equal(layouts.gather_features(feats, newline, pplan.index), vanilla)
    assert pplan.num_tokens == geom.vanilla_count() == int(lens[0])


def test_ratio_one_keeps_at_most_the_vanilla_tokens(tiny):
    """At R = 1 sigma still shrinks crops below 1: every r_j <= 1, and some crop loses tokens."""
    model, processor = tiny
    inputs = _inputs(processor, [(700, 500)], [PROMPT])
    image = ref.reference_batch(model, inputs, 1.0, "spatial").images[0]
    assert all(r <= 1.0 for r in image.crop_ratios)
    assert len(image.thumb_keep) == image.importance.shape[1]
    assert image.num_tokens <= image.vanilla_count
    assert any(len(k) < len(v) for k, v in zip(image.crop_keep, image.crop_valid))
