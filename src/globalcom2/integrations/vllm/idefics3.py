"""Idefics3 and SmolVLM (``Idefics3ForConditionalGeneration``, ``SmolVLMForConditionalGeneration``)
with GlobalCom2: subclasses of vLLM's own model, processing info and multimodal processor.

* Placeholders: the Hugging Face processor's text with one run per view (crops row by row between
  ``<fake_token_around_image><row_i_col_j>`` tags, then ``<global-img>`` and the global view's run),
  each run the view's fixed kept count (``count="fixed"``: the family's ``processed_runs``, the
  planning on constant importance), the text written by the family's ``runs_text`` (what the
  Hugging Face count-first path writes). The crop grid is vLLM's own (the image processor's
  ``get_number_of_image_patches`` with the request's kwargs), carried to the model per image.
* Encoder: vLLM's tower and connector run once on every view; importance = the family's rule:
  ``similarity`` on the connector's input (the tower's output), or ``attention_received`` at the
  tower's last layer (an ablation; the hidden state entering it captured while vLLM's tower runs,
  a replicated norm + q/k module), folded onto the pixel-shuffled tokens by pushing an index map
  through vLLM's own ``connector.pixel_shuffle``; then the family's ``compress`` per ratio
  (:func:`._common.compress_groups`), which puts each image's kept tokens in the model's order.
* SmolVLM's processor checks for ``num2words`` (videos only) when it is built: where that package
  is missing it is built with the repo's stand-in (:func:`globalcom2.tiny.video_only_stand_ins`),
  GlobalCom2 on or off; images behave as with the stock processor.
* Precomputed image embeddings stay as vLLM handles them; the encoder CUDA graph
  (``compilation_config.cudagraph_mm_encoder``) is refused with GlobalCom2 on (its outputs have the
  vanilla count).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any, ClassVar

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.idefics3 import (
    Idefics3DummyInputsBuilder,
    Idefics3ForConditionalGeneration,
    Idefics3MultiModalProcessor,
    Idefics3ProcessingInfo,
)
from vllm.model_executor.models.smolvlm import SmolVLMForConditionalGeneration, SmolVLMProcessingInfo
from vllm.model_executor.models.utils import StageMissingLayer
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageProcessorItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdateDetails

from ...core import tiles
from ...models import family_for_model_type
from . import _common
from . import settings as _settings

#: Per-image field the processor adds (GlobalCom2 on): (rows, cols) of its crops, (0, 0) for one view.
GRID_FIELD = "globalcom2_grid"


def _family(model_type: str) -> Any:
    return family_for_model_type(model_type)


@lru_cache(maxsize=4096)
def _cached_runs(model_type: str, hf: _common._Key, config: Any, rows: int, cols: int) -> tuple[int, ...]:
    """Each view's fixed kept count (model order) of an image of ``rows x cols`` crops ((0, 0): one view)."""
    counter = _settings.counter(model_type, hf.config, config)
    return tuple(int(n) for n in counter.processed_runs(_image_inputs(rows, cols), None, config)[0])


def _image_inputs(rows: int, cols: int) -> dict[str, Any]:
    """One image's grid as the Hugging Face processor's image output reports it (what the family reads)."""
    return {"rows": [[int(rows)]], "cols": [[int(cols)]]}


class _Idefics3InfoMixin(_common.GlobalCom2InfoMixin):
    """Processing info of both model types: the crop grid (vLLM's) and each view's fixed run."""

    def globalcom2_grid(self, *, image_width: int, image_height: int, processor: Any, mm_kwargs: Mapping[str, object]) -> tuple[int, int]:
        """(rows, cols) of the crops vLLM's processor makes of an image of this size ((0, 0): one view)."""
        _, rows, cols = self._get_image_feature_grid_size(  # type: ignore[attr-defined]
            image_width=image_width, image_height=image_height, processor=processor,
            mm_kwargs=_settings.strip_request(mm_kwargs),
        )
        return int(rows), int(cols)

    def globalcom2_runs(self, config: Any, rows: int, cols: int) -> tuple[int, ...]:
        return _cached_runs(self.globalcom2_model_type, _common._Key(self.get_hf_config()), config, int(rows), int(cols))  # type: ignore[attr-defined]

    def globalcom2_text(self, config: Any, processor: Any, rows: int, cols: int) -> str:
        """The image's text with each view's fixed run (the family's ``runs_text``)."""
        runs = self.globalcom2_runs(config, rows, cols)
        return _family(self.globalcom2_model_type).runs_text(processor, _image_inputs(rows, cols), 0, runs)

    def get_num_image_tokens(self, *, image_width: int, image_height: int, processor: Any, mm_kwargs: Mapping[str, object]) -> int:
        config = self.globalcom2_active_config()
        if config is None:
            return super().get_num_image_tokens(  # type: ignore[misc]
                image_width=image_width, image_height=image_height, processor=processor, mm_kwargs=mm_kwargs
            )
        grid = self.globalcom2_grid(image_width=image_width, image_height=image_height, processor=processor, mm_kwargs=mm_kwargs)
        return sum(self.globalcom2_runs(config, *grid))


class GlobalCom2Idefics3ProcessingInfo(_Idefics3InfoMixin, Idefics3ProcessingInfo):
    globalcom2_model_type = "idefics3"


class GlobalCom2SmolVLMProcessingInfo(_Idefics3InfoMixin, SmolVLMProcessingInfo):
    globalcom2_model_type = "smolvlm"

    def get_hf_processor(self, **kwargs: object) -> Any:
        """vLLM's, built with the stand-in for a missing video-only package (``num2words``)."""
        from transformers import SmolVLMProcessor

        from ... import tiny

        names = getattr(_family(self.globalcom2_model_type).tiny, "video_only_imports", ())
        with tiny.video_only_stand_ins(SmolVLMProcessor, tuple(names)):
            return super().get_hf_processor(**kwargs)


class GlobalCom2Idefics3MultiModalProcessor(_common.GlobalCom2ProcessorMixin, Idefics3MultiModalProcessor):
    """Both model types' processor (vLLM uses Idefics3's for SmolVLM too)."""

    def _apply_hf_processor_main(self, mm_items: Any, hf_kwargs: Mapping[str, object]) -> Any:
        out = super()._apply_hf_processor_main(mm_items, hf_kwargs)
        config = self.info.globalcom2_config(hf_kwargs)
        if config is None or out.get("pixel_values") is None or out.get("num_patches") is None:
            return out
        images = mm_items.get_items("image", ImageProcessorItems)
        processor = self.info.get_hf_processor(**_settings.strip_request(hf_kwargs))
        grids = []
        for i in range(len(images)):
            size = images.get_image_size(i)
            grids.append(self.info.globalcom2_grid(
                image_width=size.width, image_height=size.height, processor=processor, mm_kwargs=hf_kwargs,
            ))
        out[GRID_FIELD] = torch.tensor(grids, dtype=torch.long).reshape(-1, 2)
        if _common.RATIO_FIELD not in out:
            out[_common.RATIO_FIELD] = torch.full((len(grids),), float(config.retention_ratio), dtype=torch.float64)
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
        hf_processor = self.info.get_hf_processor(**_settings.strip_request(hf_processor_mm_kwargs))
        tokenizer = self.info.get_tokenizer()
        image_token_id = hf_processor.image_token_id

        def replacement(item_idx: int) -> Any:
            size = mm_items.get_items("image", ImageProcessorItems).get_image_size(item_idx)
            rows, cols = self.info.globalcom2_grid(
                image_width=size.width, image_height=size.height, processor=hf_processor, mm_kwargs=hf_processor_mm_kwargs,
            )
            text = self.info.globalcom2_text(config, hf_processor, rows, cols)
            ids = tokenizer.encode(text, add_special_tokens=False)
            return PromptUpdateDetails.select_token_id(ids, image_token_id)

        return [
            PromptReplacement(modality="image", target=[image_token_id], replacement=replacement) if u.modality == "image" else u
            for u in updates
        ]


class _GlobalCom2Idefics3Model:
    """The model side of both model types (before vLLM's class in the MRO)."""

    globalcom2_model_type: ClassVar[str] = ""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)  # type: ignore[call-arg]
        config = self.config  # type: ignore[attr-defined]
        self.globalcom2 = _settings.engine_config(self.globalcom2_model_type, config)
        self._globalcom2_request: tuple[Any, Any] = (None, None)
        if self.globalcom2 is None:
            return
        name = _family(self.globalcom2_model_type).display_name
        if getattr(vllm_config.compilation_config, "cudagraph_mm_encoder", False):
            raise ValueError(
                f"GlobalCom2 on {name} in vLLM does not run with the encoder CUDA graph "
                "(compilation_config.cudagraph_mm_encoder): its outputs have the vanilla token count; turn it off"
            )
        counter = _settings.counter(self.globalcom2_model_type, config, self.globalcom2)
        self.globalcom2_mode = counter.importance_mode()  # a one-line ValueError for importance='cls'
        if self.globalcom2_mode != "attention_received":
            return
        vc = config.vision_config
        with self._mark_tower_model(vllm_config, "image"):  # type: ignore[attr-defined]
            self.globalcom2_importance = _common.ClsImportance(
                vc.hidden_size, vc.num_attention_heads, torch.nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps),
            )

    def embed_multimodal(self, **kwargs: object) -> Any:
        ratios = kwargs.pop(_common.RATIO_FIELD, None)
        grids = kwargs.pop(GRID_FIELD, None)
        self._globalcom2_request = (ratios, grids)
        try:
            return super().embed_multimodal(**kwargs)  # type: ignore[misc]
        finally:
            self._globalcom2_request = (None, None)

    def _process_image_input(self, image_input: Any) -> Any:
        if self.globalcom2 is None or image_input["type"] != "pixel_values":
            return super()._process_image_input(image_input)  # type: ignore[misc]
        return self._globalcom2_images(image_input, *self._globalcom2_request)

    def _globalcom2_images(self, image_input: Any, ratios: Any, grids: Any) -> list[torch.Tensor]:
        model = self.model  # type: ignore[attr-defined]
        views = [int(v) for v in image_input["num_patches"].tolist()]
        vc = self.config.vision_config  # type: ignore[attr-defined]
        with _common.LastLayerInput(model.vision_model.encoder.layers, vc.num_hidden_layers,
                                    getattr(self, "globalcom2_importance", None)) as cap:
            hidden = self._process_image_pixels(image_input)  # type: ignore[attr-defined]  # (V, P*P, Dv): the connector's input
        feats = model.connector(hidden)  # (V, N, D)
        if self.globalcom2_mode == "attention_received":
            patch_scores = self.globalcom2_importance.attention_received(cap.result(hidden))
        else:
            patch_scores = _common.similarity(hidden)  # (V, P*P) float64
        p = int(round(hidden.shape[1] ** 0.5))
        grid = torch.arange(p * p, dtype=torch.float64, device=patch_scores.device).reshape(1, p * p, 1)
        index = model.connector.pixel_shuffle(grid, model.connector.scale_factor)
        index = index.reshape(-1, index.shape[-1]).round().long()  # (N, s*s) patches folded into each token
        importance = patch_scores[:, index].mean(dim=-1).to(feats.device)  # (V, N)
        side = _settings.counter(self.globalcom2_model_type, self.config, self.globalcom2).side  # type: ignore[attr-defined]
        image_grids = self._globalcom2_grids(grids, views, image_input["pixel_values"])
        features, imps, geoms = [], [], []
        for f, imp, g in zip(torch.split(feats, views), torch.split(importance, views), image_grids):
            geoms.append(None if g == (0, 0) else tiles.full_geometry(g, side))
            features.append(tiles.thumbnail_first(f))
            imps.append(tiles.thumbnail_first(imp))
        ratio_list = _common.request_ratios({_common.RATIO_FIELD: ratios}, len(views), self.globalcom2.retention_ratio)
        family = _family(self.globalcom2_model_type)
        return _common.compress_groups(family, self.config, self.globalcom2, ratio_list, features, imps, geoms, None)  # type: ignore[attr-defined]

    @staticmethod
    def _globalcom2_grids(grids: Any, views: list[int], pixel_values: torch.Tensor) -> list[tuple[int, int]]:
        """Each image's (rows, cols) from the processor's field; without it, read from the pixels
        (the crops' mosaic against the global view, which comes last)."""
        if grids is not None:
            rows = grids.reshape(-1, 2).tolist() if isinstance(grids, torch.Tensor) else [list(g) for g in grids]
            out = [(int(r), int(c)) for r, c in rows]
            if len(out) != len(views):
                raise ValueError(f"{len(out)} GlobalCom2 crop grids for {len(views)} images")
            return out
        out, start = [], 0
        for v in views:
            if v == 1:
                out.append((0, 0))
            else:
                pv = pixel_values[start : start + v]
                out.append(tuple(tiles.infer_tile_grid(pv[:-1], pv[-1], tiles.factor_grids(v - 1))))
            start += v
        return out

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        module = getattr(self, "globalcom2_importance", None)
        if module is None or isinstance(module, StageMissingLayer):  # similarity, or no tower (text only)
            return super().load_weights(weights)  # type: ignore[misc]
        last = self.config.vision_config.num_hidden_layers - 1  # type: ignore[attr-defined]
        return _common.load_weights_with_importance(
            self, weights, f"model.vision_model.encoder.layers.{last}.", _common.VIT_IMPORTANCE_NAMES  # type: ignore[arg-type]
        )


@MULTIMODAL_REGISTRY.register_processor(
    GlobalCom2Idefics3MultiModalProcessor,
    info=GlobalCom2Idefics3ProcessingInfo,
    dummy_inputs=Idefics3DummyInputsBuilder,
)
class GlobalCom2Idefics3ForConditionalGeneration(_GlobalCom2Idefics3Model, Idefics3ForConditionalGeneration):
    globalcom2_model_type = "idefics3"


@MULTIMODAL_REGISTRY.register_processor(
    GlobalCom2Idefics3MultiModalProcessor,
    info=GlobalCom2SmolVLMProcessingInfo,
    dummy_inputs=Idefics3DummyInputsBuilder,
)
class GlobalCom2SmolVLMForConditionalGeneration(_GlobalCom2Idefics3Model, SmolVLMForConditionalGeneration):
    globalcom2_model_type = "smolvlm"
