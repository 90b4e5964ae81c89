"""``globalcom2 eval`` sharded over several CPU processes with ``torch.distributed.run`` (gloo).

The command runs from ``tests/_eval_entry.py`` (the ``eval`` command with the toy benchmark
registered) on the tiny random LLaVA-NeXT saved to disk. Checked: the merged predictions of 2
ranks equal a single process's; a 3-rank run where one rank dies mid-write (torn shard line),
resumed with 2 ranks, loses nothing and duplicates nothing; a finished run only re-scores.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):  # pragma: no cover
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from _eval_entry import make_toy  # noqa: E402

TESTS = Path(__file__).resolve().parent
ENTRY = TESTS / "_eval_entry.py"
SRC = TESTS.parent / "src"
RUNS = ("vanilla-R1", "globalcom2-R0.25")
IDS = [f"q{i}" for i in range(7)]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(
        OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join([str(SRC), str(TESTS), env.get("PYTHONPATH", "")]),
    )
    env.update(extra)
    return env


def _eval(setup, out: Path, nproc: int | None, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    args = ["eval", "--model", str(setup["model"]), "--benchmarks", "toyqa", "--data-root", str(setup["data"]),
            "--retention-ratio", "1,0.25", "--output-dir", str(out), "--batch-size", "2", "--no-progress",
            "--format", "json", *extra]
    if nproc is None:
        cmd = [sys.executable, str(ENTRY), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
               f"--master_port={_free_port()}", str(ENTRY), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or _env(), timeout=240)


def _records(out: Path, stem: str) -> list[dict]:
    path = out / "predictions" / "toyqa-val" / f"{stem}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _keyed(out: Path, stem: str) -> list[tuple]:
    return [(r["id"], r["prediction"], r["visual_tokens"], r["target"]) for r in _records(out, stem)]


def _summary(proc: subprocess.CompletedProcess) -> list[tuple]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)["rows"]
    return [(r["method"], r["retention_ratio"], r["samples"], r["score"], r["visual_tokens"]) for r in rows]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The saved tiny model, 7 toy questions, and a single-process reference run."""
    from globalcom2.tiny import build_tiny_llava_next

    root = tmp_path_factory.mktemp("eval-dist")
    model, processor = build_tiny_llava_next(seed=0)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    make_toy(root / "data", n=7)
    setup = {"root": root, "model": root / "model", "data": root / "data"}
    proc = _eval(setup, root / "reference", None)
    setup["summary"] = _summary(proc)
    return setup


def test_two_ranks_match_a_single_process(setup):
    out = setup["root"] / "two"
    proc = _eval(setup, out, 2)
    assert _summary(proc) == setup["summary"]
    for stem in RUNS:
        assert [r[0] for r in _keyed(out, stem)] == IDS
        assert _keyed(out, stem) == _keyed(setup["root"] / "reference", stem)
    left = sorted(p.name for p in (out / "predictions" / "toyqa-val").iterdir())
    assert left == sorted(f"{s}.{ext}" for s in RUNS for ext in ("jsonl", "meta.json"))
    assert (out / "summary.json").is_file() and (out / "summary.md").is_file()


def test_crash_then_resume_with_another_world_size(setup):
    out = setup["root"] / "crash"
    # 3 ranks; rank 1 dies right after its first batch, leaving a torn line in its shard.
    crashed = _eval(setup, out, 3, env=_env(TOY_CRASH_RANK="1", TOY_CRASH_AFTER="1"))
    assert crashed.returncode != 0
    folder = out / "predictions" / "toyqa-val"
    shards = sorted(p.name for p in folder.glob("vanilla-R1.rank*.jsonl"))
    assert "vanilla-R1.rank1.jsonl" in shards
    assert (folder / "vanilla-R1.rank1.jsonl").read_text().endswith('{"id": "torn", "predic')

    # Resumed on 2 ranks: everything answered once, equal to the single-process run.
    proc = _eval(setup, out, 2)
    assert _summary(proc) == setup["summary"]
    for stem in RUNS:
        assert _keyed(out, stem) == _keyed(setup["root"] / "reference", stem)
    assert not list(folder.glob("*.rank*.jsonl"))

    # Finished: a re-run loads no model and only re-scores.
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    again = _eval(setup, out, None)
    assert _summary(again) == setup["summary"]
    assert "loading" not in again.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
