"""Families on the older ``transformers`` releases of the supported range (5.18 on), where their
models differ from the current one:

* Llama 4 before 5.25 projects its image features in the model's forward (``get_image_features``
  returns the tower's output): the family projects them and hands the kept rows over as
  ``inputs_embeds``;
* Idefics3 before 5.21 casts ``pooler_output`` as one tensor: the family joins the rows
  (``Family.joins_image_rows``);
* SmolVLM before 5.21 cuts the rows into fixed-length views, and Phi-4's processor before 5.23
  writes its counts in its own ``__call__``: refused in one line (``Family.min_transformers`` /
  ``min_transformers_processor``).

The refusals are checked everywhere (the version string stood in); the models themselves run where
an older transformers is installed: ``.ci/run`` runs this file in the vLLM venv (transformers 5.19).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from packaging.version import Version

import globalcom2
from globalcom2.methods import GlobalCom2Config
from globalcom2.models import base, family_for_model_type

from conftest import family_model, make_image

INSTALLED = Version(Version(transformers.__version__).base_version)


def _inputs(processor, sizes, text="\nWhat is here?"):
    images = [make_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    prompt = processor.image_token * len(images) + text
    nested = [images] if "Idefics3" in type(processor).__name__ or "SmolVLM" in type(processor).__name__ else images
    return processor(images=nested, text=[prompt], return_tensors="pt")


@pytest.mark.parametrize(("model_type", "processor", "need"), [("smolvlm", False, "5.21"), ("phi4_multimodal", True, "5.23")])
def test_older_releases_are_refused_in_one_line(monkeypatch, model_type, processor, need):
    family = family_for_model_type(model_type)
    model, proc = family_model(family)
    monkeypatch.setattr(base, "transformers_version", lambda: "5.19.0")
    with pytest.raises(RuntimeError) as err:
        globalcom2.apply(model, retention_ratio=0.25, processor=proc if processor else None)
    assert f"needs transformers>={need}, but 5.19.0 is installed" in str(err.value) and "\n" not in str(err.value)
    assert not globalcom2.is_applied(model)
    monkeypatch.setattr(base, "transformers_version", lambda: need + ".0")
    globalcom2.apply(model, retention_ratio=0.25, processor=proc if processor else None)
    globalcom2.remove(model)


@pytest.mark.skipif(INSTALLED >= Version("5.25"), reason="needs a transformers older than 5.25 (the vLLM venv's 5.19 in .ci/run)")
@pytest.mark.parametrize("model_type", ["llama4", "idefics3"])
def test_keep_all_is_vanilla_and_a_ratio_generates_on_this_older_release(model_type):
    model, processor = family_model(family_for_model_type(model_type))
    inputs = _inputs(processor, [(500, 900), (300, 300)])
    with torch.no_grad():
        vanilla = model(**inputs).logits
        globalcom2.apply(model, GlobalCom2Config.keep_all(layout="spatial"))
        assert torch.equal(model(**inputs).logits, vanilla)
        globalcom2.remove(model)
        globalcom2.apply(model, retention_ratio=0.25)
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(out[:, : inputs.input_ids.shape[1]], inputs.input_ids)  # the caller's prompt
    assert sum(globalcom2.last_stats(model).visual_tokens) < int((inputs.input_ids == model.config.image_token_id).sum())
    globalcom2.remove(model)


def test_encoding_alone_is_not_refused_on_an_older_release(monkeypatch):
    """``compress_images`` (and the vLLM plugin, which runs vLLM's forward) need no patched forward: an
    older release that ``apply`` refuses for SmolVLM still encodes and compresses (the vLLM tests' Hugging
    Face reference does this on 5.19)."""
    family = family_for_model_type("smolvlm")
    model, processor = family_model(family)
    monkeypatch.setattr(base, "transformers_version", lambda: "5.19.0")
    emb = globalcom2.compress_images(model, _inputs(processor, [(500, 900)]), retention_ratio=0.25, count="fixed")
    assert sum(e.shape[0] for e in emb.embeddings) == sum(family.counter(model.config, emb.config).count_visual_tokens([(500, 900)], processor=processor))
