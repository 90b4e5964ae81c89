"""Counting the aten ops a block of code dispatches (every op Hugging Face or we run, on any device).

On an accelerator each op that is not a view is a kernel launch (a few microseconds of host time
each); on the CPU, for the small tensors of planning, its fixed cost dominates. ``OpCounter`` is a
:class:`~torch.utils._python_dispatch.TorchDispatchMode` like :class:`globalcom2._syncs.SyncCounter`:

    with OpCounter() as ops:
        compress_batch(...)
    ops.total, ops.kernels, ops.by_op

Used by ``benchmarks/compression_step.py`` and ``tests/test_batch_ops.py``; not public API.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCounter"]


class OpCounter(TorchDispatchMode):
    """Counts dispatched aten ops: ``total`` (every op), ``kernels`` (ops that are not views:
    those compute or allocate), ``by_op`` (per overload name)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()
        self.views = 0

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    @property
    def kernels(self) -> int:
        return self.total - self.views

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.by_op[str(func)] += 1
        if func.is_view:
            self.views += 1
        return func(*args, **(kwargs or {}))
