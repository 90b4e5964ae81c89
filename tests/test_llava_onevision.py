"""LLaVA-OneVision (SigLIP, no [CLS]) on a tiny in-code model with the real geometry.

The reference below is written from SPEC.md ("Other families", "LLaVA-OneVision"), not from the
library: it recomputes the importance by brute force (full softmax attention of the last layer from
hooked q/k), runs Steps 1-4 with plain Python loops (the anyres_max_9 resized map included) and
predicts the compressed sequence as positions of Hugging Face's own vanilla sequence
(``get_image_features``), which the library's output must equal.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import globalcom2
from globalcom2.core.importance import attention_received
from globalcom2.methods import make_config
from globalcom2.models.llava_onevision import LlavaOnevisionFamily

from conftest import make_image

S, N = 27, 729
TAU = 10.0
#: (480, 640): a 2 x 2 grid, rows unpadded; (300, 900): columns; (1152, 1536): a 3 x 4 grid whose
#: 81 x 108 map anyres_max_9 resizes (ratio 1.155 > 1.1) to 70 x 93.
SIZES = [(480, 640), (300, 900), (1152, 1536)]


@pytest.fixture(scope="module")
def ov():
    model, processor = LlavaOnevisionFamily.build_tiny(seed=0)
    yield model, processor
    globalcom2.remove(model)


def _inputs(processor, sizes, text="hi", seed=0):
    images = [make_image(*s, seed=seed + i) for i, s in enumerate(sizes)]
    return processor(images=images, text=[f"{processor.image_token}\n{text}"] * len(sizes), return_tensors="pt", padding=True)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


# -- the reference ---------------------------------------------------------------------------------


def _last_attn(model):
    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)  # CLIP nests its transformer, SigLIP here does not
    return tower.encoder.layers[-1].self_attn


def brute_importance(model, pixel_values):
    """(V, N): mean over heads and queries of the full softmax attention of the last SigLIP layer."""
    attn = _last_attn(model)
    got = {}
    hooks = [
        attn.q_proj.register_forward_hook(lambda m, i, o: got.__setitem__("q", o)),
        attn.k_proj.register_forward_hook(lambda m, i, o: got.__setitem__("k", o)),
    ]
    try:
        with torch.no_grad():
            model.model.vision_tower(pixel_values)
    finally:
        for h in hooks:
            h.remove()
    q, k = got["q"].double(), got["k"].double()
    v, t, d = q.shape
    h = attn.num_heads
    q = q.reshape(v, t, h, d // h).transpose(1, 2)
    k = k.reshape(v, t, h, d // h).transpose(1, 2)
    a = torch.softmax(q @ k.transpose(-1, -2) * (d // h) ** -0.5, dim=-1)  # (V, h, T, T)
    return a.mean(dim=(1, 2)).float()


def ref_grid(hw):
    """HF's best-resolution rule, written out: the OV pinpoints (1..6 x 1..6 of 384)."""
    oh, ow = hw
    best, best_eff, best_waste = None, -1, math.inf
    for i in range(1, 7):
        for j in range(1, 7):
            H, W = 384 * i, 384 * j
            scale = min(W / ow, H / oh)
            dw, dh = int(ow * scale), int(oh * scale)
            eff = min(dw * dh, ow * oh)
            waste = W * H - eff
            if eff > best_eff or (eff == best_eff and waste < best_waste):
                best, best_eff, best_waste = (i, j), eff, waste
    return best


def ref_unpad(hw, H, W):
    oh, ow = hw
    if ow / oh > W / H:
        nh = int(round(oh * (W / ow), 7))
        pad = (H - nh) // 2
        return pad, H - pad, 0, W
    nw = int(round(ow * (H / oh), 7))
    pad = (W - nw) // 2
    return 0, H, pad, W - pad


def l2(xs):
    n = math.sqrt(sum(x * x for x in xs))
    return [x / max(n, 1e-12) for x in xs]


def reference_positions(imp, hw, R, allocation="softmax_sum"):
    """Positions (in HF's vanilla sequence of the image) that GlobalCom2 keeps, by SPEC.md.

    Returns (positions, per-crop (n_j, k_j), k_t)."""
    gh, gw = ref_grid(hw)
    H, W = gh * S, gw * S
    r0, r1, c0, c1 = ref_unpad(hw, H, W)
    h, w = r1 - r0, c1 - c0
    thumb = imp[0].double()
    # Step 1
    k_t = int(N * R)
    thumb_keep = sorted(sorted(range(N), key=lambda i: (-float(thumb[i]), i))[:k_t])
    # Step 2
    s = [0.0] * (gh * gw)
    for i in range(S):
        for j in range(S):
            gi, gj = min(i // max(S // gh, 1), gh - 1), min(j // max(S // gw, 1), gw - 1)
            s[gi * gw + gj] += float(thumb[i * S + j])
    if allocation == "uniform":
        r = [R] * len(s)
    else:
        m = max(s)
        e = [math.exp((x - m) / TAU) for x in s]
        sig = [x / (sum(e) + 1e-8) for x in e]
        r = [min(1.0, R * (1 + x - sum(sig) / len(sig))) for x in sig]
    # The crops' local importance on the unpadded h x w area.
    local = torch.empty(h, w, dtype=torch.float64)
    for y in range(h):
        for x in range(w):
            gy, gx = r0 + y, c0 + x
            local[y, x] = imp[1 + (gy // S) * gw + gx // S][(gy % S) * S + gx % S]
    ratio = math.sqrt(h * w / (9 * N))
    if ratio > 1.1:  # anyres_max_9: select on the resized map
        hr, wr = int(h // ratio), int(w // ratio)
        loc = F.interpolate(local.double()[None, None], (hr, wr), mode="bilinear", align_corners=False)[0, 0]
        owner = {}
        for y in range(hr):
            for x in range(wr):
                uy, ux = math.floor((y + 0.5) * h / hr), math.floor((x + 0.5) * w / wr)
                owner[(y, x)] = ((r0 + uy) // S) * gw + (c0 + ux) // S
    else:
        hr, wr, loc = h, w, local
        owner = {(y, x): ((r0 + y) // S) * gw + (c0 + x) // S for y in range(h) for x in range(w)}
    glob = F.interpolate(thumb.double().reshape(1, 1, S, S), (hr, wr), mode="bilinear", align_corners=False)[0, 0]
    kept = set()
    budgets = []
    for j in range(gh * gw):
        cells = [p for p in sorted(owner) if owner[p] == j]  # raster order
        score = [a + b for a, b in zip(l2([float(loc[p]) for p in cells]), l2([float(glob[p]) for p in cells]))]
        kj = int(len(cells) * r[j])
        budgets.append((len(cells), kj))
        order = sorted(range(len(cells)), key=lambda i: (-score[i], i))[:kj]
        kept.update(cells[i] for i in order)
    pos = list(thumb_keep)
    for y in range(hr):
        pos += [N + y * (wr + 1) + x for x in range(wr) if (y, x) in kept]
        pos.append(N + y * (wr + 1) + wr)  # the row's newline
    return pos, budgets, k_t, hr


def vanilla_sequence(model, inputs):
    """HF's own packed sequence of the first image (what the vanilla model feeds)."""
    with torch.no_grad():
        out = model.model.get_image_features(
            inputs["pixel_values"], inputs["image_sizes"], batch_num_images=inputs["batch_num_images"], return_dict=True
        )
    return out.pooler_output[0]


def brute_similarity(model, pixel_values):
    """(V, N) float64: SPEC.md's ``-cos(x_i, mean)`` per view on the feature layer's patch features
    (what the projector receives: OneVision's "full" strategy keeps every token)."""
    with torch.no_grad():
        out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    x = out.hidden_states[model.config.vision_feature_layer].double()  # (V, N, C)
    g = x.mean(dim=1, keepdim=True).expand_as(x)
    return -F.cosine_similarity(x, g, dim=-1)


# -- tests -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("importance", ["similarity", "attention_received"])
@pytest.mark.parametrize("size", SIZES)
def test_kept_tokens_match_the_spec_reference(ov, size, importance):
    """``similarity`` is the default (``auto``) on SigLIP (SPEC.md); ``attention_received`` an ablation."""
    model, processor = ov
    inputs = _inputs(processor, [size])
    vanilla = vanilla_sequence(model, inputs)
    assert int((inputs.input_ids == model.config.image_token_id).sum()) == vanilla.shape[0]
    views = inputs["pixel_values"][0]
    imp = brute_similarity(model, views) if importance == "similarity" else brute_importance(model, views)
    R = 0.25
    positions, budgets, k_t, map_rows = reference_positions(imp, size, R)
    options = {} if importance == "similarity" else {"importance": importance}
    globalcom2.apply(model, method="globalcom2", retention_ratio=R, **options)
    try:
        _logits(model, inputs)
        adapter = globalcom2.get_family(model)
        tokens = adapter.last.tokens[0]
        torch.testing.assert_close(tokens, vanilla[positions], atol=1e-6, rtol=1e-6)
        # Budgets: floor(N R) thumbnail tokens, floor(n_j r_j) per crop, one newline per map row.
        plan = adapter.last.plans[0]
        masks = plan.kept_masks()
        assert masks.thumb_tokens == k_t == int(N * R)
        assert masks.crop_tokens == sum(k for _, k in budgets)
        assert plan.num_tokens == k_t + masks.crop_tokens + map_rows == len(positions)
        assert globalcom2.last_stats(model).visual_tokens == [len(positions)]
    finally:
        globalcom2.remove(model)


def test_resized_map_is_exercised(ov):
    model, processor = ov
    inputs = _inputs(processor, [SIZES[2]])
    n = int((inputs.input_ids == model.config.image_token_id).sum())
    assert n == N + 70 * (93 + 1)  # the processor's count after anyres_max_9 resizing
    globalcom2.apply(model, method="globalcom2", retention_ratio=0.5)
    try:
        enc = globalcom2.get_family(model).encode_inputs(inputs)
        g = enc.geometries[0]
        assert (g.grid_h, g.grid_w, g.row1, g.col1) == (3, 4, 70, 93) and enc.vanilla_counts == [n]
    finally:
        globalcom2.remove(model)


def test_attention_received_equals_brute_force(ov):
    model, processor = ov
    inputs = _inputs(processor, [SIZES[0]])
    globalcom2.apply(model, method="fastervlm", retention_ratio=0.5, importance="attention_received")
    try:
        with torch.no_grad():
            enc = globalcom2.get_family(model).encode_inputs(inputs)
    finally:
        globalcom2.remove(model)
    ref = brute_importance(model, inputs["pixel_values"][0])
    torch.testing.assert_close(enc.importance[0], ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(enc.importance[0].sum(1), torch.ones(ref.shape[0]), atol=1e-5, rtol=0)


def test_attention_received_chunks_do_not_change_it():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 50, 16, generator=g), torch.randn(3, 50, 16, generator=g)
    a = attention_received(q, k, num_heads=4, scale=0.5, chunk=7)
    b = attention_received(q, k, num_heads=4, scale=0.5, chunk=1000)
    qh, kh = q.reshape(3, 50, 4, 4).transpose(1, 2), k.reshape(3, 50, 4, 4).transpose(1, 2)
    ref = torch.softmax(qh @ kh.transpose(-1, -2) * 0.5, -1).mean((1, 2))
    torch.testing.assert_close(a, ref)
    torch.testing.assert_close(b, ref)


@pytest.mark.parametrize("method", ["globalcom2", "fastervlm", "random", "pooling"])
def test_keep_all_is_vanilla_with_resizing_and_multi_image(ov, method):
    model, processor = ov
    single = _inputs(processor, [SIZES[2]])
    multi = processor(
        images=[[make_image(400, 300, seed=1), make_image(200, 500, seed=2)]],
        text=[f"{processor.image_token} and {processor.image_token}\nsame?"],
        return_tensors="pt",
    )
    assert multi["batch_num_images"].tolist() == [2]
    for inputs in (single, multi):
        vanilla = _logits(model, inputs)
        cfg = make_config(method)
        options = {"layout": "spatial"} if cfg.layout_field else {}
        globalcom2.apply(model, type(cfg).keep_all(**options))
        try:
            assert torch.equal(_logits(model, inputs), vanilla)
        finally:
            globalcom2.remove(model)


def test_multi_image_prompts_and_batches_equal_each_alone(ov):
    model, processor = ov
    img = lambda h, w, s: make_image(h, w, seed=s)  # noqa: E731
    prompts = [
        ([img(400, 300, 1), img(200, 500, 2)], f"{processor.image_token} vs {processor.image_token}\nwhich?"),
        ([img(*SIZES[2], 3)], f"{processor.image_token}\nDescribe it briefly."),
        ([img(300, 900, 4)], f"{processor.image_token}\nhi"),
    ]
    batch = processor(images=[p[0] for p in prompts], text=[p[1] for p in prompts], return_tensors="pt", padding=True)
    assert (batch.attention_mask[:, 0] == 0).any()
    globalcom2.apply(model, method="globalcom2", retention_ratio=0.25)
    try:
        last = _logits(model, batch)[:, -1]
        for i, (images, text) in enumerate(prompts):
            alone = processor(images=[images], text=[text], return_tensors="pt")
            torch.testing.assert_close(_logits(model, alone)[0, -1], last[i], atol=1e-4, rtol=1e-4)
    finally:
        globalcom2.remove(model)


def test_remove_restores_bit_identical_logits(ov):
    model, processor = ov
    inputs = _inputs(processor, [SIZES[1]])
    before = _logits(model, inputs)
    globalcom2.apply(model, method="globalcom2", retention_ratio=0.25)
    assert _logits(model, inputs).shape[1] < before.shape[1]
    globalcom2.remove(model)
    assert torch.equal(_logits(model, inputs), before)
    assert "forward" not in model.__dict__ and not globalcom2.is_applied(model)


def test_official_layout_and_cls_raise_naming_the_family(ov):
    model, _ = ov
    with pytest.raises(ValueError, match="LLaVA-OneVision"):
        globalcom2.apply(model, method="globalcom2", layout="official")
    with pytest.raises(ValueError, match="LLaVA-OneVision"):
        globalcom2.apply(model, method="globalcom2", importance="cls")
    with pytest.raises(ValueError, match="LLaVA-OneVision"):
        globalcom2.apply(model, method="fastervlm", importance="cls")
    assert not globalcom2.is_applied(model)
    globalcom2.apply(model, method="globalcom2")  # no layout asked: the family's spatial
    try:
        assert globalcom2.get_config(model).layout == "spatial"
    finally:
        globalcom2.remove(model)


def test_importance_option_is_validated():
    with pytest.raises(ValueError, match="importance"):
        globalcom2.GlobalCom2Config(importance="softmax")
    with pytest.raises(ValueError, match="importance"):
        make_config("fastervlm", importance=None)


def test_llava_next_attention_received_ablation(tiny):
    model, processor = tiny
    inputs = processor(images=[make_image(480, 640)], text=[f"{processor.image_token}\nhi"], return_tensors="pt")
    globalcom2.apply(model, method="globalcom2", importance="attention_received")
    try:
        with torch.no_grad():
            enc = globalcom2.get_family(model).encode_inputs(inputs)
        _logits(model, inputs)
    finally:
        globalcom2.remove(model)
    attn = _last_attn(model)
    got = {}
    hooks = [attn.q_proj.register_forward_hook(lambda m, i, o: got.__setitem__("q", o)),
             attn.k_proj.register_forward_hook(lambda m, i, o: got.__setitem__("k", o))]
    with torch.no_grad():
        model.model.vision_tower(inputs["pixel_values"][0])
    for h in hooks:
        h.remove()
    q, k = got["q"][:, 1:].double(), got["k"][:, 1:].double()  # the N patches (no [CLS])
    v, t, d = q.shape
    hd = d // attn.num_heads
    qh, kh = q.reshape(v, t, -1, hd).transpose(1, 2), k.reshape(v, t, -1, hd).transpose(1, 2)
    ref = torch.softmax(qh @ kh.transpose(-1, -2) * hd**-0.5, -1).mean((1, 2)).float()
    torch.testing.assert_close(enc.importance[0], ref, atol=1e-6, rtol=1e-5)


def test_family_facts():
    fam = LlavaOnevisionFamily
    assert fam.default_text_model_type == "qwen2" and fam.layouts == ("spatial",)
    assert fam.default_max_visual_tokens() == N + 81 * 98
    assert set(fam.language_models) == {
        f"llava-hf/llava-onevision-qwen2-{s}-ov-hf" for s in ("0.5b", "7b", "72b")
    }
    thumb, canvas, lay = fam.picture_views(make_image(480, 640), None, 384)
    assert thumb.shape == (378, 378, 3) and canvas is None  # the 27 x 14 px the patches cover
    thumb, canvas, lay = fam.picture_views(make_image(480, 640), type("G", (), {"grid_h": 2, "grid_w": 2})(), 384)
    assert thumb.shape == (378, 378, 3) and canvas.shape == (756, 756, 3) and lay["height"] == 768
