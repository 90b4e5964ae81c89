"""Compressed image embeddings as a product: compute them once, cache them, reuse them, serve them.

:func:`compress_images` returns, per image, the ``(n_i, D)`` sequence a patched model would feed its
language model (newlines included), without patching the model, building an autograd graph or
leaving anything on it. Those sequences

* go through the *vanilla* model's ``inputs_embeds`` path (:func:`embed_prompt`, or
  :meth:`ImageEmbeddings.inputs_embeds`) with a prompt holding one placeholder per kept token,
  giving the patched model's logits;
* go back into a *patched* model in place of ``pixel_values``
  (``model.generate(**text_inputs, image_embeddings=emb)``): repeated questions and re-sent chat
  histories about one image skip the vision tower;
* are saved to and read from safetensors (:meth:`ImageEmbeddings.save`, :func:`load_embeddings`),
  with the method's config and the counts in the file's metadata: the format serving engines such
  as vLLM take as precomputed image embeddings (README, "Serving").

A prompt for the embeddings may hold, for each image, the vanilla model's placeholders (what the
model's processor writes), exactly ``n_i`` of them, or one (``"<image>"`` tokenised as is, as
serving engines expect); :meth:`ImageEmbeddings.prompt` rewrites any of these to ``n_i``.

A model that writes one placeholder run per *view* of an image, with text between the runs
(Idefics3 / SmolVLM), gets embeddings that carry each view's run (``runs``, ``vanilla_runs``; saved
in the file too): the prompt is then the processor's, with the vanilla runs, or each run already
shortened to its view's count, or one placeholder per view; every run is rewritten to its view's
count and the text between the runs stays (SPEC.md: "every view keeps its own placeholder run").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from .core.sequence import expand_placeholders, prompt_form

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

#: ``format`` entry of the metadata of a file written by :meth:`ImageEmbeddings.save`.
FILE_FORMAT = "globalcom2.image_embeddings"
#: Version of that layout (bumped when it changes incompatibly).
FILE_VERSION = "1"


@dataclass(repr=False)
class ImageEmbeddings:
    """Per image, the visual tokens a compressed model feeds its language model.

    Attributes:
        embeddings: per image, an ``(n_i, D)`` tensor (the language model's hidden size ``D``).
        vanilla_counts: per image, the placeholders the vanilla model uses for it (what the model's
            processor writes into a prompt).
        config: the method's config (a :class:`~globalcom2.GlobalCom2Config`...).
        model_type: ``config.model_type`` of the model they come from (``"llava_next"``...).
        image_token_id: the placeholder token id of that model.
        model: the model's ``name_or_path`` (for records; may be empty).
        images: per image, a name (file path for ``globalcom2 embed``), or None.
        plans: per image, what the method decided (None after :func:`load_embeddings`: files hold
            tokens and counts, not plans).
        runs: per image, the kept tokens of each of its views' placeholder runs (prompt order; they
            add up to ``n_i``), for a model with one run per view; None: one run per image.
        vanilla_runs: per image, the vanilla model's placeholders in each of those runs (None with ``runs``).
    """

    embeddings: list[torch.Tensor]
    vanilla_counts: list[int]
    config: Any
    model_type: str
    image_token_id: int
    model: str = ""
    images: list[str] | None = None
    plans: list[Any] | None = field(default=None, repr=False)
    runs: list[list[int]] | None = None
    vanilla_runs: list[list[int]] | None = None

    # -- what they are -------------------------------------------------------------------------
    @property
    def counts(self) -> list[int]:
        """Per image, its visual tokens ``n_i`` (newlines included)."""
        return [int(t.shape[0]) for t in self.embeddings]

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def hidden_size(self) -> int:
        return int(self.embeddings[0].shape[-1]) if self.embeddings else 0

    def __len__(self) -> int:
        return len(self.embeddings)

    def __repr__(self) -> str:
        dtype = str(self.embeddings[0].dtype).replace("torch.", "") if self.embeddings else "-"
        return (
            f"ImageEmbeddings({len(self)} image(s), counts={self.counts}, vanilla_counts={list(self.vanilla_counts)}, "
            f"method={self.method!r}, model_type={self.model_type!r}, hidden_size={self.hidden_size}, dtype={dtype})"
        )

    def select(self, indices: Sequence[int] | int) -> "ImageEmbeddings":
        """The embeddings of some images only (in the order given), e.g. one image for one prompt."""
        idx = [indices] if isinstance(indices, int) else list(indices)
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        return ImageEmbeddings(
            embeddings=pick(self.embeddings), vanilla_counts=pick(self.vanilla_counts), config=self.config,
            model_type=self.model_type, image_token_id=self.image_token_id, model=self.model,
            images=pick(self.images), plans=pick(self.plans), runs=pick(self.runs), vanilla_runs=pick(self.vanilla_runs),
        )

    def to(self, device: Any = None, dtype: Any = None) -> "ImageEmbeddings":
        """A copy with every tensor on ``device`` and/or in ``dtype`` (plans kept as they are)."""
        out = self.select(range(len(self)))
        out.embeddings = [t.to(device=device, dtype=dtype) for t in self.embeddings]
        return out

    # -- prompts -------------------------------------------------------------------------------
    def prompt(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pad_token_id: int = 0,
        image_token_id: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A prompt batch rewritten to hold ``n_i`` placeholders for image ``i``.

        Images are numbered in reading order of the batch (row by row), as the models scatter them.

        Args:
            input_ids: (B, L) with, for every image, either the vanilla model's placeholders (a
                processor's output), already ``n_i``, or one placeholder (a plain ``"<image>"``);
                with :attr:`runs` (one run per view), each view's run rewritten the same way (one
                placeholder per view for the last form).
            attention_mask: (B, L) or None; the output's padding is on the same side.
            pad_token_id: id written into new padding.
            image_token_id: the placeholder id (default: the model's, recorded here).

        Returns:
            ``(input_ids, attention_mask)`` (the mask is None when none was given and none is needed).

        Raises:
            ValueError: when the prompt's placeholders fit none of the three forms.
        """
        from .core.sequence import shrink_placeholders

        tok = self.image_token_id if image_token_id is None else int(image_token_id)
        counts, vanilla = self.counts, list(self.vanilla_counts)
        if self.runs is not None and (
            [sum(r) for r in self.runs] != counts
            or [sum(r) for r in self.vanilla_runs or []] != vanilla
            or [len(r) for r in self.runs] != [len(r) for r in self.vanilla_runs or []]
        ):  # e.g. embeddings joined by hand without their runs
            raise ValueError(
                f"these image embeddings are inconsistent: their per-view runs ({len(self.runs)} image(s)) do not add up "
                f"to their counts and vanilla_counts ({len(counts)} image(s)); join or select runs and vanilla_runs "
                "with the embeddings"
            )
        views = None if self.runs is None else len(self.kept_runs_flat)
        form = prompt_form(int((input_ids == tok).sum()), counts, vanilla, tok, views=views)
        if self.runs is not None:  # one run per view: every run rewritten to its view's count
            counts, vanilla = self.kept_runs_flat, [c for r in self.vanilla_runs or [] for c in r]
        if form == "compressed":
            return input_ids, attention_mask
        if form == "vanilla":
            s = shrink_placeholders(input_ids, tok, vanilla, counts, attention_mask=attention_mask, pad_token_id=pad_token_id)
            return s.input_ids, s.attention_mask
        return expand_placeholders(input_ids, tok, counts, attention_mask=attention_mask, pad_token_id=pad_token_id)

    @property
    def kept_runs_flat(self) -> list[int]:
        """Every view's kept count, images in order (``counts`` for one run per image)."""
        return self.counts if self.runs is None else [int(c) for r in self.runs for c in r]

    def inputs_embeds(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L, D) the language model's input for a prompt holding ``n_i`` placeholders per image
        (see :meth:`prompt`): the model's token embeddings with the image embeddings in place of
        the placeholders. Feed it as ``model(inputs_embeds=..., attention_mask=...)`` (or to
        ``generate``) on the *vanilla* model."""
        embed = _input_embeddings(model)
        tok = self.image_token_id
        text = embed(input_ids)  # (B, L, D)
        mask = input_ids == tok
        found, need = int(mask.sum()), sum(self.counts)
        if found != need:
            raise ValueError(
                f"the prompt holds {found} image placeholder tokens but the image embeddings have {need} tokens; "
                "rewrite it with ImageEmbeddings.prompt(input_ids, attention_mask) first"
            )
        if not self.embeddings:
            return text
        feats = torch.cat(self.embeddings).to(text.device, text.dtype)
        if feats.shape[-1] != text.shape[-1]:
            raise ValueError(
                f"the image embeddings are {feats.shape[-1]} wide but the model's token embeddings {text.shape[-1]}: "
                "they come from another model"
            )
        return text.masked_scatter(mask[..., None].to(text.device), feats)

    # -- files ---------------------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        """The safetensors metadata (strings only) written with the tensors."""
        from . import __version__
        from .methods import config_to_dict

        meta = {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "globalcom2": __version__,
            "method": self.method,
            "config": json.dumps(config_to_dict(self.config), sort_keys=True),
            "model_type": self.model_type,
            "model": self.model or "",
            "image_token_id": str(int(self.image_token_id)),
            "num_images": str(len(self)),
            "counts": json.dumps(self.counts),
            "vanilla_counts": json.dumps([int(v) for v in self.vanilla_counts]),
            "hidden_size": str(self.hidden_size),
        }
        if self.images is not None:
            meta["images"] = json.dumps(list(self.images))
        if self.runs is not None:
            meta["runs"] = json.dumps([[int(c) for c in r] for r in self.runs])
            meta["vanilla_runs"] = json.dumps([[int(c) for c in r] for r in self.vanilla_runs or []])
        return meta

    def save(self, path: str | Path) -> Path:
        """Write the embeddings to a safetensors file (tensors ``image.0``, ``image.1``... on the
        CPU, in their dtype; the config and counts in the metadata). Atomic: a failure leaves no
        half-written file. Read them back with :func:`load_embeddings`.

        Raises:
            OSError: the file cannot be written (a full disk included, whatever safetensors raises)."""
        from safetensors.torch import save_file

        from ._io import atomic_path

        tensors = {f"image.{i}": t.detach().to("cpu").contiguous() for i, t in enumerate(self.embeddings)}
        path = Path(path)
        with atomic_path(path) as tmp:
            try:
                save_file(tensors, str(tmp), metadata=self.metadata())
            except OSError:
                raise
            except Exception as e:  # safetensors' own SafetensorError (a full disk...) is not an OSError
                raise OSError(f"cannot write {path}: {' '.join(str(e).split()) or type(e).__name__}") from None
        return path

    @classmethod
    def load(cls, path: str | Path, device: Any = "cpu") -> "ImageEmbeddings":
        """Read a file written by :meth:`save` (see :func:`load_embeddings`)."""
        return load_embeddings(path, device=device)


def _input_embeddings(model: Any) -> Any:
    from .api import unwrap_model

    target = unwrap_model(model)
    get = getattr(target, "get_input_embeddings", None)
    if get is None:
        raise ValueError(f"{type(target).__name__} has no get_input_embeddings(): pass the vision-language model")
    return get()


def load_embeddings(path: str | Path, device: Any = "cpu") -> ImageEmbeddings:
    """Read image embeddings written by :meth:`ImageEmbeddings.save` (or ``globalcom2 embed``).

    Args:
        path: the ``.safetensors`` file.
        device: where the tensors go (default: the CPU).

    Raises:
        ValueError: the file is not a globalcom2 embeddings file, is of a newer layout, or its
            metadata is damaged or lacks a field (the file and the field are named).
        FileNotFoundError: no such file.
        IsADirectoryError: ``path`` is a folder.
    """
    from safetensors import safe_open

    from .methods import config_from_dict

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, expected an embeddings file (.safetensors)")
    if not path.is_file():
        raise FileNotFoundError(f"no such embeddings file: {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device) if device is not None else "cpu") as fh:
            meta = dict(fh.metadata() or {})
            if meta.get("format") != FILE_FORMAT:
                raise ValueError(f"{path} is not a globalcom2 image-embeddings file (its metadata has no format {FILE_FORMAT!r})")
            if meta.get("version") != FILE_VERSION:
                raise ValueError(f"{path} has layout version {meta.get('version')!r}; this globalcom2 reads {FILE_VERSION!r}")
            n = _meta_field(meta, "num_images", path, int)
            names = set(fh.keys())
            absent = [f"image.{i}" for i in range(n) if f"image.{i}" not in names]
            if absent:
                raise ValueError(f"{path} is damaged: its metadata counts {n} images but tensor {absent[0]} is not in it")
            tensors = [fh.get_tensor(f"image.{i}") for i in range(n)]
    except ValueError:
        raise
    except Exception as e:  # safetensors raises its own error types on a damaged file
        raise ValueError(f"cannot read {path} as safetensors: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    counts = _meta_field(meta, "counts", path, json.loads)
    if counts != [int(t.shape[0]) for t in tensors]:
        raise ValueError(f"{path} is inconsistent: its metadata counts {counts} differ from its tensors")
    vanilla = _meta_field(meta, "vanilla_counts", path, lambda text: [int(v) for v in json.loads(text)])
    if len(vanilla) != n:
        raise ValueError(f"{path}: metadata field 'vanilla_counts' has {len(vanilla)} entries for {n} images")
    runs = vanilla_runs = None
    if "runs" in meta or "vanilla_runs" in meta:  # a model with one placeholder run per view
        runs = _meta_field(meta, "runs", path, _parse_runs)
        vanilla_runs = _meta_field(meta, "vanilla_runs", path, _parse_runs)
        shapes = [len(r) for r in runs] == [len(r) for r in vanilla_runs]
        if not shapes or [sum(r) for r in runs] != counts or [sum(r) for r in vanilla_runs] != vanilla:
            raise ValueError(f"{path} is inconsistent: its per-view runs do not add up to its counts and vanilla_counts")
    return ImageEmbeddings(
        embeddings=tensors,
        vanilla_counts=vanilla,
        config=_meta_field(meta, "config", path, lambda text: config_from_dict(json.loads(text))),
        model_type=_meta_field(meta, "model_type", path, str),
        image_token_id=_meta_field(meta, "image_token_id", path, int),
        model=meta.get("model", ""),
        images=_meta_field(meta, "images", path, json.loads) if "images" in meta else None,
        runs=runs,
        vanilla_runs=vanilla_runs,
    )


def _parse_runs(text: str) -> list[list[int]]:
    """A ``runs`` / ``vanilla_runs`` metadata field: per image, a list of non-negative ints."""
    runs = [[int(c) for c in r] for r in json.loads(text)]
    if any(c < 0 for r in runs for c in r):
        raise ValueError("a negative run")
    return runs


def _meta_field(meta: Mapping[str, str], name: str, path: Path, parse: Any) -> Any:
    """``parse(meta[name])``, or a ValueError naming the file and the field (missing or damaged)."""
    if name not in meta:
        raise ValueError(f"{path}: its metadata lacks the field {name!r} (not written by globalcom2, or damaged)")
    try:
        return parse(meta[name])
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: metadata field {name!r} is damaged ({' '.join(str(e).split()) or type(e).__name__})") from None


def compress_images(model: Any, inputs: Mapping[str, Any], config: Any = None, *, method: str | None = None, **options: Any) -> ImageEmbeddings:
    """Per image, the ``(n_i, D)`` visual tokens the model patched with a method would feed its
    language model (newlines included), with the plans and counts.

    Runs the vision tower once under ``no_grad``; the model is neither patched nor changed (an
    applied method's state, ``last`` and stats included, stays as it was; the temporary hooks
    that read the importance are removed).

    Args:
        model: a supported model (patched or not, or wrapped: see :func:`globalcom2.api.unwrap_model`).
        inputs: the model's processor output for the images (``pixel_values`` and the family's
            image inputs such as ``image_sizes``; text may be there too and is ignored).
        config, method, **options: the method, as for :func:`globalcom2.apply`; with none of them,
            the method applied to ``model`` (GlobalCom2's defaults on an unpatched model).

    Returns:
        :class:`ImageEmbeddings`.

    Raises:
        ValueError: no ``pixel_values``, an unsupported model, a bad option, or a method that works
            inside the language model (FastV; it has no image embeddings to hand over).
    """
    from .api import _check_transformers, get_config, resolve_method
    from .methods import language_config, vision_config
    from .models.checks import check_image_inputs

    if config is None and method is None and not options:
        config = get_config(model)  # the applied method, if any
    target, family_cls, cfg = resolve_method(model, config, method, options)
    if language_config(cfg) is not None:
        vision = vision_config(cfg)
        hint = f"method={vision.method!r} (its vision part)" if vision is not None else "a vision-side method such as 'globalcom2'"
        raise ValueError(
            f"method {cfg.method!r} prunes inside the language model (FastV), which image embeddings cannot carry; "
            f"use {hint}"
        )
    _check_transformers()
    family = family_cls(target, cfg)
    family.validate()
    from .api import get_family

    # A prompt from a processor patched with apply(..., processor=...) carries compressed counts.
    family.processor_patch = getattr(get_family(target), "processor_patch", None)
    pixel_values = inputs.get(family.pixel_inputs) if hasattr(inputs, "get") else None
    if pixel_values is None:
        raise ValueError(f"inputs must hold {family.pixel_inputs} (the model's processor output for the images)")
    check_image_inputs(pixel_values, inputs, family.pixel_inputs)  # a list, image_sizes of zeros: named, before any encoding
    with torch.no_grad():
        encoded = family.encode_inputs(inputs)
        out = family.compress(encoded)
    runs = family.image_runs(out)
    if runs is None and family.per_view_runs():
        raise ValueError(
            f"image embeddings are not supported on {family.display_name}: it writes one placeholder run per view "
            "and its family does not tell each image's runs (Family.image_runs)"
        )
    return ImageEmbeddings(
        embeddings=[t.detach() for t in out.tokens],
        vanilla_counts=[int(v) for v in out.vanilla_counts],
        config=cfg,
        model_type=family.model_type,
        image_token_id=int(family.image_token_id),
        model=str(getattr(family.hf_config, "name_or_path", "") or ""),
        plans=list(out.plans),
        runs=None if runs is None else [list(r) for r in runs.kept],
        vanilla_runs=None if runs is None else [list(r) for r in runs.prompt],
    )


def visual_token_counts(
    model: Any,
    image_sizes: Any,
    config: Any = None,
    *,
    method: str | None = None,
    processor: Any = None,
    batch_num_images: Any = None,
    **options: Any,
) -> list[int]:
    """Per image, how many visual tokens (newlines included) the method hands the language model,
    from the image's (height, width) alone: no pixels, no vision tower. Exactly what
    :func:`compress_images` (and the patched model) then produce for any image of that size.

    The count must not depend on the image's content: GlobalCom2 needs ``count="fixed"`` (SPEC.md,
    "Fixed count"; the published count is known only after the tower ran); FasterVLM, random and
    pooling are fixed by construction.

    Args:
        model: a supported model (patched or not; its family decides views and geometry).
        image_sizes: one ``(height, width)`` or a sequence of them.
        config, method, **options: the method, as for :func:`globalcom2.apply`.
        processor: the model's processor, where its settings decide the views (InternVL's tiling:
            ``min_patches`` / ``max_patches``); without it the published checkpoints' settings.
        batch_num_images: LLaVA-OneVision: images per prompt (only a one-image prompt's image is
            cut into crops); default: every image alone in its prompt.

    Raises:
        ValueError: a content-dependent count, a language-model-side method, bad sizes.
    """
    from .api import resolve_method
    from .methods import language_config, vision_config

    sizes = _size_list(image_sizes)
    if config is None and method is None and not options:
        from .api import get_config

        config = get_config(model)
    target, family_cls, cfg = resolve_method(model, config, method, options)
    vision = vision_config(cfg)
    if language_config(cfg) is not None or vision is None:
        raise ValueError(f"method {cfg.method!r} prunes inside the language model (FastV): its image tokens are the vanilla ones")
    family = family_cls(target, cfg)
    family.validate()
    extra: dict[str, Any] = {}
    if processor is not None:
        extra["processor"] = processor
    if batch_num_images is not None:
        extra["batch_num_images"] = batch_num_images
    return family.count_visual_tokens(sizes, vision, **extra)


def _size_list(image_sizes: Any) -> list[tuple[int, int]]:
    """``(h, w)`` or a sequence of them (lists, tuples, a (I, 2) tensor) as a list of int pairs,
    checked by the patched call's own check (:func:`~globalcom2.models.checks.check_image_sizes`)."""
    from .models.checks import check_image_sizes

    if torch.is_tensor(image_sizes):
        image_sizes = image_sizes.tolist()
    pairs = list(image_sizes)
    if len(pairs) == 2 and all(isinstance(v, (int, float)) or hasattr(v, "__index__") for v in pairs):
        pairs = [pairs]
    check_image_sizes(pairs)
    return [(int(h), int(w)) for h, w in pairs]


def embed_prompt(
    model: Any, embeddings: ImageEmbeddings, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Keyword arguments for the *vanilla* ``model(...)`` / ``model.generate(...)``: the prompt
    rewritten to ``n_i`` placeholders per image (:meth:`ImageEmbeddings.prompt`) and embedded with
    the image embeddings in place (:meth:`ImageEmbeddings.inputs_embeds`).

    Returns:
        ``{"inputs_embeds": (B, L', D), "attention_mask": (B, L')}`` (the mask where one is needed).

    Raises:
        TypeError: ``embeddings`` is not :class:`ImageEmbeddings` (a dict of its fields is not), or
            ``input_ids`` is not a tensor.
        ValueError: the embeddings come from another family's model (even one of the same width),
            or a model of another width, or the prompt's placeholders fit none of the forms.
    """
    from .api import unwrap_model
    from .models import family_for
    from .models.patched_forward import pad_token_id_of

    if not isinstance(embeddings, ImageEmbeddings):
        raise TypeError(
            f"embeddings must be ImageEmbeddings (from globalcom2.compress_images or load_embeddings), "
            f"got {type(embeddings).__name__}"
        )
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of shape (batch, length), got {type(input_ids).__name__}")
    target = unwrap_model(model)
    family = family_for(target)  # ValueError naming what is supported
    if embeddings.model_type != family.model_type:
        raise ValueError(
            f"these image embeddings come from a {embeddings.model_type!r} model, this is a {family.model_type!r} one "
            f"({type(target).__name__}): compute them with this model"
        )
    # New padding is masked; it gets the id the patched model pads with, so that even the logits
    # at padded positions are the patched model's.
    ids, mask = embeddings.prompt(input_ids, attention_mask, pad_token_id=pad_token_id_of(unwrap_model(model)))
    out = {"inputs_embeds": embeddings.inputs_embeds(model, ids)}
    if mask is not None:
        out["attention_mask"] = mask
    return out
