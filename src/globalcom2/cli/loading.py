"""What the ``globalcom2`` commands share for loading: images, where a model is (local or hub),
and loading it.

Importing this module is cheap: torch, transformers, huggingface_hub and PIL are imported inside
the functions.

The functions that know which model families the CLI accepts are in ONE section at the end
("Model families"): :data:`SUPPORTED_MODEL_TYPES`, :data:`EXAMPLE_MODEL`, :data:`TINY_MODEL`,
:data:`WIDE_MODEL`, :func:`builtin_model`, :func:`check_model_type`, :func:`load_model` and
:func:`get_model`. Commands call them as ``loading.get_model(...)`` (looked up here at call
time, so a test that replaces them on this module sees every command use the replacement).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

from .. import __version__
from .output import PROG, CLIError, one_line, status


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' advice while the built-in tiny model and processor are made: it is
    about them (install torchvision, ...), not about the user's setup."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------


def _is_url(s: str) -> bool:
    return bool(re.match(r"^https?://", s, flags=re.IGNORECASE))


def load_image(source: str) -> Any:
    """Open an image file or URL as an RGB PIL image, or raise :class:`CLIError`.

    Turned upright by its EXIF orientation (a phone photo is seen as a viewer shows it; the
    evaluation loaders deliberately are not, see :mod:`globalcom2._io`)."""
    import io

    from PIL import Image, UnidentifiedImageError

    from .._io import to_rgb, upright

    if _is_url(source):
        import urllib.error
        import urllib.request

        request = urllib.request.Request(source, headers={"User-Agent": f"{PROG}/{__version__}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                data = response.read()
        except urllib.error.HTTPError as e:
            raise CLIError(f"cannot fetch image URL {source}: HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            raise CLIError(f"cannot fetch image URL {source}: {one_line(str(e.reason))}") from None
        except (OSError, ValueError) as e:
            raise CLIError(f"cannot fetch image URL {source}: {one_line(str(e)) or type(e).__name__}") from None
        stream: Any = io.BytesIO(data)
        name = source
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise CLIError(f"image file not found: {source}")
        if not path.is_file():
            raise CLIError(f"not an image file: {source} is a directory" if path.is_dir() else f"not an image file: {source}")
        stream = path
        name = str(path)
        if path.stat().st_size == 0:
            raise CLIError(f"cannot read image {name}: an empty file (0 bytes)")
    try:
        with Image.open(stream) as img:
            img.load()
            return to_rgb(upright(img))  # 16-bit and float images keep their range (see globalcom2._io.to_rgb)
    except UnidentifiedImageError:
        raise CLIError(f"cannot read image {name}: not an image format PIL can open") from None
    except Image.DecompressionBombError as e:  # not an OSError: named here, not by the catch-all
        raise CLIError(f"cannot read image {name}: {one_line(str(e))}") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt files
        raise CLIError(f"cannot read image {name}: {one_line(str(e)) or type(e).__name__}") from None


# ------------------------------------------------------------------------------------------------
# Where a model is: a local directory or the hub (no model family here)
# ------------------------------------------------------------------------------------------------


def _looks_like_path(model: str) -> bool:
    """True for what cannot be a hub id ("org/name"): ./x, /x, ~/x, a/b/c, a\\b (see :func:`locate_model`)."""
    return (model.startswith((".", "/", "~")) or model.count("/") > 1
            or (os.sep != "/" and os.sep in model) or "\\" in model)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def locate_model(model: str) -> str:
    """Where ``--model`` is, without any network access: ``"local"`` or ``"hub"`` (CLIError if neither).

    The rule, for every command:

    1. an argument that exists on disk is local: a checkpoint directory (it needs a
       ``config.json``; a file is refused);
    2. one that looks like a path (it starts with ``.``, ``/`` or ``~``, has more than one ``/``,
       or an OS separator / backslash) and does not exist is "model directory not found";
    3. a bare name without ``/`` that does not exist locally is "not found" too: LLaVA-NeXT
       checkpoints on the hub have an owner, hub ids look like ``org/name`` (the rare legacy ids
       without an org are not LLaVA-NeXT models);
    4. anything else (``org/name``) is a hub id, resolved by :func:`hub_access`.

    The built-in random models (``tiny``, ``wide-random[:N]``, see :func:`builtin_model`) are
    handled by :func:`get_model` before this; here they are "not found", with a hint.
    """
    local = Path(model).expanduser()
    if local.exists():
        if local.is_file():
            raise CLIError(f"--model expects a hub id or a checkpoint directory, got the file {model}")
        if not (local / "config.json").is_file():
            raise CLIError(f"not a model directory: {model} has no config.json (expected a saved checkpoint of {_supported()})")
        return "local"
    if _looks_like_path(model):
        raise CLIError(f"model directory not found: {model}")
    if "/" not in model:
        name = model.partition(":")[0]
        hint = f" ('{model}', the built-in random demo model, is for {', '.join(BUILTIN_COMMANDS[TINY_MODEL])})" if model == TINY_MODEL else (
            f" ('{WIDE_MODEL}[:N]', the built-in wide random model, is for {', '.join(BUILTIN_COMMANDS[WIDE_MODEL])})"
            if name == WIDE_MODEL else "")
        raise CLIError(
            f"model not found: no local directory {model!r}, and hub ids look like org/name "
            f"(e.g. {EXAMPLE_MODEL}){hint}"
        )
    return "hub"


#: The commands that take each built-in random model (``--model tiny`` / ``wide-random[:N]``).
BUILTIN_COMMANDS: dict[str, tuple[str, ...]] = {
    "tiny": ("demo", "bench", "visualize", "embed", "eval"),
    "wide-random": ("bench", "visualize", "embed"),
}

#: Files of a local checkpoint, checked (by name only) before anything is loaded: the weights,
#: the image processor's config, the tokenizer. Any one of each group will do.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def check_model(model: str, command: str, weights: bool = True) -> str:
    """``--model`` checked before any work, without importing torch or transformers: the one
    check every command makes first. Returns ``"builtin"``, ``"local"`` or ``"hub"``.

    * a built-in random model (:func:`builtin_model`) must be one ``command`` takes
      (:data:`BUILTIN_COMMANDS`);
    * otherwise :func:`locate_model` (no network); a local checkpoint's ``config.json`` is read as
      JSON and its ``model_type`` must be a registered family's, and (``weights`` True) its
      folder must hold weights, an image-processor config and tokenizer files
      (:func:`check_local_checkpoint`);
    * a hub id gets :func:`hub_access`'s one quick look (huggingface_hub only).
    """
    builtin = builtin_model(model)  # a malformed wide-random:N is a CLIError here
    if builtin is not None:
        takes = BUILTIN_COMMANDS.get(builtin[0], ())
        if command in takes:
            return "builtin"
        raise CLIError(
            f"--model {model}: the built-in random model '{builtin[0]}' is for {', '.join(takes)}, not {command}; "
            f"pass a checkpoint (a hub id such as {EXAMPLE_MODEL}, or a local directory)"
        )
    where = locate_model(model)
    if where == "local":
        check_local_checkpoint(Path(model).expanduser(), model, weights=weights)
    else:
        hub_access(model)
    return where


def read_config_json(path: Path, shown: str) -> dict[str, Any]:
    """A ``config.json`` as a dict (CLIError naming the file when it is not a JSON object)."""
    import json

    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CLIError(f"cannot read {shown}: {one_line(str(e)) or type(e).__name__}") from None
    if not isinstance(data, dict):
        raise CLIError(f"cannot read {shown}: expected a JSON object, got {type(data).__name__}")
    return data


def check_model_type_name(model: str, model_type: Any) -> None:
    """CLIError when ``model_type`` (a config's) is not a registered family's (no torch)."""
    if model_type not in supported_model_types():
        text = "config without model_type" if model_type is None else f"{model_type!r} model"
        raise CLIError(f"model {model!r} is a {text}; globalcom2 supports {_registry().describe_supported()}")


def check_local_checkpoint(folder: Path, model: str, weights: bool = True) -> dict[str, Any]:
    """A local checkpoint folder checked by its files alone (see :func:`check_model`); returns its config dict."""
    config = read_config_json(folder / "config.json", f"{model}/config.json")
    check_model_type_name(model, config.get("model_type"))
    if weights:
        names = {p.name for p in folder.iterdir()}
        for group, what in ((WEIGHT_FILES, "weights"), (PROCESSOR_FILES, "image processor config"),
                            (TOKENIZER_FILES, "tokenizer")):
            if not names.intersection(group):
                raise CLIError(
                    f"model {model!r} has no {what} ({' or '.join(group)} expected in {folder}); save the checkpoint "
                    "with model.save_pretrained(DIR) and processor.save_pretrained(DIR)"
                )
    return config


def _supported() -> str:
    return _registry().describe_supported()


def from_pretrained_kwargs(model: str) -> dict[str, Any]:
    """The hub keyword arguments of ``from_pretrained`` for ``model``: ``{}`` for a local
    directory, :func:`hub_access`'s answer for a hub id (CLIError when it cannot be had)."""
    return hub_access(model) if locate_model(model) == "hub" else {}


_HUB_CHECKED: dict[str, dict[str, Any]] = {}


def hub_access(model: str) -> dict[str, Any]:
    """The ``from_pretrained`` keyword arguments for a hub id (``{}`` or ``{"local_files_only": True}``),
    after one quick look at the hub; CLIError with one line when the model cannot be had.

    * ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``): the model must be in the local cache
      ("not in the local cache" otherwise); the hub is not contacted.
    * Otherwise one HEAD request for its ``config.json``, without retries, timeout
      ``HF_HUB_ETAG_TIMEOUT`` (default here: 5 s): a hub that cannot be reached is reported at
      once (set ``HF_HUB_OFFLINE=1`` or pass a local directory), unless the model is cached, in
      which case the cached copy is used; an unknown, gated or config-less repository is named.

    The answer is kept for the process (``load_model`` after ``check_model_type`` asks again).
    """
    if model in _HUB_CHECKED:
        return _HUB_CHECKED[model]
    from huggingface_hub import constants, try_to_load_from_cache

    def cached() -> bool:
        try:
            return isinstance(try_to_load_from_cache(model, "config.json", cache_dir=constants.HF_HUB_CACHE), str)
        except Exception:  # an id the cache layout cannot hold
            return False

    offline = bool(constants.HF_HUB_OFFLINE) or _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")
    if offline:
        if not cached():
            raise CLIError(
                f"cannot load model {model!r}: not in the local cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 "
                "forbids downloading it; unset HF_HUB_OFFLINE to download it, or pass a local directory"
            )
        kwargs: dict[str, Any] = {}
    else:
        kwargs = _probe_hub(model, cached)
    _HUB_CHECKED[model] = kwargs
    return kwargs


def _probe_hub(model: str, cached: Any) -> dict[str, Any]:
    """One HEAD request for ``model``'s config.json (see :func:`hub_access`)."""
    from huggingface_hub import constants, get_hf_file_metadata
    from huggingface_hub import errors as hf_errors

    endpoint = str(constants.ENDPOINT).rstrip("/")
    timeout = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or 5)
    try:
        get_hf_file_metadata(f"{endpoint}/{model}/resolve/main/config.json", timeout=timeout, retry_on_errors=False)
    except hf_errors.GatedRepoError:
        if cached():
            return {}
        raise CLIError(
            f"cannot load model {model!r}: it is gated on the hub: accept its terms at {endpoint}/{model} "
            "and log in (hf auth login, or set HF_TOKEN)"
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise CLIError(
            f"cannot load model {model!r}: no such model on the hub ({endpoint}/{model}), or it is private "
            "and you are not logged in (hf auth login, or set HF_TOKEN)"
        ) from None
    except (hf_errors.EntryNotFoundError, hf_errors.RevisionNotFoundError):
        raise CLIError(f"cannot load model {model!r}: the hub repository has no config.json (not a transformers checkpoint)") from None
    except hf_errors.HfHubHTTPError:
        return {}  # another answer from the hub (rate limit, server error): from_pretrained reports it
    except Exception as e:  # no answer at all: DNS, refused connection, timeout, proxy, TLS
        if cached():
            status(f"{PROG}: the hub ({endpoint}) is unreachable; using the cached copy of {model}")
            return {"local_files_only": True}
        reason = one_line(str(e)) or type(e).__name__
        raise CLIError(
            f"cannot load model {model!r}: the Hugging Face hub ({endpoint}) is unreachable ({reason}) and the model "
            "is not in the local cache; set HF_HUB_OFFLINE=1 to use cached models only, or pass a local directory"
        ) from None
    return {}


def _load_error(model: str, e: Exception) -> CLIError:
    return CLIError(f"cannot load model {model!r}: {one_line(str(e)) or type(e).__name__}")


# ================================================================================================
# Model families: the CLI asks the family registry (globalcom2.models), never names a family.
# The commands call these as loading.check_model_type / loading.load_model / loading.get_model.
# ================================================================================================

#: ``--model`` value of the built-in random demo model (demo, bench, visualize, eval).
TINY_MODEL = "tiny"
#: ``--model`` value of the built-in wide random model: LLaVA-NeXT with llava-v1.6-vicuna-7b's
#: widths (CLIP ViT-L/14-336 tower, Vicuna-7B-wide language model) and few language layers,
#: ``wide-random:N`` for N of them (see :func:`globalcom2.tiny.build_wide_config`).
WIDE_MODEL = "wide-random"
#: One line per built-in model, for help texts.
BUILTIN_MODELS_HELP = (
    f"'{TINY_MODEL}' (a tiny random LLaVA-NeXT: real geometry, widths of a few dozen), "
    f"'{WIDE_MODEL}[:N]' (random weights at real widths: a CLIP ViT-L/14-336 tower + a Vicuna-7B-wide "
    "language model with N decoder layers instead of 32, default 2; ~20 s to build, 0.73 B parameters; "
    "for measuring, answers are noise)"
)


def builtin_model(model_id: str) -> tuple[str, int | None] | None:
    """``(name, text_layers)`` when ``model_id`` names a built-in random model, else None:
    ``tiny`` -> ``("tiny", None)``, ``wide-random`` -> ``("wide-random", None)`` (the default
    depth), ``wide-random:4`` -> ``("wide-random", 4)``. A malformed layer count is a CLIError."""
    text = str(model_id).strip()
    if text == TINY_MODEL:
        return TINY_MODEL, None
    name, sep, layers = text.partition(":")
    if name != WIDE_MODEL:
        return None
    if not sep:
        return WIDE_MODEL, None
    try:
        n = int(layers)
    except ValueError:
        n = 0
    if n < 1:
        raise CLIError(f"--model {model_id}: the layer count after '{WIDE_MODEL}:' must be a whole number >= 1, got {layers!r}")
    return WIDE_MODEL, n


def is_builtin_model(model_id: str) -> bool:
    """True for ``tiny`` and ``wide-random[:N]`` (built in code, no download)."""
    return builtin_model(model_id) is not None


def _registry() -> Any:
    from .. import models  # torch-free: families import their tensor code when they run

    return models


def supported_model_types() -> tuple[str, ...]:
    """The config ``model_type`` values a checkpoint may have (one per registered family)."""
    return tuple(_registry().supported_model_types())


def example_model() -> str:
    """The checkpoint help texts and messages show (the first family's example)."""
    return _registry().families()[0].example_checkpoint


SUPPORTED_MODEL_TYPES = supported_model_types()
EXAMPLE_MODEL = example_model()


def check_model_type(model: str, settings: Sequence[Any] = ()) -> Any:
    """Load only the model's config and check a registered family handles it; returns the config.

    Where the model is comes from :func:`locate_model` (no network) then, for a hub id,
    :func:`hub_access` (one quick look): a mistake is reported at once, never after the hub
    client's retries."""
    kwargs = from_pretrained_kwargs(model)  # no torch, no transformers yet: a mistyped name ends here
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, **kwargs)
    except Exception as e:  # OSError (not found, hub unreachable), ValueError (unknown type), network errors
        raise _load_error(model, e) from None
    check_model_type_name(model, getattr(config, "model_type", None))
    check_on_meta(model, config, settings)
    return config


def check_on_meta(model: str, config: Any, settings: Sequence[Any] = ()) -> None:
    """What :func:`globalcom2.apply` would refuse after loading, refused before: the model is built
    from ``config`` on the meta device (no weights, no memory; a 7B model in 0.1 s) and each
    setting of ``settings`` (anything with ``method``, ``ratio`` and ``options``: a
    :class:`globalcom2.methods.MethodSetting`, an eval run; default: GlobalCom2's defaults) is
    resolved and validated on it exactly as ``apply(model, method=..., retention_ratio=...,
    **options)`` does (the family's default layout when none is asked for; vision feature
    strategy, layout, the family's own checks). CLIError naming the model; an unexpected failure
    of the meta build itself is left to the real load to report."""
    import torch

    from ..api import resolve_method

    family = _registry().family_for_model_type(config.model_type)
    try:
        with torch.device("meta"):
            meta = family.hf_classes()[0]._from_config(config)
    except Exception:  # noqa: BLE001 - not ours to judge here; from_pretrained will say what is wrong
        return
    for s in settings or (None,):
        method = "globalcom2" if s is None else s.method
        options = {} if s is None else {"retention_ratio": s.ratio, **(s.options or {})}
        try:
            target, family_cls, resolved = resolve_method(meta, None, method, options)
            family_cls(target, resolved).validate()
        except ValueError as e:
            raise CLIError(f"cannot apply {method} to {model!r}: {one_line(str(e))}") from None


def load_model(model_id: str, device: str, dtype: Any) -> tuple[Any, Any]:
    """Load a checkpoint of a registered family and its processor onto ``device`` (config already checked)."""
    from transformers import AutoConfig

    status(f"{PROG}: loading {model_id} ({'checkpoint dtype' if dtype == 'auto' else str(dtype).replace('torch.', '')} on {device}) ...")
    hub = from_pretrained_kwargs(model_id)  # kept from check_model_type
    # Straight onto the GPU, without a CPU copy of the weights (transformers needs accelerate for it).
    on_device = str(device).startswith("cuda") and importlib.util.find_spec("accelerate") is not None
    try:
        family = _registry().family_for_model_type(AutoConfig.from_pretrained(model_id, **hub).model_type)
        model, processor = family.load(model_id, dtype=dtype, device_map=device if on_device else None, **hub)
    except Exception as e:
        raise _load_error(model_id, e) from None
    if not on_device:
        model = model.to(device)
    return model.eval(), processor


def get_model(
    model_id: str, device: str, dtype: Any, model_type: str = "llava_next", settings: Sequence[Any] = ()
) -> tuple[Any, Any]:
    """``"tiny"``: the built-in random demo model (of the family ``model_type``);
    ``"wide-random[:N]"``: the built-in wide random LLaVA-NeXT (N language layers); otherwise a
    checked, loaded checkpoint (``settings``: the methods to validate on it before its weights
    load, see :func:`check_on_meta`). The built-in models are float32 for ``dtype="auto"``."""
    builtin = builtin_model(model_id)
    if builtin is not None:
        import torch

        name, layers = builtin
        dtype = torch.float32 if dtype == "auto" else dtype
        if name == TINY_MODEL:
            family = _registry().family_for_model_type(model_type)
            with quiet_transformers():
                return family.build_tiny(dtype=dtype, device=device)
        family = _registry().family_for_model_type(model_type)
        if family.tiny is None or family.tiny.wide_vision is None or family.tiny.wide_text is None:
            wide = [f.model_type for f in _registry().families() if f.tiny is not None and f.tiny.wide_vision is not None]
            raise CLIError(f"--model {model_id}: there is no wide random {family.display_name} model "
                           f"(families with one: {', '.join(wide)})")
        from .. import tiny

        layers = layers or tiny.WIDE_TEXT_LAYERS
        status(f"{PROG}: building {WIDE_MODEL} (random weights; CLIP ViT-L/14-336 + Vicuna-7B-wide LM, "
               f"{layers} of 32 layers; {str(dtype).replace('torch.', '')} on {device}) ...")
        with quiet_transformers():
            return tiny.build_wide(model_type, text_layers=layers, dtype=dtype, device=device)
    check_model_type(model_id, settings)
    return load_model(model_id, device, dtype)
