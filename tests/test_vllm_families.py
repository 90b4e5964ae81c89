"""GlobalCom2 inside vLLM on LLaVA-OneVision and InternVL (issue 24, contract 5): each equals the
Hugging Face reference on the compressed sequence (``count="fixed"``), per-request R included.

The reference uses the processor vLLM loads from the checkpoint folder (``AutoProcessor``: for
InternVL the torchvision image processor, whose pixels differ slightly from the PIL one's)."""

from __future__ import annotations

import gc

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: its tests run in the vLLM venv of .ci/run")

from transformers import AutoProcessor  # noqa: E402

from globalcom2.integrations.vllm import checkpoints  # noqa: E402
from vllm_reference import ENGINE, assert_same, hf_result, make_image, sampling, vllm_result  # noqa: E402

FAMILIES = {
    # model_type: (prompt with the engine's image placeholder, image sizes (h, w, seed))
    "llava_onevision": (
        "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n",
        [(500, 700, 1), (1200, 300, 2), (2000, 2000, 3)],  # the last one is resized by anyres_max_9
    ),
    "internvl": (
        "<|im_start|>user\n<IMG_CONTEXT>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n",
        [(500, 700, 1), (448, 448, 2), (1000, 400, 3)],  # the second is one tile (no thumbnail)
    ),
}


#: (model_type, extra engine settings): each family's default importance, and OneVision's
#: attention_received ablation (the hidden state entering SigLIP's last layer, captured while it runs).
SETTINGS = [("internvl", {}), ("llava_onevision", {}), ("llava_onevision", {"importance": "attention_received"})]


@pytest.fixture(scope="module", params=SETTINGS, ids=lambda p: "-".join([p[0], *p[1].values()]))
def family(request, tmp_path_factory):
    from vllm import LLM

    model_type, extra = request.param
    path, model, _ = checkpoints.save_tiny(model_type, tmp_path_factory.mktemp(model_type))
    processor = AutoProcessor.from_pretrained(path)
    llm = LLM(model=str(path), hf_overrides={"globalcom2": {"retention_ratio": 0.25, **extra}}, **ENGINE)
    yield model_type, model, processor, llm, extra
    del llm
    gc.collect()


def test_family_equals_hf_with_per_request_ratio(family):
    model_type, model, processor, llm, extra = family
    prompt, sizes = FAMILIES[model_type]
    images = [make_image(h, w, s) for h, w, s in sizes]
    ratios = [None, 0.1, None]
    requests = []
    for image, r in zip(images, ratios):
        req = {"prompt": prompt, "multi_modal_data": {"image": image}}
        if r is not None:
            req["mm_processor_kwargs"] = {"retention_ratio": r}
        requests.append(req)
    outs = llm.generate(requests, sampling(), use_tqdm=False)
    for image, r, out in zip(images, ratios, outs):
        assert_same(vllm_result(out), hf_result(model, processor, image, prompt, retention_ratio=r or 0.25, **extra))
