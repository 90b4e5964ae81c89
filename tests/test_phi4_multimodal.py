"""Phi-4-multimodal (issue 27): the family's own checks on its tiny in-code model (SigLIP 448/14
without [CLS], 2 x 2 pool, global view + dynamic-HD crops, ``sub_GN`` / ``glb_GN`` separators).
The registry-driven matrices cover the rest."""

from __future__ import annotations

import math

import pytest
import torch

import globalcom2
from globalcom2.methods import GlobalCom2Config
from globalcom2.models import base

from conftest import make_image

SIZES = [(500, 900), (900, 500), (300, 300), (100, 2000), (1200, 1150)]


def crop_layout(*args):
    from globalcom2.models.phi4_multimodal import crop_layout as layout

    return layout(*args)


@pytest.fixture(scope="module")
def tiny_phi4():
    from globalcom2.models.phi4_multimodal import Phi4MultimodalFamily

    assert base.family_for_model_type(Phi4MultimodalFamily.model_type) is Phi4MultimodalFamily  # registered
    yield Phi4MultimodalFamily.build_tiny()


def _inputs(processor, sizes, text="What is this?"):
    images = [[make_image(h, w, seed=h + w)] for h, w in sizes]  # the same image whatever the batch
    return processor(images=images, text=[f"{processor.image_token}\n{text}"] * len(sizes), return_tensors="pt", padding=True)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(autouse=True)
def _clean(tiny_phi4):
    yield
    if globalcom2.is_applied(tiny_phi4[0]):
        globalcom2.remove(tiny_phi4[0])


def _vanilla_layout(h, w, view=448, patch=14, max_crops=6):
    """Independent of the library: views, unpadded token rows / columns and the vanilla count."""
    rows, cols, _, _, vr, vc = crop_layout(h, w, view, patch, max_crops)
    uh, uw = math.ceil(vr / 2), math.ceil(vc / 2)
    return rows, cols, uh, uw, uh * (uw + 1) + 1 + 16 * 17


@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_keep_all_is_vanilla_and_quarter_per_view(tiny_phi4, size):
    model, processor = tiny_phi4
    inputs = _inputs(processor, [size])
    rows, cols, uh, uw, count = _vanilla_layout(*size)
    assert int((inputs.input_ids == model.config.vision_config.image_token_id).sum()) == count
    before = _logits(model, inputs)
    globalcom2.apply(model, GlobalCom2Config.keep_all(layout="spatial"))
    assert torch.equal(_logits(model, inputs), before)
    globalcom2.remove(model)
    globalcom2.apply(model, method="globalcom2", retention_ratio=0.25)
    _logits(model, inputs)
    plan = globalcom2.get_family(model).last.plans[0]
    assert plan.thumb_keep.numel() == 64  # floor(256 R)
    valid = plan.crop_valid.sum(1).float()
    assert int(valid.sum()) == uh * uw
    kept = plan.crop_keep.sum(1).float()
    assert torch.all(kept <= valid)
    assert 0.15 < float(kept.sum() / valid.sum()) < 0.4
    separators = uh + 1 + 16
    assert globalcom2.last_stats(model).visual_tokens == [64 + int(kept.sum()) + separators]


def test_batch_left_padded_equals_alone_generate_and_remove(tiny_phi4):
    model, processor = tiny_phi4
    sizes = [SIZES[0], SIZES[3]]
    batch = _inputs(processor, sizes)
    vanilla = _logits(model, batch)
    globalcom2.apply(model, method="globalcom2", retention_ratio=0.25)
    out = _logits(model, batch)
    for i, size in enumerate(sizes):
        alone = _logits(model, _inputs(processor, [size]))
        assert torch.allclose(out[i, -1], alone[0, -1], atol=1e-5)
    gen = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert torch.equal(gen[:, : batch.input_ids.shape[1]], batch.input_ids)
    assert gen.shape[1] == batch.input_ids.shape[1] + 3
    globalcom2.remove(model)
    assert torch.equal(_logits(model, batch), vanilla)


def _brute_similarity(model, pixel_values, mask):
    """-cos of each 2 x 2-pooled token (feature layer -2) to its view's mean, by hand."""
    tower = model.model.embed_tokens_extend.image_embed.img_processor
    out = tower(pixel_values, patch_attention_mask=mask, output_hidden_states=True)
    x = out.hidden_states[-2]  # (V, 1024, D)
    v, p, d = x.shape[0], 32, x.shape[-1]
    grid = x.view(v, p, p, d)
    pooled = torch.stack(
        [grid[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean(dim=(1, 2)) for i in range(16) for j in range(16)], dim=1
    ).double()
    g = pooled.mean(1, keepdim=True)
    return -(pooled * g).sum(-1) / (pooled.norm(dim=-1) * g.norm(dim=-1))


def _brute_attention_received(model, pixel_values, mask):
    tower = model.model.embed_tokens_extend.image_embed.img_processor
    out = tower(pixel_values, patch_attention_mask=mask, output_hidden_states=True)
    layer = tower.encoder.layers[-1]
    h = layer.layer_norm1(out.hidden_states[-2])
    attn = layer.self_attn
    heads, hd = attn.num_heads, attn.head_dim
    q = attn.q_proj(h).double().view(h.shape[0], -1, heads, hd).transpose(1, 2)
    k = attn.k_proj(h).double().view(h.shape[0], -1, heads, hd).transpose(1, 2)
    a = torch.softmax(q @ k.transpose(-1, -2) * hd**-0.5, dim=-1).mean(dim=(1, 2))  # (V, 1024)
    grid = a.view(-1, 32, 32)
    return torch.stack([grid[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean(dim=(1, 2)) for i in range(16) for j in range(16)], dim=1)


@pytest.mark.parametrize("kind", ["similarity", "attention_received"])
def test_importance_matches_brute_force(tiny_phi4, kind):
    model, processor = tiny_phi4
    inputs = _inputs(processor, [SIZES[0]])
    globalcom2.apply(model, method="globalcom2", retention_ratio=0.25, importance=kind)
    adapter = globalcom2.get_family(model)
    with torch.no_grad():
        enc = adapter.encode(inputs["image_pixel_values"], inputs["image_sizes"], inputs["image_attention_mask"])
        pv = inputs["image_pixel_values"][0]
        mask = inputs["image_attention_mask"][0].bool()
        ref = (_brute_similarity if kind == "similarity" else _brute_attention_received)(model, pv, mask)
    views = enc.features[0].shape[0]
    assert torch.allclose(enc.importance[0].double(), ref[:views].double(), atol=1e-5, rtol=1e-4)


def test_count_first_equals_model_shortened(tiny_phi4):
    model, processor = tiny_phi4
    sizes = [SIZES[1], SIZES[4]]
    vanilla_inputs = _inputs(processor, sizes)
    globalcom2.apply(model, method="globalcom2", retention_ratio=0.25, count="fixed")
    shortened = _logits(model, vanilla_inputs)
    counts = globalcom2.get_family(model).count_visual_tokens(sizes, processor=processor)
    assert globalcom2.last_stats(model).visual_tokens == counts
    globalcom2.remove(model)
    globalcom2.apply(model, method="globalcom2", retention_ratio=0.25, count="fixed", processor=processor)
    try:
        first = _inputs(processor, sizes)
        assert (first.input_ids == model.config.vision_config.image_token_id).sum(1).tolist() == counts
        assert torch.allclose(_logits(model, first)[:, -1], shortened[:, -1], atol=1e-5)
    finally:
        globalcom2.remove(model)


def test_cls_refused_and_official_layout_refused(tiny_phi4):
    model, _ = tiny_phi4
    with pytest.raises(ValueError, match="CLS"):
        globalcom2.apply(model, method="globalcom2", importance="cls")
    with pytest.raises(ValueError, match="layout"):
        globalcom2.apply(model, method="globalcom2", layout="official")


def test_step4_stretches_the_global_map_over_the_padded_canvas(tiny_phi4):
    """The processor's global view is the padded canvas resized to one view, so Step 4's global
    piece of a crop token is the thumbnail's map resized to the whole rows*16 x cols*16 grid,
    padding included, read at that token (not the map squeezed into the unpadded area)."""
    import torch.nn.functional as F

    from globalcom2.core.geometry import CanvasCropGeometry, CropGeometry, grid_to_crops
    from globalcom2.core.plans import select_crop_tokens
    from globalcom2.models.phi4_multimodal import Phi4MultimodalFamily

    model, processor = tiny_phi4
    inputs = _inputs(processor, [(500, 900)])  # 2 x 3 canvas, padding at the bottom
    adapter = Phi4MultimodalFamily(model, GlobalCom2Config(layout="spatial"))
    with torch.no_grad():
        enc = adapter.encode_inputs(inputs)
    geom, imp = enc.geometries[0], enc.importance[0].double()
    assert isinstance(geom, CanvasCropGeometry) and (geom.grid_h, geom.grid_w) == (2, 3)
    assert geom.row1 < geom.height and geom.col1 == geom.width  # padded rows: the two mappings differ
    s = geom.side
    full = F.interpolate(imp[0].view(1, 1, s, s), size=(geom.height, geom.width), mode="bilinear", align_corners=False)[0, 0]
    glob = torch.zeros(geom.height, geom.width, dtype=torch.float64)
    glob[: geom.row1, : geom.col1] = full[: geom.row1, : geom.col1]
    glob = grid_to_crops(glob, geom)  # (C, N)
    valid = grid_to_crops(torch.arange(geom.height)[:, None].expand(-1, geom.width) < geom.row1, geom)
    expected = torch.where(valid, glob, 0.0)
    expected = expected / expected.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    expected = expected.masked_fill(~valid, float("-inf"))
    ratios = torch.full((geom.num_crops,), 0.25, dtype=torch.float64)
    _, _, score = select_crop_tokens(imp[1:], imp[0], geom, ratios, scoring="global_only")
    torch.testing.assert_close(score, expected, rtol=0, atol=1e-12)
    # the plain geometry squeezes the map into the unpadded area: another score
    squeezed = CropGeometry(s, geom.grid_h, geom.grid_w, geom.row0, geom.row1, geom.col0, geom.col1)
    _, _, other = select_crop_tokens(imp[1:], imp[0], squeezed, ratios, scoring="global_only")
    assert not torch.allclose(other[valid], score[valid])
