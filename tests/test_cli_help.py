"""The help texts say what each command does, for every supported family (issue 29, point 4), and
the install hints name commands that work from a checkout (point 2)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from globalcom2.cli import main
from globalcom2.methods import LANGUAGE_METHODS, VISION_METHODS
from globalcom2.models import families

ROOT = Path(__file__).resolve().parents[1]


def _help(capsys, *command: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare words


def _method_help(text: str) -> str:
    """The --method option's help text (up to the next option)."""
    return re.search(r"--method NAME (.*?) --method-arg", text).group(1)


def test_generate_method_help_says_it_compresses_and_lists_every_method(capsys):
    text = _method_help(_help(capsys, "generate"))
    assert "drawn" not in text and "compresses" in text
    for name in (*VISION_METHODS, *LANGUAGE_METHODS):
        assert name in text


def test_embed_method_help_lists_only_the_methods_it_takes(capsys):
    text = _method_help(_help(capsys, "embed"))
    assert "drawn" not in text
    choices = text.split(": ", 1)[1]
    for name in VISION_METHODS:
        assert name in choices
    for name in LANGUAGE_METHODS:
        assert name not in choices  # embed refuses FastV and its compositions


def test_embed_help_names_both_builtin_models(capsys):
    text = _help(capsys, "embed")
    assert "'tiny'" in text and "'wide-random[:N]'" in text


def test_visualize_method_help_is_about_drawing(capsys):
    assert "drawn" in _method_help(_help(capsys, "visualize"))


@pytest.mark.parametrize("command", [(), ("eval",)])
def test_top_and_eval_help_name_every_family(capsys, command):
    text = _help(capsys, *command)
    for family in families():
        assert family.display_name in text
    assert "LLaVA-NeXT checkpoint" not in text and "for LLaVA-NeXT models" not in text


def test_eval_help_spells_the_distributed_launch_as_the_readme(capsys):
    text = _help(capsys, "eval")
    assert "-m globalcom2.cli" not in text
    assert "torchrun --nproc_per_node=8 -m globalcom2 eval" in text
    assert "accelerate launch --num_processes 8 -m globalcom2 eval" in text
    readme = (ROOT / "README.md").read_text()
    assert "-m globalcom2 eval" in readme and "-m globalcom2.cli" not in readme


def test_python_dash_m_globalcom2_eval_is_the_cli(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "globalcom2", "eval", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: globalcom2 eval")


def test_bench_plot_without_matplotlib_names_an_install_that_works(capsys, monkeypatch, tmp_path):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    assert main(["bench", "--plot", str(tmp_path / "b.png")]) == 1
    err = capsys.readouterr().err
    assert "globalcom2[plot]" not in err  # the package is not on PyPI: that install fails
    assert "pip install matplotlib" in err and 'pip install -e ".[plot]"' in err


def test_the_install_hints_name_extras_that_exist():
    import tomllib

    from globalcom2._extras import EXTRAS

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, package in EXTRAS.items():
        assert any(req.startswith(package) for req in extras[extra])
