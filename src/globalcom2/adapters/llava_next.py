"""GlobalCom2 for Hugging Face LLaVA-NeXT (``LlavaNextForConditionalGeneration``, ``LlavaNextModel``).

How it plugs in, per model instance (the class is never touched):

* ``forward``: when ``pixel_values`` come with ``input_ids``, the images are encoded once, the
  [CLS] logits of the vision tower's last layer are captured on the way, GlobalCom2 compresses
  every image, the surplus image placeholders are removed from ``input_ids`` (and
  ``attention_mask``/``labels``), and the original forward runs on the shorter sequence with the
  compressed features passed as ``mm_encoder_outputs``. Logits therefore have the compressed
  length.
* ``generate``: the same preparation happens once, before generation; the generation loop then
  runs on the shorter prompt with a KV cache of the compressed size. The returned sequences start
  with the caller's original ``input_ids`` so that ``out[:, inputs.input_ids.shape[1]:]`` is the
  answer, exactly as with the vanilla model.

[CLS] logits come from two forward hooks on the last layer's ``q_proj`` and ``k_proj``,
registered only while the tower runs: the tower keeps its attention implementation (SDPA), no
``output_attentions`` is requested, and no N x N attention map is ever built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import warnings
from typing import Any, Callable

import torch
from torch import nn

from .. import methods, ops
from ..config import MethodConfig
from ..fastv import FastVPatch, kept_count
from ..sequence import shrink_placeholders
from .base import Adapter, CompressionStats, bind_arguments


@dataclass
class EncodedImages:
    """The vision side's output, per image.

    Attributes:
        features: per image, (V_i, N, D) projected features (thumbnail first, then crops).
        importance: per image, (V_i, N) float32 [CLS] logits of the last vision layer.
        geometries: per image, its :class:`~globalcom2.ops.CropGeometry` (None for one view).
        image_sizes: per image, (height, width) in pixels.
    """

    features: list[torch.Tensor]
    importance: list[torch.Tensor]
    geometries: list[ops.CropGeometry | None]
    image_sizes: list[tuple[int, int]]

    @property
    def vanilla_counts(self) -> list[int]:
        """Placeholder tokens per image in the vanilla model (what the processor wrote)."""
        counts = []
        for feats, geom in zip(self.features, self.geometries):
            counts.append(feats.shape[1] + 1 if geom is None else geom.vanilla_num_tokens())
        return counts


@dataclass
class CompressedImages:
    """A vision-side method's output for a batch: tokens and the plans behind them, per image.

    ``plans`` hold :class:`~globalcom2.ops.CompressionPlan` objects for the selection methods
    (globalcom2, fastervlm, random) and :class:`~globalcom2.methods.PoolingPlan` for pooling.
    """

    tokens: list[torch.Tensor]
    plans: list[Any]
    vanilla_counts: list[int] = field(default_factory=list)

    @property
    def counts(self) -> list[int]:
        return [t.shape[0] for t in self.tokens]


class _CLSCapture:
    """Temporarily hooks one attention module to keep its CLS query and all keys."""

    def __init__(self, attn: nn.Module) -> None:
        self.attn = attn
        self.q_cls: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> "_CLSCapture":
        def keep_q(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
            self.q_cls = out[:, 0]  # (V, D)

        def keep_k(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
            self.keys = out  # (V, T, D)

        self._handles = [
            self.attn.q_proj.register_forward_hook(keep_q),
            self.attn.k_proj.register_forward_hook(keep_k),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class LlavaNextAdapter(Adapter):
    """Adapter for ``transformers`` LLaVA-NeXT models, for every method of :mod:`globalcom2.methods`.

    A vision-side method (``config`` or ``config.vision``) compresses the images before the
    language model; FastV (``config`` or ``config.fastv``) is installed on the language model's
    decoder layers (:class:`~globalcom2.fastv.FastVPatch`) and told, at every prefill, where the
    visual tokens are.
    """

    model_names = ("LlavaNextForConditionalGeneration", "LlavaNextModel")

    def __init__(self, model: nn.Module, config: Any) -> None:
        super().__init__(model, config)
        self.inner = model.model if hasattr(model, "lm_head") and hasattr(model, "model") else model
        self.vision_config: MethodConfig | None = methods.vision_config(config)
        self.fastv_config = methods.fastv_config(config)
        self.fastv = FastVPatch(self.inner.language_model, self.fastv_config) if self.fastv_config is not None else None
        #: Plans of the images of the most recent call (for inspection, demos and pictures).
        self.last: CompressedImages | None = None
        #: Visual-token counts of the most recent prefill (see :func:`globalcom2.last_stats`).
        self.stats: CompressionStats | None = None
        self._vanilla_rows: torch.Tensor | None = None  # (B,) image tokens before compression
        self._last_visual: torch.Tensor | None = None  # (B, T) bool, image tokens of the last prefill
        self._turn: _Turn | None = None  # the last compressed generate's prompt, for chat continuations
        self._warned_context = False

    @property
    def last_visual_positions(self) -> list[torch.Tensor] | None:
        """Per batch row, the positions of the image tokens in the language model's input (last prefill)."""
        if self._last_visual is None:
            return None
        return [row.nonzero().flatten() for row in self._last_visual]

    # -- identification and checks --------------------------------------------------------------
    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        try:
            from transformers import LlavaNextForConditionalGeneration, LlavaNextModel
        except ImportError:  # pragma: no cover - transformers is a dependency
            return False
        return isinstance(model, (LlavaNextForConditionalGeneration, LlavaNextModel))

    @property
    def hf_config(self) -> Any:
        return self.inner.config

    def last_attention(self) -> nn.Module:
        """The vision tower's last self-attention module (it must expose q_proj and k_proj)."""
        found = None
        for module in self.inner.vision_tower.modules():
            if all(hasattr(module, a) for a in ("q_proj", "k_proj", "num_heads", "scale")):
                found = module
        if found is None:
            raise ValueError(
                f"GlobalCom2 needs a ViT vision tower whose attention has q_proj/k_proj (CLIP-like); "
                f"{type(self.inner.vision_tower).__name__} has none"
            )
        return found

    def validate(self) -> None:
        if self.fastv is not None:
            self.fastv.validate()  # fail at apply, before anything is patched
        if self.vision_config is None:
            return
        strategy = self.hf_config.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(
                "GlobalCom2 needs a vision tower with a [CLS] token (vision_feature_select_strategy='default'); "
                f"this model uses {strategy!r}"
            )
        self.last_attention()

    # -- vision side ----------------------------------------------------------------------------
    def grid_shape(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """(rows, columns) of the AnyRes crop grid the model uses for an image of this size."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        vc = self.hf_config.vision_config
        return get_anyres_image_grid_shape(list(image_hw), self.hf_config.image_grid_pinpoints, vc.image_size)

    def num_views(self, image_hw: tuple[int, int]) -> int:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        vc = self.hf_config.vision_config
        return image_size_to_num_patches(list(image_hw), self.hf_config.image_grid_pinpoints, vc.image_size)

    def encode(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | list[Any],
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
    ) -> EncodedImages:
        """Run the vision tower and projector, capturing the last layer's [CLS] logits.

        Args:
            pixel_values: (B, P, 3, h, w) as the processor pads them, or (sum V_i, 3, h, w).
            image_sizes: (B, 2) original (height, width) of each image.

        Returns:
            :class:`EncodedImages` with per-image features (V_i, N, D) and importance (V_i, N).

        Like the model's own ``get_image_features`` this runs under the caller's grad mode, so
        gradients reach the projector (and the tower) when training with ``labels``; the [CLS]
        importance only decides which tokens are kept and is never differentiated.
        """
        cfg = self.hf_config
        layer = cfg.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = cfg.vision_feature_select_strategy if vision_feature_select_strategy is None else vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(f"GlobalCom2 needs vision_feature_select_strategy='default', got {strategy!r}")
        sizes = [tuple(int(v) for v in s) for s in (image_sizes.tolist() if torch.is_tensor(image_sizes) else image_sizes)]
        views = [self.num_views(s) for s in sizes]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([pv[:v] for pv, v in zip(pixel_values, views)], dim=0)
        elif pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must have 4 or 5 dimensions, got shape {tuple(pixel_values.shape)}")
        if pixel_values.shape[0] != sum(views):
            raise ValueError(f"pixel_values hold {pixel_values.shape[0]} views but image_sizes imply {sum(views)}")

        tower = self.inner.vision_tower
        attn = self.last_attention()
        with _CLSCapture(attn) as cap:
            out = tower(pixel_values, output_hidden_states=layer, return_dict=True)
        if isinstance(layer, int):
            hidden = out.hidden_states[layer]
        else:
            hidden = torch.cat([out.hidden_states[i] for i in layer], dim=-1)
        feats = self.inner.multi_modal_projector(hidden[:, 1:])  # (V, N, D)
        if cap.q_cls is None or cap.keys is None:  # pragma: no cover - defensive
            raise RuntimeError("the vision tower's last attention layer did not run")
        importance = ops.cls_attention_logits(cap.q_cls.detach(), cap.keys.detach(), attn.num_heads, attn.scale)  # (V, N)

        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        geoms: list[ops.CropGeometry | None] = []
        for s, v in zip(sizes, views):
            if v == 1:
                geoms.append(None)
                continue
            grid = self.grid_shape(s)
            if grid[0] * grid[1] != v - 1:
                raise ValueError(f"image of size {s} has {v - 1} crops but a {grid[0]}x{grid[1]} grid")
            geoms.append(ops.crop_geometry(s, grid, side))
        return EncodedImages(
            features=list(torch.split(feats, views, dim=0)),
            importance=list(torch.split(importance.to(feats.device), views, dim=0)),
            geometries=geoms,
            image_sizes=sizes,
        )

    def compress(self, encoded: EncodedImages, config: MethodConfig | None = None) -> CompressedImages:
        """Apply a vision-side method (default: this adapter's) to every encoded image."""
        cfg = config or self.vision_config
        if cfg is None:
            raise ValueError(f"method {self.config.method!r} has no vision-side compression")
        newline = self.image_newline()
        tokens, plans = [], []
        for feats, imp, geom in zip(encoded.features, encoded.importance, encoded.geometries):
            t, p = methods.compress_image(feats, imp, geom, newline, cfg)
            tokens.append(t)
            plans.append(p)
        return CompressedImages(tokens=tokens, plans=plans, vanilla_counts=encoded.vanilla_counts)

    def image_newline(self) -> torch.Tensor:
        """The (D,) image-newline embedding, also when accelerate offloads it (``device_map`` with
        ``"disk"``/``"cpu"`` entries keeps it on the meta device between forward passes): then it is
        read through the inner model's own hook, as the vanilla forward would have it loaded."""
        newline = self.inner.image_newline
        if newline.device.type != "meta":
            return newline
        hook = getattr(self.inner, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            weights = getattr(h, "weights_map", None)
            if weights is not None and "image_newline" in weights:
                device = getattr(h, "execution_device", None)
                value = weights["image_newline"]
                return value.to(device) if device is not None else value
        raise ValueError("the model's image_newline is on the meta device and no accelerate hook holds its weights")

    def vanilla_pack(self, encoded: EncodedImages) -> list[torch.Tensor]:
        """The vanilla model's packing of the same features (for comparisons and benchmarks)."""
        sizes = torch.tensor(encoded.image_sizes, dtype=torch.long)
        packed, _ = self.inner.pack_image_features(
            encoded.features, sizes, vision_feature_select_strategy="default", image_newline=self.image_newline()
        )
        return list(packed)

    # -- language side --------------------------------------------------------------------------
    def _pad_token_id(self) -> int:
        for cfg in (getattr(self.model, "generation_config", None), self.hf_config.text_config, self.hf_config):
            pad = getattr(cfg, "pad_token_id", None) if cfg is not None else None
            if isinstance(pad, int):
                return pad
        return 0

    def prepare_inputs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Turn a call's keyword arguments with ``pixel_values`` into compressed ones.

        Encodes and compresses the images, shortens ``input_ids``/``attention_mask``/``labels``,
        and passes the compressed features as ``mm_encoder_outputs``.
        """
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        kwargs = dict(kwargs)
        pixel_values = kwargs.pop("pixel_values")
        image_sizes = kwargs.pop("image_sizes", None)
        layer = kwargs.pop("vision_feature_layer", None)
        strategy = kwargs.pop("vision_feature_select_strategy", None)
        input_ids = kwargs.get("input_ids")
        if kwargs.get("mm_encoder_outputs"):
            raise ValueError("pass either pixel_values or mm_encoder_outputs, not both")
        if input_ids is None:
            raise ValueError(
                "GlobalCom2 needs input_ids with image placeholder tokens when pixel_values are given "
                "(inputs_embeds are not supported: the placeholders must be shortened)"
            )
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes together with pixel_values")
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(mask.shape)} must match input_ids {tuple(input_ids.shape)} when pixel_values are given"
            )

        encoded = self.encode(pixel_values, image_sizes, layer, strategy)
        compressed = self.compress(encoded)
        shrunk = shrink_placeholders(
            input_ids,
            self.hf_config.image_token_id,
            compressed.vanilla_counts,
            compressed.counts,
            attention_mask=mask,
            labels=kwargs.get("labels"),
            pad_token_id=self._pad_token_id(),
        )
        kwargs["input_ids"] = shrunk.input_ids
        if shrunk.attention_mask is not None:
            kwargs["attention_mask"] = shrunk.attention_mask
        if kwargs.get("labels") is not None:
            kwargs["labels"] = shrunk.labels
        if kwargs.get("position_ids") is not None and shrunk.attention_mask is not None:
            # Positions of the shortened sequence, counted over real tokens as HF does for padding.
            kwargs["position_ids"] = (shrunk.attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        elif kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = torch.arange(shrunk.input_ids.shape[1], device=input_ids.device)[None].expand_as(
                shrunk.input_ids
            )
        kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=compressed.tokens)}
        # Kept for inspection: detached, so that it never holds the caller's autograd graph.
        self.last = CompressedImages(
            tokens=[t.detach() for t in compressed.tokens], plans=compressed.plans, vanilla_counts=compressed.vanilla_counts
        )
        self._check_context(shrunk.input_ids.shape[1])
        self._vanilla_rows = (input_ids == self.hf_config.image_token_id).sum(1)
        return kwargs

    def _check_context(self, length: int) -> None:
        """Warn once per applied adapter when a prompt (visual tokens included) exceeds the language
        model's context window (``max_position_embeddings``)."""
        limit = getattr(self.hf_config.text_config, "max_position_embeddings", None)
        if self._warned_context or not isinstance(limit, int) or length <= limit:
            return
        self._warned_context = True
        warnings.warn(
            f"the prompt is {length} tokens long with its compressed visual tokens, more than the language model's "
            f"context window of {limit} (max_position_embeddings); expect degraded answers (this warning is shown once)",
            UserWarning,
            stacklevel=4,
        )

    # -- patching -------------------------------------------------------------------------------
    def patched_methods(self) -> dict[str, str]:
        methods = {"forward": "_patched_forward"}
        if hasattr(self.model, "generate"):
            methods["generate"] = "_patched_generate"
        return methods

    @staticmethod
    def _has_images(kwargs: dict[str, Any]) -> bool:
        pv = kwargs.get("pixel_values")
        return pv is not None and pv.shape[0] > 0

    def _patched_forward(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``forward``: compress, then the original on the shorter sequence (in the caller's grad mode)."""
        call = bind_arguments(original, args, kwargs)
        if self.vision_config is not None and self._has_images(call):
            call = self.prepare_inputs(call)
        if _is_prefill(call) and call.get("input_ids") is not None:
            self._on_prefill(call["input_ids"])
        return original(**call)

    def _on_prefill(self, input_ids: torch.Tensor) -> None:
        """Record the visual-token counts of a prefill and tell FastV where the visual tokens are."""
        visual = input_ids == self.hf_config.image_token_id  # (B, T)
        self._last_visual = visual
        counts = visual.sum(1)  # (B,)
        before = self._vanilla_rows
        self._vanilla_rows = None
        if before is None or before.shape != counts.shape:  # no compression on this call
            before = counts
        rows, vanilla = torch.stack([counts, before.to(counts.device)]).tolist()  # one host sync
        lm_rows: list[int] | None = None
        effective = [float(r) for r in rows]
        if self.fastv is not None:
            self.fastv.prepare(visual)
            k, n_layers = self.fastv_config.layer, self.fastv.n_layers
            lm_rows = [kept_count(r, self.fastv_config.retention_ratio) for r in rows]
            effective = [(k * r + (n_layers - k) * kept) / n_layers for r, kept in zip(rows, lm_rows)]
        self.stats = CompressionStats(
            method=self.config.method,
            visual_tokens=rows,
            vanilla_visual_tokens=list(vanilla),
            lm_visual_tokens=lm_rows,
            effective_visual_tokens=effective,
        )

    # -- patching (FastV's layers too) ----------------------------------------------------------
    def patch(self) -> None:
        super().patch()
        if self.fastv is not None:
            try:
                self.fastv.install()
            except Exception:
                super().unpatch()
                raise

    def unpatch(self) -> None:
        if self.fastv is not None:
            self.fastv.uninstall()
        super().unpatch()

    def _patched_generate(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``generate``: compress once (without a graph, as the vanilla ``generate`` runs), generate on
        the shorter prompt, and give the caller's prompt back in front of the new tokens.

        Everything that counts the prompt means what it means on the vanilla model: ``max_length`` /
        ``min_length`` (given or from the generation config), the caller's stopping criteria and
        logits processors (they see the vanilla prompt), and a streamer (its first ``put`` is the
        caller's prompt). A later turn that passes the returned ``past_key_values`` with the
        returned sequences (plus new text) is continued on the compressed cache.
        """
        call = bind_arguments(original, args, kwargs)
        input_ids = call.pop("inputs", None)
        if input_ids is None:
            input_ids = call.pop("input_ids", None)
        if input_ids is not None and self.vision_config is not None and _cache_length(_given_cache(call)) > 0:
            return self._continue_turn(original, input_ids, call)
        if input_ids is None or not self._has_images(call) or self.vision_config is None:
            if input_ids is not None:
                call["inputs"] = input_ids
            return original(**call)
        call["input_ids"] = input_ids
        with torch.no_grad():
            prepared = self.prepare_inputs(call)
        short_ids = prepared.pop("input_ids")
        return self._generate_short(original, input_ids, short_ids, prepared)

    def _generate_short(
        self, original: Callable[..., Any], input_ids: torch.Tensor, short_ids: torch.Tensor, call: dict[str, Any]
    ) -> Any:
        """Run the original ``generate`` on ``short_ids`` (B, T1) standing for ``input_ids`` (B, T0)."""
        _vanilla_lengths(call, input_ids.shape[1] - short_ids.shape[1], getattr(self.model, "generation_config", None))
        _vanilla_prompt_views(call, input_ids, short_ids.shape[1])
        out = original(short_ids, **call)
        self._turn = _Turn(input_ids, short_ids, call.get("attention_mask"))
        return _restore_prompt(out, input_ids, short_ids.shape[1])

    def _continue_turn(self, original: Callable[..., Any], input_ids: torch.Tensor, call: dict[str, Any]) -> Any:
        """A chat turn on the ``past_key_values`` of an earlier compressed ``generate``.

        ``input_ids`` (B, T) must start with that call's prompt (the sequences it returned start
        with it): the prompt is swapped for its compressed form, which the cache holds, and
        generation goes on from there, as running the whole conversation afresh with the image would.
        """
        image_id = self.hf_config.image_token_id
        turn = self._turn
        if turn is not None and turn.matches(input_ids):
            if self.fastv is not None:
                raise ValueError(
                    "continuing a FastV generate from its past_key_values is not supported (its cache is pruned "
                    "per layer); pass the whole conversation with pixel_values and no past_key_values"
                )
            t0 = turn.original_ids.shape[1]
            short_ids = torch.cat([turn.short_ids.to(input_ids.device), input_ids[:, t0:]], dim=1)
            mask = call.get("attention_mask")
            if mask is not None:
                head = turn.short_mask if turn.short_mask is not None else torch.ones_like(turn.short_ids)
                call["attention_mask"] = torch.cat([head.to(mask), mask[:, t0:]], dim=1)
            # The images are in the cache already (the vanilla generate ignores them on a continued cache too).
            for key in ("pixel_values", "image_sizes"):
                call.pop(key, None)
            return self._generate_short(original, input_ids, short_ids, call)
        cached = _cache_length(_given_cache(call))
        if bool((input_ids[:, cached:] == image_id).any()):
            raise ValueError(
                "past_key_values were given with image placeholders beyond the cached tokens, but they do not "
                "continue this model's last compressed generate call: pass that call's returned sequences (plus "
                "the new turn) with its past_key_values, or the whole conversation with pixel_values and no "
                "past_key_values"
            )
        call["inputs"] = input_ids
        return original(**call)


@dataclass
class _Turn:
    """The prompt of the last compressed ``generate`` call: what the caller passed and what the
    language model (and so the KV cache) saw instead."""

    original_ids: torch.Tensor  # (B, T0)
    short_ids: torch.Tensor  # (B, T1)
    short_mask: torch.Tensor | None  # (B, T1)

    def matches(self, input_ids: torch.Tensor) -> bool:
        t0 = self.original_ids.shape[1]
        return (
            input_ids.shape[0] == self.original_ids.shape[0]
            and input_ids.shape[1] >= t0
            and torch.equal(input_ids[:, :t0], self.original_ids.to(input_ids.device))
        )


def _given_cache(call: dict[str, Any]) -> Any:
    """The KV cache a ``generate`` call was given (``cache``, or the older ``past_key_values``)."""
    cache = call.get("cache")
    return cache if cache is not None else call.get("past_key_values")


def _cache_length(cache: Any) -> int:
    get_len = getattr(cache, "get_seq_length", None)
    return int(get_len()) if get_len is not None else 0


def _vanilla_lengths(call: dict[str, Any], delta: int, model_config: Any) -> None:
    """Shift ``max_length`` / ``min_length`` (total lengths, prompt included) by the ``delta`` tokens
    the prompt lost, so they allow as many new tokens as on the vanilla model. Given as arguments
    or set in the generation config in use; ``max_new_tokens`` / ``min_new_tokens`` need nothing,
    and neither does transformers' model-agnostic default ``max_length`` (it adds the prompt length)."""
    if delta == 0:
        return
    from transformers import GenerationConfig

    config = call.get("generation_config") or model_config
    for key, new_key in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
        if call.get(new_key) is not None:
            continue
        if call.get(key) is not None:
            call[key] = max(int(call[key]) - delta, 0)
            continue
        if config is None or getattr(config, new_key, None) is not None:
            continue
        value = getattr(config, key, None)
        if not value or (key == "max_length" and value == GenerationConfig().max_length):
            continue
        call[key] = max(int(value) - delta, 0)


def _vanilla_prompt_views(call: dict[str, Any], input_ids: torch.Tensor, short_len: int) -> None:
    """Let the caller's stopping criteria, logits processors and streamer see the caller's prompt."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    for key, kind, view in (
        ("stopping_criteria", StoppingCriteriaList, _CriteriaView),
        ("logits_processor", LogitsProcessorList, _ProcessorView),
    ):
        items = call.get(key)
        if items:
            call[key] = kind([view(item, input_ids, short_len) for item in items])
    if call.get("streamer") is not None:
        call["streamer"] = _PromptStreamer(call["streamer"], input_ids)


def _vanilla_ids(ids: torch.Tensor, prompt: torch.Tensor, short_len: int) -> torch.Tensor:
    """(B', T1 + n) running sequences with the caller's (B, T0) prompt in place of the short one."""
    prefix = prompt.to(ids.device).repeat_interleave(ids.shape[0] // prompt.shape[0], dim=0)
    return torch.cat([prefix, ids[:, short_len:]], dim=1)


class _CriteriaView:
    def __init__(self, criteria: Any, prompt: torch.Tensor, short_len: int) -> None:
        self.criteria, self.prompt, self.short_len = criteria, prompt, short_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> Any:
        return self.criteria(_vanilla_ids(input_ids, self.prompt, self.short_len), scores, **kwargs)


class _ProcessorView:
    def __init__(self, processor: Any, prompt: torch.Tensor, short_len: int) -> None:
        self.processor, self.prompt, self.short_len = processor, prompt, short_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.processor(_vanilla_ids(input_ids, self.prompt, self.short_len), scores)


class _PromptStreamer:
    """A streamer whose first ``put`` (the prompt) is the caller's prompt, not the shortened one."""

    def __init__(self, streamer: Any, prompt: torch.Tensor) -> None:
        self.streamer, self.prompt, self._first = streamer, prompt, True

    def put(self, value: torch.Tensor) -> None:
        if self._first:
            self._first = False
            value = self.prompt.to(value.device)
        self.streamer.put(value)

    def end(self) -> None:
        self.streamer.end()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.streamer, name)


def _is_prefill(call: dict[str, Any]) -> bool:
    """Whether a forward call starts a sequence (no KV cache yet, or an empty one)."""
    cache = call.get("past_key_values", call.get("cache"))
    if cache is None:
        return True
    get_len = getattr(cache, "get_seq_length", None)
    return get_len is not None and int(get_len()) == 0


def _restore_prompt(out: Any, original_ids: torch.Tensor, short_len: int) -> Any:
    """Put the caller's own prompt ids back in front of the generated tokens."""
    seqs = out if torch.is_tensor(out) else getattr(out, "sequences", None)
    if seqs is None:  # pragma: no cover - unknown output type, leave it alone
        return out
    expand = seqs.shape[0] // original_ids.shape[0]
    prefix = original_ids.to(seqs.device).repeat_interleave(expand, dim=0)
    restored = torch.cat([prefix, seqs[:, short_len:]], dim=1)
    if torch.is_tensor(out):
        return restored
    out.sequences = restored
    return out
