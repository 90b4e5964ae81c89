"""GlobalCom2 for Hugging Face LLaVA-NeXT (``LlavaNextForConditionalGeneration``, ``LlavaNextModel``).

How it plugs in, per model instance (the class is never touched):

* ``forward``: when ``pixel_values`` come with ``input_ids``, the images are encoded once, the
  [CLS] logits of the vision tower's last layer are captured on the way, GlobalCom2 compresses
  every image, the surplus image placeholders are removed from ``input_ids`` (and
  ``attention_mask``/``labels``), and the original forward runs on the shorter sequence with the
  compressed features passed as ``mm_encoder_outputs``. Logits therefore have the compressed
  length.
* ``generate``: the same preparation happens once, before generation; the generation loop then
  runs on the shorter prompt with a KV cache of the compressed size. The returned sequences start
  with the caller's original ``input_ids`` so that ``out[:, inputs.input_ids.shape[1]:]`` is the
  answer, exactly as with the vanilla model.

[CLS] logits come from two forward hooks on the last layer's ``q_proj`` and ``k_proj``,
registered only while the tower runs: the tower keeps its attention implementation (SDPA), no
``output_attentions`` is requested, and no N x N attention map is ever built.

Two feature strategies, as HF's ``get_image_features``:

* ``vision_feature_select_strategy="default"`` (the llava-hf checkpoints: CLIP with [CLS]): the
  [CLS] row is dropped before the projector; ``importance="auto"`` is the [CLS] logits (``cls``).
* ``"full"`` (IBM granite-vision-3.x: a SigLIP tower, no [CLS]): every patch goes to the projector;
  ``auto`` is ``similarity`` (SPEC.md, "Importance without a [CLS] token"), ``-cos`` of each patch's
  features to its view's mean **on what the projector receives**: with a list
  ``vision_feature_layer`` (granite: ``[-24, -20, -12, -1]``) the hidden states of those layers
  concatenated along the channels, exactly as the vanilla model builds them. ``cls`` is refused
  in one line; ``attention_received`` (the ablation) is read at the tower's last attention layer
  (SPEC.md), whatever the feature layers. A ``"full"`` model whose tower does have a class token
  (CLIP: the [CLS] would reach the projector as a patch) is refused at ``apply``.
"""


from __future__ import annotations

import math
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, ClassVar

from .._lazy import lazy_module
from .base import Family, TinyGeometry, register_family
from .capture import QKCapture
from .checks import check_image_sizes
from .images import EncodedImages

if TYPE_CHECKING:  # pragma: no cover
    from ..core.geometry import CropGeometry

# Imported when the family runs: the registry (and ``globalcom2 --help``) must not load torch.
torch = lazy_module("torch")
geometry = lazy_module("globalcom2.core.geometry")
importance_ops = lazy_module("globalcom2.core.importance")

#: AnyRes pinpoints of the public llava-hf LLaVA-NeXT checkpoints, (height, width).
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
#: Their CLIP-L/14-336 tower: view side and patch size in pixels.
VIEW_SIZE, PATCH_SIZE = 336, 14
#: HF LLaVA-NeXT's feature strategies: "default" drops the tower's first token ([CLS]) before the
#: projector, "full" keeps every token (a tower without [CLS]: granite-vision's SigLIP).
STRATEGIES = ("default", "full")
#: IBM granite-vision-3.2-2b (its config.json, as quoted by foundation-model-stack's
#: fms/models/llava_next.py and llama.cpp's examples/llava/README-granitevision.md): a
#: SigLIP-so400m 384/14 tower (27 layers, no [CLS]), "full" features of these layers concatenated
#: (4 x 1152 channels into the projector), and these 27 pinpoints (up to 10 crops).
GRANITE_VIEW_SIZE = 384
GRANITE_FEATURE_LAYERS = [-24, -20, -12, -1]
GRANITE_PINPOINTS = [
    [384, 384], [384, 768], [384, 1152], [384, 1536], [384, 1920], [384, 2304], [384, 2688], [384, 3072], [384, 3456],
    [384, 3840], [768, 384], [768, 768], [768, 1152], [768, 1536], [768, 1920], [1152, 384], [1152, 768], [1152, 1152],
    [1536, 384], [1536, 768], [1920, 384], [1920, 768], [2304, 384], [2688, 384], [3072, 384], [3456, 384], [3840, 384],
]
#: The tiny granite model's pinpoints: granite's of at most 4 crops (1 x 1 to 4 x 1, 2 x 2).
GRANITE_TINY_MAX_CROPS = 4
GRANITE_TINY_PINPOINTS = [p for p in GRANITE_PINPOINTS if p[0] * p[1] <= GRANITE_TINY_MAX_CROPS * GRANITE_VIEW_SIZE**2]
#: Its granite-3.1-2b language model's multipliers (config.json; the attention's is 1 / head_dim).
GRANITE_MULTIPLIERS = {"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "logits_scaling": 8.0}


@register_family
class LlavaNextFamily(Family):
    """LLaVA-NeXT (``transformers`` ``LlavaNextForConditionalGeneration`` / ``LlavaNextModel``): a
    CLIP tower with [CLS] (llava-hf) or a SigLIP tower without (granite-vision, "full" features of
    several layers), the thumbnail first, AnyRes crops unpadded, one newline per row; both
    layouts (``official`` reproduces the published code token for token)."""

    model_type = "llava_next"
    display_name = "LLaVA-NeXT"
    example_checkpoint = "llava-hf/llava-v1.6-vicuna-7b-hf"
    model_names = ("LlavaNextForConditionalGeneration", "LlavaNextModel")
    layouts = ("official", "spatial")
    image_inputs = ("image_sizes", "vision_feature_layer", "vision_feature_select_strategy")
    tower_kind = "a CLIP-like ViT"
    #: The public checkpoints' language models (from their config.json files), as
    #: :class:`globalcom2.efficiency.LMArch` fields: name, layers, hidden, heads, kv heads,
    #: head dim, intermediate, vocab. The llava-hf ones share one geometry (CLIP-L/14-336, 4 crops at
    #: most); granite-vision's is in :attr:`checkpoint_geometries`.
    language_models = {
        "llava-hf/llava-v1.6-vicuna-7b-hf": ("vicuna-7b", 32, 4096, 32, 32, 128, 11008, 32064),
        "llava-hf/llava-v1.6-vicuna-13b-hf": ("vicuna-13b", 40, 5120, 40, 40, 128, 13824, 32064),
        "llava-hf/llava-v1.6-mistral-7b-hf": ("mistral-7b", 32, 4096, 32, 8, 128, 14336, 32064),
        "llava-hf/llama3-llava-next-8b-hf": ("llama3-8b", 32, 4096, 32, 8, 128, 14336, 128320),
        "llava-hf/llava-v1.6-34b-hf": ("yi-34b", 60, 7168, 56, 8, 128, 20480, 64064),
        # granite-3.1-2b (foundation-model-stack's fms/models/llava_next.py, its granite-vision-3.2-2b
        # text config: 40 layers, 2048 wide, 32 heads of 64, 8 KV heads, MLP 8192, 49,156 tokens).
        "ibm-granite/granite-vision-3.2-2b": ("granite-3.1-2b", 40, 2048, 32, 8, 64, 8192, 49156),
    }
    #: Checkpoints whose vision geometry is not the llava-hf one (for :meth:`checkpoint_max_visual_tokens`).
    checkpoint_geometries: ClassVar[dict[str, dict[str, Any]]] = {
        "ibm-granite/granite-vision-3.2-2b": {
            "vision_config": {"image_size": GRANITE_VIEW_SIZE, "patch_size": PATCH_SIZE},
            "image_grid_pinpoints": GRANITE_PINPOINTS,
        },
    }
    default_text_model_type = "llama"

    @classmethod
    def hf_classes(cls) -> tuple[type, ...]:
        from transformers import LlavaNextForConditionalGeneration, LlavaNextModel

        return (LlavaNextForConditionalGeneration, LlavaNextModel)

    def check_vision(self) -> None:
        self.importance_mode(self.hf_config.vision_feature_select_strategy)
        self.last_attention()

    def importance_mode(self, strategy: str, tower: Any = None) -> str:
        """The importance signal the vision method asks for under feature strategy ``strategy``:
        ``"auto"`` is ``"cls"`` with ``"default"`` (the [CLS] dropped) and ``"similarity"`` with
        ``"full"`` (no [CLS], SPEC.md). ``ValueError`` (one line) for another strategy, for
        ``"full"`` on a tower with a class token, and for ``importance="cls"`` with ``"full"``.
        ``tower``: the vision tower to check (default the model's; vLLM's own where it runs)."""
        if strategy not in STRATEGIES:
            raise ValueError(
                f"GlobalCom2 on {self.display_name} needs vision_feature_select_strategy 'default' (a tower with [CLS], "
                f"dropped) or 'full' (a tower without [CLS], e.g. granite-vision's SigLIP); this model uses {strategy!r}"
            )
        tower = self.vision_tower() if tower is None else tower
        if strategy == "full" and has_class_token(tower):
            raise ValueError(
                f"GlobalCom2 on {self.display_name} with vision_feature_select_strategy='full' needs a tower without a "
                f"[CLS] token (SigLIP); {type(tower).__name__} has one, which 'full' would hand the projector"
            )
        mode = getattr(self.vision_config, "importance", "auto")
        if strategy == "full" and mode == "cls":
            raise ValueError(
                f"importance='cls' is not available on this {self.display_name} model: its features are 'full' "
                "(a tower without [CLS]); use importance='similarity' (the default, 'auto') or 'attention_received'"
            )
        if mode == "auto":
            return "cls" if strategy == "default" else "similarity"
        return mode

    # -- vision side ----------------------------------------------------------------------------
    def grid_shape(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """(rows, columns) of the AnyRes crop grid the model uses for an image of this size."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        vc = self.hf_config.vision_config
        return get_anyres_image_grid_shape(list(image_hw), self.hf_config.image_grid_pinpoints, vc.image_size)

    def view_grid(self, inputs: Any, index: int = 0) -> tuple[int, int] | None:
        image_hw = tuple(int(v) for v in inputs["image_sizes"][index])
        return self.grid_shape(image_hw) if self.num_views(image_hw) > 1 else None

    def num_views(self, image_hw: tuple[int, int]) -> int:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        vc = self.hf_config.vision_config
        return image_size_to_num_patches(list(image_hw), self.hf_config.image_grid_pinpoints, vc.image_size)

    def size_layout(self, image_sizes: Any, **options: Any) -> tuple[list[int], list[Any], int]:
        """Views (thumbnail + AnyRes crops, the model's own rule) and crop geometry per image size."""
        vc = self.hf_config.vision_config
        side = vc.image_size // vc.patch_size
        views, geoms = [], []
        for hw in image_sizes:
            s = (int(hw[0]), int(hw[1]))
            v = self.num_views(s)
            views.append(v)
            if v == 1:
                geoms.append(None)
                continue
            grid = self.grid_shape(s)
            if grid[0] * grid[1] != v - 1:
                raise ValueError(f"image of size {s} has {v - 1} crops but a {grid[0]}x{grid[1]} grid")
            geoms.append(geometry.crop_geometry(s, grid, side))
        return views, geoms, side * side

    def encode(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | list[Any] | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
    ) -> EncodedImages:
        """Run the vision tower, capturing the importance (the last layer's [CLS] logits with
        ``"default"``, the projector input's similarity with ``"full"``); the projector runs later,
        on the kept tokens only (:meth:`Family.compress`).

        Args:
            pixel_values: (B, P, 3, h, w) as the processor pads them, or (sum V_i, 3, h, w).
            image_sizes: (B, 2) original (height, width) of each image.

        Returns:
            :class:`EncodedImages` with per-image features (V_i, N, C), the projector's input
            (``project`` = the model's projector; C = the tower's width times the number of
            feature layers), and importance (V_i, N).

        Like the model's own ``get_image_features`` this runs under the caller's grad mode, so
        gradients reach the projector (and the tower) when training with ``labels``; the [CLS]
        importance only decides which tokens are kept and is never differentiated.
        """
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes together with pixel_values")
        cfg = self.hf_config
        layer = cfg.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = cfg.vision_feature_select_strategy if vision_feature_select_strategy is None else vision_feature_select_strategy
        mode = self.importance_mode(strategy)
        first = 1 if strategy == "default" else 0  # "default" drops the [CLS] row, "full" keeps every token
        rows = image_sizes.tolist() if torch.is_tensor(image_sizes) else image_sizes  # the one read of the sizes
        check_image_sizes(rows)
        sizes = [tuple(int(v) for v in s) for s in rows]
        views = [self.num_views(s) for s in sizes]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([pv[:v] for pv, v in zip(pixel_values, views)], dim=0)
        elif pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must have 4 or 5 dimensions, got shape {tuple(pixel_values.shape)}")
        if pixel_values.shape[0] != sum(views):
            raise ValueError(f"pixel_values hold {pixel_values.shape[0]} views but image_sizes imply {sum(views)}")

        tower = self.inner.vision_tower
        attn = self.last_attention()
        # The importance (config field ``importance``, resolved by importance_mode): "cls" the
        # method's [CLS] logits; "similarity" and "attention_received" the signals of towers without
        # [CLS], over the N patches (SPEC.md): the default and an ablation with "full".
        received = mode == "attention_received"
        last = self._last_layer(attn)
        if last is not None and self._before_last(layer):
            # The features are the last layer's input: run the tower up to it only, and of the last
            # layer only what the importance reads (its first layer norm, then q and k).
            hidden = run_until(tower, last, pixel_values)  # (V, T, C): hidden_states[layer]
            cap = _Captured()
            if mode != "similarity":
                x = last.layer_norm1(hidden)
                cap.queries = attn.q_proj(x)  # (V, T, C): on every token, as the layer computes it (same bits)
                cap.q_cls, cap.keys = cap.queries[:, 0], attn.k_proj(x)
        else:
            # A list of feature layers asks for every hidden state: transformers < 5.25 reads a list
            # with negative indices as no layer at all (its get_image_features asks for all, too).
            select = layer if isinstance(layer, int) else True
            with QKCapture(attn, all_queries=received) as cap:
                out = tower(pixel_values, output_hidden_states=select, return_dict=True)
            if isinstance(layer, int):
                hidden = out.hidden_states[layer]
            else:
                hidden = torch.cat([out.hidden_states[i] for i in layer], dim=-1)
        feats = hidden[:, first:]  # (V, N, C): the projector's input, projected where kept (Family.compress)
        _, geoms, n = self.size_layout(sizes)
        if feats.shape[1] != n:
            raise ValueError(f"the vision tower gives {feats.shape[1]} tokens per view after {strategy!r}, expected {n}")
        if mode == "similarity":  # -cos to the view's mean, on what the projector receives
            importance = importance_ops.feature_similarity(feats)  # (V, N)
        elif received:  # softmax over the N patches only (a [CLS] row and column left out), SPEC.md
            if cap.queries is None or cap.keys is None:  # pragma: no cover - defensive
                raise RuntimeError("the vision tower's last attention layer did not run")
            importance = importance_ops.attention_received(
                cap.queries.detach()[:, first:], cap.keys.detach()[:, first:], attn.num_heads, attn.scale
            )  # (V, N)
        else:
            if cap.q_cls is None or cap.keys is None:  # pragma: no cover - defensive
                raise RuntimeError("the vision tower's last attention layer did not run")
            importance = importance_ops.cls_attention_logits(cap.q_cls.detach(), cap.keys.detach(), attn.num_heads, attn.scale)  # (V, N)

        side = math.isqrt(n)
        return EncodedImages(
            features=list(torch.split(feats, views, dim=0)),
            importance=list(torch.split(importance.to(feats.device), views, dim=0)),
            geometries=geoms,
            image_sizes=sizes,
            vanilla_counts=[side * side + 1 if g is None else g.vanilla_num_tokens() for g in geoms],
            project=self.inner.multi_modal_projector,
        )

    def _last_layer(self, attn: Any) -> Any:
        """The encoder layer holding ``attn`` when it has CLIP's ``layer_norm1`` before it (else None:
        the tower then runs whole, with the q/k hooks)."""
        for module in self.inner.vision_tower.modules():
            if getattr(module, "self_attn", None) is attn and hasattr(module, "layer_norm1"):
                return module
        return None

    def _before_last(self, layer: Any) -> bool:
        """Whether feature layer ``layer`` (an index of the tower's hidden states, L + 1 of them) is
        the last layer's input, hidden_states[L - 1] (LLaVA-NeXT's -2)."""
        n = int(self.hf_config.vision_config.num_hidden_layers)
        return isinstance(layer, int) and not isinstance(layer, bool) and layer % (n + 1) == n - 1 and -(n + 1) <= layer <= n

    def image_newline(self) -> torch.Tensor:
        """The (D,) image-newline embedding, also when accelerate offloads it (``device_map`` with
        ``"disk"``/``"cpu"`` entries keeps it on the meta device between forward passes): then it is
        read through the inner model's own hook, as the vanilla forward would have it loaded."""
        newline = self.inner.image_newline
        if newline.device.type != "meta":
            return newline
        hook = getattr(self.inner, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            weights = getattr(h, "weights_map", None)
            if weights is not None and "image_newline" in weights:
                device = getattr(h, "execution_device", None)
                value = weights["image_newline"]
                return value.to(device) if device is not None else value
        raise ValueError("the model's image_newline is on the meta device and no accelerate hook holds its weights")

    def vanilla_pack(self, encoded: EncodedImages) -> list[torch.Tensor]:
        """The vanilla model's packing of the same features (for comparisons and benchmarks)."""
        sizes = torch.tensor(encoded.image_sizes, dtype=torch.long)
        packed, _ = self.inner.pack_image_features(
            encoded.projected().features, sizes, vision_feature_select_strategy=self.hf_config.vision_feature_select_strategy,
            image_newline=self.image_newline(),
        )
        return list(packed)

    # -- for the tools --------------------------------------------------------------------------
    #: The tiny test model (globalcom2.tiny): the llava-hf processor settings (336 px views), a CLIP
    #: tower and a Llama language model of a few dozen wide; the wide benchmark model has
    #: llava-v1.6-vicuna-7b's widths (openai/clip-vit-large-patch14-336, lmsys/vicuna-7b-v1.5).
    tiny = TinyGeometry(
        special_tokens={"image_token": "<image>"},
        processor="LlavaNextProcessor",
        processor_kwargs={
            "patch_size": PATCH_SIZE,
            "vision_feature_select_strategy": "default",
            "num_additional_image_tokens": 1,  # the CLIP tower's [CLS]
        },
        image_processor="LlavaNextImageProcessor",
        image_processor_kwargs={
            "size": {"shortest_edge": VIEW_SIZE},
            "crop_size": {"height": VIEW_SIZE, "width": VIEW_SIZE},
            "image_grid_pinpoints": LLAVA_NEXT_PINPOINTS,
        },
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, projection_dim=32),
        text=dict(
            hidden_size=64, intermediate_size=128,
            num_hidden_layers=4,  # deep enough for FastV at its default layer K=2
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
        ),
        wide_vision=dict(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
            projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        ),
        wide_text=dict(
            hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
            rms_norm_eps=1e-5, max_position_embeddings=4096,
        ),
        hub_tower_names=True,
    )

    @classmethod
    def tiny_config(
        cls, tokenizer: Any, vision: dict[str, Any], text: dict[str, Any], granite: bool = False, **options: Any
    ) -> Any:
        """A ``LlavaNextConfig`` with the llava-hf geometry (336 px views of 14 px patches, their
        pinpoints, features of the second-to-last layer without [CLS]): a CLIP vision tower of
        ``vision`` and a Llama language model of ``text``.

        ``granite=True``: granite-vision-3.x's geometry instead (:meth:`tiny_granite_config`).
        ``options`` go to the config over these settings."""
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

        if granite:
            return cls.tiny_granite_config(tokenizer, vision, text, **options)
        settings = dict(
            vision_config=CLIPVisionConfig(image_size=VIEW_SIZE, patch_size=PATCH_SIZE, **vision),
            text_config=LlamaConfig(**text),
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
        return LlavaNextConfig(**{**settings, **options})

    @classmethod
    def tiny_granite_config(cls, tokenizer: Any, vision: dict[str, Any], text: dict[str, Any], **options: Any) -> Any:
        """A ``LlavaNextConfig`` of granite-vision-3.x's geometry at tiny widths: a SigLIP tower of
        384 px views of 14 px patches (no [CLS]) with one layer per feature layer, ``"full"``
        features of all its layers concatenated (as many as granite's ``[-24, -20, -12, -1]``, the
        last included), :data:`GRANITE_TINY_PINPOINTS` (a 1 x 1 crop grid among them), and a Granite
        language model of ``text`` with granite-3.1's multipliers (attention scaled by
        1 / head_dim, embeddings by 12, residuals by 0.22, logits divided by 8)."""
        from transformers import GraniteConfig, LlavaNextConfig, SiglipVisionConfig

        layers = len(GRANITE_FEATURE_LAYERS)
        tower = {k: v for k, v in vision.items() if k != "projection_dim"}  # CLIP's; SigLIP has no projection
        tower["num_hidden_layers"] = layers
        head_dim = text["hidden_size"] // text["num_attention_heads"]
        settings = dict(
            vision_config=SiglipVisionConfig(image_size=GRANITE_VIEW_SIZE, patch_size=PATCH_SIZE, **tower),
            text_config=GraniteConfig(
                **{**dict(attention_multiplier=1.0 / head_dim, **GRANITE_MULTIPLIERS), **text}
            ),
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            image_grid_pinpoints=GRANITE_TINY_PINPOINTS,
            vision_feature_layer=list(range(-layers, 0)),
            vision_feature_select_strategy="full",
        )
        return LlavaNextConfig(**{**settings, **options})

    @classmethod
    def tiny_granite_processor(cls, tokenizer: Any) -> Any:
        """The processor of :meth:`tiny_granite_config`'s model, as granite-vision's: 384 px views
        (SigLIP's 0.5 mean and std), its pinpoints, ``"full"`` features (no [CLS] token counted)."""
        from transformers import LlavaNextImageProcessor, LlavaNextProcessor

        half = [0.5, 0.5, 0.5]
        image_processor = LlavaNextImageProcessor(
            size={"shortest_edge": GRANITE_VIEW_SIZE},
            crop_size={"height": GRANITE_VIEW_SIZE, "width": GRANITE_VIEW_SIZE},
            image_grid_pinpoints=GRANITE_TINY_PINPOINTS,
            image_mean=half,
            image_std=half,
        )
        return LlavaNextProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
            vision_feature_select_strategy="full", num_additional_image_tokens=0,
        )

    @classmethod
    def max_visual_tokens(cls, config: Any) -> int:
        """The thumbnail plus the most crops any ``image_grid_pinpoints`` entry gives, times
        ``(image_size / patch_size)^2`` (5 x 576 = 2,880 for the llava-hf checkpoints)."""
        vision = _get(config, "vision_config")
        size, patch = _get(vision, "image_size"), _get(vision, "patch_size")
        pinpoints = _get(config, "image_grid_pinpoints")
        if not (isinstance(size, int) and isinstance(patch, int) and pinpoints):
            raise ValueError("the config has no vision_config.image_size/patch_size or image_grid_pinpoints")
        crops = max((int(h) // size) * (int(w) // size) for h, w in pinpoints)
        return (1 + crops) * (size // patch) ** 2

    @classmethod
    def default_max_visual_tokens(cls) -> int:
        """:meth:`max_visual_tokens` of the llava-hf checkpoints' geometry (2,880)."""
        return cls.max_visual_tokens(
            {"vision_config": {"image_size": VIEW_SIZE, "patch_size": PATCH_SIZE}, "image_grid_pinpoints": LLAVA_NEXT_PINPOINTS}
        )

    @classmethod
    def checkpoint_max_visual_tokens(cls, checkpoint: str) -> int:
        """:meth:`max_visual_tokens` of a known checkpoint (granite-vision-3.2-2b: 11 x 729 = 8,019;
        the llava-hf ones: 2,880)."""
        geometry_of = cls.checkpoint_geometries.get(checkpoint)
        return cls.default_max_visual_tokens() if geometry_of is None else cls.max_visual_tokens(geometry_of)

    @classmethod
    def picture_views(cls, image: Any, geom: CropGeometry | None, view: int) -> tuple[Any, Any, Any]:
        """The thumbnail is the whole image squeezed to one view; the crops cover the image resized
        (aspect kept) into the best resolution and centred on a zero-padded canvas."""
        import numpy as np
        from PIL import Image

        from .._io import to_rgb

        image = to_rgb(image)
        thumb = np.asarray(image.resize((view, view), Image.Resampling.BICUBIC))
        if geom is None:
            return thumb, None, None
        lay = canvas_layout((image.height, image.width), (geom.grid_h, geom.grid_w), view)
        canvas = np.zeros((lay["height"], lay["width"], 3), np.uint8)
        resized = image.resize((lay["new_width"], lay["new_height"]), Image.Resampling.BICUBIC)
        canvas[lay["top"] : lay["top"] + lay["new_height"], lay["left"] : lay["left"] + lay["new_width"]] = np.asarray(resized)
        return thumb, canvas, lay


def has_class_token(tower: Any) -> bool:
    """Whether a vision tower (Hugging Face's or vLLM's) puts a class token before its patches: its
    embeddings hold more positions than patches (CLIP: 577 for 576; SigLIP: as many)."""
    for module in tower.modules():
        positions, patches = getattr(module, "num_positions", None), getattr(module, "num_patches", None)
        if isinstance(positions, int) and isinstance(patches, int):
            return positions > patches
    return False


class _Captured:
    """What :class:`QKCapture` holds, computed directly (the truncated tower)."""

    q_cls: Any = None
    queries: Any = None
    keys: Any = None


class _TowerStop(Exception):
    """Raised by :func:`run_until`'s hook to leave the tower with the stop layer's input."""

    def __init__(self, hidden: Any) -> None:
        super().__init__("tower stopped")
        self.hidden = hidden


#: The stop layers open in this thread / task (a hook on a shared module fires for every caller).
_STOPS: "ContextVar[tuple[Any, ...]]" = ContextVar("globalcom2_tower_stops", default=())


def run_until(tower: Any, layer: Any, pixel_values: Any) -> Any:
    """The tower's hidden state entering ``layer`` (one of its encoder layers): the tower's own
    ``forward`` (embeddings, pre-norm, the layers before it; the same ops and bits as a full run's
    ``hidden_states``), left as that layer is called, so neither it nor any later layer runs. The
    hook acts only for the caller that opened it (a context variable): another thread running the
    same tower whole is not stopped."""

    def stop(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if layer in _STOPS.get():
            raise _TowerStop(args[0] if args else kwargs["hidden_states"])

    token = _STOPS.set((*_STOPS.get(), layer))
    handle = layer.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        tower(pixel_values)
    except _TowerStop as done:
        return done.hidden
    finally:
        handle.remove()
        _STOPS.reset(token)
    raise RuntimeError("the vision tower did not reach its last layer")  # pragma: no cover - defensive


def _get(obj: Any, key: str, default: Any = None) -> Any:
    return obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)


def canvas_layout(image_hw: tuple[int, int], grid_hw: tuple[int, int], view: int = 336) -> dict[str, int]:
    """Where LLaVA-NeXT's processor puts an image on its padded crop canvas.

    Same arithmetic as the processor (``get_patch_output_size`` and ``_get_padding_size``): the
    image is resized to fit ``(grid_h * view, grid_w * view)`` with its aspect ratio kept (the
    short side rounded up), then centred with zero padding.

    Returns:
        dict with ``height``, ``width`` (the canvas), ``new_height``, ``new_width`` (the resized
        image) and ``top``, ``left`` (its offset on the canvas).
    """
    h, w = (int(v) for v in image_hw)
    ch, cw = grid_hw[0] * view, grid_hw[1] * view
    scale_w, scale_h = cw / w, ch / h
    if scale_w < scale_h:
        nw, nh = cw, min(math.ceil(h * scale_w), ch)
    else:
        nh, nw = ch, min(math.ceil(w * scale_h), cw)
    return {"height": ch, "width": cw, "new_height": nh, "new_width": nw, "top": (ch - nh) // 2, "left": (cw - nw) // 2}
