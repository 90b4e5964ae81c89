"""LLaVA-NeXT in vLLM with GlobalCom2: a subclass of vLLM's ``LlavaNextForConditionalGeneration``,
its processing info and processor. Vanilla vLLM when the config has no ``"globalcom2"`` entry.

* Placeholders: each image gets its fixed count (:meth:`Family.count_visual_tokens`, the same
  planning code as the compression, on constant importance) for the request's settings.
* Encoder: vLLM's CLIP tower up to the feature layer, run once; its output (with [CLS]) is the
  hidden state entering the last layer, from which :class:`~._common.ClsImportance` computes the
  last layer's [CLS] logits (norm + one query + keys); features as vLLM computes them; then every
  image of the step is compressed, batched per ratio (:func:`~._common.compress_groups`).
* Precomputed image embeddings of different lengths may share a step (vLLM's schema fixed one
  length per batch), with or without GlobalCom2.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
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
from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems
from vllm.multimodal.processing import PromptReplacement
from vllm.utils.tensor_schema import TensorSchema, TensorShape

from ...models.llava_next import LlavaNextAdapter
from . import _common
from .settings import engine_config


class GlobalCom2LlavaNextProcessingInfo(_common.GlobalCom2InfoMixin, LlavaNextProcessingInfo):
    globalcom2_model_type = LlavaNextAdapter.model_type

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        config = self.globalcom2_config()
        if config is None:
            return super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return self.globalcom2_count(config, image_height, image_width)

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
    def _get_prompt_updates(
        self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, object], out_mm_kwargs: Any
    ) -> Sequence[PromptReplacement]:
        config = self.info.globalcom2_config(hf_processor_mm_kwargs)
        if config is None:
            return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        image_token_id = self.info.get_hf_config().image_token_index

        def replacement(item_idx: int) -> list[int]:
            images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
            if isinstance(images, ImageEmbeddingItems):
                return [image_token_id] * images.get_feature_size(item_idx)
            size = images.get_image_size(item_idx)
            return [image_token_id] * self.info.globalcom2_count(config, size.height, size.width)

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)]


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
        self.globalcom2 = engine_config(LlavaNextAdapter.model_type, config)
        if self.globalcom2 is None:
            return
        layer = config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(f"GlobalCom2 in vLLM needs one vision_feature_layer (an int), this model has {layer!r}")
        if config.vision_feature_select_strategy != "default":
            raise ValueError(
                "GlobalCom2 needs a vision tower with a [CLS] token (vision_feature_select_strategy='default'); "
                f"this model uses {config.vision_feature_select_strategy!r}"
            )
        vc = config.vision_config
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
        counter = LlavaNextAdapter.counter(self.config, self.globalcom2)
        views, geoms, n = counter.size_layout(sizes)
        per_image = list(pixel_values) if not isinstance(pixel_values, torch.Tensor) else list(pixel_values.unbind(0))
        stacked = torch.cat([pv[:v] for pv, v in zip(per_image, views)])
        layers = self.vision_tower.vision_model.encoder.layers
        with _common.capture_last_input(layers, self.config.vision_config.num_hidden_layers) as cap:
            hidden = self.vision_tower(stacked, select_layers=None, feature_select_strategy=None)  # (V, 1 + N, Dv)
        importance = self.globalcom2_importance(cap.result(hidden))  # (V, N) float64
        feats = self.multi_modal_projector(hidden[:, 1:])  # (V, N, D): vLLM's "default" selection
        if feats.shape[1] != n:
            raise ValueError(f"the vision tower gives {feats.shape[1]} tokens per view, expected {n}")
        ratio_list = _common.request_ratios({_common.RATIO_FIELD: ratios}, len(sizes), self.globalcom2.retention_ratio)
        return _common.compress_groups(
            LlavaNextAdapter, self.config, self.globalcom2, ratio_list,
            list(torch.split(feats, views)), list(torch.split(importance.to(feats.device), views)), geoms,
            self.image_newline,
        )

    # -- weights ------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        weights = (_hub_name(name, w) for name, w in weights)
        if self.globalcom2 is None:
            return super().load_weights(weights)
        last = self.config.vision_config.num_hidden_layers - 1
        prefix = f"vision_tower.vision_model.encoder.layers.{last}."
        names = {
            "layer_norm1.weight": "norm.weight", "layer_norm1.bias": "norm.bias",
            "self_attn.q_proj.weight": "q_proj.weight", "self_attn.q_proj.bias": "q_proj.bias",
            "self_attn.k_proj.weight": "k_proj.weight", "self_attn.k_proj.bias": "k_proj.bias",
        }
        mapped = self.hf_to_vllm_mapper.apply(weights)
        rest, loaded = _common.load_importance_weights(self.globalcom2_importance, prefix, names, mapped)
        from vllm.model_executor.models.utils import AutoWeightsLoader

        done = AutoWeightsLoader(self).load_weights(rest)
        missing = set(names.values()) - loaded
        if missing:
            raise ValueError(f"GlobalCom2 needs the vision tower's last layer ({prefix}*): {sorted(missing)} not in the checkpoint")
        return done | {f"globalcom2_importance.{n}" for n in loaded}


def _hub_name(name: str, w: torch.Tensor) -> tuple[str, torch.Tensor]:
    """A transformers-5 ``save_pretrained`` writes the CLIP tower as ``[model.]vision_tower.embeddings...``;
    vLLM (and the llava-hf hub checkpoints) name it ``vision_tower.vision_model.embeddings...``."""
    for head in ("model.vision_tower.", "vision_tower."):
        if name.startswith(head) and not name.startswith(head + "vision_model."):
            return head + "vision_model." + name[len(head):], w
    return name, w
