"""A tiny, randomly initialised LLaVA-NeXT built entirely in code (no download).

It keeps the real geometry (CLIP 336 px views with 14 px patches: 24 x 24 = 576 tokens per
view, the llava-hf AnyRes grid pinpoints) and shrinks every width, so a forward pass takes
milliseconds on a CPU. Its weights are random: its answers are noise. It exists for tests, the
offline demo and benchmarks of the compression step; real checkpoints load with
``from_pretrained("llava-hf/...")``.
"""

from __future__ import annotations

from typing import Any

import torch

#: AnyRes pinpoints of the public llava-hf LLaVA-NeXT checkpoints, (height, width).
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]


def build_tokenizer() -> Any:
    """A byte-level tokenizer (256 byte tokens + specials) built offline with ``tokenizers``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.padding_side = "left"
    return tokenizer


def build_processor() -> Any:
    """A ``LlavaNextProcessor`` configured like the llava-hf checkpoints (336 px views)."""
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLIP tower's [CLS]
    )


def build_config(vocab_size: int, image_token_id: int, pad_token_id: int, **text_overrides: Any) -> Any:
    """The tiny ``LlavaNextConfig``: CLIP-336/14 geometry, widths of a few dozen."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    vision = CLIPVisionConfig(
        image_size=336,
        patch_size=14,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        projection_dim=32,
    )
    text_kwargs = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,  # deep enough for FastV at its default layer K=2
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=8192,
        pad_token_id=pad_token_id,
        bos_token_id=1,
        eos_token_id=2,
    )
    text_kwargs.update(text_overrides)
    return LlavaNextConfig(
        vision_config=vision,
        text_config=LlamaConfig(**text_kwargs),
        image_token_id=image_token_id,
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def build_tiny_llava_next(seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """Build ``(model, processor)``: a random tiny LLaVA-NeXT in eval mode and its processor.

    Args:
        seed: seed of the weights (a private generator state; the global RNG is restored).
        dtype: parameter dtype.
        device: where the model lives.
    """
    from transformers import LlavaNextForConditionalGeneration

    processor = build_processor()
    tok = processor.tokenizer
    config = build_config(len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaNextForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.to(device=device, dtype=dtype).eval(), processor
