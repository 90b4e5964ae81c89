"""The checks of a patched call's inputs that every family shares, before anything is read from
them (TypeError / ValueError naming the argument, instead of an AttributeError or a division by
zero deep inside), and the naming of a call's arguments.

Importing this module loads neither torch nor transformers.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

from .._lazy import lazy_module

torch = lazy_module("torch")

#: Keyword argument of a patched ``forward`` / ``generate`` taking precomputed
#: :class:`~globalcom2.embeddings.ImageEmbeddings` in place of ``pixel_values``.
EMBEDDINGS_KWARG = "image_embeddings"


def check_call_inputs(call: dict[str, Any], pixel_inputs: str = "pixel_values") -> None:
    """The checks of a patched call's inputs that every family shares, before anything is read
    from them: ``pixel_values`` a tensor; with images, ``input_ids`` / ``attention_mask`` (batch,
    length) tensors; ``image_sizes`` positive pairs (see :func:`check_image_inputs`). TypeError /
    ValueError naming the argument, instead of an AttributeError or a division by zero deep inside.
    ``pixel_inputs``: the family's name of the pixels' argument (:attr:`Family.pixel_inputs`)."""
    pixel_values = call.get(pixel_inputs)
    if pixel_values is not None:
        check_image_inputs(pixel_values, call, pixel_inputs)
    if pixel_values is None and call.get(EMBEDDINGS_KWARG) is None:
        return
    for name in ("input_ids", "attention_mask"):
        value = call.get(name)
        if value is not None and not (torch.is_tensor(value) and value.dim() == 2):
            what = f"shape {tuple(value.shape)}" if torch.is_tensor(value) else type(value).__name__
            raise TypeError(f"{name} must be a (batch, length) torch.Tensor (the processor's return_tensors='pt'), got {what}")


def check_image_inputs(pixel_values: Any, image_inputs: Mapping[str, Any], name: str = "pixel_values") -> None:
    """The checks of a call's images that every family shares, before any encoding: ``pixel_values``
    a tensor, ``image_sizes`` (where given) positive ``(height, width)`` pairs (TypeError /
    ValueError naming the argument, instead of a division by zero deep in the geometry)."""
    if pixel_values is None:
        raise ValueError(f"{name} are required (the processor's output for the images)")
    if not torch.is_tensor(pixel_values):
        raise TypeError(f"{name} must be a torch.Tensor (the processor's return_tensors='pt'), got {type(pixel_values).__name__}")
    sizes = image_inputs.get("image_sizes")
    if sizes is None:
        return
    if torch.is_tensor(sizes):
        if sizes.device.type != "cpu":
            return  # reading it here would wait for the device: the family checks it where it reads it once
        sizes = sizes.numpy().tolist()  # host memory: no device sync
    check_image_sizes(sizes)


def check_image_sizes(sizes: Any) -> None:
    """``image_sizes`` read on the host: positive whole ``(height, width)`` pairs, one per image
    (a ValueError naming the argument, instead of a division by zero deep in the geometry)."""
    try:
        rows = [list(s) for s in sizes]
        pairs = [(float(h), float(w)) for h, w in rows]
    except (TypeError, ValueError):
        raise ValueError(f"image_sizes must be (height, width) pairs, one per image; got {sizes!r}") from None
    for i, (h, w) in enumerate(pairs):
        if not (h >= 1 and w >= 1) or h != int(h) or w != int(w):
            raise ValueError(f"image_sizes[{i}] = ({h:g}, {w:g}): every (height, width) must be whole numbers >= 1")


def bind_arguments(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Name every argument of a call to ``fn`` (positional ones included), flattening ``**kwargs``."""
    if not args:
        return dict(kwargs)
    sig = inspect.signature(fn)
    bound = sig.bind_partial(*args, **kwargs)
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        param = sig.parameters[name]
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif param.kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"{getattr(fn, '__name__', 'function')}() got unexpected extra positional arguments")
        else:
            out[name] = value
    return out
