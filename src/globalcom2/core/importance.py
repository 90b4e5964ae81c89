"""Importance signals from the captured query and key projections, in :data:`SCORE_DTYPE` where
ties matter: the [CLS] query's logits (:func:`cls_attention_logits`, towers with a [CLS] token)
and, for towers without one, "similarity" (the default there) and "attention received" (an
ablation).

``SPEC.md``, "Importance without a [CLS] token": at the tower's last layer, per view and head h,
``a[h, q, k] = softmax_k(q_hq . k_hk * head_dim**-0.5)`` over the view's N patches; importance of
patch k is the mean over h and q of ``a[h, q, k]``, in float32. It is computed here from the
captured query and key projections, a chunk of queries at a time: the whole (N x N) attention map
is never built and the tower's attention implementation is untouched (no ``output_attentions``,
no eager switch). The hooks that capture them are the families' (``models.capture.QKCapture``):
this module is pure tensor code.
"""

from __future__ import annotations

import torch

__all__ = ["SCORE_DTYPE", "attention_received", "cls_attention_logits", "feature_similarity"]


#: Precision of every importance, crop ratio and selection score. float64 makes our own arithmetic
#: independent of the machine's summation order (float32 matmuls and norms differ by an ulp between
#: CPUs and GPUs, enough to swap near-equal tokens); the tensors are (V, N): the cost is nil.
SCORE_DTYPE = torch.float64

#: Queries per chunk: the largest temporary is (V, heads, chunk, N) float32.
DEFAULT_CHUNK = 128


def attention_received(
    queries: torch.Tensor, keys: torch.Tensor, num_heads: int, scale: float, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """The attention every token receives, averaged over heads and queries.

    Args:
        queries: (V, T, D) query projections (before scaling) of one layer, T tokens per view.
        keys: (V, T, D) key projections of the same layer and tokens.
        num_heads: attention heads; D must be divisible by it.
        scale: the attention scale (``head_dim ** -0.5``).
        chunk: queries per step; memory is O(V * heads * chunk * T).

    Returns:
        (V, T) float32: ``mean_{h, q} softmax_k(q . k * scale)[h, q, k]`` (each row sums to 1).
    """
    v, t, d = keys.shape
    if queries.shape != keys.shape:
        raise ValueError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} must have the same shape")
    if d % num_heads:
        raise ValueError(f"feature size {d} is not divisible by {num_heads} heads")
    hd = d // num_heads
    k = keys.float().reshape(v, t, num_heads, hd).transpose(1, 2)  # (V, h, T, hd)
    q_all = queries.float().reshape(v, t, num_heads, hd).transpose(1, 2) * scale  # (V, h, T, hd)
    total = torch.zeros((v, t), dtype=torch.float32, device=keys.device)
    step = max(1, int(chunk))
    for start in range(0, t, step):
        q = q_all[:, :, start : start + step]  # (V, h, c, hd)
        probs = torch.softmax(q @ k.transpose(-1, -2), dim=-1)  # (V, h, c, T)
        total += probs.sum(dim=(1, 2))
    return total / float(num_heads * t)


def feature_similarity(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """SPEC.md ``importance="similarity"``: per view, ``s_i = -cos(x_i, g)`` with ``x_i`` the view's
    patch features at the model's feature layer (what the projector receives) and ``g`` the mean of
    that view's N patch features: tokens unlike the view's average are the informative ones.

    Computed in float64 (SPEC.md writes float32, the least it needs): as for the [CLS] logits
    (:data:`SCORE_DTYPE`), the products of float32 or 16-bit numbers are exact
    there, so near-ties come out the same whichever order a machine's kernels sum in, on every
    device and in every engine; the cost is O(V N D) once per image.

    Args:
        features: (V, N, D) patch features of V views (any float dtype).
        eps: the lower bound of each norm, as ``torch.nn.functional.cosine_similarity``.

    Returns:
        (V, N) float64 importance (in [-1, 1]).
    """
    x = features.detach().to(torch.float64)  # (V, N, D)
    g = x.mean(dim=1, keepdim=True)  # (V, 1, D)
    dots = (x * g).sum(dim=-1)  # (V, N)
    norms = x.norm(dim=-1).clamp_min(eps) * g.norm(dim=-1).clamp_min(eps)  # (V, N)
    return -(dots / norms)


def cls_attention_logits(q_cls: torch.Tensor, keys: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """The [CLS] query's pre-softmax attention logits to every patch, averaged over heads.

    ``(q_cls * scale) . k_patch`` per head, mean over heads, the CLS column dropped. Only the CLS
    row is computed: O(T * D) per view instead of the O(T^2 * D) of a full attention map.

    Computed in :data:`SCORE_DTYPE` (float64) whatever the model's dtype: the products of two
    float32 (or 16-bit) numbers are exact there, so the result no longer depends on the order in
    which a machine's matmul kernel sums them. In float32 that order (AVX2 vs AVX-512 blocking,
    GPU split-K) moves logits by an ulp, and the thumbnail order of the ``official`` layout or a
    top-k boundary between two near-equal patches then differed between machines.

    Args:
        q_cls: (V, D) the CLS token's query projection (before scaling) for V views.
        keys: (V, T, D) key projections of all T = 1 + N tokens of the same layer.
        num_heads: attention heads; D must be divisible by it.
        scale: the attention scale, ``head_dim ** -0.5`` for CLIP.

    Returns:
        (V, N) float64 importance of each patch token.
    """
    v, t, d = keys.shape
    hd = d // num_heads
    q = q_cls.to(SCORE_DTYPE).reshape(v, num_heads, hd) * scale  # (V, h, hd)
    out = torch.empty((v, t - 1), dtype=SCORE_DTYPE, device=keys.device)
    # A few views at a time: the float64 copy of the keys stays under ~64 MiB (InternViT-6B: 3200 wide).
    step = max(1, (64 << 20) // max(1, t * d * 8))
    for start in range(0, v, step):
        k = keys[start : start + step, 1:].to(SCORE_DTYPE).reshape(-1, t - 1, num_heads, hd)  # (v', N, h, hd)
        out[start : start + step] = torch.einsum("vnhd,vhd->vn", k, q[start : start + step]) / num_heads
    return out
