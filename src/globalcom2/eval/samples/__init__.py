"""Small synthetic benchmark folders, laid out as the real data is, to try ``globalcom2 eval``
without downloading anything (``globalcom2 eval --write-sample-data DIR``) and to test it.

Each benchmark gets a few made-up questions about tiny solid-colour images, written in LLaVA's
evaluation layout (``layout="llava"``, plain JSON/JSONL files and images: no extra package) or as
the lmms-lab parquet copies (``layout="lmms"``, needs pyarrow). The scores on them mean nothing;
the files show the layout each benchmark expects (``globalcom2 eval --list-benchmarks --verbose``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from . import choice, vqa

#: benchmark name -> the function that writes its folder under a data root.
MAKERS: dict[str, Callable[..., None]] = {
    "gqa": vqa.make_gqa,
    "mmbench": choice.make_mmbench,
    "mme": choice.make_mme,
    "mmvet": vqa.make_mmvet,
    "pope": choice.make_pope,
    "scienceqa": choice.make_scienceqa,
    "textvqa": vqa.make_textvqa,
    "vizwiz": vqa.make_vizwiz,
    "vqav2": vqa.make_vqav2,
}


def write_sample_data(root: str | Path, benchmarks: Sequence[str] | None = None, layout: str = "llava") -> list[Path]:
    """Write the sample folders of ``benchmarks`` (default: every benchmark) under ``root``
    (created if missing); returns the files written, sorted. ``ValueError`` for an unknown name."""
    names = list(MAKERS) if not benchmarks else [b.strip().lower() for b in benchmarks]
    unknown = [b for b in names if b not in MAKERS]
    if unknown:
        raise ValueError(f"no sample data for {', '.join(unknown)}; known: {', '.join(MAKERS)}")
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    before = {p for p in root.rglob("*") if p.is_file()}
    for name in names:
        MAKERS[name](root, layout=layout)
    return sorted(p for p in root.rglob("*") if p.is_file() and p not in before)
