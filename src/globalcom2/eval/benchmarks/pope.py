"""POPE: object-hallucination yes/no questions on COCO val2014 (random, popular, adversarial)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from ..base import Benchmark, DataError, Sample, jsonl_rows, register_benchmark
from ..base import lmms_split_files, table_rows

#: The three COCO subsets, in POPE's order.
POPE_SUBSETS = ("random", "popular", "adversarial")

#: LLaVA's short-answer instruction (docs/Evaluation.md; lmms-eval ``pope`` ``post_prompt``).
POPE_INSTRUCTION = "Answer the question using a single word or phrase."


def parse_pope_answer(prediction: str) -> str:
    """``"yes"`` or ``"no"``, as LLaVA's ``llava/eval/eval_pope.py`` reads a reply.

    Only the first sentence counts (text before the first ``.``); commas are removed; the rest is
    split on single spaces; the answer is ``"no"`` if one of the words is exactly ``No``, ``no``
    or ``not`` (case-sensitive: ``"NO"`` or ``"Nope"`` read as yes), and ``"yes"`` otherwise,
    including an empty reply. The reply is stripped first (LLaVA strips decoded outputs).
    """
    text = prediction.strip()
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(preds: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (positive class ``yes``) and the yes-ratio (share of
    ``yes`` predictions), all in %. A zero denominator gives 0 (LLaVA's script would divide by
    zero)."""
    tp = sum(p == "yes" and g == "yes" for p, g in zip(preds, labels))
    fp = sum(p == "yes" and g == "no" for p, g in zip(preds, labels))
    tn = sum(p == "no" and g == "no" for p, g in zip(preds, labels))
    fn = sum(p == "no" and g == "yes" for p, g in zip(preds, labels))
    n = len(preds)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": 100.0 * (tp + tn) / n if n else 0.0,
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": 100.0 * (tp + fp) / n if n else 0.0,
    }


def _question_key(image: Any, text: str) -> tuple[str, str]:
    """Match key between LLaVA's question file and POPE's annotation files."""
    return Path(str(image)).name, text.replace(POPE_INSTRUCTION, "").strip()


@register_benchmark
class POPE(Benchmark):
    """POPE on COCO (about 3,000 questions per subset): ``all`` (default) runs the subsets as one
    benchmark; ``random`` / ``popular`` / ``adversarial`` (or a comma-separated list of them,
    e.g. ``random,popular,adversarial``) run just those. Sample ids ``<subset>/<question_id>``.

    Accepted layouts under ``<data-root>/pope`` (or ``POPE``; the data root itself otherwise):

    * **LLaVA** (docs/Evaluation.md): ``llava_pope_test.jsonl`` (``question_id``, ``image``,
      ``text``, ``category`` = subset) + POPE's ``coco/coco_pope_{random,popular,adversarial}.json``
      (JSON lines with ``question_id``, ``image``, ``text``, ``label``) + the COCO images in
      ``val2014/`` (or ``coco/val2014/``, ``images/``). The prompt is the jsonl's ``text`` as is
      (LLaVA's ``model_vqa_loader.py`` sends it verbatim; in LLaVA's file it already ends with the
      instruction) and the label is the annotation line with the same image and question.
      Without ``llava_pope_test.jsonl`` the annotation files alone are used: prompt = their
      ``text`` + ``"\\nAnswer the question using a single word or phrase."``.
    * **lmms-lab** (hub ``lmms-lab/POPE``, default config): ``data/test-*.parquet`` (or
      ``test-*.parquet``, or a ``datasets.save_to_disk`` folder ``test/*.arrow``) with columns
      ``question_id``, ``question``, ``answer``, ``image``, ``category``. Prompt = ``question`` +
      ``"\\nAnswer the question using a single word or phrase."`` (lmms-eval ``pope``).

    ``max_new_tokens`` 128 (LLaVA's ``model_vqa_loader.py`` default and lmms-eval ``pope``).

    Metric (POPE / LLaVA ``eval_pope.py``): the reply is read as yes/no by
    :func:`parse_pope_answer`; per subset accuracy, precision, recall, F1 (positive = yes) and
    yes-ratio (``<subset>/<metric>``), and their means over the subsets present (``accuracy``,
    ..., ``f1``: the primary metric, mean F1 x 100).
    """

    name = "pope"
    title = "POPE"
    splits = ("all",) + POPE_SUBSETS
    token_budgets = {"llava": 128, "lmms-eval": 128}
    primary_metric = "f1"
    data_dirs = ("pope", "POPE")

    _LMMS_SUBDIRS = ("data", ".")
    _IMAGE_DIRS = ("val2014", "coco/val2014", "images")

    def check_split(self, split: str | None) -> str:
        """``all``, one subset, or a comma-separated list of subsets (normalised to POPE's order)."""
        split = (split or self.default_split).strip()
        if split == "all":
            return split
        parts = {p.strip() for p in split.split(",") if p.strip()}
        if not parts or not parts <= set(POPE_SUBSETS):
            raise ValueError(f"{self.name}: unknown split {split!r}; known: all, {', '.join(POPE_SUBSETS)}, "
                             "or a comma-separated list of subsets")
        return ",".join(s for s in POPE_SUBSETS if s in parts)

    def load(self, root: str | Path, split: str | None = None) -> list[Sample]:
        split = self.check_split(split)
        subsets = POPE_SUBSETS if split == "all" else tuple(split.split(","))
        folder = self.data_dir(root)
        if (folder / "llava_pope_test.jsonl").is_file():
            samples = self._load_llava(folder, subsets)
        elif any((folder / "coco" / f"coco_pope_{s}.json").is_file() for s in POPE_SUBSETS):
            samples = self._load_annotations(folder, subsets)
        else:
            hint = "LLaVA's llava_pope_test.jsonl + coco/coco_pope_<subset>.json + val2014/"
            samples = self._load_lmms(lmms_split_files(folder, "test", self._LMMS_SUBDIRS, "POPE", hint), subsets)
        if not samples:
            raise DataError(f"POPE: no questions of subset(s) {', '.join(subsets)} under {folder}")
        return samples

    # -- LLaVA layout ------------------------------------------------------------------------

    def _image_dir(self, folder: Path) -> Path:
        for name in self._IMAGE_DIRS:
            if (folder / name).is_dir():
                return folder / name
        raise DataError(f"POPE: missing COCO val2014 images: expected a folder {' or '.join(self._IMAGE_DIRS)} "
                        f"under {folder}")

    @staticmethod
    def _annotations(folder: Path, subset: str) -> list[dict[str, Any]]:
        path = folder / "coco" / f"coco_pope_{subset}.json"
        rows = []
        keys = ("question_id", "image", "text", "label")
        for row, where in jsonl_rows(path, f"POPE {subset} annotations (JSON lines)", keys):
            if str(row["label"]).strip().lower() not in ("yes", "no"):
                raise DataError(f"{where}: label {row['label']!r} is not yes/no")
            rows.append(row)
        return rows

    def _load_llava(self, folder: Path, subsets: Sequence[str]) -> list[Sample]:
        qpath = folder / "llava_pope_test.jsonl"
        questions = list(jsonl_rows(qpath, "LLaVA POPE questions", ("question_id", "image", "text", "category")))
        image_dir = self._image_dir(folder)
        labels: dict[str, dict[tuple[str, str], str]] = {}
        samples = []
        for q, where in questions:
            subset = q["category"]
            if subset not in subsets:
                continue
            if subset not in labels:
                labels[subset] = {_question_key(a["image"], a["text"]): str(a["label"]).strip().lower()
                                  for a in self._annotations(folder, subset)}
            key = _question_key(q["image"], q["text"])
            if key not in labels[subset]:
                raise DataError(f"{where}: no line of coco/coco_pope_{subset}.json has image {key[0]!r} "
                                f"and question {key[1]!r}")
            samples.append(Sample(id=f"{subset}/{q['question_id']}", prompt=q["text"],
                                  image=str(image_dir / q["image"]), target=labels[subset][key],
                                  meta={"subset": subset}))
        return samples

    def _load_annotations(self, folder: Path, subsets: Sequence[str]) -> list[Sample]:
        image_dir = self._image_dir(folder)
        samples = []
        for subset in subsets:
            for a in self._annotations(folder, subset):
                samples.append(Sample(id=f"{subset}/{a['question_id']}",
                                      prompt=f"{a['text'].strip()}\n{POPE_INSTRUCTION}",
                                      image=str(image_dir / a["image"]), target=str(a["label"]).strip().lower(),
                                      meta={"subset": subset}))
        return samples

    # -- lmms-lab layout ---------------------------------------------------------------------

    def _load_lmms(self, files: Sequence[Path], subsets: Sequence[str]) -> list[Sample]:
        samples = []
        keys = ("question_id", "question", "answer", "image", "category")
        for row, where in table_rows(files, "lmms-lab POPE", keys):
            if row["category"] not in subsets:
                continue
            answer = str(row["answer"]).strip().lower()
            if answer not in ("yes", "no"):
                raise DataError(f"{where}: answer {row['answer']!r} is not yes/no")
            # lmms-eval pope_doc_to_text: question.strip() + post_prompt
            samples.append(Sample(id=f"{row['category']}/{row['question_id']}",
                                  prompt=f"{str(row['question']).strip()}\n{POPE_INSTRUCTION}",
                                  image=row["image"], target=answer, meta={"subset": row["category"]}))
        return samples

    # -- metric ------------------------------------------------------------------------------

    def score(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        """Per-subset and subset-averaged POPE metrics (%); primary ``f1``."""
        preds: dict[str, list[str]] = defaultdict(list)
        labels: dict[str, list[str]] = defaultdict(list)
        for rec in records:
            if rec.get("target") is None:
                continue
            subset = (rec.get("meta") or {}).get("subset", "all")
            preds[subset].append(parse_pope_answer(str(rec.get("prediction") or "")))
            labels[subset].append(str(rec["target"]).lower())
        if not preds:
            return {}
        out: dict[str, float] = {}
        per_subset = {s: pope_metrics(preds[s], labels[s]) for s in preds}
        for subset, metrics in per_subset.items():
            for key, value in metrics.items():
                out[f"{subset}/{key}"] = value
            out[f"{subset}/count"] = float(len(preds[subset]))
        for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
            out[key] = sum(m[key] for m in per_subset.values()) / len(per_subset)
        return out
