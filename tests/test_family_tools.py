"""The tools on every registered family's tiny model: bench, the lmms-eval runner (eval's and
lmms-eval's generation core), efficiency's figures. Parametrised from the family registry."""

from __future__ import annotations

import pytest
import torch

import globalcom2
from globalcom2 import bench, efficiency
from globalcom2.integrations.lmms_eval import GenerationRequest, Runner
from globalcom2.models import families

from conftest import family_model, make_image

FAMILIES = [pytest.param(f, id=f.model_type) for f in families()]


@pytest.mark.parametrize("family", FAMILIES)
def test_bench_measures_every_family(family):
    model, processor = family_model(family)
    inputs = processor(images=[make_image(480, 640)], text=[f"{processor.image_token}\nhi"], return_tensors="pt")
    rows = bench.run_bench(model, dict(inputs), [0.25], max_new_tokens=2, runs=1, warmup=0,
                           methods=("globalcom2", "fastv"))
    assert [r.method for r in rows] == ["vanilla", "globalcom2 R=0.25", "fastv R=0.25"]
    vanilla, gc2, fastv = rows
    assert gc2.visual_tokens < vanilla.visual_tokens and fastv.visual_tokens == vanilla.visual_tokens
    assert vanilla.visual_tokens == int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert not globalcom2.is_applied(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_generation_runner_is_the_models_generate(family):
    model, processor = family_model(family)
    globalcom2.apply(model, retention_ratio=0.25)
    runner = Runner(model, processor, batch_size=2)
    images = [make_image(480, 640), make_image(300, 900, 1)]
    reqs = [GenerationRequest("What is in the image?", {"max_new_tokens": 4}, [images[0]]),
            GenerationRequest("And here?", {"max_new_tokens": 4}, [images[1]]),
            GenerationRequest("No image.", {"max_new_tokens": 4}, None)]
    batched = runner.generate_until(reqs)
    runner.batch_size = 1
    assert runner.generate_until(reqs) == batched
    text = runner.build_prompt("What is in the image?", 1)
    inputs = processor(images=[images[0]], text=[text], return_tensors="pt")
    with torch.inference_mode():
        ref = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert batched[0] == processor.tokenizer.batch_decode(ref[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_efficiency_knows_each_familys_checkpoints(family):
    assert family.language_models, "a family lists its public checkpoints' language models"
    for ckpt in family.language_models:
        assert efficiency.resolve_arch(ckpt).num_layers > 0
        assert efficiency.max_visual_tokens_for_model(ckpt) == family.checkpoint_max_visual_tokens(ckpt)
    model, _ = family_model(family)
    assert family.max_visual_tokens(model.config) > 0


@pytest.mark.parametrize("family", [p for p in FAMILIES if "official" not in p.values[0].layouts])
def test_a_counter_refuses_a_layout_naming_the_family_only(family):
    """A model-free family (``Family.counter``: the vLLM plugin's, the count-first processor's) refuses
    a layout it lacks naming the family, not ``(NoneType)`` (its model is None)."""
    model, _ = family_model(family)
    counter = family.counter(model.config, globalcom2.GlobalCom2Config(retention_ratio=0.25, layout="spatial"))
    with pytest.raises(ValueError) as err:
        counter.check_layout("official")
    assert str(err.value) == f"layout 'official' is not available on {family.display_name}; its layouts: {', '.join(family.layouts)}"
