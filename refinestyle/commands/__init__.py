"""Subcommands of the `refinestyle` console script (see refinestyle.cli).

The argument types below turn a bad value into argparse's own one-line error
(`refinestyle COMMAND: error: argument --batch-size: ...`, exit status 2) before any
model is loaded.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def positive_int(text: str) -> int:
    """An integer >= 1 (batch sizes, sample counts): 0 would loop forever or divide by zero."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def int_at_least(minimum: int):
    """An argparse type: an integer >= minimum (0 for 'none', 2 for a standard deviation, ...)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int_at_least_{minimum}"
    return parse


def seed(text: str) -> int:
    """A random seed, 0 <= seed < 2**32 (numpy's range; the commands derive further seeds from it,
    which must stay within torch.Generator's)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed in 0..{2**32 - 1}, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected an integer seed in 0..{2**32 - 1}, got {value}")
    return value


def image_size(text: str) -> tuple[int, int]:
    """A picture size: N (a square) or HEIGHTxWIDTH (192x256 for Stanford Cars) -> (height, width)."""
    from refinestyle.imageio import parse_image_size

    try:
        return parse_image_size(text)
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def size_for(inverter, image_size_arg) -> tuple[int, int]:
    """--image-size as given, else the size the inverter's encoder reads (256 x 256, or 192 x 256
    for a Cars model). ValueError naming --image-size for another aspect than the inverter's: its
    renders are cut to its own aspect, so the pictures would be stretched and the codes' picture
    size would not match their renders."""
    own = tuple(getattr(inverter, "input_size", (256, 256)))
    if image_size_arg is None:
        return own
    from refinestyle.imageio import same_aspect

    if not same_aspect(image_size_arg, own):
        raise ValueError(
            f"--image-size {image_size_arg[0]}x{image_size_arg[1]}: expected the aspect of the inverter's pictures "
            f"({own[0]}x{own[1]}), e.g. {own[0]}x{own[1]}"
        )
    return tuple(image_size_arg)


def finite_float(text: str) -> float:
    """A finite number (edit strengths, truncation psi): nan and inf would pass comparisons silently
    or end in a linear-algebra error far from the option."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def truncation_psi(text: str) -> float:
    """A truncation psi in (0, 1]: 1 is no truncation, 0 would collapse every code onto the average."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value}")
    return value


def _check_no_file_above(text: str, path: Path) -> None:
    """ArgumentTypeError when an existing ancestor of path is a file: no folder can be made there."""
    for ancestor in path.absolute().parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise argparse.ArgumentTypeError(f"{text!r}: {str(ancestor)!r} is a file, so no folder can be made there")
            return


def output_file(text: str) -> Path:
    """A file to write (made with its parent folders): not an existing folder, not under a file."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; expected the path of a file to write")
    _check_no_file_above(text, path)
    return path


def image_file(text: str) -> Path:
    """An image file to write (output_file) whose suffix PIL can write (.png, .jpg, ...)."""
    from PIL import Image

    path = output_file(text)
    if path.suffix.lower() not in Image.registered_extensions():
        raise argparse.ArgumentTypeError(f"{text!r}: expected an image file name such as grid.png (.png, .jpg, .webp)")
    return path


def figure_file(text: str) -> Path:
    """A figure file to write (output_file) whose suffix matplotlib can write (.png, .pdf, .svg, ...)."""
    from matplotlib.figure import Figure

    path = output_file(text)
    formats = Figure().canvas.get_supported_filetypes()
    if path.suffix.lower().lstrip(".") not in formats:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a figure file name with one of the suffixes {', '.join('.' + f for f in sorted(formats))}"
        )
    return path


def output_folder(text: str) -> Path:
    """A folder to write into (made if missing): not an existing file, not under a file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file; expected a folder to write into")
    _check_no_file_above(text, path)
    return path


def device_name(text: str) -> str:
    """A torch device this machine has: cpu, cuda, cuda:N (checked, so a typo or a missing GPU
    is one line, not a traceback from the first tensor moved there)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu, cuda or cuda:1, got {text!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has no usable CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type not in ("cpu", "mps", "xpu"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:N], got {text!r}")
    return text


def report_error(args: argparse.Namespace, error: BaseException | str) -> int:
    """Print `refinestyle COMMAND: error: MESSAGE` on stderr and return exit status 2.

    args: the parsed arguments (its `command`, set by refinestyle.cli, names the subcommand);
    error: the exception or message describing the bad input. Every command reports bad
    input this way, so the line looks the same whichever step found the problem.
    """
    command = getattr(args, "command", None)
    prefix = f"refinestyle {command}: " if command else ""
    parser = getattr(args, "_parser", None)  # set by refinestyle.cli
    if parser is not None:
        error = _naming_the_option(error, parser)
    print(f"{prefix}error: {error}", file=sys.stderr)
    return 2


def _naming_the_option(error: BaseException | str, parser: argparse.ArgumentParser) -> BaseException | str:
    """A weights file given neither by option nor environment variable: name the command's own
    option for it (the one whose help mentions the variable) instead of "pass its path"."""
    from refinestyle.weights import MissingWeightsError

    if not isinstance(error, MissingWeightsError) or error.env_var is None:
        return error
    for action in parser._actions:
        if action.option_strings and action.help and error.env_var in action.help:
            return error.naming_option(action.option_strings[0])
    return error


def interrupted_exit_status(interrupt: KeyboardInterrupt) -> int:
    """The shell's status for a training run stopped by a signal: 128 + its number (130 for
    Ctrl-C, 143 for SIGTERM; `refinestyle.distributed.TrainingInterrupted` carries which)."""
    import signal

    return 128 + int(getattr(interrupt, "signum", signal.SIGINT))


def compile_mode(text: str) -> str:
    """A mode of torch.compile for `Generator.compile_synthesis` (refinestyle.generator.COMPILE_MODES)."""
    from refinestyle.generator import COMPILE_MODES

    if text not in COMPILE_MODES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(COMPILE_MODES)}, got {text!r}")
    return text


def add_compile_argument(parser) -> None:
    """--compile [MODE] of the training commands: torch.compile the generator's synthesis network."""
    parser.add_argument(
        "--compile", nargs="?", const="default", default=None, type=compile_mode, metavar="MODE",
        help="torch.compile the generator's synthesis network (Generator.compile_synthesis); MODE: default, "
             "reduce-overhead (also CUDA graphs on a GPU), max-autotune or max-autotune-no-cudagraphs. The first "
             "steps are slower while it compiles",
    )
