"""The bad-input matrix (issue 26): every mistake a user can make, on every command, public function
and model family, with the class of its outcome written down.

Outcome classes:

* ``CLEAN``: the command ends with exactly one ``globalcom2: error:`` line holding the expected
  text, a non-zero status, no traceback, nothing on stdout, nothing written anywhere in the working
  folder, and no model loaded or built (the loaders are replaced by ones that fail the test).
* ``TYPE`` / ``VALUE``: the Python function raises ``TypeError`` / ``ValueError`` (or the named
  subclass) whose message holds the expected text (the argument's name).

Every case can fail: a message that changes, a check that moves after the model load, a file left
behind. Cheap by construction: checkpoints are config files with stub weight files (nothing is
loaded), the API cases use the families' tiny in-code models.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from globalcom2.cli import main
from globalcom2.demo import sample_image_path

SAMPLE = str(sample_image_path())
CLEAN, TYPE, VALUE = "clean one-line error before any work", "TypeError", "ValueError"
MODEL_COMMANDS = ("generate", "embed", "efficiency", "bench", "visualize", "eval")
RUNNING = ("generate", "embed", "bench", "visualize", "eval")  # the commands that load weights


# ------------------------------------------------------------------------------------------------
# Fixtures: offline, fresh hub answers, no model may load, a workspace with every bad input
# ------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    import huggingface_hub.constants

    import globalcom2.cli.loading as cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setattr(cli, "_HUB_CHECKED", {})


@pytest.fixture
def no_load(monkeypatch):
    """Loading or building any model fails the test (its message would not be the expected one)."""
    import globalcom2.cli.loading as cli
    import globalcom2.demo
    import globalcom2.tiny as tiny
    from globalcom2.models import families

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(cli, "load_model", refuse)
    monkeypatch.setattr(tiny, "build_wide", refuse)
    monkeypatch.setattr(globalcom2.demo, "run_demo", refuse)
    for fam in families():
        monkeypatch.setattr(fam, "build_tiny", classmethod(refuse))
        monkeypatch.setattr(fam, "load", classmethod(refuse))


def _family_configs() -> dict[str, dict]:
    """Every registered family's tiny config as a dict (from the shared tiny models)."""
    from conftest import family_model

    from globalcom2.models import families

    return {f.model_type: family_model(f)[0].config.to_dict() for f in families()}


STUBS = ("model.safetensors", "processor_config.json", "tokenizer.json")


def _checkpoint(folder: Path, config: dict | str | None, files=STUBS) -> str:
    """A checkpoint folder with ``config`` (a dict, raw text, or None for none) and stub files."""
    folder.mkdir(parents=True)
    if config is not None:
        (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    for name in files:
        (folder / name).write_bytes(b"")
    return str(folder)


@pytest.fixture(scope="module")
def configs():
    return _family_configs()


@pytest.fixture
def ws(tmp_path, monkeypatch, configs):
    """The working folder of a case: inputs under ``in/``, the cwd; returns a dict of paths."""
    root = tmp_path / "ws"
    inp = root / "in"
    inp.mkdir(parents=True)
    monkeypatch.chdir(root)
    nxt = configs["llava_next"]
    paths = {
        "root": root,
        "empty_png": inp / "empty.png",
        "text_png": inp / "text.png",
        "a_file": inp / "plain.txt",
        "no_config": inp / "noconfig",
        "data": inp / "data",
    }
    paths["empty_png"].write_bytes(b"")
    paths["text_png"].write_text("not an image")
    paths["a_file"].write_text("x")
    paths["no_config"].mkdir()
    paths["data"].mkdir()
    paths["ck_llava15"] = _checkpoint(inp / "llava15", {**nxt, "model_type": "llava"})
    paths["ck_textonly"] = _checkpoint(inp / "textonly", {"model_type": "llama", "hidden_size": 16, "num_hidden_layers": 1,
                                                          "num_attention_heads": 2, "intermediate_size": 32})
    paths["ck_notype"] = _checkpoint(inp / "notype", {k: v for k, v in nxt.items() if k != "model_type"})
    paths["ck_badjson"] = _checkpoint(inp / "badjson", "{not json")
    paths["ck_list"] = _checkpoint(inp / "listjson", "[1, 2]")
    paths["ck_noweights"] = _checkpoint(inp / "noweights", nxt, files=STUBS[1:])
    paths["ck_noproc"] = _checkpoint(inp / "noproc", nxt, files=(STUBS[0], STUBS[2]))
    paths["ck_notok"] = _checkpoint(inp / "notok", nxt, files=STUBS[:2])
    for mt, cfg in configs.items():
        if "vision_feature_select_strategy" in cfg:  # Idefics3 / SmolVLM have no such setting
            wrong = "full" if cfg["vision_feature_select_strategy"] == "default" else "default"
            paths[f"ck_strategy_{mt}"] = _checkpoint(inp / f"strategy-{mt}", {**cfg, "vision_feature_select_strategy": wrong})
        paths[f"ck_{mt}"] = _checkpoint(inp / f"ok-{mt}", cfg)
    return paths


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _run_clean(argv, expected, ws, capsys, code=1):
    """Run ``argv`` and check the CLEAN outcome."""
    before = _files(ws["root"])
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    lines = [line for line in captured.err.splitlines() if line.startswith("globalcom2: error:")]
    assert len(lines) == 1, captured.err
    assert expected in lines[0], (argv, lines[0])
    assert captured.out == "", captured.out
    assert status == code, (argv, status)
    assert _files(ws["root"]) == before, "something was written"
    return lines[0]


def _command(cmd: str, model: str, *extra: str) -> list[str]:
    """The argv of ``cmd`` with ``--model model`` and the other arguments it needs."""
    base = {
        "generate": ["generate", "--image", SAMPLE, "--prompt", "hi"],
        "embed": ["embed", "--image", SAMPLE, "--out", "out.safetensors"],
        "efficiency": ["efficiency"],
        "bench": ["bench"],
        "visualize": ["visualize", "--image", SAMPLE, "--output", "v.png"],
        "eval": ["eval", "--benchmarks", "toyqa", "--data-root", "DATA", "--output-dir", "out"],
    }[cmd]
    return [*base, "--model", model, *extra]


# ------------------------------------------------------------------------------------------------
# 1. --model, on every command that takes one (and every family where the family matters)
# ------------------------------------------------------------------------------------------------

NOT_FOUND = "model directory not found"
MODEL_CASES = [
    # (id, model (a ws key or a literal), {command: expected} or one expected for all)
    ("dot-path", "./nope-dir", f"{NOT_FOUND}: ./nope-dir"),
    ("home-path", "~/nope-dir-gc2", f"{NOT_FOUND}: ~/nope-dir-gc2"),
    ("deep-path", "a/b/nope", f"{NOT_FOUND}: a/b/nope"),
    ("bare-name", "nope-dir", "model not found: no local directory 'nope-dir', and hub ids look like org/name"),
    ("hub-not-cached", "nobody-gc2/no-such-model", "not in the local cache"),
    ("wide-random:0", "wide-random:0", "the layer count after 'wide-random:' must be a whole number >= 1, got '0'"),
    ("wide-random:x", "wide-random:x", "must be a whole number >= 1, got 'x'"),
    ("no-config.json", "no_config", "has no config.json"),
    ("llava-1.5", "ck_llava15", "is a 'llava' model; globalcom2 supports LLaVA-NeXT"),
    ("text-only", "ck_textonly", "is a 'llama' model; globalcom2 supports"),
    ("no-model_type", "ck_notype", "config without model_type"),
    ("damaged-config", "ck_badjson", "cannot read"),
    ("config-not-object", "ck_list", "expected a JSON object"),
]
EFFICIENCY_DIFFERS = {  # efficiency reads configs only; its messages where they differ
    ("no-config.json", "efficiency"): "has no config.json",
    ("config-not-object", "efficiency"): "expected a JSON object",
}


def _resolve(ws, model):
    return str(ws[model]) if model in ws else model


@pytest.mark.parametrize("command", MODEL_COMMANDS)
@pytest.mark.parametrize("case_id, model, expected", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_bad_model(command, case_id, model, expected, ws, capsys, no_load):
    """CLEAN: 13 kinds of bad --model x 6 commands."""
    from _eval_entry import make_toy

    make_toy(ws["data"])
    argv = [a if a != "DATA" else str(ws["data"]) for a in _command(command, _resolve(ws, model))]
    _run_clean(argv, EFFICIENCY_DIFFERS.get((case_id, command), expected), ws, capsys)


BUILTIN_REFUSED = [("generate", "tiny"), ("efficiency", "tiny"), ("generate", "wide-random"),
                   ("efficiency", "wide-random"), ("eval", "wide-random"), ("eval", "wide-random:3")]


@pytest.mark.parametrize("command, model", BUILTIN_REFUSED)
def test_builtin_model_on_a_command_without_it(command, model, ws, capsys, no_load):
    """CLEAN: a built-in random model names the commands that take it."""
    name = model.partition(":")[0]
    _run_clean(_command(command, model), f"the built-in random model '{name}' is for", ws, capsys)


FILE_CHECKS = [("ck_noweights", "has no weights"), ("ck_noproc", "has no image processor config"),
               ("ck_notok", "has no tokenizer")]


@pytest.mark.parametrize("command", RUNNING)
@pytest.mark.parametrize("model, expected", FILE_CHECKS)
def test_checkpoint_files_are_checked_before_loading(command, model, expected, ws, capsys, no_load):
    """CLEAN: a checkpoint folder without weights, processor or tokenizer files."""
    from _eval_entry import make_toy

    make_toy(ws["data"])
    argv = [a if a != "DATA" else str(ws["data"]) for a in _command(command, ws[model])]
    _run_clean(argv, expected, ws, capsys)


def _family_ids():
    from globalcom2.models import families

    return [f.model_type for f in families()]


@pytest.mark.parametrize("command", RUNNING)
@pytest.mark.parametrize("model_type", _family_ids())
def test_unsupported_vision_strategy_before_the_weights(command, model_type, ws, capsys, no_load):
    """CLEAN, every family: a vision_feature_select_strategy the family cannot compress is found on
    the model built on the meta device, before any weight is read (was: after loading)."""
    from _eval_entry import make_toy

    if f"ck_strategy_{model_type}" not in ws:
        pytest.skip(f"{model_type}'s config has no vision_feature_select_strategy")
    make_toy(ws["data"])
    argv = [a if a != "DATA" else str(ws["data"]) for a in _command(command, ws[f"ck_strategy_{model_type}"])]
    _run_clean(argv, "vision_feature_select_strategy", ws, capsys)


@pytest.mark.parametrize("command", RUNNING)
@pytest.mark.parametrize("model_type", [m for m in _family_ids() if m != "llava_next"])
def test_official_layout_on_a_family_without_it(command, model_type, ws, capsys, no_load):
    """CLEAN: layout=official on OneVision / InternVL, before the weights (was: after loading)."""
    from _eval_entry import make_toy

    make_toy(ws["data"])
    argv = [a if a != "DATA" else str(ws["data"]) for a in _command(command, ws[f"ck_{model_type}"], "--method-arg", "layout=official")]
    _run_clean(argv, "layout 'official' is not available on", ws, capsys)


def _unreachable_hub(monkeypatch):
    import huggingface_hub.constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_unreachable_hub_is_one_quick_line(command, ws, capsys, monkeypatch, no_load):
    """CLEAN: an unreachable hub, one look without retries, on every command (efficiency used to
    retry for 28-47 s and print 11 lines)."""
    import time

    from _eval_entry import make_toy

    make_toy(ws["data"])
    _unreachable_hub(monkeypatch)
    argv = [a if a != "DATA" else str(ws["data"]) for a in _command(command, "nobody-gc2/no-such-model")]
    t0 = time.perf_counter()
    _run_clean(argv, "is unreachable", ws, capsys)
    assert time.perf_counter() - t0 < 10


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_a_mistyped_model_is_refused_before_torch_is_imported(command, tmp_path):
    """CLEAN, and cheap (issue 29, point 13): ``--model nope-dir`` ends before torch or
    transformers are imported, in a fresh interpreter."""
    argv = [a if a != "DATA" else str(tmp_path) for a in _command(command, "nope-dir")]
    code = (
        "import sys\nfrom globalcom2.cli import main\nrc = main(sys.argv[1:])\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "print('IMPORTED', heavy)\nsys.exit(rc)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert out.returncode == 1, out.stderr
    assert "model not found: no local directory 'nope-dir'" in out.stderr
    assert "IMPORTED []" in out.stdout, out.stdout


# ------------------------------------------------------------------------------------------------
# 2. Every other option of every command
# ------------------------------------------------------------------------------------------------

OPTION_CASES = [
    # (argv with placeholders, expected text)
    (["generate", "--model", "ck_llava_next", "--image", SAMPLE, "--prompt", "<image>\nwhat is it?"], "holds the image placeholder '<image>'"),
    (["generate", "--model", "ck_llava_next", "--image", "EMPTY", "--prompt", "hi"], "an empty file (0 bytes)"),
    (["generate", "--model", "ck_llava_next", "--image", "TEXT", "--prompt", "hi"], "not an image format PIL can open"),
    (["generate", "--model", "ck_llava_next", "--image", "in/missing.png", "--prompt", "hi"], "image file not found: in/missing.png"),
    (["generate", "--model", "ck_llava_next", "--image", "in", "--prompt", "hi"], "is a directory"),
    (["generate", "--model", "ck_llava_next", "--image", SAMPLE, "--prompt", "hi", "--retention-ratio", "0"], "retention_ratio"),
    (["generate", "--model", "ck_llava_next", "--image", SAMPLE, "--prompt", "hi", "--retention-ratio", "1.5"], "retention_ratio"),
    (["generate", "--model", "ck_llava_next", "--image", SAMPLE, "--prompt", "hi", "--retention-ratio", "nan"], "retention_ratio"),
    (["generate", "--model", "ck_llava_next", "--image", SAMPLE, "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["generate", "--model", "ck_llava_next", "--image", SAMPLE, "--prompt", "hi", "--timing-runs", "0"], "--timing-runs must be >= 1"),
    (["generate", "--model", "ck_llava_next", "--image", SAMPLE, "--prompt", "hi", "--method", "nope"], "unknown method 'nope'"),
    (["generate", "--model", "ck_llava_next", "--image", SAMPLE, "--prompt", "hi", "--method", "globalcom2,random"], "give one method here"),
    (["generate", "--model", "ck_llava_next", "--image", SAMPLE, "--prompt", "hi", "--method-arg", "bogus=1"], "unknown option(s) bogus"),
    (["embed", "--model", "tiny", "--image", SAMPLE, "--out", "x.txt"], "--out must name a .safetensors file"),
    (["embed", "--model", "tiny", "--image", SAMPLE, "--out", "in/nodir/x.safetensors"], "does not exist"),
    (["embed", "--model", "tiny", "--image", SAMPLE, "--out", "A_FILE/x.safetensors"], "is a file, not a directory"),
    (["embed", "--model", "tiny", "--image", SAMPLE, "--out", "in/ok.safetensors", "--method", "fastv"], "FastV prunes inside the language model"),
    (["embed", "--model", "tiny", "--image", SAMPLE, "--out", "in/ok.safetensors", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["embed", "--model", "tiny", "--image", SAMPLE, "EMPTY", "--out", "in/ok.safetensors"], "an empty file (0 bytes)"),
    (["embed", "--model", "tiny", "--image", "TEXT", "--out", "in/ok.safetensors"], "not an image format"),
    (["efficiency", "--hardware", "TPUv9"], "unknown hardware 'TPUv9'"),
    (["efficiency", "--ratios", "abc"], "--ratios"),
    (["efficiency", "--ratios", "0"], "not in (0, 1]"),
    (["efficiency", "--text-tokens", "-1"], "--text-tokens must be >= 0"),
    (["efficiency", "--fastv-layer", "0"], "--fastv-layer"),
    (["efficiency", "--breakdown", "--fastv-layer", "2"], "cannot be combined with --fastv-layer"),
    (["efficiency", "--visual-tokens", "0"], "--visual-tokens"),
    (["efficiency", "--model", "A_FILE"], "cannot read"),
    (["bench", "--prompt", "<image> describe"], "holds the image placeholder"),
    (["bench", "--runs", "0"], "--runs must be >= 1"),
    (["bench", "--warmup", "-1"], "--warmup must be >= 0"),
    (["bench", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["bench", "--ratios", "2"], "--ratios"),
    (["bench", "--plot", "in"], "is a directory"),
    (["bench", "--image", "EMPTY"], "an empty file (0 bytes)"),
    (["bench", "--method", "globalcom2,nope"], "unknown method 'nope'"),
    (["visualize", "--image", SAMPLE, "--dpi", "5"], "--dpi must be between 20 and 600"),
    (["visualize", "--image", SAMPLE, "--output", "in"], "is a directory"),
    (["visualize", "--image", SAMPLE, "--prompt", "<image> x"], "holds the image placeholder"),
    (["visualize", "--image", "TEXT"], "not an image format"),
    (["visualize", "--image", SAMPLE, "--method", "fastv,globalcom2"], "give one method here"),
    (["eval", "--model", "tiny", "--benchmarks", "toyqa", "--data-root", "DATA", "--judge-url", "http://localhost:1/v1"],
     "--judge-url needs --judge-model"),
    (["eval", "--model", "tiny", "--benchmarks", "toyqa", "--data-root", "DATA", "--judge-url", "localhost", "--judge-model", "m"],
     "--judge-url: expected an http(s):// URL"),
    (["eval", "--model", "tiny", "--benchmarks", "toyqa", "--data-root", "DATA", "--limit", "0"], "--limit must be >= 1"),
    (["eval", "--model", "tiny", "--benchmarks", "toyqa", "--data-root", "DATA", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["eval", "--model", "tiny", "--benchmarks", "toyqa", "--data-root", "DATA", "--split", "toyqa"], "expected BENCH=SPLIT"),
    (["eval", "--model", "tiny", "--benchmarks", "nope", "--data-root", "DATA"], "--benchmarks"),
    (["eval", "--model", "tiny", "--benchmarks", ",", "--data-root", "DATA"], "give at least one benchmark"),
    (["eval", "--model", "tiny", "--benchmarks", "toyqa", "--data-root", "in/none"], "is not a directory"),
    (["eval", "--model", "tiny", "--benchmarks", "toyqa"], "--data-root is required"),
    (["eval", "--benchmarks", "toyqa", "--data-root", "DATA"], "--model is required"),
    (["eval", "--model", "tiny", "--benchmarks", "toyqa", "--data-root", "DATA", "--retention-ratio", "0"], "--retention-ratio"),
    (["eval", "--model", "tiny", "--benchmarks", "toyqa", "--data-root", "DATA", "--output-dir", "A_FILE"], "is not a directory"),
    (["demo", "--ratios", "0"], "--ratios"),
    (["demo", "--ratios", "abc"], "expected comma-separated numbers"),
    (["demo", "--image", "TEXT"], "not an image format"),
    (["demo", "--output-dir", "A_FILE"], "exists and is not a directory"),
]


def _fill(argv, ws):
    subst = {"EMPTY": ws["empty_png"], "TEXT": ws["text_png"], "A_FILE": ws["a_file"], "DATA": ws["data"]}
    out = []
    for a in argv:
        if a in ws and a.startswith("ck_"):
            out.append(str(ws[a]))
            continue
        for key, value in subst.items():
            if a == key or a.startswith(key + "/"):
                a = str(value) + a[len(key):]
        out.append(a)
    return out


@pytest.mark.parametrize("argv, expected", OPTION_CASES, ids=[f"{c[0][0]}-{i}" for i, c in enumerate(OPTION_CASES)])
def test_bad_option(argv, expected, ws, capsys, no_load):
    """CLEAN: one bad option at a time, every command."""
    from _eval_entry import make_toy

    make_toy(ws["data"])
    _run_clean(_fill(argv, ws), expected, ws, capsys)


EVAL_IMAGE_CASES = [("empty", b"", "an empty file (0 bytes)"), ("text", b"hello", "not an image format PIL can open"),
                    ("bomb", None, "decompression-bomb limit")]


@pytest.mark.parametrize("kind, content, expected", EVAL_IMAGE_CASES)
def test_eval_reads_every_image_header_before_the_model(kind, content, expected, ws, capsys, no_load, monkeypatch):
    """CLEAN: an eval image file that exists but cannot be read is named, with its sample, before
    the model loads (was: after loading, mid-run)."""
    from PIL import Image

    from _eval_entry import make_toy

    data = make_toy(ws["data"])
    target = data / "toyqa" / "images" / "1.png"
    if content is None:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the toy images are ~3,000 pixels: bombs now
    else:
        target.write_bytes(content)
    argv = ["eval", "--model", "tiny", "--benchmarks", "toyqa", "--data-root", str(data), "--output-dir", "out"]
    first = data / "toyqa" / "images" / ("0.png" if content is None else "1.png")
    line = _run_clean(argv, f"image files cannot be read, first: {first}: ", ws, capsys)
    assert expected in line and "(ToyQA val, sample 'q" in line


@pytest.mark.parametrize("kind, content, expected", EVAL_IMAGE_CASES)
def test_eval_image_header_reasons(kind, content, expected, tmp_path, monkeypatch):
    """VALUE (DataError): the reason of each unreadable file, from its header."""
    from PIL import Image

    from globalcom2._io import image_file_problem

    path = tmp_path / "x.png"
    if content is None:
        Image.new("RGB", (20, 20)).save(path)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    else:
        path.write_bytes(content)
    assert expected in image_file_problem(path)


def test_cli_names_a_decompression_bomb(ws, capsys, no_load, monkeypatch):
    """CLEAN: a decompression bomb given to --image is named (was the catch-all's type name)."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    _run_clean(["generate", "--model", ws["ck_llava_next"], "--image", SAMPLE, "--prompt", "hi"],
               f"cannot read image {SAMPLE}: Image size", ws, capsys)


# ------------------------------------------------------------------------------------------------
# 3. The Python API, on every family
# ------------------------------------------------------------------------------------------------


def _family(model_type):
    from conftest import family_model

    from globalcom2.models import family_for_model_type

    return family_model(family_for_model_type(model_type))


def _inputs(model_type):
    from PIL import Image

    model, processor = _family(model_type)
    from globalcom2.generation import build_prompt

    image = Image.open(SAMPLE).convert("RGB").resize((96, 72))
    return model, dict(processor(images=image, text=build_prompt(processor, "hi"), return_tensors="pt"))


@pytest.mark.parametrize("call, expected", [
    ("remove(None)", "model must be a torch.nn.Module"), ("is_applied('x')", "model must be a torch.nn.Module"),
    ("get_config(1)", "model must be a torch.nn.Module"), ("last_stats([])", "model must be a torch.nn.Module"),
    ("get_family(object())", "model must be a torch.nn.Module"),
])
def test_api_model_argument(call, expected):
    """TYPE: the model argument of the inspection functions (was AttributeError)."""
    import globalcom2

    with pytest.raises(TypeError, match=expected):
        eval(call, {k: getattr(globalcom2, k) for k in ("remove", "is_applied", "get_config", "last_stats", "get_family")})


APPLY_CASES = [
    ({"retention_ratio": 1.5}, ValueError, "retention_ratio"), ({"retention_ratio": 0}, ValueError, "retention_ratio"),
    ({"retention_ratio": True}, (TypeError, ValueError), "retention_ratio"), ({"retention_ratio": None}, (TypeError, ValueError), "retention_ratio"),
    ({"method": "nope"}, ValueError, "nope"), ({"layout": "diagonal"}, ValueError, "layout"),
]


@pytest.mark.parametrize("model_type", _family_ids())
@pytest.mark.parametrize("options, error, expected", APPLY_CASES)
def test_apply_arguments(model_type, options, error, expected):
    """VALUE/TYPE: apply's options, by name, on every family; nothing is patched."""
    import globalcom2

    model, _ = _family(model_type)
    with pytest.raises(error, match=expected):
        globalcom2.apply(model, **options)
    assert not globalcom2.is_applied(model)


def _bad_call(kind, inputs, model_type):
    import torch

    from globalcom2.models import family_for_model_type

    pixels = family_for_model_type(model_type).pixel_inputs  # Phi-4-multimodal: image_pixel_values
    bad = dict(inputs)
    if kind == "input_ids-list":
        bad["input_ids"] = bad["input_ids"].tolist()
    elif kind == "attention_mask-list":
        bad["attention_mask"] = bad["attention_mask"].tolist()
    elif kind == "input_ids-1d":
        bad["input_ids"] = bad["input_ids"][0]
        bad.pop("attention_mask")
    elif kind == "image_sizes-zero":
        bad["image_sizes"] = torch.zeros(bad[pixels].shape[0], 2, dtype=torch.long)
    elif kind == "image_sizes-negative":
        bad["image_sizes"] = -torch.full((bad[pixels].shape[0], 2), 100, dtype=torch.long)
    elif kind == "pixel_values-list":
        bad[pixels] = bad[pixels].tolist()
    return bad


CALL_CASES = [("input_ids-list", TypeError, "input_ids must be a"), ("attention_mask-list", TypeError, "attention_mask must be a"),
              ("input_ids-1d", TypeError, "input_ids must be a"), ("image_sizes-zero", ValueError, r"image_sizes\[0\]"),
              ("image_sizes-negative", ValueError, r"image_sizes\[0\]"), ("pixel_values-list", TypeError, "pixel_values must be")]


@pytest.mark.parametrize("model_type", _family_ids())
@pytest.mark.parametrize("kind, error, expected", CALL_CASES)
def test_patched_call_inputs(model_type, kind, error, expected):
    """TYPE/VALUE: a compressed call's inputs, named, on every family (was AttributeError or
    ZeroDivisionError from deep inside)."""
    import globalcom2

    model, inputs = _inputs(model_type)
    with globalcom2.compressed(model, retention_ratio=0.5):
        with pytest.raises(error, match=expected):
            model(**_bad_call(kind, inputs, model_type))


@pytest.mark.parametrize("model_type", _family_ids())
@pytest.mark.parametrize("kind, error, expected", [c for c in CALL_CASES if "image_sizes" in c[0] or "pixel" in c[0]]
                         + [("no-pixels", ValueError, "pixel_values"), ("fastv", ValueError, "FastV")])
def test_compress_images_inputs(model_type, kind, error, expected):
    """TYPE/VALUE: compress_images' inputs and method, on every family."""
    import globalcom2

    model, inputs = _inputs(model_type)
    if kind == "no-pixels":
        from globalcom2.models import family_for_model_type

        inputs.pop(family_for_model_type(model_type).pixel_inputs)
    if kind == "fastv":
        with pytest.raises(error, match=expected):
            globalcom2.compress_images(model, inputs, method="fastv")
        return
    with pytest.raises(error, match=expected):
        globalcom2.compress_images(model, _bad_call(kind, inputs, model_type))


@pytest.mark.parametrize("model_type", _family_ids())
@pytest.mark.parametrize("kind", ["dict", "input_ids-list", "other-family"])
def test_embed_prompt_arguments(model_type, kind):
    """TYPE/VALUE: embed_prompt refuses a dict, a list of ids, and embeddings from another family's
    model even where the widths agree (they silently gave wrong tokens)."""
    import globalcom2

    model, inputs = _inputs(model_type)
    emb = globalcom2.compress_images(model, inputs)
    ids = inputs["input_ids"]
    if kind == "dict":
        with pytest.raises(TypeError, match="embeddings must be ImageEmbeddings"):
            globalcom2.embed_prompt(model, {"embeddings": emb.embeddings, "counts": emb.counts}, ids)
    elif kind == "input_ids-list":
        with pytest.raises(TypeError, match="input_ids must be a torch.Tensor"):
            globalcom2.embed_prompt(model, emb, ids.tolist())
    else:
        other = next(m for m in _family_ids() if m != model_type)
        emb.model_type = other  # same width, same tokens: only the family tells them apart
        with pytest.raises(ValueError, match=f"come from a '{other}' model, this is a '{model_type}' one"):
            globalcom2.embed_prompt(model, emb, ids)


# -- load_embeddings: every damaged file names the file and the field ----------------------------


@pytest.fixture(scope="module")
def saved_embeddings(tmp_path_factory):
    import globalcom2

    model, inputs = _inputs("llava_next")
    emb = globalcom2.compress_images(model, inputs)
    path = tmp_path_factory.mktemp("emb") / "e.safetensors"
    emb.save(path)
    return path


def _rewrite(src, dst, change_meta=None, drop_tensor=False):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    if change_meta:
        change_meta(meta)
    if drop_tensor:
        tensors.pop("image.0")
        tensors["other"] = next(iter(tensors.values())) if tensors else __import__("torch").zeros(1)
    save_file(tensors, str(dst), metadata=meta)
    return dst


FIELDS = ("num_images", "counts", "vanilla_counts", "config", "model_type", "image_token_id")


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("damage", ["missing", "damaged"])
def test_load_embeddings_names_file_and_field(field, damage, saved_embeddings, tmp_path):
    """VALUE: a missing or damaged metadata field is named with the file (was KeyError /
    JSONDecodeError without either)."""
    from globalcom2 import load_embeddings

    def change(meta):
        if damage == "missing":
            meta.pop(field)
        else:
            meta[field] = "{oops" if field not in ("model_type",) else meta[field]

    if damage == "damaged" and field == "model_type":
        pytest.skip("any string is a model type; a wrong one is refused where it is used (embed_prompt)")
    path = _rewrite(saved_embeddings, tmp_path / "bad.safetensors", change)
    with pytest.raises(ValueError, match=f"{path}: .*'{field}'") as info:
        load_embeddings(path)
    assert not isinstance(info.value, KeyError)


@pytest.mark.parametrize("case, error, expected", [
    ("directory", IsADirectoryError, "is a directory, expected an embeddings file"),
    ("missing", FileNotFoundError, "no such embeddings file"),
    ("not-safetensors", ValueError, "cannot read .* as safetensors"),
    ("missing-tensor", ValueError, "tensor image.0 is not in it"),
])
def test_load_embeddings_bad_files(case, error, expected, saved_embeddings, tmp_path):
    """VALUE/OSError: the file itself."""
    from globalcom2 import load_embeddings

    path = {"directory": tmp_path, "missing": tmp_path / "none.safetensors"}.get(case)
    if case == "not-safetensors":
        path = tmp_path / "x.safetensors"
        path.write_text("hello")
    if case == "missing-tensor":
        path = _rewrite(saved_embeddings, tmp_path / "m.safetensors", drop_tensor=True)
    with pytest.raises(error, match=expected):
        load_embeddings(path)


# ------------------------------------------------------------------------------------------------
# 4. Regressions found on the way
# ------------------------------------------------------------------------------------------------


def test_checkpoint_name_keeps_hub_ids_and_tiny(tmp_path, monkeypatch):
    """Resuming an eval from another working folder was refused ("holds predictions of model
    '/old/cwd/...'"): every name was resolved as a path. Only names that exist on disk are."""
    from types import SimpleNamespace

    from globalcom2.eval.planning import checkpoint_name

    monkeypatch.chdir(tmp_path)
    for name in ("llava-hf/llava-v1.6-vicuna-7b-hf", "tiny", ""):
        assert checkpoint_name(SimpleNamespace(name_or_path=name)) == name
    (tmp_path / "ck").mkdir()
    assert checkpoint_name(SimpleNamespace(name_or_path="ck")) == str(tmp_path / "ck")


def test_jsonl_errors_name_the_line_of_the_file(tmp_path):
    """A JSONL error names the file's line (blank lines counted), not the row's number."""
    from globalcom2.eval.base import DataError, jsonl_rows

    path = tmp_path / "q.jsonl"
    path.write_text('{"question_id": 1, "text": "a"}\n\n\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"q\.jsonl, line 4: missing field\(s\) question_id"):
        list(jsonl_rows(path, "questions", ("question_id", "text")))


def test_a_killed_write_leaves_no_temp_file_for_ever(tmp_path):
    """A process killed inside atomic_path cannot remove its hidden temp file; the next write to the
    same file removes it (a dead process's, or one older than an hour), not a live writer's."""
    import time

    from globalcom2._io import atomic_path

    target = tmp_path / "e.safetensors"
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".e.safetensors.{int(child.stdout)}.abcd1234.tmp"
    dead.write_bytes(b"half")
    live = tmp_path / f".e.safetensors.{os.getppid()}.abcd1234.tmp"  # a running process's: kept
    live.write_bytes(b"busy")
    old = tmp_path / f".e.safetensors.{os.getppid()}.00000000.tmp"
    old.write_bytes(b"old")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert not dead.exists() and not old.exists() and live.exists()


def test_a_full_disk_during_embed_is_the_commands_write_error(tmp_path, monkeypatch, capsys):
    """safetensors raises its own SafetensorError (not an OSError) on a full disk: embed reported it
    through the catch-all ("SafetensorError: ..."); it is now 'cannot write FILE', and nothing is left."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    monkeypatch.chdir(tmp_path)
    code = main(["embed", "--model", "tiny", "--image", SAMPLE, "--out", "e.safetensors", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "globalcom2: error: cannot write e.safetensors:" in err and "No space left" in err, err
    assert "SafetensorError" not in err and list(tmp_path.iterdir()) == []


def test_exif_orientation_cli_upright_eval_as_stored(tmp_path):
    """The CLI's loader turns a photo upright by its EXIF orientation (transformers' load_image
    does too); the eval loaders read pixels as stored, as LLaVA's evaluation scripts do."""
    from PIL import Image

    from globalcom2.cli import load_image
    from globalcom2.eval.base import decode_image

    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    Image.new("RGB", (60, 20), (200, 30, 30)).save(path, exif=exif.tobytes())
    assert load_image(str(path)).size == (20, 60)
    assert decode_image(str(path)).size == (60, 20)
