"""GlobalCom2 for Hugging Face Phi-4-multimodal (``Phi4MultimodalForCausalLM``,
``Phi4MultimodalModel``; ``microsoft/Phi-4-multimodal-instruct``).

What the model does (read from ``transformers`` 5.x ``modeling_phi4_multimodal`` /
``image_processing_phi4_multimodal`` / ``processing_phi4_multimodal``):

* Dynamic HD: the image is resized (aspect kept) into a ``rows x cols`` grid of 448 px crops (at
  most ``dynamic_hd`` = 36) and padded at the right and bottom; its views are the whole padded
  canvas squeezed to 448 x 448 (the **global view, first** in ``image_pixel_values``) and the crops
  row by row. ``image_attention_mask`` marks the padded patches; ``image_sizes`` is the canvas size.
* SigLIP 448/14 without [CLS] (32 x 32 patches, features of ``feature_layer`` = -2), then a 2 x 2
  average pool (``image_token_compression``): S = 16, N = 256 tokens per view.
* The model's sequence for one image (one run of ``<|image|>`` placeholders, all of them image
  tokens): the crops' joint ``rows*16 x cols*16`` token grid cut to its unpadded rows/columns, row
  by row, **each row followed by ``sub_GN``** (a learned newline); then **``glb_GN``** (a learned
  separator); then the global view's 16 rows, each followed by ``sub_GN``. Everything goes through
  the projector (Linear, GELU, Linear) together, so the separators are projected rows too.

How GlobalCom2 maps onto it (``SPEC.md``, "Any further family with a global view"):

* Image features are the token rows only; ``sub_GN`` / ``glb_GN`` rows are separators and always
  kept (``rows_unpadded + 1 + 16`` of them, content-independent, so ``count="fixed"`` stays a
  function of the size). :meth:`Phi4MultimodalFamily.encode` runs the model's own
  ``get_img_features`` and builds and projects each image's vanilla sequence exactly as the model
  does; the features handed to the methods are rows gathered from that projected sequence, so
  keep-all equals vanilla bit for bit.
* Views thumbnail (global) first with a :class:`~globalcom2.core.geometry.CanvasCropGeometry` whose
  unpadded rectangle is ``[0, useful_h) x [0, useful_w)`` (the model's own unpadding: padding sits
  at the bottom / right). The processor's global view is the padded canvas resized, so Step 2's
  regions are the crop grid's on the whole thumbnail and Step 4 stretches the thumbnail's map over
  the whole ``rows*16 x cols*16`` grid, padding included, then reads the unpadded part (not the
  map squeezed into the unpadded area). :meth:`Phi4MultimodalFamily.compress` writes the model's order: crop
  rows (kept tokens, raster order) each with its ``sub_GN``, ``glb_GN``, global rows (kept tokens)
  each with its ``sub_GN``.
* Importance: ``auto`` = ``similarity`` (no [CLS]) on the pooled tokens (what the projector
  receives, as InternVL's ablation does on the folded tokens); ``attention_received`` (ablation)
  from the last tower layer's captured q/k per patch, mapped to tokens by pushing the patch map
  through the model's own pool (mean over the 2 x 2 patches of a token). ``cls`` is refused.
* One placeholder run per image (the processor writes one); layout ``spatial`` only.
* Audio: a call with audio and images is refused while a vision method is applied (the tiny model
  keeps the audio encoder minimal).
* The stock image processor needs torchvision (absent here): the tiny model uses
  :func:`_tiny_image_processor_class`, the same crop layout, masks and counts with PIL / torch
  resizing (pixel values differ slightly from torchvision's; nothing else does).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import methods as _methods
from .._lazy import lazy_module
from .base import Family, TinyGeometry, register_family
from .capture import QKCapture
from .images import CompressedImages, EncodedImages

if TYPE_CHECKING:  # pragma: no cover
    from ..core.geometry import CropGeometry
    from ..methods.base import VisionMethodConfig

torch = lazy_module("torch")
layouts = lazy_module("globalcom2.core.layouts")
tiles = lazy_module("globalcom2.core.tiles")

#: View side and patch size in pixels, most crops per image (the checkpoint's processor settings).
VIEW_SIZE, PATCH_SIZE, MAX_CROPS = 448, 14, 36
#: Most crops of the tiny processor (the checkpoint uses 36; fewer keeps CPU tests quick).
TINY_MAX_CROPS = 6


def crop_layout(height: int, width: int, view: int = VIEW_SIZE, patch: int = PATCH_SIZE, max_crops: int = MAX_CROPS) -> tuple[int, int, int, int, int, int]:
    """The processor's dynamic-HD rule for an image of ``height x width``: ``(rows, cols, new_h,
    new_w, valid_patch_rows, valid_patch_cols)``: the crop grid, the size the image is resized to
    (then padded right / bottom to ``rows*view x cols*view``) and the unmasked patches."""
    cols, rows = math.ceil(width / view), math.ceil(height / view)
    if cols * rows > max_crops:
        aspect = width / height
        grids = sorted({(i, j) for i in range(1, max_crops + 1) for j in range(1, max_crops + 1) if i * j <= max_crops},
                       key=lambda g: g[0] * g[1])
        best, diff = (1, 1), float("inf")
        for g in grids:  # closest aspect; on a tie the larger grid when the image fills half of it
            d = abs(aspect - g[0] / g[1])
            if d < diff:
                best, diff = g, d
            elif d == diff and width * height > 0.5 * view * view * g[0] * g[1]:
                best = g
        cols, rows = best
    tw, th = view * cols, view * rows
    if tw / width < th / height:
        new_w, new_h = tw, int(height * tw / width)
    else:
        new_w, new_h = int(width * th / height), th
    if min(new_h, th) < 10 or min(new_w, tw) < 10:
        raise ValueError(f"the aspect ratio is very extreme {(new_w, new_h)}")
    pad_w, pad_h = tw - new_w, th - new_h
    side = view // patch
    vr = rows * side - (pad_h // patch if pad_h >= patch else 0)
    vc = cols * side - (pad_w // patch if pad_w >= patch else 0)
    return rows, cols, new_h, new_w, vr, vc


def _tokens_valid(patches: int) -> int:
    """Tokens of the 2 x 2 pool whose top-left patch is valid (the model reads the mask at ``0::2``)."""
    return (patches + 1) // 2


def _geometry(rows: int, cols: int, useful_h: int, useful_w: int, side: int) -> Any:
    """The crop grid with its unpadded area at the top left; a canvas geometry: the global view is
    the padded canvas squeezed to one view (the processor resizes the padded image), so Step 4
    stretches the global map over the whole grid, padding included, and reads the unpadded part."""
    from ..core.geometry import CanvasCropGeometry

    return CanvasCropGeometry(side=side, grid_h=rows, grid_w=cols, row0=0, row1=useful_h, col0=0, col1=useful_w)


def _tiny_image_processor_class() -> type:
    """A PIL image processor with Phi4MultimodalImageProcessor's dynamic HD (the tiny model, no torchvision)."""
    import numpy as np
    from transformers.image_processing_backends import PilBackend
    from transformers.image_processing_utils import BatchFeature
    from transformers.image_utils import PILImageResampling, SizeDict
    from transformers.processing_utils import ImagesKwargs

    class Phi4HDKwargs(ImagesKwargs, total=False):
        patch_size: int
        dynamic_hd: int

    class Phi4MultimodalImageProcessorPil(PilBackend):
        """Phi-4-multimodal's views (global first, crops row by row, white padding right / bottom,
        the patch mask and ``num_img_tokens``) with PIL resizing of the canvas."""

        resample = PILImageResampling.BICUBIC
        size = {"height": VIEW_SIZE, "width": VIEW_SIZE}
        patch_size = PATCH_SIZE
        dynamic_hd = MAX_CROPS
        image_mean = [0.5, 0.5, 0.5]
        image_std = [0.5, 0.5, 0.5]
        do_rescale = True
        do_normalize = True
        do_convert_rgb = True
        valid_kwargs = Phi4HDKwargs
        model_input_names = ["image_pixel_values", "image_sizes", "image_attention_mask"]

        def get_number_of_image_tokens(self, height: int, width: int, images_kwargs: dict | None = None) -> int:
            kw = self._merge_and_standardize_kwargs(**(images_kwargs or {}))
            view = int(kw["size"].height)
            rows, cols, _, _, vr, vc = crop_layout(height, width, view, kw["patch_size"], kw["dynamic_hd"])
            s = view // kw["patch_size"] // 2
            uh, uw = _tokens_valid(vr), _tokens_valid(vc)
            return s * s + 1 + uh * uw + uh + s

        def _preprocess(self, images, size, resample, do_rescale, rescale_factor, do_normalize, image_mean, image_std,
                        patch_size, dynamic_hd, return_tensors=None, **kwargs):
            view = int(size.height)
            side = view // patch_size
            views, masks, counts, sizes = [], [], [], []
            for image in images:  # (C, H, W) uint8
                h, w = image.shape[-2:]
                rows, cols, nh, nw, vr, vc = crop_layout(h, w, view, patch_size, dynamic_hd)
                canvas = self.resize(image, SizeDict(height=nh, width=nw), resample=PILImageResampling.BILINEAR)
                canvas = np.pad(canvas, ((0, 0), (0, rows * view - nh), (0, cols * view - nw)), constant_values=255)
                canvas = self.rescale(canvas.astype(np.float32), rescale_factor) if do_rescale else canvas
                canvas = self.normalize(canvas, image_mean, image_std) if do_normalize else canvas
                pixels = torch.from_numpy(np.ascontiguousarray(canvas, dtype=np.float32))
                glob = torch.nn.functional.interpolate(pixels[None], size=(view, view), mode="bicubic", align_corners=False)
                crops = pixels.reshape(3, rows, view, cols, view).permute(1, 3, 0, 2, 4).reshape(-1, 3, view, view)
                views.append(torch.cat([glob, crops]))
                mask = torch.zeros(rows * side, cols * side)
                mask[:vr, :vc] = 1
                mask = mask.reshape(rows, side, cols, side).transpose(1, 2).reshape(-1, side, side)
                masks.append(torch.cat([torch.ones(1, side, side), mask]))
                s = side // 2
                uh, uw = _tokens_valid(vr), _tokens_valid(vc)
                counts.append(s * s + 1 + uh * uw + uh + s)
                sizes.append([rows * view, cols * view])
            most = max(v.shape[0] for v in views)
            pv = torch.stack([torch.cat([v, v.new_zeros(most - v.shape[0], *v.shape[1:])]) for v in views])
            am = torch.stack([torch.cat([m, m.new_ones(most - m.shape[0], *m.shape[1:])]) for m in masks])
            data = {"image_pixel_values": pv, "image_sizes": torch.tensor(sizes, dtype=torch.long),
                    "image_attention_mask": am, "num_img_tokens": counts}
            return BatchFeature(data=data, tensor_type=return_tensors)

    return Phi4MultimodalImageProcessorPil


def _tiny_processor_class() -> type:
    """Phi4MultimodalProcessor with its audio processor made when none is given (the tiny model's)."""
    from transformers import Phi4MultimodalFeatureExtractor, Phi4MultimodalProcessor

    class TinyPhi4MultimodalProcessor(Phi4MultimodalProcessor):
        def __init__(self, image_processor: Any = None, audio_processor: Any = None, tokenizer: Any = None, **kwargs: Any) -> None:
            super().__init__(image_processor, audio_processor or Phi4MultimodalFeatureExtractor(), tokenizer, **kwargs)

    return TinyPhi4MultimodalProcessor


def __getattr__(name: str) -> Any:  # the classes by name (TinyGeometry's dotted paths, saved processors)
    if name == "Phi4MultimodalImageProcessorPil":
        return _tiny_image_processor_class()
    if name == "TinyPhi4MultimodalProcessor":
        return _tiny_processor_class()
    raise AttributeError(name)


@dataclass
class _Encoded(EncodedImages):
    """:class:`EncodedImages` plus, per image, its projected ``sub_GN`` and ``glb_GN`` rows (2, D)."""

    separators: list[Any] = field(default_factory=list)


@register_family
class Phi4MultimodalFamily(Family):
    """Phi-4-multimodal (``transformers`` ``Phi4MultimodalForCausalLM``): SigLIP without [CLS], 2 x 2
    average pool, global view + dynamic-HD crops, ``sub_GN`` newlines and a ``glb_GN`` separator;
    ``spatial`` layout only (see the module's docstring for every decision)."""

    model_type = "phi4_multimodal"
    display_name = "Phi-4-multimodal"
    example_checkpoint = "microsoft/Phi-4-multimodal-instruct"
    model_names = ("Phi4MultimodalForCausalLM", "Phi4MultimodalModel")
    layouts = ("spatial",)
    image_inputs = ("image_sizes", "image_attention_mask")
    pixel_inputs = "image_pixel_values"
    min_transformers_processor = "5.23"  # before, Phi-4's processor writes its counts in its own __call__
    attention_attributes = ("q_proj", "k_proj", "num_heads", "scaling")
    tower_kind = "a SigLIP-like"
    #: The checkpoint's language model (Phi-4-mini: gated MLP), as :class:`globalcom2.efficiency.LMArch`
    #: fields: name, layers, hidden, heads, kv heads, head dim, intermediate, vocab. From the copy of
    #: microsoft/Phi-4-multimodal-instruct's config.json in NVIDIA/TensorRT-LLM
    #: tests/unittest/_torch/modeling/test_modeling_phi4mm.py (PHI4MM_CONFIG: hidden_size 3072,
    #: "original: 32" layers, 24 heads, 8 KV heads, intermediate 8192, vocab 200064; head dim 3072 / 24).
    language_models: dict[str, tuple[Any, ...]] = {
        "microsoft/Phi-4-multimodal-instruct": ("phi4-mini", 32, 3072, 24, 8, 128, 8192, 200064),
    }
    default_text_model_type = "phi4_multimodal"

    @classmethod
    def hf_classes(cls) -> tuple[type, ...]:
        from transformers import Phi4MultimodalForCausalLM, Phi4MultimodalModel

        return (Phi4MultimodalForCausalLM, Phi4MultimodalModel)

    # -- geometry -------------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return int(self.hf_config.vision_config.image_token_id)

    def _embedding(self) -> Any:
        return self.inner.embed_tokens_extend.image_embed

    def vision_tower(self) -> Any:
        return self._embedding().img_processor

    def language_model(self) -> Any:
        return self.inner

    @property
    def side(self) -> int:
        vc = self.hf_config.vision_config
        return (int(vc.image_size) // int(vc.patch_size) + 1) // 2

    def view_geometry(self) -> tuple[int, int]:
        return int(self.hf_config.vision_config.image_size), self.side

    def _importance_kind(self) -> str:
        kind = str(getattr(self.vision_config, "importance", "auto") or "auto")
        return "similarity" if kind == "auto" else kind

    def check_vision(self) -> None:
        kind = self._importance_kind()
        if kind == "cls":
            raise ValueError("importance='cls' needs a [CLS] token; Phi-4-multimodal's SigLIP has none (use 'similarity')")
        self.last_attention()

    # -- vision side ----------------------------------------------------------------------------
    def encode(self, pixel_values: Any, image_sizes: Any = None, image_attention_mask: Any = None) -> EncodedImages:
        """Tower and projector once, as the model runs them, with the importance signal (see the module's docstring)."""
        if image_sizes is None or image_attention_mask is None:
            raise ValueError("Phi-4-multimodal needs image_sizes and image_attention_mask (the processor's output)")
        emb = self._embedding()
        pv = pixel_values.to(emb.img_processor.embeddings.patch_embedding.weight.dtype)
        batch, most = pv.shape[:2]
        masks = image_attention_mask.flatten(0, 1).to(dtype=torch.bool, device=pv.device)
        kind = self._importance_kind()
        attn = self.last_attention()
        with QKCapture(attn, all_queries=kind == "attention_received") as cap:
            feats = emb.get_img_features(pv.flatten(0, 1), attention_mask=masks)  # (B*M, N, Dv)
        from ..core import importance as importance_ops

        if kind == "attention_received":
            patch = importance_ops.attention_received(cap.queries.detach(), cap.keys.detach(), attn.num_heads, attn.scaling)
            importance = self._pool_scores(patch)
        else:
            importance = importance_ops.feature_similarity(feats.detach())
        side = self.side
        view = int(self.hf_config.vision_config.crop_size)
        hw = image_sizes.view(-1, 2)
        grids = (hw // view).tolist()
        useful = []
        for i, (r, c) in enumerate(grids):
            m = image_attention_mask[i, 1 : r * c + 1, 0::2, 0::2].reshape(r, c, side, side).transpose(1, 2).reshape(r * side, c * side)
            useful.append(torch.stack([m[:, 0].sum(), m[0, :].sum()]))
        useful = torch.stack(useful).long().tolist() if useful else []  # one host sync
        feats = feats.view(batch, most, side * side, -1)
        importance = importance.view(batch, most, side * side)
        features, importances, geoms, seps, counts = [], [], [], [], []
        for i, ((r, c), (uh, uw)) in enumerate(zip(grids, useful)):
            seq = self._vanilla_sequence(feats[i], r, c, uh, uw)  # (L, D) projected, as the model
            gather, sep_rows = self._view_rows(r, c, uh, uw, seq.device)
            table = torch.cat([seq, seq.new_zeros(1, seq.shape[-1])])
            features.append(table[gather].view(1 + r * c, side * side, -1))
            seps.append(seq[sep_rows])
            importances.append(importance[i, : 1 + r * c])
            geoms.append(_geometry(r, c, uh, uw, side))
            counts.append(int(seq.shape[0]))
        return _Encoded(features=features, importance=importances, geometries=geoms,
                        image_sizes=[tuple(int(v) for v in s) for s in hw.tolist()], vanilla_counts=counts, separators=seps)

    def _pool_scores(self, patch: Any) -> Any:
        """(V, P*P) patch scores -> (V, N): the model's own 2 x 2 average pool over the patch map."""
        emb = self._embedding()
        p = math.isqrt(patch.shape[-1])
        grid = patch.reshape(-1, 1, p, p)
        if getattr(emb, "img_processor_padding", None) is not None:
            grid = emb.img_processor_padding(grid)
        return emb.image_token_compression(grid).flatten(1)

    def _vanilla_sequence(self, views: Any, rows: int, cols: int, uh: int, uw: int) -> Any:
        """One image's projected sequence exactly as the model builds it: crops' unpadded rows with
        ``sub_GN``, ``glb_GN``, the global view's rows with ``sub_GN`` (``views``: (M, N, Dv))."""
        emb = self._embedding()
        s, d = self.side, views.shape[-1]
        glob = torch.cat([views[0].reshape(1, s, s, d), emb.sub_img_feature_extensor.repeat(1, s, 1, 1)], dim=2).reshape(1, -1, d)
        sub = views[1 : 1 + rows * cols].reshape(rows, cols, s, s, d).transpose(1, 2).reshape(1, rows * s, cols * s, d)
        sub = torch.cat([sub[:, :uh, :uw], emb.sub_img_feature_extensor.repeat(1, uh, 1, 1)], dim=2).reshape(1, -1, d)
        out = torch.cat([sub, emb.global_img_feature_extensor, glob], dim=1)
        out = out.to(device=emb.img_projection_up.bias.device, dtype=emb.img_projection_up.bias.dtype)
        return emb.img_projection_down(torch.nn.functional.gelu(emb.img_projection_up(out)))[0]

    def _view_rows(self, rows: int, cols: int, uh: int, uw: int, device: Any) -> tuple[Any, Any]:
        """Rows of the vanilla sequence holding each view's tokens ((V*N,) long, the zero row
        ``L`` where padded) and the rows of one ``sub_GN`` and the ``glb_GN`` ((2,) long)."""
        s = self.side
        length = uh * (uw + 1) + 1 + s * (s + 1)
        start = uh * (uw + 1) + 1
        y, x = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
        glob = (start + y * (s + 1) + x).flatten()
        gy = torch.arange(rows * s)[:, None].expand(rows * s, cols * s)
        gx = torch.arange(cols * s)[None, :].expand(rows * s, cols * s)
        pos = torch.where((gy < uh) & (gx < uw), gy * (uw + 1) + gx, torch.full_like(gy, length))
        crops = pos.reshape(rows, s, cols, s).transpose(1, 2).reshape(-1)
        return torch.cat([glob, crops]).to(device), torch.tensor([start + s, start - 1], device=device)

    def _model_order(self, geom: Any, keep: Any) -> Any:
        """(L',) rows of the table ``[views (V*N), sub_GN, glb_GN]`` in the model's order, kept tokens
        only (``keep``: (V*N,) bool), every separator kept."""
        s, n = geom.side, geom.side * geom.side
        views = 1 + geom.num_crops
        uh, uw = geom.row1, geom.col1
        sub, glb = views * n, views * n + 1
        gy = torch.arange(uh)[:, None].expand(uh, uw)
        gx = torch.arange(uw)[None, :].expand(uh, uw)
        crop_rows = (1 + (gy // s) * geom.grid_w + gx // s) * n + (gy % s) * s + gx % s
        crop_part = torch.cat([crop_rows, torch.full((uh, 1), sub)], dim=1).reshape(-1)
        glob_part = torch.cat([torch.arange(n).reshape(s, s), torch.full((s, 1), sub)], dim=1).reshape(-1)
        order = torch.cat([crop_part, torch.tensor([glb]), glob_part]).to(keep.device)
        return order[torch.cat([keep, keep.new_ones(2)])[order]]

    def compress(self, encoded: EncodedImages, config: VisionMethodConfig | None = None, newline: Any = None) -> CompressedImages:
        """Any selection method on the global-first views, then the model's order (crop rows with
        ``sub_GN``, ``glb_GN``, global rows with ``sub_GN``; separators always kept)."""
        cfg = config or self.vision_config
        if cfg is None:
            raise ValueError(f"method {self.config.method!r} has no vision-side compression")
        seps = getattr(encoded, "separators", None) or [None] * len(encoded.features)
        toks, plan_list = [], []
        for feats, imp, geom, sep in zip(encoded.features, encoded.importance, encoded.geometries, seps):
            if cfg.method == "pooling":
                t, p = self._pool(feats, geom, cfg.retention_ratio, sep)
                toks.append(t)
                plan_list.append(p)
                continue
            _, p = _methods.compress_image(feats, imp, geom, None, cfg)
            if not isinstance(p, layouts.CompressionPlan):
                raise ValueError(f"method {cfg.method!r} is not supported on {self.display_name}: its plan has no kept tokens")
            n = feats.shape[1]
            keep = torch.zeros(n, dtype=torch.bool, device=feats.device)
            keep[p.thumb_keep] = True
            keep = torch.cat([keep, p.crop_keep.reshape(-1).to(keep.device)])
            index = self._model_order(geom, keep)
            table = (p.table if p.table is not None else feats).reshape(-1, feats.shape[-1])
            sep = sep if sep is not None else table.new_zeros(2, table.shape[-1])
            table = torch.cat([table, sep.to(table)])
            p = dataclasses.replace(p, index=index, thumb_keep=torch.sort(p.thumb_keep).values, layout="spatial")
            toks.append(table[index])
            plan_list.append(p)
        return CompressedImages(tokens=toks, plans=plan_list, vanilla_counts=encoded.vanilla_counts)

    def _pool(self, feats: Any, geom: Any, ratio: float, sep: Any) -> tuple[Any, Any]:
        """The pooling baseline, the model's arrangement at a lower resolution: the crops' unpadded
        ``uh x uw`` area pooled to ``pooled_side(uh, R) x pooled_side(uw, R)`` row by row with
        ``sub_GN``, ``glb_GN``, the global view pooled to ``t x t`` row by row with ``sub_GN``
        (``adaptive_avg_pool2d``; R = 1 is the vanilla sequence)."""
        from ..core.geometry import crops_to_grid

        s, d = geom.side, feats.shape[-1]
        sep = sep.to(feats) if sep is not None else feats.new_zeros(2, d)
        t = tiles.pooled_side(s, ratio)
        pool = torch.nn.functional.adaptive_avg_pool2d
        glob = pool(feats[0].reshape(s, s, d).permute(2, 0, 1), (t, t)).permute(1, 2, 0)  # (t, t, D)
        uh, uw = geom.row1, geom.col1
        ph, pw = tiles.pooled_side(uh, ratio), tiles.pooled_side(uw, ratio)
        grid = crops_to_grid(feats[1:].permute(2, 0, 1), geom)[:, :uh, :uw]  # (D, uh, uw)
        crops = pool(grid, (ph, pw)).permute(1, 2, 0)  # (ph, pw, D)
        crops = torch.cat([crops, sep[0].expand(ph, 1, d)], dim=1).reshape(-1, d)
        glob = torch.cat([glob, sep[0].expand(t, 1, d)], dim=1).reshape(-1, d)
        tokens = torch.cat([crops, sep[1:2], glob])
        plan = _methods.PoolingPlan((t, t), (ph, pw), geom, int(tokens.shape[0]), side=s)
        return tokens, plan

    # -- counts from sizes ----------------------------------------------------------------------
    def size_layout(self, image_sizes: Any, processor: Any = None, **options: Any) -> tuple[list[int], list[Any], int]:
        ip = getattr(processor, "image_processor", processor)
        most = int(getattr(ip, "dynamic_hd", MAX_CROPS)) if ip is not None else MAX_CROPS
        view = int(self.hf_config.vision_config.crop_size)
        patch = int(self.hf_config.vision_config.patch_size)
        side = self.side
        views, geoms = [], []
        for h, w in image_sizes:
            rows, cols, _, _, vr, vc = crop_layout(int(h), int(w), view, patch, most)
            views.append(1 + rows * cols)
            geoms.append(_geometry(rows, cols, _tokens_valid(vr), _tokens_valid(vc), side))
        return views, geoms, side * side

    def processed_layout(self, image_inputs: Any, processor: Any) -> tuple[list[int], list[Any], int]:
        """Views and unpadded area per image from the processor's ``image_sizes`` and ``image_attention_mask``."""
        view = int(self.hf_config.vision_config.crop_size)
        side = self.side
        sizes = torch.as_tensor(image_inputs["image_sizes"]).view(-1, 2)
        masks = torch.as_tensor(image_inputs["image_attention_mask"])
        views, geoms = [], []
        for i, (h, w) in enumerate(sizes.tolist()):
            r, c = h // view, w // view
            m = masks[i, 1 : r * c + 1, 0::2, 0::2].reshape(r, c, side, side).transpose(1, 2).reshape(r * side, c * side)
            views.append(1 + r * c)
            geoms.append(_geometry(r, c, int(m[:, 0].sum()), int(m[0, :].sum()), side))
        return views, geoms, side * side

    @classmethod
    def load(
        cls, model_id: str, dtype: Any = "auto", device_map: Any = None, model_kwargs: dict[str, Any] | None = None, **hub: Any
    ) -> tuple[Any, Any]:
        """As :meth:`Family.load`; where ``AutoProcessor`` gives no image processor (torchvision, which
        ``Phi4MultimodalImageProcessor`` needs, missing; a processor class it does not know), the
        processor is built with the PIL image processor of the same dynamic HD on the saved settings
        (pixel values differ slightly from the stock processor's), with a warning."""
        from transformers import AutoProcessor, AutoTokenizer, Phi4MultimodalFeatureExtractor, Phi4MultimodalProcessor

        kwargs: dict[str, Any] = {"dtype": dtype, **hub, **(model_kwargs or {})}
        if device_map is not None:
            kwargs["device_map"] = device_map
        model = cls.hf_classes()[0].from_pretrained(model_id, **kwargs).eval()
        try:
            processor = AutoProcessor.from_pretrained(model_id, **hub)
            if getattr(processor, "image_processor", None) is not None:
                return model, processor
        except (ImportError, ValueError, OSError) as exc:
            if "torchvision" not in str(exc).lower():
                raise
        warnings.warn(
            "no stock Phi-4-multimodal image processor could be loaded (it needs torchvision): globalcom2 uses a PIL image "
            "processor with the same dynamic HD (pixel values differ slightly); install torchvision for the stock one",
            stacklevel=2,
        )
        ip = _tiny_image_processor_class().from_pretrained(model_id, **hub)
        audio = Phi4MultimodalFeatureExtractor.from_pretrained(model_id, **hub)
        return model, Phi4MultimodalProcessor(ip, audio, AutoTokenizer.from_pretrained(model_id, **hub))

    @classmethod
    def text_config(cls, hf_config: Any) -> Any:
        return hf_config  # the language model's fields sit on the config itself (no text_config)

    @classmethod
    def accepts_size(cls, hf_config: Any, height: int, width: int, processor: Any = None) -> bool:
        """False where the processor's tiling rule refuses the size ("the aspect ratio is very extreme")."""
        ip = getattr(processor, "image_processor", processor)
        most = int(getattr(ip, "dynamic_hd", MAX_CROPS)) if ip is not None else MAX_CROPS
        vc = hf_config.vision_config
        try:
            crop_layout(int(height), int(width), int(vc.crop_size), int(vc.patch_size), most)
        except ValueError:
            return False
        return True

    @classmethod
    def similarity_features(cls, model: Any) -> tuple[Any, str]:
        """The output of the 2 x 2 average pool, (views, channels, h, w): what ``get_img_features`` returns."""
        inner = getattr(model, "model", model)
        return inner.embed_tokens_extend.image_embed.image_token_compression, "output"

    # -- language side --------------------------------------------------------------------------
    def prepare_inputs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """As :meth:`Family.prepare_inputs` (the images given as :attr:`pixel_inputs`), refusing audio with images."""
        if kwargs.get(self.pixel_inputs) is not None and kwargs.get("audio_input_features") is not None:
            raise ValueError("GlobalCom2 on Phi-4-multimodal does not compress a call that has audio too")
        return super().prepare_inputs(kwargs)

    def _forward(self, original: Any, *args: Any, **kwargs: Any) -> Any:
        """The patched forward; the compressed features go in as ``inputs_embeds`` (Phi-4's forward
        takes no precomputed image features): the token embeddings with the image rows written at
        the placeholders, as the model's own image embedding writes them."""

        @functools.wraps(original)
        def embedded(**call: Any) -> Any:
            image = (call.pop("mm_encoder_outputs", None) or {}).get("image")
            tokens = getattr(image, "pooler_output", None)
            ids = call.get("input_ids")
            if tokens is not None and ids is not None and call.get("inputs_embeds") is None:
                spots = ids == self.image_token_id
                if bool(spots.any()):
                    embeds = self.inner.embed_tokens(ids)
                    rows = torch.cat(list(tokens), dim=0) if isinstance(tokens, (list, tuple)) else tokens
                    embeds = embeds.index_put(torch.nonzero(spots, as_tuple=True), rows.to(embeds))
                    call["inputs_embeds"] = self._embedding().drop(embeds)
                    call.pop("input_ids")
            return original(**call)

        return super()._forward(embedded, *args, **kwargs)

    # -- the tiny test model --------------------------------------------------------------------
    #: Phi-4-multimodal's processor (with the PIL stand-in image processor: the stock one needs
    #: torchvision), SigLIP 448/14 (-2 feature layer), a Phi-3-like decoder of a few dozen wide and
    #: the smallest audio encoder the config allows.
    tiny = TinyGeometry(
        special_tokens={"image_token": "<|image|>", "audio_token": "<|audio|>"},
        processor="globalcom2.models.phi4_multimodal.TinyPhi4MultimodalProcessor",
        processor_kwargs={},
        image_processor="globalcom2.models.phi4_multimodal.Phi4MultimodalImageProcessorPil",
        image_processor_kwargs={"dynamic_hd": TINY_MAX_CROPS},
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=16384, original_max_position_embeddings=16384),
    )

    @classmethod
    def tiny_config(cls, tokenizer: Any, vision: dict[str, Any], text: dict[str, Any], **options: Any) -> Any:
        """A ``Phi4MultimodalConfig`` with the checkpoint's vision geometry (SigLIP 448/14, crop 448,
        feature layer -2) at ``vision`` widths, a decoder of ``text`` and a minimal audio encoder."""
        from transformers import Phi4MultimodalAudioConfig, Phi4MultimodalConfig, Phi4MultimodalVisionConfig

        image_id = tokenizer.convert_tokens_to_ids("<|image|>")
        audio_id = tokenizer.convert_tokens_to_ids("<|audio|>")
        text = dict(text)
        text.pop("vocab_size", None)
        return Phi4MultimodalConfig(
            vision_config=Phi4MultimodalVisionConfig(
                image_size=VIEW_SIZE, patch_size=PATCH_SIZE, crop_size=VIEW_SIZE, feature_layer=-2, image_token_id=image_id, **vision
            ),
            audio_config=Phi4MultimodalAudioConfig(
                hidden_size=16, intermediate_size=32, num_blocks=1, num_attention_heads=2, ext_pw_out_channel=16,
                depthwise_separable_out_channel=16, nemo_conv_channels=16, audio_token_id=audio_id,
            ),
            vocab_size=len(tokenizer),
            image_token_id=image_id,  # read by generic tools; the model reads vision_config's
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
            **text,
            **options,
        )

    @classmethod
    def tiny_init(cls, model: Any) -> None:
        """The tiny model's tower runs eager attention: ``transformers``' SigLIP attention of this
        model has ``is_causal = True``, so under SDPA a batch whose views have no padded patch (no
        mask) runs the tower causally and one with a padded patch bidirectionally; an image's
        features then depend on the other images of its batch, in the vanilla model as well.
        Eager attention is bidirectional either way (the batch tests compare a batch with each
        prompt alone). A checkpoint keeps its own setting: GlobalCom2 runs the tower as the model does."""
        tower = model.model.embed_tokens_extend.image_embed.img_processor
        tower.config._attn_implementation = "eager"

    @classmethod
    def max_visual_tokens(cls, config: Any) -> int:
        """Global view + ``MAX_CROPS`` crops, image tokens only: 37 x 256 = 9,472."""
        return (1 + MAX_CROPS) * 256

    @classmethod
    def default_max_visual_tokens(cls) -> int:
        return cls.max_visual_tokens({})

    @classmethod
    def picture_views(cls, image: Any, geom: CropGeometry | None, view: int) -> tuple[Any, Any, Any]:
        """The global view (the padded canvas squeezed to one view) and the canvas the crops cover."""
        import numpy as np
        from PIL import Image

        from .._io import to_rgb

        image = to_rgb(image)
        if geom is None:
            return np.asarray(image.resize((view, view), Image.Resampling.BICUBIC)), None, None
        h, w = geom.grid_h * view, geom.grid_w * view
        _, _, nh, nw, _, _ = crop_layout(image.height, image.width, view, PATCH_SIZE, geom.num_crops)
        canvas = Image.new("RGB", (w, h), (255, 255, 255))
        canvas.paste(image.resize((nw, nh), Image.Resampling.BILINEAR), (0, 0))
        thumb = np.asarray(canvas.resize((view, view), Image.Resampling.BICUBIC))
        lay = {"height": h, "width": w, "new_height": nh, "new_width": nw, "top": 0, "left": 0}
        return thumb, np.asarray(canvas), lay
