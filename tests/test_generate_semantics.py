"""A patched model fed the processor's vanilla prompt behaves like the vanilla model (issue 23,
points 2-9): chat turns continue their own cache (interleaved conversations never mix), a new
image in a continued turn is encoded, lengths from the model's generation config count the
caller's prompt, the caller's processors / criteria replace generate's own of the same type,
``prefix_allowed_tokens_fn`` sees the caller's prompt, two threads get their own results, a
patched model pickles, and a hand-written decode loop on a left-padded batch is right.

References are the vanilla model fed the same compressed sequence (``globalcom2.embed_prompt``
of ``globalcom2.compress_images``), or the vanilla model itself where nothing depends on the
compression; scores are compared, not only tokens. Each test failed before its fix.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import threading

import pytest
import torch

import globalcom2
from globalcom2.models import families
from globalcom2.models.calls import cache_keyword
from globalcom2.tiny import build_tiny_llava_next

from conftest import family_model, make_image

FAMILIES = [pytest.param(f, id=f.model_type) for f in families()]
R = 0.25
TOL = {"atol": 1e-4, "rtol": 1e-4}


def _prompt(processor, question="What is this?"):
    return f"{processor.image_token}\n{question}"


def _inputs(processor, images, questions=None):
    questions = questions or ["What is this?"] * len(images)
    images = [[image] for image in images]  # nested per prompt: SmolVLM's processor refuses a flat list for a batch
    return processor(images=images, text=[_prompt(processor, q) for q in questions], return_tensors="pt", padding=True)


def _greedy(n, **kw):
    return dict(do_sample=False, max_new_tokens=n, min_new_tokens=n, **kw)


def _scored(out):
    """(sequences, (B, n, V) scores) of a generate output with output_scores."""
    return out.sequences, torch.stack(out.scores, dim=1)


def _text(processor, text):
    return processor.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids


def _reference(model, emb, input_ids, mask, n, exact=True):
    """The vanilla model's greedy continuation of the compressed sequence: (new tokens, scores);
    ``exact``: n new tokens (min_new_tokens too), else max_new_tokens only."""
    feed = globalcom2.embed_prompt(model, emb, input_ids, mask)
    lengths = _greedy(n) if exact else {"do_sample": False, "max_new_tokens": n}
    with torch.no_grad():
        out = model.generate(**feed, **lengths, return_dict_in_generate=True, output_scores=True)
    seqs, scores = _scored(out)
    return seqs[:, -n:], scores


def _join(*embs):
    """One ImageEmbeddings holding the images of several, in order."""
    first = embs[0]
    per_view = first.runs is not None  # one placeholder run per view (Idefics3 / SmolVLM): runs join too
    return dataclasses.replace(
        first,
        embeddings=[t for e in embs for t in e.embeddings],
        vanilla_counts=[c for e in embs for c in e.vanilla_counts],
        plans=None,
        images=None,
        runs=[r for e in embs for r in e.runs] if per_view else None,
        vanilla_runs=[r for e in embs for r in e.vanilla_runs] if per_view else None,
    )


# -- 2. interleaved conversations each continue their own cache --------------------------------


def _distinct_counts(model, processor, size):
    """Two seeds whose images of ``size`` compress to different lengths (None if all agree)."""
    seen: dict[int, int] = {}
    for seed in range(8):
        inputs = _inputs(processor, [make_image(*size, seed=seed)])
        count = globalcom2.compress_images(model, inputs, retention_ratio=R).counts[0]
        if seen and count not in seen:
            return next(iter(seen.values())), seed
        seen.setdefault(count, seed)
    return None


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("other", ["other_length", "other_mask"])
def test_interleaved_conversations_each_continue_their_own_cache(family, other):
    model, processor = family_model(family)
    size = (480, 640)
    if other == "other_length":
        seeds = _distinct_counts(model, processor, size)
        if seeds is None:
            pytest.skip(f"{family.display_name}'s published count depends on the size only")
    else:
        seeds = (0, 1)
    a = _inputs(processor, [make_image(*size, seed=seeds[0])])
    b = _inputs(processor, [make_image(*size, seed=seeds[1])])
    assert torch.equal(a.input_ids, b.input_ids)  # the same prompt ids, another image
    b_mask = b.attention_mask.clone()
    if other == "other_mask":  # conversation B masks a token of its prompt out
        after_image = int((b.input_ids[0] == model.config.image_token_id).nonzero().max()) + 1
        b_mask[:, after_image] = 0
    emb_a = globalcom2.compress_images(model, a, retention_ratio=R)

    globalcom2.apply(model, retention_ratio=R)
    first_a = model.generate(**a, **_greedy(2), return_dict_in_generate=True)
    model.generate(**{**b, "attention_mask": b_mask}, **_greedy(2), return_dict_in_generate=True)  # B, turn 1
    ids = torch.cat([first_a.sequences, _text(processor, " And the colour?")], dim=1)
    mask = torch.ones_like(ids)
    out = model.generate(
        input_ids=ids, attention_mask=mask, **{cache_keyword(): first_a[cache_keyword()]},
        **_greedy(3), return_dict_in_generate=True, output_scores=True,
    )
    globalcom2.remove(model)
    seqs, scores = _scored(out)
    assert torch.equal(seqs[:, : ids.shape[1]], ids)
    tokens, ref_scores = _reference(model, emb_a, ids, mask, 3)
    torch.testing.assert_close(scores, ref_scores, **TOL)
    assert torch.equal(seqs[:, ids.shape[1]:], tokens)


# -- 3. a new image in a continued turn is encoded ---------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_a_new_image_in_a_continued_turn_is_encoded(family):
    model, processor = family_model(family)
    a = _inputs(processor, [make_image(480, 640, seed=0)])
    c = processor(images=[make_image(300, 900, seed=5)], text=[_prompt(processor, "And this one?")],
                  return_tensors="pt", add_special_tokens=False)
    emb = _join(*(globalcom2.compress_images(model, x, retention_ratio=R) for x in (a, c)))

    globalcom2.apply(model, retention_ratio=R)
    first = model.generate(**a, **_greedy(2), return_dict_in_generate=True)
    ids = torch.cat([first.sequences, c.input_ids], dim=1)
    mask = torch.ones_like(ids)
    images = {k: v for k, v in c.items() if k not in ("input_ids", "attention_mask")}
    out = model.generate(
        input_ids=ids, attention_mask=mask, **images, **{cache_keyword(): first[cache_keyword()]},
        **_greedy(3), return_dict_in_generate=True, output_scores=True,
    )
    stats = globalcom2.get_family(model).last
    globalcom2.remove(model)
    assert stats.counts == emb.counts[1:]  # the new image was compressed
    seqs, scores = _scored(out)
    tokens, ref_scores = _reference(model, emb, ids, mask, 3)
    torch.testing.assert_close(scores, ref_scores, **TOL)
    assert torch.equal(seqs[:, ids.shape[1]:], tokens)


def test_a_continued_turn_with_the_wrong_images_is_refused_in_one_line(tiny, image_factory):
    model, processor = tiny
    a = _inputs(processor, [image_factory(480, 640)])
    c = processor(images=[image_factory(300, 900, seed=5)], text=[_prompt(processor, "And this?")],
                  return_tensors="pt", add_special_tokens=False)
    globalcom2.apply(model, retention_ratio=R)
    first = model.generate(**a, **_greedy(2), return_dict_in_generate=True)
    ids = torch.cat([first.sequences, c.input_ids], dim=1)
    with pytest.raises(ValueError, match="continued chat turn takes the images whose placeholders follow") as err:
        model.generate(  # the first turn's image again, not the new one
            input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=a.pixel_values, image_sizes=a.image_sizes,
            **{cache_keyword(): first[cache_keyword()]}, **_greedy(1),
        )
    assert "\n" not in str(err.value)


# -- 4. max_length from the model's generation config under the caller's config -----------------


def test_max_length_in_the_models_generation_config_counts_the_callers_prompt(tiny, image_factory):
    from transformers import GenerationConfig

    model, processor = tiny
    inputs = _inputs(processor, [image_factory(480, 640)])
    t0 = inputs.input_ids.shape[1]
    emb = globalcom2.compress_images(model, inputs, retention_ratio=R)
    saved = model.generation_config.max_length
    model.generation_config.max_length = t0 + 5
    try:
        given = GenerationConfig(do_sample=False, output_scores=True, return_dict_in_generate=True)
        vanilla = model.generate(**inputs, generation_config=given)
        assert vanilla.sequences.shape[1] == t0 + 5  # what the vanilla model makes of it
        globalcom2.apply(model, retention_ratio=R)
        out = model.generate(**inputs, generation_config=given)
        assert given.max_length is None  # the caller's config is left alone
    finally:
        model.generation_config.max_length = saved
        globalcom2.remove(model)
    seqs, scores = _scored(out)
    assert seqs.shape[1] == t0 + 5  # was t0 + 1,723
    tokens, ref_scores = _reference(model, emb, inputs.input_ids, inputs.attention_mask, 5, exact=False)
    torch.testing.assert_close(scores, ref_scores, **TOL)
    assert torch.equal(seqs[:, t0:], tokens)


# -- 5. the caller's processors / criteria replace generate's own of the same type ----------------


def test_a_callers_processor_of_generates_own_type_replaces_it(tiny, image_factory):
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    model, processor = tiny
    inputs = _inputs(processor, [image_factory(480, 640)])
    t0 = inputs.input_ids.shape[1]
    mine = RepetitionPenaltyLogitsProcessor(penalty=3.0)
    globalcom2.apply(model, retention_ratio=R)
    out = model.generate(
        **inputs, do_sample=False, max_new_tokens=4, repetition_penalty=1.5, logits_processor=LogitsProcessorList([mine]),
        return_dict_in_generate=True, output_scores=True, output_logits=True,
    )
    for step, (raw, score) in enumerate(zip(out.logits, out.scores)):
        seen = out.sequences[:, : t0 + step]  # the caller's prompt and the tokens so far
        assert torch.equal(seen[:, :t0], inputs.input_ids)
        expected = RepetitionPenaltyLogitsProcessor(penalty=3.0)(seen, raw.clone())  # the caller's alone
        torch.testing.assert_close(score, expected, atol=0, rtol=0)


def test_a_callers_max_length_criteria_replaces_generates_own(tiny, image_factory):
    from transformers import MaxLengthCriteria, StoppingCriteriaList

    model, processor = tiny
    inputs = _inputs(processor, [image_factory(480, 640)])
    t0 = inputs.input_ids.shape[1]
    criteria = StoppingCriteriaList([MaxLengthCriteria(max_length=t0 + 6)])
    vanilla = model.generate(**inputs, do_sample=False, max_new_tokens=2, stopping_criteria=criteria)
    assert vanilla.shape[1] == t0 + 6  # the caller's criterion replaced generate's own max length
    globalcom2.apply(model, retention_ratio=R)
    out = model.generate(**inputs, do_sample=False, max_new_tokens=2, stopping_criteria=criteria)
    assert out.shape[1] == t0 + 6  # was t0 + 2: both criteria ran
    assert criteria[0].max_length == t0 + 6  # the caller's object is left alone


# -- 6. prefix_allowed_tokens_fn sees the caller's prompt ----------------------------------------


@pytest.mark.parametrize("beams", [1, 2])
def test_prefix_allowed_tokens_fn_sees_the_callers_prompt(tiny, image_factory, beams):
    model, processor = tiny
    inputs = _inputs(processor, [image_factory(480, 640), image_factory(300, 900, seed=1)], ["What is this?", "Describe it."])
    t0 = inputs.input_ids.shape[1]
    allowed = [5, 6, 7, 8]
    seen: list[tuple[int, torch.Tensor]] = []

    def fn(batch_id, sent):
        seen.append((batch_id, sent.clone()))
        return allowed

    globalcom2.apply(model, retention_ratio=R)
    out = model.generate(**inputs, do_sample=False, num_beams=beams, max_new_tokens=3, prefix_allowed_tokens_fn=fn)
    assert seen and all(sent.shape[0] >= t0 for _, sent in seen)
    for batch_id, sent in seen:
        assert torch.equal(sent[:t0], inputs.input_ids[batch_id])  # was the shortened prompt
    assert set(out[:, t0:].flatten().tolist()) <= set(allowed)


# -- 7. two threads on one patched model ----------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["globalcom2", "globalcom2+fastv"])
def test_two_threads_generating_on_one_model_each_get_their_own_result(family, method):
    model, processor = family_model(family)
    work = [_inputs(processor, [make_image(480, 640, seed=0)]), _inputs(processor, [make_image(300, 900, seed=3)])]
    globalcom2.apply(model, method=method, retention_ratio=R)
    try:
        alone = [_scored(model.generate(**w, **_greedy(2), return_dict_in_generate=True, output_scores=True)) for w in work]
        rounds = 4
        barrier = threading.Barrier(2)
        results: dict[int, list] = {0: [], 1: []}
        errors: list[BaseException] = []

        def run(i):
            try:
                for _ in range(rounds):
                    barrier.wait()
                    out = model.generate(**work[i], **_greedy(2), return_dict_in_generate=True, output_scores=True)
                    results[i].append(_scored(out))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                barrier.abort()

        threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        globalcom2.remove(model)
    assert not errors, errors
    for i in (0, 1):
        assert len(results[i]) == rounds
        for seqs, scores in results[i]:
            assert torch.equal(seqs, alone[i][0])
            torch.testing.assert_close(scores, alone[i][1], atol=0, rtol=0)


# -- 8. pickle and torch.save ----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
@pytest.mark.parametrize("method", ["globalcom2", "globalcom2+fastv"])
def test_a_patched_model_pickles_and_loads_as_a_patched_model(image_factory, how, method):
    model, processor = build_tiny_llava_next(seed=0)
    inputs = _inputs(processor, [image_factory(480, 640)])
    globalcom2.apply(model, method=method, retention_ratio=R)
    if how == "pickle":
        loaded = pickle.loads(pickle.dumps(model))
    else:
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
    assert globalcom2.is_applied(loaded) and globalcom2.get_family(loaded).model is loaded
    with torch.no_grad():
        expected = model(**inputs).logits
        torch.testing.assert_close(loaded(**inputs).logits, expected, atol=0, rtol=0)
        loaded.lm_head.weight.mul_(2.0)  # the loaded model runs its own weights
        assert torch.equal(model(**inputs).logits, expected)
    out = loaded.generate(**inputs, **_greedy(2))
    assert torch.equal(out[:, : inputs.input_ids.shape[1]], inputs.input_ids)
    globalcom2.remove(loaded)
    assert "forward" not in loaded.__dict__ and not globalcom2.is_applied(loaded)
    with torch.no_grad():
        assert loaded(**inputs).logits.shape[1] == inputs.input_ids.shape[1]  # vanilla again


# -- 9. a hand-written decode loop on a left-padded batch -----------------------------------------


def _decode_loop(model, first: dict, steps: int, positions: bool):
    """Prefill, then one greedy token at a time with the growing attention mask: per step (B, V) logits."""
    mask = first["attention_mask"]
    call = dict(first)
    if positions:
        call["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
    logits = []
    with torch.no_grad():
        out = model(**call, use_cache=True)
        for _ in range(steps):
            logits.append(out.logits[:, -1])
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            step = {"input_ids": token, "attention_mask": mask, cache_keyword(): out[cache_keyword()], "use_cache": True}
            if positions:
                step["position_ids"] = mask.long().sum(-1, keepdim=True) - 1
            out = model(**step)
    return torch.stack(logits, dim=1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("positions", [False, True], ids=["no_positions", "mask_positions"])
def test_a_hand_written_decode_loop_on_a_left_padded_batch(family, positions):
    model, processor = family_model(family)
    inputs = _inputs(processor, [make_image(480, 640, seed=0), make_image(336, 336, seed=1)], ["What is this?", "Hi"])
    assert not bool(inputs.attention_mask.all())  # left padding
    emb = globalcom2.compress_images(model, inputs, retention_ratio=R)
    feed = globalcom2.embed_prompt(model, emb, inputs.input_ids, inputs.attention_mask)
    reference = _decode_loop(model, feed, 4, positions)
    globalcom2.apply(model, retention_ratio=R)
    try:
        patched = _decode_loop(model, dict(inputs), 4, positions)
    finally:
        globalcom2.remove(model)
    torch.testing.assert_close(patched, reference, **TOL)


def test_output_cache_reads_the_renamed_field_only(monkeypatch):
    """``generate --compare`` printed transformers' "`past_key_values`/`cache_params` are
    deprecated" to CLI users: ``output_cache`` read ``past_key_values`` whenever an output's
    ``cache`` was None. Where the output class has a ``cache`` field, only that is read."""
    import transformers.utils.generic as generic
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from globalcom2.models.calls import output_cache

    said = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a, **k: said.append(msg))
    if "cache" not in CausalLMOutputWithPast.__dataclass_fields__:  # pragma: no cover - 5.18
        pytest.skip("this transformers has no renamed cache field")
    assert output_cache(CausalLMOutputWithPast(logits=None)) is None
    cache = object()
    assert output_cache(CausalLMOutputWithPast(logits=None, cache=cache)) is cache
    assert said == []
