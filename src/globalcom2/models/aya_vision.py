"""GlobalCom2 for Hugging Face Aya Vision (``AyaVisionForConditionalGeneration`` / ``AyaVisionModel``:
``CohereLabs/aya-vision-8b``, ``-32b``) and Command A Vision (``Cohere2VisionForConditionalGeneration`` /
``Cohere2VisionModel``: ``CohereLabs/command-a-vision-07-2025``): one module, two model types.

What the models do (read from ``transformers`` 5.x ``modeling_aya_vision`` / ``processing_aya_vision``
with the GotOcr2 image processor, and ``modeling_cohere2_vision`` / ``processing_cohere2_vision`` /
``image_processing_cohere2_vision``):

* The image processor cuts an image into ``rows x cols`` tiles of one view (364 px for Aya Vision,
  512 px for Command A Vision; at most ``max_patches`` = 12 tiles) of the image resized (aspect not
  kept) to ``(rows * view, cols * view)``, row by row, and, when there is more than one tile, appends
  the whole image squeezed to one view: **the thumbnail comes last**. No padding: every tile token
  is image. The grids differ: Aya Vision's is GotOcr2's ``get_optimal_tiled_canvas`` (the closest
  aspect ratio between ``min_patches`` and ``max_patches`` tiles); Command A Vision's image
  processor has its own (:func:`cohere2_tile_grid`: the least upscale that fits, else the least
  downscale; ``min_patches`` is not used) and needs torchvision.
* The vision tower is SigLIP (no [CLS]). Aya Vision feeds its projector the hidden state of
  ``vision_feature_layer`` (-1: the last layer, before ``post_layernorm``; strategy ``"full"``, every
  patch); Command A Vision the tower's ``last_hidden_state``. The projector pixel-shuffles each
  ``d x d`` block of patches into one token (``downsample_factor`` d = 2; its reshape keeps the raster
  order of the blocks): S = (image_size / patch_size) / d tokens per side, 13 x 13 = 169 (Aya Vision,
  364 / 14) and 16 x 16 = 256 (Command A Vision, 512 / 16) per view.
* The prompt holds one placeholder run per view with text between the runs. Aya Vision:
  ``<|START_OF_IMG|>``, then for tile k (1, 2, ...) the text ``TILE_k`` and its run of
  ``<|IMG_PATCH|>``, then ``TILE_GLOBAL`` and the thumbnail's run, then ``<|END_OF_IMG|>`` (one tile:
  ``TILE_GLOBAL`` and its run only). Command A Vision: ``<|START_OF_IMG|>``, then every view's run
  followed by ``<|IMG_LINE_BREAK|>``, then ``<|END_OF_IMG|>``. Only ``<|IMG_PATCH|>``
  (``config.image_token_id``) is an image token; the prompt never tells the tile grid.

How GlobalCom2 maps onto them (``SPEC.md``, "Any further family with a global view"):

* Importance ``"auto"`` = ``"similarity"`` (SigLIP has no [CLS]): ``-cos`` of each *patch* at the
  projector's input (what it receives, before its pixel shuffle) to the view's mean patch; a token's
  importance is the mean over the ``d * d`` patches folded into it, found by pushing an index map
  through the model's own ``multi_modal_projector.pixel_shuffle`` (as Idefics3). ``"attention_received"``
  (an ablation) is the attention each patch receives at the tower's last layer, folded the same way;
  ``"cls"`` raises a ``ValueError``.
* Views go to the methods **thumbnail first** with a no-padding
  :class:`~globalcom2.core.geometry.CropGeometry` of the tile grid; the model's order (tiles row by row,
  then the thumbnail, each its kept tokens in raster order) and the per-view runs are
  :class:`~globalcom2.models.tiled.PerViewRuns`'. One tile only: Step 1 on it.
* Sequence: every view keeps its own run, shortened to its kept count; the tile tags, line breaks and
  image markers stay. With every token kept it is the vanilla sequence.
* The views of each image come from the prompt (one host copy of ``input_ids``). With the processor
  given to ``apply``: one view per tag between the image's start and end markers (a view that kept no
  token is a run of 0). Without (the processor's vanilla prompt, every run non-empty): every maximal
  run of placeholders is a view; Aya Vision's image ends with the run after the token before each
  row's last run (``TILE_GLOBAL``), Command A Vision's starts with the run after the token before
  each row's first run (``<|START_OF_IMG|>``). The tile grid, which no input carries, is read from the pixels
  (:func:`globalcom2.core.tiles.infer_tile_grid`: the arrangement of the tiles whose mosaic matches
  the thumbnail) unless ``image_grids=[(rows, cols), ...]`` is given with the call ((0, 0): one view).
  The grid changes which thumbnail region commands which tile, never a count: every tile is full, so
  the count first path (``count="fixed"``) reads the tiles per image from the processor's
  ``num_patches`` and stands a 1 x C grid for them.
* Layout: ``spatial`` only.
* The tiny test model's processor: Aya Vision's uses the stock PIL GotOcr2 image processor; Command A
  Vision's image processor needs torchvision (not a dependency here), so its tiny processor uses
  :func:`tiny_cohere2_image_processor` (PIL, the same tiling) and :meth:`Cohere2VisionFamily.load`
  falls back to it (with a warning) where torchvision is missing.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Sequence

from .._lazy import lazy_module
from .base import Family, TinyGeometry, register_family
from .capture import QKCapture
from .images import CompressedImages, EncodedImages
from .tiled import PerViewRuns, max_tiled_tokens

if TYPE_CHECKING:  # pragma: no cover
    from ..core.geometry import CropGeometry

torch = lazy_module("torch")
tiles = lazy_module("globalcom2.core.tiles")
sequence = lazy_module("globalcom2.core.sequence")

#: Aya Vision's published geometry: 364 px views, 14 px patches, pixel shuffle 2, 12 tiles at most.
AYA_VIEW, AYA_PATCH, DOWNSAMPLE, MAX_PATCHES = 364, 14, 2, 12
#: Command A Vision's: 512 px views, 16 px patches (pixel shuffle 2, 12 tiles at most, as Aya Vision).
COHERE2_VIEW, COHERE2_PATCH = 512, 16
#: The image markers both processors write (Aya Vision's defaults; Command A Vision's tokenizer's).
START, END, PATCH, LINE_BREAK = "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>"


def _get(obj: Any, key: str, default: Any = None) -> Any:
    return obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)


def _pair(value: Any) -> int:
    return int(value[0]) if isinstance(value, (list, tuple)) else int(value)


def aya_tile_grid(height: int, width: int, tile: int = AYA_VIEW, min_tiles: int = 1, max_tiles: int = MAX_PATCHES) -> tuple[int, int]:
    """(rows, cols) of Aya Vision's tiles: GotOcr2's ``get_optimal_tiled_canvas`` (the processor's own
    function, called)."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    cols, rows = get_optimal_tiled_canvas((int(height), int(width)), (int(tile), int(tile)), int(min_tiles), int(max_tiles))
    return int(rows), int(cols)


def cohere2_tile_grid(height: int, width: int, tile: int = COHERE2_VIEW, max_tiles: int = MAX_PATCHES) -> tuple[int, int]:
    """(rows, cols) of Command A Vision's tiles (our own code of its image processor's rule).

    The candidates are every (cols, rows) with ``cols * rows <= max_tiles``, listed by columns then
    rows and ordered by area (fewest tiles first, the listing order kept among equal areas). The
    scale an image needs to fit a candidate is ``min(cols * tile / width, rows * tile / height)``;
    when no candidate reaches 1 the one with the largest scale wins (the least downscale), else
    the one with the smallest scale of at least 1 (the least upscale); the first of ties either way."""
    cands = sorted(((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1) if c * r <= max_tiles),
                   key=lambda g: g[0] * g[1])
    scales = [min(c * tile / width, r * tile / height) for c, r in cands]
    up = [s for s in scales if s >= 1]
    best = scales.index(min(up)) if up else scales.index(max(scales))
    cols, rows = cands[best]
    return rows, cols


@lru_cache(maxsize=None)
def _cohere2_image_processor_class() -> type:
    """A PIL image processor with Command A Vision's tiling, for the tiny model and for loading a
    checkpoint without torchvision. Built when first asked (the registry must not import transformers)."""
    import numpy as np
    from transformers.image_processing_backends import PilBackend
    from transformers.image_processing_utils import BatchFeature
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling, SizeDict
    from transformers.processing_utils import ImagesKwargs

    class Cohere2TilingKwargs(ImagesKwargs, total=False):
        crop_to_patches: bool
        min_patches: int
        max_patches: int

    class Cohere2VisionImageProcessorPil(PilBackend):
        """Command A Vision's tiles (:func:`cohere2_tile_grid`, the image resized to the canvas, the
        thumbnail last) with PIL resizing (Cohere2VisionImageProcessor: torchvision)."""

        valid_kwargs = Cohere2TilingKwargs
        model_input_names = ["pixel_values", "num_patches"]
        resample = PILImageResampling.BICUBIC
        image_mean = OPENAI_CLIP_MEAN
        image_std = OPENAI_CLIP_STD
        size = {"height": COHERE2_VIEW, "width": COHERE2_VIEW}
        do_resize = do_rescale = do_normalize = do_convert_rgb = True
        crop_to_patches = True
        min_patches = 1
        max_patches = MAX_PATCHES
        patch_size = COHERE2_VIEW // COHERE2_PATCH // DOWNSAMPLE  # tokens per view side (the processor reads it)

        def _grid(self, height: int, width: int, size: Any, crop: bool, most: int) -> tuple[int, int]:
            return cohere2_tile_grid(height, width, int(size.height), int(most)) if crop and most > 1 else (1, 1)

        def get_number_of_image_patches(self, height: int, width: int, images_kwargs: dict | None = None) -> int:
            kw = self._merge_and_standardize_kwargs(**(images_kwargs or {}))
            r, c = self._grid(height, width, kw["size"], kw["crop_to_patches"], kw["max_patches"])
            return 1 + r * c if r * c > 1 else 1

        def _preprocess(self, images, size, resample, do_rescale, rescale_factor, do_normalize, image_mean, image_std,
                        return_tensors=None, crop_to_patches=True, min_patches=1, max_patches=MAX_PATCHES, **kwargs):
            tile, out, counts = int(size.height), [], []
            for image in images:  # (C, H, W)
                h, w = image.shape[-2:]
                r, c = self._grid(h, w, size, crop_to_patches, max_patches)
                canvas = self.resize(image, SizeDict(height=r * tile, width=c * tile), resample=resample)
                views = [canvas[:, i * tile:(i + 1) * tile, j * tile:(j + 1) * tile] for i in range(r) for j in range(c)]
                if len(views) > 1:
                    views.append(self.resize(image, SizeDict(height=tile, width=tile), resample=resample))
                for v in views:
                    v = self.rescale(v, rescale_factor) if do_rescale else v
                    out.append((self.normalize(v, image_mean, image_std) if do_normalize else v).astype(np.float32))
                counts.append(len(views))
            pixels: Any = np.stack(out) if return_tensors else out
            return BatchFeature(data={"pixel_values": pixels, "num_patches": counts}, tensor_type=return_tensors)

    return Cohere2VisionImageProcessorPil


def tiny_cohere2_image_processor(**kwargs: Any) -> Any:
    """The tiny Command A Vision model's image processor (:func:`_cohere2_image_processor_class`)."""
    return _cohere2_image_processor_class()(**kwargs)


def __getattr__(name: str) -> Any:  # the class by name, for ``transformers``' lookups of a saved processor
    if name == "Cohere2VisionImageProcessorPil":
        return _cohere2_image_processor_class()
    raise AttributeError(name)


@register_family
class AyaVisionFamily(PerViewRuns, Family):
    """Aya Vision (``transformers`` ``AyaVisionForConditionalGeneration`` / ``AyaVisionModel``): SigLIP
    without [CLS], pixel shuffle 2, tiles row by row then the thumbnail, one placeholder run per view
    after its ``TILE_k`` / ``TILE_GLOBAL`` tag; ``spatial`` layout only (see the module's docstring)."""

    model_type = "aya_vision"
    display_name = "Aya Vision"
    example_checkpoint = "CohereLabs/aya-vision-8b"
    model_names = ("AyaVisionForConditionalGeneration", "AyaVisionModel")
    layouts = ("spatial",)
    image_inputs = ("image_grids", "vision_feature_layer", "vision_feature_select_strategy")
    joins_image_rows = True  # its forward casts pooler_output as one tensor
    tower_kind = "a SigLIP-like"
    #: The public checkpoint's language model (Command R7B) as :class:`globalcom2.efficiency.LMArch`
    #: fields (name, layers, hidden, heads, kv heads, head dim, intermediate, vocab), from its
    #: config.json's ``text_config`` as public code quotes it (no download is possible in this project:
    #: a public port's preset table of ``c4ai-command-r7b-12-2024``, the text model aya-vision-8b is
    #: built on, and a public model encyclopedia's notes on it: 32 layers, hidden 4096, 32 heads, 8 KV
    #: heads of 128, gated MLP 14336, vocabulary 256000). aya-vision-32b (Aya Expanse 32B, a ``cohere``
    #: text model) is left out: no quote of its config could be read here.
    language_models: dict[str, tuple[Any, ...]] = {
        "CohereLabs/aya-vision-8b": ("command-r7b", 32, 4096, 32, 8, 128, 14336, 256000),
    }
    default_text_model_type = "cohere2"
    #: The published geometry (see the module constants).
    default_view, default_patch, default_downsample = AYA_VIEW, AYA_PATCH, DOWNSAMPLE
    #: The processor's attributes naming an image's start and end markers and its view tags, and
    #: whether a tag opens its view (Aya Vision: ``TILE`` / ``TILE_GLOBAL`` before each run) or closes it
    #: (Command A Vision: ``<|IMG_LINE_BREAK|>`` after each run).
    marker_names: tuple[str, str, tuple[str, ...]] = ("start_of_img_token", "end_of_img_token", ("tile_token", "tile_global_token"))
    tags_open_views = True

    @classmethod
    def hf_classes(cls) -> tuple[type, ...]:
        from transformers import AyaVisionForConditionalGeneration, AyaVisionModel

        return (AyaVisionForConditionalGeneration, AyaVisionModel)

    # -- geometry -------------------------------------------------------------------------------
    @property
    def side(self) -> int:
        """S, tokens per view side after the pixel shuffle."""
        return self.patches // int(self.hf_config.downsample_factor)

    def importance_mode(self) -> str:
        """``"auto"`` -> ``"similarity"`` (SPEC.md), ``"attention_received"`` an ablation, ``"cls"`` a ValueError."""
        mode = getattr(self.vision_config, "importance", "auto")
        if mode == "cls":
            raise ValueError(
                f"importance='cls' is not available on {self.display_name}: its SigLIP tower has no [CLS] token; "
                "use importance='similarity' (the default, 'auto') or 'attention_received'"
            )
        return "attention_received" if mode == "attention_received" else "similarity"

    def check_vision(self) -> None:
        d = int(self.hf_config.downsample_factor)
        if d < 1 or self.patches % d:
            raise ValueError(f"{self.display_name}'s pixel shuffle must fold {self.patches} patches evenly; downsample_factor={d}")
        strategy = getattr(self.hf_config, "vision_feature_select_strategy", "full")  # Command A Vision: none (every patch)
        if strategy != "full":
            raise ValueError(
                f"GlobalCom2 on {self.display_name} needs vision_feature_select_strategy='full' (SigLIP has no [CLS] to drop); "
                f"this model uses {strategy!r}"
            )
        self.importance_mode()
        self.last_attention()

    def token_importance(self, patch_scores: torch.Tensor) -> torch.Tensor:
        """(V, P*P) patch scores -> (V, N): the mean over the patches folded into each token, found by
        pushing an index map through the model's own ``multi_modal_projector.pixel_shuffle``."""
        p = self.patches
        grid = torch.arange(p * p, dtype=torch.float64).reshape(1, p * p, 1)
        folded = self.inner.multi_modal_projector.pixel_shuffle(grid)  # (1, S, S, d*d)
        index = folded.reshape(-1, folded.shape[-1]).round().long().to(patch_scores.device)
        return patch_scores[:, index].mean(dim=-1)

    # -- the prompt's views ---------------------------------------------------------------------
    def _marker_ids(self) -> tuple[int, int, set[int]] | None:
        """(start, end, view tag ids) from the processor given to ``apply``; None without one."""
        proc = getattr(self.processor_patch, "processor", None)
        tok = getattr(proc, "tokenizer", None)
        start, end, tags = self.marker_names
        names = [getattr(proc, n, None) for n in (start, end, *tags)]
        if tok is None or any(n is None for n in names):
            return None
        ids = [tok.convert_tokens_to_ids(n) for n in names]
        if any(i is None or i == getattr(tok, "unk_token_id", None) for i in ids):
            return None
        return int(ids[0]), int(ids[1]), {int(i) for i in ids[2:]}

    def prompt_views(self, input_ids: torch.Tensor) -> list[list[int]]:
        """Per image (reading order of the batch), its runs' lengths in the prompt (model order: tiles
        row by row, then the thumbnail). One host copy of ``input_ids``."""
        marked = self._marker_ids()
        if marked is not None:
            return self._marked_views(input_ids, *marked)
        # Without the processor (its vanilla prompt: every run non-empty), every maximal run is a view;
        # Aya Vision's image ends with the run tagged as each row's last (TILE_GLOBAL), Command A
        # Vision's starts with the run tagged as each row's first (<|START_OF_IMG|>).
        rows = sequence.tagged_runs(input_ids, self.image_token_id)
        last = self.tags_open_views
        seen = {views[-1 if last else 0][0] for views in rows if views}
        if len(seen) > 1:
            raise ValueError(
                f"{self.display_name}: the prompts' image runs are not tagged alike ({sorted(seen)}); prepare inputs "
                "with the model's own processor"
            )
        marker = seen.pop() if seen else None
        images: list[list[int]] = []
        for views in rows:
            runs: list[int] = []
            for tag, _, length in views:
                if not last and tag == marker and runs:
                    images.append(runs)
                    runs = []
                runs.append(length)
                if last and tag == marker:
                    images.append(runs)
                    runs = []
            if runs and not last:
                images.append(runs)
            elif runs:
                raise ValueError(
                    f"{self.display_name}: a prompt's image runs do not end with the thumbnail's; prepare inputs with the "
                    "model's own processor"
                )
        return images

    def _marked_views(self, input_ids: torch.Tensor, start: int, end: int, tags: set[int]) -> list[list[int]]:
        """The views between each image's start and end markers, one per view tag: the placeholders
        after each opening tag (Aya Vision) or before each closing one (Command A Vision); a view that
        kept no token (a count-first prompt at a tiny ratio) is a run of 0."""
        image, images = self.image_token_id, []
        for row in input_ids.detach().cpu().tolist():
            i = 0
            while start in row[i:]:
                s = row.index(start, i)
                if end not in row[s + 1:]:
                    if image in row[s + 1:]:
                        raise ValueError(f"{self.display_name}: an image start marker without its end marker")
                    break  # a generated start marker (a later turn's text): no image
                e = row.index(end, s + 1)
                body = row[s + 1 : e]
                cuts = [k for k, t in enumerate(body) if t in tags]
                bounds = zip(cuts, cuts[1:] + [len(body)]) if self.tags_open_views else zip([0] + [c + 1 for c in cuts[:-1]], cuts)
                images.append([body[a:b].count(image) for a, b in bounds])
                i = e + 1
        return images

    def _with_grids(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """``inputs`` with ``image_grids`` from its ``input_ids`` (unless given): (0, 0) for one view,
        (-1, C) for C tiles whose arrangement :meth:`encode` reads from the pixels."""
        if inputs.get("image_grids") is None and inputs.get("input_ids") is not None:
            inputs = dict(inputs)
            inputs["image_grids"] = [(0, 0) if len(r) == 1 else (-1, len(r) - 1) for r in self.prompt_views(inputs["input_ids"])]
        return inputs

    def view_grid(self, inputs: Any, index: int = 0) -> tuple[int, int] | None:
        inputs = self._with_grids(dict(inputs))
        grids = self._grids(inputs["image_grids"])
        if grids[index] == (0, 0):
            return None
        if grids[index][0] > 0:
            return grids[index]
        start = sum(self._views(g) for g in grids[:index])
        c = grids[index][1]
        pv = inputs["pixel_values"]
        return tiles.infer_tile_grid(pv[start : start + c], pv[start + c], tiles.factor_grids(c))

    @staticmethod
    def _grids(image_grids: Any) -> list[tuple[int, int]]:
        rows = image_grids.tolist() if torch.is_tensor(image_grids) else image_grids
        return [(int(g[0]), int(g[1])) for g in rows]

    @staticmethod
    def _views(grid: tuple[int, int]) -> int:
        return 1 if grid == (0, 0) else 1 + abs(grid[0] * grid[1])

    def placeholder_runs(self, input_ids: torch.Tensor, compressed: CompressedImages) -> Any:
        """The prompt's runs and the runs the language model gets, per image and view (the grids: the plans')."""
        found = self.prompt_views(input_ids)
        grids = self._plan_grids(compressed)
        if [len(r) for r in found] != self._layout(grids)[0]:
            raise ValueError(f"{self.display_name}: the prompt's image runs do not match the images' views")
        return sequence.ViewRuns(prompt=found, kept=self._kept_runs(grids, list(compressed.plans), self.vision_config))

    # -- vision side ----------------------------------------------------------------------------
    def encode_inputs(self, inputs: Any) -> EncodedImages:
        inputs = self._with_grids(dict(inputs))
        return self.encode(inputs["pixel_values"], **{k: inputs[k] for k in self.image_inputs if k in inputs})

    def _image_features(self, pixel_values: torch.Tensor, **options: Any) -> torch.Tensor:
        """(V, N, D): the model's own ``get_image_features`` (Aya Vision: its feature layer and strategy)."""
        cfg = self.hf_config
        layer = options.get("vision_feature_layer")
        strategy = options.get("vision_feature_select_strategy")
        out = self.inner.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=cfg.vision_feature_layer if layer is None else layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy if strategy is None else strategy,
            return_dict=True,
        )
        return out.pooler_output

    def encode(self, pixel_values: torch.Tensor, image_grids: Any = None, **options: Any) -> EncodedImages:
        """Run the model's ``get_image_features``, capturing the projector's input (similarity) or the
        last layer's q/k (attention received).

        Args:
            pixel_values: (sum V_i, 3, view, view), per image its tiles row by row, then the thumbnail
                when V_i > 1 (as the processor writes them).
            image_grids: per image (rows, cols) of its tiles, (0, 0) for one view, (-1, C) for C tiles
                arranged as the pixels tell (:meth:`prepare_inputs` reads the views from the prompt).
            options: Aya Vision's ``vision_feature_layer`` / ``vision_feature_select_strategy``.

        Returns:
            :class:`EncodedImages`: per image (V, N, D) features and (V, N) importance, **thumbnail
            first**, a no-padding geometry (None for one view).
        """
        if image_grids is None:
            raise ValueError(
                f"{self.display_name} needs each image's views: call the model with the processor's input_ids "
                "(its runs give them) or pass image_grids=[(rows, cols), ...]"
            )
        grids = self._grids(image_grids)
        views = [self._views(g) for g in grids]
        if pixel_values.dim() != 4 or pixel_values.shape[0] != sum(views):
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)} do not hold the {sum(views)} views the prompts' images need")
        if options.get("vision_feature_select_strategy") not in (None, "full"):
            raise ValueError(f"GlobalCom2 needs vision_feature_select_strategy='full', got {options['vision_feature_select_strategy']!r}")
        kind = self.importance_mode()
        attn = self.last_attention()
        with QKCapture(attn, all_queries=kind == "attention_received", inputs_of=self.inner.multi_modal_projector) as cap:
            feats = self._image_features(pixel_values, **options)  # (sum V, N, D): the model's own features
        from ..core import importance as importance_ops

        if kind == "similarity":
            patch_scores = importance_ops.feature_similarity(cap.inputs)  # (V, P*P), on the projector's input
        else:
            patch_scores = importance_ops.attention_received(cap.queries.detach(), cap.keys.detach(), attn.num_heads, attn.scale)
        importance = self.token_importance(patch_scores).to(feats.device)  # (V, N)
        side, view, n = self.side, self.view_size, self.tokens_per_view
        features, importances, geoms, sizes = [], [], [], []
        start = 0
        for g, f, imp in zip(grids, torch.split(feats, views), torch.split(importance, views)):
            if g == (0, 0):
                geoms.append(None)
                sizes.append((view, view))
            else:
                if g[0] < 0:
                    g = tiles.infer_tile_grid(pixel_values[start : start + g[1]], pixel_values[start + g[1]], tiles.factor_grids(g[1]))
                geoms.append(tiles.full_geometry(g, side))
                sizes.append((g[0] * view, g[1] * view))
            start += f.shape[0]
            features.append(tiles.thumbnail_first(f))
            importances.append(tiles.thumbnail_first(imp))
        return EncodedImages(features=features, importance=importances, geometries=geoms, image_sizes=sizes,
                             vanilla_counts=[v * n for v in views])

    def prepare_inputs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """As :meth:`Family.prepare_inputs`, with the images' views read from the prompt."""
        if kwargs.get("pixel_values") is not None:
            kwargs = self._with_grids(dict(kwargs))
        return super().prepare_inputs(kwargs)

    # -- counts from the size (count first) -----------------------------------------------------
    def _grid_of(self, hw: tuple[int, int], processor: Any = None) -> tuple[int, int]:
        """(rows, cols) by the processor's rule (its image processor's ``size`` / ``min_patches`` /
        ``max_patches``; without one, the checkpoints' settings). Aya Vision's processor always
        crops (its default ``crop_to_patches=True``)."""
        ip = getattr(processor, "image_processor", processor)
        tile = _get(_get(ip, "size", None) or {}, "height", None) or self.view_size
        lo, hi = int(_get(ip, "min_patches", 1) or 1), int(_get(ip, "max_patches", MAX_PATCHES) or MAX_PATCHES)
        return aya_tile_grid(int(hw[0]), int(hw[1]), int(tile), lo, hi) if hi > 1 else (1, 1)

    @staticmethod
    def _processed_grids(image_inputs: Any) -> list[tuple[int, int]]:
        """A 1 x C grid for each image of C tiles (the processor's ``num_patches``; the arrangement
        changes no count: every tile is full), (0, 0) for one view."""
        views = image_inputs["num_patches"]
        views = [int(v) for v in (views.tolist() if hasattr(views, "tolist") else views)]
        return [(0, 0) if v == 1 else (1, v - 1) for v in views]

    @classmethod
    def runs_text(cls, processor: Any, image_inputs: Any, image_idx: int, runs: Sequence[int]) -> str:
        """The processor's text for one image with each view's run of ``runs[v]`` placeholders."""
        patch = processor.img_patch_token
        text = processor.start_of_img_token
        for k, run in enumerate(runs[:-1], start=1):
            text += f"{processor.tile_token}_{k}" + patch * int(run)
        return text + processor.tile_global_token + patch * int(runs[-1]) + processor.end_of_img_token

    @classmethod
    def placeholder_text(cls, processor: Any, count: int) -> str:
        """One view's text with ``count`` placeholders (the form of a one-tile image)."""
        return cls.runs_text(processor, {}, 0, [count])

    # -- for the tools --------------------------------------------------------------------------
    #: The tiny test model (globalcom2.tiny): Aya Vision's processor (the PIL GotOcr2 image processor,
    #: 364 px tiles, 12 at most), a SigLIP 364/14 tower, pixel shuffle 2 (169 tokens per view) and a
    #: Cohere 2 language model a few dozen wide. ``TILE`` / ``TILE_GLOBAL`` are tokens of their own,
    #: as the processor's ``image_token_ids`` has them.
    tiny = TinyGeometry(
        special_tokens={
            "start_of_img_token": START, "end_of_img_token": END, "img_patch_token": PATCH,
            "img_line_break_token": LINE_BREAK, "tile_token": "TILE", "tile_global_token": "TILE_GLOBAL",
        },
        processor="AyaVisionProcessor",
        image_processor="GotOcr2ImageProcessorPil",
        image_processor_kwargs={
            "size": {"height": AYA_VIEW, "width": AYA_VIEW}, "crop_to_patches": True, "min_patches": 1, "max_patches": MAX_PATCHES,
        },
        processor_kwargs={"img_size": AYA_VIEW, "patch_size": AYA_PATCH * DOWNSAMPLE, "downsample_factor": 1},
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=16384),
    )

    @classmethod
    def tiny_config(cls, tokenizer: Any, vision: dict[str, Any], text: dict[str, Any], **options: Any) -> Any:
        """An ``AyaVisionConfig`` with the published geometry (SigLIP 364/14, pixel shuffle 2, the last
        layer, every patch): a tower of ``vision`` and a Cohere 2 language model of ``text``."""
        from transformers import AyaVisionConfig, Cohere2Config, SiglipVisionConfig

        return AyaVisionConfig(
            vision_config=SiglipVisionConfig(image_size=AYA_VIEW, patch_size=AYA_PATCH, **vision).to_dict(),
            text_config=Cohere2Config(**text).to_dict(),
            image_token_index=tokenizer.convert_tokens_to_ids(PATCH), downsample_factor=DOWNSAMPLE,
            vision_feature_layer=-1, vision_feature_select_strategy="full", pad_token_id=tokenizer.pad_token_id, **options,
        )

    @classmethod
    def max_visual_tokens(cls, config: Any) -> int:
        """(max_patches tiles + the thumbnail) x tokens per view: 13 x 169 = 2,197 for Aya Vision,
        13 x 256 = 3,328 for Command A Vision (``max_patches``: the config's when it has one, else 12)."""
        d = int(_get(config, "downsample_factor", DOWNSAMPLE) or DOWNSAMPLE)
        return max_tiled_tokens(config, 1 / d, int(_get(config, "max_patches", MAX_PATCHES) or MAX_PATCHES))

    @classmethod
    def default_max_visual_tokens(cls) -> int:
        return cls.max_visual_tokens({"vision_config": {"image_size": cls.default_view, "patch_size": cls.default_patch},
                                      "downsample_factor": cls.default_downsample})

    @classmethod
    def picture_views(cls, image: Any, geom: CropGeometry | None, view: int) -> tuple[Any, Any, Any]:
        """As the processor makes the views: the thumbnail is the whole image squeezed to one view;
        the tiles cover the image resized (aspect not kept) to ``(rows * view, cols * view)``, no padding."""
        import numpy as np
        from PIL import Image

        from .._io import to_rgb

        image = to_rgb(image)
        thumb = np.asarray(image.resize((view, view), Image.Resampling.BICUBIC))
        if geom is None:
            return thumb, None, None
        h, w = geom.grid_h * view, geom.grid_w * view
        canvas = np.asarray(image.resize((w, h), Image.Resampling.BICUBIC)).copy()
        return thumb, canvas, {"height": h, "width": w, "new_height": h, "new_width": w, "top": 0, "left": 0}


@register_family
class Cohere2VisionFamily(AyaVisionFamily):
    """Command A Vision (``Cohere2VisionForConditionalGeneration`` / ``Cohere2VisionModel``): Aya Vision's
    views and tower with its own tiling rule (:func:`cohere2_tile_grid`), the tower's last hidden state,
    and every view's run followed by ``<|IMG_LINE_BREAK|>``."""

    model_type = "cohere2_vision"
    display_name = "Command A Vision"
    example_checkpoint = "CohereLabs/command-a-vision-07-2025"
    model_names = ("Cohere2VisionForConditionalGeneration", "Cohere2VisionModel")
    image_inputs = ("image_grids",)
    #: Command A's language model (Cohere 2, 111 B), as public code quotes command-a-vision-07-2025's
    #: config.json: 64 layers, hidden 12288, 96 heads, 8 KV heads of 128, gated MLP 36864, vocabulary
    #: 256000 (its vision side: SigLIP 512/16, pixel shuffle 2, alignment width 36864).
    language_models: dict[str, tuple[Any, ...]] = {
        "CohereLabs/command-a-vision-07-2025": ("command-a", 64, 12288, 96, 8, 128, 36864, 256000),
    }
    default_view, default_patch = COHERE2_VIEW, COHERE2_PATCH
    marker_names = ("boi_token", "eoi_token", ("img_line_break_token",))
    tags_open_views = False

    @classmethod
    def hf_classes(cls) -> tuple[type, ...]:
        from transformers import Cohere2VisionForConditionalGeneration, Cohere2VisionModel

        return (Cohere2VisionForConditionalGeneration, Cohere2VisionModel)

    def _image_features(self, pixel_values: torch.Tensor, **options: Any) -> torch.Tensor:
        return self.inner.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output

    def _grid_of(self, hw: tuple[int, int], processor: Any = None) -> tuple[int, int]:
        """(rows, cols) by :func:`cohere2_tile_grid` with the image processor's ``size`` /
        ``max_patches`` / ``crop_to_patches`` (without one, the checkpoint's: 512 px, 12 tiles)."""
        ip = getattr(processor, "image_processor", processor)
        tile = _get(_get(ip, "size", None) or {}, "height", None) or self.view_size
        most = int(_get(ip, "max_patches", MAX_PATCHES) or MAX_PATCHES)
        crop = bool(_get(ip, "crop_to_patches", True))
        return cohere2_tile_grid(int(hw[0]), int(hw[1]), int(tile), most) if crop and most > 1 else (1, 1)

    @classmethod
    def runs_text(cls, processor: Any, image_inputs: Any, image_idx: int, runs: Sequence[int]) -> str:
        """The processor's text for one image with each view's run of ``runs[v]`` placeholders."""
        body = "".join(processor.image_token * int(run) + processor.img_line_break_token for run in runs)
        return processor.boi_token + body + processor.eoi_token

    @classmethod
    def load(
        cls, model_id: str, dtype: Any = "auto", device_map: Any = None, model_kwargs: dict[str, Any] | None = None, **hub: Any
    ) -> tuple[Any, Any]:
        """As :meth:`Family.load`; where torchvision (which ``Cohere2VisionImageProcessor`` needs) is
        missing, the processor is built with :func:`tiny_cohere2_image_processor`'s class on the saved
        settings (same tiling, PIL resizing: pixel values differ slightly from the stock one's), with a warning."""
        from transformers import AutoProcessor, AutoTokenizer, Cohere2VisionProcessor

        kwargs: dict[str, Any] = {"dtype": dtype, **hub, **(model_kwargs or {})}
        if device_map is not None:
            kwargs["device_map"] = device_map
        model = cls.hf_classes()[0].from_pretrained(model_id, **kwargs).eval()
        try:
            return model, AutoProcessor.from_pretrained(model_id, **hub)
        except (ImportError, ValueError, OSError) as exc:
            if "torchvision" not in str(exc).lower() and "cohere2visionimageprocessorpil" not in str(exc).lower():
                raise
        warnings.warn(
            "Cohere2VisionImageProcessor needs torchvision, which is not installed: globalcom2 uses a PIL image processor "
            "with the same tiling (pixel values differ slightly); install torchvision for the stock one",
            stacklevel=2,
        )
        ip = _cohere2_image_processor_class().from_pretrained(model_id, **hub)
        return model, Cohere2VisionProcessor(image_processor=ip, tokenizer=AutoTokenizer.from_pretrained(model_id, **hub))

    #: The tiny test model (globalcom2.tiny): Command A Vision's processor with a PIL image processor of
    #: its tiling (512 px tiles, 12 at most), a SigLIP 512/16 tower, pixel shuffle 2 (256 tokens per
    #: view) and a Cohere 2 language model a few dozen wide. The tokenizer's ``boi_token`` /
    #: ``eoi_token`` / ``image_token`` / ``img_line_break_token`` are what the processor reads.
    tiny = TinyGeometry(
        special_tokens={"boi_token": START, "eoi_token": END, "image_token": PATCH, "img_line_break_token": LINE_BREAK},
        processor="Cohere2VisionProcessor",
        image_processor="globalcom2.models.aya_vision.tiny_cohere2_image_processor",
        image_processor_kwargs={"size": {"height": COHERE2_VIEW, "width": COHERE2_VIEW}, "max_patches": MAX_PATCHES},
        processor_kwargs={},
        hub_tower_names=True,  # the hub's checkpoints (and vLLM) name the tower vision_tower.vision_model.*
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=16384),
    )

    @classmethod
    def tiny_config(cls, tokenizer: Any, vision: dict[str, Any], text: dict[str, Any], **options: Any) -> Any:
        """A ``Cohere2VisionConfig`` with the published geometry (SigLIP 512/16, pixel shuffle 2): a
        tower of ``vision`` and a Cohere 2 language model of ``text`` (the projector's SwiGLU as wide
        as twice the language model)."""
        from transformers import Cohere2Config, Cohere2VisionConfig, SiglipVisionConfig

        return Cohere2VisionConfig(
            vision_config=SiglipVisionConfig(image_size=COHERE2_VIEW, patch_size=COHERE2_PATCH, **vision).to_dict(),
            text_config=Cohere2Config(**text).to_dict(),
            image_token_id=tokenizer.convert_tokens_to_ids(PATCH), downsample_factor=DOWNSAMPLE,
            alignment_intermediate_size=2 * int(text["hidden_size"]), pad_token_id=tokenizer.pad_token_id, **options,
        )
