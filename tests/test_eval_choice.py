"""ScienceQA-IMG, MMBench, POPE and MME: metrics on hand-computed examples, loaders on both layouts."""

from __future__ import annotations

import json

import pytest
from fixtures_eval_choice import (
    MME_DATA,
    SQA_TEST_IMG,
    make_mmbench,
    make_mme,
    make_pope,
    make_scienceqa,
)

from globalcom2.eval import DataError, get_benchmark
from globalcom2.eval.benchmarks.mmbench import extract_choice, infer_option, infer_text
from globalcom2.eval.benchmarks.mme import mme_subtask_scores, parse_mme_answer
from globalcom2.eval.benchmarks.pope import parse_pope_answer, pope_metrics
from globalcom2.eval.benchmarks.scienceqa import parse_sqa_letter, sqa_is_correct


def roundtrip(samples, predictions):
    """Records as the runner stores them (JSON lines), answered with ``predictions``."""
    return [json.loads(json.dumps(s.record(p))) for s, p in zip(samples, predictions)]


def rec(id_, prediction, target, **meta):
    return {"id": id_, "prediction": prediction, "target": target, "meta": meta}


# ============================================================================================
# ScienceQA
# ============================================================================================


@pytest.mark.parametrize("reply, letter", [
    ("B", "B"),
    ("  B\n", "B"),                      # stripped first
    ("B. green", "B"),                   # letter + ". "
    ("B.", None),                        # 2 characters: LLaVA's rule needs ". " -> FAILED
    ("b", None),                         # case-sensitive
    ("(B)", None),
    ("The answer is C.", "C"),
    ("I think The answer is C!", "C"),   # the "." of the regex matches any character
    ("The answer is C. The answer is D.", None),  # two matches -> FAILED
    ("The answer is C", None),           # the regex needs a character after the letter
    ("", None),
])
def test_sqa_letter_parsing(reply, letter):
    assert parse_sqa_letter(reply) == letter


def test_sqa_correct_needs_letter_within_choices():
    assert sqa_is_correct("C", "C", 3)
    assert not sqa_is_correct("D", "D", 3)  # out of range even if it equals the target
    assert not sqa_is_correct("B", "C", 3)


def test_sqa_score_hand_computed():
    records = [
        rec("1", "A", "A", n_choices=3, subject="natural science", grade=3, has_text_context=False),
        rec("2", "A. Ohio", "B", n_choices=2, subject="social science", grade=8, has_text_context=True),
        rec("5", "The answer is D.", "D", n_choices=4, subject="language science", grade=10,
            has_text_context=False),
        rec("6", "D.", "D", n_choices=4, subject="natural science", grade=5, has_text_context=True),
    ]
    out = get_benchmark("scienceqa").score(records)
    assert out["accuracy"] == pytest.approx(50.0)  # 1 and 5 right
    assert out["NAT"] == pytest.approx(50.0)
    assert out["SOC"] == 0.0 and out["LAN"] == 100.0
    assert out["TXT"] == 0.0                       # 2 and 6, both wrong
    assert out["G1-6"] == pytest.approx(50.0) and out["G7-12"] == pytest.approx(50.0)
    assert out["count"] == 4
    assert get_benchmark("scienceqa").score([]) == {}


@pytest.mark.parametrize("layout", ["llava", "lmms"])
def test_sqa_load(tmp_path, layout):
    make_scienceqa(tmp_path, layout)
    bench = get_benchmark("scienceqa")
    samples = bench.load(tmp_path)
    assert len(samples) == len(SQA_TEST_IMG)  # the text-only and the train problems are dropped
    if layout == "llava":
        assert [s.id for s in samples] == SQA_TEST_IMG
    assert samples[1].prompt == ("Context: Look at the map.\nWhich state is farthest north?\nA. Ohio\nB. Maine\n"
                                 "Answer with the option's letter from the given choices directly.")
    assert samples[0].prompt.startswith("Which color is the square?\nA. red\n")  # no empty Context line
    assert [s.target for s in samples] == ["A", "B", "D"]
    assert samples[2].meta == {"n_choices": 4, "subject": "language science", "grade": 10,
                               "has_text_context": False}
    assert samples[0].load_image().size == (12, 8)
    out = bench.score(roundtrip(samples, ["A", "B", "C"]))
    assert out["accuracy"] == pytest.approx(200 / 3)


def test_sqa_llava_without_question_file_builds_same_prompts(tmp_path):
    make_scienceqa(tmp_path, "llava")
    bench = get_benchmark("scienceqa")
    with_file = bench.load(tmp_path)
    (tmp_path / "scienceqa" / "llava_test_CQM-A.json").unlink()
    without = bench.load(tmp_path)
    assert [(s.id, s.prompt, s.target, s.image) for s in with_file] == \
           [(s.id, s.prompt, s.target, s.image) for s in without]


def test_sqa_errors(tmp_path):
    bench = get_benchmark("scienceqa")
    with pytest.raises(DataError, match="problems.json"):
        bench.load(tmp_path)
    with pytest.raises(ValueError, match="unknown split"):
        bench.load(tmp_path, "val")
    make_scienceqa(tmp_path, "llava")
    (tmp_path / "scienceqa" / "problems.json").write_text("{not json")
    with pytest.raises(DataError, match="problems.json"):
        bench.load(tmp_path)
    make_scienceqa(tmp_path, "llava")
    (tmp_path / "scienceqa" / "llava_test_CQM-A.json").unlink()
    (tmp_path / "scienceqa" / "pid_splits.json").write_text(json.dumps({"train": []}))
    with pytest.raises(DataError, match="pid_splits.json"):
        bench.load(tmp_path)


def test_sqa_lmms_missing_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "scienceqa" / "ScienceQA-IMG" / "test-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"question": "q", "choices": ["a"], "answer": 0}]), path)
    with pytest.raises(DataError, match="missing field.*image"):
        get_benchmark("scienceqa").load(tmp_path)


# ============================================================================================
# MMBench
# ============================================================================================


@pytest.mark.parametrize("reply, letter", [
    ("C", "C"),
    ("C.", "C"),
    ("(B)", "B"),
    ("The answer is D.", "D"),
    ("Option B, I believe", "B"),          # no bare letter; "B," is the only "X," token
    ("I think it is B, not C.", "C"),      # wrappers in MMBench's order: "X." comes before "X,"
    ("A", "A"),
    ("A. cat", "A"),                       # bare? no ("A." token) -> wrapper "X." gives A
    ("A is the right one here", None),     # bare A but > 3 tokens: maybe an article -> no letter
    ("B or C", None),                      # two bare letters, no wrapper -> undecided
    ("E", "E"),                            # MMBench looks for A-E whatever the option count
    ("answer:C", None),                    # ":C" must be a whole token
    ("answer :C", "C"),
    ("", None),
])
def test_mmbench_infer_option(reply, letter):
    assert infer_option(reply) == letter


def test_mmbench_text_fallback():
    options = {"A": "cat", "B": "dog", "C": "bird"}
    assert infer_text("It is a Dog.", options) == "B"
    assert infer_text("a cat and a dog", options) is None     # two options named
    assert extract_choice("It is a Dog.", options) == "B"     # no letter -> text
    assert extract_choice("A dog is on the grass", options) == "B"  # "A" is an article here
    assert extract_choice("I do not know", options) is None   # counted wrong


def _mm(index, rot, n_rot, pred, target, cat="c1", l2="L"):
    opts = dict(zip("ABCD", ["w", "x", "y", "z"][:n_rot]))
    return rec(f"{index}/{rot}", pred, target, index=index, rotation=rot, n_rotations=n_rot, options=opts,
               category=cat, l2_category=l2)


def test_mmbench_circular_score_hand_computed():
    records = [
        # question 0: 4 rotations, all right -> correct
        _mm(0, 0, 4, "C", "C"), _mm(0, 1, 4, "B.", "B"), _mm(0, 2, 4, "(A)", "A"), _mm(0, 3, 4, "D", "D"),
        # question 1: rotation 0 right, rotation 1 wrong -> wrong (single pass: right)
        _mm(1, 0, 2, "A", "A", cat="c2"), _mm(1, 1, 2, "A", "B", cat="c2"),
        # question 2: rotation 1 has no extractable answer -> wrong (single pass: wrong)
        _mm(2, 0, 3, "x", "C", cat="c2"), _mm(2, 1, 3, "no idea", "B", cat="c2"), _mm(2, 2, 3, "A", "A", cat="c2"),
        # question 3: all answered rotations right, but rotation 2 missing -> incomplete, wrong
        _mm(3, 0, 3, "A", "A"), _mm(3, 1, 3, "C", "C"),
    ]
    out = get_benchmark("mmbench").score(records)
    assert out["circular_accuracy"] == pytest.approx(25.0)
    assert out["single_pass_accuracy"] == pytest.approx(75.0)  # q0, q1, q3 right on rotation 0
    assert out["category/c1"] == pytest.approx(50.0)
    assert out["category/c2"] == 0.0
    assert out["l2/L"] == pytest.approx(25.0)
    assert out["questions"] == 4 and out["incomplete"] == 1


@pytest.mark.parametrize("layout", ["llava", "lmms"])
def test_mmbench_load_rotations(tmp_path, layout):
    make_mmbench(tmp_path, layout)
    samples = get_benchmark("mmbench").load(tmp_path)
    by_id = {s.id: s for s in samples}
    assert sorted(by_id) == sorted(["0/0", "0/1", "0/2", "0/3", "1/0", "1/1", "2/0", "2/1", "2/2"])
    assert by_id["0/0"].prompt == ("A hint.\nWhat is shown?\nA. cat\nB. dog\nC. bird\nD. fish\n"
                                   "Answer with the option's letter from the given choices directly.")
    # rotation 1 shows options 1,2,3,0: "bird" (answer C at rotation 0) is now B
    assert by_id["0/1"].prompt.endswith("\nA. dog\nB. bird\nC. fish\nD. cat\n"
                                        "Answer with the option's letter from the given choices directly.")
    assert [by_id[f"0/{r}"].target for r in range(4)] == ["C", "B", "A", "D"]
    assert by_id["1/0"].prompt.startswith("Is it day?\nA. yes\nB. no\n")  # no hint, 2 options
    assert [by_id[f"2/{r}"].target for r in range(3)] == ["B", "A", "C"]
    assert by_id["2/2"].meta["options"] == {"A": "blue", "B": "red", "C": "green"}
    assert by_id["0/3"].meta["n_rotations"] == 4 and by_id["0/3"].meta["category"] == "object_localization"
    assert by_id["1/1"].meta["l2_category"] == "CP"
    assert by_id["1/1"].load_image().size == (12, 8)
    # answering every rotation with its target is 100% circular
    out = get_benchmark("mmbench").score(roundtrip(samples, [s.target for s in samples]))
    assert out["circular_accuracy"] == 100.0 and out["questions"] == 3


def test_mmbench_layouts_agree_and_cn(tmp_path):
    bench = get_benchmark("mmbench")
    make_mmbench(tmp_path / "a", "llava")
    make_mmbench(tmp_path / "b", "lmms")
    for split in ("en-dev", "cn-dev"):
        a = sorted((s.id, s.prompt, s.target) for s in bench.load(tmp_path / "a", split))
        b = sorted((s.id, s.prompt, s.target) for s in bench.load(tmp_path / "b", split))
        assert a == b
    cn = bench.load(tmp_path / "a", "cn-dev")
    assert cn[0].prompt.endswith("\nD. fish\n请直接回答选项字母。")


def test_mmbench_llava_cn_folder(tmp_path):
    """LLaVA's mmbench_cn.sh reads the CN TSV from eval/mmbench_cn/."""
    make_mmbench(tmp_path, "llava")
    (tmp_path / "mmbench_cn").mkdir()
    (tmp_path / "mmbench" / "mmbench_dev_cn_20231003.tsv").rename(tmp_path / "mmbench_cn" / "mmbench_dev_cn_20231003.tsv")
    assert len(get_benchmark("mmbench").load(tmp_path, "cn-dev")) == 9
    assert len(get_benchmark("mmbench").load(tmp_path / "mmbench_cn", "cn-dev")) == 9  # root = the folder itself


def test_mmbench_errors(tmp_path):
    bench = get_benchmark("mmbench")
    with pytest.raises(DataError, match="mmbench_dev_20230712.tsv"):
        bench.load(tmp_path)
    with pytest.raises(ValueError, match="unknown split"):
        bench.load(tmp_path, "en-test")
    make_mmbench(tmp_path, "llava")
    tsv = tmp_path / "mmbench" / "mmbench_dev_20230712.tsv"
    lines = tsv.read_text().splitlines()
    header = lines[0].split("\t")
    row = lines[1].split("\t")
    row[header.index("answer")] = "Z"
    tsv.write_text("\n".join([lines[0], "\t".join(row)]) + "\n")
    with pytest.raises(DataError, match=r"mmbench_dev_20230712.tsv, row 1: answer 'Z'"):
        bench.load(tmp_path)
    tsv.write_text("index\tquestion\n0\tq\n")
    with pytest.raises(DataError, match="missing field"):
        bench.load(tmp_path)


# ============================================================================================
# POPE
# ============================================================================================


@pytest.mark.parametrize("reply, answer", [
    ("Yes", "yes"),
    ("No", "no"),
    ("no", "no"),
    ("No, there is not.", "no"),
    ("There is no dog.", "no"),
    ("It is not there", "no"),
    ("Yes. There is no cat.", "yes"),    # first sentence only
    ("Yes, no doubt", "no"),             # commas removed, "no" is a word
    ("NO", "yes"),                       # case-sensitive words
    ("Nope", "yes"),
    ("No.", "no"),
    ("", "yes"),
])
def test_pope_parsing(reply, answer):
    assert parse_pope_answer(reply) == answer


def test_pope_metrics_hand_computed():
    # TP=2 (y,y), FP=1 (y,n), TN=1 (n,n), FN=1 (n,y)
    m = pope_metrics(["yes", "yes", "yes", "no", "no"], ["yes", "yes", "no", "no", "yes"])
    assert m["accuracy"] == pytest.approx(60.0)
    assert m["precision"] == pytest.approx(200 / 3)
    assert m["recall"] == pytest.approx(200 / 3)
    assert m["f1"] == pytest.approx(200 / 3)
    assert m["yes_ratio"] == pytest.approx(60.0)
    zero = pope_metrics(["no", "no"], ["yes", "no"])  # no yes predicted: precision 0/0 -> 0
    assert zero["precision"] == 0.0 and zero["f1"] == 0.0 and zero["accuracy"] == 50.0


def test_pope_score_averages_subsets():
    records = [rec("random/1", "Yes", "yes", subset="random"), rec("random/2", "No", "no", subset="random"),
               rec("adversarial/1", "Yes", "yes", subset="adversarial"),
               rec("adversarial/2", "Yes", "no", subset="adversarial")]
    out = get_benchmark("pope").score(records)
    assert out["random/f1"] == 100.0 and out["random/accuracy"] == 100.0
    assert out["adversarial/precision"] == 50.0 and out["adversarial/recall"] == 100.0
    assert out["adversarial/f1"] == pytest.approx(200 / 3)
    assert out["f1"] == pytest.approx((100 + 200 / 3) / 2)
    assert out["yes_ratio"] == pytest.approx((50 + 100) / 2)
    assert out["adversarial/count"] == 2
    assert "popular/f1" not in out


@pytest.mark.parametrize("layout", ["llava", "lmms"])
def test_pope_load(tmp_path, layout):
    make_pope(tmp_path, layout)
    bench = get_benchmark("pope")
    samples = bench.load(tmp_path)
    assert len(samples) == 12
    assert {s.meta["subset"] for s in samples} == {"random", "popular", "adversarial"}
    first = samples[0]
    assert first.prompt == "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    assert first.target == "yes" and first.id.startswith("random/")
    assert [s.target for s in samples if s.meta["subset"] == "popular"] == ["yes", "no", "yes", "no"]
    assert first.load_image().size == (12, 8)
    if layout == "lmms":
        assert [s.id for s in samples[:4]] == ["random/1", "random/2", "random/3", "random/4"]
    assert len({s.id for s in samples}) == 12
    adv = bench.load(tmp_path, "adversarial")
    assert len(adv) == 4 and all(s.id.startswith("adversarial/") for s in adv)
    two = bench.load(tmp_path, "adversarial, random")
    assert len(two) == 8
    out = bench.score(roundtrip(samples, ["Yes"] * 12))
    assert out["f1"] == pytest.approx(200 / 3) and out["yes_ratio"] == 100.0 and out["accuracy"] == 50.0


def test_pope_save_to_disk_arrow(tmp_path):
    """A ``datasets.save_to_disk`` DatasetDict: <dir>/test/data-00000-of-00001.arrow (Arrow stream)."""
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    make_pope(tmp_path / "src", "lmms")
    table = pq.read_table(tmp_path / "src" / "pope" / "data" / "test-00000-of-00001.parquet")
    out = tmp_path / "root" / "pope" / "test" / "data-00000-of-00001.arrow"
    out.parent.mkdir(parents=True)
    with ipc.new_stream(str(out), table.schema) as writer:
        writer.write_table(table)
    samples = get_benchmark("pope").load(tmp_path / "root", "popular")
    assert [s.id for s in samples] == ["popular/1", "popular/2", "popular/3", "popular/4"]
    assert samples[0].load_image().size == (12, 8)


def test_pope_annotations_only(tmp_path):
    make_pope(tmp_path, "llava")
    bench = get_benchmark("pope")
    with_file = bench.load(tmp_path)
    (tmp_path / "pope" / "llava_pope_test.jsonl").unlink()
    only = bench.load(tmp_path)
    assert [(s.prompt, s.target, s.image) for s in only] == [(s.prompt, s.target, s.image) for s in with_file]
    assert only[4].id == "popular/1"


def test_pope_errors(tmp_path):
    bench = get_benchmark("pope")
    with pytest.raises(DataError, match="llava_pope_test.jsonl"):
        bench.load(tmp_path)
    for bad in ("test", "random,foo"):
        with pytest.raises(ValueError, match="unknown split"):
            bench.load(tmp_path, bad)
    make_pope(tmp_path, "llava")
    (tmp_path / "pope" / "coco" / "coco_pope_popular.json").unlink()
    assert len(bench.load(tmp_path, "random")) == 4  # the missing subset is not needed
    with pytest.raises(DataError, match="coco_pope_popular.json"):
        bench.load(tmp_path)
    make_pope(tmp_path, "llava")
    with open(tmp_path / "pope" / "coco" / "coco_pope_random.json", "a") as f:
        f.write("{broken\n")
    with pytest.raises(DataError, match=r"coco_pope_random.json, line 5"):
        bench.load(tmp_path)
    make_pope(tmp_path, "llava")
    (tmp_path / "pope" / "val2014").rename(tmp_path / "pope" / "elsewhere")
    with pytest.raises(DataError, match="val2014"):
        bench.load(tmp_path)


# ============================================================================================
# MME
# ============================================================================================


@pytest.mark.parametrize("reply, answer", [
    ("Yes", "yes"),
    (" YES \n", "yes"),
    ("No.", "no"),
    ("yes, there is a dog", "yes"),
    ("not sure", "no"),          # "no" within the first 4 characters
    ("nope", "no"),
    ("The answer is yes", "other"),
    ("There is a dog", "other"),
    ("y", "other"),
    ("", "other"),
])
def test_mme_parsing(reply, answer):
    assert parse_mme_answer(reply) == answer


def test_mme_subtask_score_hand_computed():
    # image a: both right; image b: one right -> acc 3/4, acc+ 1/2 -> 75 + 50 = 125
    s = mme_subtask_scores([("a", True), ("a", True), ("b", True), ("b", False)])
    assert s == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0}


def test_mme_score_sums():
    def r(sub, img, k, pred, gt):
        return rec(f"{sub}/{img}/{k}", pred, gt, subtask=sub, image_key=f"{sub}/{img}")

    records = [
        r("existence", "1.jpg", 0, "Yes", "yes"), r("existence", "1.jpg", 1, "No", "no"),        # 200
        r("OCR", "1.jpg", 0, "Yes", "yes"), r("OCR", "1.jpg", 1, "Yes", "no"),                     # 50 + 0
        r("OCR", "2.jpg", 0, "maybe", "yes"), r("OCR", "2.jpg", 1, "no", "no"),                   # acc 2/4 -> 50
        r("code_reasoning", "1.png", 0, "No", "yes"), r("code_reasoning", "1.png", 1, "No", "no"),  # 50 + 0
    ]
    out = get_benchmark("mme").score(records)
    assert out["existence"] == 200.0
    assert out["OCR"] == 50.0 and out["OCR/acc"] == 50.0 and out["OCR/acc_plus"] == 0.0
    assert out["code_reasoning"] == 50.0
    assert out["perception"] == 250.0 and out["cognition"] == 50.0 and out["total"] == 300.0


@pytest.mark.parametrize("layout", ["llava", "lmms"])
def test_mme_load(tmp_path, layout):
    make_mme(tmp_path, layout)
    bench = get_benchmark("mme")
    samples = bench.load(tmp_path)
    assert len(samples) == sum(len(qas) for imgs in MME_DATA.values() for _, qas in imgs) == 8
    by_id = {s.id: s for s in samples}
    s = by_id["existence/000000006040.jpg/1"]
    assert s.prompt == "Is there a bed in this image?\nAnswer the question using a single word or phrase."
    assert s.target == "no" and s.meta == {"subtask": "existence", "image_key": "existence/000000006040.jpg"}
    art = by_id["artwork/10049.jpg/1"]
    assert art.target == "yes" and art.load_image().size == (12, 8)
    assert by_id["artwork/10002.jpg/1"].target == "no"  # GT matched despite the double space
    out = bench.score(roundtrip(samples, ["Yes"] * 8))
    # each image has one yes and one no question: acc 50, acc+ 0 -> 50 per subtask
    assert out["artwork"] == 50.0 and out["perception"] == 100.0 and out["cognition"] == 50.0


def test_mme_release_folder_only(tmp_path):
    make_mme(tmp_path, "llava")
    bench = get_benchmark("mme")
    llava = bench.load(tmp_path)
    (tmp_path / "MME" / "llava_mme.jsonl").unlink()
    release = bench.load(tmp_path)
    assert sorted((s.id, s.target) for s in release) == sorted((s.id, s.target) for s in llava)
    # built like lmms-eval: the yes/no suffix dropped (the double-space one leaves a space)
    prompts = {s.id: s.prompt for s in release}
    assert prompts["artwork/10002.jpg/1"] == ("Is this artwork created by van gogh? \n"
                                              "Answer the question using a single word or phrase.")


def test_mme_errors(tmp_path):
    bench = get_benchmark("mme")
    with pytest.raises(DataError, match="llava_mme.jsonl"):
        bench.load(tmp_path)
    with pytest.raises(ValueError, match="unknown split"):
        bench.load(tmp_path, "val")
    make_mme(tmp_path, "llava")
    txt = tmp_path / "MME" / "MME_Benchmark_release_version" / "existence" / "000000006040.txt"
    txt.write_text("Is there a train?\tMaybe\n")
    with pytest.raises(DataError, match=r"000000006040.txt, line 1"):
        bench.load(tmp_path)
    txt.write_text("Is there a train in this image? Please answer yes or no.\tYes\n")
    with pytest.raises(DataError, match="no answer .* 'Is there a bed in this image\\?'"):
        bench.load(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "MME" / "MME_Benchmark_release_version")
    with pytest.raises(DataError, match="MME_Benchmark_release_version"):
        bench.load(tmp_path)


@pytest.mark.parametrize("name, folder, expected", [
    ("pope", "pope", r"POPE: no data under .*pope: expected LLaVA's llava_pope_test.jsonl .* \(data/test-\*.parquet"),
    ("mme", "MME", r"MME: no data under .*MME: expected LLaVA's llava_mme.jsonl .* \(data/test-\*.parquet"),
    ("scienceqa", "scienceqa", r"ScienceQA: no data under .*scienceqa: expected LLaVA's problems.json .* "
                               r"\(ScienceQA-IMG/test-\*.parquet"),
])
def test_an_empty_folder_names_both_layouts(tmp_path, name, folder, expected):
    (tmp_path / folder).mkdir()
    with pytest.raises(DataError, match=expected):
        get_benchmark(name).load(tmp_path)
