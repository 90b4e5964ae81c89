"""``importance="similarity"`` (SPEC.md, "Importance without a [CLS] token"): per view, ``-cos`` of
each patch's features at the feature layer (what the projector receives) to the view's mean; the
default (``auto``) on towers without [CLS] (LLaVA-OneVision's SigLIP), an ablation elsewhere."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import globalcom2
from conftest import family_model, make_image
from globalcom2.core.importance import feature_similarity
from globalcom2.models import families


def test_feature_similarity_is_minus_the_cosine_to_the_view_mean():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, 7, generator=g)
    got = feature_similarity(x)
    want = -F.cosine_similarity(x.double(), x.double().mean(1, keepdim=True).expand_as(x), dim=-1)
    assert got.dtype == torch.float64 and got.shape == (3, 10)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(feature_similarity(x.bfloat16()), feature_similarity(x.bfloat16().float()))
    # A token equal to the mean is the least informative; its opposite the most.
    y = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]]])
    assert feature_similarity(y).argmax().item() == 3
    assert torch.isfinite(feature_similarity(torch.zeros(1, 4, 3))).all()  # zero features: no NaN


@pytest.mark.parametrize("family", [pytest.param(f, id=f.model_type) for f in families()])
def test_every_family_scores_what_the_projector_receives(family):
    model, processor = family_model(family)
    images = [make_image(480, 640, seed=0), make_image(300, 300, seed=1)]
    inputs = processor(images=[[im] for im in images], text=[f"{processor.image_token}\nWhat?"] * 2, return_tensors="pt", padding=True)
    seen = []
    # What the projector receives in the vanilla forward (every view; the patched model projects
    # the kept tokens only, where the method selects), or where the family says the scored features are.
    module, where = family.similarity_features(model)
    if where == "input":
        handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    else:  # (V, C, h, w) maps: (V, h*w, C) in raster order
        handle = module.register_forward_hook(lambda m, args, out: seen.append(
            out.detach().flatten(2).transpose(1, 2) if out.ndim == 4 else out.detach()))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    emb = globalcom2.compress_images(model, inputs, retention_ratio=0.25, importance="similarity")
    received = torch.cat(seen)  # (sum V, N, C): every view, in the model's order
    want = -F.cosine_similarity(received.double(), received.double().mean(1, keepdim=True).expand_as(received), dim=-1)
    got = torch.cat([p.thumb_importance[None] for p in emb.plans])  # each image's thumbnail row
    if want.shape[-1] != got.shape[-1]:  # patches, pixel-shuffled into tokens (Idefics3's connector): block means
        want = _block_means(want, got.shape[-1])
    # The thumbnail is the first view (LLaVA-NeXT, OneVision) or the last of an image's (InternVL).
    rows = {tuple(torch.round(r * 1e9).tolist()) for r in want}
    assert all(tuple(torch.round(g * 1e9).tolist()) in rows for g in got)


def _block_means(scores, tokens):
    """(V, P*P) patch scores -> (V, tokens): the mean of each token's s x s block, raster order."""
    p, side = math.isqrt(scores.shape[-1]), math.isqrt(tokens)
    s = p // side
    blocks = scores.reshape(-1, side, s, side, s)
    return blocks.mean(dim=(2, 4)).reshape(scores.shape[0], tokens)


def _tower_has_cls(model) -> bool:
    """Whether the model's vision tower holds a [CLS] embedding (CLIP's ``class_embedding``, InternViT's
    ``cls_token``, Llama 4's class embedding); SigLIP has none. Read from the weights, not the family."""
    return any(n.split(".")[-1] in ("class_embedding", "cls_token") for n, _ in model.named_parameters())


@pytest.mark.parametrize("family", [pytest.param(f, id=f.model_type) for f in families()])
def test_auto_is_similarity_on_siglip_and_cls_where_there_is_a_cls_token(family):
    model, processor = family_model(family)
    inputs = processor(images=[make_image(480, 640)], text=[f"{processor.image_token}\nWhat?"], return_tensors="pt")

    def thumb(**options):
        return globalcom2.compress_images(model, inputs, retention_ratio=0.25, **options).plans[0].thumb_importance

    default, similarity = thumb(), thumb(importance="similarity")
    if not _tower_has_cls(model):  # SigLIP: no [CLS]
        assert torch.equal(default, similarity)
        with pytest.raises(ValueError, match="cls"):
            thumb(importance="cls")
    else:
        assert torch.equal(default, thumb(importance="cls")) and not torch.equal(default, similarity)
