"""Unit tests of the pure tensor operations on hand-made inputs."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.models.llava_next.modeling_llava_next import unpad_image

from globalcom2.core import budgets, geometry, importance, layouts, plans


@pytest.mark.parametrize(
    "image_hw, grid_hw",
    [((480, 640), (48, 48)), ((300, 900), (24, 72)), ((1000, 300), (72, 24)), ((336, 336), (48, 48)),
     ((20, 4000), (24, 72)), ((4000, 20), (72, 24)), ((701, 499), (48, 48)), ((1, 1), (24, 48))],
)
def test_unpad_bounds_match_hf_unpad_image(image_hw, grid_hw):
    h, w = grid_hw
    grid = torch.arange(h * w).reshape(1, h, w)
    r0, r1, c0, c1 = geometry.unpad_bounds(image_hw, grid_hw)
    assert torch.equal(unpad_image(grid, list(image_hw)), grid[:, r0:r1, c0:c1])


def test_vanilla_count_matches_the_processor(tiny):
    _, processor = tiny
    for size in [(480, 640), (300, 900), (1000, 300), (336, 336), (20, 4000), (4000, 20), (777, 333)]:
        gh, gw = _grid(size)
        geom = geometry.crop_geometry(size, (gh, gw), 24)
        expected = processor._get_number_of_features(*size, 336, 336) - 1  # minus the CLS
        assert geom.vanilla_num_tokens() == expected, size


def _grid(size):
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape
    from globalcom2.models.llava_next import LLAVA_NEXT_PINPOINTS

    return get_anyres_image_grid_shape(list(size), LLAVA_NEXT_PINPOINTS, 336)


def test_extreme_aspect_ratio_leaves_no_crop_row():
    geom = geometry.crop_geometry((20, 4000), _grid((20, 4000)), 24)
    assert geom.valid_rows == 0 and geom.is_empty


def test_cls_logits_equal_the_cls_row_of_full_attention_logits():
    g = torch.Generator().manual_seed(0)
    v, t, heads, hd = 3, 10, 4, 8
    q = torch.randn(v, t, heads * hd, generator=g)
    k = torch.randn(v, t, heads * hd, generator=g)
    scale = hd**-0.5
    qh = q.view(v, t, heads, hd).transpose(1, 2)
    kh = k.view(v, t, heads, hd).transpose(1, 2)
    full = (qh.double() * scale) @ kh.double().transpose(-1, -2)  # (V, h, T, T): what an eager attention would build
    expected = full.mean(dim=1)[:, 0, 1:]
    got = importance.cls_attention_logits(q[:, 0], k, heads, scale)
    torch.testing.assert_close(got, expected)
    assert got.dtype == torch.float64  # machine-independent: see test_ties.py
    got_half = importance.cls_attention_logits(q[:, 0].bfloat16(), k.bfloat16(), heads, scale)
    assert got_half.dtype == torch.float64


def test_region_scores_sum_quadrants():
    imp = torch.arange(16, dtype=torch.float32)  # 4 x 4 map
    s = budgets.crop_region_scores(imp, (2, 2))
    m = imp.reshape(4, 4).double()
    expected = torch.stack([m[:2, :2].sum(), m[:2, 2:].sum(), m[2:, :2].sum(), m[2:, 2:].sum()])
    assert s.dtype == torch.float64
    torch.testing.assert_close(s, expected)


def test_region_scores_when_side_does_not_divide():
    # S = 5, 1 x 2 grid: columns 0-1 -> crop 0, columns 2-4 -> crop 1 (the last region takes the rest).
    imp = torch.ones(25)
    torch.testing.assert_close(budgets.crop_region_scores(imp, (1, 2)), torch.tensor([10.0, 15.0], dtype=torch.float64))
    # S = 2 with a 1 x 3 grid: max(S // 3, 1) = 1, so columns 0 and 1 map to crops 0 and 1, crop 2 gets nothing.
    torch.testing.assert_close(budgets.crop_region_scores(torch.ones(4), (1, 3)), torch.tensor([2.0, 2.0, 0.0], dtype=torch.float64))


def test_crop_ratios_follow_the_formula():
    g = torch.Generator().manual_seed(1)
    imp = torch.randn(576, generator=g) * 3
    r = budgets.crop_retention_ratios(imp, (2, 2), 0.25, 10.0)
    s = budgets.crop_region_scores(imp, (2, 2)).numpy()
    e = np.exp((s - s.max()) / 10.0)
    sigma = e / (e.sum() + 1e-8)
    expected = np.minimum(0.25 * (1 + sigma - sigma.mean()), 1.0)
    np.testing.assert_allclose(r.numpy(), expected, rtol=0, atol=1e-15)
    # Without clipping the budget is preserved on average.
    assert math.isclose(r.mean().item(), 0.25, rel_tol=1e-12)
    # At R = 1 ratios are clipped to 1 and below-average crops lose tokens.
    r1 = budgets.crop_retention_ratios(imp, (2, 2), 1.0)
    assert r1.max().item() == 1.0 and r1.min().item() < 1.0


def test_thumbnail_keeps_floor_of_n_r_most_important_in_descending_order():
    imp = torch.randn(576, generator=torch.Generator().manual_seed(2))
    idx = budgets.thumbnail_keep_indices(imp, 0.1)
    assert idx.shape == (57,)  # floor(57.6)
    vals = imp[idx]
    assert torch.all(vals[:-1] >= vals[1:])
    assert vals.min() >= imp.topk(57).values.min()


def _geom_2x1_wide():
    # S = 2, grid 2 rows x 1 column: joint grid 4 x 2; valid rows [1, 3).
    return geometry.CropGeometry(side=2, grid_h=2, grid_w=1, row0=1, row1=3, col0=0, col1=2)


def test_official_layout_writes_tokens_at_their_valid_index():
    geom = _geom_2x1_wide()
    valid = geometry.valid_mask(geom, torch.device("cpu"))
    assert valid.tolist() == [[False, False, True, True], [True, True, False, False]]
    keep = torch.tensor([[False, False, False, True], [True, False, False, False]])
    n, nl = 4, 12  # table: thumbnail 0-3, crop 0: 4-7, crop 1: 8-11, newline 12
    got = layouts._layout_official(keep, valid, geom, base=n, newline=nl)
    # crop 0 keeps position 3 (valid index 1) -> written at local position 1 = joint row 0;
    # crop 1 keeps position 0 (valid index 0) -> local position 0 = joint row 2; every row gets a newline.
    assert got.tolist() == [7, 12, 12, 8, 12, 12]


def test_spatial_layout_keeps_true_positions_of_unpadded_rows():
    geom = _geom_2x1_wide()
    keep = torch.tensor([[False, False, False, True], [True, False, False, False]])
    got = layouts._layout_spatial(keep, geom, base=4, newline=12)
    assert got.tolist() == [7, 12, 8, 12]


def test_official_layout_of_an_empty_area_is_empty():
    geom = geometry.CropGeometry(side=2, grid_h=1, grid_w=2, row0=1, row1=1, col0=0, col1=4)
    valid = geometry.valid_mask(geom, torch.device("cpu"))
    keep = torch.zeros_like(valid)
    assert layouts._layout_official(keep, valid, geom, base=4, newline=12).numel() == 0
    assert layouts._layout_spatial(keep, geom, base=4, newline=12).numel() == 0


def test_select_crop_tokens_counts_and_scores():
    g = torch.Generator().manual_seed(3)
    geom = geometry.crop_geometry((480, 640), (2, 2), 24)
    crops = torch.randn(4, 576, generator=g)
    thumb = torch.randn(576, generator=g)
    ratios = torch.tensor([0.3, 0.2, 0.25, 0.0], dtype=torch.float64)
    keep, valid, score = plans.select_crop_tokens(crops, thumb, geom, ratios)
    n_valid = valid.sum(1)
    assert n_valid.tolist() == [432, 432, 432, 432]  # 18 valid rows x 24 per crop
    assert keep.sum(1).tolist() == [int(n * r) for n, r in zip(n_valid.tolist(), ratios.tolist())]
    assert not (keep & ~valid).any()
    for j in range(3):
        kept, dropped = score[j][keep[j]], score[j][valid[j] & ~keep[j]]
        assert kept.min() >= dropped.max()
    # The score is the sum of the two L2-normalised parts over valid tokens.
    s = geom.side
    resized = F.interpolate(thumb.double().view(1, 1, s, s), size=(geom.valid_rows, geom.valid_cols), mode="bilinear", align_corners=False)[0, 0]
    glob = torch.zeros(geom.height, geom.width, dtype=torch.float64)
    glob[geom.row0:geom.row1, geom.col0:geom.col1] = resized
    glob0 = glob[:24, :24].reshape(-1)[valid[0]]
    expected0 = F.normalize(crops[0].double()[valid[0]], dim=0) + F.normalize(glob0, dim=0)
    torch.testing.assert_close(score[0][valid[0]], expected0)


def test_plan_counts_match_the_formulas():
    g = torch.Generator().manual_seed(4)
    geom = geometry.crop_geometry((300, 900), (1, 3), 24)
    imp = torch.randn(4, 576, generator=g)
    for layout in ("official", "spatial"):
        plan = plans.plan_image(imp, geom, 0.25, layout=layout)
        ratios = budgets.crop_retention_ratios(imp[0], (1, 3), 0.25)
        n_valid = plan.crop_valid.sum(1).tolist()
        crop_kept = sum(int(n * r) for n, r in zip(n_valid, ratios.tolist()))
        newlines = geom.height if layout == "official" else geom.valid_rows
        assert plan.num_tokens == 144 + crop_kept + newlines
        assert plan.crop_keep.sum().item() == crop_kept
        assert plan.index.max().item() == 576 * 4  # the newline row


def test_spatial_with_every_token_kept_is_the_vanilla_order():
    g = torch.Generator().manual_seed(5)
    geom = geometry.crop_geometry((480, 640), (2, 2), 24)
    imp = torch.randn(5, 576, generator=g)
    plan = plans.plan_image(imp, geom, 1.0, layout="spatial", crop_ratios=torch.ones(4, dtype=torch.float64))
    # Vanilla: thumbnail in raster order, then unpadded rows of the joint grid, each + newline.
    table = torch.arange(5 * 576).reshape(5, 576)
    joint = table[1:].reshape(2, 2, 24, 24).permute(0, 2, 1, 3).reshape(48, 48)[geom.row0:geom.row1]
    rows = torch.cat([joint, torch.full((joint.shape[0], 1), 5 * 576)], dim=1).reshape(-1)
    assert torch.equal(plan.index, torch.cat([table[0], rows]))


def test_single_view_plan():
    imp = torch.tensor([0.7, 0.1, 0.2, 0.9])
    # official: most important first; spatial: raster order; both end with the one newline (row N).
    assert plans.plan_single_view(imp, 0.5, "official").index.tolist() == [3, 0, 4]
    assert plans.plan_single_view(imp, 0.5, "spatial").index.tolist() == [0, 3, 4]


@pytest.mark.parametrize("ratio", [1.0, 0.01, 0.001])
def test_extreme_ratios_do_not_crash(ratio):
    g = torch.Generator().manual_seed(6)
    for size, grid in [((480, 640), (2, 2)), ((20, 4000), (1, 3))]:
        geom = geometry.crop_geometry(size, grid, 24)
        feats = torch.randn(1 + geom.num_crops, 576, 8, generator=g)
        imp = torch.randn(1 + geom.num_crops, 576, generator=g)
        for layout in ("official", "spatial"):
            tokens, plan = plans.compress_image(feats, imp, geom, torch.zeros(8), ratio, layout)
            assert tokens.shape == (plan.num_tokens, 8)
            assert plan.thumb_keep.numel() == int(576 * ratio)
            if geom.is_empty:
                assert plan.num_tokens == int(576 * ratio)  # thumbnail only


def test_gather_keeps_dtype_and_picks_rows():
    feats = torch.arange(2 * 3 * 2, dtype=torch.bfloat16).reshape(2, 3, 2)
    newline = torch.tensor([-1.0, -1.0])
    out = layouts.gather_features(feats, newline, torch.tensor([5, 6, 0]))
    assert out.dtype == torch.bfloat16
    assert out.tolist() == [[10.0, 11.0], [-1.0, -1.0], [0.0, 1.0]]


def test_plan_rejects_mismatched_shapes():
    geom = geometry.crop_geometry((480, 640), (2, 2), 24)
    with pytest.raises(ValueError, match="expected"):
        plans.plan_image(torch.zeros(3, 576), geom, 0.25)
    with pytest.raises(ValueError, match="layout"):
        plans.plan_image(torch.zeros(5, 576), geom, 0.25, layout="raster")
