"""GlobalCom2 for Hugging Face InternVL 2.5 / 3 / 3.5 (``InternVLForConditionalGeneration``,
``InternVLModel``; the ``OpenGVLab/InternVL3-*-hf`` checkpoints and later ``-hf`` ones).

What the model does (read from ``transformers`` 5.x ``modeling_internvl`` / ``processing_internvl``
and the GotOcr2 image processor it uses):

* The processor cuts an image into ``rows x cols`` tiles of 448 x 448 (``crop_to_patches``; the
  grid is ``get_optimal_tiled_canvas`` of the image size, at most ``max_patches`` tiles) and, when
  there is more than one tile, appends the whole image squeezed to 448 x 448: **the thumbnail comes
  last**. No padding: every tile token is image. The text gets ``<img>`` + ``256 * V``
  ``<IMG_CONTEXT>`` + ``</img>`` per image (V views); only the context tokens are image tokens.
* InternViT 448/14 gives 32 x 32 patches + [CLS] per view; the features of the last layer (without
  [CLS]) are pixel-shuffled (0.5: each 2 x 2 block of patches folds into one token, S = 16,
  N = 256) and projected. No newline tokens.

How GlobalCom2 maps onto it (``SPEC.md``, "Other families" -> InternVL):

* :meth:`InternVLFamily.encode` runs the model's own ``get_image_features`` (so keep-all is the
  vanilla sequence bit for bit) with two forward hooks on the last attention layer's ``q_norm`` and
  ``k_norm`` (``nn.Identity`` without qk normalisation): the [CLS] logits use q/k exactly as the
  model normalises them, and only the [CLS] row is computed (the tower keeps SDPA/flash, no
  ``output_attentions``). The 32 x 32 logits go onto the 16 x 16 token grid by pushing an index map
  through the model's own ``pixel_shuffle`` (which transposes height and width): a token's
  importance is the mean of its 4 patches' logits.
* Each image's views are reordered **thumbnail first** with a no-padding
  :class:`~globalcom2.core.geometry.CropGeometry` (``row0 = 0, row1 = H, col0 = 0, col1 = W``):
  every method then runs unchanged on (thumbnail, tiles). :meth:`InternVLFamily.compress` maps the
  result back to the model's order with :func:`globalcom2.core.tiles.tiles_then_thumbnail_index`:
  tiles in order, each its kept tokens in raster order, then the thumbnail's kept tokens in raster
  order, no newline. The plans keep their thumbnail-first masks (``kept_masks()``); their ``index``
  addresses the thumbnail-first table ``[thumbnail (N), tiles (C * N)]``.
* A single-tile image has no thumbnail: it is compressed as one view by importance (Step 1).
* ``pooling`` pools every view on its own to ``t x t`` (``t = round(16 sqrt(R))``; 8 x 8 at
  R = 0.25), tiles then thumbnail, no newline (:func:`globalcom2.core.tiles.pool_tiled_views`): a
  tile is a sequence of its own in InternVL, so a pooled tile is the natural lower-resolution unit
  (its plan reports ``crop_hw = (rows * t, cols * t)``).
* The tile grid. The model never receives the image size (the processor keeps ``num_patches`` to
  itself), so: the number of views of each image comes from its run of ``<IMG_CONTEXT>`` tokens in
  ``input_ids`` (256 per view; or ``num_patches=[...]`` given to ``forward`` / ``generate``); the
  grid comes from ``image_sizes=[(h, w), ...]`` when given, with the processor's own rule
  (``get_optimal_tiled_canvas`` restricted to grids of that many tiles, which picks the same grid),
  else from the pixels (:func:`globalcom2.core.tiles.infer_tile_grid`: the arrangement of the tiles
  whose mosaic matches the thumbnail; one host sync per multi-tile image).
* Layout: ``spatial`` only (the model's order with the dropped tokens removed); ``official`` raises
  a ``ValueError`` naming the family (there is no published InternVL code to be official to).
* Importance option (where the methods have ``importance``): ``"auto"`` / ``"cls"`` are the [CLS]
  logits above (InternViT has [CLS]); ``"similarity"`` (an ablation here) is ``-cos`` of each
  folded token's features (the projector's input) to the view's mean; ``"attention_received"``
  (an ablation here) is the attention each patch receives from the other patches, folded 2 x 2
  the same way.
* For tools: :meth:`InternVLFamily.view_geometry` is (448, 16) (the config's ``image_size`` /
  ``patch_size`` are pairs and count patches before the pixel shuffle), and
  :meth:`InternVLFamily.vanilla_plan` gives the vanilla sequence as a plan (no newlines, the
  thumbnail last), which a picture tracing FastV's kept tokens back to views needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import methods as _methods
from .._lazy import lazy_module
from .base import Family, TinyGeometry, register_family
from .capture import QKCapture
from .checks import check_image_sizes
from .images import EncodedImages
from .tiled import GlobalLastViews, max_tiled_tokens

if TYPE_CHECKING:  # pragma: no cover
    from ..core.geometry import CropGeometry

# Imported when the family runs: the registry (and ``globalcom2 --help``) must not load torch.
torch = lazy_module("torch")
tiles = lazy_module("globalcom2.core.tiles")

#: The processor's default most tiles per image (InternVL3 ``-hf`` processor configs: 12).
DEFAULT_MAX_PATCHES = 12
#: InternViT's view side and patch size in pixels, and the pixel-shuffle ratio.
VIEW_SIZE, PATCH_SIZE, DOWNSAMPLE_RATIO = 448, 14, 0.5
#: Most tiles per image of the tiny processor (the checkpoints use 12; fewer keeps CPU tests quick).
TINY_MAX_PATCHES = 6


def _tiled_canvas() -> Any:
    """The processor's own ``get_optimal_tiled_canvas`` (GOT-OCR2's tiling, which InternVL uses)."""
    try:
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas
    except ImportError:  # pragma: no cover - an older transformers
        from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas
    return get_optimal_tiled_canvas


def _pair(value: Any) -> int:
    """``image_size`` / ``patch_size`` may be an int or a (h, w) pair: its first side."""
    return int(value[0]) if isinstance(value, (list, tuple)) else int(value)


def _get(obj: Any, key: str, default: Any = None) -> Any:
    return obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)


@register_family
class InternVLFamily(GlobalLastViews, Family):
    """InternVL 2.5 / 3 / 3.5 (``transformers`` ``InternVLForConditionalGeneration`` /
    ``InternVLModel``): InternViT with [CLS], pixel shuffle to 16 x 16 tokens per view, tiles row by
    row then the thumbnail, no padding, no newline; ``spatial`` layout only (see the module's
    docstring for every decision)."""

    model_type = "internvl"
    display_name = "InternVL"
    example_checkpoint = "OpenGVLab/InternVL3-1B-hf"
    model_names = ("InternVLForConditionalGeneration", "InternVLModel")
    layouts = ("spatial",)
    image_inputs = ("image_sizes", "num_patches", "vision_feature_layer", "vision_feature_select_strategy")
    attention_attributes = ("q_proj", "k_proj", "q_norm", "k_norm", "num_heads", "scale")
    tower_kind = "an InternViT-like"
    #: Language models of the public InternVL3 ``-hf`` checkpoints (Qwen2.5 text configs, as their
    #: config.json files give them; written from the published Qwen2.5 / InternVL3 configs, not read
    #: at run time), as :class:`globalcom2.efficiency.LMArch` fields: name, layers, hidden, heads,
    #: kv heads, head dim, intermediate, vocab. Their vision side: 448 px tiles, 12 tiles at most
    #: plus the thumbnail, 256 tokens per view.
    language_models = {
        "OpenGVLab/InternVL3-1B-hf": ("qwen2.5-0.5b", 24, 896, 14, 2, 64, 4864, 151674),
        "OpenGVLab/InternVL3-2B-hf": ("qwen2.5-1.5b", 28, 1536, 12, 2, 128, 8960, 151674),
        "OpenGVLab/InternVL3-8B-hf": ("qwen2.5-7b", 28, 3584, 28, 4, 128, 18944, 151674),
        "OpenGVLab/InternVL3-14B-hf": ("qwen2.5-14b", 48, 5120, 40, 8, 128, 13824, 151674),
        "OpenGVLab/InternVL3-38B-hf": ("qwen2.5-32b", 64, 5120, 40, 8, 128, 27648, 151674),
        "OpenGVLab/InternVL3-78B-hf": ("qwen2.5-72b", 80, 8192, 64, 8, 128, 29568, 151674),
    }
    default_text_model_type = "qwen2"

    @classmethod
    def hf_classes(cls) -> tuple[type, ...]:
        from transformers import InternVLForConditionalGeneration, InternVLModel

        return (InternVLForConditionalGeneration, InternVLModel)

    # -- geometry -------------------------------------------------------------------------------
    @property
    def side(self) -> int:
        """S, tokens per view side after the pixel shuffle (16 for InternViT 448/14 at 0.5)."""
        vc = self.hf_config.vision_config
        return int(round(_pair(vc.image_size) // _pair(vc.patch_size) * float(self.hf_config.downsample_ratio)))

    def vanilla_plan(self, encoded: EncodedImages, index: int = 0) -> Any:
        """The vanilla sequence of image ``index`` as a plan (every token kept, the model's order):
        what a tool tracing the language model's image tokens back to views needs (FastV pictures)."""
        return self.compress(encoded, _methods.GlobalCom2Config.keep_all(layout="spatial")).plans[index]

    def check_vision(self) -> None:
        cfg = self.hf_config
        if cfg.vision_feature_select_strategy != "default":
            raise ValueError(
                "GlobalCom2 on InternVL needs vision_feature_select_strategy='default' (features without [CLS]); "
                f"this model uses {cfg.vision_feature_select_strategy!r}"
            )
        vc = cfg.vision_config
        patches = _pair(vc.image_size) // _pair(vc.patch_size)
        fold = round(1 / float(cfg.downsample_ratio))
        if patches % fold or abs(fold * float(cfg.downsample_ratio) - 1) > 1e-9:
            raise ValueError(f"InternVL's pixel shuffle must fold {patches} patches evenly; downsample_ratio={cfg.downsample_ratio}")
        self.last_attention()
        if self._importance_kind() == "attention_received":
            try:
                from ..core import importance  # noqa: F401
            except ImportError as exc:
                raise ValueError("importance='attention_received' is not available in this version") from exc

    def _importance_kind(self) -> str:
        """The vision method's ``importance`` option where it has one: ``"auto"`` / ``"cls"`` (the
        [CLS] logits, InternViT has [CLS]), or the ablations ``"similarity"`` (on the projector's
        input: the folded tokens) and ``"attention_received"``."""
        return str(getattr(self.vision_config, "importance", "auto") or "auto")

    def _shuffle_index(self, device: Any) -> torch.Tensor:
        """(N, k) long: the patches (raster index in the P x P grid) folded into each token, found by
        pushing an index map through the model's own ``pixel_shuffle``."""
        vc = self.hf_config.vision_config
        p = _pair(vc.image_size) // _pair(vc.patch_size)
        grid = torch.arange(p * p, dtype=torch.float64).reshape(1, p, p, 1)
        folded = self.inner.pixel_shuffle(grid, scale_factor=self.hf_config.downsample_ratio)  # (1, S, S, k)
        return folded.reshape(-1, folded.shape[-1]).round().long().to(device)

    def token_importance(self, patch_logits: torch.Tensor) -> torch.Tensor:
        """(V, P*P) [CLS] logits of the patches -> (V, N) importance of the pixel-shuffled tokens
        (the mean of the logits of the patches folded into each)."""
        idx = self._shuffle_index(patch_logits.device)  # (N, k)
        return patch_logits[:, idx].mean(dim=-1)

    def processor_grid(self, image_hw: tuple[int, int], num_tiles: int) -> tuple[int, int]:
        """(rows, cols) the processor chose for an image of this size cut into ``num_tiles`` tiles:
        its own ``get_optimal_tiled_canvas`` over the grids of exactly that many tiles (the grid it
        chose among all grids up to ``max_patches`` is also the best of those)."""
        size = self.view_size
        cols, rows = _tiled_canvas()((int(image_hw[0]), int(image_hw[1])), (size, size), num_tiles, num_tiles)
        return int(rows), int(cols)

    def _grid(self, views: torch.Tensor, image_hw: tuple[int, int] | None) -> tuple[int, int]:
        """(rows, cols) of an image's tiles; ``views`` (V, 3, h, w) in the model's order."""
        n = views.shape[0] - 1
        if image_hw is not None:
            grid = self.processor_grid(image_hw, n)
            if grid[0] * grid[1] != n:
                raise ValueError(f"an image of size {tuple(image_hw)} has {n} tiles, not a {grid[0]}x{grid[1]} grid")
            return grid
        return tiles.infer_tile_grid(views[:-1], views[-1], tiles.factor_grids(n))

    def _views_per_image(self, input_ids: torch.Tensor) -> list[int]:
        runs = tiles.runs_per_image(input_ids, self.image_token_id)
        if self.processor_patch is not None:  # the processor wrote compressed counts: views from them
            views = [self._views_of_count(r) for r in runs]
            if all(v is not None for v in views):
                return [int(v) for v in views]
        n = self.tokens_per_view
        bad = [r for r in runs if r % n]
        if bad:
            raise ValueError(
                f"an image's run of {bad[0]} image tokens is not a multiple of {n} tokens per view; prepare inputs "
                "with the model's own processor (<img> + 256 <IMG_CONTEXT> per view + </img>)"
            )
        return [r // n for r in runs]

    def _with_views(self, inputs: dict[str, Any]) -> dict[str, Any]:
        if inputs.get("num_patches") is None and inputs.get("input_ids") is not None:
            inputs = dict(inputs)
            inputs["num_patches"] = self._views_per_image(inputs["input_ids"])
        return inputs

    def view_grid(self, inputs: Any, index: int = 0) -> tuple[int, int] | None:
        inputs = self._with_views(dict(inputs))
        views = [int(v) for v in inputs["num_patches"]]
        if views[index] == 1:
            return None
        start = sum(views[:index])
        sizes = inputs.get("image_sizes")
        hw = tuple(int(v) for v in sizes[index]) if sizes is not None else None
        return self._grid(inputs["pixel_values"][start : start + views[index]], hw)

    # -- vision side ----------------------------------------------------------------------------
    def encode_inputs(self, inputs: Any) -> EncodedImages:
        """:meth:`encode` a processor's output (the views per image come from its ``input_ids``)."""
        inputs = self._with_views(dict(inputs))
        return self.encode(inputs["pixel_values"], **{k: inputs[k] for k in self.image_inputs if k in inputs})

    def encode(
        self,
        pixel_values: torch.Tensor,
        image_sizes: Any = None,
        num_patches: Any = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
    ) -> EncodedImages:
        """Run the model's ``get_image_features``, capturing the last layer's [CLS] logits.

        Args:
            pixel_values: (sum V_i, 3, 448, 448) as the processor writes them (per image: its tiles
                row by row, then the thumbnail when V_i > 1).
            image_sizes: optional (I, 2) original (height, width) of each image: the tile grid then
                follows the processor's rule; without it the grid is read from the pixels.
            num_patches: views per image (:meth:`prepare_inputs` and :meth:`encode_inputs` count
                them in ``input_ids``).

        Returns:
            :class:`EncodedImages` with per-image features (V_i, 256, D) and importance (V_i, 256),
            **thumbnail first**, and a no-padding geometry (None for a single tile). ``image_sizes``
            holds the given sizes, else the tile canvas (rows * 448, cols * 448).
        """
        if num_patches is None:
            raise ValueError(
                "InternVL needs the number of views of each image: call the model with input_ids (the processor's "
                "<IMG_CONTEXT> runs give it) or pass num_patches=[...]"
            )
        views = [int(v) for v in (num_patches.tolist() if torch.is_tensor(num_patches) else num_patches)]
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must have shape (views, 3, h, w), got {tuple(pixel_values.shape)}")
        if pixel_values.shape[0] != sum(views):
            raise ValueError(f"pixel_values hold {pixel_values.shape[0]} views but the prompts' images need {sum(views)}")
        sizes_in = None
        if image_sizes is not None:
            rows = image_sizes.tolist() if torch.is_tensor(image_sizes) else image_sizes  # the one read of the sizes
            check_image_sizes(rows)
            sizes_in = [tuple(int(v) for v in s) for s in rows]
            if len(sizes_in) != len(views):
                raise ValueError(f"image_sizes has {len(sizes_in)} entries for {len(views)} images")
        cfg = self.hf_config
        layer = cfg.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = cfg.vision_feature_select_strategy if vision_feature_select_strategy is None else vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(f"GlobalCom2 needs vision_feature_select_strategy='default', got {strategy!r}")

        attn = self.last_attention()
        kind = self._importance_kind()
        received = kind == "attention_received"
        projector = self.inner.multi_modal_projector if kind == "similarity" else None
        with QKCapture(attn, all_queries=received, q_module="q_norm", k_module="k_norm", inputs_of=projector) as cap:
            out = self.inner.get_image_features(
                pixel_values=pixel_values, vision_feature_layer=layer, vision_feature_select_strategy=strategy, return_dict=True
            )
        feats = out.pooler_output  # (sum V, N, D), the model's own features
        if cap.q_cls is None or cap.keys is None:  # pragma: no cover - defensive
            raise RuntimeError("the vision tower's last attention layer did not run")
        from ..core import importance as importance_ops

        if kind == "similarity":  # an ablation here: -cos to the view's mean, on the projector's input
            if cap.inputs is None:  # pragma: no cover - defensive
                raise RuntimeError("the projector did not run")
            importance = importance_ops.feature_similarity(cap.inputs).to(feats.device)  # (V, N): tokens already folded
        else:
            if received:  # an ablation here: attention received over the patches ([CLS] row and column left out)
                patch_scores = importance_ops.attention_received(
                    cap.queries.detach()[:, 1:], cap.keys.detach()[:, 1:], attn.num_heads, attn.scale
                )  # (V, P*P)
            else:
                patch_scores = importance_ops.cls_attention_logits(cap.q_cls.detach(), cap.keys.detach(), attn.num_heads, attn.scale)
            importance = self.token_importance(patch_scores).to(feats.device)  # (V, N)

        side, view = self.side, self.view_size
        features, importances, geoms, sizes = [], [], [], []
        pv_split = torch.split(pixel_values, views, dim=0)
        for i, (f, imp, pv) in enumerate(zip(torch.split(feats, views), torch.split(importance, views), pv_split)):
            hw = sizes_in[i] if sizes_in is not None else None
            if f.shape[0] == 1:
                geoms.append(None)
                sizes.append(hw or (view, view))
            else:
                grid = self._grid(pv, hw)
                geoms.append(tiles.full_geometry(grid, side))
                sizes.append(hw or (grid[0] * view, grid[1] * view))
            features.append(tiles.thumbnail_first(f))
            importances.append(tiles.thumbnail_first(imp))
        return EncodedImages(
            features=features,
            importance=importances,
            geometries=geoms,
            image_sizes=sizes,
            vanilla_counts=[v * side * side for v in views],
        )

    def size_layout(self, image_sizes: Any, processor: Any = None, **options: Any) -> tuple[list[int], list[Any], int]:
        """Views (tiles, plus the thumbnail when there is more than one tile) and geometry per image
        size, by the processor's tiling rule (``crop_to_patches``, ``min_patches``, ``max_patches``
        of ``processor``'s image processor; without one, InternVL's published settings: 1 to 12)."""
        get_optimal_tiled_canvas = _tiled_canvas()
        ip = getattr(processor, "image_processor", processor)
        crop = bool(getattr(ip, "crop_to_patches", True))
        lo, hi = int(getattr(ip, "min_patches", 1)), int(getattr(ip, "max_patches", 12))
        size, side = self.view_size, self.side
        views, geoms = [], []
        for hw in image_sizes:
            cols, rows = get_optimal_tiled_canvas((int(hw[0]), int(hw[1])), (size, size), lo, hi) if crop and hi > 1 else (1, 1)
            if rows * cols <= 1:
                views.append(1)
                geoms.append(None)
            else:
                views.append(1 + rows * cols)
                geoms.append(tiles.full_geometry((int(rows), int(cols)), side))
        return views, geoms, side * side

    def processed_layout(self, image_inputs: Any, processor: Any) -> tuple[list[int], list[Any], int]:
        """Views per image from the processor's own ``num_patches`` (its output has no image sizes).
        The tiles' arrangement does not change a count (every tile is full), so a 1 x (V - 1) grid
        stands for it."""
        views = image_inputs["num_patches"]
        views = [int(v) for v in (views.tolist() if hasattr(views, "tolist") else views)]
        side = self.side
        geoms = [None if v == 1 else tiles.full_geometry((1, v - 1), side) for v in views]
        return views, geoms, side * side

    def _views_of_count(self, run: int) -> int | None:
        """The views of an image whose prompt holds ``run`` compressed placeholders (what a patched
        processor wrote): the one view count whose compressed count is ``run`` (None if none is)."""
        ip = getattr(self.processor_patch.processor, "image_processor", None)
        most = 1 + int(getattr(ip, "max_patches", 12))
        cache = self.__dict__.setdefault("_count_views", {})
        key = (self.vision_config, most)
        if key not in cache:
            side = self.side
            views = list(range(1, most + 1))
            geoms = [None if v == 1 else tiles.full_geometry((1, v - 1), side) for v in views]
            counts = self._count_layout(views, geoms, side * side, self.vision_config)
            found: dict[int, list[int]] = {}
            for v, c in zip(views, counts):
                found.setdefault(c, []).append(v)
            cache[key] = found
        matches = cache[key].get(int(run), [])
        if len(matches) > 1:
            raise ValueError(
                f"an image run of {run} compressed placeholders fits {matches} views at this retention ratio; "
                "pass num_patches=[...] with the call"
            )
        return matches[0] if matches else None

    @classmethod
    def placeholder_text(cls, processor: Any, count: int) -> str:
        """``<img>`` + ``<IMG_CONTEXT>`` x count + ``</img>``, as the processor writes an image."""
        return f"{processor.start_image_token}{processor.image_token * int(count)}{processor.end_image_token}"

    # -- language side --------------------------------------------------------------------------
    def prepare_inputs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """As :meth:`Family.prepare_inputs`, with the views per image counted in ``input_ids`` and
        the compressed features handed over as the one (1, L, D) tensor InternVL's forward scatters."""
        if kwargs.get("pixel_values") is not None:  # precomputed image embeddings need no view counts
            kwargs = self._with_views(dict(kwargs))
        out = super().prepare_inputs(kwargs)
        image = out["mm_encoder_outputs"]["image"]
        tokens = image.pooler_output
        if isinstance(tokens, (list, tuple)):
            image.pooler_output = torch.cat(list(tokens), dim=0)[None]
        return out

    # -- for the tools --------------------------------------------------------------------------
    #: The tiny test model (globalcom2.tiny): InternVL's processor (GotOcr2 PIL image processor, 448 px
    #: tiles, ``crop_to_patches``, at most :data:`TINY_MAX_PATCHES` tiles), InternViT 448/14 with
    #: [CLS] and qk normalisation, pixel shuffle 0.5, a Qwen2 language model of a few dozen wide.
    #: The tokenizer's ``start_image_token`` / ``end_image_token`` / ``context_image_token`` /
    #: ``video_token`` are the attributes InternVL's processor reads.
    tiny = TinyGeometry(
        special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
        processor="InternVLProcessor",
        processor_kwargs={"image_seq_length": 256},
        image_processor="GotOcr2ImageProcessorPil",
        image_processor_kwargs={
            "size": {"height": VIEW_SIZE, "width": VIEW_SIZE}, "crop_to_patches": True, "min_patches": 1,
            "max_patches": TINY_MAX_PATCHES,
        },
        video_processor="InternVLVideoProcessor",
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        text=dict(
            hidden_size=64, intermediate_size=128,
            num_hidden_layers=4,  # deep enough for FastV at its default layer K=2
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
        ),
    )

    @classmethod
    def tiny_config(
        cls, tokenizer: Any, vision: dict[str, Any], text: dict[str, Any], use_qk_norm: bool = True, **options: Any
    ) -> Any:
        """An ``InternVLConfig`` with the checkpoints' geometry (InternViT 448/14: 32 x 32 patches +
        [CLS], pixel shuffle 0.5, 256 tokens per view): a tower of ``vision`` and a Qwen2 language
        model of ``text``. ``use_qk_norm``: whether InternViT normalises q/k (InternViT-6B does;
        -300M does not)."""
        from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config

        return InternVLConfig(
            vision_config=InternVLVisionConfig(
                image_size=VIEW_SIZE, patch_size=PATCH_SIZE, use_qk_norm=use_qk_norm,
                norm_type="rms_norm" if use_qk_norm else "layer_norm", **vision,
            ),
            text_config=Qwen2Config(**text),
            image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
            image_seq_length=256,
            downsample_ratio=DOWNSAMPLE_RATIO,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            **options,
        )

    @classmethod
    def tiny_init(cls, model: Any) -> None:
        """Random (not unit) q/k norm weights, so that a missed q/k normalisation shows."""
        for module in model.model.vision_tower.modules():
            for name in ("q_norm", "k_norm"):
                norm = getattr(module, name, None)
                if norm is not None and hasattr(norm, "weight"):
                    torch.nn.init.uniform_(norm.weight, 0.5, 1.5)

    @classmethod
    def max_visual_tokens(cls, config: Any) -> int:
        """(max_patches tiles + the thumbnail) x tokens per view: 13 x 256 = 3,328 for the InternVL3
        ``-hf`` checkpoints. ``max_patches`` is a processor setting: read from the config (or its
        dict) when it has one, else the checkpoints' 12."""
        ratio = float(_get(config, "downsample_ratio", DOWNSAMPLE_RATIO) or DOWNSAMPLE_RATIO)
        return max_tiled_tokens(config, ratio, int(_get(config, "max_patches", DEFAULT_MAX_PATCHES) or DEFAULT_MAX_PATCHES))

    @classmethod
    def default_max_visual_tokens(cls) -> int:
        """:meth:`max_visual_tokens` of the InternVL3 ``-hf`` checkpoints (3,328)."""
        return cls.max_visual_tokens({"vision_config": {"image_size": VIEW_SIZE, "patch_size": PATCH_SIZE}})

    @classmethod
    def picture_views(cls, image: Any, geom: CropGeometry | None, view: int) -> tuple[Any, Any, Any]:
        """As the processor makes the views: the thumbnail is the whole image squeezed to one view;
        the tiles cover the image resized (aspect not kept) to ``(rows * view, cols * view)``, no
        padding (the layout dict has ``top = left = 0`` and the resized size equal to the canvas)."""
        import numpy as np
        from PIL import Image

        from .._io import to_rgb

        image = to_rgb(image)
        thumb = np.asarray(image.resize((view, view), Image.Resampling.BICUBIC))
        if geom is None:
            return thumb, None, None
        h, w = geom.grid_h * view, geom.grid_w * view
        canvas = np.asarray(image.resize((w, h), Image.Resampling.BICUBIC)).copy()
        lay = {"height": h, "width": w, "new_height": h, "new_width": w, "top": 0, "left": 0}
        return thumb, canvas, lay
