"""--visual-tokens (the field's 640 / 320 / 160 for LLaVA-NeXT) and the efficiency command's
--flash-attention / --breakdown / hardware sources."""

from __future__ import annotations

import json

import pytest

from globalcom2 import efficiency as eff
from globalcom2.cli import main


def test_the_maximum_comes_from_the_models_own_geometry(tiny):
    config = tiny[0].config
    assert eff.max_visual_tokens_of(config) == 2880  # (1 + 4 crops) x (336 / 14)^2
    assert eff.max_visual_tokens_of(config.to_dict()) == 2880
    config_dict = config.to_dict()
    config_dict["image_grid_pinpoints"] = [[336, 672], [1008, 1008]]  # up to 3 x 3 crops
    assert eff.max_visual_tokens_of(config_dict) == 10 * 576
    with pytest.raises(ValueError, match="image_grid_pinpoints"):
        eff.max_visual_tokens_of({"vision_config": {"image_size": 336, "patch_size": 14}})


def test_parse_visual_tokens_converts_with_the_maximum():
    assert eff.parse_visual_tokens("640,320,160", 2880) == [640 / 2880, 320 / 2880, 160 / 2880]
    for bad, message in (("0", r"\[1, 2880\]"), ("2881", r"\[1, 2880\]"), ("64.5", "whole number"), ("", "whole")):
        with pytest.raises(ValueError, match=message):
            eff.parse_visual_tokens(bad, 2880)


def test_efficiency_accepts_visual_tokens_and_shows_both(capsys):
    assert main(["efficiency", "--visual-tokens", "640,320,160", "--format", "json"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert [r["visual_tokens"] for r in rows] == [640, 320, 160]
    assert [r["ratio"] for r in rows] == pytest.approx([640 / 2880, 320 / 2880, 160 / 2880])
    assert "640 = R 0.2222" in captured.err and "of 2880" in captured.err


def test_efficiency_uses_a_local_checkpoints_own_maximum(tmp_path, capsys, tiny):
    config = tiny[0].config.to_dict()
    config["image_grid_pinpoints"] = [[336, 672], [1008, 1008]]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["efficiency", "--model", str(tmp_path), "--visual-tokens", "2880", "--format", "json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["visual_tokens"] == 2880 and row["ratio"] == pytest.approx(2880 / 5760)


@pytest.mark.parametrize(
    "command", [["efficiency", "--ratios", "0.5"], ["bench", "--ratios", "0.5"], ["visualize", "--image", "x.png", "--retention-ratio", "0.5"]]
)
def test_visual_tokens_and_ratios_are_exclusive(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--visual-tokens", "640"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "not allowed with argument" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bench_accepts_visual_tokens(capsys):
    code = main(["bench", "--runs", "1", "--warmup", "0", "--max-new-tokens", "1", "--visual-tokens", "640", "--format", "json"])
    captured = capsys.readouterr()
    assert code == 0
    rows = json.loads(captured.out)
    assert rows[1]["method"] == f"globalcom2 R={640 / 2880:g}"
    assert "640 = R 0.2222" in captured.err


def test_visualize_accepts_visual_tokens_and_checks_them_first(tmp_path, capsys):
    assert main(["visualize", "--image", str(tmp_path / "missing.png"), "--visual-tokens", "9999"]) != 0
    assert "--visual-tokens" in capsys.readouterr().err  # before the image or the model


def test_efficiency_flash_attention_changes_times_not_flops(capsys):
    assert main(["efficiency", "--ratios", "1", "--format", "json"]) == 0
    plain = json.loads(capsys.readouterr().out)[0]
    assert main(["efficiency", "--ratios", "1", "--format", "json", "--flash-attention"]) == 0
    flash = json.loads(capsys.readouterr().out)[0]
    assert flash["prefill_tflops"] == plain["prefill_tflops"] and flash["kv_cache_mib"] == plain["kv_cache_mib"]
    assert flash["prefill_ms"] < plain["prefill_ms"] and flash["flash_attention"] and not plain["flash_attention"]


def test_efficiency_breakdown_and_sources(capsys):
    assert main(["efficiency", "--ratios", "1", "--breakdown", "--hardware", "H200"]) == 0
    out = capsys.readouterr().out
    assert "datasheet" in out  # H200's figures are NVIDIA's
    for op in ("attn_norm", "softmax", "attn_add", "mlp_act", "mlp_add", "lm_head"):
        assert f"| {op} |" in out.replace("  ", " ") or op in out
    assert main(["efficiency", "--ratios", "1", "--hardware", "A100-40GB"]) == 0
    assert "LLM-Viewer" in capsys.readouterr().out
    assert main(["efficiency", "--ratios", "1,0.25", "--breakdown", "--format", "json"]) == 0
    out = capsys.readouterr().out
    decoder = json.JSONDecoder()
    table, end = decoder.raw_decode(out)
    ops = []
    rest = out[end:].strip()
    while rest:
        part, end = decoder.raw_decode(rest)
        ops.append(part)
        rest = rest[end:].strip()
    assert [r["visual_tokens"] for r in table] == [2880, 720] and len(ops) == 2
    for rows, row in zip(ops, table):
        assert sum(o["total_ms"] for o in rows) == pytest.approx(row["prefill_ms"], rel=1e-6)


def test_breakdown_with_fastv_is_refused(capsys):
    assert main(["efficiency", "--breakdown", "--fastv-layer", "2"]) != 0
    assert "--fastv-layer" in capsys.readouterr().err


def test_eval_accepts_visual_tokens(tmp_path, capsys, monkeypatch):
    from test_eval_runner import _run, make_toy

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = make_toy(tmp_path / "data", n=2)
    out = tmp_path / "out"
    argv = ["--model", "tiny", "--benchmarks", "toyqa", "--data-root", str(data), "--output-dir", str(out),
            "--visual-tokens", "2880,640", "--method", "globalcom2", "--no-progress", "--format", "json"]
    assert _run(argv) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)["rows"]
    assert [(r["method"], r["retention_ratio"]) for r in rows] == [("vanilla", 1.0), ("globalcom2", pytest.approx(640 / 2880))]
    assert "640 = R 0.2222" in captured.err
    assert _run([*argv[:-2], "--format", "json"]) == 0  # resumes under the same settings: nothing new to answer
    assert [r["samples"] for r in json.loads(capsys.readouterr().out)["rows"]] == [2, 2]


def test_eval_checks_visual_tokens_first(tmp_path, capsys):
    from globalcom2.cli import CLIError
    from test_eval_runner import _run

    with pytest.raises(CLIError, match="--visual-tokens"):
        _run(["--model", "tiny", "--benchmarks", "mme", "--data-root", str(tmp_path / "none"), "--visual-tokens", "0"])
