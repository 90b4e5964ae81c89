"""Loading a checkpoint of any registered family (the family from its ``config.model_type``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._common import MODEL_NAME


def load_checkpoint(
    pretrained: str,
    *,
    revision: str = "main",
    dtype: Any = "auto",
    device_map: Any = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Load a checkpoint of a supported family and its processor (eval mode; placement by
    ``device_map``); the family comes from the checkpoint's ``config.model_type``.

    Raises:
        ValueError: the checkpoint is not of a supported family (the message names them).
    """
    from transformers import AutoConfig

    from ...models import family_for_model_type

    config = AutoConfig.from_pretrained(pretrained, revision=revision, trust_remote_code=trust_remote_code)
    try:
        family = family_for_model_type(getattr(config, "model_type", None))
    except ValueError as e:
        raise ValueError(f"{MODEL_NAME}: {pretrained!r}: {e}") from None
    model_kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return family.load(
        pretrained, dtype=dtype, device_map=device_map or None, model_kwargs=model_kwargs,
        revision=revision, trust_remote_code=trust_remote_code,
    )



def _read_template(value: str | None) -> str | None:
    if value and len(value) < 4096 and Path(value).expanduser().is_file():
        return Path(value).expanduser().read_text(encoding="utf-8")
    return value

