"""The family registry and the contract of a model family: :class:`Family`, the class every
family subclasses (``globalcom2/models/<family>.py``), with the class attributes and the methods a
family implements, and everything generic about running a method on a model.

What :class:`Family` does, by concern, lives in modules of its own under ``models/``:

* :mod:`.checks`: the checks of a patched call's inputs shared by every family;
* :mod:`.capture`: :class:`~.capture.QKCapture`, the hooks that read a tower's queries and keys;
* :mod:`.images`: :class:`~.images.EncodedImages`, :class:`~.images.CompressedImages`,
  :class:`~.images.CompressionStats`;
* :mod:`.patched_forward`: the patched ``forward`` and the input preparation (a mixin);
* :mod:`.patched_generate`: the patched ``generate`` and its semantics (a mixin), with
  :mod:`.calls`, what a patched call keeps so the caller's view of the prompt stays the vanilla one.

A family also declares its tiny test model's geometry (:class:`TinyGeometry`, :meth:`Family.tiny_config`);
:mod:`globalcom2.tiny` builds it.

Importing this module loads neither torch nor transformers (tensor code is imported when it runs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

from .. import methods
from .._lazy import lazy_module
from .._patching import STATE_ATTR, InstancePatch  # noqa: F401  (STATE_ATTR: models exports it)
from ..methods.base import VisionMethodConfig
from .images import CompressedImages, CompressionStats, EncodedImages
from .patched_forward import PatchedForward
from .patched_generate import PatchedGenerate

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from ..core.geometry import CropGeometry

torch = lazy_module("torch")


@dataclass(frozen=True)
class TinyGeometry:
    """What a family's tiny test model is made of (:attr:`Family.tiny`; :mod:`globalcom2.tiny`
    builds it): plain data, no import of transformers. The model's config comes from
    :meth:`Family.tiny_config` at the widths given here.

    Attributes:
        special_tokens: the tokenizer's special tokens beyond ``<unk> <s> </s> <pad>`` (ids 0-3),
            as ``{tokenizer attribute: token}`` (``{"image_token": "<image>"}``), ids 4, 5, ... in order.
        processor: the ``transformers`` processor class (a name in ``transformers`` or a dotted path).
        image_processor: the image processor class (same form).
        image_processor_kwargs: its settings (the checkpoints' view size, pinpoints, tiling...).
        processor_kwargs: the processor's settings (besides the image processor and tokenizer).
        video_processor: the processor's video processor class, if it has one: the tiny processor
            leaves it out (it needs torchvision), a saved tiny checkpoint puts it back.
        vision: the tiny widths of the vision tower (its config's keywords).
        text: the tiny widths of the language model (its config's keywords).
        wide_vision / wide_text: the real widths of a public checkpoint, for the wide random
            benchmark model (:func:`globalcom2.tiny.build_wide`; the language model's depth is
            chosen there), or None.
        hub_tower_names: a saved tiny checkpoint names the vision tower as the hub's checkpoints do
            (``vision_tower.vision_model.*``, what vLLM reads).
        video_only_imports: names in the processor's module that its constructor requires but only
            videos use (SmolVLM's ``num2words``): where the package is not installed, the tiny
            processor is constructed with a stand-in that raises ImportError if called.
    """

    special_tokens: dict[str, str]
    processor: str
    image_processor: str
    image_processor_kwargs: dict[str, Any]
    processor_kwargs: dict[str, Any]
    vision: dict[str, Any]
    text: dict[str, Any]
    video_processor: str | None = None
    wide_vision: dict[str, Any] | None = None
    wide_text: dict[str, Any] | None = None
    hub_tower_names: bool = False
    video_only_imports: tuple[str, ...] = ()


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


def transformers_version() -> str:
    """The installed ``transformers``' version string."""
    import transformers

    return str(transformers.__version__)


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

class Family(PatchedGenerate, PatchedForward, InstancePatch):
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
    classmethods the tools use: :meth:`hf_classes`, :meth:`max_visual_tokens`,
    :meth:`default_max_visual_tokens`, :meth:`picture_views`, and its tiny test model's geometry
    (:attr:`tiny`, :meth:`tiny_config`). See ``CONTRIBUTING.md``.

    The patched ``forward`` / input preparation and the patched ``generate`` are the mixins
    :class:`~.patched_forward.PatchedForward` and :class:`~.patched_generate.PatchedGenerate`.
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
    #: The processor's / ``forward``'s keyword argument holding the images' pixels (what
    #: :meth:`encode` takes as ``pixel_values``; Phi-4-multimodal: ``image_pixel_values``).
    pixel_inputs: ClassVar[str] = "pixel_values"
    #: Whether the model's forward takes the compressed rows as one (L, D) tensor rather than one
    #: tensor per image (Llama 4 reshapes them, Aya Vision casts them, as Idefics3 before
    #: transformers 5.21): the patched forward joins them just before the model's forward.
    joins_image_rows: ClassVar[bool] = False
    #: The oldest ``transformers`` whose forward of this family takes compressed image runs, where
    #: later than the project's range (SmolVLM: 5.21; before, its merger cuts the rows into
    #: fixed-length views), and the oldest whose processor writes the image text through
    #: ``replace_image_token``, which a count-first ``processor=`` patches (Phi-4: 5.23).
    min_transformers: ClassVar[str] = ""
    min_transformers_processor: ClassVar[str] = ""
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
        return self.encode(inputs[self.pixel_inputs], **{k: inputs[k] for k in self.image_inputs if k in inputs})

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

    # One placeholder run per view (issue 27): a processor that writes each view of an image as a
    # run of its own, with text between the runs (Idefics3 / SmolVLM; Llama 4's tiles), gets each
    # run shortened to its view's kept count (SPEC.md, "every view keeps its own placeholder run").
    # A family with one run per image leaves the three hooks below as they are.
    def placeholder_runs(self, input_ids: "torch.Tensor", compressed: CompressedImages) -> Any:
        """Per image and view, the runs the prompt holds and the runs the language model gets
        (:class:`globalcom2.core.sequence.ViewRuns`); None (the default): one run per image."""
        return None

    def per_view_runs(self) -> bool:
        """Whether the prompt holds one placeholder run per view (the family overrides :meth:`placeholder_runs`)."""
        return type(self).placeholder_runs is not Family.placeholder_runs

    def image_runs(self, compressed: CompressedImages) -> Any:
        """Per image and view, from the compressed images alone, the vanilla model's runs
        (``prompt``) and the runs the language model gets (``kept``), as a
        :class:`globalcom2.core.sequence.ViewRuns`: what image embeddings carry to rebuild each
        view's run without the pixels. None (the default): one run per image. A family that
        overrides :meth:`placeholder_runs` must override this too (else image embeddings refuse it)."""
        return None

    def processed_runs(self, image_inputs: Mapping[str, Any], processor: Any, config: Any = None) -> "list[list[int]] | None":
        """Per image of a processor's image output, the compressed count of each view's run (what a
        patched processor writes, with :meth:`runs_text`); None (the default): one run per image."""
        return None

    @classmethod
    def runs_text(cls, processor: Any, image_inputs: Any, image_idx: int, runs: Sequence[int]) -> str:  # pragma: no cover
        """The processor's text for image ``image_idx`` with each view's run of ``runs[v]`` placeholders."""
        raise NotImplementedError

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
            model = "" if self.model is None else f" ({type(self.model).__name__})"  # None: a counter (no model)
            raise ValueError(f"layout {layout!r} is not available on {self.display_name}{model}; its layouts: {', '.join(self.layouts)}")

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

    def vision_tower(self) -> nn.Module:
        """The vision tower (``inner.vision_tower``; a family whose model names it otherwise overrides this)."""
        return self.inner.vision_tower

    def last_attention(self) -> nn.Module:
        """The vision tower's last self-attention module (one with every :attr:`attention_attributes`)."""
        found = None
        tower = self.vision_tower()
        for module in tower.modules():
            if all(hasattr(module, a) for a in self.attention_attributes):
                found = module
        if found is None:
            needed = "/".join(a for a in self.attention_attributes if a not in ("num_heads", "scale"))
            raise ValueError(
                f"GlobalCom2 on {self.display_name} needs {self.tower_kind} vision tower whose attention has {needed}; "
                f"{type(tower).__name__} has none"
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

    # -- the tiny test model (built by globalcom2.tiny) ------------------------------------------
    #: The family's tiny test model: tokenizer, processor and widths (None: the family has none).
    tiny: ClassVar["TinyGeometry | None"] = None

    @classmethod
    def tiny_config(cls, tokenizer: Any, vision: dict[str, Any], text: dict[str, Any], **options: Any) -> Any:  # pragma: no cover
        """The ``transformers`` config of the family's checkpoints' geometry (view size, patches,
        pinpoints, feature layer, token ids read from ``tokenizer``) at the widths ``vision`` (the
        vision tower's config keywords) and ``text`` (the language model's, vocabulary and special
        token ids included). ``options``: the family's own (InternVL's ``use_qk_norm``)."""
        raise NotImplementedError(f"{cls.__name__} declares no tiny test model")

    @classmethod
    def tiny_init(cls, model: Any) -> None:
        """Initialise what the random init leaves uninformative, under the tiny model's seed (default:
        nothing; InternVL draws its q/k norm weights so that a missed normalisation shows)."""

    @classmethod
    def build_tiny(cls, seed: int = 0, dtype: Any = None, device: Any = "cpu", **options: Any) -> tuple[Any, Any]:
        """``(model, processor)``: the family's tiny random model (:func:`globalcom2.tiny.build_tiny`)."""
        from ..tiny import build_tiny

        return build_tiny(cls, seed=seed, dtype=dtype, device=device, **options)

    @classmethod
    def max_visual_tokens(cls, config: Any) -> int:  # pragma: no cover - abstract
        """The most visual tokens one image can have, without newlines (a config or its dict)."""
        raise NotImplementedError

    @classmethod
    def default_max_visual_tokens(cls) -> int:  # pragma: no cover - abstract
        """:meth:`max_visual_tokens` of the family's public checkpoints."""
        raise NotImplementedError

    @classmethod
    def checkpoint_max_visual_tokens(cls, checkpoint: str) -> int:
        """:meth:`max_visual_tokens` of ``checkpoint``, one of :attr:`language_models`: the family
        default unless the family knows that checkpoint's geometry to differ (LLaVA-NeXT's
        granite-vision)."""
        return cls.default_max_visual_tokens()

    @classmethod
    def picture_views(cls, image: Any, geom: CropGeometry | None, view: int) -> tuple[Any, Any, Any]:  # pragma: no cover
        """What pictures draw for an image, as the processor makes its views: (thumbnail pixels
        (view, view, 3), crop canvas pixels or None, canvas layout dict or None)."""
        raise NotImplementedError

    @classmethod
    def text_config(cls, hf_config: Any) -> Any:
        """The language model's config within the checkpoint's ``hf_config`` (``text_config``;
        Phi-4-multimodal: the config itself, which has none)."""
        return hf_config.text_config

    @classmethod
    def accepts_size(cls, hf_config: Any, height: int, width: int, processor: Any = None) -> bool:
        """Whether the family's processor takes an image of ``height x width`` (Phi-4-multimodal's
        refuses very extreme aspect ratios); True by default."""
        return True

    @classmethod
    def similarity_features(cls, model: nn.Module) -> tuple[nn.Module, str]:
        """Where the vanilla forward of ``model`` holds, per view, the features that
        ``importance="similarity"`` scores (for tests and tools): ``(module, "input")``, the
        module's first positional argument, or ``(module, "output")``, its result; (views, tokens
        or patches, channels), or (views, channels, h, w) maps. By default the projector's input
        (``multi_modal_projector``, else Idefics3's ``connector``, which pixel-shuffles patches)."""
        inner = getattr(model, "model", model)
        return (getattr(inner, "multi_modal_projector", None) or inner.connector), "input"

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

    @classmethod
    def check_transformers(cls, processor: bool = False) -> None:
        """A one-line ``RuntimeError`` where the installed ``transformers`` is older than this family's
        patched forward (checked by ``apply``; encoding alone, ``compress_images`` and the vLLM plugin,
        which runs vLLM's own forward, do not need it) or its count-first processor (``processor``) needs."""
        need = cls.min_transformers_processor if processor else cls.min_transformers
        if not need:
            return
        from packaging.version import Version

        installed = transformers_version()
        if Version(Version(installed).base_version) < Version(need):
            what = "a count-first processor (processor=)" if processor else "GlobalCom2"
            raise RuntimeError(
                f"{what} on {cls.display_name} needs transformers>={need}, but {installed} is installed; "
                f"run: pip install 'transformers>={need},<6'"
            )

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
        newline = self.image_newline() if newline is None else newline
        if encoded.project is not None and cfg.gathers_rows:
            tokens, plans = _select_then_project(encoded, newline, cfg)
        else:
            encoded = encoded.projected()
            tokens, plans = methods.compress_images(encoded.features, encoded.importance, encoded.geometries, newline, cfg)
        return CompressedImages(tokens=list(tokens), plans=list(plans), vanilla_counts=encoded.vanilla_counts)


    # -- patching -------------------------------------------------------------------------------
    def patched_methods(self) -> dict[str, str]:
        methods = {"forward": "_patched_forward"}
        if hasattr(self.model, "generate"):
            methods["generate"] = "_patched_generate"
        if hasattr(self.model, "_merge_criteria_processor_list"):
            # generate's merge of its own processors / criteria with the caller's (see calls.merge_lists)
            methods["_merge_criteria_processor_list"] = "_patched_merge"
        return methods

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


class _ConfigOnly:
    """Stands in for a model where only its ``config`` is read (:meth:`Family.counter`)."""

    def __init__(self, config: Any) -> None:
        self.config = config


def _select_then_project(encoded: EncodedImages, newline: "torch.Tensor | None", cfg: Any) -> tuple[list[Any], list[Any]]:
    """A selecting method (``cfg.gathers_rows``) on the projector's input, then the projector on
    the kept rows only (issue 28: no projector work on dropped tokens). Each view's rows get one
    extra column, 0, and the newline row is zeros with a 1 there, so the method's gather is
    unchanged and the newlines are told apart exactly afterwards; one projector call for the batch.
    The projector works row by row, so each kept row equals that row of projecting everything
    (the parity tests compare the two).

    Returns: per image its (K_i, D) tokens, and the method's plans."""
    feats = encoded.features
    marked = [torch.cat([f, f.new_zeros(*f.shape[:-1], 1)], dim=-1) for f in feats]  # (V_i, N, C + 1)
    ref = feats[0]
    mark = torch.zeros(ref.shape[-1] + 1, dtype=ref.dtype, device=ref.device)
    mark[-1] = 1
    rows, plans = methods.compress_images(marked, encoded.importance, encoded.geometries, mark, cfg)
    flat = torch.cat(list(rows), dim=0)  # (sum K_i, C + 1)
    tokens = encoded.project(flat[:, :-1])  # (sum K_i, D)
    if newline is not None:
        tokens = torch.where(flat[:, -1:] == 1, newline.to(tokens.device, tokens.dtype)[None], tokens)
    return list(torch.split(tokens, [int(r.shape[0]) for r in rows], dim=0)), list(plans)
