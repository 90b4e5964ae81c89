"""Idefics3 / SmolVLM (one family module, two model types) on tiny in-code models with the published
geometry: per-view placeholder runs, similarity through the connector's pixel shuffle, count first.

The importance reference below is brute force (each token's s x s block of patches), not the
family's index map pushed through ``pixel_shuffle``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import globalcom2
from globalcom2.methods import GlobalCom2Config
from globalcom2.models.idefics3 import Idefics3Family, SmolVLMFamily

from conftest import make_image

SIZES = [(500, 900), (900, 500), (300, 300), (100, 2000), (1200, 1150)]
TYPES = ["idefics3", "smolvlm"]


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


@pytest.mark.parametrize("count", [None, "fixed"])
def test_embeddings_carry_each_views_run_through_a_file(tmp_path, count):
    """Image embeddings of a model with one run per view: each view's run is in them and in their file,
    and the prompt's runs (vanilla, shortened or one per view) are each rewritten to the view's count."""
    from globalcom2.embeddings import load_embeddings
    from globalcom2.models.patched_forward import pad_token_id_of

    model, proc = _tiny("idefics3")
    sizes = [(500, 900), (300, 300)]
    inputs = _inputs(proc, sizes, ["What?", "And this one?"])
    opts = {"count": count} if count else {}
    emb = globalcom2.compress_images(model, inputs, retention_ratio=0.25, **opts)
    image_id = model.config.image_token_id
    vanilla = [_runs(row, image_id)[0] for row in inputs["input_ids"].tolist()]
    assert emb.vanilla_runs == vanilla and [sum(r) for r in emb.runs] == emb.counts
    back = load_embeddings(emb.save(tmp_path / "e.safetensors"))
    assert back.runs == emb.runs and back.vanilla_runs == emb.vanilla_runs
    text = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
    globalcom2.apply(model, retention_ratio=0.25, **opts)
    want = _logits(model, inputs)
    shortened = globalcom2.get_family(model).prepare_inputs(dict(inputs))
    with torch.no_grad():
        assert torch.equal(model(**text, image_embeddings=back).logits, want)
        ids, _ = back.prompt(inputs["input_ids"], inputs["attention_mask"], pad_token_id=pad_token_id_of(model))
        assert torch.equal(ids, shortened["input_ids"])  # tags and newlines between the runs kept
        assert torch.equal(model(input_ids=ids, attention_mask=shortened["attention_mask"], image_embeddings=back).logits, want)
    globalcom2.remove(model)
    with torch.no_grad():  # the vanilla model on the embeddings: the patched model's logits
        assert torch.equal(model(**globalcom2.embed_prompt(model, back, **text)).logits, want)


def test_embeddings_refuse_what_cannot_rebuild_the_views_runs():
    model, proc = _tiny("smolvlm")
    inputs = _inputs(proc, [(500, 900)])
    emb = globalcom2.compress_images(model, inputs, retention_ratio=0.25)
    image_id = model.config.image_token_id
    one = torch.tensor([[5, image_id, 6]])  # one placeholder for the image: where would the tags go?
    with pytest.raises(ValueError, match=r"or one per view \(\d+: this model writes one placeholder run per view\)"):
        emb.prompt(one)
    joined = dataclasses.replace(emb, embeddings=emb.embeddings * 2, vanilla_counts=emb.vanilla_counts * 2)
    with pytest.raises(ValueError, match=r"per-view runs \(1 image\(s\)\) do not add up .* \(2 image\(s\)\)"):
        joined.prompt(torch.cat([inputs["input_ids"]] * 2, dim=1))  # joined by hand without the runs
    globalcom2.apply(model, retention_ratio=0.25)
    bare = emb.select(0)
    bare.runs = bare.vanilla_runs = None  # built by hand without the runs
    with pytest.raises(ValueError, match="carry no per-view placeholder runs"):
        model(input_ids=inputs["input_ids"], image_embeddings=bare)


@pytest.mark.parametrize("method", ["fastv", "globalcom2+fastv"])
def test_fastv_pictures_trace_each_views_run_back_to_its_view(method):
    """visualize's FastV masks: the language model's image tokens, run by run (crops row by row, then
    the global view, each its kept tokens in raster order), traced back to the right view and token."""
    import numpy as np

    from globalcom2.cli import build_prompt
    from globalcom2.visualize import visualize
    from globalcom2.visualize.data import _to_grid

    model, proc = _tiny("smolvlm")
    image = make_image(500, 900)
    m = visualize(model, proc, image, (0.5,), method=method, prompt="What is this?").masks[0]
    inputs = proc(images=[image], text=[build_prompt(proc, "What is this?")], return_tensors="pt")
    globalcom2.apply(model, method=method, retention_ratio=0.5)
    with torch.no_grad():
        model(**inputs)
    fam = globalcom2.get_family(model)
    flags = torch.isin(fam.last_visual_positions[0], fam.fastv.last_kept_positions[0]).numpy()
    n = fam.tokens_per_view
    if method == "fastv":
        geom = fam.encode_inputs(inputs).geometries[0]
        views = [np.arange(n)] * (geom.num_crops + 1)
    else:
        plan = fam.last.plans[0]
        geom = plan.geometry
        views = [np.flatnonzero(k) for k in plan.crop_keep.numpy()] + [np.sort(plan.thumb_keep.numpy())]
    crop, thumb, start = np.zeros((geom.num_crops, n), bool), np.zeros(n, bool), 0
    for v, pos in enumerate(views):
        (crop[v] if v < geom.num_crops else thumb)[pos[flags[start : start + len(pos)]]] = True
        start += len(pos)
    assert start == len(flags) and geom.num_crops > 1
    assert np.array_equal(m.thumb_kept, thumb.reshape(8, 8)) and np.array_equal(m.crop_kept, _to_grid(crop, geom))
    assert m.num_tokens == int(flags.sum())
