"""Every ``globalcom2`` command on every registered family, through a saved checkpoint.

Each family's tiny model and processor are saved once per session with ``save_pretrained``
(``conftest.family_checkpoints``) and every test runs ``globalcom2.cli.main([...])`` with
``--model <that folder>``: the command's own checks, ``Family.load`` (``from_pretrained`` of the
model, ``AutoProcessor.from_pretrained`` of the processor), the method, the outputs. The families
come from ``supported_model_types()``, so a new family is covered without touching this file.

One thing is worked around, in the test session only (``conftest._video_processor_optional``, the
``video_processor_optional`` fixture): on transformers 5.25 without torchvision (the main venv),
LLaVA-OneVision's and InternVL's processors cannot be saved or loaded back, because their
``video_processor`` slot is filled by ``AutoVideoProcessor`` (torchvision only) and class-checked,
though images never use it. The fixture leaves that slot empty; nothing of globalcom2's loading is
replaced. ``demo`` takes no ``--model``: it builds the family's tiny model in code
(``--family``), and runs here on every family that way. ``serve`` needs vLLM (tests/test_vllm_*),
so the matrix leaves it out; :func:`test_every_command_is_covered` fails when a command is added.
"""

from __future__ import annotations

import csv
import io
import json

import pytest
from PIL import Image

from globalcom2.cli import COMMANDS, build_parser, main
from globalcom2.demo import sample_image_path
from globalcom2.models import family_for_model_type, supported_model_types

SAMPLE = str(sample_image_path())
FAMILIES = list(supported_model_types())
MATRIX = ("demo", "generate", "embed", "bench", "visualize", "efficiency", "eval")
NOT_IN_MATRIX = {"serve": "needs vLLM (tests/test_vllm_serve_cli.py)"}


@pytest.fixture(autouse=True)
def _offline_and_loadable(monkeypatch, video_processor_optional, tmp_path):
    """No network; the families' processors loadable without torchvision (see the module
    docstring); default outputs land in the test's own folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.chdir(tmp_path)


def _run(argv, capsys) -> tuple[str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    assert "Traceback" not in err
    return out, err


def _default_layout(model_type: str) -> str:
    return family_for_model_type(model_type).layouts[0]


def _max_visual_tokens(model_type: str, checkpoint: str) -> int:
    from transformers import AutoConfig

    return family_for_model_type(model_type).max_visual_tokens(AutoConfig.from_pretrained(checkpoint))


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    """``globalcom2 eval --write-sample-data``'s synthetic MME (the shortest answers), written once."""
    root = tmp_path_factory.mktemp("eval-sample-data")
    assert main(["eval", "--write-sample-data", str(root), "--benchmarks", "mme"]) == 0
    return root


# ------------------------------------------------------------------------------------------------
# The matrix itself
# ------------------------------------------------------------------------------------------------


def test_every_command_is_covered():
    names = {c.__name__.rsplit(".", 1)[-1] for c in COMMANDS}
    assert names == set(MATRIX) | set(NOT_IN_MATRIX), names
    demo = build_parser()._subparsers._group_actions[0].choices["demo"]
    assert demo._option_string_actions["--family"].choices == FAMILIES


@pytest.mark.parametrize("model_type", FAMILIES)
def test_demo(model_type, capsys, tmp_path):
    """``demo --family``: the family's tiny model, every layout it has (run_demo(model_type=...)
    applied LLaVA-NeXT's default 'official' layout and failed on every other family)."""
    family = family_for_model_type(model_type)
    out, _ = _run(["demo", "--family", model_type, "--ratios", "0.25", "--output-dir", str(tmp_path / "d")], capsys)
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert [r["layout"] for r in summary["runs"]] == list(family.layouts)
    assert all(0 < r["kept_tokens"] < r["vanilla_tokens"] for r in summary["runs"])
    assert f"tiny random {family.display_name}" in out and f"vanilla {family.display_name}:" in out
    assert all(Image.open(p).size[0] > 0 for p in summary["pictures"])


def test_saved_checkpoints_are_the_families_tiny_models(family_checkpoints):
    """The fixture's folders load back (through the workaround) as the in-code tiny models: the
    same weights and the same processed inputs."""
    import torch

    img = Image.open(SAMPLE)
    for model_type in FAMILIES:
        family = family_for_model_type(model_type)
        model, processor = family.load(family_checkpoints[model_type])
        ref_model, ref_processor = family.build_tiny(seed=0)
        assert model.config.model_type == model_type and type(model) is type(ref_model)
        ref_state = ref_model.state_dict()
        assert all(torch.equal(v, ref_state[k]) for k, v in model.state_dict().items())
        token = ref_processor.image_token
        got = processor(images=img, text=f"{token}\nhi", return_tensors="pt")
        ref = ref_processor(images=img, text=f"{token}\nhi", return_tensors="pt")
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


# ------------------------------------------------------------------------------------------------
# One test per (command, family)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", FAMILIES)
def test_generate(model_type, family_checkpoints, capsys):
    ckpt = family_checkpoints[model_type]
    out, err = _run(["generate", "--model", ckpt, "--image", SAMPLE, "--prompt", "hi", "--max-new-tokens", "1",
                     "--device", "cpu"], capsys)
    layout = _default_layout(model_type)
    assert f"generating with GlobalCom2 (retention ratio 0.25, layout {layout})" in err
    assert f"== GlobalCom2 (retention ratio 0.25, layout {layout}) ==" in out
    assert f"model:   {ckpt} (float32 on cpu)" in out and "answer:" in out
    kept, vanilla = (int(x.replace(",", "")) for x in out.split("visual tokens: ", 1)[1].split(" (")[0].split(" of "))
    assert 0 < kept < vanilla


@pytest.mark.parametrize("model_type", FAMILIES)
def test_embed(model_type, family_checkpoints, tmp_path, capsys):
    from globalcom2 import load_embeddings

    ckpt, path = family_checkpoints[model_type], tmp_path / "e.safetensors"
    out, _ = _run(["embed", "--model", ckpt, "--image", SAMPLE, "--out", str(path), "--device", "cpu"], capsys)
    emb = load_embeddings(path)
    assert emb.model_type == model_type and len(emb) == 1 and emb.images == [SAMPLE]
    assert emb.config.layout == _default_layout(model_type) and emb.config.retention_ratio == 0.25
    assert 0 < emb.counts[0] < emb.vanilla_counts[0]
    assert f"{emb.vanilla_counts[0]:,} -> {emb.counts[0]:>6,} visual tokens" in out and f"wrote {path}" in out


@pytest.mark.parametrize("model_type", FAMILIES)
def test_bench(model_type, family_checkpoints, capsys):
    out, err = _run(["bench", "--model", family_checkpoints[model_type], "--ratios", "0.25", "--runs", "1", "--warmup", "0",
                     "--max-new-tokens", "2", "--no-grad", "--format", "json", "--device", "cpu"], capsys)
    rows = json.loads(out)
    assert [(r["method"], r["ratio"]) for r in rows] == [("vanilla", 1.0), ("globalcom2 R=0.25", 0.25)]
    vanilla, compressed = rows
    assert 0 < compressed["visual_tokens"] < vanilla["visual_tokens"]
    assert compressed["kv_cache_mib"] < vanilla["kv_cache_mib"] and compressed["lm_flops_x"] < 1
    assert f"bench on {family_checkpoints[model_type]} (float32 on cpu)" in err


@pytest.mark.parametrize("model_type", FAMILIES)
def test_visualize(model_type, family_checkpoints, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "kept.png"
    out, _ = _run(["visualize", "--model", family_checkpoints[model_type], "--image", SAMPLE, "--retention-ratio", "0.25",
                   "--output", str(png), "--dpi", "40", "--device", "cpu"], capsys)
    with Image.open(png) as im:
        assert im.format == "PNG" and min(im.size) > 50
    assert f"wrote {png}" in out
    line = next(x for x in out.splitlines() if x.startswith("R=0.25: "))
    kept, vanilla = (int(x.replace(",", "")) for x in line.split(": ", 1)[1].split(" visual tokens")[0].split(" of "))
    assert 0 < kept < vanilla and "thumbnail" in line and "crops r_j" in line


@pytest.mark.parametrize("model_type", FAMILIES)
def test_efficiency(model_type, family_checkpoints, capsys):
    ckpt = family_checkpoints[model_type]
    out, _ = _run(["efficiency", "--model", ckpt, "--ratios", "1,0.25", "--format", "csv"], capsys)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [float(r["ratio"]) for r in rows] == [1.0, 0.25]
    full = _max_visual_tokens(model_type, ckpt)  # the family's own maximum, not LLaVA-NeXT's 2880
    assert [int(r["visual_tokens"]) for r in rows] == [full, round(0.25 * full)]
    assert {r["model"] for r in rows} == {model_type}
    assert float(rows[1]["prefill_tflops"]) < float(rows[0]["prefill_tflops"])


@pytest.mark.parametrize("model_type", FAMILIES)
def test_eval(model_type, family_checkpoints, sample_data, tmp_path, capsys):
    ckpt, out_dir = family_checkpoints[model_type], tmp_path / "eval"
    out, _ = _run(["eval", "--model", ckpt, "--benchmarks", "mme", "--data-root", str(sample_data), "--protocol", "lmms-eval",
                   "--retention-ratio", "1.0,0.25", "--limit", "2", "--output-dir", str(out_dir), "--no-progress",
                   "--device", "cpu", "--format", "json"], capsys)
    summary = json.loads((out_dir / "summary.json").read_text())
    assert json.loads(out)["rows"] == summary["rows"]
    assert [(r["method"], r["retention_ratio"], r["samples"]) for r in summary["rows"]] == [("vanilla", 1.0, 2), ("globalcom2", 0.25, 2)]
    vanilla, compressed = summary["rows"]
    assert 0 < compressed["visual_tokens"] < vanilla["visual_tokens"]
    for row in summary["rows"]:
        assert len(open(row["predictions"]).read().splitlines()) == 2
    meta = json.loads((out_dir / "predictions" / "mme-test" / "globalcom2-R0.25.meta.json").read_text())
    assert meta["model"] == ckpt and meta["config"]["layout"] == _default_layout(model_type)


# ------------------------------------------------------------------------------------------------
# Regressions found by the matrix
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", [t for t in FAMILIES if _default_layout(t) != "official"] or FAMILIES[:1])
def test_eval_records_the_layout_the_run_applied(model_type, family_checkpoints, sample_data, tmp_path, capsys):
    """An eval run's .meta.json recorded the method's planned config, layout 'official', on
    LLaVA-OneVision and InternVL, which have only 'spatial' and ran with it (apply takes the
    family's default layout); it now records the config as applied, and a rerun resumes."""
    ckpt, out_dir = family_checkpoints[model_type], tmp_path / "eval"
    argv = ["eval", "--model", ckpt, "--benchmarks", "mme", "--data-root", str(sample_data), "--protocol", "lmms-eval",
            "--retention-ratio", "0.25", "--limit", "1", "--output-dir", str(out_dir), "--no-progress", "--device", "cpu"]
    _run(argv, capsys)
    meta = json.loads((out_dir / "predictions" / "mme-test" / "globalcom2-R0.25.meta.json").read_text())
    assert meta["config"]["layout"] == _default_layout(model_type)
    _run(argv, capsys)  # the same run again: resumes (nothing to do), its meta file agrees


def test_generate_compare_names_the_method_it_times(family_checkpoints, capsys):
    """generate --compare said "timing the prefill with GlobalCom2" whatever --method was."""
    _, err = _run(["generate", "--model", family_checkpoints[FAMILIES[-1]], "--image", SAMPLE, "--prompt", "hi",
                   "--max-new-tokens", "1", "--method", "visionzip", "--compare", "--timing-runs", "1", "--device", "cpu"], capsys)
    assert "timing the prefill with visionzip (1 runs)" in err and "GlobalCom2" not in err


def test_wide_random_is_refused_for_families_without_wide_widths():
    """The wide random model exists for the families that declare real widths (their
    ``TinyGeometry.wide_vision`` / ``wide_text``); the check asks the family, not a family name."""
    from globalcom2.cli.loading import get_model
    from globalcom2.cli.output import CLIError

    wide = [t for t in FAMILIES if family_for_model_type(t).tiny.wide_vision is not None]
    assert "llava_next" in wide
    for model_type in (t for t in FAMILIES if t not in wide):
        with pytest.raises(CLIError, match=f"no wide random {family_for_model_type(model_type).display_name} model"):
            get_model("wide-random", "cpu", "auto", model_type=model_type)
