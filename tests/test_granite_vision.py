"""granite-vision-3.x on the LLaVA-NeXT family: ``LlavaNextForConditionalGeneration`` with a SigLIP
tower (no [CLS]), ``vision_feature_select_strategy="full"`` and a list ``vision_feature_layer``
whose hidden states the model concatenates along the channels before the projector.

The tiny model has that geometry (``LlavaNextFamily.tiny_granite_config``: SigLIP 384/14, four
feature layers, a few of granite's pinpoints, a Granite language model). Checked here: keep-all is
the vanilla model exactly; R = 0.25 keeps about a quarter; the default importance is
``similarity`` (SPEC.md, "Importance without a [CLS] token") on what the projector receives,
against a hand computation on the concatenated hidden states; ``attention_received`` against a
brute-force softmax at the tower's last layer; ``cls`` refused in one line; ``count="fixed"``;
generation keeps the caller's prompt; every registered method runs or refuses in one line.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import globalcom2
from conftest import make_image
from globalcom2 import tiny
from globalcom2.methods import language_config, make_config, method_names, vision_config
from globalcom2.models.llava_next import LlavaNextFamily, has_class_token

SIZES = [(480, 640), (300, 900), (1000, 300)]
QUESTIONS = ["What is this?", "Describe it briefly, please.", "hi"]


@pytest.fixture(scope="module")
def granite():
    """(model, processor): the tiny granite-vision-shaped LLaVA-NeXT, float32, eval mode."""
    tok = tiny.build_tokenizer("llava_next")
    config = tiny.build_config("llava_next", tok, granite=True)
    model = tiny.build_model("llava_next", config, tok.pad_token_id, seed=0)
    return model, LlavaNextFamily.tiny_granite_processor(tok)


@pytest.fixture(autouse=True)
def _unpatch(request):
    yield
    if "granite" in request.fixturenames:
        globalcom2.remove(request.getfixturevalue("granite")[0])


def _inputs(processor, idx):
    images = [[make_image(*SIZES[i], seed=i)] for i in idx]
    text = [f"{processor.image_token}\n{QUESTIONS[i]}" for i in idx]
    return processor(images=images, text=text, return_tensors="pt", padding=True)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _one_line(error: Exception) -> str:
    text = str(error)
    assert text and "\n" not in text, text
    return text


def test_the_tiny_model_has_granite_visions_shape(granite):
    model, processor = granite
    cfg = model.config
    assert cfg.vision_config.model_type == "siglip_vision_model" and cfg.text_config.model_type == "granite"
    assert cfg.vision_feature_select_strategy == "full"
    layers = cfg.vision_feature_layer
    assert isinstance(layers, list) and len(layers) > 1 and layers[-1] == -1
    width = cfg.vision_config.hidden_size * len(layers)
    assert model.model.multi_modal_projector.linear_1.in_features == width  # the concatenated layers
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    inputs = _inputs(processor, [0])
    tokens = int((inputs.input_ids == cfg.image_token_id).sum())
    fam = LlavaNextFamily(model, globalcom2.GlobalCom2Config())
    geom = fam.size_layout([SIZES[0]])[1][0]
    assert geom.side == side and tokens == geom.vanilla_num_tokens()  # N = side^2 per view: no [CLS] counted
    assert not has_class_token(fam.vision_tower())


def test_keep_all_is_the_vanilla_model(granite):
    model, processor = granite
    inputs = _inputs(processor, [0, 1])
    vanilla = _logits(model, inputs)
    globalcom2.apply(model, globalcom2.GlobalCom2Config.keep_all(layout="spatial"))
    out = _logits(model, inputs)
    stats = globalcom2.last_stats(model)
    assert stats.visual_tokens == stats.vanilla_visual_tokens
    assert torch.equal(out, vanilla)
    globalcom2.remove(model)
    assert torch.equal(_logits(model, inputs), vanilla)


def test_a_quarter_is_kept_and_generate_returns_the_callers_prompt(granite):
    model, processor = granite
    inputs = _inputs(processor, [0, 1, 2])
    globalcom2.apply(model, retention_ratio=0.25)
    logits = _logits(model, inputs)
    stats = globalcom2.last_stats(model)
    vanilla = (inputs.input_ids == model.config.image_token_id).sum(1).tolist()
    assert stats.vanilla_visual_tokens == vanilla
    for kept, total in zip(stats.visual_tokens, vanilla):
        assert 0.15 < kept / total < 0.4
    real = inputs.attention_mask.sum(1).tolist()
    assert logits.shape[1] == max(r - v + k for r, v, k in zip(real, vanilla, stats.visual_tokens))
    gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(gen[:, : inputs.input_ids.shape[1]], inputs.input_ids)
    for i in range(3):  # a batch (left padding) equals each prompt alone
        single = _inputs(processor, [i])
        torch.testing.assert_close(_logits(model, single)[0, -1], logits[i, -1], atol=1e-4, rtol=1e-4)


def _projector_input(model, inputs):
    """What the vanilla model's projector receives, every view: (sum V, N, C)."""
    seen = []
    handle = model.model.multi_modal_projector.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        _logits(model, inputs)
    finally:
        handle.remove()
    return torch.cat(seen)


def test_similarity_is_computed_on_the_concatenated_feature_layers(granite):
    model, processor = granite
    inputs = _inputs(processor, [0, 1])
    received = _projector_input(model, inputs)
    # By hand: the tower's hidden states of every feature layer, concatenated, no row dropped.
    fam = LlavaNextFamily(model, globalcom2.GlobalCom2Config())
    views = [fam.num_views(tuple(hw)) for hw in inputs.image_sizes.tolist()]
    pixels = torch.cat([pv[:v] for pv, v in zip(inputs.pixel_values, views)])
    with torch.no_grad():
        out = model.model.vision_tower(pixels, output_hidden_states=True)
    layers = model.config.vision_feature_layer
    hand = torch.cat([out.hidden_states[i] for i in layers], dim=-1)
    assert hand.shape[-1] == model.config.vision_config.hidden_size * len(layers)
    assert torch.equal(hand, received)  # the features are the vanilla model's
    x = hand.double()
    want = -F.cosine_similarity(x, x.mean(1, keepdim=True).expand_as(x), dim=-1)  # (sum V, N)
    thumbs = torch.cat([want[:1], want[views[0]:views[0] + 1]])  # each image's first view
    for options in ({}, {"importance": "similarity"}, {"importance": "auto"}):
        emb = globalcom2.compress_images(model, inputs, retention_ratio=0.25, **options)
        got = torch.stack([p.thumb_importance for p in emb.plans])
        torch.testing.assert_close(got, thumbs, atol=1e-9, rtol=0)


def test_attention_received_is_the_softmax_at_the_towers_last_layer(granite):
    model, processor = granite
    inputs = _inputs(processor, [0])
    attn = [m for m in model.model.vision_tower.modules() if hasattr(m, "q_proj")][-1]  # the last layer's
    caught = {}
    hooks = [attn.q_proj.register_forward_hook(lambda m, a, o: caught.__setitem__("q", o.detach())),
             attn.k_proj.register_forward_hook(lambda m, a, o: caught.__setitem__("k", o.detach()))]
    try:
        _logits(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    q, k = caught["q"][:1].float(), caught["k"][:1].float()  # the thumbnail
    heads = attn.num_heads
    qh = q.view(1, q.shape[1], heads, -1).transpose(1, 2)
    kh = k.view(1, k.shape[1], heads, -1).transpose(1, 2)
    probs = torch.softmax(qh @ kh.transpose(-1, -2) * attn.scale, dim=-1)  # (1, H, N, N): every patch, no [CLS]
    want = probs.mean(dim=(1, 2))[0]
    emb = globalcom2.compress_images(model, inputs, retention_ratio=0.25, importance="attention_received")
    torch.testing.assert_close(emb.plans[0].thumb_importance.float(), want, atol=1e-6, rtol=1e-5)


def test_cls_is_refused_in_one_line(granite):
    model, _ = granite
    with pytest.raises(ValueError) as err:
        globalcom2.apply(model, importance="cls")
    assert "importance='cls'" in _one_line(err.value) and "'full'" in str(err.value)
    assert not globalcom2.is_applied(model)


def test_full_on_a_tower_with_a_class_token_is_refused_in_one_line():
    model, _ = tiny.build_tiny("llava_next", vision_feature_select_strategy="full")
    with pytest.raises(ValueError) as err:
        globalcom2.apply(model)
    assert "vision_feature_select_strategy='full'" in _one_line(err.value) and "[CLS]" in str(err.value)


def test_another_strategy_in_the_call_is_refused_in_one_line(granite):
    model, processor = granite
    globalcom2.apply(model)
    with pytest.raises(ValueError) as err:
        model(**_inputs(processor, [0]), vision_feature_select_strategy="cls_patch")
    assert "vision_feature_select_strategy" in _one_line(err.value)


def test_fixed_count_depends_on_the_size_only(granite):
    model, processor = granite
    hw = (500, 800)
    images = [make_image(*hw, seed=s) for s in (1, 2, 3)]
    images.append(images[0].point(lambda v: 255 - v))  # other importance everywhere
    batch = processor(images=[[im] for im in images], text=[f"{processor.image_token}\nWhat?"] * 4, return_tensors="pt", padding=True)
    fixed = globalcom2.compress_images(model, batch, retention_ratio=0.25, count="fixed")
    assert len(set(fixed.counts)) == 1
    assert fixed.counts == globalcom2.visual_token_counts(model, [hw] * 4, retention_ratio=0.25, count="fixed", processor=processor)
    # Count first: the processor writes the compressed count, the model runs that very sequence.
    globalcom2.apply(model, processor=processor, retention_ratio=0.25)
    inputs = _inputs(processor, [0, 1])
    emb = globalcom2.compress_images(model, inputs)
    assert (inputs.input_ids == model.config.image_token_id).sum(1).tolist() == emb.counts
    patched = _logits(model, inputs)
    feed = globalcom2.embed_prompt(model, emb, inputs["input_ids"], inputs["attention_mask"])
    globalcom2.remove(model)
    torch.testing.assert_close(patched, _logits(model, feed))
    globalcom2.apply(model, processor=processor, retention_ratio=0.25)
    gen_inputs = _inputs(processor, [0])
    gen = model.generate(**gen_inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(gen[:, : gen_inputs.input_ids.shape[1]], gen_inputs.input_ids)


def _cells():
    for method in method_names():
        vision = vision_config(make_config(method))
        layouts = LlavaNextFamily.layouts if vision is not None and vision.layout_field else (None,)
        for layout in layouts:
            yield pytest.param(method, layout, id=f"{method}-{layout or 'fixed'}")


@pytest.mark.parametrize("method, layout", list(_cells()))
def test_every_method_runs_or_refuses_in_one_line(granite, method, layout):
    model, processor = granite
    inputs = _inputs(processor, [0, 1])
    options = {"layout": layout} if layout is not None else {}
    try:
        globalcom2.apply(model, method=method, retention_ratio=0.25, **options)
    except ValueError as e:
        _one_line(e)
        return
    logits = _logits(model, inputs)
    stats = globalcom2.last_stats(model)
    assert stats.vanilla_visual_tokens == (inputs.input_ids == model.config.image_token_id).sum(1).tolist()
    cfg = globalcom2.get_config(model)
    if vision_config(cfg) is not None:
        assert all(0 < k < v for k, v in zip(stats.visual_tokens, stats.vanilla_visual_tokens))
    if language_config(cfg) is not None:
        assert all(e < v for e, v in zip(stats.effective_visual_tokens, stats.visual_tokens))
    assert torch.isfinite(logits).all()
    gen = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert torch.equal(gen[:, : inputs.input_ids.shape[1]], inputs.input_ids)


def test_efficiency_knows_granite_vision():
    from globalcom2 import efficiency
    from globalcom2.models.llava_next import GRANITE_PINPOINTS, GRANITE_VIEW_SIZE, PATCH_SIZE

    ckpt = "ibm-granite/granite-vision-3.2-2b"
    arch = efficiency.resolve_arch(ckpt)
    assert (arch.num_layers, arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim) == (40, 2048, 32, 8, 64)
    assert arch.intermediate_size == 8192 and arch.vocab_size == 49156 and arch.gated_mlp
    crops = max((h // GRANITE_VIEW_SIZE) * (w // GRANITE_VIEW_SIZE) for h, w in GRANITE_PINPOINTS)
    assert crops == 10
    want = (1 + crops) * (GRANITE_VIEW_SIZE // PATCH_SIZE) ** 2  # 11 x 729 = 8,019 (llava-hf: 5 x 576)
    assert efficiency.max_visual_tokens_for_model(ckpt) == LlavaNextFamily.checkpoint_max_visual_tokens(ckpt) == want
    assert efficiency.max_visual_tokens_for_model("llava-hf/llava-v1.6-vicuna-7b-hf") == efficiency.MAX_VISUAL_TOKENS
