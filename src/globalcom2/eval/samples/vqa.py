"""Tiny on-disk copies of TextVQA, VizWiz, VQAv2, GQA and MM-Vet, in LLaVA's and lmms-lab's layouts.

Each ``make_<bench>(root, layout)`` writes under ``root/<the benchmark's first data_dir>``
(``textvqa``, ``vizwiz``, ``vqav2``, ``gqa``, ``mm-vet``) so that ``get_benchmark(name).load(root)``
finds it. ``layout`` is ``"llava"`` (the files LLaVA's docs/Evaluation.md uses, or the official
annotation files where LLaVA has none) or ``"lmms"`` (lmms-lab hub parquet; ``arrow=True`` writes a
``datasets.save_to_disk``-style folder of Arrow stream files instead). Both layouts of one benchmark
hold the same questions (the module constants below), so tests can compare them.
Used by the tests and by ``globalcom2 eval --write-sample-data`` (:mod:`globalcom2.eval.samples`);
the questions, answers and images are synthetic.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from PIL import Image

_COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]


def image_bytes(n: int, fmt: str = "JPEG", size: tuple[int, int] = (12, 8)) -> bytes:
    """A small solid-colour image (colour picked by ``n``), encoded as ``fmt``."""
    buf = io.BytesIO()
    Image.new("RGB", size, _COLORS[n % len(_COLORS)]).save(buf, format=fmt)
    return buf.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_hf_split(folder: Path, split: str, rows: list[dict[str, Any]], arrow: bool = False) -> Path:
    """Rows as the hub stores a split (``folder/<split>-00000-of-00001.parquet``) or, with
    ``arrow``, as ``save_to_disk`` does (``folder/<split>/data-00000-of-00001.arrow`` + state.json)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    if not arrow:
        path = folder / f"{split}-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        return path
    split_dir = folder / split
    split_dir.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(split_dir / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (split_dir / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    return split_dir


def _image_cell(n: int, name: str, fmt: str = "JPEG") -> dict[str, Any]:
    """An image as ``datasets`` stores it in parquet."""
    return {"bytes": image_bytes(n, fmt), "path": name}


def _check(layout: str) -> None:
    if layout not in ("llava", "lmms"):
        raise ValueError(f"layout must be 'llava' or 'lmms', got {layout!r}")


# --------------------------------------------------------------------------------------------
# TextVQA
# --------------------------------------------------------------------------------------------

#: TextVQA val questions (as in TextVQA_0.5.1_val.json), in order. Answers are 10 each.
TEXTVQA_QUESTIONS: list[dict[str, Any]] = [
    {"question_id": 101, "image_id": "a1b2c3", "question": "what brand is the Camera?",
     "answers": ["Nikon"] * 4 + ["nikon"] * 3 + ["canon"] * 3},
    {"question_id": 102, "image_id": "d4e5f6", "question": "what number is on the shirt?",
     "answers": ["two"] * 2 + ["2"] + ["22"] * 7},
    {"question_id": 103, "image_id": "a1b2c3", "question": "what does the sign say?",
     "answers": ["stop"] * 10},
]


def make_textvqa(root: Path, layout: str = "llava", arrow: bool = False) -> None:
    """``root/textvqa``: LLaVA (TextVQA_0.5.1_val.json, train_images/<image_id>.jpg, and LLaVA's
    llava_textvqa_val_v051_ocr.jsonl, unused) or lmms-lab (data/validation-00000-of-00001.parquet)."""
    _check(layout)
    folder = Path(root) / "textvqa"
    folder.mkdir(parents=True, exist_ok=True)
    image_ids = sorted({q["image_id"] for q in TEXTVQA_QUESTIONS})
    if layout == "llava":
        data = [{**q, "set_name": "val", "image_classes": [], "question_tokens": q["question"].split()}
                for q in TEXTVQA_QUESTIONS]
        _write_json(folder / "TextVQA_0.5.1_val.json", {"dataset_type": "val", "dataset_version": "0.5.1",
                                                         "data": data})
        for n, image_id in enumerate(image_ids):
            _write_bytes(folder / "train_images" / f"{image_id}.jpg", image_bytes(n))
        _write_jsonl(folder / "llava_textvqa_val_v051_ocr.jsonl", [
            {"question_id": q["image_id"], "image": f"{q['image_id']}.jpg",
             "text": f"{q['question']}\nReference OCR token: x\nAnswer the question using a single word or phrase."}
            for q in TEXTVQA_QUESTIONS])
    else:
        rows = [{"image_id": q["image_id"], "question_id": q["question_id"], "question": q["question"],
                 "image": _image_cell(image_ids.index(q["image_id"]), f"{q['image_id']}.jpg"),
                 "answers": q["answers"], "set_name": "val", "ocr_tokens": ["x"]}
                for q in TEXTVQA_QUESTIONS]
        write_hf_split(folder / "data", "validation", rows, arrow)


# --------------------------------------------------------------------------------------------
# VizWiz
# --------------------------------------------------------------------------------------------

#: VizWiz val questions (as in val.json), in order.
VIZWIZ_QUESTIONS: list[dict[str, Any]] = [
    {"image": "VizWiz_val_00000000.jpg", "question": "what color is this shirt?", "answer_type": "other",
     "answers": ["blue"] * 6 + ["navy blue"] * 2 + ["unanswerable"] * 2},
    {"image": "VizWiz_val_00000001.jpg", "question": "What is this?", "answer_type": "unanswerable",
     "answers": ["unanswerable"] * 8 + ["unsuitable"] * 2},
    {"image": "VizWiz_val_00000002.jpg", "question": "is it on?", "answer_type": "yes/no",
     "answers": ["yes"] * 2 + ["no"] * 8},
]


def make_vizwiz(root: Path, layout: str = "llava", arrow: bool = False) -> None:
    """``root/vizwiz``: official (val.json, val/<image>) or lmms-lab (data/val-00000-of-00001.parquet)."""
    _check(layout)
    folder = Path(root) / "vizwiz"
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "llava":
        data = [{"image": q["image"], "question": q["question"], "answer_type": q["answer_type"],
                 "answerable": int(q["answer_type"] != "unanswerable"),
                 "answers": [{"answer": a, "answer_confidence": "yes"} for a in q["answers"]]}
                for q in VIZWIZ_QUESTIONS]
        _write_json(folder / "val.json", data)
        for n, q in enumerate(VIZWIZ_QUESTIONS):
            _write_bytes(folder / "val" / q["image"], image_bytes(n))
    else:
        rows = [{"question_id": q["image"][: -len(".jpg")], "image": _image_cell(n, q["image"]),
                 "question": q["question"], "answers": q["answers"], "category": q["answer_type"]}
                for n, q in enumerate(VIZWIZ_QUESTIONS)]
        write_hf_split(folder / "data", "val", rows, arrow)


# --------------------------------------------------------------------------------------------
# VQAv2
# --------------------------------------------------------------------------------------------

#: VQAv2 val questions (official questions + annotations merged), in order.
VQAV2_VAL: list[dict[str, Any]] = [
    {"question_id": 262148000, "image_id": 262148, "question": "Where is he looking?", "answer_type": "other",
     "answers": ["down"] * 7 + ["at table"] * 3},
    {"question_id": 262148001, "image_id": 262148, "question": "How many dogs are there?", "answer_type": "number",
     "answers": ["2"] * 3 + ["3"] * 7},
    {"question_id": 393225000, "image_id": 393225, "question": "Is the bowl full?", "answer_type": "yes/no",
     "answers": ["yes"] * 10},
]
#: VQAv2 test-dev questions, in order (no answers).
VQAV2_TESTDEV: list[dict[str, Any]] = [
    {"question_id": 1000, "image_id": 1, "question": "What is the man holding?"},
    {"question_id": 1001, "image_id": 2, "question": "Is it raining?"},
]
#: All test2015 question ids (LLaVA pads the submission to these).
VQAV2_TEST2015_IDS = [999, 1000, 1001, 1002]


def _vqa_answers(answers: list[str]) -> list[dict[str, Any]]:
    """Answers as the VQA annotation files (and lmms-lab VQAv2) store them."""
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]


def make_vqav2(root: Path, layout: str = "llava", arrow: bool = False, val_subset: list[int] | None = None) -> None:
    """``root/vqav2``, both splits. LLaVA/official: v2_mscoco_val2014_annotations.json,
    v2_OpenEnded_mscoco_val2014_questions.json, val2014/COCO_val2014_<id:012d>.jpg (+ with
    ``val_subset`` the subset file llava_vqav2_mscoco_val2014.jsonl); LLaVA's
    llava_vqav2_mscoco_test-dev2015.jsonl, llava_vqav2_mscoco_test2015.jsonl and test2015/.
    lmms-lab: data/validation-*.parquet, data/testdev-*.parquet and data/test-*.parquet."""
    _check(layout)
    folder = Path(root) / "vqav2"
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "llava":
        _write_json(folder / "v2_OpenEnded_mscoco_val2014_questions.json", {"questions": [
            {"question_id": q["question_id"], "image_id": q["image_id"], "question": q["question"]}
            for q in VQAV2_VAL]})
        _write_json(folder / "v2_mscoco_val2014_annotations.json", {"annotations": [
            {"question_id": q["question_id"], "image_id": q["image_id"], "answer_type": q["answer_type"],
             "question_type": "what", "multiple_choice_answer": q["answers"][0],
             "answers": _vqa_answers(q["answers"])}
            for q in VQAV2_VAL]})
        for n, image_id in enumerate(sorted({q["image_id"] for q in VQAV2_VAL})):
            _write_bytes(folder / "val2014" / f"COCO_val2014_{image_id:012d}.jpg", image_bytes(n))
        if val_subset is not None:
            _write_jsonl(folder / "llava_vqav2_mscoco_val2014.jsonl", [{"question_id": qid} for qid in val_subset])
        llava_rows = [{"question_id": q["question_id"], "image": f"COCO_test2015_{q['image_id']:012d}.jpg",
                       "text": f"{q['question']}\nAnswer the question using a single word or phrase.",
                       "category": "default"} for q in VQAV2_TESTDEV]
        _write_jsonl(folder / "llava_vqav2_mscoco_test-dev2015.jsonl", llava_rows)
        _write_jsonl(folder / "llava_vqav2_mscoco_test2015.jsonl", [{"question_id": i} for i in VQAV2_TEST2015_IDS])
        for n, q in enumerate(VQAV2_TESTDEV):
            _write_bytes(folder / "test2015" / f"COCO_test2015_{q['image_id']:012d}.jpg", image_bytes(n))
    else:
        val = [{"question_type": "what", "multiple_choice_answer": q["answers"][0],
                "answers": _vqa_answers(q["answers"]),
                "image_id": q["image_id"], "answer_type": q["answer_type"], "question_id": q["question_id"],
                "question": q["question"], "image": _image_cell(n, f"{q['image_id']}.jpg")}
               for n, q in enumerate(VQAV2_VAL)]
        write_hf_split(folder / "data", "validation", val, arrow)
        testdev = [{"question_type": None, "multiple_choice_answer": None, "answers": None,
                    "image_id": q["image_id"], "answer_type": None, "question_id": q["question_id"],
                    "question": q["question"], "image": _image_cell(n, f"{q['image_id']}.jpg")}
                   for n, q in enumerate(VQAV2_TESTDEV)]
        write_hf_split(folder / "data", "testdev", testdev, arrow)
        test = [{"question_id": qid, "image_id": qid, "question": "q?", "image": _image_cell(n, f"{qid}.jpg")}
                for n, qid in enumerate(VQAV2_TEST2015_IDS)]
        write_hf_split(folder / "data", "test", test, arrow)


# --------------------------------------------------------------------------------------------
# GQA
# --------------------------------------------------------------------------------------------

#: GQA testdev-balanced questions (as in testdev_balanced_questions.json), in LLaVA's order.
GQA_QUESTIONS: list[dict[str, Any]] = [
    {"id": "201307251", "imageId": "n10936", "question": "Is the cup to the left of the plate?", "answer": "yes",
     "types": {"structural": "verify", "semantic": "rel", "detailed": "relVerify"}},
    {"id": "201640614", "imageId": "n10936", "question": "What is on the table?", "answer": "laptop",
     "types": {"structural": "query", "semantic": "rel", "detailed": "relS"}},
    {"id": "20968379", "imageId": "n288870", "question": "Are there both cars and trucks?", "answer": "no",
     "types": {"structural": "logical", "semantic": "obj", "detailed": "existAnd"}},
]
#: An unbalanced question of the official file (not part of testdev-balanced scoring).
GQA_UNBALANCED = {"id": "555", "imageId": "n288870", "question": "Unbalanced?", "answer": "no",
                  "types": {"structural": "verify", "semantic": "obj", "detailed": "exist"}, "isBalanced": False}


def make_gqa(root: Path, layout: str = "llava", arrow: bool = False, llava_jsonl: bool = True) -> None:
    """``root/gqa``: LLaVA (llava_gqa_testdev_balanced.jsonl unless ``llava_jsonl`` is False,
    data/testdev_balanced_questions.json with one extra unbalanced question, data/images/<imageId>.jpg)
    or lmms-lab (testdev_balanced_instructions/ and testdev_balanced_images/ testdev-*.parquet)."""
    _check(layout)
    folder = Path(root) / "gqa"
    folder.mkdir(parents=True, exist_ok=True)
    image_ids = sorted({q["imageId"] for q in GQA_QUESTIONS})
    if layout == "llava":
        questions = {q["id"]: {k: v for k, v in q.items() if k != "id"} | {"isBalanced": True, "fullAnswer": "."}
                     for q in GQA_QUESTIONS}
        questions[GQA_UNBALANCED["id"]] = {k: v for k, v in GQA_UNBALANCED.items() if k != "id"}
        _write_json(folder / "data" / "testdev_balanced_questions.json", questions)
        for n, image_id in enumerate(image_ids):
            _write_bytes(folder / "data" / "images" / f"{image_id}.jpg", image_bytes(n))
        if llava_jsonl:
            _write_jsonl(folder / "llava_gqa_testdev_balanced.jsonl", [
                {"question_id": q["id"], "image": f"{q['imageId']}.jpg",
                 "text": f"{q['question']}\nAnswer the question using a single word or phrase.", "category": "default"}
                for q in GQA_QUESTIONS])
    else:
        instr = [{"id": q["id"], "imageId": q["imageId"], "question": q["question"], "answer": q["answer"],
                  "fullAnswer": ".", "isBalanced": True, "types": q["types"]} for q in GQA_QUESTIONS]
        write_hf_split(folder / "testdev_balanced_instructions", "testdev", instr, arrow)
        images = [{"id": image_id, "image": _image_cell(n, f"{image_id}.jpg")} for n, image_id in enumerate(image_ids)]
        write_hf_split(folder / "testdev_balanced_images", "testdev", images, arrow)


# --------------------------------------------------------------------------------------------
# MM-Vet
# --------------------------------------------------------------------------------------------

#: MM-Vet questions (as in mm-vet.json), in order.
MMVET_QUESTIONS: dict[str, dict[str, Any]] = {
    "v1_0": {"imagename": "v1_0.png", "question": "What is x in the equation?", "answer": "-1<AND>-5",
             "capability": ["ocr", "math"]},
    "v1_1": {"imagename": "v1_1.png", "question": "What is the animal?", "answer": "cat<OR>kitten",
             "capability": ["rec"]},
    "v1_2": {"imagename": "v1_2.png", "question": "Can you explain this meme?", "answer": "It is funny.",
             "capability": ["rec", "know", "gen"]},
}


def make_mmvet(root: Path, layout: str = "llava", arrow: bool = False) -> None:
    """``root/mm-vet``: LLaVA (mm-vet.zip extracted: mm-vet.json, images/; plus LLaVA's
    llava-mm-vet.jsonl) or lmms-lab (data/test-00000-of-00001.parquet, capability as "ocr,math")."""
    _check(layout)
    folder = Path(root) / "mm-vet"
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "llava":
        _write_json(folder / "mm-vet.json", MMVET_QUESTIONS)
        for n, q in enumerate(MMVET_QUESTIONS.values()):
            _write_bytes(folder / "images" / q["imagename"], image_bytes(n, "PNG"))
        _write_jsonl(folder / "llava-mm-vet.jsonl", [
            {"question_id": n, "image": q["imagename"], "text": q["question"]}
            for n, q in enumerate(MMVET_QUESTIONS.values())])
    else:
        rows = [{"question_id": key, "image": _image_cell(n, q["imagename"], "PNG"), "question": q["question"],
                 "answer": q["answer"], "image_source": "x", "capability": ",".join(q["capability"])}
                for n, (key, q) in enumerate(MMVET_QUESTIONS.items())]
        write_hf_split(folder / "data", "test", rows, arrow)
