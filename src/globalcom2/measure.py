"""The measuring instruments of :mod:`globalcom2.bench`: clocks (wall or process CPU time, with a
device sync), memory (the peak above a baseline, CUDA or the CPU's resident set), the KV cache's
size, and the probes that time a prefill's parts (the language model's ``forward``, the
compression step) inside the same call.

See :mod:`globalcom2.bench` for how they are used (what is measured, and how).
"""

from __future__ import annotations

import ctypes
import gc
import inspect
import math
import os
import statistics
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Sequence

import torch

from .generation import sync

MIB = 1024 * 1024

#: What ``clock`` may be: the wall clock, or the process's CPU time (all its threads).
CLOCKS = ("wall", "cpu")


def now(clock: str = "wall") -> float:
    """Seconds on ``clock``: ``time.perf_counter()`` (wall) or ``time.process_time()`` (cpu)."""
    return time.process_time() if clock == "cpu" else time.perf_counter()


def median_ms(fn: Callable[[], Any], device: torch.device, runs: int, warmup: int) -> tuple[float, Any]:
    """Median wall time of ``fn`` in milliseconds over ``runs`` calls after ``warmup`` untimed ones.

    The previous call's result is released before each call (it could hold a KV cache or an
    autograd graph that would otherwise be alive during the next one)."""
    out = None
    for _ in range(warmup):
        out = None
        out = fn()
    times = []
    for _ in range(max(1, runs)):
        out = None
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


# ------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    """The process's resident set size now."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):  # pragma: no cover - non-Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> bool:
    """Reset Linux's peak resident set (``VmHWM``) to the current RSS; False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return _peak_rss_bytes() is not None
    except OSError:
        return False


def _peak_rss_bytes() -> int | None:
    """Linux's ``VmHWM`` (peak RSS since the last reset), or None where unknown."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):  # pragma: no cover - non-Linux
        pass
    return None


def _malloc_trim() -> None:
    """Give the C heap's free memory back to the OS (glibc), so RSS counts memory in use."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def settle(device: torch.device) -> None:
    """Collect garbage and let the device finish, so that the memory now in use is what is held."""
    gc.collect()
    sync(device)
    if torch.device(device).type != "cuda":
        _malloc_trim()


def memory_in_use(device: torch.device) -> int:
    """Bytes in use now: CUDA ``memory_allocated`` on a GPU, the process RSS elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return _rss_bytes()


class PeakMemory:
    """Context manager measuring the peak memory of a block, and that peak above ``baseline``.

    CUDA: ``max_memory_allocated`` (peak stats reset on entry). Elsewhere: the peak RSS, from
    Linux's ``VmHWM`` (reset on entry) where possible, else sampled every ``interval_s``.
    ``peak`` is in bytes; ``above`` is ``peak - baseline`` (``baseline``: bytes, by default the
    memory in use on entry), the figure to report as "above the loaded weights" when the
    baseline was taken right after loading.
    """

    def __init__(self, device: torch.device, baseline: int | None = None, interval_s: float = 0.002) -> None:
        self.device = torch.device(device)
        self.baseline = baseline
        self.interval_s = interval_s
        self.peak = 0
        self._hwm = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def above(self) -> int:
        return self.peak - (self.baseline or 0)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.peak = int(torch.cuda.memory_allocated(self.device))
        else:
            self.peak = _rss_bytes()
            self._hwm = _reset_peak_rss()
            if not self._hwm:

                def sample() -> None:
                    while not self._stop.wait(self.interval_s):
                        self.peak = max(self.peak, _rss_bytes())

                self._thread = threading.Thread(target=sample, daemon=True)
                self._thread.start()
        if self.baseline is None:
            self.baseline = self.peak
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        if self._hwm:
            self.peak = max(self.peak, _peak_rss_bytes() or 0)


def cache_bytes(cache: Any) -> int:
    """Bytes held by the key/value tensors of a transformers cache object (0 if unknown)."""
    seen: set[int] = set()
    total = 0

    def visit(obj: Any, depth: int = 0) -> None:
        nonlocal total
        if depth > 4 or obj is None:
            return
        if torch.is_tensor(obj):
            if id(obj) not in seen:
                seen.add(id(obj))
                total += obj.numel() * obj.element_size()
            return
        if isinstance(obj, (list, tuple)):
            for x in obj:
                visit(x, depth + 1)
            return
        for name in ("layers", "keys", "values", "key_cache", "value_cache"):
            if hasattr(obj, name):
                visit(getattr(obj, name), depth + 1)

    visit(cache)
    return total


# ------------------------------------------------------------------------------------------------
# Probes: the language model's share of a prefill, and generate's steps
# ------------------------------------------------------------------------------------------------


def _leading_tensor(args: tuple[Any, ...], kwargs: dict[str, Any], names: Sequence[str]) -> torch.Tensor | None:
    for name in names:
        if torch.is_tensor(kwargs.get(name)):
            return kwargs[name]
    return next((a for a in args if torch.is_tensor(a)), None)


class LanguageModelProbe:
    """Hooks on a decoder-only language model while a block runs: each ``forward``'s wall time
    (device-synchronised at both ends) and, per call, the ``(batch, tokens)`` every decoder layer
    computed on (what its ``self_attn`` received; ``module.layers``; the model's own input length
    for each layer where it has none).
    """

    def __init__(self, module: torch.nn.Module, device: torch.device, clock: str = "wall") -> None:
        self.module = module
        self.device = device
        self.clock = clock
        self.times_ms: list[float] = []
        self.layer_shapes: list[list[tuple[int, int]]] = []
        self._handles: list[Any] = []
        self._t0 = 0.0

    def __enter__(self) -> "LanguageModelProbe":
        def start(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.layer_shapes.append([])
            x = _leading_tensor(args, kwargs, ("inputs_embeds", "input_ids"))
            self._input_shape = tuple(x.shape[:2]) if x is not None else (0, 0)
            sync(self.device)
            self._t0 = now(self.clock)

        def stop(_m: Any, _args: Any, _kwargs: Any, _out: Any) -> None:
            sync(self.device)
            self.times_ms.append((now(self.clock) - self._t0) * 1e3)
            if not self.layer_shapes[-1]:
                n = int(getattr(getattr(self.module, "config", None), "num_hidden_layers", 1) or 1)
                self.layer_shapes[-1] = [self._input_shape] * n

        def layer(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = _leading_tensor(args, kwargs, ("hidden_states",))
            if x is not None and self.layer_shapes:
                self.layer_shapes[-1].append((int(x.shape[0]), int(x.shape[1])))

        self._handles.append(self.module.register_forward_pre_hook(start, with_kwargs=True))
        self._handles.append(self.module.register_forward_hook(stop, with_kwargs=True))
        for block in getattr(self.module, "layers", None) or []:
            # The block's attention sees the length the block computes on (FastV gathers its kept
            # tokens inside layer K's forward, after the block's own input).
            target = getattr(block, "self_attn", block)
            self._handles.append(target.register_forward_pre_hook(layer, with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def analytic_lm_flops(arch: Any, layer_shapes: Sequence[tuple[int, int]]) -> float:
    """Prefill FLOPs (:mod:`globalcom2.efficiency`, LLM-Viewer's operators) of decoder layers that
    received ``(batch, tokens)`` each, plus the LM head on one position per row."""
    from .efficiency import lm_head_op, prefill_flops

    one = replace(arch, num_layers=1)
    blocks = sum(b * prefill_flops(one, t, lm_head=False) for b, t in layer_shapes)
    batch = layer_shapes[0][0] if layer_shapes else 1
    return blocks + batch * lm_head_op(arch).flops


def step_clock(device: torch.device, clock: str = "wall") -> Any:
    """A logits processor that records the time (after a device sync) at every generation step."""
    from transformers import LogitsProcessor

    class StepClock(LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            sync(device)
            self.times.append(now(clock))
            return scores

    return StepClock()


def accepts(model: Any, name: str) -> bool:
    try:
        return name in inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


class PrefillProbe:
    """What one prefill spends where, read inside that call (no separate encode): the time from the
    model's ``forward`` to its language model's ``forward`` (tower, projector, compression,
    placeholder and embedding work), the family's compression step inside it (an instance-level
    wrapper of the applied adapter's ``compress``, removed on exit), and the language model's own
    forward (:class:`LanguageModelProbe`: its time and each decoder layer's ``(batch, tokens)``).
    Every reading is on ``clock``, after a device sync."""

    def __init__(self, model: Any, language_model: torch.nn.Module, device: torch.device, clock: str = "wall") -> None:
        self.model, self.device, self.clock = model, device, clock
        self.lm = LanguageModelProbe(language_model, device, clock)
        self.compress_ms = 0.0
        self._start = 0.0
        self._lm_start = 0.0
        self._handles: list[Any] = []
        self._adapter: Any = None

    @property
    def lm_ms(self) -> float:
        return self.lm.times_ms[-1] if self.lm.times_ms else math.nan

    @property
    def before_lm_ms(self) -> float:
        return (self._lm_start - self._start) * 1e3 if self._lm_start else math.nan

    @property
    def layer_shapes(self) -> list[tuple[int, int]]:
        return self.lm.layer_shapes[-1] if self.lm.layer_shapes else []

    def __enter__(self) -> "PrefillProbe":
        import globalcom2

        def start(*_a: Any, **_k: Any) -> None:
            sync(self.device)
            self._start = now(self.clock)

        def lm_start(*_a: Any, **_k: Any) -> None:
            if not self._lm_start:
                sync(self.device)
                self._lm_start = now(self.clock)

        self._handles = [
            self.model.register_forward_pre_hook(start),
            self.lm.module.register_forward_pre_hook(lm_start),
        ]
        self.lm.__enter__()
        adapter = globalcom2.get_family(self.model) if globalcom2.is_applied(self.model) else None
        if adapter is not None and "compress" not in vars(adapter):
            inner = adapter.compress

            def compress(*args: Any, **kwargs: Any) -> Any:
                sync(self.device)
                t0 = now(self.clock)
                try:
                    return inner(*args, **kwargs)
                finally:
                    sync(self.device)
                    self.compress_ms += (now(self.clock) - t0) * 1e3

            adapter.compress = compress  # this instance only, for this call
            self._adapter = adapter
        return self

    def __exit__(self, *exc: Any) -> None:
        self.lm.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._adapter is not None:
            del self._adapter.compress
            self._adapter = None
