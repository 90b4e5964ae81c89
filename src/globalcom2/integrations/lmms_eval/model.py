"""The lmms-eval model class, registered as ``globalcom2`` (and its alias ``globalcom2_llava_next``)."""

from __future__ import annotations

from typing import Any, Callable

from ._common import MODEL_ALIASES, MODEL_NAME, _LmmsBase, _log, lmms_eval_available, require_lmms_eval
from .args import DEFAULT_PRETRAINED, parse_model_args
from .loading import _read_template, load_checkpoint
from .requests import GenerationRequest, LoglikelihoodRequest
from .runner import Runner


def _tuples_are_mangled() -> bool:
    """Whether this lmms-eval turns a model's ``(float, bool)`` answer into its string.

    lmms-eval 0.7's evaluator passes every answer through
    ``lmms_eval.api.instance.unwrap_generation_output``, which keeps strings, ``(str, dict)``
    pairs and ``GenerationResult`` objects and ``str()``-s anything else, so loglikelihood
    tuples reach the multiple-choice scoring as text and it fails ("too many values to unpack").
    """
    try:
        from lmms_eval.api.instance import unwrap_generation_output
    except ImportError:
        return False
    try:
        return unwrap_generation_output((0.5, True))[0] != (0.5, True)
    except Exception:  # pragma: no cover - an unexpected signature
        return False


class _Pair(tuple):
    """A (loss, is-greedy) pair that lmms-eval's response cache (``--use_cache``) accepts as an
    answer where it expects text (it checks ``answer.text.strip()``)."""

    def strip(self) -> "_Pair":
        return self


def _survive_unwrap(result: tuple[float, bool]) -> Any:
    """``result``, carried in a ``GenerationResult`` (whose ``text`` lmms-eval passes on untouched)
    where lmms-eval would otherwise turn it into a string; the bare tuple elsewhere."""
    if not _TUPLES_MANGLED:
        return result
    from lmms_eval.api.instance import GenerationResult

    return GenerationResult(text=_Pair(result))  # type: ignore[arg-type]


_TUPLES_MANGLED = lmms_eval_available() and _tuples_are_mangled()


def _register(cls: type) -> type:
    """Also put the class in lmms-eval's decorator registry (``lmms_eval.api.registry``)."""
    if lmms_eval_available():
        try:  # imports HF `evaluate` (and through it transformers' pipelines): may fail on its own
            from lmms_eval.api.registry import register_model
        except Exception as e:  # pragma: no cover - depends on the environment
            _log.debug(f"{MODEL_NAME}: lmms_eval.api.registry unavailable ({type(e).__name__}: {e}); skipping @register_model")
            return cls
        return register_model(MODEL_NAME, *MODEL_ALIASES)(cls)
    return cls


@_register
class GlobalCom2Model(_LmmsBase):  # type: ignore[misc,valid-type]
    """lmms-eval model ``globalcom2`` (alias ``globalcom2_llava_next``): a checkpoint of any
    registered family (LLaVA-NeXT, LLaVA-OneVision, InternVL...) loaded with transformers,
    compressed in place by :func:`globalcom2.apply` (model_args: see :mod:`globalcom2.integrations.lmms_eval`).

    Attributes:
        model: the (compressed) model. processor: its processor. runner: the :class:`Runner`.
        model_args: the parsed :class:`ModelArgs`.
    """

    is_simple = True  # lmms-eval's "simple" interface: doc_to_visual + doc_to_text

    def __init__(self, pretrained: str = DEFAULT_PRETRAINED, **model_args: Any) -> None:
        require_lmms_eval()
        super().__init__()
        parsed = parse_model_args({"pretrained": pretrained, **model_args})
        self.model_args = parsed
        opts = parsed.loader

        import torch
        from accelerate import Accelerator

        accelerator = Accelerator()
        device = opts["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
        device_map = opts["device_map"] or None
        if accelerator.num_processes > 1 and not device_map:
            device = f"cuda:{accelerator.local_process_index}"
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"{MODEL_NAME}: device={device} but CUDA is not available (torch {torch.__version__}); pass device=cpu")
        if not device_map and str(device).startswith("cuda"):
            device_map = device  # load straight onto the GPU
        self._model, self._processor = load_checkpoint(
            opts["pretrained"],
            revision=opts["revision"],
            dtype=opts["dtype"],
            device_map=device_map,
            attn_implementation=opts["attn_implementation"],
            trust_remote_code=opts["trust_remote_code"],
        )
        if not device_map:
            self._model.to(device)
        if parsed.config is not None:
            from ...api import apply

            # by method and options, as given: without a layout, the family's default (a config
            # would keep the method's default layout, which OneVision and InternVL do not have)
            apply(self._model, method=parsed.method, **parsed.options)
        self.accelerator = accelerator
        self._rank = accelerator.process_index
        self._world_size = accelerator.num_processes
        self._device = torch.device(device) if opts["device_map"] in ("", None) else self._model.device
        self.batch_size_per_gpu = opts["batch_size"]
        self.runner = Runner(
            self._model,
            self._processor,
            device=self._device,
            batch_size=self.batch_size_per_gpu,
            chat_template=_read_template(opts["chat_template"]),
            use_cache=opts["use_cache"],
            max_new_tokens=opts["max_new_tokens"],
        )
        desc = "no compression" if parsed.method is None else f"{parsed.method} {parsed.options}"
        _log.info(f"{MODEL_NAME}: {opts['pretrained']} on {self._device} ({desc}); rank {self._rank}/{self._world_size}")

    # lmms-eval reads these
    @property
    def model(self) -> Any:
        return self._model

    @property
    def processor(self) -> Any:
        return self._processor

    @property
    def tokenizer(self) -> Any:
        return self._processor.tokenizer

    @property
    def config(self) -> Any:
        return self._model.config

    @property
    def device(self) -> Any:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def _doc(self, task: str, split: str, doc_id: Any) -> Any:
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual: Any, task: str, split: str, doc_id: Any) -> Callable[[], Any]:
        if doc_to_visual is None:
            return lambda: None
        return lambda: doc_to_visual(self._doc(task, split, doc_id))

    def generate_until(self, requests: list) -> list[str]:
        """Answers for ``Instance.args == (context, gen_kwargs, doc_to_visual, doc_id, task, split)``."""
        reqs = []
        for instance in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = instance.args
            reqs.append(GenerationRequest(context, gen_kwargs, self._visuals(doc_to_visual, task, split, doc_id)))
        self.runner.show_progress = self.rank == 0
        start = len(self.runner.visual_tokens)

        def cache(i: int, text: str) -> None:
            self.cache_hook.add_partial("generate_until", (reqs[i].context, reqs[i].gen_kwargs), text)

        out = self.runner.generate_until(reqs, on_result=cache)
        counts = self.runner.visual_tokens[start:]
        if counts:
            _log.info(f"{MODEL_NAME}: {len(counts)} requests with images, mean {sum(counts) / len(counts):.1f} visual tokens each")
        return out

    def loglikelihood(self, requests: list) -> list[Any]:
        """(loss, is-greedy) for ``Instance.args == (context, continuation or doc_to_target,
        doc_to_visual, doc_id, task, split)`` (or ``(context, continuation)``).

        As lmms-eval's own models (llava_hf, llava_onevision...), the first value is the mean
        negative log-likelihood per continuation token (the model's loss), not a log-probability:
        lmms-eval's multiple-choice scoring picks the choice with the smallest value. The summed
        log-probabilities are :meth:`Runner.score`'s.
        """
        reqs = []
        for instance in requests:
            args = instance.args
            if len(args) == 2:  # unconditional choices (acc_mutual_info)
                reqs.append(LoglikelihoodRequest(args[0], args[1], None))
                continue
            context, target, doc_to_visual, doc_id, task, split = args
            continuation = target if isinstance(target, str) else target(self._doc(task, split, doc_id))
            if isinstance(continuation, (list, tuple)):
                continuation = continuation[0]
            reqs.append(LoglikelihoodRequest(context, str(continuation), self._visuals(doc_to_visual, task, split, doc_id)))
        self.runner.show_progress = self.rank == 0
        out = [(score.loss, score.greedy) for score in self.runner.loglikelihood(reqs)]
        for req, res in zip(reqs, out):
            self.cache_hook.add_partial("loglikelihood", (req.context, req.continuation), res)
        return [_survive_unwrap(res) for res in out]

    def generate_until_multi_round(self, requests: list) -> list[str]:
        raise NotImplementedError(
            f"{MODEL_NAME} does not implement generate_until_multi_round (multi-round tasks); "
            "use single-round generate_until or loglikelihood tasks"
        )

    def clean(self) -> None:
        self.runner = None  # type: ignore[assignment]
        super().clean()
