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

import contextlib
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .._io import atomic_path
from ..generation import build_prompt, greedy_kwargs, sync, to_model
from .base import (
    DEFAULT_PROTOCOL, Benchmark, DataError, Sample, benchmark_names, check_protocol, get_benchmark, iter_chunks,
)

#: The protocol of a run whose meta file predates ``--protocol`` (those runs followed lmms-eval).
LEGACY_PROTOCOL = "lmms-eval"

#: The method name of the unmodified model, run at retention ratio 1.0.
VANILLA = "vanilla"
#: The retention ratio of the reference run.
REFERENCE_RATIO = 1.0
#: How long a rank waits at a barrier for the others (slow model loading, unbalanced shards).
BARRIER_TIMEOUT = timedelta(hours=3)

_SHARD_RE = re.compile(r"^(?P<stem>.+)\.rank(?P<rank>\d+)\.jsonl$")
_STEM_RE = re.compile(r"^(?P<method>.+)-R(?P<ratio>[0-9.eE+-]+)$")


# ------------------------------------------------------------------------------------------------
# Distributed environment
# ------------------------------------------------------------------------------------------------


@dataclass
class DistEnv:
    """This process's place in a ``torchrun`` / ``accelerate launch`` job (1 process by default).

    Attributes:
        rank: global rank (``RANK``).
        world_size: number of processes (``WORLD_SIZE``).
        local_rank: rank on this machine (``LOCAL_RANK``): the GPU index used.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    _owns_group: bool = field(default=False, repr=False, compare=False)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> DistEnv:
        """Read ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (absent: a single process).

        Raises:
            ValueError: a value that is not a non-negative integer, or rank >= world size.
        """
        env = os.environ if environ is None else environ

        def read(name: str, default: int) -> int:
            raw = env.get(name)
            if raw is None or raw.strip() == "":
                return default
            try:
                value = int(raw)
            except ValueError:
                raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None
            if value < 0:
                raise ValueError(f"environment variable {name}={raw!r} is negative")
            return value

        world = read("WORLD_SIZE", 1)
        rank = read("RANK", 0)
        local = read("LOCAL_RANK", rank)
        if world < 1:
            raise ValueError(f"environment variable WORLD_SIZE={world} must be >= 1")
        if rank >= world:
            raise ValueError(f"RANK={rank} must be < WORLD_SIZE={world}")
        return cls(rank=rank, world_size=world, local_rank=local)

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> str:
        """``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``."""
        import torch

        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"

    def init(self, backend: str | None = None) -> None:
        """Join the process group (``env://``) when distributed and not joined yet.

        ``backend``: ``"nccl"`` or ``"gloo"``; default nccl when CUDA is available, else gloo.
        """
        if not self.is_distributed:
            return
        import torch
        import torch.distributed as dist

        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        if dist.is_initialized():
            return
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(self.local_rank)
        dist.init_process_group(
            backend, init_method="env://", rank=self.rank, world_size=self.world_size, timeout=BARRIER_TIMEOUT
        )
        self._owns_group = True

    def barrier(self) -> None:
        """Wait for every rank (a no-op in a single process). Joins the group if needed."""
        if not self.is_distributed:
            return
        import torch.distributed as dist

        self.init()
        if dist.get_backend() == "nccl":
            import torch

            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()

    def shutdown(self) -> None:
        """Leave the process group if :meth:`init` created it."""
        if self._owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._owns_group = False


# ------------------------------------------------------------------------------------------------
# Paths and JSONL files
# ------------------------------------------------------------------------------------------------


def format_ratio(ratio: float) -> str:
    """``1.0 -> "1"``, ``0.25 -> "0.25"``: the ratio as written in file names and tables."""
    return f"{ratio:g}"


def run_stem(method: str, ratio: float) -> str:
    """``globalcom2-R0.25``, ``vanilla-R1``."""
    return f"{method}-R{format_ratio(ratio)}"


def predictions_path(output_dir: str | Path, benchmark: str, split: str, method: str, ratio: float) -> Path:
    """``<output-dir>/predictions/<benchmark>-<split>/<method>-R<ratio>.jsonl``."""
    return Path(output_dir) / "predictions" / f"{benchmark}-{split}" / f"{run_stem(method, ratio)}.jsonl"


def shard_path(main: Path, rank: int) -> Path:
    """Rank ``rank``'s shard beside the main file ``main`` (``<stem>.rank<k>.jsonl``)."""
    return main.with_name(f"{main.name[: -len('.jsonl')]}.rank{rank}.jsonl")


def meta_path(main: Path) -> Path:
    return main.with_name(f"{main.name[: -len('.jsonl')]}.meta.json")


def shard_files(main: Path) -> list[Path]:
    """The shard files of ``main`` present on disk, by rank."""
    stem = main.name[: -len(".jsonl")]
    found = []
    if main.parent.is_dir():
        for p in main.parent.iterdir():
            m = _SHARD_RE.match(p.name)
            if m and m.group("stem") == stem and p.is_file():
                found.append((int(m.group("rank")), p))
    return [p for _, p in sorted(found)]


def read_records(path: str | Path) -> tuple[list[dict[str, Any]], bool]:
    """The records of a predictions JSONL, and whether the file needs a rewrite.

    A last line that is not a JSON object with an ``id`` (a write torn by a crash) is dropped;
    such a line anywhere else is a :class:`DataError`. A missing file has no records. The flag is
    True when a line was dropped or the file does not end with a newline (appending to it as it
    is would glue two records together).
    """
    path = Path(path)
    if not path.is_file():
        return [], False
    data = path.read_bytes()
    if not data:
        return [], False
    lines = data.split(b"\n")
    needs_repair = not data.endswith(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    records: list[dict[str, Any]] = []
    for n, raw in enumerate(lines, 1):
        row = _parse_record(raw)
        if row is None:
            if not raw.strip():
                continue
            if n == len(lines):  # the torn tail of an interrupted write
                needs_repair = True
                continue
            raise DataError(
                f"{path}, line {n}: not a prediction record (a JSON object with an 'id'); the file is corrupt: "
                "fix or delete that line"
            )
        records.append(row)
    return records, needs_repair


def _parse_record(raw: bytes) -> dict[str, Any] | None:
    try:
        row = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return row if isinstance(row, dict) and "id" in row else None


def _json_default(obj: Any) -> Any:
    """numpy scalars and arrays (a benchmark's meta may hold some) as plain JSON values."""
    for attr in ("tolist", "item"):
        if hasattr(obj, attr):
            return getattr(obj, attr)()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def append_records(path: str | Path, records: Sequence[dict[str, Any]]) -> None:
    """Append records to a JSONL file in one write, flushed and fsynced."""
    if not records:
        return
    text = "".join(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n" for r in records)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def consolidate(main: str | Path, order: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Merge ``main`` and its leftover shard files into ``main``; returns the merged records.

    Records are deduplicated by id (the first seen wins: main file first, then shards by rank);
    with ``order`` (sample ids), records of those ids come first in that order, any others after
    in their previous order. The file is rewritten atomically only when something changes, then
    the shards are deleted (a crash in between leaves duplicates that the next call removes).
    """
    main = Path(main)
    records, repair = read_records(main)
    shards = shard_files(main)
    for shard in shards:
        extra, _ = read_records(shard)
        records.extend(extra)
    seen: set[str] = set()
    merged: list[dict[str, Any]] = []
    for r in records:
        key = str(r["id"])
        if key not in seen:
            seen.add(key)
            merged.append(r)
    if order is not None:
        rank = {str(i): n for n, i in enumerate(order)}
        tail = len(rank)
        merged = [r for _, r in sorted(enumerate(merged), key=lambda t: (rank.get(str(t[1]["id"]), tail), t[0]))]
    changed = repair or bool(shards) or len(merged) != len(records) or [r["id"] for r in merged] != [r["id"] for r in records]
    if changed:
        if merged or main.exists():
            with atomic_path(main) as tmp:
                tmp.write_text(
                    "".join(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n" for r in merged),
                    encoding="utf-8",
                )
        for shard in shards:
            with contextlib.suppress(FileNotFoundError):
                shard.unlink()
    return merged


def done_ids(main: str | Path) -> set[str]:
    """Ids answered in ``main`` or any of its shard files (read only)."""
    main = Path(main)
    ids = {str(r["id"]) for r in read_records(main)[0]}
    for shard in shard_files(main):
        ids.update(str(r["id"]) for r in read_records(shard)[0])
    return ids


# ------------------------------------------------------------------------------------------------
# Planning
# ------------------------------------------------------------------------------------------------


@dataclass
class LoadedBenchmark:
    """A benchmark instance with the samples of one split (after ``limit``)."""

    bench: Benchmark
    split: str
    samples: list[Sample]
    total: int = 0  # samples in the split before the limit

    @property
    def name(self) -> str:
        return self.bench.name


@dataclass(frozen=True)
class RunSpec:
    """One (method, ratio) run of one benchmark.

    ``options``: the extra keyword options of ``globalcom2.apply``; ``config``: the method's
    resolved config (:func:`globalcom2.methods.config_to_dict`), recorded in the run's meta file
    and compared on resume; both None for the vanilla model.
    """

    method: str
    ratio: float
    config: dict[str, Any] | None
    options: dict[str, Any] | None = None

    @property
    def is_vanilla(self) -> bool:
        return self.method == VANILLA


def load_benchmarks(
    names: Sequence[str],
    data_root: str | Path,
    split: dict[str, str] | None = None,
    limit: int | None = None,
    judge: dict[str, Any] | None = None,
    protocol: str | None = None,
) -> list[LoadedBenchmark]:
    """Instantiate and load each benchmark (``split``: per-benchmark split names; ``limit``: the
    first N samples) under ``protocol`` (default :data:`~globalcom2.eval.base.DEFAULT_PROTOCOL`).
    ``judge`` is set on each instance as the attribute ``judge``.

    Raises:
        ValueError: an unknown benchmark or split, a split for a benchmark not selected, a bad limit.
        DataError: missing or malformed data, duplicated sample ids.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    protocol = check_protocol(protocol)
    keys = []
    for name in names:
        key = get_benchmark(name).name
        if key not in keys:
            keys.append(key)
    if not keys:
        raise ValueError("no benchmark given")
    splits = {k.strip().lower(): v for k, v in (split or {}).items()}
    unknown = sorted(set(splits) - set(keys))
    if unknown:
        raise ValueError(f"split given for {', '.join(unknown)}, which is not among the benchmarks run ({', '.join(keys)})")
    out = []
    for key in keys:
        bench = get_benchmark(key, protocol)
        if judge is not None:
            bench.judge = judge  # type: ignore[attr-defined]
        sp = bench.check_split(splits.get(key))
        samples = list(bench.load(data_root, sp))
        seen: set[str] = set()
        for s in samples:
            if s.id in seen:
                raise DataError(f"{bench.name} ({sp}): sample id {s.id!r} occurs more than once under {data_root}")
            seen.add(s.id)
        total = len(samples)
        if limit is not None:
            samples = samples[:limit]
        out.append(LoadedBenchmark(bench, sp, samples, total))
    return out


def plan_runs(
    ratios: Sequence[float],
    methods: Sequence[str],
    method_options: dict[str, Any] | None = None,
    ratio_flag: str | None = None,
) -> list[RunSpec]:
    """The runs of every benchmark: vanilla (when 1.0 is among the ratios, or ``vanilla`` among the
    methods) first, then each method at each ratio below 1, in the order given.

    Each of ``method_options`` goes to the methods that have that option (``seed`` to ``random``,
    ``layout`` to the selection methods, ``fastv_layer`` to compositions...).

    ``ratio_flag``: the command's ratio flag, named in the message for a ``retention_ratio``
    option (None: the Python API).

    Raises:
        ValueError: a ratio outside (0, 1], an unknown method, ``retention_ratio`` among the
            options, an option none of the methods has, or a bad option value.
    """
    from ..methods import check_method_options, config_to_dict, method_names, plan_settings

    if not ratios:
        raise ValueError("no retention ratio given")
    for r in ratios:
        if not (isinstance(r, (int, float)) and 0 < r <= 1) or isinstance(r, bool):
            raise ValueError(f"retention ratio {r!r} is not in (0, 1]")
    names: list[str] = []
    for m in methods:
        key = str(m).strip().lower().replace(" ", "")
        if key != VANILLA and key not in method_names():
            raise ValueError(f"unknown method {m!r}; known: {', '.join([VANILLA, *method_names()])}")
        if key not in names:
            names.append(key)
    if not names:
        raise ValueError("no method given")
    methods_run = [m for m in names if m != VANILLA]
    # the same option rule as every command (globalcom2.methods.plan_settings): retention_ratio is
    # never a method option, each option goes to the methods that have it
    check_method_options(methods_run, method_options, ratio_flag)
    runs: list[RunSpec] = []
    if VANILLA in names or any(float(r) == REFERENCE_RATIO for r in ratios):
        runs.append(RunSpec(VANILLA, REFERENCE_RATIO, None))
    seen_ratios: list[float] = []
    for r in ratios:
        if float(r) != REFERENCE_RATIO and float(r) not in seen_ratios:
            seen_ratios.append(float(r))
    for s in plan_settings(methods_run, seen_ratios, method_options, ratio_flag):
        runs.append(RunSpec(s.method, s.ratio, config_to_dict(s.config), s.options))
    return runs


def _model_name(model: Any) -> str:
    name = str(getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    if name and Path(name).expanduser().exists():
        name = str(Path(name).expanduser().resolve())
    return name


def _check_meta(main: Path, run: RunSpec, model_name: str) -> None:
    """Refuse to resume predictions made with another method config or model."""
    path = meta_path(main)
    if not path.is_file() or not (main.exists() or shard_files(main)):
        return
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return  # an unreadable meta file is rewritten
    hint = f"use another --output-dir, or delete {main} to start that run over"
    if meta.get("config") != run.config:
        raise ValueError(f"{main} holds predictions made with {meta.get('config')}, not {run.config}; {hint}")
    old = meta.get("model") or ""
    if old and model_name and old != model_name:
        raise ValueError(f"{main} holds predictions of model {old!r}, not {model_name!r}; {hint}")


def _write_meta(main: Path, bench: LoadedBenchmark, run: RunSpec, model_name: str) -> None:
    path = meta_path(main)
    meta = {
        "benchmark": bench.name,
        "split": bench.split,
        "method": run.method,
        "retention_ratio": run.ratio,
        "config": run.config,
        "model": model_name or None,
        "protocol": bench.bench.protocol,
        "max_new_tokens": bench.bench.max_new_tokens,
    }
    try:
        old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        old = None
    if isinstance(old, dict):
        if old.get("model") and not model_name:
            meta["model"] = old["model"]  # keep what is known
        if old == meta:
            return
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def run_protocol(main: Path) -> str | None:
    """The protocol recorded in the meta file of the predictions file ``main``:
    :data:`LEGACY_PROTOCOL` for a meta file without one, None when there is no readable meta."""
    path = meta_path(main)
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(meta, dict):
        return None
    return str(meta.get("protocol") or LEGACY_PROTOCOL)


def check_output_protocol(output_dir: str | Path, protocol: str | None) -> None:
    """Refuse an output directory whose runs (their meta files, or ``summary.json``) were made
    under another protocol than ``protocol``; read only, nothing there is fine.

    Raises:
        ValueError: one line naming both protocols.
    """
    protocol = check_protocol(protocol)
    out = Path(output_dir).expanduser()
    found: list[tuple[str, Path]] = []
    root = out / "predictions"
    if root.is_dir():
        for meta_file in sorted(root.glob("*/*.meta.json")):
            main = meta_file.with_name(meta_file.name[: -len(".meta.json")] + ".jsonl")
            if not (main.exists() or shard_files(main)):
                continue
            old = run_protocol(main)
            if old is not None:
                found.append((old, main))
    summary = out / "summary.json"
    if summary.is_file():
        try:
            old_summary = json.loads(summary.read_text(encoding="utf-8")).get("protocol")
        except (OSError, ValueError, AttributeError):
            old_summary = None
        if old_summary:
            found.append((str(old_summary), summary))
    for old, where in found:
        if old != protocol:
            raise ValueError(
                f"{out} holds runs made under --protocol {old} ({where}), not --protocol {protocol}: "
                f"resume them with --protocol {old}, or use another --output-dir"
            )


def pending(loaded: Sequence[LoadedBenchmark], runs: Sequence[RunSpec], output_dir: str | Path) -> int:
    """How many (sample, run) answers are still missing in ``output_dir`` (read only)."""
    missing = 0
    for lb in loaded:
        for run in runs:
            ids = done_ids(predictions_path(output_dir, lb.name, lb.split, run.method, run.ratio))
            missing += sum(1 for s in lb.samples if s.id not in ids)
    return missing


def check_images(
    loaded: Sequence[LoadedBenchmark], runs: Sequence[RunSpec] | None = None, output_dir: str | Path | None = None
) -> None:
    """Fail before any model work when image files are missing (read only: files are stat'ed,
    not opened).

    Only samples still to be answered are checked when ``runs`` and ``output_dir`` are given (a
    finished run re-scores without its images); embedded images (parquet / Arrow bytes, base64)
    need no check. Counts are of distinct files, over every benchmark.

    Raises:
        DataError: ``"N of M images are missing, first: PATH (benchmark split, sample ID)"``.
    """
    from .base import missing_image_files

    missing: list[tuple[LoadedBenchmark, Sample, Path]] = []
    total = 0
    for lb in loaded:
        samples: Iterable[Sample] = lb.samples
        if runs is not None and output_dir is not None:
            done = [done_ids(predictions_path(output_dir, lb.name, lb.split, r.method, r.ratio)) for r in runs]
            samples = [s for s in lb.samples if not all(s.id in d for d in done)]
        gone, n = missing_image_files(samples)
        missing += [(lb, s, p) for s, p in gone]
        total += n
    if missing:
        lb, s, path = missing[0]
        raise DataError(
            f"{len(missing)} of {total} images are missing, first: {path} "
            f"({lb.bench.title} {lb.split}, sample {s.id!r})"
        )


# ------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------


@dataclass
class Answer:
    """One generated answer and its costs."""

    prediction: str
    visual_tokens: int | None
    effective_visual_tokens: float | None
    latency_ms: float


def generate_batch(model: Any, processor: Any, samples: Sequence[Sample], max_new_tokens: int) -> list[Answer]:
    """Answer a batch of samples with greedy decoding (left padding), timing ``generate``."""
    import torch

    import globalcom2

    images = []
    texts = []
    for s in samples:
        img = s.load_image()
        if img is not None:
            images.append(img)
        texts.append(build_prompt(processor, s.prompt, num_images=int(img is not None)))
    tok = getattr(processor, "tokenizer", processor)
    old_side = getattr(tok, "padding_side", None)
    try:
        if old_side is not None:
            tok.padding_side = "left"
        try:
            inputs = processor(images=images or None, text=texts, return_tensors="pt", padding=True)
        except Exception as e:
            ids = ", ".join(repr(s.id) for s in samples)
            raise RuntimeError(f"the processor failed on sample(s) {ids}: {' '.join(str(e).split())}") from e
    finally:
        if old_side is not None:
            tok.padding_side = old_side
    inputs = to_model(inputs, model)
    input_ids = inputs["input_ids"]
    kwargs = greedy_kwargs(tok, max_new_tokens)

    applied = globalcom2.is_applied(model)
    before = globalcom2.last_stats(model) if applied else None
    with torch.no_grad():
        sync(model.device)
        t0 = time.perf_counter()
        out = model.generate(**inputs, **kwargs)
        sync(model.device)
        seconds = time.perf_counter() - t0
    seqs = out if torch.is_tensor(out) else out.sequences
    texts_out = processor.batch_decode(seqs[:, input_ids.shape[1] :], skip_special_tokens=True)

    n = len(samples)
    visual: list[int | None]
    effective: list[float | None]
    stats = globalcom2.last_stats(model) if applied else None
    if not applied:
        image_token_id = getattr(model.config, "image_token_id", None)
        if image_token_id is None:
            image_token_id = getattr(model.config, "image_token_index", None)
        counts = (input_ids == image_token_id).sum(1).tolist() if image_token_id is not None else [None] * n
        visual, effective = list(counts), [None if c is None else float(c) for c in counts]
    elif stats is not None and stats is not before and len(stats.visual_tokens) == n:
        visual = [int(v) for v in stats.visual_tokens]
        effective = [float(v) for v in stats.effective_visual_tokens]
    else:  # the method reported nothing for this call: leave the counts out rather than guess
        visual, effective = [None] * n, [None] * n
    per_sample_ms = seconds * 1000.0 / n
    return [
        Answer(text.strip(), v, e, per_sample_ms) for text, v, e in zip(texts_out, visual, effective)
    ]


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """The summary of one (benchmark, split, method, ratio) run.

    ``score`` is the benchmark's primary metric (None when the split has no answers);
    ``relative`` is ``100 * score / score of the vanilla run`` of the same benchmark and split.
    """

    benchmark: str
    title: str
    split: str
    method: str
    retention_ratio: float
    metric: str
    score: float | None
    relative: float | None
    samples: int
    expected: int
    visual_tokens: float | None
    effective_visual_tokens: float | None
    latency_ms: float | None
    metrics: dict[str, float]
    predictions: str
    submission: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: (key, header, format) of the detail table / CSV.
DETAIL_COLUMNS = (
    ("title", "Benchmark", "s"),
    ("split", "Split", "s"),
    ("method", "Method", "s"),
    ("retention_ratio", "R", "g"),
    ("metric", "Metric", "s"),
    ("score", "Score", ".2f"),
    ("relative", "Rel. (%)", ".1f"),
    ("samples", "Samples", "d"),
    ("visual_tokens", "Visual tokens", ".1f"),
    ("effective_visual_tokens", "Eff. tokens", ".1f"),
    ("latency_ms", "Latency (ms)", ".1f"),
)


def _cell(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if spec == "s":
        return str(value)
    return format(value, spec)


def _markdown(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if a else c.ljust(w) for c, w, a in zip(cells, widths, right)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if a else ("-" * (w + 2)) for w, a in zip(widths, right)) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


@dataclass
class EvalSummary:
    """Every run's result; rendered as the paper's table (:meth:`paper_table`), a detail table,
    JSON or CSV (:meth:`format`)."""

    rows: list[RunResult]
    output_dir: str
    #: the protocol of every run (``llava`` / ``lmms-eval``); None when the runs disagree (a
    #: directory assembled by hand) or none is known.
    protocol: str | None = DEFAULT_PROTOCOL

    def to_dict(self) -> dict[str, Any]:
        return {"output_dir": self.output_dir, "protocol": self.protocol, "rows": [r.to_dict() for r in self.rows]}

    def row(self, benchmark: str, method: str, ratio: float) -> RunResult | None:
        for r in self.rows:
            if r.benchmark == benchmark and r.method == method and r.retention_ratio == ratio:
                return r
        return None

    def paper_table(self) -> str:
        """One row per (method, ratio), vanilla first then by decreasing ratio; one column per
        benchmark with ``score (relative %)``; ``Avg.`` is the mean relative score (when every
        benchmark has one) and ``Tokens`` the mean visual tokens per sample over all benchmarks
        (layer-averaged for FastV: its effective count)."""
        benches: list[tuple[str, str]] = []
        for r in self.rows:
            key = (r.benchmark, r.split)
            if key not in benches:
                benches.append(key)
        settings: list[tuple[str, float]] = []
        for r in self.rows:
            if (r.method, r.retention_ratio) not in settings:
                settings.append((r.method, r.retention_ratio))
        settings.sort(key=lambda s: (s[0] != VANILLA, -s[1]))
        titles = {(r.benchmark, r.split): r.title for r in self.rows}
        split_counts: dict[str, int] = {}
        for b, _ in benches:
            split_counts[b] = split_counts.get(b, 0) + 1
        headers = ["Method", "R"] + [
            titles[b] + (f" ({b[1]})" if split_counts[b[0]] > 1 else "") for b in benches
        ] + ["Avg. (%)", "Tokens"]
        body = []
        for method, ratio in settings:
            cells = [method, format_ratio(ratio)]
            rels, tokens, weights = [], 0.0, 0
            for b in benches:
                res = next((r for r in self.rows if (r.benchmark, r.split) == b and r.method == method and r.retention_ratio == ratio), None)
                if res is None or res.score is None:
                    cells.append("-")
                    rels.append(None)
                    continue
                text = f"{res.score:.1f}"
                if res.relative is not None and method != VANILLA:
                    text += f" ({res.relative:.1f}%)"
                cells.append(text)
                rels.append(res.relative)
                count = res.effective_visual_tokens if res.effective_visual_tokens is not None else res.visual_tokens
                if count is not None:
                    tokens += count * res.samples
                    weights += res.samples
            cells.append(f"{statistics.fmean(rels):.1f}" if rels and all(v is not None for v in rels) else "-")
            cells.append(f"{tokens / weights:.1f}" if weights else "-")
            body.append(cells)
        return _markdown(headers, body, [False] + [True] * (len(headers) - 1))

    def detail_table(self) -> str:
        """One row per run with every column of :data:`DETAIL_COLUMNS` (the effective-token
        column only when some run differs, i.e. FastV)."""
        cols = [c for c in DETAIL_COLUMNS if c[0] != "effective_visual_tokens" or self._has_effective()]
        rows = [[_cell(getattr(r, key), spec) for key, _, spec in cols] for r in self.rows]
        for r, cells in zip(self.rows, rows):
            if r.samples != r.expected:
                i = [c[0] for c in cols].index("samples")
                cells[i] = f"{r.samples}/{r.expected}"
        return _markdown([h for _, h, _ in cols], rows, [spec != "s" for _, _, spec in cols])

    def _has_effective(self) -> bool:
        return any(
            r.effective_visual_tokens is not None and r.visual_tokens is not None
            and abs(r.effective_visual_tokens - r.visual_tokens) > 1e-9
            for r in self.rows
        )

    def markdown(self) -> str:
        """The content of ``summary.md``."""
        if not self.rows:
            return "# Evaluation summary\n\nNo predictions.\n"
        return (
            "# Evaluation summary\n\n"
            + (f"Protocol: {self.protocol} (globalcom2 eval --protocol).\n\n" if self.protocol else "")
            + "Score (relative to the vanilla model at R=1, %); Avg.: mean relative score; Tokens: mean visual tokens "
            "per sample (layer-averaged for FastV).\n\n"
            f"{self.paper_table()}\n\n## Runs\n\n"
            "Visual tokens: mean per sample entering the language model; Latency: median generate time per sample.\n\n"
            f"{self.detail_table()}\n"
        )

    def format(self, fmt: str = "table") -> str:
        """``table`` (both Markdown tables), ``json`` (:meth:`to_dict`) or ``csv`` (one row per run)."""
        if fmt == "json":
            return json.dumps(self.to_dict(), indent=2)
        if fmt == "csv":
            import csv
            import io

            buf = io.StringIO()
            keys = [k for k, _, _ in DETAIL_COLUMNS] + ["benchmark", "expected", "predictions", "submission", "metrics"]
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerow(keys)
            for r in self.rows:
                d = r.to_dict()
                writer.writerow([json.dumps(d[k]) if k == "metrics" else ("" if d[k] is None else d[k]) for k in keys])
            return buf.getvalue().rstrip("\n")
        if fmt == "table":
            if not self.rows:
                return "no predictions"
            return f"{self.paper_table()}\n\n{self.detail_table()}"
        raise ValueError(f"unknown format {fmt!r}; use table, json or csv")

    def write(self, output_dir: str | Path | None = None) -> tuple[Path, Path]:
        """Write ``summary.json`` and ``summary.md`` atomically; returns their paths."""
        out = Path(output_dir if output_dir is not None else self.output_dir)
        json_path, md_path = out / "summary.json", out / "summary.md"
        with atomic_path(json_path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        with atomic_path(md_path) as tmp:
            tmp.write_text(self.markdown(), encoding="utf-8")
        return json_path, md_path


def _mean(values: Iterable[Any]) -> float | None:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return statistics.fmean(vals) if vals else None


def _median(values: Iterable[Any]) -> float | None:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return statistics.median(vals) if vals else None


def summarize_run(
    bench: Benchmark,
    split: str,
    method: str,
    ratio: float,
    records: Sequence[dict[str, Any]],
    main: Path,
    output_dir: Path,
    expected: int | None = None,
) -> RunResult:
    """Score one run's records and write its submission file (if the benchmark has one)."""
    metrics: dict[str, float] = {}
    if records:
        metrics = {str(k): float(v) for k, v in (bench.score(list(records)) or {}).items()}
    score = metrics.get(bench.primary_metric)
    submission = None
    if records:
        sub_dir = output_dir / "submissions" / f"{bench.name}-{split}"
        written = bench.write_submission(list(records), sub_dir / f"{run_stem(method, ratio)}.json")
        if written is not None:
            submission = str(written)
    return RunResult(
        benchmark=bench.name,
        title=getattr(bench, "title", bench.name),
        split=split,
        method=method,
        retention_ratio=float(ratio),
        metric=bench.primary_metric,
        score=score,
        relative=None,
        samples=len(records),
        expected=len(records) if expected is None else expected,
        visual_tokens=_mean(r.get("visual_tokens") for r in records),
        effective_visual_tokens=_mean(r.get("effective_visual_tokens") for r in records),
        latency_ms=_median(r.get("latency_ms") for r in records),
        metrics=metrics,
        predictions=str(main),
        submission=submission,
    )


def _add_relative(rows: list[RunResult]) -> None:
    for r in rows:
        ref = next(
            (v for v in rows if v.benchmark == r.benchmark and v.split == r.split and v.method == VANILLA), None
        )
        if ref is not None and ref.score not in (None, 0) and r.score is not None:
            r.relative = 100.0 * r.score / ref.score  # type: ignore[operator]


# ------------------------------------------------------------------------------------------------
# The runner
# ------------------------------------------------------------------------------------------------


def _log(enabled: bool, text: str) -> None:
    if enabled:
        print(text, file=sys.stderr, flush=True)


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
    dist = dist or DistEnv.from_env()
    output_dir = Path(output_dir).expanduser()
    model_name = _model_name(model) if model is not None else ""
    check_output_protocol(output_dir, protocol)  # every rank (read only), before any work
    for lb in loaded:  # every rank checks (read only): all fail together, before any work
        for run in runs:
            _check_meta(predictions_path(output_dir, lb.name, lb.split, run.method, run.ratio), run, model_name)
    check_images(loaded, runs, output_dir)
    on_cuda = model is not None and getattr(getattr(model, "device", None), "type", "cpu") == "cuda"
    dist.init("nccl" if on_cuda else "gloo")  # a no-op when single-process or already joined
    talk = progress and dist.is_main
    if model is not None and globalcom2.is_applied(model):
        globalcom2.remove(model)

    from tqdm import tqdm

    ordered: list[tuple[LoadedBenchmark, RunSpec, Path]] = []
    warm = {"done": False}  # one untimed generate per process first, so no latency holds the warm-up
    try:
        for lb in loaded:
            ids = [s.id for s in lb.samples]
            _log(talk, f"{lb.bench.title} ({lb.split}): {len(ids)} of {lb.total} questions")
            for run in runs:
                main = predictions_path(output_dir, lb.name, lb.split, run.method, run.ratio)
                ordered.append((lb, run, main))
                # 1. Rank 0 folds leftovers (shards of a crashed run, a torn line) into the main file.
                if dist.is_main:
                    main.parent.mkdir(parents=True, exist_ok=True)
                    consolidate(main, ids)
                    if model is not None:
                        _write_meta(main, lb, run, model_name)
                dist.barrier()
                # 2. Every rank answers its round-robin share of what is not done yet.
                done = {str(r["id"]) for r in read_records(main)[0]}
                todo = [s for s in lb.samples if s.id not in done]
                mine = todo[dist.rank :: dist.world_size]
                label = f"{lb.name} {run.method} R={format_ratio(run.ratio)}"
                _log(talk, f"  {label}: {len(ids) - len(todo)} done, {len(todo)} to go" + (
                    f" on {dist.world_size} ranks" if dist.is_distributed and todo else ""))
                if mine:
                    if model is None:
                        raise ValueError(f"{label}: {len(todo)} predictions are missing but no model was given")
                    target = shard_path(main, dist.rank) if dist.is_distributed else main
                    _run_one(model, processor, lb, run, mine, target, batch_size, talk, label, tqdm, warm)
                dist.barrier()
                # 3. Rank 0 merges the shards (deduplicated, in sample order).
                if dist.is_main:
                    consolidate(main, ids)
    finally:
        if model is not None:
            globalcom2.remove(model)

    if not dist.is_main:
        dist.shutdown()
        return EvalSummary(rows=[], output_dir=str(output_dir), protocol=protocol)
    rows = []
    for lb, run, main in ordered:
        wanted = {s.id for s in lb.samples}
        records = [r for r in read_records(main)[0] if str(r["id"]) in wanted]
        rows.append(summarize_run(lb.bench, lb.split, run.method, run.ratio, records, main, output_dir, len(wanted)))
    _add_relative(rows)
    summary = EvalSummary(rows=rows, output_dir=str(output_dir), protocol=protocol)
    summary.write(output_dir)
    dist.shutdown()
    return summary


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


# ------------------------------------------------------------------------------------------------
# Re-scoring
# ------------------------------------------------------------------------------------------------


def _identify(folder: Path, stem: str, main: Path) -> tuple[str, str, str, float] | None:
    """(benchmark, split, method, ratio) of a predictions file, from its meta file or its names."""
    meta_file = meta_path(main)
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            return str(meta["benchmark"]), str(meta["split"]), str(meta["method"]), float(meta["retention_ratio"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    m = _STEM_RE.match(stem)
    if not m:
        return None
    try:
        ratio = float(m.group("ratio"))
    except ValueError:
        return None
    for name in sorted(benchmark_names(), key=len, reverse=True):
        if folder.name.startswith(name + "-"):
            return name, folder.name[len(name) + 1 :], m.group("method"), ratio
    return None


def score_outputs(output_dir: str | Path, judge: dict[str, Any] | None = None, progress: bool = False) -> EvalSummary:
    """Re-score every run found under ``<output_dir>/predictions`` from the JSONL files alone
    (leftover shards are merged first), rewrite the submissions and the summaries.

    Every record in a file counts (a run made with ``limit`` is scored on what it answered).
    Each run is scored under the protocol its meta file records (no meta file: the default).

    Raises:
        FileNotFoundError: no predictions folder.
        DataError: a corrupt predictions file.
    """
    out = Path(output_dir).expanduser()
    root = out / "predictions"
    if not root.is_dir():
        raise FileNotFoundError(f"no predictions under {out} (expected the folder {root})")
    rows: list[RunResult] = []
    protocols: set[str] = set()
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        stems = set()
        for p in folder.iterdir():
            m = _SHARD_RE.match(p.name)
            if m:
                stems.add(m.group("stem"))
            elif p.name.endswith(".jsonl"):
                stems.add(p.name[: -len(".jsonl")])
        for stem in sorted(stems):
            main = folder / f"{stem}.jsonl"
            ident = _identify(folder, stem, main)
            if ident is None:
                _log(progress, f"skipping {main}: cannot tell its benchmark, method and ratio")
                continue
            bench_name, split, method, ratio = ident
            try:
                bench = get_benchmark(bench_name)
            except ValueError:
                _log(progress, f"skipping {main}: unknown benchmark {bench_name!r}")
                continue
            if judge is not None:
                bench.judge = judge  # type: ignore[attr-defined]
            bench.protocol = check_protocol(run_protocol(main))  # no meta: the default
            protocols.add(bench.protocol)
            records = consolidate(main)
            rows.append(summarize_run(bench, split, method, ratio, records, main, out))
    rows.sort(key=lambda r: (r.benchmark, r.split, r.method != VANILLA, r.method, -r.retention_ratio))
    _add_relative(rows)
    summary = EvalSummary(rows=rows, output_dir=str(out), protocol=protocols.pop() if len(protocols) == 1 else None)
    summary.write(out)
    return summary
