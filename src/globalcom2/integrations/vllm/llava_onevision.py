"""LLaVA-OneVision in vLLM with GlobalCom2 (images; videos stay vanilla): a subclass of vLLM's
``LlavaOnevisionForConditionalGeneration``. Vanilla vLLM without the ``"globalcom2"`` entry.

As vLLM's model does, every image is cut into its AnyRes crops (vLLM has no ``batch_num_images``
rule: an image of a multi-image prompt is counted and encoded like one alone), so the counts and
the reference are those of one image per prompt. Importance is the family's: ``similarity`` by default
on SigLIP (SPEC.md; from the feature-layer output, nothing extra to run), or the
``attention_received`` ablation (the last layer's queries and keys, recomputed from the hidden
state entering that layer, captured while vLLM's tower runs it, by a replicated norm + q/k module).
Where ``anyres_max_K`` shrinks the crop map, the family's own resize is applied
(:func:`globalcom2.models.llava_onevision._resize_views`), as on the Hugging Face path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImagePixelInputs,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.utils.tensor_schema import TensorSchema, TensorShape

from ...core import resized
from ...models import family_for_model_type
from ...models.llava_onevision import _resize_views
from . import _common
from .settings import engine_config

#: The globalcom2 family of these checkpoints (from the registry).
FAMILY = family_for_model_type("llava_onevision")


class GlobalCom2LlavaOnevisionProcessingInfo(_common.GlobalCom2SizeCountMixin, LlavaOnevisionProcessingInfo):
    globalcom2_model_type = FAMILY.model_type

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int] | None:
        config = self.globalcom2_config()
        if config is None:
            return super().get_mm_max_tokens_per_item(seq_len, mm_counts)
        return None  # vLLM then processes its largest dummy image at the engine's setting


class GlobalCom2LlavaOnevisionMultiModalProcessor(_common.GlobalCom2ProcessorMixin, LlavaOnevisionMultiModalProcessor):
    pass


class LlavaOnevisionImageEmbeddingList(TensorSchema):
    """Precomputed image embeddings of any length each (bn images, ifs tokens, hs hidden size)."""

    type: Literal["image_embeds"] = "image_embeds"
    data: Annotated[torch.Tensor | list[torch.Tensor], TensorShape("bn", "ifs", "hs", dynamic_dims={"ifs"})]


@MULTIMODAL_REGISTRY.register_processor(
    GlobalCom2LlavaOnevisionMultiModalProcessor,
    info=GlobalCom2LlavaOnevisionProcessingInfo,
    dummy_inputs=LlavaOnevisionDummyInputsBuilder,
)
class GlobalCom2LlavaOnevisionForConditionalGeneration(LlavaOnevisionForConditionalGeneration):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = self.config
        self.globalcom2 = engine_config(FAMILY.model_type, config)
        if self.globalcom2 is None:
            return
        if not isinstance(config.vision_feature_layer, int) or config.vision_feature_select_strategy != "full":
            raise ValueError(
                "GlobalCom2 on LLaVA-OneVision in vLLM needs one vision_feature_layer and "
                f"vision_feature_select_strategy='full', this model has {config.vision_feature_layer!r} / "
                f"{config.vision_feature_select_strategy!r}"
            )
        counter = FAMILY.counter(config, self.globalcom2)
        #: "similarity" (the default here) or "attention_received"; 'cls' is refused by name (no [CLS])
        self.globalcom2_mode = counter.importance_mode()
        resized.parse_anyres_max(config.vision_aspect_ratio)
        if self.globalcom2_mode != "attention_received":
            return
        vc = config.vision_config
        with self._mark_tower_model(vllm_config, {"image", "video"}):
            self.globalcom2_importance = _common.ClsImportance(
                vc.hidden_size, vc.num_attention_heads, torch.nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)
            )

    def _parse_and_validate_image_input(self, **kwargs: object) -> Any:
        embeds = kwargs.get("image_embeds")
        if kwargs.get("pixel_values") is None and embeds is not None:
            return LlavaOnevisionImageEmbeddingList(type="image_embeds", data=_common.embeddings_list(embeds))
        return super()._parse_and_validate_image_input(**kwargs)

    def _process_image_input(self, image_input: Any) -> Any:
        if isinstance(image_input, LlavaOnevisionImageEmbeddingList):
            return image_input["data"]
        if self.globalcom2 is not None and isinstance(image_input, LlavaOnevisionImagePixelInputs):
            return self._globalcom2_images(image_input, self._globalcom2_ratios)
        return super()._process_image_input(image_input)

    def embed_multimodal(self, **kwargs: object) -> Any:
        self._globalcom2_ratios = kwargs.pop(_common.RATIO_FIELD, None)
        try:
            return super().embed_multimodal(**kwargs)
        finally:
            self._globalcom2_ratios = None

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
            hidden = self.vision_tower(stacked, feature_select_strategy="full")  # (V, N, Dv)
        if self.globalcom2_mode == "attention_received":
            importance = self.globalcom2_importance.attention_received(cap.result(hidden))  # (V, N)
        else:  # -cos to the view's mean, on what the projector receives
            importance = _common.similarity(hidden)
        feats = self.multi_modal_projector(hidden)
        if feats.shape[1] != n:
            raise ValueError(f"the vision tower gives {feats.shape[1]} tokens per view, expected {n}")
        features = list(torch.split(feats, views))
        imps = list(torch.split(importance.to(feats.device), views))
        for i, geom in enumerate(geoms):
            if isinstance(geom, resized.ResizedCropGeometry):
                features[i], imps[i] = _resize_views(features[i], imps[i], geom)
        ratio_list = _common.request_ratios({_common.RATIO_FIELD: ratios}, len(sizes), self.globalcom2.retention_ratio)
        return _common.compress_groups(
            FAMILY, self.config, self.globalcom2, ratio_list, features, imps, geoms, self.image_newline
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        weights = (_common.hub_name(name, w) for name, w in weights)
        if self.globalcom2 is None:
            return super().load_weights(weights)
        last = self.config.vision_config.num_hidden_layers - 1
        return _common.load_weights_with_importance(
            self, self.hf_to_vllm_mapper.apply(weights), f"vision_tower.vision_model.encoder.layers.{last}.",
            _common.VIT_IMPORTANCE_NAMES,
        )
