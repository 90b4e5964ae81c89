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

# transformers makes its log handler once, bound to the ``sys.stderr`` of that moment. Made inside
# a test that captures with capsys, it would keep that test's stream, closed when the test ends, and
# every later warning would print "--- Logging error --- Traceback ..." into another test's stderr.
# Made here, at collection, it writes to pytest's session-wide capture, open until the end.
from transformers.utils import logging as _hf_logging  # noqa: E402

_hf_logging.get_logger()  # (importing transformers makes it already; this says why it must happen here)


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


# ------------------------------------------------------------------------------------------------
# Saved tiny checkpoints of every family, loaded back through the real loading path
# ------------------------------------------------------------------------------------------------


def _torchvision_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


def _empty_video_slot():
    """What a processor without a video processor saves in its ``video_processor`` slot: ``{}``
    (``ProcessorMixin.to_dict`` serialises the slot with its ``to_dict``)."""
    from transformers.utils import PushToHubMixin

    class EmptyVideoSlot(PushToHubMixin):
        _auto_class = None

        def to_dict(self) -> dict:
            return {}

    return EmptyVideoSlot()


def _video_processor_optional(mp: pytest.MonkeyPatch) -> None:
    """Let transformers save and load a LLaVA-OneVision, InternVL or SmolVLM processor without its
    video processor, where torchvision is not installed (the main venv), and SmolVLM's without
    ``num2words`` (its constructor checks for it; only videos use it).

    transformers 5.25 gives these processors a ``video_processor`` slot that it fills with
    ``AutoVideoProcessor`` (torchvision only: without it the class is a stub that raises
    ImportError) and class-checks on construction, so their processor cannot be built, saved or
    loaded back without torchvision, although images never touch it. This leaves exactly that slot
    empty: ``AutoVideoProcessor.from_pretrained`` gives None instead of raising (only without
    torchvision), and the slot's class check accepts None (what the families' tiny processors
    already do). Everything else loads as a user's checkpoint does: ``Family.load`` ->
    ``from_pretrained`` of the model and ``AutoProcessor.from_pretrained`` of the processor.
    """
    import transformers.models.smolvlm.processing_smolvlm as smolvlm_processing

    if not smolvlm_processing.num2words:  # SmolVLM's constructor checks for it; only its videos use it
        from globalcom2.tiny import _missing_package

        mp.setattr(smolvlm_processing, "num2words", _missing_package("num2words"))
    if _torchvision_available():
        return
    import transformers.models.auto.video_processing_auto as video_auto
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return check(self, argument_name, argument)

    mp.setattr(ProcessorMixin, "check_argument_for_proper_class", check_argument_for_proper_class)
    class NoVideoProcessor:  # what ProcessorMixin loads the slot with, instead of the stub
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            return None

    mp.setattr(video_auto, "AutoVideoProcessor", NoVideoProcessor)


@pytest.fixture
def video_processor_optional(monkeypatch):
    """:func:`_video_processor_optional` for one test (see there: what is worked around, why)."""
    _video_processor_optional(monkeypatch)


def save_family_checkpoint(family, path) -> str:
    """Save ``family``'s tiny model and processor to ``path`` with ``save_pretrained``, as a user's
    checkpoint: the processor under its stock transformers class (the tiny processors of
    OneVision and InternVL are subclasses that allow an empty video slot), that slot saved empty."""
    import copy

    model, processor = family.build_tiny(seed=0)
    model.save_pretrained(path)
    saved = processor
    if getattr(processor, "video_processor", True) is None:
        saved = copy.copy(processor)
        saved.__class__ = next(c for c in type(processor).__mro__ if c.__module__.startswith("transformers."))
        saved.video_processor = _empty_video_slot()
    saved.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def family_checkpoints(tmp_path_factory) -> dict:
    """``{model_type: checkpoint directory}``: every registered family's tiny model and processor
    saved once per session (:func:`save_family_checkpoint`). Load them inside a test that uses
    :func:`video_processor_optional`."""
    from globalcom2.models import family_for_model_type, supported_model_types

    root = tmp_path_factory.mktemp("family-checkpoints")
    return {t: save_family_checkpoint(family_for_model_type(t), root / t) for t in supported_model_types()}
