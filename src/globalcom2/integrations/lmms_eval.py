"""lmms-eval model plugin: a LLaVA-NeXT checkpoint with GlobalCom2 (or a baseline) applied.

Run any lmms-eval task on a compressed model::

    pip install lmms-eval
    LMMS_EVAL_PLUGINS=globalcom2.integrations lmms-eval --model globalcom2_llava_next \\
        --model_args pretrained=llava-hf/llava-v1.6-vicuna-7b-hf,retention_ratio=0.25 \\
        --tasks textvqa_val --batch_size 1 --output_path ./logs/

(``LMMS_EVAL_PLUGINS`` is not needed where globalcom2 is installed with its ``lmms_eval.models``
entry point.) ``--model_args`` takes, comma-separated:

* loading, as lmms-eval's ``llava_hf``: ``pretrained`` (hub id or checkpoint directory of a
  LLaVA-NeXT model), ``revision``, ``device`` (default ``cuda`` when available, else ``cpu``),
  ``dtype`` (alias ``torch_dtype``: ``auto``, ``float16``, ``bfloat16``, ``float32``),
  ``batch_size``, ``attn_implementation``, ``device_map``, ``trust_remote_code``,
  ``chat_template`` (a Jinja string or a file replacing the processor's), ``use_cache``,
  ``max_new_tokens`` (used when a task gives none; default 1024);
* compression: ``method`` (``globalcom2`` by default, any of :func:`globalcom2.method_names`,
  or ``none`` for the uncompressed model), ``retention_ratio`` (default 0.25) and the method's
  options (``layout``, ``temperature``, ``allocation``, ``scoring``, ``seed``, ``layer``,
  ``fastv_retention_ratio``, ``fastv_layer``...; see :func:`globalcom2.apply`). An unknown or
  bad option is a ``ValueError`` that names it, raised before any weights load.

The prompt is the checkpoint's chat template around the task's text, with one image per visual
(``<image>\\n`` + text where the processor has no template). Generation is greedy unless the
task's ``generation_kwargs`` ask for sampling (``temperature > 0`` or ``do_sample``), stops at
``max_new_tokens``, at EOS and at the task's ``until`` strings (the answer is cut before the
first one). ``loglikelihood`` (multiple-choice and perplexity tasks) gives, as lmms-eval's own
models do, the mean per-token negative log-likelihood of a continuation after the same prompt
(lmms-eval picks the choice where it is smallest) and whether greedy decoding would produce it.
Data parallelism works as for lmms-eval's own models: ``accelerate launch --num_processes N -m
lmms_eval ...`` (one model per GPU; each process gets its shard of the requests).

The generation and scoring core, :class:`LlavaNextRunner`, needs neither lmms-eval nor a loaded
checkpoint: it takes any ``(model, processor)`` pair, e.g. a family's tiny model
(:func:`globalcom2.tiny.build_tiny`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence, Union

from ..generation import build_prompt, pad_token_id

#: The name lmms-eval knows the model by (``--model globalcom2_llava_next``).
MODEL_NAME = "globalcom2_llava_next"
#: The checkpoint loaded when ``pretrained`` is not given.
DEFAULT_PRETRAINED = "llava-hf/llava-v1.6-vicuna-7b-hf"
#: ``method`` values that load the model without compression (the baseline).
NO_COMPRESSION = ("none", "vanilla")
#: Default ``max_new_tokens`` when a task's generation_kwargs have none (as lmms-eval's llava_hf).
DEFAULT_MAX_NEW_TOKENS = 1024

#: model_args that load the checkpoint or drive generation (the rest configure the method).
LOADER_ARGS: dict[str, Any] = {
    "pretrained": DEFAULT_PRETRAINED,
    "revision": "main",
    "device": None,  # cuda when available, else cpu
    "dtype": "auto",
    "batch_size": 1,
    "max_batch_size": None,  # passed by lmms-eval's CLI; unused (no automatic batch size)
    "attn_implementation": None,
    "device_map": "",
    "trust_remote_code": False,
    "chat_template": None,
    "use_cache": True,
    "max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
}

#: Generation settings passed on to ``model.generate`` when a task gives them.
_PASSTHROUGH_GEN_KWARGS = ("top_k", "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "min_new_tokens")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

try:  # lmms-eval is optional: only the plugin class needs it.
    from lmms_eval.api.model import lmms as _LmmsBase

    _LMMS_EVAL_ERROR: str | None = None
except Exception as _e:  # pragma: no cover - ImportError, or a broken install (e.g. torch/torchvision mismatch)
    _LmmsBase = object  # type: ignore[assignment,misc]
    _LMMS_EVAL_ERROR = f"{type(_e).__name__}: {_e}"

try:
    from loguru import logger as _log  # lmms-eval's logger
except ImportError:  # pragma: no cover - depends on the environment
    _log = logging.getLogger(__name__)  # type: ignore[assignment]


def lmms_eval_available() -> bool:
    """Whether lmms-eval can be imported (and so the plugin used)."""
    return _LMMS_EVAL_ERROR is None


def require_lmms_eval() -> None:
    """Raise an ImportError that says how to install lmms-eval, when it cannot be imported."""
    if _LMMS_EVAL_ERROR is not None:
        raise ImportError(
            f"the {MODEL_NAME} lmms-eval model needs lmms-eval, which could not be imported "
            f"({_LMMS_EVAL_ERROR}); install it with: pip install lmms-eval"
        )


# ------------------------------------------------------------------------------------------------
# model_args
# ------------------------------------------------------------------------------------------------


@dataclass
class ModelArgs:
    """``--model_args`` split into loading settings and the compression method.

    Attributes:
        loader: the :data:`LOADER_ARGS` keys, defaults filled in, values checked.
        method: the compression method's name, or None for the uncompressed model.
        options: the method's options as given (``retention_ratio`` included).
        config: the validated method config (None without compression).
    """

    loader: dict[str, Any]
    method: str | None
    options: dict[str, Any] = field(default_factory=dict)
    config: Any = None


def _coerce(value: Any) -> Any:
    """A string value as lmms-eval's own parser reads it (bool, int, float or string)."""
    if not isinstance(value, str):
        return value
    from ..methods import coerce_value

    return coerce_value(value.strip())


def split_arg_string(arg_string: str) -> dict[str, Any]:
    """``"a=1,b=x"`` -> ``{"a": 1, "b": "x"}`` (values coerced like lmms-eval's parser)."""
    out: dict[str, Any] = {}
    for item in (p.strip() for p in arg_string.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"model_args item {item!r} of {MODEL_NAME} must look like KEY=VALUE")
        out[key.strip()] = _coerce(value.strip())
    return out


def parse_dtype(value: Any) -> Any:
    """``"auto"`` stays; ``"float16"``/``"fp16"``/``"half"``, ``"bfloat16"``/``"bf16"``,
    ``"float32"``/``"fp32"`` (or a torch.dtype) become the torch dtype."""
    import torch

    if value is None or value == "auto" or isinstance(value, torch.dtype):
        return "auto" if value is None else value
    aliases = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}
    name = aliases.get(str(value).lower().replace("torch.", ""), str(value).lower().replace("torch.", ""))
    if name not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"{MODEL_NAME}: dtype must be auto, float16, bfloat16 or float32, got {value!r}")
    return getattr(torch, name)


def _parse_batch_size(value: Any) -> int:
    if isinstance(value, str) and value.strip().lower().startswith("auto"):
        _log.warning(f"{MODEL_NAME}: batch_size {value!r} is not supported; using 1")
        return 1
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{MODEL_NAME}: batch_size must be a positive integer, got {value!r}") from None
    if size < 1 or (isinstance(value, float) and value != size):
        raise ValueError(f"{MODEL_NAME}: batch_size must be a positive integer, got {value!r}")
    return size


def parse_model_args(args: str | Mapping[str, Any]) -> ModelArgs:
    """Split and check ``--model_args`` (an ``"a=1,b=x"`` string or a mapping).

    Raises:
        ValueError: an unknown key (named, with the keys that are known), a bad method or a bad
            value (named), before anything is loaded.
    """
    from ..methods import make_config, method_names, option_names

    given = split_arg_string(args) if isinstance(args, str) else {k: _coerce(v) for k, v in dict(args).items()}
    if "torch_dtype" in given:
        torch_dtype = given.pop("torch_dtype")
        if "dtype" in given and given["dtype"] != torch_dtype:
            raise ValueError(f"{MODEL_NAME}: dtype={given['dtype']!r} and torch_dtype={torch_dtype!r} disagree; give one")
        given["dtype"] = torch_dtype
    loader = {k: given.pop(k, default) for k, default in LOADER_ARGS.items()}
    for key in ("pretrained", "revision"):  # lmms-eval's parser turns "1234" into 1234
        if isinstance(loader[key], (int, float)) and not isinstance(loader[key], bool):
            loader[key] = str(loader[key])
    loader["batch_size"] = _parse_batch_size(loader["batch_size"])
    loader["dtype"] = parse_dtype(loader["dtype"])
    if not isinstance(loader["pretrained"], str) or not loader["pretrained"]:
        raise ValueError(f"{MODEL_NAME}: pretrained must be a hub id or a checkpoint directory, got {loader['pretrained']!r}")
    max_new = loader["max_new_tokens"]
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
        raise ValueError(f"{MODEL_NAME}: max_new_tokens must be a positive integer, got {max_new!r}")
    for key in ("use_cache", "trust_remote_code"):
        if not isinstance(loader[key], bool):
            raise ValueError(f"{MODEL_NAME}: {key} must be true or false, got {loader[key]!r}")

    method = given.pop("method", "globalcom2")
    if not isinstance(method, str):
        raise ValueError(f"{MODEL_NAME}: method must be a name, got {method!r}")
    method = method.strip().lower()
    if method in NO_COMPRESSION:
        if given:
            raise ValueError(
                f"{MODEL_NAME}: method={method} loads the uncompressed model and takes no method options, "
                f"got {', '.join(sorted(given))}"
            )
        return ModelArgs(loader=loader, method=None)
    if method not in method_names():
        raise ValueError(f"{MODEL_NAME}: unknown method {method!r}; known: {', '.join(method_names())}, none")
    options = {"retention_ratio": 0.25, **given}
    known = option_names(method)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"{MODEL_NAME}: unknown model_args option(s) {', '.join(unknown)}; known: loading options "
            f"{', '.join(['torch_dtype', *LOADER_ARGS])}, method, and the options of method {method!r}: {', '.join(known)}"
        )
    try:
        config = make_config(method, **options)
    except ValueError as e:
        raise ValueError(f"{MODEL_NAME}: {e}") from None
    return ModelArgs(loader=loader, method=method, options=options, config=config)


# ------------------------------------------------------------------------------------------------
# Generation settings, visuals
# ------------------------------------------------------------------------------------------------


def generation_settings(gen_kwargs: Mapping[str, Any] | None, default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> tuple[dict[str, Any], list[str]]:
    """A task's ``generation_kwargs`` -> (``model.generate`` keyword arguments, stop strings).

    Greedy unless ``do_sample`` is true or ``temperature > 0``; ``until`` (a string or a list)
    becomes the stop strings; ``max_new_tokens``, ``num_beams``, ``top_p`` and a few more are
    passed on; other keys (e.g. ``image_aspect_ratio``) are ignored.
    """
    kw = dict(gen_kwargs or {})
    until = kw.pop("until", None)
    if until is None:
        stops: list[str] = []
    elif isinstance(until, str):
        stops = [until]
    elif isinstance(until, (list, tuple)) and all(isinstance(s, str) for s in until):
        stops = list(until)
    else:
        raise ValueError(f"generation_kwargs['until'] must be a string or a list of strings, got {until!r}")
    stops = [s for s in dict.fromkeys(stops) if s]

    max_new = kw.pop("max_new_tokens", None)
    temperature = kw.pop("temperature", None)
    temperature = 0.0 if temperature is None else float(temperature)
    do_sample = kw.pop("do_sample", None)
    do_sample = temperature > 0 if do_sample is None else bool(do_sample)
    num_beams = kw.pop("num_beams", None)
    out: dict[str, Any] = {
        "max_new_tokens": int(default_max_new_tokens if max_new is None else max_new),
        "do_sample": do_sample,
        "num_beams": int(num_beams or 1),
    }
    top_p = kw.pop("top_p", None)
    if do_sample:
        if temperature > 0:
            out["temperature"] = temperature
        if top_p is not None:
            out["top_p"] = float(top_p)
    for key in _PASSTHROUGH_GEN_KWARGS:
        if kw.get(key) is not None:
            out[key] = kw[key]
    return out, stops


def truncate_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` cut before the first occurrence of any stop string."""
    cut = len(text)
    for stop in stops:
        i = text.find(stop)
        if 0 <= i < cut:
            cut = i
    return text[:cut]


def normalize_visuals(visuals: Any) -> list[Any]:
    """A ``doc_to_visual`` result as a flat list of RGB PIL images (None -> no image).

    Strings are read as image files; videos are not supported by this (image) model.
    """
    from PIL import Image

    from .._io import to_rgb

    out: list[Any] = []

    def add(v: Any) -> None:
        if v is None:
            return
        if isinstance(v, (list, tuple)):
            for item in v:
                add(item)
        elif isinstance(v, Image.Image):
            out.append(v if v.mode == "RGB" else to_rgb(v))
        elif isinstance(v, (str, Path)):
            if Path(v).suffix.lower() not in _IMAGE_SUFFIXES:
                raise ValueError(f"{MODEL_NAME} takes images; got the non-image visual {str(v)!r} (videos are not supported)")
            with Image.open(v) as im:
                out.append(to_rgb(im))
        elif isinstance(v, dict) and ("array" in v or "sampling_rate" in v):
            raise ValueError(f"{MODEL_NAME} takes images; audio visuals are not supported")
        else:
            raise ValueError(f"{MODEL_NAME} takes PIL images or image paths as visuals, got {type(v).__name__}")

    add(visuals)
    return out


Visuals = Union[None, Sequence[Any], Callable[[], Any]]


class GenerationRequest(NamedTuple):
    """One ``generate_until`` request: the task's text, its generation_kwargs, its visuals (a
    list, or a zero-argument callable that loads them when the request's batch runs)."""

    context: str
    gen_kwargs: Mapping[str, Any] | None
    visuals: Visuals = None


class LoglikelihoodRequest(NamedTuple):
    """One ``loglikelihood`` request: the log-probability of ``continuation`` after ``context``."""

    context: str
    continuation: str
    visuals: Visuals = None


class Score(NamedTuple):
    """A continuation's score: its summed token log-probability, its token count, and whether
    greedy decoding would produce it."""

    logprob: float
    num_tokens: int
    greedy: bool

    @property
    def loss(self) -> float:
        """Mean negative log-likelihood per token (0 for an empty continuation): the number
        lmms-eval's own models return as "loglikelihood" and its multiple-choice scoring minimises."""
        return -self.logprob / self.num_tokens if self.num_tokens else 0.0


def _load(visuals: Visuals) -> list[Any]:
    return normalize_visuals(visuals() if callable(visuals) else visuals)


# ------------------------------------------------------------------------------------------------
# The core: prompts, batched generation, scoring
# ------------------------------------------------------------------------------------------------


class LlavaNextRunner:
    """Prompt building, batched generation and continuation scoring for a LLaVA-NeXT model.

    It uses the model and processor as usual (a compression method applied with
    :func:`globalcom2.apply`, or none), with no lmms-eval types, so it can be tested alone.

    Args:
        model: a ``LlavaNextForConditionalGeneration`` (compressed or not).
        processor: its ``LlavaNextProcessor``; its tokenizer is set to pad on the left.
        device: where inputs go (default: the model's device).
        batch_size: requests per ``generate`` call.
        chat_template: a Jinja template replacing the processor's (None: the processor's).
        use_cache: passed to ``generate``.
        max_new_tokens: used when a request's generation_kwargs have none.
        show_progress: a tqdm bar over the batches.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        device: Any = None,
        batch_size: int = 1,
        chat_template: str | None = None,
        use_cache: bool = True,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        show_progress: bool = False,
    ) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"  # batched generation continues every row at its end
        self.device = device if device is not None else model.device
        self.batch_size = int(batch_size)
        self.chat_template = chat_template
        self.use_cache = use_cache
        self.max_new_tokens = int(max_new_tokens)
        self.show_progress = show_progress
        #: Visual tokens the language model received, per generated request (from
        #: :func:`globalcom2.last_stats`; requests without an image are not counted).
        self.visual_tokens: list[int] = []

    @property
    def image_token(self) -> str:
        return getattr(self.processor, "image_token", None) or "<image>"

    def build_prompt(self, context: str, num_images: int) -> str:
        """The checkpoint's chat prompt for ``context`` with ``num_images`` images before it.

        A context that already holds the image token places its images itself. Without a chat
        template: ``<image>\\n`` per image, then the context.
        """
        images = 0 if self.image_token in context else num_images
        return build_prompt(self.processor, context, images, chat_template=self.chat_template)

    def _inputs(self, prompts: list[str], images: list[Any]) -> Any:
        inputs = self.processor(images=images or None, text=prompts, return_tensors="pt", padding=True)
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def _record_stats(self, rows_with_images: list[bool]) -> None:
        from ..api import last_stats

        stats = last_stats(self.model)
        if stats is None or not any(rows_with_images):
            return
        counts = list(getattr(stats, "visual_tokens", []) or [])
        if len(counts) == len(rows_with_images):
            self.visual_tokens.extend(int(c) for c, has in zip(counts, rows_with_images) if has)

    def _batches(self, requests: Sequence[GenerationRequest]) -> Iterator[list[int]]:
        """Indices of ``requests`` in batches: same generation_kwargs, longest contexts first."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            key = json.dumps(dict(req.gen_kwargs or {}), sort_keys=True, default=repr)
            groups.setdefault(key, []).append(i)
        for indices in groups.values():
            indices.sort(key=lambda i: -len(requests[i].context))
            for start in range(0, len(indices), self.batch_size):
                yield indices[start:start + self.batch_size]

    def generate_until(self, requests: Sequence[GenerationRequest], on_result: Callable[[int, str], None] | None = None) -> list[str]:
        """Answers to ``requests``, in their order (see :func:`generation_settings`).

        Args:
            requests: the requests.
            on_result: called with (request index, answer) as each answer is made.
        """
        import torch

        results: list[str | None] = [None] * len(requests)
        batches = list(self._batches(requests))
        pad_id = pad_token_id(self.tokenizer)
        bar = _progress(len(batches), self.show_progress)
        for batch in batches:
            hf_kwargs, stops = generation_settings(requests[batch[0]].gen_kwargs, self.max_new_tokens)
            visuals = [_load(requests[i].visuals) for i in batch]
            prompts = [self.build_prompt(requests[i].context, len(v)) for i, v in zip(batch, visuals)]
            inputs = self._inputs(prompts, [im for v in visuals for im in v])
            if stops:
                hf_kwargs.update(stop_strings=stops, tokenizer=self.tokenizer)
            with torch.inference_mode():
                out = self.model.generate(**inputs, **hf_kwargs, use_cache=self.use_cache, pad_token_id=pad_id)
            self._record_stats([bool(v) for v in visuals])
            texts = self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, text in zip(batch, texts):
                results[i] = truncate_at_stops(text, stops)
                if on_result is not None:
                    on_result(i, results[i])
            bar.update(1)
        bar.close()
        return [r if r is not None else "" for r in results]

    def _token_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def score(self, request: LoglikelihoodRequest) -> Score:
        """How likely the model finds ``request.continuation`` after the prompt (one forward pass).

        The prompt is :meth:`build_prompt` of the context; the continuation's tokens are those
        the tokenizer makes of ``prompt + continuation`` beyond the prompt's. They sit at the end
        of the sequence, after every (compressed) image, so their logits are the last ones.
        """
        import torch

        visuals = _load(request.visuals)
        prompt = self.build_prompt(request.context, len(visuals))
        full = prompt + request.continuation
        prompt_ids, full_ids = self._token_ids(prompt), self._token_ids(full)
        common = 0
        for a, b in zip(prompt_ids, full_ids):
            if a != b:
                break
            common += 1
        n_cont = len(full_ids) - common
        if n_cont <= 0:
            return Score(0.0, 0, True)
        inputs = self._inputs([full], visuals)
        with torch.inference_mode():
            logits = self.model(**inputs, use_cache=False).logits
        # A first token with nothing before it (empty prompt, no BOS) has no prediction.
        n_cont = min(n_cont, logits.shape[1] - 1)
        if n_cont <= 0:
            return Score(0.0, 0, True)
        targets = inputs["input_ids"][0, -n_cont:]
        cont_logits = logits[0, -(n_cont + 1):-1].float()
        logprobs = torch.log_softmax(cont_logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
        greedy = bool((cont_logits.argmax(dim=-1) == targets).all())
        return Score(float(logprobs.sum()), int(n_cont), greedy)

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[Score]:
        """:meth:`score` of each request, in order."""
        bar = _progress(len(requests), self.show_progress)
        results = []
        for req in requests:
            results.append(self.score(req))
            bar.update(1)
        bar.close()
        return results


def _progress(total: int, show: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="Model Responding", disable=not show)


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def load_checkpoint(
    pretrained: str,
    *,
    revision: str = "main",
    dtype: Any = "auto",
    device_map: Any = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Load a checkpoint of a supported family and its processor (eval mode; placement by
    ``device_map``); the family comes from the checkpoint's ``config.model_type``.

    Raises:
        ValueError: the checkpoint is not of a supported family (the message names them).
    """
    from transformers import AutoConfig

    from ..models import family_for_model_type

    config = AutoConfig.from_pretrained(pretrained, revision=revision, trust_remote_code=trust_remote_code)
    try:
        family = family_for_model_type(getattr(config, "model_type", None))
    except ValueError as e:
        raise ValueError(f"{MODEL_NAME}: {pretrained!r}: {e}") from None
    model_kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return family.load(
        pretrained, dtype=dtype, device_map=device_map or None, model_kwargs=model_kwargs,
        revision=revision, trust_remote_code=trust_remote_code,
    )


#: The name of 0.1 (LLaVA-NeXT was the only family).
load_llava_next = load_checkpoint


def _read_template(value: str | None) -> str | None:
    if value and len(value) < 4096 and Path(value).expanduser().is_file():
        return Path(value).expanduser().read_text(encoding="utf-8")
    return value


# ------------------------------------------------------------------------------------------------
# The lmms-eval model
# ------------------------------------------------------------------------------------------------


def _tuples_are_mangled() -> bool:
    """Whether this lmms-eval turns a model's ``(float, bool)`` answer into its string.

    lmms-eval 0.7's evaluator passes every answer through
    ``lmms_eval.api.instance.unwrap_generation_output``, which keeps strings, ``(str, dict)``
    pairs and ``GenerationResult`` objects and ``str()``-s anything else, so loglikelihood
    tuples reach the multiple-choice scoring as text and it fails ("too many values to unpack").
    """
    try:
        from lmms_eval.api.instance import unwrap_generation_output
    except ImportError:
        return False
    try:
        return unwrap_generation_output((0.5, True))[0] != (0.5, True)
    except Exception:  # pragma: no cover - an unexpected signature
        return False


class _Pair(tuple):
    """A (loss, is-greedy) pair that lmms-eval's response cache (``--use_cache``) accepts as an
    answer where it expects text (it checks ``answer.text.strip()``)."""

    def strip(self) -> "_Pair":
        return self


def _survive_unwrap(result: tuple[float, bool]) -> Any:
    """``result``, carried in a ``GenerationResult`` (whose ``text`` lmms-eval passes on untouched)
    where lmms-eval would otherwise turn it into a string; the bare tuple elsewhere."""
    if not _TUPLES_MANGLED:
        return result
    from lmms_eval.api.instance import GenerationResult

    return GenerationResult(text=_Pair(result))  # type: ignore[arg-type]


_TUPLES_MANGLED = lmms_eval_available() and _tuples_are_mangled()


def _register(cls: type) -> type:
    """Also put the class in lmms-eval's decorator registry (``lmms_eval.api.registry``)."""
    if lmms_eval_available():
        try:  # imports HF `evaluate` (and through it transformers' pipelines): may fail on its own
            from lmms_eval.api.registry import register_model
        except Exception as e:  # pragma: no cover - depends on the environment
            _log.debug(f"{MODEL_NAME}: lmms_eval.api.registry unavailable ({type(e).__name__}: {e}); skipping @register_model")
            return cls
        return register_model(MODEL_NAME)(cls)
    return cls


@_register
class GlobalCom2LlavaNext(_LmmsBase):  # type: ignore[misc,valid-type]
    """lmms-eval model ``globalcom2_llava_next``: a LLaVA-NeXT checkpoint loaded with transformers,
    compressed in place by :func:`globalcom2.apply` (see the module docstring for model_args).

    Attributes:
        model: the (compressed) model. processor: its processor. runner: the :class:`LlavaNextRunner`.
        model_args: the parsed :class:`ModelArgs`.
    """

    is_simple = True  # lmms-eval's "simple" interface: doc_to_visual + doc_to_text

    def __init__(self, pretrained: str = DEFAULT_PRETRAINED, **model_args: Any) -> None:
        require_lmms_eval()
        super().__init__()
        parsed = parse_model_args({"pretrained": pretrained, **model_args})
        self.model_args = parsed
        opts = parsed.loader

        import torch
        from accelerate import Accelerator

        accelerator = Accelerator()
        device = opts["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
        device_map = opts["device_map"] or None
        if accelerator.num_processes > 1 and not device_map:
            device = f"cuda:{accelerator.local_process_index}"
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"{MODEL_NAME}: device={device} but CUDA is not available (torch {torch.__version__}); pass device=cpu")
        if not device_map and str(device).startswith("cuda"):
            device_map = device  # load straight onto the GPU
        self._model, self._processor = load_checkpoint(
            opts["pretrained"],
            revision=opts["revision"],
            dtype=opts["dtype"],
            device_map=device_map,
            attn_implementation=opts["attn_implementation"],
            trust_remote_code=opts["trust_remote_code"],
        )
        if not device_map:
            self._model.to(device)
        if parsed.config is not None:
            from ..api import apply

            apply(self._model, parsed.config)
        self.accelerator = accelerator
        self._rank = accelerator.process_index
        self._world_size = accelerator.num_processes
        self._device = torch.device(device) if opts["device_map"] in ("", None) else self._model.device
        self.batch_size_per_gpu = opts["batch_size"]
        self.runner = LlavaNextRunner(
            self._model,
            self._processor,
            device=self._device,
            batch_size=self.batch_size_per_gpu,
            chat_template=_read_template(opts["chat_template"]),
            use_cache=opts["use_cache"],
            max_new_tokens=opts["max_new_tokens"],
        )
        desc = "no compression" if parsed.method is None else f"{parsed.method} {parsed.options}"
        _log.info(f"{MODEL_NAME}: {opts['pretrained']} on {self._device} ({desc}); rank {self._rank}/{self._world_size}")

    # lmms-eval reads these
    @property
    def model(self) -> Any:
        return self._model

    @property
    def processor(self) -> Any:
        return self._processor

    @property
    def tokenizer(self) -> Any:
        return self._processor.tokenizer

    @property
    def config(self) -> Any:
        return self._model.config

    @property
    def device(self) -> Any:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def _doc(self, task: str, split: str, doc_id: Any) -> Any:
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual: Any, task: str, split: str, doc_id: Any) -> Callable[[], Any]:
        if doc_to_visual is None:
            return lambda: None
        return lambda: doc_to_visual(self._doc(task, split, doc_id))

    def generate_until(self, requests: list) -> list[str]:
        """Answers for ``Instance.args == (context, gen_kwargs, doc_to_visual, doc_id, task, split)``."""
        reqs = []
        for instance in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = instance.args
            reqs.append(GenerationRequest(context, gen_kwargs, self._visuals(doc_to_visual, task, split, doc_id)))
        self.runner.show_progress = self.rank == 0
        start = len(self.runner.visual_tokens)

        def cache(i: int, text: str) -> None:
            self.cache_hook.add_partial("generate_until", (reqs[i].context, reqs[i].gen_kwargs), text)

        out = self.runner.generate_until(reqs, on_result=cache)
        counts = self.runner.visual_tokens[start:]
        if counts:
            _log.info(f"{MODEL_NAME}: {len(counts)} requests with images, mean {sum(counts) / len(counts):.1f} visual tokens each")
        return out

    def loglikelihood(self, requests: list) -> list[Any]:
        """(loss, is-greedy) for ``Instance.args == (context, continuation or doc_to_target,
        doc_to_visual, doc_id, task, split)`` (or ``(context, continuation)``).

        As lmms-eval's own models (llava_hf, llava_onevision...), the first value is the mean
        negative log-likelihood per continuation token (the model's loss), not a log-probability:
        lmms-eval's multiple-choice scoring picks the choice with the smallest value. The summed
        log-probabilities are :meth:`LlavaNextRunner.score`'s.
        """
        reqs = []
        for instance in requests:
            args = instance.args
            if len(args) == 2:  # unconditional choices (acc_mutual_info)
                reqs.append(LoglikelihoodRequest(args[0], args[1], None))
                continue
            context, target, doc_to_visual, doc_id, task, split = args
            continuation = target if isinstance(target, str) else target(self._doc(task, split, doc_id))
            if isinstance(continuation, (list, tuple)):
                continuation = continuation[0]
            reqs.append(LoglikelihoodRequest(context, str(continuation), self._visuals(doc_to_visual, task, split, doc_id)))
        self.runner.show_progress = self.rank == 0
        out = [(score.loss, score.greedy) for score in self.runner.loglikelihood(reqs)]
        for req, res in zip(reqs, out):
            self.cache_hook.add_partial("loglikelihood", (req.context, req.continuation), res)
        return [_survive_unwrap(res) for res in out]

    def generate_until_multi_round(self, requests: list) -> list[str]:
        raise NotImplementedError(
            f"{MODEL_NAME} does not implement generate_until_multi_round (multi-round tasks); "
            "use single-round generate_until or loglikelihood tasks"
        )

    def clean(self) -> None:
        self.runner = None  # type: ignore[assignment]
        super().clean()
