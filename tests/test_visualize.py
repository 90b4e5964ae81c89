"""Pictures of the kept tokens: masks agree with the plans, figures render, the CLI writes PNGs."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

import globalcom2
from globalcom2 import ops
from globalcom2.cli import main
from globalcom2.visualize import visualize

from conftest import make_image

SIZES = [(480, 640), (300, 900), (1000, 300), (336, 336), (20, 4000)]


def _joint_by_hand(crop_major: np.ndarray, gh: int, gw: int, s: int) -> np.ndarray:
    """(C, N) -> (H, W) by the definition: crop j = (row // S) * gw + col // S, p = (row % S) * S + col % S."""
    out = np.zeros((gh * s, gw * s), dtype=crop_major.dtype)
    for row in range(gh * s):
        for col in range(gw * s):
            out[row, col] = crop_major[(row // s) * gw + col // s, (row % s) * s + col % s]
    return out


@pytest.mark.parametrize("size", SIZES)
def test_masks_match_the_plans(tiny, size):
    model, processor = tiny
    image = make_image(*size)
    vis = visualize(model, processor, image, (0.5, 0.1), heatmaps=True)
    adapter = globalcom2.adapters.LlavaNextAdapter(model, globalcom2.GlobalCom2Config())
    inputs = processor(images=[image], text=["<image>"], return_tensors="pt")
    with torch.no_grad():
        encoded = adapter.encode(inputs["pixel_values"], inputs["image_sizes"])
    for m in vis.masks:
        plan = adapter.compress(encoded, globalcom2.GlobalCom2Config(retention_ratio=m.retention_ratio)).plans[0]
        geom = plan.geometry
        # Thumbnail: exactly the kept indices.
        assert set(np.flatnonzero(m.thumb_kept.reshape(-1))) == set(plan.thumb_keep.tolist())
        assert m.thumb_kept.sum() == math.floor(576 * m.retention_ratio)
        # Crops: the plan's (C, N) masks laid out on the joint grid by hand.
        assert np.array_equal(m.crop_kept, _joint_by_hand(plan.crop_keep.numpy(), geom.grid_h, geom.grid_w, 24))
        assert np.array_equal(m.valid, _joint_by_hand(plan.crop_valid.numpy(), geom.grid_h, geom.grid_w, 24))
        assert not (m.crop_kept & ~m.valid).any()
        assert m.crop_kept_counts == [int(n * r) for n, r in zip(m.crop_valid_counts, plan.crop_ratios.tolist())]
        assert m.num_tokens == plan.num_tokens and m.vanilla_tokens == geom.vanilla_num_tokens()
        if geom.is_empty:
            assert m.valid.sum() == 0 and m.num_tokens == m.thumb_kept.sum()
            assert vis.notes
    maps = vis.importance
    assert maps.thumbnail.shape == (24, 24)
    assert np.isnan(maps.score[~vis.masks[0].valid]).all()
    assert np.isfinite(maps.score[vis.masks[0].valid]).all()


def test_kept_tokens_have_the_best_scores(tiny):
    model, processor = tiny
    vis = visualize(model, processor, make_image(480, 640), (0.25,), heatmaps=True)
    m, score = vis.masks[0], vis.importance.score
    geom = vis.geometry
    for j in range(geom.num_crops):
        rows = slice((j // geom.grid_w) * 24, (j // geom.grid_w + 1) * 24)
        cols = slice((j % geom.grid_w) * 24, (j % geom.grid_w + 1) * 24)
        kept, valid, sc = m.crop_kept[rows, cols], m.valid[rows, cols], score[rows, cols]
        if kept.any() and (valid & ~kept).any():
            assert sc[kept].min() >= sc[valid & ~kept].max()


def test_model_state_is_left_as_it_was(tiny):
    model, processor = tiny
    visualize(model, processor, make_image(480, 640), (0.25,))
    assert not globalcom2.is_applied(model)
    globalcom2.apply(model, retention_ratio=0.5, layout="spatial")
    visualize(model, processor, make_image(480, 640), (0.1,))
    assert globalcom2.get_config(model) == globalcom2.GlobalCom2Config(retention_ratio=0.5, layout="spatial")


@pytest.mark.parametrize("size, heatmaps", [((480, 640), True), ((300, 900), False), ((1000, 300), True), ((20, 4000), True)])
def test_figures_render(tiny, tmp_path, size, heatmaps):
    model, processor = tiny
    vis = visualize(model, processor, make_image(*size), (0.5, 0.25), heatmaps=heatmaps, random_weights=True)
    path = tmp_path / "fig.png"
    vis.save(str(path), dpi=60)
    with Image.open(path) as im:
        assert im.width > 300 and im.height > 300
    texts = [t.get_text() for t in vis.figure.texts]
    assert any("Random weights" in t for t in texts)


def test_cli_writes_a_png_and_prints_counts(tmp_path, capsys):
    src = tmp_path / "img.png"
    make_image(480, 640).save(src)
    out = tmp_path / "vis.png"
    code = main(["visualize", "--image", str(src), "--retention-ratio", "0.5,0.1", "--heatmaps", "--output", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"wrote {out}" in captured.out and "R=0.5:" in captured.out and "R=0.1:" in captured.out
    assert "random" in captured.out.lower()
    with Image.open(out) as im:
        assert im.width > 800 and im.height > 800
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(
    "args, message",
    [(["--image", "/no/such/image.png"], "not found"), (["--retention-ratio", "0.5,2"], "retention-ratio"),
     (["--output", "/no/such/dir/x.png"], "does not exist")],
)
def test_cli_errors(tmp_path, capsys, args, message):
    src = tmp_path / "img.png"
    make_image(100, 100).save(src)
    argv = ["visualize", "--image", str(src), "--output", str(tmp_path / "o.png")]
    argv += args
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert "globalcom2: error:" in err and message in err and "Traceback" not in err
    assert not (tmp_path / "o.png").exists()


def test_joint_grid_helper_agrees_with_ops():
    geom = ops.crop_geometry((480, 640), (2, 3), 4)
    x = np.arange(6 * 16).reshape(6, 16)
    from globalcom2.visualize import _to_grid

    assert np.array_equal(_to_grid(x, geom), _joint_by_hand(x, 2, 3, 4))


def test_no_pyplot_state_and_no_backend_switch(tiny):
    import matplotlib
    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend()
    before = plt.get_fignums()
    vis = visualize(tiny[0], tiny[1], make_image(336, 336), (0.25,))
    assert matplotlib.get_backend() == backend  # notebooks keep their inline backend
    assert plt.get_fignums() == before  # nothing to close, nothing leaks
    assert vis.figure.axes
