"""What the vLLM model subclasses share: the processor's fixed counts, the request settings carried
to the model, the cache key, the compression of a step's images, and variable-length embeddings.

Imported by vLLM (through the lazily registered model classes) only."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from functools import lru_cache
from typing import Any, ClassVar

import torch
from vllm.multimodal.inputs import MultiModalFieldConfig

from ...methods import config_to_dict
from ...models.images import EncodedImages
from . import settings as _settings

#: Per-image field the processor adds to carry the request's retention ratio to the model.
RATIO_FIELD = "globalcom2_retention_ratio"
#: The config of the request whose prompt updates are being computed (vLLM's processing info asks
#: ``get_num_image_tokens(width, height)`` without the request's kwargs).
_REQUEST: "ContextVar[tuple[Any] | None]" = ContextVar("globalcom2_vllm_request", default=None)


class GlobalCom2InfoMixin:
    """For a vLLM ``BaseProcessingInfo`` subclass: the request's config and fixed counts."""

    #: globalcom2 ``model_type`` of the family.
    globalcom2_model_type: ClassVar[str] = ""

    def globalcom2_config(self, mm_kwargs: Mapping[str, Any] | None = None) -> Any:
        """The config of a request (None when GlobalCom2 is off for this engine)."""
        hf_config = self.get_hf_config()  # type: ignore[attr-defined]
        engine = _settings.engine_settings(hf_config)
        request = _settings.request_settings(mm_kwargs)
        if engine is None:
            if request:
                raise ValueError(
                    f"mm_processor_kwargs {sorted(request)} are GlobalCom2 settings, but GlobalCom2 is not on for this "
                    "model: start the engine with hf_overrides={'globalcom2': {...}} (or globalcom2 serve)"
                )
            return None
        return _settings.resolve(self.globalcom2_model_type, hf_config, engine, request)

    def globalcom2_active_config(self) -> Any:
        """The config of the request being processed, else the engine's (None when off)."""
        held = _REQUEST.get()
        return held[0] if held is not None else self.globalcom2_config()

    def globalcom2_counter(self, config: Any) -> Any:
        return _settings.counter(self.globalcom2_model_type, self.get_hf_config(), config)  # type: ignore[attr-defined]

    def globalcom2_count(self, config: Any, height: int, width: int, **options: Any) -> int:
        """Visual tokens of one image of this size under ``config`` (newlines included)."""
        return _count(self, config, int(height), int(width), tuple(sorted(options.items())))

    def globalcom2_max_count(self, config: Any, sizes: Sequence[tuple[int, int]], vanilla: int) -> int:
        """An upper bound of one image's tokens at any request's ratio: R = 1 keeps every token (a
        layout may add newlines on top: official's padded rows), so the largest of the vanilla
        count and the R = 1 count over ``sizes``."""
        keep_all = config.replace(retention_ratio=1.0)
        return max([int(vanilla)] + [self.globalcom2_count(keep_all, h, w) for h, w in sizes])


class GlobalCom2SizeCountMixin(GlobalCom2InfoMixin):
    """For families whose vLLM count is asked by image size (LLaVA-NeXT, LLaVA-OneVision)."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        """vLLM's count for an image of this size (what it writes before the encoder runs): the
        fixed count of the request's config, vLLM's own when GlobalCom2 is off."""
        config = self.globalcom2_active_config()
        if config is None:
            return super().get_num_image_tokens(image_width=image_width, image_height=image_height)  # type: ignore[misc]
        return self.globalcom2_count(config, image_height, image_width)


def _count(info: GlobalCom2InfoMixin, config: Any, height: int, width: int, options: tuple) -> int:
    return _cached_count(info.globalcom2_model_type, _Key(info.get_hf_config()), config, height, width, options)  # type: ignore[attr-defined]


class _Key:
    """A model config as a cache key, by identity."""

    def __init__(self, config: Any) -> None:
        self.config = config

    def __hash__(self) -> int:
        return id(self.config)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Key) and other.config is self.config


@lru_cache(maxsize=4096)
def _cached_count(model_type: str, hf: _Key, config: Any, height: int, width: int, options: tuple) -> int:
    counter = _settings.counter(model_type, hf.config, config)
    return int(counter.count_visual_tokens([(height, width)], config, **dict(options))[0])


class GlobalCom2ProcessorMixin:
    """For a vLLM multimodal processor subclass: strips the request's GlobalCom2 keys before the
    Hugging Face processor, adds the request's ratio per image (:data:`RATIO_FIELD`), and puts the
    resolved settings into the items' cache key (two requests with different settings never share
    a processed item or an encoder result; the same settings always do)."""

    def _apply_hf_processor_main(self, mm_items: Any, hf_kwargs: Mapping[str, object]) -> Any:
        config = self.info.globalcom2_config(hf_kwargs)  # type: ignore[attr-defined]
        out = super()._apply_hf_processor_main(mm_items, _settings.strip_request(hf_kwargs))  # type: ignore[misc]
        if config is not None:
            n = _num_pixel_images(out)
            if n:
                out[RATIO_FIELD] = torch.full((n,), float(config.retention_ratio), dtype=torch.float64)
        return out

    def _get_mm_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, object], out_mm_kwargs: Any) -> Any:
        token = _REQUEST.set((self.info.globalcom2_config(hf_processor_mm_kwargs),))  # type: ignore[attr-defined]
        try:
            return super()._get_mm_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)  # type: ignore[misc]
        finally:
            _REQUEST.reset(token)

    def _get_mm_fields_config(self, hf_inputs: Any, hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping[str, Any]:
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))  # type: ignore[misc]
        if RATIO_FIELD in hf_inputs:
            fields[RATIO_FIELD] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        return fields

    def _get_mm_hashes(self, inputs: Any) -> Any:
        config = self.info.globalcom2_config(inputs.hf_processor_mm_kwargs)  # type: ignore[attr-defined]
        if config is not None:
            kwargs = dict(_settings.strip_request(inputs.hf_processor_mm_kwargs))
            kwargs["globalcom2"] = config_to_dict(config)
            inputs = dataclasses.replace(inputs, hf_processor_mm_kwargs=kwargs)
        return super()._get_mm_hashes(inputs)  # type: ignore[misc]


def _num_pixel_images(out: Any) -> int:
    """Images of a processed batch that went through the Hugging Face processor (not embeddings)."""
    sizes = out.get("image_sizes") if hasattr(out, "get") else None
    if sizes is not None and out.get("pixel_values") is not None:
        return int(len(sizes))
    patches = out.get("image_num_patches") if hasattr(out, "get") else None  # InternVL
    if patches is not None and out.get("pixel_values") is not None:
        return int(len(patches))
    return 0


def request_ratios(kwargs: dict[str, Any], count: int, default: float) -> list[float]:
    """Per image of a step, the retention ratio its request asked for (the engine's by default)."""
    ratios = kwargs.pop(RATIO_FIELD, None)
    if ratios is None:
        return [float(default)] * count
    if isinstance(ratios, (list, tuple)):
        values = [float(r) for r in ratios]
    else:
        values = [float(r) for r in ratios.reshape(-1).tolist()]
    if len(values) != count:
        raise ValueError(f"{len(values)} GlobalCom2 ratios for {count} images")
    return values


def compress_groups(
    family_cls: Any,
    hf_config: Any,
    config: Any,
    ratios: Sequence[float],
    features: Sequence[torch.Tensor],
    importance: Sequence[torch.Tensor],
    geometries: Sequence[Any],
    newline: torch.Tensor | None,
) -> list[torch.Tensor]:
    """Compress a step's images, batched per retention ratio (one vectorised pass and one host sync
    per distinct ratio: :func:`globalcom2.methods.compress_images` through the family's
    ``compress``, which puts the tokens in the model's order)."""
    out: list[torch.Tensor | None] = [None] * len(features)
    groups: dict[float, list[int]] = {}
    for i, r in enumerate(ratios):
        groups.setdefault(float(r), []).append(i)
    for ratio, idx in groups.items():
        cfg = config if ratio == config.retention_ratio else config.replace(retention_ratio=ratio)
        family = family_cls.counter(hf_config, cfg)
        encoded = EncodedImages(
            features=[features[i] for i in idx],
            importance=[importance[i] for i in idx],
            geometries=[geometries[i] for i in idx],
            image_sizes=[(0, 0)] * len(idx),
            vanilla_counts=[0] * len(idx),
        )
        tokens = family.compress(encoded, cfg, newline=newline).tokens
        for i, t in zip(idx, tokens):
            out[i] = t
    return out  # type: ignore[return-value]


def embeddings_list(data: Any) -> Any:
    """Precomputed image embeddings as vLLM batched them: a (B, n, D) tensor, or a list of
    (n_i, D) tensors when their lengths differ (kept as a list)."""
    if isinstance(data, torch.Tensor):
        return data
    return [t for t in data]


class ClsImportance(torch.nn.Module):
    """The [CLS] importance of a ViT's last layer from the hidden state entering it (SPEC.md,
    Step 0): that layer's pre-attention norm, the [CLS] query (one token) and the keys, then
    :func:`globalcom2.core.importance.cls_attention_logits` (float64). Never a whole extra layer: vLLM
    builds the tower only up to the feature layer (LLaVA-NeXT: the second to last), so this module
    holds the last layer's norm and q/k projections only, loaded from the checkpoint.

    Replicated on every tensor-parallel rank (plain ``nn.Linear`` with the full weights): each rank
    computes the same importance from the same (gathered) hidden state, so every rank keeps the
    same tokens without a collective. ``q_norm`` / ``k_norm`` (InternViT's qk normalisation over
    the whole width) apply when given."""

    def __init__(
        self, hidden: int, num_heads: int, norm: torch.nn.Module, bias: bool = True,
        q_norm: torch.nn.Module | None = None, k_norm: torch.nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = int(num_heads)
        self.scale = (hidden // self.num_heads) ** -0.5
        self.norm = norm
        self.q_proj = torch.nn.Linear(hidden, hidden, bias=bias)
        self.k_proj = torch.nn.Linear(hidden, hidden, bias=bias)
        self.q_norm = q_norm
        self.k_norm = k_norm

    def queries_keys(self, hidden: torch.Tensor, all_queries: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.norm(hidden)
        q = self.q_proj(x if all_queries else x[:, :1])
        k = self.k_proj(x)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return q, k

    @torch.no_grad()
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(V, 1 + N, D) hidden state ([CLS] first) -> (V, N) float64 [CLS] logits, head-averaged."""
        from ...core.importance import cls_attention_logits

        q, k = self.queries_keys(hidden)
        return cls_attention_logits(q[:, 0], k, self.num_heads, self.scale)

    @torch.no_grad()
    def attention_received(self, hidden: torch.Tensor, skip: int = 0) -> torch.Tensor:
        """(V, T, D) hidden state -> (V, T - skip) mean softmax attention each token receives from
        the others, the first ``skip`` tokens ([CLS]) left out as rows and columns."""
        from ...core.importance import attention_received

        q, k = self.queries_keys(hidden, all_queries=True)
        return attention_received(q[:, skip:], k[:, skip:], self.num_heads, self.scale)


class LastLayerInput:
    """The hidden state entering the tower's last layer (index ``full_depth - 1``) while the tower
    runs, where vLLM built that layer (the project's one hook class,
    :class:`~globalcom2.models.capture.QKCapture`, with ``inputs_of`` that layer; its q/k hooks sit on
    ``importance``'s own projections, which do not run inside); otherwise the tower's output is
    that state (:meth:`result`)."""

    def __init__(self, layers: torch.nn.ModuleList, full_depth: int, importance: torch.nn.Module | None) -> None:
        from ...models.capture import QKCapture

        layer = layers[full_depth - 1] if len(layers) >= full_depth else None
        self._cap = QKCapture(importance, inputs_of=layer) if layer is not None and importance is not None else None

    def __enter__(self) -> "LastLayerInput":
        if self._cap is not None:
            self._cap.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._cap is not None:
            self._cap.__exit__(*exc)

    def result(self, tower_output: torch.Tensor) -> torch.Tensor:
        return tower_output if self._cap is None else self._cap.inputs  # type: ignore[return-value]


def load_importance_weights(
    module: ClsImportance, prefix: str, names: Mapping[str, str], weights: Any
) -> tuple[Any, set[str]]:
    """Split ``weights`` (name, tensor) into what ``module`` takes (``prefix`` + a name of ``names``
    -> its parameter ``names[name]``, copied in; every weight is also passed on, since vLLM's tower
    takes the same tensors where it built that layer) and the rest; returns (the passed-on
    iterator, the parameter names loaded, relative to the model)."""
    loaded: set[str] = set()
    params = dict(module.named_parameters())

    def gen() -> Any:
        for name, w in weights:
            if name.startswith(prefix) and name[len(prefix):] in names:
                target = names[name[len(prefix):]]
                params[target].data.copy_(w.to(params[target].dtype))
                loaded.add(target)
            yield name, w

    return gen(), loaded


#: HF CLIP / SigLIP names of a layer's pre-attention norm and q/k projections -> ClsImportance's.
VIT_IMPORTANCE_NAMES = {
    "layer_norm1.weight": "norm.weight", "layer_norm1.bias": "norm.bias",
    "self_attn.q_proj.weight": "q_proj.weight", "self_attn.q_proj.bias": "q_proj.bias",
    "self_attn.k_proj.weight": "k_proj.weight", "self_attn.k_proj.bias": "k_proj.bias",
}


def similarity(features: torch.Tensor) -> torch.Tensor:
    """SPEC.md ``importance="similarity"`` on what the projector receives (V, N, D) -> (V, N)."""
    from ...core.importance import feature_similarity

    return feature_similarity(features)


def load_weights_with_importance(
    model: torch.nn.Module, weights: Any, prefix: str, names: Mapping[str, str], attr: str = "globalcom2_importance"
) -> set[str]:
    """vLLM's ``AutoWeightsLoader`` on ``model`` (weights already under vLLM's names), with the
    tower's last-layer norm and q/k weights (``prefix`` + ``names``) also copied into
    ``model.<attr>`` (:class:`ClsImportance`). A ValueError when the checkpoint lacks them."""
    from vllm.model_executor.models.utils import AutoWeightsLoader, StageMissingLayer

    module = getattr(model, attr, None)
    # None: an importance computed from the features alone (similarity); a StageMissingLayer: no
    # tower in this engine (limit_mm_per_prompt image 0), vLLM skips its weights
    if module is None or isinstance(module, StageMissingLayer):
        return set(AutoWeightsLoader(model).load_weights(weights))
    rest, loaded = load_importance_weights(module, prefix, names, weights)
    done = AutoWeightsLoader(model).load_weights(rest)
    missing = set(names.values()) - loaded
    if missing:
        raise ValueError(f"GlobalCom2 needs the vision tower's last layer ({prefix}*): {sorted(missing)} not in the checkpoint")
    return set(done) | {f"{attr}.{n}" for n in loaded}


def hub_name(name: str, w: torch.Tensor) -> tuple[str, torch.Tensor]:
    """A transformers-5 ``save_pretrained`` writes a LLaVA tower as ``[model.]vision_tower.embeddings...``;
    vLLM (and the llava-hf hub checkpoints) name it ``vision_tower.vision_model.embeddings...``."""
    for head in ("model.vision_tower.", "vision_tower."):
        if name.startswith(head) and not name.startswith(head + "vision_model."):
            return head + "vision_model." + name[len(head):], w
    return name, w


@lru_cache(maxsize=1024)
def _cached_views_count(model_type: str, hf: _Key, config: Any, views: int) -> int:
    """Tokens of one image of ``views`` views (families whose count depends on that alone: InternVL)."""
    counter = _settings.counter(model_type, hf.config, config)
    return int(counter.processed_counts({"num_patches": [views]}, None, config)[0])
