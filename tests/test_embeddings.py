"""Compressed image embeddings (``globalcom2.compress_images`` and friends), on every registered
family and vision-side method: the vanilla model fed them through ``inputs_embeds`` gives the
patched model's logits and tokens; a patched model fed them in place of ``pixel_values`` gives
what it gives with the pixels; files round-trip; the model is left as it was."""

from __future__ import annotations

import copy

import pytest
import torch

import globalcom2
from globalcom2.embeddings import ImageEmbeddings, expand_placeholders, load_embeddings
from globalcom2.methods import language_config, make_config, method_names, vision_config
from globalcom2.models import families

from conftest import family_model, make_image

SIZES = [(480, 640), (300, 900), (1000, 300)]
QUESTIONS = ["What is this?", "Describe it briefly, please.", "hi"]

VISION_METHODS = [m for m in method_names() if language_config(make_config(m)) is None]
CELLS = [
    pytest.param(family, method, layout, id=f"{family.model_type}-{method}-{layout or 'fixed'}")
    for family in families()
    for method in VISION_METHODS
    for layout in (family.layouts if vision_config(make_config(method)).layout_field else (None,))
]
FAMILIES = [pytest.param(f, id=f.model_type) for f in families()]


def _inputs(processor, idx):
    images = [make_image(*SIZES[i], seed=i) for i in idx]
    text = [f"{processor.image_token}\n{QUESTIONS[i]}" for i in idx]
    return processor(images=[[im] for im in images], text=text, return_tensors="pt", padding=True)  # one list per prompt


def _text_only(family, inputs):
    """The processor's output without the image tensors (the prompt, with its placeholders)."""
    return {k: v for k, v in inputs.items() if k != family.pixel_inputs and k not in family.image_inputs}


def _one_placeholder_each(inputs, image_id):
    """The processor's left-padded prompts with every run of placeholders collapsed to one."""
    rows = []
    for ids, mask in zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist()):
        ids = [t for t, m in zip(ids, mask) if m]
        rows.append([t for j, t in enumerate(ids) if t != image_id or j == 0 or ids[j - 1] != image_id])
    width = max(map(len, rows))
    return {
        "input_ids": torch.tensor([[0] * (width - len(r)) + r for r in rows]),
        "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
    }


def _options(layout):
    return {"layout": layout} if layout is not None else {}


@pytest.mark.parametrize("family, method, layout", CELLS)
def test_vanilla_model_on_the_embeddings_is_the_patched_model(family, method, layout):
    model, processor = family_model(family)
    inputs = _inputs(processor, [0, 1])  # two image sizes, left padding
    emb = globalcom2.compress_images(model, inputs, method=method, retention_ratio=0.25, **_options(layout))
    assert not globalcom2.is_applied(model)
    assert len(emb) == 2 and emb.method == method and emb.model_type == family.model_type
    assert all(t.ndim == 2 and t.shape[1] == family.text_config(model.config).hidden_size for t in emb.embeddings)
    assert emb.counts == [p.num_tokens for p in emb.plans]
    assert emb.vanilla_counts == (inputs.input_ids == model.config.image_token_id).sum(1).tolist()

    with torch.no_grad():
        feed = globalcom2.embed_prompt(model, emb, inputs.input_ids, inputs.attention_mask)
        vanilla_logits = model(**feed).logits
        vanilla_tokens = model.generate(**feed, max_new_tokens=4, do_sample=False)
    globalcom2.apply(model, method=method, retention_ratio=0.25, **_options(layout))
    with torch.no_grad():
        patched_logits = model(**inputs).logits
        patched_tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, inputs.input_ids.shape[1]:]
    assert globalcom2.last_stats(model).visual_tokens == emb.counts
    assert torch.equal(vanilla_logits, patched_logits)
    assert torch.equal(vanilla_tokens, patched_tokens)
    for got, want in zip(emb.embeddings, globalcom2.get_family(model).last.tokens):
        assert torch.equal(got, want)


@pytest.mark.parametrize("family, method, layout", CELLS)
def test_patched_model_takes_the_embeddings_for_the_pixels(family, method, layout):
    model, processor = family_model(family)
    globalcom2.apply(model, method=method, retention_ratio=0.25, **_options(layout))
    inputs = _inputs(processor, [1, 2])
    emb = globalcom2.compress_images(model, inputs)  # the applied method
    assert emb.config == globalcom2.get_config(model)
    with torch.no_grad():
        want = model(**inputs).logits
        want_stats = globalcom2.last_stats(model)
        got = model(**_text_only(family, inputs), image_embeddings=emb).logits
    assert torch.equal(got, want)
    assert globalcom2.last_stats(model) == want_stats  # vanilla counts per row included
    gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    gen_emb = model.generate(**_text_only(family, inputs), image_embeddings=emb, max_new_tokens=3, do_sample=False)
    assert torch.equal(gen_emb, gen)  # the caller's prompt given back, the same new tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_one_placeholder_per_image_prompts(family):
    """A prompt with one placeholder per image (its framing, such as InternVL's ``<img>`` ... ``</img>``,
    kept), as serving engines take them."""
    model, processor = family_model(family)
    inputs = _inputs(processor, [0, 2])
    emb = globalcom2.compress_images(model, inputs)
    short = _one_placeholder_each(inputs, model.config.image_token_id)
    # one per image; one per view where the model writes a run per view (Idefics3's tags between them kept)
    each = [1, 1] if emb.runs is None else [len(r) for r in emb.runs]
    assert (short["input_ids"] == model.config.image_token_id).sum(1).tolist() == each
    with torch.no_grad():
        feed = globalcom2.embed_prompt(model, emb, short["input_ids"], short["attention_mask"])
        want = model(**feed).logits
        globalcom2.apply(model, emb.config)
        patched = model(**inputs).logits
        got = model(**short, image_embeddings=emb).logits
    real = feed["attention_mask"].bool()
    assert torch.equal(want[real], patched[real])
    assert torch.equal(got[real], patched[real])
    # stats still count the vanilla model's placeholders of each row
    assert globalcom2.last_stats(model).vanilla_visual_tokens == emb.vanilla_counts


@pytest.mark.parametrize("family", FAMILIES)
def test_repeated_questions_and_chat_turns_reuse_the_embeddings(family):
    model, processor = family_model(family)
    globalcom2.apply(model, retention_ratio=0.25)
    first = _inputs(processor, [0])
    emb = globalcom2.compress_images(model, first)
    encodes = []
    adapter = globalcom2.get_family(model)
    original_encode = adapter.encode
    adapter.encode = lambda *a, **k: encodes.append(1) or original_encode(*a, **k)
    try:
        # a second question about the same image: no vision tower, the answer the pixels give
        again = processor(images=[make_image(*SIZES[0], seed=0)], text=[f"{processor.image_token}\nhi"], return_tensors="pt")
        out_emb = model.generate(**_text_only(family, again), image_embeddings=emb, max_new_tokens=3, do_sample=False,
                                 return_dict_in_generate=True)
        assert encodes == []
        out_pix = model.generate(**again, max_new_tokens=3, do_sample=False)
        assert encodes == [1]
        assert torch.equal(out_emb.sequences, out_pix)
        # the next chat turn continues the compressed cache of the embeddings call
        follow = processor.tokenizer(" And then?", return_tensors="pt", add_special_tokens=False).input_ids
        ids = torch.cat([out_emb.sequences, follow], dim=1)
        turn = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=out_emb.past_key_values,
                              image_embeddings=emb, max_new_tokens=3, do_sample=False)
        assert encodes == [1]
    finally:
        adapter.encode = original_encode
    fresh = {**again, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert torch.equal(turn, model.generate(**fresh, max_new_tokens=3, do_sample=False))


@pytest.mark.parametrize("family", FAMILIES)
def test_compress_images_touches_no_model_state(family):
    model, processor = family_model(family)
    globalcom2.apply(model, retention_ratio=0.5)
    inputs = _inputs(processor, [0])
    with torch.no_grad():
        model(**inputs)
    adapter = globalcom2.get_family(model)
    last, stats = adapter.last, adapter.stats
    params = {k: v.clone() for k, v in model.state_dict().items()}
    keys = set(model.__dict__)
    hooks = [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()]
    with torch.enable_grad():
        emb = globalcom2.compress_images(model, _inputs(processor, [1, 2]), retention_ratio=0.25)
    assert all(not t.requires_grad and t.grad_fn is None for t in emb.embeddings)
    assert adapter.last is last and adapter.stats is stats
    assert globalcom2.get_config(model).retention_ratio == 0.5
    assert set(model.__dict__) == keys
    assert [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()] == hooks
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())


def test_compress_images_refuses_what_it_cannot_do(tiny):
    model, processor = tiny
    inputs = processor(images=[make_image(300, 400)], text=[f"{processor.image_token}\nhi"], return_tensors="pt")
    with pytest.raises(ValueError, match="prunes inside the language model.*method='globalcom2'"):
        globalcom2.compress_images(model, inputs, method="globalcom2+fastv")
    with pytest.raises(ValueError, match="vision-side method"):
        globalcom2.compress_images(model, inputs, method="fastv")
    with pytest.raises(ValueError, match="pixel_values"):
        globalcom2.compress_images(model, {"input_ids": inputs.input_ids})
    with pytest.raises(ValueError, match="retention_ratio"):
        globalcom2.compress_images(model, inputs, retention_ratio=2.0)
    with pytest.raises(ValueError, match="does not support"):
        globalcom2.compress_images(torch.nn.Linear(2, 2), inputs)


def test_patched_model_refuses_mismatched_embeddings(tiny):
    model, processor = tiny
    inputs = processor(images=[make_image(300, 400)], text=[f"{processor.image_token}\nhi"], return_tensors="pt")
    emb = globalcom2.compress_images(model, inputs)
    globalcom2.apply(model)
    with pytest.raises(ValueError, match="either pixel_values or image_embeddings"):
        model(**inputs, image_embeddings=emb)
    with pytest.raises(ValueError, match="must be ImageEmbeddings"):
        model(input_ids=inputs.input_ids, image_embeddings=emb.embeddings)
    with pytest.raises(ValueError, match=r"holds 3 image placeholder tokens"):
        model(input_ids=torch.full((1, 3), model.config.image_token_id), image_embeddings=emb)
    other = copy.copy(emb)
    other.model_type = "llava_onevision"
    with pytest.raises(ValueError, match="come from a 'llava_onevision' model"):
        model(input_ids=inputs.input_ids, image_embeddings=other)
    wide = emb.to(dtype=torch.float32)
    wide.embeddings = [torch.zeros(t.shape[0], t.shape[1] + 1) for t in emb.embeddings]
    with pytest.raises(ValueError, match="wide"):
        model(input_ids=inputs.input_ids, image_embeddings=wide)
    labels = processor.tokenizer([f"{processor.image_token}\nhi"], return_tensors="pt").input_ids
    with pytest.raises(ValueError, match="labels need"):
        model(input_ids=labels, labels=labels, image_embeddings=emb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_files_round_trip(tiny, tmp_path, dtype):
    model, processor = tiny
    inputs = _inputs(processor, [0, 1, 2])
    emb = globalcom2.compress_images(model, inputs, retention_ratio=0.3, layout="spatial").to(dtype=dtype)
    emb.images = ["a.jpg", "b.jpg", "c.png"]
    path = emb.save(tmp_path / "emb.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["emb.safetensors"]  # no temporary left
    back = load_embeddings(path)
    assert back.counts == emb.counts and back.vanilla_counts == emb.vanilla_counts
    assert back.config == emb.config and back.method == "globalcom2"
    assert back.model_type == "llava_next" and back.image_token_id == model.config.image_token_id
    assert back.images == emb.images and back.plans is None
    assert all(b.dtype == dtype and torch.equal(b, a) for a, b in zip(emb.embeddings, back.embeddings))
    assert ImageEmbeddings.load(path).counts == emb.counts
    assert repr(back) == (
        f"ImageEmbeddings(3 image(s), counts={emb.counts}, vanilla_counts={emb.vanilla_counts}, method='globalcom2', "
        f"model_type='llava_next', hidden_size={model.config.text_config.hidden_size}, dtype={str(dtype)[6:]})"
    )
    # what was read back drives the model as the original embeddings do
    globalcom2.apply(model)
    with torch.no_grad():
        a = model(**_text_only(families()[0], inputs), image_embeddings=emb.to(dtype=torch.float32)).logits
        b = model(**_text_only(families()[0], inputs), image_embeddings=back.to(dtype=torch.float32)).logits
    assert torch.equal(a, b)


def test_reading_bad_files(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="no such embeddings file"):
        load_embeddings(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read"):
        load_embeddings(tmp_path / "junk.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a globalcom2 image-embeddings file"):
        load_embeddings(tmp_path / "other.safetensors")


def test_a_failed_save_leaves_nothing(tiny, tmp_path, monkeypatch):
    import safetensors.torch

    model, processor = tiny
    emb = globalcom2.compress_images(model, _inputs(processor, [0]))
    target = tmp_path / "emb.safetensors"
    target.write_bytes(b"old")

    def boom(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        emb.save(target)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["emb.safetensors"]


@pytest.mark.parametrize("side", ["left", "right"])
def test_expand_placeholders(side):
    p, t = 0, 9  # pad id, image id
    if side == "left":
        ids = torch.tensor([[p, p, 5, t, 6], [7, t, 8, t, 4]])
        mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    else:
        ids = torch.tensor([[5, t, 6, p, p], [7, t, 8, t, 4]])
        mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out, out_mask = expand_placeholders(ids, t, [3, 1, 2], attention_mask=mask, pad_token_id=p)
    rows = [[5, t, t, t, 6], [7, t, 8, t, t, 4]]
    for r, row in enumerate(rows):
        real = out[r][out_mask[r].bool()].tolist()
        assert real == row
    assert out.shape == (2, 6)
    if side == "left":
        assert out_mask[0].tolist() == [0, 1, 1, 1, 1, 1]
    else:
        assert out_mask[0].tolist() == [1, 1, 1, 1, 1, 0]
    same, none = expand_placeholders(torch.tensor([[1, t, 2]]), t, [2])
    assert same.tolist() == [[1, t, t, 2]] and none is None
    with pytest.raises(ValueError, match="one image placeholder per image"):
        expand_placeholders(ids, t, [1, 1])
