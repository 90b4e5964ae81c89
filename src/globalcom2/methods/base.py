"""What a method is: a validated config that carries its algorithm, registered by a decorator.

A method lives in one file, ``globalcom2/methods/<name>.py``: a frozen config dataclass derived
from :class:`VisionMethodConfig` (it compresses an image's encoded views before the language
model) or :class:`LanguageMethodConfig` (it acts inside the language model), decorated with
:func:`register_method`. The config's own methods are the algorithm, so nothing dispatches on
config types (the handler-per-config-type idea of torchao's ``quantize_``, one press per file as
in kvpress). Importing a method module loads neither torch nor numpy: tensor code is imported
when it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from .._lazy import lazy_module
from ..core.config import MethodConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..core.geometry import CropGeometry
    from ..core.layouts import KeptMasks

__all__ = [
    "LANGUAGE_METHODS", "VISION_METHODS", "LanguageMethodConfig", "ScoreSelectionConfig", "VisionMethodConfig",
    "register_method",
]

_plans = lazy_module("globalcom2.core.plans")  # tensor code, imported when a method runs
_batch = lazy_module("globalcom2.core.batch")


@dataclass(frozen=True)
class VisionMethodConfig(MethodConfig):
    """Base of the vision-side methods: they decide, per image, which visual tokens the language
    model receives.

    Subclasses set ``method`` (the registered name) and implement :meth:`compress`. A method that
    arranges kept tokens in several ways has a ``layout`` field; ``layout_field`` names it (None:
    the method has one fixed arrangement).
    """

    layout_field: ClassVar[str | None] = "layout"
    #: Whether every token the method hands over is a copy of one input row or the newline (a
    #: selection: no arithmetic on the features). A family may then hand it the projector's input
    #: and project only the rows that survive (:class:`globalcom2.models.EncodedImages` ``project``);
    #: a method that merges, pools or resizes features gets them projected, as before. Such a
    #: method's scores may read ``features`` only as a family's projector input (or not at all).
    gathers_rows: ClassVar[bool] = False

    @property
    def fixed_count(self) -> bool:
        """Whether the number of tokens an image keeps is a function of its size alone (what a
        processor or a serving engine must know before the tower runs; SPEC.md "Fixed count")."""
        return True

    def compress(
        self,
        features: "torch.Tensor",
        importance: "torch.Tensor",
        geom: "CropGeometry | None",
        newline: "torch.Tensor | None",
    ) -> tuple["torch.Tensor", Any]:
        """Compress one image.

        Args:
            features: (V, N, D) projected features of the image's views, thumbnail first.
            importance: (V, N) importance of the same tokens (higher: more important; float64 from the
                families, see ``core.importance.SCORE_DTYPE``).
            geom: the crop geometry (None for an image seen as one view).
            newline: (D,) the image-newline embedding (None for families without one).

        Returns:
            tokens: (L, D) the image's sequence for the language model.
            plan: what was kept; every plan has ``num_tokens``, ``geometry`` and
            ``kept_masks()`` (a :class:`~globalcom2.core.layouts.KeptMasks`).
        """
        raise NotImplementedError  # pragma: no cover - abstract

    def compress_batch(
        self,
        features: "Sequence[torch.Tensor]",
        importance: "Sequence[torch.Tensor]",
        geometries: "Sequence[CropGeometry | None]",
        newline: "torch.Tensor | None",
    ) -> tuple[list["torch.Tensor"], list[Any]]:
        """Compress every image of a batch (what ``Family.compress`` calls).

        This default runs :meth:`compress` image by image (a Python pass and the method's host
        syncs per image): right for methods that make new tokens (pooling) or have no batched
        form. GlobalCom2, FasterVLM and random override it with one vectorised pass and one host
        sync per batch (:mod:`globalcom2.core.batch`); an override must return what this default
        returns, image for image.

        Args:
            features, importance, geometries: per image, as :meth:`compress` takes them.
            newline: (D,) the image-newline embedding (None for families without one).

        Returns:
            per image its (L_i, D) tokens, and per image its plan.
        """
        tokens, plans = [], []
        for feats, imp, geom in zip(features, importance, geometries):
            t, p = self.compress(feats, imp, geom, newline)
            tokens.append(t)
            plans.append(p)
        return tokens, plans

    @classmethod
    def keep_all(cls, **options: Any) -> "VisionMethodConfig":
        """A setting of this method that keeps every token (R = 1 by default): with the ``spatial``
        layout the language model gets exactly the vanilla sequence (tests check it)."""
        return cls(retention_ratio=1.0, **options)


@dataclass(frozen=True)
class ScoreSelectionConfig(VisionMethodConfig):
    """Base of the score-based selection methods: a subclass is its fields and one :meth:`score`.

    The base owns the rest, as kvpress's base press does: the budget (``floor(R (N + sum_j n_j))``
    tokens per image, one joint ranking over the thumbnail's and the crops' unpadded tokens), the
    ranking (stable: ties to the lower position), the layouts, the gather, the batch (one
    vectorised pass and one host sync, :mod:`globalcom2.core.batch`) and every family (the
    families hand every method the same per-view features, importance and geometry). FasterVLM
    (``score`` = the importance) and random pruning (``score`` = random draws) are two of them.

    A subclass declares ``retention_ratio``, ``layout`` and ``count`` fields (see
    ``methods/fastervlm.py``) and implements :meth:`score`; :meth:`scores_batch` may be overridden
    where scoring many images at once is cheaper.
    """

    gathers_rows: ClassVar[bool] = True

    def score(self, features: "torch.Tensor", importance: "torch.Tensor", geom: "CropGeometry | None") -> "torch.Tensor":
        """(V, N) scores of one image's tokens (higher: kept first), from its (V, N, D) features,
        (V, N) importance (the signal the method's ``importance`` field asks the family for) and
        geometry. Padded crop positions are never kept, whatever their score."""
        raise NotImplementedError  # pragma: no cover - abstract

    def scores_batch(
        self,
        features: "Sequence[torch.Tensor]",
        importance: "Sequence[torch.Tensor]",
        geometries: "Sequence[CropGeometry | None]",
    ) -> list["torch.Tensor"]:
        """Per image its :meth:`score` (override to score a batch at once; same values)."""
        return [self.score(f, i, g) for f, i, g in zip(features, importance, geometries)]

    def compress(
        self, features: "torch.Tensor", importance: "torch.Tensor", geom: "CropGeometry | None", newline: "torch.Tensor | None"
    ) -> tuple["torch.Tensor", Any]:
        scores = self.score(features, importance, geom)
        return _plans.compress_by_scores(features, scores, geom, newline, self.retention_ratio, self._layout())

    def compress_batch(
        self,
        features: "Sequence[torch.Tensor]",
        importance: "Sequence[torch.Tensor]",
        geometries: "Sequence[CropGeometry | None]",
        newline: "torch.Tensor | None",
    ) -> tuple[list["torch.Tensor"], list[Any]]:
        """The joint budget for the whole batch in one vectorised pass with one host sync (resized
        crop maps included: a joint budget needs no per-crop step)."""
        if not features:
            return [], []
        scores = self.scores_batch(features, importance, geometries)
        return _batch.compress_batch(features, scores, geometries, newline, self.retention_ratio, self._layout(), joint=True)

    def _layout(self) -> str:
        return str(getattr(self, self.layout_field)) if self.layout_field else "spatial"


@dataclass(frozen=True)
class LanguageMethodConfig(MethodConfig):
    """Base of the language-model-side methods: they act inside the language model's layers.

    Subclasses implement :meth:`make_patch` (an object with ``validate()``, ``install()``,
    ``uninstall()``, ``prepare(visual)`` and ``n_layers``), :meth:`kept` and
    :meth:`effective`.
    """

    @classmethod
    def keep_all(cls, **options: Any) -> "LanguageMethodConfig":
        """A setting that keeps every visual token (R = 1): the language model computes what the
        vanilla one does (up to floating-point reordering)."""
        return cls(retention_ratio=1.0, **options)

    def make_patch(self, language_model: Any) -> Any:  # pragma: no cover - abstract
        """The reversible patch of ``language_model`` that runs this method."""
        raise NotImplementedError

    def kept(self, visual_tokens: int) -> int:  # pragma: no cover - abstract
        """Visual tokens left in the layers this method prunes, of ``visual_tokens``."""
        raise NotImplementedError

    def effective(self, visual_tokens: int, kept: int, n_layers: int) -> float:  # pragma: no cover - abstract
        """The layer-averaged visual tokens of a row."""
        raise NotImplementedError


#: Vision-side methods by name, in registration order.
VISION_METHODS: dict[str, type[VisionMethodConfig]] = {}
#: Language-model-side methods by name, in registration order.
LANGUAGE_METHODS: dict[str, type[LanguageMethodConfig]] = {}


def register_method(cls: type) -> type:
    """Class decorator: register a method config under its ``method`` name.

    Raises:
        TypeError: not a :class:`VisionMethodConfig` / :class:`LanguageMethodConfig` subclass, or
            no ``method`` name.
        ValueError: the name is taken by another class, or contains ``+`` (it joins compositions).
    """
    name = getattr(cls, "method", "")
    if not isinstance(name, str) or not name or "+" in name or name != name.lower():
        raise ValueError(f"{cls.__name__}.method must be a lower-case name without '+', got {name!r}")
    if issubclass(cls, VisionMethodConfig):
        table: dict[str, Any] = VISION_METHODS
    elif issubclass(cls, LanguageMethodConfig):
        table = LANGUAGE_METHODS
    else:
        raise TypeError(f"{cls.__name__} must derive from VisionMethodConfig or LanguageMethodConfig")
    other = VISION_METHODS.get(name) or LANGUAGE_METHODS.get(name)
    if other is not None and other is not cls and other.__qualname__ != cls.__qualname__:
        raise ValueError(f"method name {name!r} is already registered by {other.__name__}")
    table[name] = cls
    return cls
