"""GlobalCom2 for Hugging Face Llama 4 (``Llama4ForConditionalGeneration``: ``meta-llama/Llama-4-Scout-17B-16E-Instruct``,
``meta-llama/Llama-4-Maverick-17B-128E-Instruct``).

What the model does (read from ``transformers`` 5.x ``modeling_llama4``, ``processing_llama4`` and
``image_processing_llama4``):

* The image processor picks a canvas of ``rows x cols`` tiles of 336 x 336 (at most ``max_patches``
  = 16 tiles: the canvases of ``find_supported_resolutions``, the best by ``get_best_fit``),
  resizes the image into it without distortion (never upscaling past one tile unless
  ``resize_to_max_canvas``), pads it at the right and bottom, and cuts it into tiles row by row;
  when there is more than one tile the whole image squeezed to 336 x 336 comes **last** (the
  global tile). The model feeds every tile token, padding included (there is no unpadding).
* The prompt of an image (``_prompt_split_image``) is ``<|image_start|>``, then per tile row each
  tile's run of ``<|patch|>`` with ``<|tile_x_separator|>`` between tiles and
  ``<|tile_y_separator|>`` after the row, then ``<|image|>`` and the global tile's run, then
  ``<|image_end|>``; a single tile is ``<|image_start|><|image|>`` + its run + ``<|image_end|>``.
  Only ``<|patch|>`` (``config.image_token_id``) is an image token.
* The vision tower (``Llama4VisionModel``) embeds 24 x 24 patches of 14 px, **appends** a class
  embedding (the last token), adds positions, runs its layers with a 2-D rotary embedding (the
  class token's angles are 0: its query and key are not rotated), applies ``layernorm_post``, drops
  the class token, pixel-shuffles (0.5: each 2 x 2 block of patches is one token, S = 12,
  N = 144) and runs its MLP adapter; the projector maps that to the language model.

How GlobalCom2 maps onto it (``SPEC.md``, "Any further family with a global view"):

* Importance ``"auto"`` = ``"cls"``: the tower has a class token that attends to every patch at
  every layer, as CLIP's does; its pre-softmax logits at the **last** layer are
  ``(q_cls . rope(k_patch)) * head_dim**-0.5`` with q / k as the layer computes them (q_proj / k_proj
  outputs captured by hooks, rotated with the model's own ``vision_apply_rotary_emb`` and its
  ``freqs_ci``), averaged over heads; only the class row is computed (no ``output_attentions``, the
  tower keeps its attention implementation). A token's importance is the mean of its 4 patches'
  logits, found by pushing an index map through the model's own ``pixel_shuffle`` (which keeps the
  raster order of 2 x 2 blocks). ``"similarity"`` (an ablation here) is ``-cos`` of each token at
  the projector's input (after the pixel shuffle and adapter, the features the projector receives)
  to the view's mean; ``"attention_received"`` (an ablation) is the attention each patch receives
  from the patches at the last layer (rotated q/k), folded the same way.
* Views go to the methods **global tile first** with a no-padding
  :class:`~globalcom2.core.geometry.CropGeometry` of the tile grid (every tile token is fed, so every
  one is valid); :meth:`Llama4Family.compress` maps the result back to the model's order (tiles row
  by row, each its kept tokens in raster order, then the global tile's). One tile only: Step 1.
  The thumbnail is mapped onto the whole tile canvas, padding included (the model never tells
  where the padding starts).
* Sequence: every view keeps its own ``<|patch|>`` run, shortened to its kept count; the image
  markers and tile separators stay (:meth:`placeholder_runs`). With every token kept it is the
  vanilla sequence. The runs and the tile grid are read from the prompt (the separators give the
  grid; the ids of ``<|image_start|>`` / ``<|image_end|>`` are the config's, the separators are the
  marker tokens between runs), one host copy of ``input_ids``; ``image_grids=[(rows, cols), ...]``
  given with the call overrides the grid ((0, 0): one tile).
* ``count="fixed"``: each image's split over its views is the one its grid alone gives (the
  planning on constant importance), what a count-first processor writes (:meth:`processed_runs`,
  :meth:`runs_text`).
* Layout: ``spatial`` only.
* The tiny test model's processor: ``Llama4ImageProcessor`` needs torchvision (not a dependency
  here), so the tiny processor uses :func:`tiny_image_processor`, a PIL image processor with the same
  tiling rule (:func:`tile_grid`, :func:`resized_size`), and :meth:`Llama4Family.load` falls back to
  it (with a warning) where torchvision is missing.
"""

from __future__ import annotations

import functools
import math
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

#: The published checkpoints' geometry: 336 px tiles, 14 px patches, pixel shuffle 0.5, 16 tiles at most.
VIEW_SIZE, PATCH_SIZE, SHUFFLE_RATIO, MAX_PATCHES = 336, 14, 0.5, 16
#: The processor's tokens (``Llama4Processor``'s defaults), as tokenizer attributes.
SPECIAL_TOKENS = {
    "image_token": "<|image|>", "patch_token": "<|patch|>", "boi_token": "<|image_start|>", "eoi_token": "<|image_end|>",
    "tile_x_token": "<|tile_x_separator|>", "tile_y_token": "<|tile_y_separator|>",
}


def _get(obj: Any, key: str, default: Any = None) -> Any:
    return obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)


def _pair(value: Any) -> int:
    return int(value[0]) if isinstance(value, (list, tuple)) else int(value)


# -- the processor's tiling rule (our own code of the rule Llama4ImageProcessor follows) -------------
@lru_cache(maxsize=None)
def _canvases(max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every (rows, cols) with rows * cols <= max_tiles, in the order the image processor lists
    them (by aspect ratio first seen, from ``max_tiles`` tiles down; within a ratio, more tiles first)."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for n in range(max_tiles, 0, -1):
        for r in sorted(d for d in range(1, n + 1) if n % d == 0):
            by_ratio.setdefault(r / (n // r), []).append((r, n // r))
    return tuple(g for grids in by_ratio.values() for g in grids)


def tile_grid(height: int, width: int, tile: int = VIEW_SIZE, max_tiles: int = MAX_PATCHES, to_max_canvas: bool = False) -> tuple[int, int]:
    """(rows, cols) of the canvas the image processor picks for an image: the smallest upscale of
    the image that fits a canvas (the largest with ``to_max_canvas``), else the least downscale;
    among canvases of that scale the smallest area (the first listed)."""
    grids = torch.tensor(_canvases(int(max_tiles)))  # (G, 2)
    sizes = grids * int(tile)
    sh, sw = sizes[:, 0] / int(height), sizes[:, 1] / int(width)
    scales = torch.where(sh > sw, sw, sh)
    up = scales[scales >= 1]
    chosen = (up.max() if to_max_canvas else up.min()) if up.numel() else scales[scales < 1].max()
    cands = (scales == chosen).nonzero().flatten()
    areas = sizes[cands, 0] * sizes[cands, 1]
    r, c = grids[cands[torch.argmin(areas)]].tolist()
    return int(r), int(c)


def resized_size(height: int, width: int, grid: tuple[int, int], tile: int = VIEW_SIZE, to_max_canvas: bool = False) -> tuple[int, int]:
    """(height, width) of the image resized into its canvas without distortion (before the padding)."""
    th, tw = grid[0] * tile, grid[1] * tile
    if not to_max_canvas:
        th, tw = min(max(height, tile), th), min(max(width, tile), tw)
    scale_w, scale_h = tw / width, th / height
    if scale_w < scale_h:
        h, w = min(math.floor(height * scale_w), th), tw
    else:
        h, w = th, min(math.floor(width * scale_h), tw)
    return max(h, 1), max(w, 1)


@lru_cache(maxsize=None)
def projects_in_forward() -> bool:
    """Whether this ``transformers`` projects Llama 4's image features in the model's forward (before
    5.25: ``get_image_features`` returns the tower's output, the forward reads ``last_hidden_state`` and
    runs the projector) rather than in ``get_image_features`` (``pooler_output``, 5.25 on)."""
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__).release < (5, 25)


@lru_cache(maxsize=None)
def _tiny_image_processor_class() -> type:
    """A PIL image processor with Llama4ImageProcessor's tiling (for the tiny model without torchvision).
    Built when first asked (the registry must not import transformers)."""
    import numpy as np
    from transformers.image_processing_backends import PilBackend
    from transformers.image_processing_utils import BatchFeature
    from transformers.image_utils import PILImageResampling, SizeDict
    from transformers.processing_utils import ImagesKwargs

    class Llama4TilingKwargs(ImagesKwargs, total=False):
        max_patches: int
        resize_to_max_canvas: bool

    class Llama4ImageProcessorPil(PilBackend):
        """Llama 4's tiles (``tile_grid``, ``resized_size``, padding at the right and bottom, the global
        tile last) with PIL resizing and float32 pixels (Llama4ImageProcessor: torchvision, bfloat16)."""

        resample = PILImageResampling.BILINEAR
        image_mean = [0.5, 0.5, 0.5]
        image_std = [0.5, 0.5, 0.5]
        size = {"height": VIEW_SIZE, "width": VIEW_SIZE}
        do_resize = True
        do_rescale = True
        do_normalize = True
        do_convert_rgb = True
        max_patches = MAX_PATCHES
        resize_to_max_canvas = False
        valid_kwargs = Llama4TilingKwargs

        def get_number_of_image_patches(self, height: int, width: int, images_kwargs: dict | None = None) -> int:
            kw = {**{k: getattr(self, k) for k in ("size", "max_patches", "resize_to_max_canvas")}, **(images_kwargs or {})}
            tile = _get(kw["size"], "height")  # a dict, or a SizeDict
            r, c = tile_grid(height, width, int(tile), int(kw["max_patches"]), bool(kw["resize_to_max_canvas"]))
            return r * c + 1 if r * c > 1 else 1

        def _preprocess(self, images, size, resample, do_rescale, rescale_factor, do_normalize, image_mean, image_std,
                        max_patches, resize_to_max_canvas, return_tensors=None, **kwargs):
            tile = int(size.height)
            out, ratios = [], []
            for image in images:  # (C, H, W)
                h, w = image.shape[-2:]
                grid = tile_grid(h, w, tile, max_patches, resize_to_max_canvas)
                nh, nw = resized_size(h, w, grid, tile, resize_to_max_canvas)
                canvas = self.resize(image, SizeDict(height=nh, width=nw), resample=resample)
                canvas = np.pad(canvas, ((0, 0), (0, grid[0] * tile - nh), (0, grid[1] * tile - nw)))
                views = [canvas[:, i * tile:(i + 1) * tile, j * tile:(j + 1) * tile] for i in range(grid[0]) for j in range(grid[1])]
                if len(views) > 1:
                    views.append(self.resize(image, SizeDict(height=tile, width=tile), resample=resample))
                for v in views:
                    v = self.rescale(v, rescale_factor) if do_rescale else v
                    out.append((self.normalize(v, image_mean, image_std) if do_normalize else v).astype(np.float32))
                ratios.append(list(grid))
            pixels: Any = np.stack(out) if return_tensors else out
            return BatchFeature(data={"pixel_values": pixels, "aspect_ratios": np.array(ratios)}, tensor_type=return_tensors)

    return Llama4ImageProcessorPil


def tiny_image_processor(**kwargs: Any) -> Any:
    """The tiny model's image processor (:func:`_tiny_image_processor_class` with ``kwargs``)."""
    return _tiny_image_processor_class()(**kwargs)


def __getattr__(name: str) -> Any:  # the class by name, for ``transformers``' lookups of a saved processor
    if name == "Llama4ImageProcessorPil":
        return _tiny_image_processor_class()
    raise AttributeError(name)


@register_family
class Llama4Family(PerViewRuns, Family):
    """Llama 4 (``transformers`` ``Llama4ForConditionalGeneration``): a ViT with a class token (last),
    pixel shuffle 0.5, tiles row by row then the global tile, one ``<|patch|>`` run per tile with
    separators between; ``spatial`` layout only (see the module's docstring for every decision)."""

    model_type = "llama4"
    display_name = "Llama 4"
    example_checkpoint = "meta-llama/Llama-4-Scout-17B-16E-Instruct"
    model_names = ("Llama4ForConditionalGeneration",)
    layouts = ("spatial",)
    image_inputs = ("image_grids",)
    joins_image_rows = True
    attention_attributes = ("q_proj", "k_proj", "num_heads", "head_dim")
    tower_kind = "a Llama 4 ViT-like"
    #: Llama 4 Scout's language model as :class:`globalcom2.efficiency.LMArch` fields (name, layers,
    #: hidden, heads, kv heads, head dim, intermediate, vocab), from ``transformers``' own
    #: ``Llama4TextConfig``, whose defaults are documented as ``meta-llama/Llama-4-Scout-17B-16E``'s
    #: (``@auto_docstring(checkpoint=...)`` in ``configuration_llama4.py``): 48 layers, hidden 5120, 40
    #: heads, 8 KV heads of 128, every layer a mixture of 16 experts of which each token runs 1 (gated
    #: MLP of 8192) plus the shared expert (gated MLP of 8192), so the per-token MLP cost is a gated MLP
    #: of 2 x 8192 = 16384; vocabulary 202048. The Instruct checkpoint is the same architecture.
    #: Maverick is left out: no config of it could be read here.
    language_models = {
        "meta-llama/Llama-4-Scout-17B-16E": ("llama4-scout-17b-16e", 48, 5120, 40, 8, 128, 2 * 8192, 202048),
        "meta-llama/Llama-4-Scout-17B-16E-Instruct": ("llama4-scout-17b-16e", 48, 5120, 40, 8, 128, 2 * 8192, 202048),
    }
    default_text_model_type = "llama4_text"

    @classmethod
    def hf_classes(cls) -> tuple[type, ...]:
        from transformers import Llama4ForConditionalGeneration

        return (Llama4ForConditionalGeneration,)

    # -- geometry -------------------------------------------------------------------------------
    @property
    def side(self) -> int:
        return int(round(self.patches * float(self.hf_config.vision_config.pixel_shuffle_ratio)))

    def language_model(self) -> Any:
        return self.inner.language_model.model

    def vision_tower(self) -> Any:
        return self.inner.vision_model

    def last_attention(self) -> Any:
        found = None
        for module in self.vision_tower().modules():
            if all(hasattr(module, a) for a in self.attention_attributes):
                found = module
        if found is None:
            raise ValueError(f"GlobalCom2 on {self.display_name} needs {self.tower_kind} vision tower whose attention has q_proj/k_proj")
        return found

    def importance_mode(self) -> str:
        """``"auto"`` / ``"cls"``: the class token's logits; ``"similarity"`` and ``"attention_received"``: ablations."""
        mode = str(getattr(self.vision_config, "importance", "auto") or "auto")
        return "cls" if mode == "auto" else mode

    def check_vision(self) -> None:
        ratio = float(self.hf_config.vision_config.pixel_shuffle_ratio)
        fold = round(1 / ratio)
        if abs(fold * ratio - 1) > 1e-9 or self.patches % fold:
            raise ValueError(f"{self.display_name}'s pixel shuffle must fold {self.patches} patches evenly; pixel_shuffle_ratio={ratio}")
        self.last_attention()

    def _shuffle_index(self, device: Any) -> torch.Tensor:
        """(N, k) long: the patches (raster index) folded into each token, by the model's own ``pixel_shuffle``."""
        from transformers.models.llama4.modeling_llama4 import pixel_shuffle

        p = self.patches
        grid = torch.arange(p * p, dtype=torch.float64).reshape(1, p * p, 1)
        folded = pixel_shuffle(grid, float(self.hf_config.vision_config.pixel_shuffle_ratio))  # (1, N, k)
        return folded.reshape(-1, folded.shape[-1]).round().long().to(device)

    def token_importance(self, patch_scores: torch.Tensor) -> torch.Tensor:
        """(V, P*P) patch scores -> (V, N): the mean over the patches folded into each token."""
        return patch_scores[:, self._shuffle_index(patch_scores.device)].mean(dim=-1)

    def _rotated(self, cap: QKCapture, attn: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(queries, keys), each (V, T, D), rotated as the layer rotates them (class token last)."""
        from transformers.models.llama4.modeling_llama4 import vision_apply_rotary_emb

        q, k = cap.queries.detach(), cap.keys.detach()
        v, t, d = k.shape
        hd = int(attn.head_dim)
        freqs = self.inner.vision_model.rotary_embedding.freqs_ci.to(k.device)
        q, k = vision_apply_rotary_emb(q.reshape(v, t, -1, hd), k.reshape(v, t, -1, hd), freqs_ci=freqs)
        return q.reshape(v, t, d), k.reshape(v, t, d)

    # -- the prompt's views ---------------------------------------------------------------------
    def prompt_views(self, input_ids: torch.Tensor) -> list[tuple[list[int], tuple[int, int] | None]]:
        """Per image (reading order of the batch): its runs' lengths (tiles row by row, then the
        global tile) and its tile grid (None for one tile), from the markers between
        ``<|image_start|>`` and ``<|image_end|>``. One host copy of ``input_ids``."""
        cfg = self.hf_config
        boi, eoi, patch = int(cfg.boi_token_id), int(cfg.eoi_token_id), int(self.image_token_id)
        images: list[tuple[list[int], tuple[int, int] | None]] = []
        for row in input_ids.detach().cpu().tolist():
            i, n = 0, len(row)
            while i < n:
                if row[i] != boi:
                    i += 1
                    continue
                j = i + 1
                while j < n and row[j] != eoi:
                    j += 1
                if j == n:
                    if patch not in row[i + 1 :]:  # a generated <|image_start|> (a later turn's text): no image
                        break
                    raise ValueError(
                        f"{self.display_name}: an <|image_start|> without its <|image_end|>; prepare inputs with the model's processor"
                    )
                images.append(self._read_image(row[i + 1 : j], patch))
                i = j + 1
        return images

    def _read_image(self, body: list[int], patch: int) -> tuple[list[int], tuple[int, int] | None]:
        """Runs and grid of one image's tokens between its start and end markers."""
        marks = [(k, t) for k, t in enumerate(body) if t != patch]
        if not marks:
            raise ValueError(f"{self.display_name}: an image without its <|image|> marker; prepare inputs with the model's processor")
        glob_pos, _ = marks[-1]
        bounds = [-1] + [k for k, _ in marks]
        run_of = {k: k - bounds[x] - 1 for x, (k, _) in enumerate(marks)}  # patches right before each marker
        seps = marks[:-1]
        global_run = len(body) - glob_pos - 1
        if not seps:
            if run_of[glob_pos]:
                raise ValueError(f"{self.display_name}: image tokens before the <|image|> marker of a one-tile image")
            return [global_run], None
        y_id = seps[-1][1]  # the separator that ends every tile row (it ends the last one)
        if run_of[glob_pos]:
            raise ValueError(f"{self.display_name}: image tokens between the last tile row and the <|image|> marker")
        runs = [run_of[k] for k, _ in seps]
        rows = sum(1 for _, t in seps if t == y_id)
        if len(runs) % rows:
            raise ValueError(f"{self.display_name}: {len(runs)} tiles do not make {rows} rows")
        return runs + [global_run], (rows, len(runs) // rows)

    def _with_grids(self, inputs: dict[str, Any]) -> dict[str, Any]:
        if inputs.get("image_grids") is None and inputs.get("input_ids") is not None:
            inputs = dict(inputs)
            inputs["image_grids"] = [(0, 0) if g is None else g for _, g in self.prompt_views(inputs["input_ids"])]
        return inputs

    def view_grid(self, inputs: Any, index: int = 0) -> tuple[int, int] | None:
        grid = tuple(int(v) for v in self._with_grids(dict(inputs))["image_grids"][index])
        return None if grid == (0, 0) else grid  # type: ignore[return-value]

    # -- vision side ----------------------------------------------------------------------------
    def encode_inputs(self, inputs: Any) -> EncodedImages:
        inputs = self._with_grids(dict(inputs))
        return self.encode(inputs["pixel_values"], **{k: inputs[k] for k in self.image_inputs if k in inputs})

    def encode(self, pixel_values: torch.Tensor, image_grids: Any = None) -> EncodedImages:
        """Run the model's ``get_image_features``, capturing the last layer's q/k (and the projector's
        input for ``similarity``).

        Args:
            pixel_values: (sum V_i, 3, 336, 336), per image its tiles row by row, then the global tile
                when V_i > 1 (as the processor writes them).
            image_grids: per image (rows, cols) of its tiles, (0, 0) for one tile (:meth:`prepare_inputs`
                reads them from the prompt).

        Returns:
            :class:`EncodedImages`: per image (V, N, D) features and (V, N) importance, **global tile
            first**, a no-padding geometry (None for one tile).
        """
        if image_grids is None:
            raise ValueError(
                f"{self.display_name} needs each image's tiles: call the model with the processor's input_ids "
                "(its separators give them) or pass image_grids=[(rows, cols), ...]"
            )
        grids = [tuple(int(v) for v in g) for g in (image_grids.tolist() if torch.is_tensor(image_grids) else image_grids)]
        views = [1 if g[0] * g[1] <= 1 else 1 + g[0] * g[1] for g in grids]
        if pixel_values.dim() != 4 or pixel_values.shape[0] != sum(views):
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)} do not hold the {sum(views)} tiles the prompts' images need")
        kind = self.importance_mode()
        attn = self.last_attention()
        projector = self.inner.multi_modal_projector if kind == "similarity" else None
        with QKCapture(attn, all_queries=True, inputs_of=projector) as cap:
            out = self.inner.get_image_features(pixel_values=pixel_values, return_dict=True)
            feats = out.pooler_output  # (sum V, N, D): the model's own features
            if feats is None:  # transformers < 5.25: the model projects the tower's output in its forward
                feats = self.inner.multi_modal_projector(out.last_hidden_state)
        if cap.keys is None:  # pragma: no cover - defensive
            raise RuntimeError("the vision tower's last attention layer did not run")
        from ..core import importance as importance_ops

        if kind == "similarity":
            importance = importance_ops.feature_similarity(cap.inputs)  # (V, N): tokens already folded
        else:
            q, k = self._rotated(cap, attn)
            if kind == "attention_received":
                patch_scores = importance_ops.attention_received(q[:, :-1], k[:, :-1], attn.num_heads, float(attn.head_dim) ** -0.5)
            else:  # the class token (last) as [CLS]: its row of logits, keys with the class column first
                patch_scores = importance_ops.cls_attention_logits(
                    q[:, -1], torch.cat([k[:, -1:], k[:, :-1]], dim=1), attn.num_heads, float(attn.head_dim) ** -0.5
                )
            importance = self.token_importance(patch_scores)
        importance = importance.to(feats.device)
        side, view, n = self.side, self.view_size, self.tokens_per_view
        features, importances, geoms, sizes = [], [], [], []
        for g, f, imp in zip(grids, torch.split(feats, views), torch.split(importance, views)):
            if f.shape[0] == 1:
                geoms.append(None)
                sizes.append((view, view))
            else:
                geoms.append(tiles.full_geometry(g, side))
                sizes.append((g[0] * view, g[1] * view))
            features.append(tiles.thumbnail_first(f))
            importances.append(tiles.thumbnail_first(imp))
        return EncodedImages(features=features, importance=importances, geometries=geoms, image_sizes=sizes,
                             vanilla_counts=[v * n for v in views])

    # -- per-view placeholder runs --------------------------------------------------------------
    def placeholder_runs(self, input_ids: torch.Tensor, compressed: CompressedImages) -> Any:
        """The prompt's runs and the runs the language model gets, per image and view."""
        found = self.prompt_views(input_ids)
        grids = [(0, 0) if g is None else g for _, g in found]
        plans = list(compressed.plans)
        if len(found) != len(plans) or any(
            p is not None and (getattr(p, "geometry", None) is None) != (g == (0, 0)) for p, g in zip(plans, grids)
        ):
            raise ValueError(f"{self.display_name}: the prompt's image runs do not match the images' tiles")
        kept = self._kept_runs(grids, plans, self.vision_config)  # pixels' plans (embeddings bring their runs: image_runs)
        return sequence.ViewRuns(prompt=[r for r, _ in found], kept=kept)

    # -- counts from the size (count first) -----------------------------------------------------
    def _grid_of(self, hw: tuple[int, int], processor: Any = None) -> tuple[int, int]:
        """(rows, cols) of one image size by the processor's tiling rule (its ``size``, ``max_patches``,
        ``resize_to_max_canvas``; without one, the checkpoints' 336 px and 16 tiles)."""
        ip = getattr(processor, "image_processor", processor)
        tile = _get(_get(ip, "size", None) or {}, "height", None) or self.view_size
        most = int(_get(ip, "max_patches", MAX_PATCHES) or MAX_PATCHES)
        return tile_grid(int(hw[0]), int(hw[1]), int(tile), most, bool(_get(ip, "resize_to_max_canvas", False)))

    @staticmethod
    def _processed_grids(image_inputs: Any) -> list[tuple[int, int]]:
        """The grids a processor's image output reports (``aspect_ratios``, kept while it writes the text)."""
        ratios = image_inputs["aspect_ratios"]
        ratios = ratios.tolist() if hasattr(ratios, "tolist") else ratios
        return [(int(r[0]), int(r[1])) for r in ratios]

    @classmethod
    def runs_text(cls, processor: Any, image_inputs: Any, image_idx: int, runs: Sequence[int]) -> str:
        """The processor's text for one image with each view's run of ``runs[v]`` ``<|patch|>``."""
        rows, cols = cls._processed_grids(image_inputs)[image_idx]
        patch = processor.img_patch_token
        text = processor.start_of_img_token
        if rows * cols > 1:
            for i in range(rows):
                for j in range(cols):
                    text += patch * int(runs[i * cols + j]) + (processor.tile_token if j < cols - 1 else "")
                text += processor.tile_global_token
        return text + processor.fake_image_token + patch * int(runs[-1]) + processor.end_of_img_token

    @classmethod
    def placeholder_text(cls, processor: Any, count: int) -> str:
        """One tile's text with ``count`` placeholders (the form of a single-tile image)."""
        patches = processor.img_patch_token * int(count)
        return f"{processor.start_of_img_token}{processor.fake_image_token}{patches}{processor.end_of_img_token}"

    # -- language side --------------------------------------------------------------------------
    def prepare_inputs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """As :meth:`Family.prepare_inputs`, with the images' grids read from the prompt. The
        compressed features stay one tensor per image (what ``generate`` splits per prompt for beams
        and ``num_return_sequences``); :meth:`_forward` joins them for Llama 4's forward."""
        if kwargs.get("pixel_values") is not None:
            kwargs = self._with_grids(dict(kwargs))
        return super().prepare_inputs(kwargs)

    def _forward(self, original: Any, *args: Any, **kwargs: Any) -> Any:
        """The patched forward (the rows joined into one (L, D) tensor, :attr:`joins_image_rows`: Llama 4's
        forward reshapes ``pooler_output``); before transformers 5.25 the rows go in as ``inputs_embeds``."""

        @functools.wraps(original)
        def joined(**call: Any) -> Any:
            image = (call.get("mm_encoder_outputs") or {}).get("image")
            tokens = getattr(image, "pooler_output", None)
            ids = call.get("input_ids")
            if tokens is not None and ids is not None and call.get("inputs_embeds") is None and projects_in_forward():
                # the forward would project the tower's output itself: the rows go in as inputs_embeds,
                # written at the placeholders as that forward writes its projected features
                call.pop("mm_encoder_outputs")
                embeds = self.inner.get_input_embeddings()(call.pop("input_ids"))
                spots = torch.nonzero(ids == self.image_token_id, as_tuple=True)
                call["inputs_embeds"] = embeds.index_put(spots, tokens.to(embeds))
            return original(**call)

        return super()._forward(joined, *args, **kwargs)

    @classmethod
    def load(
        cls, model_id: str, dtype: Any = "auto", device_map: Any = None, model_kwargs: dict[str, Any] | None = None, **hub: Any
    ) -> tuple[Any, Any]:
        """As :meth:`Family.load`; where torchvision (which ``Llama4ImageProcessor`` needs) is missing,
        the processor is built with :func:`tiny_image_processor`'s class on the saved settings (same
        tiling, PIL resizing: pixel values differ slightly from the stock processor's), with a warning."""
        from transformers import AutoProcessor, AutoTokenizer, Llama4Processor

        kwargs: dict[str, Any] = {"dtype": dtype, **hub, **(model_kwargs or {})}
        if device_map is not None:
            kwargs["device_map"] = device_map
        model = cls.hf_classes()[0].from_pretrained(model_id, **kwargs).eval()
        try:
            return model, AutoProcessor.from_pretrained(model_id, **hub)
        except (ImportError, ValueError, OSError) as exc:
            if "torchvision" not in str(exc).lower():
                raise
        warnings.warn(
            "Llama4ImageProcessor needs torchvision, which is not installed: globalcom2 uses a PIL image processor with "
            "the same tiling (pixel values differ slightly); install torchvision for the stock one",
            stacklevel=2,
        )
        ip = _tiny_image_processor_class().from_pretrained(model_id, **hub)
        return model, Llama4Processor(image_processor=ip, tokenizer=AutoTokenizer.from_pretrained(model_id, **hub))

    # -- for the tools --------------------------------------------------------------------------
    #: The tiny test model (globalcom2.tiny): Llama4Processor with a PIL image processor of the
    #: published tiling (336 px tiles, 16 at most), the 336/14 tower with its class token and pixel
    #: shuffle 0.5 (144 tokens per tile), a Llama 4 MoE text model a few dozen wide.
    tiny = TinyGeometry(
        special_tokens=dict(SPECIAL_TOKENS),
        processor="Llama4Processor",
        image_processor="globalcom2.models.llama4.tiny_image_processor",
        image_processor_kwargs={"size": {"height": VIEW_SIZE, "width": VIEW_SIZE}, "max_patches": MAX_PATCHES},
        processor_kwargs={"patch_size": PATCH_SIZE, "pixel_shuffle_ratio": SHUFFLE_RATIO},
        vision=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vision_output_dim=64,
                    projector_input_dim=64, projector_output_dim=64),
        text=dict(hidden_size=64, intermediate_size=64, intermediate_size_mlp=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, num_local_experts=2, num_experts_per_tok=1, interleave_moe_layer_step=2,
                  max_position_embeddings=16384, attention_chunk_size=16384),
    )

    @classmethod
    def tiny_config(cls, tokenizer: Any, vision: dict[str, Any], text: dict[str, Any], **options: Any) -> Any:
        """A ``Llama4Config`` with the checkpoints' image geometry (336 px tiles, 14 px patches, pixel
        shuffle 0.5): a tower of ``vision`` (its ``intermediate_size`` is 4 x ``hidden_size``, what the
        pixel-shuffle MLP reads) and a Llama 4 text model of ``text``."""
        from transformers import Llama4Config, Llama4TextConfig, Llama4VisionConfig

        ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in SPECIAL_TOKENS.items()}
        vision_config = Llama4VisionConfig(image_size=VIEW_SIZE, patch_size=PATCH_SIZE, pixel_shuffle_ratio=SHUFFLE_RATIO, **vision)
        return Llama4Config(
            vision_config=vision_config.to_dict(), text_config=Llama4TextConfig(**text).to_dict(),
            image_token_index=ids["patch_token"], boi_token_index=ids["boi_token"], eoi_token_index=ids["eoi_token"],
            pad_token_id=tokenizer.pad_token_id, **options,
        )

    @classmethod
    def tiny_init(cls, model: Any) -> None:
        """Keep the tower's rotary angles complex: ``nn.Module.to(dtype)`` (the tiny builder's cast, a
        test's ``model.to(torch.float64)``) casts a complex buffer to real, which would drop the
        rotation. The angles become a plain attribute of this instance (non-persistent anyway; the
        rotary module moves them to the input's device at every call)."""
        rotary = model.vision_model.rotary_embedding
        freqs = rotary._buffers.pop("freqs_ci")
        object.__setattr__(rotary, "freqs_ci", freqs)

    @classmethod
    def max_visual_tokens(cls, config: Any) -> int:
        """(max_patches tiles + the global tile) x tokens per tile: 17 x 144 = 2,448 for the checkpoints."""
        ratio = float(_get(_get(config, "vision_config"), "pixel_shuffle_ratio", SHUFFLE_RATIO) or SHUFFLE_RATIO)
        return max_tiled_tokens(config, ratio, int(_get(config, "max_patches", MAX_PATCHES) or MAX_PATCHES))

    @classmethod
    def default_max_visual_tokens(cls) -> int:
        return cls.max_visual_tokens({"vision_config": {"image_size": VIEW_SIZE, "patch_size": PATCH_SIZE}})

    @classmethod
    def picture_views(cls, image: Any, geom: CropGeometry | None, view: int) -> tuple[Any, Any, Any]:
        """As the processor makes the views: the global tile is the whole image squeezed to one view;
        the tiles cover the image resized without distortion into the ``rows x cols`` canvas, padded
        at the right and bottom."""
        import numpy as np
        from PIL import Image

        from .._io import to_rgb

        image = to_rgb(image)
        thumb = np.asarray(image.resize((view, view), Image.Resampling.BILINEAR))
        if geom is None:
            return thumb, None, None
        h, w = geom.grid_h * view, geom.grid_w * view
        nh, nw = resized_size(image.height, image.width, (geom.grid_h, geom.grid_w), view)
        canvas = np.zeros((h, w, 3), dtype=np.uint8)
        canvas[:nh, :nw] = np.asarray(image.resize((nw, nh), Image.Resampling.BILINEAR))
        return thumb, canvas, {"height": h, "width": w, "new_height": nh, "new_width": nw, "top": 0, "left": 0}
