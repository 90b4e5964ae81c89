"""Llama 4 (HF ``Llama4ForConditionalGeneration``) on a tiny in-code model with the checkpoints'
geometry: 336 px tiles (16 at most) + the global tile, 14 px patches, a class token appended last,
pixel shuffle 0.5 (144 tokens per tile), tile separators in the prompt.

The references here (the prompt's runs, the class token's logits) are written in this file from
``SPEC.md`` and the model's code, not from the library's selection code.
"""

from __future__ import annotations

import math

import pytest
import torch

import globalcom2
from globalcom2.methods import GlobalCom2Config
from globalcom2.models import families
from globalcom2.models.llama4 import Llama4Family, tile_grid
from globalcom2.tiny import build_tiny

from conftest import make_image

N, S, P = 144, 12, 24
SIZES = [(500, 900), (900, 500), (300, 300), (100, 2000), (1200, 1150)]


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny("llama4", seed=0)
    yield model, processor
    globalcom2.remove(model)


@pytest.fixture(autouse=True)
def _clean(tiny):
    yield
    globalcom2.remove(tiny[0])


def _inputs(processor, sizes, text="\nWhat is here?", seed=0):
    images = [make_image(h, w, seed=seed + i) for i, (h, w) in enumerate(sizes)]
    prompt = processor.image_token * len(images) + text
    return processor(images=images, text=[prompt], return_tensors="pt")


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _ids(tok, name):
    return tok.convert_tokens_to_ids(name)


def _runs(tok, ids):
    """Per image of one row: (runs of <|patch|> in prompt order, grid) read token by token."""
    patch, start, end = _ids(tok, "<|patch|>"), _ids(tok, "<|image_start|>"), _ids(tok, "<|image_end|>")
    x, y, glob = _ids(tok, "<|tile_x_separator|>"), _ids(tok, "<|tile_y_separator|>"), _ids(tok, "<|image|>")
    images, cur, run, rows = [], None, 0, 0
    for t in ids.tolist():
        if t == start:
            cur, run, rows = [], 0, 0
        elif cur is None:
            continue
        elif t == patch:
            run += 1
        elif t in (x, y):
            cur.append(run)
            rows += t == y
            run = 0
        elif t == glob:
            assert run == 0
        elif t == end:
            images.append((cur + [run], (rows, len(cur) // rows) if rows else None))
            cur = None
    return images


class _SeenIds:
    """The input_ids the language model's embedding receives (the shortened prompt)."""

    def __init__(self, model):
        self.ids = []
        self.handle = model.get_input_embeddings().register_forward_pre_hook(lambda m, a: self.ids.append(a[0].clone()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_keep_all_equals_vanilla_and_a_quarter_per_view(tiny, size):
    model, processor = tiny
    inputs = _inputs(processor, [size])
    tok = processor.tokenizer
    (runs, grid), = _runs(tok, inputs.input_ids[0])
    assert grid == (None if len(runs) == 1 else tile_grid(*size))
    assert runs == [N] * len(runs)
    vanilla = _logits(model, inputs)
    globalcom2.apply(model, GlobalCom2Config.keep_all(layout="spatial"))
    assert torch.equal(_logits(model, inputs), vanilla)
    globalcom2.remove(model)
    globalcom2.apply(model, retention_ratio=0.25)
    with _SeenIds(model) as seen:
        short = _logits(model, inputs)
    (kept, kept_grid), = _runs(tok, seen.ids[0][0])
    assert kept_grid == grid and len(kept) == len(runs)
    assert kept[-1] == math.floor(N * 0.25)  # the global tile (or the one tile): Step 1
    assert all(0 <= k <= math.floor(N * 0.5) for k in kept[:-1])  # r_j <= 2R
    total = sum(kept)
    assert abs(total - 0.25 * N * len(runs)) <= len(runs), (kept, total)
    assert short.shape[1] == inputs.input_ids.shape[1] - (N * len(runs) - total)
    assert globalcom2.last_stats(model).visual_tokens == [total]


def test_older_transformers_route_gives_the_same_logits(tiny, monkeypatch):
    """transformers < 5.25 returns the tower's output from ``get_image_features`` (no ``pooler_output``)
    and projects it in the forward: the family projects the features itself and hands the rows over
    as ``inputs_embeds``. Forced here on the current transformers, both routes give the same logits
    and generation (the vLLM venv's 5.19 runs the route for real)."""
    from globalcom2.models import llama4

    model, processor = tiny
    inputs = _inputs(processor, [(500, 900), (300, 300)])
    globalcom2.apply(model, retention_ratio=0.25)
    current = _logits(model, inputs)
    new = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    globalcom2.remove(model)
    inner = getattr(model, "model", model)
    original = inner.get_image_features

    def tower_only(*args, **kwargs):
        out = original(*args, **kwargs)
        out.pooler_output = None
        return out

    monkeypatch.setattr(inner, "get_image_features", tower_only)
    monkeypatch.setattr(llama4, "projects_in_forward", lambda: True)
    globalcom2.apply(model, retention_ratio=0.25)
    assert torch.equal(_logits(model, inputs), current)
    assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), new)


def test_batch_equals_each_prompt_alone(tiny):
    """Left padding, a two-image prompt and a text-only row in one batch."""
    model, processor = tiny
    tok = processor.image_token
    images = [make_image(500, 900, seed=1), make_image(300, 300, seed=2), make_image(900, 500, seed=3)]
    texts = [f"{tok}\nfirst", f"{tok}{tok}\ntwo images here please", "text only, no image at all"]
    globalcom2.apply(model, retention_ratio=0.25)
    batch = processor(images=images, text=texts, return_tensors="pt", padding=True)
    assert (batch.attention_mask[:, 0] == 0).any()
    with torch.no_grad():
        last = model(**batch).logits[:, -1]
        gen = model.generate(**batch, max_new_tokens=3, do_sample=False)
    n = batch.input_ids.shape[1]
    assert torch.equal(gen[:, :n], batch.input_ids)  # the caller's prompt comes back
    singles = [
        processor(images=images[:1], text=texts[:1], return_tensors="pt"),
        processor(images=images[1:], text=texts[1:2], return_tensors="pt"),
        processor(text=texts[2:], return_tensors="pt"),
    ]
    for i, single in enumerate(singles):
        with torch.no_grad():
            torch.testing.assert_close(model(**single).logits[0, -1], last[i], atol=1e-4, rtol=1e-4)
            alone = model.generate(**single, max_new_tokens=3, do_sample=False)
        m = single.input_ids.shape[1]
        assert torch.equal(alone[0, :m], single.input_ids[0])
        assert alone[0, m:].tolist() == gen[i, n:].tolist()


def test_remove_restores_bit_identical_logits(tiny):
    model, processor = tiny
    inputs = _inputs(processor, [(500, 900), (300, 300)])
    before = _logits(model, inputs)
    globalcom2.apply(model, retention_ratio=0.25)
    assert _logits(model, inputs).shape[1] < before.shape[1]
    globalcom2.remove(model)
    assert torch.equal(_logits(model, inputs), before)
    assert not globalcom2.is_applied(model) and "forward" not in model.__dict__


def _brute_force_cls(model, pixel_values):
    """(V, N) from the last layer's full attention logits: the class token (last) row, per head
    ``q . k * head_dim**-0.5`` with q / k rotated as the layer does, mean over heads, the class
    column left out, then the mean of each token's 2 x 2 block of patches."""
    tower = model.vision_model
    layer = tower.model.layers[-1]
    seen = {}
    handle = layer.self_attn.register_forward_pre_hook(lambda m, a, kw: seen.update(h=(a[0] if a else kw["hidden_states"])), with_kwargs=True)
    with torch.no_grad():
        model.get_image_features(pixel_values=pixel_values)
    handle.remove()
    attn = layer.self_attn
    h = seen["h"].double()
    v, t, _ = h.shape
    heads, hd = attn.num_heads, attn.head_dim
    q = (h @ attn.q_proj.weight.double().T + attn.q_proj.bias.double()).reshape(v, t, heads, hd // 2, 2)
    k = (h @ attn.k_proj.weight.double().T + attn.k_proj.bias.double()).reshape(v, t, heads, hd // 2, 2)
    rot = tower.rotary_embedding.freqs_ci.to(torch.complex128).reshape(1, t, 1, hd // 2)
    q = torch.view_as_real(torch.view_as_complex(q.contiguous()) * rot).reshape(v, t, heads, hd)
    k = torch.view_as_real(torch.view_as_complex(k.contiguous()) * rot).reshape(v, t, heads, hd)
    logits = torch.einsum("vqhd,vkhd->vhqk", q, k) * hd**-0.5  # (V, heads, T, T): the full maps
    cls_row = logits[:, :, -1, :-1].mean(1)  # (V, P*P)
    return cls_row.reshape(v, S, 2, S, 2).mean(dim=(2, 4)).reshape(v, N)


def test_importance_is_the_class_token_logits_through_the_pixel_shuffle(tiny):
    model, processor = tiny
    inputs = _inputs(processor, [(500, 900)])
    fam = Llama4Family(model, GlobalCom2Config(layout="spatial"))
    with torch.no_grad():
        enc = fam.encode_inputs(inputs)
    ref = _brute_force_cls(model, inputs.pixel_values)  # model order: tiles, then the global tile
    got = enc.importance[0]  # global first
    torch.testing.assert_close(got[0].double(), ref[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1:].double(), ref[:-1], atol=1e-5, rtol=1e-5)
    # features: the model's own, global first
    with torch.no_grad():
        out = model.get_image_features(pixel_values=inputs.pixel_values)
        # transformers < 5.25 leaves the projection to the forward
        feats = out.pooler_output if out.pooler_output is not None else model.multi_modal_projector(out.last_hidden_state)
    assert torch.equal(enc.features[0][0], feats[-1]) and torch.equal(enc.features[0][1:], feats[:-1])
    assert (enc.geometries[0].grid_h, enc.geometries[0].grid_w) == tile_grid(500, 900)
    # auto is cls; similarity is the ablation on the projector's input
    sim = Llama4Family(model, GlobalCom2Config(layout="spatial", importance="similarity"))
    with torch.no_grad():
        s = sim.encode_inputs(inputs).importance[0]
        x = model.vision_model(inputs.pixel_values).last_hidden_state.double()
    ref_sim = -torch.nn.functional.cosine_similarity(x, x.mean(1, keepdim=True), dim=-1)
    torch.testing.assert_close(s[0], ref_sim[-1], atol=1e-9, rtol=1e-9)


def test_count_first_equals_the_model_shortened_path(tiny):
    model, processor = tiny
    sizes = [(500, 900), (300, 300), (1200, 1150)]
    images = [make_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    text = [processor.image_token * len(images) + "\nDescribe."]
    vanilla_prompt = processor(images=images, text=text, return_tensors="pt")
    globalcom2.apply(model, retention_ratio=0.25, count="fixed")
    with _SeenIds(model) as seen:
        shortened = _logits(model, vanilla_prompt)
    globalcom2.remove(model)
    globalcom2.apply(model, processor=processor, retention_ratio=0.25, count="fixed")
    first = processor(images=images, text=text, return_tensors="pt")
    assert first.input_ids.shape[1] < vanilla_prompt.input_ids.shape[1]
    assert torch.equal(first.input_ids, seen.ids[0])  # the same sequence, token for token
    assert torch.equal(_logits(model, first), shortened)
    fam = globalcom2.get_family(model)
    counts = fam.count_visual_tokens(sizes, processor=processor)
    tok = processor.tokenizer
    assert [sum(r) for r, _ in _runs(tok, first.input_ids[0])] == counts
    globalcom2.remove(model)
    assert processor(images=images, text=text, return_tensors="pt").input_ids.shape == vanilla_prompt.input_ids.shape


def test_tiling_rule_and_metadata(tiny):
    _, processor = tiny
    for h, w in SIZES:
        grid = tile_grid(h, w)
        views = processor.image_processor.get_number_of_image_patches(h, w, {})
        assert views == (1 if grid == (1, 1) else grid[0] * grid[1] + 1)
        assert grid[0] * grid[1] <= 16
    assert tile_grid(300, 300) == (1, 1)
    assert Llama4Family.default_max_visual_tokens() == 17 * N
    assert Llama4Family.layouts == ("spatial",)
    with pytest.raises(ValueError, match="official"):
        globalcom2.apply(tiny[0], retention_ratio=0.25, layout="official")


@pytest.mark.parametrize("layer", [2, 4])  # layer K-1 = 1 uses rope (and its q/k norm); K-1 = 3 has none (temperature)
def test_fastv_ranks_by_llama4_attention(tiny, layer):
    """FastV's kept visual tokens on Llama 4's language model: the top of layer K-1's attention of the
    last token, computed here from that layer's q/k with the model's own rotary and norm."""
    from transformers.models.llama4.modeling_llama4 import apply_rotary_emb

    model, processor = tiny
    lm = model.language_model.model
    if layer >= len(lm.layers):
        text = dict(num_hidden_layers=layer + 1)
        model, processor = build_tiny("llama4", seed=0, text=text)
        lm = model.language_model.model
    attn = lm.layers[layer - 1].self_attn
    assert attn.use_rope == (layer == 2)
    inputs = _inputs(processor, [(500, 900)])
    seen = {}
    handle = attn.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    h = seen["hidden_states"]
    t, hd = h.shape[1], attn.head_dim
    q = attn.q_proj(h).view(1, t, -1, hd)
    k = attn.k_proj(h).view(1, t, -1, hd)
    if attn.use_rope:
        q, k = apply_rotary_emb(q, k, seen["position_embeddings"])
        q, k = attn.qk_norm(q), attn.qk_norm(k)
    else:
        q = q * (math.log1p(math.floor(t / attn.floor_scale)) * attn.attn_scale + 1.0)
    k = k.repeat_interleave(attn.num_key_value_groups, dim=2)
    scores = torch.softmax((q[0, -1][:, None] * k[0].transpose(0, 1)).sum(-1) * attn.scaling, dim=-1).mean(0)  # (T,)
    visual = inputs.input_ids[0] == model.config.image_token_id
    n = int(visual.sum())
    keep = max(1, round(0.25 * n))
    ranked = torch.where(visual, scores, torch.tensor(float("-inf")))
    want = torch.sort(torch.topk(ranked, keep).indices).values
    globalcom2.apply(model, method="fastv", retention_ratio=0.25, layer=layer)
    with torch.no_grad():
        model(**inputs)
    got = globalcom2.get_family(model).fastv.last_kept_positions[0]
    globalcom2.remove(model)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("count", [None, "fixed"])
def test_image_embeddings_carry_each_tile_run(tiny, count):
    """Registered; image embeddings carry each view's run (from the plans alone), which the pixels'
    shortened prompt holds too; a prompt with one <|patch|> per view gives the pixels' logits."""
    model, processor = tiny
    assert Llama4Family in families()
    globalcom2.apply(model, retention_ratio=0.25, **({"count": count} if count else {}))
    inputs = _inputs(processor, [(500, 900), (300, 300)])
    tok = processor.tokenizer
    emb = globalcom2.compress_images(model, inputs)
    prompt = _runs(tok, inputs.input_ids[0])
    assert emb.vanilla_runs == [r for r, _ in prompt] and [len(r) for r in emb.runs] == [len(r) for r, _ in prompt]
    assert [sum(r) for r in emb.runs] == emb.counts
    with _SeenIds(model) as seen, torch.no_grad():
        want = model(**inputs).logits
    assert [r for r, _ in _runs(tok, seen.ids[0][0])] == emb.runs
    patch = _ids(tok, "<|patch|>")
    ids = inputs.input_ids[0].tolist()
    one = [t for j, t in enumerate(ids) if t != patch or j == 0 or ids[j - 1] != patch]  # one <|patch|> per view
    one = torch.tensor([one])
    with torch.no_grad():
        got = model(input_ids=one, attention_mask=torch.ones_like(one), image_embeddings=emb).logits
    torch.testing.assert_close(got[0, -1], want[0, -1])
    # a stray <|image_start|> after the images (generated text of a later turn) is not an image
    tail = torch.cat([inputs.input_ids, torch.tensor([[_ids(tok, "<|image_start|>"), 9]])], dim=1)
    assert len(globalcom2.get_family(model).prompt_views(tail)) == 2
