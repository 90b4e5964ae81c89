"""The batched compression step's cost in ops (issue 28): aten ops per batch, counted, and the
fixed-count step as one compiled graph. The timings live in benchmarks/compression_step.py."""

import pytest
import torch

from globalcom2._opcount import OpCounter
from globalcom2._syncs import SyncCounter
from globalcom2.core import geometry
from globalcom2.core import plans as P
from globalcom2.core.batch import compress_batch, joint_importance, joint_rows, prepare_batch

N, SIDE, D = 576, 24, 8
SIZES = {(1, 2): (336, 672), (2, 1): (672, 336), (2, 2): (672, 672), (1, 3): (336, 1008), (3, 1): (1008, 336), (3, 3): (1008, 1008)}


def _batch(grids, seed=0):
    gen = torch.Generator().manual_seed(seed)
    geoms = [geometry.crop_geometry(SIZES[g], g, SIDE) for g in grids]
    views = [1 + g.num_crops for g in geoms]
    feats = list(torch.split(torch.randn(sum(views), N, D, generator=gen), views))
    imps = list(torch.split(torch.randn(sum(views), N, generator=gen, dtype=torch.float64), views))
    return feats, imps, geoms


def _count(feats, imps, geoms, **options):
    compress_batch(feats, imps, geoms, torch.zeros(D), 0.25, "official", **options)  # the host tables, once per shape
    with OpCounter() as ops:
        compress_batch(feats, imps, geoms, torch.zeros(D), 0.25, "official", **options)
    return ops


@pytest.mark.parametrize("grid", list(SIZES))
def test_one_image_is_a_few_dozen_kernels_on_every_grid(grid):
    ops = _count(*_batch([grid]))
    # HEAD before issue 28: 248 aten ops on every grid (about 150 kernels)
    assert ops.total <= 90 and ops.kernels <= 60, (ops.total, ops.kernels, ops.by_op)


def test_the_kernels_do_not_grow_with_the_batch():
    one = _count(*_batch([(2, 2)]))
    sixteen = _count(*_batch([(2, 2)] * 16))
    assert sixteen.kernels <= one.kernels + 2, (one.by_op, sixteen.by_op)
    mixed = _count(*_batch(list(SIZES) + [(2, 2), (1, 2)]))  # one interpolation and reduction per group
    assert mixed.kernels <= 90, mixed.by_op


def test_fixed_count_makes_no_host_sync_and_knows_its_lengths():
    feats, imps, geoms = _batch([(2, 2), (1, 3), (2, 1)])
    prep = prepare_batch(imps, geoms, 0.25, "official", count="fixed")
    assert prep.lengths is not None
    with SyncCounter() as syncs:
        out, lengths, _ = prep.run(joint_importance(imps))
    assert syncs.count == 0 and lengths == prep.lengths
    want = [P.plan_image(i, g, 0.25, "official", count="fixed").num_tokens for i, g in zip(imps, geoms)]
    assert lengths == want and out["index"].shape[0] == sum(want)


def test_the_fixed_count_step_compiles_to_one_graph():
    feats, imps, geoms = _batch([(2, 2), (1, 2)])
    newline = torch.randn(D)
    prep = prepare_batch(imps, geoms, 0.25, "spatial", count="fixed")
    table, rows = joint_rows(feats), joint_importance(imps)
    eager = prep.step(table, rows, newline)
    compiled = torch.compile(prep.step, fullgraph=True, backend="eager")  # graph capture: no break, no sync
    got = compiled(table, rows, newline)
    assert torch.equal(got, eager)
    want, _ = compress_batch(feats, imps, geoms, newline, 0.25, "spatial", count="fixed")
    assert torch.equal(eager, torch.cat(want))
