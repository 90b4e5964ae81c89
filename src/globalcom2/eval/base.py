"""The contract every benchmark follows, the registry, and the data readers they share.

A benchmark is a small class (one per benchmark, registered by name) that

* **loads** its questions from a local data root (LLaVA's evaluation layout or the lmms-lab
  parquet / ``datasets`` copies) into :class:`Sample` objects: the user text to send (the question
  plus the benchmark's answer-format instruction, *without* the chat template, which the runner
  applies per checkpoint), the image, the ground truth and whatever the scorer needs;
* **scores** a list of prediction records (plain dicts, as stored one per line in the JSONL the
  runner appends to) exactly as the benchmark defines its metric;
* optionally writes a **submission** file (VQAv2 test-dev, MM-Vet answers...).

Records are JSON-serialisable and self-contained, so a finished run is re-scored from its JSONL
alone::

    {"id": "...", "prediction": "...", "target": ..., "meta": {...}}

Every data problem (a missing file, a malformed line, a missing column) raises :class:`DataError`
whose message names the file and what was expected.
"""

from __future__ import annotations

import base64
import functools
import io
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Sequence

from PIL import Image

from .._io import to_rgb

#: What :attr:`Sample.image` may hold: a file path, encoded image bytes (PNG/JPEG, or base64 text
#: prefixed with ``base64:``), an already decoded image, or None for a text-only question.
ImageRef = Any


class DataError(ValueError):
    """A benchmark's data is missing or malformed; the message names the file and the problem."""


@dataclass
class Sample:
    """One question of a benchmark.

    Attributes:
        id: unique within the benchmark run (e.g. ``"adversarial/3"`` for POPE's subsets).
        prompt: the user text sent with the image: question plus the benchmark's instruction
            (e.g. ``"Answer the question using a single word or phrase."``), no chat template.
        image: see :data:`ImageRef`.
        target: the ground truth as the scorer needs it (JSON-serialisable); None when the split
            has no public answers (then only a submission file can be written).
        meta: JSON-serialisable extras for the scorer or the submission (category, options...).
    """

    id: str
    prompt: str
    image: ImageRef = None
    target: Any = None
    meta: dict[str, Any] = field(default_factory=dict)

    def load_image(self) -> Image.Image | None:
        """The image as RGB PIL, or None for a text-only question."""
        return decode_image(self.image, what=f"image of sample {self.id!r}")

    def record(self, prediction: str, **extra: Any) -> dict[str, Any]:
        """The JSON record of this sample answered with ``prediction`` (extra keys appended)."""
        return {"id": self.id, "prediction": prediction, "target": self.target, "meta": self.meta, **extra}


#: The evaluation protocols (``globalcom2 eval --protocol``): ``llava``, the paper's (LLaVA's own
#: ``scripts/v1_5/eval/*.sh`` and ``llava/eval/*.py``: their prompts, their ``max_new_tokens``, the
#: official scorers), and ``lmms-eval``, lmms-eval's task settings. The first is the default.
PROTOCOLS: tuple[str, ...] = ("llava", "lmms-eval")
DEFAULT_PROTOCOL = PROTOCOLS[0]


def check_protocol(protocol: str | None) -> str:
    """``protocol`` (None: :data:`DEFAULT_PROTOCOL`) if known, else a ValueError listing the known ones."""
    if protocol is None:
        return DEFAULT_PROTOCOL
    key = str(protocol).strip().lower()
    if key not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    return key


class Benchmark(ABC):
    """One benchmark: how to load it, how to prompt for it, how to score it.

    Class attributes:
        name: registry key, lowercase (``"textvqa"``).
        title: display name (``"TextVQA"``).
        splits: the splits :meth:`load` understands; ``default_split`` first.
        token_budgets: ``max_new_tokens`` per protocol (see :data:`PROTOCOLS`): LLaVA's scripts
            under ``llava``, lmms-eval's task under ``lmms-eval``; :attr:`max_new_tokens` is the
            one of :attr:`protocol`. A subclass may instead set ``max_new_tokens`` itself.
        primary_metric: the key of :meth:`score`'s result shown in summary tables.
        data_dirs: folder names looked for under ``--data-root`` (the first that holds this
            benchmark's data wins, see :meth:`has_data`; else the first that exists).

    Instance attribute ``protocol`` (default :data:`DEFAULT_PROTOCOL`; set by
    :func:`get_benchmark`) selects the prompts, the budget and, where the two differ, the scorer.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    splits: ClassVar[tuple[str, ...]]
    token_budgets: ClassVar[dict[str, int]] = {"llava": 16, "lmms-eval": 16}
    primary_metric: ClassVar[str]
    data_dirs: ClassVar[tuple[str, ...]] = ()
    protocol: str = DEFAULT_PROTOCOL

    @property
    def max_new_tokens(self) -> int:
        """The generation budget under :attr:`protocol` (settable, e.g. to shorten a test run)."""
        override = self.__dict__.get("_max_new_tokens")
        if override is not None:
            return int(override)
        budgets = self.token_budgets
        return int(budgets.get(self.protocol, budgets.get(DEFAULT_PROTOCOL, 16)))

    @max_new_tokens.setter
    def max_new_tokens(self, value: int) -> None:
        self.__dict__["_max_new_tokens"] = int(value)

    @property
    def default_split(self) -> str:
        return self.splits[0]

    def has_data(self, folder: Path) -> bool:
        """Whether ``folder`` holds this benchmark's data (used to pick among :attr:`data_dirs`);
        the default: any folder does."""
        return True

    def data_dir(self, root: str | Path) -> Path:
        """This benchmark's folder under ``root``: the first of :attr:`data_dirs` that holds its
        data (:meth:`has_data`), else the first that exists, else ``root`` itself."""
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataError(f"data root {root} is not a directory")
        existing = [root / name for name in self.data_dirs if (root / name).is_dir()]
        for folder in existing:
            if self.has_data(folder):
                return folder
        return existing[0] if existing else root

    @abstractmethod
    def load(self, root: str | Path, split: str | None = None) -> list[Sample]:
        """All samples of ``split`` (default :attr:`default_split`) found under the data root.

        Raises:
            DataError: missing or malformed files (named in the message).
            ValueError: an unknown split.
        """

    @abstractmethod
    def score(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        """The benchmark's metrics for ``records`` (see :meth:`Sample.record`); must include
        :attr:`primary_metric`. Records whose ``target`` is None are not scorable: a benchmark
        whose split has no answers returns an empty dict."""

    def write_submission(self, records: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
        """Write the file the benchmark's server expects, if it has one; return its path or None."""
        return None

    def check_split(self, split: str | None) -> str:
        split = split or self.default_split
        if split not in self.splits:
            raise ValueError(f"{self.name}: unknown split {split!r}; known: {', '.join(self.splits)}")
        return split


_REGISTRY: dict[str, type[Benchmark]] = {}


def register_benchmark(cls: type[Benchmark]) -> type[Benchmark]:
    """Class decorator: make ``cls`` available by ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def benchmark_names() -> list[str]:
    """Registered benchmark names, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def get_benchmark(name: str, protocol: str | None = None) -> Benchmark:
    """A fresh instance of the benchmark called ``name`` (case-insensitive), set to ``protocol``
    (default :data:`DEFAULT_PROTOCOL`, see :data:`PROTOCOLS`).

    Raises:
        ValueError: an unknown name (the message lists the known ones) or protocol.
    """
    _load_builtin()
    key = name.strip().lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    bench = _REGISTRY[key]()
    bench.protocol = check_protocol(protocol)
    return bench


def _load_builtin() -> None:
    from . import benchmarks  # noqa: F401  (registers the built-in benchmarks)


# --------------------------------------------------------------------------------------------
# Readers shared by the benchmarks. Each names the file in its errors.
# --------------------------------------------------------------------------------------------


def require_file(path: str | Path, what: str) -> Path:
    """``path`` if it is a file, else a DataError saying what was expected there."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing {what}: expected a file at {path}")
    return path


def find_first(folder: str | Path, candidates: Iterable[str], what: str) -> Path:
    """The first of ``candidates`` (relative paths or glob patterns) that exists under ``folder``."""
    folder = Path(folder)
    tried = []
    for pattern in candidates:
        tried.append(pattern)
        matches = sorted(folder.glob(pattern)) if any(c in pattern for c in "*?[") else [folder / pattern]
        for m in matches:
            if m.exists():
                return m
    raise DataError(f"missing {what} under {folder}: looked for {', '.join(tried)}")


def read_json(path: str | Path, what: str) -> Any:
    path = require_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({what}): {e}") from None


def json_list(path: str | Path, what: str, key: str | None = None, of: str | None = None) -> list[Any]:
    """The list a JSON file holds: the whole file (``key`` None) or its object's ``key`` member.

    ``of`` says what the list holds, for the error message: ``"<path>: expected a JSON list of
    <of>"``, or with ``key`` ``"<path>: expected an object with a '<key>' list of <of>"``.
    """
    path = Path(path)
    data = read_json(path, what)
    items = data if key is None else (data.get(key) if isinstance(data, dict) else None)
    if not isinstance(items, list):
        shape = "a JSON list" if key is None else f"an object with {'an' if key[:1] in 'aeiou' else 'a'} {key!r} list"
        raise DataError(f"{path}: expected {shape}" + (f" of {of}" if of else ""))
    return items


def json_entries(
    path: str | Path, what: str, key: str | None = None, of: str | None = None
) -> list[tuple[dict[str, Any], str]]:
    """``(entry, where)`` for each object of :func:`json_list`; ``where`` names the entry for
    error messages (``<path>, entry <n>``, or ``<path>, <key>[<n>]``, n from 0).

    Raises:
        DataError: a missing file, invalid JSON, no such list, or an entry that is not an object
            (``"<where>: expected an object"``).
    """
    path = Path(path)
    entries = []
    for n, entry in enumerate(json_list(path, what, key, of)):
        where = f"{path}, entry {n}" if key is None else f"{path}, {key}[{n}]"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected an object")
        entries.append((entry, where))
    return entries


def json_object(path: str | Path, what: str, keyed_by: str) -> dict[str, Any]:
    """The object a JSON file holds, keyed by ``keyed_by`` (named in the error message:
    ``"<path>: expected a JSON object keyed by <keyed_by>"``)."""
    path = Path(path)
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object keyed by {keyed_by}")
    return data


def read_jsonl(path: str | Path, what: str) -> list[dict[str, Any]]:
    """Every line of a JSON-lines file as a dict (blank lines skipped)."""
    return [row for _, row in read_jsonl_lines(path, what)]


def read_jsonl_lines(path: str | Path, what: str) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, dict)`` for every non-blank line of a JSON-lines file (numbers from 1, as an
    editor shows them: blank lines count)."""
    path = require_file(path, what)
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {n}: not valid JSON ({what}): {e}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {n}: expected a JSON object ({what}), got {type(row).__name__}")
            rows.append((n, row))
    return rows


def jsonl_rows(path: str | Path, what: str, keys: Iterable[str]) -> Iterator[tuple[dict[str, Any], str]]:
    """``(row, where)`` for each row of :func:`read_jsonl`, after :func:`require_keys`; ``where``
    names the row for error messages: ``<path>, line <n>``, the line of the file (blank lines
    counted, as an editor numbers them)."""
    keys = tuple(keys)
    for n, row in read_jsonl_lines(path, what):
        where = f"{path}, line {n}"
        require_keys(row, keys, where)
        yield row, where


def read_tsv(path: str | Path, what: str) -> list[dict[str, str]]:
    """A tab-separated file with a header row (MMBench's format), as dicts of strings."""
    import csv
    import sys

    path = require_file(path, what)
    csv.field_size_limit(sys.maxsize)  # base64 images are long
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        if not reader.fieldnames:
            raise DataError(f"{path}: empty file, expected a header row ({what})")
        return [dict(row) for row in reader]


#: Columns that :func:`read_table` leaves on disk until a sample needs them (the images: an
#: lmms-lab copy of VQAv2 val holds ~34 GB of them, one per question row).
LAZY_COLUMNS: tuple[str, ...] = ("image",)


class TableCell:
    """A cell of a parquet / Arrow file read on demand (see :data:`LAZY_COLUMNS`).

    Reading one cell reads its parquet row group (or memory-maps its Arrow file); the last few
    are cached, so samples taken in file order (as the runner and every shard do) read each row
    group once.
    """

    __slots__ = ("path", "group", "row", "column")

    def __init__(self, path: Path, group: int, row: int, column: str) -> None:
        self.path, self.group, self.row, self.column = path, group, row, column

    def load(self) -> Any:
        return _column_chunk(str(self.path), self.group, self.column)[self.row].as_py()

    def __repr__(self) -> str:
        return f"TableCell({self.path.name}, group={self.group}, row={self.row}, column={self.column!r})"

    def __reduce__(self) -> Any:  # picklable (e.g. for DataLoader workers)
        return (TableCell, (self.path, self.group, self.row, self.column))


@functools.lru_cache(maxsize=4)
def _column_chunk(path: str, group: int, column: str) -> Any:
    """One column of one parquet row group (``group >= 0``) or of a whole Arrow file (``-1``)."""
    if group >= 0:
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).read_row_group(group, columns=[column]).column(column)
    return _read_arrow(Path(path)).column(column)


def _read_arrow(path: Path) -> Any:
    """An Arrow stream or file, memory-mapped (zero-copy: the data stays on disk)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    source = pa.memory_map(str(path))
    try:
        return ipc.open_stream(source).read_all()
    except Exception:
        source.seek(0)
        return ipc.open_file(source).read_all()


def read_table(path: str | Path, what: str, lazy: Sequence[str] = LAZY_COLUMNS) -> list[dict[str, Any]]:
    """Rows of a parquet file, an Arrow file written by ``datasets.save_to_disk``, or a folder of
    them (all ``*.parquet`` / ``*.arrow`` files under it, sorted by path), as dicts.

    Cells of the ``lazy`` columns are :class:`TableCell` references (None where the cell is null),
    read when a sample's image is decoded, so a large image set is never held in memory at once.

    Needs ``pyarrow`` (``pip install pyarrow``; from a checkout: ``pip install -e ".[eval]"``).
    """
    try:
        import pyarrow.parquet as pq
    except ImportError:
        from .._extras import install_hint

        raise DataError(f"reading {path} ({what}) needs pyarrow: {install_hint('eval')}") from None
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".parquet", ".arrow") and not p.name.startswith("."))
        if not files:
            raise DataError(f"missing {what}: no .parquet or .arrow files under {path}")
    else:
        files = [require_file(path, what)]
    rows: list[dict[str, Any]] = []
    for file in files:
        try:
            if file.suffix == ".parquet":
                pf = pq.ParquetFile(file)
                names = pf.schema_arrow.names
                deferred = [c for c in lazy if c in names]
                part = pf.read(columns=[n for n in names if n not in deferred]).to_pylist()
                offset = 0
                probes = {c: _null_probe(pf.schema_arrow.field(c)) for c in deferred}
                for group in range(pf.num_row_groups):
                    n_rows = pf.metadata.row_group(group).num_rows
                    for column in deferred:  # only the null flags are kept, group by group
                        nulls = pf.read_row_group(group, columns=[probes[column]]).column(column).is_null().to_pylist()
                        for i, null in enumerate(nulls):
                            part[offset + i][column] = None if null else TableCell(file, group, i, column)
                    offset += n_rows
            else:
                table = _read_arrow(file)
                deferred = [c for c in lazy if c in table.column_names]
                part = table.drop_columns(deferred).to_pylist()
                for column in deferred:
                    for i, null in enumerate(table.column(column).is_null().to_pylist()):
                        part[i][column] = None if null else TableCell(file, -1, i, column)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"{file}: cannot read as {file.suffix[1:]} ({what}): {e}") from None
        rows.extend(part)
    return rows


def _null_probe(field: Any) -> str:
    """The parquet column to read for ``field``'s null flags: for a struct (``datasets`` images are
    ``{bytes, path}``) one small child, whose levels carry the struct's nulls, not the image bytes."""
    import pyarrow as pa

    if not pa.types.is_struct(field.type) or field.type.num_fields == 0:
        return field.name
    children = [field.type.field(i).name for i in range(field.type.num_fields)]
    small = [c for c in children if c != "bytes"]
    return f"{field.name}.{(small or children)[0]}"


def require_keys(row: dict[str, Any], keys: Iterable[str], where: str) -> None:
    """DataError naming ``where`` (file and line/row) when ``row`` lacks any of ``keys``."""
    missing = [k for k in keys if k not in row]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}; has: {', '.join(sorted(map(str, row)))}")


def decode_image(ref: ImageRef, what: str = "image") -> Image.Image | None:
    """Open an :data:`ImageRef` as an RGB PIL image (None stays None), converted by
    :func:`globalcom2._io.to_rgb` (a 16-bit PNG keeps its range; transparency is dropped). The
    pixels are read as stored, EXIF orientation not applied, as LLaVA's evaluation scripts read
    them (the command line's loader does apply it; see :mod:`globalcom2._io`).

    Accepts a path, raw bytes, ``"base64:..."`` text, a PIL image, or a ``{"bytes": ..., "path": ...}``
    dict as ``datasets`` stores images in parquet.
    """
    if ref is None:
        return None
    if isinstance(ref, TableCell):
        try:
            ref = ref.load()
        except Exception as e:  # the file changed or vanished since it was listed
            raise DataError(f"{what}: cannot read {ref!r}: {e}") from None
        if ref is None:
            return None
    if isinstance(ref, Image.Image):
        return to_rgb(ref)
    if isinstance(ref, dict):
        if ref.get("bytes"):
            return decode_image(ref["bytes"], what)
        if ref.get("path"):
            return decode_image(ref["path"], what)
        raise DataError(f"{what}: an image dict without bytes or path")
    try:
        if isinstance(ref, (bytes, bytearray)):
            img = Image.open(io.BytesIO(ref))
        elif isinstance(ref, str) and ref.startswith("base64:"):
            img = Image.open(io.BytesIO(base64.b64decode(ref[len("base64:"):])))
        else:
            path = Path(ref)
            if not path.is_file():
                raise DataError(f"missing {what}: expected an image file at {path}")
            img = Image.open(path)
        img.load()
    except DataError:
        raise
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, DecompressionBombError, binascii.Error...
        source = f" {ref}" if isinstance(ref, (str, Path)) and not str(ref).startswith("base64:") else ""
        raise DataError(f"{what}: cannot decode the image{source} ({type(e).__name__}: {e})") from None
    return to_rgb(img)  # 16-bit and float images keep their range


def image_file(ref: ImageRef) -> Path | None:
    """The file an :data:`ImageRef` will be read from, or None when it needs no file: embedded
    bytes, ``base64:`` text, a decoded image, a lazy table cell (parquet / Arrow bytes), None."""
    if isinstance(ref, dict):
        return None if ref.get("bytes") else image_file(ref.get("path"))
    if isinstance(ref, Path):
        return ref
    if isinstance(ref, str) and ref and not ref.startswith("base64:"):
        return Path(ref)
    return None


def unreadable_image_files(samples: Iterable[Sample]) -> list[tuple[Sample, Path, str]]:
    """The samples whose image file exists but cannot be read, judged by its header alone
    (:func:`globalcom2._io.image_file_problem`: empty, not an image, a decompression bomb), with
    the file and the reason; each file once, in sample order. Missing files are not listed here
    (see :func:`missing_image_files`); a file truncated after its header is found only when decoded."""
    from .._io import image_file_problem

    seen: set[Path] = set()
    bad: list[tuple[Sample, Path, str]] = []
    for s in samples:
        path = image_file(s.image)
        if path is None or path in seen or not path.is_file():
            continue
        seen.add(path)
        problem = image_file_problem(path)
        if problem is not None:
            bad.append((s, path, problem))
    return bad


def missing_image_files(samples: Iterable[Sample]) -> tuple[list[tuple[Sample, Path]], int]:
    """The samples whose image file does not exist (with that file; each file once, in sample
    order), and how many distinct image files the samples refer to. Only stats files: no image
    is opened."""
    seen: dict[Path, bool] = {}
    missing: list[tuple[Sample, Path]] = []
    for s in samples:
        path = image_file(s.image)
        if path is None or path in seen:
            continue
        seen[path] = path.is_file()
        if not seen[path]:
            missing.append((s, path))
    return missing, len(seen)


# lmms-lab hub copies on disk, shared by the benchmarks.


def find_hf_split(folder: Path, split: str, subdirs: Sequence[str]) -> list[Path]:
    """The files holding ``split`` of a Hugging Face dataset copy under ``folder``.

    For each ``folder / sub`` in ``subdirs`` order (``"."`` is ``folder`` itself) the first match
    wins:

    * parquet shards as the hub stores them: ``<sub>/<split>-00000-of-00003.parquet`` ... or
      ``<sub>/<split>.parquet``;
    * a ``datasets.save_to_disk`` DatasetDict: ``<sub>/<split>/`` holding ``*.arrow`` files;
    * a ``datasets.save_to_disk`` single Dataset: ``<sub>/state.json`` next to ``*.arrow`` files.

    Returns an empty list when nothing matches (the caller raises with its own message).
    """
    for sub in subdirs:
        base = folder if sub == "." else folder / sub
        if not base.is_dir():
            continue
        shards = sorted(base.glob(f"{split}-*.parquet")) or sorted(base.glob(f"{split}.parquet"))
        if shards:
            return shards
        split_dir = base / split
        if split_dir.is_dir() and any(split_dir.glob("*.arrow")):
            return [split_dir]
        if (base / "state.json").is_file() and any(base.glob("*.arrow")):
            return [base]
    return []


def read_tables(paths: Sequence[Path], what: str) -> list[dict[str, Any]]:
    """All rows of ``paths`` (parquet files or arrow folders, see :func:`read_table`), in order."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        rows.extend(read_table(path, what))
    return rows


def table_rows(paths: Sequence[Path], what: str, keys: Iterable[str]) -> Iterator[tuple[dict[str, Any], str]]:
    """``(row, where)`` for each row of :func:`read_tables`, after :func:`require_keys`.

    ``where`` names the row for error messages: ``<folder> (<what>), row <n>``, n counting from 0
    over all of ``paths``.
    """
    keys = tuple(keys)
    for n, row in enumerate(read_tables(paths, what)):
        where = f"{paths[0].parent} ({what}), row {n}"
        require_keys(row, keys, where)
        yield row, where


def hf_split_candidates(subdirs: Sequence[str], split: str) -> str:
    """A readable list of the places :func:`find_hf_split` looked at, for error messages."""
    return ", ".join(
        f"{'' if s == '.' else s + '/'}{split}-*.parquet or {'' if s == '.' else s + '/'}{split}/*.arrow"
        for s in subdirs
    )


def is_blank(value: Any) -> bool:
    """LLaVA's ``is_none`` for table cells: None, NaN, ``""``, ``"nan"`` or ``"none"`` (any case)."""
    if value is None:
        return True
    if isinstance(value, float) and value != value:  # NaN
        return True
    if isinstance(value, str) and value.strip().lower() in ("", "nan", "none"):
        return True
    return False


def lmms_split_files(folder: Path, hf_split: str, subdirs: Sequence[str], bench: str, llava_hint: str) -> list[Path]:
    """The parquet shards / arrow folder of ``hf_split`` of an lmms-lab copy under ``folder``.

    Raises:
        DataError: nothing found; the message lists the LLaVA files (``llava_hint``) and the
            lmms-lab places looked at.
    """
    files = find_hf_split(folder, hf_split, subdirs)
    if not files:
        raise DataError(
            f"{bench}: no data under {folder}: expected {llava_hint}, or an lmms-lab copy "
            f"({hf_split_candidates(subdirs, hf_split)})"
        )
    return files


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a folder, else a DataError saying what was expected there."""
    if not path.is_dir():
        raise DataError(f"missing {what}: expected a folder at {path}")
    return path


def image_cell(row: dict[str, Any], where: str) -> Any:
    """The ``image`` cell of an lmms-lab row (a ``{"bytes", "path"}`` dict), which must be set."""
    image = row.get("image")
    if image is None:
        raise DataError(f"{where}: the row has no image")
    return image


def accuracy_breakdown(overall: Sequence[float], groups: dict[str, Sequence[float]]) -> dict[str, float]:
    """``accuracy``: the mean of ``overall`` (per-question scores in [0, 1]) in %, then each
    group's mean in % (keys sorted), then ``count``; an empty dict when ``overall`` is empty."""
    if not overall:
        return {}
    out = {"accuracy": 100.0 * sum(overall) / len(overall)}
    for key in sorted(groups):
        out[key] = 100.0 * sum(groups[key]) / len(groups[key])
    out["count"] = float(len(overall))
    return out


def iter_chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of ``items`` of length ``size`` (the last one shorter)."""
    for i in range(0, len(items), size):
        yield items[i : i + size]
