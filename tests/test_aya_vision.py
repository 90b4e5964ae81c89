"""Aya Vision / Command A Vision (one family module, two model types) on tiny in-code models with the
published geometry: the tiling rules against the processors and the rule's documentation, the
prompt text, per-view runs, and the kept tokens against a hand computation.

The references below are written from SPEC.md and the models' documented behaviour, not by calling
the family: the similarity of every patch by brute force, each token's 2 x 2 block of patches by
explicit indexing, the kept tokens by sorting.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import globalcom2
from globalcom2.models.aya_vision import (
    AyaVisionFamily, Cohere2VisionFamily, aya_tile_grid, cohere2_tile_grid, tiny_cohere2_image_processor,
)

from conftest import make_image

SIZES = [(500, 900), (900, 500), (300, 300), (100, 2000), (1200, 1150)]
TYPES = ["aya_vision", "cohere2_vision"]
FAMILY = {"aya_vision": AyaVisionFamily, "cohere2_vision": Cohere2VisionFamily}
#: Tokens per view: 364 / 14 / 2 = 13 per side (Aya Vision), 512 / 16 / 2 = 16 (Command A Vision).
PER_VIEW = {"aya_vision": 13 * 13, "cohere2_vision": 16 * 16}

_MODELS: dict[str, tuple] = {}


def _tiny(model_type):
    if model_type not in _MODELS:
        _MODELS[model_type] = FAMILY[model_type].build_tiny(seed=0)
    return _MODELS[model_type]


@pytest.fixture(autouse=True)
def _clean():
    yield
    for model, _ in _MODELS.values():
        globalcom2.remove(model)


def _inputs(processor, sizes, seed=0):
    images = [make_image(*s, seed=seed + i) for i, s in enumerate(sizes)]
    texts = [f"{processor.image_token}\nWhat?" for _ in sizes]
    return processor(images=[[im] for im in images], text=texts, return_tensors="pt", padding=True)


def _tokens(processor, ids):
    """The prompt's tokens with each run of image tokens written as ``IMG*n``."""
    out, run = [], 0
    for tok in processor.tokenizer.convert_ids_to_tokens(ids):
        if tok == "<|IMG_PATCH|>":
            run += 1
            continue
        if run:
            out.append(f"IMG*{run}")
            run = 0
        out.append(tok)
    return out + ([f"IMG*{run}"] if run else [])


# -- the tiling rules ------------------------------------------------------------------------------
def test_command_a_vision_tiling_rule_by_hand():
    # The least upscale that fits, fewest tiles first among candidates of the same scale
    # (scale = min(cols * 512 / width, rows * 512 / height)):
    assert cohere2_tile_grid(300, 300) == (1, 1)  # 1 x 1 already upscales (512 / 300)
    assert cohere2_tile_grid(500, 900) == (1, 2)  # 2 columns: min(1024 / 900, 512 / 500) = 1.024, the smallest >= 1
    assert cohere2_tile_grid(900, 500) == (2, 1)
    assert cohere2_tile_grid(100, 2000) == (1, 4)  # 4 columns reach 2048 >= 2000
    assert cohere2_tile_grid(1200, 1150) == (3, 3)  # 3 x 3 (1536 px) is the first canvas both sides fit
    # Nothing fits: the least downscale (12 columns: 6144 / 20000), not the closest aspect ratio.
    assert cohere2_tile_grid(100, 20000) == (1, 12)
    # Ties of scale go to the fewest tiles: 600 x 600 fits 2 x 2 (scale 1.707) and 2 x 3, 3 x 2 ... at
    # larger scales; 1 x 1 is 0.853 < 1.
    assert cohere2_tile_grid(600, 600) == (2, 2)
    # max_tiles caps the candidates; min_patches plays no part in this rule.
    assert cohere2_tile_grid(100, 2000, max_tiles=3) == (1, 3)


def test_the_pil_image_processor_cuts_command_a_vision_tiles_as_the_rule_says():
    ip = tiny_cohere2_image_processor(size={"height": 512, "width": 512}, max_patches=12, do_normalize=False, do_rescale=False)
    for h, w in SIZES:
        image = make_image(h, w)
        out = ip(images=[image], return_tensors="pt")
        rows, cols = cohere2_tile_grid(h, w)
        views = 1 if rows * cols == 1 else rows * cols + 1
        assert out["num_patches"].tolist() == [views] and out["pixel_values"].shape == (views, 3, 512, 512)
        assert ip.get_number_of_image_patches(h, w) == views
        if views > 1:  # the tiles, row by row, are the image resized to the canvas; the thumbnail last
            pixels = np.asarray(image).transpose(2, 0, 1)
            canvas = ip.resize(pixels, size=type(ip.size)(height=rows * 512, width=cols * 512), resample=ip.resample)
            canvas = torch.as_tensor(canvas, dtype=torch.float32)
            for k in range(rows * cols):
                i, j = divmod(k, cols)
                assert torch.equal(out["pixel_values"][k], canvas[:, i * 512:(i + 1) * 512, j * 512:(j + 1) * 512])


@pytest.mark.parametrize("model_type", TYPES)
def test_views_and_grid_follow_the_processor(model_type):
    """The processor's views per image, and the grid the family reads from the pixels (no input
    carries it) is the rule's."""
    family = FAMILY[model_type]
    model, processor = _tiny(model_type)
    globalcom2.apply(model, retention_ratio=0.25)
    adapter = globalcom2.get_family(model)
    for h, w in SIZES:
        inputs = _inputs(processor, [(h, w)])
        rows, cols = aya_tile_grid(h, w) if family is AyaVisionFamily else cohere2_tile_grid(h, w)
        views = 1 if rows * cols == 1 else rows * cols + 1
        assert inputs.pixel_values.shape[0] == views
        assert adapter._grid_of((h, w), processor) == (rows, cols)
        assert adapter.size_layout([(h, w)], processor=processor)[0] == [views]
        geom = adapter.encode_inputs(inputs).geometries[0]
        assert (None if views == 1 else (geom.grid_h, geom.grid_w)) == (None if views == 1 else (rows, cols))
        assert adapter.view_grid(inputs) == (None if views == 1 else (rows, cols))


# -- the prompt ------------------------------------------------------------------------------------
def test_aya_vision_prompt_text():
    model, processor = _tiny("aya_vision")
    n = PER_VIEW["aya_vision"]
    ids = _inputs(processor, [(500, 900)]).input_ids[0].tolist()
    assert _tokens(processor, ids)[:12] == [
        "<|START_OF_IMG|>", "TILE", "_", "1", f"IMG*{n}", "TILE", "_", "2", f"IMG*{n}", "TILE_GLOBAL", f"IMG*{n}", "<|END_OF_IMG|>",
    ]
    ids = _inputs(processor, [(300, 300)]).input_ids[0].tolist()  # one tile: no thumbnail, the global tag only
    assert _tokens(processor, ids)[:4] == ["<|START_OF_IMG|>", "TILE_GLOBAL", f"IMG*{n}", "<|END_OF_IMG|>"]


def test_command_a_vision_prompt_text():
    model, processor = _tiny("cohere2_vision")
    n = PER_VIEW["cohere2_vision"]
    ids = _inputs(processor, [(500, 900)]).input_ids[0].tolist()
    assert _tokens(processor, ids)[:8] == [
        "<|START_OF_IMG|>", f"IMG*{n}", "<|IMG_LINE_BREAK|>", f"IMG*{n}", "<|IMG_LINE_BREAK|>", f"IMG*{n}", "<|IMG_LINE_BREAK|>",
        "<|END_OF_IMG|>",
    ]


@pytest.mark.parametrize("model_type", TYPES)
def test_runs_text_is_the_processors_text(model_type):
    family = FAMILY[model_type]
    model, processor = _tiny(model_type)
    for h, w in SIZES:
        image_inputs = processor.image_processor(images=[make_image(h, w)])
        views = int(image_inputs["num_patches"][0])
        n = PER_VIEW[model_type]
        assert family.runs_text(processor, image_inputs, 0, [n] * views) == processor.replace_image_token(image_inputs, 0)


@pytest.mark.parametrize("model_type", TYPES)
def test_every_view_keeps_its_own_run(model_type):
    """Two prompts of two images each: every view's run is shortened to its own kept count, the tags,
    line breaks and markers between runs stay (compare the model's input with the prompt)."""
    model, processor = _tiny(model_type)
    images = [[make_image(500, 900, seed=1), make_image(300, 300, seed=2)], [make_image(900, 500, seed=3), make_image(100, 2000, seed=4)]]
    text = [f"{processor.image_token} and {processor.image_token}?"] * 2
    inputs = processor(images=images, text=text, return_tensors="pt", padding=True)
    globalcom2.apply(model, retention_ratio=0.25)
    seen = {}

    def keep(module, args, kwargs):
        seen["ids"] = kwargs["input_ids"]

    handle = model.model.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    adapter = globalcom2.get_family(model)
    kept = [adapter._plan_runs(p, len(r)).tolist() for p, r in zip(adapter.last.plans, adapter.prompt_views(inputs.input_ids))]
    image_id = model.config.image_token_id
    for row in range(2):
        before = [t for t in _tokens(processor, inputs.input_ids[row].tolist()) if t != processor.tokenizer.pad_token]
        after = [t for t in _tokens(processor, seen["ids"][row].tolist()) if t != processor.tokenizer.pad_token]
        assert [t for t in before if not t.startswith("IMG*")] == [t for t in after if not t.startswith("IMG*")]
        want = [f"IMG*{k}" for runs in kept[2 * row: 2 * row + 2] for k in runs]
        assert [t for t in after if t.startswith("IMG*")] == want
    assert sum(sum(r) for r in kept) == int((seen["ids"] == image_id).sum())


# -- a hand computation ----------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", TYPES)
def test_one_view_keeps_the_least_typical_tokens(model_type):
    """One view (a small image): the kept tokens are the floor(N R) tokens whose 2 x 2 patches are the
    least like the view's mean patch at the projector's input (mean -cos over the block), in raster
    order, with the vanilla model's features."""
    model, processor = _tiny(model_type)
    inputs = _inputs(processor, [(300, 300)])
    seen = {}
    projector = model.model.multi_modal_projector
    handle = projector.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    try:
        with torch.no_grad():
            vanilla = model.model.get_image_features(pixel_values=inputs.pixel_values, return_dict=True).pooler_output[0]
    finally:
        handle.remove()
    x = seen["x"][0].float()  # (P*P, C) patches
    p = int(round(x.shape[0] ** 0.5))
    sim = -torch.nn.functional.cosine_similarity(x, x.mean(0, keepdim=True), dim=-1).reshape(p, p)
    s = p // 2
    score = torch.stack([sim[2 * i:2 * i + 2, 2 * j:2 * j + 2].mean() for i in range(s) for j in range(s)])
    keep = int(s * s * 0.25)
    want = torch.sort(torch.argsort(score, descending=True, stable=True)[:keep]).values
    out = globalcom2.compress_images(model, inputs, retention_ratio=0.25)
    plan = out.plans[0]
    torch.testing.assert_close(plan.thumb_importance.reshape(-1).float(), score, atol=1e-5, rtol=1e-5)
    assert plan.thumb_keep.tolist() == want.tolist()
    torch.testing.assert_close(out.embeddings[0], vanilla[want])


def test_max_visual_tokens():
    assert AyaVisionFamily.default_max_visual_tokens() == 13 * PER_VIEW["aya_vision"]  # 12 tiles + the thumbnail
    assert Cohere2VisionFamily.default_max_visual_tokens() == 13 * PER_VIEW["cohere2_vision"]
    for model_type in TYPES:
        model, _ = _tiny(model_type)
        assert FAMILY[model_type].max_visual_tokens(model.config) == 13 * PER_VIEW[model_type]


def test_cls_is_refused_and_the_select_strategy_checked():
    model, _ = _tiny("aya_vision")
    with pytest.raises(ValueError, match="no \\[CLS\\]"):
        globalcom2.apply(model, retention_ratio=0.25, importance="cls")
    model.config.vision_feature_select_strategy = "default"
    try:
        with pytest.raises(ValueError, match="vision_feature_select_strategy='full'"):
            globalcom2.apply(model, retention_ratio=0.25)
    finally:
        model.config.vision_feature_select_strategy = "full"


# -- FastV on the Cohere 2 language model ----------------------------------------------------------
@pytest.mark.parametrize("layer", [2, 4])  # ranks at layer 1 (a windowed layer: rotary) and 3 (full: no rotary)
def test_fastv_ranks_as_cohere2_attends(layer):
    """FastV recomputes layer K-1's attention of the last token from captured q/k: on Cohere 2 with
    the layer's own rotary (adjacent dimensions paired) on the windowed layers and none on the full
    ones; the kept visual tokens are the top ones of an eager run's attention weights."""
    from transformers import Cohere2Config, Cohere2ForCausalLM

    from globalcom2.methods.fastv import FastVConfig, FastVPatch

    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=300, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = Cohere2ForCausalLM(Cohere2Config(**cfg, attn_implementation="sdpa")).eval()
    assert model.config.layer_types[1] == "sliding_attention" and model.config.layer_types[3] == "full_attention"
    with torch.no_grad():
        for block in model.model.layers:  # peaked attention: a ranking far from ties
            block.self_attn.q_proj.weight.mul_(4.0)
            block.self_attn.k_proj.weight.mul_(4.0)
    twin = Cohere2ForCausalLM(Cohere2Config(**cfg, attn_implementation="eager")).eval()
    twin.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 300, (2, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids[mask == 0] = 0
    visual = torch.zeros_like(ids, dtype=torch.bool)
    visual[0, 3:15] = True
    visual[1, 6:18] = True
    with torch.no_grad():
        weights = twin(input_ids=ids, attention_mask=mask, output_attentions=True).attentions[layer - 1]  # (B, H, T, T)
    patch = FastVPatch(model.model, FastVConfig(retention_ratio=0.25, layer=layer))
    patch.install()
    try:
        patch.prepare(visual)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        patch.uninstall()
    for b in range(2):
        vis = visual[b].nonzero().flatten()
        top = vis[weights[b, :, -1, vis].mean(0).topk(3).indices]  # round(0.25 * 12) = 3 kept
        assert patch.last_kept_positions[b].tolist() == sorted(top.tolist())


def test_efficiency_knows_the_checkpoints():
    from globalcom2 import efficiency as eff

    for checkpoint, tokens in [("CohereLabs/aya-vision-8b", 13 * PER_VIEW["aya_vision"]),
                               ("CohereLabs/command-a-vision-07-2025", 13 * PER_VIEW["cohere2_vision"])]:
        arch = eff.resolve_arch(checkpoint)
        assert arch.vocab_size == 256000 and arch.head_dim * arch.num_heads == arch.hidden_size
        assert eff.max_visual_tokens_for_model(checkpoint) == tokens


@pytest.mark.parametrize("model_type", TYPES)
def test_count_first_at_a_tiny_ratio(model_type):
    """A count-first processor at R = 0.002 writes runs of 0 (no token kept of a 169 / 256 view): the
    model reads one view per tag between the image's markers, not one per non-empty run."""
    model, processor = _tiny(model_type)
    sizes = [(500, 900), (300, 300)]
    vanilla = _inputs(processor, sizes)
    globalcom2.apply(model, processor=processor, retention_ratio=0.002, count="fixed")
    try:
        inputs = _inputs(processor, sizes)
        adapter = globalcom2.get_family(model)
        assert [len(r) for r in adapter.prompt_views(inputs.input_ids)] == [3, 1]
        assert 0 in [k for r in adapter.prompt_views(inputs.input_ids) for k in r]
        with torch.no_grad():
            model(**inputs)
        written = (inputs.input_ids == model.config.image_token_id).sum(1).tolist()
        assert globalcom2.last_stats(model).visual_tokens == written
    finally:
        globalcom2.remove(model)
    assert torch.equal(_inputs(processor, sizes).input_ids, vanilla.input_ids)  # the processor is vanilla again
