"""FastV token pruning inside the language model (globalcom2.methods.fastv).

Tiny random Llama models built in code. The central check compares the patched (really shorter)
model against an independent mask-based reference: the unpatched model where layers >= K may not
attend to the pruned visual keys, with the ranking read from an eager run's attention weights.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from globalcom2.methods.fastv import FastVConfig, FastVPatch

from conftest import make_image

VOCAB = 300
PAD = 0


def make_model(impl: str = "sdpa", seed: int = 0, layers: int = 4, arch: str = "llama"):
    """A tiny random decoder LM (float32, eval) of the given architecture."""
    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[arch]
    cfg = config_cls(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation=impl,
    )
    torch.manual_seed(seed)
    model = model_cls(cfg).float().eval()
    # larger weights -> peaked attention, so the ranking is far from ties
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None
    return model


def eager_twin(model):
    """An independent eager-attention copy with the same weights (for output_attentions)."""
    cfg = type(model.config)(**{**model.config.to_dict(), "attn_implementation": "eager"})
    twin = type(model)(cfg).float().eval()
    twin.load_state_dict(model.state_dict())
    return twin


def make_batch(seed: int = 1, side: str = "left"):
    """3 padded rows, different pad lengths and visual-token counts. Returns ids, mask, visual."""
    g = torch.Generator().manual_seed(seed)
    T = 24
    ids = torch.randint(5, VOCAB, (3, T), generator=g)
    attn = torch.ones(3, T, dtype=torch.long)
    visual = torch.zeros(3, T, dtype=torch.bool)
    # row 0: no padding, 11 visual tokens
    visual[0, 3:14] = True
    # row 1: 5 pad, 7 visual tokens
    attn[1, :5] = 0
    visual[1, 7:14] = True
    # row 2: 2 pad, 14 visual tokens
    attn[2, :2] = 0
    visual[2, 4:18] = True
    if side == "right":  # same rows, padding moved to the end
        shift = (attn == 0).sum(1)
        idx = (torch.arange(T)[None, :] + shift[:, None]) % T
        attn, visual, ids = (torch.gather(x, 1, idx) for x in (attn, visual, ids))
    ids[attn == 0] = PAD
    return ids, attn, visual


def keep_count(r: float, n: int) -> int:
    return max(1, round(r * n)) if n > 0 else 0


def reference_pruned(model, ids, attn, visual, k: int, r: float) -> torch.Tensor:
    """(B, T) bool: the visual tokens FastV drops, ranked from an eager run's attention weights."""
    twin = eager_twin(model)
    with torch.no_grad():
        out = twin(input_ids=ids, attention_mask=attn, output_attentions=True)
    att = out.attentions[k - 1]  # (B, H, T, T)
    pruned = torch.zeros_like(visual)
    valid = attn.bool() if attn is not None else torch.ones_like(visual)
    for b in range(ids.shape[0]):
        last = int(valid[b].nonzero().max())
        scores = att[b, :, last].mean(0)  # (T,)
        vis = (visual[b] & valid[b]).nonzero().flatten()
        n_keep = keep_count(r, len(vis))
        top = vis[scores[vis].topk(n_keep).indices]
        pruned[b, vis] = True
        pruned[b, top] = False
    return pruned


def reference_forward(model, ids, attn, pruned, k: int):
    """Unpatched model where layers >= k may not attend to the pruned keys. Returns logits (B, T, V)."""
    B, T = ids.shape
    valid = attn.bool() if attn is not None else torch.ones(B, T, dtype=torch.bool)
    pr = torch.zeros(B, T, dtype=torch.bool)
    pr[:, : pruned.shape[1]] = pruned
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = causal[None] & (valid & ~pr)[:, None, :]
    allowed = allowed | torch.eye(T, dtype=torch.bool)[None]
    if model.config._attn_implementation == "sdpa":
        mask = allowed[:, None]
    else:
        mask = torch.zeros(B, 1, T, T).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)

    def pre(module, args, kwargs):
        kwargs["attention_mask"] = mask
        return args, kwargs

    handles = [model.model.layers[i].register_forward_pre_hook(pre, with_kwargs=True)
               for i in range(k, len(model.model.layers))]
    try:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=attn).logits
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------- config
def test_config_validation_and_round_trip():
    c = FastVConfig()
    assert (c.retention_ratio, c.layer) == (0.5, 2)
    assert FastVConfig.from_dict(c.to_dict()) == c
    c2 = c.replace(retention_ratio=0.25, layer=3)
    assert c2.to_dict() == {"retention_ratio": 0.25, "layer": 3}
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="retention_ratio"):
            FastVConfig(retention_ratio=bad)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="layer"):
            FastVConfig(layer=bad)
    with pytest.raises(ValueError, match="bogus"):
        FastVConfig.from_dict({"layer": 2, "bogus": 1})
    with pytest.raises(ValueError, match="layer"):
        c.replace(layer=0)


def test_install_validation():
    model = make_model(layers=3)
    with pytest.raises(ValueError, match="layer"):
        FastVPatch(model.model, FastVConfig(layer=3)).install()
    FastVPatch(model.model, FastVConfig(layer=2)).install()  # K = num_layers - 1 is fine
    model2 = make_model(layers=3)
    model2.model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="_attn_implementation"):
        FastVPatch(model2.model, FastVConfig(layer=1)).install()
    assert "forward" not in model2.model.__dict__
    with pytest.raises(ValueError, match="visual_mask"):
        FastVPatch(model.model, FastVConfig()).prepare(torch.ones(3, dtype=torch.bool))


# ---------------------------------------------------------------------------------------- R = 1
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_full_retention_is_identity_and_uninstall_restores(impl):
    model = make_model(impl)
    ids, attn, visual = make_batch()
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=attn).logits
    sentinel = model.model.layers[3].forward  # a pre-existing instance forward must survive
    model.model.layers[3].forward = sentinel
    patch = FastVPatch(model.model, FastVConfig(retention_ratio=1.0, layer=2))
    patch.install()
    patch.install()  # idempotent
    patch.prepare(visual)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attn).logits
    assert torch.equal(out, base)
    assert patch.last_visual == patch.last_kept == [11, 7, 14]
    # R < 1 changes something, uninstall restores bit-identical logits and attributes
    patch.uninstall()
    patch.uninstall()  # idempotent
    assert model.model.layers[3].__dict__["forward"] is sentinel
    assert "forward" not in model.model.__dict__
    assert all("forward" not in model.model.layers[i].__dict__ for i in range(3))
    assert not model.model.layers[1].self_attn.q_proj._forward_hooks
    assert not model.model.layers[1].self_attn._forward_pre_hooks
    patch = FastVPatch(model.model, FastVConfig(retention_ratio=0.3, layer=2))
    patch.install()
    patch.prepare(visual)
    with torch.no_grad():
        pruned = model(input_ids=ids, attention_mask=attn).logits
    assert not torch.allclose(pruned[:, -1], base[:, -1], atol=1e-4)
    patch.uninstall()
    with torch.no_grad():
        again = model(input_ids=ids, attention_mask=attn).logits
    assert torch.equal(again, base)
    assert model.model.layers[3].__dict__["forward"] is sentinel


def test_unprepared_runs_unpruned():
    model = make_model()
    ids, attn, _ = make_batch()
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=attn).logits
    patch = FastVPatch(model.model, FastVConfig(retention_ratio=0.3))
    patch.install()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attn).logits
    assert torch.equal(out, base) and patch.last_kept is None
    patch.uninstall()


# ---------------------------------------------------------------------------------------- prefill
@pytest.mark.parametrize(
    "impl,k,r,arch,side",
    [
        ("sdpa", 2, 0.5, "llama", "left"),
        ("sdpa", 1, 0.3, "llama", "left"),
        ("eager", 2, 0.3, "llama", "left"),
        ("eager", 1, 0.5, "llama", "left"),
        ("sdpa", 2, 0.4, "llama", "right"),
        ("sdpa", 2, 0.4, "mistral", "left"),
        ("sdpa", 1, 0.4, "qwen2", "left"),
    ],
)
def test_prefill_matches_mask_reference(impl, k, r, arch, side):
    model = make_model(impl, arch=arch)
    ids, attn, visual = make_batch(side=side)
    pruned = reference_pruned(model, ids, attn, visual, k, r)
    ref = reference_forward(model, ids, attn, pruned, k)

    patch = FastVPatch(model.model, FastVConfig(retention_ratio=r, layer=k))
    patch.install()
    patch.prepare(visual)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attn).logits
    patch.uninstall()

    n_vis = [11, 7, 14]
    assert patch.last_visual == n_vis
    assert patch.last_kept == [keep_count(r, n) for n in n_vis]
    assert (visual & ~pruned).sum(1).tolist() == patch.last_kept
    last = torch.where(attn.bool(), torch.arange(ids.shape[1]), -1).amax(1)
    rows = torch.arange(3)
    torch.testing.assert_close(out[rows, last], ref[rows, last], atol=1e-4, rtol=1e-4)
    kept = attn.bool() & ~pruned
    torch.testing.assert_close(out[kept], ref[kept], atol=1e-4, rtol=1e-4)


def test_no_attention_mask_and_gradients():
    """attention_mask=None (one row, no padding); labels keep the input's length and backprop works."""
    model = make_model()
    ids, _, visual = make_batch()
    ids, visual = ids[:1], visual[:1]
    k, r = 2, 0.5
    pruned = reference_pruned(model, ids, None, visual, k, r)
    ref = reference_forward(model, ids, None, pruned, k)
    patch = FastVPatch(model.model, FastVConfig(retention_ratio=r, layer=k))
    patch.install()
    patch.prepare(visual)
    out = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits[0, ~pruned[0]].detach(), ref[0, ~pruned[0]], atol=1e-4, rtol=1e-4)
    out.loss.backward()
    grads = [p.grad for p in model.model.layers[3].parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    patch.uninstall()


def test_kept_counts_rounding():
    model = make_model()
    ids, attn, visual = make_batch()
    for r in (0.01, 0.25, 0.5, 0.75, 0.99):
        patch = FastVPatch(model.model, FastVConfig(retention_ratio=r, layer=1))
        patch.install()
        patch.prepare(visual)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=attn)
        patch.uninstall()
        assert patch.last_kept == [keep_count(r, n) for n in (11, 7, 14)]
    # rows without visual tokens keep 0 and are not pruned; a single visual token is kept
    v = torch.zeros_like(visual)
    v[0, 5:9] = True
    v[2, 6] = True
    patch = FastVPatch(model.model, FastVConfig(retention_ratio=0.1, layer=1))
    patch.install()
    patch.prepare(v)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=attn)
    patch.uninstall()
    assert patch.last_visual == [4, 0, 1] and patch.last_kept == [1, 0, 1]


def test_sequence_really_shorter():
    model = make_model()
    ids, attn, visual = make_batch()
    k, r = 2, 0.5
    patch = FastVPatch(model.model, FastVConfig(retention_ratio=r, layer=k))
    patch.install()
    seen = {}

    def pre(name):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            seen[name] = tuple(h.shape)
        return hook

    handles = [model.model.layers[i].register_forward_pre_hook(pre(i), with_kwargs=True) for i in range(4)]
    patch.prepare(visual)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attn, cache=cache, use_cache=True)
    for h in handles:
        h.remove()
    T = ids.shape[1]
    valid = attn.sum(1) - visual.sum(1) + torch.tensor(patch.last_kept)
    l_max = int(valid.max())
    assert l_max < T
    assert seen[0] == seen[1] == seen[2] == (3, T, 64)  # layer K gets the full sequence
    assert seen[3] == (3, l_max, 64)  # layer K+1 runs shorter
    assert out.logits.shape == (3, T, VOCAB)
    assert cache.get_seq_length() == T
    assert cache.layers[0].keys.shape[-2] == cache.layers[1].keys.shape[-2] == T
    assert cache.layers[2].keys.shape[-2] == cache.layers[3].keys.shape[-2] == l_max
    patch.uninstall()


# ---------------------------------------------------------------------------------------- decode
def greedy_reference(model, ids, attn, pruned, k, steps):
    """Step-by-step full-sequence forwards of the unpatched model with the mask reference."""
    seq, mask, logits_all = ids, attn, []
    for _ in range(steps):
        logits = reference_forward(model, seq, mask, pruned, k)[:, -1]
        logits_all.append(logits)
        nxt = logits.argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return seq, logits_all


@pytest.mark.parametrize("impl,k", [("sdpa", 2), ("eager", 1)])
def test_cached_decode_matches_reference(impl, k):
    model = make_model(impl)
    ids, attn, visual = make_batch()
    r, steps = 0.4, 5
    pruned = reference_pruned(model, ids, attn, visual, k, r)
    ref_seq, ref_logits = greedy_reference(model, ids, attn, pruned, k, steps)

    patch = FastVPatch(model.model, FastVConfig(retention_ratio=r, layer=k))
    patch.install()
    # manual cached loop, logits compared step by step
    patch.prepare(visual)
    cache = DynamicCache(config=model.config)
    seq, mask = ids, attn
    with torch.no_grad():
        out = model(input_ids=seq, attention_mask=mask, cache=cache, use_cache=True)
        for step in range(steps):
            logits = out.logits[:, -1]
            torch.testing.assert_close(logits, ref_logits[step], atol=1e-4, rtol=1e-4)
            nxt = ref_seq[:, ids.shape[1] + step, None]
            seq = torch.cat([seq, nxt], 1)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            out = model(input_ids=nxt, attention_mask=mask, cache=cache, use_cache=True)
    # several new tokens in one cached call (causal among themselves)
    patch.prepare(visual)
    cache = DynamicCache(config=model.config)
    T = ids.shape[1]
    mask3 = torch.cat([attn, torch.ones(3, 3, dtype=attn.dtype)], 1)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=attn, cache=cache, use_cache=True)
        chunk = model(input_ids=ref_seq[:, T : T + 3], attention_mask=mask3, cache=cache, use_cache=True).logits
    ref_chunk = reference_forward(model, ref_seq[:, : T + 3], mask3, pruned, k)
    torch.testing.assert_close(chunk, ref_chunk[:, T:], atol=1e-4, rtol=1e-4)
    # generate (KV cache) equals the step-by-step reference
    patch.prepare(visual)
    with torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=steps, do_sample=False)
    assert torch.equal(gen, ref_seq)
    # batch equals each sample alone
    for b in range(3):
        keep = attn[b].bool()
        patch.prepare(visual[b : b + 1, keep])
        with torch.no_grad():
            alone = model.generate(input_ids=ids[b : b + 1, keep], max_new_tokens=steps, do_sample=False)
        n_pad = int((attn[b] == 0).sum())
        assert torch.equal(alone[0], gen[b, n_pad:])
    patch.uninstall()


def test_beam_search_batch_equals_single():
    model = make_model()
    ids, attn, visual = make_batch()
    patch = FastVPatch(model.model, FastVConfig(retention_ratio=0.4, layer=2))
    patch.install()
    kw = dict(max_new_tokens=4, do_sample=False, num_beams=3, num_return_sequences=2)
    patch.prepare(visual)
    with torch.no_grad():
        batch = model.generate(input_ids=ids, attention_mask=attn, **kw)
    assert patch.last_kept == [keep_count(0.4, n) for n in (11, 7, 14)]
    assert batch.shape[0] == 6
    for b in range(3):
        keep = attn[b].bool()
        patch.prepare(visual[b : b + 1, keep])
        with torch.no_grad():
            alone = model.generate(input_ids=ids[b : b + 1, keep], **kw)
        n = alone.shape[1]
        assert torch.equal(batch[2 * b : 2 * b + 2, -n:], alone)
    patch.uninstall()


# ---------------------------------------------------------------------------------------- LLaVA-NeXT
def test_llava_next_language_model(tiny):
    """The patch on ``model.model.language_model`` of the tiny LLaVA-NeXT, through ``generate``."""
    model, processor = tiny
    sizes = [(300, 500), (336, 336)]
    prompts = ["USER: <image>\nWhat is this? ASSISTANT:", "<image>\nhi"]
    images = [make_image(*sz, seed=i) for i, sz in enumerate(sizes)]
    batch = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    img = model.config.image_token_id
    lm = model.model.language_model
    kw = dict(max_new_tokens=2, do_sample=False)
    r = 0.25
    patch = FastVPatch(lm, FastVConfig(retention_ratio=r, layer=1))
    patch.install()
    try:
        patch.prepare(batch.input_ids == img)
        with torch.no_grad():
            gen = model.generate(**batch, **kw)
        n_img = (batch.input_ids == img).sum(1).tolist()
        assert patch.last_visual == n_img
        assert patch.last_kept == [keep_count(r, n) for n in n_img]
        new = gen[:, batch.input_ids.shape[1]:]
        for i in range(2):
            single = processor(images=[images[i]], text=[prompts[i]], return_tensors="pt")
            patch.prepare(single.input_ids == img)
            with torch.no_grad():
                gen1 = model.generate(**single, **kw)
            assert gen1[0, single.input_ids.shape[1]:].tolist() == new[i].tolist()
    finally:
        patch.uninstall()
    assert "forward" not in lm.__dict__
