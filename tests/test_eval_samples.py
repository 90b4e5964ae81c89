"""``globalcom2 eval --list-benchmarks --verbose`` shows what each benchmark reads, and
``--write-sample-data`` writes a small synthetic copy of every benchmark that ``eval`` runs on
(issue 29, point 5)."""

from __future__ import annotations

import json

import pytest

from globalcom2.cli import main
from globalcom2.eval.base import benchmark_names, get_benchmark
from globalcom2.eval.samples import MAKERS


def _shipped() -> list[str]:
    """The package's own benchmarks (tests register toy ones in the same registry: tests/_eval_entry.py)."""
    return [n for n in benchmark_names() if type(get_benchmark(n)).__module__.startswith("globalcom2.")]


def test_every_benchmark_has_sample_data():
    assert sorted(MAKERS) == sorted(_shipped())


def test_write_sample_data_writes_folders_every_benchmark_loads(tmp_path, capsys):
    root = tmp_path / "data"
    assert main(["eval", "--write-sample-data", str(root)]) == 0
    out = capsys.readouterr().out
    assert "globalcom2 eval --model tiny --benchmarks textvqa,pope,mme" in out
    for name in _shipped():
        samples = get_benchmark(name).load(root)
        assert samples, name
        assert all(s.load_image() is not None for s in samples[:2])


def test_write_sample_data_of_some_benchmarks_and_an_unknown_one(tmp_path, capsys):
    assert main(["eval", "--write-sample-data", str(tmp_path / "d"), "--benchmarks", "pope"]) == 0
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["pope"]
    capsys.readouterr()
    assert main(["eval", "--write-sample-data", str(tmp_path / "e"), "--benchmarks", "pope,nope"]) == 1
    assert "no sample data for nope" in capsys.readouterr().err


def test_list_benchmarks_verbose_shows_each_layout(capsys):
    assert main(["eval", "--list-benchmarks"]) == 0
    short = capsys.readouterr().out
    assert main(["eval", "--list-benchmarks", "--verbose"]) == 0
    verbose = capsys.readouterr().out
    assert verbose.startswith(short.split("\n\n")[0])  # the same table first
    for name in benchmark_names():
        assert f"== {name} (" in verbose
    # file names that only the benchmarks' own descriptions hold
    for expected in ("llava_pope_test.jsonl", "TextVQA_0.5.1_val.json", "testdev_balanced_questions.json"):
        assert expected not in short and expected in verbose


def test_eval_on_the_tiny_model_runs_on_the_sample_data(tmp_path, capsys):
    root = tmp_path / "data"
    assert main(["eval", "--write-sample-data", str(root), "--benchmarks", "pope"]) == 0
    out = tmp_path / "results"
    code = main(["eval", "--model", "tiny", "--benchmarks", "pope", "--data-root", str(root), "--limit", "2",
                 "--retention-ratio", "1.0,0.25", "--output-dir", str(out), "--no-progress", "--format", "json"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary
    assert (out / "summary.md").exists()
