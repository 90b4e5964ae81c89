"""GlobalCom2 for Hugging Face Idefics3 and SmolVLM (``Idefics3ForConditionalGeneration`` /
``Idefics3Model``, ``SmolVLMForConditionalGeneration`` / ``SmolVLMModel``: ``HuggingFaceM4/Idefics3-8B-Llama3``,
``HuggingFaceTB/SmolVLM-Instruct``, ``SmolVLM-256M-Instruct``, ``SmolVLM-500M-Instruct``).

What the model does (read from ``transformers`` 5.x ``modeling_idefics3`` / ``modeling_smolvlm``,
their processors and their PIL image processors):

* The image processor resizes an image so that its longest edge is ``size["longest_edge"]``
  (4 x 364 = 1456 px for Idefics3), then each side up to a multiple of the view size
  ``max_image_size["longest_edge"]`` (364 / 384 / 512), and cuts it into ``rows x cols`` crops of
  that size, row by row; the whole image squeezed to one view comes **last** (the global view).
  An image that fits one view (or ``do_image_splitting=False``) is that one view. No padding inside
  a view: every crop token is image.
* The text of a split image is one placeholder run per view with text between the runs:
  ``<fake_token_around_image><row_1_col_1><image>*L`` for each crop (a ``\\n`` after each crop row),
  then ``\\n<fake_token_around_image><global-img><image>*L<fake_token_around_image>``; a single
  view is ``<fake_token_around_image><global-img><image>*L<fake_token_around_image>``.
* The vision tower is SigLIP (no [CLS]); its last hidden state (after ``post_layernorm``) goes to the
  connector, whose ``pixel_shuffle`` folds each ``s x s`` block of patches into one token
  (``scale_factor`` s: 2 for Idefics3, 3 for SmolVLM-Instruct, 4 for SmolVLM-256M/500M) before the
  projection: S = (image_size / patch_size) / s tokens per side, N = S * S = ``image_seq_len``.

How GlobalCom2 maps onto it (``SPEC.md``, "Any further family with a global view"):

* Importance: ``"auto"`` / ``"similarity"`` (the default, SigLIP has no [CLS]): ``-cos`` of each
  *patch* at the connector's input (the feature layer: what the projector receives) to the view's
  mean patch, then a token's importance is the mean over the ``s * s`` patches folded into it,
  found by pushing an index map through the model's own ``connector.pixel_shuffle`` (as InternVL
  maps its [CLS] logits). ``"attention_received"`` (an ablation) is the attention each patch
  receives at the tower's last layer (captured q/k, query chunks), folded the same way. ``"cls"``
  raises a ``ValueError``.
* Views go to the methods **global view first** with a no-padding
  :class:`~globalcom2.core.geometry.CropGeometry` of the processor's crop grid; :meth:`compress`
  maps the result back to the model's order (crops row by row, each its kept tokens in raster
  order, then the global view's), so every method runs unchanged. One view only: Step 1 on it.
* Sequence: every view keeps its own placeholder run, shortened to the view's kept count; the tags
  and newlines between runs stay (:meth:`placeholder_runs`, :class:`globalcom2.core.sequence.ViewRuns`).
  With every token kept it is the vanilla sequence. With ``count="fixed"`` the image's total is
  the fixed count and its split over the views is the one the size alone gives (what a count-first
  processor writes before the tower runs): the kept tokens fill the image's runs in order, so the
  model-shortened prompt and the processor's prompt are the same sequence.
* The views of each image and its crop grid come from the prompt, which is all the model gets
  (the processor keeps ``rows`` / ``cols`` to itself): the runs are read from ``input_ids``
  (:func:`globalcom2.core.sequence.tagged_runs`); an image ends with the run after ``<global-img>``
  (its id: the processor's when one was given to ``apply``, else the token before each row's last
  run); the grid comes from the text between crop runs (one token, ``<fake_token_around_image>``,
  between crops of a row; one more, the ``\\n``, between rows), else from the pixels
  (:func:`globalcom2.core.tiles.infer_tile_grid`). ``image_grids=[(rows, cols), ...]`` given with
  the call overrides it ((0, 0): one view).
* Layout: ``spatial`` only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Sequence

from .._lazy import lazy_module
from .base import Family, TinyGeometry, register_family
from .capture import QKCapture
from .images import CompressedImages, EncodedImages
from .tiled import PerViewRuns

if TYPE_CHECKING:  # pragma: no cover
    from ..core.geometry import CropGeometry

torch = lazy_module("torch")
tiles = lazy_module("globalcom2.core.tiles")
sequence = lazy_module("globalcom2.core.sequence")

#: The image processors' hard cap on the resized image's longest edge (``MAX_IMAGE_SIZE``).
MAX_IMAGE_SIZE = 4096
#: Crop tags the processors can write (``<row_1_col_1>`` ... ``<row_6_col_6>``).
MAX_TAG_GRID = 6
VIEW_TAGS = tuple(f"<row_{i + 1}_col_{j + 1}>" for i in range(MAX_TAG_GRID) for j in range(MAX_TAG_GRID))
#: The processors' special tokens, as the tokenizer attributes SmolVLM's processor reads.
SPECIAL_TOKENS = {
    "image_token": "<image>", "fake_image_token": "<fake_token_around_image>", "global_image_token": "<global-img>",
    "end_of_utterance_token": "<end_of_utterance>",
}


def _get(obj: Any, key: str, default: Any = None) -> Any:
    return obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)


def _pair(value: Any) -> int:
    return int(value[0]) if isinstance(value, (list, tuple)) else int(value)


def processor_grid(height: int, width: int, longest_edge: int, view: int, split: bool = True) -> tuple[int, int]:
    """(rows, cols) of the crops the image processor makes of a ``height x width`` image; (0, 0)
    when it makes one view. The rule of the processors' ``get_number_of_image_patches``: the
    longest edge to ``longest_edge`` (the other side ``int`` of the aspect, made even), both sides
    capped at 4096, then each side up to a multiple of ``view``."""
    if not split:
        return 0, 0
    h, w = int(height), int(width)
    aspect = w / h
    if w >= h:
        w = longest_edge
        h = int(w / aspect)
        h += h % 2
    else:
        h = longest_edge
        w = int(h * aspect)
        w += w % 2
    h, w = max(h, 1), max(w, 1)
    aspect = w / h
    if w >= h and w > MAX_IMAGE_SIZE:
        w, h = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif h > w and h > MAX_IMAGE_SIZE:
        h, w = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    h, w = max(h, 1), max(w, 1)
    rh, rw = math.ceil(h / view) * view, math.ceil(w / view) * view
    if rh > view or rw > view:
        return math.ceil(rh / view), math.ceil(rw / view)
    return 0, 0


@register_family
class Idefics3Family(PerViewRuns, Family):
    """Idefics3 (``transformers`` ``Idefics3ForConditionalGeneration`` / ``Idefics3Model``): SigLIP
    without [CLS], pixel shuffle, crops row by row then the global view, one placeholder run per
    view; ``spatial`` layout only (see the module's docstring for every decision)."""

    model_type = "idefics3"
    display_name = "Idefics3"
    example_checkpoint = "HuggingFaceM4/Idefics3-8B-Llama3"
    model_names = ("Idefics3ForConditionalGeneration", "Idefics3Model")
    layouts = ("spatial",)
    image_inputs = ("pixel_attention_mask", "image_grids")
    joins_image_rows = True  # transformers before 5.21 casts pooler_output as one tensor
    tower_kind = "a SigLIP-like"
    #: The public checkpoint's language model (Llama 3 8B), as :class:`globalcom2.efficiency.LMArch`
    #: fields (name, layers, hidden, heads, kv heads, head dim, intermediate, vocab): the
    #: ``text_config`` of its config.json (no download is possible in this project: the values as
    #: public code that parses that file quotes them; vocab 128259, Llama 3's 128256 + 3 added tokens).
    language_models: dict[str, tuple[Any, ...]] = {
        "HuggingFaceM4/Idefics3-8B-Llama3": ("llama3-8b", 32, 4096, 32, 8, 128, 14336, 128259),
    }
    default_text_model_type = "llama"
    #: The published checkpoint's geometry: longest edge 4 x 364 px, 364 px views, 14 px patches,
    #: pixel shuffle 2 (169 tokens per view).
    default_longest_edge, default_view, default_patch, default_scale = 4 * 364, 364, 14, 2
    #: The tiny test model (globalcom2.tiny): the processor with the published image settings (PIL
    #: image processor), a SigLIP tower and a Llama language model a few dozen wide.
    tiny = TinyGeometry(
        special_tokens={**SPECIAL_TOKENS, **{t[1:-1]: t for t in VIEW_TAGS}},
        processor="Idefics3Processor",
        image_processor="Idefics3ImageProcessorPil",
        image_processor_kwargs={"size": {"longest_edge": 4 * 364}, "max_image_size": {"longest_edge": 364}, "do_image_splitting": True},
        processor_kwargs={"image_seq_len": 169},
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=16384),
    )

    @classmethod
    def hf_classes(cls) -> tuple[type, ...]:
        from transformers import Idefics3ForConditionalGeneration, Idefics3Model

        return (Idefics3ForConditionalGeneration, Idefics3Model)

    # -- geometry -------------------------------------------------------------------------------
    @property
    def side(self) -> int:
        """S, tokens per view side after the pixel shuffle."""
        return self.patches // int(self.hf_config.scale_factor)

    def language_model(self) -> Any:
        return self.inner.text_model

    def vision_tower(self) -> Any:
        return self.inner.vision_model

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
        s = int(self.hf_config.scale_factor)
        if s < 1 or self.patches % s:
            raise ValueError(f"{self.display_name}'s pixel shuffle must fold {self.patches} patches evenly; scale_factor={s}")
        self.importance_mode()
        self.last_attention()

    def _shuffle_index(self, device: Any) -> torch.Tensor:
        """(N, s*s) long: the patches (raster index in the P x P grid) folded into each token, found by
        pushing an index map through the model's own ``connector.pixel_shuffle``."""
        p = self.patches
        grid = torch.arange(p * p, dtype=torch.float64).reshape(1, p * p, 1)
        folded = self.inner.connector.pixel_shuffle(grid, int(self.hf_config.scale_factor))  # (1, N, s*s)
        return folded.reshape(-1, folded.shape[-1]).round().long().to(device)

    def token_importance(self, patch_scores: torch.Tensor) -> torch.Tensor:
        """(V, P*P) patch importance -> (V, N) importance of the pixel-shuffled tokens (the mean
        over the patches folded into each)."""
        return patch_scores[:, self._shuffle_index(patch_scores.device)].mean(dim=-1)

    # -- the prompt's views ---------------------------------------------------------------------
    def _tag_ids(self) -> tuple[int | None, list[int] | None]:
        """(``<global-img>`` id, every view tag's id) from the processor given to ``apply``, else (None, None)."""
        proc = getattr(self.processor_patch, "processor", None)
        tok = getattr(proc, "tokenizer", None)
        if tok is None:
            return None, None
        glob = getattr(proc, "global_image_token", None) or getattr(proc, "global_image_tag", None) or "<global-img>"
        names = [glob, *VIEW_TAGS]
        ids = [tok.convert_tokens_to_ids(n) for n in names]
        unk = getattr(tok, "unk_token_id", None)
        if ids[0] is None or ids[0] == unk:
            return None, None
        return int(ids[0]), [int(i) for i in ids if i is not None and i != unk]

    def prompt_views(self, input_ids: torch.Tensor) -> list[tuple[list[int], tuple[int, int] | None]]:
        """Per image (reading order of the batch): its runs' lengths in the prompt (model order: crops
        row by row, then the global view) and its crop grid (None for one view; None too for a grid
        the text does not tell, then read from the pixels). One host copy of ``input_ids``."""
        glob, tags = self._tag_ids()
        rows = sequence.tagged_runs(input_ids, self.image_token_id, tags)
        if glob is None:  # every image ends with its global view: the tag before each row's last run
            ends = {views[-1][0] for views in rows if views}
            if len(ends) > 1:
                raise ValueError(
                    f"{self.display_name}: the prompts' image runs do not end alike ({sorted(ends)}); prepare inputs with "
                    "the model's own processor (each image ends with <global-img> and its run)"
                )
            glob = ends.pop() if ends else None
        images: list[tuple[list[int], tuple[int, int] | None]] = []
        for views in rows:
            crops: list[tuple[int, int, int]] = []
            for view in views:
                if view[0] != glob:
                    crops.append(view)
                    continue
                images.append(([c[2] for c in crops] + [view[2]], self._text_grid(crops) if crops else None))
                crops = []
            if crops:
                raise ValueError(
                    f"{self.display_name}: a prompt's image runs do not end with the global view's (<global-img>); "
                    "prepare inputs with the model's own processor"
                )
        return images

    @staticmethod
    def _text_grid(crops: Sequence[tuple[int, int, int]]) -> tuple[int, int] | None:
        """(rows, cols) from the text between crop runs: one token between crops of a row, two
        (``\\n`` too) where a row ends; None when the text does not read as a grid."""
        new_row = [b[1] - a[1] - a[2] - 1 > 1 for a, b in zip(crops, crops[1:])]
        cols = (new_row.index(True) + 1) if True in new_row else len(crops)
        if len(crops) % cols:
            return None
        want = [(k + 1) % cols == 0 for k in range(len(crops) - 1)]
        return (len(crops) // cols, cols) if new_row == want else None

    def _with_grids(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], list[list[int]] | None]:
        """``inputs`` with ``image_grids`` read from its ``input_ids`` (unless given), and the runs read."""
        if inputs.get("input_ids") is None:
            return inputs, None
        found = self.prompt_views(inputs["input_ids"])
        inputs = dict(inputs)
        if inputs.get("image_grids") is None:
            inputs["image_grids"] = [(0, 0) if len(r) == 1 else (g if g is not None else (-1, len(r) - 1)) for r, g in found]
        return inputs, [r for r, _ in found]

    def view_grid(self, inputs: Any, index: int = 0) -> tuple[int, int] | None:
        inputs, _ = self._with_grids(dict(inputs))
        grid = tuple(int(v) for v in inputs["image_grids"][index])
        if grid == (0, 0):
            return None
        if grid[0] > 0:
            return grid  # type: ignore[return-value]
        views = self._split_views(inputs["pixel_values"])
        start = sum(1 + (0 if tuple(g) == (0, 0) else abs(g[0] * g[1])) for g in inputs["image_grids"][:index])
        return tiles.infer_tile_grid(views[start : start + grid[1]], views[start + grid[1]], tiles.factor_grids(grid[1]))

    # -- vision side ----------------------------------------------------------------------------
    @staticmethod
    def _split_views(pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, M, 3, h, w) -> the real views (all-zero padding views dropped, as the model does)."""
        if pixel_values.dim() == 4:
            return pixel_values
        flat = pixel_values.reshape(-1, *pixel_values.shape[2:])
        real = (flat != 0).flatten(1).any(1)
        return flat[real]

    def encode_inputs(self, inputs: Any) -> EncodedImages:
        inputs, _ = self._with_grids(dict(inputs))
        return self.encode(inputs["pixel_values"], **{k: inputs[k] for k in self.image_inputs if k in inputs})

    def encode(self, pixel_values: torch.Tensor, pixel_attention_mask: Any = None, image_grids: Any = None) -> EncodedImages:
        """Run the model's ``get_image_features``, capturing the connector's input (similarity) or the
        last layer's q/k (attention received).

        Args:
            pixel_values: (B, M, 3, h, w) as the processor writes them (all-zero views are padding).
            pixel_attention_mask: the processor's, passed on.
            image_grids: per image (rows, cols) of its crops, (0, 0) for one view ((-1, C): C crops,
                grid read from the pixels); :meth:`prepare_inputs` reads them from the prompt.

        Returns:
            :class:`EncodedImages`: per image (V, N, D) features and (V, N) importance, **global
            view first**, a no-padding geometry (None for one view).
        """
        if image_grids is None:
            raise ValueError(
                f"{self.display_name} needs each image's views: call the model with the processor's input_ids "
                "(its <image> runs give them) or pass image_grids=[(rows, cols), ...]"
            )
        grids = [tuple(int(v) for v in g) for g in (image_grids.tolist() if torch.is_tensor(image_grids) else image_grids)]
        views = [1 if g == (0, 0) else 1 + abs(g[0] * g[1]) for g in grids]
        kind = self.importance_mode()
        attn = self.last_attention()
        with QKCapture(attn, all_queries=kind == "attention_received", inputs_of=self.inner.connector) as cap:
            out = self.inner.get_image_features(pixel_values=pixel_values, pixel_attention_mask=pixel_attention_mask, return_dict=True)
        pooled = out.pooler_output
        feats = torch.cat(list(pooled), dim=0) if isinstance(pooled, (list, tuple)) else pooled
        n = self.tokens_per_view
        feats = feats.reshape(-1, n, feats.shape[-1])  # (sum V, N, D)
        if feats.shape[0] != sum(views):
            raise ValueError(f"pixel_values hold {feats.shape[0]} views but the prompts' images need {sum(views)}")
        from ..core import importance as importance_ops

        if kind == "similarity":
            patch_scores = importance_ops.feature_similarity(cap.inputs)  # (V, P*P), on the connector's input
        else:
            patch_scores = importance_ops.attention_received(cap.queries.detach(), cap.keys.detach(), attn.num_heads, attn.scale)
        importance = self.token_importance(patch_scores).to(feats.device)  # (V, N)

        side, view = self.side, self.view_size
        pv = self._split_views(pixel_values) if any(g[0] < 0 for g in grids) else None
        features, importances, geoms, sizes = [], [], [], []
        start = 0
        for g, f, imp in zip(grids, torch.split(feats, views), torch.split(importance, views)):
            if g == (0, 0):
                geoms.append(None)
                sizes.append((view, view))
            else:
                if g[0] < 0:
                    g = tiles.infer_tile_grid(pv[start : start + g[1]], pv[start + g[1]], tiles.factor_grids(g[1]))
                geoms.append(tiles.full_geometry(g, side))
                sizes.append((g[0] * view, g[1] * view))
            start += f.shape[0]
            features.append(tiles.thumbnail_first(f))
            importances.append(tiles.thumbnail_first(imp))
        return EncodedImages(features=features, importance=importances, geometries=geoms, image_sizes=sizes,
                             vanilla_counts=[v * n for v in views])

    # -- per-view placeholder runs --------------------------------------------------------------
    def placeholder_runs(self, input_ids: torch.Tensor, compressed: CompressedImages) -> Any:
        """The prompt's runs and the runs the language model gets, per image and view
        (:class:`globalcom2.core.sequence.ViewRuns`): each view's run is shortened to its count."""
        found = self.prompt_views(input_ids)
        kept = self._kept_runs(self._plan_grids(compressed), compressed.plans, self.vision_config)
        return sequence.ViewRuns(prompt=[r for r, _ in found], kept=kept)

    # -- counts from the size (count first) -----------------------------------------------------
    def _grid_of(self, hw: tuple[int, int], processor: Any = None) -> tuple[int, int]:
        """(rows, cols) of one image size by the processor's rule (its ``get_number_of_image_patches``;
        without one, the published checkpoints' settings: the longest edge to 4 views); (0, 0): one view."""
        ip = getattr(processor, "image_processor", processor)
        if ip is not None and hasattr(ip, "get_number_of_image_patches"):
            _, rows, cols = ip.get_number_of_image_patches(int(hw[0]), int(hw[1]), {})
            return int(rows), int(cols)
        return processor_grid(hw[0], hw[1], self.default_longest_edge * self.view_size // self.default_view, self.view_size)

    @staticmethod
    def _processed_grids(image_inputs: Any) -> list[tuple[int, int]]:
        """The grids a processor's image output reports (``rows`` / ``cols``, which it keeps while it writes the text)."""
        rows = [int(r) for rs in image_inputs["rows"] for r in rs]
        cols = [int(c) for cs in image_inputs["cols"] for c in cs]
        return list(zip(rows, cols))

    @classmethod
    def runs_text(cls, processor: Any, image_inputs: Any, image_idx: int, runs: Sequence[int]) -> str:
        """The processor's text for one image with each view's run of ``runs[v]`` placeholders."""
        rows, cols = cls._processed_grids(image_inputs)[image_idx]
        fake, image = processor.fake_image_token, processor.image_token
        glob = getattr(processor, "global_image_token", None) or getattr(processor, "global_image_tag", "<global-img>")
        text = ""
        for i in range(rows):
            for j in range(cols):
                text += f"{fake}<row_{i + 1}_col_{j + 1}>" + image * int(runs[i * cols + j])
            text += "\n"
        if rows:
            text += "\n"
        return text + f"{fake}{glob}" + image * int(runs[-1]) + fake

    # -- language side --------------------------------------------------------------------------
    def prepare_inputs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """As :meth:`Family.prepare_inputs`, with the images' views and grids read from the prompt."""
        if kwargs.get("pixel_values") is not None:
            kwargs, _ = self._with_grids(dict(kwargs))
        return super().prepare_inputs(kwargs)

    # -- for the tools --------------------------------------------------------------------------
    @classmethod
    def tiny_config(cls, tokenizer: Any, vision: dict[str, Any], text: dict[str, Any], **options: Any) -> Any:
        """The family's config with the published geometry (view, patch, pixel shuffle): a SigLIP
        tower of ``vision`` and a Llama language model of ``text``."""
        import transformers

        name = cls.hf_classes()[0].__name__.replace("ForConditionalGeneration", "")
        vision_config = getattr(transformers, f"{name}VisionConfig")(image_size=cls.default_view, patch_size=cls.default_patch, **vision)
        return getattr(transformers, f"{name}Config")(
            vision_config=vision_config.to_dict(), text_config=transformers.LlamaConfig(**text).to_dict(),
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=cls.default_scale,
            pad_token_id=tokenizer.pad_token_id, **options,
        )

    @classmethod
    def max_visual_tokens(cls, config: Any) -> int:
        """(4 x 4 crops + the global view) x tokens per view: the longest edge is 4 views."""
        vision = _get(config, "vision_config")
        size, patch = _get(vision, "image_size"), _get(vision, "patch_size")
        if size is None or patch is None:
            raise ValueError("the config has no vision_config.image_size/patch_size")
        side = _pair(size) // _pair(patch) // int(_get(config, "scale_factor", 2) or 2)
        return 17 * side * side

    @classmethod
    def default_max_visual_tokens(cls) -> int:
        return cls.max_visual_tokens(
            {"vision_config": {"image_size": cls.default_view, "patch_size": cls.default_patch}, "scale_factor": cls.default_scale}
        )

    @classmethod
    def picture_views(cls, image: Any, geom: CropGeometry | None, view: int) -> tuple[Any, Any, Any]:
        """As the processor makes the views: the global view is the whole image squeezed to one view;
        the crops cover the image resized to ``(rows * view, cols * view)``, no padding."""
        import numpy as np
        from PIL import Image

        from .._io import to_rgb

        image = to_rgb(image)
        thumb = np.asarray(image.resize((view, view), Image.Resampling.LANCZOS))
        if geom is None:
            return thumb, None, None
        h, w = geom.grid_h * view, geom.grid_w * view
        canvas = np.asarray(image.resize((w, h), Image.Resampling.LANCZOS)).copy()
        return thumb, canvas, {"height": h, "width": w, "new_height": h, "new_width": w, "top": 0, "left": 0}


@register_family
class SmolVLMFamily(Idefics3Family):
    """SmolVLM (``SmolVLMForConditionalGeneration`` / ``SmolVLMModel``): Idefics3's geometry and prompt."""

    model_type = "smolvlm"
    display_name = "SmolVLM"
    example_checkpoint = "HuggingFaceTB/SmolVLM-256M-Instruct"
    model_names = ("SmolVLMForConditionalGeneration", "SmolVLMModel")
    min_transformers = "5.21"  # before, SmolVLM's merger cuts the image rows into fixed-length views
    #: SmolVLM-256M / 500M's language models (SmolLM2-135M / 360M; their ``text_config``, vocab 49280
    #: with the image tokens), the checkpoints of the default geometry below. SmolVLM-Instruct (2B:
    #: 384 px views, pixel shuffle 3) is supported but not listed: its visual-token cap is not the
    #: default's (efficiency reads it from a local config.json).
    language_models: dict[str, tuple[Any, ...]] = {
        "HuggingFaceTB/SmolVLM-256M-Instruct": ("smollm2-135m", 30, 576, 9, 3, 64, 1536, 49280),
        "HuggingFaceTB/SmolVLM-500M-Instruct": ("smollm2-360m", 32, 960, 15, 5, 64, 2560, 49280),
    }
    #: SmolVLM-256M / 500M's geometry: longest edge 4 x 512 px, 512 px views, 16 px patches, pixel
    #: shuffle 4 (64 tokens per view).
    default_longest_edge, default_view, default_patch, default_scale = 4 * 512, 512, 16, 4
    #: SmolVLM's processor: its constructor wants a video processor (torchvision) and ``num2words``,
    #: both for videos only (globalcom2.tiny leaves the first out and stands in for the second).
    tiny = dataclasses.replace(
        Idefics3Family.tiny,  # type: ignore[arg-type]
        processor="SmolVLMProcessor",
        image_processor="SmolVLMImageProcessorPil",
        image_processor_kwargs={"size": {"longest_edge": 4 * 512}, "max_image_size": {"longest_edge": 512}, "do_image_splitting": True},
        processor_kwargs={"image_seq_len": 64},
        video_processor="SmolVLMVideoProcessor",
        video_only_imports=("num2words",),
    )

    @classmethod
    def hf_classes(cls) -> tuple[type, ...]:
        from transformers import SmolVLMForConditionalGeneration, SmolVLMModel

        return (SmolVLMForConditionalGeneration, SmolVLMModel)
