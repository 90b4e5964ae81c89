"""The ``globalcom2`` command: an offline demo, and generation with a real LLaVA-NeXT checkpoint.

    globalcom2 demo [--output-dir DIR]
    globalcom2 generate --model ID_OR_PATH --image PATH_OR_URL --prompt TEXT [--compare] ...

Importing this module is cheap: torch, transformers and PIL are imported inside the commands,
so ``--help`` answers quickly. Every failure the user can cause (a missing image, a model that
cannot be loaded or is not LLaVA-NeXT, a bad retention ratio, ...) ends with one line on stderr,
``globalcom2: error: ...``, and a non-zero exit status, never a traceback (set the environment
variable ``GLOBALCOM2_TRACEBACK=1`` to see one).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import statistics
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Iterator, NoReturn, Sequence

from . import __version__
from .generation import build_prompt, greedy_kwargs, sync, to_model

PROG = "globalcom2"
LAYOUT_CHOICES = ("official", "spatial")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
DTYPE_CHOICES = ("auto", "float16", "bfloat16", "float32")
FORMAT_CHOICES = ("table", "json", "csv")
SUPPORTED_MODEL_TYPES = ("llava_next",)
EXAMPLE_MODEL = "llava-hf/llava-v1.6-vicuna-7b-hf"


class CLIError(Exception):
    """A failure to report as one ``globalcom2: error: ...`` line (exit status ``code``)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _one_line(text: str, limit: int = 400) -> str:
    """Collapse whitespace (a multi-line exception message becomes one line) and shorten."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def add_method_arguments(parser: argparse.ArgumentParser, several: bool = True) -> None:
    """``--method`` and ``--method-arg KEY=VALUE`` (shared by bench, visualize and eval)."""
    what = "comma-separated methods to compare" if several else "the method whose kept tokens are drawn"
    parser.add_argument(
        "--method", default="globalcom2", metavar="NAME[,NAME...]" if several else "NAME",
        help=f"{what}: globalcom2 (default), fastervlm, random, pooling, fastv, or <vision method>+fastv",
    )
    parser.add_argument(
        "--method-arg", action="append", default=[], metavar="KEY=VALUE",
        help="a method option, repeatable, given to every method that has it: e.g. layout=spatial, "
             "allocation=uniform, scoring=local_only, seed=1, layer=2 (FastV), fastv_retention_ratio=0.5",
    )


def parse_method_arguments(
    args: argparse.Namespace, several: bool = True, ratio_flag: str = "--retention-ratio"
) -> tuple[list[str], dict[str, Any]]:
    """(method names, options) from :func:`add_method_arguments`'s flags, validated (CLIError).

    The option rule is :func:`globalcom2.methods.check_method_options`'s, the same for every
    command: ``retention_ratio`` is never a ``--method-arg`` (it is given with ``ratio_flag``,
    the command's own flag), and an option none of the methods has is an error.

    A command's own ``--layout`` flag, where it has one and it is given, is added to the options
    (after the ``--method-arg`` checks, so it overrides a ``layout=`` given there)."""
    from .methods import UnknownOptionError, check_method_options, method_names, parse_method_options

    names = [m.strip().lower() for m in str(args.method).split(",") if m.strip()]
    if not names:
        raise CLIError("--method: give at least one method")
    if not several and len(names) > 1:
        raise CLIError(f"--method: give one method here, got {args.method!r}")
    for m in names:
        if m not in method_names():
            raise CLIError(f"--method: unknown method {m!r}; known: {', '.join(method_names())}")
    try:
        options = parse_method_options(args.method_arg)
        check_method_options(names, options, ratio_flag)
    except UnknownOptionError as e:
        raise CLIError(
            f"--method-arg: unknown option(s) {', '.join(e.unknown)} for {', '.join(e.methods)}; "
            f"known: {', '.join(e.known) or 'none'}"
        ) from None
    except ValueError as e:
        raise CLIError(f"--method-arg: {e}") from None
    layout = getattr(args, "layout", None)
    if layout is not None:
        options["layout"] = layout
    return names, options


def method_settings(
    args: argparse.Namespace, ratios: Sequence[float], ratio_flag: str, several: bool = True
) -> tuple[list[str], dict[str, Any], list[Any]]:
    """(method names, options, validated settings) of a command: :func:`parse_method_arguments`,
    then every (method, ratio) setting checked by :func:`globalcom2.methods.plan_settings`, the
    one validation path of generate, bench, visualize and eval (CLIError on any problem)."""
    from .methods import plan_settings

    names, options = parse_method_arguments(args, several=several, ratio_flag=ratio_flag)
    try:
        settings = plan_settings(names, ratios, options, ratio_flag=ratio_flag)
    except ValueError as e:
        raise CLIError(str(e)) from None
    return names, options, settings


def add_visual_tokens_argument(group: Any, ratio_flag: str) -> None:
    """``--visual-tokens N[,N...]``, the field's way of naming a budget (LLaVA-NeXT at 640 / 320 /
    160 tokens), as an alternative to ``ratio_flag`` in the same mutually exclusive group."""
    group.add_argument(
        "--visual-tokens", default=None, metavar="N[,N...]",
        help=f"visual tokens per image instead of {ratio_flag} (e.g. 640,320,160), converted to ratios "
             "with the model's own maximum (2880 = 5 x 576 for LLaVA-NeXT); both are shown",
    )


def parse_budget(args: argparse.Namespace, ratio_flag: str, model: str | None = None) -> list[float]:
    """The retention ratios of a command: ``--visual-tokens`` converted with the model's maximum
    (reported on stderr), or the ratio flag's own values. Raises :class:`CLIError`."""
    from . import efficiency as eff

    if getattr(args, "visual_tokens", None) is not None:
        maximum = eff.max_visual_tokens_for_model(model) if model and model != "tiny" else eff.MAX_VISUAL_TOKENS
        try:
            ratios = eff.parse_visual_tokens(args.visual_tokens, maximum)
        except ValueError as e:
            raise CLIError(f"--visual-tokens: {e}") from None
        _status(f"{PROG}: {eff.describe_visual_tokens(ratios, maximum)}")
        return ratios
    try:
        return eff.parse_ratios(getattr(args, ratio_flag.lstrip("-").replace("-", "_")))
    except ValueError as e:
        raise CLIError(f"{ratio_flag}: {e}") from None


def _para(text: str) -> str:
    """A paragraph wrapped for help output (the raw formatter keeps it as written)."""
    return textwrap.fill(" ".join(text.split()), width=79, break_on_hyphens=False, break_long_words=False)


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one ``globalcom2: error:`` line too."""

    def error(self, message: str) -> NoReturn:
        hint = f"see '{self.prog} --help'"
        self.exit(2, f"{PROG}: error: {_one_line(message)} ({hint})\n")


# ------------------------------------------------------------------------------------------------
# Argument parsing
# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description=_para(
            "GlobalCom2 (arXiv 2501.05179): training-free visual-token compression for LLaVA-NeXT "
            "models of Hugging Face transformers."
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

    demo = sub.add_parser(
        "demo",
        help="offline demo on a shipped sample image with a tiny random LLaVA-NeXT (writes PNGs)",
        description=(
            "Run GlobalCom2 fully offline on the sample image shipped with the package, with a tiny "
            "LLaVA-NeXT built in code (real geometry, RANDOM weights: which tokens are kept is "
            "meaningless, the counts and crop budgets are real). Prints the visual-token counts "
            "before and after for several retention ratios and both layouts, the per-crop retention "
            "ratios, and writes pictures of the kept tokens."
        ),
    )
    demo.add_argument(
        "--output-dir", default="globalcom2-demo", metavar="DIR",
        help="where the PNG pictures and summary.json go (created; default: ./globalcom2-demo)",
    )
    demo.add_argument(
        "--image", default=None, metavar="PATH",
        help="use this image file instead of the shipped sample (still the tiny random model)",
    )
    demo.add_argument(
        "--ratios", default="1.0,0.5,0.25,0.1", metavar="R[,R...]",
        help="comma-separated retention ratios to show (default: 1.0,0.5,0.25,0.1)",
    )
    demo.set_defaults(func=cmd_demo)

    gen = sub.add_parser(
        "generate",
        help="answer a prompt about an image with a LLaVA-NeXT checkpoint, compressed by GlobalCom2",
        description=_para(
            "Load a LLaVA-NeXT checkpoint (a Hugging Face hub id or a local directory), apply "
            "GlobalCom2 and answer a prompt about one image with greedy decoding. Prints the answer "
            "and the number of visual tokens (vanilla vs kept). With --compare, the vanilla model "
            "answers too and the prefill times of both are measured."
        ),
        epilog=(
            "example:\n"
            f"  globalcom2 generate --model {EXAMPLE_MODEL} --image photo.jpg \\\n"
            '      --prompt "What is in this picture?" --retention-ratio 0.25 --compare\n\n'
            + _para(
                "supported: LLaVA-NeXT checkpoints (config model_type 'llava_next'), e.g. "
                "llava-hf/llava-v1.6-{vicuna-7b,vicuna-13b,mistral-7b,34b}-hf, llava-hf/llama3-llava-next-8b-hf."
            )
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("--model", required=True, metavar="ID_OR_PATH", help=f"hub id or local directory (e.g. {EXAMPLE_MODEL})")
    gen.add_argument("--image", required=True, metavar="PATH_OR_URL", help="an image file, or an http(s) URL")
    gen.add_argument("--prompt", required=True, metavar="TEXT", help="the question or instruction about the image")
    gen.add_argument(
        "--retention-ratio", type=float, default=0.25, metavar="R",
        help="fraction of visual tokens kept, 0 < R <= 1 (default: 0.25)",
    )
    gen.add_argument(
        "--layout", choices=LAYOUT_CHOICES, default=None,
        help="official: the published implementation token for token (GlobalCom2's default); spatial: tokens at "
             "their true positions",
    )
    add_method_arguments(gen, several=False)
    gen.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="answer length limit (default: 128)")
    gen.add_argument(
        "--compare", action="store_true",
        help="also run the vanilla model; print both answers, visual-token counts and prefill times",
    )
    gen.add_argument(
        "--timing-runs", type=int, default=3, metavar="N",
        help="with --compare: prefill forward passes timed per model, the median is reported (default: 3)",
    )
    gen.add_argument(
        "--device", choices=DEVICE_CHOICES, default="auto",
        help="auto: cuda when available, else cpu (default: auto)",
    )
    gen.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="auto",
        help="auto: the checkpoint's dtype on cuda, float32 on cpu (default: auto)",
    )
    gen.set_defaults(func=cmd_generate)

    eff = sub.add_parser(
        "efficiency",
        help="analytic prefill FLOPs, KV cache and roofline times per retention ratio",
        description=_para(
            "Theoretical cost of the language model's prefill and decode for each retention ratio, "
            "LLM-Viewer's way, operator for operator: every decoder block's linear layers (2 FLOPs per "
            "multiply-add), QK^T, softmax, AV, both RMSNorms, both residual adds and the MLP activation, plus "
            "the LM head on one position; KV cache = 2 x layers x kv_heads x head_dim x bytes per token; a "
            "per-operator roofline on the chosen hardware (LLM-Viewer's figures where it has the card). By default (--text-tokens 0) it follows the "
            "paper's convention: only the R x 2880 retained visual tokens of one 4-crop image. Works "
            "offline for the public llava-hf LLaVA-NeXT checkpoints and for any local config.json."
        ),
        epilog=(
            "example:\n  globalcom2 efficiency --model llava-hf/llava-v1.6-vicuna-7b-hf --ratios 1,0.5,0.25,0.1 --hardware H100\n\n"
            "known offline: " + ", ".join(
                ["llava-hf/llava-v1.6-vicuna-7b-hf", "llava-hf/llava-v1.6-vicuna-13b-hf", "llava-hf/llava-v1.6-mistral-7b-hf",
                 "llava-hf/llama3-llava-next-8b-hf", "llava-hf/llava-v1.6-34b-hf"]
            )
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    eff.add_argument("--model", default=EXAMPLE_MODEL, metavar="ID_OR_PATH",
                     help=f"hub id, checkpoint directory or config.json (default: {EXAMPLE_MODEL})")
    ratio_group = eff.add_mutually_exclusive_group()
    ratio_group.add_argument("--ratios", default="1,0.75,0.5,0.25,0.1", metavar="R[,R...]",
                             help="comma-separated retention ratios (default: 1,0.75,0.5,0.25,0.1)")
    add_visual_tokens_argument(ratio_group, "--ratios")
    eff.add_argument("--text-tokens", type=int, default=0, metavar="N",
                     help="text tokens added to every prompt (default: 0, the paper's convention)")
    eff.add_argument("--hardware", default="A100-80GB", metavar="NAME",
                     help="roofline profile: A100-40GB, A100-80GB, H100, H100-PCIe (LLM-Viewer's figures), "
                          "H200 (NVIDIA's datasheet) (default: A100-80GB)")
    eff.add_argument("--flash-attention", action="store_true",
                     help="cost LLM-Viewer's fused attention (no score-matrix traffic) instead of "
                          "qk_matmul, softmax and sv_matmul")
    eff.add_argument("--breakdown", action="store_true",
                     help="also print the per-operator roofline of one decoder block and the LM head, per ratio")
    eff.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                     help="weights/activations/KV cache precision (default: bfloat16)")
    eff.add_argument("--fastv-layer", type=int, default=None, metavar="K",
                     help="cost FastV instead: the ratio applies inside the language model from layer K on "
                          "(layers before K see every visual token)")
    eff.add_argument("--format", choices=FORMAT_CHOICES, default="table", help="output format (default: table)")
    eff.set_defaults(func=cmd_efficiency)

    bench = sub.add_parser(
        "bench",
        help="measure vanilla vs GlobalCom2 (and baselines): latency, throughput, memory, KV cache, tokens",
        description=_para(
            "Run vanilla LLaVA-NeXT and GlobalCom2 (or any --method, several for a comparison table) at each "
            "retention ratio side by side in one process on the same inputs, and report median prefill latency, vision-encoder time, compression-step "
            "time, end-to-end generate latency and throughput, peak memory (CUDA max allocated on GPU, "
            "process RSS on CPU), KV-cache size and visual tokens, with ratios to vanilla. Warm-up runs "
            "are excluded and CUDA is synchronised before every timer read. The default model is the "
            "tiny random demo model (offline); pass a checkpoint for real numbers."
        ),
        epilog=(
            "examples:\n  globalcom2 bench                                   # tiny random model, shipped sample image\n"
            f"  globalcom2 bench --model {EXAMPLE_MODEL} --image photo.jpg --ratios 0.5,0.25,0.1 --plot bench.png\n"
            "  globalcom2 bench --method globalcom2,fastervlm,fastv,pooling --ratios 0.25"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("--model", default="tiny", metavar="ID_OR_PATH",
                       help="'tiny' (default: the built-in random demo model), a hub id or a checkpoint directory")
    bench.add_argument("--image", action="append", default=None, metavar="PATH_OR_URL",
                       help="image(s) to use, repeat for several prompts (default: the shipped sample image)")
    bench.add_argument("--prompt", default="Describe the image in detail.", metavar="TEXT", help="the prompt of every image")
    ratio_group = bench.add_mutually_exclusive_group()
    ratio_group.add_argument("--ratios", default="0.5,0.25,0.1", metavar="R[,R...]",
                             help="retention ratios to compare with vanilla (default: 0.5,0.25,0.1)")
    add_visual_tokens_argument(ratio_group, "--ratios")
    bench.add_argument("--layout", choices=LAYOUT_CHOICES, default=None,
                       help="layout of the selection methods (default: each method's own: official for globalcom2)")
    add_method_arguments(bench)
    bench.add_argument("--batch-size", type=int, default=1, metavar="B",
                       help="prompts per batch: the images are repeated up to B (default: 1)")
    bench.add_argument("--max-new-tokens", type=int, default=16, metavar="N", help="tokens generated per prompt (default: 16)")
    bench.add_argument("--runs", type=int, default=3, metavar="N", help="timed runs per measurement, median reported (default: 3)")
    bench.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed warm-up runs (default: 1)")
    bench.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="auto: cuda when available (default: auto)")
    bench.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                       help="auto: the checkpoint's dtype on cuda, float32 on cpu (default: auto)")
    bench.add_argument("--format", choices=FORMAT_CHOICES, default="table", help="output format (default: table)")
    bench.add_argument("--plot", default=None, metavar="OUT.png", help="also write a PNG of latency and tokens vs ratio")
    bench.set_defaults(func=cmd_bench)

    vis = sub.add_parser(
        "visualize",
        help="figure of the kept tokens (and the attention maps behind them) for an image",
        description=_para(
            "Draw the thumbnail and the crop grid as the model sees them (resized onto the AnyRes "
            "canvas, padding hatched), with the tokens GlobalCom2 keeps in colour and the dropped ones "
            "greyed out, each crop labelled with its retention ratio r_j and kept/unpadded tokens, the "
            "thumbnail with its own; one row per retention ratio. With --heatmaps, the [CLS] importance "
            "maps that drove the decision are added: the thumbnail's (global), the thumbnail's resized "
            "onto the crops (global guidance), the crops' own (local) and the combined score. The image "
            "is encoded once for all ratios. The default model is the tiny random demo model (offline; "
            "the figure says its kept positions are meaningless); pass a checkpoint for a real picture."
        ),
        epilog=(
            "examples:\n  globalcom2 visualize --image photo.jpg --retention-ratio 0.5,0.25,0.1 --heatmaps\n"
            f"  globalcom2 visualize --model {EXAMPLE_MODEL} --image photo.jpg \\\n"
            '      --prompt "What is on the sign?" --output kept.png\n'
            "  globalcom2 visualize --image photo.jpg --method fastervlm --retention-ratio 0.25\n"
            "  globalcom2 visualize --image photo.jpg --method globalcom2+fastv --prompt \"What is written?\""
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    vis.add_argument("--image", required=True, metavar="PATH_OR_URL", help="an image file, or an http(s) URL")
    vis.add_argument("--model", default="tiny", metavar="ID_OR_PATH",
                     help="'tiny' (default: the built-in random demo model), a hub id or a checkpoint directory")
    ratio_group = vis.add_mutually_exclusive_group()
    ratio_group.add_argument("--retention-ratio", default="0.25", metavar="R[,R...]",
                             help="one or more comma-separated ratios in (0, 1], one row each (default: 0.25)")
    add_visual_tokens_argument(ratio_group, "--retention-ratio")
    vis.add_argument("--layout", choices=LAYOUT_CHOICES, default=None,
                     help="layout used for the token counts (the kept tokens are the same in both; default: the "
                          "method's own, official for globalcom2)")
    add_method_arguments(vis, several=False)
    vis.add_argument("--output", default="globalcom2-visualize.png", metavar="OUT.png",
                     help="PNG to write (default: globalcom2-visualize.png)")
    vis.add_argument("--heatmaps", action="store_true", help="add the [CLS] importance maps behind the decisions")
    vis.add_argument("--prompt", default=None, metavar="TEXT",
                     help="a question about the image, shown under the title (GlobalCom2's choice does not depend on "
                          "it: the importance comes from the vision tower alone)")
    vis.add_argument("--title", default=None, metavar="TEXT", help="figure title (default: 'GlobalCom2: kept visual tokens at R = ...')")
    vis.add_argument("--dpi", type=int, default=110, metavar="N", help="resolution of the PNG (default: 110)")
    vis.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="auto: cuda when available (default: auto)")
    vis.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                     help="auto: the checkpoint's dtype on cuda, float32 on cpu (default: auto)")
    vis.set_defaults(func=cmd_visualize)

    from .eval.cli import add_parser as add_eval_parser  # imported here: eval.cli imports this module

    add_eval_parser(sub)
    return parser


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def _printable(text: str) -> str:
    """Replace control characters (a random model emits any byte) so the terminal stays sane."""
    return "".join(ch if ch.isprintable() or ch in "\n\t" else "\ufffd" for ch in text)


def _echo(text: str = "", stream: Any = None) -> None:
    """print() that never fails on a terminal that cannot encode some character."""
    stream = sys.stdout if stream is None else stream
    try:
        print(text, file=stream, flush=True)
    except UnicodeEncodeError:
        enc = getattr(stream, "encoding", None) or "ascii"
        print(text.encode(enc, errors="replace").decode(enc, errors="replace"), file=stream, flush=True)


def _status(text: str) -> None:
    """Progress lines go to stderr, so that stdout holds the results only."""
    _echo(text, sys.stderr)


def _output_file(path: str, flag: str) -> Path:
    """A file option (``--output``, ``--plot``) checked before any work: its folder must exist
    (it is not created) and be writable, and it must not be a folder (see :mod:`globalcom2._io`)."""
    from ._io import check_output_file

    try:
        return check_output_file(path, flag)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _output_dir(path: str, flag: str, writable: bool = True) -> Path:
    """A folder option (``--output-dir``) checked before any work: it is, or can be created as, a
    writable folder (no file in the way); the command creates it (see :mod:`globalcom2._io`)."""
    from ._io import check_output_dir

    try:
        return check_output_dir(path, flag, writable=writable)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _is_url(s: str) -> bool:
    return bool(re.match(r"^https?://", s, flags=re.IGNORECASE))


def load_image(source: str) -> Any:
    """Open an image file or URL as an RGB PIL image, or raise :class:`CLIError`."""
    import io

    from PIL import Image, UnidentifiedImageError

    from ._io import to_rgb

    if _is_url(source):
        import urllib.error
        import urllib.request

        request = urllib.request.Request(source, headers={"User-Agent": f"{PROG}/{__version__}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                data = response.read()
        except urllib.error.HTTPError as e:
            raise CLIError(f"cannot fetch image URL {source}: HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            raise CLIError(f"cannot fetch image URL {source}: {_one_line(str(e.reason))}") from None
        except (OSError, ValueError) as e:
            raise CLIError(f"cannot fetch image URL {source}: {_one_line(str(e)) or type(e).__name__}") from None
        stream: Any = io.BytesIO(data)
        name = source
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise CLIError(f"image file not found: {source}")
        if not path.is_file():
            raise CLIError(f"not an image file: {source} is a directory" if path.is_dir() else f"not an image file: {source}")
        stream = path
        name = str(path)
    try:
        with Image.open(stream) as img:
            img.load()
            return to_rgb(img)  # 16-bit and float images keep their range (see globalcom2._io.to_rgb)
    except UnidentifiedImageError:
        raise CLIError(f"cannot read image {name}: not an image format PIL can open") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt files
        raise CLIError(f"cannot read image {name}: {_one_line(str(e)) or type(e).__name__}") from None


def _looks_like_path(model: str) -> bool:
    """True for what cannot be a hub id ("org/name"): ./x, /x, ~/x, a/b/c, a\\b (see :func:`locate_model`)."""
    return (model.startswith((".", "/", "~")) or model.count("/") > 1
            or (os.sep != "/" and os.sep in model) or "\\" in model)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def locate_model(model: str) -> str:
    """Where ``--model`` is, without any network access: ``"local"`` or ``"hub"`` (CLIError if neither).

    The rule, for every command:

    1. an argument that exists on disk is local: a checkpoint directory (it needs a
       ``config.json``; a file is refused);
    2. one that looks like a path (it starts with ``.``, ``/`` or ``~``, has more than one ``/``,
       or an OS separator / backslash) and does not exist is "model directory not found";
    3. a bare name without ``/`` that does not exist locally is "not found" too: LLaVA-NeXT
       checkpoints on the hub have an owner, hub ids look like ``org/name`` (the rare legacy ids
       without an org are not LLaVA-NeXT models);
    4. anything else (``org/name``) is a hub id, resolved by :func:`hub_access`.

    ``tiny`` (the built-in demo model) is handled by :func:`get_model` before this.
    """
    local = Path(model).expanduser()
    if local.exists():
        if local.is_file():
            raise CLIError(f"--model expects a hub id or a checkpoint directory, got the file {model}")
        if not (local / "config.json").is_file():
            raise CLIError(f"not a model directory: {model} has no config.json (expected a saved LLaVA-NeXT checkpoint)")
        return "local"
    if _looks_like_path(model):
        raise CLIError(f"model directory not found: {model}")
    if "/" not in model:
        hint = " ('tiny', the built-in random demo model, is for demo, bench, visualize and eval)" if model == "tiny" else ""
        raise CLIError(
            f"model not found: no local directory {model!r}, and hub ids look like org/name "
            f"(e.g. {EXAMPLE_MODEL}){hint}"
        )
    return "hub"


_HUB_CHECKED: dict[str, dict[str, Any]] = {}


def hub_access(model: str) -> dict[str, Any]:
    """The ``from_pretrained`` keyword arguments for a hub id (``{}`` or ``{"local_files_only": True}``),
    after one quick look at the hub; CLIError with one line when the model cannot be had.

    * ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``): the model must be in the local cache
      ("not in the local cache" otherwise); the hub is not contacted.
    * Otherwise one HEAD request for its ``config.json``, without retries, timeout
      ``HF_HUB_ETAG_TIMEOUT`` (default here: 5 s): a hub that cannot be reached is reported at
      once (set ``HF_HUB_OFFLINE=1`` or pass a local directory), unless the model is cached, in
      which case the cached copy is used; an unknown, gated or config-less repository is named.

    The answer is kept for the process (``load_model`` after ``check_model_type`` asks again).
    """
    if model in _HUB_CHECKED:
        return _HUB_CHECKED[model]
    from huggingface_hub import constants, try_to_load_from_cache

    def cached() -> bool:
        try:
            return isinstance(try_to_load_from_cache(model, "config.json", cache_dir=constants.HF_HUB_CACHE), str)
        except Exception:  # an id the cache layout cannot hold
            return False

    offline = bool(constants.HF_HUB_OFFLINE) or _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")
    if offline:
        if not cached():
            raise CLIError(
                f"cannot load model {model!r}: not in the local cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 "
                "forbids downloading it; unset HF_HUB_OFFLINE to download it, or pass a local directory"
            )
        kwargs: dict[str, Any] = {}
    else:
        kwargs = _probe_hub(model, cached)
    _HUB_CHECKED[model] = kwargs
    return kwargs


def _probe_hub(model: str, cached: Any) -> dict[str, Any]:
    """One HEAD request for ``model``'s config.json (see :func:`hub_access`)."""
    from huggingface_hub import constants, get_hf_file_metadata
    from huggingface_hub import errors as hf_errors

    endpoint = str(constants.ENDPOINT).rstrip("/")
    timeout = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or 5)
    try:
        get_hf_file_metadata(f"{endpoint}/{model}/resolve/main/config.json", timeout=timeout, retry_on_errors=False)
    except hf_errors.GatedRepoError:
        if cached():
            return {}
        raise CLIError(
            f"cannot load model {model!r}: it is gated on the hub: accept its terms at {endpoint}/{model} "
            "and log in (hf auth login, or set HF_TOKEN)"
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise CLIError(
            f"cannot load model {model!r}: no such model on the hub ({endpoint}/{model}), or it is private "
            "and you are not logged in (hf auth login, or set HF_TOKEN)"
        ) from None
    except (hf_errors.EntryNotFoundError, hf_errors.RevisionNotFoundError):
        raise CLIError(f"cannot load model {model!r}: the hub repository has no config.json (not a transformers checkpoint)") from None
    except hf_errors.HfHubHTTPError:
        return {}  # another answer from the hub (rate limit, server error): from_pretrained reports it
    except Exception as e:  # no answer at all: DNS, refused connection, timeout, proxy, TLS
        if cached():
            _status(f"{PROG}: the hub ({endpoint}) is unreachable; using the cached copy of {model}")
            return {"local_files_only": True}
        reason = _one_line(str(e)) or type(e).__name__
        raise CLIError(
            f"cannot load model {model!r}: the Hugging Face hub ({endpoint}) is unreachable ({reason}) and the model "
            "is not in the local cache; set HF_HUB_OFFLINE=1 to use cached models only, or pass a local directory"
        ) from None
    return {}


def check_model_type(model: str) -> Any:
    """Load only the model's config and check it is LLaVA-NeXT; returns the config.

    Where the model is comes from :func:`locate_model` (no network) then, for a hub id,
    :func:`hub_access` (one quick look): a mistake is reported at once, never after the hub
    client's retries."""
    from transformers import AutoConfig

    kwargs = hub_access(model) if locate_model(model) == "hub" else {}
    try:
        config = AutoConfig.from_pretrained(model, **kwargs)
    except Exception as e:  # OSError (not found, hub unreachable), ValueError (unknown type), network errors
        raise CLIError(f"cannot load model {model!r}: {_one_line(str(e)) or type(e).__name__}") from None
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CLIError(
            f"model {model!r} is a {model_type!r} model; globalcom2 supports LLaVA-NeXT checkpoints only "
            f"(model_type 'llava_next', LlavaNextForConditionalGeneration), e.g. {EXAMPLE_MODEL}"
        )
    return config


def _pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device cuda: CUDA is not available (torch {torch.__version__}); use --device cpu")
    return name


def _pick_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        return "auto" if str(device).startswith("cuda") else torch.float32
    return getattr(torch, name)


def load_model(model_id: str, device: str, dtype: Any) -> tuple[Any, Any]:
    """Load a LLaVA-NeXT checkpoint and its processor onto ``device`` (config already checked)."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    _status(f"{PROG}: loading {model_id} ({'checkpoint dtype' if dtype == 'auto' else str(dtype).replace('torch.', '')} on {device}) ...")
    hub = hub_access(model_id) if locate_model(model_id) == "hub" else {}  # kept from check_model_type
    load_kwargs: dict[str, Any] = {"dtype": dtype, **hub}
    # Straight onto the GPU, without a CPU copy of the weights (transformers needs accelerate for it).
    on_device = str(device).startswith("cuda") and importlib.util.find_spec("accelerate") is not None
    if on_device:
        load_kwargs["device_map"] = device
    try:
        processor = AutoProcessor.from_pretrained(model_id, **hub)
        model = LlavaNextForConditionalGeneration.from_pretrained(model_id, **load_kwargs)
    except Exception as e:
        raise CLIError(f"cannot load model {model_id!r}: {_one_line(str(e)) or type(e).__name__}") from None
    if not on_device:
        model = model.to(device)
    return model.eval(), processor


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' advice while the built-in tiny model and processor are made: it is
    about them (install torchvision, ...), not about the user's setup."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def get_model(model_id: str, device: str, dtype: Any) -> tuple[Any, Any]:
    """``"tiny"``: the built-in random demo model; otherwise a checked, loaded LLaVA-NeXT checkpoint."""
    if model_id == "tiny":
        import torch

        from .tiny import build_tiny_llava_next

        with _quiet_transformers():
            return build_tiny_llava_next(dtype=torch.float32 if dtype == "auto" else dtype, device=device)
    check_model_type(model_id)
    return load_model(model_id, device, dtype)


def _prefill_ms(model: Any, inputs: Any, device: str, runs: int) -> float:
    """Median wall time of one forward pass over the whole prompt (image encoding included)."""
    import torch

    times = []
    with torch.no_grad():
        for _ in range(max(1, runs)):
            sync(device)
            t0 = time.perf_counter()
            model(**inputs, use_cache=False, logits_to_keep=1)
            sync(device)
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _generate(model: Any, processor: Any, inputs: Any, max_new_tokens: int) -> tuple[str, float]:
    import torch

    kwargs = greedy_kwargs(getattr(processor, "tokenizer", processor), max_new_tokens)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, **kwargs)
    seconds = time.perf_counter() - t0
    answer = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return _printable(answer.strip()), seconds


# ------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from .config import GlobalCom2Config

    try:
        ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        raise CLIError(f"--ratios: expected comma-separated numbers, got {args.ratios!r}") from None
    for r in ratios:
        try:
            GlobalCom2Config(retention_ratio=r)
        except ValueError as e:
            raise CLIError(f"--ratios: {e}") from None
    if not ratios:
        raise CLIError("--ratios: give at least one retention ratio")
    if args.image is not None:
        load_image(args.image)  # a clear error for a missing or unreadable file
    out_dir = _output_dir(args.output_dir, "--output-dir")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"cannot create output directory {args.output_dir}: {e.strerror or e}") from None

    from .demo import run_demo

    try:
        with _quiet_transformers():
            run_demo(out_dir, image=args.image, ratios=ratios, echo=_echo)
    except OSError as e:
        raise CLIError(f"cannot write to {args.output_dir}: {_one_line(e.strerror or str(e))}") from None
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .methods import fastv_config, vision_config

    # 1. Cheap checks first: arguments, the image, the model's config (no weights yet).
    _, _, planned = method_settings(args, [args.retention_ratio], "--retention-ratio", several=False)
    cfg = planned[0].config
    vcfg = vision_config(cfg)
    title = {"globalcom2": "GlobalCom2"}.get(cfg.method, cfg.method)
    settings = f"retention ratio {cfg.retention_ratio:g}" + (
        f", layout {vcfg.layout}" if vcfg is not None and hasattr(vcfg, "layout") else "")
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.timing_runs < 1:
        raise CLIError(f"--timing-runs must be >= 1, got {args.timing_runs}")
    image = load_image(args.image)
    check_model_type(args.model)
    device = _pick_device(args.device)
    dtype = _pick_dtype(args.dtype, device)

    # 2. Load the model and processor.
    import globalcom2

    model, processor = load_model(args.model, device, dtype)

    text = build_prompt(processor, args.prompt)
    try:
        inputs = processor(images=image, text=text, return_tensors="pt")
    except Exception as e:
        raise CLIError(f"the processor of {args.model!r} failed on this image/prompt: {_one_line(str(e))}") from None
    inputs = to_model(inputs, model)

    # 3. The method.
    try:
        globalcom2.apply(model, cfg)
    except (ValueError, RuntimeError) as e:
        raise CLIError(f"cannot apply {title} to {args.model!r}: {_one_line(str(e))}") from None
    _status(f"{PROG}: generating with {title} ({settings}) ...")
    answer, gen_s = _generate(model, processor, inputs, args.max_new_tokens)
    stats = globalcom2.last_stats(model)
    last = globalcom2.get_adapter(model).last
    kept, vanilla = int(stats.visual_tokens[0]), int(stats.vanilla_visual_tokens[0])
    lm_kept = None if stats.lm_visual_tokens is None else int(stats.lm_visual_tokens[0])
    plan = last.plans[0] if last is not None and vcfg is not None else None
    has_plan = plan is not None and hasattr(plan, "crop_keep")
    adapter = globalcom2.get_adapter(model)
    image_hw = tuple(int(v) for v in inputs["image_sizes"][0])
    grid = adapter.grid_shape(image_hw) if adapter.num_views(image_hw) > 1 else None

    results = {"globalcom2": {"answer": answer, "kept": kept, "vanilla": vanilla, "generate_s": gen_s}}
    if args.compare:
        _status(f"{PROG}: timing the prefill with GlobalCom2 ({args.timing_runs} runs) ...")
        results["globalcom2"]["prefill_ms"] = _prefill_ms(model, inputs, device, args.timing_runs)
        globalcom2.remove(model)
        _status(f"{PROG}: generating with the vanilla model ...")
        v_answer, v_gen_s = _generate(model, processor, inputs, args.max_new_tokens)
        _status(f"{PROG}: timing the vanilla prefill ({args.timing_runs} runs) ...")
        v_prefill = _prefill_ms(model, inputs, device, args.timing_runs)
        results["vanilla"] = {"answer": v_answer, "kept": vanilla, "vanilla": vanilla, "generate_s": v_gen_s, "prefill_ms": v_prefill}

    # 4. Report.
    dtype_name = str(model.dtype).replace("torch.", "")
    _echo(f"model:   {args.model} ({dtype_name} on {device})")
    views = "1 view" if grid is None else f"thumbnail + {grid[0]}x{grid[1]} crops"
    _echo(f"image:   {args.image} ({image.width}x{image.height}, {views})")
    _echo(f"prompt:  {_printable(args.prompt)}")
    _echo("")
    r = results["globalcom2"]
    _echo(f"== {title} ({settings}) ==")
    _echo(f"visual tokens: {kept:,} of {vanilla:,} ({kept / vanilla:.1%})")
    if lm_kept is not None:
        _echo(f"after layer {fastv_config(cfg).layer} (FastV): {lm_kept:,} visual tokens; "
              f"layer average {stats.effective_visual_tokens[0]:,.1f}")
    if has_plan and plan.geometry is not None:
        crops = ", ".join(
            f"{ratio:.2f} ({int(k)}/{int(t)})"
            for ratio, k, t in zip(plan.crop_ratios.tolist(), plan.crop_keep.sum(1).tolist(), plan.crop_valid.sum(1).tolist())
        )
        _echo(f"per-crop retention r_j (kept/unpadded): {crops}")
    if "prefill_ms" in r:
        _echo(f"prefill: {r['prefill_ms']:.1f} ms (median of {args.timing_runs})")
    _echo(f"generate: {r['generate_s']:.2f} s")
    _echo(f"answer: {r['answer']}")
    if args.compare:
        v = results["vanilla"]
        _echo("")
        _echo("== vanilla LLaVA-NeXT ==")
        _echo(f"visual tokens: {vanilla:,}")
        _echo(f"prefill: {v['prefill_ms']:.1f} ms (median of {args.timing_runs})")
        _echo(f"generate: {v['generate_s']:.2f} s")
        _echo(f"answer: {v['answer']}")
        _echo("")
        speedup = v["prefill_ms"] / r["prefill_ms"] if r["prefill_ms"] > 0 else float("inf")
        _echo(
            f"summary: {title} keeps {kept:,} of {vanilla:,} visual tokens ({kept / vanilla:.1%}); "
            f"prefill {r['prefill_ms']:.1f} ms vs {v['prefill_ms']:.1f} ms ({speedup:.2f}x); "
            f"answers {'identical' if r['answer'] == v['answer'] else 'differ'}"
        )
    return 0


def cmd_efficiency(args: argparse.Namespace) -> int:
    from . import efficiency as eff

    ratios = parse_budget(args, "--ratios", args.model)
    if args.breakdown and args.fastv_layer is not None:
        raise CLIError("--breakdown costs one stack of identical blocks; it cannot be combined with --fastv-layer")
    try:
        if args.text_tokens < 0:
            raise ValueError(f"--text-tokens must be >= 0, got {args.text_tokens}")
        hardware = eff.resolve_hardware(args.hardware)
        arch = eff.resolve_arch(args.model)
    except ValueError as e:
        raise CLIError(str(e)) from None
    bytes_per_value = 4.0 if args.dtype == "float32" else 2.0
    try:
        maximum = eff.max_visual_tokens_for_model(args.model)
        rows = [r.to_dict() for r in eff.analyze(arch, ratios, args.text_tokens, hardware, bytes_per_value, maximum,
                                                 fastv_layer=args.fastv_layer, flash_attention=args.flash_attention)]
    except ValueError as e:
        raise CLIError(f"--fastv-layer: {e}" if args.fastv_layer is not None else str(e)) from None
    if args.format == "table":
        _echo(
            f"{args.model}: {arch.num_layers} layers, hidden {arch.hidden_size}, {arch.num_heads} heads "
            f"({arch.num_kv_heads} KV), MLP {arch.intermediate_size}{' gated' if arch.gated_mlp else ''}, vocab {arch.vocab_size}"
        )
        where = (f"FastV: layers 0-{args.fastv_layer - 1} see all {maximum} visual tokens, the rest R x "
                 f"{maximum}" if args.fastv_layer else f"R x {maximum} visual tokens")
        attention = "fused flash attention" if args.flash_attention else "unfused attention (scores written, softmax, read)"
        _echo(
            f"prefill of {where} + {args.text_tokens} text tokens; "
            f"roofline on {hardware.name} ({hardware.peak_tflops:g} TFLOP/s, {hardware.bandwidth_gbs:g} GB/s; "
            f"{hardware.source or 'source not recorded'}), {args.dtype}, {attention}"
        )
        _echo("")
    _echo(eff.format_rows(rows, eff.EFFICIENCY_COLUMNS, args.format))
    if args.breakdown:
        for row in rows:
            ops = eff.operator_breakdown(arch, row["visual_tokens"] + args.text_tokens, hardware,
                                         bytes_per_value=bytes_per_value, flash_attention=args.flash_attention)
            if args.format == "table":
                _echo("")
                _echo(f"per operator at R = {row['ratio']:g} ({row['visual_tokens']} visual + {args.text_tokens} text "
                      f"tokens), prefill; block operators run {arch.num_layers} times:")
            data = [{"ratio": row["ratio"], **op.to_dict()} for op in ops]
            _echo(eff.format_rows(data, eff.BREAKDOWN_COLUMNS, args.format))
    return 0


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise CLIError(f"{name} must be >= 1, got {value}")


def cmd_bench(args: argparse.Namespace) -> int:
    from .efficiency import format_rows

    ratios = parse_budget(args, "--ratios", args.model)
    for name in ("batch_size", "max_new_tokens", "runs"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    if args.warmup < 0:
        raise CLIError(f"--warmup must be >= 0, got {args.warmup}")
    methods, options, _ = method_settings(args, ratios, "--ratios")
    if args.plot is not None:
        if importlib.util.find_spec("matplotlib") is None:
            raise CLIError("--plot needs matplotlib: pip install 'globalcom2[plot]'")
        _output_file(args.plot, "--plot")
    from .demo import sample_image_path

    sources = args.image or [str(sample_image_path())]
    images = [load_image(src) for src in sources]
    device = _pick_device(args.device)
    dtype = _pick_dtype(args.dtype, device)

    from .bench import BENCH_COLUMNS, plot_rows, run_bench

    model, processor = get_model(args.model, device, dtype)

    batch_images = [images[i % len(images)] for i in range(max(args.batch_size, len(images)))]
    text = build_prompt(processor, args.prompt)
    tok = getattr(processor, "tokenizer", None)
    if tok is not None:
        tok.padding_side = "left"
    try:
        inputs = processor(images=batch_images, text=[text] * len(batch_images), return_tensors="pt", padding=True)
    except Exception as e:
        raise CLIError(f"the processor failed on these images/prompt: {_one_line(str(e))}") from None
    inputs = to_model(inputs, model)

    from tqdm import tqdm

    def progress(items: Any) -> Any:
        return tqdm(items, desc=f"{PROG} bench", unit="setting", file=sys.stderr, leave=False)

    _status(
        f"{PROG}: bench on {args.model} ({str(model.dtype).replace('torch.', '')} on {device}), "
        f"{len(batch_images)} prompt(s), {args.max_new_tokens} new tokens, {args.runs} runs + {args.warmup} warm-up"
    )
    try:
        rows = run_bench(model, dict(inputs), ratios, max_new_tokens=args.max_new_tokens, runs=args.runs,
                         warmup=args.warmup, progress=progress, methods=methods, options=options)
    except ValueError as e:  # e.g. FastV on an attention implementation it cannot mask
        raise CLIError(_one_line(str(e))) from None
    data = [r.to_dict() for r in rows]
    if args.format == "table" and args.model == "tiny":
        _echo("NOTE: tiny random demo model: timings show the pipeline's overheads, not a real model's speed-up.")
    _echo(format_rows(data, BENCH_COLUMNS, args.format))
    if args.plot is not None:
        try:
            plot_rows(rows, str(Path(args.plot).expanduser()))
        except OSError as e:
            raise CLIError(f"cannot write {args.plot}: {_one_line(e.strerror or str(e))}") from None
        _status(f"{PROG}: plot written to {args.plot}")
    return 0


def cmd_visualize(args: argparse.Namespace) -> int:
    # 1. Cheap checks first: arguments, the output path, matplotlib, the image.
    ratios = parse_budget(args, "--retention-ratio", args.model)
    methods, options, _ = method_settings(args, ratios, "--retention-ratio", several=False)
    if not 20 <= args.dpi <= 600:
        raise CLIError(f"--dpi must be between 20 and 600, got {args.dpi}")
    out = _output_file(args.output, "--output")
    if importlib.util.find_spec("matplotlib") is None:
        raise CLIError("visualize needs matplotlib: pip install 'globalcom2[plot]'")
    image = load_image(args.image)
    device = _pick_device(args.device)
    dtype = _pick_dtype(args.dtype, device)

    # 2. The model ('tiny' or a checked, loaded checkpoint), then the figure.
    random_weights = args.model == "tiny"
    if random_weights:
        _status(f"{PROG}: building the tiny random demo model (no download) ...")
    model, processor = get_model(args.model, device, dtype)
    from .visualize import visualize

    ratio_text = ", ".join(f"{r:g}" for r in ratios)
    _status(f"{PROG}: encoding the image once and compressing it at R = {ratio_text} ...")
    try:
        vis = visualize(
            model, processor, image, ratios, heatmaps=args.heatmaps, title=args.title,
            prompt=args.prompt, model_name="tiny random demo model" if random_weights else args.model,
            random_weights=random_weights, method=methods[0], options=options,
        )
    except ValueError as e:  # an unsupported model (e.g. no [CLS] token)
        raise CLIError(f"cannot visualize with {args.model!r}: {_one_line(str(e))}") from None
    _status(f"{PROG}: drawing {out} ...")
    try:
        vis.save(str(out), dpi=args.dpi)
    except OSError as e:
        raise CLIError(f"cannot write {args.output}: {_one_line(e.strerror or str(e))}") from None

    # 3. Report: the file, then one line per ratio.
    _echo(f"wrote {out}")
    for m in vis.masks:
        crops = ", ".join(f"{r:.2f} ({k}/{n})" for r, k, n in zip(m.crop_ratios, m.crop_kept_counts, m.crop_valid_counts))
        _echo(
            f"R={m.retention_ratio:g}: {m.num_tokens:,} of {m.vanilla_tokens:,} visual tokens "
            f"({m.num_tokens / m.vanilla_tokens:.1%}); thumbnail {m.thumb_tokens}/{m.thumb_kept.size}"
            + (f"; crops r_j (kept/unpadded): {crops}" if crops and not m.pooled else "")
            + (f"; {m.note}" if m.note else "")
        )
    for note in vis.notes:
        _echo(f"note: {note}")
    if random_weights:
        _echo("NOTE: tiny random demo model: which tokens are kept is meaningless; pass --model for a real checkpoint.")
    return 0


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


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
        _echo(f"{PROG}: error: {_one_line(str(e), limit=1000)}", sys.stderr)
        return e.code
    except KeyboardInterrupt:
        _echo(f"{PROG}: error: interrupted", sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure: still one line, unless asked for the traceback
        if os.environ.get("GLOBALCOM2_TRACEBACK"):
            raise
        message = _one_line(str(e)) or "(no message)"
        _echo(
            f"{PROG}: error: {type(e).__name__}: {message} (set GLOBALCOM2_TRACEBACK=1 for the traceback)",
            sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    # `python -m globalcom2.cli` (torchrun/accelerate launch lines): run the package's own module,
    # not this __main__ copy, so that its CLIError is the one the subcommands raise.
    from globalcom2.cli import main as _main

    sys.exit(_main())
