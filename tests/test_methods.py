"""The method registry: every method's config, selection rule, kept counts and model behaviour."""

from __future__ import annotations

import json
import math

import pytest
import torch

import globalcom2
from globalcom2 import FasterVLMConfig, GlobalCom2Config, PoolingConfig, RandomConfig
from globalcom2.core import budgets, geometry, plans
from globalcom2.methods import (
    config_from_dict,
    config_to_dict,
    make_config,
    method_names,
    option_names,
    parse_method_options,
)

from conftest import make_image

SIZES = [(480, 640), (300, 900), (1000, 300)]
PROMPTS = ["USER: <image>\nWhat is this? ASSISTANT:", "Describe <image> briefly.", "<image>\nhi"]


def _inputs(processor, idx, **kw):
    images = [make_image(*SIZES[i], seed=i) for i in idx]
    return processor(images=images, text=[PROMPTS[i] for i in idx], return_tensors="pt", padding=True, **kw)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


# ----------------------------------------------------------------------------------------------
# configs and the registry
# ----------------------------------------------------------------------------------------------


def test_method_names_cover_the_issue():
    names = method_names()
    for m in ["globalcom2", "fastervlm", "fastv", "random", "pooling", "globalcom2+fastv"]:
        assert m in names


@pytest.mark.parametrize(
    "cfg",
    [
        GlobalCom2Config(retention_ratio=0.1, allocation="topk_count", scoring="local_only"),
        FasterVLMConfig(retention_ratio=0.3, layout="official"),
        RandomConfig(retention_ratio=0.2, seed=7),
        PoolingConfig(retention_ratio=0.5),
    ],
)
def test_every_config_round_trips_through_json(cfg):
    data = json.loads(json.dumps(config_to_dict(cfg)))
    assert data["method"] == cfg.method
    assert config_from_dict(data) == cfg
    assert type(cfg).from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "method, options, field",
    [
        ("globalcom2", {"allocation": "softmax"}, "allocation"),
        ("globalcom2", {"scoring": "both"}, "scoring"),
        ("fastervlm", {"retention_ratio": 0}, "retention_ratio"),
        ("fastervlm", {"layout": "raster"}, "layout"),
        ("random", {"seed": -1}, "seed"),
        ("random", {"seed": 1.5}, "seed"),
        ("pooling", {"retention_ratio": 2}, "retention_ratio"),
        ("pooling", {"layout": "spatial"}, "layout"),  # pooling has no layout: unknown option named
        ("globalcom2", {"temprature": 3}, "temprature"),
    ],
)
def test_bad_options_name_the_field(method, options, field):
    with pytest.raises(ValueError, match=field):
        make_config(method, **options)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match="fastervlm"):
        make_config("tome")


def test_config_of_the_wrong_type_is_refused():
    with pytest.raises(ValueError, match="FasterVLMConfig"):
        make_config("fastervlm", GlobalCom2Config())


def test_parse_method_options_coerces_values():
    assert parse_method_options(["layout=spatial", "seed=3", "retention-ratio=0.5", "flag=true"]) == {
        "layout": "spatial",
        "seed": 3,
        "retention_ratio": 0.5,
        "flag": True,
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_method_options(["layout"])


def test_option_names_per_method():
    assert option_names("random") == ["retention_ratio", "layout", "seed", "count"]
    assert "fastv_layer" in option_names("globalcom2+fastv")


# ----------------------------------------------------------------------------------------------
# the ablations and baselines as pure ops
# ----------------------------------------------------------------------------------------------


def _thumb_4x4() -> torch.Tensor:
    imp = torch.zeros(16)
    # 2x2 grid of a 4x4 thumbnail: region 0 = rows 0-1, cols 0-1, ...; top-4 tokens: 3 in region 0, 1 in region 3.
    imp[[0, 1, 4]] = torch.tensor([5.0, 4.0, 3.0])
    imp[15] = 2.0
    imp[6] = 1.0  # region 1, fifth best: not in the top-4
    return imp


def test_allocation_uniform_gives_every_crop_r():
    r = budgets.crop_retention_ratios(_thumb_4x4(), (2, 2), 0.25, allocation="uniform")
    assert r.tolist() == [0.25] * 4


def test_allocation_topk_count_shares_by_global_topk_membership():
    # floor(16 * 0.25) = 4 kept thumbnail tokens: 3 in region 0, 1 in region 3 -> r = R * C * c / 4.
    r = budgets.crop_retention_ratios(_thumb_4x4(), (2, 2), 0.25, allocation="topk_count")
    assert r.tolist() == [0.75, 0.0, 0.0, 0.25]
    # Capped at 1, and R everywhere when the thumbnail keeps nothing.
    assert budgets.crop_retention_ratios(_thumb_4x4(), (2, 2), 0.5, allocation="topk_count").max().item() == 1.0
    assert budgets.crop_retention_ratios(_thumb_4x4(), (2, 2), 0.05, allocation="topk_count").tolist() == [0.05] * 4


def test_allocation_softmax_max_uses_region_maxima():
    imp = _thumb_4x4()
    s = torch.tensor([5.0, 1.0, 0.0, 2.0], dtype=torch.float64)  # region maxima by hand
    e = torch.exp((s - s.max()) / 10.0)
    sigma = e / (e.sum() + 1e-8)
    expected = torch.clamp(0.25 * (1 + sigma - sigma.mean()), max=1.0)
    got = budgets.crop_retention_ratios(imp, (2, 2), 0.25, temperature=10.0, allocation="softmax_max")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    # and softmax_sum differs (sums 12, 1, 0, 2)
    assert not torch.allclose(got, budgets.crop_retention_ratios(imp, (2, 2), 0.25, allocation="softmax_sum"))


def _image_case(seed=0, hw=(480, 640)):
    geom = geometry.crop_geometry(hw, (2, 2), 24)
    g = torch.Generator().manual_seed(seed)
    importance = torch.randn(5, 576, generator=g)
    return geom, importance


@pytest.mark.parametrize("scoring", ["global_only", "local_only"])
def test_scoring_ablations_rank_by_one_term(scoring):
    geom, importance = _image_case()
    ratios = torch.full((4,), 0.3, dtype=torch.float64)
    keep, valid, score = plans.select_crop_tokens(importance[1:], importance[0], geom, ratios, scoring=scoring)
    _, _, both = plans.select_crop_tokens(importance[1:], importance[0], geom, ratios)
    if scoring == "local_only":
        term = importance[1:]
    else:  # the thumbnail map resized onto the unpadded area, cut into crops
        glob = torch.zeros(geom.height, geom.width)
        resized = torch.nn.functional.interpolate(
            importance[0].reshape(1, 1, 24, 24), size=(geom.valid_rows, geom.valid_cols), mode="bilinear", align_corners=False
        )[0, 0]
        glob[geom.row0 : geom.row1, geom.col0 : geom.col1] = resized
        term = glob.reshape(2, 24, 2, 24).transpose(1, 2).reshape(4, 576)
    for j in range(4):
        cand = valid[j].nonzero().flatten()
        k = int(valid[j].sum() * 0.3)
        top = cand[torch.argsort(term[j][cand], descending=True, stable=True)[:k]]
        assert sorted(keep[j].nonzero().flatten().tolist()) == sorted(top.tolist())
    assert not torch.equal(score, both)


@pytest.mark.parametrize("hw", [(480, 640), (1000, 300), (336, 336)])
@pytest.mark.parametrize("layout", ["official", "spatial"])
def test_fastervlm_keeps_the_joint_top_k(hw, layout):
    geom = geometry.crop_geometry(hw, (2, 2) if hw != (1000, 300) else (3, 1), 24)
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(1 + geom.num_crops, 576, generator=g)
    plan = plans.plan_joint(scores, geom, 0.25, layout)
    valid = plan.crop_valid
    n_total = 576 + int(valid.sum())
    k = math.floor(0.25 * n_total)
    # The kept set is the top-k over the thumbnail and every unpadded crop token.
    pool = torch.cat([scores[0], scores[1:][valid]])
    threshold = torch.sort(pool, descending=True).values[k - 1]
    kept_scores = torch.cat([scores[0][plan.thumb_keep], scores[1:][plan.crop_keep]])
    assert kept_scores.numel() == k
    assert bool((kept_scores >= threshold).all())
    assert not bool((plan.crop_keep & ~valid).any())
    newlines = geom.height if layout == "official" else geom.valid_rows
    assert plan.num_tokens == k + newlines


def test_pooling_counts_follow_the_formula():
    feats = torch.randn(5, 576, 8)
    geom = geometry.crop_geometry((480, 640), (2, 2), 24)
    tokens, thumb_hw, crop_hw = plans.pool_image(feats, geom, torch.zeros(8), 0.25)
    assert thumb_hw == (12, 12)
    h, w = geom.valid_rows, geom.valid_cols
    assert crop_hw == (round(h * 0.5), round(w * 0.5))
    assert tokens.shape == (144 + crop_hw[0] * (crop_hw[1] + 1), 8)
    # Pooling really averages: the first pooled thumbnail token is the mean of its 2x2 patch.
    torch.testing.assert_close(tokens[0], feats[0].reshape(24, 24, 8)[:2, :2].mean((0, 1)))
    # R = 1 keeps the vanilla arrangement exactly: thumbnail, then unpadded rows with newlines.
    full, _, crop_full = plans.pool_image(feats, geom, torch.zeros(8), 1.0)
    assert full.shape[0] == geom.vanilla_num_tokens()


# ----------------------------------------------------------------------------------------------
# on the tiny LLaVA-NeXT (what every method does on every family: tests/test_matrix.py)
# ----------------------------------------------------------------------------------------------


def test_fastervlm_ranks_by_the_cls_importance(tiny):
    model, processor = tiny
    inputs = _inputs(processor, [0])
    globalcom2.apply(model, method="fastervlm", retention_ratio=0.2, layout="official")
    adapter = globalcom2.get_family(model)
    with torch.no_grad():
        encoded = adapter.encode(inputs.pixel_values, inputs.image_sizes)
    plan = adapter.compress(encoded).plans[0]
    expected = plans.plan_joint(encoded.importance[0], encoded.geometries[0], 0.2, "official")
    assert torch.equal(plan.index, expected.index)


def test_random_is_deterministic_private_and_seeded(tiny):
    model, processor = tiny
    inputs = _inputs(processor, [0])
    globalcom2.apply(model, method="random", retention_ratio=0.25, seed=3)
    adapter = globalcom2.get_family(model)
    torch.manual_seed(0)
    _logits(model, inputs)
    first = adapter.last.plans[0].index.clone()
    state = torch.get_rng_state()
    _logits(model, inputs)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is never consumed
    assert torch.equal(adapter.last.plans[0].index, first)
    globalcom2.apply(model, method="random", retention_ratio=0.25, seed=4)
    _logits(model, inputs)
    assert not torch.equal(globalcom2.get_family(model).last.plans[0].index, first)


@pytest.mark.parametrize("allocation", ["softmax_sum", "softmax_max", "uniform", "topk_count"])
@pytest.mark.parametrize("scoring", ["global_local", "global_only", "local_only"])
def test_globalcom2_ablations_run_end_to_end(tiny, allocation, scoring):
    model, processor = tiny
    inputs = _inputs(processor, [0])
    globalcom2.apply(model, retention_ratio=0.25, allocation=allocation, scoring=scoring)
    _logits(model, inputs)
    plan = globalcom2.get_family(model).last.plans[0]
    thumb = plan.thumb_importance
    geom = plan.geometry
    expected_r = budgets.crop_retention_ratios(thumb, (geom.grid_h, geom.grid_w), 0.25, allocation=allocation)
    torch.testing.assert_close(plan.crop_ratios, expected_r)
    n_valid = plan.crop_valid.sum(1)
    assert plan.crop_keep.sum(1).tolist() == torch.floor(n_valid.double() * expected_r).long().tolist()


# ----------------------------------------------------------------------------------------------
# FastV inside the language model, alone and after a vision-side method
# ----------------------------------------------------------------------------------------------


def test_fastv_alone_prunes_inside_the_language_model(tiny):
    model, processor = tiny
    inputs = _inputs(processor, [0, 1])
    before = _logits(model, inputs)
    globalcom2.apply(model, method="fastv", retention_ratio=0.25)  # default layer K = 2
    out = _logits(model, inputs)
    assert out.shape == before.shape  # logits keep the input length (pruned positions frozen)
    stats = globalcom2.last_stats(model)
    n = (inputs.input_ids == model.config.image_token_id).sum(1).tolist()
    assert stats.visual_tokens == stats.vanilla_visual_tokens == n
    assert stats.lm_visual_tokens == [round(0.25 * v) for v in n]
    layers = model.config.text_config.num_hidden_layers
    assert stats.effective_visual_tokens == [(2 * v + (layers - 2) * k) / layers for v, k in zip(n, stats.lm_visual_tokens)]
    assert not torch.allclose(out[:, -1], before[:, -1])  # pruning changes the answer's logits
    globalcom2.remove(model)
    assert torch.equal(_logits(model, inputs), before)
    assert not any("forward" in layer.__dict__ for layer in model.model.language_model.layers)


def test_fastv_ratio_one_is_the_vanilla_model(tiny):
    model, processor = tiny
    inputs = _inputs(processor, [0])
    before = _logits(model, inputs)
    globalcom2.apply(model, method="fastv", retention_ratio=1.0)
    assert torch.equal(_logits(model, inputs), before)


def test_composition_runs_globalcom2_then_fastv(tiny):
    model, processor = tiny
    inputs = _inputs(processor, [0])
    globalcom2.apply(model, retention_ratio=0.25)
    plain = _logits(model, inputs)
    gc2_tokens = globalcom2.last_stats(model).visual_tokens
    # FastV keeping everything leaves GlobalCom2's result untouched.
    globalcom2.apply(model, method="globalcom2+fastv", retention_ratio=0.25, fastv_retention_ratio=1.0)
    torch.testing.assert_close(_logits(model, inputs), plain, atol=0, rtol=0)
    globalcom2.apply(model, method="globalcom2+fastv", retention_ratio=0.25, fastv_retention_ratio=0.5, fastv_layer=1)
    cfg = globalcom2.get_config(model)
    assert cfg.method == "globalcom2+fastv" and cfg.fastv.layer == 1 and cfg.vision.retention_ratio == 0.25
    out = _logits(model, inputs)
    stats = globalcom2.last_stats(model)
    assert out.shape == plain.shape
    assert stats.visual_tokens == gc2_tokens and stats.lm_visual_tokens == [round(0.5 * gc2_tokens[0])]
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg


def test_fastv_beam_search_and_no_cache_run(tiny):
    model, processor = tiny
    inputs = _inputs(processor, [0, 1])
    globalcom2.apply(model, method="fastv", retention_ratio=0.25)
    beams = model.generate(**inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    assert beams.shape[0] == 4
    no_cache = model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)
    assert no_cache.shape == (2, inputs.input_ids.shape[1] + 3)


def test_fastv_layer_must_leave_a_layer_to_prune(tiny):
    model, _ = tiny
    layers = model.config.text_config.num_hidden_layers
    with pytest.raises(ValueError, match="layer"):
        globalcom2.apply(model, method="fastv", layer=layers)
    assert not globalcom2.is_applied(model)
    with pytest.raises(ValueError, match="layer"):
        globalcom2.apply(model, method="fastv", layer=0)
