"""What bench and efficiency write besides their tables (issue 29, point 6): the plot's title says
what was measured and FastV is drawn at the tokens its layers process; the CSVs carry the numbers
the table or the JSON has (a numeric ratio for bench; hardware and model for efficiency)."""

from __future__ import annotations

import csv
import io
import json

import pytest

from globalcom2.bench import BenchRow, plot_rows
from globalcom2.cli import main

pytest.importorskip("matplotlib")


def _row(method, ratio, visual, effective, ms):
    return BenchRow(method=method, ratio=ratio, visual_tokens=visual, prefill_ms=ms, vision_ms=1.0, compress_ms=0.0,
                    generate_ms=2 * ms, tokens_per_s=1.0, peak_mem_mib=1.0, kv_cache_mib=1.0, effective_tokens=effective)


def test_the_plot_draws_fastv_at_its_layer_average_and_titles_what_was_measured(tmp_path):
    rows = [_row("vanilla", 1.0, 2340, 2340, 100.0),
            _row("globalcom2 R=0.25", 0.25, 622, 622, 50.0),
            _row("fastv R=0.25", 0.25, 2340, 1462.5, 70.0)]
    fig = plot_rows(rows, str(tmp_path / "p.png"), title="globalcom2 bench: tiny (float32 on cpu)",
                    note="tiny random demo model")
    assert (tmp_path / "p.png").stat().st_size > 0
    title = fig._suptitle.get_text()
    assert "tiny (float32 on cpu)" in title and "tiny random demo model" in title
    tokens_axis = fig.axes[1]
    drawn = {line.get_label(): list(line.get_ydata()) for line in tokens_axis.get_lines()}
    assert drawn["fastv"] == [1462.5]  # not 2340, the vanilla line: its saving is visible
    assert drawn["globalcom2"] == [622]


def test_bench_csv_has_a_numeric_ratio_and_the_plot_title_names_model_dtype_runs(tmp_path, capsys, monkeypatch):
    import globalcom2.bench as bench_module

    titles = []
    original = bench_module.plot_rows

    def spy(rows, path, title="", note=None):
        titles.append((title, note))
        return original(rows, path, title=title, note=note)

    monkeypatch.setattr(bench_module, "plot_rows", spy)
    plot = tmp_path / "bench.png"
    code = main(["bench", "--runs", "1", "--warmup", "0", "--max-new-tokens", "1", "--ratios", "0.25",
                 "--method", "globalcom2,fastv", "--format", "csv", "--plot", str(plot)])
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [float(r["ratio"]) for r in rows] == [1.0, 0.25, 0.25]
    assert [r["method"] for r in rows] == ["vanilla", "globalcom2 R=0.25", "fastv R=0.25"]
    assert plot.exists()
    (title, note), = titles
    for part in ("tiny", "float32", "median of 1 run", "1 new tokens"):
        assert part in title
    assert "random" in note


def test_efficiency_csv_keeps_the_hardware_and_model_of_the_json(capsys):
    assert main(["efficiency", "--ratios", "1,0.25", "--hardware", "H100", "--format", "json"]) == 0
    as_json = json.loads(capsys.readouterr().out)
    assert main(["efficiency", "--ratios", "1,0.25", "--hardware", "H100", "--format", "csv"]) == 0
    as_csv = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    for j, c in zip(as_json, as_csv):
        assert c["hardware"] == j["hardware"] == "H100"
        assert c["model"] == j["model"]
        assert int(c["text_tokens"]) == j["text_tokens"] and float(c["ratio"]) == j["ratio"]
