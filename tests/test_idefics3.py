"""Idefics3 / SmolVLM (one family module, two model types) on tiny in-code models with the published
geometry: per-view placeholder runs, similarity through the connector's pixel shuffle, count first.

The importance reference below is brute force (each token's s x s block of patches), not the
family's index map pushed through ``pixel_shuffle``.
"""

from __future__ import annotations

import pytest
import torch

import globalcom2
from globalcom2.methods import GlobalCom2Config
from globalcom2.models import base as _family_registry
from globalcom2.models import families

_LISTED = any(f.model_type == "idefics3" for f in families())

from globalcom2.models.idefics3 import Idefics3Family, SmolVLMFamily  # noqa: E402

if not _LISTED:  # keep the registry as the package lists it while other modules collect
    for _t in ("idefics3", "smolvlm"):
        _family_registry._REGISTRY.pop(_t, None)

from conftest import make_image  # noqa: E402

SIZES = [(500, 900), (900, 500), (300, 300), (100, 2000), (1200, 1150)]
TYPES = ["idefics3", "smolvlm"]


@pytest.fixture(scope="module", autouse=True)
def _registered():
    if not _LISTED:
        _family_registry.register_family(Idefics3Family)
        _family_registry.register_family(SmolVLMFamily)
    yield
    if not _LISTED:
        for t in ("idefics3", "smolvlm"):
            _family_registry._REGISTRY.pop(t, None)


_MODELS: dict[str, tuple] = {}


def _tiny(model_type):
    if model_type not in _MODELS:
        _MODELS[model_type] = (Idefics3Family if model_type == "idefics3" else SmolVLMFamily).build_tiny(seed=0)
    return _MODELS[model_type]


@pytest.fixture(autouse=True)
def _clean():
    yield
    for model, proc in _MODELS.values():
        globalcom2.remove(model)
        globalcom2.remove(proc) if hasattr(globalcom2, "remove_processor") else None


def _inputs(processor, sizes, questions=None, seed=0):
    images = [make_image(*s, seed=seed + i) for i, s in enumerate(sizes)]
    texts = [f"<image>\n{q}" for q in (questions or ["What?"] * len(sizes))]
    return processor(images=[[im] for im in images], text=texts, return_tensors="pt", padding=True)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _runs(ids, image_id):
    """Lengths of the runs of image tokens in a 1-D id list, and the ids that are not image tokens."""
    runs, cur = [], 0
    for t in ids:
        if t == image_id:
            cur += 1
        elif cur:
            runs.append(cur)
            cur = 0
    if cur:
        runs.append(cur)
    return runs, [t for t in ids if t != image_id]


@pytest.mark.parametrize("model_type", TYPES)
@pytest.mark.parametrize("size", SIZES)
def test_keep_all_equals_vanilla_and_quarter_per_view(model_type, size):
    model, proc = _tiny(model_type)
    inputs = _inputs(proc, [size])
    ref = _logits(model, inputs)
    globalcom2.apply(model, GlobalCom2Config.keep_all(layout="spatial"))
    assert torch.equal(_logits(model, inputs), ref)
    globalcom2.remove(model)

    globalcom2.apply(model, retention_ratio=0.25)
    fam = globalcom2.get_family(model)
    _logits(model, inputs)
    n = fam.tokens_per_view
    vanilla_runs, text = _runs(inputs["input_ids"][0].tolist(), model.config.image_token_id)
    prepared = fam.prepare_inputs(dict(inputs))
    runs, short_text = _runs(prepared["input_ids"][0].tolist(), model.config.image_token_id)
    assert short_text == text  # every tag, newline and word kept
    assert len(runs) == len(vanilla_runs) and all(v == n for v in vanilla_runs)
    assert runs[-1] == n // 4  # the global view: Step 1
    if len(runs) > 1:  # the crops: about a quarter in all
        assert abs(sum(runs[:-1]) - 0.25 * n * (len(runs) - 1)) <= 0.06 * n * (len(runs) - 1) + 1
    plan = fam.last.plans[0]
    assert runs[:-1] == plan.crop_keep.sum(1).tolist()


@pytest.mark.parametrize("model_type", TYPES)
def test_left_padded_batch_equals_each_prompt_alone(model_type):
    model, proc = _tiny(model_type)
    globalcom2.apply(model, retention_ratio=0.25)
    sizes, qs = [(500, 900), (300, 300)], ["What?", "And this one, in more words please?"]
    batch = _inputs(proc, sizes, qs)
    out = _logits(model, batch)
    for i in range(2):
        alone = _inputs(proc, [sizes[i]], [qs[i]], seed=i)
        one = _logits(model, alone)
        torch.testing.assert_close(out[i, -one.shape[1] :], one[0], atol=2e-5, rtol=1e-4)


def test_generate_returns_the_prompt_and_remove_restores():
    model, proc = _tiny("smolvlm")
    inputs = _inputs(proc, [(900, 500)])
    ref = _logits(model, inputs)
    globalcom2.apply(model, retention_ratio=0.25)
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    globalcom2.remove(model)
    assert torch.equal(_logits(model, inputs), ref)


@pytest.mark.parametrize("model_type", TYPES)
def test_similarity_importance_brute_force_through_the_pixel_shuffle(model_type):
    model, proc = _tiny(model_type)
    inputs = _inputs(proc, [(500, 900)])
    globalcom2.apply(model, retention_ratio=0.25)
    fam = globalcom2.get_family(model)
    enc = fam.encode_inputs(inputs)
    pv = inputs["pixel_values"][0]
    with torch.no_grad():
        hidden = model.model.vision_model(pixel_values=pv).last_hidden_state.double()  # (V, P*P, D)
    g = hidden.mean(1, keepdim=True)
    sim = -torch.nn.functional.cosine_similarity(hidden, g.expand_as(hidden), dim=-1)  # (V, P*P)
    p, s = fam.patches, int(model.config.scale_factor)
    side = p // s
    maps = sim.reshape(-1, p, p)
    want = torch.zeros(maps.shape[0], side * side, dtype=torch.float64)
    for i in range(side):
        for j in range(side):
            want[:, i * side + j] = maps[:, i * s : (i + 1) * s, j * s : (j + 1) * s].reshape(maps.shape[0], -1).mean(1)
    want = torch.cat([want[-1:], want[:-1]])  # global view first, as the methods see it
    torch.testing.assert_close(enc.importance[0], want, atol=1e-6, rtol=1e-6)
    assert enc.geometries[0].grid_h * enc.geometries[0].grid_w == pv.shape[0] - 1


@pytest.mark.parametrize("model_type", TYPES)
def test_count_first_prompt_carries_per_view_runs_equal_to_the_model_path(model_type):
    model, proc = _tiny(model_type)
    sizes = [(500, 900), (300, 300)]
    vanilla = _inputs(proc, sizes, ["What?", "And this?"])
    globalcom2.apply(model, retention_ratio=0.25, count="fixed")
    fam = globalcom2.get_family(model)
    want = _logits(model, vanilla)
    short = fam.prepare_inputs(dict(vanilla))["input_ids"]
    globalcom2.remove(model)
    globalcom2.apply(model, processor=proc, retention_ratio=0.25, count="fixed")
    try:
        first = _inputs(proc, sizes, ["What?", "And this?"])
        image_id = model.config.image_token_id
        for row in range(2):
            a = [t for t in first["input_ids"][row].tolist() if t != proc.tokenizer.pad_token_id]
            b = [t for t in short[row].tolist() if t != proc.tokenizer.pad_token_id]
            assert a == b  # the processor's prompt is the model-shortened prompt, run by run
            assert len(_runs(a, image_id)[0]) == len(_runs([t for t in vanilla["input_ids"][row].tolist()], image_id)[0])
        got = _logits(model, first)
        assert got.shape[1] == first["input_ids"].shape[1]
        torch.testing.assert_close(got[:, -want.shape[1] :], want, atol=2e-5, rtol=1e-4)
    finally:
        globalcom2.remove(model)
        from globalcom2 import processors

        processors.detach(proc)


def test_family_metadata():
    assert Idefics3Family.layouts == ("spatial",) and SmolVLMFamily.model_type == "smolvlm"
    model, _ = _tiny("idefics3")
    globalcom2.apply(model, retention_ratio=0.25)
    fam = globalcom2.get_family(model)
    assert fam.view_geometry() == (364, 13) and fam.tokens_per_view == 169
    with pytest.raises(ValueError, match="no \\[CLS\\]"):
        globalcom2.remove(model)
        globalcom2.apply(model, retention_ratio=0.25, importance="cls")
