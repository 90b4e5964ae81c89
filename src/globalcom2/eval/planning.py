"""What an evaluation runs: the benchmarks loaded, the (method, ratio) runs planned, and the checks
made before any model work (what is left to answer, missing images, a run's meta file agreeing
with the run it would resume).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .base import Benchmark, DataError, Sample, check_protocol, get_benchmark, missing_image_files, unreadable_image_files
from .records import done_ids, predictions_path, read_meta, shard_files

#: The method name of the unmodified model, run at retention ratio 1.0.
VANILLA = "vanilla"
#: The retention ratio of the reference run.
REFERENCE_RATIO = 1.0


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


def checkpoint_name(model: Any) -> str:
    """The model's checkpoint name or path (a local path resolved), as recorded in a run's meta file."""
    name = str(getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    if name and Path(name).expanduser().exists():  # a hub id or "tiny" is kept as it is
        name = str(Path(name).expanduser().resolve())
    return name


def check_meta(main: Path, run: RunSpec, model_name: str) -> None:
    """Refuse to resume predictions made with another method config or model."""
    if not (main.exists() or shard_files(main)):
        return
    meta = read_meta(main)
    if meta is None:
        return  # no meta file, or an unreadable one (rewritten)
    hint = f"use another --output-dir, or delete {main} to start that run over"
    if meta.get("config") != run.config and not (not model_name and _applied_on_some_family(meta.get("config"), run)):
        raise ValueError(f"{main} holds predictions made with {meta.get('config')}, not {run.config}; {hint}")
    old = meta.get("model") or ""
    if old and model_name and old != model_name:
        raise ValueError(f"{main} holds predictions of model {old!r}, not {model_name!r}; {hint}")


def _applied_on_some_family(recorded: Any, run: RunSpec) -> bool:
    """Whether ``recorded`` is what :func:`globalcom2.apply` makes of ``run`` on a model of some
    registered family (the family's default layout where the run asks for none): what a re-score
    without a model (nothing left to generate) can check of a run's recorded config."""
    if run.config is None or not isinstance(recorded, dict) or "layout" in (run.options or {}):
        return False
    from ..methods import config_from_dict, config_to_dict
    from ..models import families

    planned = config_from_dict(run.config)
    return any(config_to_dict(family.with_default_layout(planned)) == recorded for family in families())


def run_meta(bench: LoadedBenchmark, run: RunSpec, model_name: str) -> dict[str, Any]:
    """The content of a run's ``.meta.json``: what produced its predictions."""
    return {
        "benchmark": bench.name,
        "split": bench.split,
        "method": run.method,
        "retention_ratio": run.ratio,
        "config": run.config,
        "model": model_name or None,
        "protocol": bench.bench.protocol,
        "max_new_tokens": bench.bench.max_new_tokens,
    }


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
    """Fail before any model work when image files are missing, or exist but cannot be read
    (read only: files are stat'ed, then the header of each is opened: empty files, non-images and
    decompression bombs are found here; a file truncated after its header only when decoded).

    Only samples still to be answered are checked when ``runs`` and ``output_dir`` are given (a
    finished run re-scores without its images); embedded images (parquet / Arrow bytes, base64)
    need no check. Counts are of distinct files, over every benchmark.

    Raises:
        DataError: ``"N of M images are missing, first: PATH (benchmark split, sample ID)"``, or
            ``"N of M image files cannot be read, first: PATH: why (benchmark split, sample ID)"``.
    """
    missing: list[tuple[LoadedBenchmark, Sample, Path]] = []
    unreadable: list[tuple[LoadedBenchmark, Sample, Path, str]] = []
    total = 0
    for lb in loaded:
        samples: list[Sample] = list(lb.samples)
        if runs is not None and output_dir is not None:
            done = [done_ids(predictions_path(output_dir, lb.name, lb.split, r.method, r.ratio)) for r in runs]
            samples = [s for s in lb.samples if not all(s.id in d for d in done)]
        gone, n = missing_image_files(samples)
        missing += [(lb, s, p) for s, p in gone]
        total += n
        if not missing:  # headers only once every file is there
            unreadable += [(lb, s, p, why) for s, p, why in unreadable_image_files(samples)]
    if missing:
        lb, s, path = missing[0]
        raise DataError(
            f"{len(missing)} of {total} images are missing, first: {path} "
            f"({lb.bench.title} {lb.split}, sample {s.id!r})"
        )
    if unreadable:
        lb, s, path, why = unreadable[0]
        raise DataError(
            f"{len(unreadable)} of {total} image files cannot be read, first: {path}: {why} "
            f"({lb.bench.title} {lb.split}, sample {s.id!r})"
        )
