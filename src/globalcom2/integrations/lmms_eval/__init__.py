"""lmms-eval model plugin: a checkpoint of any registered family (LLaVA-NeXT, LLaVA-OneVision,
InternVL) with GlobalCom2 (or a baseline) applied.

Run any lmms-eval task on a compressed model::

    pip install lmms-eval
    lmms-eval --model globalcom2 \\
        --model_args pretrained=llava-hf/llava-v1.6-vicuna-7b-hf,retention_ratio=0.25 \\
        --tasks textvqa_val --batch_size 1 --output_path ./logs/

The model is ``globalcom2``; its family is the checkpoint's ``config.model_type``.
``globalcom2_llava_next`` (the name of 0.1) is an alias of it, so the command lines written for
0.1 keep working. lmms-eval finds both through the ``lmms_eval.models`` entry point of an
installed globalcom2, or with ``LMMS_EVAL_PLUGINS=globalcom2.integrations``. ``--model_args``
takes, comma-separated:

* loading, as lmms-eval's ``llava_hf``: ``pretrained`` (hub id or checkpoint directory of a
  supported model; default llava-hf/llava-v1.6-vicuna-7b-hf), ``revision``, ``device``
  (default ``cuda`` when available, else ``cpu``), ``dtype`` (alias ``torch_dtype``: ``auto``,
  ``float16``, ``bfloat16``, ``float32``), ``batch_size``, ``attn_implementation``,
  ``device_map``, ``trust_remote_code``, ``chat_template`` (a Jinja string or a file replacing
  the processor's), ``use_cache``, ``max_new_tokens`` (used when a task gives none; default 1024);
* compression: ``method`` (``globalcom2`` by default, any of :func:`globalcom2.method_names`,
  or ``none`` for the uncompressed model), ``retention_ratio`` (default 0.25) and the method's
  options (``layout``, ``temperature``, ``allocation``, ``scoring``, ``seed``, ``layer``,
  ``fastv_retention_ratio``, ``fastv_layer``...; see :func:`globalcom2.apply`; without
  ``layout``, the family's default). An unknown or bad option is a ``ValueError`` that names
  it, raised before any weights load.

The prompt is the checkpoint's chat template around the task's text, with one image per visual
(the processor's image token + ``\\n`` + text where the processor has no template). Generation is
greedy unless the task's ``generation_kwargs`` ask for sampling (``temperature > 0`` or
``do_sample``), stops at ``max_new_tokens``, at EOS and at the task's ``until`` strings (the
answer is cut before the first one). ``loglikelihood`` (multiple-choice and perplexity tasks)
gives, as lmms-eval's own models do, the mean per-token negative log-likelihood of a
continuation after the same prompt (lmms-eval picks the choice where it is smallest) and whether
greedy decoding would produce it. Data parallelism works as for lmms-eval's own models:
``accelerate launch --num_processes N -m lmms_eval ...`` (one model per GPU; each process gets
its shard of the requests).

The modules: :mod:`.args` (``--model_args``), :mod:`.requests` (generation settings, stop
strings, visuals), :mod:`.runner` (the generation and scoring core, :class:`Runner`, which needs
neither lmms-eval nor a loaded checkpoint: it takes any ``(model, processor)`` pair, e.g. a
family's tiny model), :mod:`.loading` (:func:`load_checkpoint`) and :mod:`.model` (the lmms-eval
class, :class:`GlobalCom2Model`).
"""

from __future__ import annotations

from ._common import DEFAULT_MAX_NEW_TOKENS, MODEL_ALIASES, MODEL_NAME, lmms_eval_available, require_lmms_eval
from .args import DEFAULT_PRETRAINED, LOADER_ARGS, NO_COMPRESSION, ModelArgs, parse_dtype, parse_model_args, split_arg_string
from .loading import load_checkpoint
from .model import GlobalCom2Model
from .requests import (
    GenerationRequest, LoglikelihoodRequest, Score, Visuals, generation_settings, normalize_visuals, truncate_at_stops,
)
from .runner import Runner

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS", "DEFAULT_PRETRAINED", "GenerationRequest", "GlobalCom2Model", "LOADER_ARGS",
    "LoglikelihoodRequest", "MODEL_ALIASES", "MODEL_NAME", "ModelArgs", "NO_COMPRESSION", "Runner", "Score",
    "Visuals", "generation_settings", "lmms_eval_available", "load_checkpoint", "normalize_visuals",
    "parse_dtype", "parse_model_args", "require_lmms_eval", "split_arg_string", "truncate_at_stops",
]
