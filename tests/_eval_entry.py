"""Test helper for the evaluation runner: a toy benchmark, its data, and a command entry point.

* :class:`ToyQA` (registered as ``toyqa``): questions in ``<root>/toyqa/questions.jsonl``, some with
  a PNG image, some text-only; exact-match accuracy.
* :func:`make_toy` writes that data.
* Run as a script, it is ``globalcom2`` with only the ``eval`` command (the toy benchmark
  registered), for the multi-process tests under ``torch.distributed.run``::

      python -m torch.distributed.run --nproc_per_node=2 tests/_eval_entry.py eval --model DIR ...

  ``TOY_CRASH_RANK=k TOY_CRASH_AFTER=n``: rank k dies hard (``os._exit``) after n generate calls,
  leaving a torn line at the end of its shard, like a crash in the middle of a write.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from globalcom2.eval.base import Benchmark, Sample, read_jsonl, register_benchmark, require_keys

TOY_INSTRUCTION = "\nAnswer the question using a single word or phrase."


@register_benchmark
class ToyQA(Benchmark):
    """Toy benchmark: ``<root>/toyqa/questions.jsonl`` lines ``{"id", "question", "image", "answer"}``
    (``image``: a file name under ``<root>/toyqa/images`` or null)."""

    name = "toyqa"
    title = "ToyQA"
    splits = ("val", "test")
    max_new_tokens = 3
    primary_metric = "accuracy"
    data_dirs = ("toyqa",)

    def load(self, root: str | Path, split: str | None = None) -> list[Sample]:
        split = self.check_split(split)
        folder = self.data_dir(root)
        path = folder / ("questions.jsonl" if split == "val" else "test.jsonl")
        out = []
        for n, row in enumerate(read_jsonl(path, "toy questions"), 1):
            require_keys(row, ("id", "question", "answer"), f"{path}, line {n}")
            image = folder / "images" / row["image"] if row.get("image") else None
            target = None if split == "test" else row["answer"]
            out.append(Sample(str(row["id"]), row["question"] + TOY_INSTRUCTION, image, target, {"n": n}))
        return out

    def score(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        scored = [r for r in records if r.get("target") is not None]
        if not scored:
            return {}
        hits = [r["prediction"].strip().lower() == str(r["target"]).strip().lower() for r in scored]
        nonempty = [bool(r["prediction"].strip()) for r in scored]
        return {"accuracy": 100.0 * sum(hits) / len(hits), "answered": 100.0 * sum(nonempty) / len(nonempty)}

    def write_submission(self, records: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
        import json

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([{"question_id": r["id"], "answer": r["prediction"]} for r in records]))
        return path


def make_toy(root: str | Path, n: int = 6, text_only_every: int = 3) -> Path:
    """Write ``n`` toy questions under ``root/toyqa`` (every ``text_only_every``-th without an image);
    returns ``root``."""
    import json

    folder = Path(root) / "toyqa"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        image = None
        if text_only_every <= 0 or (i + 1) % text_only_every:
            rng = np.random.default_rng(i)
            h, w = (40 + 13 * i, 60 + 7 * (i % 4))
            Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(folder / "images" / f"{i}.png")
            image = f"{i}.png"
        rows.append({"id": f"q{i}", "question": f"What is shown in picture {i}?", "image": image, "answer": "cat" if i % 2 else "dog"})
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (folder / "questions.jsonl").write_text(text)
    (folder / "test.jsonl").write_text(text)
    return Path(root)


def _install_crash() -> None:
    """Make this rank die after TOY_CRASH_AFTER generate calls, tearing its shard's last line."""
    rank = os.environ.get("TOY_CRASH_RANK")
    after = os.environ.get("TOY_CRASH_AFTER")
    if rank is None or after is None or os.environ.get("RANK", "0") != rank:
        return
    from globalcom2.eval import runner

    limit = int(after)
    original_append = runner.append_records
    calls = {"n": 0}

    def append_then_crash(path: Any, records: Any) -> None:
        original_append(path, records)
        calls["n"] += 1
        if calls["n"] >= limit:
            with open(path, "a", encoding="utf-8") as f:
                f.write('{"id": "torn", "predic')
            os._exit(3)

    runner.append_records = append_then_crash


def main(argv: Sequence[str] | None = None) -> int:
    from globalcom2.cli import CLIError
    from globalcom2.cli.eval import add_parser

    parser = argparse.ArgumentParser(prog="globalcom2")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    _install_crash()
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"globalcom2: error: {e}", file=sys.stderr)
        return e.code


if __name__ == "__main__":
    sys.exit(main())
