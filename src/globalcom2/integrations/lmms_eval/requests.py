"""A task's requests as the runner takes them: generation settings, stop strings, visuals."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence, Union

from ._common import DEFAULT_MAX_NEW_TOKENS, MODEL_NAME

#: Generation settings passed on to ``model.generate`` when a task gives them.
_PASSTHROUGH_GEN_KWARGS = ("top_k", "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "min_new_tokens")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


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

    from ..._io import to_rgb

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

