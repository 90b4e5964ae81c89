"""VisionZip (methods/visionzip.py) against its rules written out token by token; the registry-driven
matrix (tests/test_matrix.py, tests/test_embeddings.py) runs it on every family and layout."""

from __future__ import annotations

import math

import torch

from globalcom2.core import geometry, layouts
from globalcom2.methods import VisionZipConfig, make_config


def reference_view(feats, imp, valid, ratio):
    """(kept positions, merged rows) of one view, by VisionZip's rules in plain Python."""
    n_valid = int(valid.sum())
    k = math.floor(n_valid * ratio)
    k_c = k * 10 // 64
    k_d = k - k_c
    cand = [i for i in range(len(imp)) if valid[i]]
    dominant = sorted(cand, key=lambda i: (-float(imp[i]), i))[:k_d]
    rest = [i for i in cand if i not in dominant]
    if k_c == 0:
        return sorted(dominant), {}
    step = max(1, len(rest) // k_c)
    targets = rest[::step][:k_c]
    groups = {t: [t] for t in targets}
    for i in rest:
        if i in targets:
            continue
        sims = [float(torch.nn.functional.cosine_similarity(feats[i], feats[t], dim=0)) for t in targets]
        groups[targets[max(range(len(sims)), key=lambda j: (sims[j], -j))]].append(i)
    merged = {t: torch.stack([feats[i] for i in g]).mean(0) for t, g in groups.items()}
    return sorted(dominant + targets), merged


def test_one_view_by_the_rules():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(1, 144, 6, generator=g)
    imp = torch.randn(1, 144, generator=g).double()
    cfg = VisionZipConfig(retention_ratio=0.5, layout="spatial")
    tokens, plan = cfg.compress(feats, imp, None, torch.zeros(6))
    kept, merged = reference_view(feats[0], imp[0], torch.ones(144, dtype=torch.bool), 0.5)
    assert plan.thumb_keep.tolist() == kept and len(kept) == 72 and len(merged) == 72 * 10 // 64
    want = torch.stack([merged.get(i, feats[0, i]) for i in kept] + [torch.zeros(6)])  # + the trailing newline
    torch.testing.assert_close(tokens, want)


def test_crops_merge_within_their_unpadded_tokens():
    g = torch.Generator().manual_seed(1)
    geom = geometry.crop_geometry((300, 900), (1, 3), 8)  # padded rows in every crop
    feats = torch.randn(4, 64, 5, generator=g)
    imp = torch.randn(4, 64, generator=g).double()
    cfg = make_config("visionzip", retention_ratio=0.5)
    tokens, plan = cfg.compress(feats, imp, geom, torch.zeros(5))
    valid = geometry.valid_mask(geom, "cpu")
    assert not (plan.crop_keep & ~valid).any()
    for j in range(3):
        kept, merged = reference_view(feats[1 + j], imp[1 + j], valid[j], 0.5)
        assert torch.nonzero(plan.crop_keep[j]).reshape(-1).tolist() == kept
        for t, row in merged.items():
            torch.testing.assert_close(plan.table[1 + j, t], row)
    # Tokens come from the merged table in the layout's order; keep-all is the identity.
    torch.testing.assert_close(tokens, layouts.gather_features(plan.table, torch.zeros(5), plan.index))
    tokens_all, plan_all = make_config("visionzip", retention_ratio=1.0).compress(feats, imp, geom, torch.zeros(5))
    torch.testing.assert_close(plan_all.table, feats)
