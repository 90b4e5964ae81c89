"""The ``globalcom2`` command: an offline demo, and generation with a real checkpoint (LLaVA-NeXT,
LLaVA-OneVision, InternVL).

    globalcom2 demo [--output-dir DIR]
    globalcom2 generate --model ID_OR_PATH --image PATH_OR_URL --prompt TEXT [--compare] ...
    globalcom2 embed --model ID_OR_PATH --image PATH... --out FILE.safetensors

Importing this package is cheap: torch, transformers and PIL are imported inside the commands,
so ``--help`` answers quickly. Every failure the user can cause (a missing image, a model that
cannot be loaded or is of no supported family, a bad retention ratio, ...) ends with one line on stderr,
``globalcom2: error: ...``, and a non-zero exit status, never a traceback (set the environment
variable ``GLOBALCOM2_TRACEBACK=1`` to see one).

The package: what the commands share, by concern (:mod:`.output`: errors and output;
:mod:`.arguments`: flags and their checks; :mod:`.loading`: images, models, the model-family
section), and one module per command (:data:`COMMANDS`), each with ``add_parser(subparsers)`` and
``run(args) -> int``. Nothing outside this package imports it.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from .. import __version__
from ..generation import build_prompt
from . import bench, demo, efficiency, embed, eval, generate, serve, visualize
from .arguments import parse_method_arguments
from .loading import EXAMPLE_MODEL, hub_access, load_image
from .output import PROG, CLIError, Parser, echo, one_line, para

# The model-family functions (check_model_type, load_model, get_model) are deliberately not
# re-exported: the commands look them up on .loading, so that is the one place to replace them.
__all__ = [
    "COMMANDS", "CLIError", "build_parser", "build_prompt", "hub_access", "load_image", "main", "parse_method_arguments",
]

#: The command modules, in the order ``globalcom2 --help`` lists them.
COMMANDS = (demo, generate, embed, efficiency, bench, visualize, eval, serve)


def _family_names(conjunction: str) -> str:
    """"LLaVA-NeXT, LLaVA-OneVision and InternVL": the registered families (no torch)."""
    from ..models import families

    names = [f.display_name for f in families()]
    return f"{', '.join(names[:-1])} {conjunction} {names[-1]}" if len(names) > 1 else names[0]


def build_parser() -> argparse.ArgumentParser:
    """The ``globalcom2`` parser, with every command of :data:`COMMANDS` (``args.func`` runs it)."""
    parser = Parser(
        prog=PROG,
        description=para(
            "GlobalCom2 (arXiv 2501.05179): training-free visual-token compression for the "
            f"{_family_names('and')} models of Hugging Face transformers."
        ),
        epilog=(
            "examples:\n"
            "  globalcom2 demo                      # offline: sample image + tiny random model, writes PNGs\n"
            f"  globalcom2 generate --model {EXAMPLE_MODEL} \\\n"
            '      --image photo.jpg --prompt "What is in this picture?" --retention-ratio 0.25 --compare\n\n'
            "Run 'globalcom2 COMMAND --help' for the options of a command."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``globalcom2`` command line; returns the exit status."""
    parser = build_parser()
    # --help, --version and usage errors end here with SystemExit (0, or 2 after one error line).
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        echo(f"{PROG}: error: {one_line(str(e), limit=1000)}", sys.stderr)
        return e.code
    except KeyboardInterrupt:
        echo(f"{PROG}: error: interrupted", sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure: still one line, unless asked for the traceback
        if os.environ.get("GLOBALCOM2_TRACEBACK"):
            raise
        message = one_line(str(e)) or "(no message)"
        echo(
            f"{PROG}: error: {type(e).__name__}: {message} (set GLOBALCOM2_TRACEBACK=1 for the traceback)",
            sys.stderr,
        )
        return 1
