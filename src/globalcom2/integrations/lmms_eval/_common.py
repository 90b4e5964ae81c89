"""What every part of the lmms-eval plugin shares: its model names, whether lmms-eval can be
imported, and the logger (lmms-eval's loguru where it is installed)."""

from __future__ import annotations

import logging

#: The name lmms-eval knows the model by (``--model globalcom2``): any registered family, chosen
#: from the checkpoint's ``config.model_type``.
MODEL_NAME = "globalcom2"
#: Other names of the same model: ``globalcom2_llava_next``, the name of 0.1 (LLaVA-NeXT was then
#: the only family), kept for the command lines lmms-eval users already type.
MODEL_ALIASES = ("globalcom2_llava_next",)
#: Default ``max_new_tokens`` when a task's generation_kwargs have none (as lmms-eval's llava_hf).
DEFAULT_MAX_NEW_TOKENS = 1024

try:  # lmms-eval is optional: only the plugin class needs it.
    from lmms_eval.api.model import lmms as _LmmsBase

    _LMMS_EVAL_ERROR: str | None = None
except Exception as _e:  # pragma: no cover - ImportError, or a broken install (e.g. torch/torchvision mismatch)
    _LmmsBase = object  # type: ignore[assignment,misc]
    _LMMS_EVAL_ERROR = f"{type(_e).__name__}: {_e}"

try:
    from loguru import logger as _log  # lmms-eval's logger
except ImportError:  # pragma: no cover - depends on the environment
    _log = logging.getLogger(__name__)  # type: ignore[assignment]


def lmms_eval_available() -> bool:
    """Whether lmms-eval can be imported (and so the plugin used)."""
    return _LMMS_EVAL_ERROR is None


def require_lmms_eval() -> None:
    """Raise an ImportError that says how to install lmms-eval, when it cannot be imported."""
    if _LMMS_EVAL_ERROR is not None:
        raise ImportError(
            f"the {MODEL_NAME} lmms-eval model needs lmms-eval, which could not be imported "
            f"({_LMMS_EVAL_ERROR}); install it with: pip install lmms-eval"
        )

