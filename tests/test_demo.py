"""The demo and the kept-token picture explain why R = 1 still drops crop tokens."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from globalcom2.core import geometry, layouts, plans
from globalcom2.demo import run_demo
from globalcom2.picture import full_ratio_note, picture_notes, render_kept_tokens

WHY = "Why tokens are dropped at R = 1"
RULE = "r_j = min(1, R x (1 + sigma_j - mean(sigma)))"


def _plan(retention_ratio: float, allocation: str = "softmax_sum") -> layouts.CompressionPlan:
    """A 2x2-crop plan whose thumbnail favours the top-left crop (so the others get r_j < 1 at R = 1)."""
    g = torch.Generator().manual_seed(0)
    geom = geometry.crop_geometry((480, 640), (2, 2), 24)
    imp = torch.rand(5, 576, generator=g)
    imp[0].view(24, 24)[:12, :12] += 3.0
    return plans.plan_image(imp, geom, retention_ratio, allocation=allocation)


def test_the_note_names_the_rule_and_the_short_crops_at_r1():
    note = full_ratio_note(1.0, [1.0, 0.9, 0.95, 1.0], [432, 388, 410, 432], [432, 432, 432, 432])
    assert note is not None and note.startswith(WHY)
    assert RULE in note and "(tau = 10)" in note and "below average" in note
    assert "capped at r_j = 1" in note
    assert "crop 2 (r = 0.900, kept 388/432), crop 3 (r = 0.950, kept 410/432)." in note
    assert "crop 1 " not in note and "crop 4 " not in note


@pytest.mark.parametrize(
    "ratio, kept",
    [(0.5, [216, 180]), (0.999, [431, 400]), (1.0, [432, 432])],  # R < 1, or nothing dropped
)
def test_no_note_below_r1_or_when_every_crop_keeps_all(ratio, kept):
    assert full_ratio_note(ratio, [min(1.0, ratio * 1.1), ratio * 0.9], kept, [432, 432]) is None


def test_the_note_states_the_configured_rule():
    note = full_ratio_note(1.0, [0.8], [100], [125], temperature=2.5, allocation="softmax_max")
    assert "(tau = 2.5)" in note and "largest importance" in note
    note = full_ratio_note(1.0, [0.8], [100], [125], allocation="topk_count")
    assert "r_j = min(1, R x C x c_j / sum(c))" in note and "tau" not in note


def test_picture_notes_of_a_real_plan():
    plan = _plan(1.0)
    short = [j for j, (k, t) in enumerate(zip(plan.crop_keep.sum(1).tolist(), plan.crop_valid.sum(1).tolist())) if k < t]
    assert short and 0 not in short  # the favoured crop keeps everything, some others do not
    notes = picture_notes(plan, note="random weights", retention_ratio=1.0)
    assert len(notes) == 2 and notes[0].startswith(WHY) and notes[1] == "random weights"
    for j in short:
        assert f"crop {j + 1} (r = {plan.crop_ratios[j].item():.3f}" in notes[0]
    assert picture_notes(plan, note="random weights") == ["random weights"]  # R not given: no claim
    assert picture_notes(_plan(0.5), retention_ratio=0.5) == []
    assert picture_notes(_plan(1.0, "uniform"), retention_ratio=1.0) == []  # r_j = R = 1: all kept


def test_the_r1_picture_carries_the_note():
    plan = _plan(1.0)
    image = Image.new("RGB", (640, 480), (120, 160, 200))
    plain = render_kept_tokens(image, plan, view=336)
    explained = render_kept_tokens(image, plan, view=336, retention_ratio=1.0)
    assert explained.width == plain.width and explained.height > plain.height  # room for the note
    assert render_kept_tokens(image, _plan(0.5), view=336, retention_ratio=0.5).height == plain.height


def test_the_demo_says_why_r1_drops_crop_tokens(tmp_path):
    lines: list[str] = []
    summary = run_demo(tmp_path, ratios=(1.0, 0.5), layouts=("official",), echo=lines.append)
    text = "\n".join(lines)
    assert text.count(WHY) == 1  # once, for R = 1 only
    paragraph = next(i for i, line in enumerate(lines) if WHY in line)
    note = " ".join(line.strip() for line in lines[paragraph:] if line.strip() and not line.startswith("Pictures"))
    full = next(r for r in summary["runs"] if r["retention_ratio"] == 1.0)
    short = [j for j, (k, t) in enumerate(zip(full["crop_kept"], full["crop_total"])) if k < t]
    assert short, "the tiny model's sample image should leave some crop below average"
    for j in short:
        assert f"crop {j + 1} (r = {full['crop_ratios'][j]:.3f}, kept {full['crop_kept'][j]}/{full['crop_total'][j]})" in note
    assert RULE in note
    assert json.loads((tmp_path / "summary.json").read_text())["runs"] == summary["runs"]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["kept_tokens_R0.50.png", "kept_tokens_R1.00.png"]



def test_the_demo_reads_a_16_bit_image_with_its_range(tmp_path, monkeypatch):
    """demo.py converted with PIL's convert("RGB"), which turns 16-bit PNGs pure white."""
    import numpy as np
    from PIL import Image

    import globalcom2.demo as demo

    path = tmp_path / "ramp16.png"
    Image.fromarray(np.linspace(0, 65535, 400 * 500).reshape(400, 500).astype(np.uint16)).save(path)
    seen = []
    real = demo.to_rgb
    monkeypatch.setattr(demo, "to_rgb", lambda im: seen.append(np.asarray(real(im))) or real(im))
    demo.run_demo(tmp_path / "out", image=path, ratios=[0.5], layouts=["spatial"], echo=lambda *_: None)
    assert seen and seen[0].min() == 0 and seen[0].max() == 255  # a ramp, not pure white
