"""The public entry points: ``apply``, ``remove``, ``compressed`` and friends."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, TypeVar

from torch import nn

from .adapters import adapter_for
from .adapters.base import STATE_ATTR, Adapter
from .config import GlobalCom2Config

M = TypeVar("M", bound=nn.Module)

#: transformers versions this release is tested with (checked by :func:`apply`): the whole test
#: suite passes on 5.18 to 5.24; 5.17 and older lack `mm_encoder_outputs`, which the adapter needs.
TRANSFORMERS_RANGE = (">=5.18", "<6")


def _check_transformers() -> None:
    import transformers
    from packaging.version import Version

    v = Version(transformers.__version__)
    low, high = (Version(r.lstrip("<>=")) for r in TRANSFORMERS_RANGE)
    if not (low <= Version(v.base_version) < high):
        raise RuntimeError(
            f"globalcom2 supports transformers {','.join(TRANSFORMERS_RANGE)}, but {transformers.__version__} is "
            f"installed; run: pip install 'transformers{','.join(TRANSFORMERS_RANGE)}'"
        )


def get_adapter(model: nn.Module) -> Adapter | None:
    """The adapter applied to ``model``, or None."""
    return model.__dict__.get(STATE_ATTR)


def is_applied(model: nn.Module) -> bool:
    """Whether GlobalCom2 is currently applied to ``model``."""
    return get_adapter(model) is not None


def get_config(model: nn.Module) -> GlobalCom2Config | None:
    """The config GlobalCom2 runs with on ``model``, or None when not applied."""
    adapter = get_adapter(model)
    return None if adapter is None else adapter.config


def apply(
    model: M,
    config: GlobalCom2Config | None = None,
    *,
    retention_ratio: float | None = None,
    layout: str | None = None,
    temperature: float | None = None,
) -> M:
    """Apply GlobalCom2 to a model instance, in place, and return it.

    Keep calling ``model(...)``, ``model.generate(...)`` and the model's processor as usual: every
    image is compressed to about ``retention_ratio`` of its visual tokens before the language
    model sees it. Only this instance is patched. Applying again replaces the earlier settings.

    Args:
        model: a supported model (``LlavaNextForConditionalGeneration`` or ``LlavaNextModel``).
        config: a full :class:`GlobalCom2Config`; keyword arguments override its fields.
        retention_ratio: fraction of visual tokens kept, ``0 < R <= 1`` (default 0.25).
        layout: ``"official"`` (default, the published implementation token for token) or
            ``"spatial"`` (tokens at their true positions).
        temperature: softmax temperature of the crop budget allocation (default 10.0).

    Returns:
        ``model`` itself.

    Raises:
        ValueError: a bad argument (named in the message) or an unsupported model.
        RuntimeError: an untested ``transformers`` version.
    """
    overrides = {
        k: v
        for k, v in {"retention_ratio": retention_ratio, "layout": layout, "temperature": temperature}.items()
        if v is not None
    }
    if config is not None and not isinstance(config, GlobalCom2Config):
        raise ValueError(f"config must be a GlobalCom2Config, got {type(config).__name__}")
    cfg = (config or GlobalCom2Config()).replace(**overrides) if overrides else (config or GlobalCom2Config())
    adapter_cls = adapter_for(model)
    _check_transformers()
    adapter = adapter_cls(model, cfg)
    adapter.validate()
    remove(model)
    adapter.patch()
    return model


def remove(model: M) -> M:
    """Undo :func:`apply`: the model behaves exactly as before. Harmless on an unpatched model."""
    adapter = get_adapter(model)
    if adapter is not None:
        adapter.unpatch()
    return model


@contextlib.contextmanager
def compressed(model: M, config: GlobalCom2Config | None = None, **kwargs: Any) -> Iterator[M]:
    """Context manager: GlobalCom2 applied inside the block, the previous state restored after.

    >>> with globalcom2.compressed(model, retention_ratio=0.25):   # doctest: +SKIP
    ...     out = model.generate(**inputs)
    """
    previous = get_config(model)
    apply(model, config, **kwargs)
    try:
        yield model
    finally:
        if previous is None:
            remove(model)
        else:
            apply(model, previous)
