"""Count first: ``apply(model, processor=processor)`` makes the processor write each image's
compressed count, so the prompt the caller holds is the sequence the model runs (issue 23).

Every use below, on every registered family, is compared with the *vanilla* model fed the same
compressed sequence (``embed_prompt(model, compress_images(model, inputs), ...)``): logits and
scores, not only tokens (a tiny random model's greedy tokens can hide a difference).
"""

from __future__ import annotations

import copy
import inspect
import pickle

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessorList, RepetitionPenaltyLogitsProcessor, StoppingCriteriaList
from transformers.generation.stopping_criteria import MaxLengthCriteria

import globalcom2
from conftest import family_model, make_image
from globalcom2 import processors
from globalcom2.models import families

FAMILIES = [pytest.param(f, id=f.model_type) for f in families()]
SIZES = [(480, 640), (300, 900)]
QUESTIONS = ["What?", "And this one, in more words please?"]


def _prompts(processor):
    return [f"{processor.image_token}\n{q}" for q in QUESTIONS]


def _inputs(processor, sizes=SIZES, seeds=(0, 1)):
    images = [[make_image(*hw, seed=s)] for hw, s in zip(sizes, seeds)]  # one list per prompt
    return processor(images=images, text=_prompts(processor)[: len(images)], return_tensors="pt", padding=True)


class Applied:
    """The family's tiny model with GlobalCom2 applied through its processor, the processor's
    compressed inputs, and the vanilla model's reference on the same sequence."""

    def __init__(self, family, **options):
        self.model, self.processor = family_model(family)
        self.options = {"retention_ratio": 0.25, **options}
        globalcom2.apply(self.model, processor=self.processor, **self.options)
        self.inputs = _inputs(self.processor)
        self.emb = globalcom2.compress_images(self.model, self.inputs)
        self.feed = globalcom2.embed_prompt(self.model, self.emb, self.inputs["input_ids"], self.inputs["attention_mask"])
        # The caller's ids too: generate's processors, criteria and beam lengths read them (the
        # embeddings alone would start generate at length 0). The vanilla model takes its first
        # step from inputs_embeds.
        self.gen_feed = {**self.feed, "input_ids": self.inputs["input_ids"]}

    def vanilla(self, fn):
        """``fn(model)`` with the method removed (the reference), then applied again."""
        globalcom2.remove(self.model)
        try:
            with torch.no_grad():
                return fn(self.model)
        finally:
            globalcom2.apply(self.model, processor=self.processor, **self.options)

    @property
    def prompt_len(self) -> int:
        return self.inputs["input_ids"].shape[1]


def _same_generation(patched, vanilla, prompt_len):
    assert torch.equal(patched.sequences, vanilla.sequences)
    for a, b in zip(patched.scores, vanilla.scores):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_processor_writes_the_counts_the_model_runs(family):
    run = Applied(family)
    model, processor = run.model, run.processor
    ids = run.inputs["input_ids"]
    image_id = model.config.image_token_id
    assert (ids == image_id).sum(1).tolist() == run.emb.counts  # one image per prompt here
    sizes = SIZES
    assert run.emb.counts == globalcom2.visual_token_counts(model, sizes, processor=processor, **run.options, count="fixed")
    with torch.no_grad():
        patched = model(**run.inputs).logits
    stats = globalcom2.last_stats(model)
    assert stats.visual_tokens == run.emb.counts and stats.vanilla_visual_tokens == run.emb.vanilla_counts
    want = run.vanilla(lambda m: m(**run.feed).logits)
    assert patched.shape[1] == ids.shape[1]  # the caller's sequence is the model's sequence
    torch.testing.assert_close(patched, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_options_keep_their_vanilla_meaning(family):
    run = Applied(family)
    model, inputs, n = run.model, run.inputs, run.prompt_len
    common = dict(return_dict_in_generate=True, output_scores=True)

    def both(**kw):
        with torch.no_grad():
            patched = model.generate(**inputs, **common, **kw)
        vanilla = run.vanilla(lambda m: m.generate(**run.gen_feed, **common, **kw))
        _same_generation(patched, vanilla, n)
        return patched

    both(max_new_tokens=4, do_sample=False)  # greedy
    if family.model_type != "internvl":
        # Beams: transformers repeats InternVL's pixel_values (one row per view, not per prompt)
        # view by view, so its own beams mix the images of a batch; ours follow it (README).
        both(max_new_tokens=3, num_beams=2, do_sample=False)
    # Lengths by the caller's own GenerationConfig: max_length counts the caller's prompt.
    out = both(generation_config=GenerationConfig(max_length=n + 2, do_sample=False))
    assert out.sequences.shape[1] == n + 2
    # A logits processor and a stopping criterion of generate's own types replace, not stack.
    both(max_new_tokens=5, do_sample=False, logits_processor=LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.5)]))
    out = both(max_new_tokens=10, do_sample=False, stopping_criteria=StoppingCriteriaList([MaxLengthCriteria(n + 3)]))
    assert out.sequences.shape[1] == n + 3
    # prefix_allowed_tokens_fn sees the caller's ids (the same as the model's).
    seen = []

    def allowed(batch_id, ids):
        seen.append(ids.shape[0])
        return list(range(20))

    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False, prefix_allowed_tokens_fn=allowed)
    assert min(seen) == n


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_static_cache_and_streamers(family):
    run = Applied(family)
    model, inputs, n = run.model, run.inputs, run.prompt_len

    def sample(m, feed):
        torch.manual_seed(3)
        return m.generate(**feed, max_new_tokens=3, do_sample=True, top_k=5)

    with torch.no_grad():
        patched = sample(model, inputs)
    assert torch.equal(patched, run.vanilla(lambda m: sample(m, run.gen_feed)))

    class Collect:
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.clone())

        def end(self):
            pass

    images = dict(_inputs(run.processor, SIZES[:1], (0,)))
    streamer = Collect()
    with torch.no_grad():
        out = model.generate(**images, max_new_tokens=3, do_sample=False, streamer=streamer)
    assert torch.equal(streamer.chunks[0].reshape(-1), images["input_ids"].reshape(-1))  # the caller's prompt first
    assert torch.equal(torch.cat([c.reshape(-1) for c in streamer.chunks[1:]]), out[0, images["input_ids"].shape[1]:])
    with torch.no_grad():
        static = model.generate(**inputs, max_new_tokens=3, do_sample=False, cache_implementation="static")
        dynamic = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(static, dynamic)


@pytest.mark.parametrize("family", FAMILIES)
def test_hand_written_decode_loop_with_left_padding(family):
    run = Applied(family)
    model, inputs = run.model, run.inputs
    assert (inputs["attention_mask"][:, 0] == 0).any()  # left padding is exercised

    # The cache keyword of the installed transformers (5.25 renamed past_key_values to cache).
    name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"

    def loop(m, first):
        mask = first["attention_mask"]
        out = m(**first, use_cache=True)
        cache, steps = getattr(out, name), [out.logits[:, -1]]
        for _ in range(3):
            nxt = steps[-1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            out = m(input_ids=nxt, attention_mask=mask, use_cache=True, **{name: cache})
            cache = getattr(out, name)
            steps.append(out.logits[:, -1])
        return torch.stack(steps)

    with torch.no_grad():
        patched = loop(model, dict(inputs))
    want = run.vanilla(lambda m: loop(m, dict(run.feed)))
    torch.testing.assert_close(patched, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_turns_and_interleaved_conversations(family):
    """A's turn 1, B's turn 1 (the same prompt ids, another image), then A's turn 2 on A's cache:
    the vanilla model on A's sequence, scores compared."""
    run = Applied(family)
    model, processor = run.model, run.processor
    tok = processor.tokenizer
    a = _inputs(processor, SIZES[:1], (0,))
    b = _inputs(processor, SIZES[:1], (5,))
    assert torch.equal(a["input_ids"], b["input_ids"])
    first = dict(max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    follow = tok([" More?"], return_tensors="pt", add_special_tokens=False)["input_ids"]
    second = dict(max_new_tokens=2, do_sample=False, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        out_a = model.generate(**a, **first)
        out_b = model.generate(**b, **first)
        ids_a = torch.cat([out_a.sequences, follow], dim=1)
        ids_b = torch.cat([out_b.sequences, follow], dim=1)
        name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
        turn_a = model.generate(input_ids=ids_a, attention_mask=torch.ones_like(ids_a), **{name: getattr(out_a, name)}, **second)
        turn_b = model.generate(input_ids=ids_b, attention_mask=torch.ones_like(ids_b), **{name: getattr(out_b, name)}, **second)
    emb_a = globalcom2.compress_images(model, a)
    feed_a = globalcom2.embed_prompt(model, emb_a, a["input_ids"], a["attention_mask"])

    def reference(m):
        embeds = m.get_input_embeddings()(ids_a)
        embeds[:, : feed_a["inputs_embeds"].shape[1]] = feed_a["inputs_embeds"]
        return m.generate(input_ids=ids_a, inputs_embeds=embeds, attention_mask=torch.ones_like(ids_a), **second)

    want = run.vanilla(reference)
    _same_generation(turn_a, want, 0)
    assert not torch.allclose(turn_a.scores[0], turn_b.scores[0])  # B's turn is B's


@pytest.mark.parametrize("family", FAMILIES)
def test_two_threads_on_one_patched_model(family):
    import threading

    run = Applied(family)
    model = run.model
    other = _inputs(run.processor, SIZES[::-1], (2, 3))
    with torch.no_grad():
        want = [model(**run.inputs).logits, model(**other).logits]
    got: list = [None, None]
    errors: list = []

    def work(i, feed):
        try:
            with torch.no_grad():
                for _ in range(3):
                    got[i] = model(**feed).logits
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i, f)) for i, f in enumerate([run.inputs, other])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("family", FAMILIES)
def test_deepcopy_and_pickle_of_the_patched_processor(family):
    run = Applied(family)
    processor = run.processor
    twin = copy.deepcopy(processor)
    assert torch.equal(_inputs(twin)["input_ids"], run.inputs["input_ids"])
    processor.to_dict()  # what save_pretrained serialises: the patch is not part of it
    assert "replace_image_token" not in processor.to_dict()
    try:
        blob = pickle.dumps(processor)
    except (AttributeError, pickle.PicklingError):  # the tiny OneVision processor's class is local to a function
        blob = None
    if blob is not None:
        assert torch.equal(_inputs(pickle.loads(blob))["input_ids"], run.inputs["input_ids"])
    globalcom2.remove(run.model)
    assert not processors.is_patched(processor)
    vanilla = _inputs(processor)
    assert (vanilla["input_ids"] == run.model.config.image_token_id).sum(1).tolist() == run.emb.vanilla_counts


def test_the_processor_path_needs_a_count_known_from_the_size(tiny):
    model, processor = tiny
    with pytest.raises(ValueError, match="count='fixed'"):
        globalcom2.apply(model, processor=processor, retention_ratio=0.25, count="published")
    assert not globalcom2.is_applied(model) and not processors.is_patched(processor)
    with pytest.raises(ValueError, match="language model"):
        globalcom2.apply(model, processor=processor, method="fastv")
    with pytest.raises(TypeError, match="replace_image_token"):
        globalcom2.apply(model, processor=processor.tokenizer, retention_ratio=0.25)
    assert not globalcom2.is_applied(model)
    globalcom2.apply(model, processor=processor, method="fastervlm", retention_ratio=0.3)
    try:
        assert processors.is_patched(processor)
        globalcom2.apply(model, retention_ratio=0.3)  # applying again without it: the processor is vanilla again
        assert not processors.is_patched(processor)
    finally:
        globalcom2.remove(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_vanilla_prompt_still_works_on_a_processor_patched_model(family):
    model, processor = family_model(family)
    vanilla_inputs = _inputs(processor)
    run = Applied(family)
    with torch.no_grad():
        a = model(**run.inputs).logits[:, -1]
        b = model(**vanilla_inputs).logits[:, -1]
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_new_image_in_a_continued_turn(family):
    """Turn 2 brings a new image (the processor writes its compressed count): the vanilla model
    on the whole compressed conversation, scores compared."""
    run = Applied(family)
    model, processor = run.model, run.processor
    a = _inputs(processor, SIZES[:1], (0,))
    c = processor(images=[make_image(300, 900, seed=5)], text=[f"{processor.image_token}\nAnd this one?"],
                  return_tensors="pt", add_special_tokens=False)
    name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    with torch.no_grad():
        first = model.generate(**a, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        ids = torch.cat([first.sequences, c["input_ids"]], dim=1)
        images = {k: v for k, v in c.items() if k not in ("input_ids", "attention_mask")}
        second = dict(max_new_tokens=2, do_sample=False, return_dict_in_generate=True, output_scores=True)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **images, **{name: getattr(first, name)}, **second)
    emb_a, emb_c = globalcom2.compress_images(model, a), globalcom2.compress_images(model, c)

    def reference(m):
        embeds = m.get_input_embeddings()(ids)
        image_id = m.config.image_token_id
        rows = torch.cat([emb_a.embeddings[0], emb_c.embeddings[0]]).to(embeds.dtype)
        mask = ids[0] == image_id
        assert int(mask.sum()) == rows.shape[0]  # the prompt holds exactly the compressed counts
        embeds[0, mask] = rows
        return m.generate(input_ids=ids, inputs_embeds=embeds, attention_mask=torch.ones_like(ids), **second)

    _same_generation(out, run.vanilla(reference), 0)


def test_through_peft_on_the_processor_path():
    peft = pytest.importorskip("peft")
    from globalcom2.tiny import build_tiny_llava_next

    model, processor = build_tiny_llava_next(seed=0)  # its own: PEFT rewrites the modules
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    try:
        globalcom2.apply(wrapped, processor=processor, retention_ratio=0.25)
        inputs = _inputs(processor)
        emb = globalcom2.compress_images(wrapped, inputs)
        with torch.no_grad():
            got = wrapped(**inputs).logits
        globalcom2.remove(wrapped)
        feed = globalcom2.embed_prompt(model, emb, inputs["input_ids"], inputs["attention_mask"])
        with torch.no_grad():
            want = wrapped(**feed).logits
        torch.testing.assert_close(got, want)
        assert not processors.is_patched(processor)
    finally:
        globalcom2.remove(wrapped)
