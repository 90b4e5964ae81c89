"""``.ci/run``: both parts (the main suite and the lmms-eval plugin's tests) always run, both
results are reported, and the exit status is non-zero when either failed (issue 29).

The script runs for real, in a copy of ``.ci/`` with a stand-in ``python3`` on PATH: it makes
"venvs" whose ``python`` records each call and answers ``-m pytest`` with the exit status the
test chooses, so nothing is installed."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "$0 $*" >> "$CI_LOG"
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
    mkdir -p "$3/bin"
    cat > "$3/bin/activate" <<ACT
export PATH="$(cd "$3" && pwd)/bin:\$PATH"
deactivate() { :; }
ACT
    cp "$0" "$3/bin/python"
    exit 0
fi
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
    case "$*" in *lmms-eval*) exit "${LMMS_INSTALL_RC:-0}" ;; esac
    exit 0
fi
if [ "$1" = "-m" ] && [ "$2" = "pytest" ]; then
    case "$*" in *test_lmms_eval_plugin*) exit "$LMMS_RC" ;; esac
    echo "OMP_NUM_THREADS=$OMP_NUM_THREADS" >> "$CI_LOG"
    exit "$MAIN_RC"
fi
exit 0
"""


def _run_ci(tmp_path: Path, main_rc: int, lmms_rc: int, lmms_install_rc: int = 0) -> tuple[subprocess.CompletedProcess, str]:
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / ".ci", repo / ".ci")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "calls.log"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "OMP_NUM_THREADS")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", CI_LOG=str(log), MAIN_RC=str(main_rc),
               LMMS_RC=str(lmms_rc), LMMS_INSTALL_RC=str(lmms_install_rc))
    proc = subprocess.run(["bash", str(repo / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=120)
    return proc, log.read_text() if log.exists() else ""


@pytest.mark.parametrize(("main_rc", "lmms_rc", "failed"), [(0, 0, False), (1, 0, True), (0, 1, True), (1, 1, True),
                                                            (5, 0, True)])
def test_both_parts_run_and_either_failure_fails_the_run(tmp_path, main_rc, lmms_rc, failed):
    proc, log = _run_ci(tmp_path, main_rc, lmms_rc)
    # The lmms-eval part ran even when the main suite failed.
    assert "tests/test_lmms_eval_plugin.py" in log
    assert (proc.returncode != 0) == failed, proc.stdout + proc.stderr
    main_line = next(line for line in proc.stdout.splitlines() if line.startswith("main suite:"))
    lmms_line = next(line for line in proc.stdout.splitlines() if line.startswith("lmms-eval plugin:"))
    assert ("passed" in main_line) == (main_rc == 0)
    assert ("passed" in lmms_line) == (lmms_rc == 0)
    if main_rc == 5:
        assert "no tests collected" in main_line


def test_lmms_eval_that_cannot_be_installed_is_reported_not_failed(tmp_path):
    proc, log = _run_ci(tmp_path, 0, 1, lmms_install_rc=1)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tests/test_lmms_eval_plugin.py" not in log
    assert "not run" in next(line for line in proc.stdout.splitlines() if line.startswith("lmms-eval plugin:"))
    assert "lmms-eval could not be installed" in proc.stderr


def test_the_suite_runs_with_one_thread_and_installs_the_cpu_torch_first(tmp_path):
    _, log = _run_ci(tmp_path, 0, 0)
    assert "OMP_NUM_THREADS=1" in log
    pip_calls = [line for line in log.splitlines() if " -m pip install" in line]
    assert "torch==2.13.0" in pip_calls[0] and ".[test]" in pip_calls[1]
