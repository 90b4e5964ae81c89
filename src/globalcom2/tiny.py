"""Tiny, randomly initialised models built in code (no download), one per family: the one place
that builds them.

Each keeps its family's real geometry (view size, patches, pinpoints or tiling, feature layer,
placeholder count) and shrinks every width, so a forward pass takes milliseconds on a CPU; their
answers are noise. They exist for tests, the offline demo, benchmarks of the compression step and
the vLLM plugin's tiny checkpoints. The same seed gives the same weights, bit for bit.

How a family gets one (a few lines in its own module, ``globalcom2/models/<family>.py``; the
family never imports this module, which finds it in the registry):

* ``tiny = TinyGeometry(...)`` (:class:`globalcom2.models.TinyGeometry`), a class attribute: the
  tokenizer's special tokens, the processor and image processor classes with the checkpoints'
  settings, and the tiny widths of the vision tower and the language model;
* ``tiny_config(cls, tokenizer, vision, text, **options)``, a classmethod: the ``transformers``
  config of the checkpoints' geometry at those widths (token ids read from ``tokenizer``);
* optionally ``tiny_init(cls, model)``: weights drawn after the random init, under the same seed.

A processor whose constructor wants a video processor (torchvision) gets none (images only); one
whose constructor checks for a package only its videos use (SmolVLM's ``num2words``) names it in
``TinyGeometry.video_only_imports`` and is constructed with a stand-in where the package is missing
(:func:`video_only_stand_ins`): on images the processor behaves as the stock one.

Then :func:`build_tiny` (``Family.build_tiny``) builds it: :func:`build_tokenizer` (one
byte-level tokenizer: ``<unk> <s> </s> <pad>``, the family's special tokens, the 256 byte
tokens), :func:`build_processor`, :func:`build_config` and :func:`build_model` (seeded on a
private generator state; the global RNG is restored).

:func:`build_wide` builds the wide random benchmark model (a family's real widths, few language
layers) where the family declares them (LLaVA-NeXT: llava-v1.6-vicuna-7b's).
"""

from __future__ import annotations

import importlib
import sys
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from .models import family_for_model_type

#: Decoder layers of the wide model's language model by default (Vicuna-7B has 32).
WIDE_TEXT_LAYERS = 2
#: The tokenizer's first tokens (ids 0-3): unknown, begin, end, padding.
BASE_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")


def family_of(which: Any = "llava_next") -> Any:
    """The family class of ``which``: a ``model_type`` (asked from the registry) or a family class."""
    return family_for_model_type(which) if isinstance(which, str) else which


def geometry(which: Any = "llava_next") -> Any:
    """The family's :class:`~globalcom2.models.TinyGeometry` (a ValueError if it declares none)."""
    fam = family_of(which)
    if fam.tiny is None:
        raise ValueError(f"{fam.display_name or fam.__name__} declares no tiny test model (its TinyGeometry)")
    return fam.tiny


def resolve(name: str) -> Any:
    """A class named in a :class:`~globalcom2.models.TinyGeometry`: a name in ``transformers`` or a dotted path."""
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module or "transformers"), attr)


def build_tokenizer(which: Any = "llava_next") -> Any:
    """A byte-level tokenizer built offline with ``tokenizers``: :data:`BASE_SPECIALS`, the family's
    special tokens (each also a tokenizer attribute, what its processor reads), then the 256 byte
    tokens; left padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    extra = dict(geometry(which).special_tokens)
    vocab = {tok: i for i, tok in enumerate([*BASE_SPECIALS, *extra.values()])}
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
        extra_special_tokens=extra,
    )
    tokenizer.padding_side = "left"
    return tokenizer


@lru_cache(maxsize=None)
def _images_only(cls: type) -> type:
    """``cls`` (a processor class) with its one class check on ``video_processor`` relaxed.

    transformers 5.x checks every processor argument's class; without torchvision a video
    processor's base class is a dummy that cannot even be looked up, so the stock class cannot be
    constructed here. This subclass accepts ``video_processor=None`` (images only) and checks
    everything else as usual. Only the tiny models use it: checkpoints load their processor with
    ``AutoProcessor.from_pretrained``; a saved tiny checkpoint has the stock class (:func:`with_video_processor`).
    """

    def check_argument_for_proper_class(self: Any, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and argument is None:
            return None
        return super(sub, self).check_argument_for_proper_class(argument_name, argument)

    sub = type(f"Tiny{cls.__name__}", (cls,), {"check_argument_for_proper_class": check_argument_for_proper_class})
    return sub


def _missing_package(name: str) -> Any:
    """A stand-in for the missing package function ``name``: raises ImportError when called."""

    def missing(*args: Any, **kwargs: Any) -> Any:
        raise ImportError(f"{name} is not installed: the tiny processor was built without it (images only)")

    return missing


@contextmanager
def video_only_stand_ins(cls: type, names: tuple[str, ...]) -> Any:
    """While constructing ``cls`` (a stock processor class): each of ``names`` that its module lacks
    (a package not installed, e.g. SmolVLM's ``num2words``, which its constructor checks although
    only videos use it) is a stand-in that raises ImportError if called; restored afterwards."""
    module = sys.modules[cls.__module__]
    missing = {n: getattr(module, n, None) for n in names if not getattr(module, n, None)}
    for name in missing:
        setattr(module, name, _missing_package(name))
    try:
        yield
    finally:
        for name, value in missing.items():
            setattr(module, name, value)


def build_processor(which: Any = "llava_next", **image_options: Any) -> Any:
    """The family's processor configured as its checkpoints' (view size, pinpoints or tiling, token
    counts) with :func:`build_tokenizer`'s tokenizer; ``image_options`` change the image processor's
    settings (InternVL's ``max_patches=12``, the checkpoints' own)."""
    geo = geometry(which)
    image_processor = resolve(geo.image_processor)(**{**geo.image_processor_kwargs, **image_options})
    kwargs = dict(geo.processor_kwargs)
    stock = cls = resolve(geo.processor)
    if geo.video_processor is not None:
        cls = _images_only(cls)
        kwargs["video_processor"] = None
    with video_only_stand_ins(stock, geo.video_only_imports):
        return cls(image_processor=image_processor, tokenizer=build_tokenizer(which), **kwargs)


def with_video_processor(processor: Any, which: Any = "llava_next") -> Any:
    """``processor`` (a tiny one) as the stock processor class with its real video processor (what a
    saved checkpoint needs: vLLM's processor loads it); unchanged where there is none to add."""
    geo = geometry(which)
    if geo.video_processor is None or getattr(processor, "video_processor", None) is not None:
        return processor
    stock = resolve(geo.processor)
    with video_only_stand_ins(stock, geo.video_only_imports):
        return stock(
            image_processor=processor.image_processor, tokenizer=processor.tokenizer,
            video_processor=resolve(geo.video_processor)(), **geo.processor_kwargs,
        )


def build_config(
    which: Any = "llava_next", tokenizer: Any = None, vision: dict[str, Any] | None = None,
    text: dict[str, Any] | None = None, wide_layers: int | None = None, **options: Any,
) -> Any:
    """The family's tiny config (:meth:`~globalcom2.models.Family.tiny_config`): its tiny widths
    (with ``wide_layers``, its real ones with that many language layers), then ``vision`` / ``text``
    over them; the vocabulary and special token ids are ``tokenizer``'s (default :func:`build_tokenizer`)."""
    fam, geo = family_of(which), geometry(which)
    tok = build_tokenizer(which) if tokenizer is None else tokenizer
    if wide_layers is None:
        base_vision, base_text = geo.vision, geo.text
    else:
        if geo.wide_vision is None or geo.wide_text is None:
            raise ValueError(f"there is no wide random {fam.display_name} model")
        if int(wide_layers) < 1:
            raise ValueError(f"text_layers must be >= 1, got {wide_layers}")
        base_vision, base_text = geo.wide_vision, dict(geo.wide_text, num_hidden_layers=int(wide_layers))
    ids = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    return fam.tiny_config(tok, {**base_vision, **(vision or {})}, {**base_text, **ids, **(text or {})}, **options)


def build_model(
    which: Any, config: Any, pad_token_id: int | None, seed: int = 0, dtype: Any = None, device: Any = "cpu",
    direct: bool = False,
) -> Any:
    """The family's model class on ``config`` with random weights seeded by ``seed`` (a private
    generator state; the global RNG is restored), in eval mode, ``dtype`` (default float32) on
    ``device``. ``direct``: the weights are made in ``dtype`` on ``device`` at once (no float32 copy
    first; for the wide model)."""
    import torch

    fam = family_of(which)
    cls = fam.hf_classes()[0]
    dtype = dtype or torch.float32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if direct:
            with torch.device(device):
                model = cls._from_config(config, dtype=dtype)
        else:
            model = cls(config)
        fam.tiny_init(model)
    model.generation_config.pad_token_id = pad_token_id
    return model.to(device=device, dtype=dtype).eval()


def build_tiny(
    which: Any = "llava_next", seed: int = 0, dtype: Any = None, device: Any = "cpu",
    vision: dict[str, Any] | None = None, text: dict[str, Any] | None = None, **options: Any,
) -> tuple[Any, Any]:
    """``(model, processor)``: the tiny random model of ``which`` (a ``model_type`` or a family) in
    eval mode and its processor.

    Args:
        seed: seed of the weights (a private generator state; the global RNG is restored).
        dtype: parameter dtype (default float32).
        device: where the model lives.
        vision / text: widths over the tiny ones (the vLLM checkpoints' heads, a benchmark's sizes).
        **options: the family's own (InternVL: ``use_qk_norm=False``, InternViT-300M's tower).
    """
    processor = build_processor(which)
    tok = processor.tokenizer
    config = build_config(which, tok, vision=vision, text=text, **options)
    return build_model(which, config, tok.pad_token_id, seed=seed, dtype=dtype, device=device), processor


def build_tiny_llava_next(seed: int = 0, dtype: Any = None, device: Any = "cpu") -> tuple[Any, Any]:
    """The tiny LLaVA-NeXT (the default test model): ``build_tiny("llava_next", ...)``."""
    return build_tiny("llava_next", seed=seed, dtype=dtype, device=device)


def build_wide_config(which: Any = "llava_next", text_layers: int = WIDE_TEXT_LAYERS, **text: Any) -> Any:
    """The wide config: the real widths the family declares (LLaVA-NeXT: llava-v1.6-vicuna-7b's)
    with ``text_layers`` language layers, ``text`` over them.

    For LLaVA-NeXT:

    * vision tower: CLIP ViT-L/14-336 as in ``openai/clip-vit-large-patch14-336`` (24 layers,
      hidden 1024, MLP 4096, 16 heads, quick-GELU), features from the second-to-last layer;
    * projector: 1024 -> 4096 -> 4096 (LLaVA-NeXT's two-layer MLP);
    * language model: Vicuna-7B's widths (hidden 4096, MLP 11008 gated, 32 heads, 32 KV heads,
      4,096 positions) with ``text_layers`` layers instead of 32. Every decoder layer costs the
      same, so the ratio of two prefills' language-model FLOPs (and, to the extent the hardware
      is uniform, times) per layer does not depend on the depth; only the LM's share next to
      the vision tower does.
    * vocabulary: the offline byte-level tokenizer's, not Vicuna's 32,000: the embedding is a
      lookup and the LM head runs on one position in generation (about 0.02% of a Vicuna-7B
      layer's prefill FLOPs at 2,880 tokens), so this changes neither figure.
    """
    return build_config(which, wide_layers=text_layers, text=text or None)


def build_wide(
    which: Any = "llava_next", text_layers: int = WIDE_TEXT_LAYERS, seed: int = 0, dtype: Any = None, device: Any = "cpu"
) -> tuple[Any, Any]:
    """``(model, processor)``: a random model of :func:`build_wide_config`'s sizes.

    The processor is the tiny model's (:func:`build_processor`): it already has the checkpoints'
    image geometry (LLaVA-NeXT: 336 px views, 14 px patches, their pinpoints, so a 672x672 image
    gets 2,928 placeholders, as on llava-v1.6-vicuna-7b: 576 for the base view, 2 x 2 crops of 576,
    48 row newlines). The weights are made directly in ``dtype`` on ``device`` (no float32 copy
    first): for LLaVA-NeXT 0.73 B parameters with the default 2 language layers (0.30 B tower,
    0.02 B projector, 0.20 B per decoder layer), 1.5 GB in bfloat16, 2.9 GB in float32; building
    takes about 20 s on a 2-core CPU (the random initialisation). Seeded by ``seed`` on a private
    generator state (the global RNG is restored). Answers are noise; times and memory are those of
    real sizes.
    """
    processor = build_processor(which)
    tok = processor.tokenizer
    config = build_config(which, tok, wide_layers=text_layers)
    return build_model(which, config, tok.pad_token_id, seed=seed, dtype=dtype, device=device, direct=True), processor
