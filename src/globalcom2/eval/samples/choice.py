"""Tiny on-disk copies of ScienceQA-IMG, MMBench, POPE and MME, in LLaVA's and lmms-lab's layouts.

Each ``make_<bench>(root, layout)`` writes under ``root/<the benchmark's first data_dir>``
(``scienceqa``, ``mmbench``, ``pope``, ``MME``) so that ``get_benchmark(name).load(root)`` finds it.
``layout`` is ``"llava"`` (LLaVA's docs/Evaluation.md files) or ``"lmms"`` (lmms-lab hub parquet).
Both layouts of one benchmark hold the same questions, so tests can compare them.
Used by the tests and by ``globalcom2 eval --write-sample-data`` (:mod:`globalcom2.eval.samples`);
the questions, answers and images are synthetic.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

from PIL import Image

_COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]


def image_bytes(n: int, fmt: str = "PNG", size: tuple[int, int] = (12, 8)) -> bytes:
    """A small solid-colour image (colour picked by ``n``), encoded as ``fmt``."""
    buf = io.BytesIO()
    Image.new("RGB", size, _COLORS[n % len(_COLORS)]).save(buf, format=fmt)
    return buf.getvalue()


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _check(layout: str) -> None:
    if layout not in ("llava", "lmms"):
        raise ValueError(f"layout must be 'llava' or 'lmms', got {layout!r}")


# --------------------------------------------------------------------------------------------
# ScienceQA
# --------------------------------------------------------------------------------------------

#: pid -> problem, as in ScienceQA's problems.json. "3" has no image (dropped), "4" is train.
SQA_PROBLEMS: dict[str, dict[str, Any]] = {
    "1": {"question": "Which color is the square?", "choices": ["red", "green", "blue"], "answer": 0,
          "hint": "", "image": "image.png", "subject": "natural science", "grade": "grade3", "split": "test"},
    "2": {"question": "Which state is farthest north?", "choices": ["Ohio", "Maine"], "answer": 1,
          "hint": "Look at the map.", "image": "image.png", "subject": "social science", "grade": "grade8",
          "split": "test"},
    "3": {"question": "Which word is a noun?", "choices": ["run", "dog"], "answer": 1, "hint": "",
          "image": None, "subject": "language science", "grade": "grade2", "split": "test"},
    "4": {"question": "Train question?", "choices": ["a", "b"], "answer": 0, "hint": "", "image": "image.png",
          "subject": "natural science", "grade": "grade1", "split": "train"},
    "5": {"question": "Which word fits the picture?", "choices": ["cat", "hat", "bat", "mat"], "answer": 3,
          "hint": "", "image": "image.png", "subject": "language science", "grade": "grade10", "split": "test"},
}
#: The ScienceQA-IMG test problems, in order.
SQA_TEST_IMG = ["1", "2", "5"]


def make_scienceqa(root: Path, layout: str = "llava") -> None:
    """``root/scienceqa``: LLaVA (problems.json, pid_splits.json, images/test/<pid>/image.png,
    llava_test_CQM-A.json) or lmms-lab (ScienceQA-IMG/test-00000-of-00001.parquet)."""
    _check(layout)
    folder = Path(root) / "scienceqa"
    folder.mkdir(parents=True, exist_ok=True)
    test = [p for p, v in SQA_PROBLEMS.items() if v["split"] == "test"]
    if layout == "llava":
        (folder / "problems.json").write_text(json.dumps(SQA_PROBLEMS), encoding="utf-8")
        (folder / "pid_splits.json").write_text(json.dumps({"test": test, "train": ["4"]}), encoding="utf-8")
        entries = []
        for pid in test:
            prob = SQA_PROBLEMS[pid]
            options = "\n".join(f"{'ABCDE'[i]}. {c}" for i, c in enumerate(prob["choices"]))
            context = f"Context: {prob['hint']}\n" if prob["hint"] else ""
            entry: dict[str, Any] = {"id": pid, "conversations": [
                {"from": "human", "value": f"{context}{prob['question']}\n{options}"},
                {"from": "gpt", "value": "ABCDE"[prob["answer"]]}]}
            if prob["image"]:
                entry["image"] = f"{pid}/{prob['image']}"
                entry["conversations"][0]["value"] = "<image>\n" + entry["conversations"][0]["value"]
                img = folder / "images" / "test" / pid / prob["image"]
                img.parent.mkdir(parents=True, exist_ok=True)
                img.write_bytes(image_bytes(int(pid)))
            entries.append(entry)
        (folder / "llava_test_CQM-A.json").write_text(json.dumps(entries), encoding="utf-8")
    else:
        rows = []
        for pid in SQA_TEST_IMG:
            prob = SQA_PROBLEMS[pid]
            rows.append({"image": {"bytes": image_bytes(int(pid)), "path": None}, "question": prob["question"],
                         "choices": prob["choices"], "answer": prob["answer"], "hint": prob["hint"],
                         "task": "closed choice", "grade": prob["grade"], "subject": prob["subject"],
                         "topic": "t", "category": "c", "skill": "s", "lecture": "", "solution": ""})
        _write_parquet(folder / "ScienceQA-IMG" / "test-00000-of-00001.parquet", rows)


# --------------------------------------------------------------------------------------------
# MMBench
# --------------------------------------------------------------------------------------------

#: (index, question, hint, options, answer letter, category, l2-category)
MMBENCH_QUESTIONS = [
    (0, "What is shown?", "A hint.", ["cat", "dog", "bird", "fish"], "C", "object_localization", "FP-S"),
    (1, "Is it day?", None, ["yes", "no"], "A", "image_scene", "CP"),
    (2, "Which colour?", None, ["red", "green", "blue"], "B", "image_scene", "CP"),
]


def _mmbench_row(index: int, question: str, hint: str | None, options: list[str], answer: str,
                 category: str, l2: str, image: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"index": index, "question": question, "hint": hint if hint else "nan"}
    for letter in "ABCD":
        row[letter] = options["ABCD".index(letter)] if "ABCD".index(letter) < len(options) else "nan"
    row.update({"answer": answer, "category": category, "image": image, "source": "fixture",
                "l2-category": l2, "comment": "nan", "split": "dev"})
    return row


def make_mmbench(root: Path, layout: str = "llava") -> None:
    """``root/mmbench``: LLaVA TSVs (mmbench_dev_20230712.tsv, mmbench_dev_cn_20231003.tsv; one row
    per question) or lmms-lab parquet (en/dev-..., cn/dev-...; with MMBench's circular copies at
    index + r*1e6, options rotated as LLaVA's --all-rounds)."""
    _check(layout)
    folder = Path(root) / "mmbench"
    folder.mkdir(parents=True, exist_ok=True)
    for lang, tsv in (("en", "mmbench_dev_20230712.tsv"), ("cn", "mmbench_dev_cn_20231003.tsv")):
        rows = []
        for index, question, hint, options, answer, cat, l2 in MMBENCH_QUESTIONS:
            q = question if lang == "en" else f"{question}（中文）"
            raw = image_bytes(index)
            if layout == "llava":
                rows.append(_mmbench_row(index, q, hint, options, answer, cat, l2,
                                         base64.b64encode(raw).decode()))
                continue
            for rot in range(len(options)):
                rotated = options[rot:] + options[:rot]
                new_answer = "ABCD"[("ABCD".index(answer) - rot) % len(options)]
                rows.append(_mmbench_row(index + rot * 1_000_000, q, hint, rotated, new_answer, cat, l2,
                                         {"bytes": raw, "path": None}))
        if layout == "llava":
            header = list(rows[0])
            lines = ["\t".join(header)] + ["\t".join(str(r[h]) for h in header) for r in rows]
            (folder / tsv).write_text("\n".join(lines) + "\n", encoding="utf-8")
        else:
            for r in rows:  # lmms-lab spells it L2-category; hint is null rather than "nan"
                r["L2-category"] = r.pop("l2-category")
                r["hint"] = None if r["hint"] == "nan" else r["hint"]
                for letter in "ABCD":
                    r[letter] = None if r[letter] == "nan" else r[letter]
            _write_parquet(folder / lang / "dev-00000-of-00001.parquet", rows)


# --------------------------------------------------------------------------------------------
# POPE
# --------------------------------------------------------------------------------------------

POPE_IMAGES = ["COCO_val2014_000000000001.jpg", "COCO_val2014_000000000002.jpg"]
#: subset -> [(image index, object, label)], 4 questions each
POPE_QUESTIONS = {
    "random": [(0, "dog", "yes"), (0, "car", "no"), (1, "cat", "yes"), (1, "boat", "no")],
    "popular": [(0, "dog", "yes"), (0, "person", "no"), (1, "cat", "yes"), (1, "chair", "no")],
    "adversarial": [(0, "dog", "yes"), (0, "frisbee", "no"), (1, "cat", "yes"), (1, "mouse", "no")],
}
_POPE_INSTR = "Answer the question using a single word or phrase."


def make_pope(root: Path, layout: str = "llava") -> None:
    """``root/pope``: LLaVA (llava_pope_test.jsonl, coco/coco_pope_<subset>.json, val2014/*.jpg) or
    lmms-lab (data/test-00000-of-00001.parquet with a category column)."""
    _check(layout)
    folder = Path(root) / "pope"
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "llava":
        for n, name in enumerate(POPE_IMAGES):
            (folder / "val2014").mkdir(exist_ok=True)
            (folder / "val2014" / name).write_bytes(image_bytes(n, "JPEG"))
        llava, qid = [], 0
        for subset, qs in POPE_QUESTIONS.items():
            ann = []
            for k, (img, obj, label) in enumerate(qs, 1):
                text = f"Is there a {obj} in the image?"
                ann.append({"question_id": k, "image": POPE_IMAGES[img], "text": text, "label": label})
                qid += 1
                llava.append({"question_id": qid, "image": POPE_IMAGES[img], "text": f"{text}\n{_POPE_INSTR}",
                              "category": subset})
            _write_jsonl(folder / "coco" / f"coco_pope_{subset}.json", ann)
        _write_jsonl(folder / "llava_pope_test.jsonl", llava)
    else:
        rows = []
        for subset, qs in POPE_QUESTIONS.items():
            for k, (img, obj, label) in enumerate(qs, 1):
                rows.append({"id": str(len(rows)), "question_id": str(k), "question": f"Is there a {obj} in the image?",
                             "answer": label, "image_source": POPE_IMAGES[img][:-4],
                             "image": {"bytes": image_bytes(img, "JPEG"), "path": None}, "category": subset})
        _write_parquet(folder / "data" / "test-00000-of-00001.parquet", rows)


# --------------------------------------------------------------------------------------------
# MME
# --------------------------------------------------------------------------------------------

#: subtask -> [(image file, [(question, answer), (question, answer)])]. artwork uses the
#: images/ + questions_answers_YN/ structure, the others the flat one (as the official release).
MME_DATA = {
    "existence": [("000000006040.jpg", [("Is there a train in this image? Please answer yes or no.", "Yes"),
                                        ("Is there a bed in this image? Please answer yes or no.", "No")])],
    "artwork": [("10002.jpg", [("Is this artwork created by donatello? Please answer yes or no.", "Yes"),
                               ("Is this artwork created by van gogh?  Please answer yes or no.", "No")]),
                ("10049.jpg", [("Is this artwork titled the tempest? Please answer yes or no.", "No"),
                               ("Is this artwork titled venus? Please answer yes or no.", "Yes")])],
    "code_reasoning": [("0020.png", [("Is a c++ code shown in the picture? Please answer yes or no.", "Yes"),
                                     ("Is a python code shown in the picture? Please answer yes or no.", "No")])],
}
_MME_INSTR = "Answer the question using a single word or phrase."


def make_mme(root: Path, layout: str = "llava") -> None:
    """``root/MME``: LLaVA (llava_mme.jsonl + MME_Benchmark_release_version/) or lmms-lab
    (data/test-00000-of-00001.parquet)."""
    _check(layout)
    folder = Path(root) / "MME"
    folder.mkdir(parents=True, exist_ok=True)
    n_img = 0
    llava, rows = [], []
    for subtask, images in MME_DATA.items():
        for name, qas in images:
            raw = image_bytes(n_img, "PNG" if name.endswith(".png") else "JPEG")
            n_img += 1
            qid = f"{subtask}/{name}"
            if layout == "llava":
                sub = folder / "MME_Benchmark_release_version" / subtask
                img_dir, qa_dir = (sub / "images", sub / "questions_answers_YN") if subtask == "artwork" else (sub, sub)
                img_dir.mkdir(parents=True, exist_ok=True)
                qa_dir.mkdir(parents=True, exist_ok=True)
                (img_dir / name).write_bytes(raw)
                (qa_dir / (Path(name).stem + ".txt")).write_text("".join(f"{q}\t{a}\n" for q, a in qas),
                                                                 encoding="utf-8")
            for q, a in qas:
                llava.append({"question_id": qid, "image": qid,
                              "text": q.replace("  Please answer yes or no.", "").replace(" Please answer yes or no.", "")
                              + "\n" + _MME_INSTR, "category": "default"})
                rows.append({"question_id": qid, "question": q, "answer": a, "category": subtask,
                             "image": {"bytes": raw, "path": None}})
    if layout == "llava":
        _write_jsonl(folder / "llava_mme.jsonl", llava)
    else:
        _write_parquet(folder / "data" / "test-00000-of-00001.parquet", rows)
