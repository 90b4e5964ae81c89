"""``globalcom2 eval --protocol``: LLaVA's protocol (the default) and lmms-eval's, and the loader /
scorer fixes that came with it (VQAv2's official scoring, VizWiz test, MM-Vet's folder and grade
parsing, MMBench's stored rotations)."""

from __future__ import annotations

import argparse
import base64
import json
import math
import shutil

import pytest
from fixtures_eval_choice import MMBENCH_QUESTIONS, _mmbench_row, image_bytes, make_mmbench
from fixtures_eval_vqa import TEXTVQA_QUESTIONS, VQAV2_VAL, make_mmvet, make_textvqa, make_vqav2

from globalcom2.eval import base, runner, vqa_metric
from globalcom2.eval.base import DataError, Sample, get_benchmark
from globalcom2.eval.benchmarks.mmvet import grade_answer, parse_grade
from globalcom2.eval.vqa_metric import vqa_accuracy

from _eval_entry import make_toy  # noqa: F401  (registers "toyqa")

SHORT = "\nAnswer the question using a single word or phrase."


def records(samples, predictions):
    return [s.record(p) for s, p in zip(samples, predictions)]


# -- token budgets ----------------------------------------------------------------------------------


def test_default_protocol_and_budgets():
    assert base.PROTOCOLS == ("llava", "lmms-eval") and base.DEFAULT_PROTOCOL == "llava"
    assert get_benchmark("gqa").protocol == "llava"
    # LLaVA: model_vqa_loader.py's default 128; model_vqa_science.py / model_vqa_mmbench.py /
    # model_vqa.py hard-code 1024. lmms-eval: its tasks' generation_kwargs.
    llava = {"gqa": 128, "mme": 128, "vqav2": 128, "textvqa": 128, "vizwiz": 128, "pope": 128,
             "scienceqa": 1024, "mmbench": 1024, "mmvet": 1024}
    lmms = {**llava, "gqa": 16, "mme": 16, "vqav2": 16, "scienceqa": 16}
    assert {n: get_benchmark(n).max_new_tokens for n in llava} == llava
    assert {n: get_benchmark(n, "llava").max_new_tokens for n in llava} == llava
    assert {n: get_benchmark(n, "lmms-eval").max_new_tokens for n in lmms} == lmms
    with pytest.raises(ValueError, match="unknown protocol 'lmms'.*llava, lmms-eval"):
        get_benchmark("gqa", "lmms")


# -- TextVQA's OCR prompt ---------------------------------------------------------------------------


def test_textvqa_llava_prompt_from_llava_jsonl(tmp_path):
    make_textvqa(tmp_path, "llava")
    samples = get_benchmark("textvqa").load(tmp_path)
    # LLaVA's question file gives the prompts (its text as is), matched to the annotations by
    # (image id, lower-cased question) as eval_textvqa.py does; ids stay the question ids
    assert [s.id for s in samples] == [str(q["question_id"]) for q in TEXTVQA_QUESTIONS]
    assert samples[0].prompt == "what brand is the Camera?\nReference OCR token: x" + SHORT
    assert samples[0].target == TEXTVQA_QUESTIONS[0]["answers"]
    assert samples[2].image.endswith("train_images/a1b2c3.jpg")
    # a line without its annotation is an error naming the file
    path = tmp_path / "textvqa" / "llava_textvqa_val_v051_ocr.jsonl"
    path.write_text(json.dumps({"question_id": "zz", "image": "zz.jpg", "text": "what?\nReference OCR token: \n"
                                "Answer the question using a single word or phrase."}) + "\n")
    with pytest.raises(DataError, match="llava_textvqa_val_v051_ocr.jsonl, line 1: no question 'what\\?' on image zz"):
        get_benchmark("textvqa").load(tmp_path)


def test_textvqa_llava_prompt_from_ocr_tokens(tmp_path):
    make_textvqa(tmp_path, "lmms")
    samples = get_benchmark("textvqa").load(tmp_path)  # lmms-lab's ocr_tokens column
    assert samples[0].prompt == "What brand is the camera?\nReference OCR token: x" + SHORT
    assert get_benchmark("textvqa", "lmms-eval").load(tmp_path)[0].prompt == "What brand is the camera?" + SHORT

    other = tmp_path / "other"
    make_textvqa(other, "llava")
    folder = other / "textvqa"
    (folder / "llava_textvqa_val_v051_ocr.jsonl").unlink()
    with pytest.raises(DataError, match="no OCR tokens.*--protocol lmms-eval"):
        get_benchmark("textvqa").load(other)
    ann = json.loads((folder / "TextVQA_0.5.1_val.json").read_text())
    (folder / "TextVQA_Rosetta_OCR_v0.2_val.json").write_text(json.dumps({"data": [
        {"image_id": "a1b2c3", "ocr_tokens": ["NIKON", "stop"]}, {"image_id": "d4e5f6", "ocr_tokens": []}]}))
    samples = get_benchmark("textvqa").load(other)
    assert samples[0].prompt == "What brand is the camera?\nReference OCR token: NIKON, stop" + SHORT
    assert samples[1].prompt == "What number is on the shirt?\nReference OCR token: " + SHORT
    ann["data"][0]["ocr_tokens"] = ["own"]  # tokens in the annotation itself win
    (folder / "TextVQA_0.5.1_val.json").write_text(json.dumps(ann))
    own = get_benchmark("textvqa").load(other)[0].prompt
    assert own == "What brand is the camera?\nReference OCR token: own" + SHORT


# -- VQAv2 val: the official vqaEval.py --------------------------------------------------------------


def test_official_vqa_accuracy():
    official_vqa_accuracy = vqa_metric.official_vqa_accuracy
    assert official_vqa_accuracy("T-shirt", ["t-shirt"] * 10) == 0.0  # all agree: answers left as they are
    assert vqa_accuracy("T-shirt", ["t-shirt"] * 10) == 1.0
    assert official_vqa_accuracy("Yes.", ["yes"] * 10) == 1.0
    # disagreeing answers get the punctuation step only (no lower-casing, no number words)
    assert official_vqa_accuracy("two", ["Two"] * 5 + ["3"] * 5) == 0.0
    assert official_vqa_accuracy("t-shirt", ["t-shirt"] * 4 + ["shirt"] * 6) == 1.0
    assert official_vqa_accuracy("x", []) == 0.0


def test_vqav2_val_scorer_follows_the_protocol(tmp_path):
    make_vqav2(tmp_path, "llava")
    samples = get_benchmark("vqav2").load(tmp_path, "val")
    sample = Sample("1", "q", None, ["t-shirt"] * 10, {"question_id": 1, "answer_type": "other"})
    recs = records(samples, ["Down.", "two", "no"]) + [sample.record("T-shirt")]
    assert get_benchmark("vqav2").score(recs)["accuracy"] == pytest.approx(100 * 1.9 / 4)
    assert get_benchmark("vqav2", "lmms-eval").score(recs)["accuracy"] == pytest.approx(100 * 2.9 / 4)
    assert VQAV2_VAL[2]["answers"] == ["yes"] * 10


# -- VizWiz test (LLaVA's layout) -------------------------------------------------------------------


def _vizwiz_test(root):
    folder = root / "vizwiz"
    (folder / "test").mkdir(parents=True)
    instr = "\nWhen the provided information is insufficient, respond with 'Unanswerable'." + SHORT
    lines = [{"question_id": 0, "image": "VizWiz_test_00000000.jpg",
              "text": "What is this? and what color is it?" + instr, "category": "default"},
             {"question_id": 1, "image": "VizWiz_test_00000001.jpg", "text": "What is this?" + instr,
              "category": "default"}]
    (folder / "llava_test.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    for n, line in enumerate(lines):
        (folder / "test" / line["image"]).write_bytes(image_bytes(n))
    return instr


def test_vizwiz_test_split_and_submission(tmp_path):
    instr = _vizwiz_test(tmp_path)
    bench = get_benchmark("vizwiz")
    assert bench.splits == ("val", "test")
    samples = bench.load(tmp_path, "test")
    assert [s.id for s in samples] == ["VizWiz_test_00000000", "VizWiz_test_00000001"]
    assert samples[0].prompt == "What is this? and what color is it?" + instr  # LLaVA's text as is
    assert all(s.target is None for s in samples) and samples[1].load_image().size == (12, 8)
    assert get_benchmark("vizwiz", "lmms-eval").load(tmp_path, "test")[0].prompt == (
        "What is this? and what color is it?" + instr)
    recs = records(samples, ["Black.", "Unanswerable"])
    assert bench.score(recs) == {}
    path = bench.write_submission(recs, tmp_path / "sub" / "vizwiz.json")
    # convert_vizwiz_for_submission.py: [{"image", "answer": EvalAIAnswerProcessor(text)}]
    assert json.loads(path.read_text()) == [{"image": "VizWiz_test_00000000.jpg", "answer": "black"},
                                            {"image": "VizWiz_test_00000001.jpg", "answer": "unanswerable"}]
    with pytest.raises(DataError, match="llava_test.jsonl"):
        bench.load(tmp_path / "vizwiz" / "test", "test")


# -- MM-Vet: the folder that holds the data, the official grade parsing --------------------------------


def test_mmvet_picks_the_folder_holding_the_data(tmp_path):
    make_mmvet(tmp_path, "llava")
    (tmp_path / "mm-vet").rename(tmp_path / "mmvet")  # the guide's mm-vet.zip extraction
    (tmp_path / "mm-vet").mkdir()  # eval.zip: only LLaVA's question file
    shutil.copy(tmp_path / "mmvet" / "llava-mm-vet.jsonl", tmp_path / "mm-vet" / "llava-mm-vet.jsonl")
    samples = get_benchmark("mmvet").load(tmp_path)
    assert [s.id for s in samples] == ["v1_0", "v1_1", "v1_2"]
    assert samples[0].image.endswith("mmvet/images/" + samples[0].image.rsplit("/", 1)[1])


def test_mmvet_grade_parsing_as_the_official_evaluator():
    assert parse_grade(" 0.5") is None  # split(" ")[0] is empty
    assert parse_grade("0.5\nok") is None  # no space: the whole reply is the first piece
    assert math.isnan(parse_grade("nan"))  # NaN fails neither bound check
    assert parse_grade("0.5\n") == 0.5 and parse_grade("1.0 (right)") == 1.0 and parse_grade("1.2") is None
    replies = iter([" 0.5", "0.5\nok", "0.7"])
    assert grade_answer("q", "a", "p", lambda content, t: next(replies)) == (0.7, True)  # re-asked twice


# -- MMBench: stored rotations mean what ours mean ------------------------------------------------------


def test_mmbench_stored_rotations_match_ours_whatever_their_direction(tmp_path):
    make_mmbench(tmp_path / "ours", "llava")  # one row per question: rotations generated here
    ours = {s.id: s for s in get_benchmark("mmbench").load(tmp_path / "ours")}
    folder = tmp_path / "stored" / "mmbench"
    folder.mkdir(parents=True)
    rows = []
    for index, question, hint, options, answer, cat, l2 in MMBENCH_QUESTIONS:
        raw = base64.b64encode(image_bytes(index)).decode()
        k = len(options)
        for copy in range(k):  # copies rotated the other way: copy c shows options -c, 1-c, ...
            shift = (-copy) % k
            rotated = options[shift:] + options[:shift]
            new_answer = "ABCD"[("ABCD".index(answer) - shift) % k]
            rows.append(_mmbench_row(index + copy * 1_000_000, question, hint, rotated, new_answer, cat, l2, raw))
    header = list(rows[0])
    text = "\n".join(["\t".join(header)] + ["\t".join(str(r[h]) for h in header) for r in rows]) + "\n"
    (folder / "mmbench_dev_20230712.tsv").write_text(text, encoding="utf-8")
    stored = {s.id: s for s in get_benchmark("mmbench").load(tmp_path / "stored")}
    assert sorted(stored) == sorted(ours)
    for sid, s in ours.items():
        assert (stored[sid].prompt, stored[sid].target, stored[sid].meta["options"]) == (
            s.prompt, s.target, s.meta["options"]), sid


# -- the runner and the command: recorded, refused on resume --------------------------------------------


def test_protocol_recorded_and_resume_under_another_refused(tiny, tmp_path):
    model, processor = tiny
    data = make_toy(tmp_path / "data", n=2)
    out = tmp_path / "out"
    kw = dict(output_dir=out, limit=1, progress=False)
    summary = runner.run_eval(model, processor, ["toyqa"], data, [1.0], protocol="lmms-eval", **kw)
    assert summary.protocol == "lmms-eval"
    assert json.loads((out / "summary.json").read_text())["protocol"] == "lmms-eval"
    assert "Protocol: lmms-eval" in (out / "summary.md").read_text()
    meta = json.loads((out / "predictions" / "toyqa-val" / "vanilla-R1.meta.json").read_text())
    assert meta["protocol"] == "lmms-eval"
    with pytest.raises(ValueError, match="--protocol lmms-eval .*not --protocol llava"):
        runner.run_eval(model, processor, ["toyqa"], data, [1.0], **kw)  # the default: llava
    again = runner.run_eval(model, processor, ["toyqa"], data, [1.0], protocol="lmms-eval", **kw)
    assert again.to_dict() == summary.to_dict()
    assert runner.score_outputs(out).protocol == "lmms-eval"
    # a meta file from before --protocol: those runs followed lmms-eval
    del meta["protocol"]
    (out / "predictions" / "toyqa-val" / "vanilla-R1.meta.json").write_text(json.dumps(meta))
    (out / "summary.json").unlink()
    with pytest.raises(ValueError, match="--protocol lmms-eval"):
        runner.check_output_protocol(out, "llava")
    runner.check_output_protocol(out, "lmms-eval")
    runner.check_output_protocol(tmp_path / "nothing-here", "llava")


def _parse(argv):
    from globalcom2.cli.eval import add_parser

    parser = argparse.ArgumentParser(prog="globalcom2")
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["eval", *argv])


def test_cli_protocol_option_help_and_refusal(tmp_path, capsys):
    from globalcom2.cli import CLIError
    from globalcom2.cli.eval import run

    assert _parse([]).protocol == "llava"
    assert _parse(["--protocol", "lmms-eval"]).protocol == "lmms-eval"
    with pytest.raises(SystemExit):
        _parse(["--protocol", "lmms"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        _parse(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--protocol {llava,lmms-eval}" in help_text and "protocols (--protocol): llava (default)" in help_text
    assert "'Reference OCR token:' line" in help_text and "lmms-eval: lmms-eval's task settings" in help_text
    assert "under another protocol is refused" in help_text

    out = tmp_path / "out"
    folder = out / "predictions" / "toyqa-val"
    folder.mkdir(parents=True)
    (folder / "vanilla-R1.jsonl").write_text(json.dumps({"id": "q0", "prediction": "x", "target": "x"}) + "\n")
    (folder / "vanilla-R1.meta.json").write_text(json.dumps({"benchmark": "toyqa", "split": "val", "method": "vanilla",
                                                             "retention_ratio": 1.0, "protocol": "lmms-eval"}))
    data = make_toy(tmp_path / "data", n=2)
    argv = ["--model", "tiny", "--benchmarks", "toyqa", "--data-root", str(data), "--output-dir", str(out),
            "--retention-ratio", "1", "--no-progress"]
    with pytest.raises(CLIError) as err:
        run(_parse(argv))  # the default protocol against an lmms-eval directory: refused before the model
    message = str(err.value)
    assert "\n" not in message and "--protocol lmms-eval" in message and "--protocol llava" in message
