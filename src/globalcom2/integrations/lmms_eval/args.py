"""``--model_args``: split into the checkpoint's loading settings and the compression method,
every value checked (a ``ValueError`` naming it) before anything is loaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ._common import DEFAULT_MAX_NEW_TOKENS, MODEL_NAME, _log

#: The checkpoint loaded when ``pretrained`` is not given.
DEFAULT_PRETRAINED = "llava-hf/llava-v1.6-vicuna-7b-hf"
#: ``method`` values that load the model without compression (the baseline).
NO_COMPRESSION = ("none", "vanilla")
#: model_args that load the checkpoint or drive generation (the rest configure the method).
LOADER_ARGS: dict[str, Any] = {
    "pretrained": DEFAULT_PRETRAINED,
    "revision": "main",
    "device": None,  # cuda when available, else cpu
    "dtype": "auto",
    "batch_size": 1,
    "max_batch_size": None,  # passed by lmms-eval's CLI; unused (no automatic batch size)
    "attn_implementation": None,
    "device_map": "",
    "trust_remote_code": False,
    "chat_template": None,
    "use_cache": True,
    "max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
}


@dataclass
class ModelArgs:
    """``--model_args`` split into loading settings and the compression method.

    Attributes:
        loader: the :data:`LOADER_ARGS` keys, defaults filled in, values checked.
        method: the compression method's name, or None for the uncompressed model.
        options: the method's options as given (``retention_ratio`` included).
        config: the validated method config (None without compression).
    """

    loader: dict[str, Any]
    method: str | None
    options: dict[str, Any] = field(default_factory=dict)
    config: Any = None


def _coerce(value: Any) -> Any:
    """A string value as lmms-eval's own parser reads it (bool, int, float or string)."""
    if not isinstance(value, str):
        return value
    from ...methods import coerce_value

    return coerce_value(value.strip())


def split_arg_string(arg_string: str) -> dict[str, Any]:
    """``"a=1,b=x"`` -> ``{"a": 1, "b": "x"}`` (values coerced like lmms-eval's parser)."""
    out: dict[str, Any] = {}
    for item in (p.strip() for p in arg_string.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{MODEL_NAME}: model_args item {item!r} must look like KEY=VALUE")
        out[key.strip()] = _coerce(value.strip())
    return out


def parse_dtype(value: Any) -> Any:
    """``"auto"`` stays; ``"float16"``/``"fp16"``/``"half"``, ``"bfloat16"``/``"bf16"``,
    ``"float32"``/``"fp32"`` (or a torch.dtype) become the torch dtype."""
    import torch

    if value is None or value == "auto" or isinstance(value, torch.dtype):
        return "auto" if value is None else value
    aliases = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}
    name = aliases.get(str(value).lower().replace("torch.", ""), str(value).lower().replace("torch.", ""))
    if name not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"{MODEL_NAME}: dtype must be auto, float16, bfloat16 or float32, got {value!r}")
    return getattr(torch, name)


def _parse_batch_size(value: Any) -> int:
    if isinstance(value, str) and value.strip().lower().startswith("auto"):
        _log.warning(f"{MODEL_NAME}: batch_size {value!r} is not supported; using 1")
        return 1
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{MODEL_NAME}: batch_size must be a positive integer, got {value!r}") from None
    if size < 1 or (isinstance(value, float) and value != size):
        raise ValueError(f"{MODEL_NAME}: batch_size must be a positive integer, got {value!r}")
    return size


def parse_model_args(args: str | Mapping[str, Any]) -> ModelArgs:
    """Split and check ``--model_args`` (an ``"a=1,b=x"`` string or a mapping).

    Raises:
        ValueError: an unknown key (named, with the keys that are known), a bad method or a bad
            value (named), before anything is loaded.
    """
    from ...methods import make_config, method_names, option_names

    given = split_arg_string(args) if isinstance(args, str) else {k: _coerce(v) for k, v in dict(args).items()}
    if "torch_dtype" in given:
        torch_dtype = given.pop("torch_dtype")
        if "dtype" in given and given["dtype"] != torch_dtype:
            raise ValueError(f"{MODEL_NAME}: dtype={given['dtype']!r} and torch_dtype={torch_dtype!r} disagree; give one")
        given["dtype"] = torch_dtype
    loader = {k: given.pop(k, default) for k, default in LOADER_ARGS.items()}
    for key in ("pretrained", "revision"):  # lmms-eval's parser turns "1234" into 1234
        if isinstance(loader[key], (int, float)) and not isinstance(loader[key], bool):
            loader[key] = str(loader[key])
    loader["batch_size"] = _parse_batch_size(loader["batch_size"])
    loader["dtype"] = parse_dtype(loader["dtype"])
    if not isinstance(loader["pretrained"], str) or not loader["pretrained"]:
        raise ValueError(f"{MODEL_NAME}: pretrained must be a hub id or a checkpoint directory, got {loader['pretrained']!r}")
    max_new = loader["max_new_tokens"]
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
        raise ValueError(f"{MODEL_NAME}: max_new_tokens must be a positive integer, got {max_new!r}")
    for key in ("use_cache", "trust_remote_code"):
        if not isinstance(loader[key], bool):
            raise ValueError(f"{MODEL_NAME}: {key} must be true or false, got {loader[key]!r}")

    method = given.pop("method", "globalcom2")
    if not isinstance(method, str):
        raise ValueError(f"{MODEL_NAME}: method must be a name, got {method!r}")
    method = method.strip().lower()
    if method in NO_COMPRESSION:
        if given:
            raise ValueError(
                f"{MODEL_NAME}: method={method} loads the uncompressed model and takes no method options, "
                f"got {', '.join(sorted(given))}"
            )
        return ModelArgs(loader=loader, method=None)
    if method not in method_names():
        raise ValueError(f"{MODEL_NAME}: unknown method {method!r}; known: {', '.join(method_names())}, none")
    options = {"retention_ratio": 0.25, **given}
    known = option_names(method)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"{MODEL_NAME}: unknown model_args option(s) {', '.join(unknown)}; known: loading options "
            f"{', '.join(['torch_dtype', *LOADER_ARGS])}, method, and the options of method {method!r}: {', '.join(known)}"
        )
    try:
        config = make_config(method, **options)
    except ValueError as e:
        raise ValueError(f"{MODEL_NAME}: {e}") from None
    return ModelArgs(loader=loader, method=method, options=options, config=config)

