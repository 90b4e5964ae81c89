"""One test matrix over every registered model family x method x layout.

The cells come from the registries (:func:`globalcom2.models.families`, :func:`globalcom2.methods.method_names`
and each family's ``layouts``): a new family or method is covered by registering it, not by editing
this file. Every cell checks, on the family's tiny in-code model, that the method shortens the
sequence and reports honest per-row counts, that a batch with different image sizes (left padding)
equals each prompt alone, that generation keeps the caller's prompt, that keep-all (each method's
``keep_all()`` with the ``spatial`` layout) gives the vanilla model's logits, and that ``remove``
restores bit-identical logits with nothing left on the instance.
"""

from __future__ import annotations

import pytest
import torch

import globalcom2
from globalcom2.methods import language_config, make_config, method_names, vision_config
from globalcom2.models import families

from conftest import family_model, make_image

SIZES = [(480, 640), (300, 900), (1000, 300)]
QUESTIONS = ["What is this?", "Describe it briefly, please.", "hi"]


def _layouts(family, method):
    vision = vision_config(make_config(method))
    return family.layouts if vision is not None and vision.layout_field else (None,)


CELLS = [
    pytest.param(family, method, layout, id=f"{family.model_type}-{method}-{layout or 'fixed'}")
    for family in families()
    for method in method_names()
    for layout in _layouts(family, method)
]


def _inputs(processor, idx):
    images = [make_image(*SIZES[i], seed=i) for i in idx]
    text = [f"{processor.image_token}\n{QUESTIONS[i]}" for i in idx]
    return processor(images=[[im] for im in images], text=text, return_tensors="pt", padding=True)  # one list per prompt


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _apply(model, method, layout, ratio=0.25):
    options = {"layout": layout} if layout is not None else {}
    globalcom2.apply(model, method=method, retention_ratio=ratio, **options)


def _nothing_left(model):
    assert not globalcom2.is_applied(model)
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("family, method, layout", CELLS)
def test_shortens_reports_and_restores(family, method, layout):
    model, processor = family_model(family)
    inputs = _inputs(processor, [0, 1])
    before = _logits(model, inputs)
    _apply(model, method, layout)
    assert globalcom2.get_config(model).method == method
    first, second = _logits(model, inputs), _logits(model, inputs)
    assert torch.equal(first, second)  # deterministic (random pruning included: a private seeded generator)
    adapter, stats = globalcom2.get_family(model), globalcom2.last_stats(model)
    vanilla = (inputs.input_ids == model.config.image_token_id).sum(1).tolist()
    assert stats.vanilla_visual_tokens == vanilla
    cfg = globalcom2.get_config(model)
    if vision_config(cfg) is not None:
        assert stats.visual_tokens == adapter.last.counts == [p.num_tokens for p in adapter.last.plans]
        for kept, total in zip(stats.visual_tokens, vanilla):
            assert 0.15 < kept / total < 0.4
        real = inputs.attention_mask.sum(1).tolist()
        assert first.shape[1] == max(r - v + k for r, v, k in zip(real, vanilla, stats.visual_tokens))
    else:
        assert stats.visual_tokens == vanilla and first.shape == before.shape
    lm = language_config(cfg)
    if lm is None:
        assert stats.lm_visual_tokens is None
        assert stats.effective_visual_tokens == [float(v) for v in stats.visual_tokens]
    else:
        assert stats.lm_visual_tokens == [lm.kept(v) for v in stats.visual_tokens]
        assert all(e < v for e, v in zip(stats.effective_visual_tokens, stats.visual_tokens))
    gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(gen[:, : inputs.input_ids.shape[1]], inputs.input_ids)
    globalcom2.remove(model)
    assert torch.equal(_logits(model, inputs), before)
    _nothing_left(model)


@pytest.mark.parametrize("family, method, layout", CELLS)
def test_batch_equals_each_prompt_alone(family, method, layout):
    model, processor = family_model(family)
    _apply(model, method, layout)
    batch = _inputs(processor, [0, 1, 2])
    assert (batch.attention_mask[:, 0] == 0).any()  # left padding is exercised
    last = _logits(model, batch)[:, -1]
    gen = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, batch.input_ids.shape[1]:]
    for i in range(3):
        single = _inputs(processor, [i])
        torch.testing.assert_close(_logits(model, single)[0, -1], last[i], atol=1e-4, rtol=1e-4)
        alone = model.generate(**single, max_new_tokens=4, do_sample=False)[0, single.input_ids.shape[1]:]
        assert alone.tolist() == gen[i].tolist()


@pytest.mark.parametrize(
    "family, method, layout", [c for c in CELLS if c.values[2] in (None, "spatial")]
)
def test_keep_all_is_the_vanilla_model(family, method, layout):
    model, processor = family_model(family)
    inputs = _inputs(processor, [0, 1])
    vanilla = _logits(model, inputs)
    cfg = make_config(method)
    vision, lm = vision_config(cfg), language_config(cfg)
    options = {"layout": layout} if layout is not None else {}
    parts = {}
    if vision is not None:
        parts["vision"] = type(vision).keep_all(**options)
    if lm is not None:
        parts["fastv"] = type(lm).keep_all()
    config = globalcom2.ComposedConfig(**parts) if len(parts) == 2 else next(iter(parts.values()))
    globalcom2.apply(model, config)
    out = _logits(model, inputs)
    assert globalcom2.last_stats(model).visual_tokens == globalcom2.last_stats(model).vanilla_visual_tokens
    if lm is None:
        assert torch.equal(out, vanilla)  # the same sequence, the same numbers
    else:  # FastV at R = 1 runs its layers on the gathered tokens: the same values up to float reordering
        real = inputs.attention_mask.bool()
        torch.testing.assert_close(out[real], vanilla[real], atol=1e-4, rtol=1e-4)


DRAWN = [c for c in CELLS if c.values[2] in (None, c.values[0].layouts[0])]  # one layout per family x method


@pytest.mark.parametrize("family, method, layout", DRAWN)
def test_every_method_is_drawn(family, method, layout):
    """``visualize`` draws any registered method on any family from the plans' kept masks."""
    pytest.importorskip("matplotlib")
    from globalcom2.visualize import visualize

    model, processor = family_model(family)
    options = {"layout": layout} if layout is not None else None
    try:
        vis = visualize(model, processor, make_image(*SIZES[0]), (0.25,), method=method, options=options)
    except ValueError as e:  # a documented combination pictures cannot draw (FastV after pooling)
        assert "not supported" in str(e)
        pytest.skip(str(e))
    assert vis.method == method and len(vis.masks) == 1
    m = vis.masks[0]
    assert m.vanilla_tokens == _vanilla_count(processor, model)
    assert 0 < m.num_tokens <= m.vanilla_tokens
    assert m.thumb_tokens + m.crop_tokens + m.newlines == m.num_tokens and m.newlines >= 0
    assert not globalcom2.is_applied(model)


def _vanilla_count(processor, model):
    inputs = _inputs(processor, [0])
    return int((inputs.input_ids == model.config.image_token_id).sum())
