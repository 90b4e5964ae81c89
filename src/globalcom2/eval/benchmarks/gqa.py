"""GQA testdev-balanced: exact-match accuracy after LLaVA's answer clean-up."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from ..base import Benchmark, DataError, Sample, accuracy_breakdown, find_first, image_cell, json_object, jsonl_rows
from ..base import lmms_split_files, register_benchmark, require_dir, require_keys, table_rows
from .vqa import SHORT_ANSWER


def clean_gqa_prediction(prediction: str) -> str:
    """LLaVA's ``scripts/convert_gqa_for_eval.py`` on the (already stripped) model output:
    trailing periods removed, lower-cased (``"Yes."`` -> ``"yes"``)."""
    return prediction.strip().rstrip(".").lower()


@register_benchmark
class GQA(Benchmark):
    """GQA testdev-balanced (12,578 questions), exact-match accuracy.

    Accepted layouts under ``<data-root>/gqa`` (or ``GQA``; the data root itself when none exists):

    * **LLaVA** (docs/Evaluation.md): the official ``data/testdev_balanced_questions.json`` (or
      ``testdev_balanced_questions.json`` at the top; ``{qid: {"imageId", "question", "answer",
      "types": {"structural", "semantic", ...}, "isBalanced", ...}}``) and the images
      ``data/images/<imageId>.jpg`` (or ``images/``). If LLaVA's ``llava_gqa_testdev_balanced.jsonl``
      is present, its questions (``question_id``) are used, in its order; otherwise every balanced
      question of the official file.
    * **lmms-lab** (hub ``lmms-lab/GQA``): ``testdev_balanced_instructions/testdev-*.parquet``
      (columns ``id``, ``imageId``, ``question``, ``answer``, ``types``) and
      ``testdev_balanced_images/testdev-*.parquet`` (``id``, ``image``), or the same two folders
      as ``datasets.save_to_disk`` output (``<config>/testdev/*.arrow``).

    Prompt (lmms-eval ``gqa`` ``doc_to_text``; LLaVA's ``llava_gqa_testdev_balanced.jsonl``):
    ``question + "\\nAnswer the question using a single word or phrase."``. ``max_new_tokens``
    128 under ``--protocol llava`` (``model_vqa_loader.py``'s default, used by ``gqa.sh``), 16 under
    ``lmms-eval`` (``gqa.yaml``).

    Metric: GQA's ``eval.py`` accuracy (%): a prediction is right when, cleaned as LLaVA does
    (:func:`clean_gqa_prediction`), it equals the answer. Breakdown as ``eval.py`` reports it where
    the question types are known: ``binary`` / ``open`` (structural type ``query`` is open),
    ``structural/<type>``, ``semantic/<type>``.
    """

    name = "gqa"
    title = "GQA"
    splits = ("testdev",)
    token_budgets = {"llava": 128, "lmms-eval": 16}  # model_vqa_loader.py default / lmms-eval gqa
    primary_metric = "accuracy"
    data_dirs = ("gqa", "GQA")

    QUESTIONS = ("data/testdev_balanced_questions.json", "testdev_balanced_questions.json")
    LLAVA_FILE = "llava_gqa_testdev_balanced.jsonl"
    _INSTR_SUBDIRS = ("testdev_balanced_instructions",)
    _IMAGE_SUBDIRS = ("testdev_balanced_images",)

    @staticmethod
    def build_prompt(question: str) -> str:
        return f"{question}\n{SHORT_ANSWER}"

    def load(self, root: str | Path, split: str | None = None) -> list[Sample]:
        self.check_split(split)
        folder = self.data_dir(root)
        if any((folder / q).is_file() for q in self.QUESTIONS):
            return self._load_llava(folder)
        return self._load_lmms(folder)

    def _load_llava(self, folder: Path) -> list[Sample]:
        path = find_first(folder, self.QUESTIONS, "GQA testdev-balanced questions")
        questions = json_object(path, "GQA testdev-balanced questions", "question id")
        image_dir = folder / "data" / "images" if (folder / "data" / "images").is_dir() else folder / "images"
        require_dir(image_dir, f"GQA images ({folder / 'data' / 'images'}/<imageId>.jpg)")
        llava_path = folder / self.LLAVA_FILE
        if llava_path.is_file():
            qids = []
            for row, _ in jsonl_rows(llava_path, "LLaVA GQA questions", ("question_id",)):
                qids.append(str(row["question_id"]))
        else:
            qids = [str(k) for k, q in questions.items() if not isinstance(q, dict) or q.get("isBalanced", True)]
        samples = []
        for qid in qids:
            q = questions.get(qid)
            where = f"{path}, question {qid!r}"
            if q is None:
                raise DataError(f"{path}: no question {qid!r} (listed in {llava_path.name})")
            if not isinstance(q, dict):
                raise DataError(f"{where}: expected an object")
            require_keys(q, ("imageId", "question", "answer"), where)
            samples.append(self._sample(qid, q, str(image_dir / f"{q['imageId']}.jpg")))
        return samples

    def _load_lmms(self, folder: Path) -> list[Sample]:
        hint = f"{self.QUESTIONS[0]} + data/images/"
        instr = lmms_split_files(folder, "testdev", self._INSTR_SUBDIRS, "GQA", hint)
        imgs = lmms_split_files(folder, "testdev", self._IMAGE_SUBDIRS, "GQA", hint)
        images: dict[str, Any] = {}
        for row, where in table_rows(imgs, "lmms-lab GQA testdev_balanced_images", ("id", "image")):
            images[str(row["id"])] = image_cell(row, where)
        samples = []
        keys = ("id", "imageId", "question", "answer")
        for row, where in table_rows(instr, "lmms-lab GQA testdev_balanced_instructions", keys):
            if row.get("isBalanced") is False:
                continue
            image_id = str(row["imageId"])
            if image_id not in images:
                raise DataError(f"{where}: image {image_id!r} not found in {imgs[0].parent}")
            samples.append(self._sample(str(row["id"]), row, images[image_id]))
        return samples

    def _sample(self, qid: str, q: dict[str, Any], image: Any) -> Sample:
        types = q.get("types") if isinstance(q.get("types"), dict) else {}
        return Sample(
            id=qid,
            prompt=self.build_prompt(str(q["question"])),
            image=image,
            target=str(q["answer"]),
            meta={"question_id": qid, "structural": types.get("structural"), "semantic": types.get("semantic")},
        )

    def score(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        """``accuracy`` (%), ``binary`` / ``open`` / ``structural/<t>`` / ``semantic/<t>`` (%) where
        the types are known, ``count``."""
        overall: list[bool] = []
        groups: dict[str, list[bool]] = defaultdict(list)
        for rec in records:
            if rec.get("target") is None:
                continue
            ok = clean_gqa_prediction(str(rec.get("prediction") or "")) == str(rec["target"])
            overall.append(ok)
            meta = rec.get("meta") or {}
            structural, semantic = meta.get("structural"), meta.get("semantic")
            if structural:
                groups["open" if structural == "query" else "binary"].append(ok)
                groups[f"structural/{structural}"].append(ok)
            if semantic:
                groups[f"semantic/{semantic}"].append(ok)
        return accuracy_breakdown(overall, groups)
