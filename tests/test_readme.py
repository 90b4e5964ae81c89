"""The README's set-up and commands as a newcomer follows them (issue 29): the CPU set-up does not
pull a CUDA torch, every `globalcom2 COMMAND --flag` it shows is a flag of that command, and the
license and citation it points to exist."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest

from globalcom2.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _shell_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def _commands() -> list[list[str]]:
    """Every `globalcom2 ...` command line of the README's bash blocks and `$ ` examples, split."""
    lines = []
    for block in _shell_blocks() + re.findall(r"```text\n(.*?)```", README, flags=re.S):
        block = block.replace("\\\n", " ")
        for line in block.splitlines():
            line = line.strip().removeprefix("$ ")
            for part in line.split("&&"):
                words = shlex.split(part.split("#")[0].strip()) if "globalcom2" in part else []
                while words and "=" in words[0] and not words[0].startswith("-"):  # OMP_NUM_THREADS=1 ...
                    words = words[1:]
                if words[:1] == ["globalcom2"] and len(words) > 1:
                    lines.append(words)
    return lines


def test_the_setup_installs_the_cpu_torch_not_a_bare_torch():
    setup = README.split("## Set-up on a fresh machine")[1].split("\n## ")[0]
    commands = " ".join(re.findall(r"```bash\n(.*?)```", setup, flags=re.S))
    assert "pip install torch==2.13.0" in commands
    assert not re.search(r"pip install torch(\s|&|$)", commands)  # a bare torch is the CUDA build


def test_every_readme_command_uses_flags_its_parser_has():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    commands = _commands()
    assert len(commands) > 10
    for words in commands:
        command = sub.choices[words[1]]
        known = {s for a in command._actions for s in a.option_strings}
        own = words[2:words.index("--")] if "--" in words else words[2:]  # after a bare --: another tool's
        flags = [w.split("=")[0] for w in own if w.startswith("--")]
        assert set(flags) <= known, (words, set(flags) - known)


def test_the_extras_the_readme_names_exist():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in re.findall(r'pip install -e "\.\[(\w+)\]"', README):
        assert extra in extras


def test_license_and_citation():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    license_text = (ROOT / "LICENSE").read_text()
    assert project["license"]["text"] == "Apache-2.0"
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    citation = (ROOT / "CITATION.cff").read_text()
    for text in (README, citation):
        assert "2501.05179" in text
        assert "Global Compression Commander: Plug-and-Play Inference Acceleration for" in " ".join(text.split())


@pytest.mark.parametrize("phrase", ["not LLaVA-NeXT", "-m globalcom2.cli", "globalcom2[plot]", "5.18 to 5.24, and"])
def test_stale_phrases_are_gone(phrase):
    assert phrase not in README
