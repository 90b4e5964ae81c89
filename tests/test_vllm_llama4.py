"""GlobalCom2 inside vLLM on Llama 4 (``integrations/vllm/llama4.py``): the vLLM result equals the
Hugging Face reference on the compressed sequence (``count="fixed"``) token for token, per-request R
included, on tiled images of two aspect ratios and a one-tile image; the ``similarity`` and
``attention_received`` ablations alike; without the ``"globalcom2"`` entry the engine is vanilla vLLM (equal to the vanilla Hugging
Face model).

vLLM's Llama 4 processor is the stock ``Llama4ImageProcessor`` (torchvision, in the vLLM venv), which
the saved tiny checkpoint names: the reference loads the same one. It rescales and normalises in
bfloat16 (as Meta's code) and the Hugging Face model does not cast its input, so the reference casts
the pixels to the model's float32, as vLLM does.

transformers before 5.2x (the vLLM venv has 5.19) returns the tower's output from Llama 4's
``get_image_features`` and projects it in the forward; the family reads the projected features from
``pooler_output`` (5.25): :func:`projected_image_features` gives the reference model that (a no-op
where transformers already does)."""

from __future__ import annotations

import functools
import gc

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: its tests run in the vLLM venv of .ci/run")

from transformers import AutoProcessor  # noqa: E402

from globalcom2.integrations.vllm import checkpoints  # noqa: E402
from vllm_reference import ENGINE, assert_same, hf_result, make_image, sampling, vllm_result  # noqa: E402

PROMPT = "user: <|image|>\nWhat is it? assistant:"
#: (height, width, seed): 2 x 3 tiles, 4 x 1 tiles, one tile (no global tile).
SIZES = [(500, 700, 1), (1200, 300, 2), (300, 300, 3)]
#: Per request: None = the engine's 0.25; 1.0 keeps every token (the vanilla sequence).
RATIOS = [None, 0.1, 0.6]

#: None: GlobalCom2 off (vanilla vLLM); else the engine's settings (default importance, an ablation).
SETTINGS = [None, {}, {"importance": "similarity"}, {"importance": "attention_received"}]


class Float32Pixels:
    """The checkpoint's processor with its pixels in the model's float32 (what vLLM feeds the model)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, *args, **kwargs):
        out = self.processor(*args, **kwargs)
        out["pixel_values"] = out["pixel_values"].float()
        return out


def projected_image_features(model):
    """``get_image_features`` with ``pooler_output`` = the projector on the tower's output
    where transformers leaves it None (on this instance only; the vanilla forward reads ``last_hidden_state``)."""
    inner = getattr(model, "model", model)  # transformers 5.19: the tower and projector sit on the model itself
    original = inner.get_image_features

    @functools.wraps(original)  # generate reads its signature
    def get_image_features(*args, **kwargs):
        out = original(*args, **kwargs)
        if getattr(out, "pooler_output", None) is None:
            out.pooler_output = inner.multi_modal_projector(out.last_hidden_state)
        return out

    inner.get_image_features = get_image_features
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path, model, _ = checkpoints.save_tiny("llama4", tmp_path_factory.mktemp("llama4"))
    return path, projected_image_features(model), Float32Pixels(AutoProcessor.from_pretrained(path))


@pytest.fixture(scope="module", params=SETTINGS, ids=lambda p: "vanilla" if p is None else "-".join(["globalcom2", *p.values()]))
def engine(request, checkpoint):
    from vllm import LLM

    settings = request.param
    path, model, processor = checkpoint
    overrides = {} if settings is None else {"hf_overrides": {"globalcom2": {"retention_ratio": 0.25, **settings}}}
    llm = LLM(model=str(path), **overrides, **ENGINE)
    yield settings, model, processor, llm
    del llm
    gc.collect()


def _requests(ratios):
    out = []
    for (h, w, seed), r in zip(SIZES, ratios):
        req = {"prompt": PROMPT, "multi_modal_data": {"image": make_image(h, w, seed)}}
        if r is not None:
            req["mm_processor_kwargs"] = {"retention_ratio": r}
        out.append(req)
    return out


def test_llama4_equals_hf(engine):
    settings, model, processor, llm = engine
    ratios = [None] * len(SIZES) if settings is None else RATIOS
    requests = _requests(ratios)
    outs = llm.generate(requests, sampling(), use_tqdm=False)
    for req, r, out in zip(requests, ratios, outs):
        image = req["multi_modal_data"]["image"]
        if settings is None:
            expected = hf_result(model, processor, image, PROMPT)
        else:
            expected = hf_result(model, processor, image, PROMPT, retention_ratio=r or 0.25, **settings)
        assert_same(vllm_result(out), expected)
    if settings is not None:  # R = 1 keeps every token: the vanilla prompt and answer
        full = llm.generate(_requests([1.0] * len(SIZES))[:1], sampling(), use_tqdm=False)[0]
        assert_same(vllm_result(full), hf_result(model, processor, requests[0]["multi_modal_data"]["image"], PROMPT))
    if settings == {}:  # two images of different grids in one prompt, at the request's ratio
        images = [make_image(h, w, s) for h, w, s in SIZES[1::-1]]
        prompt = "user: <|image|> and <|image|>\nWhich? assistant:"
        req = {"prompt": prompt, "multi_modal_data": {"image": images}, "mm_processor_kwargs": {"retention_ratio": 0.3}}
        both = llm.generate([req], sampling(), use_tqdm=False)[0]
        assert_same(vllm_result(both), hf_result(model, processor, images, prompt, retention_ratio=0.3))


def test_settings_checked_at_engine_creation_and_profile_bound(checkpoint):
    """Unsupported settings fail when vLLM creates the model config, in one line; the encoder profile
    is bounded by every token kept (any request's ratio may reach 1), not by the engine's ratio."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.multimodal import MULTIMODAL_REGISTRY

    from globalcom2.integrations import vllm as plugin
    from globalcom2.models import family_for_model_type

    plugin.register()
    path, model, _ = checkpoint

    def model_config(**settings):
        return EngineArgs(model=str(path), hf_overrides={"globalcom2": settings}, **ENGINE).create_model_config()

    with pytest.raises(ValueError) as err:
        model_config(layout="official")
    (line,) = [ln for ln in str(err.value).splitlines() if "official" in ln]
    assert "spatial" in line
    with pytest.raises(ValueError, match="count='fixed' only"):
        model_config(count="published")
    info = MULTIMODAL_REGISTRY.create_processor(model_config(retention_ratio=0.1)).info
    most = family_for_model_type("llama4").max_visual_tokens(model.config)  # 16 tiles + the global tile
    assert info.get_mm_max_tokens_per_item(4096, {"image": 1}) == {"image": most}


def test_text_only_engine_loads_and_answers(checkpoint):
    """With the tower left out (``limit_mm_per_prompt={"image": 0}``), GlobalCom2 on still loads the
    checkpoint (the importance module is left out with the tower) and answers as the Hugging Face model."""
    import torch
    from vllm import LLM

    path, model, _ = checkpoint
    llm = LLM(model=str(path), hf_overrides={"globalcom2": {"retention_ratio": 0.25}}, limit_mm_per_prompt={"image": 0}, **ENGINE)
    try:
        ids, tokens, _ = vllm_result(llm.generate(["user: hello assistant:"], sampling(), use_tqdm=False)[0])
    finally:
        del llm
        gc.collect()
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=len(tokens), do_sample=False)
    assert out[0, len(ids):].tolist() == tokens
