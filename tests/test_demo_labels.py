"""The demo says which number of a pair is which (issue 29, point 7) and its picture keeps every
header line inside the image for a tall image (point 8)."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from globalcom2.cli import main
from globalcom2.demo import run_demo
from globalcom2.picture import _BACKGROUND, _MARGIN


def _tall_image(tmp_path, image_factory):
    path = tmp_path / "tall.png"
    image_factory(672, 300).save(path)  # height 672, width 300: a 2x1 grid (two rows, one column)
    return path


def test_summary_json_labels_the_image_size_and_the_grid(tmp_path, image_factory):
    path = _tall_image(tmp_path, image_factory)
    lines: list[str] = []
    summary = run_demo(tmp_path / "out", image=path, ratios=(0.25,), layouts=("official",), echo=lines.append)
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written["image_size"] == summary["image_size"] == {"width": 300, "height": 672}
    assert written["grid"] == {"rows": 2, "columns": 1}
    text = "\n".join(lines)
    assert "300x672 px, width x height" in text  # the console's pair is labelled too
    assert "2x1 grid (rows x columns)" in text


def test_the_crops_caption_of_a_tall_image_stays_inside_the_picture(tmp_path, image_factory):
    path = _tall_image(tmp_path, image_factory)
    run_demo(tmp_path / "out", image=path, ratios=(0.25,), layouts=("official",), echo=lambda _: None)
    pixels = np.asarray(Image.open(tmp_path / "out" / "kept_tokens_R0.25.png").convert("RGB"))
    right_margin = pixels[:, -(_MARGIN // 2):]
    # Nothing is drawn in the right margin: a caption that ran past the edge was cut there
    # ("Crops: 2x1 grid of 336px views (336x672 c").
    assert (right_margin == np.array(_BACKGROUND, dtype=pixels.dtype)).all()


def test_the_demo_cli_writes_the_labelled_summary(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    width, height = summary["image_size"]["width"], summary["image_size"]["height"]
    assert f"{width}x{height} px, width x height" in out
    grid = summary["grid"]
    assert f"{grid['rows']}x{grid['columns']} grid (rows x columns)" in out


def test_the_visualize_header_labels_its_pairs():
    from types import SimpleNamespace

    from globalcom2.visualize.draw import _subtitle

    lay = {"width": 336, "height": 672, "new_width": 300, "new_height": 672}
    text = _subtitle("tiny", (300, 672), SimpleNamespace(grid_h=2, grid_w=1), lay, 336)
    assert "300x672 px (sizes: width x height)" in text and "2x1 crops (rows x columns)" in text
