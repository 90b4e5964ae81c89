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
#: Further language-model settings per model type. Command A Vision: Hugging Face's
#: ``Cohere2VisionForConditionalGeneration`` leaves its logits unscaled, vLLM's Cohere 2 language model
#: multiplies them by ``logit_scale`` (0.0625 by default): at 1 the two agree.
TINY_TEXT_EXTRA: dict[str, dict[str, Any]] = {"cohere2_vision": {"logit_scale": 1.0}}


def tiny_text(model_type: str) -> dict[str, Any]:
    """:data:`TINY_TEXT` for ``model_type``'s tiny language model; where that model states its
    ``head_dim`` (Llama 4: 16 at width 64), the head_dim of those heads (hidden_size / heads: 32)."""
    from ... import tiny

    text = {**TINY_TEXT, **TINY_TEXT_EXTRA.get(model_type, {})}
    base = tiny.geometry(model_type).text
    if "head_dim" in base:
        text["head_dim"] = int(base["hidden_size"]) // text["num_attention_heads"]
    return text


def build(model_type: str, seed: int = 0, text: dict[str, Any] | None = None, wide_layers: int | None = None) -> tuple[Any, Any]:
    """``(model, processor)`` of a family's tiny model (float32, eval) with ``text`` overrides of
    its language model (default :func:`tiny_text`). ``wide_layers``: the family's wide widths
    (LLaVA-NeXT: llava-v1.6-vicuna-7b's) with that many language layers, ``text`` over them."""
    from ... import tiny

    processor = tiny.build_processor(model_type)
    tok = processor.tokenizer
    if wide_layers is not None:
        config = tiny.build_config(model_type, tok, text=text, wide_layers=wide_layers)
    else:
        config = tiny.build_config(model_type, tok, text=tiny_text(model_type) if text is None else dict(text))
    return tiny.build_model(model_type, config, tok.pad_token_id, seed=seed), processor


def save(model: Any, processor: Any, path: str | Path) -> Path:
    """Write ``model`` and ``processor`` to ``path`` as vLLM loads them (the processor with its
    video processor, the tower under the hub's names where the family's checkpoints have them)."""
    from safetensors.torch import load_file, save_file

    from ... import tiny

    model_type = getattr(model.config, "model_type", "")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tiny.with_video_processor(processor, model_type).save_pretrained(path)
    if not tiny.geometry(model_type).hub_tower_names:
        return path  # the tower is saved under the names vLLM reads
    for file in sorted(path.glob("*.safetensors")):
        tensors = load_file(str(file))
        renamed = {_hub_name(k): v for k, v in tensors.items()}
        if renamed.keys() != tensors.keys():
            save_file(renamed, str(file), metadata={"format": "pt"})
    return path


def _hub_name(name: str) -> str:
    for head in ("model.vision_tower.", "vision_tower."):
        if name.startswith(head) and not name.startswith(head + "vision_model."):
            return head + "vision_model." + name[len(head):]
    return name


def save_tiny(model_type: str, path: str | Path, seed: int = 0, **kwargs: Any) -> tuple[Path, Any, Any]:
    """Build and save a tiny checkpoint; returns (folder, model, processor)."""
    model, processor = build(model_type, seed=seed, **kwargs)
    return save(model, processor, path), model, processor
