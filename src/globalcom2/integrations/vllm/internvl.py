"""InternVL (Hugging Face format, ``InternVLForConditionalGeneration``; vLLM runs it with its
``InternS1ForConditionalGeneration``) with GlobalCom2: images only (videos stay vanilla).

* Placeholders: ``<img>`` + the fixed count of ``<IMG_CONTEXT>`` + ``</img>`` per image; InternVL's
  count depends on the image's number of views only (every tile is full).
* Importance: the last layer's [CLS] logits with its q/k normalisation, from the hidden state
  entering that layer (captured while vLLM's tower runs it; a replicated norm + q/k module), put on
  the pixel-shuffled tokens by pushing an index map through vLLM's own ``pixel_shuffle`` (the
  family's rule); ``similarity`` on the projector's input, or ``attention_received``, as the family.
* The tile grid is read from the pixels (:func:`globalcom2.core.tiles.infer_tile_grid`), as the
  Hugging Face path does for a processor output (InternVL's processor gives no image sizes).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.interns1 import (
    InternS1DummyInputsBuilder,
    InternS1ForConditionalGeneration,
    InternS1MultiModalProcessor,
    InternS1ProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import ImageEmbeddingItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdateDetails
from vllm.utils.tensor_schema import TensorSchema, TensorShape

from ...core import tiles
from ...models import family_for_model_type
from . import _common
from .settings import engine_config

#: The globalcom2 family of these checkpoints (from the registry).
FAMILY = family_for_model_type("internvl")

#: HF InternViT names of the last layer's norm and q/k (and their norms) -> ClsImportance's.
INTERNVIT_NAMES = {
    "layernorm_before.weight": "norm.weight", "layernorm_before.bias": "norm.bias",
    "attention.q_proj.weight": "q_proj.weight", "attention.q_proj.bias": "q_proj.bias",
    "attention.k_proj.weight": "k_proj.weight", "attention.k_proj.bias": "k_proj.bias",
    "attention.q_norm.weight": "q_norm.weight", "attention.k_norm.weight": "k_norm.weight",
}


class GlobalCom2InternVLProcessingInfo(_common.GlobalCom2InfoMixin, InternS1ProcessingInfo):
    globalcom2_model_type = FAMILY.model_type

    def globalcom2_views_count(self, config: Any, views: int) -> int:
        """Tokens of one image of ``views`` views (tiles plus the thumbnail) under ``config``."""
        return _common._cached_views_count(self.globalcom2_model_type, _common._Key(self.get_hf_config()), config, int(views))

    def get_num_image_tokens(self, *, image_width: int, image_height: int, processor: Any, mm_kwargs: Mapping[str, object]) -> int:
        config = self.globalcom2_active_config()
        vanilla = super().get_num_image_tokens(
            image_width=image_width, image_height=image_height, processor=processor, mm_kwargs=mm_kwargs
        )
        if config is None:
            return vanilla
        return self.globalcom2_views_count(config, vanilla // processor.image_seq_length)


class GlobalCom2InternVLMultiModalProcessor(_common.GlobalCom2ProcessorMixin, InternS1MultiModalProcessor):
    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, object], out_mm_kwargs: Any) -> Sequence[Any]:
        updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))
        config = self.info.globalcom2_config(hf_processor_mm_kwargs)
        if config is None:
            return updates
        hf_processor = self.info.get_hf_processor(**_common._settings.strip_request(hf_processor_mm_kwargs))
        tokenizer = self.info.get_tokenizer()
        data = out_mm_kwargs.get_data()
        views = data["image_num_patches"].tolist() if "image_num_patches" in data else []
        context_id = hf_processor.image_token_id

        def replacement(item_idx: int) -> Any:
            images = mm_items.get_items("image", ImageEmbeddingItems) if _is_embeddings(mm_items) else None
            count = images.get_feature_size(item_idx) if images is not None else self.info.globalcom2_views_count(config, views[item_idx])
            text = hf_processor.start_image_token + hf_processor.image_token * count + hf_processor.end_image_token
            ids = tokenizer.encode(text, add_special_tokens=False)
            return PromptUpdateDetails.select_token_id(ids, context_id)

        return [
            PromptReplacement(modality="image", target=[context_id], replacement=replacement) if u.modality == "image" else u
            for u in updates
        ]


def _is_embeddings(mm_items: Any) -> bool:
    try:
        mm_items.get_items("image", ImageEmbeddingItems)
    except (TypeError, KeyError, ValueError):
        return False
    return True


class InternVLImageEmbeddingList(TensorSchema):
    """Precomputed image embeddings of any length each (bn images, ifs tokens, hs hidden size)."""

    type: Literal["image_embeds"] = "image_embeds"
    data: Annotated[torch.Tensor | list[torch.Tensor], TensorShape("bn", "ifs", "hs", dynamic_dims={"ifs"})]


@MULTIMODAL_REGISTRY.register_processor(
    GlobalCom2InternVLMultiModalProcessor,
    info=GlobalCom2InternVLProcessingInfo,
    dummy_inputs=InternS1DummyInputsBuilder,
)
class GlobalCom2InternVLForConditionalGeneration(InternS1ForConditionalGeneration):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = self.config
        self.globalcom2 = engine_config(FAMILY.model_type, config)
        if self.globalcom2 is None:
            return
        if config.vision_feature_select_strategy != "default" or config.vision_feature_layer != -1:
            raise ValueError(
                "GlobalCom2 on InternVL in vLLM needs the last layer's features without [CLS] "
                f"(vision_feature_layer=-1, 'default'); this model has {config.vision_feature_layer!r} / "
                f"{config.vision_feature_select_strategy!r}"
            )
        self.globalcom2_mode = getattr(self.globalcom2, "importance", "auto")
        if self.globalcom2_mode == "similarity":
            return
        from transformers.models.internvl.modeling_internvl import NORM2FN, InternVLVisionRMSNorm

        vc = config.vision_config
        qk = (InternVLVisionRMSNorm(vc.hidden_size), InternVLVisionRMSNorm(vc.hidden_size)) if vc.use_qk_norm else (None, None)
        with self._mark_tower_model(vllm_config, {"image", "video"}):
            self.globalcom2_importance = _common.ClsImportance(
                vc.hidden_size, vc.num_attention_heads, NORM2FN[vc.norm_type](vc.hidden_size, eps=vc.layer_norm_eps),
                bias=bool(vc.attention_bias), q_norm=qk[0], k_norm=qk[1],
            )

    def _parse_and_validate_image_input(self, **kwargs: object) -> Any:
        embeds = kwargs.get("image_embeds")
        if kwargs.get("pixel_values") is None and embeds is not None:
            return InternVLImageEmbeddingList(type="image_embeds", data=_common.embeddings_list(embeds))
        return super()._parse_and_validate_image_input(**kwargs)

    def _process_vision_input(self, image_input: Any) -> Any:
        if isinstance(image_input, InternVLImageEmbeddingList):
            return tuple(image_input["data"])
        if self.globalcom2 is not None and image_input["type"] == "pixel_values":
            return tuple(self._globalcom2_images(image_input, self._globalcom2_ratios))
        return super()._process_vision_input(image_input)

    def embed_multimodal(self, **kwargs: object) -> Any:
        self._globalcom2_ratios = kwargs.pop(_common.RATIO_FIELD, None)
        try:
            return super().embed_multimodal(**kwargs)
        finally:
            self._globalcom2_ratios = None

    def _globalcom2_images(self, image_input: Any, ratios: Any) -> list[torch.Tensor]:
        pixel_values = image_input["pixel_values"]  # (sum V, 3, 448, 448), per image its tiles then the thumbnail
        views = [int(v) for v in image_input["num_patches"].tolist()]
        layers = self.vision_tower.encoder.layer
        depth = self.config.vision_config.num_hidden_layers
        with _common.LastLayerInput(layers, depth, getattr(self, "globalcom2_importance", None)) as cap:
            hidden = self.vision_tower(pixel_values=pixel_values)  # (V, 1 + P*P, Dv)
        patches = hidden[:, 1:]
        p = int(patches.shape[1] ** 0.5)
        shuffled = self.pixel_shuffle(patches.reshape(patches.shape[0], p, p, -1), scale_factor=self.downsample_ratio)
        shuffled = shuffled.reshape(shuffled.shape[0], -1, shuffled.shape[-1])  # (V, N, Dv * k): the projector's input
        feats = self.multi_modal_projector(shuffled)  # (V, N, D)
        if self.globalcom2_mode == "similarity":
            importance = _common.similarity(shuffled)
        else:
            if self.globalcom2_mode == "attention_received":
                patch_scores = self.globalcom2_importance.attention_received(cap.result(hidden), skip=1)
            else:
                patch_scores = self.globalcom2_importance(cap.result(hidden))  # (V, P*P) float64
            grid = torch.arange(p * p, dtype=torch.float64, device=patch_scores.device).reshape(1, p, p, 1)
            index = self.pixel_shuffle(grid, scale_factor=self.downsample_ratio)
            index = index.reshape(-1, index.shape[-1]).round().long()  # (N, k) patches folded into each token
            importance = patch_scores[:, index].mean(dim=-1)
        side = int(feats.shape[1] ** 0.5)
        features, imps, geoms = [], [], []
        for f, imp, pv in zip(torch.split(feats, views), torch.split(importance.to(feats.device), views), torch.split(pixel_values, views)):
            if f.shape[0] == 1:
                geoms.append(None)
            else:
                n = f.shape[0] - 1
                geoms.append(tiles.full_geometry(tiles.infer_tile_grid(pv[:-1], pv[-1], tiles.factor_grids(n)), side))
            features.append(tiles.thumbnail_first(f))
            imps.append(tiles.thumbnail_first(imp))
        ratio_list = _common.request_ratios({_common.RATIO_FIELD: ratios}, len(views), self.globalcom2.retention_ratio)
        return _common.compress_groups(FAMILY, self.config, self.globalcom2, ratio_list, features, imps, geoms, None)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        if self.globalcom2 is None:
            return super().load_weights(weights)
        last = self.config.vision_config.num_hidden_layers - 1
        names = dict(INTERNVIT_NAMES)
        module = getattr(self, "globalcom2_importance", None)
        if module is not None:
            have = {n for n, _ in module.named_parameters()}
            names = {k: v for k, v in names.items() if v in have}
        return _common.load_weights_with_importance(
            self, self.hf_to_vllm_mapper.apply(weights), f"vision_tower.encoder.layer.{last}.", names
        )
