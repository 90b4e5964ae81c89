"""What to install for an optional feature, in words that work (no torch).

globalcom2 is installed from a checkout (it is not on PyPI), so ``pip install 'globalcom2[plot]'``
would fail: the hint names the package itself and the checkout's extra."""

from __future__ import annotations

#: The optional extras of pyproject.toml: extra name -> the package it brings.
EXTRAS = {"plot": "matplotlib", "eval": "pyarrow"}


def install_hint(extra: str) -> str:
    """``pip install matplotlib (from a globalcom2 checkout: pip install -e ".[plot]")`` for ``extra``."""
    return f"pip install {EXTRAS[extra]} (from a globalcom2 checkout: pip install -e \".[{extra}]\")"
