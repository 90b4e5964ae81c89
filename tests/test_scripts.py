"""The scripts under scripts/ behave as command-line tools (issue 29)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_SCRIPT = ROOT / "scripts" / "make_sample_image.py"


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SAMPLE_SCRIPT), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_make_sample_image_help_is_help_not_an_output_path(tmp_path):
    proc = _run("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:") and "OUTPUT" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no file called --help


def test_make_sample_image_draws_the_shipped_sample(tmp_path):
    out = tmp_path / "sample.jpg"
    proc = _run(str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == (ROOT / "src" / "globalcom2" / "data" / "sample.jpg").read_bytes()


def test_make_sample_image_rejects_extra_arguments(tmp_path):
    proc = _run("a.jpg", "b.jpg", cwd=tmp_path)
    assert proc.returncode == 2 and "unrecognized arguments" in proc.stderr
