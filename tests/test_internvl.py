"""InternVL (HF ``InternVLForConditionalGeneration``) on a tiny in-code model: InternViT 448/14 with
[CLS] and qk normalisation, pixel shuffle 0.5, a tiny Qwen2.

The reference below is written from ``SPEC.md`` ("Other families" -> InternVL) in this file, in
the model's own order (tiles row by row, then the thumbnail): it does not call the library's
selection code.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import globalcom2
from globalcom2.methods import FasterVLMConfig, GlobalCom2Config, PoolingConfig, RandomConfig
from globalcom2.models import base as _family_registry
from globalcom2.models import families

#: Whether ``globalcom2.models`` registers InternVL itself (its registry line).
_LISTED = any(f.model_type == "internvl" for f in families())

from globalcom2.models.internvl import TINY_MAX_PATCHES, InternVLFamily  # noqa: E402
from globalcom2.tiny import build_tiny  # noqa: E402

if not _LISTED:
    # Importing the family module registers it (@register_family). Until the registry line is in
    # globalcom2.models, keep it registered only while this module's tests run, so that the other
    # modules' family matrices are collected as the package itself lists the families.
    _family_registry._REGISTRY.pop("internvl", None)

from conftest import make_image

S, N = 16, 256
MULTI = [(480, 640), (300, 900), (1000, 300), (448, 896)]
SINGLE = [(200, 200)]


@pytest.fixture(scope="module", autouse=True)
def _registered():
    if _LISTED:
        yield
        return
    _family_registry.register_family(InternVLFamily)
    yield
    _family_registry._REGISTRY.pop("internvl", None)


@pytest.fixture(scope="module")
def tiny(_registered):
    model, processor = build_tiny("internvl", seed=0)
    yield model, processor
    globalcom2.remove(model)


@pytest.fixture(autouse=True)
def _clean(tiny):
    yield
    globalcom2.remove(tiny[0])


def _inputs(processor, sizes, texts=None, seed=0):
    images = [make_image(*s, seed=seed + i) for i, s in enumerate(sizes)]
    texts = texts or [f"{processor.image_token}\nWhat is it?" for _ in sizes]
    return processor(images=images or None, text=texts, return_tensors="pt", padding=True)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _processor_grid(size):
    """(rows, cols) from the processor's own rule (HF's function, the tiny processor's max_patches)."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    cols, rows = get_optimal_tiled_canvas(size, (448, 448), 1, TINY_MAX_PATCHES)
    return rows, cols


# -- independent reference (SPEC.md) ------------------------------------------------------------


def _ref_keep(imp, grid, ratio, temperature=10.0):
    """Kept token indices per view, in the model's order. ``imp``: (V, N) importance, model order.

    Returns a list over views of sorted kept indices (tiles first, the thumbnail last)."""
    v = imp.shape[0]
    if v == 1:  # one tile: Step 1 on it
        k = int(N * ratio)
        return [sorted(torch.argsort(imp[0], descending=True, stable=True)[:k].tolist())]
    rows, cols = grid
    thumb, crops = imp[-1], imp[:-1]
    # Step 1
    k_t = int(N * ratio)
    thumb_keep = sorted(torch.argsort(thumb, descending=True, stable=True)[:k_t].tolist())
    # Step 2
    t2 = thumb.reshape(S, S).double()
    s = torch.zeros(rows * cols, dtype=torch.float64)
    for i in range(S):
        for j in range(S):
            gi = min(i // max(S // rows, 1), rows - 1)
            gj = min(j // max(S // cols, 1), cols - 1)
            s[gi * cols + gj] += t2[i, j]
    e = torch.exp((s - s.max()) / temperature)
    sigma = e / (e.sum() + 1e-8)
    r = [min(1.0, ratio * (1.0 + float(sg) - float(sigma.mean()))) for sg in sigma]
    # Step 4 (no padding: the valid area is the whole tile canvas)
    glob = F.interpolate(thumb.double().reshape(1, 1, S, S), size=(rows * S, cols * S), mode="bilinear", align_corners=False)[0, 0]
    kept = []
    for j in range(rows * cols):
        gi, gj = divmod(j, cols)
        g = glob[gi * S : (gi + 1) * S, gj * S : (gj + 1) * S].reshape(-1)
        loc = crops[j].double()
        score = loc / loc.norm().clamp_min(1e-12) + g / g.norm().clamp_min(1e-12)
        k = int(N * r[j])
        kept.append(sorted(torch.argsort(score, descending=True, stable=True)[:k].tolist()))
    return kept + [thumb_keep]


def _model_order(x):
    """Thumbnail-first (as the adapter's encoded views) -> the model's order (tiles, thumbnail)."""
    return torch.cat([x[1:], x[:1]]) if x.shape[0] > 1 else x


def _vanilla_features(model, inputs, views):
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inputs.pixel_values).pooler_output
    return list(torch.split(feats, views))


def _views(inputs, model):
    ids = inputs.input_ids
    counts = []
    for row in ids:
        run = 0
        for t in row.tolist() + [-1]:
            if t == model.config.image_token_id:
                run += 1
            elif run:
                counts.append(run // N)
                run = 0
    return counts


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_kept_tokens_and_order_match_the_reference(tiny, ratio):
    model, processor = tiny
    sizes = MULTI + SINGLE
    inputs = _inputs(processor, sizes)
    views = _views(inputs, model)
    feats = _vanilla_features(model, inputs, views)
    globalcom2.apply(model, method="globalcom2", retention_ratio=ratio)
    _logits(model, inputs)
    adapter = globalcom2.get_family(model)
    encoded = adapter.encode_inputs(inputs)
    for i, size in enumerate(sizes):
        grid = _processor_grid(size) if views[i] > 1 else None
        if grid is not None:
            assert views[i] == grid[0] * grid[1] + 1
            assert (encoded.geometries[i].grid_h, encoded.geometries[i].grid_w) == grid
        kept = _ref_keep(_model_order(encoded.importance[i]), grid, ratio)
        expected = torch.cat([feats[i][v][kept[v]] for v in range(views[i])])
        got = adapter.last.tokens[i]
        assert got.shape == expected.shape, size
        assert torch.equal(got, expected), size


def test_importance_is_the_cls_logits_mapped_through_pixel_shuffle(tiny):
    """Brute force: q/k of the last layer recomputed (with q/k normalisation), the [CLS] logit per
    head by hand, and each token the mean over its 2 x 2 block of patches."""
    model, processor = tiny
    inputs = _inputs(processor, [MULTI[1], SINGLE[0]])
    views = _views(inputs, model)
    attn = model.model.vision_tower.encoder.layer[-1].attention
    assert not isinstance(attn.q_norm, torch.nn.Identity)  # the tiny tower normalises q/k
    seen = {}
    handle = attn.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    try:
        adapter = InternVLFamily(model, GlobalCom2Config(layout="spatial"))
        with torch.no_grad():
            encoded = adapter.encode_inputs(inputs)
    finally:
        handle.remove()
    x = seen["x"]
    with torch.no_grad():
        q, k = attn.q_norm(attn.q_proj(x)), attn.k_norm(attn.k_proj(x))
        q_plain, k_plain = attn.q_proj(x), attn.k_proj(x)
    heads, hd = attn.num_heads, attn.head_dim

    def ref(q, k):
        per_head = [(q[:, 0, h * hd : (h + 1) * hd] * hd**-0.5)[:, None] @ k[:, :, h * hd : (h + 1) * hd].transpose(1, 2) for h in range(heads)]
        logits = torch.stack([p[:, 0] for p in per_head]).mean(0)[:, 1:]  # (V, 1024)
        grid = logits.reshape(-1, 32, 32)
        out = torch.empty(grid.shape[0], S, S, dtype=grid.dtype)
        for i in range(S):
            for j in range(S):
                out[:, i, j] = grid[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean(dim=(1, 2))
        return out.reshape(-1, N)

    want = list(torch.split(ref(q.double(), k.double()), views))  # the library scores in float64
    got = [_model_order(e) for e in encoded.importance]
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    unnormalised = list(torch.split(ref(q_plain.double(), k_plain.double()), views))
    assert not torch.allclose(got[0], unnormalised[0], atol=1e-3)  # the normalisation matters here


def test_importance_without_qk_norm():
    model, processor = build_tiny("internvl", seed=1, use_qk_norm=False)
    attn = model.model.vision_tower.encoder.layer[-1].attention
    assert isinstance(attn.q_norm, torch.nn.Identity)
    inputs = _inputs(processor, SINGLE)
    seen = {}
    handle = attn.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    with torch.no_grad():
        encoded = InternVLFamily(model, GlobalCom2Config(layout="spatial")).encode_inputs(inputs)
    handle.remove()
    with torch.no_grad():
        q, k = attn.q_proj(seen["x"]).double(), attn.k_proj(seen["x"]).double()
    hd = attn.head_dim
    logits = torch.stack(
        [(q[0, 0, h * hd : (h + 1) * hd] * hd**-0.5) @ k[0, 1:, h * hd : (h + 1) * hd].T for h in range(attn.num_heads)]
    ).mean(0)
    want = F.avg_pool2d(logits.reshape(1, 1, 32, 32), 2).reshape(N)
    torch.testing.assert_close(encoded.importance[0][0], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "config",
    [GlobalCom2Config.keep_all(layout="spatial"), FasterVLMConfig.keep_all(), RandomConfig.keep_all(), PoolingConfig.keep_all()],
    ids=["globalcom2", "fastervlm", "random", "pooling"],
)
def test_keep_all_is_the_vanilla_sequence(tiny, config):
    model, processor = tiny
    inputs = _inputs(processor, MULTI[:2] + SINGLE)
    vanilla = _logits(model, inputs)
    views = _views(inputs, model)
    feats = _vanilla_features(model, inputs, views)
    globalcom2.apply(model, config)
    out = _logits(model, inputs)
    adapter = globalcom2.get_family(model)
    for got, f in zip(adapter.last.tokens, feats):
        assert torch.equal(got, f.reshape(-1, f.shape[-1]))  # tiles, then the thumbnail: the model's sequence
    assert torch.equal(out, vanilla)


def test_budgets_match_the_formulas(tiny):
    model, processor = tiny
    sizes = MULTI[:2] + SINGLE
    inputs = _inputs(processor, sizes)
    views = _views(inputs, model)
    adapter = InternVLFamily(model, GlobalCom2Config(layout="spatial"))
    with torch.no_grad():
        encoded = adapter.encode_inputs(inputs)
    for ratio in (0.1, 0.25, 0.5, 1.0):
        g = adapter.compress(encoded, GlobalCom2Config(retention_ratio=ratio, layout="spatial"))
        f = adapter.compress(encoded, FasterVLMConfig(retention_ratio=ratio))
        p = adapter.compress(encoded, PoolingConfig(retention_ratio=ratio))
        for i, v in enumerate(views):
            if v == 1:
                assert g.counts[i] == f.counts[i] == int(N * ratio)
            else:
                thumb = _model_order(encoded.importance[i])[-1]
                rows, cols = _processor_grid(sizes[i])
                kept = _ref_keep(_model_order(encoded.importance[i]), (rows, cols), ratio)
                assert g.counts[i] == sum(len(k) for k in kept)
                assert len(kept[-1]) == int(N * ratio) and thumb.numel() == N
                assert f.counts[i] == int(ratio * (N + (v - 1) * N))
            t = max(1, round(S * math.sqrt(ratio)))
            assert p.counts[i] == v * t * t
            assert g.vanilla_counts[i] == v * N


def _last_rows(model, inputs):
    return _logits(model, inputs)[:, -1]


@pytest.mark.parametrize("method", ["globalcom2", "fastervlm", "pooling", "globalcom2+fastv"])
def test_batch_equals_each_prompt_alone(tiny, method):
    """Left padding, a multi-image prompt and a text-only row in one batch."""
    model, processor = tiny
    tok = processor.image_token
    images = [make_image(300, 900, seed=1), make_image(480, 640, seed=2), make_image(200, 200, seed=3)]
    texts = [f"{tok}\nfirst", f"{tok}{tok}\ntwo images here please", "text only, no image at all"]
    globalcom2.apply(model, method=method, retention_ratio=0.25)
    batch = processor(images=images, text=texts, return_tensors="pt", padding=True)
    assert (batch.attention_mask[:, 0] == 0).any()
    last = _last_rows(model, batch)
    gen = model.generate(**batch, max_new_tokens=3, do_sample=False)[:, batch.input_ids.shape[1]:]
    singles = [
        processor(images=images[:1], text=texts[:1], return_tensors="pt"),
        processor(images=images[1:], text=texts[1:2], return_tensors="pt"),
        processor(text=texts[2:], return_tensors="pt"),
    ]
    for i, single in enumerate(singles):
        torch.testing.assert_close(_last_rows(model, single)[0], last[i], atol=1e-4, rtol=1e-4)
        alone = model.generate(**single, max_new_tokens=3, do_sample=False)[0, single.input_ids.shape[1]:]
        assert alone.tolist() == gen[i].tolist()


def test_image_sizes_give_the_same_grid(tiny):
    model, processor = tiny
    sizes = MULTI
    inputs = _inputs(processor, sizes)
    adapter = InternVLFamily(model, GlobalCom2Config(layout="spatial"))
    with torch.no_grad():
        from_pixels = adapter.encode_inputs(inputs)
        given = adapter.encode_inputs({**inputs, "image_sizes": torch.tensor(sizes)})
    for i, size in enumerate(sizes):
        a, b = from_pixels.geometries[i], given.geometries[i]
        assert (a.grid_h, a.grid_w) == (b.grid_h, b.grid_w) == _processor_grid(size)
        assert (a.row0, a.row1, a.col0, a.col1) == (0, a.grid_h * S, 0, a.grid_w * S)  # no padding
        assert adapter.view_grid(inputs, i) == _processor_grid(size)
        assert given.image_sizes[i] == size
    globalcom2.apply(model, method="globalcom2")
    out = _logits(model, inputs)
    with_sizes = _logits(model, {**inputs, "image_sizes": torch.tensor(sizes)})
    assert torch.equal(out, with_sizes)


def test_remove_restores_bit_identical_logits(tiny):
    model, processor = tiny
    inputs = _inputs(processor, MULTI[:1] + SINGLE)
    before = _logits(model, inputs)
    globalcom2.apply(model, method="globalcom2", retention_ratio=0.25)
    short = _logits(model, inputs)
    assert short.shape[1] < before.shape[1]
    globalcom2.remove(model)
    assert torch.equal(_logits(model, inputs), before)
    assert not globalcom2.is_applied(model) and "forward" not in model.__dict__


def test_official_layout_raises_naming_the_family(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="InternVL"):
        globalcom2.apply(model, method="globalcom2", layout="official")
    assert not globalcom2.is_applied(model)
    globalcom2.apply(model, method="globalcom2")  # no layout asked: the family's spatial
    assert globalcom2.get_config(model).layout == "spatial"


def test_plans_keep_thumbnail_first_masks(tiny):
    model, processor = tiny
    inputs = _inputs(processor, MULTI[:1])
    globalcom2.apply(model, method="globalcom2", retention_ratio=0.25)
    _logits(model, inputs)
    plan = globalcom2.get_family(model).last.plans[0]
    masks = plan.kept_masks()
    rows, cols = _processor_grid(MULTI[0])
    assert masks.crop.shape == (rows * cols, N) and bool(masks.valid.all())
    assert masks.thumb_tokens + masks.crop_tokens == plan.num_tokens  # no newline
    # the index: tile tokens first (table rows >= N), the thumbnail's last (rows < N), raster order
    idx = plan.index
    k_t = masks.thumb_tokens
    assert bool((idx[:-k_t] >= N).all()) and bool((idx[-k_t:] < N).all())
    assert torch.equal(idx[:-k_t], torch.sort(idx[:-k_t]).values) and torch.equal(idx[-k_t:], torch.sort(idx[-k_t:]).values)


def test_family_metadata():
    assert InternVLFamily.default_max_visual_tokens() == 13 * 256
    cfg = {"vision_config": {"image_size": [448, 448], "patch_size": [14, 14]}, "downsample_ratio": 0.5, "max_patches": 6}
    assert InternVLFamily.max_visual_tokens(cfg) == 7 * 256
    assert InternVLFamily.layouts == ("spatial",)
    assert InternVLFamily.default_text_model_type == "qwen2"
    for arch in InternVLFamily.language_models.values():
        name, layers, hidden, heads, kv, head_dim, inter, vocab = arch
        assert hidden % heads == 0 and heads % kv == 0 and layers > 0 and vocab > 0
    from globalcom2.core.geometry import CropGeometry

    geom = CropGeometry(side=S, grid_h=2, grid_w=3, row0=0, row1=32, col0=0, col1=48)
    thumb, canvas, lay = InternVLFamily.picture_views(make_image(480, 640), geom, 448)
    assert thumb.shape == (448, 448, 3) and canvas.shape == (896, 1344, 3)
    assert lay["top"] == lay["left"] == 0 and (lay["new_height"], lay["new_width"]) == (896, 1344)



def test_attention_received_importance_option(tiny):
    """Where the methods have an ``importance`` option: ``attention_received`` (an ablation on
    InternVL) is the softmax attention each patch receives from the other patches at the last
    layer (mean over heads and queries), folded 2 x 2 like the [CLS] logits."""
    import dataclasses

    if "importance" not in {f.name for f in dataclasses.fields(GlobalCom2Config)}:
        pytest.skip("this version's methods have no importance option")
    model, processor = tiny
    inputs = _inputs(processor, SINGLE)
    attn = model.model.vision_tower.encoder.layer[-1].attention
    seen = {}
    handle = attn.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    adapter = InternVLFamily(model, GlobalCom2Config(layout="spatial", importance="attention_received"))
    adapter.validate()
    with torch.no_grad():
        encoded = adapter.encode_inputs(inputs)
    handle.remove()
    with torch.no_grad():
        q, k = attn.q_norm(attn.q_proj(seen["x"]))[0, 1:], attn.k_norm(attn.k_proj(seen["x"]))[0, 1:]
    hd = attn.head_dim
    received = torch.zeros(1024)
    for h in range(attn.num_heads):
        a = torch.softmax((q[:, h * hd : (h + 1) * hd] * hd**-0.5) @ k[:, h * hd : (h + 1) * hd].T, dim=-1)
        received += a.mean(0) / attn.num_heads
    want = F.avg_pool2d(received.reshape(1, 1, 32, 32), 2).reshape(N)
    torch.testing.assert_close(encoded.importance[0][0], want, atol=1e-6, rtol=1e-5)


def test_tile_grid_from_pixels_matches_the_processor():
    """Without image sizes the grid is read from the pixels: the arrangement of the tiles that
    matches the thumbnail is the processor's own (the checkpoints' 12 tiles at most)."""
    from globalcom2.core import tiles
    from globalcom2.tiny import build_processor

    processor = build_processor("internvl", max_patches=12)
    for i, (h, w) in enumerate([(600, 700), (900, 150), (1300, 1000), (300, 1500), (448, 900), (1000, 1000)]):
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        cols, rows = get_optimal_tiled_canvas((h, w), (448, 448), 1, 12)
        pv = processor.image_processor(images=[make_image(h, w, seed=i)], return_tensors="pt").pixel_values
        assert pv.shape[0] == rows * cols + 1
        assert tiles.infer_tile_grid(pv[:-1], pv[-1], tiles.factor_grids(rows * cols)) == (rows, cols)
