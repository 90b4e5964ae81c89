"""Shared by the vLLM tests (tests/test_vllm*.py): engine settings for this CPU, images, and the
Hugging Face reference a vLLM result must equal (SPEC.md "Fixed count": the vanilla model fed
``embed_prompt(model, compress_images(model, inputs, count="fixed", ...), ...)``)."""

from __future__ import annotations

import os

# Before vLLM is imported: one process (no engine-core subprocess), a small KV cache (GiB).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import numpy as np
import torch
from PIL import Image

import globalcom2

#: New tokens per request: enough for a tiny random model's greedy path to show a difference.
MAX_NEW = 6
#: fp32 log-probabilities of the same tokens agree to this (contract 4).
LOGPROB_TOL = 1e-4
#: Engine options for these 2-core CPU machines (float32: the reference is float32 too).
ENGINE = dict(dtype="float32", max_model_len=4096, seed=0, enforce_eager=True)


def make_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height)[:, None, None]
    x = np.linspace(0, 1, width)[None, :, None]
    base = 0.5 * (y + x) + 0.5 * rng.random((height, width, 3))
    return Image.fromarray((np.clip(base, 0, 1) * 255).astype("uint8"))


def sampling(max_new: int = MAX_NEW):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_new, temperature=0, logprobs=1, ignore_eos=True)


def vllm_result(output) -> tuple[list[int], list[int], list[float]]:
    """(prompt ids, new tokens, their log-probabilities) of one vLLM RequestOutput."""
    done = output.outputs[0]
    tokens = list(done.token_ids)
    return list(output.prompt_token_ids), tokens, [lp[t].logprob for lp, t in zip(done.logprobs, tokens)]


@torch.no_grad()
def hf_result(model, processor, image, prompt, *, embeddings=None, max_new: int = MAX_NEW, **method):
    """(prompt ids, new tokens, log-probabilities) of the vanilla Hugging Face model: on the compressed
    sequence when ``method`` (retention_ratio, layout...) or ``embeddings`` is given, else vanilla."""
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    if method or embeddings is not None:
        emb = embeddings if embeddings is not None else globalcom2.compress_images(model, inputs, count="fixed", **method)
        ids, _ = emb.prompt(inputs.input_ids)
        kwargs = globalcom2.embed_prompt(model, emb, inputs.input_ids, inputs.attention_mask)
    else:
        ids = inputs.input_ids
        kwargs = dict(inputs)
    out = model.generate(**kwargs, max_new_tokens=max_new, do_sample=False, output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[0, -len(out.scores):].tolist()
    logprobs = [torch.log_softmax(s[0].double(), -1)[t].item() for s, t in zip(out.scores, tokens)]
    return ids[0].tolist(), tokens, logprobs


def assert_same(vllm_out, hf_out, tol: float = LOGPROB_TOL) -> None:
    """Same prompt (ids and length), same greedy tokens, log-probabilities within ``tol``."""
    v_ids, v_tok, v_lp = vllm_out
    h_ids, h_tok, h_lp = hf_out
    assert len(v_ids) == len(h_ids), (len(v_ids), len(h_ids))
    assert v_ids == h_ids
    n = min(len(v_tok), len(h_tok))  # the Hugging Face reference may stop at EOS
    assert n > 0 and v_tok[:n] == h_tok[:n], (v_tok, h_tok)
    diff = max(abs(a - b) for a, b in zip(v_lp[:n], h_lp[:n]))
    assert diff <= tol, (diff, v_lp, h_lp)
