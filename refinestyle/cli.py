"""The `refinestyle` console script.

Each subcommand lives in its own module under `refinestyle.commands`; a module
provides `add_arguments(parser)` and `main(args) -> int`, and the first line of
its docstring is the subcommand's help text.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from refinestyle.commands import report_error

# subcommand name -> module implementing it
COMMANDS = {
    "generate": "refinestyle.commands.generate",
    "spectrum": "refinestyle.commands.spectrum",
    "train-inverter": "refinestyle.commands.train_inverter",
    "invert": "refinestyle.commands.invert",
    "edit": "refinestyle.commands.edit",
    "ganspace": "refinestyle.commands.ganspace",
    "eval-inversion": "refinestyle.commands.eval_inversion",
    "eval-edit": "refinestyle.commands.eval_edit",
    "adapt-text": "refinestyle.commands.adapt_text",
    "adapt-oneshot": "refinestyle.commands.adapt_oneshot",
    "eval-adapter": "refinestyle.commands.eval_adapter",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refinestyle",
        description="RefineStyle: refine a frozen StyleGAN2's dynamic kernels with low-rank residuals.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or "").strip().splitlines()
        sub = subparsers.add_parser(
            name,
            help=doc[0] if doc else None,
            description=(module.__doc__ or "").strip() or None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(_module=module, _parser=sub)
    return parser


# Set to 1 to see the full traceback of the errors `main` reports in one line.
TRACEBACK_ENV = "REFINESTYLE_TRACEBACK"


def main(argv: list[str] | None = None) -> int:
    """Run `refinestyle COMMAND ...` (argv: the arguments, default sys.argv[1:]); returns the exit status.

    Errors that describe bad input rather than a bug (a missing or unreadable file, a
    missing weights file, a checkpoint that does not fit, an output that would overwrite a
    run, a ValueError from argument validation, a training run whose loss diverged) are printed as one line,
    `refinestyle COMMAND: error: ...`, with exit status 2; set REFINESTYLE_TRACEBACK=1 to get the traceback instead.
    """
    import os

    args = build_parser().parse_args(argv)
    try:
        return int(args._module.main(args) or 0)
    # MissingWeightsError and CheckpointError are ValueErrors; FloatingPointError: a diverged training run
    except (FileNotFoundError, FileExistsError, ValueError, FloatingPointError) as error:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        status = report_error(args, error)
        print(f"(set {TRACEBACK_ENV}=1 for the traceback)", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
