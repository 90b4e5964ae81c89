"""The compression-step benchmark script keeps running (smoke test on the tiny model)."""

import re
import runpy
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compression_step.py"


def test_compression_step_benchmark_runs(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--tiny", "--runs", "1", "--warmup", "0"])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    out = capsys.readouterr().out
    # 672x672 is a 2x2 grid with no padding: 576 + 48 x (48 + 1) vanilla tokens; GlobalCom2 keeps
    # 144 thumbnail tokens, 48 newlines and about a quarter of the 2,304 crop tokens.
    match = re.search(r"vanilla (\d+) -> GlobalCom2 (\d+)", out)
    assert match and int(match.group(1)) == 2928
    assert 144 + 48 + 0.2 * 2304 < int(match.group(2)) < 144 + 48 + 0.3 * 2304
    for step in ("vision tower + projector + CLS", "GlobalCom2 compression step", "vanilla packing"):
        assert step in out
    # Per-image times for batches of 1, 4 and 16 images, and the counted host syncs of a prefill.
    rows = dict((int(m.group(1)), (float(m.group(2)), float(m.group(3))))
                for m in re.finditer(r"^\s+(\d+)\s+([\d.]+)\s+([\d.]+)$", out, re.M))
    assert set(rows) == {1, 4, 16} and all(t > 0 for pair in rows.values() for t in pair)
    syncs = re.search(r"host syncs per prefill \(counted, one image\): vanilla (\d+), GlobalCom2 (\d+)", out)
    assert syncs and 0 < int(syncs.group(2)) <= int(syncs.group(1)) + 1
