"""refinestyle-bench: FLOPs, latency and memory of the fused op against the plain-PyTorch paths.

    python -m benchmarks                  # the full GPU suite on CUDA, the reduced suite on a CPU
    python -m benchmarks --suite headline # just the cases the targets are about (GPU)
    python -m benchmarks --list           # show the cases and stop
    python -m benchmarks report benchmarks/results/<device>_<date>.json   # redraw the reports

Every axis of the grid can be narrowed: --groups, --layers, --sizes, --batch,
--dtype, --mode, --tokens, --impls, --filter. Results go to
benchmarks/results/<device>_<date>.{json,csv,md,png}; the JSON is rewritten
after every case, so an interrupted run keeps what it measured.

Exit status: 0 when every implementation ran and was right; 2 when a Triton
result failed the correctness guard (the run stops there); 3 when another
implementation gave a wrong result (it was not timed; the run went on).
Implementations that fail to run (out of memory, compile errors) are reported
as "error" in every output and do not change the exit status.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # no GPU: Triton (if ever asked for) can only run in its interpreter, set before any kernel exists
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks import cases as case_module  # noqa: E402
from benchmarks import implementations as impl_module  # noqa: E402
from benchmarks import report  # noqa: E402
from benchmarks.cases import GeneratorConfig, SuiteSpec, parse_tokens  # noqa: E402
from benchmarks.runner import (  # noqa: E402
    RESULTS_DIR,
    FatalCorrectnessError,
    RunOptions,
    default_results_path,
    new_run,
    run_suite,
)
from benchmarks.timing import TimingSettings  # noqa: E402

DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}
MODE_NAMES = {"fwd": "forward", "forward": "forward", "fwdbwd": "forward_backward", "fwd+bwd": "forward_backward",
              "forward_backward": "forward_backward"}
NOT_RUN_BANNER = (
    "=" * 78
    + "\nNO CUDA DEVICE: running the REDUCED CPU SUITE. The GPU suite was NOT run; these\n"
    "numbers say nothing about GPU speed (see BENCHMARKS.md for the GPU suite).\n"
    + "=" * 78
)


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _ints(text: str, name: str) -> list[int]:
    try:
        return [int(item) for item in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refinestyle-bench",
        description=(__doc__ or "").strip().splitlines()[0],
        epilog="Subcommand: `report JSON [JSON ...]` redraws table, CSV, markdown and PNG from saved results.",
    )
    suite = parser.add_argument_group("what to run")
    suite.add_argument("--suite", choices=("auto", "gpu", "headline", "cpu"), default="auto",
                       help="auto: gpu with CUDA, else cpu (default); headline: the target cases only")
    suite.add_argument("--groups", default=None, help="comma list of layer,generator")
    suite.add_argument("--layers", default=None, help="layer names to keep, e.g. conv1,convs.6,to_rgbs.3")
    suite.add_argument("--layer-kinds", default=None, help="conv,torgb")
    suite.add_argument("--layer-size", type=int, default=None,
                       help="take the layer cases from a generator of this size (1024 on GPU, 256 on CPU)")
    suite.add_argument("--sizes", default=None, help="whole-generator sizes, e.g. 1024,512,256 ('none': no generator)")
    suite.add_argument("--batch", default=None, help="batch sizes, e.g. 1,8")
    suite.add_argument("--dtype", default=None, help="fp32,bf16")
    suite.add_argument("--mode", default=None, help="fwd,fwdbwd")
    suite.add_argument("--tokens", default=None,
                       help="refinement settings: 0 (none), 32 (per sample), 256s (shared); e.g. 0,32,256s")
    suite.add_argument("--impls", default=None,
                       help=f"implementations; known: {','.join(impl_module.registry())}")
    suite.add_argument("--filter", default=None, help="keep cases whose id contains this text")
    suite.add_argument("--list", action="store_true", help="print the cases and exit")
    model = parser.add_argument_group("generator shape (defaults: config-f)")
    model.add_argument("--channel-multiplier", type=int, default=2)
    model.add_argument("--channel-max", type=int, default=512, help="cap on channels (tiny test generators)")
    model.add_argument("--style-dim", type=int, default=512)
    model.add_argument("--n-mlp", type=int, default=8)
    timing = parser.add_argument_group("timing")
    timing.add_argument("--warmup-ms", type=float, default=None)
    timing.add_argument("--min-time-ms", type=float, default=None)
    timing.add_argument("--min-reps", type=int, default=None)
    timing.add_argument("--max-reps", type=int, default=None)
    timing.add_argument("--no-peaks", action="store_true", help="skip the peak measurement (no roofline)")
    timing.add_argument("--no-tf32", action="store_true", help="fp32 cases without TF32 (default: TF32 on, recorded)")
    timing.add_argument("--max-minutes", type=float, default=None,
                        help="start no new case after this long (the results so far are kept)")
    timing.add_argument("--seed", type=int, default=0)
    timing.add_argument(
        "--kernel-option", action="append", default=[], metavar="NAME=VALUE",
        help="set a tuning constant of refinestyle_kernels.ops.modulated_conv2d or .upsample_add for this run, "
        "e.g. RGB_EPILOGUE_MAX_COUT=0 (switches a fusion off for an A/B run); repeatable; recorded in the JSON",
    )  # fmt: skip
    timing.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default on the CPU: 1, for stable timings; "
                             "on CUDA: torch's choice)")
    output = parser.add_argument_group("output")
    output.add_argument(
        "--out", type=Path, default=RESULTS_DIR,
        help="results folder (default: benchmarks/results in a source checkout, ./refinestyle-bench-results "
             "for an installed copy)",
    )
    output.add_argument("--output", type=Path, default=None, help="exact JSON path (CSV/MD/PNG next to it)")
    output.add_argument("--no-plot", action="store_true")
    output.add_argument("--quiet", action="store_true", help="no progress bar and per-case lines")
    return parser


def suite_from_args(args, on_cuda: bool) -> tuple[str, SuiteSpec, TimingSettings]:
    """The suite to run and its timing settings from the command line."""
    name = args.suite
    if name == "auto":
        name = "gpu" if on_cuda else "cpu"
    spec = {"gpu": case_module.gpu_suite, "headline": case_module.headline_suite, "cpu": case_module.cpu_suite}[name]()
    if name == "cpu":
        settings = TimingSettings(warmup_ms=0.0, min_time_ms=300.0, min_reps=3, max_reps=50)
    else:
        settings = TimingSettings()
    template = GeneratorConfig(
        spec.generator_template.size,
        channel_multiplier=args.channel_multiplier,
        channel_max=args.channel_max,
        style_dim=args.style_dim,
        n_mlp=args.n_mlp,
    )
    spec.generator_template = template
    if spec.layer_generator is not None or args.layer_size:
        size = args.layer_size or spec.layer_generator.size
        spec.layer_generator = GeneratorConfig(
            size, args.channel_multiplier, args.channel_max, args.style_dim, args.n_mlp
        )
    if args.layers is not None:
        spec.layer_names = _csv(args.layers)
        if not spec.layer_names:
            raise SystemExit(f"--layers: expected comma-separated layer names, got {args.layers!r}")
    if args.layer_kinds is not None:
        spec.layer_kinds = _csv(args.layer_kinds)
    if args.sizes is not None:
        spec.generator_sizes = () if args.sizes.strip().lower() == "none" else _ints(args.sizes, "--sizes")
    if args.batch is not None:
        spec.batches = _ints(args.batch, "--batch")
    if args.dtype is not None:
        try:
            spec.dtypes = [DTYPE_NAMES[item] for item in _csv(args.dtype)]
        except KeyError as error:
            raise SystemExit(f"--dtype: unknown {error.args[0]!r}; expected fp32 and/or bf16") from None
    if args.mode is not None:
        try:
            spec.modes = [MODE_NAMES[item] for item in _csv(args.mode)]
        except KeyError as error:
            raise SystemExit(f"--mode: unknown {error.args[0]!r}; expected fwd and/or fwdbwd") from None
    if args.tokens is not None:
        try:
            spec.tokens = parse_tokens(args.tokens)
            spec.layer_tokens = None
        except ValueError as error:
            raise SystemExit(f"--tokens: {error}") from None
    # last, so that --groups wins over --sizes and --layer-size
    if args.groups is not None:
        groups = set(_csv(args.groups))
        unknown = groups - set(case_module.GROUPS)
        if unknown:
            raise SystemExit(f"--groups: unknown {sorted(unknown)}; expected layer and/or generator")
        if "layer" not in groups:
            spec.layer_generator = None
        if "generator" not in groups:
            spec.generator_sizes = ()
    for field in ("warmup_ms", "min_time_ms", "min_reps", "max_reps"):
        value = getattr(args, field)
        if value is not None:
            setattr(settings, field, value)
    return name, spec, settings


def run_main(argv: list[str] | None) -> int:
    threads = torch.get_num_threads()
    try:
        return _run(argv)
    finally:
        torch.set_num_threads(threads)  # main() may be called from Python: leave torch as it was


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    on_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if on_cuda else "cpu")
    if on_cuda:
        tf32 = not args.no_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads: expected a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    elif not on_cuda:
        # On a small CPU shared with anything else, intra-op threads spin against each other
        # and the timings turn to noise (measured on 2 busy cores: conv1 186 ms with 2 threads,
        # 11.7 ms with 1). One thread gives stable, comparable numbers; --threads overrides.
        torch.set_num_threads(1)
    suite, spec, settings = suite_from_args(args, on_cuda)
    # every conv launch shape timed, the lone-config ones too (`autotuned_conv_configs` in the
    # JSON); a --kernel-option may switch it off again. (Without CUDA nothing is autotuned.)
    if on_cuda:
        kernel_option_modules()[0].TIME_UNTUNED_CONV_LAUNCHES = True
    try:
        kernel_options = apply_kernel_options(args.kernel_option)
    except ValueError as error:
        raise SystemExit(f"--kernel-option: {error}") from None
    try:
        cases = spec.cases()
    except ValueError as error:
        raise SystemExit(f"benchmarks: {error}") from None
    if args.filter:
        cases = [case for case in cases if args.filter in case.case_id]
    names = _csv(args.impls) if args.impls else list(
        impl_module.GPU_DEFAULT if on_cuda else impl_module.CPU_DEFAULT
    )
    try:
        implementations = impl_module.select(names)
    except ValueError as error:
        raise SystemExit(f"--impls: {error}") from None
    if not on_cuda:
        skipped = [impl.name for impl in implementations if impl.needs_cuda]
        implementations = [impl for impl in implementations if not impl.needs_cuda]
        print(NOT_RUN_BANNER)
        if skipped:
            print(f"(skipped, they need CUDA: {', '.join(skipped)})")
    if not cases:
        raise SystemExit("benchmarks: no case left after the selection")
    if not implementations and not args.list:
        raise SystemExit("--impls: no implementation left to run on this machine")
    if suite in ("gpu", "headline") and not on_cuda and not args.list:
        raise SystemExit(
            f"--suite {suite}: needs a CUDA device (its 1024 px cases would take hours on a CPU); "
            "without a GPU run the reduced CPU suite (the default, or --suite cpu)"
        )
    if args.list:
        for case in cases:
            print(case.case_id)
        print(f"{len(cases)} cases x {len(implementations)} implementations: {', '.join(i.name for i in implementations)}")
        return 0

    options = RunOptions(device=device, settings=settings, seed=args.seed, log=_logger(args.quiet))
    run = new_run(suite, cases, implementations, options, argv)
    run["environment"]["kernel_options"] = kernel_options
    json_path = args.output or default_results_path(run, args.out)
    print(f"{len(cases)} cases x {len(implementations)} implementations on {run['environment']['device_name']}; "
          f"results in {json_path}")

    def save(current: dict) -> None:
        report.write_json(current, json_path)

    status = 0
    try:
        run_suite(
            run,
            cases,
            implementations,
            options,
            save=save,
            max_seconds=None if args.max_minutes is None else args.max_minutes * 60,
            measure_device_peaks=not args.no_peaks,
            progress=not args.quiet,
        )
    except FatalCorrectnessError as error:
        status = 2
        fatal = error
    else:
        fatal = None
    paths = report.write_all(run, json_path, png=not args.no_plot)
    print()
    print(report.format_table(run))
    print()
    print("wrote " + ", ".join(str(path) for path in paths.values()))
    if fatal is not None:
        bar = "!" * 78
        print(f"\n{bar}\nCORRECTNESS GUARD FAILED - no time reported for a wrong result:\n{fatal}\n{bar}",
              file=sys.stderr)
        return status
    wrong = [r for r in run["results"] if r["status"] == "wrong"]
    if wrong:
        print(f"\n{len(wrong)} wrong results (not timed): "
              + "; ".join(f"{r['implementation']} on {r['case_id']}" for r in wrong), file=sys.stderr)
        return 3
    if not on_cuda:
        print("\n" + NOT_RUN_BANNER)
    return status


def kernel_option_modules() -> tuple:
    """The op modules whose UPPER_CASE settings `--kernel-option` may change."""
    from refinestyle_kernels.ops import modulated_conv2d, upsample_add

    return modulated_conv2d, upsample_add


def apply_kernel_options(items: list[str]) -> dict:
    """Set `NAME=VALUE` tuning constants of the Triton op modules (`kernel_option_modules`: their
    UPPER_CASE bool, int, float or str settings, e.g. RGB_EPILOGUE_MAX_COUT=0 or
    UPSAMPLE_ADD_TRITON=0) and return {NAME: new value}. The ops read them at call time, so they
    hold for the whole run. Raises ValueError on an unknown name or a value that does not parse
    as the constant's type."""
    modules = kernel_option_modules()

    def settable(module) -> dict:
        return {n: v for n, v in vars(module).items() if n.isupper() and isinstance(v, (bool, int, float, str))}

    owners = {name: module for module in reversed(modules) for name in settable(module)}
    applied = {}
    for item in items:
        name, sep, text = item.partition("=")
        name, text = name.strip(), text.strip()
        module = owners.get(name)
        if not sep or module is None:
            raise ValueError(f"expected NAME=VALUE with NAME one of {', '.join(sorted(owners))}; got {item!r}")
        current = getattr(module, name)
        try:
            if isinstance(current, bool):
                if text.lower() not in ("0", "1", "true", "false"):
                    raise ValueError
                value = text.lower() in ("1", "true")
            else:
                value = type(current)(text)
        except ValueError:
            raise ValueError(f"{name}: expected a value of type {type(current).__name__}, got {text!r}") from None
        setattr(module, name, value)
        applied[name] = value
    return applied


def _logger(quiet: bool):
    if quiet:
        return lambda message: None

    def log(message: str) -> None:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)

    return log


# what two runs must share to be merged: the device, the libraries and the kernels' settings
MERGE_KEYS = ("device_name", "torch", "triton", "kernel_options")


def merge_conflicts(runs: list[dict]) -> list[str]:
    """What differs between runs that `report` is asked to merge, one line per setting: an A/B
    run (--kernel-option) or another machine's numbers would otherwise pass for one run's."""
    conflicts = []
    for key in MERGE_KEYS:
        values = [r.get("environment", {}).get(key) or None for r in runs]
        if any(value != values[0] for value in values):
            conflicts.append(f"{key}: {' / '.join(map(str, values))}")
    return conflicts


def merged_results(runs: list[dict]) -> list[dict]:
    """The runs' records, one per (case, implementation): a later run's measurement replaces an
    earlier one's (the runs are given oldest first), so that the targets, the table and the
    speedups all read the same record. A record without a time never replaces one with, except
    a wrong result: the correctness guard failing later is not hidden by an earlier time."""
    merged: dict[tuple[str, str], dict] = {}
    for r in runs:
        for record in r["results"]:
            key = (record["case_id"], record["implementation"])
            earlier = merged.get(key)
            if (earlier is None or record.get("median_ms") is not None or earlier.get("median_ms") is None
                    or record.get("status") == "wrong"):
                merged[key] = record
    return list(merged.values())


def report_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="refinestyle-bench report",
                                     description="Redraw the table, CSV, markdown and PNG of saved results.")
    parser.add_argument("json", type=Path, nargs="+",
                        help="results JSON file(s); several are merged, oldest first: for a case and "
                             "implementation measured in several, the last file's measurement counts")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON path of the merged run (default: next to the first input, with _merged)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    runs = [report.read_json(path) for path in args.json]
    run = runs[0]
    conflicts = merge_conflicts(runs) if len(runs) > 1 else []
    if conflicts:
        print("refinestyle-bench report: error: these runs cannot be merged, they differ in "
              + "; ".join(conflicts) + ". Report them one by one.", file=sys.stderr)
        return 2
    if len(runs) > 1:
        run = dict(run)
        run["results"] = merged_results(runs)
        run["flop_check"] = [check for r in runs for check in r.get("flop_check", [])]
        names = []
        for r in runs:
            for impl in r["implementations"]:
                if impl["name"] not in [n["name"] for n in names]:
                    names.append(impl)
        run["implementations"] = names
        run["complete"] = all(r["complete"] for r in runs)
        run["merged_from"] = [str(path) for path in args.json]
        from benchmarks.runner import add_speedups, evaluate_targets

        # a later run may hold another variant of the same case: recompute the comparisons
        add_speedups(run["results"])
        run["targets"] = evaluate_targets(run["results"])
        output = args.output or args.json[0].with_name(args.json[0].stem + "_merged.json")
        paths = report.write_all(run, output, png=not args.no_plot)
    else:
        stem = args.output or args.json[0]
        paths = {"csv": report.write_csv(run, stem.with_suffix(".csv"))}
        stem.with_suffix(".md").write_text(report.markdown_report(run), encoding="utf-8")
        paths["markdown"] = stem.with_suffix(".md")
        if not args.no_plot:
            paths["png"] = report.plot(run, stem.with_suffix(".png"))
    print(report.format_table(run))
    print("wrote " + ", ".join(str(path) for path in paths.values()))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console entry point (`refinestyle-bench`, `python -m benchmarks`). Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":
        return report_main(argv[1:])
    return run_main(argv)


if __name__ == "__main__":
    sys.exit(main())
