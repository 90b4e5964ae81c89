"""Counting host synchronisations, on any device (the CPU included).

On an accelerator, the host waits for the device whenever a value or an output *size* computed
there must reach Python: ``.item()`` / ``int()`` / ``bool()`` / ``.tolist()``, a device-to-host
copy, a blocking host-to-device copy (PyTorch synchronises the stream after it), and every op
whose output shape depends on the data (``nonzero``, boolean-mask indexing, ``masked_select``,
``unique``, ``repeat_interleave`` without ``output_size``...). On the CPU none of these waits, so
timing cannot show them; :class:`SyncCounter` counts them as ops instead, so that a test can
assert how many a code path would do on a GPU while it runs on the CPU.

It is a :class:`~torch.utils._python_dispatch.TorchDispatchMode` (it sees every aten op,
including those run inside Hugging Face's code) plus a
:class:`~torch.overrides.TorchFunctionMode` for ``Tensor.tolist`` on CPU tensors, which reads
the data without dispatching any aten op (on an accelerator it dispatches a device-to-host copy,
which the dispatch mode counts, so nothing is counted twice).

    with SyncCounter() as syncs:
        model(**inputs)
    syncs.count, syncs.by_op   # 6, Counter({'aten._local_scalar_dense': 4, ...})

Used by ``benchmarks/compression_step.py`` and the tests (``tests/test_syncs.py``); not part of the
public API.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SyncCounter", "SYNC_OPS"]

_aten = torch.ops.aten

#: aten ops that always make the host wait: a scalar read, or an output size taken from the data.
SYNC_OPS: frozenset[Any] = frozenset(
    op
    for op in (
        _aten._local_scalar_dense.default,
        _aten.nonzero.default,
        _aten.masked_select.default,
        _aten.unique_consecutive.default,
        _aten.unique_dim.default,
        _aten._unique.default,
        _aten._unique2.default,
        _aten.equal.default,
        _aten.is_nonzero.default,
        _aten.allclose.default,
    )
    if op is not None
)

_REPEAT_INTERLEAVE = {_aten.repeat_interleave.Tensor, _aten.repeat_interleave.self_Tensor}
_INDEX_OPS = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default, _aten._index_put_impl_.default}
_COPY_OPS = {_aten._to_copy.default, _aten.copy_.default}


def _has_bool_index(indices: Any) -> bool:
    return any(torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in (indices or ()))


def _device(x: Any) -> torch.device | None:
    return x.device if torch.is_tensor(x) else None


class _FunctionCounter(TorchFunctionMode):
    def __init__(self, owner: "SyncCounter") -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.tolist and args and torch.is_tensor(args[0]) and args[0].device.type == "cpu":
            self.owner._add("Tensor.tolist")
        return func(*args, **kwargs)


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, owner: "SyncCounter") -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = self.owner.classify(func, args, kwargs)
        if name is not None:
            self.owner._add(name)
        return func(*args, **kwargs)


class SyncCounter:
    """Context manager counting the host synchronisations of the code it wraps (see the module).

    Attributes:
        count: synchronisations seen.
        by_op: how many per op name (``"aten._local_scalar_dense"``, ``"aten.nonzero"``, ...).
    """

    def __init__(self) -> None:
        self.by_op: Counter[str] = Counter()
        self._modes: list[Any] = []

    @property
    def count(self) -> int:
        return sum(self.by_op.values())

    def _add(self, name: str) -> None:
        self.by_op[name] += 1

    @staticmethod
    def classify(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        """The name to count ``func(*args, **kwargs)`` under, or None when it does not synchronise."""
        name = f"aten.{func.overloadpacket.__name__}"
        if func in SYNC_OPS:
            return name
        if func in _REPEAT_INTERLEAVE:
            return name if kwargs.get("output_size") is None else None
        if func in _INDEX_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices")
            return f"{name} (boolean mask)" if _has_bool_index(indices) else None
        if func in _COPY_OPS:
            if func is _aten.copy_.default:
                dst, src = _device(args[0]), _device(args[1])
                non_blocking = bool(args[2]) if len(args) > 2 else bool(kwargs.get("non_blocking", False))
            else:
                src, dst = _device(args[0]), kwargs.get("device")
                non_blocking = bool(kwargs.get("non_blocking", False))
                dst = torch.device(dst) if dst is not None else src
            if src is None or dst is None or src.type == dst.type == "cpu" or (src.type != "cpu" and dst.type != "cpu"):
                return None
            if dst.type == "cpu":
                return f"{name} (device to host)"
            return None if non_blocking else f"{name} (blocking host to device)"
        return None

    def __enter__(self) -> "SyncCounter":
        self._modes = [_FunctionCounter(self), _DispatchCounter(self)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._modes = []
