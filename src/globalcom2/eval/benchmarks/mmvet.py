"""MM-Vet: open-ended answers graded by an LLM judge (GPT-4 in the paper), per capability.

Without a judge there is no local score: :meth:`MMVet.score` returns ``{}`` and the answers file
(``{"v1_0": answer, ...}``, the format of MM-Vet's evaluator and LLaVA's
``convert_mmvet_for_eval.py``) is written for the official grader. With a judge configured
(``bench.judge = {"base_url", "model", "api_key"}``, as the runner sets it) :func:`score_with_judge`
grades every answer through an OpenAI-compatible ``/chat/completions`` endpoint (stdlib
``urllib``, no client library).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, MutableMapping, Sequence

from ..base import Benchmark, DataError, Sample, find_first, find_hf_split, image_cell, json_object, lmms_split_files
from ..base import register_benchmark, require_dir, require_keys, table_rows

#: MM-Vet's six capabilities, in the paper's order.
CAPABILITIES = ("rec", "ocr", "know", "gen", "spat", "math")

#: The grader's few-shot prompt, as MM-Vet defines it (paper Sec. 3.3 / Table 1 and the official
#: evaluator, ``mm-vet_evaluator.py``): the instruction, then a table of (question, ground truth,
#: prediction, correctness) examples whose last row the judge completes. Reproduced word for word
#: because the grades depend on it.
MMVET_GRADER_PROMPT = (
    "Compare the ground truth and prediction from AI models, to give a correctness score for the "
    "prediction. <AND> in the ground truth means it is totally right only when all elements in the "
    "ground truth are present in the prediction, and <OR> means it is totally right when any one "
    "element in the ground truth is present in the prediction. The correctness score is 0.0 (totally "
    "wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally right). Just complete the "
    "last space of the correctness score.\n"
    "\n"
    "Question | Ground truth | Prediction | Correctness\n"
    "--- | --- | --- | ---\n"
    "What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0\n"
    "What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5\n"
    "What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5\n"
    "What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5\n"
    "What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0\n"
    "Can you explain this meme? | This meme is poking fun at the fact that the names of the countries "
    "Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green "
    "landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person "
    "has trust issues because the names of these countries do not accurately represent their "
    "landscapes. | The meme talks about Iceland and Greenland. It's pointing out that despite their "
    "names, Iceland is not very icy and Greenland isn't very green. | 0.4\n"
    "Can you explain this meme? | This meme is poking fun at the fact that the names of the countries "
    "Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green "
    "landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person "
    "has trust issues because the names of these countries do not accurately represent their "
    "landscapes. | The meme is using humor to point out the misleading nature of Iceland's and "
    "Greenland's names. Iceland, despite its name, has lush green landscapes while Greenland is mostly "
    "covered in ice and snow. The text 'This is why I have trust issues' is a playful way to suggest "
    "that these contradictions can lead to distrust or confusion. The humor in this meme is derived "
    "from the unexpected contrast between the names of the countries and their actual physical "
    "characteristics. | 1.0\n"
)

#: Appended to the query when the judge's first reply is not a score (official evaluator).
RETRY_SUFFIX = "\nPredict the correctness of the answer (digit): "

#: The official evaluator's settings: ``gpt-4-0613``, ``max_tokens=3``, temperature 0 raised by 0.5
#: on each retry, at most 5 tries per answer, then the answer scores 0.
JUDGE_MAX_TOKENS = 3
JUDGE_TRIES = 5
DEFAULT_BASE_URL = "https://api.openai.com/v1"


class JudgeError(RuntimeError):
    """The judge endpoint failed (unreachable, HTTP error, malformed reply) after the retries."""


# --------------------------------------------------------------------------------------------
# Grading
# --------------------------------------------------------------------------------------------


def grader_query(question: str, answer: str, prediction: str, retry: bool = False) -> str:
    """The user message for one answer: the few-shot prompt + ``"\\n"`` + the row to complete,
    ``question | ground truth | prediction | `` (``<AND>``/``<OR>`` spaced out as MM-Vet does);
    with ``retry`` the digit request is appended."""
    truth = answer.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    row = " | ".join([question, truth, prediction, ""])
    return MMVET_GRADER_PROMPT + "\n" + row + (RETRY_SUFFIX if retry else "")


def parse_grade(content: str | None) -> float | None:
    """The score of a judge reply as the official evaluator (``mm-vet_evaluator.py``) reads it:
    the text before the first *space* (``split(" ")[0]``), stripped, as a float, refused only when
    above 1 or below 0. So ``" 0.5"`` (empty first piece) and ``"0.5\\nok"`` are not scores (the
    judge is asked again), while ``"nan"`` is accepted as NaN (NaN fails neither comparison).
    None: not a score."""
    if content is None:
        return None
    try:
        score = float(str(content).split(" ")[0].strip())
    except ValueError:
        return None
    if score > 1.0 or score < 0.0:
        return None
    return score


def chat_endpoint(base_url: str) -> str:
    """``<base_url>/chat/completions`` (a URL already ending so is kept)."""
    url = base_url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def chat_completion(
    url: str,
    model: str,
    content: str,
    *,
    api_key: str | None = None,
    temperature: float = 0.0,
    max_tokens: int = JUDGE_MAX_TOKENS,
    timeout: float = 60.0,
    attempts: int = 5,
    backoff: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """One user message to an OpenAI-compatible ``/chat/completions`` endpoint; the reply's text.

    Rate limits (429), server errors (5xx) and network errors are retried ``attempts`` times in
    all, waiting ``backoff``, ``2 * backoff``, ... seconds in between.

    Raises:
        JudgeError: another HTTP error, a reply without ``choices[0].message``, or still failing
            after the retries.
    """
    body = json.dumps({
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "temperature": temperature,
        "max_tokens": max_tokens,
    }).encode("utf-8")
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    last = ""
    for attempt in range(max(1, attempts)):
        if attempt:
            sleep(backoff * 2 ** (attempt - 1))
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[:300]
            last = f"HTTP {e.code}: {detail}"
            if e.code == 429 or e.code >= 500:
                continue
            raise JudgeError(f"judge {url} ({model}): {last}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            continue
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise JudgeError(f"judge {url} ({model}): the reply is not JSON: {e}") from None
        try:
            text = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"judge {url} ({model}): no choices[0].message.content in {str(payload)[:300]}") from None
        return "" if text is None else str(text)
    raise JudgeError(f"judge {url} ({model}): failed after {max(1, attempts)} attempts; last error: {last}")


def grade_answer(question: str, answer: str, prediction: str, ask: Callable[[str, float], str],
                 tries: int = JUDGE_TRIES) -> tuple[float, bool]:
    """MM-Vet's grading loop for one answer: ``(score, parsed)``.

    ``ask(content, temperature)`` returns the judge's reply. The plain query is sent at temperature
    0; while the reply is not a score, the query + :data:`RETRY_SUFFIX` is sent again with the
    temperature raised by 0.5 each time (the official evaluator re-asks at the current
    temperature, then raises it). After ``tries`` replies without a score the answer scores 0
    (``parsed`` False).
    """
    temperature = 0.0
    score = parse_grade(ask(grader_query(question, answer, prediction), temperature))
    for _ in range(tries - 1):
        if score is not None:
            break
        score = parse_grade(ask(grader_query(question, answer, prediction, retry=True), temperature))
        temperature += 0.5
    return (score, True) if score is not None else (0.0, False)


def capability_list(value: Any) -> list[str]:
    """Capabilities as a list: a list as is, or ``"rec,ocr"`` split on commas."""
    if value is None:
        return []
    if isinstance(value, str):
        return [c.strip() for c in value.split(",") if c.strip()]
    return [str(c).strip() for c in value]


def mmvet_aggregate(graded: Sequence[tuple[float, Sequence[str]]]) -> dict[str, float]:
    """MM-Vet's totals from ``(score in [0, 1], capabilities)`` per question: ``total`` = mean
    score x 100; ``<cap>`` = mean over the questions having that capability x 100 (a question
    counts for each of its capabilities; absent capabilities are left out); ``count``."""
    if not graded:
        return {}
    out = {"total": 100.0 * sum(s for s, _ in graded) / len(graded)}
    for cap in CAPABILITIES:
        scores = [s for s, caps in graded if cap in caps]
        if scores:
            out[cap] = 100.0 * sum(scores) / len(scores)
    out["count"] = float(len(graded))
    return out


def score_with_judge(
    records: Sequence[dict[str, Any]],
    base_url: str,
    model: str,
    api_key: str | None = None,
    timeout: float = 60.0,
    *,
    max_tokens: int = JUDGE_MAX_TOKENS,
    attempts: int = 5,
    backoff: float = 2.0,
    cache: MutableMapping[tuple[str, str, str, str], float] | None = None,
) -> dict[str, float]:
    """Grade MM-Vet records with an LLM judge and aggregate as MM-Vet does.

    Args:
        records: :meth:`Sample.record` dicts (``target`` = ground truth, ``meta["question"]``,
            ``meta["capability"]``); records without a target are skipped.
        base_url: the OpenAI-compatible API root (``http://host:8000/v1``) or the full
            ``.../chat/completions`` URL.
        model: the judge model name (the paper: ``gpt-4-0613``).
        api_key: sent as ``Authorization: Bearer``; None sends no header.
        timeout: seconds per HTTP request.
        max_tokens: the judge's reply budget (official: 3).
        attempts, backoff: HTTP retries, see :func:`chat_completion`.
        cache: grades by ``(model, question, answer, prediction)``, read and filled (so re-scoring
            the same predictions does not query the judge again).

    Returns:
        ``total``, the present capabilities of :data:`CAPABILITIES` (all x100), ``count`` and
        ``unparsed`` (answers whose judge replies never held a score; they count 0).

    Raises:
        JudgeError: the endpoint keeps failing.
    """
    url = chat_endpoint(base_url)

    def ask(content: str, temperature: float) -> str:
        return chat_completion(url, model, content, api_key=api_key, temperature=temperature,
                               max_tokens=max_tokens, timeout=timeout, attempts=attempts, backoff=backoff)

    graded: list[tuple[float, list[str]]] = []
    unparsed = 0
    for rec in records:
        if rec.get("target") is None:
            continue
        meta = rec.get("meta") or {}
        question, answer = str(meta.get("question", "")), str(rec["target"])
        prediction = str(rec.get("prediction") or "")
        key = (model, question, answer, prediction)
        if cache is not None and key in cache:
            score = cache[key]
        else:
            score, parsed = grade_answer(question, answer, prediction, ask)
            unparsed += not parsed
            if cache is not None and parsed:
                cache[key] = score
        graded.append((score, capability_list(meta.get("capability"))))
    out = mmvet_aggregate(graded)
    if out:
        out["unparsed"] = float(unparsed)
    return out


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


def mmvet_key(question_id: Any) -> str:
    """MM-Vet's question key: ``"v1_<n>"`` (an integer id, as in LLaVA's question file, gets the prefix)."""
    text = str(question_id)
    return text if text.startswith("v1_") else f"v1_{text}"


@register_benchmark
class MMVet(Benchmark):
    """MM-Vet (218 questions), graded by an LLM judge.

    Accepted layouts under ``<data-root>/mm-vet`` (or ``mmvet``, ``MMVet``, ``MM-Vet``: the first
    that holds the data, so an ``mm-vet/`` with only LLaVA's ``llava-mm-vet.jsonl`` is passed over
    for the ``mmvet/`` of LLaVA's guide; the data root itself when none exists):

    * **LLaVA** (docs/Evaluation.md: ``mm-vet.zip`` extracted): ``mm-vet.json`` (or
      ``mm-vet/mm-vet.json``; ``{"v1_0": {"imagename", "question", "answer", "capability": [...]}}``)
      and the images ``images/<imagename>`` next to it. LLaVA's ``llava-mm-vet.jsonl`` holds the
      same questions without answers and is not needed.
    * **lmms-lab** (hub ``lmms-lab/MMVet``): ``data/test-*.parquet`` (or at the top), or a
      ``datasets.save_to_disk`` folder (``test/*.arrow``). Columns used: ``question_id``,
      ``image``, ``question``, ``answer``, ``capability`` (a list or ``"rec,ocr"``).

    Prompt: the question alone (LLaVA docs/Evaluation.md "Natural QA"; ``llava-mm-vet.jsonl``
    through ``model_vqa.py``; lmms-eval's ``mmvet`` of the LLaVA-NeXT era, empty pre/post prompt;
    lmms-eval later added a "think step by step" pre-prompt, not used here). ``max_new_tokens``
    1024 (LLaVA ``model_vqa.py``; lmms-eval ``mmvet.yaml``).

    Metric: with :attr:`judge` set, MM-Vet's GPT-4 grading (:func:`score_with_judge`): ``total``
    and per capability ``rec``, ``ocr``, ``know``, ``gen``, ``spat``, ``math`` (x100). Without a
    judge :meth:`score` returns ``{}``; :meth:`write_submission` always writes the answers file.

    Attributes:
        judge: ``{"base_url", "model", "api_key"}`` (optional keys ``timeout``, ``max_tokens``,
            ``attempts``, ``backoff``); set by the runner. ``base_url`` defaults to OpenAI's.
    """

    name = "mmvet"
    title = "MM-Vet"
    splits = ("test",)
    token_budgets = {"llava": 1024, "lmms-eval": 1024}
    primary_metric = "total"
    data_dirs = ("mm-vet", "mmvet", "MMVet", "MM-Vet")

    METADATA = ("mm-vet.json", "mm-vet/mm-vet.json")
    _LMMS_SUBDIRS = ("data", ".")
    _JUDGE_OPTIONS = ("timeout", "max_tokens", "attempts", "backoff")

    def __init__(self) -> None:
        self.judge: dict[str, Any] | None = None
        # grades already obtained from the judge, see score_with_judge(cache=...)
        self._grades: dict[tuple[str, str, str, str], float] = {}

    def has_data(self, folder: Path) -> bool:
        """``mm-vet.json`` or an lmms-lab copy is there: LLaVA's eval.zip creates ``mm-vet/`` holding
        only ``llava-mm-vet.jsonl`` while its guide extracts the data to ``mmvet/``."""
        return any((folder / m).is_file() for m in self.METADATA) or bool(
            find_hf_split(folder, "test", self._LMMS_SUBDIRS))

    def load(self, root: str | Path, split: str | None = None) -> list[Sample]:
        self.check_split(split)
        folder = self.data_dir(root)
        if any((folder / m).is_file() for m in self.METADATA):
            return self._load_llava(folder)
        files = lmms_split_files(folder, "test", self._LMMS_SUBDIRS, "MM-Vet", "mm-vet.json + images/")
        samples = []
        keys = ("question_id", "image", "question", "answer", "capability")
        for row, where in table_rows(files, "lmms-lab MMVet", keys):
            samples.append(self._sample(mmvet_key(row["question_id"]), row, image_cell(row, where)))
        return samples

    def _load_llava(self, folder: Path) -> list[Sample]:
        path = find_first(folder, self.METADATA, "MM-Vet metadata")
        data = json_object(path, "MM-Vet metadata", "question id (v1_0, ...)")
        image_dir = require_dir(path.parent / "images", "MM-Vet images (images/<imagename>)")
        samples = []
        for key, q in data.items():
            where = f"{path}, question {key!r}"
            if not isinstance(q, dict):
                raise DataError(f"{where}: expected an object")
            require_keys(q, ("imagename", "question", "answer", "capability"), where)
            samples.append(self._sample(mmvet_key(key), q, str(image_dir / str(q["imagename"]))))
        return samples

    @staticmethod
    def _sample(key: str, q: dict[str, Any], image: Any) -> Sample:
        question = str(q["question"])
        return Sample(
            id=key,
            prompt=question,
            image=image,
            target=str(q["answer"]),
            meta={"question_id": key, "question": question, "capability": capability_list(q["capability"])},
        )

    def judge_settings(self) -> dict[str, Any] | None:
        """Keyword arguments of :func:`score_with_judge` from :attr:`judge` (None: no judge).

        Raises:
            ValueError: a judge without a model name.
        """
        judge = getattr(self, "judge", None)
        if not judge:
            return None
        if not judge.get("model"):
            raise ValueError("MM-Vet judge: no model name given (judge['model'])")
        settings: dict[str, Any] = {
            "base_url": judge.get("base_url") or DEFAULT_BASE_URL,
            "model": str(judge["model"]),
            "api_key": judge.get("api_key"),
        }
        settings.update({k: judge[k] for k in self._JUDGE_OPTIONS if judge.get(k) is not None})
        return settings

    def score(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        """With a judge: ``total``, per-capability scores (x100), ``count``, ``unparsed``.
        Without one: ``{}`` (grade the answers file with MM-Vet's evaluator)."""
        settings = self.judge_settings()
        if settings is None:
            return {}
        return score_with_judge(records, cache=self._grades, **settings)

    def write_submission(self, records: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
        """The answers file MM-Vet's evaluator reads: ``{"v1_0": "answer", ...}`` (JSON)."""
        if not records:
            return None
        answers = {mmvet_key((rec.get("meta") or {}).get("question_id", rec["id"])): str(rec.get("prediction") or "")
                   for rec in records}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(answers, indent=2, ensure_ascii=False), encoding="utf-8")
        return path
