"""The evaluation runner (``globalcom2.eval.runner``) and the ``eval`` command, in one process.

A toy benchmark (``_eval_entry.ToyQA``: 6 questions, every third text-only) and the tiny random
LLaVA-NeXT; the multi-process sharding is tested in ``test_eval_distributed.py``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

import globalcom2
from globalcom2.eval import runner
from globalcom2.eval.base import DataError
from globalcom2.eval.runner import (
    DistEnv,
    append_records,
    build_prompt,
    consolidate,
    plan_runs,
    predictions_path,
    read_records,
    run_eval,
    score_outputs,
    shard_path,
)

from _eval_entry import ToyQA, make_toy  # noqa: F401  (registers "toyqa")

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
IDS = [f"q{i}" for i in range(6)]
REAL_GENERATE_BATCH = runner.generate_batch


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def data(tmp_path):
    return make_toy(tmp_path / "data", n=6)


def _ids(path):
    return [r["id"] for r in read_records(path)[0]]


def _keyed(path):
    return [(r["id"], r["prediction"], r["visual_tokens"]) for r in read_records(path)[0]]


class Crash(Exception):
    """Stands for a crash or an interruption in the middle of a run."""


def _count_batches(monkeypatch, fail_after=None):
    """Wrap generate_batch: count the samples it answers; raise :class:`Crash` after N calls."""
    seen = []
    original = REAL_GENERATE_BATCH

    def wrapped(model, processor, samples, max_new_tokens):
        if fail_after is not None and len(seen) >= fail_after:
            raise Crash
        seen.append([s.id for s in samples])
        return original(model, processor, samples, max_new_tokens)

    monkeypatch.setattr(runner, "generate_batch", wrapped)
    return seen


# -- the distributed environment -------------------------------------------------------------------


def test_dist_env_from_env():
    assert DistEnv.from_env({}) == DistEnv(0, 1, 0)
    env = DistEnv.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.is_distributed, env.is_main) == (3, 4, 1, True, False)
    assert DistEnv.from_env({"RANK": "2", "WORLD_SIZE": "3"}).local_rank == 2  # LOCAL_RANK defaults to RANK
    assert DistEnv.from_env({}).device() in ("cpu", "cuda:0")
    with pytest.raises(ValueError, match="RANK=2 must be < WORLD_SIZE=2"):
        DistEnv.from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        DistEnv.from_env({"WORLD_SIZE": "two"})
    single = DistEnv()
    single.init()
    single.barrier()  # no-ops in one process
    single.shutdown()


# -- JSONL files ------------------------------------------------------------------------------------


def test_read_records_drops_a_torn_last_line_only(tmp_path):
    path = tmp_path / "p.jsonl"
    assert read_records(path) == ([], False)
    append_records(path, [{"id": "a", "prediction": "x"}, {"id": "b", "prediction": "y"}])
    assert read_records(path) == ([{"id": "a", "prediction": "x"}, {"id": "b", "prediction": "y"}], False)
    with open(path, "a") as f:
        f.write('{"id": "c", "predi')  # a crash in the middle of a write
    records, repair = read_records(path)
    assert [r["id"] for r in records] == ["a", "b"] and repair
    path.write_text('{"id": "a"}\n{"id": "b"}')  # complete JSON, missing newline: kept, but repaired
    assert read_records(path) == ([{"id": "a"}, {"id": "b"}], True)
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(DataError, match="line 2"):
        read_records(path)
    path.write_text('{"id": "a"}\n{"no_id": 1}\n')  # the last line, unusable: dropped
    assert read_records(path) == ([{"id": "a"}], True)


def test_consolidate_merges_shards_dedupes_and_orders(tmp_path):
    main = tmp_path / "globalcom2-R0.25.jsonl"
    append_records(main, [{"id": "q3", "p": "main"}, {"id": "q0", "p": "main"}])
    with open(main, "a") as f:
        f.write('{"id": "q4", "p": "to')
    append_records(shard_path(main, 0), [{"id": "q1", "p": "s0"}, {"id": "q3", "p": "s0"}])
    append_records(shard_path(main, 2), [{"id": "q2", "p": "s2"}, {"id": "old", "p": "s2"}])
    assert shard_path(main, 2).name == "globalcom2-R0.25.rank2.jsonl"
    merged = consolidate(main, order=["q0", "q1", "q2", "q3", "q4"])
    assert [(r["id"], r["p"]) for r in merged] == [("q0", "main"), ("q1", "s0"), ("q2", "s2"), ("q3", "main"), ("old", "s2")]
    assert read_records(main) == (merged, False)
    assert not shard_path(main, 0).exists() and not shard_path(main, 2).exists()
    mtime = main.stat().st_mtime_ns
    assert consolidate(main, order=["q0", "q1", "q2", "q3", "q4"]) == merged
    assert main.stat().st_mtime_ns == mtime  # nothing to change: not rewritten
    assert consolidate(tmp_path / "absent.jsonl") == [] and not (tmp_path / "absent.jsonl").exists()


# -- planning and prompts -------------------------------------------------------------------------


def test_plan_runs():
    runs = plan_runs([1.0, 0.25, 0.1, 0.25], ["globalcom2", "pooling"])
    assert [(r.method, r.ratio) for r in runs] == [
        ("vanilla", 1.0), ("globalcom2", 0.25), ("globalcom2", 0.1), ("pooling", 0.25), ("pooling", 0.1)
    ]
    assert runs[0].config is None and runs[1].config["layout"] == "official"
    assert [(r.method, r.ratio) for r in plan_runs([1.0], ["globalcom2"])] == [("vanilla", 1.0)]
    assert [(r.method, r.ratio) for r in plan_runs([0.5], ["GlobalCom2"])] == [("globalcom2", 0.5)]
    assert [(r.method, r.ratio) for r in plan_runs([0.5], ["vanilla"])] == [("vanilla", 1.0)]
    assert plan_runs([0.5], ["globalcom2"], {"layout": "spatial"})[0].config["layout"] == "spatial"
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        plan_runs([0.5], ["nope"])
    with pytest.raises(ValueError, match="bogus belong to none of the methods globalcom2; their options: allocation, count, importance, layout"):
        plan_runs([0.5], ["globalcom2"], {"bogus": 1})
    with pytest.raises(ValueError, match="retention_ratio is not a method option"):
        plan_runs([0.5], ["globalcom2"], {"retention_ratio": 0.3})
    with pytest.raises(ValueError, match="layout"):
        plan_runs([0.5], ["globalcom2"], {"layout": "diagonal"})
    # each option goes to the methods that have it
    runs = plan_runs([0.5], ["globalcom2", "random", "pooling"], {"seed": 3, "layout": "spatial"})
    assert [r.options for r in runs] == [{"layout": "spatial"}, {"seed": 3, "layout": "spatial"}, {}]
    with pytest.raises(ValueError, match="not in"):
        plan_runs([1.5], ["globalcom2"])


def test_build_prompt(tiny):
    _, processor = tiny
    assert build_prompt(processor, "Q?") == "<image>\nQ?"
    assert build_prompt(processor, "Q?", num_images=0) == "Q?"
    old = processor.chat_template
    try:
        processor.chat_template = CHAT_TEMPLATE
        assert build_prompt(processor, "Q?") == "USER: <image>\nQ? ASSISTANT:"
        assert build_prompt(processor, "Q?", num_images=0) == "USER: Q? ASSISTANT:"
    finally:
        processor.chat_template = old


# -- runs -----------------------------------------------------------------------------------------


def test_run_eval_writes_predictions_and_summaries(tiny, data, tmp_path):
    model, processor = tiny
    out = tmp_path / "out"
    summary = run_eval(model, processor, ["toyqa"], data, [1.0, 0.25], ["globalcom2", "pooling"],
                       output_dir=out, batch_size=3, progress=False)
    assert not globalcom2.is_applied(model)
    folder = out / "predictions" / "toyqa-val"
    assert sorted(p.name for p in folder.glob("*.jsonl")) == ["globalcom2-R0.25.jsonl", "pooling-R0.25.jsonl", "vanilla-R1.jsonl"]
    vanilla = read_records(folder / "vanilla-R1.jsonl")[0]
    compressed = read_records(folder / "globalcom2-R0.25.jsonl")[0]
    assert [r["id"] for r in vanilla] == IDS == [r["id"] for r in compressed]
    for r in vanilla + compressed:
        assert set(r) == {"id", "prediction", "target", "meta", "visual_tokens", "effective_visual_tokens", "latency_ms"}
        assert r["latency_ms"] > 0 and isinstance(r["prediction"], str)
    for v, c in zip(vanilla, compressed):
        if v["id"] in ("q2", "q5"):  # text-only questions
            assert v["visual_tokens"] == c["visual_tokens"] == 0
        else:
            assert 0 < c["visual_tokens"] < v["visual_tokens"] * 0.5
    # The vanilla count is the prompt's <image> placeholders.
    img = processor(images=ToyQA().load(data)[0].load_image(), text="<image>\nhi", return_tensors="pt")
    assert vanilla[0]["visual_tokens"] == int((img.input_ids == model.config.image_token_id).sum())

    meta = json.loads((folder / "globalcom2-R0.25.meta.json").read_text())
    assert meta["config"]["method"] == "globalcom2" and meta["retention_ratio"] == 0.25

    assert [(r.method, r.retention_ratio, r.samples) for r in summary.rows] == [
        ("vanilla", 1.0, 6), ("globalcom2", 0.25, 6), ("pooling", 0.25, 6)
    ]
    row = summary.row("toyqa", "globalcom2", 0.25)
    assert row.metric == "accuracy" and row.score == row.metrics["accuracy"] and "answered" in row.metrics
    assert row.visual_tokens == pytest.approx(sum(r["visual_tokens"] for r in compressed) / 6)
    assert Path(row.submission) == out / "submissions" / "toyqa-val" / "globalcom2-R0.25.json"
    saved = json.loads((out / "summary.json").read_text())
    assert saved == summary.to_dict()
    md = (out / "summary.md").read_text()
    assert "| Method " in md and "ToyQA" in md and "globalcom2" in md and "Latency (ms)" in md


def test_interrupted_run_resumes_without_loss_or_duplicates(tiny, data, tmp_path, monkeypatch):
    model, processor = tiny
    out = tmp_path / "out"
    _count_batches(monkeypatch, fail_after=3)  # the untimed warm-up, two batches, then the crash
    with pytest.raises(Crash):
        run_eval(model, processor, ["toyqa"], data, [0.25], output_dir=out, batch_size=2, progress=False)
    main = predictions_path(out, "toyqa", "val", "globalcom2", 0.25)
    assert _ids(main) == IDS[:4]  # every finished batch was kept
    assert not globalcom2.is_applied(model)

    seen = _count_batches(monkeypatch)
    run_eval(model, processor, ["toyqa"], data, [0.25], output_dir=out, batch_size=2, progress=False)
    assert seen == [["q4", "q5"]] * 2  # the warm-up, then only what was missing
    assert _ids(main) == IDS

    fresh = tmp_path / "fresh"
    run_eval(model, processor, ["toyqa"], data, [0.25], output_dir=fresh, batch_size=2, progress=False)
    assert _keyed(main) == _keyed(predictions_path(fresh, "toyqa", "val", "globalcom2", 0.25))


def test_finished_run_only_rescores(tiny, data, tmp_path, monkeypatch):
    model, processor = tiny
    out = tmp_path / "out"
    kw = dict(limit=3, batch_size=3, output_dir=out, progress=False)
    first = run_eval(model, processor, ["toyqa"], data, [1.0, 0.5], **kw)
    seen = _count_batches(monkeypatch)
    again = run_eval(model, processor, ["toyqa"], data, [1.0, 0.5], **kw)
    assert seen == [] and again.to_dict() == first.to_dict()
    assert run_eval(None, None, ["toyqa"], data, [1.0, 0.5], **kw).to_dict() == first.to_dict()
    with pytest.raises(ValueError, match="no model was given"):
        run_eval(None, None, ["toyqa"], data, [0.1], output_dir=out, progress=False)


def test_resume_merges_leftover_shards_and_a_torn_line(tiny, data, tmp_path, monkeypatch):
    """Leftovers of a crashed 3-process run are done work; a single process finishes the rest."""
    model, processor = tiny
    out = tmp_path / "out"
    main = predictions_path(out, "toyqa", "val", "vanilla", 1.0)
    ref_dir = tmp_path / "ref"
    run_eval(model, processor, ["toyqa"], data, [1.0], output_dir=ref_dir, progress=False)
    ref = read_records(predictions_path(ref_dir, "toyqa", "val", "vanilla", 1.0))[0]
    by_id = {r["id"]: r for r in ref}
    append_records(main, [by_id["q0"]])
    append_records(shard_path(main, 1), [by_id["q1"], by_id["q4"]])
    with open(shard_path(main, 1), "a") as f:
        f.write('{"id": "q7", "pred')
    append_records(shard_path(main, 2), [by_id["q2"], by_id["q0"]])  # q0 twice
    seen = _count_batches(monkeypatch)
    run_eval(model, processor, ["toyqa"], data, [1.0], output_dir=out, progress=False)
    assert seen == [["q3"], ["q3"], ["q5"]]  # warm-up, then the missing ones
    assert _keyed(main) == [(r["id"], r["prediction"], r["visual_tokens"]) for r in ref]
    assert sorted(p.name for p in main.parent.iterdir()) == ["vanilla-R1.jsonl", "vanilla-R1.meta.json"]


def test_resume_with_other_method_options_is_refused(tiny, data, tmp_path):
    model, processor = tiny
    out = tmp_path / "out"
    run_eval(model, processor, ["toyqa"], data, [0.5], limit=2, output_dir=out, progress=False)
    with pytest.raises(ValueError, match="layout.*another --output-dir"):
        run_eval(model, processor, ["toyqa"], data, [0.5], method_options={"layout": "spatial"}, output_dir=out, progress=False)
    # the same options spelled out are the same run
    run_eval(model, processor, ["toyqa"], data, [0.5], method_options={"layout": "official"}, limit=3, output_dir=out, progress=False)
    assert _ids(predictions_path(out, "toyqa", "val", "globalcom2", 0.5)) == IDS[:3]


def test_limit_split_and_unscorable_split(tiny, data, tmp_path):
    model, processor = tiny
    out = tmp_path / "out"
    summary = run_eval(model, processor, ["toyqa"], data, [1.0], limit=2, split={"toyqa": "test"},
                       output_dir=out, progress=False)
    row = summary.rows[0]
    assert (row.split, row.samples, row.score, row.metrics, row.relative) == ("test", 2, None, {}, None)
    assert json.loads(Path(row.submission).read_text()) == [
        {"question_id": "q0", "answer": r["prediction"]} for r in read_records(row.predictions)[0][:1]
    ] + [{"question_id": "q1", "answer": read_records(row.predictions)[0][1]["prediction"]}]
    assert "toyqa-test" in row.predictions
    with pytest.raises(ValueError, match="unknown split"):
        run_eval(model, processor, ["toyqa"], data, [1.0], split={"toyqa": "nope"}, output_dir=out, progress=False)
    with pytest.raises(ValueError, match="not among the benchmarks"):
        run_eval(model, processor, ["toyqa"], data, [1.0], split={"pope": "test"}, output_dir=out, progress=False)
    with pytest.raises(DataError, match="questions.jsonl"):
        run_eval(model, processor, ["toyqa"], tmp_path / "out", [1.0], output_dir=out, progress=False)


# -- re-scoring and the summary -------------------------------------------------------------------


def _write_run(out, method, ratio, rows, shard=None):
    main = predictions_path(out, "toyqa", "val", method, ratio)
    append_records(shard_path(main, shard) if shard is not None else main, [
        {"id": i, "prediction": p, "target": t, "meta": {}, "visual_tokens": v, "effective_visual_tokens": v, "latency_ms": ms}
        for i, p, t, v, ms in rows
    ])


def test_score_outputs_from_the_jsonl_alone(tmp_path):
    out = tmp_path / "out"
    _write_run(out, "vanilla", 1.0, [("a", "dog", "dog", 100, 10.0), ("b", "cat", "cat", 100, 30.0),
                                     ("c", "x", "dog", 50, 20.0), ("d", "x", "cat", 50, 40.0)])
    _write_run(out, "globalcom2", 0.25, [("a", "dog", "dog", 25, 5.0), ("b", "x", "cat", 25, 7.0)])
    _write_run(out, "globalcom2", 0.25, [("c", "x", "dog", 12, 6.0), ("d", "x", "cat", 12, 100.0)], shard=1)
    summary = score_outputs(out)
    assert [(r.method, r.retention_ratio) for r in summary.rows] == [("vanilla", 1.0), ("globalcom2", 0.25)]
    v, g = summary.rows
    assert (v.score, v.relative, v.visual_tokens, v.latency_ms) == (50.0, 100.0, 75.0, 25.0)
    assert (g.score, g.relative, g.samples, g.visual_tokens, g.latency_ms) == (25.0, 50.0, 4, 18.5, 6.5)
    assert not list((out / "predictions" / "toyqa-val").glob("*.rank*.jsonl"))  # the shard was merged
    def cells(table):
        return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()]

    assert cells(summary.paper_table()) == [
        ["Method", "R", "ToyQA", "Avg. (%)", "Tokens"],
        ["------------", "-----:", "-------------:", "---------:", "-------:"],
        ["vanilla", "1", "50.0", "100.0", "75.0"],
        ["globalcom2", "0.25", "25.0 (50.0%)", "50.0", "18.5"],
    ]
    assert cells(summary.detail_table())[3] == [
        "ToyQA", "val", "globalcom2", "0.25", "accuracy", "25.00", "50.0", "4", "18.5", "6.5"
    ]
    rows = summary.format("csv").splitlines()
    assert rows[0].startswith("title,split,method,retention_ratio,metric,score,relative") and len(rows) == 3
    assert json.loads(summary.format("json"))["rows"][1]["relative"] == 50.0
    assert json.loads((out / "summary.json").read_text()) == summary.to_dict()
    with pytest.raises(FileNotFoundError):
        score_outputs(tmp_path / "nothing")


def test_fastv_effective_tokens_column(tmp_path):
    out = tmp_path / "out"
    main = predictions_path(out, "toyqa", "val", "fastv", 0.5)
    append_records(main, [{"id": "a", "prediction": "dog", "target": "dog", "meta": {}, "visual_tokens": 100,
                           "effective_visual_tokens": 62.5, "latency_ms": 1.0}])
    table = score_outputs(out).detail_table()
    assert "Eff. tokens" in table and "62.5" in table


# -- the command ------------------------------------------------------------------------------------


def _parse(argv):
    from globalcom2.cli.eval import add_parser

    parser = argparse.ArgumentParser(prog="globalcom2")
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["eval", *argv])


def _run(argv):
    from globalcom2.cli.eval import run

    return run(_parse(argv))


def test_cli_help_lists_launchers(capsys):
    with pytest.raises(SystemExit):
        _parse(["--help"])
    text = capsys.readouterr().out
    assert "torchrun --nproc_per_node=8 -m globalcom2 eval" in text and "accelerate launch" in text
    assert "--method-arg" in text and "--rescore" in text


def test_cli_list_benchmarks(capsys):
    assert _run(["--list-benchmarks"]) == 0
    out = capsys.readouterr().out
    assert "toyqa" in out and "accuracy" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--benchmarks", "nope"], "--benchmarks: unknown benchmark 'nope'"),
        ([], "--benchmarks: give at least one"),
        (["--benchmarks", "toyqa", "--retention-ratio", "0,0.5"], "--retention-ratio: ratio '0' is not in (0, 1]"),
        (["--benchmarks", "toyqa", "--method", "bogus"], "--method: unknown method 'bogus'"),
        (["--benchmarks", "toyqa", "--method-arg", "layout"], "--method-arg: method option 'layout' must look like KEY=VALUE"),
        (["--benchmarks", "toyqa", "--method-arg", "seed=3"], "--method-arg: unknown option(s) seed for globalcom2"),
        (["--benchmarks", "toyqa", "--method-arg", "layout=diagonal"], "layout"),
        (["--benchmarks", "toyqa", "--method-arg", "retention_ratio=0.3"], "retention_ratio is not a method option"),
        (["--benchmarks", "toyqa", "--split", "toyqa"], "--split: expected BENCH=SPLIT"),
        (["--benchmarks", "toyqa", "--limit", "0", "--model", "tiny", "--data-root", "."], "--limit must be >= 1"),
        (["--benchmarks", "toyqa", "--batch-size", "0", "--model", "tiny", "--data-root", "."], "--batch-size must be >= 1"),
        (["--benchmarks", "toyqa", "--data-root", "."], "--model is required"),
        (["--benchmarks", "toyqa", "--model", "tiny"], "--data-root is required"),
        (["--benchmarks", "toyqa", "--model", "tiny", "--data-root", "/no/such/dir"], "is not a directory"),
        (["--rescore", "--output-dir", "/no/such/dir"], "--rescore: no predictions"),
        (["--benchmarks", "toyqa", "--judge-api-key-env", "GC2_NO_SUCH_VAR"], "GC2_NO_SUCH_VAR is not set"),
    ],
)
def test_cli_errors(argv, message, monkeypatch):
    from globalcom2.cli import CLIError

    monkeypatch.delenv("GC2_NO_SUCH_VAR", raising=False)
    with pytest.raises(CLIError) as info:
        _run(argv)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_cli_data_errors_are_one_line(tmp_path):
    from globalcom2.cli import CLIError

    (tmp_path / "toyqa").mkdir()
    (tmp_path / "toyqa" / "questions.jsonl").write_text('{"id": 1}\n')
    with pytest.raises(CLIError, match=r"questions.jsonl, line 1: missing field\(s\) question, answer"):
        _run(["--benchmarks", "toyqa", "--model", "tiny", "--data-root", str(tmp_path), "--output-dir", str(tmp_path / "o")])
    with pytest.raises(CLIError, match="split given for pope"):
        _run(["--benchmarks", "toyqa", "--split", "pope=test", "--model", "tiny", "--data-root", str(tmp_path)])


def test_cli_error_line_through_an_entry_point(capsys):
    from _eval_entry import main

    assert main(["eval", "--benchmarks", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("globalcom2: error: --benchmarks: unknown benchmark 'nope'") and "Traceback" not in err


def test_cli_run_resume_and_rescore(data, tmp_path, capsys, monkeypatch):
    import globalcom2.cli.loading as main_cli

    out = tmp_path / "out"
    base = ["--model", "tiny", "--benchmarks", "toyqa", "--data-root", str(data), "--output-dir", str(out),
            "--retention-ratio", "1,0.25", "--method", "globalcom2,random", "--method-arg", "seed=3",
            "--method-arg", "layout=spatial", "--batch-size", "3", "--no-progress"]
    assert _run([*base, "--limit", "4", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["method"], r["retention_ratio"], r["samples"]) for r in rows] == [
        ("vanilla", 1.0, 4), ("globalcom2", 0.25, 4), ("random", 0.25, 4)
    ]
    meta = json.loads((out / "predictions" / "toyqa-val" / "random-R0.25.meta.json").read_text())
    assert meta["config"]["seed"] == 3 and meta["config"]["layout"] == "spatial"

    assert _run([*base, "--format", "table"]) == 0  # resumes: the last two questions
    table = capsys.readouterr().out
    assert "| vanilla " in table and "| random " in table
    assert _ids(out / "predictions" / "toyqa-val" / "random-R0.25.jsonl") == IDS

    def no_model(*a, **k):
        raise AssertionError("the model must not be loaded when every prediction exists")

    monkeypatch.setattr(main_cli, "get_model", no_model)
    assert _run([*base, "--format", "csv"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 4
    assert _run(["--rescore", "--output-dir", str(out), "--format", "json"]) == 0
    rescored = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["method"], r["samples"]) for r in rescored] == [("vanilla", 6), ("globalcom2", 6), ("random", 6)]


# -- end to end on the real benchmark loaders and fixtures ----------------------------------------


@pytest.mark.parametrize("bench, fixtures, layout", [
    ("pope", "fixtures_eval_choice", "lmms"),
    ("mme", "fixtures_eval_choice", "llava"),
    ("textvqa", "fixtures_eval_vqa", "lmms"),
])
def test_end_to_end_on_benchmark_fixtures(bench, fixtures, layout, tiny, tmp_path):
    module = pytest.importorskip(fixtures)
    make = getattr(module, f"make_{bench}", None)
    if make is None:
        pytest.skip(f"{fixtures}.make_{bench} is not written yet")
    model, processor = tiny
    make(tmp_path / "data", layout=layout)
    out = tmp_path / "out"
    loaded = runner.load_benchmarks([bench], tmp_path / "data", limit=3)
    assert loaded[0].bench.max_new_tokens >= 1
    loaded[0].bench.max_new_tokens = 4  # the random model would use the whole budget: keep it short
    summary = run_eval(model, processor, loaded, None, [1.0, 0.25], batch_size=3, output_dir=out, progress=False)
    vanilla, compressed = summary.rows
    assert (vanilla.method, compressed.method, vanilla.samples, compressed.samples) == ("vanilla", "globalcom2", 3, 3)
    for row in summary.rows:
        assert row.metric in row.metrics and row.score == row.metrics[row.metric]
        assert row.visual_tokens > 0 and row.latency_ms > 0
    assert compressed.visual_tokens < vanilla.visual_tokens
    if vanilla.score:
        assert compressed.relative == pytest.approx(100 * compressed.score / vanilla.score)
    rescored = score_outputs(out)
    assert [(r.method, r.score, r.samples) for r in rescored.rows] == [(r.method, r.score, r.samples) for r in summary.rows]


def test_submission_split_end_to_end(tiny, tmp_path):
    """VQAv2 test-dev has no public answers: no score, the EvalAI file is written per run."""
    module = pytest.importorskip("fixtures_eval_vqa")
    if not hasattr(module, "make_vqav2"):
        pytest.skip("fixtures_eval_vqa.make_vqav2 is not written yet")
    model, processor = tiny
    module.make_vqav2(tmp_path / "data", layout="llava")
    loaded = runner.load_benchmarks(["vqav2"], tmp_path / "data", split={"vqav2": "test-dev"}, limit=2)
    loaded[0].bench.max_new_tokens = 3
    out = tmp_path / "out"
    summary = run_eval(model, processor, loaded, None, [1.0, 0.5], batch_size=2, output_dir=out, progress=False)
    for row in summary.rows:
        assert (row.score, row.relative, row.samples) == (None, None, 2)
        assert row.predictions.endswith(f"predictions/vqav2-test-dev/{row.method}-R{row.retention_ratio:g}.jsonl")
        submitted = json.loads(Path(row.submission).read_text())
        assert Path(row.submission).parent == out / "submissions" / "vqav2-test-dev"
        assert {a["question_id"] for a in submitted} >= {int(s.id) for s in loaded[0].samples}
    assert "| vanilla " in summary.format("table")
