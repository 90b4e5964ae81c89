"""The ``globalcom2`` command line, run in-process and fully offline."""

from __future__ import annotations

import json

import subprocess
import sys

import pytest
import torch
from PIL import Image

from globalcom2.cli import build_prompt, main
from globalcom2.demo import sample_image_path
from globalcom2.picture import canvas_layout, render_kept_tokens, save_png

SAMPLE = str(sample_image_path())

# A minimal llava-style chat template, to exercise the apply_chat_template path.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Nothing may try the network: the env var, and the hub's constant read at import time."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """The tiny model and processor saved twice: plain, and with a chat template."""
    from globalcom2.tiny import build_tiny_llava_next

    model, processor = build_tiny_llava_next(seed=0)
    plain = tmp_path_factory.mktemp("tiny-plain")
    model.save_pretrained(plain)
    processor.save_pretrained(plain)
    processor.chat_template = CHAT_TEMPLATE
    chat = tmp_path_factory.mktemp("tiny-chat")
    model.save_pretrained(chat)
    processor.save_pretrained(chat)
    placeholders = int(
        (processor(images=Image.open(SAMPLE), text="<image>\nhi", return_tensors="pt").input_ids == model.config.image_token_id).sum()
    )
    return {"plain": plain, "chat": chat, "placeholders": placeholders}


def _error_line(capsys) -> str:
    """The one 'globalcom2: error:' line on stderr (and no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("globalcom2: error:")]
    assert len(lines) == 1, err
    return lines[0]


# -- help and version ------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["generate", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: globalcom2")
    if argv == ["generate", "--help"]:
        for option in ("--model", "--image", "--prompt", "--retention-ratio", "--layout", "--compare", "--device", "--dtype"):
            assert option in out
    if argv == ["demo", "--help"]:
        assert "--output-dir" in out and "RANDOM" in out


def test_version(capsys):
    import globalcom2

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"globalcom2 {globalcom2.__version__}"


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "generate" in capsys.readouterr().out


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--model", "x"])
    assert exc.value.code == 2
    assert "--image" in _error_line(capsys)


def test_cli_module_does_not_import_transformers():
    code = "import sys, globalcom2.cli; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# -- demo --------------------------------------------------------------------------------------------


def test_demo_writes_pictures_and_prints_counts(tmp_path, capsys):
    out_dir = tmp_path / "nested" / "demo"
    assert main(["demo", "--output-dir", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "RANDOM weights" in out and "meaningless" in out
    assert "globalcom2 generate --model llava-hf/llava-v1.6-vicuna-7b-hf" in out
    assert "Per-crop retention ratios" in out

    summary = json.loads((out_dir / "summary.json").read_text())
    runs = summary["runs"]
    assert {r["retention_ratio"] for r in runs} == {1.0, 0.5, 0.25, 0.1}
    assert {r["layout"] for r in runs} == {"official", "spatial"}
    vanilla = summary["vanilla_tokens"]
    assert f"vanilla LLaVA-NeXT: {vanilla:,}" in out
    for r in runs:
        assert r["vanilla_tokens"] == vanilla
        assert 0 < r["kept_tokens"] < vanilla
        assert f"{r['kept_tokens']:,} (" in out  # printed in the table
        assert len(r["crop_ratios"]) == 4  # 640x480 -> a 2x2 grid
        assert all(k <= t for k, t in zip(r["crop_kept"], r["crop_total"]))
    for layout in ("official", "spatial"):
        kept = [r["kept_tokens"] for r in sorted(runs, key=lambda r: r["retention_ratio"]) if r["layout"] == layout]
        assert kept == sorted(kept) and len(set(kept)) == len(kept)  # fewer tokens at smaller R
    quarter = next(r for r in runs if r["retention_ratio"] == 0.25 and r["layout"] == "official")
    assert 0.2 < quarter["kept_tokens"] / vanilla < 0.35

    pictures = sorted(out_dir.glob("*.png"))
    assert [p.name for p in pictures] == [f"kept_tokens_R{r}.png" for r in ("0.10", "0.25", "0.50", "1.00")]
    with Image.open(out_dir / "kept_tokens_R0.25.png") as img:
        img.load()
        assert img.format == "PNG" and img.mode == "RGB"
        assert img.width >= 336 + 672 and img.height >= 672  # thumbnail + a 2x2 crop canvas
    assert not list(out_dir.glob(".*tmp"))  # nothing half-written


def test_demo_bad_ratio_and_output_dir(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path), "--ratios", "0.5,0"]) != 0
    assert "retention_ratio must be in (0, 1]" in _error_line(capsys)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["demo", "--output-dir", str(blocker)]) != 0
    assert "not a directory" in _error_line(capsys)


# -- generate: errors --------------------------------------------------------------------------------


def _unused_local_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_generate_errors(tmp_path, capsys, saved_models):
    from transformers import CLIPVisionConfig, LlamaConfig

    bad_image = tmp_path / "bad.jpg"
    bad_image.write_bytes(b"this is not a JPEG")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    clip_dir, llama_dir = tmp_path / "clip", tmp_path / "llama"
    CLIPVisionConfig().save_pretrained(clip_dir)
    LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(llama_dir)
    model = str(saved_models["plain"])
    cases = [
        (["--model", model, "--image", str(tmp_path / "missing.jpg")], "image file not found"),
        (["--model", model, "--image", str(bad_image)], "cannot read image"),
        (["--model", model, "--image", str(tmp_path)], "is a directory"),
        (["--model", model, "--image", f"http://127.0.0.1:{_unused_local_port()}/x.jpg"], "cannot fetch image URL"),
        (["--model", str(empty_dir), "--image", SAMPLE], "not a model directory"),
        (["--model", str(tmp_path / "no-such-dir"), "--image", SAMPLE], "model directory not found"),
        (["--model", "nobody-here/no-such-model", "--image", SAMPLE], "cannot load model"),
        (["--model", str(clip_dir), "--image", SAMPLE], "'clip_vision_model' model; globalcom2 supports LLaVA-NeXT"),
        (["--model", str(llama_dir), "--image", SAMPLE], "'llama' model; globalcom2 supports LLaVA-NeXT"),
        (["--model", model, "--image", SAMPLE, "--retention-ratio", "0"], "retention_ratio must be in (0, 1], got 0.0"),
        (["--model", model, "--image", SAMPLE, "--retention-ratio", "1.5"], "retention_ratio must be in (0, 1], got 1.5"),
    ]
    for argv, expected in cases:
        code = main(["generate", "--prompt", "hi", *argv])
        assert code != 0, argv
        line = _error_line(capsys)
        assert expected in line, (argv, line)
        assert capsys.readouterr().out == ""


# -- generate: success, offline ----------------------------------------------------------------------


def test_generate_compare_on_saved_tiny_model(saved_models, capsys):
    code = main(
        ["generate", "--model", str(saved_models["plain"]), "--image", SAMPLE, "--prompt", "hi",
         "--max-new-tokens", "3", "--compare", "--timing-runs", "1", "--device", "cpu"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = captured.out
    vanilla = saved_models["placeholders"]  # the reloaded processor still writes the vanilla count
    assert "== GlobalCom2 (retention ratio 0.25, layout official) ==" in out
    assert "== vanilla LLaVA-NeXT ==" in out
    assert out.count("answer: ") == 2
    assert out.count("prefill: ") == 2
    kept_line = next(line for line in out.splitlines() if line.startswith("visual tokens: ") and " of " in line)
    kept = int(kept_line.split()[2].replace(",", ""))
    assert kept_line.split()[4] == f"{vanilla:,}"
    assert 0 < kept < vanilla
    assert f"visual tokens: {vanilla:,}\n" in out
    assert "summary: GlobalCom2 keeps" in out
    assert "(640x480 px, width x height; thumbnail + 2x2 crops (rows x columns))" in out  # every pair labelled
    assert "Traceback" not in captured.err


def test_generate_with_chat_template(saved_models, capsys):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(saved_models["chat"])
    assert processor.num_additional_image_tokens == 1  # survives save/load in transformers 5
    assert build_prompt(processor, "hi") == "USER: <image>\nhi ASSISTANT:"
    code = main(
        ["generate", "--model", str(saved_models["chat"]), "--image", SAMPLE, "--prompt", "hi",
         "--max-new-tokens", "2", "--retention-ratio", "0.1", "--layout", "spatial"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "== GlobalCom2 (retention ratio 0.1, layout spatial) ==" in out
    assert out.count("answer: ") == 1 and "vanilla LLaVA-NeXT" not in out


def test_build_prompt_fallback():
    class NoTemplate:
        chat_template = None
        image_token = "<image>"

    assert build_prompt(NoTemplate(), "What is it?") == "<image>\nWhat is it?"


# -- picture -----------------------------------------------------------------------------------------


def test_canvas_layout_matches_the_processor_arithmetic():
    # 640x480 into 672x672: width-bound, height ceil(480 * 1.05) = 504, padded 84 px top and bottom.
    assert canvas_layout((480, 640), (2, 2)) == {
        "height": 672, "width": 672, "new_height": 504, "new_width": 672, "top": 84, "left": 0,
    }
    lay = canvas_layout((1000, 300), (3, 1))
    assert (lay["height"], lay["width"], lay["new_height"]) == (1008, 336, 1008) and lay["left"] == (336 - lay["new_width"]) // 2


def test_single_view_picture_and_atomic_save(tmp_path):
    from globalcom2.core import plans

    plan = plans.plan_single_view(torch.arange(576.0), 0.25)
    img = render_kept_tokens(Image.new("RGB", (50, 40), (200, 100, 50)), plan, title="one view")
    assert img.width >= 336 and img.height >= 336
    path = save_png(img, tmp_path / "sub" / "one.png")
    assert Image.open(path).size == img.size
    with pytest.raises(OSError):
        save_png(img, tmp_path / "sub")  # a directory: nothing is left behind
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["one.png"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_python_dash_m_entry_points_give_one_error_line(tmp_path):
    """`python -m globalcom2` and `python -m globalcom2.cli` (the torchrun/accelerate lines) behave
    like the console script, including subcommand errors (regression: a second copy of cli.py)."""
    import subprocess
    import sys

    for module in ("globalcom2", "globalcom2.cli"):
        proc = subprocess.run(
            [sys.executable, "-m", module, "eval", "--model", "tiny", "--benchmarks", "nope", "--data-root", str(tmp_path)],
            capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.strip().splitlines() == [
            line for line in proc.stderr.strip().splitlines() if line.startswith("globalcom2: error: --benchmarks")
        ]


@pytest.mark.parametrize("method, marker", [("fastervlm", "== fastervlm (retention ratio 0.25, layout spatial) =="),
                                            ("fastv", "after layer 2 (FastV)"),
                                            ("pooling", "== pooling (retention ratio 0.25) ==")])
def test_generate_with_another_method(saved_models, capsys, method, marker):
    code = main(["generate", "--model", str(saved_models["plain"]), "--image", SAMPLE, "--prompt", "hi",
                 "--max-new-tokens", "2", "--method", method, "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert marker in captured.out and "answer: " in captured.out
    assert ("per-crop retention" in captured.out) == (method == "fastervlm")


def test_generate_method_errors(saved_models, capsys):
    model = str(saved_models["plain"])
    for extra, expected in [(["--method", "tome"], "unknown method"), (["--method", "pooling", "--layout", "spatial"], "layout"),
                            (["--method-arg", "scoring=nope"], "scoring")]:
        assert main(["generate", "--model", model, "--image", SAMPLE, "--prompt", "hi", *extra]) == 1
        assert expected in _error_line(capsys)


def test_parse_method_arguments_adds_the_commands_layout_flag():
    import argparse

    from globalcom2.cli import parse_method_arguments

    ns = argparse.Namespace(method="globalcom2", method_arg=["layout=official", "allocation=uniform"], layout="spatial")
    assert parse_method_arguments(ns) == (["globalcom2"], {"layout": "spatial", "allocation": "uniform"})
    ns.layout = None
    assert parse_method_arguments(ns)[1] == {"layout": "official", "allocation": "uniform"}
    del ns.layout  # eval has no --layout flag
    assert parse_method_arguments(ns)[1] == {"layout": "official", "allocation": "uniform"}
