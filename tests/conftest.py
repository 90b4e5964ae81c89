"""Shared fixtures: a tiny random LLaVA-NeXT built in code, and synthetic images."""

from __future__ import annotations

import os

# One OpenMP thread for this process and every process a test starts (CLI subprocesses, torchrun
# workers), set before torch is imported: on a busy machine, spinning OpenMP threads competing
# with other jobs made the suite 87 minutes instead of 6 (issue 29). The tiny models gain nothing
# from more threads. Set OMP_NUM_THREADS yourself to override.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from globalcom2.tiny import build_tiny_llava_next


def make_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB noise-and-gradient image of the given size."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height)[:, None, None]
    x = np.linspace(0, 1, width)[None, :, None]
    base = 0.5 * (y + x) + 0.5 * rng.random((height, width, 3))
    return Image.fromarray((np.clip(base, 0, 1) * 255).astype("uint8"))


@pytest.fixture(scope="session")
def tiny():
    """(model, processor): the tiny LLaVA-NeXT in float32, eval mode. Tests must leave it unpatched."""
    model, processor = build_tiny_llava_next(seed=0)
    return model, processor


@pytest.fixture(autouse=True)
def _unpatch_tiny(request):
    """Guarantee no test leaks a patched shared model into the next one."""
    yield
    if "tiny" in request.fixturenames:
        import globalcom2

        globalcom2.remove(request.getfixturevalue("tiny")[0])


_FAMILY_MODELS: dict[str, tuple] = {}


def family_model(family):
    """(model, processor): a registered family's tiny in-code model, built once per session and
    shared by the test files that run every family. Tests must leave it as they found it (a method
    applied to it is removed after every test)."""
    if family.model_type not in _FAMILY_MODELS:
        _FAMILY_MODELS[family.model_type] = family.build_tiny(seed=0)
    return _FAMILY_MODELS[family.model_type]


@pytest.fixture(autouse=True)
def _unpatch_family_models():
    yield
    if _FAMILY_MODELS:
        import globalcom2

        for model, _ in _FAMILY_MODELS.values():
            globalcom2.remove(model)


@pytest.fixture
def image_factory():
    return make_image


torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]) if os.environ["OMP_NUM_THREADS"].isdigit() else 1)
