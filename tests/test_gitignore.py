"""What the commands write by default never shows up as untracked files in a checkout."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import pytest

from globalcom2.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _default_outputs(parser: argparse.ArgumentParser, command: str = "globalcom2") -> list[tuple[str, str, bool]]:
    """(command, default path, is a folder) for every output option of every (sub)command."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _default_outputs(sub, f"{command} {name}")
        elif isinstance(action.default, str) and (
            any(s.startswith(("--output", "--out", "--plot", "--save")) for s in action.option_strings)
            or str(action.metavar or "").startswith(("OUT", "DIR"))
        ):
            found.append((command, action.default, "dir" in action.dest or action.metavar == "DIR"))
    return found


def test_the_default_outputs_are_found():
    paths = {path for _, path, _ in _default_outputs(build_parser())}
    assert {"globalcom2-demo", "globalcom2-eval", "globalcom2-visualize.png"} <= paths


def test_every_default_output_is_git_ignored():
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    inside = subprocess.run([git, "rev-parse", "--is-inside-work-tree"], cwd=ROOT, capture_output=True, text=True)
    if inside.returncode != 0 or inside.stdout.strip() != "true":
        pytest.skip("not a git checkout")
    for command, path, is_dir in _default_outputs(build_parser()):
        # What the command writes there, run from the repository root or from a subfolder.
        for where in (path, f"docs/{path}"):
            probe = f"{where}/summary.json" if is_dir else where
            done = subprocess.run([git, "check-ignore", "-q", "--no-index", probe], cwd=ROOT)
            assert done.returncode == 0, f"{probe} (default output of `{command}`) is not in .gitignore"
