"""The test suite runs with one thread per process unless told otherwise, so that a busy machine
does not slow it many times over (issue 29, point 14)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch


def test_the_suite_runs_single_threaded():
    if os.environ.get("OMP_NUM_THREADS", "1") == "1":
        assert torch.get_num_threads() == 1


def test_processes_the_tests_start_inherit_one_thread(tmp_path):
    code = "import os, torch; print(os.environ.get('OMP_NUM_THREADS'), torch.get_num_threads())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    expected = os.environ["OMP_NUM_THREADS"]
    assert out.split() == [expected, expected if expected.isdigit() else out.split()[1]]
