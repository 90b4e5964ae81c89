"""GlobalCom2 inside vLLM on Idefics3 and SmolVLM: each equals the Hugging Face reference on the
compressed sequence (``count="fixed"``: every view's run its fixed kept count), per-request R and a
single view (``do_image_splitting=False`` per request) included; with GlobalCom2 off each is
vLLM's vanilla result (equal to the vanilla Hugging Face model).

The reference uses the processor vLLM loads from the checkpoint folder (``AutoProcessor``: the
torchvision image processor where torchvision is installed); SmolVLM's is built with the stand-in
for ``num2words`` (videos only), as the plugin builds vLLM's."""

from __future__ import annotations

import copy
import gc

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: its tests run in the vLLM venv of .ci/run")

from transformers import AutoProcessor  # noqa: E402

from globalcom2 import tiny  # noqa: E402
from globalcom2.integrations.vllm import checkpoints  # noqa: E402
from vllm_reference import ENGINE, assert_same, hf_result, make_image, sampling, vllm_result  # noqa: E402

PROMPT = "User:<image>What is in it?<end_of_utterance>\nAssistant:"
#: (height, width, seed, per-request mm_processor_kwargs): a 4 x 3 grid at the engine's R, a 4 x 1
#: grid at R = 0.1, and one view (no split) at R = 0.5.
IMAGES = [
    (500, 700, 1, {}),
    (1200, 300, 2, {"retention_ratio": 0.1}),
    (400, 420, 3, {"retention_ratio": 0.5, "do_image_splitting": False}),
]
ENGINE_R = 0.25


def _processor(model_type, path):
    from globalcom2.models import family_for_model_type

    geo = family_for_model_type(model_type).tiny
    with tiny.video_only_stand_ins(tiny.resolve(geo.processor), geo.video_only_imports):
        return AutoProcessor.from_pretrained(path)


#: (model_type, extra engine settings): the default importance (similarity on the connector's input)
#: on both, and the attention_received ablation (the hidden state entering the tower's last layer).
SETTINGS = [("idefics3", {}), ("smolvlm", {}), ("idefics3", {"importance": "attention_received"})]


@pytest.fixture(scope="module", params=SETTINGS, ids=lambda p: "-".join([p[0], *p[1].values()]))
def family(request, tmp_path_factory):
    from vllm import LLM

    model_type, extra = request.param
    path, model, _ = checkpoints.save_tiny(model_type, tmp_path_factory.mktemp(model_type))
    processor = _processor(model_type, path)
    llm = LLM(model=str(path), hf_overrides={"globalcom2": {"retention_ratio": ENGINE_R, **extra}}, **ENGINE)
    yield processor, model, llm, extra
    del llm
    gc.collect()


def _request(image, mm_kwargs):
    req = {"prompt": PROMPT, "multi_modal_data": {"image": image}}
    if mm_kwargs:
        req["mm_processor_kwargs"] = dict(mm_kwargs)
    return req


def _reference_processor(processor, mm_kwargs):
    if "do_image_splitting" not in mm_kwargs:
        return processor
    out = copy.deepcopy(processor)
    out.image_processor.do_image_splitting = mm_kwargs["do_image_splitting"]
    return out


def test_equals_hf_with_per_request_ratio_and_single_view(family):
    processor, model, llm, extra = family
    # the first image again at another ratio: the processed item and encoder result are not shared
    cases = IMAGES + [(*IMAGES[0][:3], {"retention_ratio": 0.1})]
    images = [make_image(h, w, s) for h, w, s, _ in cases]
    outs = llm.generate([_request(im, kw) for im, (*_, kw) in zip(images, cases)], sampling(), use_tqdm=False)
    for image, (*_, kw), out in zip(images, cases, outs):
        proc = _reference_processor(processor, kw)
        ref = hf_result(model, proc, image, PROMPT, retention_ratio=kw.get("retention_ratio", ENGINE_R), **extra)
        assert_same(vllm_result(out), ref)
        vanilla = proc(images=image, text=PROMPT, return_tensors="pt").input_ids.shape[1]
        assert len(out.prompt_token_ids) < vanilla  # compressed
    assert len(outs[3].prompt_token_ids) < len(outs[0].prompt_token_ids)


@pytest.fixture(scope="module")
def chunked(tmp_path_factory):
    from vllm import LLM

    # Chunked prefill (a step budget far below one image's prompt) and prefix caching on.
    path, model, _ = checkpoints.save_tiny("smolvlm", tmp_path_factory.mktemp("smolvlm_chunked"))
    processor = _processor("smolvlm", path)
    llm = LLM(
        model=str(path), hf_overrides={"globalcom2": {"retention_ratio": 0.5}},
        max_num_batched_tokens=128, enable_prefix_caching=True, **ENGINE,
    )
    yield model, processor, llm
    del llm
    gc.collect()


def test_chunked_prefill_and_prefix_cache(chunked):
    """Each view's run (text between the runs) split over engine steps, then the same prompt again
    from the prefix cache, and once more at another ratio: each equals its reference."""
    model, processor, llm = chunked
    image = make_image(*IMAGES[0][:3])
    cached = []
    for kw in ({}, {}, {"retention_ratio": 0.2}):
        (out,) = llm.generate([_request(image, kw)], sampling(), use_tqdm=False)
        assert len(out.prompt_token_ids) > 128
        cached.append(out.num_cached_tokens or 0)
        assert_same(vllm_result(out), hf_result(model, processor, image, PROMPT, retention_ratio=kw.get("retention_ratio", 0.5)))
    assert cached[1] > 0  # the repeat came from the prefix cache


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def vanilla(request, tmp_path_factory):
    from vllm import LLM

    path, model, _ = checkpoints.save_tiny(request.param, tmp_path_factory.mktemp(f"{request.param}_vanilla"))
    processor = _processor(request.param, path)
    llm = LLM(model=str(path), **ENGINE)
    yield model, processor, llm
    del llm
    gc.collect()


def test_globalcom2_off_is_vanilla(vanilla):
    model, processor, llm = vanilla
    image = make_image(*IMAGES[0][:3])
    (out,) = llm.generate([_request(image, {})], sampling(), use_tqdm=False)
    assert_same(vllm_result(out), hf_result(model, processor, image, PROMPT))


def _model_config(path, **overrides):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(path), **{**ENGINE, **overrides}).create_model_config()


def test_unsupported_settings_are_one_line_errors(tmp_path):
    from vllm import LLM

    from globalcom2.integrations import vllm as plugin

    plugin.register()
    path, _, _ = checkpoints.save_tiny("idefics3", tmp_path / "idefics3")
    with pytest.raises(ValueError) as err:  # Idefics3's layouts: spatial only
        _model_config(path, hf_overrides={"globalcom2": {"layout": "official"}})
    (line,) = [ln for ln in str(err.value).splitlines() if "layout 'official'" in ln]
    assert "Idefics3" in line and "spatial" in line
    with pytest.raises(ValueError, match="count='fixed' only"):
        _model_config(path, hf_overrides={"globalcom2": {"count": "published"}})
    with pytest.raises(ValueError, match="importance='cls' is not available on Idefics3"):  # SigLIP has no [CLS]
        LLM(model=str(path), hf_overrides={"globalcom2": {"importance": "cls"}}, **ENGINE)


def test_info_counts_are_the_fixed_counts(tmp_path):
    """The processing info's image-token count of a size (GlobalCom2 on) is the Hugging Face
    fixed count; vLLM's own with GlobalCom2 off."""
    import globalcom2
    from vllm.multimodal import MULTIMODAL_REGISTRY

    from globalcom2.integrations import vllm as plugin

    plugin.register()
    path, model, _ = checkpoints.save_tiny("smolvlm", tmp_path / "smolvlm")
    processor = _processor("smolvlm", path)
    on = MULTIMODAL_REGISTRY.create_processor(_model_config(path, hf_overrides={"globalcom2": {"retention_ratio": 0.3}}))
    off = MULTIMODAL_REGISTRY.create_processor(_model_config(path))
    for h, w, seed, _ in IMAGES[:2]:
        inputs = processor(images=make_image(h, w, seed), text=PROMPT, return_tensors="pt")
        fixed = globalcom2.compress_images(model, inputs, retention_ratio=0.3, count="fixed").counts[0]
        vanilla = int((inputs.input_ids == model.config.image_token_id).sum())
        assert fixed < vanilla
        for proc, want in ((on, fixed), (off, vanilla)):
            info = proc.info
            assert info.get_num_image_tokens(image_width=w, image_height=h, processor=info.get_hf_processor(), mm_kwargs={}) == want


def test_text_only_engine_with_attention_received(tmp_path):
    """limit_mm_per_prompt image 0 (vLLM leaves the tower out) with the importance module on:
    the engine loads and answers text as the Hugging Face model does."""
    import torch
    from vllm import LLM

    path, model, _ = checkpoints.save_tiny("idefics3", tmp_path / "idefics3")
    processor = _processor("idefics3", path)
    llm = LLM(model=str(path), hf_overrides={"globalcom2": {"importance": "attention_received"}},
              limit_mm_per_prompt={"image": 0}, **ENGINE)
    prompt = "User:What is it?<end_of_utterance>\nAssistant:"
    (out,) = llm.generate([prompt], sampling(), use_tqdm=False)
    ids = processor.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(out.outputs[0].token_ids),
                             do_sample=False)
    assert list(out.prompt_token_ids) == ids[0].tolist()
    assert list(out.outputs[0].token_ids) == ref[0, ids.shape[1]:].tolist()
    del llm
    gc.collect()
