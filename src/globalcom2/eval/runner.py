"""The evaluation runner: benchmarks x methods x retention ratios, resumable and shardable.

>>> from globalcom2.eval.runner import run_eval
>>> summary = run_eval(model, processor, ["textvqa", "pope"], "playground/data/eval",
...                    ratios=[1.0, 0.25], methods=["globalcom2"], output_dir="out")  # doctest: +SKIP
>>> print(summary.format("table"))                                                # doctest: +SKIP

**Runs.** For every benchmark, retention ratio 1.0 is the vanilla, unmodified model (method
``vanilla``, the paper's 100% upper-bound row; run once whatever the methods) and every other
ratio R is each method applied with ``globalcom2.apply(model, method=M, retention_ratio=R,
**method_options)``. Prompts are the benchmark's :attr:`Sample.prompt` wrapped in the
checkpoint's chat template (``<image>\\n`` + prompt without one); decoding is greedy
(``do_sample=False, num_beams=1``) with the benchmark's ``max_new_tokens``; batches are left-padded.

**Output directory layout**::

    <output-dir>/
      predictions/<benchmark>-<split>/<method>-R<ratio>.jsonl       one record per line (below)
      predictions/<benchmark>-<split>/<method>-R<ratio>.meta.json   what produced it (method config, model)
      predictions/<benchmark>-<split>/<method>-R<ratio>.rank<k>.jsonl   rank k's shard, while running
      submissions/<benchmark>-<split>/<method>-R<ratio>.<ext>       when the benchmark writes one
      summary.json                                                  every metric of every run
      summary.md                                                    the tables (paper layout + details)

``<ratio>`` is written with ``:g`` (``R1``, ``R0.25``, ``R0.1``); the vanilla run is
``vanilla-R1.jsonl``. A record is :meth:`Sample.record` plus what the summary needs, so a run is
re-scored from its JSONL alone (:func:`score_outputs`)::

    {"id", "prediction", "target", "meta", "visual_tokens", "effective_visual_tokens", "latency_ms"}

``visual_tokens``: image placeholders entering the language model for this sample
(:func:`globalcom2.last_stats`; for the vanilla model the ``<image>`` tokens of its prompt);
``effective_visual_tokens``: the layer average (differs for FastV only); ``latency_ms``: the
batch's ``generate`` wall time (CUDA synchronised before each clock read) / batch size. Each
process generates its first batch once untimed before, so that no latency holds the warm-up.

**Protocol.** ``protocol`` (``llava``, the default, or ``lmms-eval``; see
:data:`globalcom2.eval.base.PROTOCOLS`) selects each benchmark's prompts, ``max_new_tokens`` and,
where they differ, its scorer. It is recorded in every run's ``.meta.json`` and in
``summary.json``; an output directory holding runs of another protocol is refused
(:func:`check_output_protocol`), and :func:`score_outputs` re-scores each run under its own.

**Resuming.** Records are appended as they are produced (one ``write`` + flush + fsync per
batch). On start, a run's done ids are those of its main file plus any leftover shard files (from
a crash, possibly with another world size); only the other samples are generated. A torn last
line (a crash in the middle of a write) is dropped; re-running a finished run only re-scores. A
run's ``.meta.json`` records the method's full config: resuming with other method options (or
another model) is refused rather than mixing predictions.

**Sharding** (``torchrun`` / ``accelerate launch``, which set ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``; see :class:`DistEnv`). Per run:

1. rank 0 consolidates: the main file and leftover shards are merged (deduplicated by id, in sample
   order) into the main file, atomically, and the shards deleted; **barrier**;
2. every rank reads the main file, takes the samples not done, and answers every ``world``-th one
   (round-robin from its rank), appending to its own shard ``...rank<k>.jsonl``; **barrier**;
3. rank 0 consolidates again.

After all runs rank 0 scores and writes the summaries; torch.distributed (gloo on CPU, nccl on
CUDA) is used for the barriers only. Two *independent* invocations must not write to the same
output directory at the same time.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..generation import build_prompt
from .base import Sample, check_protocol, iter_chunks
from .distributed import BARRIER_TIMEOUT, DistEnv
from .generate import Answer, generate_batch
from .planning import (
    REFERENCE_RATIO,
    VANILLA,
    LoadedBenchmark,
    RunSpec,
    check_images,
    check_meta,
    checkpoint_name,
    load_benchmarks,
    pending,
    plan_runs,
    run_meta,
)
from .records import (
    LEGACY_PROTOCOL,
    append_records,
    check_output_protocol,
    consolidate,
    done_ids,
    format_ratio,
    meta_path,
    predictions_path,
    read_records,
    run_protocol,
    run_stem,
    shard_files,
    shard_path,
    write_meta,
)
from .summary import (
    DETAIL_COLUMNS,
    EvalSummary,
    RunResult,
    add_relative,
    log,
    score_outputs,
    summarize_run,
)

# The run loop is here; the rest is re-exported from the modules that hold it, so that
# ``globalcom2.eval.runner.<name>`` keeps working. ``_run_one`` looks ``generate_batch`` and
# ``append_records`` up in this module, where tests patch them.
__all__ = [
    "Answer",
    "BARRIER_TIMEOUT",
    "DETAIL_COLUMNS",
    "DistEnv",
    "EvalSummary",
    "LEGACY_PROTOCOL",
    "LoadedBenchmark",
    "REFERENCE_RATIO",
    "RunResult",
    "RunSpec",
    "VANILLA",
    "append_records",
    "build_prompt",
    "check_images",
    "check_output_protocol",
    "consolidate",
    "done_ids",
    "format_ratio",
    "generate_batch",
    "load_benchmarks",
    "meta_path",
    "pending",
    "plan_runs",
    "predictions_path",
    "read_records",
    "run_eval",
    "run_protocol",
    "run_stem",
    "score_outputs",
    "shard_files",
    "shard_path",
    "summarize_run",
]


def run_eval(
    model: Any,
    processor: Any,
    benchmarks: Sequence[str | LoadedBenchmark],
    data_root: str | Path | None,
    ratios: Sequence[float],
    methods: Sequence[str] = ("globalcom2",),
    method_options: dict[str, Any] | None = None,
    output_dir: str | Path = "globalcom2-eval",
    limit: int | None = None,
    batch_size: int = 1,
    split: dict[str, str] | None = None,
    progress: bool = True,
    judge: dict[str, Any] | None = None,
    dist: DistEnv | None = None,
    protocol: str | None = None,
) -> EvalSummary:
    """Evaluate ``model`` on ``benchmarks`` at each retention ratio with each method (see the
    module docstring for the runs, the files, the protocol, resuming and sharding).

    Args:
        model, processor: a LLaVA-NeXT model (unpatched; it is left unpatched) and its processor.
            ``model`` may be None when every prediction already exists (a re-score).
        benchmarks: registry names, or :class:`LoadedBenchmark` from :func:`load_benchmarks`.
        data_root: the folder holding the benchmarks' data (unused for loaded benchmarks).
        ratios: retention ratios in (0, 1]; 1.0 runs the vanilla model (the reference).
        methods: :func:`globalcom2.methods.method_names` entries (``vanilla`` also accepted).
        method_options: extra keyword options of ``globalcom2.apply`` (e.g. ``{"layout": "spatial"}``).
        output_dir: where predictions, submissions and summaries go.
        limit: only the first N samples of each benchmark.
        batch_size: samples per ``generate`` call.
        split: per-benchmark split (``{"vqav2": "testdev"}``); default each benchmark's default.
        progress: tqdm bars and status lines on stderr (rank 0 only).
        judge: ``{"base_url", "model", "api_key"}`` for judge-scored benchmarks (MM-Vet), set on
            each benchmark instance as ``judge``.
        dist: the process's :class:`DistEnv` (default: read from the environment); the process
            group is joined when distributed.
        protocol: ``"llava"`` (default) or ``"lmms-eval"``: the benchmarks loaded by name use it;
            :class:`LoadedBenchmark` inputs keep theirs (None: theirs), which must all agree and
            equal ``protocol`` when both are given.

    Returns:
        The summary (also written to ``summary.json`` / ``summary.md``). On ranks other than 0 it
        has no rows: rank 0 merges and scores.
    """
    import globalcom2

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    runs = plan_runs(ratios, methods, method_options)
    if model is not None:  # the config each run applies to this model, recorded and compared on resume
        runs = [_as_applied(model, run) for run in runs]
    loaded, protocol = _benchmarks(benchmarks, data_root, split, limit, judge, protocol)
    dist = dist or DistEnv.from_env()
    output_dir = Path(output_dir).expanduser()
    model_name = checkpoint_name(model) if model is not None else ""
    _check_outputs(output_dir, protocol, loaded, runs, model_name)  # every rank (read only), before any work
    on_cuda = model is not None and getattr(getattr(model, "device", None), "type", "cpu") == "cuda"
    dist.init("nccl" if on_cuda else "gloo")  # a no-op when single-process or already joined
    talk = progress and dist.is_main
    if model is not None and globalcom2.is_applied(model):
        globalcom2.remove(model)

    from tqdm import tqdm

    ordered: list[tuple[LoadedBenchmark, RunSpec, Path]] = []
    # one untimed generate per process first (warm), so no latency holds the warm-up
    answering = _Answering(model, processor, model_name, dist, batch_size, talk, tqdm, warm={"done": False})
    try:
        for lb in loaded:
            log(talk, f"{lb.bench.title} ({lb.split}): {len(lb.samples)} of {lb.total} questions")
            for run in runs:
                main = predictions_path(output_dir, lb.name, lb.split, run.method, run.ratio)
                ordered.append((lb, run, main))
                answering.run(lb, run, main)
    finally:
        if model is not None:
            globalcom2.remove(model)

    if not dist.is_main:
        dist.shutdown()
        return EvalSummary(rows=[], output_dir=str(output_dir), protocol=protocol)
    summary = _score(ordered, output_dir, protocol)
    summary.write(output_dir)
    dist.shutdown()
    return summary


def _benchmarks(
    benchmarks: Sequence[str | LoadedBenchmark],
    data_root: str | Path | None,
    split: dict[str, str] | None,
    limit: int | None,
    judge: dict[str, Any] | None,
    protocol: str | None,
) -> tuple[list[LoadedBenchmark], str]:
    """(the benchmarks' samples, the protocol) for :func:`run_eval`: loaded by name from
    ``data_root`` under ``protocol`` (default ``llava``), or, when every one is already a
    :class:`LoadedBenchmark`, those (cut to ``limit``) under their own protocol, which must be one
    and ``protocol`` when given (else ValueError). ``judge``, when given, is set on each benchmark."""
    if benchmarks and all(isinstance(b, LoadedBenchmark) for b in benchmarks):
        loaded = list(benchmarks)  # type: ignore[arg-type]
        if limit is not None:
            loaded = [LoadedBenchmark(lb.bench, lb.split, lb.samples[:limit], lb.total) for lb in loaded]
        theirs = sorted({lb.bench.protocol for lb in loaded})
        if len(theirs) > 1 or (protocol is not None and theirs != [check_protocol(protocol)]):
            wanted = f"protocol {check_protocol(protocol)!r}" if protocol is not None else "one protocol"
            raise ValueError(f"the loaded benchmarks use protocol(s) {', '.join(theirs)}, not {wanted}")
        protocol = theirs[0]
    else:
        if data_root is None:
            raise ValueError("data_root is required to load benchmarks by name")
        protocol = check_protocol(protocol)
        loaded = load_benchmarks([str(b) for b in benchmarks], data_root, split, limit, judge, protocol)
    if judge is not None:
        for lb in loaded:
            lb.bench.judge = judge  # type: ignore[attr-defined]
    return loaded, protocol


def _check_outputs(
    output_dir: Path, protocol: str, loaded: Sequence[LoadedBenchmark], runs: Sequence[RunSpec], model_name: str
) -> None:
    """Every check of what ``output_dir`` holds, read only, made by every rank before any work so
    that all fail together: its protocol, each run's meta file (same config, same model) and the
    image files of the questions still to answer."""
    check_output_protocol(output_dir, protocol)
    for lb in loaded:
        for run in runs:
            check_meta(predictions_path(output_dir, lb.name, lb.split, run.method, run.ratio), run, model_name)
    check_images(loaded, runs, output_dir)


@dataclass(frozen=True)
class _Answering:
    """What every run of one :func:`run_eval` call shares in this process: the model (None for a
    re-score) and its processor, the checkpoint's name (for the meta files), the process's place
    in the job, the batch size, whether it talks (``talk``: progress bars and status lines),
    tqdm, and ``warm["done"]``, set once the process has generated its untimed warm-up batch."""

    model: Any
    processor: Any
    model_name: str
    dist: DistEnv
    batch_size: int
    talk: bool
    tqdm: Callable[..., Any]
    warm: dict[str, bool]

    def run(self, lb: LoadedBenchmark, run: RunSpec, main: Path) -> None:
        """One run, its predictions in ``main``, in the three steps of the module docstring
        (**Sharding**): rank 0 consolidates (and writes the meta file); every rank answers its
        round-robin share of what is not done; rank 0 consolidates again. ValueError when
        answers are missing and there is no model."""
        dist, ids = self.dist, [s.id for s in lb.samples]
        # 1. Rank 0 folds leftovers (shards of a crashed run, a torn line) into the main file.
        if dist.is_main:
            main.parent.mkdir(parents=True, exist_ok=True)
            consolidate(main, ids)
            if self.model is not None:
                write_meta(main, run_meta(lb, run, self.model_name))
        dist.barrier()
        # 2. Every rank answers its round-robin share of what is not done yet.
        done = {str(r["id"]) for r in read_records(main)[0]}
        todo = [s for s in lb.samples if s.id not in done]
        mine = todo[dist.rank :: dist.world_size]
        label = f"{lb.name} {run.method} R={format_ratio(run.ratio)}"
        log(self.talk, f"  {label}: {len(ids) - len(todo)} done, {len(todo)} to go" + (
            f" on {dist.world_size} ranks" if dist.is_distributed and todo else ""))
        if mine:
            if self.model is None:
                raise ValueError(f"{label}: {len(todo)} predictions are missing but no model was given")
            target = shard_path(main, dist.rank) if dist.is_distributed else main
            _run_one(self.model, self.processor, lb, run, mine, target, self.batch_size, self.talk, label, self.tqdm,
                     self.warm)
        dist.barrier()
        # 3. Rank 0 merges the shards (deduplicated, in sample order).
        if dist.is_main:
            consolidate(main, ids)


def _score(ordered: Sequence[tuple[LoadedBenchmark, RunSpec, Path]], output_dir: Path, protocol: str) -> EvalSummary:
    """The summary of every (benchmark, run, predictions file) of ``ordered``, each scored on the
    records of its benchmark's samples, with the scores relative to the vanilla runs."""
    rows = []
    for lb, run, main in ordered:
        wanted = {s.id for s in lb.samples}
        records = [r for r in read_records(main)[0] if str(r["id"]) in wanted]
        rows.append(summarize_run(lb.bench, lb.split, run.method, run.ratio, records, main, output_dir, len(wanted)))
    add_relative(rows)
    return EvalSummary(rows=rows, output_dir=str(output_dir), protocol=protocol)


def _as_applied(model: Any, run: RunSpec) -> RunSpec:
    """``run`` with the config :func:`globalcom2.apply` makes of it on ``model``: where the run
    asks for no layout, the model family's default (``spatial`` on LLaVA-OneVision and InternVL,
    whose method default ``official`` they do not have), not the method's."""
    import dataclasses

    from ..api import resolve_method
    from ..methods import config_to_dict

    if run.is_vanilla:
        return run
    options = {"retention_ratio": run.ratio, **(run.options or {})}
    return dataclasses.replace(run, config=config_to_dict(resolve_method(model, None, run.method, options)[2]))


def _run_one(
    model: Any,
    processor: Any,
    lb: LoadedBenchmark,
    run: RunSpec,
    samples: Sequence[Sample],
    target: Path,
    batch_size: int,
    talk: bool,
    label: str,
    tqdm: Callable[..., Any],
    warm: dict[str, bool],
) -> None:
    """Apply the run's method, answer ``samples`` batch by batch, appending to ``target``.
    Unless ``warm["done"]``, the first batch is generated once untimed and unrecorded first
    (CUDA context, kernels and caches warm up there, not in the first latency)."""
    import globalcom2

    if run.is_vanilla:
        globalcom2.remove(model)
    else:
        globalcom2.apply(model, method=run.method, retention_ratio=run.ratio, **(run.options or {}))
    bar = tqdm(total=len(samples), desc=label, unit="q", disable=not talk, file=sys.stderr, dynamic_ncols=True, leave=False)
    try:
        if not warm["done"]:
            generate_batch(model, processor, list(samples)[:batch_size], lb.bench.max_new_tokens)
            warm["done"] = True
        for batch in iter_chunks(list(samples), batch_size):
            answers = generate_batch(model, processor, batch, lb.bench.max_new_tokens)
            append_records(
                target,
                [
                    s.record(
                        a.prediction,
                        visual_tokens=a.visual_tokens,
                        effective_visual_tokens=a.effective_visual_tokens,
                        latency_ms=a.latency_ms,
                    )
                    for s, a in zip(batch, answers)
                ],
            )
            bar.update(len(batch))
    finally:
        bar.close()
        globalcom2.remove(model)
