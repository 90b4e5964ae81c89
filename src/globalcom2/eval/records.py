"""A run's files on disk: predictions JSONL (main file and per-rank shards) and its meta file.

Paths (:func:`predictions_path`, :func:`shard_path`, :func:`meta_path`), crash-safe appends
(:func:`append_records`), reading with a torn last line dropped (:func:`read_records`), merging
leftover shards (:func:`consolidate`), and the protocol a run's meta file records
(:func:`run_protocol`, :func:`check_output_protocol`). The layout is described in
:mod:`globalcom2.eval.runner`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

from .._io import atomic_path
from .base import DataError, check_protocol

#: The protocol of a run whose meta file predates ``--protocol`` (those runs followed lmms-eval).
LEGACY_PROTOCOL = "lmms-eval"

_SHARD_RE = re.compile(r"^(?P<stem>.+)\.rank(?P<rank>\d+)\.jsonl$")
_STEM_RE = re.compile(r"^(?P<method>.+)-R(?P<ratio>[0-9.eE+-]+)$")


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


def run_stems(folder: Path) -> list[str]:
    """The run stems (``<method>-R<ratio>``) of the predictions files in ``folder``, main files or
    leftover shards, sorted."""
    stems = set()
    for p in folder.iterdir():
        m = _SHARD_RE.match(p.name)
        if m:
            stems.add(m.group("stem"))
        elif p.name.endswith(".jsonl"):
            stems.add(p.name[: -len(".jsonl")])
    return sorted(stems)


def parse_stem(stem: str) -> tuple[str, float] | None:
    """(method, ratio) of a run stem written by :func:`run_stem`; None when it is not one."""
    m = _STEM_RE.match(stem)
    if not m:
        return None
    try:
        return m.group("method"), float(m.group("ratio"))
    except ValueError:
        return None


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


def _jsonl_text(records: Sequence[dict[str, Any]]) -> str:
    """``records`` as JSON lines, each ending with a newline."""
    return "".join(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n" for r in records)


def append_records(path: str | Path, records: Sequence[dict[str, Any]]) -> None:
    """Append records to a JSONL file in one write, flushed and fsynced."""
    if not records:
        return
    text = _jsonl_text(records)
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
                tmp.write_text(_jsonl_text(merged), encoding="utf-8")
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


def read_meta(main: Path) -> dict[str, Any] | None:
    """The meta file of the predictions file ``main`` as a dict; None when it is missing,
    unreadable or not a JSON object."""
    path = meta_path(main)
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def write_meta(main: Path, meta: dict[str, Any]) -> None:
    """Write ``meta`` as the meta file of the predictions file ``main`` (atomically), unless it
    already says that; a model the file names is kept when ``meta`` names none."""
    old = read_meta(main)
    if old is not None:
        if old.get("model") and not meta.get("model"):
            meta = {**meta, "model": old["model"]}  # keep what is known
        if old == meta:
            return
    with atomic_path(meta_path(main)) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def run_protocol(main: Path) -> str | None:
    """The protocol recorded in the meta file of the predictions file ``main``:
    :data:`LEGACY_PROTOCOL` for a meta file without one, None when there is no readable meta."""
    meta = read_meta(main)
    if meta is None:
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
