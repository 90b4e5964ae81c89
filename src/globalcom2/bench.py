"""Measured benchmarks: vanilla versus GlobalCom2 (and the other methods of
:mod:`globalcom2.methods`) on the same model, inputs and process, called as users call them.

What is measured, and how (every setting, vanilla included, gets exactly the same calls):

* **Grad mode.** The calls run in the caller's grad mode, as a user's ``model(...)`` does: no outer
  ``torch.no_grad()`` unless ``no_grad=True`` (the CLI's ``--no-grad``), which wraps every
  measured call in ``torch.no_grad()``. ``generate`` runs without a graph either way (it has its
  own ``no_grad``, patched or not), so only the vision / compression / prefill figures can change.
* **Prefill** is one ``model(**inputs, use_cache=True, logits_to_keep=1)`` call: logits for the last
  position only, as ``generate``'s first step computes them (full logits over a 3,000-token
  prompt made vanilla's prefill longer than its whole ``generate``). ``lm_prefill_ms`` is the
  language model's part of that call (its ``forward``, timed by hooks; no vision tower, projector
  or LM head), and ``lm_tflops`` its analytic FLOPs (:mod:`globalcom2.efficiency`, LLM-Viewer's
  operators) for the token counts each decoder layer actually received in that call (padding
  included; FastV's pruned layers at their pruned length), LM head on one position.
* **Decode**: ``decode_ms_per_token`` comes from the same ``generate`` runs as ``generate_ms``: a
  logits processor reads the clock (after a device sync) at every step, right after the step's
  forward; the first reading closes the prefill, so (last - first) / (n - 1) is the time per
  generated token after the prefill: the one-token forward with the cache, the token choice and
  the loop's bookkeeping. ``min_new_tokens = max_new_tokens = n``, so every run generates n
  tokens; n = 1 has no decode step (NaN).
* **Memory** is the peak *above the loaded weights*: the memory in use when :func:`run_bench` starts
  (weights, inputs, the process) is the baseline, measured after a garbage collection (and, on
  CPU with glibc, ``malloc_trim``). CUDA: ``max_memory_allocated`` (peak stats reset before the
  call) minus the ``memory_allocated`` baseline. CPU: the peak resident set size, read from
  Linux's ``VmHWM`` after resetting it (``/proc/self/clear_refs``) or, where that is not possible,
  sampled every 2 ms, minus the baseline RSS. Measured on the last timed run of the prefill and of
  ``generate`` (no extra calls); the previous run's outputs are released before each run.
* **Timing**: the settings run **interleaved round-robin** (every round runs every setting once:
  its prefill, then its ``generate``), so a change of the machine's load hits every setting alike;
  warm-up rounds are excluded, CUDA is synchronised before every clock read, each figure is the
  median of ``runs`` rounds with its spread (half the range, in percent of the median), and each
  ``x`` time ratio is the median of the per-round ratios to vanilla's run of the same round.
  ``clock="cpu"`` reads the process's CPU time (``time.process_time``) instead of the wall clock:
  on a shared CPU it does not count the time other processes hold the cores (on a GPU the wall
  clock is the one to use).
* **Vision / compression split**, read inside the same timed prefill (no separate encode call):
  ``compress_ms`` is the family's compression step (an instance-level wrapper of the applied
  adapter's ``compress`` for the call), ``vision_ms`` everything from the model's ``forward`` to
  its language model's ``forward`` but that step (tower, projector, placeholder and embedding work).

The instruments (clocks, peak memory, the prefill probes) are in :mod:`globalcom2.measure`; this
module runs the settings and reports (:func:`run_bench`, :class:`BenchRow`, :func:`plot_rows`).
"""

from __future__ import annotations

import contextlib
import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

from ._io import atomic_path
from .generation import sync
from .measure import (
    CLOCKS,
    MIB,
    PeakMemory,
    PrefillProbe,
    accepts,
    analytic_lm_flops,
    cache_bytes,
    memory_in_use,
    now,
    settle,
    step_clock,
)

#: Figures sampled once per timed round, per setting.
_SAMPLED = ("prefill_ms", "lm_prefill_ms", "vision_ms", "compress_ms", "generate_ms", "decode_ms_per_token")


def _measure(
    fn: Callable[[], Any], device: torch.device, baseline: int, clock: str, with_memory: bool
) -> tuple[float, Any, int]:
    """One timed call: (ms on ``clock``, its output, peak bytes above ``baseline`` or 0)."""
    peak = 0
    if with_memory:
        settle(device)
    with PeakMemory(device, baseline) if with_memory else contextlib.nullcontext() as mem:
        sync(device)
        t0 = now(clock)
        out = fn()
        sync(device)
        ms = (now(clock) - t0) * 1e3
    if mem is not None:
        peak = mem.above
    return ms, out, peak


def _spread(values: Sequence[float]) -> float:
    """Half the range of ``values`` in percent of their median (0 for one value; NaN for none)."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan
    med = statistics.median(vals)
    return 50.0 * (max(vals) - min(vals)) / med if med else 0.0


def _paired(row: "BenchRow", base: "BenchRow", key: str) -> float:
    """Median over the rounds of ``row``'s figure over vanilla's in the same round."""
    a, b = row.samples.get(key, []), base.samples.get(key, [])
    pairs = [x / y for x, y in zip(a, b) if y and not (math.isnan(x) or math.isnan(y))]
    if len(a) != len(b) or not pairs:
        return _ratio(getattr(row, key), getattr(base, key))
    return statistics.median(pairs)


# ------------------------------------------------------------------------------------------------
# The rows
# ------------------------------------------------------------------------------------------------


@dataclass
class BenchRow:
    """Measurements of one setting (vanilla, or one method at one ratio); see the module docstring.

    ``visual_tokens`` enter the language model; ``effective_tokens`` is their layer average,
    lower than ``visual_tokens`` only for FastV (see :mod:`globalcom2.methods`). ``lm_tokens`` is
    the length of the sequence the language model prefilled (all rows of the batch, padding
    included). ``peak_mem_mib`` (generate) and ``prefill_mem_mib`` are peaks above the memory in
    use after loading (``baseline_mib``). Times are medians over ``runs`` interleaved rounds on
    ``clock``; ``*_spread`` is half their range in percent of the median; ``samples`` holds every
    round's figure (the ``*_x`` time ratios are medians of the per-round ratios to vanilla).
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
    lm_tokens: int = 0
    lm_prefill_ms: float = 0.0
    lm_tflops: float = 0.0
    decode_ms_per_token: float = math.nan
    prefill_mem_mib: float = 0.0
    baseline_mib: float = 0.0
    no_grad: bool = False
    prefill_x: float = 1.0
    lm_prefill_x: float = 1.0
    lm_flops_x: float = 1.0
    generate_x: float = 1.0
    decode_x: float = 1.0
    tokens_x: float = 1.0
    kv_cache_x: float = 1.0
    peak_mem_x: float = 1.0
    prefill_mem_x: float = 1.0
    clock: str = "wall"
    runs: int = 1
    prefill_spread: float = math.nan
    lm_prefill_spread: float = math.nan
    generate_spread: float = math.nan
    samples: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Columns of the bench table and CSV: (key, header, format). ``--format json`` has every field.
BENCH_COLUMNS = [
    ("method", "method", "s"),
    ("visual_tokens", "visual tokens", "d"),
    ("tokens_x", "x tokens", ".3f"),
    ("effective_tokens", "eff. tokens", ".0f"),
    ("prefill_ms", "prefill ms", ".1f"),
    ("prefill_spread", "prefill ±%", ".0f"),
    ("prefill_x", "x prefill", ".3f"),
    ("lm_prefill_ms", "LM prefill ms", ".1f"),
    ("lm_prefill_spread", "LM ±%", ".0f"),
    ("lm_prefill_x", "x LM prefill", ".3f"),
    ("lm_flops_x", "x LM FLOPs", ".3f"),
    ("vision_ms", "vision ms", ".1f"),
    ("compress_ms", "compress ms", ".2f"),
    ("generate_ms", "generate ms", ".1f"),
    ("generate_spread", "generate ±%", ".0f"),
    ("generate_x", "x generate", ".3f"),
    ("decode_ms_per_token", "decode ms/tok", ".2f"),
    ("prefill_mem_mib", "prefill +MiB", ".0f"),
    ("peak_mem_mib", "generate +MiB", ".0f"),
    ("kv_cache_mib", "KV MiB", ".2f"),
    ("kv_cache_x", "x KV", ".3f"),
]

#: Columns of ``--format csv``: the table's, with the retention ratio as a number of its own
#: (the ``method`` label holds it as text, "globalcom2 R=0.25"; vanilla is 1).
BENCH_CSV_COLUMNS = [BENCH_COLUMNS[0], ("ratio", "ratio", "g"), *BENCH_COLUMNS[1:]]


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


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _in_mode(fn: Callable[[], Any], no_grad: bool) -> Callable[[], Any]:
    """``fn`` wrapped to run under ``torch.no_grad()`` when ``no_grad``, else in the caller's grad mode."""
    mode = torch.no_grad if no_grad else contextlib.nullcontext

    def call() -> Any:
        with mode():
            return fn()

    return call


@dataclass(frozen=True)
class _Session:
    """What every measured call of one :func:`run_bench` shares: the model and its ``inputs``,
    its language model (for the prefill probe), the memory ``baseline`` (bytes), the ``clock``,
    the grad mode and the keyword arguments of the prefill and of ``generate``."""

    model: Any
    inputs: dict[str, torch.Tensor]
    language_model: Any
    device: torch.device
    baseline: int
    clock: str
    no_grad: bool
    max_new_tokens: int
    prefill_kwargs: dict[str, Any]
    gen_kwargs: dict[str, Any]

    def _measure(self, fn: Callable[[], Any], with_memory: bool) -> tuple[float, Any, int]:
        return _measure(_in_mode(fn, self.no_grad), self.device, self.baseline, self.clock, with_memory)

    def prefill(self, fig: dict[str, list[float]], info: dict[str, Any], timed: bool, last: bool) -> None:
        """One prefill of the setting applied now: its times appended to ``fig`` when ``timed``;
        on the ``last`` round its peak memory, KV cache, layer shapes and visual tokens go to ``info``."""
        import globalcom2

        model, inputs = self.model, self.inputs
        with PrefillProbe(model, self.language_model, self.device, self.clock) as probe:
            ms, out, peak = self._measure(lambda: model(**inputs, **self.prefill_kwargs), last)
        if timed:
            fig["prefill_ms"].append(ms)
            fig["lm_prefill_ms"].append(probe.lm_ms)
            fig["vision_ms"].append(max(probe.before_lm_ms - probe.compress_ms, 0.0))
            fig["compress_ms"].append(probe.compress_ms)
        if last:
            info["prefill_peak"] = peak
            info["kv"] = cache_bytes(getattr(out, "cache", None) or getattr(out, "past_key_values", None))
            info["shapes"] = probe.layer_shapes
            stats = globalcom2.last_stats(model)
            if stats is None:  # vanilla: the processor's placeholders
                visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
                info["visual"], info["effective"] = visual, float(visual)
            else:
                info["visual"] = sum(stats.visual_tokens)
                info["effective"] = float(sum(stats.effective_visual_tokens))
        del out

    def generate(self, fig: dict[str, list[float]], info: dict[str, Any], timed: bool, last: bool) -> None:
        """One ``generate`` of the setting applied now: its time and time per decoded token
        appended to ``fig`` when ``timed``; its peak memory to ``info`` on the ``last`` round."""
        stepclock = step_clock(self.device, self.clock)

        def generate() -> Any:
            return self.model.generate(**self.inputs, **self.gen_kwargs, logits_processor=[stepclock])

        ms, out, peak = self._measure(generate, last)
        del out
        if timed:
            fig["generate_ms"].append(ms)
            c = stepclock.times
            if len(c) == self.max_new_tokens and len(c) > 1:
                fig["decode_ms_per_token"].append((c[-1] - c[0]) * 1e3 / (len(c) - 1))
        if last:
            info["generate_peak"] = peak


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
    no_grad: bool = False,
    clock: str = "wall",
) -> list[BenchRow]:
    """Measure vanilla and every method at each ratio on the same ``inputs`` (see the module
    docstring for what each figure is), the settings interleaved round-robin.

    Args:
        model: a model of a registered family (it is left as it was afterwards).
        inputs: processor output already on the model's device.
        ratios: retention ratios to run each method with.
        layout: layout of the selection methods (shortcut for ``options["layout"]``).
        max_new_tokens: tokens generated per prompt (``min_new_tokens`` is set equal, so every
            setting generates the same number); the decode figure needs at least 2.
        runs, warmup: timed and untimed repetitions of each measurement.
        progress: optional wrapper of an iterable (e.g. ``tqdm``) for a progress bar.
        methods: method names (see :func:`globalcom2.methods.method_names`).
        options: method options, given to every method that has them.
        no_grad: run every measured call under ``torch.no_grad()``; by default they run in the
            caller's grad mode, as the user's own calls would.
        clock: ``"wall"`` (``time.perf_counter``) or ``"cpu"`` (``time.process_time``: the
            process's CPU time, all its threads; on a shared CPU it does not count the time other
            processes hold the cores).

    Returns:
        One :class:`BenchRow` for vanilla, then one per (method, ratio), with ``*_x`` ratios to
        vanilla (medians of the per-round ratios). ``vision_ms`` and ``compress_ms`` are read inside
        the timed prefill: the compression step (the family's ``compress``; 0 for vanilla and
        FastV), and everything before the language model's forward but that step (tower,
        projector, placeholder and embedding work).
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(CLOCKS)}; got {clock!r}")
    import globalcom2

    plan = _settings(methods, ratios, options, layout)
    device = next(model.parameters()).device
    previous = globalcom2.get_config(model)
    language_model, arch = _language_model(model)
    prefill_kwargs: dict[str, Any] = {"use_cache": True}
    if accepts(model, "logits_to_keep"):
        prefill_kwargs["logits_to_keep"] = 1  # generate's first step: logits for the last position

    globalcom2.remove(model)
    settle(device)
    session = _Session(
        model, inputs, language_model, device,
        baseline=memory_in_use(device),  # weights, inputs and the process: what is "loaded"
        clock=clock, no_grad=no_grad, max_new_tokens=max_new_tokens, prefill_kwargs=prefill_kwargs,
        gen_kwargs=dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False),
    )
    n_runs = max(1, runs)
    try:
        samples, info = _interleaved_rounds(session, plan, warmup, n_runs, progress)
    finally:
        globalcom2.remove(model)
        if previous is not None:
            globalcom2.apply(model, previous)
    rows = [
        _row(label, ratio, fig, got, session, arch, int(inputs["input_ids"].shape[0]), n_runs)
        for (label, _, ratio, _), fig, got in zip(plan, samples, info)
    ]
    _add_ratios_to_vanilla(rows)
    return rows


def _settings(
    methods: Sequence[str], ratios: Sequence[float], options: dict[str, Any] | None, layout: str | None
) -> list[tuple[str, str | None, float, dict[str, Any]]]:
    """The (label, method, ratio, options) settings to run: vanilla (method None, ratio 1) first,
    then :func:`method_settings` of ``methods`` x ``ratios`` with ``options`` (``layout`` added)."""
    options = dict(options or {})
    if layout is not None:
        options["layout"] = layout
    plan: list[tuple[str, str | None, float, dict[str, Any]]] = [("vanilla", None, 1.0, {})]
    return plan + method_settings(methods, ratios, options)


def _language_model(model: Any) -> tuple[Any, Any]:
    """(``model``'s language model, its :class:`~globalcom2.efficiency.LMArch`), found by a
    never-applied adapter of the model's family (the model is not changed; an unsupported model
    raises the family's error)."""
    from .efficiency import LMArch
    from .methods import GlobalCom2Config
    from .models import family_for

    family = family_for(model)
    timer = family(model, family.with_default_layout(GlobalCom2Config()))
    timer.validate()
    return timer.language_model(), LMArch.from_text_config(family.text_config(timer.hf_config))


def _interleaved_rounds(
    session: _Session,
    plan: Sequence[tuple[str, str | None, float, dict[str, Any]]],
    warmup: int,
    n_runs: int,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None,
) -> tuple[list[dict[str, list[float]]], list[dict[str, Any]]]:
    """Run the settings of ``plan`` (label, method or None for vanilla, ratio, options)
    interleaved round-robin: every round runs every setting once (prefill, then generate), so a
    change of the machine's load hits all settings alike, and each ratio is the median of
    per-round ratios to vanilla's run of the same round. ``warmup`` untimed rounds, then
    ``n_runs`` timed ones; memory is measured on the last.

    Returns, per setting, the figures of every timed round (keys :data:`_SAMPLED`) and what the
    last round read once (``visual``, ``effective``, ``kv``, ``shapes`` and the peaks). Leaves the
    model unpatched (the caller restores it, also on failure)."""
    import globalcom2

    model = session.model
    samples: list[dict[str, list[float]]] = [{k: [] for k in _SAMPLED} for _ in plan]
    info: list[dict[str, Any]] = [{} for _ in plan]
    rounds = range(warmup + n_runs)
    iterator: Iterable[Any] = progress(rounds) if progress else rounds
    for rnd in iterator:
        timed, last = rnd >= warmup, rnd == warmup + n_runs - 1
        for i, (_label, method, ratio, opts) in enumerate(plan):
            globalcom2.remove(model)
            if method is not None:
                globalcom2.apply(model, method=method, retention_ratio=ratio, **opts)
            session.prefill(samples[i], info[i], timed, last)
            session.generate(samples[i], info[i], timed, last)
        globalcom2.remove(model)
    return samples, info


def _row(
    label: str, ratio: float, fig: dict[str, list[float]], got: dict[str, Any], session: _Session, arch: Any,
    batch: int, n_runs: int,
) -> BenchRow:
    """The :class:`BenchRow` of one setting from its per-round figures ``fig`` and what its last
    round read (``got``; see :func:`_interleaved_rounds`), ``batch`` prompts per call; the ``*_x``
    ratios are left at 1 (:func:`_add_ratios_to_vanilla` sets them)."""
    med = {k: statistics.median(v) if v else math.nan for k, v in fig.items()}
    shapes = got["shapes"]
    return BenchRow(
        method=label,
        ratio=ratio,
        visual_tokens=int(got["visual"]),
        prefill_ms=med["prefill_ms"],
        vision_ms=med["vision_ms"],
        compress_ms=med["compress_ms"],
        generate_ms=med["generate_ms"],
        tokens_per_s=batch * session.max_new_tokens / (med["generate_ms"] / 1e3),
        peak_mem_mib=got["generate_peak"] / MIB,
        kv_cache_mib=got["kv"] / MIB,
        effective_tokens=got["effective"],
        lm_tokens=int(sum(b * t for b, t in shapes[:1])),
        lm_prefill_ms=med["lm_prefill_ms"],
        lm_tflops=analytic_lm_flops(arch, shapes) / 1e12 if shapes else math.nan,
        decode_ms_per_token=med["decode_ms_per_token"],
        prefill_mem_mib=got["prefill_peak"] / MIB,
        baseline_mib=session.baseline / MIB,
        no_grad=bool(session.no_grad),
        clock=session.clock,
        runs=n_runs,
        prefill_spread=_spread(fig["prefill_ms"]),
        lm_prefill_spread=_spread(fig["lm_prefill_ms"]),
        generate_spread=_spread(fig["generate_ms"]),
        samples={k: list(v) for k, v in fig.items()},
    )


def _add_ratios_to_vanilla(rows: Sequence[BenchRow]) -> None:
    """Set every row's ``*_x`` figures against ``rows[0]`` (vanilla): times as medians of the
    per-round ratios, the rest as plain ratios."""
    base = rows[0]
    for row in rows:
        row.prefill_x = _paired(row, base, "prefill_ms")
        row.lm_prefill_x = _paired(row, base, "lm_prefill_ms")
        row.lm_flops_x = _ratio(row.lm_tflops, base.lm_tflops)
        row.generate_x = _paired(row, base, "generate_ms")
        row.decode_x = _paired(row, base, "decode_ms_per_token")
        row.tokens_x = _ratio(row.visual_tokens, base.visual_tokens)
        row.kv_cache_x = _ratio(row.kv_cache_mib, base.kv_cache_mib)
        row.peak_mem_x = _ratio(row.peak_mem_mib, base.peak_mem_mib)
        row.prefill_mem_x = _ratio(row.prefill_mem_mib, base.prefill_mem_mib)


def plot_rows(rows: Sequence[BenchRow], path: str, title: str = "globalcom2 bench", note: str | None = None) -> Any:
    """Latency and visual tokens versus retention ratio (PNG), written atomically; returns the figure.

    ``title`` should say what was measured (model, dtype, runs); ``note`` (e.g. that the weights
    are random) is printed under it. The tokens panel draws each method at the visual
    tokens its language model processes on average over its layers (``effective_tokens``): the
    same as ``visual_tokens`` for the vision-side methods, FastV's pruned count for FastV (which
    hands every token to the language model and drops them after layer K)."""
    try:
        from matplotlib.figure import Figure  # object-oriented: no pyplot state, no backend switch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        from ._extras import install_hint

        raise RuntimeError(f"--plot needs matplotlib: {install_hint('plot')}") from exc

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
        ax2.plot(xs, [r.effective_tokens or r.visual_tokens for r in comp], "o-", color=f"C{i + 2}", label=name)
    ax1.axhline(base.prefill_ms, color="C0", ls="--", label="vanilla prefill")
    ax1.axhline(base.generate_ms, color="C1", ls="--", label="vanilla generate")
    ax1.set(xlabel="retention ratio R", ylabel="median latency (ms)", title="Latency")
    ax1.set_ylim(bottom=0)  # honest scale: bars of time start at zero
    ax1.legend(fontsize=8)
    ax2.axhline(base.visual_tokens, color="C0", ls="--", label="vanilla")
    ax2.set(xlabel="retention ratio R", ylabel="visual tokens (FastV: average over layers)",
            title="Visual tokens the LM processes")
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=8)
    fig.suptitle(title if note is None else f"{title}\n{note}")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return fig
