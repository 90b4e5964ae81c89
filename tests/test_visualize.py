"""Pictures of the kept tokens: masks agree with the plans, figures render and read cleanly, the CLI
writes PNGs."""

import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image

import globalcom2
from globalcom2.core import geometry, plans
from globalcom2.models import LlavaNextFamily
from globalcom2.cli import main
from globalcom2.picture import wrap_words
from globalcom2.visualize import RatioMasks, _kept_pixels, _model_views, _to_grid, visualize

from conftest import make_image

# (height, width): landscape 2x2, wide 1x3, tall 3x1, square 1x2, and both extremes where no crop
# row (or column) survives unpadding.
SIZES = [(480, 640), (300, 900), (1000, 300), (336, 336), (20, 4000), (4000, 20)]


def _joint_by_hand(crop_major: np.ndarray, gh: int, gw: int, s: int) -> np.ndarray:
    """(C, N) -> (H, W) by the definition: crop j = (row // S) * gw + col // S, p = (row % S) * S + col % S."""
    out = np.zeros((gh * s, gw * s), dtype=crop_major.dtype)
    for row in range(gh * s):
        for col in range(gw * s):
            out[row, col] = crop_major[(row // s) * gw + col // s, (row % s) * s + col % s]
    return out


def _encode(model, processor, image):
    adapter = LlavaNextFamily(model, globalcom2.GlobalCom2Config())
    inputs = processor(images=[image], text=["<image>"], return_tensors="pt")
    with torch.no_grad():
        return adapter, adapter.encode(inputs["pixel_values"], inputs["image_sizes"]), inputs


def _text_problems(fig) -> list:
    """Texts that overlap each other, leave the figure, or (figure-level ones) cover a panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    width, height = canvas.get_width_height()
    texts = [("fig", t) for t in fig.texts if t.get_text().strip()]
    for ax in fig.axes:
        texts += [("ax", t) for t in ax.texts if t.get_text().strip()]
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks():  # only the ticks that are drawn
                if lo - 1e-9 <= tick.get_loc() <= hi + 1e-9:
                    texts += [("ax", lab) for lab in (tick.label1, tick.label2) if lab.get_visible() and lab.get_text()]
    boxes = [(kind, t.get_text(), t.get_window_extent(renderer)) for kind, t in texts]
    problems = [("outside", s) for _, s, b in boxes if b.x0 < 0 or b.y0 < 0 or b.x1 > width or b.y1 > height]
    problems += [("overlap", s1, s2) for (_, s1, b1), (_, s2, b2) in itertools.combinations(boxes, 2) if b1.overlaps(b2)]
    panels = [ax.get_window_extent(renderer) for ax in fig.axes]
    problems += [("covers a panel", s) for kind, s, b in boxes if kind == "fig" and any(b.overlaps(p) for p in panels)]
    problems += [("panels overlap",) for a, b in itertools.combinations(panels, 2) if a.overlaps(b)]
    return problems


# -- the masks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_masks_match_the_plans(tiny, size):
    model, processor = tiny
    image = make_image(*size)
    vis = visualize(model, processor, image, (0.5, 0.1), heatmaps=True)
    adapter, encoded, _ = _encode(model, processor, image)
    for m in vis.masks:
        plan = adapter.compress(encoded, globalcom2.GlobalCom2Config(retention_ratio=m.retention_ratio)).plans[0]
        geom = plan.geometry
        # Thumbnail: exactly the kept indices.
        assert set(np.flatnonzero(m.thumb_kept.reshape(-1))) == set(plan.thumb_keep.tolist())
        assert m.thumb_kept.sum() == len(plan.thumb_keep) == math.floor(576 * m.retention_ratio)
        # Crops: the plan's (C, N) masks laid out on the joint grid by hand.
        assert m.crop_kept.shape == m.valid.shape == (geom.height, geom.width)
        assert np.array_equal(m.crop_kept, _joint_by_hand(plan.crop_keep.numpy(), geom.grid_h, geom.grid_w, 24))
        assert np.array_equal(m.valid, _joint_by_hand(plan.crop_valid.numpy(), geom.grid_h, geom.grid_w, 24))
        assert not (m.crop_kept & ~m.valid).any()  # kept crop tokens lie in the unpadded area
        assert m.valid.sum() == sum(m.crop_valid_counts) and m.crop_kept.sum() == sum(m.crop_kept_counts)
        assert m.crop_kept_counts == [math.floor(n * r) for n, r in zip(m.crop_valid_counts, plan.crop_ratios.tolist())]
        assert np.array_equal(m.crop_ratios, plan.crop_ratios.numpy())
        assert m.num_tokens == plan.num_tokens and m.vanilla_tokens == geom.vanilla_num_tokens()
        assert m.newlines == m.num_tokens - m.thumb_kept.sum() - m.crop_kept.sum() >= 0
        if geom.is_empty:
            assert m.valid.sum() == 0 and m.num_tokens == m.thumb_kept.sum()
            assert vis.notes
    maps = vis.importance
    assert maps.thumbnail.shape == (24, 24)
    assert np.allclose(maps.thumbnail.reshape(-1), encoded.importance[0][0].numpy())
    valid = vis.masks[0].valid
    for grid in (maps.global_on_crops, maps.local, maps.score):
        assert grid.shape == valid.shape
        assert np.isnan(grid[~valid]).all() and np.isfinite(grid[valid]).all()


def test_joint_grid_mapping_by_hand():
    geom = geometry.crop_geometry((480, 640), (2, 3), 4)
    x = np.arange(6 * 16).reshape(6, 16)
    assert np.array_equal(_to_grid(x, geom), _joint_by_hand(x, 2, 3, 4))
    # One token by hand: crop 4 (row 1, column 1), local index 6 (row 1, column 2) -> (5, 6).
    assert _to_grid(x, geom)[5, 6] == x[4, 6]


def test_wrap_words_fills_greedily_keeps_long_words_and_paragraphs():
    too_wide = lambda line: len(line) > 10  # noqa: E731
    assert wrap_words("aa bb cc dd ee", too_wide) == ["aa bb cc", "dd ee"]
    assert wrap_words("a verylongwordindeed b", too_wide) == ["a", "verylongwordindeed", "b"]
    assert wrap_words("one\ntwo three", too_wide) == ["one", "two three"]


def test_kept_tokens_have_the_best_scores(tiny):
    model, processor = tiny
    vis = visualize(model, processor, make_image(480, 640), (0.25,), heatmaps=True)
    m, score, geom = vis.masks[0], vis.importance.score, vis.geometry
    for j in range(geom.num_crops):
        rows = slice((j // geom.grid_w) * 24, (j // geom.grid_w + 1) * 24)
        cols = slice((j % geom.grid_w) * 24, (j % geom.grid_w + 1) * 24)
        kept, valid, sc = m.crop_kept[rows, cols], m.valid[rows, cols], score[rows, cols]
        if kept.any() and (valid & ~kept).any():
            assert sc[kept].min() >= sc[valid & ~kept].max()


@pytest.mark.parametrize("size", [(480, 640), (1000, 300), (20, 4000)])
def test_views_are_what_the_model_sees(tiny, size):
    """The thumbnail and the crop canvas drawn are the processor's pixel_values, de-normalised."""
    model, processor = tiny
    image = make_image(*size)
    adapter, encoded, inputs = _encode(model, processor, image)
    geom = encoded.geometries[0]
    ip = processor.image_processor
    mean, std = torch.tensor(ip.image_mean)[:, None, None], torch.tensor(ip.image_std)[:, None, None]
    pixels = ((inputs["pixel_values"][0] * std + mean) * 255).permute(0, 2, 3, 1).numpy()  # (P, 336, 336, 3)
    thumb, canvas, _ = _model_views(image, geom, 336)
    assert np.abs(pixels[0] - thumb).max() < 0.5
    crops = pixels[1 : 1 + geom.num_crops].reshape(geom.grid_h, geom.grid_w, 336, 336, 3)
    assert np.abs(crops.transpose(0, 2, 1, 3, 4).reshape(canvas.shape) - canvas).max() < 0.5


def test_token_pixels_kept_greyed_out_and_padding():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    keep = np.array([[True, False, False], [False, True, False]])
    valid = np.array([[True, True, False], [True, True, False]])
    out = _kept_pixels(pixels, keep, valid, 2).astype(int)
    cells = lambda a, r, c: a[2 * r : 2 * r + 2, 2 * c : 2 * c + 2]  # noqa: E731
    assert np.array_equal(cells(out, 0, 0), cells(pixels, 0, 0))  # kept: as it is
    grey = cells(out, 0, 1)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()  # dropped: grey
    pad = cells(out, 1, 2)
    assert (pad == pad[0, 0]).all()  # padding: one flat colour (hatched on the figure)


# -- the model is left alone, the vision tower runs once ----------------------------------------------


def test_model_state_is_left_as_it_was(tiny):
    model, processor = tiny
    visualize(model, processor, make_image(480, 640), (0.25,))
    assert not globalcom2.is_applied(model) and "forward" not in model.__dict__
    globalcom2.apply(model, retention_ratio=0.5, layout="spatial")
    adapter = globalcom2.get_family(model)
    forward = model.__dict__["forward"]
    visualize(model, processor, make_image(480, 640), (0.1, 0.25), heatmaps=True)
    assert globalcom2.get_family(model) is adapter and model.__dict__["forward"] is forward
    assert globalcom2.get_config(model) == globalcom2.GlobalCom2Config(retention_ratio=0.5, layout="spatial")
    assert adapter.last is None  # the applied adapter did not run
    assert torch.is_grad_enabled() and not model.training


def test_the_image_is_encoded_once(tiny, monkeypatch):
    model, processor = tiny
    calls = []
    tower = model.model.vision_tower  # its embeddings: the patched encode stops the tower's forward early
    handle = getattr(tower, "vision_model", tower).embeddings.register_forward_hook(lambda *a: calls.append(1))
    try:
        vis = visualize(model, processor, make_image(480, 640), (0.5, 0.25, 0.1), heatmaps=True)
    finally:
        handle.remove()
    assert len(calls) == 1 and len(vis.masks) == 3


# -- the figures -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, heatmaps",
    [((480, 640), True), ((480, 640), False), ((300, 900), True), ((1000, 300), True), ((336, 336), False),
     ((20, 4000), True), ((4000, 20), False)],
)
def test_figures_render_without_overlaps(tiny, tmp_path, size, heatmaps):
    model, processor = tiny
    vis = visualize(model, processor, make_image(*size), (0.5, 0.25, 0.1), heatmaps=heatmaps, random_weights=True,
                    prompt="What is written on the sign next to the lake, and what colour is the boat on the left?")
    assert _text_problems(vis.figure) == []
    texts = " ".join(t.get_text() for t in vis.figure.texts)
    assert "Random weights" in texts and "R = 0.5" in texts and "R = 0.1" in texts and "prompt:" in texts
    assert "kept token" in texts and "dropped token" in texts and "padding" in texts  # the legend
    if heatmaps:
        assert "What drove the decision" in texts
    # Crop labels: every crop has one, with its ratio and counts.
    geom = vis.geometry
    crop_ax = [ax for ax in vis.figure.axes if any(t.get_text().startswith(("r=", "all padding")) for t in ax.texts)]
    assert len(crop_ax) == 3
    labels = [t.get_text() for t in crop_ax[-1].texts if t.get_text().startswith(("r=", "all padding"))]
    m = vis.masks[-1]
    assert len(labels) == geom.num_crops
    for label, r, k, n in zip(labels, m.crop_ratios, m.crop_kept_counts, m.crop_valid_counts):
        assert label == (f"r={r:.2f} · {k}/{n}" if n else "all padding")
    if geom.is_empty:
        inside = " ".join(t.get_text() for ax in vis.figure.axes for t in ax.texts)
        assert "no unpadded crop tokens" in " ".join(inside.split())
    path = tmp_path / "fig.png"
    vis.save(str(path), dpi=50)
    with Image.open(path) as im:
        w, h = im.size
    inches = vis.figure.get_size_inches()
    assert abs(w - inches[0] * 50) <= 1 and abs(h - inches[1] * 50) <= 1
    assert 300 < w < 1000 and 300 < h < 2000


def test_figure_grows_with_rows_and_heatmaps(tiny):
    model, processor = tiny
    image = make_image(480, 640)
    one = visualize(model, processor, image, (0.25,)).figure.get_size_inches()
    three = visualize(model, processor, image, (0.5, 0.25, 0.1)).figure.get_size_inches()
    heat = visualize(model, processor, image, (0.5, 0.25, 0.1), heatmaps=True).figure.get_size_inches()
    assert three[1] > 2 * one[1] and heat[1] > three[1] and heat[0] >= three[0]


def test_no_pyplot_state_and_no_backend_switch(tiny):
    import matplotlib
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    backend = matplotlib.get_backend()
    before = plt.get_fignums()
    vis = visualize(tiny[0], tiny[1], make_image(336, 336), 0.25)
    assert matplotlib.get_backend() == backend  # notebooks keep their inline backend
    assert plt.get_fignums() == before  # nothing to close, nothing leaks
    assert isinstance(vis.figure, Figure) and vis.figure.axes
    assert isinstance(vis.masks[0], RatioMasks)


def test_bad_arguments(tiny):
    model, processor = tiny
    with pytest.raises(ValueError, match="retention_ratio"):
        visualize(model, processor, make_image(100, 100), (0.5, 1.5))
    with pytest.raises(ValueError, match="at least one"):
        visualize(model, processor, make_image(100, 100), ())
    with pytest.raises(ValueError, match="layout"):
        visualize(model, processor, make_image(100, 100), (0.5,), layout="zigzag")


def test_missing_matplotlib_names_the_extra(tiny, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(RuntimeError, match=r'pip install matplotlib \(from a globalcom2 checkout: pip install -e "\.\[plot\]"\)'):
        visualize(tiny[0], tiny[1], make_image(100, 100))


# -- the command line ----------------------------------------------------------------------------------


@pytest.fixture
def image_file(tmp_path):
    src = tmp_path / "img.png"
    make_image(480, 640).save(src)
    return src


def test_cli_writes_a_png_and_prints_counts(image_file, tmp_path, capsys):
    out = tmp_path / "vis.png"
    code = main(["visualize", "--image", str(image_file), "--retention-ratio", "0.5,0.1", "--heatmaps",
                 "--prompt", "What is this?", "--output", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.splitlines()
    assert lines[0] == f"wrote {out}"
    assert lines[1].startswith("R=0.5: ") and lines[2].startswith("R=0.1: ") and "crops r_j" in lines[1]
    assert "random" in captured.out.lower()
    assert "encoding the image once" in captured.err  # progress goes to stderr
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 800 and im.height > 800
    assert not list(tmp_path.glob(".*.tmp"))


def test_cli_labels_the_wide_random_model_as_random(tiny, image_file, tmp_path, capsys, monkeypatch):
    """``--model wide-random`` has random weights too: the figure and the note say so (regression:
    only ``tiny`` was labelled)."""
    from globalcom2.cli import loading

    asked = []
    monkeypatch.setattr(loading, "get_model", lambda model_id, *a, **k: asked.append(model_id) or tiny)
    out = tmp_path / "w.png"
    code = main(["visualize", "--model", "wide-random:1", "--image", str(image_file), "--output", str(out), "--dpi", "40"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert asked == ["wide-random:1"]
    assert "NOTE: wide-random:1 (random weights): which tokens are kept is meaningless" in captured.out


def test_cli_with_a_checkpoint_directory(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, processor = tiny
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    src = tmp_path / "img.png"
    make_image(1000, 300).save(src)
    out = tmp_path / "v.png"
    code = main(["visualize", "--model", str(ckpt), "--image", str(src), "--output", str(out), "--dpi", "40"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "R=0.25:" in captured.out and "random" not in captured.out.lower()
    with Image.open(out) as im:
        assert im.width > 200


@pytest.mark.parametrize(
    "args, message",
    [(["--image", "/no/such/image.png"], "not found"), (["--retention-ratio", "0.5,2"], "retention-ratio"),
     (["--retention-ratio", "abc"], "not a number"), (["--output", "/no/such/dir/x.png"], "does not exist"),
     (["--model", "/no/such/model"], "not found"), (["--dpi", "5"], "--dpi"),
     (["--method", "tome"], "unknown method"), (["--method", "fastervlm,random"], "one method"),
     (["--method", "random", "--method-arg", "seed=-2"], "seed")],
)
def test_cli_errors(image_file, tmp_path, capsys, args, message):
    argv = ["visualize", "--image", str(image_file), "--output", str(tmp_path / "o.png"), *args]
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("globalcom2: error:")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err
    assert not (tmp_path / "o.png").exists()


def test_cli_output_is_a_directory(image_file, tmp_path, capsys):
    assert main(["visualize", "--image", str(image_file), "--output", str(tmp_path)]) == 1
    assert "is a directory" in capsys.readouterr().err


def test_cli_without_matplotlib(image_file, tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    assert main(["visualize", "--image", str(image_file), "--output", str(tmp_path / "o.png")]) == 1
    err = capsys.readouterr().err
    assert "pip install matplotlib" in err and 'pip install -e ".[plot]"' in err and "globalcom2[plot]" not in err


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["visualize", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--image", "--model", "--retention-ratio", "--layout", "--output", "--heatmaps", "--prompt"):
        assert option in out


# -- other methods -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fastervlm", "random"])
def test_selection_methods_draw_their_own_plans(tiny, method):
    model, processor = tiny
    image = make_image(480, 640)
    vis = visualize(model, processor, image, (0.25,), method=method, options={"seed": 5} if method == "random" else None)
    assert vis.method == method and vis.layout == "spatial"
    adapter, encoded, _ = _encode(model, processor, image)
    cfg = globalcom2.methods.make_config(method, retention_ratio=0.25, **({"seed": 5} if method == "random" else {}))
    plan = adapter.compress(encoded, cfg).plans[0]
    m = vis.masks[0]
    assert m.num_tokens == plan.num_tokens
    assert m.thumb_kept.reshape(-1).nonzero()[0].tolist() == sorted(plan.thumb_keep.tolist())
    assert np.array_equal(m.crop_kept, _to_grid(plan.crop_keep.numpy(), plan.geometry))


def test_pooling_is_drawn_as_pooled(tiny):
    model, processor = tiny
    vis = visualize(model, processor, make_image(480, 640), (0.25,), method="pooling")
    m = vis.masks[0]
    assert m.pooled and vis.layout == "pooled"
    assert m.thumb_tokens == 144 and m.thumb_kept.all()
    assert np.array_equal(m.crop_kept, m.valid)  # every unpadded token feeds a pooled token
    assert m.num_tokens == m.thumb_tokens + m.crop_tokens + m.newlines and m.newlines == 18


@pytest.mark.parametrize("method", ["fastv", "globalcom2+fastv"])
def test_fastv_masks_are_the_tokens_left_after_layer_k(tiny, method):
    model, processor = tiny
    image = make_image(480, 640)
    vis = visualize(model, processor, image, (0.5,), method=method, prompt="What is this?")
    m = vis.masks[0]
    # The same run through the model: FastV's kept count, traced back onto the grids.
    from globalcom2.cli import build_prompt

    inputs = processor(images=[image], text=[build_prompt(processor, "What is this?")], return_tensors="pt")
    globalcom2.apply(model, method=method, retention_ratio=0.5)
    with torch.no_grad():
        model(**inputs)
    stats = globalcom2.last_stats(model)
    globalcom2.remove(model)
    assert m.num_tokens == stats.lm_visual_tokens[0]
    assert m.thumb_kept_count + int(m.crop_kept.sum()) + m.newlines == m.num_tokens
    assert not (m.crop_kept & ~m.valid).any()
    if method == "globalcom2+fastv":  # a subset of what GlobalCom2 kept
        gc2 = visualize(model, processor, image, (0.5,)).masks[0]
        assert not (m.crop_kept & ~gc2.crop_kept).any() and not (m.thumb_kept & ~gc2.thumb_kept).any()
    assert not globalcom2.is_applied(model)


def test_cli_draws_another_method(image_file, tmp_path, capsys):
    out = tmp_path / "m.png"
    code = main(["visualize", "--image", str(image_file), "--method", "pooling", "--output", str(out), "--dpi", "40"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "pooling averages every token" in captured.out and out.is_file()


def test_a_method_asking_for_another_signal_is_drawn_with_it(tiny):
    """visualize encoded with GlobalCom2's default signal ([CLS]) and compressed each method with
    it: a method asking for ``attention_received`` was drawn with [CLS] scores (issue 25)."""
    model, processor = tiny
    image = make_image(480, 640)
    inputs = processor(images=[image], text=["<image>"], return_tensors="pt")
    for signal in ("cls", "attention_received"):
        vis = visualize(model, processor, image, (0.25,), options={"importance": signal})
        plan = globalcom2.compress_images(model, inputs, retention_ratio=0.25, importance=signal).plans[0]
        assert set(np.flatnonzero(vis.masks[0].thumb_kept.reshape(-1))) == set(plan.thumb_keep.tolist())
        assert np.array_equal(vis.masks[0].crop_ratios, plan.crop_ratios.numpy())
