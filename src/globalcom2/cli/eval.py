"""``globalcom2 eval``: the paper's benchmarks, per method and retention ratio (see
:mod:`globalcom2.eval.runner` for the files, resuming and sharding).

The command's parser is added to the main ``globalcom2`` parser by :func:`add_parser`; :func:`run`
executes it. Importing this module is cheap (torch, transformers and the benchmarks are imported
inside :func:`run`). Every failure the user can cause raises :class:`globalcom2.cli.output.CLIError`
(one ``globalcom2: error: ...`` line).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, NamedTuple

from . import loading
from .arguments import (
    FORMAT_CHOICES,
    add_device_arguments,
    add_method_arguments,
    add_visual_tokens_argument,
    check_positive,
    parse_budget,
    parse_method_arguments,
    pick_device,
    pick_dtype,
)
from .loading import EXAMPLE_MODEL
from .output import PROG, CLIError, cannot_write, echo, one_line, output_dir, para, status

DEFAULT_RATIOS = "1.0,0.25"
DEFAULT_OUTPUT = "globalcom2-eval"
#: --protocol's choices, the default first (kept in step with globalcom2.eval.base.PROTOCOLS,
#: which this cheap module does not import).
PROTOCOL_CHOICES = ("llava", "lmms-eval")

PROTOCOL_HELP = "evaluation protocol (default: llava); see 'protocols' below"

#: The epilog's paragraphs on the two protocols.
PROTOCOL_EPILOG = (
    "llava (default), the paper's protocol: LLaVA's own evaluation scripts (scripts/v1_5/eval/*.sh, "
    "llava/eval/*.py): their prompts (TextVQA with its 'Reference OCR token:' line), their "
    "max_new_tokens (128 for the short answers, 1024 for ScienceQA, MMBench and MM-Vet) and the "
    "official scorers (VQAv2 val as vqaEval.py).",
    "lmms-eval: lmms-eval's task settings (TextVQA without OCR tokens; 16 new tokens for GQA, MME, "
    "VQAv2 and ScienceQA; VQAv2 answers always normalised).",
    "The protocol is recorded in summary.json and in each run's meta file; resuming an --output-dir "
    "under another protocol is refused.",
)


def _family_names() -> str:
    """"LLaVA-NeXT, LLaVA-OneVision or InternVL": the registered families (no torch)."""
    from ..models import families

    names = [f.display_name for f in families()]
    return f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval`` command to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    example = (
        f"--model {EXAMPLE_MODEL} \\\n      --benchmarks textvqa,mme,pope --data-root ./playground/data/eval "
        "--retention-ratio 1.0,0.25,0.1"
    )
    p = subparsers.add_parser(
        "eval",
        help="evaluate on the paper's benchmarks (TextVQA, MME, POPE, ...) per method and retention ratio",
        description=(
            para(
                f"Evaluate a checkpoint ({_family_names()}) on the paper's benchmarks at each retention ratio: "
                "ratio 1.0 is the vanilla model (the 100% reference), every other ratio each --method. "
                "Prompts, max_new_tokens and scorers follow --protocol: llava (default), the paper's "
                "numbers, from LLaVA's own evaluation scripts; or lmms-eval, its task settings. "
                "Prompts are wrapped in the checkpoint's chat template; greedy decoding. Predictions are appended to "
                "<output-dir>/predictions/<benchmark>-<split>/<method>-R<ratio>.jsonl as they are "
                "produced: an interrupted run resumes where it stopped, re-running a finished one only "
                "re-scores. Prints (and writes to summary.md / summary.json) each score, the score "
                "relative to the vanilla run, the mean visual tokens per sample and the median "
                "generate latency per sample."
            )
            + "\n\n"
            + para(
                "Under torchrun or accelerate launch the questions are split across the processes "
                "(one GPU each, cuda:LOCAL_RANK) and the shards merged at the end; a run resumes with "
                "any number of processes."
            )
        ),
        epilog=(
            "The methods run at every ratio below 1; ratio 1.0 is the vanilla model, run once.\n\n"
            "examples:\n"
            f"  globalcom2 eval {example}\n"
            f"  globalcom2 eval {example} \\\n      --method globalcom2,fastervlm --method-arg layout=spatial --limit 100\n"
            f"  torchrun --nproc_per_node=8 -m globalcom2 eval {example}\n"
            f"  accelerate launch --num_processes 8 -m globalcom2 eval {example}\n"
            "  globalcom2 eval --rescore --output-dir globalcom2-eval    # score existing predictions only\n"
            "  globalcom2 eval --list-benchmarks --verbose             # each benchmark's files and layouts\n"
            "  globalcom2 eval --write-sample-data sample-data          # a tiny synthetic copy of every benchmark\n"
            "  globalcom2 eval --model tiny --benchmarks textvqa,pope,mme --data-root sample-data \\\n"
            "      --retention-ratio 1.0,0.25 --output-dir sample-eval     # try the whole pipeline offline\n\n"
            "protocols (--protocol):\n"
            + "\n".join(para(text) for text in PROTOCOL_EPILOG)
            + "\n\n"
            + para(
                "data: --data-root holds each benchmark's folder as LLaVA's evaluation guide lays it out "
                "(playground/data/eval/<benchmark>/...) or the lmms-lab parquet copies; see "
                "'globalcom2 eval --list-benchmarks --verbose' for the folder names and files each benchmark "
                "reads, and --write-sample-data for a small synthetic copy of each in that layout."
            )
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default=None, metavar="ID_OR_PATH",
                   help=f"hub id or checkpoint directory (e.g. {EXAMPLE_MODEL}); 'tiny': the random demo model")
    p.add_argument("--benchmarks", default=None, metavar="NAME[,NAME...]",
                   help="comma-separated benchmark names (see --list-benchmarks)")
    p.add_argument("--list-benchmarks", action="store_true", help="list the known benchmarks and exit")
    p.add_argument("--verbose", action="store_true",
                   help="with --list-benchmarks: also each benchmark's splits, expected files and folder layouts")
    p.add_argument("--write-sample-data", default=None, metavar="DIR",
                   help="write a small synthetic copy of each benchmark (or of --benchmarks) under DIR, in LLaVA's "
                        "layout, to try the command with --data-root DIR (e.g. --model tiny), and exit; the "
                        "questions and images are made up: the scores mean nothing")
    p.add_argument("--data-root", default=None, metavar="DIR", help="folder holding the benchmarks' data")
    ratio_group = p.add_mutually_exclusive_group()
    ratio_group.add_argument("--retention-ratio", default=DEFAULT_RATIOS, metavar="R[,R...]",
                             help=f"comma-separated ratios in (0, 1]; 1.0 is the vanilla model (default: {DEFAULT_RATIOS})")
    add_visual_tokens_argument(ratio_group, "--retention-ratio (the model's maximum, 2880, is the vanilla model)")
    add_method_arguments(p)  # --method, --method-arg (as bench and visualize have them)
    p.add_argument("--protocol", choices=PROTOCOL_CHOICES, default=PROTOCOL_CHOICES[0], help=PROTOCOL_HELP)
    p.add_argument("--split", action="append", default=[], metavar="BENCH=SPLIT",
                   help="the split of a benchmark, repeatable (default: each benchmark's default split)")
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT, metavar="DIR",
                   help=f"predictions, submissions and summaries (default: ./{DEFAULT_OUTPUT})")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N questions of each benchmark")
    p.add_argument("--batch-size", type=int, default=1, metavar="B", help="questions per generate call (default: 1)")
    add_device_arguments(p, "auto: cuda when available, else cpu; distributed: cuda:LOCAL_RANK (default: auto)")
    p.add_argument("--rescore", action="store_true",
                   help="only re-score every run found in --output-dir (no model, data or --benchmarks needed)")
    p.add_argument("--judge-url", default=None, metavar="URL",
                   help="OpenAI-compatible base URL of the judge model for MM-Vet")
    p.add_argument("--judge-model", default=None, metavar="NAME", help="the judge model's name (MM-Vet)")
    p.add_argument("--judge-api-key-env", default=None, metavar="VAR",
                   help="environment variable holding the judge's API key (MM-Vet)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or status lines")
    p.add_argument("--format", choices=FORMAT_CHOICES, default="table", help="printed summary format (default: table)")
    p.set_defaults(func=run)
    return p


# ------------------------------------------------------------------------------------------------
# Argument checks
# ------------------------------------------------------------------------------------------------


def _split_list(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _parse_pairs(items: list[str], option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise CLIError(f"{option}: expected BENCH=SPLIT, got {item!r}")
        out[key.strip().lower()] = value.strip()
    return out


def _judge(args: argparse.Namespace) -> dict[str, Any] | None:
    import os
    import re

    if args.judge_url is None and args.judge_model is None and args.judge_api_key_env is None:
        return None
    api_key = None
    if args.judge_api_key_env is not None:
        api_key = os.environ.get(args.judge_api_key_env)
        if not api_key:
            raise CLIError(f"--judge-api-key-env: the environment variable {args.judge_api_key_env} is not set")
    if not (args.judge_model or "").strip():  # found now, not after every answer is generated
        given = "--judge-url" if args.judge_url is not None else "--judge-api-key-env"
        raise CLIError(f"{given} needs --judge-model: the judge model's name (MM-Vet's paper used gpt-4-0613)")
    if args.judge_url is not None and not re.match(r"^https?://\S+$", args.judge_url, flags=re.IGNORECASE):
        raise CLIError(f"--judge-url: expected an http(s):// URL, got {args.judge_url!r}")
    return {"base_url": args.judge_url, "model": args.judge_model, "api_key": api_key}


def _check_output_dir(path: str, writable: bool = True) -> Path:
    """``--output-dir``, checked before any data or model is read: a folder, or one that can be
    created (it is created when the first prediction is written); ``writable`` False for
    ``--rescore``, which only reads it (and writes the summaries)."""
    return output_dir(path, "--output-dir", writable=writable)


def _list_benchmarks(verbose: bool = False) -> int:
    from ..eval.base import benchmark_names, get_benchmark

    rows = []
    for name in benchmark_names():
        budgets = "/".join(str(get_benchmark(name, protocol).max_new_tokens) for protocol in PROTOCOL_CHOICES)
        b = get_benchmark(name)
        rows.append((name, getattr(b, "title", name), ",".join(b.splits), b.primary_metric,
                     budgets, ",".join(b.data_dirs) or "-"))
    headers = ("name", "title", "splits", "metric", "max_new_tokens (" + "/".join(PROTOCOL_CHOICES) + ")",
               "folders under --data-root")
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    echo("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for r in rows:
        echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if verbose:  # each benchmark's own description of its data: the layouts, file names and columns it reads
        import inspect

        for name in benchmark_names():
            b = get_benchmark(name)
            echo("")
            echo(f"== {name} ({getattr(b, 'title', name)}) ==")
            echo(inspect.cleandoc(type(b).__doc__ or "(no description)"))
    else:
        echo("")
        echo("--verbose: each benchmark's expected files and layouts; --write-sample-data DIR: a small synthetic copy")
    return 0


def _write_sample_data(folder: str, names: list[str]) -> int:
    """``--write-sample-data``: synthetic benchmark folders under ``folder`` (see :mod:`globalcom2.eval.samples`)."""
    from ..eval.samples import MAKERS, write_sample_data

    root = output_dir(folder, "--write-sample-data")
    names = names or list(MAKERS)
    try:
        files = write_sample_data(root, names)
    except ValueError as e:
        raise CLIError(f"--benchmarks: {e}") from None
    except OSError as e:
        raise cannot_write(folder, e) from None
    echo(f"wrote {len(files)} files under {root}: synthetic {', '.join(names)} in LLaVA's layout "
         "(made-up questions and images: the scores mean nothing)")
    quick = [n for n in ("textvqa", "pope", "mme") if n in names] or names[:3]  # short answers: quick to try
    echo("try: globalcom2 eval --model tiny --benchmarks " + ",".join(quick)
         + f" --data-root {folder} --retention-ratio 1.0,0.25 --output-dir sample-eval")
    return 0


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------


class _Settings(NamedTuple):
    """The checked options of an evaluation: benchmark names, retention ratios, methods and their
    options, the runs they make (:func:`globalcom2.eval.runner.plan_runs`) and the splits."""

    names: list[str]
    ratios: list[float]
    methods: list[str]
    options: dict[str, Any]
    runs: list[Any]
    splits: dict[str, str]


def run(args: argparse.Namespace) -> int:
    """Execute ``globalcom2 eval`` (raises :class:`CLIError` on bad input)."""
    if args.list_benchmarks:
        return _list_benchmarks(args.verbose)
    if args.write_sample_data is not None:
        return _write_sample_data(args.write_sample_data, _split_list(args.benchmarks))

    if not args.rescore and args.model:
        # a missing directory, a bare name, an unknown hub id: reported now (no torch yet), not after the data is read
        loading.check_model(args.model, "eval")

    from ..eval import runner

    # 1. Cheap checks first: every option, then the data, then (only when needed) the model.
    out = _check_output_dir(args.output_dir, writable=not args.rescore)
    judge = _judge(args)
    show = not args.no_progress
    if args.rescore:
        return _rescore(out, judge, show, args.format)
    settings = _check_settings(args)
    try:  # an --output-dir of another protocol is refused before any data or model is read
        runner.check_output_protocol(out, args.protocol)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if not args.data_root:
        raise CLIError("--data-root is required: the folder holding the benchmarks' data")
    root = Path(args.data_root).expanduser()
    if not root.is_dir():
        raise CLIError(f"--data-root {args.data_root} is not a directory")
    try:
        dist = runner.DistEnv.from_env()
    except ValueError as e:
        raise CLIError(f"distributed launch: {e}") from None
    loaded, missing = _load_data(settings, root, args.limit, judge, args.protocol, out)

    # 2. The model, on this rank's device (not loaded when everything is answered already).
    device = pick_device(args.device)
    device_name = _rank_device(dist, device)
    try:
        dist.init("nccl" if device == "cuda" else "gloo")
    except (RuntimeError, ValueError) as e:
        raise CLIError(f"cannot join the distributed job: {one_line(str(e))}") from None
    try:
        dist.barrier()  # every rank has read the state of the output folder before rank 0 changes it
        model = processor = None
        if missing:
            if show and dist.is_main:
                status(f"{PROG}: {missing} answers to generate; loading {args.model} ...")
            model, processor = loading.get_model(args.model, device_name, pick_dtype(args.dtype, device),
                                                settings=[r for r in settings.runs if not r.is_vanilla])
        elif show and dist.is_main:
            status(f"{PROG}: every prediction exists in {out}: re-scoring only")
        summary = _evaluate(model, processor, loaded, root, settings, out, args, judge, dist)
    finally:
        dist.shutdown()
    if dist.is_main:
        _print(summary, args.format, out)
    return 0


def _rescore(out: Path, judge: dict[str, Any] | None, show: bool, fmt: str) -> int:
    """``--rescore``: score every run found in ``out`` and print the summary in ``fmt``."""
    from ..eval import runner

    try:
        summary = runner.score_outputs(out, judge=judge, progress=show)
    except (FileNotFoundError, ValueError) as e:  # DataError included
        raise CLIError(f"--rescore: {e}") from None
    _print(summary, fmt, out)
    return 0


def _check_settings(args: argparse.Namespace) -> _Settings:
    """Every option of a (not ``--rescore``) evaluation that needs neither data nor model, in the
    order the command reports them: the benchmarks, ratios, methods, splits, --limit,
    --batch-size and --model."""
    from ..eval import runner
    from ..eval.base import get_benchmark

    names = _split_list(args.benchmarks)
    if not names:
        raise CLIError("--benchmarks: give at least one benchmark (see --list-benchmarks)")
    for name in names:
        try:
            get_benchmark(name)
        except ValueError as e:
            raise CLIError(f"--benchmarks: {e}") from None
    ratios = parse_budget(args, "--retention-ratio", args.model)
    methods, options = parse_method_arguments(args, ratio_flag="--retention-ratio")
    try:  # plan_runs checks every setting with globalcom2.methods.plan_settings, as the other commands do
        runs = runner.plan_runs(ratios, methods, options, ratio_flag="--retention-ratio")
    except ValueError as e:
        raise CLIError(f"--method/--method-arg: {e}") from None
    splits = _parse_pairs(args.split, "--split")
    if args.limit is not None:
        check_positive("--limit", args.limit)
    check_positive("--batch-size", args.batch_size)
    if not args.model:
        raise CLIError("--model is required (a hub id, a checkpoint directory, or 'tiny')")
    return _Settings(names, ratios, methods, options, runs, splits)


def _load_data(
    settings: _Settings, root: Path, limit: int | None, judge: dict[str, Any] | None, protocol: str, out: Path
) -> tuple[list[Any], int]:
    """(the benchmarks' samples read from ``root``, how many answers are still to generate into
    ``out``), after checking every image file of a question still to answer, before the model is
    loaded. Data errors are :class:`CLIError`."""
    from ..eval import runner

    try:
        loaded = runner.load_benchmarks(settings.names, root, settings.splits, limit, judge, protocol=protocol)
    except ValueError as e:  # DataError included
        raise CLIError(str(e)) from None  # main() makes it one line
    missing = runner.pending(loaded, settings.runs, out)
    try:
        runner.check_images(loaded, settings.runs, out)
    except ValueError as e:  # DataError
        raise CLIError(str(e)) from None
    return loaded, missing


def _rank_device(dist: Any, device: str) -> str:
    """This process's device: ``cuda:LOCAL_RANK`` when distributed on CUDA (a CLIError when this
    machine has fewer GPUs than that), else ``device``."""
    if not (dist.is_distributed and device == "cuda"):
        return device
    import torch

    if dist.local_rank >= torch.cuda.device_count():
        raise CLIError(
            f"LOCAL_RANK={dist.local_rank} but this machine has {torch.cuda.device_count()} CUDA device(s): "
            "start at most one process per GPU (e.g. torchrun --nproc_per_node=<number of GPUs>)"
        )
    return dist.device()


def _evaluate(
    model: Any, processor: Any, loaded: list[Any], root: Path, settings: _Settings, out: Path,
    args: argparse.Namespace, judge: dict[str, Any] | None, dist: Any,
) -> Any:
    """:func:`globalcom2.eval.runner.run_eval` with the command's options; its errors are
    :class:`CLIError` (a failed write names ``out``)."""
    from ..eval import runner

    try:
        return runner.run_eval(
            model, processor, loaded, root, settings.ratios, settings.methods, settings.options, output_dir=out,
            limit=None, batch_size=args.batch_size, progress=not args.no_progress, judge=judge, dist=dist,
            protocol=args.protocol,
        )
    except (ValueError, RuntimeError) as e:  # DataError, apply()'s errors, processor failures
        raise CLIError(str(e)) from None  # main() makes it one line
    except OSError as e:
        raise cannot_write(f"to {out}", e) from None


def _print(summary: Any, fmt: str, out: Path) -> None:
    echo(summary.format(fmt))
    if fmt == "table":
        status(f"summary written to {out / 'summary.md'} and {out / 'summary.json'}")
