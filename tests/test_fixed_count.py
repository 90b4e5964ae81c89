"""``count="fixed"`` (SPEC.md, "Fixed count") and the count known from the image size alone.

* :func:`fixed_budgets` against the SPEC's procedure written out literally (quotas, capping rounds,
  largest remainder, ties to the lower crop index);
* the batched planner equal to the per-image one with ``count="fixed"``;
* :func:`globalcom2.visual_token_counts` equal to what :func:`globalcom2.compress_images` produces,
  on every family x vision method x layout, extreme sizes and ratios;
* same size, other content: the same count;
* the ``official`` layout near R = 1 on a padded image needs more placeholders than the vanilla
  prompt has: the prompt grows, it does not crash (issue 23, defect 1).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

import globalcom2
from conftest import family_model, make_image
from globalcom2.core import budgets
from globalcom2.core import plans as P
from globalcom2.core.batch import plan_batch
from globalcom2.core.sequence import IGNORE_INDEX, shrink_placeholders
from globalcom2.methods import language_config, make_config, method_names, vision_config
from globalcom2.models import families
from test_batch import _image, assert_same_plan

SIZES = [(1, 2000), (2000, 1), (10, 10), (337, 335), (1200, 1150), (480, 640)]
RATIOS = [1e-3, 0.1, 0.25, 0.5, 0.99, 1.0]
VISION_METHODS = [m for m in method_names() if language_config(make_config(m)) is None]


def spec_budgets(n: list[int], r: list[float], ratio: float) -> list[int]:
    """SPEC.md's "Fixed count", step by step, in Python floats."""
    c = len(n)
    total = math.floor(ratio * sum(n))
    w = [n[j] * r[j] for j in range(c)]
    capped = [False] * c
    while True:  # a crop whose quota exceeds n_j gets n_j; the rest is apportioned again
        left = total - sum(n[j] for j in range(c) if capped[j])
        free = [j for j in range(c) if not capped[j] and n[j] > 0]
        w_sum = sum(w[j] for j in free)
        weights = {j: w[j] for j in free} if w_sum > 0 else {j: float(n[j]) for j in free}
        w_sum = sum(weights.values())
        quota = {j: (left * weights[j] / w_sum if w_sum > 0 else 0.0) for j in free}
        over = [j for j in free if quota[j] > n[j]]
        if not over:
            break
        for j in over:
            capped[j] = True
    b = [n[j] if capped[j] else 0 for j in range(c)]
    for j in free:
        b[j] = min(math.floor(quota[j]), n[j])
    leftover = total - sum(b)
    order = sorted((j for j in free if b[j] < n[j]), key=lambda j: (-(quota[j] - math.floor(quota[j])), j))
    for j in order[:leftover]:
        b[j] += 1
    return b


def test_fixed_budgets_follow_the_spec_and_sum_to_the_total():
    rng = random.Random(0)
    for trial in range(400):
        c = rng.randint(1, 9)
        n = [rng.choice([0, 1, 5, 24, 576, rng.randint(0, 600)]) for _ in range(c)]
        ratio = rng.choice([1e-3, 0.1, 0.25, 0.5, 0.99, 1.0, rng.random()])
        if trial % 3 == 0:  # the published rule: r_j = min(1, R (1 + sigma_j - mean sigma))
            sigma = [rng.random() for _ in range(c)]
            total = sum(sigma)
            sigma = [s / total for s in sigma]
            r = [min(1.0, ratio * (1 + s - sum(sigma) / c)) for s in sigma]
        else:  # anything in [0, 1], ties and zeros included
            r = [rng.choice([0.0, ratio, 1.0, rng.random()]) for _ in range(c)]
        got = budgets.fixed_budgets(torch.tensor(n), torch.tensor(r, dtype=torch.float64), ratio).tolist()
        assert got == spec_budgets(n, r, ratio), (n, r, ratio)
        assert sum(got) == math.floor(ratio * sum(n)) and all(0 <= b <= m for b, m in zip(got, n))


def test_fixed_budgets_of_a_padded_batch_equal_each_row_alone():
    rng = random.Random(1)
    rows = []
    for _ in range(12):
        c = rng.randint(1, 6)
        rows.append(([rng.randint(0, 50) for _ in range(c)], [rng.random() for _ in range(c)]))
    cm = max(len(n) for n, _ in rows)
    n_pad = torch.tensor([n + [0] * (cm - len(n)) for n, _ in rows])
    r_pad = torch.tensor([r + [0.7] * (cm - len(r)) for _, r in rows], dtype=torch.float64)
    got = budgets.fixed_budgets(n_pad, r_pad, 0.3)
    for i, (n, r) in enumerate(rows):
        alone = budgets.fixed_budgets(torch.tensor(n), torch.tensor(r, dtype=torch.float64), 0.3)
        assert got[i, : len(n)].tolist() == alone.tolist() and not got[i, len(n) :].any()


@pytest.mark.parametrize("layout", ["official", "spatial"])
def test_batched_fixed_plans_equal_the_per_image_plans(layout):
    rng, gen = random.Random(5), torch.Generator().manual_seed(5)
    for trial in range(24):
        side = rng.choice([4, 5, 6, 8])
        batch = [_image(rng, side, gen, levels=rng.choice([None, 1, 4])) for _ in range(rng.randint(1, 6))]
        imps, geoms = [b[0] for b in batch], [b[1] for b in batch]
        ratio = rng.choice([0.25, 0.1, 0.5, 1.0, 0.02])
        allocation = rng.choice(["softmax_sum", "softmax_max", "uniform", "topk_count"])
        got = plan_batch(imps, geoms, ratio, layout, allocation=allocation, count="fixed")
        for plan, imp, geom in zip(got.plans, imps, geoms):
            if geom is None or imp.shape[0] == 1:
                want = P.plan_single_view(imp[0], ratio, layout)
            else:
                want = P.plan_image(imp, geom, ratio, layout, allocation=allocation, count="fixed")
                kept = int(want.crop_keep.sum())
                assert kept == math.floor(ratio * int(want.crop_valid.sum()))  # the crops' total K
            assert_same_plan(plan, want)


def _cells():
    for family in families():
        for method in VISION_METHODS:
            layouts = family.layouts if vision_config(make_config(method)).layout_field else (None,)
            for layout in layouts:
                yield pytest.param(family, method, layout, id=f"{family.model_type}-{method}-{layout or 'fixed'}")


@pytest.mark.parametrize("family, method, layout", list(_cells()))
def test_the_count_from_the_size_is_what_compression_produces(family, method, layout):
    model, processor = family_model(family)
    # The sizes the family's own processor takes (Phi-4-multimodal's refuses very extreme ratios).
    sizes = [hw for hw in SIZES if family.accepts_size(model.config, *hw, processor=processor)]
    images = [make_image(*hw, seed=i) for i, hw in enumerate(sizes)]
    batch = processor(images=[[im] for im in images], text=[f"{processor.image_token}\nWhat?"] * len(images), return_tensors="pt", padding=True)
    options = {"layout": layout} if layout else {}
    # One encoding for every ratio (the signal does not depend on R); the first ratio through the
    # public compress_images as well, to tie the two paths.
    configs = [make_config(method, retention_ratio=r, count="fixed", **options) for r in RATIOS]
    configs = [family.with_default_layout(c) if not layout else c for c in configs]
    encoder = family(model, configs[0])
    with torch.no_grad():
        encoded = encoder.encode_inputs(batch)
    public = globalcom2.compress_images(model, batch, method=method, retention_ratio=RATIOS[0], count="fixed", **options).counts
    assert public == encoder.compress(encoded, vision_config(configs[0])).counts
    for ratio, cfg in zip(RATIOS, configs):
        produced = encoder.compress(encoded, vision_config(cfg)).counts
        counted = globalcom2.visual_token_counts(
            model, sizes, method=method, retention_ratio=ratio, count="fixed", processor=processor, **options
        )
        assert counted == produced, (ratio, counted, produced)


@pytest.mark.parametrize("family", [pytest.param(f, id=f.model_type) for f in families()])
def test_same_size_other_content_same_count(family):
    model, processor = family_model(family)
    hw = (500, 800)
    images = [make_image(*hw, seed=s) for s in (1, 2, 3)]
    images.append(images[0].point(lambda v: 255 - v))  # the negative: other importance everywhere
    batch = processor(images=[[im] for im in images], text=[f"{processor.image_token}\nWhat?"] * len(images), return_tensors="pt", padding=True)
    fixed = globalcom2.compress_images(model, batch, retention_ratio=0.25, count="fixed")
    assert len(set(fixed.counts)) == 1
    assert fixed.counts == globalcom2.visual_token_counts(model, [hw] * 4, retention_ratio=0.25, count="fixed", processor=processor)


def test_the_count_refuses_what_depends_on_content(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="count='fixed'"):
        globalcom2.visual_token_counts(model, (480, 640), retention_ratio=0.25)
    with pytest.raises(ValueError, match="FastV"):
        globalcom2.visual_token_counts(model, (480, 640), method="fastv")
    with pytest.raises(ValueError, match="image_sizes"):
        globalcom2.visual_token_counts(model, [(0, 640)], retention_ratio=0.25, count="fixed")
    with pytest.raises(ValueError, match="count"):
        globalcom2.GlobalCom2Config(count="exact")
    # The uniform ablation keeps floor(n_j R) per crop: known from the size with either count.
    assert globalcom2.visual_token_counts(model, (480, 640), retention_ratio=0.25, allocation="uniform")[0] > 0


# ----------------------------------------------------------------------------------------------
# Issue 23, defect 1: more tokens than the vanilla placeholders (official layout near R = 1).
# ----------------------------------------------------------------------------------------------


def test_shrink_placeholders_grows_an_image_that_needs_more():
    img = 9
    ids = torch.tensor([[0, 0, 5, img, img, img, 6], [4, img, img, 7, img, 8, 3]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    labels = torch.where(ids == img, torch.full_like(ids, IGNORE_INDEX), ids)
    out = shrink_placeholders(ids, img, [3, 2, 1], [5, 1, 1], attention_mask=mask, labels=labels, pad_token_id=0)
    assert out.input_ids.tolist() == [[5, img, img, img, img, img, 6], [0, 0, 4, img, 7, img, 8, 3][1:]]
    assert out.attention_mask.tolist() == [[1] * 7, [0, 1, 1, 1, 1, 1, 1]]
    assert out.labels.tolist() == [[5] + [IGNORE_INDEX] * 5 + [6], [IGNORE_INDEX, 4, IGNORE_INDEX, 7, IGNORE_INDEX, 8, 3]]
    right = shrink_placeholders(ids, img, [3, 2, 1], [5, 1, 1], attention_mask=mask, padding_side="right")
    assert right.input_ids.tolist() == [[5, img, img, img, img, img, 6], [4, img, 7, img, 8, 3, 0]]


@pytest.mark.parametrize("options", [
    dict(retention_ratio=1.0, allocation="uniform"),
    dict(retention_ratio=1.0, count="fixed"),
    dict(method="fastervlm", retention_ratio=1.0),
], ids=["R1-uniform", "R1-fixed", "fastervlm-R1"])
def test_official_layout_near_one_on_padded_images_is_the_vanilla_model_on_its_sequence(tiny, options):
    """Used to raise "Image features and image tokens do not match": the official layout writes a
    newline for every crop-grid row, padded rows included, more than the vanilla placeholders."""
    model, processor = tiny
    images = [make_image(480, 640, seed=0), make_image(336, 336, seed=1)]
    inputs = processor(images=images, text=["<image>\nWhat?", "Now <image>\nand this one?"], return_tensors="pt", padding=True)
    emb = globalcom2.compress_images(model, inputs, layout="official", **options)
    assert emb.counts[0] > emb.vanilla_counts[0]  # the case at hand
    with torch.no_grad():
        want = model(**globalcom2.embed_prompt(model, emb, inputs["input_ids"], inputs["attention_mask"])).logits[:, -1]
        globalcom2.apply(model, layout="official", **options)
        try:
            got = model(**inputs).logits[:, -1]
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        finally:
            globalcom2.remove(model)
    torch.testing.assert_close(got, want)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 2)
