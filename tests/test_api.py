"""apply/remove/compressed on the tiny LLaVA-NeXT: plug-and-play behaviour end to end."""

import pytest
import torch
from torch import nn

import globalcom2
from globalcom2 import GlobalCom2Config
from globalcom2.tiny import build_tiny_llava_next

from conftest import make_image

PROMPTS = ["USER: <image>\nWhat is this? ASSISTANT:", "Describe <image> briefly.", "<image>\nhi"]
SIZES = [(480, 640), (300, 900), (1000, 300)]


def _inputs(processor, n=1, sizes=SIZES, prompts=PROMPTS, **kw):
    images = [make_image(*sizes[i], seed=i) for i in range(n)]
    return processor(images=images, text=list(prompts[:n]), return_tensors="pt", padding=True, **kw)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_apply_returns_model_and_shortens_the_sequence(tiny):
    model, processor = tiny
    inputs = _inputs(processor)
    vanilla = _logits(model, inputs)
    assert globalcom2.apply(model, retention_ratio=0.25) is model
    out = _logits(model, inputs)
    adapter = globalcom2.get_family(model)
    kept, total = adapter.last.counts[0], adapter.last.vanilla_counts[0]
    assert total == int((inputs.input_ids == model.config.image_token_id).sum())
    assert out.shape[1] == vanilla.shape[1] - (total - kept)
    assert 0.2 < kept / total < 0.35  # ~R of the tokens plus newlines


def test_remove_restores_bit_identical_logits_and_generation(tiny):
    model, processor = tiny
    inputs = _inputs(processor, n=2)
    before = _logits(model, inputs)
    gen_before = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    globalcom2.apply(model, retention_ratio=0.1, layout="spatial")
    _logits(model, inputs)
    globalcom2.remove(model)
    assert torch.equal(_logits(model, inputs), before)
    assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), gen_before)
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__
    assert not globalcom2.is_applied(model)


def test_remove_is_harmless_and_apply_twice_replaces(tiny):
    model, processor = tiny
    assert globalcom2.remove(model) is model
    inputs = _inputs(processor)
    globalcom2.apply(model, retention_ratio=0.5)
    n_half = _logits(model, inputs).shape[1]
    globalcom2.apply(model, retention_ratio=0.1)
    assert globalcom2.get_config(model) == GlobalCom2Config(retention_ratio=0.1)
    # One wrapper only: the patched forward wraps the class's own forward directly.
    assert model.forward.__wrapped__.__func__ is type(model).forward
    assert _logits(model, inputs).shape[1] < n_half
    globalcom2.remove(model)
    globalcom2.remove(model)
    assert not globalcom2.is_applied(model)


def test_only_the_instance_is_patched():
    a, processor = build_tiny_llava_next(seed=1)
    b, _ = build_tiny_llava_next(seed=1)
    inputs = _inputs(processor)
    globalcom2.apply(a)
    assert _logits(b, inputs).shape[1] == inputs.input_ids.shape[1]
    assert _logits(a, inputs).shape[1] < inputs.input_ids.shape[1]


def test_an_existing_instance_forward_is_preserved(tiny):
    model, processor = tiny
    calls = []
    class_forward = model.forward

    def hooked(*args, **kwargs):  # what accelerate's device hooks look like
        calls.append(1)
        return class_forward(*args, **kwargs)

    model.forward = hooked
    try:
        globalcom2.apply(model)
        _logits(model, _inputs(processor))
        assert calls
        globalcom2.remove(model)
        assert model.__dict__["forward"] is hooked
    finally:
        model.__dict__.pop("forward", None)


def test_context_manager_restores_previous_state(tiny):
    model, processor = tiny
    with globalcom2.compressed(model, retention_ratio=0.5) as m:
        assert m is model and globalcom2.get_config(model).retention_ratio == 0.5
    assert not globalcom2.is_applied(model)
    globalcom2.apply(model, retention_ratio=0.1)
    with globalcom2.compressed(model, layout="spatial", retention_ratio=0.3):
        assert globalcom2.get_config(model).layout == "spatial"
    assert globalcom2.get_config(model) == GlobalCom2Config(retention_ratio=0.1)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"retention_ratio": 0}, "retention_ratio"), ({"retention_ratio": 1.5}, "retention_ratio"),
     ({"layout": "grid"}, "layout"), ({"temperature": -1}, "temperature")],
)
def test_bad_arguments_raise_value_error_naming_them(tiny, kwargs, field):
    model, _ = tiny
    with pytest.raises(ValueError, match=field):
        globalcom2.apply(model, **kwargs)
    assert not globalcom2.is_applied(model)


def test_unsupported_model_names_what_is_supported():
    with pytest.raises(ValueError, match="LlavaNextForConditionalGeneration"):
        globalcom2.apply(nn.Linear(2, 2))


@pytest.mark.parametrize("version", ["4.46.0", "5.17.0", "6.0.0"])
def test_untested_transformers_version_is_refused(tiny, monkeypatch, version):
    import transformers

    monkeypatch.setattr(transformers, "__version__", version)
    with pytest.raises(RuntimeError, match="transformers"):
        globalcom2.apply(tiny[0])
    assert not globalcom2.is_applied(tiny[0])


@pytest.mark.parametrize("version", ["5.18.0", "5.24.0", "5.30.0.dev0"])
def test_supported_transformers_versions_are_accepted(tiny, monkeypatch, version):
    import transformers

    monkeypatch.setattr(transformers, "__version__", version)
    globalcom2.apply(tiny[0])
    assert globalcom2.is_applied(tiny[0])


def test_vision_tower_keeps_sdpa_and_never_builds_attention_maps(tiny, monkeypatch):
    model, processor = tiny
    import transformers.models.clip.modeling_clip as clip

    def no_eager(*a, **k):
        raise AssertionError("eager attention was used")

    monkeypatch.setattr(clip, "eager_attention_forward", no_eager)
    seen = []
    handle = model.model.vision_tower.register_forward_pre_hook(
        lambda m, a, k: seen.append(k.get("output_attentions")), with_kwargs=True
    )
    try:
        globalcom2.apply(model)
        _logits(model, _inputs(processor))
    finally:
        handle.remove()
    assert model.model.vision_tower.config._attn_implementation == "sdpa"
    assert seen and not any(seen)
    attn = model.model.vision_tower.encoder.layers[-1].self_attn
    assert not attn.q_proj._forward_hooks and not attn.k_proj._forward_hooks  # hooks are temporary


def test_text_only_prompt_passes_through_untouched(tiny):
    model, processor = tiny
    text = processor.tokenizer(["just text"], return_tensors="pt")
    vanilla = _logits(model, text)
    globalcom2.apply(model)
    assert torch.equal(_logits(model, text), vanilla)


def test_padded_batch_equals_each_prompt_alone(tiny):
    model, processor = tiny
    globalcom2.apply(model, retention_ratio=0.25)
    batch = _inputs(processor, n=3)
    last = _logits(model, batch)[:, -1]
    gen = model.generate(**batch, max_new_tokens=5, do_sample=False)
    new = gen[:, batch.input_ids.shape[1]:]
    for i in range(3):
        single = processor(images=[make_image(*SIZES[i], seed=i)], text=[PROMPTS[i]], return_tensors="pt")
        torch.testing.assert_close(_logits(model, single)[0, -1], last[i], atol=1e-5, rtol=1e-5)
        gen1 = model.generate(**single, max_new_tokens=5, do_sample=False)
        assert gen1[0, single.input_ids.shape[1]:].tolist() == new[i].tolist()


def test_several_images_in_one_prompt(tiny):
    model, processor = tiny
    images = [make_image(480, 640, 0), make_image(300, 900, 1)]
    inputs = processor(images=images, text=["<image> and <image>: compare"], return_tensors="pt")
    globalcom2.apply(model, retention_ratio=0.25)
    out = _logits(model, inputs)
    adapter = globalcom2.get_family(model)
    assert len(adapter.last.counts) == 2
    assert out.shape[1] == inputs.input_ids.shape[1] - sum(adapter.last.vanilla_counts) + sum(adapter.last.counts)


def test_generate_returns_the_callers_prompt_then_new_tokens(tiny):
    model, processor = tiny
    inputs = _inputs(processor, n=2)
    globalcom2.apply(model)
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs.input_ids.shape[1] + 3)
    assert torch.equal(out[:, : inputs.input_ids.shape[1]], inputs.input_ids)
    res = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(res.sequences, out)


def test_generate_sampling_beams_and_no_cache(tiny):
    model, processor = tiny
    inputs = _inputs(processor, n=2)
    globalcom2.apply(model, retention_ratio=0.25)
    torch.manual_seed(0)
    sampled = model.generate(**inputs, max_new_tokens=3, do_sample=True, num_return_sequences=2)
    assert sampled.shape == (4, inputs.input_ids.shape[1] + 3)
    beams = model.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False)
    assert beams.shape[0] == 2
    cached = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    uncached = model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_labels_are_shortened_with_the_sequence(tiny):
    model, processor = tiny
    inputs = _inputs(processor, n=1)
    labels = inputs.input_ids.clone()
    is_img = labels == model.config.image_token_id
    labels[is_img] = -100
    globalcom2.apply(model)
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    adapter = globalcom2.get_family(model)
    start = int(is_img[0].nonzero()[0, 0])
    vanilla, kept = adapter.last.vanilla_counts[0], adapter.last.counts[0]
    expected = torch.cat([labels[0, :start], torch.full((kept,), -100), labels[0, start + vanilla:]])
    assert out.logits.shape[1] == expected.numel()
    loss = torch.nn.functional.cross_entropy(out.logits[0, :-1], expected[1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, loss)


def test_model_dtype_is_respected():
    model, processor = build_tiny_llava_next(seed=2, dtype=torch.bfloat16)
    inputs = _inputs(processor)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    globalcom2.apply(model)
    with torch.no_grad():
        out = model(**inputs)
    tokens = globalcom2.get_family(model).last.tokens[0]
    assert tokens.dtype == torch.bfloat16 and out.logits.dtype == torch.bfloat16


def test_inner_llava_next_model_is_supported(tiny):
    model, processor = tiny
    inner = model.model
    inputs = _inputs(processor)
    with torch.no_grad():
        vanilla = inner(**inputs).last_hidden_state
        globalcom2.apply(inner, retention_ratio=0.25)
        try:
            short = inner(**inputs).last_hidden_state
        finally:
            globalcom2.remove(inner)
        assert short.shape[1] < vanilla.shape[1]
        assert torch.equal(inner(**inputs).last_hidden_state, vanilla)


def test_mismatched_placeholders_give_a_clear_error(tiny):
    model, processor = tiny
    inputs = _inputs(processor)
    ids = inputs.input_ids
    drop = (ids[0] == model.config.image_token_id).nonzero()[0, 0]
    inputs["input_ids"] = torch.cat([ids[:, :drop], ids[:, drop + 1:]], dim=1)
    inputs["attention_mask"] = inputs["attention_mask"][:, 1:]
    globalcom2.apply(model)
    with pytest.raises(ValueError, match="placeholder"):
        model(**inputs)


def test_gradients_reach_the_projector_through_the_kept_tokens(tiny):
    model, processor = tiny
    inputs = _inputs(processor)
    labels = inputs.input_ids.clone()
    labels[labels == model.config.image_token_id] = -100
    globalcom2.apply(model, retention_ratio=0.25)
    model.zero_grad()
    model(**inputs, labels=labels).loss.backward()
    grad = model.model.multi_modal_projector.linear_1.weight.grad
    try:
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)
