"""The lmms-eval model plugin (``globalcom2``, alias ``globalcom2_llava_next``).

The first part needs no lmms-eval: model_args parsing, generation settings, visuals, and the
generation/scoring core (:class:`Runner`) on the tiny model. The second part, skipped
where lmms-eval is not installed, checks lmms-eval finds the model (entry point, the
``LMMS_EVAL_PLUGINS`` variable, the decorator registry) and runs it on a saved tiny checkpoint,
through real lmms-eval ``Instance`` objects (on every registered family's saved tiny checkpoint)
and through the ``lmms-eval`` command itself.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import globalcom2
from globalcom2.integrations import lmms_eval as plugin
from globalcom2.integrations.lmms_eval import (
    GenerationRequest,
    Runner,
    LoglikelihoodRequest,
    generation_settings,
    normalize_visuals,
    parse_model_args,
    truncate_at_stops,
)
from globalcom2.methods import ComposedConfig
from globalcom2.models import family_for_model_type, supported_model_types

SRC = str(Path(globalcom2.__file__).resolve().parents[1])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "LMMS_EVAL_PLUGINS"}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def lmms_eval_error(log: str) -> str | None:
    """The exception that ended the last traceback in ``log`` ("ModuleNotFoundError: ..."), or None."""
    lines = log.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip().startswith("Traceback (most recent call last)")]
    if not starts:
        return None
    for line in lines[starts[-1] + 1:]:
        text = line.strip()
        if text and not line.startswith((" ", "\t")) and re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b", text):
            return text
    return None


# ------------------------------------------------------------------------------------------------
# Without lmms-eval
# ------------------------------------------------------------------------------------------------


def test_lmms_eval_error_names_the_exception_behind_a_silent_failure():
    log = (
        "INFO start\nTraceback (most recent call last):\n  File \"a.py\", line 1, in f\n    import filelock._api\n"
        "ModuleNotFoundError: No module named 'filelock._api'\nINFO done\n"
    )
    assert lmms_eval_error(log) == "ModuleNotFoundError: No module named 'filelock._api'"
    assert lmms_eval_error("all fine\n") is None


def test_ci_pins_what_the_lmms_eval_venv_needs():
    """lmms-eval 0.7.3 imports filelock._api (gone in filelock 4): the CI venv is constrained."""
    root = Path(__file__).resolve().parents[1]
    constraints = (root / ".ci" / "lmms-eval-constraints.txt").read_text()
    pins = {line.split("#")[0].strip() for line in constraints.splitlines()} - {""}
    assert {"filelock<4", "lmms-eval==0.7.3", "torch==2.13.0"} <= pins, pins
    assert "-c .ci/lmms-eval-constraints.txt" in (root / ".ci" / "run").read_text()


def test_importing_globalcom2_and_the_registration_modules_does_not_import_lmms_eval():
    code = (
        "import sys, globalcom2, globalcom2.integrations, globalcom2.integrations.models as m\n"
        "assert m.AVAILABLE_MODELS == {'globalcom2': 'GlobalCom2Model', 'globalcom2_llava_next': 'GlobalCom2Model'}, m.AVAILABLE_MODELS\n"
        "print(sorted(k for k in sys.modules if k.split('.')[0] in ('lmms_eval', 'torch')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", ["globalcom2", "globalcom2_llava_next"])
def test_the_class_lmms_eval_imports_is_the_plugin_class(name):
    from globalcom2.integrations import models

    module_name, cls_name = models.class_path(name).rsplit(".", 1)
    assert getattr(importlib.import_module(module_name), cls_name) is plugin.GlobalCom2Model


def test_the_model_name_is_family_neutral_and_the_0_1_name_an_alias():
    from globalcom2.integrations import models

    assert plugin.MODEL_NAME == models.MODEL_NAME == "globalcom2"
    assert plugin.MODEL_ALIASES == models.MODEL_ALIASES == ("globalcom2_llava_next",)
    assert not hasattr(plugin, "load_llava_next") and not hasattr(plugin, "LlavaNextRunner")


def test_using_the_plugin_without_lmms_eval_says_how_to_install_it():
    if plugin.lmms_eval_available():
        pytest.skip("lmms-eval is installed")
    with pytest.raises(ImportError, match="pip install lmms-eval"):
        plugin.GlobalCom2Model(pretrained="does/not-matter")


def test_model_args_defaults():
    args = parse_model_args("")
    assert args.method == "globalcom2" and args.options == {"retention_ratio": 0.25}
    assert args.config == globalcom2.GlobalCom2Config(retention_ratio=0.25)
    assert args.loader["pretrained"] == plugin.DEFAULT_PRETRAINED
    assert args.loader["batch_size"] == 1 and args.loader["dtype"] == "auto" and args.loader["device"] is None


def test_model_args_string_is_split_and_coerced_like_lmms_eval():
    args = parse_model_args(
        "pretrained=llava-hf/llava-v1.6-vicuna-7b-hf,retention_ratio=0.5,layout=spatial,temperature=5,"
        "dtype=bf16,batch_size=4,use_cache=false,max_new_tokens=16,attn_implementation=sdpa"
    )
    assert args.config == globalcom2.GlobalCom2Config(retention_ratio=0.5, layout="spatial", temperature=5.0)
    assert args.loader["dtype"] is torch.bfloat16 and args.loader["batch_size"] == 4
    assert args.loader["use_cache"] is False and args.loader["max_new_tokens"] == 16
    assert args.loader["attn_implementation"] == "sdpa"


def test_model_args_mapping_as_lmms_eval_passes_it():
    # lmms-eval parses model_args itself and adds batch_size/max_batch_size/device from its CLI.
    args = parse_model_args({"pretrained": "x", "method": "fastervlm", "retention_ratio": 0.125, "batch_size": "2", "max_batch_size": None, "device": "cpu", "torch_dtype": "float16"})
    assert args.method == "fastervlm" and args.config.retention_ratio == 0.125
    assert args.loader["batch_size"] == 2 and args.loader["device"] == "cpu" and args.loader["dtype"] is torch.float16


def test_model_args_composed_method_and_no_compression():
    args = parse_model_args({"method": "globalcom2+fastv", "retention_ratio": 0.25, "fastv_layer": 2, "fastv_retention_ratio": 0.5})
    assert isinstance(args.config, ComposedConfig) and args.config.fastv.layer == 2
    for name in plugin.NO_COMPRESSION:
        args = parse_model_args({"method": name})
        assert args.method is None and args.config is None
    assert parse_model_args({"batch_size": "auto"}).loader["batch_size"] == 1
    assert parse_model_args({"revision": 1234}).loader["revision"] == "1234"


@pytest.mark.parametrize(
    "model_args, named",
    [
        ("retention_ratio=0.25,bogus_option=1", "bogus_option"),
        ("method=pooling,layout=spatial", "layout"),  # another method's option
        ("retention_ratio=1.5", "retention_ratio"),
        ("retention_ratio=abc", "retention_ratio"),
        ("layout=diagonal", "layout"),
        ("method=fastv,layer=-1", "layer"),
        ("method=nonsense", "nonsense"),
        ("method=none,retention_ratio=0.5", "retention_ratio"),
        ("dtype=int8", "dtype"),
        ("dtype=float16,torch_dtype=bfloat16", "torch_dtype"),
        ("batch_size=0", "batch_size"),
        ("max_new_tokens=0", "max_new_tokens"),
        ("use_cache=maybe", "use_cache"),
        ("retention_ratio", "retention_ratio"),
    ],
)
def test_bad_model_args_are_a_value_error_that_names_them(model_args, named):
    with pytest.raises(ValueError, match=named) as info:
        parse_model_args(model_args)
    assert str(info.value).startswith("globalcom2: ")


def test_generation_settings():
    hf, stops = generation_settings({}, default_max_new_tokens=32)
    assert hf == {"max_new_tokens": 32, "do_sample": False, "num_beams": 1} and stops == []
    hf, stops = generation_settings({"until": "\n\n", "max_new_tokens": 16, "temperature": 0, "top_p": None, "num_beams": 1, "image_aspect_ratio": "pad"})
    assert hf == {"max_new_tokens": 16, "do_sample": False, "num_beams": 1} and stops == ["\n\n"]
    hf, stops = generation_settings({"until": ["ASSISTANT:", "", "ASSISTANT:"], "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1})
    assert hf["do_sample"] is True and hf["temperature"] == 0.7 and hf["top_p"] == 0.9 and hf["repetition_penalty"] == 1.1
    assert stops == ["ASSISTANT:"]
    hf, _ = generation_settings({"do_sample": False, "temperature": 0.2, "top_p": 0.5})
    assert hf["do_sample"] is False and "temperature" not in hf and "top_p" not in hf
    with pytest.raises(ValueError, match="until"):
        generation_settings({"until": 3})


def test_truncate_at_stops():
    assert truncate_at_stops("yes.\nno\n\nmaybe", ["\n\n", "."]) == "yes"
    assert truncate_at_stops("answer", ["\n"]) == "answer"
    assert truncate_at_stops("answer", []) == "answer"


def test_normalize_visuals(tmp_path, image_factory):
    rgba = image_factory(40, 60).convert("RGBA")
    path = tmp_path / "im.png"
    image_factory(30, 20, 1).save(path)
    out = normalize_visuals([[rgba], None, str(path)])
    assert [im.mode for im in out] == ["RGB", "RGB"] and out[1].size == (20, 30)
    assert normalize_visuals(None) == [] and normalize_visuals([]) == []
    with pytest.raises(ValueError, match="video"):
        normalize_visuals(["clip.mp4"])
    with pytest.raises(ValueError, match="int"):
        normalize_visuals([3])


def test_prompts_without_and_with_a_chat_template(tiny):
    _, processor = tiny
    runner = Runner(tiny[0], processor)
    assert runner.build_prompt("What is it?", 2) == "<image>\n<image>\nWhat is it?"
    assert runner.build_prompt("What is it?", 0) == "What is it?"
    assert runner.build_prompt("See <image> here", 1) == "See <image> here"  # the task placed it
    template = (
        "{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
    )
    runner = Runner(tiny[0], processor, chat_template=template)
    assert runner.build_prompt("What is it?", 1) == "USER: <image>\nWhat is it? ASSISTANT:"


def test_loading_a_checkpoint_of_no_supported_family_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match="'llava' model.*LLaVA-NeXT.*LLaVA-OneVision.*InternVL"):
        plugin.load_checkpoint(str(tmp_path))


@pytest.fixture
def images(image_factory):
    return [image_factory(300, 500), image_factory(400, 300, 1), image_factory(336, 336, 2)]


def _requests(images, gen_kwargs):
    return [
        GenerationRequest("What is in the image?", gen_kwargs, [images[0]]),
        GenerationRequest("A longer question about this other picture, please?", gen_kwargs, lambda: images[1]),
        GenerationRequest("A question without an image.", gen_kwargs, None),
        GenerationRequest("Compare the two.", gen_kwargs, [images[1], images[2]]),
    ]


def test_generation_is_the_usual_model_generate_on_the_compressed_model(tiny, images):
    model, processor = tiny
    globalcom2.apply(model, retention_ratio=0.25, layout="spatial")
    runner = Runner(model, processor, batch_size=1)
    got = runner.generate_until([GenerationRequest("What is in the image?", {"max_new_tokens": 6}, [images[0]])])
    inputs = processor(images=[images[0]], text=["<image>\nWhat is in the image?"], return_tensors="pt")
    with torch.inference_mode():
        ref = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert got == processor.tokenizer.batch_decode(ref[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    stats = globalcom2.last_stats(model)
    assert runner.visual_tokens == stats.visual_tokens and stats.visual_tokens[0] < stats.vanilla_visual_tokens[0]


def test_generation_keeps_request_order_in_batches_and_stops(tiny, images):
    model, processor = tiny
    globalcom2.apply(model, method="globalcom2", retention_ratio=0.25)
    runner = Runner(model, processor, batch_size=1)
    reqs = _requests(images, {"max_new_tokens": 6})
    one_by_one = runner.generate_until(reqs)
    assert len(runner.visual_tokens) == 3  # the text-only request has no visual tokens
    runner.batch_size = 3  # batches of the longest contexts first: [1, 0, 3], [2]
    seen = {}
    batched = runner.generate_until(reqs, on_result=seen.__setitem__)
    assert batched == one_by_one and seen == dict(enumerate(one_by_one))
    assert all(len(t) <= 6 for t in batched)  # byte-level tokens: at most one character each

    # `until`: the same greedy answer, cut before the first stop string.
    text = next(t for t in one_by_one if len(t) >= 3)
    i = one_by_one.index(text)
    stop = text[1:3]
    cut = runner.generate_until([reqs[i]._replace(gen_kwargs={"max_new_tokens": 6, "until": [stop]})])
    assert cut == [text[: text.index(stop)]]


def test_mixed_generation_kwargs_are_batched_apart(tiny, images):
    model, processor = tiny
    runner = Runner(model, processor, batch_size=4, max_new_tokens=2)
    reqs = [GenerationRequest(f"Question {i}?", None, [images[2]] if i == 0 else None) for i in range(4)]
    reqs[1] = reqs[1]._replace(gen_kwargs={"max_new_tokens": 5})
    assert [len(b) for b in runner._batches(reqs)] == [3, 1]
    out = runner.generate_until(reqs)
    assert len(out) == 4 and all(isinstance(t, str) for t in out)
    assert [len(t) <= n for t, n in zip(out, (2, 5, 2, 2))] == [True] * 4


def test_loglikelihood_matches_the_next_token_distribution(tiny, images):
    model, processor = tiny
    globalcom2.apply(model, retention_ratio=0.25)
    runner = Runner(model, processor)
    prompt = "<image>\nIs it red?"
    inputs = processor(images=[images[0]], text=[prompt], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True)
    logprobs = torch.log_softmax(out.scores[0][0].float(), dim=-1)
    token = processor.tokenizer("A")["input_ids"]
    assert len(token) == 1
    score, = runner.loglikelihood([LoglikelihoodRequest("Is it red?", "A", [images[0]])])
    assert score.num_tokens == 1 and score.logprob == pytest.approx(float(logprobs[token[0]]), abs=1e-4)
    assert score.loss == pytest.approx(-score.logprob)
    assert score.greedy == (int(logprobs.argmax()) == token[0])


def test_loglikelihood_of_several_tokens_on_the_uncompressed_model(tiny, images):
    model, processor = tiny
    runner = Runner(model, processor)
    reqs = [LoglikelihoodRequest("Is it red?", " yes", [images[1]]), LoglikelihoodRequest("Plain text", " no", None)]
    got = runner.loglikelihood(reqs)
    for req, (lp, n_tokens, greedy) in zip(reqs, got):
        prompt = runner.build_prompt(req.context, len(normalize_visuals(req.visuals)))
        full = processor(images=normalize_visuals(req.visuals) or None, text=[prompt + req.continuation], return_tensors="pt")
        n_prompt = len(processor.tokenizer(prompt)["input_ids"])
        n_cont = len(processor.tokenizer(prompt + req.continuation)["input_ids"]) - n_prompt
        with torch.inference_mode():
            logits = model(**full).logits[0].float()
        ids = full["input_ids"][0]
        start = ids.shape[0] - n_cont
        ref = sum(float(torch.log_softmax(logits[p - 1], -1)[ids[p]]) for p in range(start, ids.shape[0]))
        assert n_tokens == n_cont and lp == pytest.approx(ref, abs=1e-4) and lp < 0
        assert greedy == all(int(logits[p - 1].argmax()) == int(ids[p]) for p in range(start, ids.shape[0]))
    assert runner.loglikelihood([LoglikelihoodRequest("ctx", "", None)]) == [(0.0, 0, True)]
    assert runner.score(LoglikelihoodRequest("ctx", "", None)).loss == 0.0


# ------------------------------------------------------------------------------------------------
# With lmms-eval
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lmms_eval():
    return pytest.importorskip("lmms_eval")


@pytest.fixture(scope="module")
def checkpoint(family_checkpoints):
    """The saved tiny LLaVA-NeXT checkpoint (random weights), loadable with from_pretrained in a
    process of its own: its processor has no video slot (conftest.family_checkpoints)."""
    return family_checkpoints["llava_next"]


def test_the_plugin_is_an_lmms_simple_model(lmms_eval):
    import inspect

    from lmms_eval.api.model import lmms

    cls = plugin.GlobalCom2Model
    assert issubclass(cls, lmms) and cls.is_simple is True and not inspect.isabstract(cls)


def test_decorator_registry(lmms_eval):
    from lmms_eval.api.registry import get_model

    assert get_model("globalcom2") is get_model("globalcom2_llava_next") is plugin.GlobalCom2Model


def test_lmms_eval_finds_the_model_through_LMMS_EVAL_PLUGINS(lmms_eval):
    code = (
        "import warnings; warnings.simplefilter('ignore')\n"
        "from lmms_eval.models import get_model\n"
        "for name in ('globalcom2', 'globalcom2_llava_next'):\n"
        "    cls = get_model(name)\n"
        "    print(cls.__module__ + '.' + cls.__qualname__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=_env(LMMS_EVAL_PLUGINS="globalcom2.integrations"), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-2:] == ["globalcom2.integrations.lmms_eval.model.GlobalCom2Model"] * 2


def test_lmms_eval_finds_the_model_through_its_entry_point(lmms_eval, monkeypatch):
    from importlib.metadata import EntryPoint

    from lmms_eval.models import registry_v2

    ep = EntryPoint(name="globalcom2", value="globalcom2.integrations.models:lmms_eval_manifests", group="lmms_eval.models")
    monkeypatch.setattr(registry_v2, "entry_points", lambda: _EntryPoints([ep]))
    registry = registry_v2.ModelRegistryV2()
    registry.load_entrypoint_manifests(overwrite=True)
    for name in ("globalcom2", "globalcom2_llava_next"):  # the model, and its 0.1 name as an alias
        assert registry.resolve(name).model_type == "simple" and registry.resolve(name).model_id == "globalcom2"
        assert registry.get_model_class(name) is plugin.GlobalCom2Model


class _EntryPoints(list):
    def select(self, group):
        return [ep for ep in self if ep.group == group]


def test_installed_entry_point(lmms_eval):
    from importlib.metadata import entry_points

    names = [ep.value for ep in entry_points().select(group="lmms_eval.models") if ep.value.startswith("globalcom2.")]
    if not names:
        pytest.skip("globalcom2 is installed without its lmms_eval.models entry point")
    from lmms_eval.models import get_model

    assert get_model("globalcom2") is get_model("globalcom2_llava_next") is plugin.GlobalCom2Model


def _instance(request_type, arguments, doc_id, task="tiny_task"):
    from lmms_eval.api.instance import Instance

    return Instance(request_type=request_type, arguments=arguments, idx=0, metadata={"task": task, "doc_id": doc_id, "repeats": 1})


@pytest.mark.parametrize("model_type", supported_model_types())
def test_plugin_end_to_end_on_a_saved_checkpoint(lmms_eval, model_type, family_checkpoints, video_processor_optional, images):
    """Every registered family's tiny model, saved with save_pretrained and loaded by the plugin
    (conftest.video_processor_optional: OneVision's and InternVL's processors load without
    torchvision, their unused video processor slot left empty)."""
    checkpoint = family_checkpoints[model_type]
    cls = plugin.GlobalCom2Model
    lm = cls.create_from_arg_string(
        f"pretrained={checkpoint},retention_ratio=0.25,layout=spatial,dtype=float32", {"batch_size": 2, "device": "cpu"}
    )
    assert lm.model.config.model_type == model_type
    assert globalcom2.is_applied(lm.model) and globalcom2.get_config(lm.model).layout == "spatial"
    assert lm.rank == 0 and lm.world_size == 1 and lm.batch_size == 2

    docs = [{"image": images[0], "q": "What is it?", "a": "cat"}, {"image": images[1], "q": "And here?", "a": "dog"}, {"image": None, "q": "No image.", "a": "x"}]
    lm.task_dict = {"tiny_task": {"test": docs}}

    def doc_to_visual(doc):
        return [doc["image"]] if doc["image"] is not None else []

    gen = {"max_new_tokens": 4, "until": ["\n\n"], "temperature": 0}
    reqs = [_instance("generate_until", (d["q"], dict(gen), doc_to_visual, i, "tiny_task", "test"), i) for i, d in enumerate(docs)]
    answers = lm.generate_until(reqs)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    runner = Runner(lm.model, lm.processor, batch_size=1, max_new_tokens=4)
    direct = runner.generate_until([GenerationRequest(d["q"], dict(gen), doc_to_visual(d)) for d in docs])
    assert answers == direct
    assert lm.runner.visual_tokens and all(v < 2000 for v in lm.runner.visual_tokens)

    ll_reqs = [
        _instance("loglikelihood", ("What is it?", " cat", doc_to_visual, 0, "tiny_task", "test"), 0),
        _instance("loglikelihood", ("And here?", lambda doc: " " + doc["a"], doc_to_visual, 1, "tiny_task", "test"), 1),
        _instance("loglikelihood", ("", "cat"), 0),
    ]
    # What lmms-eval's evaluator makes of the answers: (loss, is_greedy), the loss being the mean
    # negative log-likelihood per token (lmms-eval's multiple-choice scoring takes the argmin).
    from lmms_eval.api.instance import unwrap_generation_output

    scores = [tuple(unwrap_generation_output(r)[0]) for r in lm.loglikelihood(ll_reqs)]
    assert len(scores) == 3 and all(isinstance(loss, float) and isinstance(g, bool) for loss, g in scores)
    ref = lm.runner.score(LoglikelihoodRequest("What is it?", " cat", doc_to_visual(docs[0])))
    assert scores[0][0] == pytest.approx(-ref.logprob / ref.num_tokens, abs=1e-5) and scores[0][0] > 0
    assert scores[0][1] == ref.greedy and scores[1][0] > 0
    with pytest.raises(NotImplementedError, match="multi_round"):
        lm.generate_until_multi_round(reqs)

    plain = cls.create_from_arg_string(f"pretrained={checkpoint},method=none,device=cpu")
    assert not globalcom2.is_applied(plain.model)
    default = cls.create_from_arg_string(f"pretrained={checkpoint},device=cpu")  # no layout: the family's default
    assert globalcom2.get_config(default.model).layout == family_for_model_type(model_type).layouts[0]
    with pytest.raises(ValueError, match="bogus"):
        cls.create_from_arg_string(f"pretrained={checkpoint},bogus=1,device=cpu")


_TASK_UTILS = '''
from PIL import Image


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"] + "\\nAnswer with one word."
'''


def test_lmms_eval_command_runs_a_local_task(lmms_eval, checkpoint, image_factory, tmp_path):
    """The command users run, on a saved tiny checkpoint and a 3-sample local task (both a
    generation task and a multiple-choice one, which goes through loglikelihood)."""
    datasets = pytest.importorskip("datasets")
    data = tmp_path / "data"
    datasets.DatasetDict(
        {
            "test": datasets.Dataset.from_dict(
                {
                    "image": [image_factory(300 + 40 * i, 500 - 60 * i, i) for i in range(3)],
                    "question": ["What is it?", "What colour?", "How many?"],
                    "answer": ["cat", "red", "two"],
                    "label": [0, 1, 0],
                },
                features=datasets.Features(
                    {"image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string"), "label": datasets.Value("int64")}
                ),
            )
        }
    ).save_to_disk(str(data))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "gc2_tiny_utils.py").write_text(_TASK_UTILS)
    common = (
        f"dataset_path: {data}\n"
        "dataset_kwargs:\n  load_from_disk: true\n"
        "test_split: test\n"
        "doc_to_visual: !function gc2_tiny_utils.doc_to_visual\n"
        "doc_to_text: !function gc2_tiny_utils.doc_to_text\n"
    )
    (tasks / "gc2_tiny_gen.yaml").write_text(
        "task: gc2_tiny_gen\noutput_type: generate_until\n" + common + "doc_to_target: answer\n"
        "generation_kwargs:\n  max_new_tokens: 4\n  until: [\"\\n\"]\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (tasks / "gc2_tiny_mc.yaml").write_text(
        "task: gc2_tiny_mc\noutput_type: multiple_choice\n" + common + "doc_to_choice: [\"yes\", \"no\"]\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    out_dir = tmp_path / "logs"
    cmd = [
        sys.executable, "-m", "lmms_eval",
        "--model", "globalcom2",
        "--model_args", f"pretrained={checkpoint},retention_ratio=0.25,method=globalcom2,layout=official,dtype=float32",
        "--tasks", "gc2_tiny_gen,gc2_tiny_mc",
        "--include_path", str(tasks),
        "--device", "cpu",
        "--batch_size", "2",
        "--output_path", str(out_dir),
        "--log_samples",
    ]
    env = _env(LMMS_EVAL_PLUGINS="globalcom2.integrations", HF_DATASETS_CACHE=str(tmp_path / "hf_cache"))
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    log = (run.stdout + run.stderr)[-6000:]
    assert run.returncode == 0, log
    results = sorted(out_dir.rglob("*results*.json"))
    # lmms-eval logs some of its own failures and still exits 0: name the cause, not just "no results".
    assert results, f"lmms-eval wrote no results: {lmms_eval_error(run.stdout + run.stderr) or 'no error logged'}\n{log}"
    payload = json.loads(results[-1].read_text())
    assert "exact_match,none" in payload["results"]["gc2_tiny_gen"], payload["results"]
    assert "acc,none" in payload["results"]["gc2_tiny_mc"], payload["results"]
    samples = [p for p in out_dir.rglob("*.jsonl") if "gc2_tiny_gen" in p.name]
    assert samples and len(samples[-1].read_text().strip().splitlines()) == 3, log
