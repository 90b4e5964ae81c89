"""GlobalCom2 settings inside vLLM: the engine's (``hf_config.globalcom2``, from ``hf_overrides``)
and a request's (``mm_processor_kwargs``), resolved to a validated config with ``count="fixed"``.

No import of vLLM here (the checks run where vLLM creates its model config, and in tests)."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any, Mapping

from . import CONFIG_KEY, REQUEST_KEYS


def _family(model_type: str) -> Any:
    from ...models import family_for_model_type

    return family_for_model_type(model_type)


def engine_settings(hf_config: Any) -> dict[str, Any] | None:
    """The ``"globalcom2"`` entry of a model config (None when GlobalCom2 is off)."""
    raw = getattr(hf_config, CONFIG_KEY, None)
    if raw is None:
        return None
    if isinstance(raw, str):  # a config.json written with the entry as a JSON string
        try:
            raw = json.loads(raw)
        except ValueError:
            raise ValueError(f"hf_overrides {CONFIG_KEY!r} must be a JSON object of GlobalCom2 settings, got {raw!r}") from None
    if not isinstance(raw, Mapping):
        raise ValueError(
            f"hf_overrides {CONFIG_KEY!r} must be a dict of GlobalCom2 settings (e.g. {{'retention_ratio': 0.25}}), "
            f"got {type(raw).__name__}"
        )
    return dict(raw)


def request_settings(mm_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The GlobalCom2 keys of a request's ``mm_processor_kwargs``."""
    if not mm_kwargs:
        return {}
    return {k: mm_kwargs[k] for k in REQUEST_KEYS if k in mm_kwargs}


def strip_request(mm_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``mm_kwargs`` without the GlobalCom2 keys (what the Hugging Face processor gets)."""
    return {k: v for k, v in mm_kwargs.items() if k not in REQUEST_KEYS}


def engine_config(model_type: str, hf_config: Any) -> Any:
    """The engine's validated config (None when GlobalCom2 is off): ValueError on a bad setting."""
    settings = engine_settings(hf_config)
    if settings is None:
        return None
    return resolve(model_type, hf_config, settings, {})


def resolve(model_type: str, hf_config: Any, settings: Mapping[str, Any], request: Mapping[str, Any]) -> Any:
    """The config of one request: the engine's ``settings`` with the request's overrides."""
    key = (json.dumps(dict(settings), sort_keys=True, default=repr), json.dumps(dict(request), sort_keys=True, default=repr))
    return _resolve(model_type, _HashableConfig(hf_config), key)


class _HashableConfig:
    """A model config as a cache key (by identity: vLLM keeps one config object per engine)."""

    def __init__(self, config: Any) -> None:
        self.config = config

    def __hash__(self) -> int:
        return id(self.config)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _HashableConfig) and other.config is self.config


@lru_cache(maxsize=256)
def _resolve(model_type: str, hf: _HashableConfig, key: tuple[str, str]) -> Any:
    from ...methods import make_config

    settings, request = json.loads(key[0]), json.loads(key[1])
    for where, values in (("hf_overrides", settings), ("mm_processor_kwargs", request)):
        count = values.get("count", "fixed")
        if count != "fixed":
            raise ValueError(
                f"GlobalCom2 in vLLM uses count='fixed' only (vLLM writes an image's placeholders before its encoder "
                f"runs; SPEC.md, 'Fixed count'); {where} asked for count={count!r}"
            )
    method = settings.pop("method", "globalcom2")
    if method != "globalcom2":
        raise ValueError(f"GlobalCom2's vLLM plugin runs method 'globalcom2' only, got method={method!r}")
    options = {**settings, **request, "count": "fixed"}
    family = _family(model_type)
    try:
        config = make_config("globalcom2", **options)
    except ValueError as e:
        raise ValueError(f"GlobalCom2 settings: {e}") from None
    if "layout" not in options:
        config = family.with_default_layout(config)
    counter = family.counter(hf.config, config)
    counter.check_layout(config.layout)
    return config


def counter(model_type: str, hf_config: Any, config: Any) -> Any:
    """A model-free family instance for counting and compressing (:meth:`Family.counter`)."""
    return _family(model_type).counter(hf_config, config)
