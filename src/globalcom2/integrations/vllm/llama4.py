"""Llama 4 (``Llama4ForConditionalGeneration``: Scout, Maverick) in vLLM with GlobalCom2: a subclass of
vLLM's ``Llama4ForConditionalGeneration`` (``mllama4.py``), its processing info and processor. Vanilla
vLLM when the config has no ``"globalcom2"`` entry.

* Placeholders: vLLM's processor reports each image's tile grid (``aspect_ratios``, from the stock
  ``Llama4ImageProcessor``'s own rule; vLLM needs torchvision for it, as transformers does). Each
  tile's ``<|patch|>`` run gets that tile's fixed kept count (the family's ``processed_runs``, the
  planning on constant importance) and the image's text is written as the Hugging Face count-first
  path writes it (the family's ``runs_text``: separators, ``<|image|>`` and the markers kept).
* Encoder: vLLM's vision model runs once on every tile of the step. Importance (the family's rule):
  the class token's last-layer logits, from the hidden state entering the last layer (captured while
  vLLM's tower runs it, :class:`~._common.LastLayerInput`), through that layer's pre-attention norm
  and q/k projections replicated in :class:`Llama4ClsImportance` (loaded from the checkpoint; every
  tensor-parallel rank computes all heads, no collective) and rotated by **vLLM's own** last-layer
  2-D rotary (``self_attn.rotary_emb``: the class token, last, keeps angle 0); vLLM's fused,
  head-sharded ``qkv_proj`` is not used. Patch logits go onto the pixel-shuffled tokens by pushing an
  index map through vLLM's own ``pixel_shuffle`` (mean of the patches folded into each token).
  ``similarity`` (on what the projector receives) and ``attention_received`` (patches only) as the
  family. Then the step's images are compressed per ratio (:func:`~._common.compress_groups`: the
  family's ``compress`` puts each image's tokens in the model's order, tiles row by row, then the
  global tile).
* With ``mm_encoder_tp_mode="data"`` every rank encodes all of the step's tiles (the capture needs the
  whole batch on the rank); the encoder CUDA graph (``cudagraph_mm_encoder``) is refused with GlobalCom2.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.mllama4 import (
    Llama4ForConditionalGeneration,
    Mllama4DummyInputsBuilder,
    Mllama4MultiModalProcessor,
    Mllama4ProcessingInfo,
    pixel_shuffle,
)
from vllm.model_executor.models.utils import StageMissingLayer
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptUpdateDetails, cached_encode

from ...models import family_for_model_type
from . import _common
from .settings import engine_config, strip_request

#: The globalcom2 family of these checkpoints (from the registry).
FAMILY = family_for_model_type("llama4")

#: Hugging Face / vLLM checkpoint names of the vision tower's last layer's norm and q/k -> Llama4ClsImportance's.
LLAMA4_VISION_NAMES = {
    "input_layernorm.weight": "norm.weight", "input_layernorm.bias": "norm.bias",
    "self_attn.q_proj.weight": "q_proj.weight", "self_attn.q_proj.bias": "q_proj.bias",
    "self_attn.k_proj.weight": "k_proj.weight", "self_attn.k_proj.bias": "k_proj.bias",
}
#: The importance signals served here (``"auto"`` is ``"cls"`` for Llama 4).
MODES = ("auto", "cls", "similarity", "attention_received")


@lru_cache(maxsize=4096)
def _cached_runs(hf: _common._Key, config: Any, grid: tuple[int, int]) -> tuple[int, ...]:
    """Each view's fixed kept count (model order) of an image of this tile grid under ``config``."""
    counter = _common._settings.counter(FAMILY.model_type, hf.config, config)
    return tuple(int(r) for r in counter.processed_runs({"aspect_ratios": [list(grid)]}, None, config)[0])


class GlobalCom2Llama4ProcessingInfo(_common.GlobalCom2InfoMixin, Mllama4ProcessingInfo):
    globalcom2_model_type = FAMILY.model_type

    def globalcom2_runs(self, config: Any, grid: Sequence[int]) -> tuple[int, ...]:
        """Per view (tiles row by row, then the global tile), the kept count of an image of ``grid`` tiles."""
        return _cached_runs(_common._Key(self.get_hf_config()), config, (int(grid[0]), int(grid[1])))

    def globalcom2_text(self, config: Any, grid: Sequence[int], processor: Any) -> str:
        """The image's prompt text with each view's run at its kept count (what the count-first path writes)."""
        image_inputs = {"aspect_ratios": [[int(grid[0]), int(grid[1])]]}
        return FAMILY.runs_text(processor, image_inputs, 0, self.globalcom2_runs(config, grid))

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int] | None:
        """Any request's ratio may be up to 1, which keeps every token (Llama 4 writes nothing per view
        besides its run): the largest image's vanilla count, not the dummy image's at the engine's ratio."""
        config = self.globalcom2_config()
        if config is None:
            return super().get_mm_max_tokens_per_item(seq_len, mm_counts)
        size = self.get_image_size_with_most_features()
        views, _, n = self.globalcom2_counter(config).size_layout([(size.height, size.width)], self.get_hf_processor())
        return {"image": self.globalcom2_max_count(config, [(size.height, size.width)], views[0] * n)}


class GlobalCom2Llama4MultiModalProcessor(_common.GlobalCom2ProcessorMixin, Mllama4MultiModalProcessor):
    def _apply_hf_processor_main(self, mm_items: Any, hf_kwargs: Mapping[str, object]) -> Any:
        out = super()._apply_hf_processor_main(mm_items, hf_kwargs)
        config = self.info.globalcom2_config(hf_kwargs)
        per_image = out.get("patches_per_image")
        if config is not None and _common.RATIO_FIELD not in out and per_image is not None and out.get("pixel_values") is not None:
            out[_common.RATIO_FIELD] = torch.full((len(per_image),), float(config.retention_ratio), dtype=torch.float64)
        return out

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, object], out_mm_kwargs: Any) -> Sequence[Any]:
        updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))
        config = self.info.globalcom2_config(hf_processor_mm_kwargs)
        if config is None:
            return updates
        hf_processor = self.info.get_hf_processor(**strip_request(hf_processor_mm_kwargs))
        tokenizer = self.info.get_tokenizer()
        patch_ids = cached_encode(tokenizer, hf_processor.img_patch_token, add_special_tokens=False)

        def replacement(item_idx: int) -> Any:
            grid = out_mm_kwargs["image"][item_idx]["aspect_ratios"].data.tolist()
            text = self.info.globalcom2_text(config, grid, hf_processor)
            return PromptUpdateDetails.select_token_ids(cached_encode(tokenizer, text, add_special_tokens=False), patch_ids)

        return [dataclasses.replace(u, replacement=replacement) if u.modality == "image" else u for u in updates]


class Llama4ClsImportance(_common.ClsImportance):
    """:class:`~._common.ClsImportance` for Llama 4's tower: queries and keys rotated by the layer's own
    rotary (``rotary``, vLLM's module of that layer: held by reference, not a submodule), the class
    token **last**."""

    def __init__(self, hidden: int, num_heads: int, norm: torch.nn.Module, rotary: torch.nn.Module) -> None:
        super().__init__(hidden, num_heads, norm, bias=True)
        object.__setattr__(self, "rotary", rotary)

    def rotated(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(V, T, D) hidden state -> every token's (query, key), each (V, T, D), as the layer rotates them."""
        q, k = self.queries_keys(hidden, all_queries=True)
        v, t, d = k.shape
        q, k = self.rotary(q.reshape(v, t, self.num_heads, -1), k.reshape(v, t, self.num_heads, -1))
        return q.reshape(v, t, d), k.reshape(v, t, d)

    @torch.no_grad()
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(V, P*P + 1, D) hidden state (class token last) -> (V, P*P) float64 class-token logits, head-averaged."""
        from ...core.importance import cls_attention_logits

        q, k = self.rotated(hidden)
        return cls_attention_logits(q[:, -1], torch.cat([k[:, -1:], k[:, :-1]], dim=1), self.num_heads, self.scale)

    @torch.no_grad()
    def attention_received(self, hidden: torch.Tensor, skip: int = 0) -> torch.Tensor:
        """(V, P*P + 1, D) -> (V, P*P) attention each patch receives from the patches (class token left out)."""
        from ...core.importance import attention_received

        q, k = self.rotated(hidden)
        return attention_received(q[:, :-1], k[:, :-1], self.num_heads, self.scale)


@MULTIMODAL_REGISTRY.register_processor(
    GlobalCom2Llama4MultiModalProcessor,
    info=GlobalCom2Llama4ProcessingInfo,
    dummy_inputs=Mllama4DummyInputsBuilder,
)
class GlobalCom2Llama4ForConditionalGeneration(Llama4ForConditionalGeneration):
    """vLLM's Llama 4 with GlobalCom2 where the config asks for it (see the module's docstring)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.globalcom2 = engine_config(FAMILY.model_type, self.config)
        if self.globalcom2 is None:
            return
        self.globalcom2_mode = str(getattr(self.globalcom2, "importance", "auto"))
        if self.globalcom2_mode not in MODES:
            raise ValueError(f"GlobalCom2 on Llama 4 in vLLM: importance={self.globalcom2_mode!r} is not served; use one of {MODES}")
        if getattr(vllm_config.compilation_config, "cudagraph_mm_encoder", False):
            raise ValueError("GlobalCom2 on Llama 4 in vLLM compresses inside the encoder step: turn off cudagraph_mm_encoder")
        if self.globalcom2_mode == "similarity":
            return
        vc = self.config.vision_config
        last = self.vision_model.model.layers[-1]
        with self._mark_tower_model(vllm_config, "image"):
            self.globalcom2_importance = Llama4ClsImportance(
                vc.hidden_size, vc.num_attention_heads, torch.nn.LayerNorm(vc.hidden_size, eps=last.input_layernorm.eps),
                last.self_attn.rotary_emb,
            )

    def embed_multimodal(self, **kwargs: object) -> Any:
        ratios = kwargs.pop(_common.RATIO_FIELD, None)
        if self.globalcom2 is None:
            return super().embed_multimodal(**kwargs)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        return self._globalcom2_images(image_input, ratios)

    def _globalcom2_images(self, image_input: Any, ratios: Any) -> list[torch.Tensor]:
        pixel_values = image_input["pixel_values"]  # (sum V, 3, 336, 336): per image its tiles, then the global tile
        aspect = image_input["aspect_ratios"]
        counter = FAMILY.counter(self.config, self.globalcom2)
        views, geoms, n = counter.processed_layout({"aspect_ratios": aspect}, None)
        if [int(v) for v in image_input["patches_per_image"].tolist()] != views:
            raise ValueError("GlobalCom2: the images' tiles do not match their aspect ratios")
        layers = self.vision_model.model.layers
        with _common.LastLayerInput(layers, len(layers), getattr(self, "globalcom2_importance", None)) as cap:
            vision = self.vision_model(pixel_values)  # (V, N, Dp): what the projector receives
        feats = self.multi_modal_projector(vision)  # (V, N, D)
        if feats.shape[1] != n:
            raise ValueError(f"the vision tower gives {feats.shape[1]} tokens per tile, expected {n}")
        if self.globalcom2_mode == "similarity":
            importance = _common.similarity(vision)
        else:
            hidden = cap.result(vision)  # (V, P*P + 1, Dv) entering the last layer
            if self.globalcom2_mode == "attention_received":
                patch_scores = self.globalcom2_importance.attention_received(hidden)
            else:
                patch_scores = self.globalcom2_importance(hidden)  # (V, P*P) float64
            importance = patch_scores[:, self._globalcom2_fold(patch_scores.shape[1], patch_scores.device)].mean(dim=-1)
        from ...core import tiles

        features = [tiles.thumbnail_first(f) for f in torch.split(feats, views)]
        imps = [tiles.thumbnail_first(i) for i in torch.split(importance.to(feats.device), views)]
        ratio_list = _common.request_ratios({_common.RATIO_FIELD: ratios}, len(views), self.globalcom2.retention_ratio)
        return _common.compress_groups(FAMILY, self.config, self.globalcom2, ratio_list, features, imps, geoms, None)

    def _globalcom2_fold(self, patches: int, device: Any) -> torch.Tensor:
        """(N, k) long: the patches (raster index) vLLM's ``pixel_shuffle`` folds into each token."""
        grid = torch.arange(patches, dtype=torch.float64, device=device).reshape(1, patches, 1)
        folded = pixel_shuffle(grid, self.config.vision_config.pixel_shuffle_ratio)
        return folded.reshape(-1, folded.shape[-1]).round().long()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        module = getattr(self, "globalcom2_importance", None)
        if self.globalcom2 is None or module is None or isinstance(module, StageMissingLayer):  # no tower: text only
            return super().load_weights(weights)
        prefix = f"vision_model.model.layers.{len(self.vision_model.model.layers) - 1}."
        rest, loaded = _common.load_importance_weights(module, prefix, LLAMA4_VISION_NAMES, weights)
        done = super().load_weights(rest)
        missing = set(LLAMA4_VISION_NAMES.values()) - loaded
        if missing:
            raise ValueError(f"GlobalCom2 needs the vision tower's last layer ({prefix}*): {sorted(missing)} not in the checkpoint")
        return set(done) | {f"globalcom2_importance.{n}" for n in loaded}
