"""A chat turn on the cache a patched ``generate`` returned: the cache may be passed as ``cache``
or ``past_key_values``, and the patched model passes it on under the name the installed
transformers takes, so no deprecation warning comes from globalcom2 (issue 29, point 3)."""

from __future__ import annotations

import warnings

import pytest
import torch

import globalcom2
from globalcom2.models.calls import cache_keyword

PROMPT = "USER: <image>\nWhat is shown? ASSISTANT:"


def _greedy(n):
    return {"do_sample": False, "max_new_tokens": n, "min_new_tokens": n}


def _returned_cache(out):
    return out[cache_keyword()]  # the output's own field: .cache, or .past_key_values on older transformers


@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_a_chat_turn_takes_the_cache_by_either_name_without_a_deprecation_warning(tiny, image_factory, keyword):
    model, processor = tiny
    inputs = processor(images=image_factory(480, 640), text=PROMPT, return_tensors="pt")
    globalcom2.apply(model, retention_ratio=0.25)
    first = model.generate(**inputs, **_greedy(3), return_dict_in_generate=True)
    new = processor.tokenizer(" And the colour? ASSISTANT:", add_special_tokens=False, return_tensors="pt").input_ids
    ids = torch.cat([first.sequences, new], dim=1)
    mask = torch.ones_like(ids)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        turn = model.generate(input_ids=ids, attention_mask=mask, **{keyword: _returned_cache(first)}, **_greedy(4))
    ours = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning)) and "globalcom2" in w.filename]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]
    afresh = model.generate(input_ids=ids, attention_mask=mask, pixel_values=inputs.pixel_values,
                            image_sizes=inputs.image_sizes, **_greedy(4))
    assert torch.equal(turn, afresh)


def test_the_cache_keyword_is_the_one_generate_returns(tiny, image_factory):
    model, processor = tiny
    inputs = processor(images=image_factory(336, 336), text=PROMPT, return_tensors="pt")
    out = model.generate(**inputs, **_greedy(1), return_dict_in_generate=True)
    assert cache_keyword() in out.keys()
