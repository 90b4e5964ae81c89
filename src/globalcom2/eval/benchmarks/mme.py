"""MME: 14 yes/no subtasks (10 perception, 4 cognition), two questions per image."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from ..base import Benchmark, DataError, Sample, jsonl_rows, register_benchmark
from ..base import lmms_split_files, table_rows

#: MME's official subtask names (eval_tool/calculation.py ``eval_type_dict``), in its order.
PERCEPTION_SUBTASKS = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                       "landmark", "artwork", "OCR")
COGNITION_SUBTASKS = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")

#: LLaVA's short-answer instruction (docs/Evaluation.md; lmms-eval ``mme`` ``post_prompt``).
MME_INSTRUCTION = "Answer the question using a single word or phrase."

#: The suffix every official MME question ends with; lmms-eval drops it before adding the
#: instruction (``mme_doc_to_text``), and so do we when building prompts ourselves.
MME_YN_SUFFIX = " Please answer yes or no."

_RELEASE_DIR = "MME_Benchmark_release_version"
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".PNG", ".JPG", ".JPEG")


def parse_mme_answer(prediction: str) -> str:
    """``"yes"``, ``"no"`` or ``"other"``, as MME's ``eval_tool/calculation.py`` reads a reply.

    The reply is stripped and lower-cased (LLaVA's ``convert_answer_to_mme.py`` strips it, the
    official script lower-cases it); exactly ``yes``/``no`` is taken as is; otherwise the first
    4 characters decide: containing ``yes`` -> yes, else containing ``no`` -> no (so ``"not "``,
    ``"none"`` read as no), else ``"other"`` (always wrong).
    """
    text = prediction.strip().lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def mme_subtask_scores(items: Sequence[tuple[str, bool]]) -> dict[str, float]:
    """MME's score of one subtask from ``(image key, correct)`` pairs (two per image).

    ``acc`` = correct questions / questions; ``acc_plus`` = images whose questions are all
    correct / images; ``score`` = (acc + acc_plus) x 100 (so at most 200).
    """
    per_image: dict[str, list[bool]] = defaultdict(list)
    for key, ok in items:
        per_image[key].append(ok)
    acc = sum(ok for _, ok in items) / len(items)
    acc_plus = sum(all(v) for v in per_image.values()) / len(per_image)
    return {"acc": 100.0 * acc, "acc_plus": 100.0 * acc_plus, "score": 100.0 * (acc + acc_plus)}


def _norm_question(text: str) -> str:
    """Question text without the instruction / yes-no suffix, whitespace collapsed (GT matching)."""
    text = text.replace(MME_INSTRUCTION, "").replace("Please answer yes or no.", "")
    return re.sub(r"\s+", " ", text).strip()


def _lmms_prompt(question: str) -> str:
    """lmms-eval ``mme_doc_to_text`` (default kwargs): strip, drop the suffix, add the instruction."""
    return question.strip().replace(MME_YN_SUFFIX, "") + "\n" + MME_INSTRUCTION


@register_benchmark
class MME(Benchmark):
    """MME (perception + cognition; 2,374 questions on 1,187 images).

    Accepted layouts under ``<data-root>/MME`` (or ``mme``; the data root itself otherwise):

    * **LLaVA** (docs/Evaluation.md): ``llava_mme.jsonl`` (``question_id`` =
      ``<subtask>/<image file>``, ``image``, ``text``) + the official
      ``MME_Benchmark_release_version/`` for the answers: per subtask either
      ``<subtask>/images/<name>.jpg`` + ``<subtask>/questions_answers_YN/<name>.txt`` (artwork,
      celebrity, landmark, posters, scene) or ``<subtask>/<name>.{png,jpg}`` + ``<name>.txt``
      (the others); each txt has one ``question<TAB>Yes|No`` line per question. The prompt is
      the jsonl ``text`` as is (LLaVA's ``model_vqa_loader.py``); its answer is the txt line of
      the same subtask, image and question (matched as LLaVA's ``convert_answer_to_mme.py`` does,
      ignoring the instruction and the "Please answer yes or no." suffix).
      Without ``llava_mme.jsonl`` the release folder alone is used (prompts built as below).
    * **lmms-lab** (hub ``lmms-lab/MME``): ``data/test-*.parquet`` (or ``test-*.parquet``, or a
      ``datasets.save_to_disk`` folder ``test/*.arrow``) with columns ``question_id`` (the image,
      ``<subtask>/<file>``), ``category``, ``question``, ``answer``, ``image``.

    Prompt when built here: the question without " Please answer yes or no." +
    ``"\\nAnswer the question using a single word or phrase."`` (lmms-eval ``mme``, LLaVA's
    short-answer format). ``max_new_tokens`` 128 under ``--protocol llava`` (``model_vqa_loader.py``'s
    default, used by ``mme.sh``), 16 under ``lmms-eval`` (``mme``). Sample ids
    ``<subtask>/<image file>/<k>``, k = 0, 1 for the image's two questions.

    Metric (MME ``eval_tool/calculation.py``): replies read by :func:`parse_mme_answer`; per
    subtask ``acc`` (per question) and ``acc_plus`` (per image, both questions right), subtask
    score = acc + acc_plus (each in %, so out of 200); ``perception`` (primary) = sum of the 10
    perception subtask scores (existence, count, position, color, posters, celebrity, scene,
    landmark, artwork, OCR; out of 2000), ``cognition`` = sum of commonsense_reasoning,
    numerical_calculation, text_translation, code_reasoning (out of 800), over the subtasks
    present in the records; ``total`` = both.
    """

    name = "mme"
    title = "MME"
    splits = ("test",)
    token_budgets = {"llava": 128, "lmms-eval": 16}  # model_vqa_loader.py default / lmms-eval mme
    primary_metric = "perception"
    data_dirs = ("MME", "mme")

    _LMMS_SUBDIRS = ("data", ".")

    def load(self, root: str | Path, split: str | None = None) -> list[Sample]:
        split = self.check_split(split)
        folder = self.data_dir(root)
        release = self._release_dir(folder)
        llava_file = folder / "llava_mme.jsonl"
        if llava_file.is_file():
            if release is None:
                raise DataError(f"MME: {llava_file} needs the official {_RELEASE_DIR}/ (answers) next to it")
            return self._load_llava(llava_file, release)
        if release is not None:
            return self._load_release(release)
        hint = f"LLaVA's llava_mme.jsonl + {_RELEASE_DIR}/"
        return self._load_lmms(lmms_split_files(folder, split, self._LMMS_SUBDIRS, "MME", hint))

    # -- the official release folder ---------------------------------------------------------

    @staticmethod
    def _release_dir(folder: Path) -> Path | None:
        for cand in (folder / _RELEASE_DIR, folder):
            if cand.is_dir() and (cand / "MME_Benchmark").is_dir():  # some copies nest it once more
                cand = cand / "MME_Benchmark"
            if any((cand / s).is_dir() for s in PERCEPTION_SUBTASKS + COGNITION_SUBTASKS):
                return cand
        return None

    @staticmethod
    def _read_release(release: Path) -> dict[str, list[tuple[str, Path, list[tuple[str, str]]]]]:
        """``{subtask: [(image stem, image path, [(question, "yes"|"no"), ...]), ...]}``."""
        out: dict[str, list[tuple[str, Path, list[tuple[str, str]]]]] = {}
        for subtask in PERCEPTION_SUBTASKS + COGNITION_SUBTASKS:
            sub = release / subtask
            if not sub.is_dir():
                continue
            if (sub / "images").is_dir():
                image_dir, qa_dir = sub / "images", sub / "questions_answers_YN"
                if not qa_dir.is_dir():
                    raise DataError(f"MME: missing {qa_dir} (question files of {subtask})")
            else:
                image_dir = qa_dir = sub
            images = {p.stem: p for p in image_dir.iterdir() if p.suffix in _IMAGE_EXTS}
            entries = []
            for txt in sorted(qa_dir.glob("*.txt")):
                if txt.stem not in images:
                    raise DataError(f"MME: {txt} has no image {txt.stem}.png/.jpg in {image_dir}")
                qas = []
                for n, line in enumerate(txt.read_text(encoding="utf-8-sig").splitlines(), 1):
                    if not line.strip():
                        continue
                    parts = line.strip().split("\t")
                    if len(parts) != 2 or parts[1].strip().lower() not in ("yes", "no"):
                        raise DataError(f"{txt}, line {n}: expected 'question<TAB>Yes|No', got {line!r}")
                    qas.append((parts[0], parts[1].strip().lower()))
                entries.append((txt.stem, images[txt.stem], qas))
            out[subtask] = entries
        if not out:
            raise DataError(f"MME: no subtask folders under {release}")
        return out

    def _load_release(self, release: Path) -> list[Sample]:
        samples = []
        for subtask, entries in self._read_release(release).items():
            for stem, image, qas in entries:
                qid = f"{subtask}/{image.name}"
                for k, (question, answer) in enumerate(qas):
                    samples.append(self._sample(qid, k, _lmms_prompt(question), str(image), answer, subtask))
        return samples

    def _load_llava(self, path: Path, release: Path) -> list[Sample]:
        truth: dict[tuple[str, str, str], str] = {}
        image_of: dict[tuple[str, str], Path] = {}
        for subtask, entries in self._read_release(release).items():
            for stem, image, qas in entries:
                image_of[(subtask, stem)] = image
                for question, answer in qas:
                    truth[(subtask, stem, _norm_question(question))] = answer
        seen: dict[str, int] = defaultdict(int)
        samples = []
        for q, where in jsonl_rows(path, "LLaVA MME questions", ("question_id", "image", "text")):
            qid = str(q["question_id"])
            subtask, stem = qid.split("/")[0], Path(qid).stem
            key = (subtask, stem, _norm_question(q["text"]))
            if key not in truth:
                raise DataError(f"{where}: no answer in {release}/{subtask} for image {stem!r} and "
                                f"question {key[2]!r}")
            image = release / q["image"]
            if not image.is_file():  # LLaVA's jsonl names <subtask>/<file>; some subtasks keep images/
                image = image_of[(subtask, stem)]
            samples.append(self._sample(qid, seen[qid], q["text"], str(image), truth[key], subtask))
            seen[qid] += 1
        return samples

    # -- lmms-lab layout ---------------------------------------------------------------------

    def _load_lmms(self, files: Sequence[Path]) -> list[Sample]:
        seen: dict[str, int] = defaultdict(int)
        samples = []
        keys = ("question_id", "category", "question", "answer", "image")
        for row, where in table_rows(files, "lmms-lab MME", keys):
            answer = str(row["answer"]).strip().lower().replace(".", "")
            if answer not in ("yes", "no"):
                raise DataError(f"{where}: answer {row['answer']!r} is not Yes/No")
            qid = str(row["question_id"])
            samples.append(self._sample(qid, seen[qid], _lmms_prompt(str(row["question"])), row["image"], answer,
                                        str(row["category"])))
            seen[qid] += 1
        return samples

    @staticmethod
    def _sample(qid: str, k: int, prompt: str, image: Any, answer: str, subtask: str) -> Sample:
        return Sample(id=f"{qid}/{k}", prompt=prompt, image=image, target=answer,
                      meta={"subtask": subtask, "image_key": qid})

    # -- metric ------------------------------------------------------------------------------

    def score(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        """Per-subtask ``<subtask>`` score (+ ``/acc``, ``/acc_plus``), ``perception`` (primary),
        ``cognition`` and ``total``."""
        items: dict[str, list[tuple[str, bool]]] = defaultdict(list)
        for rec in records:
            if rec.get("target") is None:
                continue
            meta = rec.get("meta") or {}
            ok = parse_mme_answer(str(rec.get("prediction") or "")) == str(rec["target"]).lower()
            items[meta.get("subtask", "unknown")].append((str(meta.get("image_key", rec["id"])), ok))
        if not items:
            return {}
        out: dict[str, float] = {}
        for subtask, pairs in items.items():
            scores = mme_subtask_scores(pairs)
            out[subtask] = scores["score"]
            out[f"{subtask}/acc"] = scores["acc"]
            out[f"{subtask}/acc_plus"] = scores["acc_plus"]
        out["perception"] = sum(out[s] for s in PERCEPTION_SUBTASKS if s in items)
        out["cognition"] = sum(out[s] for s in COGNITION_SUBTASKS if s in items)
        out["total"] = out["perception"] + out["cognition"]
        return out
