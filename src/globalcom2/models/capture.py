"""The forward hooks that read a vision tower's queries and keys while it runs
(:class:`QKCapture`), per call: every family's importance signal comes through them.

Importing this module loads neither torch nor transformers.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from .._lazy import lazy_module

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

torch = lazy_module("torch")


class QKCapture:
    """Temporarily hooks one attention module's query and key modules (``q_proj`` / ``k_proj``, or
    ``q_norm`` / ``k_norm`` where the model normalises them) to keep, for the views it runs on, the
    [CLS] query (token 0) and all keys: enough for the [CLS] row of attention, O(T) per view; with
    ``all_queries``, every query too (for :func:`globalcom2.core.importance.attention_received`).
    The hooks live only inside ``with``; the tower keeps its own attention implementation.

    Per call, never shared between calls: a hook writes into the capture open *in the running
    thread / task* on that attention module (a context variable), not into the one that registered
    it, so two threads encoding on one model (whose hooks both sit on the one shared module and
    fire for both) each get their own queries and keys.

    With ``inputs_of`` (a module, e.g. the projector), its input is kept too (``inputs``: the
    features the ``similarity`` importance is computed on where the family cannot read them
    otherwise).

    Attributes (after the tower ran inside ``with``):
        q_cls: (V, D) the [CLS] queries. queries: (V, T, D) with ``all_queries``, else None.
        keys: (V, T, D). inputs: the first input of ``inputs_of`` (None without it).
    """

    def __init__(
        self, attn: nn.Module, all_queries: bool = False, q_module: str = "q_proj", k_module: str = "k_proj",
        inputs_of: nn.Module | None = None,
    ) -> None:
        self.attn = attn
        self.inputs_of = inputs_of
        self.inputs: torch.Tensor | None = None
        self.all_queries = all_queries
        self.q_module, self.k_module = q_module, k_module
        self.q_cls: torch.Tensor | None = None
        self.queries: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None
        self._handles: list[Any] = []

    def _keep_q(self, out: torch.Tensor) -> None:
        self.q_cls = out[:, 0]  # (V, D)
        if self.all_queries:
            self.queries = out  # (V, T, D)

    def _keep_k(self, out: torch.Tensor) -> None:
        self.keys = out  # (V, T, D)

    def __enter__(self) -> "QKCapture":
        attn = self.attn

        # Run eagerly, a hook writes into the capture open on ``attn`` in the running thread / task;
        # traced by torch.compile (which replays the write as a side effect of this call), into this one.
        def keep_q(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
            cap = self if torch.compiler.is_compiling() else _running_capture(attn)
            if cap is not None:
                cap._keep_q(out)

        def keep_k(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
            cap = self if torch.compiler.is_compiling() else _running_capture(attn)
            if cap is not None:
                cap._keep_k(out)

        if not torch.compiler.is_compiling():
            _QK_OPEN.set((*_QK_OPEN.get(), self))
        self._handles = [
            getattr(attn, self.q_module).register_forward_hook(keep_q),
            getattr(attn, self.k_module).register_forward_hook(keep_k),
        ]
        if self.inputs_of is not None:

            def keep_in(_m: nn.Module, args: tuple[Any, ...]) -> None:
                cap = self if torch.compiler.is_compiling() else _running_capture(attn)
                if cap is not None:
                    cap.inputs = args[0]

            self._handles.append(self.inputs_of.register_forward_pre_hook(keep_in))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if not torch.compiler.is_compiling():
            _QK_OPEN.set(tuple(cap for cap in _QK_OPEN.get() if cap is not self))


#: The :class:`QKCapture` objects open in this thread / task, innermost last.
_QK_OPEN: "ContextVar[tuple[QKCapture, ...]]" = ContextVar("globalcom2_qk_captures", default=())


def _running_capture(attn: Any) -> "QKCapture | None":
    """The capture open on ``attn`` in the running thread / task (the innermost), or None."""
    for cap in reversed(_QK_OPEN.get()):
        if cap.attn is attn:
            return cap
    return None
