"""lmms-eval's plugin discovery for globalcom2 (imports neither lmms-eval nor torch).

One model, ``globalcom2`` (any registered family, from the checkpoint's ``config.model_type``),
also known as ``globalcom2_llava_next`` (its name in 0.1, kept for existing command lines):

* the ``lmms_eval.models`` entry point (lmms-eval 0.6 and later, the recommended way): it names
  :func:`lmms_eval_manifests`, which lmms-eval calls for the model's manifest (the alias is the
  manifest's ``aliases``);
* ``LMMS_EVAL_PLUGINS=globalcom2.integrations`` (every lmms-eval release since 0.2): lmms-eval
  imports ``globalcom2.integrations.models`` and reads :data:`AVAILABLE_MODELS`, ``{model name:
  class name}`` (the alias included); the class is
  ``globalcom2.integrations.models.<model name>.<class name>``.
"""

from __future__ import annotations

from typing import Any

#: The model's name and its aliases (as in :mod:`globalcom2.integrations.lmms_eval`, which this
#: module does not import: it would import torch).
MODEL_NAME = "globalcom2"
MODEL_ALIASES = ("globalcom2_llava_next",)

#: Model name (aliases included) -> class name, in the module ``globalcom2.integrations.models.<model name>``.
AVAILABLE_MODELS = {name: "GlobalCom2Model" for name in (MODEL_NAME, *MODEL_ALIASES)}


def class_path(model_name: str) -> str:
    """The dotted path of a model's class, as lmms-eval imports it."""
    return f"{__name__}.{model_name}.{AVAILABLE_MODELS[model_name]}"


def lmms_eval_manifests() -> list[Any]:
    """The ``ModelManifest`` of the model, its aliases included (the ``lmms_eval.models`` entry
    point's payload).

    Called by lmms-eval itself, so lmms-eval is importable; the class path is imported only when
    the model is used.
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_NAME, simple_class_path=class_path(MODEL_NAME), aliases=MODEL_ALIASES)]
