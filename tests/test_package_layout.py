"""The package's shape: no import circle, nothing imports back from the CLI, registries stay light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_one_name_per_thing_and_no_paths_of_an_unreleased_0_1():
    """0.1 was never released: its module paths and the Adapter/Family double name are gone."""
    import importlib

    import globalcom2
    from globalcom2 import models

    for gone in ("ops", "config", "fastv", "sequence", "adapters"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(f"globalcom2.{gone}")
    for name in ("Adapter", "adapter_for", "LlavaNextAdapter"):
        assert not hasattr(models, name), name
    assert not hasattr(globalcom2, "get_adapter") and callable(globalcom2.get_family)


def test_a_method_is_one_class_and_one_registration(tiny):
    """A new vision method registered from outside the package works everywhere at once."""
    from dataclasses import dataclass
    from typing import ClassVar

    import pytest
    import torch

    import globalcom2
    from globalcom2.core.config import check_ratio
    from globalcom2.core.plans import compress_by_scores
    from globalcom2.methods import VISION_METHODS, VisionMethodConfig, method_names, register_method

    @register_method
    @dataclass(frozen=True)
    class RasterConfig(VisionMethodConfig):  # keeps the first tokens of every view, in raster order
        method: ClassVar[str] = "raster"
        layout_field: ClassVar[str | None] = None
        retention_ratio: float = 0.25

        def __post_init__(self) -> None:
            self._set("retention_ratio", check_ratio(self.retention_ratio))

        def compress(self, features, importance, geom, newline):
            scores = -torch.arange(importance.numel(), dtype=torch.float32).reshape(importance.shape)
            return compress_by_scores(features, scores, geom, newline, self.retention_ratio, "spatial")

    try:
        assert "raster" in method_names() and "raster+fastv" in method_names()
        with pytest.raises(ValueError, match="already registered"):
            register_method(type("RasterConfig2", (RasterConfig,), {}))
        model, processor = tiny
        from conftest import make_image

        inputs = processor(images=[make_image(480, 640)], text=["<image>\nhi"], return_tensors="pt")
        globalcom2.apply(model, method="raster", retention_ratio=0.25)
        with torch.no_grad():
            model(**inputs)
        plan = globalcom2.get_family(model).last.plans[0]
        n = plan.thumb_importance.shape[0]
        k = int(0.25 * (n + int(plan.crop_valid.sum())))  # one joint budget, the earliest tokens first
        assert plan.thumb_keep.tolist() == list(range(min(n, k)))
        assert int(plan.crop_keep.sum()) == k - min(n, k)
        assert globalcom2.last_stats(model).visual_tokens == [plan.num_tokens]
        globalcom2.remove(model)
    finally:
        VISION_METHODS.pop("raster", None)
    assert "raster" not in method_names()


def test_one_hook_class_captures_queries_and_keys():
    """The forward hooks that read a tower's queries and keys are one class (models.capture.QKCapture),
    used by every family; core/ stays pure tensor code (no hooks)."""
    defined = {}
    for name, path in _modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Capture"):
                defined.setdefault(node.name, []).append(name)
        if name.startswith("globalcom2.core"):
            assert "register_forward_hook" not in path.read_text(encoding="utf-8"), name
    assert defined == {"QKCapture": ["globalcom2.models.capture"]}


def test_no_source_file_over_700_lines():
    """Files split by concern (issue 25): a module past 700 lines holds more than one."""
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > 700}
    assert not long, long


def test_no_family_class_named_outside_models():
    """Integrations, tools and the CLI ask the registry; only ``models/`` names a family's class."""
    import re

    from globalcom2.models import families

    names = {cls.__name__ for cls in families()}
    pattern = re.compile(r"\b(" + "|".join(sorted(names)) + r")\b")
    outside = [name for name, path in _modules().items()
               if not name.startswith("globalcom2.models") and pattern.search(path.read_text())]
    assert not outside, outside
