"""Summaries: each run's records scored (:func:`summarize_run`), the tables of every run
(:class:`EvalSummary`: the paper's layout, a detail table, JSON, CSV; ``summary.json`` /
``summary.md``), and re-scoring an output directory from its JSONL files alone
(:func:`score_outputs`).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from .._io import atomic_path
from .base import DEFAULT_PROTOCOL, Benchmark, benchmark_names, check_protocol, get_benchmark
from .planning import VANILLA
from .records import consolidate, format_ratio, parse_stem, read_meta, run_protocol, run_stem, run_stems


def log(enabled: bool, text: str) -> None:
    """``text`` as a status line on stderr when ``enabled``."""
    if enabled:
        print(text, file=sys.stderr, flush=True)


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


def add_relative(rows: list[RunResult]) -> None:
    """Set each row's ``relative``: its score as % of the vanilla run of its benchmark and split."""
    for r in rows:
        ref = next(
            (v for v in rows if v.benchmark == r.benchmark and v.split == r.split and v.method == VANILLA), None
        )
        if ref is not None and ref.score not in (None, 0) and r.score is not None:
            r.relative = 100.0 * r.score / ref.score  # type: ignore[operator]


def _identify(folder: Path, stem: str, main: Path) -> tuple[str, str, str, float] | None:
    """(benchmark, split, method, ratio) of a predictions file, from its meta file or its names."""
    meta = read_meta(main)
    if meta is not None:
        try:
            return str(meta["benchmark"]), str(meta["split"]), str(meta["method"]), float(meta["retention_ratio"])
        except (ValueError, KeyError, TypeError):
            pass
    parsed = parse_stem(stem)
    if parsed is None:
        return None
    method, ratio = parsed
    for name in sorted(benchmark_names(), key=len, reverse=True):
        if folder.name.startswith(name + "-"):
            return name, folder.name[len(name) + 1 :], method, ratio
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
        for stem in run_stems(folder):
            main = folder / f"{stem}.jsonl"
            ident = _identify(folder, stem, main)
            if ident is None:
                log(progress, f"skipping {main}: cannot tell its benchmark, method and ratio")
                continue
            bench_name, split, method, ratio = ident
            try:
                bench = get_benchmark(bench_name)
            except ValueError:
                log(progress, f"skipping {main}: unknown benchmark {bench_name!r}")
                continue
            if judge is not None:
                bench.judge = judge  # type: ignore[attr-defined]
            bench.protocol = check_protocol(run_protocol(main))  # no meta: the default
            protocols.add(bench.protocol)
            records = consolidate(main)
            rows.append(summarize_run(bench, split, method, ratio, records, main, out))
    rows.sort(key=lambda r: (r.benchmark, r.split, r.method != VANILLA, r.method, -r.retention_ratio))
    add_relative(rows)
    summary = EvalSummary(rows=rows, output_dir=str(out), protocol=protocols.pop() if len(protocols) == 1 else None)
    summary.write(out)
    return summary
