"""The method registry: GlobalCom2 and the baselines it is compared with, behind one ``apply``.

Every method is one module of this package (its validated config with its algorithm, see
:mod:`globalcom2.methods.base`), registered by ``@register_method`` when imported below;
compositions ``"<vision>+<language>"`` come from the two registries.

=====================  ==========  ==============================================================
method                 where       what it keeps at retention ratio R
=====================  ==========  ==============================================================
``globalcom2``         vision      the thumbnail commands: ``floor(N R)`` thumbnail tokens, crop j
                                   ``floor(n_j r_j)`` by global + local score (the paper)
``fastervlm``          vision      ``floor(R (N + sum n_j))`` tokens by [CLS] importance, ranked
                                   jointly over all views (no per-crop budget, no guidance)
``random``             vision      the same joint budget, drawn at random (private, seeded)
``pooling``            vision      every view average-pooled to about R of its tokens
``fastv``              language    after layer K, the ``round(R n)`` visual tokens the last token
                                   attends to most (the others leave the sequence and KV cache)
``<vision>+fastv``     both        a vision method at R, then FastV inside the language model
=====================  ==========  ==============================================================

**How budgets compare.** Visual tokens are counted as the placeholders the language model
receives for an image, image-newline embeddings included, and every method is compared at the
same nominal R. Vision-side selections keep ``floor(N R)`` thumbnail tokens and about
``R sum n_j`` of the unpadded crop tokens (``n_j``: crop j's tokens left after unpadding, the
ones the vanilla model uses); newlines are not compressed and depend on the layout: ``official``
writes one per row of the full crop grid (padded rows included, like the published code),
``spatial`` one per unpadded row (like the vanilla model), ``pooling`` one per pooled row. FastV
counts every image placeholder (newlines included) as a visual token and keeps
``max(1, round(R n))`` of them in layers ``K..L-1``; its *effective* count is the layer average
``(K n + (L - K) kept) / L``. :func:`globalcom2.last_stats` reports both per sample.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .base import LANGUAGE_METHODS, VISION_METHODS, LanguageMethodConfig, VisionMethodConfig, register_method

# The registry: importing a method's module registers it (@register_method). One line per method;
# the order here is the order of method_names(), the CLI's help and the tests' matrix.
from .globalcom2 import GlobalCom2Config  # noqa: E402  (isort: skip)
from .fastervlm import FasterVLMConfig  # noqa: E402
from .random import RandomConfig, random_scores  # noqa: E402
from .pooling import PoolingConfig, PoolingPlan  # noqa: E402
from .visionzip import VisionZipConfig  # noqa: E402
from .fastv import FastVConfig  # noqa: E402

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..core.geometry import CropGeometry

#: The language-model-side method of the compositions (``"<vision>+fastv"``).
FASTV = "fastv"


def _fastv_config_cls() -> type:
    return LANGUAGE_METHODS[FASTV]


@dataclass(frozen=True)
class ComposedConfig:
    """A vision-side method followed by FastV inside the language model.

    Args:
        vision: the vision method's config (e.g. :class:`GlobalCom2Config`).
        fastv: the :class:`~globalcom2.fastv.FastVConfig` of the language-model side.
    """

    vision: VisionMethodConfig
    fastv: Any

    def __post_init__(self) -> None:
        if not isinstance(self.vision, VisionMethodConfig):
            raise ValueError(f"vision must be a vision-side method config, got {type(self.vision).__name__}")
        if not isinstance(self.fastv, _fastv_config_cls()):
            raise ValueError(f"fastv must be a FastVConfig, got {type(self.fastv).__name__}")

    @property
    def method(self) -> str:
        return f"{self.vision.method}+{FASTV}"

    @property
    def retention_ratio(self) -> float:
        return self.vision.retention_ratio

    @property
    def language(self) -> Any:
        """The language-model-side half (today always FastV)."""
        return self.fastv

    def to_dict(self) -> dict[str, Any]:
        return {"vision": self.vision.to_dict(), "fastv": self.fastv.to_dict()}


def method_names() -> list[str]:
    """Every method :func:`globalcom2.apply` accepts."""
    return [*VISION_METHODS, *LANGUAGE_METHODS, *(f"{v}+{lang}" for lang in LANGUAGE_METHODS for v in VISION_METHODS)]


def _normalise(method: str) -> str:
    if not isinstance(method, str):
        raise ValueError(f"method must be a string, got {method!r}")
    name = method.strip().lower().replace(" ", "")
    if name not in method_names():
        raise ValueError(f"unknown method {method!r}; known: {', '.join(method_names())}")
    return name


def make_config(method: str = "globalcom2", config: Any = None, **options: Any) -> Any:
    """The validated config of ``method``, from an optional ``config`` plus keyword overrides.

    For a composition ``"<vision>+fastv"``, options prefixed with ``fastv_`` configure FastV
    (``fastv_retention_ratio``, ``fastv_layer``) and the others the vision method.

    ``None`` is not "the default": leave an option out to get its default (a ``None`` value is a
    ``ValueError`` naming the option, raised by the config).

    Raises:
        ValueError: an unknown method, a config of the wrong type, or a bad/unknown option (named).
    """
    name = _normalise(method)
    if name in VISION_METHODS or name in LANGUAGE_METHODS:
        cls = VISION_METHODS.get(name) or LANGUAGE_METHODS[name]
        if config is not None and not isinstance(config, cls):
            raise ValueError(f"config for method {name!r} must be a {cls.__name__}, got {type(config).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"unknown option(s) for method {name!r}: {', '.join(unknown)}; known: {', '.join(known)}")
        if config is None:
            return cls(**options)
        return config.replace(**options) if options else config
    vision_name = name.split("+")[0]
    vision_opts = {k: v for k, v in options.items() if not k.startswith("fastv_")}
    fastv_opts = {k[len("fastv_"):]: v for k, v in options.items() if k.startswith("fastv_")}
    if config is not None and not isinstance(config, ComposedConfig):
        raise ValueError(f"config for method {name!r} must be a ComposedConfig, got {type(config).__name__}")
    vision = make_config(vision_name, config.vision if config is not None else None, **vision_opts)
    fastv = make_config(FASTV, config.fastv if config is not None else None, **fastv_opts)
    return ComposedConfig(vision=vision, fastv=fastv)


def config_to_dict(config: Any) -> dict[str, Any]:
    """``{"method": name, ...fields}``, JSON-serialisable; inverse of :func:`config_from_dict`."""
    return {"method": config.method, **config.to_dict()}


def config_from_dict(data: Mapping[str, Any]) -> Any:
    """Rebuild any method's config from :func:`config_to_dict`'s output."""
    data = dict(data)
    name = _normalise(data.pop("method", "globalcom2"))
    if "+" in name:
        vision = make_config(name.split("+")[0], **dict(data.get("vision", {})))
        fastv = make_config(FASTV, **dict(data.get("fastv", {})))
        return ComposedConfig(vision=vision, fastv=fastv)
    return make_config(name, **data)


def vision_config(config: Any) -> VisionMethodConfig | None:
    """The vision-side part of a config (None for FastV alone)."""
    if isinstance(config, ComposedConfig):
        return config.vision
    return config if isinstance(config, VisionMethodConfig) else None


def language_config(config: Any) -> LanguageMethodConfig | None:
    """The language-model-side part of a config (None for a vision-side method alone)."""
    if isinstance(config, ComposedConfig):
        return config.language
    return config if isinstance(config, LanguageMethodConfig) else None


#: The FastV part of a config (FastV is the one language-model-side method).
fastv_config = language_config


def parse_method_options(items: list[str] | None) -> dict[str, Any]:
    """Parse ``["layout=spatial", "seed=3", "fastv_layer=2"]`` (CLI ``--method-arg``) into a dict.

    Values become ``int``, ``float`` or ``bool`` (``true``/``false``) when they read as one, else
    stay strings. Which keys are valid is checked by :func:`make_config`.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"method option {item!r} must look like KEY=VALUE")
        out[key] = coerce_value(raw.strip())
    return out


def coerce_value(raw: str) -> Any:
    """``raw`` as a bool (``true``/``false``, any case), int or float when it reads as one, else itself."""
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def option_names(method: str) -> list[str]:
    """The option names :func:`make_config` accepts for ``method``."""
    name = _normalise(method)
    if name in VISION_METHODS:
        return [f.name for f in fields(VISION_METHODS[name])]
    if name in LANGUAGE_METHODS:
        return [f.name for f in fields(LANGUAGE_METHODS[name])]
    return option_names(name.split("+")[0]) + [f"fastv_{n}" for n in option_names(FASTV)]


#: The option every config has but no command takes as a method option: the retention ratio is
#: given on its own (``--retention-ratio`` / ``--ratios``), so that one setting has one ratio.
RATIO_OPTION = "retention_ratio"


class UnknownOptionError(ValueError):
    """Options that none of the methods has (:func:`check_method_options`).

    Attributes: ``unknown`` (the options), ``methods`` (the method names), ``known`` (their
    options, sorted; ``retention_ratio`` excluded)."""

    def __init__(self, unknown: Sequence[str], methods: Sequence[str], known: Sequence[str]) -> None:
        self.unknown, self.methods, self.known = list(unknown), list(methods), list(known)
        super().__init__(
            f"option(s) {', '.join(self.unknown)} belong to none of the methods {', '.join(self.methods) or '(none)'}; "
            f"their options: {', '.join(self.known) or 'none'}"
        )


@dataclass(frozen=True)
class MethodSetting:
    """One validated (method, retention ratio) setting of a command.

    Attributes:
        method: the normalised method name (see :func:`method_names`).
        ratio: the retention ratio R, ``0 < R <= 1``.
        options: the options of this method (those of the command's options it has), to pass to
            ``globalcom2.apply(model, method=method, retention_ratio=ratio, **options)``.
        config: the method's validated config (:func:`make_config`).
    """

    method: str
    ratio: float
    options: dict[str, Any]
    config: Any

    @property
    def label(self) -> str:
        return f"{self.method} R={self.ratio:g}"


def check_method_options(
    methods: Sequence[str], options: Mapping[str, Any] | None, ratio_flag: str | None = None
) -> dict[str, dict[str, Any]]:
    """Each method's share of ``options`` (an option goes to every method that has it).

    The rule, the same for every command: ``retention_ratio`` is never a method option (the ratio
    is given by itself: ``ratio_flag`` names the command's flag, e.g. ``--retention-ratio``); an
    option that none of ``methods`` has is an error. Values are not checked here (see
    :func:`plan_settings`).

    Raises:
        ValueError: an unknown method, or ``retention_ratio`` among the options.
        UnknownOptionError: an option none of the methods has (a ValueError naming it and the
            methods' options).
    """
    names = [_normalise(m) for m in methods]
    options = dict(options or {})
    if RATIO_OPTION in options:
        where = (f"give it with {ratio_flag}, not --method-arg" if ratio_flag
                 else "give the ratios themselves")
        raise ValueError(f"{RATIO_OPTION} is not a method option: {where}")
    accepted = {m: [o for o in option_names(m) if o != RATIO_OPTION] for m in names}
    unused = sorted(k for k in options if not any(k in acc for acc in accepted.values()))
    if unused:
        raise UnknownOptionError(unused, names, sorted(set().union(*accepted.values())) if accepted else [])
    return {m: {k: v for k, v in options.items() if k in accepted[m]} for m in names}


def plan_settings(
    methods: Sequence[str],
    ratios: Sequence[float],
    options: Mapping[str, Any] | None = None,
    ratio_flag: str | None = None,
) -> list[MethodSetting]:
    """Every (method, ratio) setting of a command, validated before any work: method-major, in
    the order given (a repeated ratio stays: the caller decides). The one validation path of
    ``generate``, ``bench``, ``visualize`` and ``eval`` (and of
    :func:`globalcom2.bench.method_settings` and :func:`globalcom2.eval.runner.plan_runs`).

    Args:
        methods: method names (case-insensitive).
        ratios: retention ratios, each in (0, 1].
        options: method options, each given to the methods that have it (see
            :func:`check_method_options`: ``retention_ratio`` is never one).
        ratio_flag: the command's ratio flag, named in the messages (None: the Python API).

    Raises:
        ValueError: see :func:`check_method_options`; a bad ratio (prefixed with ``ratio_flag``)
            or a bad option value (named by the config).
    """
    shares = check_method_options(methods, options, ratio_flag)
    settings: list[MethodSetting] = []
    for name, mine in shares.items():
        for r in ratios:
            try:
                make_config(name, retention_ratio=r)  # the ratio alone first: its error names its flag
            except ValueError as e:
                raise ValueError(f"{ratio_flag}: {e}" if ratio_flag else str(e)) from None
            ratio = float(r)
            settings.append(MethodSetting(name, ratio, mine, make_config(name, retention_ratio=ratio, **mine)))
    return settings


def compress_image(
    features: "torch.Tensor",
    importance: "torch.Tensor",
    geom: "CropGeometry | None",
    newline: "torch.Tensor | None",
    config: VisionMethodConfig,
) -> tuple["torch.Tensor", Any]:
    """Compress one image with any vision-side method (``config.compress``).

    Args:
        features: (V, N, D) projected features, thumbnail first.
        importance: (V, N) importance of the same views.
        geom: crop geometry (None for a single view).
        newline: (D,) image-newline embedding (None for families without one).
        config: a vision-side method config.

    Returns:
        tokens: (L, D) the image's sequence for the language model.
        plan: what was kept (``plan.kept_masks()``, ``plan.num_tokens``).
    """
    if not isinstance(config, VisionMethodConfig):
        raise ValueError(f"not a vision-side method config: {type(config).__name__}")
    return config.compress(features, importance, geom, newline)


def compress_images(
    features: "Sequence[torch.Tensor]",
    importance: "Sequence[torch.Tensor]",
    geometries: "Sequence[CropGeometry | None]",
    newline: "torch.Tensor | None",
    config: VisionMethodConfig,
) -> tuple[list["torch.Tensor"], list[Any]]:
    """Compress a batch's images with any vision-side method (``config.compress_batch``: one
    vectorised pass and one host sync for GlobalCom2, FasterVLM and random on crop grids, see
    :mod:`globalcom2.core.batch`; :meth:`~VisionMethodConfig.compress` per image otherwise).

    Args:
        features, importance, geometries: per image, as :func:`compress_image` takes them.
        newline: (D,) image-newline embedding (None for families without one).
        config: a vision-side method config.

    Returns:
        per image its (L_i, D) tokens, and per image its plan.
    """
    if not isinstance(config, VisionMethodConfig):
        raise ValueError(f"not a vision-side method config: {type(config).__name__}")
    if not features:
        return [], []
    return config.compress_batch(features, importance, geometries, newline)


__all__ = [
    "ComposedConfig", "FASTV", "FasterVLMConfig", "FastVConfig", "GlobalCom2Config", "LANGUAGE_METHODS",
    "LanguageMethodConfig", "MethodSetting", "PoolingConfig", "PoolingPlan", "RandomConfig", "UnknownOptionError",
    "VISION_METHODS", "VisionMethodConfig", "VisionZipConfig", "check_method_options", "coerce_value", "compress_image",
    "compress_images",
    "config_from_dict", "config_to_dict", "fastv_config", "language_config", "make_config", "method_names",
    "option_names", "parse_method_options", "plan_settings", "random_scores", "register_method", "vision_config",
]
