"""GlobalCom2 for Hugging Face LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``,
``LlavaOnevisionModel``): a SigLIP tower without [CLS], thumbnail ("base image") plus AnyRes crops.

What this family computes (``SPEC.md``, "Other families" / "LLaVA-OneVision"):

* Views. SigLIP-so400m/14-384: S = 27 patches per side, N = 729 tokens per view, features from
  ``vision_feature_layer`` (-1), every token kept (``vision_feature_select_strategy="full"``:
  there is no [CLS]). The base image comes first, then the crops of the grid HF's own
  ``get_anyres_image_grid_shape`` picks from the model's ``image_grid_pinpoints`` (up to 6 x 6
  crops of 384 px on the public checkpoints). The crops are unpadded as HF ``unpad_image`` does,
  one image-newline follows every unpadded row, and an image seen as one view (every image of a
  multi-image prompt, as HF's ``batch_num_images`` rule has it) gets one trailing newline.
* ``vision_aspect_ratio="anyres_max_K"``: when HF resizes the crops' unpadded feature map (its
  rule: ``s = sqrt(h w / (K N)) > 1.1``, to ``(int(h // s), int(w // s))``; SPEC.md words the
  condition as "exceeds K N", HF's threshold 1.1 is what the vanilla model and the processor's
  placeholder count use, so it is followed here), the family resizes the projected features
  exactly as HF does and GlobalCom2 selects on the resized map
  (:mod:`globalcom2.core.resized`: :class:`~globalcom2.core.resized.ResizedCropGeometry`).
  The resized map is handed to the methods at "pseudo" positions of the crop rows (the top-left
  ``h' x w'`` of the joint grid), so the ``spatial`` layout, the joint budgets (fastervlm,
  random) and pooling work on it unchanged and keep-all gives the vanilla sequence.
* Importance: ``importance="similarity"`` (the default here, ``"auto"``; SPEC.md): per view,
  ``-cos`` of each patch's features at the feature layer (what the projector receives) to the
  view's mean (:func:`globalcom2.core.importance.feature_similarity`). ``"attention_received"``
  (an ablation): the mean softmax attention every patch receives at the tower's last layer, from
  the last attention module's ``q_proj`` / ``k_proj`` outputs captured by hooks while the tower
  runs, in query chunks (:func:`globalcom2.core.importance.attention_received`; no
  ``output_attentions``, no eager switch, the tower keeps SDPA). ``importance="cls"`` raises
  (SigLIP has no [CLS]).
* Layout: ``spatial`` only (the vanilla order with the dropped tokens removed); there is no
  published code for an ``official`` layout to reproduce, so asking for it raises.
* Placeholders: the vanilla count of each image is what HF's processor writes (N + h (w + 1),
  or N + h' (w' + 1) after resizing; N + 1 for a single view).
"""

from __future__ import annotations

import math
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
resized = lazy_module("globalcom2.core.resized")
importance_ops = lazy_module("globalcom2.core.importance")

#: AnyRes pinpoints of the public llava-hf OneVision checkpoints (and HF's default): every
#: (height, width) of 1..6 x 1..6 crops of 384 px.
ONEVISION_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
#: Their SigLIP-so400m/14-384 tower: view side and patch size in pixels.
VIEW_SIZE, PATCH_SIZE = 384, 14
#: Their ``vision_aspect_ratio``.
VISION_ASPECT_RATIO = "anyres_max_9"


def _get(obj: Any, key: str, default: Any = None) -> Any:
    return obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)


@register_family
class LlavaOnevisionFamily(Family):
    """LLaVA-OneVision (``transformers`` ``LlavaOnevisionForConditionalGeneration`` /
    ``LlavaOnevisionModel``): SigLIP views without [CLS] ("attention received" importance), the
    base image first, AnyRes crops unpadded with one newline per row, ``anyres_max_9``
    resizing; the ``spatial`` layout only. See the module docstring."""

    model_type = "llava_onevision"
    display_name = "LLaVA-OneVision"
    example_checkpoint = "llava-hf/llava-onevision-qwen2-7b-ov-hf"
    model_names = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")
    layouts = ("spatial",)
    image_inputs = (
        "image_sizes", "batch_num_images", "vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio",
    )
    tower_kind = "a SigLIP-like ViT"
    #: The public llava-hf OneVision checkpoints' Qwen2 language models, as
    #: :class:`globalcom2.efficiency.LMArch` fields (name, layers, hidden, heads, kv heads, head
    #: dim, intermediate, vocab). Values are those of the ``text_config`` in the checkpoints'
    #: public config.json files (the Qwen2-0.5B / 7B / 72B architectures), written here from
    #: knowledge of those files (no download is possible in this project); the vocab sizes are
    #: the checkpoints' padded embedding sizes (152000 for 0.5b, 152128 for 7b and 72b).
    language_models = {
        "llava-hf/llava-onevision-qwen2-0.5b-ov-hf": ("qwen2-0.5b", 24, 896, 14, 2, 64, 4864, 152000),
        "llava-hf/llava-onevision-qwen2-7b-ov-hf": ("qwen2-7b", 28, 3584, 28, 4, 128, 18944, 152128),
        "llava-hf/llava-onevision-qwen2-72b-ov-hf": ("qwen2-72b", 80, 8192, 64, 8, 128, 29568, 152128),
    }
    default_text_model_type = "qwen2"

    @classmethod
    def hf_classes(cls) -> tuple[type, ...]:
        from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel

        return (LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel)

    # -- checks ---------------------------------------------------------------------------------
    def importance_mode(self) -> str:
        """The importance signal the vision method asks for, resolved for this family
        (``"auto"`` -> ``"similarity"``, SPEC.md; ``"attention_received"`` an ablation; ``"cls"``
        is a ``ValueError``)."""
        mode = getattr(self.vision_config, "importance", "auto")
        if mode == "cls":
            raise ValueError(
                f"importance='cls' is not available on {self.display_name}: its SigLIP tower has no [CLS] token; "
                "use importance='similarity' (the default, 'auto') or 'attention_received'"
            )
        return "attention_received" if mode == "attention_received" else "similarity"

    def check_vision(self) -> None:
        strategy = self.hf_config.vision_feature_select_strategy
        if strategy != "full":
            raise ValueError(
                f"GlobalCom2 on {self.display_name} needs vision_feature_select_strategy='full' (SigLIP, no [CLS]); "
                f"this model uses {strategy!r}"
            )
        self.importance_mode()
        self.last_attention()
        resized.parse_anyres_max(self.hf_config.vision_aspect_ratio)

    # -- geometry -------------------------------------------------------------------------------
    @property
    def side(self) -> int:
        vc = self.hf_config.vision_config
        return vc.image_size // vc.patch_size

    def grid_shape(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """(rows, columns) of the AnyRes crop grid the model uses for an image of this size."""
        from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape

        vc = self.hf_config.vision_config
        return get_anyres_image_grid_shape(list(image_hw), self.hf_config.image_grid_pinpoints, vc.image_size)

    def num_views(self, image_hw: tuple[int, int]) -> int:
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        vc = self.hf_config.vision_config
        return image_size_to_num_patches(list(image_hw), self.hf_config.image_grid_pinpoints, vc.image_size)

    @staticmethod
    def _patching(batch_num_images: Any, count: int) -> list[bool]:
        """Per image, whether it is cut into crops: HF's rule, only the image of a one-image prompt."""
        if batch_num_images is None:
            return [True] * count
        nums = batch_num_images.tolist() if torch.is_tensor(batch_num_images) else list(batch_num_images)
        flags = [int(n) == 1 for n in nums for _ in range(int(n))]
        if len(flags) != count:
            raise ValueError(f"batch_num_images {nums} count {len(flags)} images but image_sizes hold {count}")
        return flags

    def view_grid(self, inputs: Any, index: int = 0) -> tuple[int, int] | None:
        sizes = inputs["image_sizes"]
        image_hw = tuple(int(v) for v in sizes[index])
        patching = self._patching(inputs.get("batch_num_images") if hasattr(inputs, "get") else None, len(sizes))
        if not patching[index] or self.num_views(image_hw) == 1:
            return None
        return self.grid_shape(image_hw)

    def geometry(self, image_hw: tuple[int, int], aspect: str | None = None) -> CropGeometry:
        """The image's crop geometry, resized (:class:`~globalcom2.core.resized.ResizedCropGeometry`)
        when ``anyres_max_K`` resizes its crop map."""
        k = resized.parse_anyres_max(aspect or self.hf_config.vision_aspect_ratio)
        return resized.anyres_geometry(image_hw, self.grid_shape(image_hw), self.side, k)

    # -- vision side ----------------------------------------------------------------------------
    def encode(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | list[Any] | None = None,
        batch_num_images: torch.Tensor | list[int] | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        vision_aspect_ratio: str | None = None,
    ) -> EncodedImages:
        """Run the SigLIP tower and projector, capturing the last layer's queries and keys.

        Args:
            pixel_values: (B, P, 3, 384, 384) as the processor pads them, or (sum V_i, 3, 384, 384).
            image_sizes: (B, 2) original (height, width) of each image.
            batch_num_images: images per prompt (HF: only one-image prompts are cut into crops).

        Returns:
            :class:`EncodedImages`: per image (V_i, N, D) features and (V_i, N) "attention
            received" importance; where ``anyres_max_K`` resizes the crop map, the crop rows hold
            the resized features / resized local importance at their pseudo positions (see
            :mod:`globalcom2.core.resized`).

        Runs under the caller's grad mode, like the model's own ``get_image_features``.
        """
        if image_sizes is None:
            raise ValueError(f"{self.display_name} needs image_sizes together with pixel_values")
        cfg = self.hf_config
        layer = cfg.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = cfg.vision_feature_select_strategy if vision_feature_select_strategy is None else vision_feature_select_strategy
        if strategy != "full":
            raise ValueError(f"GlobalCom2 on {self.display_name} needs vision_feature_select_strategy='full', got {strategy!r}")
        aspect = cfg.vision_aspect_ratio if vision_aspect_ratio is None else vision_aspect_ratio
        self.importance_mode()
        rows = image_sizes.tolist() if torch.is_tensor(image_sizes) else image_sizes  # the one read of the sizes
        check_image_sizes(rows)
        sizes = [tuple(int(v) for v in s) for s in rows]
        views, layout_geoms, _ = self.size_layout(sizes, batch_num_images=batch_num_images, vision_aspect_ratio=aspect)
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([pv[:v] for pv, v in zip(pixel_values, views)], dim=0)
        elif pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must have 4 or 5 dimensions, got shape {tuple(pixel_values.shape)}")
        if pixel_values.shape[0] != sum(views):
            raise ValueError(f"pixel_values hold {pixel_values.shape[0]} views but image_sizes imply {sum(views)}")

        attn = self.last_attention()
        received = self.importance_mode() == "attention_received"
        with QKCapture(attn, all_queries=received) as cap:
            out = self.inner.vision_tower(pixel_values, output_hidden_states=layer, return_dict=True)
        if isinstance(layer, int):
            hidden = out.hidden_states[layer]
        else:
            hidden = torch.cat([out.hidden_states[i] for i in layer], dim=-1)
        feats = self.inner.multi_modal_projector(hidden)  # (V, N, D): "full", no [CLS] to drop
        if received:  # the ablation: attention each patch receives at the last layer
            if cap.queries is None or cap.keys is None:  # pragma: no cover - defensive
                raise RuntimeError("the vision tower's last attention layer did not run")
            importance = importance_ops.attention_received(
                cap.queries.detach(), cap.keys.detach(), attn.num_heads, attn.scale
            ).to(feats.device)  # (V, N)
        else:  # the default: -cos to the view's mean, on what the projector receives
            importance = importance_ops.feature_similarity(hidden).to(feats.device)  # (V, N)

        side = self.side
        n = side * side
        if feats.shape[1] != n:
            raise ValueError(f"the vision tower gives {feats.shape[1]} tokens per view, expected {n} ({side} x {side})")
        features = list(torch.split(feats, views, dim=0))
        imps = list(torch.split(importance, views, dim=0))
        geoms: list[CropGeometry | None] = list(layout_geoms)
        counts: list[int] = []
        for i, geom in enumerate(geoms):
            if geom is None:
                counts.append(n + 1)
                continue
            if isinstance(geom, resized.ResizedCropGeometry):
                features[i], imps[i] = _resize_views(features[i], imps[i], geom)
            counts.append(geom.vanilla_num_tokens())
        return EncodedImages(features=features, importance=imps, geometries=geoms, image_sizes=sizes, vanilla_counts=counts)

    def size_layout(
        self, image_sizes: Any, batch_num_images: Any = None, vision_aspect_ratio: str | None = None, **options: Any
    ) -> tuple[list[int], list[Any], int]:
        """Views and geometry per image size: the AnyRes crops only for the image of a one-image
        prompt (HF's rule, ``batch_num_images``), a resized geometry where ``anyres_max_K`` shrinks
        the crop map."""
        side = self.side
        max_views = resized.parse_anyres_max(vision_aspect_ratio or self.hf_config.vision_aspect_ratio)
        sizes = [(int(hw[0]), int(hw[1])) for hw in image_sizes]
        patching = self._patching(batch_num_images, len(sizes))
        views, geoms = [], []
        for s, p in zip(sizes, patching):
            v = self.num_views(s) if p else 1
            views.append(v)
            if v == 1:
                geoms.append(None)
                continue
            grid = self.grid_shape(s)
            if grid[0] * grid[1] != v - 1:
                raise ValueError(f"image of size {s} has {v - 1} crops but a {grid[0]}x{grid[1]} grid")
            geoms.append(resized.anyres_geometry(s, grid, side, max_views))
        return views, geoms, side * side

    def image_newline(self) -> torch.Tensor:
        """The (D,) image-newline embedding (also when accelerate offloads it; see LLaVA-NeXT's)."""
        from .llava_next import LlavaNextFamily

        return LlavaNextFamily.image_newline(self)  # type: ignore[arg-type]

    def vanilla_pack(self, encoded: EncodedImages) -> list[torch.Tensor]:
        """The vanilla model's sequence of every encoded image (keep-all in the ``spatial`` layout,
        which is HF's ``pack_image_features`` token for token, resized maps included)."""
        from .. import methods

        cfg = methods.make_config("globalcom2")
        keep = type(methods.vision_config(cfg)).keep_all(layout="spatial")
        newline = self.image_newline()
        return [
            methods.compress_image(f, imp, g, newline, keep)[0]
            for f, imp, g in zip(encoded.features, encoded.importance, encoded.geometries)
        ]

    # -- for the tools --------------------------------------------------------------------------
    #: The tiny test model (globalcom2.tiny): the llava-hf processor settings (384 px views, the 36
    #: pinpoints, ``anyres_max_9``; the PIL image processor, no torchvision needed), a SigLIP
    #: tower and a Qwen2 language model of a few dozen wide.
    tiny = TinyGeometry(
        special_tokens={"image_token": "<image>", "video_token": "<video>"},
        processor="LlavaOnevisionProcessor",
        processor_kwargs={
            "num_image_tokens": (VIEW_SIZE // PATCH_SIZE) ** 2,
            "vision_feature_select_strategy": "full",
            "vision_aspect_ratio": VISION_ASPECT_RATIO,
        },
        image_processor="LlavaOnevisionImageProcessorPil",
        image_processor_kwargs={"size": {"height": VIEW_SIZE, "width": VIEW_SIZE}, "image_grid_pinpoints": ONEVISION_PINPOINTS},
        video_processor="LlavaOnevisionVideoProcessor",
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vision_use_head=False),
        text=dict(
            hidden_size=64, intermediate_size=128,
            num_hidden_layers=4,  # deep enough for FastV at its default layer K=2
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
        ),
        hub_tower_names=True,
    )

    @classmethod
    def tiny_config(cls, tokenizer: Any, vision: dict[str, Any], text: dict[str, Any], **options: Any) -> Any:
        """A ``LlavaOnevisionConfig`` with the llava-hf geometry (SigLIP 384/14, the 36 pinpoints,
        ``anyres_max_9``, every token of the last layer): a SigLIP tower of ``vision`` and a Qwen2
        language model of ``text``."""
        from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

        return LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(image_size=VIEW_SIZE, patch_size=PATCH_SIZE, **vision),
            text_config=Qwen2Config(**text),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
            image_grid_pinpoints=ONEVISION_PINPOINTS,
            vision_aspect_ratio=VISION_ASPECT_RATIO,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            **options,
        )

    @classmethod
    def max_visual_tokens(cls, config: Any) -> int:
        """The most visual tokens one image can have, without newlines: the base view's N plus
        the most any unpadded crop area of any ``image_grid_pinpoints`` grid keeps after
        ``anyres_max_K`` resizing (every unpadded height or width from 1 to the grid's is tried:
        an upper bound, reached up to the unpadding's rounding). 729 + 7,938 = 8,667 for the
        llava-hf checkpoints (a 3 x 4 grid unpadded to 81 x 98, just under the resize threshold)."""
        vision = _get(config, "vision_config")
        size, patch = _get(vision, "image_size"), _get(vision, "patch_size")
        pinpoints = _get(config, "image_grid_pinpoints") or ONEVISION_PINPOINTS
        aspect = _get(config, "vision_aspect_ratio", VISION_ASPECT_RATIO) or VISION_ASPECT_RATIO
        if not (isinstance(size, int) and isinstance(patch, int)):
            raise ValueError("the config has no vision_config.image_size/patch_size")
        from ..core.resized import RESIZE_THRESHOLD, parse_anyres_max

        k = parse_anyres_max(aspect)
        side = size // patch
        best = 0
        for ph, pw in pinpoints:
            height, width = (int(ph) // size) * side, (int(pw) // size) * side
            extents = [(h, width) for h in range(1, height + 1)] + [(height, w) for w in range(1, width + 1)]
            for h, w in extents:
                ratio = math.sqrt(h * w / (k * side * side))
                best = max(best, int(h // ratio) * int(w // ratio) if ratio > RESIZE_THRESHOLD else h * w)
        return side * side + best

    @classmethod
    def default_max_visual_tokens(cls) -> int:
        """:meth:`max_visual_tokens` of the llava-hf OneVision checkpoints' geometry."""
        return cls.max_visual_tokens(
            {
                "vision_config": {"image_size": VIEW_SIZE, "patch_size": PATCH_SIZE},
                "image_grid_pinpoints": ONEVISION_PINPOINTS,
                "vision_aspect_ratio": VISION_ASPECT_RATIO,
            }
        )

    @classmethod
    def picture_views(cls, image: Any, geom: CropGeometry | None, view: int) -> tuple[Any, Any, Any]:
        """The OV canvas as the processor builds it: the base image is the whole image squeezed to
        one view (an image of a multi-image prompt, seen as one view, is first padded to a square
        with the mean colour); the crops cover the image resized (aspect kept) into the best
        resolution, centred on a zero-padded canvas. For a resized (anyres_max) crop map the
        plans' crop masks are at pseudo positions (see :mod:`globalcom2.core.resized`).

        SigLIP's 14 px patches cover only the first 27 x 14 = 378 of a view's 384 pixels (its
        patch convolution drops the rest), so every view is returned as the 378 px the tokens
        cover: the thumbnail (378, 378, 3), the canvas (gh 378, gw 378, 3) stitched from the
        crops' covered parts; ``lay`` stays in the processor's pixels (384 px views)."""
        import numpy as np
        from PIL import Image

        from .._io import to_rgb
        from .llava_next import canvas_layout

        image = to_rgb(image)
        if geom is None:
            side = max(image.width, image.height)
            mean = tuple(int(x * 255) for x in (0.48145466, 0.4578275, 0.40821073))  # OPENAI_CLIP_MEAN
            square = Image.new("RGB", (side, side), mean)
            square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
            return _covered(np.asarray(square.resize((view, view), Image.Resampling.BICUBIC)), 1, 1, view), None, None
        thumb = _covered(np.asarray(image.resize((view, view), Image.Resampling.BICUBIC)), 1, 1, view)
        lay = canvas_layout((image.height, image.width), (geom.grid_h, geom.grid_w), view)
        canvas = np.zeros((lay["height"], lay["width"], 3), np.uint8)
        small = image.resize((lay["new_width"], lay["new_height"]), Image.Resampling.BICUBIC)
        canvas[lay["top"] : lay["top"] + lay["new_height"], lay["left"] : lay["left"] + lay["new_width"]] = np.asarray(small)
        return thumb, _covered(canvas, geom.grid_h, geom.grid_w, view), lay


def _covered(pixels: Any, grid_h: int, grid_w: int, view: int) -> Any:
    """The pixels of a (grid_h view, grid_w view, 3) canvas that the patches cover: each view's
    first ``(view // PATCH_SIZE) * PATCH_SIZE`` rows and columns, stitched."""
    seen = (view // PATCH_SIZE) * PATCH_SIZE
    if seen == view:
        return pixels
    blocks = pixels.reshape(grid_h, view, grid_w, view, pixels.shape[-1])[:, :seen, :, :seen]
    return blocks.reshape(grid_h * seen, grid_w * seen, pixels.shape[-1])


def _resize_views(
    feats: torch.Tensor, imp: torch.Tensor, geom: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize one image's crop features and local importance as HF's ``pack_image_features`` does,
    and write them at the pseudo positions of the crop rows (thumbnail row unchanged).

    Args:
        feats: (V, N, D) projected features, thumbnail first. imp: (V, N) importance.
        geom: the image's :class:`~globalcom2.core.resized.ResizedCropGeometry`.
    """
    gh, gw, s = geom.grid_h, geom.grid_w, geom.side
    d = feats.shape[-1]
    # The same ops, in the same order, as HF (so that keep-all is the vanilla sequence bit for bit).
    grid = feats[1:].view(gh, gw, s, s, d).permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)  # (D, H, W)
    grid = grid[:, geom.src_row0 : geom.src_row1, geom.src_col0 : geom.src_col1]  # unpadded (D, h, w)
    size = (geom.row1, geom.col1)
    crop_feats = resized.to_crop_rows(resized.resize_map(grid, size), geom).permute(1, 2, 0)  # (C, N, D)
    local = resized.unpadded_map(imp[1:], geom)  # (h, w)
    crop_imp = resized.to_crop_rows(resized.resize_map(local[None].to(importance_ops.SCORE_DTYPE), size)[0], geom)  # (C, N)
    return torch.cat([feats[:1], crop_feats]), torch.cat([imp[:1].to(crop_imp.dtype), crop_imp])
