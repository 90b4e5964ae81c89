"""What every model family shares: reversible per-instance patching, the family registry, and
:class:`Family`, which runs any method on a model (input preparation, placeholder shrinking,
``forward`` / ``generate`` wrapping, prefill detection, stats). A family module
(``globalcom2/models/<family>.py``) adds only what is family-specific.

Importing this module loads neither torch nor transformers (tensor code is imported when it runs).
"""

from __future__ import annotations

import inspect
import threading
import warnings
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Sequence

from .. import methods
from .._lazy import lazy_module
from .._patching import STATE_ATTR, InstancePatch  # noqa: F401  (STATE_ATTR: models exports it)
from . import calls as _calls
from .calls import cache_keyword  # noqa: F401  (its home before models.calls; tests and callers import it here)
from ..methods.base import VisionMethodConfig

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from ..core.geometry import CropGeometry

torch = lazy_module("torch")
sequence = lazy_module("globalcom2.core.sequence")

#: Keyword argument of a patched ``forward`` / ``generate`` taking precomputed
#: :class:`~globalcom2.embeddings.ImageEmbeddings` in place of ``pixel_values``.
EMBEDDINGS_KWARG = "image_embeddings"




@dataclass
class CompressionStats:
    """Visual-token counts of the most recent prefill, one entry per batch row.

    Attributes:
        method: the method's name.
        visual_tokens: image placeholders entering the language model (after vision-side
            compression; newlines included).
        vanilla_visual_tokens: what the vanilla model would have used for the same prompts.
        lm_visual_tokens: for FastV, the visual tokens left in layers ``K..L-1``; else None.
        effective_visual_tokens: layer-averaged visual tokens (equals ``visual_tokens`` without FastV).
    """

    method: str
    visual_tokens: list[int]
    vanilla_visual_tokens: list[int]
    lm_visual_tokens: list[int] | None
    effective_visual_tokens: list[float]


_REGISTRY: dict[str, type["Family"]] = {}


def register_family(cls: type["Family"]) -> type["Family"]:
    """Class decorator: register a model family under its ``model_type`` (a later registration
    of the same ``model_type`` replaces the earlier one)."""
    if not cls.model_type:
        raise ValueError(f"{cls.__name__}.model_type must be set")
    _REGISTRY[cls.model_type] = cls
    return cls


def families() -> list[type["Family"]]:
    """Every registered family, in registration order."""
    return list(_REGISTRY.values())


def supported_model_types() -> list[str]:
    """``config.model_type`` of every supported family (no import of torch or transformers)."""
    return list(_REGISTRY)


def supported_model_names() -> list[str]:
    return [name for cls in _REGISTRY.values() for name in cls.model_names]


def describe_supported() -> str:
    """"LLaVA-NeXT (model_type 'llava_next', e.g. llava-hf/...)", one entry per family."""
    return "; ".join(
        f"{c.display_name} (model_type {c.model_type!r}, e.g. {c.example_checkpoint})" for c in _REGISTRY.values()
    )


def family_for_model_type(model_type: Any) -> type["Family"]:
    """The family of a checkpoint's ``config.model_type``, or a ``ValueError`` naming the supported ones."""
    cls = _REGISTRY.get(model_type) if isinstance(model_type, str) else None
    if cls is None:
        raise ValueError(f"a {model_type!r} model is not supported; globalcom2 supports {describe_supported()}")
    return cls


def family_for(model: Any) -> type["Family"]:
    """The family class that handles ``model``, or a ``ValueError`` naming what is supported."""
    for cls in reversed(list(_REGISTRY.values())):
        if cls.supports(model):
            return cls
    raise ValueError(
        f"GlobalCom2 does not support {type(model).__name__}; supported model classes: "
        f"{', '.join(supported_model_names())} (Hugging Face transformers)"
    )



def check_call_inputs(call: dict[str, Any]) -> None:
    """The checks of a patched call's inputs that every family shares, before anything is read
    from them: ``pixel_values`` a tensor; with images, ``input_ids`` / ``attention_mask`` (batch,
    length) tensors; ``image_sizes`` positive pairs (see :func:`check_image_inputs`). TypeError /
    ValueError naming the argument, instead of an AttributeError or a division by zero deep inside."""
    pixel_values = call.get("pixel_values")
    if pixel_values is not None:
        check_image_inputs(pixel_values, call)
    if pixel_values is None and call.get(EMBEDDINGS_KWARG) is None:
        return
    for name in ("input_ids", "attention_mask"):
        value = call.get(name)
        if value is not None and not (torch.is_tensor(value) and value.dim() == 2):
            what = f"shape {tuple(value.shape)}" if torch.is_tensor(value) else type(value).__name__
            raise TypeError(f"{name} must be a (batch, length) torch.Tensor (the processor's return_tensors='pt'), got {what}")


def check_image_inputs(pixel_values: Any, image_inputs: Mapping[str, Any]) -> None:
    """The checks of a call's images that every family shares, before any encoding: ``pixel_values``
    a tensor, ``image_sizes`` (where given) positive ``(height, width)`` pairs (TypeError /
    ValueError naming the argument, instead of a division by zero deep in the geometry)."""
    if pixel_values is None:
        raise ValueError("pixel_values are required (the processor's output for the images)")
    if not torch.is_tensor(pixel_values):
        raise TypeError(f"pixel_values must be a torch.Tensor (the processor's return_tensors='pt'), got {type(pixel_values).__name__}")
    sizes = image_inputs.get("image_sizes")
    if sizes is None:
        return
    if torch.is_tensor(sizes):
        if sizes.device.type != "cpu":
            return  # reading it here would wait for the device: the family checks it where it reads it once
        sizes = sizes.numpy().tolist()  # host memory: no device sync
    check_image_sizes(sizes)


def check_image_sizes(sizes: Any) -> None:
    """``image_sizes`` read on the host: positive whole ``(height, width)`` pairs, one per image
    (a ValueError naming the argument, instead of a division by zero deep in the geometry)."""
    try:
        rows = [list(s) for s in sizes]
        pairs = [(float(h), float(w)) for h, w in rows]
    except (TypeError, ValueError):
        raise ValueError(f"image_sizes must be (height, width) pairs, one per image; got {sizes!r}") from None
    for i, (h, w) in enumerate(pairs):
        if not (h >= 1 and w >= 1) or h != int(h) or w != int(w):
            raise ValueError(f"image_sizes[{i}] = ({h:g}, {w:g}): every (height, width) must be whole numbers >= 1")


def bind_arguments(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Name every argument of a call to ``fn`` (positional ones included), flattening ``**kwargs``."""
    if not args:
        return dict(kwargs)
    sig = inspect.signature(fn)
    bound = sig.bind_partial(*args, **kwargs)
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        param = sig.parameters[name]
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif param.kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"{getattr(fn, '__name__', 'function')}() got unexpected extra positional arguments")
        else:
            out[name] = value
    return out


@dataclass
class EncodedImages:
    """The vision side's output, per image.

    Attributes:
        features: per image, (V_i, N, D) projected features (in the family's view order).
        importance: per image, (V_i, N) importance (e.g. float64 [CLS] logits of the last vision layer).
        geometries: per image, its :class:`~globalcom2.core.geometry.CropGeometry` (None for one view).
        image_sizes: per image, (height, width) in pixels.
        vanilla_counts: per image, the placeholder tokens the vanilla model uses (what the processor wrote).
    """

    features: list["torch.Tensor"]
    importance: list["torch.Tensor"]
    geometries: "list[CropGeometry | None]"
    image_sizes: list[tuple[int, int]]
    vanilla_counts: list[int] = field(default_factory=list)


@dataclass
class CompressedImages:
    """A vision-side method's output for a batch: tokens and the plans behind them, per image.

    ``plans`` hold what each image's method decided (a :class:`~globalcom2.core.plans.CompressionPlan`
    for the selection methods, :class:`~globalcom2.methods.PoolingPlan` for pooling); every plan
    has ``num_tokens`` and ``kept_masks()``.
    """

    tokens: list["torch.Tensor"]
    plans: list[Any]
    vanilla_counts: list[int] = field(default_factory=list)

    @property
    def counts(self) -> list[int]:
        return [t.shape[0] for t in self.tokens]


class QKCapture:
    """Temporarily hooks one attention module's query and key modules (``q_proj`` / ``k_proj``, or
    ``q_norm`` / ``k_norm`` where the model normalises them) to keep, for the views it runs on, the
    [CLS] query (token 0) and all keys: enough for the [CLS] row of attention, O(T) per view; with
    ``all_queries``, every query too (for :func:`globalcom2.core.importance.attention_received`).
    The hooks live only inside ``with``; the tower keeps its own attention implementation.

    Per call, never shared between calls: a hook writes into the capture open *in the running
    thread / task* on that attention module (a context variable), not into the one that registered
    it, so two threads encoding on one model (whose hooks both sit on the one shared module and
    fire for both) each get their own queries and keys.

    With ``inputs_of`` (a module, e.g. the projector), its input is kept too (``inputs``: the
    features the ``similarity`` importance is computed on where the family cannot read them
    otherwise).

    Attributes (after the tower ran inside ``with``):
        q_cls: (V, D) the [CLS] queries. queries: (V, T, D) with ``all_queries``, else None.
        keys: (V, T, D). inputs: the first input of ``inputs_of`` (None without it).
    """

    def __init__(
        self, attn: nn.Module, all_queries: bool = False, q_module: str = "q_proj", k_module: str = "k_proj",
        inputs_of: nn.Module | None = None,
    ) -> None:
        self.attn = attn
        self.inputs_of = inputs_of
        self.inputs: torch.Tensor | None = None
        self.all_queries = all_queries
        self.q_module, self.k_module = q_module, k_module
        self.q_cls: torch.Tensor | None = None
        self.queries: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None
        self._handles: list[Any] = []

    def _keep_q(self, out: torch.Tensor) -> None:
        self.q_cls = out[:, 0]  # (V, D)
        if self.all_queries:
            self.queries = out  # (V, T, D)

    def _keep_k(self, out: torch.Tensor) -> None:
        self.keys = out  # (V, T, D)

    def __enter__(self) -> "QKCapture":
        attn = self.attn

        # Run eagerly, a hook writes into the capture open on ``attn`` in the running thread / task;
        # traced by torch.compile (which replays the write as a side effect of this call), into this one.
        def keep_q(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
            cap = self if torch.compiler.is_compiling() else _running_capture(attn)
            if cap is not None:
                cap._keep_q(out)

        def keep_k(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
            cap = self if torch.compiler.is_compiling() else _running_capture(attn)
            if cap is not None:
                cap._keep_k(out)

        if not torch.compiler.is_compiling():
            _QK_OPEN.set((*_QK_OPEN.get(), self))
        self._handles = [
            getattr(attn, self.q_module).register_forward_hook(keep_q),
            getattr(attn, self.k_module).register_forward_hook(keep_k),
        ]
        if self.inputs_of is not None:

            def keep_in(_m: nn.Module, args: tuple[Any, ...]) -> None:
                cap = self if torch.compiler.is_compiling() else _running_capture(attn)
                if cap is not None:
                    cap.inputs = args[0]

            self._handles.append(self.inputs_of.register_forward_pre_hook(keep_in))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if not torch.compiler.is_compiling():
            _QK_OPEN.set(tuple(cap for cap in _QK_OPEN.get() if cap is not self))


#: The :class:`QKCapture` objects open in this thread / task, innermost last.
_QK_OPEN: "ContextVar[tuple[QKCapture, ...]]" = ContextVar("globalcom2_qk_captures", default=())


def _running_capture(attn: Any) -> "QKCapture | None":
    """The capture open on ``attn`` in the running thread / task (the innermost), or None."""
    for cap in reversed(_QK_OPEN.get()):
        if cap.attn is attn:
            return cap
    return None


class Family(InstancePatch):
    """Everything generic about running a method on a vision-language model; one subclass per
    model family (``globalcom2/models/<family>.py``) supplies only what is family-specific.

    A vision-side method (``config`` or ``config.vision``) compresses the images before the
    language model; a language-model-side method (FastV: ``config`` or ``config.fastv``) is
    installed on the language model's decoder layers and told, at every prefill, where the visual
    tokens are. This class wraps ``forward`` and ``generate`` of one model instance: it encodes the
    images once (:meth:`encode`), compresses them, shortens the image placeholders of
    ``input_ids`` / ``attention_mask`` / ``labels`` and passes the compressed features as
    ``mm_encoder_outputs``; ``generate`` gives the caller's prompt back in front of the new tokens.

    A family subclass sets the class attributes below and implements :meth:`encode` (and, where
    they apply, :meth:`check_vision`, :meth:`image_newline`, :meth:`vanilla_pack`) plus the
    classmethods the tools use: :meth:`load`, :meth:`build_tiny`, :meth:`max_visual_tokens`,
    :meth:`picture_views`. See ``CONTRIBUTING.md``.
    """

    #: ``config.model_type`` of the family's checkpoints (the registry key).
    model_type: ClassVar[str] = ""
    #: How people call the family, for messages ("LLaVA-NeXT").
    display_name: ClassVar[str] = ""
    #: A public checkpoint, for messages and help texts.
    example_checkpoint: ClassVar[str] = ""
    #: The sequence layouts the family supports (the first is its default).
    layouts: ClassVar[tuple[str, ...]] = ("spatial",)
    #: Keyword arguments of ``forward`` that describe the images, consumed with ``pixel_values``
    #: and handed to :meth:`encode`.
    image_inputs: ClassVar[tuple[str, ...]] = ()
    #: Public checkpoints' language models by hub id, as :class:`globalcom2.efficiency.LMArch`
    #: fields (the efficiency model reads them offline).
    language_models: ClassVar[dict[str, tuple[Any, ...]]] = {}
    #: ``model_type`` of a checkpoint's ``text_config`` when its config.json leaves it out.
    default_text_model_type: ClassVar[str] = "llama"

    def __init__(self, model: nn.Module, config: Any) -> None:
        super().__init__(model, config)
        self.inner = model.model if hasattr(model, "lm_head") and hasattr(model, "model") else model
        self.vision_config: VisionMethodConfig | None = methods.vision_config(config)
        self.fastv_config = methods.language_config(config)
        self.fastv = self.fastv_config.make_patch(self.language_model()) if self.fastv_config is not None else None
        #: Plans of the images of the most recent call (for inspection, demos and pictures).
        self.last: CompressedImages | None = None
        #: Visual-token counts of the most recent prefill (see :func:`globalcom2.last_stats`).
        self.stats: CompressionStats | None = None
        self._vanilla_rows = None  # (B,) image tokens before compression (per call: see the property)
        self._last_visual: torch.Tensor | None = None  # (B, T) bool, image tokens of the last prefill
        self._warned_context = False
        #: The processor patched to write each image's compressed count (apply(..., processor=...)).
        self.processor_patch: Any = None

    @property
    def last_visual_positions(self) -> list[torch.Tensor] | None:
        """Per batch row, the positions of the image tokens in the language model's input (last prefill)."""
        if self._last_visual is None:
            return None
        return [row.nonzero().flatten() for row in self._last_visual]

    # -- to implement by a family ---------------------------------------------------------------
    @classmethod
    def hf_classes(cls) -> tuple[type, ...]:  # pragma: no cover - abstract
        """The ``transformers`` model classes of the family (imported when asked)."""
        raise NotImplementedError

    def encode(self, pixel_values: "torch.Tensor", **image_inputs: Any) -> EncodedImages:  # pragma: no cover
        """Run the vision side on a batch's images, capturing the importance signal.

        Args:
            pixel_values: the processor's ``pixel_values``.
            **image_inputs: the call's :attr:`image_inputs` (None where not given).

        Returns:
            :class:`EncodedImages`: per image its (V_i, N, D) features, (V_i, N) importance,
            geometry and the placeholders the vanilla model uses for it.
        """
        raise NotImplementedError

    def encode_inputs(self, inputs: Any) -> EncodedImages:
        """:meth:`encode` the images of a processor's output (``pixel_values`` and the family's
        :attr:`image_inputs` found in it)."""
        return self.encode(inputs["pixel_values"], **{k: inputs[k] for k in self.image_inputs if k in inputs})

    def view_grid(self, inputs: Any, index: int = 0) -> tuple[int, int] | None:
        """(rows, columns) of the crop grid of image ``index`` of a processor's output, or None
        when it is seen as one view (for reports; no encoding)."""
        return None

    def size_layout(self, image_sizes: Sequence[tuple[int, int]], **options: Any) -> tuple[list[int], list[Any], int]:
        """What the processor and the model make of images of these sizes, from the sizes alone
        (no pixels, no tower): per image its number of views and its crop geometry (None for one
        view, the family's geometry class otherwise), and the tokens per view N.

        ``options``: what else decides it (``batch_num_images`` on LLaVA-OneVision, the
        ``processor`` whose tiling rule InternVL follows)."""
        raise NotImplementedError(f"{type(self).__name__} cannot lay out images from their sizes")

    def count_visual_tokens(
        self, image_sizes: Sequence[tuple[int, int]], config: Any = None, **options: Any
    ) -> list[int]:
        """Per image, the visual tokens (newlines included) the method hands the language model, from
        the image sizes alone: the same planning code as :meth:`compress` run on zero-width
        features and constant importance, so it equals what :meth:`compress` produces for any image
        of these sizes whenever the method's count depends on the size only
        (``config.fixed_count``; GlobalCom2 needs ``count="fixed"``)."""
        cfg = config if config is not None else self.vision_config
        if cfg is None:
            raise ValueError(f"method {self.config.method!r} has no vision-side compression to count")
        if not cfg.fixed_count:
            raise ValueError(
                f"method {cfg.method!r} with count={getattr(cfg, 'count', None)!r} keeps a number of tokens that "
                "depends on the image's content; use count='fixed' for a count known from the size"
            )
        sizes = [(int(h), int(w)) for h, w in image_sizes]
        return self._count_layout(*self.size_layout(sizes, **options), cfg)

    def _count_layout(self, views: list[int], geoms: list[Any], n: int, cfg: Any) -> list[int]:
        """Token counts of images laid out as ``views`` / ``geoms``: the planning on constant
        importance and zero-width features (no gather of real widths, nothing from the model)."""
        feats = [torch.zeros((v, n, 1)) for v in views]
        imps = [torch.zeros((v, n), dtype=torch.float64) for v in views]
        encoded = EncodedImages(
            features=feats, importance=imps, geometries=list(geoms), image_sizes=[(0, 0)] * len(views),
            vanilla_counts=[0] * len(views),
        )
        out = self.compress(encoded, cfg, newline=torch.zeros(1))
        return [int(t.shape[0]) for t in out.tokens]

    def processed_counts(self, image_inputs: Mapping[str, Any], processor: Any, config: Any = None) -> list[int]:
        """Per image of a processor's image output (``pixel_values``, ``image_sizes``, ...), the
        compressed count (what a patched processor writes: ``apply(..., processor=...)``)."""
        cfg = config if config is not None else self.vision_config
        return self._count_layout(*self.processed_layout(image_inputs, processor), cfg)

    def processed_layout(self, image_inputs: Mapping[str, Any], processor: Any) -> tuple[list[int], list[Any], int]:
        """:meth:`size_layout` of the images of a processor's image output (its ``image_sizes``)."""
        sizes = image_inputs["image_sizes"]
        sizes = sizes.tolist() if hasattr(sizes, "tolist") else sizes
        options: dict[str, Any] = {"processor": processor}
        if image_inputs.get("batch_num_images") is not None:
            options["batch_num_images"] = image_inputs["batch_num_images"]
        return self.size_layout([(int(h), int(w)) for h, w in sizes], **options)

    @classmethod
    def placeholder_text(cls, processor: Any, count: int) -> str:
        """The text a processor writes for one image of ``count`` visual tokens (the family's own
        form: ``<image>`` x count here)."""
        return processor.image_token * int(count)

    @classmethod
    def counter(cls, hf_config: Any, config: Any) -> "Family":
        """A family instance without a model, for counting only (:meth:`processed_counts`,
        :meth:`count_visual_tokens`): what a processor in another process needs, picklable and
        small (the model's config and the method's, no weights)."""
        obj = cls.__new__(cls)
        obj.model = None
        obj.config = config
        obj.inner = _ConfigOnly(hf_config)
        obj.vision_config = methods.vision_config(config)
        obj.fastv_config = methods.language_config(config)
        obj.fastv = None
        return obj

    def check_vision(self) -> None:
        """Raise ``ValueError`` if this model's vision side cannot be compressed (checked at apply)."""

    def check_layout(self, layout: str | None) -> None:
        """A vision method's layout must be one the family has (``ValueError`` naming the family)."""
        if layout is not None and layout not in self.layouts:
            raise ValueError(
                f"layout {layout!r} is not available on {self.display_name} ({type(self.model).__name__}); "
                f"its layouts: {', '.join(self.layouts)}"
            )

    @classmethod
    def with_default_layout(cls, config: Any) -> Any:
        """``config`` with its vision method's layout set to the family's default (the first of
        :attr:`layouts`) when the method's default layout is not one the family has; what
        :func:`globalcom2.apply` does when no layout was asked for."""
        vision = methods.vision_config(config)
        field_name = vision.layout_field if vision is not None else None
        if field_name is None or getattr(vision, field_name) in cls.layouts:
            return config
        vision = vision.replace(**{field_name: cls.layouts[0]})
        return vision if config is methods.vision_config(config) else type(config)(vision=vision, fastv=config.fastv)

    def view_geometry(self) -> tuple[int, int]:
        """(view side in pixels, tokens per view side) of the vision tower, for pictures."""
        vc = self.hf_config.vision_config
        size, patch = vc.image_size, vc.patch_size
        size = int(size[0]) if isinstance(size, (list, tuple)) else int(size)
        patch = int(patch[0]) if isinstance(patch, (list, tuple)) else int(patch)
        return size, size // patch

    def vanilla_plan(self, encoded: EncodedImages, index: int = 0) -> Any:
        """The vanilla sequence of image ``index`` as a plan (keep-all with the spatial layout)."""
        from ..methods import GlobalCom2Config

        return self.compress(encoded, GlobalCom2Config.keep_all(layout="spatial")).plans[index]

    def image_newline(self) -> "torch.Tensor | None":
        """The (D,) image-newline embedding, or None for a family without one."""
        return None

    #: Attributes the vision tower's self-attention modules have (:meth:`last_attention` finds
    #: the last one), and how the family's tower is described in the error when none has them.
    attention_attributes: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "num_heads", "scale")
    tower_kind: ClassVar[str] = "a ViT"

    def last_attention(self) -> nn.Module:
        """The vision tower's last self-attention module (one with every :attr:`attention_attributes`)."""
        found = None
        for module in self.inner.vision_tower.modules():
            if all(hasattr(module, a) for a in self.attention_attributes):
                found = module
        if found is None:
            needed = "/".join(a for a in self.attention_attributes if a not in ("num_heads", "scale"))
            raise ValueError(
                f"GlobalCom2 on {self.display_name} needs {self.tower_kind} vision tower whose attention has {needed}; "
                f"{type(self.inner.vision_tower).__name__} has none"
            )
        return found

    def language_model(self) -> nn.Module:
        """The decoder-only base model a language-model-side method patches."""
        return self.inner.language_model

    @classmethod
    def load(
        cls, model_id: str, dtype: Any = "auto", device_map: Any = None, model_kwargs: dict[str, Any] | None = None, **hub: Any
    ) -> tuple[Any, Any]:
        """``(model, processor)`` of a checkpoint, as ``from_pretrained`` loads them (eval mode).

        ``hub`` (``local_files_only``, ``revision``, ``trust_remote_code``...) goes to both
        ``from_pretrained`` calls; ``dtype``, ``device_map`` and ``model_kwargs``
        (``attn_implementation``...) to the model's only."""
        from transformers import AutoProcessor

        kwargs: dict[str, Any] = {"dtype": dtype, **hub, **(model_kwargs or {})}
        if device_map is not None:
            kwargs["device_map"] = device_map
        model = cls.hf_classes()[0].from_pretrained(model_id, **kwargs)
        processor = AutoProcessor.from_pretrained(model_id, **hub)
        return model.eval(), processor

    @classmethod
    def build_tiny(cls, seed: int = 0, dtype: Any = None, device: Any = "cpu") -> tuple[Any, Any]:  # pragma: no cover
        """A tiny random model of the family with its real geometry, and its processor (no download)."""
        raise NotImplementedError

    @classmethod
    def max_visual_tokens(cls, config: Any) -> int:  # pragma: no cover - abstract
        """The most visual tokens one image can have, without newlines (a config or its dict)."""
        raise NotImplementedError

    @classmethod
    def default_max_visual_tokens(cls) -> int:  # pragma: no cover - abstract
        """:meth:`max_visual_tokens` of the family's public checkpoints."""
        raise NotImplementedError

    @classmethod
    def picture_views(cls, image: Any, geom: CropGeometry | None, view: int) -> tuple[Any, Any, Any]:  # pragma: no cover
        """What pictures draw for an image, as the processor makes its views: (thumbnail pixels
        (view, view, 3), crop canvas pixels or None, canvas layout dict or None)."""
        raise NotImplementedError

    # -- identification and checks --------------------------------------------------------------
    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        try:
            classes = cls.hf_classes()
        except ImportError:  # pragma: no cover - an older transformers without the family
            return False
        return isinstance(model, classes)

    @property
    def hf_config(self) -> Any:
        return self.inner.config

    @property
    def image_token_id(self) -> int:
        return self.hf_config.image_token_id

    def validate(self) -> None:
        if self.fastv is not None:
            self.fastv.validate()  # fail at apply, before anything is patched
        if self.vision_config is None:
            return
        field = self.vision_config.layout_field
        self.check_layout(getattr(self.vision_config, field) if field else None)
        self.check_vision()

    # -- vision side ----------------------------------------------------------------------------
    def compress(
        self, encoded: EncodedImages, config: VisionMethodConfig | None = None, newline: "torch.Tensor | None" = None
    ) -> CompressedImages:
        """Apply a vision-side method (default: this adapter's) to every encoded image.

        The whole batch goes to the method at once (:func:`globalcom2.methods.compress_images`):
        GlobalCom2, FasterVLM and random plan and gather every image in one vectorised pass with
        one host sync per batch (:mod:`globalcom2.core.batch`); other methods run per image.
        ``newline``: the row written for newlines (default: the model's own)."""
        cfg = config or self.vision_config
        if cfg is None:
            raise ValueError(f"method {self.config.method!r} has no vision-side compression")
        tokens, plans = methods.compress_images(
            encoded.features, encoded.importance, encoded.geometries, self.image_newline() if newline is None else newline, cfg
        )
        return CompressedImages(tokens=list(tokens), plans=list(plans), vanilla_counts=encoded.vanilla_counts)

    # -- language side --------------------------------------------------------------------------
    def _pad_token_id(self) -> int:
        return pad_token_id_of(self.model)

    def prepare_inputs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Turn a call's keyword arguments with ``pixel_values`` into compressed ones.

        Encodes and compresses the images, shortens ``input_ids``/``attention_mask``/``labels``,
        and passes the compressed features as ``mm_encoder_outputs``.
        """
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        kwargs = dict(kwargs)
        pixel_values = kwargs.pop("pixel_values", None)
        image_inputs = {name: kwargs.pop(name, None) for name in self.image_inputs}
        given = kwargs.pop(EMBEDDINGS_KWARG, None)
        input_ids = kwargs.get("input_ids")
        if kwargs.get("mm_encoder_outputs"):
            raise ValueError(f"pass either pixel_values / {EMBEDDINGS_KWARG} or mm_encoder_outputs, not both")
        if input_ids is None:
            raise ValueError(
                "GlobalCom2 needs input_ids with image placeholder tokens when pixel_values are given "
                "(inputs_embeds are not supported: the placeholders must be shortened)"
            )
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(mask.shape)} must match input_ids {tuple(input_ids.shape)} when pixel_values are given"
            )
        if given is not None:  # precomputed embeddings: no vision tower
            if pixel_values is not None and pixel_values.shape[0] > 0:
                raise ValueError(f"pass either pixel_values or {EMBEDDINGS_KWARG}, not both")
            compressed, prompt_counts, input_ids, mask = self._given_images(given, input_ids, mask, kwargs)
            alt_counts = None
        else:
            encoded = self.encode(pixel_values, **image_inputs)
            compressed = self.compress(encoded)
            # The prompt holds the vanilla placeholders, or already the compressed count (a processor
            # patched with apply(..., processor=...) writes it): the one expected first, the other
            # accepted (told apart in shrink_placeholders' one sync).
            forms = [list(compressed.vanilla_counts), list(compressed.counts)]
            if self.processor_patch is not None:
                forms.reverse()
            prompt_counts, alt_counts = forms
        shrunk = sequence.shrink_placeholders(
            input_ids,
            self.image_token_id,
            prompt_counts,
            compressed.counts,
            attention_mask=mask,
            labels=kwargs.get("labels"),
            pad_token_id=self._pad_token_id(),
            alt_old_counts=alt_counts,
        )
        if shrunk.form == "alt":
            prompt_counts = alt_counts
        kwargs["input_ids"] = shrunk.input_ids
        if shrunk.attention_mask is not None:
            kwargs["attention_mask"] = shrunk.attention_mask
        if kwargs.get("labels") is not None:
            kwargs["labels"] = shrunk.labels
        if kwargs.get("position_ids") is not None and shrunk.attention_mask is not None:
            # Positions of the shortened sequence, counted over real tokens as HF does for padding.
            kwargs["position_ids"] = (shrunk.attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        elif kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = torch.arange(shrunk.input_ids.shape[1], device=input_ids.device)[None].expand_as(
                shrunk.input_ids
            )
        kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=compressed.tokens)}
        # Kept for inspection: detached, so that it never holds the caller's autograd graph.
        self.last = CompressedImages(
            tokens=[t.detach() for t in compressed.tokens], plans=compressed.plans, vanilla_counts=compressed.vanilla_counts
        )
        self._check_context(shrunk.input_ids.shape[1])
        placeholders = input_ids == self.image_token_id
        if list(prompt_counts) == list(compressed.vanilla_counts):
            self._vanilla_rows = placeholders.sum(1)
        else:  # the prompt may not hold the vanilla placeholders: add them up per row
            self._vanilla_rows = _rows_total(placeholders, prompt_counts, compressed.vanilla_counts)
        return kwargs

    def _given_images(
        self, given: Any, input_ids: "torch.Tensor", mask: "torch.Tensor | None", kwargs: dict[str, Any]
    ) -> tuple[CompressedImages, list[int], "torch.Tensor", "torch.Tensor | None"]:
        """Precomputed :class:`~globalcom2.embeddings.ImageEmbeddings` as this call's compressed images.

        Returns the images, the placeholders per image the prompt holds (the vanilla model's or
        ``n_i``; a prompt with one placeholder per image is expanded to ``n_i`` here, in
        ``input_ids`` / ``mask`` / ``kwargs``), and the possibly expanded ``input_ids`` and ``mask``.
        """
        # Recognised by what it carries, not by its class: globalcom2.embeddings sits above the
        # model families (it uses the public API) and is not imported from here.
        if not all(hasattr(given, a) for a in ("embeddings", "counts", "vanilla_counts", "model_type", "hidden_size")):
            raise ValueError(
                f"{EMBEDDINGS_KWARG} must be ImageEmbeddings (globalcom2.compress_images or load_embeddings), "
                f"got {type(given).__name__}"
            )
        if given.model_type != self.model_type:
            raise ValueError(
                f"these image embeddings come from a {given.model_type!r} model, this is a {self.model_type!r} one"
            )
        width = getattr(self.hf_config.text_config, "hidden_size", None)
        if isinstance(width, int) and given.hidden_size not in (0, width):
            raise ValueError(
                f"these image embeddings are {given.hidden_size} wide, this model's language model {width}: "
                "they come from another model"
            )
        counts = given.counts
        found = int((input_ids == self.image_token_id).sum())
        form = sequence.prompt_form(found, counts, given.vanilla_counts, self.image_token_id)
        prompt_counts = list(given.vanilla_counts) if form == "vanilla" else counts
        if form == "one":
            if kwargs.get("labels") is not None:
                raise ValueError(
                    "labels need a prompt with the vanilla model's image placeholders (the processor's output), "
                    "not one placeholder per image"
                )
            input_ids, mask = sequence.expand_placeholders(
                input_ids, self.image_token_id, counts, attention_mask=mask, pad_token_id=self._pad_token_id()
            )
            kwargs["input_ids"] = input_ids
            if mask is not None:
                kwargs["attention_mask"] = mask
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = torch.zeros_like(input_ids)  # rebuilt from the new mask below
        plans = list(given.plans) if given.plans is not None else [None] * len(counts)
        images = CompressedImages(tokens=list(given.embeddings), plans=plans, vanilla_counts=list(given.vanilla_counts))
        return images, prompt_counts, input_ids, mask

    def _check_context(self, length: int) -> None:
        """Warn once per applied adapter when a prompt (visual tokens included) exceeds the language
        model's context window (``max_position_embeddings``)."""
        limit = getattr(self.hf_config.text_config, "max_position_embeddings", None)
        if self._warned_context or not isinstance(limit, int) or length <= limit:
            return
        self._warned_context = True
        warnings.warn(
            f"the prompt is {length} tokens long with its compressed visual tokens, more than the language model's "
            f"context window of {limit} (max_position_embeddings); expect degraded answers (this warning is shown once)",
            UserWarning,
            stacklevel=4,
        )

    # -- patching -------------------------------------------------------------------------------
    def patched_methods(self) -> dict[str, str]:
        methods = {"forward": "_patched_forward"}
        if hasattr(self.model, "generate"):
            methods["generate"] = "_patched_generate"
        if hasattr(self.model, "_merge_criteria_processor_list"):
            # generate's merge of its own processors / criteria with the caller's (see calls.merge_lists)
            methods["_merge_criteria_processor_list"] = "_patched_merge"
        return methods

    @staticmethod
    def _has_images(kwargs: dict[str, Any]) -> bool:
        pv = kwargs.get("pixel_values")
        return pv is not None and pv.shape[0] > 0

    def _compresses(self, call: dict[str, Any]) -> bool:
        """Whether a call's images go through :meth:`prepare_inputs` (pixel_values for a vision
        method, or precomputed image embeddings for any method)."""
        return call.get(EMBEDDINGS_KWARG) is not None or (self.vision_config is not None and self._has_images(call))

    @property
    def _vanilla_rows(self) -> "torch.Tensor | None":
        """(B,) image tokens per row before compression, handed from :meth:`prepare_inputs` to the
        prefill of the same call: per thread / task (a context variable), never shared between calls."""
        held = _PENDING_ROWS.get()
        return held[1] if held is not None and held[0] == id(self) else None

    @_vanilla_rows.setter
    def _vanilla_rows(self, rows: "torch.Tensor | None") -> None:
        _PENDING_ROWS.set(None if rows is None else (id(self), rows))

    def _patched_forward(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.fastv is None:
            return self._forward(original, *args, **kwargs)
        with _FASTV_CALLS:  # FastV's layer patch holds the running call's state: one call at a time
            return self._forward(original, *args, **kwargs)

    def _forward(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``forward``: compress, then the original on the shorter sequence (in the caller's grad mode).

        Outside a patched ``generate`` (the caller's own prefill and decode steps), a compressing
        prefill leaves its :class:`~.calls.Turn` on the KV cache it fills, and a later step on that
        cache given in the caller's coordinates (the caller's growing ``attention_mask``) is
        translated to the cache's (:func:`~.calls.caller_step`)."""
        call = bind_arguments(original, args, kwargs)
        check_call_inputs(call)
        own = _calls.GENERATE_CALL.get() is None  # the caller's own call, not a step of a patched generate
        prefill = _calls.is_prefill(call)
        turn = None
        if self._compresses(call):
            before = call
            call = self.prepare_inputs(call)
            if own and prefill and torch.is_tensor(before.get("input_ids")):
                turn = _calls.Turn(before["input_ids"], call["input_ids"], before.get("attention_mask"), call.get("attention_mask"))
        elif own and not prefill:
            cache = _calls.given_cache(call)
            known = _calls.turn_of(cache)
            if known is not None:
                _calls.caller_step(call, known, _calls.cache_length(cache))
        if prefill and call.get("input_ids") is not None:
            self._on_prefill(call["input_ids"])
        out = original(**call)
        if turn is not None:
            cache = _calls.output_cache(out)
            _calls.remember_turn(cache if cache is not None else _calls.given_cache(call), turn)
        return out

    def _on_prefill(self, input_ids: torch.Tensor) -> None:
        """Record the visual-token counts of a prefill and tell FastV where the visual tokens are."""
        visual = input_ids == self.image_token_id  # (B, T)
        self._last_visual = visual
        counts = visual.sum(1)  # (B,)
        before = self._vanilla_rows
        self._vanilla_rows = None
        if before is None or before.shape != counts.shape:  # no compression on this call
            before = counts
        rows, vanilla = torch.stack([counts, before.to(counts.device)]).tolist()  # one host sync
        lm_rows: list[int] | None = None
        effective = [float(r) for r in rows]
        if self.fastv is not None:
            self.fastv.prepare(visual)
            lm_rows = [self.fastv_config.kept(r) for r in rows]
            effective = [self.fastv_config.effective(r, kept, self.fastv.n_layers) for r, kept in zip(rows, lm_rows)]
        self.stats = CompressionStats(
            method=self.config.method,
            visual_tokens=rows,
            vanilla_visual_tokens=list(vanilla),
            lm_visual_tokens=lm_rows,
            effective_visual_tokens=effective,
        )

    # -- patching (FastV's layers too) ----------------------------------------------------------
    def patch(self) -> None:
        super().patch()
        if self.fastv is not None:
            try:
                self.fastv.install()
            except Exception:
                super().unpatch()
                raise

    def unpatch(self) -> None:
        if self.fastv is not None:
            self.fastv.uninstall()
        super().unpatch()

    def _patched_generate(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.fastv is None:
            return self._generate(original, *args, **kwargs)
        with _FASTV_CALLS:
            return self._generate(original, *args, **kwargs)

    def _generate(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``generate``: compress once (without a graph, as the vanilla ``generate`` runs), generate on
        the shorter prompt, and give the caller's prompt back in front of the new tokens.

        Everything that counts the prompt means what it means on the vanilla model: ``max_length`` /
        ``min_length`` (given or from the generation config), the caller's stopping criteria and
        logits processors (they see the vanilla prompt), and a streamer (its first ``put`` is the
        caller's prompt). A later turn that passes the returned ``past_key_values`` with the
        returned sequences (plus new text) is continued on the compressed cache.
        """
        call = bind_arguments(original, args, kwargs)
        _calls.cache_under_installed_name(call)
        input_ids = call.pop("inputs", None)
        if input_ids is None:
            input_ids = call.pop("input_ids", None)
        if (
            input_ids is not None
            and (self.vision_config is not None or call.get(EMBEDDINGS_KWARG) is not None)
            and _calls.cache_length(_calls.given_cache(call)) > 0
        ):
            return self._continue_turn(original, input_ids, call)
        if input_ids is None or not self._compresses(call):
            if input_ids is not None:
                call["inputs"] = input_ids
            return self._run_generate(original, (), call, _calls.GenerateCall(self))
        call["input_ids"] = input_ids
        with torch.no_grad():
            prepared = self.prepare_inputs(call)
        short_ids = prepared.pop("input_ids")
        return self._generate_short(original, input_ids, short_ids, prepared, call.get("attention_mask"))

    def _patched_merge(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``generate``'s merge of the processors / criteria it builds with the caller's (see
        :func:`~.calls.merge_lists`)."""
        return _calls.merge_lists(original, self, *args, **kwargs)

    @staticmethod
    def _run_generate(original: Callable[..., Any], args: tuple[Any, ...], call: dict[str, Any], state: Any) -> Any:
        """The original ``generate`` with ``state`` as this context's :data:`~.calls.GENERATE_CALL`."""
        token = _calls.GENERATE_CALL.set(state)
        try:
            return original(*args, **call)
        finally:
            _calls.GENERATE_CALL.reset(token)

    def _generate_short(
        self,
        original: Callable[..., Any],
        input_ids: torch.Tensor,
        short_ids: torch.Tensor,
        call: dict[str, Any],
        mask: "torch.Tensor | None",
    ) -> Any:
        """Run the original ``generate`` on ``short_ids`` (B, T1) standing for ``input_ids`` (B, T0)
        (whose attention mask is ``mask``; ``call`` holds the short one), and leave the turn on the
        KV cache it filled."""
        _calls.vanilla_lengths(call, input_ids.shape[1] - short_ids.shape[1], getattr(self.model, "generation_config", None))
        if call.get("streamer") is not None:
            call["streamer"] = _calls.PromptStreamer(call["streamer"], input_ids)
        out = self._run_generate(original, (short_ids,), call, _calls.GenerateCall(self, input_ids, short_ids.shape[1]))
        turn = _calls.Turn(input_ids, short_ids, mask, call.get("attention_mask"))
        for cache in (_calls.given_cache(call), _calls.output_cache(out)):
            _calls.remember_turn(cache, turn)
        return _calls.restore_prompt(out, input_ids, short_ids.shape[1])

    def _continue_turn(self, original: Callable[..., Any], input_ids: torch.Tensor, call: dict[str, Any]) -> Any:
        """A chat turn on the KV cache of an earlier compressed call (``generate``, or a prefill).

        ``input_ids`` (B, T) must start with the prompt of the call that filled that cache (the
        sequences it returned start with it): the prompt is swapped for its compressed form, which
        the cache holds (the :class:`~.calls.Turn` the call left on that very cache object, so that
        interleaved conversations never mix), and generation goes on from there, as running the
        whole conversation afresh with its images would. New images (placeholders past the cached
        tokens, their ``pixel_values`` given) are encoded and compressed as the first turn's were.
        """
        cache = _calls.given_cache(call)
        turn = _calls.turn_of(cache)
        if turn is not None and turn.matches(input_ids):
            if self.fastv is not None:
                raise ValueError(
                    "continuing a FastV generate from its past_key_values is not supported (its cache is pruned "
                    "per layer); pass the whole conversation with pixel_values and no past_key_values"
                )
            mask = call.get("attention_mask")
            short_ids = self._continued_prompt(input_ids, call, turn, _calls.cache_length(cache))
            return self._generate_short(original, input_ids, short_ids, call, mask)
        if turn is not None:
            raise ValueError(
                "these past_key_values hold a compressed conversation whose prompt the input_ids do not start with: "
                "pass the sequences returned with that cache (plus the new turn), or the whole conversation with "
                "pixel_values and no past_key_values"
            )
        cached = _calls.cache_length(cache)
        if bool((input_ids[:, cached:] == self.image_token_id).any()):
            raise ValueError(
                "past_key_values were given with image placeholders beyond the cached tokens, but they were not filled "
                "by a compressed call of this model: pass that call's returned sequences (plus the new turn) with its "
                "past_key_values, or the whole conversation with pixel_values and no past_key_values"
            )
        call["inputs"] = input_ids
        return self._run_generate(original, (), call, _calls.GenerateCall(self))

    def _continued_prompt(self, input_ids: torch.Tensor, call: dict[str, Any], turn: Any, cached: int) -> torch.Tensor:
        """The short sequence of a continued turn: the turn's short prompt, then what followed it in
        ``input_ids`` (B, T), whose new images (if their ``pixel_values`` or image embeddings are given)
        are compressed; ``call``'s attention mask and image arguments are rewritten to match."""
        t0 = turn.t0
        split = min(t0 + max(cached - turn.t1, 0), input_ids.shape[1])  # where the uncached tokens start
        head = torch.cat([turn.short_ids.to(input_ids.device), input_ids[:, t0:split]], dim=1)
        tail = input_ids[:, split:]
        mask = call.get("attention_mask")
        head_mask = tail_mask = None
        if mask is not None:
            head_mask = torch.cat([turn.head_mask().to(mask), mask[:, t0:split]], dim=1)
            tail_mask = mask[:, split:]
        images = {k: call.pop(k) for k in ("pixel_values", EMBEDDINGS_KWARG, *self.image_inputs) if k in call}
        images = {k: v for k, v in images.items() if v is not None}
        if self._compresses(images) and bool((tail == self.image_token_id).any()):
            part = {"input_ids": tail, **images}
            if tail_mask is not None:
                part["attention_mask"] = tail_mask
            try:
                with torch.no_grad():
                    prepared = self.prepare_inputs(part)
            except ValueError as err:
                raise ValueError(
                    f"{err} (a continued chat turn takes the images whose placeholders follow the cached conversation, "
                    "and only those, as the vanilla model does; or pass the whole conversation with all its images and "
                    "no past_key_values)"
                ) from None
            self._vanilla_rows = None  # no prefill follows on a continued cache
            tail = prepared["input_ids"]
            if prepared.get("attention_mask") is not None:
                tail_mask = prepared["attention_mask"]
                head_mask = head_mask if head_mask is not None else torch.ones_like(head)
            call["mm_encoder_outputs"] = prepared["mm_encoder_outputs"]
        # Without new images given, those of the earlier turns are in the cache already (the vanilla
        # generate takes no pixel_values for a continued cache either).
        if head_mask is not None:
            call["attention_mask"] = torch.cat([head_mask, tail_mask], dim=1)
        return torch.cat([head, tail], dim=1)


def pad_token_id_of(model: Any) -> int:
    """The id a shortened prompt is padded with: the model's generation config's, its text config's
    or its config's ``pad_token_id`` (the first that is set), else 0."""
    config = getattr(model, "config", None)
    for cfg in (getattr(model, "generation_config", None), getattr(config, "text_config", None), config):
        pad = getattr(cfg, "pad_token_id", None) if cfg is not None else None
        if isinstance(pad, int):
            return pad
    return 0


class _ConfigOnly:
    """Stands in for a model where only its ``config`` is read (:meth:`Family.counter`)."""

    def __init__(self, config: Any) -> None:
        self.config = config


def _rows_total(placeholders: "torch.Tensor", prompt_counts: list[int], values: list[int]) -> "torch.Tensor":
    """(B,) per batch row, the sum of ``values[i]`` over the images ``i`` whose ``prompt_counts[i]``
    placeholders lie in that row (images in reading order of the (B, T) ``placeholders`` mask)."""
    dev = placeholders.device
    out = torch.zeros(placeholders.shape[0], dtype=torch.long, device=dev)
    if not prompt_counts:
        return out
    row_end = placeholders.sum(1).cumsum(0)  # (B,) placeholders up to and including each row
    starts = torch.tensor([0] + list(prompt_counts[:-1]), dtype=torch.long, device=dev).cumsum(0)  # (I,)
    rows = torch.searchsorted(row_end, starts, right=True).clamp_max(placeholders.shape[0] - 1)
    return out.index_add_(0, rows, torch.tensor(values, dtype=torch.long, device=dev))


#: Held by a call of a model patched with FastV, whose layer patch keeps the running call's state
#: (which visual tokens, which layer pruned them): threads take turns on such models (re-entrant:
#: generate's own forward calls, an assistant model).
_FASTV_CALLS = threading.RLock()

#: (id of the adapter, (B,) rows) from a call's prepare_inputs to its prefill, per thread / task.
_PENDING_ROWS: "ContextVar[tuple[int, Any] | None]" = ContextVar("globalcom2_pending_rows", default=None)
