"""Every command line the README and docs/ show names a command that exists and only options it takes.

The options are read from each command's own `--help`, so a renamed or removed flag fails
here instead of in a user's terminal.
"""
from __future__ import annotations

import ast
import contextlib
import importlib
import io
import re
from functools import lru_cache
from pathlib import Path

import pytest

from refinestyle.cli import COMMANDS
from refinestyle.cli import main as refinestyle_main

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]
PACKAGES = ("refinestyle", "refinestyle_kernels", "benchmarks")

# what a command line starts with -> how to get that command's --help
_MODULE_COMMAND = r"python -m (benchmarks(?:\.[a-z_]+)?|refinestyle_kernels)"
_LAUNCH = re.compile(
    r"(?:^|[\s`(])(?:(?:torchrun\b[^`|;]*?-m |python -m )refinestyle|refinestyle)(?= )"
    r"|(?:^|[\s`(])(refinestyle-bench)\b"
    rf"|(?:^|[\s`(]){_MODULE_COMMAND}\b"
)


def _help_text(entry, argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        entry(argv)
    assert exit_info.value.code == 0, f"{argv} --help failed"
    return out.getvalue()


@lru_cache(maxsize=None)
def _options(program: str, subcommand: str | None) -> frozenset[str]:
    """The --options of `program [subcommand]`, read from its --help."""
    if program == "refinestyle":
        text = _help_text(refinestyle_main, [subcommand, "--help"])
    else:
        module = {"benchmarks": "benchmarks.__main__", "refinestyle_kernels": "refinestyle_kernels.selfcheck"}
        entry = importlib.import_module(module.get(program, program)).main
        text = _help_text(entry, [subcommand, "--help"] if subcommand else ["--help"])
    return frozenset(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", text))


def _command_lines(text: str) -> list[str]:
    """Shell lines of the fenced blocks (continuations joined, comments dropped) and inline code spans."""
    lines = []
    for language, block in re.findall(r"```([a-z]*)\n(.*?)```", text, flags=re.S):
        if language not in ("", "bash", "sh", "shell", "console"):
            continue  # python examples import the package, they do not run its commands
        for line in block.replace("\\\n", " ").splitlines():
            lines.append(line.split(" #", 1)[0])
    prose = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
    lines += re.findall(r"`([^`\n]+)`", prose)
    return lines


def _invocations(line: str):
    """(program, subcommand, [--options]) for each of our commands the line runs."""
    for segment in re.split(r"\|\||&&|[|;]", line):
        match = _LAUNCH.search(segment)
        if not match:
            continue
        words = segment[match.end():].split()
        if match.group(1) or match.group(2):  # refinestyle-bench / python -m benchmarks[.module] / refinestyle_kernels
            program = "benchmarks" if match.group(1) else match.group(2)
            subcommand = "report" if program == "benchmarks" and words[:1] == ["report"] else None
        else:
            program = "refinestyle"
            if not words or words[0].startswith(("-", "<", "[", "COMMAND", "...")):
                continue
            subcommand = words[0]
        words = [word.lstrip("[(") for word in words]  # optional parts: [--shapes all]
        options = [word.split("=", 1)[0].rstrip(".,:)]`") for word in words if word.startswith("--")]
        yield program, subcommand, options


def _all_invocations():
    found = []
    for document in DOCUMENTS:
        for line in _command_lines(document.read_text()):
            for program, subcommand, options in _invocations(line):
                found.append((document.relative_to(REPO).as_posix(), line.strip(), program, subcommand, options))
    return found


def test_the_docs_show_commands_at_all():
    # guards the extraction itself: an empty list would pass every check below
    invocations = _all_invocations()
    subcommands = {subcommand for _, _, program, subcommand, _ in invocations if program == "refinestyle"}
    assert {"train-inverter", "adapt-text", "adapt-oneshot", "generate", "eval-edit"} <= subcommands
    programs = {program for _, _, program, _, _ in invocations}
    assert {"benchmarks", "benchmarks.traffic", "benchmarks.memory", "benchmarks.kernel_audit", "refinestyle_kernels"} <= programs


@pytest.mark.parametrize("document", [d.relative_to(REPO).as_posix() for d in DOCUMENTS])
def test_documented_commands_and_options_exist(document):
    problems = []
    for source, line, program, subcommand, options in _all_invocations():
        if source != document:
            continue
        if program == "refinestyle" and subcommand not in COMMANDS:
            problems.append(f"{line!r}: no command {subcommand!r}")
            continue
        unknown = [option for option in options if option not in _options(program, subcommand)]
        if unknown:
            problems.append(f"{line!r}: {program} {subcommand or ''} takes no {', '.join(unknown)}")
    assert not problems, "\n".join(problems)


# options of other programs the docs mention in passing
FOREIGN_OPTIONS = {"--benchmark-only": "pytest-benchmark"}


def _every_option() -> frozenset[str]:
    programs = [("refinestyle", name) for name in COMMANDS] + [("benchmarks", None), ("benchmarks", "report")]
    programs += [(f"benchmarks.{name}", None) for name in ("traffic", "memory", "kernel_audit", "host_overhead", "profile")]
    programs.append(("refinestyle_kernels", None))
    return frozenset().union(*(_options(program, subcommand) for program, subcommand in programs))


@pytest.mark.parametrize("document", [d.relative_to(REPO).as_posix() for d in DOCUMENTS])
def test_options_named_in_the_text_exist(document):
    """An option named on its own in the text (`--bf16`, `--l2/--lpips/--id`) is one that some command takes."""
    prose = re.sub(r"```[a-z]*\n.*?```", "", (REPO / document).read_text(), flags=re.S)
    named = {option for span in re.findall(r"`(--[^`\n]+)`", prose)
             for option in re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9_-]*", span)}
    unknown = sorted(named - _every_option() - set(FOREIGN_OPTIONS))
    assert not unknown, f"{document} names options no command takes: {unknown}"


def test_a_made_up_option_is_caught():
    line = "refinestyle train-inverter --generator G.pt --no-such-option 3"
    ((program, subcommand, options),) = _invocations(line)
    assert (program, subcommand) == ("refinestyle", "train-inverter")
    assert "--generator" in _options(program, subcommand)
    assert "--no-such-option" not in _options(program, subcommand)


def _resolve(dotted: str) -> bool:
    """Whether `a.b.c` names a module, or an attribute of the longest module prefix that imports."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(target, name):
                return False
            target = getattr(target, name)
        return True
    return False


@pytest.mark.parametrize("document", [d.relative_to(REPO).as_posix() for d in DOCUMENTS])
def test_python_names_in_the_docs_exist(document):
    """`from refinestyle... import X` in the examples and dotted names such as
    `refinestyle.distributed.setup_distributed` in the text name things the packages have."""
    text = (REPO / document).read_text()
    names = set()
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                names |= {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names if alias.name.split(".")[0] in PACKAGES}
    prose = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`\n]+)`", prose):
        names |= set(re.findall(rf"(?<![\w./'\"-])(?:{'|'.join(PACKAGES)})(?:\.[A-Za-z_]\w*)+", span))
    missing = sorted(name for name in names if not _resolve(name))
    assert not missing, f"{document} names what the packages do not have: {missing}"


def test_a_renamed_function_is_caught():
    assert _resolve("refinestyle.distributed.setup_distributed")
    assert not _resolve("refinestyle.distributed.setup_distributed_run")
    assert not _resolve("refinestyle.no_such_module.thing")
