"""ScienceQA-IMG: the image questions of ScienceQA's test split, answered with an option letter."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from ..base import (
    Benchmark,
    DataError,
    Sample,
    json_entries,
    json_object,
    lmms_split_files,
    read_json,
    register_benchmark,
    require_keys,
    table_rows,
)

#: LLaVA's single-prediction instruction for multiple choice (``model_vqa_science.py
#: --single-pred-prompt``; identical to lmms-eval's ``scienceqa_img`` ``post_prompt``).
SQA_INSTRUCTION = "Answer with the option's letter from the given choices directly."

#: The option letters LLaVA's ``eval_science_qa.py`` accepts (its ``--options`` default).
SQA_OPTIONS = ("A", "B", "C", "D", "E")

# LLaVA's ``eval_science_qa.py`` fallback: a single "The answer is X." in a longer reply. The ``.``
# is a regex wildcard there too (any character after the letter), kept as is.
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


# --------------------------------------------------------------------------------------------
# lmms-lab hub copies on disk (shared with mmbench / pope / mme).
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Scoring (LLaVA's llava/eval/eval_science_qa.py).
# --------------------------------------------------------------------------------------------


def parse_sqa_letter(prediction: str) -> str | None:
    """The option letter LLaVA's ``eval_science_qa.py`` reads from a reply, or None ("FAILED").

    On the stripped reply (LLaVA strips the decoded output before writing it):

    1. the whole reply is one of ``A``-``E``             -> that letter (``"B"``);
    2. a letter followed by ``". "`` (at least 3 chars)   -> the letter (``"B. cat"``);
    3. exactly one match of ``The answer is ([A-Z]).``  -> that letter;
    4. anything else -> None. In particular ``"B."`` (2 chars), ``"b"`` and ``"(B)"`` fail, as in
       LLaVA.
    """
    text = prediction.strip()
    if text in SQA_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in SQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    if len(found) == 1:
        return found[0]
    return None


def sqa_is_correct(prediction: str, target: str, n_choices: int) -> bool:
    """LLaVA's rule: the parsed letter must be one of the first ``n_choices`` letters and equal
    the answer letter (an out-of-range letter such as ``E`` on a 3-choice question is wrong)."""
    letter = parse_sqa_letter(prediction)
    return letter is not None and letter in SQA_OPTIONS[:n_choices] and letter == target


def build_sqa_prompt(question: str, choices: Sequence[str], hint: str | None) -> str:
    """The CQM prompt, as lmms-eval's ``scienceqa_img`` (default format) writes it::

        Context: <hint>          (only when the hint is not empty)
        <question>
        A. <choice 0>
        B. <choice 1>
        Answer with the option's letter from the given choices directly.
    """
    options = "\n".join(f"{SQA_OPTIONS[i]}. {c}" for i, c in enumerate(choices))
    context = f"Context: {hint}\n" if hint else ""
    return f"{context}{question}\n{options}\n{SQA_INSTRUCTION}"


def _grade_number(grade: Any) -> int | None:
    """``"grade7"`` -> 7 (None when unreadable)."""
    m = re.search(r"\d+", str(grade or ""))
    return int(m.group()) if m else None


@register_benchmark
class ScienceQA(Benchmark):
    """ScienceQA-IMG (test split, image questions only; 2,017 questions).

    Accepted layouts under ``<data-root>/scienceqa`` (or ``ScienceQA``, ``ScienceQA-IMG``,
    ``sqa``; the data root itself when none exists):

    * **LLaVA** (docs/Evaluation.md): ``problems.json`` and ``pid_splits.json`` from the ScienceQA
      repo (``data/scienceqa``), images in ``images/test/<pid>/image.png``, and optionally
      LLaVA's ``llava_test_CQM-A.json`` (from its eval.zip). With ``llava_test_CQM-A.json`` the
      prompts are its human turns (``<image>`` removed, stripped) and only its entries with an
      ``image`` are kept, exactly as ``model_vqa_science.py`` reads them; without it the test
      problems of ``pid_splits.json`` whose ``image`` is set are used and prompts are built with
      :func:`build_sqa_prompt`. Answers and categories always come from ``problems.json``.
    * **lmms-lab** (hub ``lmms-lab/ScienceQA``, config ``ScienceQA-IMG``):
      ``ScienceQA-IMG/test-*.parquet``; or ``lmms-lab/ScienceQA-IMG``: ``data/test-*.parquet``;
      or ``ScienceQA-FULL/test-*.parquet`` (rows without an image dropped); or a
      ``datasets.save_to_disk`` folder (``test/*.arrow``). Columns used: ``image``, ``question``,
      ``choices``, ``answer`` (index), ``hint``, ``subject``, ``grade``. Sample ids are the row
      numbers within the split (the parquet has no problem id).

    Prompt: context + question + lettered options + ``"Answer with the option's letter from the
    given choices directly."`` (LLaVA ``model_vqa_science.py --single-pred-prompt``; lmms-eval
    ``scienceqa_img``). ``max_new_tokens`` 1024 under ``--protocol llava`` (``model_vqa_science.py``,
    hard-coded), 16 under ``lmms-eval`` (``scienceqa_img``).

    Metric: accuracy (%) with LLaVA's ``eval_science_qa.py`` parsing (:func:`parse_sqa_letter`),
    plus ScienceQA's breakdown where present: subject (``NAT``/``SOC``/``LAN``), questions with a
    text context (``TXT``, non-empty hint), grades (``G1-6``/``G7-12``).
    """

    name = "scienceqa"
    title = "ScienceQA-IMG"
    splits = ("test",)
    token_budgets = {"llava": 1024, "lmms-eval": 16}  # model_vqa_science.py / lmms-eval scienceqa_img
    primary_metric = "accuracy"
    data_dirs = ("scienceqa", "ScienceQA", "ScienceQA-IMG", "sqa")

    _LMMS_SUBDIRS = ("ScienceQA-IMG", "data", ".", "ScienceQA-FULL")

    def load(self, root: str | Path, split: str | None = None) -> list[Sample]:
        split = self.check_split(split)
        folder = self.data_dir(root)
        if (folder / "problems.json").is_file():
            return self._load_llava(folder, split)
        hint = f"LLaVA's problems.json + pid_splits.json (+ images/{split}/)"
        return self._load_lmms(lmms_split_files(folder, split, self._LMMS_SUBDIRS, "ScienceQA", hint))

    # -- LLaVA layout ------------------------------------------------------------------------

    def _load_llava(self, folder: Path, split: str) -> list[Sample]:
        problems_path = folder / "problems.json"
        problems = json_object(problems_path, "ScienceQA problems (problems.json)", "problem id")
        image_dir = folder / "images" / split
        llava_file = folder / f"llava_{split}_CQM-A.json"
        samples = []
        if llava_file.is_file():
            for entry, where in json_entries(llava_file, "LLaVA ScienceQA questions", of="questions"):
                require_keys(entry, ("id", "conversations"), where)
                if "image" not in entry:  # text-only question: not part of ScienceQA-IMG
                    continue
                try:
                    text = entry["conversations"][0]["value"]
                except (TypeError, IndexError, KeyError):
                    raise DataError(f"{where}: conversations[0].value missing") from None
                pid = str(entry["id"])
                prob = self._problem(problems, pid, problems_path)
                # model_vqa_science.py: value without <image>, stripped, + "\n" + instruction
                prompt = text.replace("<image>", "").strip() + "\n" + SQA_INSTRUCTION
                samples.append(self._sample(pid, prompt, image_dir / entry["image"], prob, problems_path))
        else:
            splits_path = folder / "pid_splits.json"
            pid_splits = read_json(splits_path, "ScienceQA splits (pid_splits.json)")
            if not isinstance(pid_splits, dict) or split not in pid_splits:
                raise DataError(f"{splits_path}: expected an object with a {split!r} list of problem ids")
            for pid in pid_splits[split]:
                pid = str(pid)
                prob = self._problem(problems, pid, problems_path)
                if not prob.get("image"):
                    continue
                prompt = build_sqa_prompt(prob["question"], prob["choices"], prob.get("hint"))
                samples.append(self._sample(pid, prompt, image_dir / pid / prob["image"], prob, problems_path))
        return samples

    @staticmethod
    def _problem(problems: dict[str, Any], pid: str, path: Path) -> dict[str, Any]:
        prob = problems.get(pid)
        if not isinstance(prob, dict):
            raise DataError(f"{path}: no problem {pid!r}")
        require_keys(prob, ("question", "choices", "answer"), f"{path}, problem {pid!r}")
        return prob

    # -- lmms-lab layout ---------------------------------------------------------------------

    def _load_lmms(self, files: Sequence[Path]) -> list[Sample]:
        samples = []
        keys = ("image", "question", "choices", "answer", "hint")
        for n, (row, where) in enumerate(table_rows(files, "lmms-lab ScienceQA-IMG", keys)):
            if row["image"] is None:  # ScienceQA-FULL rows without an image
                continue
            prompt = build_sqa_prompt(row["question"], row["choices"], row.get("hint"))
            samples.append(self._sample(str(n), prompt, row["image"], row, where))
        return samples

    # -- common ------------------------------------------------------------------------------

    @staticmethod
    def _sample(pid: str, prompt: str, image: Any, prob: dict[str, Any], where: Any) -> Sample:
        choices = list(prob["choices"])
        try:
            answer = int(prob["answer"])
        except (TypeError, ValueError):
            raise DataError(f"{where}: answer {prob['answer']!r} of {pid!r} is not an option index") from None
        if not 0 <= answer < len(choices) or len(choices) > len(SQA_OPTIONS):
            raise DataError(f"{where}: answer index {answer} of {pid!r} out of range for {len(choices)} choices")
        return Sample(
            id=pid,
            prompt=prompt,
            image=str(image) if isinstance(image, Path) else image,
            target=SQA_OPTIONS[answer],
            meta={
                "n_choices": len(choices),
                "subject": str(prob.get("subject") or ""),
                "grade": _grade_number(prob.get("grade")),
                "has_text_context": bool(prob.get("hint")),
            },
        )

    def score(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        """Accuracy (%) overall and by ScienceQA's groups (present ones only)."""
        groups: dict[str, list[bool]] = {"accuracy": []}
        subject_key = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
        for rec in records:
            if rec.get("target") is None:
                continue
            meta = rec.get("meta") or {}
            ok = sqa_is_correct(str(rec.get("prediction") or ""), rec["target"], int(meta.get("n_choices", 5)))
            keys = ["accuracy"]
            if meta.get("subject") in subject_key:
                keys.append(subject_key[meta["subject"]])
            if meta.get("has_text_context"):
                keys.append("TXT")
            grade = meta.get("grade")
            if isinstance(grade, int):
                keys.append("G1-6" if grade <= 6 else "G7-12")
            for key in keys:
                groups.setdefault(key, []).append(ok)
        if not groups["accuracy"]:
            return {}
        out = {key: 100.0 * sum(v) / len(v) for key, v in groups.items()}
        out["count"] = float(len(groups["accuracy"]))
        return out
