"""Measured benchmarks: vanilla versus GlobalCom2 (and the other methods of
:mod:`globalcom2.methods`) on the same model, inputs and process.

Honest timing, gpt-fast style: warm-up runs are excluded, CUDA is synchronised before every
timer read, and each figure is the median of several runs. Memory is the CUDA peak allocation on
GPU, or the peak resident set size of the process (sampled) on CPU.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

from ._io import atomic_path
from .generation import sync

MIB = 1024 * 1024


def median_ms(fn: Callable[[], Any], device: torch.device, runs: int, warmup: int) -> tuple[float, Any]:
    """Median wall time of ``fn`` in milliseconds over ``runs`` calls after ``warmup`` untimed ones."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(max(1, runs)):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):  # pragma: no cover - non-Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Context manager measuring peak memory: CUDA max allocated, else sampled process RSS."""

    def __init__(self, device: torch.device, interval_s: float = 0.002) -> None:
        self.device = device
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak = _rss_bytes()

            def sample() -> None:
                while not self._stop.wait(self.interval_s):
                    self.peak = max(self.peak, _rss_bytes())

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak = max(self.peak, _rss_bytes())


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


@dataclass
class BenchRow:
    """Measurements of one setting (vanilla, or one method at one ratio).

    ``visual_tokens`` enter the language model; ``effective_tokens`` is their layer average,
    lower than ``visual_tokens`` only for FastV (see :mod:`globalcom2.methods`).
    """

    method: str
    ratio: float
    visual_tokens: int
    prefill_ms: float
    vision_ms: float
    compress_ms: float
    generate_ms: float
    tokens_per_s: float
    peak_mem_mib: float
    kv_cache_mib: float
    effective_tokens: float = 0.0
    prefill_x: float = 1.0
    generate_x: float = 1.0
    tokens_x: float = 1.0
    kv_cache_x: float = 1.0
    peak_mem_x: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Columns of the bench table: (key, header, format).
BENCH_COLUMNS = [
    ("method", "method", "s"),
    ("visual_tokens", "visual tokens", "d"),
    ("tokens_x", "x tokens", ".3f"),
    ("effective_tokens", "eff. tokens", ".0f"),
    ("prefill_ms", "prefill ms", ".1f"),
    ("prefill_x", "x prefill", ".3f"),
    ("vision_ms", "vision ms", ".1f"),
    ("compress_ms", "compress ms", ".2f"),
    ("generate_ms", "generate ms", ".1f"),
    ("generate_x", "x generate", ".3f"),
    ("tokens_per_s", "new tok/s", ".1f"),
    ("peak_mem_mib", "peak MiB", ".0f"),
    ("kv_cache_mib", "KV MiB", ".2f"),
    ("kv_cache_x", "x KV", ".3f"),
]


def method_settings(
    methods: Sequence[str], ratios: Sequence[float], options: dict[str, Any] | None = None,
    ratio_flag: str | None = None,
) -> list[tuple[str, str, float, dict[str, Any]]]:
    """The (label, method, ratio, options) settings of a comparison, each validated up front by
    :func:`globalcom2.methods.plan_settings` (``options`` go to every method that has them, e.g.
    ``layout`` to the selection methods, not to pooling; ``retention_ratio`` is never one; an
    option no method knows is a ``ValueError`` naming it)."""
    from .methods import plan_settings

    return [(s.label, s.method, s.ratio, s.options) for s in plan_settings(methods, ratios, options, ratio_flag)]


def run_bench(
    model: Any,
    inputs: dict[str, torch.Tensor],
    ratios: Sequence[float],
    layout: str | None = None,
    max_new_tokens: int = 16,
    runs: int = 3,
    warmup: int = 1,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
    methods: Sequence[str] = ("globalcom2",),
    options: dict[str, Any] | None = None,
) -> list[BenchRow]:
    """Measure vanilla and every method at each ratio on the same ``inputs``.

    Args:
        model: a LLaVA-NeXT model (it is left as it was afterwards).
        inputs: processor output already on the model's device.
        ratios: retention ratios to run each method with.
        layout: layout of the selection methods (shortcut for ``options["layout"]``).
        max_new_tokens: tokens generated per prompt (``min_new_tokens`` is set equal, so every
            setting generates the same number).
        runs, warmup: timed and untimed repetitions of each measurement.
        progress: optional wrapper of an iterable (e.g. ``tqdm``) for a progress bar.
        methods: method names (see :func:`globalcom2.methods.method_names`).
        options: method options, given to every method that has them.

    Returns:
        One :class:`BenchRow` for vanilla, then one per (method, ratio), with ``*_x`` ratios to
        vanilla. ``vision_ms`` is the vision tower plus projector; ``compress_ms`` the vision-side
        compression step (0 for vanilla and FastV, whose work happens inside the prefill).
    """
    import globalcom2

    from .methods import GlobalCom2Config
    from .models import adapter_for

    options = dict(options or {})
    if layout is not None:
        options["layout"] = layout
    plan: list[tuple[str, str | None, float, dict[str, Any]]] = [("vanilla", None, 1.0, {})]
    plan += method_settings(methods, ratios, options)
    device = next(model.parameters()).device
    previous = globalcom2.get_config(model)
    # A never-applied adapter times the vision side (encode, then each method's compression step)
    # the same way for every setting, FastV and vanilla included.
    family = adapter_for(model)
    timer = family(model, family.with_default_layout(GlobalCom2Config()))
    timer.validate()
    batch = int(inputs["input_ids"].shape[0])
    gen_kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
    rows: list[BenchRow] = []
    iterator: Iterable[Any] = progress(plan) if progress else plan
    try:
        for label, method, ratio, opts in iterator:
            globalcom2.remove(model)
            vision = None
            if method is not None:
                globalcom2.apply(model, method=method, retention_ratio=ratio, **opts)
                vision = globalcom2.get_adapter(model).vision_config
            with torch.no_grad():
                vision_ms, encoded = median_ms(
                    lambda: timer.encode_inputs(inputs), device, runs, warmup
                )
                compress_ms = 0.0
                if vision is not None:
                    compress_ms, _ = median_ms(lambda: timer.compress(encoded, vision), device, runs, warmup)
                prefill_ms, out = median_ms(lambda: model(**inputs, use_cache=True), device, runs, warmup)
                kv = cache_bytes(getattr(out, "cache", None) or getattr(out, "past_key_values", None))
                del out
                stats = globalcom2.last_stats(model)
                if stats is None:  # vanilla: the processor's placeholders
                    visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
                    effective = float(visual)
                else:
                    visual, effective = sum(stats.visual_tokens), float(sum(stats.effective_visual_tokens))
                generate_ms, _ = median_ms(lambda: model.generate(**inputs, **gen_kwargs), device, runs, warmup)
                with PeakMemory(device) as mem:
                    model.generate(**inputs, **gen_kwargs)
            rows.append(
                BenchRow(
                    method=label,
                    ratio=ratio,
                    visual_tokens=int(visual),
                    prefill_ms=prefill_ms,
                    vision_ms=vision_ms,
                    compress_ms=compress_ms,
                    generate_ms=generate_ms,
                    tokens_per_s=batch * max_new_tokens / (generate_ms / 1e3),
                    peak_mem_mib=mem.peak / MIB,
                    kv_cache_mib=kv / MIB,
                    effective_tokens=effective,
                )
            )
    finally:
        globalcom2.remove(model)
        if previous is not None:
            globalcom2.apply(model, previous)
    base = rows[0]
    for row in rows:
        row.prefill_x = row.prefill_ms / base.prefill_ms
        row.generate_x = row.generate_ms / base.generate_ms
        row.tokens_x = row.visual_tokens / base.visual_tokens
        row.kv_cache_x = row.kv_cache_mib / base.kv_cache_mib if base.kv_cache_mib else 0.0
        row.peak_mem_x = row.peak_mem_mib / base.peak_mem_mib if base.peak_mem_mib else 0.0
    return rows


def plot_rows(rows: Sequence[BenchRow], path: str) -> None:
    """Latency and visual tokens versus retention ratio (PNG), written atomically."""
    try:
        from matplotlib.figure import Figure  # object-oriented: no pyplot state, no backend switch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("--plot needs matplotlib: pip install 'globalcom2[plot]'") from exc

    base = rows[0]
    by_method: dict[str, list[BenchRow]] = {}
    for r in rows[1:]:
        by_method.setdefault(r.method.split(" R=")[0], []).append(r)
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for i, (name, comp) in enumerate(by_method.items()):
        comp = sorted(comp, key=lambda r: r.ratio)
        xs = [r.ratio for r in comp]
        ax1.plot(xs, [r.prefill_ms for r in comp], "o-", color=f"C{i + 2}", label=f"{name} prefill")
        ax1.plot(xs, [r.generate_ms for r in comp], "s:", color=f"C{i + 2}", label=f"{name} generate")
        ax2.plot(xs, [r.visual_tokens for r in comp], "o-", color=f"C{i + 2}", label=name)
    ax1.axhline(base.prefill_ms, color="C0", ls="--", label="vanilla prefill")
    ax1.axhline(base.generate_ms, color="C1", ls="--", label="vanilla generate")
    ax1.set(xlabel="retention ratio R", ylabel="median latency (ms)", title="Latency")
    ax1.set_ylim(bottom=0)  # honest scale: bars of time start at zero
    ax1.legend(fontsize=8)
    ax2.axhline(base.visual_tokens, color="C0", ls="--", label="vanilla")
    ax2.set(xlabel="retention ratio R", ylabel="visual tokens", title="Visual tokens reaching the LM")
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=8)
    fig.suptitle("globalcom2 bench")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
