"""The public entry points: ``apply``, ``remove``, ``compressed`` and friends (``compress_images``,
``load_embeddings`` and ``embed_prompt`` live in :mod:`globalcom2.embeddings`; the package root
exports both)."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, TypeVar

from torch import nn

from .models import STATE_ATTR, CompressionStats, Family, family_for

M = TypeVar("M", bound=nn.Module)

#: transformers versions this release supports (checked by :func:`apply`; 5.17 and older lack
#: `mm_encoder_outputs`, which the patched model needs). A family may need a later one
#: (`Family.min_transformers`: SmolVLM 5.21; Phi-4's count-first processor 5.23).
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


def unwrap_model(model: Any) -> Any:
    """The model that :func:`apply` patches inside a wrapper: a PEFT ``PeftModel`` (its base model,
    LoRA layers included), a ``torch.compile``-d module (its ``_orig_mod``), or a
    ``DistributedDataParallel`` / ``DataParallel`` module (its ``module``); ``model`` otherwise.

    Calls through the wrapper reach the patched ``forward`` / ``generate`` of the unwrapped model,
    which are instance attributes, so the wrapper itself is left untouched.
    """
    seen: set[int] = set()
    while id(model) not in seen:
        seen.add(id(model))
        d = getattr(model, "__dict__", {})
        if "_orig_mod" in d.get("_modules", {}):  # torch.compile's OptimizedModule
            model = d["_modules"]["_orig_mod"]
        elif type(model).__module__.startswith("peft.") and callable(getattr(model, "get_base_model", None)):
            model = model.get_base_model()
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
    return model


def get_family(model: nn.Module) -> Family | None:
    """The :class:`~globalcom2.models.Family` instance applied to ``model`` (or to the model inside its PEFT / compile wrapper), or None.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module`` (``None``, a string, a processor...).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a supported vision-language model), got {type(model).__name__}")
    return unwrap_model(model).__dict__.get(STATE_ATTR)


def is_applied(model: nn.Module) -> bool:
    """Whether a method (GlobalCom2 or another) is currently applied to ``model``."""
    return get_family(model) is not None


def get_config(model: nn.Module) -> Any:
    """The config the applied method runs with on ``model`` (a :class:`GlobalCom2Config` for
    GlobalCom2), or None when nothing is applied."""
    adapter = get_family(model)
    return None if adapter is None else adapter.config


def last_stats(model: nn.Module) -> CompressionStats | None:
    """Visual-token counts of the model's most recent prefill, per batch row (None before any).

    See :class:`~globalcom2.models.CompressionStats`: ``visual_tokens`` entering the
    language model, ``vanilla_visual_tokens``, ``lm_visual_tokens`` after FastV, and the
    layer-averaged ``effective_visual_tokens``.
    """
    adapter = get_family(model)
    return None if adapter is None else getattr(adapter, "stats", None)


def resolve_method(model: Any, config: Any, method: str | None, options: dict[str, Any]) -> tuple[Any, Any, Any]:
    """What :func:`apply` (and :func:`globalcom2.compress_images`) make of their arguments:
    ``(the model to patch, its family class, the validated method config)``. The method is
    ``method``, else ``config``'s, else GlobalCom2; without a layout asked for (no ``config``, no
    ``layout`` option) the family's default layout is used."""
    from .methods import make_config

    if method is None:
        method = getattr(config, "method", None) if config is not None else "globalcom2"
        if method is None:
            raise ValueError(f"config must be a method config such as GlobalCom2Config, got {type(config).__name__}")
    cfg = make_config(method, config, **options)
    target = unwrap_model(model)
    family_cls = family_for(target)
    if config is None and "layout" not in options:  # no layout asked for: the family's default
        cfg = family_cls.with_default_layout(cfg)
    return target, family_cls, cfg


def apply(model: M, config: Any = None, *, method: str | None = None, processor: Any = None, **options: Any) -> M:
    """Apply a token-compression method to a model instance, in place, and return it.

    Keep calling ``model(...)``, ``model.generate(...)`` and the model's processor as usual: every
    image is compressed before (or, for FastV, inside) the language model. Only this instance is
    patched. Applying again replaces the earlier method and settings.

    Args:
        model: a supported model (``LlavaNextForConditionalGeneration`` or ``LlavaNextModel``), or
            one wrapped by PEFT, ``torch.compile`` or (Distributed)DataParallel: the model inside
            is patched (see :func:`unwrap_model`) and ``model`` is returned as given.
        config: a full method config (e.g. :class:`GlobalCom2Config`); keyword options override
            its fields. Its type decides the method when ``method`` is not given.
        method: ``"globalcom2"`` (default), ``"fastervlm"``, ``"random"``, ``"pooling"``,
            ``"fastv"`` or ``"<vision method>+fastv"`` (see :mod:`globalcom2.methods`).
        **options: the method's config fields. GlobalCom2: ``retention_ratio`` (default 0.25),
            ``layout`` (``"official"`` or ``"spatial"``; left out, the method's default where the
            model's family has it, else the family's own: ``spatial`` on families without
            published code to be ``official`` to), ``temperature`` (10.0), ``allocation``
            and ``scoring`` (the paper's ablations). FastV: ``retention_ratio``, ``layer``.
            Compositions: FastV's options prefixed with ``fastv_``.
        processor: the model's processor, to patch as well (the recommended way, "count
            first"): it then writes each image's *compressed* count of placeholders, so the prompt
            the caller holds is the sequence the model runs and every ``generate`` option, cache,
            mask and chat turn works as on the vanilla model. The count must be known from the
            image size: ``count="fixed"`` is the default here (SPEC.md, "Fixed count"); a
            ``count="published"`` GlobalCom2 is a ``ValueError``. :func:`remove` restores both.
            The patched model also takes prompts with the vanilla placeholders.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: a bad argument (named in the message), an unknown method, or an unsupported model.
        RuntimeError: an untested ``transformers`` version.
    """
    if processor is not None and "count" not in options and not (config is not None and method is None):
        from .methods import make_config, vision_config

        probe = vision_config(make_config(method or "globalcom2", config))
        if probe is not None and "count" in getattr(probe, "__dataclass_fields__", {}):
            options = {**options, "count": "fixed"}
    target, adapter_cls, cfg = resolve_method(model, config, method, options)
    _check_transformers()
    adapter = adapter_cls(target, cfg)
    adapter.validate()
    adapter.check_transformers()  # the patched forward's needs (not compress_images', nor vLLM's)
    if processor is not None:
        from . import processors
        from .methods import vision_config

        vision = vision_config(cfg)
        if vision is None:
            raise ValueError(
                f"method {cfg.method!r} prunes inside the language model: the prompt keeps the vanilla placeholders, "
                "leave processor= out"
            )
        if not vision.fixed_count:
            raise ValueError(
                f"processor=: the processor writes each image's count before the vision tower runs, but "
                f"{vision.method!r} with count={getattr(vision, 'count', None)!r} depends on the image's content; "
                "use count='fixed'"
            )
        patch = processors.ProcessorPatch(processor, adapter_cls, adapter.hf_config, vision)  # checked before patching
    remove(target)
    adapter.patch()
    if processor is not None:
        adapter.processor_patch = patch.attach()
    return model


def remove(model: M) -> M:
    """Undo :func:`apply`: the model behaves exactly as before. Harmless on an unpatched model.

    A wrapper set on the patched model afterwards (accelerate's ``prepare`` wraps ``forward``)
    stays in place and keeps working: the method inside it passes straight through again.
    """
    adapter = get_family(model)
    if adapter is not None:
        patch = getattr(adapter, "processor_patch", None)
        if patch is not None:
            patch.detach()
            adapter.processor_patch = None
        adapter.unpatch()
    return model


@contextlib.contextmanager
def compressed(model: M, config: Any = None, **kwargs: Any) -> Iterator[M]:
    """Context manager: a method (default GlobalCom2) applied inside the block, the previous
    state restored after. Takes :func:`apply`'s arguments.

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
