"""lmms-eval's plugin discovery for globalcom2 (imports neither lmms-eval nor torch).

* ``LMMS_EVAL_PLUGINS=globalcom2.integrations`` (every lmms-eval release since 0.2): lmms-eval
  imports ``globalcom2.integrations.models`` and reads :data:`AVAILABLE_MODELS`, ``{model name:
  class name}``; the class is ``globalcom2.integrations.models.<model name>.<class name>``.
* the ``lmms_eval.models`` entry point (lmms-eval 0.6 and later, the recommended way): it names
  :func:`lmms_eval_manifests`, which lmms-eval calls for the models' manifests.
"""

from __future__ import annotations

from typing import Any

#: Model name -> class name, in the module ``globalcom2.integrations.models.<model name>``.
AVAILABLE_MODELS = {"globalcom2_llava_next": "GlobalCom2LlavaNext"}


def class_path(model_name: str) -> str:
    """The dotted path of a model's class, as lmms-eval imports it."""
    return f"{__name__}.{model_name}.{AVAILABLE_MODELS[model_name]}"


def lmms_eval_manifests() -> list[Any]:
    """The ``ModelManifest`` of each model (the ``lmms_eval.models`` entry point's payload).

    Called by lmms-eval itself, so lmms-eval is importable; its class paths are imported only
    when the model is used.
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=name, simple_class_path=class_path(name)) for name in AVAILABLE_MODELS]
