"""GlobalCom2 inside vLLM on granite-vision-shaped LLaVA-NeXT (a SigLIP tower without [CLS],
``vision_feature_select_strategy="full"``, several feature layers concatenated): equal to the
Hugging Face reference on the compressed sequence (``count="fixed"``), per-request R included, with
the default importance (``similarity`` on vLLM's own concatenated features) and the
``attention_received`` ablation; vanilla vLLM equals vanilla Hugging Face on the same checkpoint
(the features are the same); ``importance="cls"`` refused in one line."""

from __future__ import annotations

import gc

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: its tests run in the vLLM venv of .ci/run")

from transformers import AutoProcessor  # noqa: E402

from globalcom2 import tiny  # noqa: E402
from globalcom2.integrations.vllm import checkpoints  # noqa: E402
from globalcom2.models.llava_next import LlavaNextFamily  # noqa: E402
from vllm_reference import ENGINE, assert_same, hf_result, make_image, sampling, vllm_result  # noqa: E402

PROMPT = "<image>\nWhat is it?"
#: (h, w, seed): a 2 x 2 grid, a 4 x 1 grid, a 1 x 1 grid (thumbnail + one crop).
SIZES = [(500, 700, 1), (1200, 300, 2), (300, 300, 3)]


def _save(path, seed=0, **options):
    tok = tiny.build_tokenizer("llava_next")
    text = {**checkpoints.TINY_TEXT, "logits_scaling": 1.0}
    config = tiny.build_config("llava_next", tok, text=text, granite=True, **options)
    model = tiny.build_model("llava_next", config, tok.pad_token_id, seed=seed)
    path = checkpoints.save(model, LlavaNextFamily.tiny_granite_processor(tok), path)
    return path, model, AutoProcessor.from_pretrained(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(folder, model, processor): the tiny granite-shaped checkpoint (head_dim 32 for vLLM's CPU
    attention). ``logits_scaling`` 1: Hugging Face's LLaVA-NeXT computes the logits with its own
    ``lm_head`` and never divides them by the Granite text config's ``logits_scaling`` (8 on
    granite-vision), vLLM's Granite does; the greedy tokens agree, the log-probabilities would not
    (a difference of the two vanilla engines, not of GlobalCom2)."""
    return _save(tmp_path_factory.mktemp("granite"))


def _llm(path, overrides):
    from vllm import LLM

    return LLM(model=str(path), hf_overrides=overrides, **ENGINE)


@pytest.mark.parametrize("extra", [{}, {"importance": "attention_received"}], ids=["similarity", "attention_received"])
def test_granite_equals_hf_with_per_request_ratio(ckpt, extra):
    path, model, processor = ckpt
    llm = _llm(path, {"globalcom2": {"retention_ratio": 0.25, **extra}})
    try:
        images = [make_image(h, w, s) for h, w, s in SIZES]
        ratios = [None, 0.1, None]
        requests = []
        for image, r in zip(images, ratios):
            req = {"prompt": PROMPT, "multi_modal_data": {"image": image}}
            if r is not None:
                req["mm_processor_kwargs"] = {"retention_ratio": r}
            requests.append(req)
        outs = llm.generate(requests, sampling(), use_tqdm=False)
        for image, r, out in zip(images, ratios, outs):
            assert_same(vllm_result(out), hf_result(model, processor, image, PROMPT, retention_ratio=r or 0.25, **extra))
    finally:
        del llm
        gc.collect()


def test_vanilla_vllm_equals_vanilla_hf(ckpt):
    path, model, processor = ckpt
    llm = _llm(path, None)
    try:
        image = make_image(*SIZES[0])
        (out,) = llm.generate([{"prompt": PROMPT, "multi_modal_data": {"image": image}}], sampling(), use_tqdm=False)
        assert_same(vllm_result(out), hf_result(model, processor, image, PROMPT))
    finally:
        del llm
        gc.collect()


def test_cls_is_refused_in_one_line(ckpt):
    with pytest.raises(ValueError) as err:
        _llm(ckpt[0], {"globalcom2": {"retention_ratio": 0.25, "importance": "cls"}})
    lines = [ln for ln in str(err.value).splitlines() if "importance='cls'" in ln]
    assert lines and "'full'" in lines[0]
    gc.collect()


def test_feature_layers_without_the_last_one(tmp_path):
    """vLLM builds the tower only up to the deepest feature layer: similarity on its concatenated
    features equals the reference; attention_received (the last layer's input) is refused in one line."""
    path, model, processor = _save(tmp_path / "short", vision_feature_layer=[-4, -3, -2])
    llm = _llm(path, {"globalcom2": {"retention_ratio": 0.25}})
    try:
        image = make_image(*SIZES[0])
        (out,) = llm.generate([{"prompt": PROMPT, "multi_modal_data": {"image": image}}], sampling(), use_tqdm=False)
        assert_same(vllm_result(out), hf_result(model, processor, image, PROMPT, retention_ratio=0.25))
    finally:
        del llm
        gc.collect()
    with pytest.raises(ValueError) as err:
        _llm(path, {"globalcom2": {"retention_ratio": 0.25, "importance": "attention_received"}})
    lines = [ln for ln in str(err.value).splitlines() if "attention_received" in ln]
    assert lines and "vision_feature_layer" in lines[0]
    gc.collect()
