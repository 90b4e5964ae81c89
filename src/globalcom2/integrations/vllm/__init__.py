"""GlobalCom2 inside vLLM: a general plugin (entry-point group ``vllm.general_plugins``).

Install with ``pip install "globalcom2[vllm]"`` (or ``pip install -e ".[vllm]"`` from a checkout);
vLLM then calls :func:`register` in each of its processes. Nothing changes for a model that does
not ask: GlobalCom2 is turned on per engine with ``hf_overrides``::

    from vllm import LLM, SamplingParams

    llm = LLM(model="llava-hf/llava-v1.6-vicuna-7b-hf",
              hf_overrides={"globalcom2": {"retention_ratio": 0.25, "layout": "spatial"}})
    out = llm.generate({"prompt": "USER: <image>\\nWhat is in it? ASSISTANT:",
                        "multi_modal_data": {"image": image},
                        "mm_processor_kwargs": {"retention_ratio": 0.1}},   # per request
                       SamplingParams(max_tokens=64, temperature=0))

(``vllm serve MODEL --hf-overrides '{"globalcom2": {...}}'`` alike; ``globalcom2 serve`` wraps it.)
Any :class:`~globalcom2.GlobalCom2Config` field may be given per engine; ``count`` is always
``"fixed"`` (SPEC.md, "Fixed count": vLLM writes an image's placeholders before its encoder runs,
so the count must follow from the image size), and ``"published"`` is refused. Per request,
``mm_processor_kwargs={"retention_ratio": R}`` overrides R.

What :func:`register` does (cheap, idempotent, no import of the model code):

* registers, lazily (``"module:Class"`` strings), a subclass of vLLM's own model class for each
  supported architecture (:data:`ARCHITECTURES`): LLaVA-NeXT, LLaVA-OneVision, InternVL, Llama 4,
  Idefics3, SmolVLM and Command A Vision. Each subclass behaves exactly as vLLM's class when the
  model's config has no ``"globalcom2"`` entry (one exception, a fix: precomputed image embeddings
  of different lengths may share an engine step, see the README's "Serving");
* wraps the model registry's look-up on the instance so that a ``"globalcom2"`` entry on any other
  architecture, or invalid settings, fail when the engine is created, in one line naming what is
  supported.

Importing this module loads neither torch nor vLLM.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ARCHITECTURES", "CONFIG_KEY", "REQUEST_KEYS", "register"]

#: The ``hf_overrides`` / config entry that turns GlobalCom2 on.
CONFIG_KEY = "globalcom2"
#: ``mm_processor_kwargs`` keys read per request (``count`` only to refuse ``"published"``).
REQUEST_KEYS = ("retention_ratio", "count")

#: vLLM architecture name -> (our subclass as "module:Class", globalcom2 model_type).
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlavaNextForConditionalGeneration": (
        "globalcom2.integrations.vllm.llava_next:GlobalCom2LlavaNextForConditionalGeneration", "llava_next",
    ),
    "LlavaOnevisionForConditionalGeneration": (
        "globalcom2.integrations.vllm.llava_onevision:GlobalCom2LlavaOnevisionForConditionalGeneration",
        "llava_onevision",
    ),
    "InternVLForConditionalGeneration": (
        "globalcom2.integrations.vllm.internvl:GlobalCom2InternVLForConditionalGeneration", "internvl",
    ),
    "Llama4ForConditionalGeneration": (
        "globalcom2.integrations.vllm.llama4:GlobalCom2Llama4ForConditionalGeneration", "llama4",
    ),
    "Idefics3ForConditionalGeneration": (
        "globalcom2.integrations.vllm.idefics3:GlobalCom2Idefics3ForConditionalGeneration", "idefics3",
    ),
    "SmolVLMForConditionalGeneration": (
        "globalcom2.integrations.vllm.idefics3:GlobalCom2SmolVLMForConditionalGeneration", "smolvlm",
    ),
    "Cohere2VisionForConditionalGeneration": (
        "globalcom2.integrations.vllm.cohere2_vision:GlobalCom2Cohere2VisionForConditionalGeneration", "cohere2_vision",
    ),
}

_WRAPPED = "_globalcom2_checked"


def describe_supported() -> str:
    return ", ".join(ARCHITECTURES)


def register() -> None:
    """vLLM's entry point (``vllm.general_plugins``): called once per vLLM process."""
    from vllm import ModelRegistry

    for arch, (target, _) in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, target)
    _wrap_lookup(ModelRegistry)


def _wrap_lookup(registry: Any) -> None:
    """Check a ``"globalcom2"`` entry when vLLM resolves the model's architecture (an instance
    attribute of vLLM's registry object; the class is left alone)."""
    current = registry.__dict__.get("inspect_model_cls")
    if current is not None and getattr(current, _WRAPPED, False):
        return
    original = registry.inspect_model_cls

    def inspect_model_cls(architectures: Any, model_config: Any, *args: Any, **kwargs: Any) -> Any:
        check_model_config(architectures, getattr(model_config, "hf_config", None))
        return original(architectures, model_config, *args, **kwargs)

    setattr(inspect_model_cls, _WRAPPED, True)
    registry.inspect_model_cls = inspect_model_cls


def check_model_config(architectures: Any, hf_config: Any) -> None:
    """Raise a one-line ``ValueError`` when ``hf_config`` asks for GlobalCom2 on an architecture
    that has no GlobalCom2 here, or with settings that are invalid for its family."""
    if hf_config is None or getattr(hf_config, CONFIG_KEY, None) is None:
        return
    archs = [architectures] if isinstance(architectures, str) else list(architectures or [])
    known = [a for a in archs if a in ARCHITECTURES]
    if not known:
        raise ValueError(
            f"GlobalCom2 (hf_overrides {{{CONFIG_KEY!r}: ...}}) is not available for {', '.join(archs) or 'this model'} "
            f"in vLLM; supported architectures: {describe_supported()}"
        )
    from .settings import engine_config

    engine_config(ARCHITECTURES[known[0]][1], hf_config)
