"""The package's shape: no import circle, nothing imports back from the CLI, registries stay light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "globalcom2").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Modules of ours that ``name`` imports at module level (TYPE_CHECKING blocks excluded;
    ``from . import sub`` counts as importing ``sub``, not the package)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            subs = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known}
            out |= subs
            if target in known and (node.module or not subs):
                out.add(target)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
    out.discard(name)
    return out


def test_no_import_circle():
    known = _modules()
    graph = {m: _imports(m, p, known) for m, p in known.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            # a package importing its own submodules (registration) is not a circle back to it
            if d.startswith(m + "."):
                continue
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif not state.get(d):
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m, [m])
    assert not cycles, cycles


def test_nothing_outside_the_cli_imports_it():
    known = _modules()
    for name, path in known.items():
        if name.startswith("globalcom2.cli") or name == "globalcom2.__main__":
            continue
        assert not any(d.startswith("globalcom2.cli") for d in _imports(name, path, known)), name


def test_registries_load_neither_torch_nor_transformers():
    code = (
        "import sys, globalcom2.methods as m, globalcom2.models as f; "
        "m.method_names(); f.supported_model_types(); "
        "print(sorted(k for k in ('torch', 'transformers', 'numpy') if k in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
