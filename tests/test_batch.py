"""The batched planner (core/batch.py) against the per-image functions of core/plans.py.

Every plan field must be bit-identical (dtype, shape, values) to what plan_image / plan_joint /
plan_single_view return for the same image alone, ties included, and the tokens identical to
compress_image / compress_by_scores; the batch does one host sync whatever its size.
"""

import random

import pytest
import torch

from globalcom2 import methods
from globalcom2._syncs import SyncCounter
from globalcom2.core import geometry
from globalcom2.core import plans as P
from globalcom2.core.batch import compress_batch, joint_rows, plan_batch

GRIDS = [(1, 1), (1, 2), (2, 1), (2, 2), (1, 3), (3, 1), (3, 3), (2, 3), (3, 2)]
ALLOCATIONS = ("softmax_sum", "softmax_max", "uniform", "topk_count")
SCORINGS = ("global_local", "global_only", "local_only")
FIELDS = ("index", "thumb_keep", "crop_keep", "crop_valid", "crop_ratios", "thumb_importance", "crop_score")


def _reference(imp, geom, ratio, layout, joint, **options):
    if geom is None or imp.shape[0] == 1:
        return P.plan_single_view(imp[0], ratio, layout)
    if joint:
        return P.plan_joint(imp, geom, ratio, layout)
    return P.plan_image(imp, geom, ratio, layout, **options)


def assert_same_plan(got, want):
    for name in FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), name
    assert got.geometry == want.geometry and got.layout == want.layout
    assert got.num_tokens == want.num_tokens


def _image(rng, side, gen, single_share=0.25, levels=None):
    """A random image: importance (V, N) (quantised to ``levels`` values for ties) and geometry."""
    n = side * side
    if rng.random() < single_share:
        views, geom = 1, None
    else:
        grid = rng.choice(GRIDS)
        hw = (rng.randint(20, 3000), rng.randint(20, 3000))  # odd aspect ratios: padding, empty areas
        geom = geometry.crop_geometry(hw, grid, side)
        views = 1 + geom.num_crops
    imp = torch.randn(views, n, generator=gen)
    if levels:
        imp = torch.round(imp * levels) / levels
    return imp, geom


@pytest.mark.parametrize("layout", ["official", "spatial"])
@pytest.mark.parametrize("joint", [False, True])
def test_batched_plans_equal_the_per_image_functions(layout, joint):
    rng, gen = random.Random(7), torch.Generator().manual_seed(7)
    combos = [(a, s) for a in ALLOCATIONS for s in SCORINGS] if not joint else [(None, None)]
    for trial in range(48 if not joint else 24):
        side = 24 if trial % 8 == 0 else rng.choice([4, 5, 6, 8])
        batch = [_image(rng, side, gen, levels=rng.choice([None, 1, 2, 8])) for _ in range(rng.randint(1, 6))]
        imps, geoms = [b[0] for b in batch], [b[1] for b in batch]
        ratio = rng.choice([0.25, 0.1, 0.5, 1.0, 0.02])
        allocation, scoring = combos[trial % len(combos)]
        options = {} if joint else {"allocation": allocation, "scoring": scoring, "temperature": rng.choice([10.0, 0.5])}
        got = plan_batch(imps, geoms, ratio, layout, joint=joint, **options)
        assert len(got.plans) == len(batch) and got.lengths == [p.num_tokens for p in got.plans]
        for plan, imp, geom in zip(got.plans, imps, geoms):
            assert_same_plan(plan, _reference(imp, geom, ratio, layout, joint, **options))


def test_ties_everywhere_and_mixed_single_and_multi_view_batches():
    """Constant maps (every token tied) and two-level maps, single views between crop grids."""
    side, n = 6, 36
    geoms = [None, geometry.crop_geometry((100, 700), (1, 3), side), None, geometry.crop_geometry((900, 200), (3, 1), side),
             geometry.crop_geometry((500, 500), (2, 2), side), geometry.crop_geometry((40, 3000), (2, 2), side)]
    for fill in ("zeros", "two_levels"):
        imps = []
        for g in geoms:
            v = 1 if g is None else 1 + g.num_crops
            imps.append(torch.zeros(v, n) if fill == "zeros" else (torch.arange(v * n).reshape(v, n) % 2).float())
        for layout in ("official", "spatial"):
            for allocation in ALLOCATIONS:
                got = plan_batch(imps, geoms, 0.3, layout, allocation=allocation)
                for plan, imp, g in zip(got.plans, imps, geoms):
                    assert_same_plan(plan, _reference(imp, g, 0.3, layout, False, allocation=allocation))


@pytest.mark.parametrize("joint", [False, True])
def test_batched_tokens_equal_per_image_tokens_and_gather_once(joint):
    rng, gen = random.Random(3), torch.Generator().manual_seed(3)
    side, d = 6, 5
    for trial in range(12):
        batch = [_image(rng, side, gen) for _ in range(rng.randint(1, 5))]
        imps, geoms = [b[0] for b in batch], [b[1] for b in batch]
        views = [i.shape[0] for i in imps]
        feats = list(torch.split(torch.randn(sum(views), side * side, d, generator=gen), views))
        if trial % 3 == 0:
            feats = [f.clone() for f in feats]  # not one tensor: joint_rows concatenates
        newline = torch.randn(d, generator=gen) if trial % 4 else None
        layout = ("official", "spatial")[trial % 2]
        tokens, plans = compress_batch(feats, imps, geoms, newline, 0.25, layout, joint=joint)
        for t, p, f, imp, g in zip(tokens, plans, feats, imps, geoms):
            fn = P.compress_by_scores if joint else P.compress_image
            want_t, want_p = fn(f, imp, g, newline, 0.25, layout)
            assert torch.equal(t, want_t)
            assert_same_plan(p, want_p)


def test_joint_rows_addresses_split_features_without_a_copy():
    feats_all = torch.randn(7, 4, 3)
    parts = list(torch.split(feats_all, [2, 1, 4]))
    table = joint_rows(parts)
    assert table.data_ptr() == feats_all.data_ptr() and table.shape == (28, 3)
    assert torch.equal(joint_rows(parts[1:]), feats_all[2:].reshape(-1, 3))
    cloned = [p.clone() for p in parts]
    assert torch.equal(joint_rows(cloned), feats_all.reshape(-1, 3))


def test_gradients_reach_the_features_and_the_newline():
    side, d = 4, 3
    geom = geometry.crop_geometry((300, 500), (2, 2), side)
    feats_all = torch.randn(6, side * side, d, requires_grad=True)
    newline = torch.randn(d, requires_grad=True)
    feats = list(torch.split(feats_all, [5, 1]))
    imps = [torch.randn(5, side * side), torch.randn(1, side * side)]
    tokens, plans = compress_batch(feats, imps, [geom, None], newline, 0.5, "spatial")
    torch.cat(tokens).sum().backward()
    want = torch.zeros(6 * side * side)
    for i, p in enumerate(plans):
        rows = p.index[p.index < (1 + p.crop_keep.shape[0]) * side * side] + (0 if i == 0 else 5 * side * side)
        want.index_add_(0, rows, torch.ones(rows.shape[0]))
    assert torch.equal(feats_all.grad.sum(-1).reshape(-1), want * d)
    assert newline.grad is not None and bool((newline.grad > 0).all())


@pytest.mark.parametrize("method", ["globalcom2", "fastervlm", "random", "pooling"])
def test_every_methods_batch_equals_its_per_image_compress(method):
    rng, gen = random.Random(11), torch.Generator().manual_seed(11)
    side, d = 6, 4
    batch = [_image(rng, side, gen) for _ in range(5)]
    imps, geoms = [b[0] for b in batch], [b[1] for b in batch]
    views = [i.shape[0] for i in imps]
    feats = list(torch.split(torch.randn(sum(views), side * side, d, generator=gen), views))
    newline = torch.randn(d, generator=gen)
    config = methods.make_config(method, retention_ratio=0.3)
    tokens, plans = methods.compress_images(feats, imps, geoms, newline, config)
    for t, p, f, imp, g in zip(tokens, plans, feats, imps, geoms):
        want_t, want_p = config.compress(f, imp, g, newline)
        assert torch.equal(t, want_t)
        if method != "pooling":
            assert_same_plan(p, want_p)


@pytest.mark.parametrize("images", [1, 4, 16])
def test_batched_compress_does_one_host_sync_whatever_the_batch_size(images):
    rng, gen = random.Random(images), torch.Generator().manual_seed(images)
    side, d = 24, 8
    batch = [_image(rng, side, gen, single_share=0.2) for _ in range(images)]
    imps, geoms = [b[0] for b in batch], [b[1] for b in batch]
    views = [i.shape[0] for i in imps]
    feats = list(torch.split(torch.randn(sum(views), side * side, d, generator=gen), views))
    for method in ("globalcom2", "fastervlm", "random"):
        config = methods.make_config(method)
        with SyncCounter() as syncs:
            methods.compress_images(feats, imps, geoms, torch.zeros(d), config)
        assert syncs.count == 1, (method, syncs.by_op)


@pytest.mark.parametrize("chunk_bytes", [None, 1, 700, -1])
def test_gathering_in_runs_of_images_gives_the_same_tokens(chunk_bytes):
    from globalcom2.core.batch import gather_batch

    rng, gen = random.Random(5), torch.Generator().manual_seed(5)
    side, d = 5, 3
    batch = [_image(rng, side, gen) for _ in range(7)]
    imps, geoms = [b[0] for b in batch], [b[1] for b in batch]
    views = [i.shape[0] for i in imps]
    feats = list(torch.split(torch.randn(sum(views), side * side, d, generator=gen), views))
    newline = torch.randn(d, generator=gen)
    for layout in ("official", "spatial"):
        plan = plan_batch(imps, geoms, 0.4, layout)
        whole = gather_batch(feats, newline, plan, chunk_bytes=None)
        runs = gather_batch(feats, newline, plan, chunk_bytes=chunk_bytes)
        assert len(runs) == len(whole) and all(torch.equal(a, b) for a, b in zip(runs, whole))
        for t, f, imp, g in zip(runs, feats, imps, geoms):
            assert torch.equal(t, P.compress_image(f, imp, g, newline, 0.4, layout)[0])
