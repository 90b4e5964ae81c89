"""LLaVA-NeXT in vLLM with GlobalCom2: a subclass of vLLM's ``LlavaNextForConditionalGeneration``,
its processing info and processor. Vanilla vLLM when the config has no ``"globalcom2"`` entry.

* Placeholders: each image gets its fixed count (:meth:`Family.count_visual_tokens`, the same
  planning code as the compression, on constant importance) for the request's settings.
* Encoder: vLLM's CLIP tower up to the feature layer, run once; its output (with [CLS]) is the
  hidden state entering the last layer, from which :class:`~._common.ClsImportance` computes the
  last layer's [CLS] logits (norm + one query + keys); features as vLLM computes them; then every
  image of the step is compressed, batched per ratio (:func:`~._common.compress_groups`).
* ``vision_feature_select_strategy="full"`` (granite-vision: SigLIP, no [CLS], a list
  ``vision_feature_layer``): the features are vLLM's own (``_image_pixels_to_features``: the
  feature layers' hidden states concatenated, every token); ``importance="auto"`` is
  ``similarity`` on them, ``cls`` is refused, ``attention_received`` reads the hidden state
  entering the tower's last layer where vLLM builds that layer (refused where it does not, with
  several feature layers).
* Precomputed image embeddings of different lengths may share a step (vLLM's schema fixed one
  length per batch), with or without GlobalCom2.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextImagePixelInputs,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.utils.tensor_schema import TensorSchema, TensorShape

from ...models import family_for_model_type
from . import _common
from .settings import engine_config

#: The globalcom2 family of these checkpoints (from the registry).
FAMILY = family_for_model_type("llava_next")


class GlobalCom2LlavaNextProcessingInfo(_common.GlobalCom2SizeCountMixin, LlavaNextProcessingInfo):
    globalcom2_model_type = FAMILY.model_type

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int] | None:
        config = self.globalcom2_config()
        if config is None:
            return super().get_mm_max_tokens_per_item(seq_len, mm_counts)
        sizes = [(int(h), int(w)) for h, w in self.get_hf_config().image_grid_pinpoints]
        vanilla = max(
            LlavaNextProcessingInfo.get_num_image_tokens(self, image_width=w, image_height=h) for h, w in sizes
        )
        return {"image": self.globalcom2_max_count(config, sizes, vanilla)}


class GlobalCom2LlavaNextMultiModalProcessor(
    _common.GlobalCom2ProcessorMixin, LlavaNextMultiModalProcessor[GlobalCom2LlavaNextProcessingInfo]
):
    """Placeholders from :meth:`GlobalCom2LlavaNextProcessingInfo.get_num_image_tokens`, which
    reads the request's config while its prompt updates are computed."""


class LlavaNextImageEmbeddingList(TensorSchema):
    """Precomputed image embeddings, one per image, of any length each.

    Dimensions: bn (images), ifs (tokens of an image: may differ per image), hs (hidden size)."""

    type: Literal["image_embeds"] = "image_embeds"
    data: Annotated[torch.Tensor | list[torch.Tensor], TensorShape("bn", "ifs", "hs", dynamic_dims={"ifs"})]


@MULTIMODAL_REGISTRY.register_processor(
    GlobalCom2LlavaNextMultiModalProcessor,
    info=GlobalCom2LlavaNextProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class GlobalCom2LlavaNextForConditionalGeneration(LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT with GlobalCom2 where the config asks for it (see the module's docstring)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = self.config
        self.globalcom2 = engine_config(FAMILY.model_type, config)
        if self.globalcom2 is None:
            return
        layer = config.vision_feature_layer
        #: "default": [CLS] dropped ("auto" = the [CLS] logits); "full": every token, no [CLS]
        #: ("auto" = similarity; "cls" refused by importance_mode, as other strategies are)
        self.globalcom2_full = config.vision_feature_select_strategy == "full"
        counter = FAMILY.counter(config, self.globalcom2)
        self.globalcom2_mode = counter.importance_mode(config.vision_feature_select_strategy, tower=self.vision_tower)
        if not self.globalcom2_full and not isinstance(layer, int):
            raise ValueError(f"GlobalCom2 in vLLM needs one vision_feature_layer (an int), this model has {layer!r}")
        depth = config.vision_config.num_hidden_layers
        built = len(self.vision_tower.vision_model.encoder.layers)
        if self.globalcom2_mode == "attention_received" and not isinstance(layer, int) and built < depth:
            raise ValueError(
                "importance='attention_received' in vLLM needs the tower's last layer, which vLLM does not build "
                f"for vision_feature_layer {layer!r}; use importance='similarity' (the default)"
            )
        vc = config.vision_config
        if self.globalcom2_mode == "similarity":
            return
        with self._mark_tower_model(vllm_config, "image"):
            self.globalcom2_importance = _common.ClsImportance(
                vc.hidden_size, vc.num_attention_heads, torch.nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)
            )

    # -- images -------------------------------------------------------------------------------
    def _parse_and_validate_image_input(self, **kwargs: object) -> Any:
        embeds = kwargs.get("image_embeds")
        if kwargs.get("pixel_values") is None and embeds is not None:
            return LlavaNextImageEmbeddingList(type="image_embeds", data=_common.embeddings_list(embeds))
        return super()._parse_and_validate_image_input(**kwargs)

    def _process_image_input(self, image_input: Any) -> Any:
        if isinstance(image_input, LlavaNextImageEmbeddingList):
            return image_input["data"]
        return super()._process_image_input(image_input)

    def embed_multimodal(self, **kwargs: object) -> Any:
        if self.globalcom2 is None:
            kwargs.pop(_common.RATIO_FIELD, None)
            return super().embed_multimodal(**kwargs)
        ratios = kwargs.pop(_common.RATIO_FIELD, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if not isinstance(image_input, LlavaNextImagePixelInputs):
            return self._process_image_input(image_input)
        return self._globalcom2_images(image_input, ratios)

    def _globalcom2_images(self, image_input: Any, ratios: Any) -> list[torch.Tensor]:
        pixel_values = image_input["pixel_values"]
        sizes = [(int(h), int(w)) for h, w in image_input["image_sizes"].tolist()]
        counter = FAMILY.counter(self.config, self.globalcom2)
        views, geoms, n = counter.size_layout(sizes)
        per_image = list(pixel_values) if not isinstance(pixel_values, torch.Tensor) else list(pixel_values.unbind(0))
        stacked = torch.cat([pv[:v] for pv, v in zip(per_image, views)])
        layers = self.vision_tower.vision_model.encoder.layers
        depth = self.config.vision_config.num_hidden_layers
        with _common.LastLayerInput(layers, depth, getattr(self, "globalcom2_importance", None)) as cap:
            if self.globalcom2_full:  # vLLM's own features: the feature layers concatenated, every token
                hidden = self._image_pixels_to_features(self.vision_tower, stacked)  # (V, N, Dv * layers)
            else:
                hidden = self.vision_tower(stacked, select_layers=None, feature_select_strategy=None)  # (V, 1 + N, Dv)
        first = 0 if self.globalcom2_full else 1  # "default": the [CLS] row left out
        if self.globalcom2_mode == "similarity":  # on what the projector receives
            importance = _common.similarity(hidden[:, first:])
        elif self.globalcom2_mode == "attention_received":
            importance = self.globalcom2_importance.attention_received(cap.result(hidden), skip=first)
        else:
            importance = self.globalcom2_importance(cap.result(hidden))  # (V, N) float64 [CLS] logits
        feats = self.multi_modal_projector(hidden[:, first:])  # (V, N, D): vLLM's selection
        if feats.shape[1] != n:
            raise ValueError(f"the vision tower gives {feats.shape[1]} tokens per view, expected {n}")
        ratio_list = _common.request_ratios({_common.RATIO_FIELD: ratios}, len(sizes), self.globalcom2.retention_ratio)
        return _common.compress_groups(
            FAMILY, self.config, self.globalcom2, ratio_list,
            list(torch.split(feats, views)), list(torch.split(importance.to(feats.device), views)), geoms,
            self.image_newline,
        )

    # -- weights ------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        weights = (_common.hub_name(name, w) for name, w in weights)
        if self.globalcom2 is None:
            return super().load_weights(weights)
        last = self.config.vision_config.num_hidden_layers - 1
        return _common.load_weights_with_importance(
            self, self.hf_to_vllm_mapper.apply(weights), f"vision_tower.vision_model.encoder.layers.{last}.",
            _common.VIT_IMPORTANCE_NAMES,
        )
