"""An independent, deliberately simple reference implementation of GlobalCom2 (SPEC.md).

This module is a test oracle. It is written from the text of ``SPEC.md`` only and never calls or
copies ``globalcom2.core`` (nor the families): every step is a plain Python loop over crops, rows
and tokens, with scores in float64, so that it can catch mistakes in the vectorised package.

Conventions (as in SPEC.md and Hugging Face LLaVA-NeXT):
    S           patches per side of one view; N = S * S tokens per view.
    gh, gw      crop grid rows and columns; crops numbered row by row (crop j at (j // gw, j % gw)).
    H, W        = gh * S, gw * S: the crops' joint token grid.
    views       thumbnail first, then the gh * gw crops, each in raster order.

Main entry points:
    :func:`reference_image`   one image -> its reference visual tokens (and every decision).
    :func:`reference_batch`   a processor batch -> the ``inputs_embeds`` and attention mask the
                              language model must receive under GlobalCom2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

TEMPERATURE = 10.0

# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------


def grid_shape(model: Any, image_hw: tuple[int, int]) -> tuple[int, int]:
    """(gh, gw): the AnyRes crop grid the model itself uses (transformers' own rule)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    cfg = model.config
    gh, gw = get_anyres_image_grid_shape(list(image_hw), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    return int(gh), int(gw)


def side_of(model: Any) -> int:
    vc = model.config.vision_config
    return vc.image_size // vc.patch_size


def unpad_bounds(image_hw: tuple[int, int], height: int, width: int) -> tuple[int, int, int, int]:
    """Valid rows [r0, r1) and columns [c0, c1) of an H x W grid, exactly as HF ``unpad_image``."""
    orig_h, orig_w = image_hw
    if orig_w / orig_h > width / height:
        new_h = int(round(orig_h * (width / orig_w), 7))
        pad = (height - new_h) // 2
        return pad, height - pad, 0, width
    new_w = int(round(orig_w * (height / orig_h), 7))
    pad = (width - new_w) // 2
    return 0, height, pad, width - pad


@dataclass(frozen=True)
class Geometry:
    side: int
    gh: int
    gw: int
    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def H(self) -> int:  # noqa: N802 - the SPEC's name
        return self.gh * self.side

    @property
    def W(self) -> int:  # noqa: N802
        return self.gw * self.side

    @property
    def num_crops(self) -> int:
        return self.gh * self.gw

    @property
    def valid_rows(self) -> int:
        return max(self.r1 - self.r0, 0)

    @property
    def valid_cols(self) -> int:
        return max(self.c1 - self.c0, 0)

    def crop_of(self, row: int, col: int) -> tuple[int, int]:
        """(crop index, position inside the crop) of a joint-grid cell."""
        s = self.side
        return (row // s) * self.gw + (col // s), (row % s) * s + (col % s)

    def cell_of(self, crop: int, pos: int) -> tuple[int, int]:
        """Joint-grid (row, col) of a crop's token."""
        s = self.side
        return (crop // self.gw) * s + pos // s, (crop % self.gw) * s + pos % s

    def is_valid(self, row: int, col: int) -> bool:
        return self.r0 <= row < self.r1 and self.c0 <= col < self.c1

    def valid_positions(self, crop: int) -> list[int]:
        """A crop's valid (unpadded) positions, raster order inside the crop."""
        out = []
        for pos in range(self.side * self.side):
            if self.is_valid(*self.cell_of(crop, pos)):
                out.append(pos)
        return out

    def vanilla_count(self) -> int:
        """Tokens vanilla LLaVA-NeXT feeds: thumbnail, then each unpadded row and its newline."""
        return self.side * self.side + self.valid_rows * (self.valid_cols + 1)


def geometry(model: Any, image_hw: tuple[int, int]) -> Geometry:
    s = side_of(model)
    gh, gw = grid_shape(model, image_hw)
    r0, r1, c0, c1 = unpad_bounds(tuple(int(v) for v in image_hw), gh * s, gw * s)
    return Geometry(side=s, gh=gh, gw=gw, r0=r0, r1=r1, c0=c0, c1=c1)


def num_views(model: Any, image_hw: tuple[int, int]) -> int:
    gh, gw = grid_shape(model, image_hw)
    return 1 + gh * gw


# ----------------------------------------------------------------------------------------------
# Vision side: features and [CLS] importance, computed without any hook
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def vision_outputs(model: Any, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected features (V, N, D) and CLS importance (V, N) float64 of the views of one image.

    Importance: the hidden state entering the last encoder layer, through that layer's
    ``layer_norm1``, ``q_proj`` and ``k_proj``; per head ``(q_cls * head_dim**-0.5) . k``,
    pre-softmax, mean over heads, CLS column dropped.
    """
    inner = model.model
    tower = inner.vision_tower
    out = tower(views, output_hidden_states=True, return_dict=True)
    hs = out.hidden_states
    layers = tower.encoder.layers if hasattr(tower, "encoder") else tower.vision_model.encoder.layers
    assert len(hs) == len(layers) + 1, "hidden_states must hold the embeddings plus every layer's output"
    last = layers[-1]
    x = last.layer_norm1(hs[-2])  # input of the last layer, normalised as the layer does
    q = last.self_attn.q_proj(x).double()  # (V, T, D)
    k = last.self_attn.k_proj(x).double()
    vc = model.config.vision_config
    heads = vc.num_attention_heads
    hd = vc.hidden_size // heads
    scale = hd**-0.5
    v_count, t, _ = k.shape
    imp = torch.zeros(v_count, t - 1, dtype=torch.float64)
    for v in range(v_count):
        for h in range(heads):
            qh = q[v, 0, h * hd : (h + 1) * hd] * scale  # (hd,)
            kh = k[v, 1:, h * hd : (h + 1) * hd]  # (N, hd): CLS column dropped
            imp[v] += kh @ qh
        imp[v] /= heads

    layer = model.config.vision_feature_layer
    assert isinstance(layer, int)
    feats = inner.multi_modal_projector(hs[layer][:, 1:])  # default strategy: drop CLS
    return feats, imp


# ----------------------------------------------------------------------------------------------
# The method, step by step
# ----------------------------------------------------------------------------------------------


def top_k(scores: list[float], candidates: list[int], k: int) -> list[int]:
    """The k candidates with the highest score, best first (ties: lower candidate first)."""
    order = sorted(candidates, key=lambda i: (-scores[i], i))
    return order[:k]


def l2_normalize(values: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in values))
    norm = max(norm, 1e-12)
    return [v / norm for v in values]


def bilinear_resize(grid: list[list[float]], out_h: int, out_w: int) -> list[list[float]]:
    """Bilinear resize with align_corners=False (PyTorch's convention), written out by hand."""
    in_h, in_w = len(grid), len(grid[0])

    def source(dst: int, in_size: int, out_size: int) -> tuple[int, int, float]:
        scale = in_size / out_size
        src = (dst + 0.5) * scale - 0.5
        src = max(src, 0.0)
        i0 = min(int(math.floor(src)), in_size - 1)
        i1 = min(i0 + 1, in_size - 1)
        return i0, i1, src - i0

    out = []
    for y in range(out_h):
        y0, y1, ly = source(y, in_h, out_h)
        row = []
        for x in range(out_w):
            x0, x1, lx = source(x, in_w, out_w)
            top = grid[y0][x0] * (1 - lx) + grid[y0][x1] * lx
            bottom = grid[y1][x0] * (1 - lx) + grid[y1][x1] * lx
            row.append(top * (1 - ly) + bottom * ly)
        out.append(row)
    return out


def crop_ratios(thumb: list[float], side: int, gh: int, gw: int, ratio: float, tau: float = TEMPERATURE) -> list[float]:
    """Step 2: r_j = min(1, R * (1 + sigma_j - mean(sigma))), in float64."""
    sums = [0.0] * (gh * gw)
    for i in range(side):
        gi = min(i // max(side // gh, 1), gh - 1)
        for j in range(side):
            gj = min(j // max(side // gw, 1), gw - 1)
            sums[gi * gw + gj] += thumb[i * side + j]
    top = max(sums)
    e = [math.exp((s - top) / tau) for s in sums]
    denom = sum(e) + 1e-8
    sigma = [x / denom for x in e]
    mean = sum(sigma) / len(sigma)
    return [min(1.0, ratio * (1.0 + s - mean)) for s in sigma]


# A token of the reference sequence: ("thumb", pos), ("crop", j, pos) or ("newline",).
Entry = tuple


@dataclass
class RefImage:
    """Every decision the reference took for one image, and its tokens."""

    layout: str
    ratio: float
    geometry: Geometry | None
    entries: list[Entry]
    thumb_keep: list[int]  # in emission order
    crop_keep: list[list[int]] = field(default_factory=list)  # kept true positions, per crop, sorted
    crop_valid: list[list[int]] = field(default_factory=list)  # valid positions, per crop
    crop_ratios: list[float] = field(default_factory=list)
    tokens: torch.Tensor | None = None  # (L, D)
    importance: torch.Tensor | None = None  # (V, N) float64
    features: torch.Tensor | None = None  # (V, N, D)

    @property
    def num_newlines(self) -> int:
        return sum(1 for e in self.entries if e[0] == "newline")

    @property
    def num_tokens(self) -> int:
        return len(self.entries)

    @property
    def vanilla_count(self) -> int:
        n = len(self.importance[0]) if self.importance is not None else None
        if self.geometry is None:
            return n + 1
        return self.geometry.vanilla_count()


def plan(
    importance: torch.Tensor,
    geom: Geometry | None,
    ratio: float,
    layout: str,
    tau: float = TEMPERATURE,
    ratios_override: list[float] | None = None,
) -> RefImage:
    """Steps 1-5 for one image, from its (V, N) importance. Returns the entries of the sequence."""
    assert layout in ("official", "spatial")
    imp = [[float(v) for v in row] for row in importance.tolist()]
    n = len(imp[0])
    thumb = imp[0]

    # Step 1: thumbnail.
    k_t = int(math.floor(n * ratio))
    thumb_keep = top_k(thumb, list(range(n)), k_t)  # descending importance
    if layout == "spatial":
        thumb_keep = sorted(thumb_keep)

    if geom is None or len(imp) == 1:  # a single view: compress it by importance, one newline
        entries = [("thumb", p) for p in thumb_keep] + [("newline",)]
        return RefImage(layout=layout, ratio=ratio, geometry=None, entries=entries, thumb_keep=thumb_keep)

    s, gh, gw = geom.side, geom.gh, geom.gw
    c = gh * gw
    assert len(imp) == 1 + c and n == s * s

    # Step 2: per-crop ratios.
    ratios = crop_ratios(thumb, s, gh, gw, ratio, tau) if ratios_override is None else list(ratios_override)

    # Step 3: valid tokens of each crop.
    valid = [geom.valid_positions(j) for j in range(c)]

    # Step 4: holistic scores. The global map covers the valid area's bounding box.
    glob_grid: dict[tuple[int, int], float] = {}
    if geom.valid_rows > 0 and geom.valid_cols > 0:
        thumb_map = [thumb[i * s : (i + 1) * s] for i in range(s)]
        resized = bilinear_resize(thumb_map, geom.valid_rows, geom.valid_cols)
        for y in range(geom.valid_rows):
            for x in range(geom.valid_cols):
                glob_grid[(geom.r0 + y, geom.c0 + x)] = resized[y][x]
    crop_keep = []
    for j in range(c):
        local = [imp[1 + j][p] for p in valid[j]]
        glob = [glob_grid[geom.cell_of(j, p)] for p in valid[j]]
        score_list = [a + b for a, b in zip(l2_normalize(local), l2_normalize(glob))] if valid[j] else []
        k_j = int(math.floor(len(valid[j]) * ratios[j]))
        best = top_k(score_list, list(range(len(valid[j]))), k_j)  # indices into valid[j]
        crop_keep.append(sorted(valid[j][b] for b in best))

    # Step 5: the crop part of the sequence.
    entries: list[Entry] = [("thumb", p) for p in thumb_keep]
    if layout == "official":
        if geom.valid_rows > 0 and geom.valid_cols > 0:
            # Kept token number m of crop j's valid list goes to position m of crop j.
            placed: dict[tuple[int, int], Entry] = {}
            for j in range(c):
                kept_j = set(crop_keep[j])
                for m, p in enumerate(valid[j]):
                    if p in kept_j:
                        placed[geom.cell_of(j, m)] = ("crop", j, p)
            for row in range(geom.H):
                for col in range(geom.W):
                    if (row, col) in placed:
                        entries.append(placed[(row, col)])
                entries.append(("newline",))
        # else: no crop token survives unpadding -> the kept thumbnail tokens only.
    else:
        kept = {(j, p) for j in range(c) for p in crop_keep[j]}
        for row in range(geom.r0, geom.r1):
            for col in range(geom.c0, geom.c1):
                j, p = geom.crop_of(row, col)
                if (j, p) in kept:
                    entries.append(("crop", j, p))
            entries.append(("newline",))

    return RefImage(
        layout=layout,
        ratio=ratio,
        geometry=geom,
        entries=entries,
        thumb_keep=thumb_keep,
        crop_keep=crop_keep,
        crop_valid=valid,
        crop_ratios=ratios,
    )


def materialize(entries: list[Entry], features: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    """(L, D) tokens of a list of entries: thumbnail/crop features and the image-newline row."""
    rows = []
    for e in entries:
        if e[0] == "thumb":
            rows.append(features[0, e[1]])
        elif e[0] == "crop":
            rows.append(features[1 + e[1], e[2]])
        else:
            rows.append(newline.to(features.dtype))
    if not rows:
        return features.new_zeros((0, features.shape[-1]))
    return torch.stack(rows)


def reference_image(
    model: Any,
    views: torch.Tensor,
    image_hw: tuple[int, int],
    ratio: float,
    layout: str,
    ratios_override: list[float] | None = None,
) -> RefImage:
    """GlobalCom2 for one image. ``views``: (V, 3, h, w), thumbnail first (padding views removed)."""
    image_hw = tuple(int(v) for v in image_hw)
    nv = views.shape[0]
    geom = geometry(model, image_hw) if nv > 1 else None
    if geom is not None:
        assert nv == 1 + geom.num_crops, f"{nv} views for a {geom.gh}x{geom.gw} grid"
    feats, imp = vision_outputs(model, views)
    ref = plan(imp, geom, ratio, layout, ratios_override=ratios_override)
    ref.importance = imp
    ref.features = feats
    ref.tokens = materialize(ref.entries, feats, model.model.image_newline.detach())
    return ref


# ----------------------------------------------------------------------------------------------
# Whole batch: what the language model must receive
# ----------------------------------------------------------------------------------------------


def image_views(model: Any, pixel_values: torch.Tensor, image_sizes: Any) -> list[torch.Tensor]:
    """Per image, its real views (the processor pads every image to the same view count)."""
    sizes = [tuple(int(v) for v in s) for s in torch.as_tensor(image_sizes).tolist()]
    out = []
    for i, hw in enumerate(sizes):
        out.append(pixel_values[i, : num_views(model, hw)])
    return out


@dataclass
class RefBatch:
    inputs_embeds: torch.Tensor  # (B, L', D)
    attention_mask: torch.Tensor  # (B, L')
    images: list[RefImage]
    lengths: list[int]  # real tokens per prompt


@torch.no_grad()
def reference_batch(model: Any, inputs: Any, ratio: float, layout: str) -> RefBatch:
    """The ``inputs_embeds`` and mask the language model must get for a processor batch.

    Per prompt: the real (unpadded) tokens' embeddings with each image's run of placeholders
    replaced by the image's reference tokens; then every prompt is padded on the left with the
    embedding of ``model.generation_config.pad_token_id``.
    """
    input_ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    sizes = [tuple(int(v) for v in s) for s in torch.as_tensor(inputs["image_sizes"]).tolist()]
    views = image_views(model, inputs["pixel_values"], inputs["image_sizes"])
    images = [reference_image(model, v, hw, ratio, layout) for v, hw in zip(views, sizes)]

    embed = model.get_input_embeddings()
    image_id = model.config.image_token_id
    pad_id = model.generation_config.pad_token_id
    rows: list[torch.Tensor] = []
    next_image = 0
    for b in range(input_ids.shape[0]):
        ids = [int(t) for t, m in zip(input_ids[b].tolist(), mask[b].tolist()) if m]
        pieces = []
        i = 0
        while i < len(ids):
            if ids[i] == image_id:
                img = images[next_image]
                count = img.vanilla_count
                assert ids[i : i + count] == [image_id] * count, "placeholder run shorter than the vanilla count"
                pieces.append(img.tokens)
                next_image += 1
                i += count
            else:
                j = i
                while j < len(ids) and ids[j] != image_id:
                    j += 1
                pieces.append(embed(torch.tensor(ids[i:j])))
                i = j
        rows.append(torch.cat(pieces) if pieces else embed.weight.new_zeros((0, embed.weight.shape[1])))
    assert next_image == len(images), "more images than placeholder runs"

    length = max(r.shape[0] for r in rows)
    pad = embed(torch.tensor([pad_id]))[0]
    out = pad.expand(len(rows), length, pad.shape[0]).clone()
    new_mask = torch.zeros(len(rows), length, dtype=mask.dtype)
    for b, r in enumerate(rows):
        out[b, length - r.shape[0] :] = r
        new_mask[b, length - r.shape[0] :] = 1
    return RefBatch(inputs_embeds=out, attention_mask=new_mask, images=images, lengths=[r.shape[0] for r in rows])
