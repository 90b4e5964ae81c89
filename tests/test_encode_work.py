"""Only the work that is used (issue 28): LLaVA-NeXT's tower runs up to its feature layer, and of
the last layer only the layer norm, q and k the importance reads; same bits as the full run."""

import pytest
import torch

import globalcom2
from conftest import make_image
from globalcom2.core import importance as importance_ops
from globalcom2.models.capture import QKCapture


def _full_run(adapter, pixel_values, mode):
    """Yesterday's encode: the whole tower with q/k hooks, hidden_states[-2], the projector."""
    tower, attn = adapter.inner.vision_tower, adapter.last_attention()
    with QKCapture(attn, all_queries=True) as cap:
        out = tower(pixel_values, output_hidden_states=True, return_dict=True)
    hidden = out.hidden_states[adapter.hf_config.vision_feature_layer]
    feats = adapter.inner.multi_modal_projector(hidden[:, 1:])
    if mode == "similarity":
        imp = importance_ops.feature_similarity(hidden[:, 1:])
    elif mode == "attention_received":
        imp = importance_ops.attention_received(cap.queries[:, 1:], cap.keys[:, 1:], attn.num_heads, attn.scale)
    else:
        imp = importance_ops.cls_attention_logits(cap.q_cls, cap.keys, attn.num_heads, attn.scale)
    return feats, imp


@pytest.mark.parametrize("mode", ["cls", "attention_received", "similarity"])
def test_truncated_tower_gives_the_full_runs_bits_and_skips_the_last_layers_rest(tiny, mode):
    model, processor = tiny
    inputs = processor(images=[make_image(480, 640), make_image(300, 300, seed=1)], text=["<image>\nhi"] * 2,
                       return_tensors="pt", padding=True)
    globalcom2.apply(model, retention_ratio=0.25, importance=mode)
    try:
        adapter = globalcom2.get_family(model)
        last = adapter.inner.vision_tower.encoder.layers[-1]
        ran = []
        handles = [m.register_forward_hook(lambda *a, name=name: ran.append(name))
                   for name, m in [("mlp", last.mlp), ("v_proj", last.self_attn.v_proj), ("layer", last),
                                   ("post_layernorm", adapter.inner.vision_tower.post_layernorm)]]
        with torch.no_grad():
            encoded = adapter.encode_inputs(inputs)
        for h in handles:
            h.remove()
        assert ran == []  # neither the last layer's MLP, values, output nor the post-norm ran
        pv = torch.cat([pv[:v.shape[0]] for pv, v in zip(inputs["pixel_values"], encoded.features)])
        with torch.no_grad():
            feats, imp = _full_run(adapter, pv, mode)
        assert torch.equal(torch.cat(encoded.projected().features), feats)
        assert torch.equal(torch.cat(encoded.importance), imp.to(feats.device))
    finally:
        globalcom2.remove(model)


def test_a_whole_tower_run_in_the_same_thread_after_a_truncated_one_is_not_stopped(tiny):
    model, processor = tiny
    inputs = processor(images=[make_image(480, 640)], text=["<image>\nhi"], return_tensors="pt")
    globalcom2.apply(model, retention_ratio=0.25)
    try:
        adapter = globalcom2.get_family(model)
        with torch.no_grad():
            adapter.encode_inputs(inputs)
            out = adapter.inner.vision_tower(inputs["pixel_values"][0], output_hidden_states=True, return_dict=True)
        assert len(out.hidden_states) == adapter.hf_config.vision_config.num_hidden_layers + 1
    finally:
        globalcom2.remove(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method, options", [
    ("globalcom2", {"layout": "official"}), ("globalcom2", {"layout": "spatial"}), ("fastervlm", {}), ("random", {}),
    ("visionzip", {}), ("pooling", {}),
], ids=["globalcom2-official", "globalcom2-spatial", "fastervlm", "random", "visionzip", "pooling"])
def test_the_projector_runs_on_the_kept_tokens_only(method, options, dtype):
    """Issue 28: a selecting method (``gathers_rows``) gets the projector's input and the projector
    runs once, on the kept rows (newline slots included) instead of every view's N tokens; the
    tokens equal projecting everything first, bit for bit. Merging and pooling methods get every
    token projected, as before."""
    from globalcom2.models import family_for_model_type

    model, processor = family_for_model_type("llava_next").build_tiny(seed=0, dtype=dtype)
    inputs = processor(images=[make_image(480, 640), make_image(300, 300, seed=1)], text=["<image>\nhi"] * 2,
                       return_tensors="pt", padding=True)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    globalcom2.apply(model, method=method, retention_ratio=0.25, **options)
    family = globalcom2.get_family(model)
    rows = []
    with torch.no_grad():
        encoded = family.encode_inputs(inputs)
        assert encoded.project is not None
        handle = model.model.multi_modal_projector.register_forward_pre_hook(
            lambda m, args: rows.append(args[0].shape[:-1].numel()))
        got = family.compress(encoded)
        handle.remove()
        want = family.compress(encoded.projected())  # every token projected first
    assert all(a.dtype == dtype and torch.equal(a, b) for a, b in zip(got.tokens, want.tokens))
    if family.vision_config.gathers_rows:
        assert rows == [sum(t.shape[0] for t in got.tokens)]
        assert rows[0] < 0.5 * sum(f.shape[0] * f.shape[1] for f in encoded.features)
    else:
        assert rows == [sum(f.shape[0] * f.shape[1] for f in encoded.features)]
