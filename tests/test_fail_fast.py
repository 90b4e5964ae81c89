"""Fail fast, with one clear line: every mistake the user can make is found before any work (no
model loaded, nothing written) and reported as one ``globalcom2: error: ...`` line."""

from __future__ import annotations

from pathlib import Path

import pytest

from globalcom2.cli import main
from globalcom2.demo import sample_image_path

SAMPLE = str(sample_image_path())


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Nothing may try the network: the env var, and the hub's constant read at import time."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if any command gets as far as loading (or building) a model."""
    import globalcom2.cli.loading as cli

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "get_model", refuse)
    monkeypatch.setattr(cli, "load_model", refuse)
    monkeypatch.setattr(cli, "check_model_type", refuse)


def _error_line(capsys) -> str:
    """The one 'globalcom2: error:' line on stderr (no traceback, nothing on stdout)."""
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = [line for line in captured.err.splitlines() if line.startswith("globalcom2: error:")]
    assert len(lines) == 1, captured.err
    assert captured.out == ""
    return lines[0]


# -- 2. retention_ratio is never a --method-arg --------------------------------------------------------


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["generate", "--model", "./some-checkpoint", "--image", SAMPLE, "--prompt", "hi"], "--retention-ratio"),
        (["bench"], "--ratios"),
        (["visualize", "--image", SAMPLE], "--retention-ratio"),
        (["eval", "--model", "tiny", "--benchmarks", "mme", "--data-root", "."], "--retention-ratio"),
        (["bench", "--method", "fastv"], "--ratios"),  # FastV's own ratio too
    ],
)
def test_method_arg_retention_ratio_names_the_ratio_flag(argv, flag, capsys, no_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main([*argv, "--method-arg", "retention_ratio=0.5"])
    line = _error_line(capsys)
    assert code == 1
    assert "--method-arg: retention_ratio is not a method option" in line
    assert f"give it with {flag}, not --method-arg" in line
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_plan_settings_is_the_one_rule():
    from globalcom2.methods import MethodSetting, plan_settings

    settings = plan_settings(["globalcom2", "pooling", "random"], [0.5, 0.25], {"layout": "spatial", "seed": 3})
    assert [(s.method, s.ratio, s.options) for s in settings] == [
        ("globalcom2", 0.5, {"layout": "spatial"}), ("globalcom2", 0.25, {"layout": "spatial"}),
        ("pooling", 0.5, {}), ("pooling", 0.25, {}),
        ("random", 0.5, {"layout": "spatial", "seed": 3}), ("random", 0.25, {"layout": "spatial", "seed": 3}),
    ]
    assert all(isinstance(s, MethodSetting) and s.config.retention_ratio == s.ratio for s in settings)
    assert settings[0].label == "globalcom2 R=0.5"
    # a composition's FastV ratio is an option of its own
    (comp,) = plan_settings(["globalcom2+fastv"], [0.25], {"fastv_retention_ratio": 0.5})
    assert comp.config.fastv.retention_ratio == 0.5 and comp.config.retention_ratio == 0.25
    with pytest.raises(ValueError, match="retention_ratio is not a method option: give the ratios themselves"):
        plan_settings(["globalcom2"], [0.5], {"retention_ratio": 0.5})
    with pytest.raises(ValueError, match="give it with --ratios"):
        plan_settings(["fastv"], [0.5], {"retention_ratio": 0.5}, ratio_flag="--ratios")
    with pytest.raises(ValueError, match="^--retention-ratio: retention_ratio must be in"):
        plan_settings(["globalcom2"], [1.5], ratio_flag="--retention-ratio")
    with pytest.raises(ValueError, match="bogus belong to none of the methods pooling"):
        plan_settings(["pooling"], [0.5], {"bogus": 1})


def test_every_command_uses_the_same_rule():
    """bench.method_settings and eval's plan_runs are plan_settings underneath (same errors)."""
    from globalcom2.bench import method_settings
    from globalcom2.eval.runner import plan_runs

    for fn in (lambda o: method_settings(["globalcom2"], [0.5], o), lambda o: plan_runs([0.5], ["globalcom2"], o)):
        with pytest.raises(ValueError, match="retention_ratio is not a method option"):
            fn({"retention_ratio": 0.5})
        with pytest.raises(ValueError, match="bogus belong to none of the methods globalcom2"):
            fn({"bogus": 1})
    assert method_settings(["pooling"], [0.5]) == [("pooling R=0.5", "pooling", 0.5, {})]


# -- 4. output paths are checked before any work ------------------------------------------------------


def _outputs(tmp_path, blocker):
    """argv of every command writing into ``blocker/...`` (a file standing where a folder must be)."""
    data = tmp_path / "data"
    data.mkdir()
    return [
        ["demo", "--output-dir", str(blocker / "demo")],
        ["bench", "--plot", str(blocker / "bench.png")],
        ["visualize", "--image", SAMPLE, "--output", str(blocker / "kept.png")],
        ["eval", "--model", "tiny", "--benchmarks", "mme", "--data-root", str(data), "--output-dir", str(blocker / "ev")],
    ]


@pytest.fixture
def no_work(monkeypatch, no_model):
    import globalcom2.demo

    def refuse(*args, **kwargs):
        raise AssertionError("the demo ran before its output folder was checked")

    monkeypatch.setattr(globalcom2.demo, "run_demo", refuse)


def test_a_file_in_the_way_of_an_output_is_named_before_any_work(tmp_path, capsys, no_work):
    blocker = tmp_path / "FILE"
    blocker.write_text("x")
    for argv in _outputs(tmp_path, blocker):
        assert main(argv) == 1, argv
        line = _error_line(capsys)
        assert f"{blocker} is a file, not a directory" in line, (argv, line)
        assert "does not exist" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE", "data"] and blocker.read_text() == "x"


def test_a_missing_or_wrong_output_is_reported_before_any_work(tmp_path, capsys, no_work):
    """A file option's folder must exist (not created); a file option must not be a folder; a
    folder option must not be a file. All found before a model is loaded."""
    missing = tmp_path / "no-such-dir"
    cases = [
        (["bench", "--plot", str(missing / "b.png")], f"--plot: directory {missing} does not exist"),
        (["visualize", "--image", SAMPLE, "--output", str(missing / "v.png")], f"--output: directory {missing} does not exist"),
        (["bench", "--plot", str(tmp_path)], f"--plot: {tmp_path} is a directory"),
        (["visualize", "--image", SAMPLE, "--output", str(tmp_path)], f"--output: {tmp_path} is a directory"),
    ]
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    cases += [
        (["demo", "--output-dir", str(plain)], "--output-dir " + str(plain) + " exists and is not a directory"),
        (["eval", "--model", "tiny", "--benchmarks", "mme", "--data-root", str(tmp_path), "--output-dir", str(plain)],
         "exists and is not a directory"),
    ]
    for argv, expected in cases:
        assert main(argv) == 1, argv
        line = _error_line(capsys)
        assert expected in line, (argv, line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.txt"]


def test_eval_output_dir_is_created_only_when_written(tmp_path, capsys, no_work):
    """A missing --output-dir is fine (eval creates it when it writes), but a run that fails on
    another check leaves no empty folder behind."""
    out = tmp_path / "new" / "out"
    assert main(["eval", "--model", "tiny", "--benchmarks", "mme", "--data-root", str(tmp_path / "nope"),
                 "--output-dir", str(out)]) == 1
    assert "--data-root" in _error_line(capsys)
    assert not (tmp_path / "new").exists()


# -- 5. eval: every image file exists before the model is loaded --------------------------------------


def test_eval_names_the_missing_images_before_loading_the_model(tmp_path, capsys, no_model):
    from _eval_entry import make_toy

    data = make_toy(tmp_path / "data")  # 6 questions, 4 with an image: 0, 1, 3, 4.png
    images = data / "toyqa" / "images"
    (images / "1.png").unlink()
    (images / "4.png").unlink()
    out = tmp_path / "out"
    code = main(["eval", "--model", "tiny", "--benchmarks", "toyqa", "--data-root", str(data), "--output-dir", str(out),
                 "--retention-ratio", "1.0,0.5"])
    line = _error_line(capsys)
    assert code == 1
    assert f"2 of 4 images are missing, first: {images / '1.png'} (ToyQA val, sample 'q1')" in line
    assert not out.exists()  # nothing written


def test_check_images_skips_answered_and_embedded_images(tmp_path):
    import io

    from PIL import Image

    from _eval_entry import make_toy
    from globalcom2.eval import runner
    from globalcom2.eval.base import DataError, Sample, TableCell, image_file

    data = make_toy(tmp_path / "data")
    (data / "toyqa" / "images" / "1.png").unlink()
    (lb,) = runner.load_benchmarks(["toyqa"], data)
    runs = runner.plan_runs([1.0], ["globalcom2"])
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"^1 of 4 images are missing, first: .*1\.png"):
        runner.check_images([lb], runs, out)
    # a finished run re-scores without its images: only questions still to answer are checked
    main_file = runner.predictions_path(out, "toyqa", "val", "vanilla", 1.0)
    runner.append_records(main_file, [s.record("dog") for s in lb.samples])
    runner.check_images([lb], runs, out)
    with pytest.raises(DataError, match="1 of 4"):
        runner.check_images([lb])  # without runs: every sample
    # embedded images need no file
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    for ref in (png.getvalue(), {"bytes": png.getvalue(), "path": "/gone.png"}, "base64:AAAA", Image.new("RGB", (2, 2)),
                TableCell(tmp_path / "x.parquet", 0, 0, "image"), None):
        assert image_file(ref) is None
    assert image_file({"bytes": None, "path": "/gone.png"}) == image_file("/gone.png") == image_file(Path("/gone.png"))
    embedded = runner.LoadedBenchmark(lb.bench, "val", [Sample("e", "q", png.getvalue())])
    runner.check_images([embedded])


# -- 3. every image mode keeps its real range ----------------------------------------------------------


def _gradient16(height: int = 24, width: int = 64):
    """(H, W) uint16 left-to-right ramp over the whole 16-bit range, and its 8-bit equivalent."""
    import numpy as np

    ramp = np.linspace(0, 65535, width).round().astype(np.uint16)
    values = np.broadcast_to(ramp, (height, width)).copy()
    return values, np.rint(values / 65535 * 255).astype(np.uint8)


def _loaders():
    """Every image loader of the package, as ``path -> RGB PIL image``."""
    from PIL import Image

    from globalcom2.cli import load_image
    from globalcom2.eval.base import decode_image
    from globalcom2.integrations.lmms_eval import normalize_visuals

    def opened(path):
        with Image.open(path) as im:
            im.load()
            return decode_image(im)

    return {
        "cli.load_image": lambda p: load_image(str(p)),
        "eval decode_image(path)": lambda p: decode_image(str(p)),
        "eval decode_image(bytes)": lambda p: decode_image(p.read_bytes()),
        "eval decode_image(PIL)": opened,
        "lmms_eval normalize_visuals(path)": lambda p: normalize_visuals(str(p))[0],
        "lmms_eval normalize_visuals(PIL)": lambda p: normalize_visuals(Image.open(p))[0],
    }


def test_16_bit_png_keeps_its_range_in_every_loader(tmp_path):
    import numpy as np
    from PIL import Image

    values, expected = _gradient16()
    path = tmp_path / "ramp16.png"
    Image.fromarray(values).save(path)  # a real 16-bit greyscale PNG
    with Image.open(path) as im:
        assert im.mode in ("I;16", "I")  # what PIL decodes 16-bit PNGs to
        assert np.asarray(im.convert("RGB")).mean() > 250  # the bug: plain convert is (almost) white
    for name, load in _loaders().items():
        rgb = load(path)
        assert rgb.mode == "RGB", name
        pixels = np.asarray(rgb)
        assert np.array_equal(pixels, np.repeat(expected[:, :, None], 3, axis=2)), name
        assert abs(pixels.mean() - 127.5) < 2, name


@pytest.mark.parametrize("kind", ["I;16B", "I;16", "I (16-bit data)", "I (wide)", "F [0,1]", "F (wide)", "F NaN"])
def test_wide_modes_convert_by_their_range(kind):
    import numpy as np
    from PIL import Image

    from globalcom2._io import to_rgb

    values, expected = _gradient16()
    if kind == "I;16B":
        image = Image.fromarray(values.astype(">u2"))
    elif kind == "I;16":
        image = Image.fromarray(values)
    elif kind == "I (16-bit data)":
        image = Image.fromarray(values.astype(np.int32))
    elif kind == "I (wide)":  # negative and beyond 16 bits: its min..max
        image = Image.fromarray(values.astype(np.int32) * 1000 - 7_000_000)
    elif kind == "F [0,1]":
        image = Image.fromarray((values / 65535).astype(np.float32))
    elif kind == "F (wide)":
        image = Image.fromarray((values.astype(np.float32) - 30000) / 7)
    else:
        f = (values / 65535).astype(np.float32)
        f[0, 0] = np.nan
        image = Image.fromarray(f)
        expected = expected.copy()
        expected[0, 0] = 0
    assert image.mode == kind.split()[0]
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb is not image and image.mode == kind.split()[0]
    got = np.asarray(rgb).astype(int)
    assert np.abs(got - expected[:, :, None]).max() <= 1, kind  # float rounding of the stretch


def test_tiff_32_bit_files_in_the_cli_loader(tmp_path):
    import numpy as np
    from PIL import Image

    from globalcom2.cli import load_image

    values, expected = _gradient16()
    for mode, data in (("I", values.astype(np.int32)), ("F", (values / 65535).astype(np.float32))):
        path = tmp_path / f"{mode}.tif"
        Image.fromarray(data).save(path)
        with Image.open(path) as im:
            assert im.mode == mode
        assert np.abs(np.asarray(load_image(str(path))).astype(int) - expected[:, :, None]).max() <= 1, mode


def test_alpha_and_palette_transparency_are_dropped_not_composited(tmp_path):
    """The documented choice: transparency is dropped (as LLaVA's own evaluation does), the same
    in every loader; RGBA/LA keep their colours, a palette image its palette colours."""
    import warnings

    import numpy as np
    from PIL import Image

    from globalcom2._io import to_rgb

    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    la = Image.new("LA", (4, 4), (90, 0))
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    pal.info["transparency"] = 1
    path = tmp_path / "pal.png"
    pal.save(path, transparency=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PIL palette-transparency warning either
        assert to_rgb(rgba).getpixel((0, 0)) == (10, 20, 30)
        assert to_rgb(la).getpixel((0, 0)) == (90, 90, 90)
        assert to_rgb(pal).getpixel((0, 0)) == (200, 100, 50)
        for name, load in _loaders().items():
            assert np.asarray(load(path))[0, 0].tolist() == [200, 100, 50], name


def test_visualize_draws_a_16_bit_image_as_it_is():
    import numpy as np
    from PIL import Image

    from globalcom2.visualize import _model_views

    values, expected = _gradient16(336, 336)
    thumb, _, _ = _model_views(Image.fromarray(values), None, 336)
    assert abs(thumb.mean() - expected.mean()) < 2 and thumb.mean() < 200  # not white


# -- 1. --model: not found at once ----------------------------------------------------------------------


@pytest.fixture
def fresh_hub_answers(monkeypatch):
    import globalcom2.cli.loading as cli

    monkeypatch.setattr(cli, "_HUB_CHECKED", {}, raising=False)


@pytest.mark.parametrize(
    "model, expected",
    [
        ("./nope-dir", "model directory not found: ./nope-dir"),
        ("~/nope-dir", "model directory not found: ~/nope-dir"),
        ("a/b/nope-dir", "model directory not found: a/b/nope-dir"),
        ("nope-dir", "model not found: no local directory 'nope-dir', and hub ids look like org/name"),
        ("tiny", "--model tiny: the built-in random model 'tiny' is for demo, bench, visualize, embed, eval, not generate"),
    ],
)
def test_generate_model_not_found_at_once(model, expected, tmp_path, monkeypatch, capsys, fresh_hub_answers):
    import time

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE")  # even online: no hub request for what cannot be a hub model
    t0 = time.perf_counter()
    code = main(["generate", "--model", model, "--image", SAMPLE, "--prompt", "hi"])
    line = _error_line(capsys)
    assert code == 1 and expected in line, line
    assert time.perf_counter() - t0 < 10  # sanity bound: no hub retries


@pytest.mark.parametrize("command", [["bench"], ["visualize", "--image", SAMPLE]])
def test_bench_and_visualize_model_not_found(command, tmp_path, monkeypatch, capsys, fresh_hub_answers):
    monkeypatch.chdir(tmp_path)
    assert main([*command, "--model", "nope-dir"]) == 1
    assert "model not found: no local directory 'nope-dir'" in _error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_eval_model_not_found_before_the_data_is_read(tmp_path, capsys, fresh_hub_answers):
    (tmp_path / "data").mkdir()  # no MME data in it: the model is named first
    assert main(["eval", "--model", "./nope-dir", "--benchmarks", "mme", "--data-root", str(tmp_path / "data"),
                 "--output-dir", str(tmp_path / "out")]) == 1
    assert "model directory not found: ./nope-dir" in _error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_offline_and_not_cached_says_so(tmp_path, monkeypatch, capsys, fresh_hub_answers):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    assert main(["generate", "--model", "nobody-here/no-such-model", "--image", SAMPLE, "--prompt", "hi"]) == 1
    line = _error_line(capsys)
    assert "cannot load model 'nobody-here/no-such-model': not in the local cache" in line
    assert "HF_HUB_OFFLINE=1" in line and "local directory" in line


def _unreachable_hub(monkeypatch, tmp_path):
    """Online mode, with the hub at a local port nothing listens on (refused at once)."""
    import socket

    import huggingface_hub.constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    return f"http://127.0.0.1:{port}"


def test_an_unreachable_hub_is_one_quick_line(tmp_path, monkeypatch, capsys, fresh_hub_answers):
    import time

    endpoint = _unreachable_hub(monkeypatch, tmp_path)
    t0 = time.perf_counter()
    code = main(["generate", "--model", "nobody-here/no-such-model", "--image", SAMPLE, "--prompt", "hi"])
    line = _error_line(capsys)
    assert code == 1
    assert f"the Hugging Face hub ({endpoint}) is unreachable" in line
    assert "set HF_HUB_OFFLINE=1 to use cached models only, or pass a local directory" in line
    assert time.perf_counter() - t0 < 10  # sanity bound: one attempt, no retries


def test_an_unreachable_hub_uses_a_cached_copy(tmp_path, monkeypatch, capsys, fresh_hub_answers):
    from globalcom2.cli import hub_access

    _unreachable_hub(monkeypatch, tmp_path)
    snapshot = tmp_path / "cache" / "models--org--cached" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "cache" / "models--org--cached" / "refs").mkdir()
    (tmp_path / "cache" / "models--org--cached" / "refs" / "main").write_text("abc123")
    assert hub_access("org/cached") == {"local_files_only": True}
    assert "unreachable; using the cached copy of org/cached" in capsys.readouterr().err
    assert hub_access("org/cached") == {"local_files_only": True}  # asked once per process
    assert capsys.readouterr().err == ""
