"""benchmarks/gpu_bench.py (issue 28): its arguments, and a smoke run on the CPU (tiny model)."""

import runpy
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bench.py"


def _module():
    return runpy.run_path(str(SCRIPT), run_name="gpu_bench")


def test_defaults_are_the_wide_model_in_bf16_on_cuda_vanilla_vs_two_ratios():
    args = _module()["parse_args"]([])
    assert (args.model, args.device, args.dtype, args.ratio_list, args.hw) == ("wide-random", "cuda", "bfloat16", [0.25, 0.1], (672, 672))
    assert args.text_layers == 32 and args.runs >= 3 and args.warmup >= 1


@pytest.mark.parametrize("argv, message", [
    (["--ratios", "0.25,x"], "--ratios"), (["--ratios", "1.5"], "--ratios"), (["--image-size", "672"], "--image-size"),
    (["--runs", "0"], "--runs"), (["--warmup", "-1"], "--warmup"), (["--dtype", "float64"], "--dtype"),
])
def test_bad_arguments_are_refused_with_the_flag_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        _module()["parse_args"](argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_without_cuda_it_says_so(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _module()["main"](["--runs", "1"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_smoke_run_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "rows.json"
    code = _module()["main"](["--model", "tiny", "--device", "cpu", "--dtype", "float32", "--runs", "1", "--warmup", "0",
                              "--max-new-tokens", "2", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    for label in ("vanilla", "globalcom2 R=0.25", "globalcom2 R=0.1", "x decode", "generate +MiB"):
        assert label in text
    import json

    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["vanilla", "globalcom2 R=0.25", "globalcom2 R=0.1"]
