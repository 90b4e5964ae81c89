"""Command A Vision (``Cohere2VisionForConditionalGeneration``: ``CohereLabs/command-a-vision-07-2025``)
with GlobalCom2: subclasses of vLLM's own model, processing info and multimodal processor
(``cohere2_vision.py``). Vanilla vLLM when the config has no ``"globalcom2"`` entry. (vLLM 0.32 has no
Aya Vision, so the family's other model type is not served.)

* Placeholders: ``<|START_OF_IMG|>``, every view's ``<|IMG_PATCH|>`` run followed by
  ``<|IMG_LINE_BREAK|>`` (tiles row by row, then the thumbnail), ``<|END_OF_IMG|>``; each run the
  view's fixed kept count (``count="fixed"``: the family's ``processed_runs`` on vLLM's own view count,
  the planning on constant importance), the text written by the family's ``runs_text`` (what the
  Hugging Face count-first path writes). Only the runs are image tokens.
* Tile grid: no processor output carries it (the views are counted only). The processor adds it
  per image, by the family's rule (``size_layout``: Command A's own tiling) with the image
  processor's settings and the request's; where that disagrees with vLLM's view count (a setting
  the rule does not know) the model reads it from the pixels as the Hugging Face family does
  (:func:`globalcom2.core.tiles.infer_tile_grid`: the tiles' mosaic against the thumbnail). The grid
  changes which thumbnail region commands which tile, never a count.
* Encoder: vLLM's SigLIP tower runs once on every view of the step, then its projector. Importance =
  the family's rule: ``similarity`` on the projector's input (the tower's output), or
  ``attention_received`` at the tower's last layer (an ablation: the hidden state entering it captured
  while vLLM's tower runs, a replicated norm + q/k module loaded from the checkpoint); ``cls`` is
  refused (SigLIP has no [CLS]). Patch scores go onto the pixel-shuffled tokens by pushing an index
  map through vLLM's own ``multi_modal_projector.pixel_shuffle`` (the mean of the patches folded into
  each token). Then the family's ``compress`` per ratio (:func:`._common.compress_groups`), which puts
  each image's kept tokens in the model's order.
* The encoder CUDA graph (``compilation_config.cudagraph_mm_encoder``) is refused with GlobalCom2 on
  (its outputs have the vanilla count).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.cohere2_vision import (
    Cohere2VisionDummyInputsBuilder,
    Cohere2VisionForConditionalGeneration,
    Cohere2VisionMultiModalProcessor,
    Cohere2VisionProcessingInfo,
)
from vllm.model_executor.models.utils import StageMissingLayer
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageProcessorItems
from vllm.multimodal.processing import PromptUpdateDetails, cached_encode

from ...core import tiles
from ...models import family_for_model_type
from . import _common
from . import settings as _settings

#: The globalcom2 family of these checkpoints (from the registry).
FAMILY = family_for_model_type("cohere2_vision")
#: Per-image field the processor adds (GlobalCom2 on): (rows, cols) of its tiles, (0, 0) for one
#: view, (-1, C) for C tiles whose arrangement the model reads from the pixels.
GRID_FIELD = "globalcom2_grid"
#: The image processor's settings the family's tiling rule reads (a request may override them).
_TILING_SETTINGS = ("size", "max_patches", "crop_to_patches")


@lru_cache(maxsize=4096)
def _cached_runs(hf: _common._Key, config: Any, views: int) -> tuple[int, ...]:
    """Each view's fixed kept count (model order) of an image of ``views`` views under ``config``."""
    counter = _settings.counter(FAMILY.model_type, hf.config, config)
    return tuple(int(n) for n in counter.processed_runs(_image_inputs(views), None, config)[0])


def _image_inputs(views: int) -> dict[str, Any]:
    """One image's views as the Hugging Face processor's image output reports them (what the family reads)."""
    return {"num_patches": [int(views)]}


class GlobalCom2Cohere2VisionProcessingInfo(_common.GlobalCom2InfoMixin, Cohere2VisionProcessingInfo):
    globalcom2_model_type = FAMILY.model_type

    def globalcom2_runs(self, config: Any, views: int) -> tuple[int, ...]:
        return _cached_runs(_common._Key(self.get_hf_config()), config, int(views))

    def globalcom2_text(self, config: Any, processor: Any, views: int) -> str:
        """The image's text with each view's fixed run (the family's ``runs_text``)."""
        return FAMILY.runs_text(processor, _image_inputs(views), 0, self.globalcom2_runs(config, views))

    def globalcom2_grid(self, config: Any, *, image_width: int, image_height: int, processor: Any,
                        mm_kwargs: Mapping[str, object], views: int) -> tuple[int, int]:
        """(rows, cols) of the tiles of an image of this size by the family's rule, with the image
        processor's settings under the request's; (0, 0) for one view; (-1, C) where the rule's
        views are not vLLM's ``views`` (the model then reads the arrangement from the pixels)."""
        if int(views) <= 1:
            return 0, 0
        ip = processor.image_processor
        merged = self.ctx.get_merged_mm_kwargs(_settings.strip_request(mm_kwargs))
        rule = {k: merged.get(k, getattr(ip, k, None)) for k in _TILING_SETTINGS}
        found, geoms, _ = self.globalcom2_counter(config).size_layout([(int(image_height), int(image_width))], rule)
        if found[0] != int(views) or geoms[0] is None:
            return -1, int(views) - 1
        return int(geoms[0].grid_h), int(geoms[0].grid_w)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int] | None:
        """Any request's ratio may be up to 1, which keeps every token: the largest image's vanilla
        count, not the dummy image's at the engine's ratio."""
        config = self.globalcom2_config()
        if config is None:
            return super().get_mm_max_tokens_per_item(seq_len, mm_counts)
        size = self.get_image_size_with_most_features()
        views, _, n = self.globalcom2_counter(config).size_layout([(size.height, size.width)], self.get_hf_processor())
        return {"image": self.globalcom2_max_count(config, [(size.height, size.width)], views[0] * n)}


class GlobalCom2Cohere2VisionMultiModalProcessor(_common.GlobalCom2ProcessorMixin, Cohere2VisionMultiModalProcessor):
    def _apply_hf_processor_main(self, mm_items: Any, hf_kwargs: Mapping[str, object]) -> Any:
        out = super()._apply_hf_processor_main(mm_items, hf_kwargs)
        config = self.info.globalcom2_config(hf_kwargs)
        if config is None or out.get("pixel_values") is None or out.get("num_patches") is None:
            return out
        views = [int(v) for v in out["num_patches"].reshape(-1).tolist()]
        images = mm_items.get_items("image", ImageProcessorItems)
        processor = self.info.get_hf_processor(**_settings.strip_request(hf_kwargs))
        grids = []
        for i, v in enumerate(views):
            size = images.get_image_size(i)
            grids.append(self.info.globalcom2_grid(
                config, image_width=size.width, image_height=size.height, processor=processor, mm_kwargs=hf_kwargs, views=v,
            ))
        out[GRID_FIELD] = torch.tensor(grids, dtype=torch.long).reshape(-1, 2)
        if _common.RATIO_FIELD not in out:
            out[_common.RATIO_FIELD] = torch.full((len(views),), float(config.retention_ratio), dtype=torch.float64)
        return out

    def _get_mm_fields_config(self, hf_inputs: Any, hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping[str, Any]:
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        if GRID_FIELD in hf_inputs:
            fields[GRID_FIELD] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        return fields

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, object], out_mm_kwargs: Any) -> Sequence[Any]:
        updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))
        config = self.info.globalcom2_config(hf_processor_mm_kwargs)
        if config is None:
            return updates
        stripped = _settings.strip_request(hf_processor_mm_kwargs)
        hf_processor = self.info.get_hf_processor(**stripped)
        tokenizer = self.info.get_tokenizer()

        def replacement(item_idx: int) -> Any:
            size = mm_items.get_items("image", ImageProcessorItems).get_image_size(item_idx)
            views = self.info.get_num_patches(
                image_width=size.width, image_height=size.height, processor=hf_processor, mm_kwargs=stripped,
            )
            text = self.info.globalcom2_text(config, hf_processor, views)
            ids = cached_encode(tokenizer, text, add_special_tokens=False)
            return PromptUpdateDetails.select_token_id(ids, hf_processor.image_token_id)

        return [dataclasses.replace(u, replacement=replacement) if u.modality == "image" else u for u in updates]


@MULTIMODAL_REGISTRY.register_processor(
    GlobalCom2Cohere2VisionMultiModalProcessor,
    info=GlobalCom2Cohere2VisionProcessingInfo,
    dummy_inputs=Cohere2VisionDummyInputsBuilder,
)
class GlobalCom2Cohere2VisionForConditionalGeneration(Cohere2VisionForConditionalGeneration):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = self.config
        self.globalcom2 = _settings.engine_config(FAMILY.model_type, config)
        self._globalcom2_request: tuple[Any, Any] = (None, None)
        if self.globalcom2 is None:
            return
        if getattr(vllm_config.compilation_config, "cudagraph_mm_encoder", False):
            raise ValueError(
                f"GlobalCom2 on {FAMILY.display_name} in vLLM does not run with the encoder CUDA graph "
                "(compilation_config.cudagraph_mm_encoder): its outputs have the vanilla token count; turn it off"
            )
        counter = _settings.counter(FAMILY.model_type, config, self.globalcom2)
        self.globalcom2_mode = counter.importance_mode()  # a one-line ValueError for importance='cls'
        if self.globalcom2_mode != "attention_received":
            return
        vc = config.vision_config
        with self._mark_tower_model(vllm_config, "image"):
            self.globalcom2_importance = _common.ClsImportance(
                vc.hidden_size, vc.num_attention_heads, torch.nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps),
            )

    def embed_multimodal(self, **kwargs: object) -> Any:
        ratios = kwargs.pop(_common.RATIO_FIELD, None)
        grids = kwargs.pop(GRID_FIELD, None)
        self._globalcom2_request = (ratios, grids)
        try:
            return super().embed_multimodal(**kwargs)
        finally:
            self._globalcom2_request = (None, None)

    def _process_image_input(self, image_input: Any, **kwargs: object) -> list[torch.Tensor]:
        if self.globalcom2 is None:
            return super()._process_image_input(image_input, **kwargs)
        return self._globalcom2_images(image_input, *self._globalcom2_request)

    def _globalcom2_images(self, image_input: Any, ratios: Any, grids: Any) -> list[torch.Tensor]:
        pixel_values = image_input["pixel_values"]
        views = [int(v) for v in image_input["num_patches"].tolist()]
        vc = self.config.vision_config
        with _common.LastLayerInput(self.vision_tower.vision_model.encoder.layers, vc.num_hidden_layers,
                                    getattr(self, "globalcom2_importance", None)) as cap:
            hidden = self.vision_tower(pixel_values)  # (V, P*P, Dv): the projector's input
        projector = self.multi_modal_projector
        feats = projector(hidden)  # (V, S, S, D)
        feats = feats.reshape(feats.shape[0], -1, feats.shape[-1])  # (V, N, D), raster order
        if self.globalcom2_mode == "attention_received":
            patch_scores = self.globalcom2_importance.attention_received(cap.result(hidden))
        else:
            patch_scores = _common.similarity(hidden)  # (V, P*P) float64
        p = int(round(hidden.shape[1] ** 0.5))
        grid = torch.arange(p * p, dtype=torch.float64, device=patch_scores.device).reshape(1, p * p, 1)
        index = projector.pixel_shuffle(grid)
        index = index.reshape(-1, index.shape[-1]).round().long()  # (N, d*d) patches folded into each token
        importance = patch_scores[:, index].mean(dim=-1).to(feats.device)  # (V, N)
        side = _settings.counter(FAMILY.model_type, self.config, self.globalcom2).side
        image_grids = self._globalcom2_grids(grids, views, pixel_values)
        features, imps, geoms = [], [], []
        for f, imp, g in zip(torch.split(feats, views), torch.split(importance, views), image_grids):
            geoms.append(None if g == (0, 0) else tiles.full_geometry(g, side))
            features.append(tiles.thumbnail_first(f))
            imps.append(tiles.thumbnail_first(imp))
        ratio_list = _common.request_ratios({_common.RATIO_FIELD: ratios}, len(views), self.globalcom2.retention_ratio)
        return _common.compress_groups(FAMILY, self.config, self.globalcom2, ratio_list, features, imps, geoms, None)

    @staticmethod
    def _globalcom2_grids(grids: Any, views: list[int], pixel_values: torch.Tensor) -> list[tuple[int, int]]:
        """Each image's (rows, cols) from the processor's field; (-1, C) entries, and every image
        without the field, read from the pixels (the tiles' mosaic against the thumbnail, which comes last)."""
        if grids is not None:
            rows = grids.reshape(-1, 2).tolist() if isinstance(grids, torch.Tensor) else [list(g) for g in grids]
            given = [(int(r), int(c)) for r, c in rows]
            if len(given) != len(views):
                raise ValueError(f"{len(given)} GlobalCom2 tile grids for {len(views)} images")
        else:
            given = [(0, 0) if v == 1 else (-1, v - 1) for v in views]
        out, start = [], 0
        for v, g in zip(views, given):
            if v > 1 and g[0] < 0:
                pv = pixel_values[start : start + v]
                g = tuple(tiles.infer_tile_grid(pv[:-1], pv[-1], tiles.factor_grids(v - 1)))
            out.append((0, 0) if v == 1 else (int(g[0]), int(g[1])))
            start += v
        return out

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        module = getattr(self, "globalcom2_importance", None)
        if module is None or isinstance(module, StageMissingLayer):  # similarity, or no tower (text only)
            return super().load_weights(weights)
        last = self.config.vision_config.num_hidden_layers - 1
        return _common.load_weights_with_importance(
            self, self.hf_to_vllm_mapper.apply(weights), f"vision_tower.vision_model.encoder.layers.{last}.",
            _common.VIT_IMPORTANCE_NAMES,
        )
