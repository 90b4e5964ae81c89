"""GlobalCom2 inside vLLM on Command A Vision (``Cohere2VisionForConditionalGeneration``): equal to the
Hugging Face reference on the compressed sequence (``count="fixed"``: every view's run its fixed
kept count), per-request R, a single view and per-request image-processor settings included, with
the default importance (similarity) and the ``attention_received`` ablation; with GlobalCom2 off
vLLM's vanilla result (equal to the vanilla Hugging Face model).

The reference uses the processor vLLM loads from the checkpoint folder (``AutoProcessor``: the stock
torchvision ``Cohere2VisionImageProcessor``), not the tiny model's PIL one."""

from __future__ import annotations

import copy
import gc

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: its tests run in the vLLM venv of .ci/run")

import torch  # noqa: E402
from transformers import AutoProcessor  # noqa: E402

from globalcom2.core import tiles  # noqa: E402
from globalcom2.integrations.vllm import checkpoints  # noqa: E402
from vllm_reference import ENGINE, assert_same, hf_result, make_image, sampling, vllm_result  # noqa: E402

MODEL_TYPE = "cohere2_vision"
PROMPT = "User: <|IMG_PATCH|>\nWhat is in it?\nAssistant:"
ENGINE_R = 0.25
#: (height, width, seed, per-request mm_processor_kwargs): 1 x 2 tiles at the engine's R, 3 x 1 at
#: R = 0.1, one view (the image fits one tile) at R = 0.5, 2 x 4 tiles at the engine's R, and a large
#: image made one view by the request (crop_to_patches False) and one of at most 3 tiles (max_patches).
IMAGES = [
    (500, 700, 1, {}),
    (1200, 300, 2, {"retention_ratio": 0.1}),
    (400, 420, 3, {"retention_ratio": 0.5}),
    (900, 1800, 4, {}),
    (900, 1800, 5, {"retention_ratio": 0.3, "crop_to_patches": False}),
    (700, 1500, 6, {"max_patches": 3}),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path, model, _ = checkpoints.save_tiny(MODEL_TYPE, tmp_path_factory.mktemp(MODEL_TYPE))
    return path, model, AutoProcessor.from_pretrained(path)


def _engine(path, **kwargs):
    from vllm import LLM

    return LLM(model=str(path), **{**ENGINE, **kwargs})


#: Extra engine settings: the default importance (similarity on the projector's input) and the
#: attention_received ablation (the hidden state entering SigLIP's last layer, captured while it runs).
SETTINGS = [{}, {"importance": "attention_received"}]


@pytest.fixture(scope="module", params=SETTINGS, ids=lambda p: "-".join(p.values()) or "default")
def engine(request, checkpoint):
    path, model, processor = checkpoint
    llm = _engine(path, hf_overrides={"globalcom2": {"retention_ratio": ENGINE_R, **request.param}})
    yield model, processor, llm, request.param
    del llm
    gc.collect()


def _request(image, mm_kwargs):
    req = {"prompt": PROMPT, "multi_modal_data": {"image": image}}
    if mm_kwargs:
        req["mm_processor_kwargs"] = dict(mm_kwargs)
    return req


def _reference_processor(processor, mm_kwargs):
    """The processor with the request's image-processor settings (the Hugging Face reference's)."""
    settings = {k: v for k, v in mm_kwargs.items() if k != "retention_ratio"}
    if not settings:
        return processor
    out = copy.deepcopy(processor)
    for k, v in settings.items():
        setattr(out.image_processor, k, v)
    return out


def test_equals_hf_with_per_request_ratio_and_single_view(engine):
    model, processor, llm, extra = engine
    # the first image again at another ratio: the processed item and encoder result are not shared
    cases = IMAGES + [(*IMAGES[0][:3], {"retention_ratio": 0.1})]
    images = [make_image(h, w, s) for h, w, s, _ in cases]
    outs = llm.generate([_request(im, kw) for im, (*_, kw) in zip(images, cases)], sampling(), use_tqdm=False)
    views = []
    for image, (*_, kw), out in zip(images, cases, outs):
        proc = _reference_processor(processor, kw)
        ref = hf_result(model, proc, image, PROMPT, retention_ratio=kw.get("retention_ratio", ENGINE_R), **extra)
        assert_same(vllm_result(out), ref)
        inputs = proc(images=image, text=PROMPT, return_tensors="pt")
        views.append(int(inputs.pixel_values.shape[0]))
        assert len(out.prompt_token_ids) < inputs.input_ids.shape[1]  # compressed
    assert views[2] == 1 and views[4] == 1 and views[5] == 4 and min(views[:2]) > 1  # single views, max_patches 3
    assert len(outs[-1].prompt_token_ids) < len(outs[0].prompt_token_ids)


@pytest.fixture(scope="module")
def vanilla(checkpoint):
    path, model, processor = checkpoint
    llm = _engine(path)
    yield model, processor, llm
    del llm
    gc.collect()


def test_globalcom2_off_is_vanilla(vanilla):
    model, processor, llm = vanilla
    for h, w, s, _ in IMAGES[:3:2]:
        image = make_image(h, w, s)
        (out,) = llm.generate([_request(image, {})], sampling(), use_tqdm=False)
        assert_same(vllm_result(out), hf_result(model, processor, image, PROMPT))


@pytest.fixture(scope="module")
def chunked(checkpoint):
    # Chunked prefill (a step budget far below one image's prompt) and prefix caching on.
    path, model, processor = checkpoint
    llm = _engine(path, hf_overrides={"globalcom2": {"retention_ratio": 0.5}}, max_num_batched_tokens=128,
                  enable_prefix_caching=True)
    yield model, processor, llm
    del llm
    gc.collect()


def test_chunked_prefill_and_prefix_cache(chunked):
    """Each view's run (line breaks between the runs) split over engine steps, then the same prompt
    again from the prefix cache, and once more at another ratio: each equals its reference."""
    model, processor, llm = chunked
    image = make_image(*IMAGES[0][:3])
    cached = []
    for kw in ({}, {}, {"retention_ratio": 0.2}):
        (out,) = llm.generate([_request(image, kw)], sampling(), use_tqdm=False)
        assert len(out.prompt_token_ids) > 128
        cached.append(out.num_cached_tokens or 0)
        assert_same(vllm_result(out), hf_result(model, processor, image, PROMPT, retention_ratio=kw.get("retention_ratio", 0.5)))
    assert cached[1] > 0  # the repeat came from the prefix cache


def _model_config(path, **overrides):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(path), **{**ENGINE, **overrides}).create_model_config()


def test_unsupported_settings_are_one_line_errors(checkpoint):
    from globalcom2.integrations import vllm as plugin

    plugin.register()
    path = checkpoint[0]
    with pytest.raises(ValueError) as err:  # Command A Vision's layouts: spatial only
        _model_config(path, hf_overrides={"globalcom2": {"layout": "official"}})
    (line,) = [ln for ln in str(err.value).splitlines() if "layout 'official'" in ln]
    assert "Command A Vision" in line and "spatial" in line
    with pytest.raises(ValueError, match="count='fixed' only"):
        _model_config(path, hf_overrides={"globalcom2": {"count": "published"}})
    with pytest.raises(ValueError) as err:  # SigLIP has no [CLS]
        _engine(path, hf_overrides={"globalcom2": {"importance": "cls"}})
    (line,) = [ln for ln in str(err.value).splitlines() if "importance='cls'" in ln]
    assert "is not available on Command A Vision" in line


def test_processor_grids_and_counts(checkpoint):
    """The processor's tile grid per image is the arrangement the pixels show (the tiles' mosaic
    against the thumbnail), request settings included; the prompt's image tokens are the Hugging
    Face fixed count; the encoder budget per image is the vanilla maximum (any request's R <= 1)."""
    import globalcom2
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing.context import TimingContext
    from vllm.multimodal.processing.inputs import ProcessorInputs

    from globalcom2.integrations import vllm as plugin
    from globalcom2.integrations.vllm.cohere2_vision import GRID_FIELD

    plugin.register()
    path, model, processor = checkpoint
    on = MULTIMODAL_REGISTRY.create_processor(_model_config(path, hf_overrides={"globalcom2": {"retention_ratio": 0.3}}))
    prompt = on.info.get_tokenizer().encode(PROMPT, add_special_tokens=False)
    for h, w, s, kw in IMAGES:
        kw = {k: v for k, v in kw.items() if k != "retention_ratio"}
        image = make_image(h, w, s)
        request = ProcessorInputs(prompt=prompt, mm_data_items=on.info.parse_mm_data({"image": [image]}), hf_processor_mm_kwargs=kw)
        out = on.apply(request, TimingContext(enabled=False))
        item = out["mm_kwargs"]["image"][0]
        grid = tuple(item[GRID_FIELD].data.tolist())
        pixels = item["pixel_values"].data
        views = pixels.shape[0]
        if views == 1:
            assert grid == (0, 0)
        else:
            assert grid[0] > 0 and 1 + grid[0] * grid[1] == views
            assert grid == tuple(tiles.infer_tile_grid(pixels[:-1], pixels[-1], tiles.factor_grids(views - 1)))
        inputs = _reference_processor(processor, kw)(images=image, text=PROMPT, return_tensors="pt")
        fixed = globalcom2.compress_images(model, inputs, retention_ratio=0.3, count="fixed").counts[0]
        assert sum(t == model.config.image_token_id for t in out["prompt_token_ids"]) == fixed
    budget = on.info.get_mm_max_tokens_per_item(4096, {"image": 1})
    assert budget == {"image": 13 * 256}  # 12 tiles and the thumbnail, 256 tokens each


def test_grids_from_pixels_without_the_field():
    """The model reads an image's arrangement from its pixels where the processor gave none (or -1)."""
    from globalcom2.integrations.vllm.cohere2_vision import GlobalCom2Cohere2VisionForConditionalGeneration as M

    torch.manual_seed(0)
    thumb = torch.rand(3, 8, 8)
    big = torch.nn.functional.interpolate(thumb[None], size=(16, 24), mode="bilinear", align_corners=False)[0]
    crops = [big[:, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] for r in range(2) for c in range(3)]
    pixels = torch.stack(crops + [thumb, torch.rand(3, 8, 8)])
    want = [(2, 3), (0, 0)]
    assert M._globalcom2_grids(None, [7, 1], pixels) == want
    assert M._globalcom2_grids(torch.tensor([[-1, 6], [0, 0]]), [7, 1], pixels) == want
    assert M._globalcom2_grids(torch.tensor([[2, 3], [0, 0]]), [7, 1], pixels) == want


def test_text_only_engine_with_attention_received(checkpoint):
    """limit_mm_per_prompt image 0 (vLLM leaves the tower out) with the importance module on: the
    engine loads and answers text as the Hugging Face model does."""
    path, model, processor = checkpoint
    llm = _engine(path, hf_overrides={"globalcom2": {"importance": "attention_received"}}, limit_mm_per_prompt={"image": 0})
    prompt = "User: What is it?\nAssistant:"
    (out,) = llm.generate([prompt], sampling(), use_tqdm=False)
    ids = processor.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(out.outputs[0].token_ids),
                             do_sample=False)
    assert list(out.prompt_token_ids) == ids[0].tolist()
    assert list(out.outputs[0].token_ids) == ref[0, ids.shape[1]:].tolist()
    del llm
    gc.collect()
