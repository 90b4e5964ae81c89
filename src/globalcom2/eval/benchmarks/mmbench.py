"""MMBench (dev, English and Chinese) with MMBench's CircularEval."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from ..base import Benchmark, DataError, Sample, read_tsv, register_benchmark, require_keys
from ..base import find_hf_split, hf_split_candidates, is_blank, read_tables

#: LLaVA ``model_vqa_mmbench.py --single-pred-prompt`` instructions, by language.
MMBENCH_INSTRUCTION = {
    "en": "Answer with the option's letter from the given choices directly.",
    "cn": "请直接回答选项字母。",
}

#: Option columns, in order; LLaVA stops at the first empty one (MMBench has at most 4 options).
OPTION_LETTERS = ("A", "B", "C", "D", "E")

#: MMBench's convention for circular copies stored in the data: copy ``r`` of question ``i`` has
#: index ``i + r * 1_000_000`` (rows with index < 1e6 are the originals).
CIRCULAR_OFFSET = 1_000_000

# The letter set MMBench's ``can_infer_option`` looks for (its default ``num_choice=5``).
_INFER_LETTERS = "ABCDE"
# (prefix, suffix) wrappers tried by ``can_infer_option`` after the bare letter, in order.
_WRAPPERS = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
             (":", ""), (":", ","), (":", "."), (":", ")"), (":", ")."))


# --------------------------------------------------------------------------------------------
# Answer extraction: MMBench's rule-based matching (can_infer), without the GPT fallback.
# --------------------------------------------------------------------------------------------


def infer_option(prediction: str) -> str | None:
    """MMBench's ``can_infer_option``: a letter standing alone as a whitespace-separated token.

    1. if exactly one of ``A``-``E`` appears as a bare token, it is the answer, unless the reply
       has more than 3 tokens and one of them is ``A`` (then ``A`` may be the article: skip);
    2. otherwise the wrappers ``X.``, ``X,``, ``X:``, ``X)``, ``X).``, ``(X)``, ``(X).``, ``:X``,
       ``:X,``, ``:X.``, ``:X)``, ``:X).`` are tried in that order; the first wrapper under which
       exactly one letter appears gives it.
    """
    tokens = [t.strip() for t in prediction.split()]

    def hits(prefix: str = "", suffix: str = "") -> list[str]:
        return [c for c in _INFER_LETTERS if prefix + c + suffix in tokens]

    bare = hits()
    if len(bare) == 1 and not ("A" in tokens and len(tokens) > 3):
        return bare[0]
    for prefix, suffix in _WRAPPERS:
        found = hits(prefix, suffix)
        if len(found) == 1:
            return found[0]
    return None


def infer_text(prediction: str, options: dict[str, str]) -> str | None:
    """MMBench's ``can_infer_text``: the only option whose text (lower-cased) occurs in the reply."""
    reply = prediction.lower()
    found = [letter for letter, text in options.items() if str(text).lower() in reply]
    return found[0] if len(found) == 1 else None


def extract_choice(prediction: str, options: dict[str, str]) -> str | None:
    """MMBench's ``can_infer``: letter matching (:func:`infer_option`), then option-text matching
    (:func:`infer_text`). None when neither decides; MMBench would then ask ChatGPT, we count
    the answer as wrong (no API calls here)."""
    return infer_option(prediction) or infer_text(prediction, options)


def build_mmbench_prompt(question: str, hint: Any, options: Sequence[str], lang: str) -> str:
    """LLaVA ``model_vqa_mmbench.py``: ``[hint\\n]question`` + ``\\nA. opt`` per option + instruction."""
    text = question if is_blank(hint) else f"{hint}\n{question}"
    for letter, option in zip(OPTION_LETTERS, options):
        text += f"\n{letter}. {option}"
    return text + "\n" + MMBENCH_INSTRUCTION[lang]


def stored_rotation(original: Sequence[str] | None, options: Sequence[str], copy: int, taken: set[int]) -> int:
    """The rotation r of a stored circular copy in *our* convention (options ``r, r+1, ..., r-1``
    of the original under A, B, ...), found by comparing its options with the original row's, so
    that sample ``<index>/<r>`` shows the same arrangement whether the copies came with the data
    or were generated here, whichever way the data rotates. Among several matches (repeated
    option texts) the copy number ``copy`` (index // 1e6) is preferred, then the smallest not
    ``taken``; the copy number when the original row is absent or the options are no rotation."""
    if original is None or len(original) != len(options):
        return copy
    k = len(original)
    matches = [r for r in range(k) if list(original[r:]) + list(original[:r]) == list(options) and r not in taken]
    if not matches:
        return copy
    return copy if copy in matches else matches[0]


def _cell(row: dict[str, Any], *names: str) -> Any:
    """The first of ``names`` present in ``row`` (column names differ in case between releases)."""
    for name in names:
        if name in row:
            return row[name]
    return None


@register_benchmark
class MMBench(Benchmark):
    """MMBench dev, English (``en-dev``, default) or Chinese (``cn-dev``), with CircularEval.

    Accepted layouts (looked for under ``<data-root>/mmbench``, ``mmbench_cn``, ``MMBench``,
    ``MMBench_EN``, ``MMBench_CN``, then the data root itself):

    * **LLaVA** (docs/Evaluation.md): ``mmbench_dev_20230712.tsv`` (en) /
      ``mmbench_dev_cn_20231003.tsv`` (cn): tab-separated, header ``index question hint A B C D
      answer category image source l2-category comment split``, images base64-encoded.
    * **lmms-lab**: hub ``lmms-lab/MMBench`` copied to disk: ``en/dev-*.parquet`` /
      ``cn/dev-*.parquet``; or ``lmms-lab/MMBench_EN`` / ``lmms-lab/MMBench_CN`` in a folder
      named ``MMBench_EN`` / ``MMBench_CN``: ``data/dev-*.parquet``; or ``datasets.save_to_disk``
      folders (``en/dev/*.arrow`` ...). Same columns, ``image`` as ``{"bytes", "path"}``.

    CircularEval (MMBench): a question with k options is asked k times, the options rotated
    (rotation r shows options ``r, r+1, ..., r-1`` under letters A, B, ...; LLaVA's
    ``--all-rounds`` order) and counts as correct only if every rotation is answered correctly.

    * If every index is < 1e6 (one row per question, what LLaVA's guide assumes) the rotations are
      generated here: sample ids ``<index>/<r>``, r = 0..k-1.
    * If the data already holds MMBench's circular copies (rows with index >= 1e6, copy r of
      question i stored as ``i + r*1e6``, as in the lmms-lab parquet), those rows are used as they
      are, nothing is generated, and the question is judged on all of its stored copies. Sample
      ``<i>/<r>`` is the stored copy whose options are rotation r of the original's in the
      convention above (:func:`stored_rotation`), so an id means the same arrangement in both
      cases, whichever direction the data rotates (the copy number ``index // 1e6`` only when the
      original row is missing or the options are not a rotation of it).

    Prompt: LLaVA's ``model_vqa_mmbench.py --single-pred-prompt``: ``hint\\n`` (when present)
    + question + ``\\nA. option`` lines + ``\\nAnswer with the option's letter from the given
    choices directly.`` (cn: ``\\n请直接回答选项字母。``). ``max_new_tokens`` 1024 as LLaVA's script
    and lmms-eval's ``mmbench_en_dev``.

    Metric: ``circular_accuracy`` (primary, % of questions with all rotations right) and per
    category (``category/<name>``, ``l2/<name>``); ``single_pass_accuracy`` (% right on rotation 0
    only, for reference). Answers are extracted as MMBench's :func:`extract_choice` (letter first,
    then option text); an answer neither decides counts as wrong (MMBench would ask ChatGPT).
    A question whose rotations are not all in the records counts as wrong (``incomplete``).
    """

    name = "mmbench"
    title = "MMBench"
    splits = ("en-dev", "cn-dev")
    token_budgets = {"llava": 1024, "lmms-eval": 1024}
    primary_metric = "circular_accuracy"
    data_dirs = ("mmbench", "mmbench_cn", "MMBench", "MMBench_EN", "MMBench_CN")

    #: per split: (LLaVA TSV names, {folder: lmms subdirs to search})
    _SOURCES = {
        "en-dev": (
            ("mmbench_dev_20230712.tsv", "mmbench_dev_en_20231003.tsv"),
            {"mmbench": ("en",), "MMBench": ("en",), "MMBench_EN": ("data", "."), ".": ("en",)},
        ),
        "cn-dev": (
            ("mmbench_dev_cn_20231003.tsv",),
            {"mmbench": ("cn",), "mmbench_cn": ("cn", "data"), "MMBench": ("cn",), "MMBench_CN": ("data", "."),
             ".": ("cn",)},
        ),
    }

    def load(self, root: str | Path, split: str | None = None) -> list[Sample]:
        split = self.check_split(split)
        lang = split.split("-")[0]
        root = self.data_dir(root)  # validates the root; may already be one of data_dirs
        base = Path(root)
        if base.name in self.data_dirs:
            base = base.parent
        tsv_names, lmms_dirs = self._SOURCES[split]
        folders = [base / d for d in self.data_dirs] + [base]
        for folder in folders:
            for name in tsv_names:
                if (folder / name).is_file():
                    rows = read_tsv(folder / name, f"MMBench {split} questions")
                    return self._samples(rows, lang, str(folder / name))
        looked = []
        for folder_name, subdirs in lmms_dirs.items():
            folder = base if folder_name == "." else base / folder_name
            looked.append(f"{folder}: {hf_split_candidates(subdirs, 'dev')}")
            files = find_hf_split(folder, "dev", subdirs) if folder.is_dir() else []
            if files:
                return self._samples(read_tables(files, f"lmms-lab MMBench {split}"), lang, str(files[0]))
        raise DataError(
            f"MMBench {split}: no data found: expected LLaVA's {' or '.join(tsv_names)} in one of "
            f"{', '.join(str(f) for f in folders)}; or lmms-lab parquet ({'; '.join(looked)})"
        )

    def _samples(self, rows: list[dict[str, Any]], lang: str, where: str) -> list[Sample]:
        """One sample per (question, rotation); see the class docstring for the two cases."""
        parsed = []
        for n, row in enumerate(rows):
            loc = f"{where}, row {n + 1}"
            require_keys(row, ("index", "question", "A", "B", "answer", "image"), loc)
            try:
                index = int(float(row["index"]))
            except (TypeError, ValueError):
                raise DataError(f"{loc}: index {row['index']!r} is not an integer") from None
            options = []
            for letter in OPTION_LETTERS:
                value = row.get(letter)
                if is_blank(value):
                    break
                options.append(str(value))
            answer = str(row["answer"]).strip()
            if answer not in OPTION_LETTERS[: len(options)]:
                raise DataError(f"{loc}: answer {row['answer']!r} is not one of the {len(options)} option letters")
            if is_blank(row["image"]):
                raise DataError(f"{loc}: empty image")
            parsed.append((index, options, answer, row))

        pre_rotated = any(index >= CIRCULAR_OFFSET for index, *_ in parsed)
        if pre_rotated:
            copies: dict[int, int] = defaultdict(int)
            for index, *_ in parsed:
                copies[index % CIRCULAR_OFFSET] += 1
            originals = {index: options for index, options, *_ in parsed if index < CIRCULAR_OFFSET}
            taken: dict[int, set[int]] = defaultdict(set)
        samples = []
        for index, options, answer, row in parsed:
            image = self._image(row["image"])
            if pre_rotated:
                main = index % CIRCULAR_OFFSET
                rot = stored_rotation(originals.get(main), options, index // CIRCULAR_OFFSET, taken[main])
                taken[main].add(rot)
                samples.append(self._sample(main, rot, copies[main], options, answer, row, image, lang))
                continue
            k = len(options)
            for rot in range(k):
                rotated = options[rot:] + options[:rot]
                # the answer's option moves from position a to (a - rot) mod k
                new_answer = OPTION_LETTERS[(OPTION_LETTERS.index(answer) - rot) % k]
                samples.append(self._sample(index, rot, k, rotated, new_answer, row, image, lang))
        return samples

    @staticmethod
    def _image(cell: Any) -> Any:
        """TSV cells are base64 text -> ``"base64:..."`` (see ImageRef); parquet dicts pass through."""
        return "base64:" + cell if isinstance(cell, str) else cell

    @staticmethod
    def _sample(main: int, rot: int, n_rot: int, options: list[str], answer: str,
                row: dict[str, Any], image: Any, lang: str) -> Sample:
        hint = _cell(row, "hint")
        return Sample(
            id=f"{main}/{rot}",
            prompt=build_mmbench_prompt(str(row["question"]), None if is_blank(hint) else str(hint), options, lang),
            image=image,
            target=answer,
            meta={
                "index": main,
                "rotation": rot,
                "n_rotations": n_rot,
                "options": dict(zip(OPTION_LETTERS, options)),
                "category": str(_cell(row, "category") or ""),
                "l2_category": str(_cell(row, "l2-category", "L2-category", "l2_category") or ""),
            },
        )

    def score(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        """Circular accuracy (primary), per category / L2 category, and single-pass accuracy (%)."""
        by_question: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for rec in records:
            if rec.get("target") is None:
                continue
            by_question[int(rec["meta"]["index"])].append(rec)
        if not by_question:
            return {}
        circular: dict[str, list[bool]] = defaultdict(list)
        single: list[bool] = []
        incomplete = 0
        for recs in by_question.values():
            meta = recs[0]["meta"]
            rights = []
            for rec in recs:
                choice = extract_choice(str(rec.get("prediction") or ""), rec["meta"]["options"])
                rights.append(choice == rec["target"])
                if rec["meta"]["rotation"] == 0:
                    single.append(rights[-1])
            complete = len({rec["meta"]["rotation"] for rec in recs}) >= int(meta["n_rotations"])
            incomplete += not complete
            ok = complete and all(rights)
            circular["circular_accuracy"].append(ok)
            if meta.get("category"):
                circular[f"category/{meta['category']}"].append(ok)
            if meta.get("l2_category"):
                circular[f"l2/{meta['l2_category']}"].append(ok)
        out = {key: 100.0 * sum(v) / len(v) for key, v in circular.items()}
        if single:
            out["single_pass_accuracy"] = 100.0 * sum(single) / len(single)
        out["questions"] = float(len(by_question))
        out["incomplete"] = float(incomplete)
        return out
