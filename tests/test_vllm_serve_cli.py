"""``globalcom2 serve``'s own checks and its vLLM command line (issue 24), without vLLM: every
failure is one ``globalcom2: error:`` line before anything starts."""

from __future__ import annotations

import importlib.util
import json

import pytest

from globalcom2.cli import main
from globalcom2.cli.output import CLIError
from globalcom2.cli.serve import vllm_argv


def _error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("globalcom2: error:"), err
    return err[0]


def test_builtin_models_and_bad_settings_are_one_line_errors(capsys, tmp_path):
    assert "'tiny'" in _error(capsys, ["serve", "--model", "tiny"])
    assert "retention_ratio" in _error(capsys, ["serve", "--model", "tiny", "--retention-ratio", "1.5"])
    assert "not found" in _error(capsys, ["serve", "--model", str(tmp_path / "nope")])


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_without_vllm_the_install_is_named(capsys):
    from globalcom2.integrations.vllm import checkpoints

    # A real local checkpoint passes the model check; then vLLM's absence is the one line.
    pytest.importorskip("transformers")
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        checkpoints.save_tiny("llava_next", folder)
        capsys.readouterr()  # transformers' notes while saving
        line = _error(capsys, ["serve", "--model", folder])
    assert "vLLM is not installed" in line and "globalcom2[vllm]" in line


def test_vllm_argv_merges_the_globalcom2_entry_into_given_overrides():
    values = {"retention_ratio": 0.1, "layout": "spatial"}
    argv = vllm_argv("m", values, ["--", "--port", "8000", "--hf-overrides", '{"foo": 1, "globalcom2": {"temperature": 5}}'])
    assert argv[:2] == ["serve", "m"] and argv[-2:] == ["--port", "8000"]
    overrides = json.loads(argv[argv.index("--hf-overrides") + 1])
    assert overrides == {"foo": 1, "globalcom2": {"temperature": 5, "retention_ratio": 0.1, "layout": "spatial"}}
    argv = vllm_argv("m", values, ["--hf-overrides={}"])
    assert json.loads(argv[3]) == {"globalcom2": values}
    with pytest.raises(CLIError, match="JSON object"):
        vllm_argv("m", values, ["--hf-overrides", "[1]"])
