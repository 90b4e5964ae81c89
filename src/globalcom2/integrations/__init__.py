"""Integrations of globalcom2 with third-party evaluation frameworks.

* :mod:`globalcom2.integrations.lmms_eval`: the ``globalcom2`` model of
  `lmms-eval <https://github.com/EvolvingLMMs-Lab/lmms-eval>`_ (a checkpoint of any supported
  family with a compression method applied; ``globalcom2_llava_next``, its 0.1 name, is an
  alias), found by lmms-eval through the ``lmms_eval.models`` entry point or
  ``LMMS_EVAL_PLUGINS=globalcom2.integrations`` (the :mod:`~globalcom2.integrations.models`
  package)::

      lmms-eval --model globalcom2 \\
          --model_args pretrained=llava-hf/llava-v1.6-vicuna-7b-hf,retention_ratio=0.25 \\
          --tasks textvqa_val --batch_size 1

Nothing here is imported by ``import globalcom2``, and lmms-eval stays optional: the plugin
raises an ImportError that says ``pip install lmms-eval`` only when it is used without it.
"""
