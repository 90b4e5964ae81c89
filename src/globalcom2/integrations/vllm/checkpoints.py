"""Tiny random checkpoints that vLLM loads (for the plugin's tests and the serving benchmark; no
download). The families' tiny models with a language model vLLM's CPU attention takes (head_dim
32: it needs one of 32, 64, 80, 96, 112, 128...), saved with ``save_pretrained`` with the vision
tower under the hub's names (``vision_tower.vision_model.*``, as the llava-hf checkpoints).

No import of vLLM here: the Hugging Face reference of a test loads the same folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: Language-model overrides that give head_dim 32 at the tiny width (64 = 2 heads x 32).
TINY_TEXT = {"num_attention_heads": 2, "num_key_value_heads": 1}


def build(model_type: str, seed: int = 0, text: dict[str, Any] | None = None, wide_layers: int | None = None) -> tuple[Any, Any]:
    """``(model, processor)`` of a family's tiny model (float32, eval) with ``text`` overrides of
    its language model (default :data:`TINY_TEXT`). ``wide_layers``: LLaVA-NeXT only, the
    benchmark's llava-v1.6-vicuna-7b widths with that many language layers."""
    import torch

    overrides = dict(TINY_TEXT if text is None else text)
    if model_type == "llava_next":
        from ...models import llava_next as fam

        processor = fam.build_processor()
        tok = processor.tokenizer
        if wide_layers is not None:
            config = fam.build_wide_config(len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id, wide_layers, **(text or {}))
        else:
            config = fam.build_config(len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id, **overrides)
        from transformers import LlavaNextForConditionalGeneration as cls
    elif model_type == "llava_onevision":
        from ...models import llava_onevision as fam

        processor = fam.build_processor()
        tok = processor.tokenizer
        config = fam.build_config(
            len(tok), tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("<video>"), tok.pad_token_id, **overrides
        )
        from transformers import LlavaOnevisionForConditionalGeneration as cls
    elif model_type == "internvl":
        from ...models import internvl as fam

        processor = fam.build_processor()
        tok = processor.tokenizer
        config = fam.build_config(len(tok), tok.convert_tokens_to_ids("<IMG_CONTEXT>"), tok.pad_token_id, **overrides)
        from transformers import InternVLForConditionalGeneration as cls
    else:
        raise ValueError(f"no tiny vLLM checkpoint for model_type {model_type!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
        if model_type == "internvl":  # random q/k norm weights, as the family's tiny model
            for module in model.model.vision_tower.modules():
                for name in ("q_norm", "k_norm"):
                    norm = getattr(module, name, None)
                    if norm is not None and hasattr(norm, "weight"):
                        torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.float().eval(), processor


def save(model: Any, processor: Any, path: str | Path) -> Path:
    """Write ``model`` and ``processor`` to ``path`` as vLLM loads them (tower under hub names)."""
    from safetensors.torch import load_file, save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    _with_video_processor(processor).save_pretrained(path)
    if getattr(model.config, "model_type", "") not in ("llava_next", "llava_onevision"):
        return path  # InternVL's tower is saved under the names vLLM reads
    for file in sorted(path.glob("*.safetensors")):
        tensors = load_file(str(file))
        renamed = {_hub_name(k): v for k, v in tensors.items()}
        if renamed.keys() != tensors.keys():
            save_file(renamed, str(file), metadata={"format": "pt"})
    return path


def _with_video_processor(processor: Any) -> Any:
    """The families' tiny processors leave the video processor out (it needs torchvision, absent
    from the main venv); the saved processor has the real one, which vLLM's processor loads."""
    if getattr(processor, "video_processor", True) is not None:
        return processor
    from transformers import (
        InternVLProcessor, InternVLVideoProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor,
    )

    if isinstance(processor, LlavaOnevisionProcessor):
        return LlavaOnevisionProcessor(
            image_processor=processor.image_processor, tokenizer=processor.tokenizer,
            video_processor=LlavaOnevisionVideoProcessor(), num_image_tokens=processor.num_image_tokens,
            vision_feature_select_strategy=processor.vision_feature_select_strategy,
            vision_aspect_ratio=processor.vision_aspect_ratio,
        )
    if isinstance(processor, InternVLProcessor):
        return InternVLProcessor(
            image_processor=processor.image_processor, tokenizer=processor.tokenizer,
            video_processor=InternVLVideoProcessor(), image_seq_length=processor.image_seq_length,
        )
    return processor


def _hub_name(name: str) -> str:
    for head in ("model.vision_tower.", "vision_tower."):
        if name.startswith(head) and not name.startswith(head + "vision_model."):
            return head + "vision_model." + name[len(head):]
    return name


def save_tiny(model_type: str, path: str | Path, seed: int = 0, **kwargs: Any) -> tuple[Path, Any, Any]:
    """Build and save a tiny checkpoint; returns (folder, model, processor)."""
    model, processor = build(model_type, seed=seed, **kwargs)
    return save(model, processor, path), model, processor
