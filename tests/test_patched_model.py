"""A patched model behaves like the model it patches: generate's options, chat turns, copies,
wrappers (PEFT, torch.compile, accelerate) and offloading.

Each test here failed before the fix it guards (see the issue "A patched model behaves like the
model it patches").
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import globalcom2
from globalcom2.tiny import build_tiny_llava_next

from conftest import make_image

PROMPT = "USER: <image>\nWhat is this? ASSISTANT:"


def _inputs(processor, sizes=((480, 640),), prompts=(PROMPT,)):
    images = [make_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    return processor(images=images, text=list(prompts), return_tensors="pt", padding=True)


def _greedy(**kw):
    return dict(do_sample=False, **kw)


@pytest.fixture
def fresh():
    """A tiny model of its own (for tests that mutate or wrap the model)."""
    return build_tiny_llava_next(seed=0)


# -- grad mode and what is kept ----------------------------------------------------------------


def _record_grad_mode(model):
    """The grad mode the vision side runs in, read at the tower's embeddings (the patched encode
    leaves the tower's own forward at the feature layer, so a hook on the whole tower never fires)."""
    seen: list[bool] = []
    tower = model.model.vision_tower
    embeddings = getattr(tower, "vision_model", tower).embeddings
    handle = embeddings.register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    return seen, handle


def test_generate_runs_the_vision_side_without_a_graph_and_keeps_none(tiny):
    model, processor = tiny
    inputs = _inputs(processor)
    globalcom2.apply(model, retention_ratio=0.25)
    seen, handle = _record_grad_mode(model)
    try:
        assert torch.is_grad_enabled()
        model.generate(**inputs, **_greedy(max_new_tokens=2))
    finally:
        handle.remove()
    assert seen == [False]  # as the vanilla generate, which runs under no_grad
    last = globalcom2.get_family(model).last
    assert all(t.grad_fn is None and not t.requires_grad for t in last.tokens)


def test_forward_keeps_the_callers_grad_mode_but_keeps_no_graph(tiny):
    model, processor = tiny
    inputs = _inputs(processor)
    globalcom2.apply(model, retention_ratio=0.25)
    seen, handle = _record_grad_mode(model)
    try:
        with torch.no_grad():
            model(**inputs)
        logits = model(**inputs).logits
    finally:
        handle.remove()
    assert seen == [False, True]
    assert logits.requires_grad  # gradients still reach the model when training
    assert all(t.grad_fn is None for t in globalcom2.get_family(model).last.tokens)


def test_assisted_generation_works_on_a_patched_model(tiny):
    """The vision side's graph made ``assistant_model`` fail with an opaque deepcopy error."""
    model, processor = tiny
    inputs = _inputs(processor)
    vanilla = model.generate(**inputs, **_greedy(max_new_tokens=3))
    globalcom2.apply(model, retention_ratio=1.0, layout="spatial")
    patched = model.generate(**inputs, **_greedy(max_new_tokens=3))
    assisted = model.generate(**inputs, **_greedy(max_new_tokens=3), assistant_model=model)
    assert torch.equal(assisted, patched)
    assert assisted.shape == vanilla.shape


# -- lengths, criteria, processors, streamers ------------------------------------------------


def test_max_length_and_min_length_count_the_vanilla_prompt(tiny):
    model, processor = tiny
    inputs = _inputs(processor)
    t0 = inputs.input_ids.shape[1]
    globalcom2.apply(model, retention_ratio=0.25)
    out = model.generate(**inputs, **_greedy(max_length=t0 + 5, min_length=t0 + 5))
    assert out.shape[1] == t0 + 5  # 5 new tokens, as on the vanilla model
    config = copy.deepcopy(model.generation_config)
    config.max_length, config.min_length, config.do_sample = t0 + 3, t0 + 3, False
    out = model.generate(**inputs, generation_config=config)
    assert out.shape[1] == t0 + 3
    # max_new_tokens keeps its meaning too
    assert model.generate(**inputs, **_greedy(max_new_tokens=4, min_new_tokens=4)).shape[1] == t0 + 4


def test_stopping_criteria_and_logits_processors_see_the_vanilla_prompt(tiny):
    from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

    model, processor = tiny
    inputs = _inputs(processor)
    t0 = inputs.input_ids.shape[1]
    lengths: dict[str, list[int]] = {"criteria": [], "processor": []}
    prefixes: list[torch.Tensor] = []

    class Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            lengths["criteria"].append(input_ids.shape[1])
            prefixes.append(input_ids[:, :t0].clone())
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= t0 + 3, dtype=torch.bool)

    class Record(LogitsProcessor):
        def __call__(self, input_ids, scores):
            lengths["processor"].append(input_ids.shape[1])
            return scores

    globalcom2.apply(model, retention_ratio=0.25)
    out = model.generate(
        **inputs, **_greedy(max_new_tokens=10),
        stopping_criteria=StoppingCriteriaList([Stop()]), logits_processor=LogitsProcessorList([Record()]),
    )
    assert out.shape[1] == t0 + 3
    assert lengths["criteria"] == [t0 + 1, t0 + 2, t0 + 3]
    assert lengths["processor"] == [t0, t0 + 1, t0 + 2]
    assert all(torch.equal(p, inputs.input_ids) for p in prefixes)


def test_a_streamer_that_shows_the_prompt_shows_the_callers_prompt(tiny):
    from transformers.generation.streamers import BaseStreamer

    model, processor = tiny
    inputs = _inputs(processor)

    class Collect(BaseStreamer):
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.clone())

        def end(self):
            self.ended = True

    globalcom2.apply(model, retention_ratio=0.25)
    streamer = Collect()
    out = model.generate(**inputs, **_greedy(max_new_tokens=3), streamer=streamer)
    assert torch.equal(streamer.puts[0].reshape(inputs.input_ids.shape), inputs.input_ids)
    assert torch.equal(torch.cat([p.reshape(1, -1) for p in streamer.puts], dim=1), out)
    assert streamer.ended


# -- chat turns on the returned cache ---------------------------------------------------------


def _second_turn(processor, first_sequences, first_mask, text=" And the colour? ASSISTANT:"):
    new = processor.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    ids = torch.cat([first_sequences, new.expand(first_sequences.shape[0], -1)], dim=1)
    mask = torch.cat([first_mask, torch.ones(ids.shape[0], ids.shape[1] - first_mask.shape[1], dtype=first_mask.dtype)], 1)
    return ids, mask


@pytest.mark.parametrize("with_images", [False, True])
def test_a_second_chat_turn_on_the_returned_cache_equals_the_whole_conversation_afresh(tiny, with_images):
    model, processor = tiny
    inputs = _inputs(processor, sizes=((480, 640), (300, 900)), prompts=(PROMPT, "<image>\nDescribe it. ASSISTANT:"))
    globalcom2.apply(model, retention_ratio=0.25)
    first = model.generate(**inputs, **_greedy(max_new_tokens=3), return_dict_in_generate=True)
    ids, mask = _second_turn(processor, first.sequences, inputs.attention_mask)
    images = {"pixel_values": inputs.pixel_values, "image_sizes": inputs.image_sizes} if with_images else {}
    turn = model.generate(
        input_ids=ids, attention_mask=mask, past_key_values=first.past_key_values, **images, **_greedy(max_new_tokens=4)
    )
    afresh = model.generate(
        input_ids=ids, attention_mask=mask, pixel_values=inputs.pixel_values, image_sizes=inputs.image_sizes,
        **_greedy(max_new_tokens=4),
    )
    assert turn.shape == afresh.shape == (ids.shape[0], ids.shape[1] + 4)
    assert torch.equal(turn[:, : ids.shape[1]], ids)
    assert torch.equal(turn, afresh)


def test_a_cache_that_does_not_continue_the_last_compressed_call_is_refused(tiny):
    model, processor = tiny
    inputs = _inputs(processor)
    globalcom2.apply(model, retention_ratio=0.25)
    first = model.generate(**inputs, **_greedy(max_new_tokens=2), return_dict_in_generate=True)
    ids, mask = _second_turn(processor, first.sequences, inputs.attention_mask)
    ids = ids.clone()
    ids[0, -1] = ids[0, -1]  # same conversation is fine ...
    other = ids.clone()
    other[:, 0] = processor.tokenizer.pad_token_id  # ... a different one is not
    with pytest.raises(ValueError, match="past_key_values"):
        model.generate(input_ids=other, attention_mask=mask, past_key_values=first.past_key_values, max_new_tokens=2)


# -- copies --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["globalcom2", "globalcom2+fastv"])
def test_a_deep_copy_is_an_independent_patched_model(fresh, method):
    model, processor = fresh
    inputs = _inputs(processor)
    globalcom2.apply(model, method=method, retention_ratio=0.25)
    with torch.no_grad():
        before = model(**inputs).logits
    twin = copy.deepcopy(model)
    assert globalcom2.is_applied(twin) and globalcom2.get_family(twin).model is twin
    with torch.no_grad():
        assert torch.equal(twin(**inputs).logits, before)
        twin.lm_head.weight.mul_(2.0)  # the copy runs its own weights ...
        assert not torch.allclose(twin(**inputs).logits, before)
        assert torch.equal(model(**inputs).logits, before)  # ... and the original keeps its own
    globalcom2.remove(twin)  # raised "'object' object is not callable"
    assert "forward" not in twin.__dict__ and not globalcom2.is_applied(twin)
    assert globalcom2.is_applied(model)
    with torch.no_grad():
        assert twin(**inputs).logits.shape[1] == inputs.input_ids.shape[1]
    if "fastv" in method:
        assert all("forward" not in layer.__dict__ for layer in twin.model.language_model.layers)
        assert any("forward" in layer.__dict__ for layer in model.model.language_model.layers)


# -- wrappers ----------------------------------------------------------------------------------


def test_apply_reaches_through_a_peft_model(fresh):
    peft = pytest.importorskip("peft")
    model, processor = fresh
    inputs = _inputs(processor)
    globalcom2.apply(model, retention_ratio=0.25)
    with torch.no_grad():
        expected = model(**inputs).logits  # LoRA starts as the identity
    globalcom2.remove(model)
    lora = peft.LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    wrapped = peft.get_peft_model(model, lora)
    assert globalcom2.apply(wrapped, retention_ratio=0.25) is wrapped
    assert globalcom2.is_applied(wrapped) and globalcom2.get_family(wrapped).model is model
    with torch.no_grad():
        torch.testing.assert_close(wrapped(**inputs).logits, expected)
    out = wrapped.generate(**inputs, **_greedy(max_new_tokens=2))
    assert out.shape[1] == inputs.input_ids.shape[1] + 2
    globalcom2.remove(wrapped)
    assert not globalcom2.is_applied(wrapped) and "forward" not in model.__dict__


def test_apply_reaches_through_torch_compile(fresh):
    model, processor = fresh
    inputs = _inputs(processor)
    globalcom2.apply(model, retention_ratio=0.25)
    with torch.no_grad():
        expected = model(**inputs).logits
    globalcom2.remove(model)
    compiled = torch.compile(model, backend="eager")
    assert globalcom2.apply(compiled, retention_ratio=0.25) is compiled
    assert globalcom2.get_family(compiled).model is model
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs).logits, expected)
    globalcom2.remove(compiled)
    assert not globalcom2.is_applied(model)


def test_remove_after_accelerate_prepare_keeps_accelerates_wrapper(fresh):
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState, PartialState

    model, processor = fresh
    inputs = _inputs(processor)
    with torch.no_grad():
        vanilla_len = model(**inputs).logits.shape[1]
    globalcom2.apply(model, retention_ratio=0.25)
    ours = model.__dict__["forward"]
    try:
        accelerator = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
        prepared = accelerator.prepare(model)
        wrapper = prepared.__dict__.get("forward")
        assert wrapper is not None and wrapper is not ours  # accelerate wrapped our forward
        with torch.no_grad():
            assert prepared(**inputs).logits.shape[1] < vanilla_len
        globalcom2.remove(prepared)
        assert prepared.__dict__.get("forward") is wrapper  # accelerate's wrapper kept ...
        with torch.no_grad():
            out = prepared(**inputs).logits
        assert out.shape[1] == vanilla_len  # ... and the model inside it is vanilla again
        assert out.dtype == torch.float32  # accelerate's fp32 conversion still applies
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()


def test_whole_model_disk_offload(fresh, tmp_path):
    pytest.importorskip("accelerate")
    from transformers import LlavaNextForConditionalGeneration

    model, processor = fresh
    inputs = _inputs(processor)
    model.save_pretrained(tmp_path / "ckpt")
    globalcom2.apply(model, retention_ratio=0.25)
    with torch.no_grad():
        expected = model(**inputs).logits
    offloaded = LlavaNextForConditionalGeneration.from_pretrained(
        tmp_path / "ckpt", device_map={"": "disk"}, offload_folder=str(tmp_path / "offload"), dtype=torch.float32
    )
    assert offloaded.model.image_newline.device.type == "meta"
    globalcom2.apply(offloaded, retention_ratio=0.25)
    with torch.no_grad():
        torch.testing.assert_close(offloaded(**inputs).logits, expected)
    out = offloaded.generate(**inputs, **_greedy(max_new_tokens=2))
    assert out.shape[1] == inputs.input_ids.shape[1] + 2


# -- context window ----------------------------------------------------------------------------


def test_a_prompt_longer_than_the_context_window_warns_once(fresh):
    model, processor = fresh
    inputs = _inputs(processor)
    globalcom2.apply(model, retention_ratio=0.5)
    kept = None
    with torch.no_grad():
        kept = model(**inputs).logits.shape[1]
    model.config.text_config.max_position_embeddings = kept - 1
    globalcom2.apply(model, retention_ratio=0.5)  # a new adapter warns anew
    with pytest.warns(UserWarning, match="context window of"):
        with torch.no_grad():
            model(**inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model(**inputs)  # once
