"""TextVQA, VizWiz, VQAv2, GQA and MM-Vet: the VQA normaliser and accuracy, the loaders on both
layouts, the scorers on hand-computed examples, the submission files and MM-Vet's judge (against a
local HTTP server with canned grades)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fixtures_eval_vqa import (
    GQA_QUESTIONS,
    MMVET_QUESTIONS,
    TEXTVQA_QUESTIONS,
    VIZWIZ_QUESTIONS,
    VQAV2_TESTDEV,
    VQAV2_TEST2015_IDS,
    VQAV2_VAL,
    make_gqa,
    make_mmvet,
    make_textvqa,
    make_vizwiz,
    make_vqav2,
)

from globalcom2.eval.base import DataError, get_benchmark
from globalcom2.eval.benchmarks.gqa import clean_gqa_prediction
from globalcom2.eval.benchmarks.mmvet import (
    MMVET_GRADER_PROMPT,
    RETRY_SUFFIX,
    JudgeError,
    grade_answer,
    grader_query,
    mmvet_aggregate,
    parse_grade,
    score_with_judge,
)
from globalcom2.eval.vqa_metric import normalize_answer, vqa_accuracy

SHORT = "\nAnswer the question using a single word or phrase."


def records(samples, predictions):
    """Records as the runner stores them (JSON round trip)."""
    return [json.loads(json.dumps(s.record(p))) for s, p in zip(samples, predictions)]


# --------------------------------------------------------------------------------------------
# The VQA normaliser and accuracy
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, expected", [
    ("The Two Dogs.", "2 dogs"),          # lower-case, article dropped, number word, final period
    ("yes", "yes"),
    ("\tYes!\n", "yes"),                   # "!" not touching a space -> space, stripped by the split
    ("an apple", "apple"),
    ("None", "0"),
    ("ten", "10"),
    ("3.5", "3.5"),                        # a period before a digit stays
    ("3.14.", "3.14"),
    ("e.g.", "eg"),
    ("1,000", "1000"),                     # commas deleted in the first step
    ("red-white", "red white"),            # "-" between letters -> space
    ("red - white", "red white"),          # "-" touching a space -> deleted
    ("(cat)", "cat"),
    ("dont", "don't"),                     # contraction restored
    ("Dont", "don't"),
    ("its", "its"),
    ("it's", "it 's"),                     # "'s" split off
    ("a man's hat", "man 's hat"),
    ("hes", "he's"),
    ("somebody'd", "somebodyd"),           # the reference table's reversed entry
    ("what?", "what"),
    ("  several   spaces ", "several spaces"),
    ("x/y", "x y"),
    ("x / y", "x y"),
    ("@home", "home"),
    ("", ""),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalize_answer_period_cap():
    # the reference deletes at most 32 periods (re.UNICODE passed as `count`)
    assert normalize_answer("." * 40) == "." * 8


@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_matches(k, expected):
    # k of the 10 answers match: mean over leave-one-out of min(1, matches/3)
    gts = ["cat"] * k + ["dog"] * (10 - k)
    assert vqa_accuracy("cat", gts) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides():
    assert vqa_accuracy("Two.", ["2", "2", "2", "3", "3", "3", "3", "3", "3", "3"]) == pytest.approx(0.9)
    assert vqa_accuracy("2", ["two", "Two", "TWO"] + ["x"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("The dog", ["dog"] * 10) == pytest.approx(1.0)
    assert vqa_accuracy("dogs", ["dog"] * 10) == 0.0


def test_vqa_accuracy_edge_cases():
    assert vqa_accuracy("yes", []) == 0.0
    # 3 answers, all matching: every leave-one-out subset has 2 matches -> 2/3
    assert vqa_accuracy("yes", ["yes"] * 3) == pytest.approx(2 / 3)


# --------------------------------------------------------------------------------------------
# TextVQA
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout, arrow", [("llava", False), ("lmms", False), ("lmms", True)])
def test_textvqa_load(tmp_path, layout, arrow):
    make_textvqa(tmp_path, layout, arrow=arrow)
    bench = get_benchmark("textvqa", protocol="lmms-eval")  # its prompt: no OCR tokens
    samples = bench.load(tmp_path)
    assert [s.id for s in samples] == [str(q["question_id"]) for q in TEXTVQA_QUESTIONS]
    # lmms-eval: question.capitalize() (rest lower-cased) + instruction
    assert samples[0].prompt == "What brand is the camera?" + SHORT
    assert samples[0].target == TEXTVQA_QUESTIONS[0]["answers"]
    assert samples[0].meta == {"question_id": 101}
    assert samples[1].load_image().size == (12, 8)
    if layout == "llava":
        assert samples[0].image.endswith("train_images/a1b2c3.jpg")


def test_textvqa_score(tmp_path):
    make_textvqa(tmp_path, "llava")
    bench = get_benchmark("textvqa")
    samples = bench.load(tmp_path)
    # q101: "nikon" x7 -> 1.0; q102: "two"/"2" x3 -> 0.9; q103: "go" -> 0
    out = bench.score(records(samples, ["Nikon.", "Two", "go"]))
    assert out["accuracy"] == pytest.approx(100 * (1.0 + 0.9 + 0.0) / 3)
    assert out["count"] == 3
    assert bench.score([]) == {}
    assert bench.write_submission(records(samples, ["a", "b", "c"]), tmp_path / "s.json") is None


def test_textvqa_errors(tmp_path):
    bench = get_benchmark("textvqa")
    with pytest.raises(DataError, match="TextVQA_0.5.1_val.json"):
        bench.load(tmp_path)  # nothing there: the message names what is expected
    with pytest.raises(ValueError, match="unknown split"):
        bench.load(tmp_path, "test")
    make_textvqa(tmp_path, "llava")
    path = tmp_path / "textvqa" / "TextVQA_0.5.1_val.json"
    path.write_text('{"data": [')
    with pytest.raises(DataError, match="not valid JSON"):
        bench.load(tmp_path)
    path.write_text(json.dumps({"data": [{"question_id": 1, "question": "q?"}]}))
    with pytest.raises(DataError, match=r"missing field\(s\) image_id, answers"):
        bench.load(tmp_path)
    path.write_text(json.dumps({"questions": []}))
    with pytest.raises(DataError, match="'data' list"):
        bench.load(tmp_path)


def test_textvqa_missing_images_and_bad_parquet(tmp_path):
    make_textvqa(tmp_path, "llava")
    import shutil

    shutil.rmtree(tmp_path / "textvqa" / "train_images")
    with pytest.raises(DataError, match="train_images"):
        get_benchmark("textvqa").load(tmp_path)
    other = tmp_path / "other"
    make_textvqa(other, "lmms")
    shard = other / "textvqa" / "data" / "validation-00000-of-00001.parquet"
    shard.write_bytes(b"not a parquet file")
    with pytest.raises(DataError, match="validation-00000-of-00001.parquet"):
        get_benchmark("textvqa").load(other)


# --------------------------------------------------------------------------------------------
# VizWiz
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["llava", "lmms"])
def test_vizwiz_load(tmp_path, layout):
    make_vizwiz(tmp_path, layout)
    samples = get_benchmark("vizwiz").load(tmp_path)
    assert [s.id for s in samples] == ["VizWiz_val_00000000", "VizWiz_val_00000001", "VizWiz_val_00000002"]
    assert samples[0].prompt == ("What color is this shirt?\nWhen the provided information is insufficient, "
                                 "respond with 'Unanswerable'.\nAnswer the question using a single word or phrase.")
    assert samples[1].target == VIZWIZ_QUESTIONS[1]["answers"]
    assert [s.meta["answer_type"] for s in samples] == ["other", "unanswerable", "yes/no"]
    assert samples[2].load_image().size == (12, 8)


def test_vizwiz_score(tmp_path):
    make_vizwiz(tmp_path, "lmms")
    bench = get_benchmark("vizwiz")
    samples = bench.load(tmp_path)
    # "Blue" 6 matches -> 1.0; "Unanswerable" 8 -> 1.0; "yes" 2 -> 0.6
    out = bench.score(records(samples, ["Blue", "Unanswerable", "yes"]))
    assert out["accuracy"] == pytest.approx(100 * 2.6 / 3)
    assert out["answer_type/other"] == pytest.approx(100.0)
    assert out["answer_type/unanswerable"] == pytest.approx(100.0)
    assert out["answer_type/yes/no"] == pytest.approx(60.0)
    assert out["count"] == 3
    # "unanswerable" is scored like any answer: 2 of the 10 answers of the first question
    assert bench.score(records(samples[:1], ["unanswerable"]))["accuracy"] == pytest.approx(60.0)


def test_vizwiz_errors(tmp_path):
    bench = get_benchmark("vizwiz")
    make_vizwiz(tmp_path, "llava")
    path = tmp_path / "vizwiz" / "val.json"
    path.write_text(json.dumps({"image": "x"}))
    with pytest.raises(DataError, match="JSON list"):
        bench.load(tmp_path)
    path.write_text(json.dumps([{"image": "a.jpg", "question": "q", "answers": "yes"}]))
    with pytest.raises(DataError, match="answers should be a list"):
        bench.load(tmp_path)


# --------------------------------------------------------------------------------------------
# VQAv2
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout, arrow", [("llava", False), ("lmms", False), ("lmms", True)])
def test_vqav2_load_val(tmp_path, layout, arrow):
    make_vqav2(tmp_path, layout, arrow=arrow)
    samples = get_benchmark("vqav2").load(tmp_path, "val")
    assert [s.id for s in samples] == [str(q["question_id"]) for q in VQAV2_VAL]
    assert samples[0].prompt == "Where is he looking?" + SHORT  # no capitalisation for VQAv2
    assert samples[1].target == VQAV2_VAL[1]["answers"]
    assert samples[1].meta == {"question_id": 262148001, "answer_type": "number"}
    assert samples[2].load_image().size == (12, 8)
    if layout == "llava":
        assert samples[2].image.endswith("val2014/COCO_val2014_000000393225.jpg")


def test_vqav2_val_subset(tmp_path):
    make_vqav2(tmp_path, "llava", val_subset=[393225000, 262148000])
    samples = get_benchmark("vqav2").load(tmp_path, "val")
    assert [s.id for s in samples] == ["393225000", "262148000"]
    make_vqav2(tmp_path, "llava", val_subset=[5])
    with pytest.raises(DataError, match="no annotation for question 5"):
        get_benchmark("vqav2").load(tmp_path, "val")


def test_vqav2_val_score(tmp_path):
    make_vqav2(tmp_path, "llava")
    bench = get_benchmark("vqav2")
    samples = bench.load(tmp_path, "val")
    # "Down." 7 -> 1.0; "two" 3 of "2" -> 0.9; "no" -> 0
    out = bench.score(records(samples, ["Down.", "two", "no"]))
    assert out["accuracy"] == pytest.approx(100 * 1.9 / 3)
    assert out["answer_type/other"] == pytest.approx(100.0)
    assert out["answer_type/number"] == pytest.approx(90.0)
    assert out["answer_type/yes/no"] == pytest.approx(0.0)
    assert bench.write_submission(records(samples, ["a", "b", "c"]), tmp_path / "s.json") is None


@pytest.mark.parametrize("layout, arrow", [("llava", False), ("lmms", False), ("lmms", True)])
def test_vqav2_testdev(tmp_path, layout, arrow):
    make_vqav2(tmp_path, layout, arrow=arrow)
    bench = get_benchmark("vqav2")
    samples = bench.load(tmp_path, "test-dev")
    assert [s.id for s in samples] == [str(q["question_id"]) for q in VQAV2_TESTDEV]
    assert samples[0].prompt == "What is the man holding?" + SHORT
    assert all(s.target is None for s in samples)
    assert samples[1].load_image().size == (12, 8)
    recs = records(samples, ["An Umbrella.", "No"])
    assert bench.score(recs) == {}
    path = bench.write_submission(recs, tmp_path / "sub" / "vqav2.json")
    got = json.loads(path.read_text())
    answered = [{"question_id": 1000, "answer": "umbrella"}, {"question_id": 1001, "answer": "no"}]
    # padded to every test2015 question (LLaVA's test2015 question file / lmms-lab's test split)
    assert [g["question_id"] for g in got] == VQAV2_TEST2015_IDS
    assert [g for g in got if g["answer"]] == answered
    assert {g["answer"] for g in got if g["question_id"] in (999, 1002)} == {""}
    # a fresh instance (re-scoring from the JSONL alone) keeps the padding of the file it replaces
    fresh = get_benchmark("vqav2")
    assert json.loads(fresh.write_submission(recs[::-1], path).read_text()) == got
    # and with no file there, writes the answered questions only
    assert json.loads(fresh.write_submission(recs, tmp_path / "s2.json").read_text()) == answered


def test_vqav2_testdev_official_questions(tmp_path):
    make_vqav2(tmp_path, "llava")
    folder = tmp_path / "vqav2"
    (folder / "llava_vqav2_mscoco_test-dev2015.jsonl").unlink()
    (folder / "llava_vqav2_mscoco_test2015.jsonl").unlink()
    questions = [{"question_id": q["question_id"], "image_id": q["image_id"], "question": q["question"]}
                 for q in VQAV2_TESTDEV]
    (folder / "v2_OpenEnded_mscoco_test-dev2015_questions.json").write_text(json.dumps({"questions": questions}))
    bench = get_benchmark("vqav2")
    samples = bench.load(tmp_path, "test-dev")
    assert [s.prompt for s in samples] == [q["question"] + SHORT for q in VQAV2_TESTDEV]
    assert samples[0].image.endswith("test2015/COCO_test2015_000000000001.jpg")
    assert bench.submission_question_ids is None  # no test2015 question file: no padding
    got = json.loads(bench.write_submission(records(samples, ["x", "y"]), tmp_path / "s.json").read_text())
    assert got == [{"question_id": 1000, "answer": "x"}, {"question_id": 1001, "answer": "y"}]


def test_vqav2_errors(tmp_path):
    bench = get_benchmark("vqav2")
    with pytest.raises(ValueError, match="unknown split"):
        bench.load(tmp_path, "test")
    with pytest.raises(DataError, match="v2_mscoco_val2014_annotations.json"):
        bench.load(tmp_path, "val")
    with pytest.raises(DataError, match="llava_vqav2_mscoco_test-dev2015.jsonl"):
        bench.load(tmp_path, "test-dev")
    make_vqav2(tmp_path, "llava")
    (tmp_path / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json").unlink()
    with pytest.raises(DataError, match="v2_OpenEnded_mscoco_val2014_questions.json"):
        bench.load(tmp_path, "val")
    llava = tmp_path / "vqav2" / "llava_vqav2_mscoco_test-dev2015.jsonl"
    llava.write_text('{"question_id": 1}\n{oops\n')
    with pytest.raises(DataError, match="test-dev2015.jsonl, line 2: not valid JSON"):
        bench.load(tmp_path, "test-dev")
    llava.write_text('{"question_id": 1}\n')
    with pytest.raises(DataError, match=r"test-dev2015.jsonl, line 1: missing field\(s\) image, text"):
        bench.load(tmp_path, "test-dev")


# --------------------------------------------------------------------------------------------
# GQA
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout, arrow", [("llava", False), ("lmms", False), ("lmms", True)])
def test_gqa_load(tmp_path, layout, arrow):
    make_gqa(tmp_path, layout, arrow=arrow)
    samples = get_benchmark("gqa").load(tmp_path)
    assert [s.id for s in samples] == [q["id"] for q in GQA_QUESTIONS]
    assert samples[0].prompt == "Is the cup to the left of the plate?" + SHORT
    assert [s.target for s in samples] == ["yes", "laptop", "no"]
    assert samples[1].meta == {"question_id": "201640614", "structural": "query", "semantic": "rel"}
    assert samples[2].load_image().size == (12, 8)


def test_gqa_without_llava_jsonl_keeps_balanced_only(tmp_path):
    make_gqa(tmp_path, "llava", llava_jsonl=False)
    samples = get_benchmark("gqa").load(tmp_path)
    assert [s.id for s in samples] == [q["id"] for q in GQA_QUESTIONS]  # "555" is unbalanced


def test_clean_gqa_prediction():
    assert clean_gqa_prediction(" Yes. ") == "yes"
    assert clean_gqa_prediction("Laptop...") == "laptop"
    assert clean_gqa_prediction("Yes .") == "yes "  # only trailing periods go, as in LLaVA
    assert clean_gqa_prediction("the laptop") == "the laptop"  # no article removal


def test_gqa_score(tmp_path):
    make_gqa(tmp_path, "lmms")
    bench = get_benchmark("gqa")
    samples = bench.load(tmp_path)
    out = bench.score(records(samples, ["Yes.", "Laptop", "yes"]))
    assert out["accuracy"] == pytest.approx(200 / 3)
    assert out["binary"] == pytest.approx(50.0)       # verify right, logical wrong
    assert out["open"] == pytest.approx(100.0)        # query
    assert out["structural/verify"] == 100.0 and out["structural/logical"] == 0.0
    assert out["semantic/rel"] == 100.0 and out["semantic/obj"] == 0.0
    assert out["count"] == 3
    assert bench.score(records(samples, ["the laptop"] * 3))["accuracy"] == 0.0


def test_gqa_errors(tmp_path):
    bench = get_benchmark("gqa")
    with pytest.raises(DataError, match="testdev_balanced_instructions"):
        bench.load(tmp_path)
    make_gqa(tmp_path, "llava")
    (tmp_path / "gqa" / "llava_gqa_testdev_balanced.jsonl").write_text('{"question_id": "404"}\n')
    with pytest.raises(DataError, match="no question '404'"):
        bench.load(tmp_path)
    (tmp_path / "gqa" / "data" / "testdev_balanced_questions.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="keyed by question id"):
        bench.load(tmp_path)


# --------------------------------------------------------------------------------------------
# MM-Vet
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["llava", "lmms"])
def test_mmvet_load(tmp_path, layout):
    make_mmvet(tmp_path, layout)
    bench = get_benchmark("mmvet")
    samples = bench.load(tmp_path)
    assert [s.id for s in samples] == list(MMVET_QUESTIONS)
    assert samples[0].prompt == "What is x in the equation?"  # the question alone
    assert samples[0].target == "-1<AND>-5"
    assert samples[2].meta == {"question_id": "v1_2", "question": "Can you explain this meme?",
                               "capability": ["rec", "know", "gen"]}
    assert samples[1].load_image().size == (12, 8)


def test_mmvet_errors(tmp_path):
    bench = get_benchmark("mmvet")
    with pytest.raises(DataError, match="mm-vet.json"):
        bench.load(tmp_path)
    make_mmvet(tmp_path, "llava")
    (tmp_path / "mm-vet" / "mm-vet.json").write_text(json.dumps({"v1_0": {"question": "q"}}))
    with pytest.raises(DataError, match=r"'v1_0': missing field\(s\) imagename, answer, capability"):
        bench.load(tmp_path)


def test_mmvet_submission_and_no_judge(tmp_path):
    make_mmvet(tmp_path, "llava")
    bench = get_benchmark("mmvet")
    recs = records(bench.load(tmp_path), ["x = -1 or x = -5", "A cat.", "Ha"])
    assert bench.score(recs) == {}
    path = bench.write_submission(recs, tmp_path / "sub" / "mmvet.json")
    assert json.loads(path.read_text()) == {"v1_0": "x = -1 or x = -5", "v1_1": "A cat.", "v1_2": "Ha"}


def test_grader_query_and_parse():
    q = grader_query("What is x?", "-1<AND>-5", "x = 3")
    assert q == MMVET_GRADER_PROMPT + "\nWhat is x? | -1 <AND> -5 | x = 3 | "
    assert grader_query("q", "a<OR>b", "p", retry=True).endswith("q | a <OR> b | p | " + RETRY_SUFFIX)
    assert MMVET_GRADER_PROMPT.count("\n") == 11  # instruction, blank, header, rule, 7 examples
    assert parse_grade("0.7") == 0.7
    assert parse_grade("1.0 (totally right)") == 1.0
    assert parse_grade("\n0.3\n") == 0.3
    assert parse_grade("1.5") is None
    assert parse_grade("-0.1") is None
    assert parse_grade("correct") is None
    assert parse_grade("") is None and parse_grade(None) is None


def test_grade_answer_retries():
    calls = []

    def ask(content, temperature):
        calls.append((content.endswith(RETRY_SUFFIX), temperature))
        return "0.6" if len(calls) == 3 else "hmm"

    assert grade_answer("q", "a", "p", ask) == (0.6, True)
    # plain query at 0, then the digit request at 0 and 0.5 (raised after each retry)
    assert calls == [(False, 0.0), (True, 0.0), (True, 0.5)]
    calls.clear()
    assert grade_answer("q", "a", "p", lambda c, t: calls.append(t) or "no") == (0.0, False)
    assert calls == [0.0, 0.0, 0.5, 1.0, 1.5]  # 5 tries in all, then 0


def test_mmvet_aggregate():
    out = mmvet_aggregate([(1.0, ["ocr", "math"]), (0.5, ["rec"]), (0.3, ["rec", "know", "gen"])])
    assert out == pytest.approx({"total": 60.0, "rec": 40.0, "ocr": 100.0, "know": 30.0, "gen": 30.0,
                                 "math": 100.0, "count": 3.0})
    assert "spat" not in out
    assert mmvet_aggregate([]) == {}


class _Judge(BaseHTTPRequestHandler):
    """Canned grades by prediction: "x = -1 or x = -5" -> 1.0, "A cat." -> 0.5, "Ha" -> prose, then
    0.3 when asked for the digit; "boom" -> HTTP 500 once then 0.2; "bad" -> HTTP 400."""

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        content = body["messages"][0]["content"]
        retry = content.endswith(RETRY_SUFFIX)
        row = (content[: -len(RETRY_SUFFIX)] if retry else content).rsplit("\n", 1)[-1]
        prediction = row.split(" | ")[2]  # "question | truth | prediction | "
        if prediction == "bad":
            return self._send(400, {"error": {"message": "bad request"}})
        if prediction == "boom" and not self.server.failed:
            self.server.failed = True
            return self._send(500, {"error": "try later"})
        grade = {"x = -1 or x = -5": "1.0", "A cat.": "0.5", "boom": "0.2"}.get(prediction)
        if prediction == "Ha":
            grade = "0.3" if retry else "The prediction is partly right"
        self._send(200, {"choices": [{"message": {"role": "assistant", "content": grade or "?"}}]})

    def _send(self, code, payload):
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    server.requests, server.failed = [], False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def test_mmvet_score_with_judge(tmp_path, judge_server):
    make_mmvet(tmp_path, "lmms")
    bench = get_benchmark("mmvet")
    port = judge_server.server_address[1]
    bench.judge = {"base_url": f"http://127.0.0.1:{port}/v1/", "model": "judge-x", "api_key": "sk-test", "backoff": 0}
    recs = records(bench.load(tmp_path), ["x = -1 or x = -5", "A cat.", "Ha"])
    out = bench.score(recs)
    # v1_0 (ocr, math) 1.0; v1_1 (rec) 0.5; v1_2 (rec, know, gen) 0.3 after one retry
    assert out == pytest.approx({"total": 60.0, "rec": 40.0, "ocr": 100.0, "know": 30.0, "gen": 30.0,
                                 "math": 100.0, "count": 3.0, "unparsed": 0.0})
    reqs = judge_server.requests
    assert len(reqs) == 4
    assert {r["path"] for r in reqs} == {"/v1/chat/completions"}
    assert {r["auth"] for r in reqs} == {"Bearer sk-test"}
    first = reqs[0]["body"]
    assert first["model"] == "judge-x" and first["max_tokens"] == 3 and first["temperature"] == 0.0
    expected = grader_query("What is x in the equation?", "-1<AND>-5", "x = -1 or x = -5")
    assert first["messages"][0]["content"] == expected
    # graded answers are cached on the instance: re-scoring asks nothing
    assert bench.score(recs) == out and len(reqs) == 4
    # the module function directly, with the full endpoint URL and no key
    direct = score_with_judge(recs[:1], f"http://127.0.0.1:{port}/v1/chat/completions", "judge-x", backoff=0)
    assert direct["total"] == 100.0 and reqs[-1]["auth"] is None


def test_mmvet_judge_http_errors(judge_server):
    port = judge_server.server_address[1]
    url = f"http://127.0.0.1:{port}/v1"
    rec = {"id": "v1_9", "prediction": "boom", "target": "x", "meta": {"question": "q", "capability": ["spat"]}}
    out = score_with_judge([rec], url, "m", backoff=0)  # 500 once: retried
    assert out["total"] == pytest.approx(20.0) and out["spat"] == pytest.approx(20.0)
    with pytest.raises(JudgeError, match="HTTP 400"):
        score_with_judge([dict(rec, prediction="bad")], url, "m", backoff=0)
    with pytest.raises(JudgeError, match="failed after 2 attempts"):
        score_with_judge([rec], "http://127.0.0.1:9/v1", "m", attempts=2, backoff=0, timeout=2)


def test_mmvet_judge_settings():
    bench = get_benchmark("mmvet")
    assert bench.judge_settings() is None
    bench.judge = {"base_url": None, "model": "gpt-4-0613", "api_key": None}
    assert bench.judge_settings()["base_url"] == "https://api.openai.com/v1"
    bench.judge = {"base_url": "http://x/v1", "model": None, "api_key": None}
    with pytest.raises(ValueError, match="no model name"):
        bench.score([{"id": "v1_0", "prediction": "p", "target": "t", "meta": {}}])


def test_fixture_layouts_rejected(tmp_path):
    with pytest.raises(ValueError):
        make_textvqa(tmp_path, "other")
