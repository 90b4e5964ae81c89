"""What the ``globalcom2`` commands share for their arguments: the method, ratio, layout, device
and dtype flags, and the checks of what they are given (every failure a :class:`~.output.CLIError`).

Importing this module is cheap: torch is imported inside the functions.
"""

from __future__ import annotations

import argparse
import importlib.util
from typing import Any, Sequence

from .loading import is_builtin_model
from .output import PROG, CLIError, status

LAYOUT_CHOICES = ("official", "spatial")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
DTYPE_CHOICES = ("auto", "float16", "bfloat16", "float32")
FORMAT_CHOICES = ("table", "json", "csv")


def check_positive(flag: str, value: int) -> None:
    """``flag``'s whole number must be at least 1 (CLIError)."""
    if value < 1:
        raise CLIError(f"{flag} must be >= 1, got {value}")


#: The image placeholder the commands' prompts must not hold (they add it themselves).
IMAGE_PLACEHOLDER = "<image>"


def check_prompt(text: str, flag: str, image_token: str | None = None) -> None:
    """A prompt option must not hold an image placeholder (``<image>``, or the loaded processor's
    ``image_token``): the command puts one before the text itself, and a second one would ask for
    an image that was never given (CLIError naming the option)."""
    for token in dict.fromkeys(t for t in (IMAGE_PLACEHOLDER, image_token) if t):
        if token in str(text):
            raise CLIError(
                f"{flag}: the text holds the image placeholder {token!r}; leave it out, the command puts the "
                "image before your text itself"
            )


def need_matplotlib(what: str) -> None:
    """CLIError naming the extra to install when matplotlib is missing (``what`` needs it)."""
    if importlib.util.find_spec("matplotlib") is None:
        from .._extras import install_hint

        raise CLIError(f"{what} needs matplotlib: {install_hint('plot')}")


# ------------------------------------------------------------------------------------------------
# Arguments several commands share: methods, budgets, device and dtype
# ------------------------------------------------------------------------------------------------


def add_method_arguments(
    parser: argparse.ArgumentParser, several: bool = True, what: str | None = None, vision_only: bool = False
) -> None:
    """``--method`` and ``--method-arg KEY=VALUE`` (shared by generate, embed, bench, visualize and
    eval). ``what`` says what the method is for in this command's help; ``vision_only`` lists only
    the vision-side methods (a command that refuses FastV, e.g. embed)."""
    if what is None:
        what = "comma-separated methods to compare" if several else "the compression method"
    parser.add_argument(
        "--method", default="globalcom2", metavar="NAME[,NAME...]" if several else "NAME",
        help=f"{what}: {_method_choices(vision_only)}",
    )
    examples = "layout=spatial, allocation=uniform, scoring=local_only, seed=1" + (
        "" if vision_only else ", layer=2 (FastV), fastv_retention_ratio=0.5")
    parser.add_argument(
        "--method-arg", action="append", default=[], metavar="KEY=VALUE",
        help=f"a method option, repeatable, given to every method that has it: e.g. {examples}",
    )


def add_ratio_and_layout_arguments(parser: argparse.ArgumentParser) -> None:
    """``--retention-ratio R`` (one ratio, default 0.25) and ``--layout``, as the commands that run
    one setting have them (generate, embed)."""
    parser.add_argument(
        "--retention-ratio", type=float, default=0.25, metavar="R",
        help="fraction of visual tokens kept, 0 < R <= 1 (default: 0.25)",
    )
    parser.add_argument(
        "--layout", choices=LAYOUT_CHOICES, default=None,
        help="official: the published implementation token for token (GlobalCom2's default on LLaVA-NeXT); "
             "spatial: tokens at their true positions",
    )


def _method_choices(vision_only: bool = False) -> str:
    """"globalcom2 (default), fastervlm, ..., fastv, or <vision method>+fastv", from the method
    registry (``vision_only``: "globalcom2 (default), fastervlm, random or pooling")."""
    from ..methods import LANGUAGE_METHODS, VISION_METHODS

    vision, language = list(VISION_METHODS), list(LANGUAGE_METHODS)
    if vision_only:
        names = [f"{vision[0]} (default)", *vision[1:]]
        return f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
    names = [f"{vision[0]} (default)", *vision[1:], *language]
    return f"{', '.join(names)}, or <vision method>+{'|'.join(language)}"


def add_device_arguments(parser: argparse.ArgumentParser, device_help: str) -> None:
    """``--device`` (its help: ``device_help``) and ``--dtype``, as the model-running commands have them."""
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help=device_help)
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="auto: the checkpoint's dtype on cuda, float32 on cpu (default: auto)")


def parse_method_arguments(
    args: argparse.Namespace, several: bool = True, ratio_flag: str = "--retention-ratio"
) -> tuple[list[str], dict[str, Any]]:
    """(method names, options) from :func:`add_method_arguments`'s flags, validated (CLIError).

    The option rule is :func:`globalcom2.methods.check_method_options`'s, the same for every
    command: ``retention_ratio`` is never a ``--method-arg`` (it is given with ``ratio_flag``,
    the command's own flag), and an option none of the methods has is an error.

    A command's own ``--layout`` flag, where it has one and it is given, is added to the options
    (after the ``--method-arg`` checks, so it overrides a ``layout=`` given there)."""
    from ..methods import UnknownOptionError, check_method_options, method_names, parse_method_options

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
    from ..methods import plan_settings

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
    from .. import efficiency as eff

    if getattr(args, "visual_tokens", None) is not None:
        maximum = eff.max_visual_tokens_for_model(model) if model and not is_builtin_model(model) else eff.MAX_VISUAL_TOKENS
        try:
            ratios = eff.parse_visual_tokens(args.visual_tokens, maximum)
        except ValueError as e:
            raise CLIError(f"--visual-tokens: {e}") from None
        status(f"{PROG}: {eff.describe_visual_tokens(ratios, maximum)}")
        return ratios
    try:
        return eff.parse_ratios(getattr(args, ratio_flag.lstrip("-").replace("-", "_")))
    except ValueError as e:
        raise CLIError(f"{ratio_flag}: {e}") from None


def pick_device(name: str) -> str:
    """``--device``: ``auto`` is cuda when available, else cpu; ``cuda`` without CUDA is a CLIError."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device cuda: CUDA is not available (torch {torch.__version__}); use --device cpu")
    return name


def pick_dtype(name: str, device: str) -> Any:
    """``--dtype``: ``auto`` is the checkpoint's dtype on cuda, float32 on cpu."""
    import torch

    if name == "auto":
        return "auto" if str(device).startswith("cuda") else torch.float32
    return getattr(torch, name)


def device_and_dtype(args: argparse.Namespace) -> tuple[str, Any]:
    """(device, dtype) of a command's ``--device`` and ``--dtype`` (see :func:`add_device_arguments`)."""
    device = pick_device(args.device)
    return device, pick_dtype(args.dtype, device)
