"""Open-ended VQA benchmarks scored with the VQA accuracy: TextVQA, VizWiz, VQAv2.

All three use :func:`globalcom2.eval.vqa_metric.vqa_accuracy` (leave-one-out ``min(1, matches/3)``
over the ten human answers, after the VQA answer normalisation). Records carry the raw human
answers as ``target`` (a list of strings) and the question id in ``meta``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

from ..base import (
    Benchmark,
    DataError,
    Sample,
    accuracy_breakdown,
    find_first,
    json_entries,
    json_list,
    jsonl_rows,
    read_jsonl,
    find_hf_split,
    image_cell,
    lmms_split_files,
    register_benchmark,
    require_dir,
    require_keys,
    table_rows,
)
from ..vqa_metric import normalize_answer, official_vqa_accuracy, vqa_accuracy

#: The short-answer instruction appended to the question (LLaVA docs/Evaluation.md "Short-answer";
#: lmms-eval's ``post_prompt`` of textvqa / vqav2 / gqa, after ``"\n"``).
SHORT_ANSWER = "Answer the question using a single word or phrase."

#: VizWiz's instruction (lmms-eval ``vizwiz_vqa`` ``post_prompt``; the text of LLaVA's
#: ``vizwiz/llava_test.jsonl``): unanswerable questions are to be answered "Unanswerable".
VIZWIZ_INSTRUCTION = "When the provided information is insufficient, respond with 'Unanswerable'.\n" + SHORT_ANSWER


# --------------------------------------------------------------------------------------------
# Helpers shared by the three benchmarks (and by gqa.py).
# --------------------------------------------------------------------------------------------


def answer_strings(value: Any, where: str) -> list[str]:
    """Human answers as strings: a list of strings (lmms-lab TextVQA / VizWiz) or of
    ``{"answer": ...}`` dicts (VQA / VizWiz annotation files, lmms-lab VQAv2)."""
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: answers should be a list, got {type(value).__name__}")
    out = []
    for a in value:
        if isinstance(a, dict):
            if "answer" not in a:
                raise DataError(f"{where}: an answer dict without 'answer'")
            a = a["answer"]
        if not isinstance(a, str):
            raise DataError(f"{where}: an answer is {type(a).__name__}, expected text")
        out.append(a)
    return out


def strip_instruction(text: str, instruction: str) -> str:
    """The question of a LLaVA question-file ``text``: without ``<image>`` and without the
    trailing ``"\\n" + instruction`` when present, stripped."""
    text = text.replace("<image>", "").strip()
    suffix = "\n" + instruction
    if text.endswith(suffix):
        text = text[: -len(suffix)]
    return text.strip()


def vqa_scores(records: Sequence[dict[str, Any]], group_key: str | None = None,
               accuracy: Callable[[str, list[str]], float] = vqa_accuracy) -> dict[str, float]:
    """VQA accuracy (%) over the records with a target, plus per ``meta[group_key]`` values
    (``answer_type/<value>``) when given. Empty dict when no record has a target. ``accuracy``:
    the per-answer scorer (:func:`~globalcom2.eval.vqa_metric.vqa_accuracy` or
    :func:`~globalcom2.eval.vqa_metric.official_vqa_accuracy`)."""
    overall: list[float] = []
    groups: dict[str, list[float]] = defaultdict(list)
    for rec in records:
        target = rec.get("target")
        if target is None:
            continue
        acc = accuracy(str(rec.get("prediction") or ""), [str(a) for a in target])
        overall.append(acc)
        if group_key is not None:
            value = (rec.get("meta") or {}).get(group_key)
            if value:
                groups[f"answer_type/{value}"].append(acc)
    return accuracy_breakdown(overall, groups)


# --------------------------------------------------------------------------------------------
# TextVQA
# --------------------------------------------------------------------------------------------


@register_benchmark
class TextVQA(Benchmark):
    """TextVQA validation (5,000 questions), VQA accuracy.

    Accepted layouts under ``<data-root>/textvqa`` (or ``TextVQA``, ``text_vqa``; the data root
    itself when none exists):

    * **LLaVA** (docs/Evaluation.md): ``TextVQA_0.5.1_val.json`` (``{"data": [{"question_id",
      "question", "image_id", "answers", ...}]}``) and the images ``train_images/<image_id>.jpg``;
      under ``--protocol llava`` also LLaVA's ``llava_textvqa_val_v051_ocr.jsonl`` (eval.zip): its
      lines (``question_id`` = the *image* id, ``image``, ``text``) are the prompts, matched to the
      annotations as ``eval_textvqa.py`` does, by (image id, lower-cased question = the first
      line of ``text``). Without it the prompt is built from the OCR tokens of the annotation
      (``ocr_tokens``) or of ``TextVQA_Rosetta_OCR_v0.2_val.json`` (``{"data": [{"image_id",
      "ocr_tokens"}]}``), else the load fails naming the files.
    * **lmms-lab** (hub ``lmms-lab/textvqa``): ``data/validation-*.parquet`` (or
      ``validation-*.parquet`` at the top), or a ``datasets.save_to_disk`` folder
      (``validation/*.arrow``). Columns used: ``question_id``, ``question``, ``image``, ``answers``,
      and ``ocr_tokens`` under ``--protocol llava``.

    Prompt, ``--protocol llava`` (the text of ``llava_textvqa_val_v051_ocr.jsonl``, the same as
    lmms-eval's ``textvqa`` with ``ocr: true``)::

        question.capitalize() + "\\nReference OCR token: " + ", ".join(ocr_tokens)
        + "\\nAnswer the question using a single word or phrase."

    ``--protocol lmms-eval`` (its ``textvqa_val`` default, ``ocr: false``): the same without the OCR
    line. ``max_new_tokens`` 128 under both: LLaVA's ``model_vqa_loader.py`` default used by its
    ``textvqa.sh`` (lmms-eval sets none for this task).

    Metric: VQA accuracy (%) as LLaVA's ``eval_textvqa.py`` (m4c ``TextVQAAccuracyEvaluator``).
    """

    name = "textvqa"
    title = "TextVQA"
    splits = ("val",)
    token_budgets = {"llava": 128, "lmms-eval": 128}
    primary_metric = "accuracy"
    data_dirs = ("textvqa", "TextVQA", "text_vqa")

    ANNOTATION_FILE = "TextVQA_0.5.1_val.json"
    LLAVA_QUESTIONS = "llava_textvqa_val_v051_ocr.jsonl"
    ROSETTA_OCR = "TextVQA_Rosetta_OCR_v0.2_val.json"
    IMAGE_DIR = "train_images"
    _LMMS_SUBDIRS = ("data", ".")

    @staticmethod
    def build_prompt(question: str, ocr_tokens: Sequence[Any] | None = None) -> str:
        """The question capitalised (``str.capitalize``: the rest lower-cased), the
        ``Reference OCR token:`` line when ``ocr_tokens`` is given (``--protocol llava``), the
        instruction."""
        ocr = "" if ocr_tokens is None else "\nReference OCR token: " + ", ".join(str(t) for t in ocr_tokens)
        return f"{question.capitalize()}{ocr}\n{SHORT_ANSWER}"

    @property
    def uses_ocr(self) -> bool:
        return self.protocol == "llava"

    def load(self, root: str | Path, split: str | None = None) -> list[Sample]:
        self.check_split(split)
        folder = self.data_dir(root)
        if (folder / self.ANNOTATION_FILE).is_file():
            return self._load_llava(folder)
        files = lmms_split_files(folder, "validation", self._LMMS_SUBDIRS, "TextVQA",
                                 f"LLaVA's {self.ANNOTATION_FILE} + {self.IMAGE_DIR}/")
        samples = []
        keys = ("question_id", "question", "image", "answers") + (("ocr_tokens",) if self.uses_ocr else ())
        for row, where in table_rows(files, "lmms-lab TextVQA", keys):
            prompt = self.build_prompt(str(row["question"]), self._ocr_list(row["ocr_tokens"], where)
                                       if self.uses_ocr else None)
            samples.append(self._sample(row, image_cell(row, where), where, prompt))
        return samples

    @staticmethod
    def _ocr_list(value: Any, where: str) -> list[Any]:
        if value is None:
            return []
        if isinstance(value, str) or not hasattr(value, "__iter__"):
            raise DataError(f"{where}: ocr_tokens should be a list, got {type(value).__name__}")
        return list(value)

    def _load_llava(self, folder: Path) -> list[Sample]:
        path = folder / self.ANNOTATION_FILE
        questions = json_entries(path, "TextVQA annotations", key="data", of="questions")
        image_dir = require_dir(folder / self.IMAGE_DIR, "TextVQA images (train_images/<image_id>.jpg)")
        for q, where in questions:
            require_keys(q, ("question_id", "question", "image_id", "answers"), where)
        if self.uses_ocr and (folder / self.LLAVA_QUESTIONS).is_file():
            return self._load_llava_prompts(folder / self.LLAVA_QUESTIONS, questions, image_dir)
        ocr = self._rosetta_tokens(folder) if self.uses_ocr else {}
        samples = []
        for q, where in questions:
            prompt = None
            if self.uses_ocr:
                tokens = q.get("ocr_tokens", ocr.get(str(q["image_id"])))
                if tokens is None:
                    raise DataError(
                        f"TextVQA (--protocol llava): no OCR tokens for question {q['question_id']} "
                        f"(image {q['image_id']}): expected LLaVA's {folder / self.LLAVA_QUESTIONS}, "
                        f"or {folder / self.ROSETTA_OCR}, or 'ocr_tokens' in {path}; "
                        "or use --protocol lmms-eval (no OCR tokens)"
                    )
                prompt = self.build_prompt(str(q["question"]), self._ocr_list(tokens, where))
            samples.append(self._sample(q, str(image_dir / f"{q['image_id']}.jpg"), where, prompt))
        return samples

    def _rosetta_tokens(self, folder: Path) -> dict[str, Any]:
        path = folder / self.ROSETTA_OCR
        if not path.is_file():
            return {}
        rows = json_list(path, "TextVQA Rosetta OCR tokens", key="data", of="{image_id, ocr_tokens}")
        out = {}
        for row in rows:
            if isinstance(row, dict) and "image_id" in row and "ocr_tokens" in row:
                out[str(row["image_id"])] = row["ocr_tokens"]
        return out

    def _load_llava_prompts(self, path: Path, questions: list[tuple[dict[str, Any], str]],
                            image_dir: Path) -> list[Sample]:
        """LLaVA's question file, in its order, each line matched to its annotation as
        ``eval_textvqa.py`` matches a result: by (image id, lower-cased question)."""
        by_key: dict[tuple[str, str], tuple[dict[str, Any], str]] = {}
        for q, where in questions:
            by_key.setdefault((str(q["image_id"]), str(q["question"]).lower()), (q, where))
        samples = []
        for row, where in jsonl_rows(path, "LLaVA TextVQA questions", ("question_id", "image", "text")):
            text = str(row["text"]).replace("<image>", "").strip()
            key = (str(row["question_id"]), _llava_textvqa_question(text).lower())
            if key not in by_key:
                raise DataError(f"{where}: no question {key[1]!r} on image {key[0]} in {self.ANNOTATION_FILE}")
            q, q_where = by_key[key]
            samples.append(self._sample(q, str(image_dir / str(row["image"])), q_where, text))
        return samples

    def _sample(self, q: dict[str, Any], image: Any, where: str, prompt: str | None = None) -> Sample:
        return Sample(
            id=str(q["question_id"]),
            prompt=self.build_prompt(str(q["question"])) if prompt is None else prompt,
            image=image,
            target=answer_strings(q["answers"], where),
            meta={"question_id": q["question_id"]},
        )

    def score(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        """``accuracy`` (%): mean VQA accuracy; ``count``."""
        return vqa_scores(records)


def _llava_textvqa_question(prompt: str) -> str:
    """The question of a LLaVA TextVQA prompt, as ``eval_textvqa.py``'s ``prompt_processor`` finds
    it: with a ``Reference OCR token:`` line and three lines, the line that is not the OCR one
    among the first two; with two lines, the first; otherwise the whole prompt's first line."""
    lines = prompt.split("\n")
    if "Reference OCR token: " in prompt and len(lines) == 3:
        return lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    return lines[0]


# --------------------------------------------------------------------------------------------
# VizWiz
# --------------------------------------------------------------------------------------------


@register_benchmark
class VizWiz(Benchmark):
    """VizWiz-VQA validation (4,319 questions), VQA accuracy including "unanswerable".

    Accepted layouts under ``<data-root>/vizwiz`` (or ``VizWiz``, ``VizWiz-VQA``, ``vizwiz_vqa``;
    the data root itself when none exists):

    * **LLaVA-style** (the official VizWiz files, placed as LLaVA's guide places the test split):
      ``val.json`` (or ``Annotations/val.json``; a list of ``{"image", "question", "answers":
      [{"answer", "answer_confidence"}], "answer_type", "answerable"}``) and the images
      ``val/<image>`` (``VizWiz_val_00000000.jpg`` ...).
    * **LLaVA**, split ``test`` (what LLaVA's ``vizwiz.sh`` runs; no public answers):
      ``llava_test.jsonl`` (``question_id``, ``image``, ``text`` = question + instruction; its text
      is the prompt) or the official ``test.json`` (``[{"image", "question"}]``), and the images
      ``test/<image>``. :meth:`write_submission` writes the EvalAI file as LLaVA's
      ``convert_vizwiz_for_submission.py`` does: ``[{"image": "VizWiz_test_00000000.jpg",
      "answer": <normalised answer>}, ...]`` in question order.
    * **lmms-lab** (hub ``lmms-lab/VizWiz-VQA``): ``data/val-*.parquet`` / ``data/test-*.parquet``
      (or at the top), or a ``datasets.save_to_disk`` folder (``val/*.arrow``). Columns used:
      ``question_id``, ``image``, ``question``, ``answers`` (strings; val), ``category`` (the
      answer type).

    Prompt (lmms-eval ``vizwiz_vqa`` ``doc_to_text`` + ``post_prompt``; the same instruction as in
    LLaVA's ``llava_test.jsonl``): ``question.capitalize() + "\\nWhen the provided information is
    insufficient, respond with 'Unanswerable'.\\nAnswer the question using a single word or
    phrase."``. ``max_new_tokens`` 128 (LLaVA ``model_vqa_loader.py`` default, its ``vizwiz.sh``).

    Metric: VQA accuracy (%) overall and per answer type (``answer_type/yes/no``,
    ``answer_type/number``, ``answer_type/other``, ``answer_type/unanswerable``); an answer
    "unanswerable" is scored like any other answer, as in VizWiz's evaluation.
    """

    name = "vizwiz"
    title = "VizWiz"
    splits = ("val", "test")
    token_budgets = {"llava": 128, "lmms-eval": 128}
    primary_metric = "accuracy"
    data_dirs = ("vizwiz", "VizWiz", "VizWiz-VQA", "vizwiz_vqa")

    _ANNOTATIONS = ("val.json", "Annotations/val.json")
    TEST_LLAVA = "llava_test.jsonl"
    _TEST_OFFICIAL = ("test.json", "Annotations/test.json")
    _LMMS_SUBDIRS = ("data", ".")

    @staticmethod
    def build_prompt(question: str) -> str:
        return f"{question.capitalize()}\n{VIZWIZ_INSTRUCTION}"

    def load(self, root: str | Path, split: str | None = None) -> list[Sample]:
        split = self.check_split(split)
        folder = self.data_dir(root)
        if split == "test":
            if (folder / self.TEST_LLAVA).is_file() or any((folder / a).is_file() for a in self._TEST_OFFICIAL):
                return self._load_test_llava(folder)
        elif any((folder / a).is_file() for a in self._ANNOTATIONS):
            return self._load_llava(folder)
        hint = ("val.json + val/ images" if split == "val"
                else f"LLaVA's {self.TEST_LLAVA} (or test.json) + test/ images")
        files = lmms_split_files(folder, split, self._LMMS_SUBDIRS, f"VizWiz ({split})", hint)
        samples = []
        keys = ("question_id", "question", "image") + (("answers",) if split == "val" else ())
        for row, where in table_rows(files, f"lmms-lab VizWiz-VQA {split}", keys):
            qid = str(row["question_id"])
            qid = qid[: -len(".jpg")] if qid.endswith(".jpg") else qid
            answers = row["answers"] if split == "val" else None
            samples.append(self._sample(qid, row["question"], image_cell(row, where), answers,
                                        row.get("category"), where, image_name=f"{qid}.jpg"))
        return samples

    def _load_test_llava(self, folder: Path) -> list[Sample]:
        image_dir = require_dir(folder / "test", "VizWiz test images (test/<image>)")
        samples = []
        if (folder / self.TEST_LLAVA).is_file():
            path = folder / self.TEST_LLAVA
            for row, where in jsonl_rows(path, "LLaVA VizWiz test questions", ("question_id", "image", "text")):
                name = str(row["image"])
                text = str(row["text"]).replace("<image>", "").strip()
                prompt = text if self.protocol == "llava" else None
                question = strip_instruction(text, VIZWIZ_INSTRUCTION)
                samples.append(self._sample(Path(name).stem, question, str(image_dir / name), None, None, where,
                                            image_name=name, prompt=prompt))
            return samples
        path = find_first(folder, self._TEST_OFFICIAL, "VizWiz test questions")
        for q, where in json_entries(path, "VizWiz test questions", of="questions"):
            require_keys(q, ("image", "question"), where)
            name = str(q["image"])
            samples.append(self._sample(Path(name).stem, q["question"], str(image_dir / name), None, None, where,
                                        image_name=name))
        return samples

    def _load_llava(self, folder: Path) -> list[Sample]:
        path = find_first(folder, self._ANNOTATIONS, "VizWiz annotations")
        entries = json_entries(path, "VizWiz annotations", of="questions")
        image_dir = require_dir(folder / "val", "VizWiz validation images (val/<image>)")
        samples = []
        for q, where in entries:
            require_keys(q, ("image", "question", "answers"), where)
            qid = Path(str(q["image"])).stem
            samples.append(self._sample(qid, q["question"], str(image_dir / str(q["image"])), q["answers"],
                                        q.get("answer_type"), where))
        return samples

    def _sample(self, qid: str, question: Any, image: Any, answers: Any, answer_type: Any, where: str,
                image_name: str | None = None, prompt: str | None = None) -> Sample:
        meta: dict[str, Any] = {"question_id": qid, "answer_type": str(answer_type) if answer_type else None}
        if answers is None:  # test: the submission names each question by its image file
            meta["image"] = image_name or f"{qid}.jpg"
        return Sample(
            id=qid,
            prompt=self.build_prompt(str(question)) if prompt is None else prompt,
            image=image,
            target=None if answers is None else answer_strings(answers, where),
            meta=meta,
        )

    def score(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        """val: ``accuracy`` (%), ``answer_type/<type>`` (%) where types are known, ``count``;
        test: ``{}`` (no public answers)."""
        return vqa_scores(records, group_key="answer_type")

    def write_submission(self, records: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
        """test records (no target): the EvalAI file of LLaVA's ``convert_vizwiz_for_submission.py``,
        ``[{"image": str, "answer": str}]``, answers normalised by
        :func:`~globalcom2.eval.vqa_metric.normalize_answer` (its ``EvalAIAnswerProcessor``), in
        record (= question) order. val records: nothing (None)."""
        test = [rec for rec in records if rec.get("target") is None]
        if not test:
            return None
        out = []
        for rec in test:
            meta = rec.get("meta") or {}
            image = meta.get("image") or f"{meta.get('question_id', rec['id'])}.jpg"
            out.append({"image": str(image), "answer": normalize_answer(str(rec.get("prediction") or ""))})
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out), encoding="utf-8")
        return path


# --------------------------------------------------------------------------------------------
# VQAv2
# --------------------------------------------------------------------------------------------


@register_benchmark
class VQAv2(Benchmark):
    """VQAv2: ``val`` (local VQA accuracy) and ``test-dev`` (no answers: a submission file).

    Accepted layouts under ``<data-root>/vqav2`` (or ``VQAv2``, ``vqa_v2``; the data root itself
    when none exists):

    * **LLaVA** (docs/Evaluation.md), ``test-dev``: ``llava_vqav2_mscoco_test-dev2015.jsonl``
      (``question_id``, ``image``, ``text`` = question + ``"\\n"`` + instruction) and the images
      ``test2015/<image>``; without it the official ``v2_OpenEnded_mscoco_test-dev2015_questions.json``
      (images ``test2015/COCO_test2015_<image_id:012d>.jpg``). When
      ``llava_vqav2_mscoco_test2015.jsonl`` (or ``v2_OpenEnded_mscoco_test2015_questions.json``)
      is present too, the submission lists every test2015 question, unanswered ones with ``""``,
      as LLaVA's ``convert_vqav2_for_submission.py`` does (EvalAI rejects a file that does not
      answer every test2015 question, even in the test-dev phase).
    * **Official files**, ``val``: ``v2_mscoco_val2014_annotations.json`` +
      ``v2_OpenEnded_mscoco_val2014_questions.json``, images
      ``val2014/COCO_val2014_<image_id:012d>.jpg``. Optional subset file
      ``llava_vqav2_mscoco_val2014.jsonl`` (LLaVA question-file format; only ``question_id`` is
      read): only its questions are used, in its order.
    * **lmms-lab** (hub ``lmms-lab/VQAv2``): ``data/validation-*.parquet`` /
      ``data/testdev-*.parquet`` (or at the top), or ``datasets.save_to_disk`` folders
      (``validation/*.arrow``, ``testdev/*.arrow``; a subset saved this way is fine). Columns
      used: ``question_id``, ``question``, ``image``, ``answers`` (``[{"answer", ...}]``, val),
      ``answer_type``. For test-dev, the ids of ``data/test-*.parquet`` (or ``test/*.arrow``),
      when present, pad the submission as above (only that column is read).

    Prompt (lmms-eval ``vqav2`` ``doc_to_text`` + ``post_prompt``; LLaVA's question files):
    ``question + "\\nAnswer the question using a single word or phrase."``. ``max_new_tokens``
    128 under ``--protocol llava`` (``model_vqa_loader.py``'s default, used by ``vqav2.sh``), 16 under
    ``lmms-eval`` (its ``vqav2`` ``generation_kwargs``).

    Metric (val): VQA accuracy (%) overall and per answer type (``yes/no``, ``number``,
    ``other``), as the official ``vqaEval.py`` under ``--protocol llava``, with both sides
    normalised under ``lmms-eval`` (see :meth:`score`). test-dev: :meth:`score` returns ``{}``;
    :meth:`write_submission` writes
    ``[{"question_id": int, "answer": str}]`` with answers normalised by
    :func:`~globalcom2.eval.vqa_metric.normalize_answer`, as LLaVA does before submitting.

    Attributes:
        submission_question_ids: the test2015 question ids the submission must list (set by
            :meth:`load` for test-dev when the full test2015 questions are present; may be set by
            hand). A fresh instance that was not loaded keeps the question list of the submission
            it overwrites, or lists the answered questions only when there is none.
    """

    name = "vqav2"
    title = "VQAv2"
    splits = ("val", "test-dev")
    token_budgets = {"llava": 128, "lmms-eval": 16}  # model_vqa_loader.py default / lmms-eval vqav2
    primary_metric = "accuracy"
    data_dirs = ("vqav2", "VQAv2", "vqa_v2")

    VAL_ANNOTATIONS = "v2_mscoco_val2014_annotations.json"
    VAL_QUESTIONS = "v2_OpenEnded_mscoco_val2014_questions.json"
    VAL_SUBSET = "llava_vqav2_mscoco_val2014.jsonl"
    TESTDEV_LLAVA = "llava_vqav2_mscoco_test-dev2015.jsonl"
    TESTDEV_QUESTIONS = "v2_OpenEnded_mscoco_test-dev2015_questions.json"
    TEST_LLAVA = "llava_vqav2_mscoco_test2015.jsonl"
    TEST_QUESTIONS = "v2_OpenEnded_mscoco_test2015_questions.json"
    _HF_SPLIT = {"val": "validation", "test-dev": "testdev"}
    _LMMS_SUBDIRS = ("data", ".")

    def __init__(self) -> None:
        self.submission_question_ids: list[int] | None = None

    @staticmethod
    def build_prompt(question: str) -> str:
        return f"{question}\n{SHORT_ANSWER}"

    def load(self, root: str | Path, split: str | None = None) -> list[Sample]:
        split = self.check_split(split)
        folder = self.data_dir(root)
        if split == "val" and (folder / self.VAL_ANNOTATIONS).is_file():
            return self._load_val_official(folder)
        has_testdev = (folder / self.TESTDEV_LLAVA).is_file() or (folder / self.TESTDEV_QUESTIONS).is_file()
        if split == "test-dev" and has_testdev:
            return self._load_testdev_llava(folder)
        hint = (f"{self.VAL_ANNOTATIONS} + {self.VAL_QUESTIONS} + val2014/" if split == "val"
                else f"LLaVA's {self.TESTDEV_LLAVA} + test2015/")
        files = lmms_split_files(folder, self._HF_SPLIT[split], self._LMMS_SUBDIRS, f"VQAv2 ({split})", hint)
        if split == "test-dev":
            self.submission_question_ids = self._lmms_test_ids(folder)
        keys = ("question_id", "question", "image") + (("answers",) if split == "val" else ())
        samples = []
        for row, where in table_rows(files, f"lmms-lab VQAv2 {split}", keys):
            answers = answer_strings(row["answers"], where) if split == "val" else None
            samples.append(self._sample(row["question_id"], row["question"], image_cell(row, where), answers,
                                        row.get("answer_type"), where))
        return samples

    def _load_val_official(self, folder: Path) -> list[Sample]:
        ann_path, q_path = folder / self.VAL_ANNOTATIONS, folder / self.VAL_QUESTIONS
        ann = json_entries(ann_path, "VQAv2 val annotations", key="annotations")
        qs = json_entries(q_path, "VQAv2 val questions", key="questions")
        image_dir = require_dir(folder / "val2014", "VQAv2 val images (val2014/COCO_val2014_<id>.jpg)")
        questions: dict[int, dict[str, Any]] = {}
        for q, where in qs:
            require_keys(q, ("question_id", "question", "image_id"), where)
            questions[int(q["question_id"])] = q
        annotations: dict[int, dict[str, Any]] = {}
        for a, where in ann:
            require_keys(a, ("question_id", "answers"), where)
            annotations[int(a["question_id"])] = a
        subset_path = folder / self.VAL_SUBSET
        if subset_path.is_file():
            order = []
            for row, _ in jsonl_rows(subset_path, "VQAv2 val subset", ("question_id",)):
                order.append(int(row["question_id"]))
        else:
            order = list(annotations)
        samples = []
        for qid in order:
            if qid not in annotations:
                raise DataError(f"{ann_path}: no annotation for question {qid}")
            if qid not in questions:
                raise DataError(f"{q_path}: no question {qid}")
            q, a = questions[qid], annotations[qid]
            image = image_dir / f"COCO_val2014_{int(q['image_id']):012d}.jpg"
            samples.append(self._sample(qid, q["question"], str(image),
                                        answer_strings(a["answers"], f"{ann_path}, question {qid}"),
                                        a.get("answer_type"), str(ann_path)))
        return samples

    def _load_testdev_llava(self, folder: Path) -> list[Sample]:
        image_dir = require_dir(folder / "test2015", "VQAv2 test images (test2015/)")
        samples = []
        llava_path = folder / self.TESTDEV_LLAVA
        if llava_path.is_file():
            keys = ("question_id", "image", "text")
            for row, where in jsonl_rows(llava_path, "LLaVA VQAv2 test-dev questions", keys):
                question = strip_instruction(str(row["text"]), SHORT_ANSWER)
                samples.append(self._sample(row["question_id"], question, str(image_dir / str(row["image"])),
                                            None, None, where))
        else:
            q_path = folder / self.TESTDEV_QUESTIONS
            for q, where in json_entries(q_path, "VQAv2 test-dev questions", key="questions"):
                require_keys(q, ("question_id", "question", "image_id"), where)
                image = image_dir / f"COCO_test2015_{int(q['image_id']):012d}.jpg"
                samples.append(self._sample(q["question_id"], q["question"], str(image), None, None, where))
        self.submission_question_ids = self._test2015_ids(folder)
        return samples

    def _test2015_ids(self, folder: Path) -> list[int] | None:
        """Every test2015 question id, from LLaVA's or the official file; None when neither exists."""
        if (folder / self.TEST_LLAVA).is_file():
            path = folder / self.TEST_LLAVA
            rows = read_jsonl(path, "LLaVA VQAv2 test2015 questions")
        elif (folder / self.TEST_QUESTIONS).is_file():
            path = folder / self.TEST_QUESTIONS
            rows = [q for q, _ in json_entries(path, "VQAv2 test2015 questions", key="questions")]
        else:
            return None
        ids = []
        for n, row in enumerate(rows):
            require_keys(row, ("question_id",), f"{path}, question {n}")
            ids.append(int(row["question_id"]))
        return ids

    def _lmms_test_ids(self, folder: Path) -> list[int] | None:
        """Every test2015 question id from an lmms-lab ``test`` split next to ``testdev``, reading
        only the ``question_id`` column (the split holds ~70 GB of images); None when absent."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        files = find_hf_split(folder, "test", self._LMMS_SUBDIRS)
        ids: list[int] = []
        for path in files:
            parts = sorted(path.glob("*.arrow")) if path.is_dir() else [path]
            for part in parts:
                try:
                    if part.suffix == ".parquet":
                        column = pq.read_table(part, columns=["question_id"]).column("question_id")
                    else:  # save_to_disk stream file, memory-mapped: only the id column is touched
                        with pa.memory_map(str(part)) as source:
                            column = pa.ipc.open_stream(source).read_all().column("question_id")
                except Exception as e:  # pyarrow raises several types for corrupt files / missing columns
                    raise DataError(f"{part}: cannot read the question_id column (lmms-lab VQAv2 test): {e}") from None
                ids.extend(int(v) for v in column.to_pylist())
        return ids or None

    def _sample(self, qid: Any, question: Any, image: Any, answers: list[str] | None, answer_type: Any,
                where: str) -> Sample:
        try:
            qid = int(qid)
        except (TypeError, ValueError):
            raise DataError(f"{where}: question_id {qid!r} is not an integer") from None
        return Sample(
            id=str(qid),
            prompt=self.build_prompt(str(question)),
            image=image,
            target=answers,
            meta={"question_id": qid, "answer_type": str(answer_type) if answer_type else None},
        )

    def score(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        """val: ``accuracy`` (%), ``answer_type/<type>`` (%), ``count``; test-dev: ``{}``.

        ``--protocol llava``: the official ``vqaEval.py`` scoring
        (:func:`~globalcom2.eval.vqa_metric.official_vqa_accuracy`: the human answers are left as
        they are when all agree); ``lmms-eval``: both sides fully normalised
        (:func:`~globalcom2.eval.vqa_metric.vqa_accuracy`)."""
        accuracy = official_vqa_accuracy if self.protocol == "llava" else vqa_accuracy
        return vqa_scores(records, group_key="answer_type", accuracy=accuracy)

    def write_submission(self, records: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
        """test-dev records (no target): the EvalAI file ``[{"question_id": int, "answer": str}]``,
        answers normalised, in the order of :attr:`submission_question_ids` with ``""`` for the
        questions not answered. When this instance knows no ids (re-scoring with a fresh
        instance) the question list of an existing submission at ``path`` is kept, so a padded
        file stays padded. val records: nothing (None)."""
        if not records or all(rec.get("target") is not None for rec in records):
            return None
        answers: dict[int, str] = {}
        for rec in records:
            qid = int((rec.get("meta") or {}).get("question_id", rec["id"]))
            answers[qid] = normalize_answer(str(rec.get("prediction") or ""))
        path = Path(path)
        ids = list(self.submission_question_ids or _submission_ids(path))
        known = set(ids)
        ids += [qid for qid in answers if qid not in known]
        out = [{"question_id": qid, "answer": answers.get(qid, "")} for qid in ids]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out), encoding="utf-8")
        return path


def _submission_ids(path: Path) -> list[int]:
    """The question ids of a VQAv2 submission file already at ``path`` ([] when absent or unreadable)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return [int(row["question_id"]) for row in data]
    except (OSError, ValueError, TypeError, KeyError):
        return []
