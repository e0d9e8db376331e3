"""Reports of a run: stdout table, JSON, CSV, PNG plot and the markdown for BENCHMARKS.md.

The JSON holds everything (environment, peaks, settings, every record, the FLOP
cross-checks, the targets); the other formats are views of it and can be redrawn
from it later with `python -m benchmarks report RESULTS.json`.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Iterable

from benchmarks.cases import DTYPE_SHORT, MODE_SHORT

#: fields of a record, in CSV column order (dict-valued fields are written as JSON)
RECORD_FIELDS = (
    "case_id",
    "group",
    "generator_size",
    "channel_multiplier",
    "channel_max",
    "style_dim",
    "layer_name",
    "layer_kind",
    "layer_index",
    "in_channel",
    "out_channel",
    "kernel_size",
    "upsample",
    "in_size",
    "out_size",
    "batch",
    "dtype",
    "mode",
    "num_tokens",
    "token_sharing",
    "implementation",
    "family",
    "status",
    "error",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "min_ms",
    "mean_ms",
    "reps",
    "first_call_ms",
    "rotating_sets",
    "speedup_vs_reference",
    "speedup_vs_best_plain",
    "best_plain",
    "model_flops",
    "model_bytes",
    "tflops",
    "floor_ms",
    "pct_of_roofline",
    "peak_mem_bytes",
    "peak_mem_extra_bytes",
    "planned_peak_mem_bytes",
    "planned_bytes",
    "planned_launches",
    "max_rel_error",
    "rel_error",
    "tolerance",
    "reference_rel_error",
    "truth",
)


def _clean(value):
    """JSON-safe: non-finite floats become None (strict JSON has no Infinity/NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(run: dict, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean(run), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)  # never leave a half-written file behind
    return path


def read_json(path: Path | str) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_csv(run: dict, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=RECORD_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for record in run["results"]:
            row = {}
            for key in RECORD_FIELDS:
                value = _clean(record.get(key))
                row[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
            writer.writerow(row)
    return path


# ----------------------------------------------------------------------------------------------
# Formatting helpers


def _ms(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _x(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _pct(value) -> str:
    return "-" if value is None else f"{value:.0f}%"


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def _tflops(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}"


def _setting(record: dict) -> str:
    tokens = "none" if not record["num_tokens"] else (
        f"L={record['num_tokens']}{' shared' if record['token_sharing'] == 'shared' else ''}"
    )
    return f"B={record['batch']} {DTYPE_SHORT[record['dtype']]} {MODE_SHORT[record['mode']]} {tokens}"


def _where(record: dict) -> str:
    if record["group"] == "generator":
        return f"generator {record['generator_size']}px"
    up = " up" if record["upsample"] else ""
    return f"{record['layer_name']} ({record['out_size']}px{up}, {record['in_channel']}->{record['out_channel']})"


def _table(header: list[str], rows: Iterable[list[str]], markdown: bool) -> str:
    rows = [list(map(str, row)) for row in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(lines)


RESULT_HEADER = [
    "case",
    "setting",
    "implementation",
    "median ms",
    "p20-p80 ms",
    "vs ref",
    "vs best plain",
    "TFLOP/s",
    "% roofline",
    "peak/own MiB",
    "rel err",
]


def _result_row(record: dict) -> list[str]:
    if record["status"] != "ok":
        return [_where(record), _setting(record), record["implementation"], record["status"].upper()] + [""] * 7
    err = record.get("max_rel_error")
    return [
        _where(record),
        _setting(record),
        record["implementation"],
        _ms(record["median_ms"]),
        f"{_ms(record['p20_ms'])}-{_ms(record['p80_ms'])}",
        _x(record["speedup_vs_reference"]),
        _x(record["speedup_vs_best_plain"]),
        _tflops(record["tflops"]),
        _pct(record["pct_of_roofline"]),
        _mib(record["peak_mem_bytes"]) + "/" + _mib(record.get("peak_mem_extra_bytes")),
        "-" if err is None else f"{err:.1e}",
    ]


def format_table(run: dict) -> str:
    """The stdout table: one row per (case, implementation), then peaks and targets."""
    lines = [_banner(run), ""]
    lines.append(_table(RESULT_HEADER, (_result_row(r) for r in run["results"]), markdown=False))
    lines += ["", _peaks_line(run), _autotune_line(run)]
    launches = conv_launch_table(run)
    if launches:
        lines += ["", launches]
    lines += ["", _targets_text(run, markdown=False)]
    return "\n".join(lines)


def _banner(run: dict) -> str:
    env = run["environment"]
    text = (
        f"refinestyle benchmarks, {run['suite']} suite on {env['device_name']}; torch {env['torch']}, "
        f"triton {env['triton']}; {run['created']}"
    )
    if not run["gpu_suite_run"]:
        text += (
            "\nTHE GPU SUITE WAS NOT RUN: these are CPU numbers of the reduced suite, no statement "
            "about GPU speed."
            if env["device_type"] != "cuda"
            else "\nThis is not the full GPU suite (a subset was selected)."
        )
    if env.get("kernel_options"):
        changed = ", ".join(f"{name}={value}" for name, value in env["kernel_options"].items())
        text += f"\nKernel options changed for this run (not the defaults): {changed}"
    if run.get("stopped_early"):
        text += f"\nStopped early: {run['stopped_early']}"
    if run.get("partial_case"):
        text += (f"\nStopped from outside inside {run['partial_case']}: of that case, only the "
                 "implementations listed were timed")
    if run.get("fatal_error"):
        text += f"\nFATAL: {run['fatal_error']}"
    return text


def _peaks_line(run: dict) -> str:
    peaks = run.get("peaks")
    if not peaks:
        return "Peaks: not measured (no roofline)."
    matmul = ", ".join(
        f"{DTYPE_SHORT.get(name, name)} {value / 1e12:.3g} TFLOP/s" for name, value in peaks["matmul_flops_per_s"].items()
    )
    return (
        f"Peaks measured in this run: matmul ({peaks['matmul_size']}^3) {matmul}; "
        f"copy {peaks['copy_bytes_per_s'] / 1e9:.3g} GB/s"
    )


def _autotune_line(run: dict) -> str:
    """What the conv kernel's autotuner chose, in one line (the details are in the JSON)."""
    chosen = run.get("autotuned_conv_configs") or []
    if not chosen:
        return "Conv autotuner: nothing tuned in this run (no autotuned Triton launch)."
    forward = [config for config in chosen if config.get("HAS_A_SCALE")]
    on_w = sum(1 for config in forward if config.get("SCALE_WEIGHT"))
    return (
        f"Conv autotuner: {len(chosen)} launch shapes tuned; the styles went on the W tile in {on_w} of the "
        f"{len(forward)} forward shapes, on the A tile in the rest (autotuned_conv_configs in the JSON)."
    )


_CONV_MODES = {0: "conv", 1: "conv /2", 2: "convT x2"}


def _conv_launch_label(config: dict) -> str:
    """A tuned conv launch in words: "convT x2 64->32 on 513x513, A*s, +proj L32" (MODE, K->N, the
    pixel grid, then what rides along: the styles on A, the low-rank branch fused or read, the
    per-pixel sums of a grad-x launch, the token products, the toRGB epilogue)."""
    grid = config.get("GRID_HW") or (0, 0)
    parts = [f"{_CONV_MODES.get(config.get('MODE'), config.get('MODE'))} {config.get('K')}->{config.get('N')} "
             f"on {grid[0]}x{grid[1]}"]  # fmt: skip
    if config.get("HAS_A_SCALE"):
        parts.append("A*s")
    if config.get("HAS_LOWRANK"):
        parts.append(f"{'+proj' if config.get('FUSE_PROJECTION') else '+z'} L{config.get('L')}")
    if config.get("REDUCE_X"):
        parts.append("+sum x")
    if config.get("TOKEN_PRODUCTS"):
        parts.append("+token products")
    if config.get("RGB_CHANNELS"):
        parts.append("+toRGB")
    return ", ".join(parts)


def _conv_tile(config: dict) -> str:
    """A conv config's tile in short: BLOCK_MxBLOCK_NxBLOCK_K, warps, TMA loads, styles on W."""
    return (f"{config.get('BLOCK_M')}x{config.get('BLOCK_N')}x{config.get('BLOCK_K')} w{config.get('num_warps')}"
            f"{' TMA' if config.get('A_TMA') else ''}{' s->W' if config.get('SCALE_WEIGHT') else ''}")  # fmt: skip


def conv_launch_table(run: dict, markdown: bool = False) -> str | None:
    """The conv kernel's launch shapes as its autotuner timed them (`autotuned_conv_configs`:
    the chosen config's median, Triton's do_bench with the L2 emptied between calls), slowest
    first, against each launch's floor at the run's peaks: its least bytes at the copy peak or
    its FLOPs at the matmul peak of its dtype, whichever is longer; then how many configs were
    timed and the fastest of the others, with how much slower it was. None when nothing was
    timed."""
    timed = [c for c in run.get("autotuned_conv_configs") or [] if c.get("tuned_ms")]
    if not timed:
        return None
    peaks = run.get("peaks") or {}
    copy = peaks.get("copy_bytes_per_s")
    matmul = peaks.get("matmul_flops_per_s") or {}
    rows = []
    total_ms = total_floor = 0.0
    for config in sorted(timed, key=lambda c: -c["tuned_ms"]):
        ms = config["tuned_ms"]
        nbytes, flops = config.get("least_bytes") or 0, config.get("flops") or 0
        peak_flops = matmul.get(str(config.get("a_dtype", "")).replace("torch.", ""))
        floor = None
        if copy and peak_flops:
            floor = 1e3 * max(nbytes / copy, flops / peak_flops)
            total_floor += floor
        total_ms += ms
        timings = config.get("timings") or []
        runner_up = "-"
        if len(timings) > 1 and timings[0]["ms"] > 0:  # how much the choice mattered
            runner_up = f"{_conv_tile(timings[1])} +{100 * (timings[1]['ms'] / timings[0]['ms'] - 1):.0f}%"
        rows.append([
            _conv_launch_label(config), _conv_tile(config), f"{ms:.3f}", f"{nbytes / ms / 1e6:.0f}",
            f"{flops / ms / 1e9:.0f}", "-" if floor is None else f"{floor:.3f}", "-" if not floor else f"{ms / floor:.1f}x",
            f"{len(timings)}" if timings else "-", runner_up,
        ])  # fmt: skip
    header = ["conv launch (tuned)", "tile", "ms", "GB/s", "TFLOP/s", "floor ms", "x floor", "timed", "next best"]
    summary = (f"Conv launches as the autotuner timed them ({len(timed)} shapes): {total_ms:.2f} ms in all"
               + (f", {total_floor:.2f} ms at the floor" if total_floor else " (no peaks: no floor)") + ".")
    return summary + ("\n\n" if markdown else "\n") + _table(header, rows, markdown)


def _targets_text(run: dict, markdown: bool) -> str:
    rows = []
    for target in run.get("targets", []):
        value = target["value"]
        shown = "not measured" if value is None else f"{value:.3g}"
        met = {None: "-", True: "met", False: "MISSED"}[target["met"]]
        if target.get("note"):
            met = f"{met} ({target['note']})" if met != "-" else target["note"]
        by = target.get("implementation") or "-"
        rows.append([target["description"], f"{target['comparison']} {target['threshold']}", shown, by, met])
    title = "Targets (H100, batch 8, 1024 px, every layer refined with L = 32; the fastest fused variant):"
    headers = ["target", "needs", "measured", "by", ""]
    return title + ("\n\n" if markdown else "\n") + _table(headers, rows, markdown)


# ----------------------------------------------------------------------------------------------
# Markdown for BENCHMARKS.md


def markdown_report(run: dict) -> str:
    """Markdown tables: whole generator (all settings), per layer (each setting), targets."""
    env = run["environment"]
    parts = [f"### {run['suite'].upper()} suite: {env['device_name']} ({run['created'][:10]})", ""]
    parts.append(
        f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; TF32 matmul {env['tf32_matmul']}, "
        f"cuDNN {env['tf32_cudnn']}. {_peaks_line(run)}"
    )
    if not run["gpu_suite_run"]:
        parts += ["", "**" + _banner(run).split("\n", 1)[1].replace("\n", " ") + "**"]
    implementations = [impl["name"] for impl in run["implementations"]]
    for group, title in (("generator", "Whole synthesis network"), ("layer", "Per layer")):
        records = [r for r in run["results"] if r["group"] == group]
        if not records:
            continue
        parts += ["", f"#### {title}: median ms (speedup vs reference)", ""]
        present = [name for name in implementations if any(r["implementation"] == name for r in records)]
        header = ["case", "setting"] + present + ["best vs best plain", "% roofline (best)"]
        rows = []
        for case_records in _by_case(records):
            first = case_records[0]
            cells = {r["implementation"]: r for r in case_records}
            row = [_where(first), _setting(first)]
            for name in present:
                r = cells.get(name)
                if r is None:
                    row.append("")
                elif r["status"] != "ok":
                    row.append(r["status"])
                else:
                    speed = r["speedup_vs_reference"]
                    row.append(_ms(r["median_ms"]) + (f" ({speed:.2f}x)" if speed else ""))
            ok = [r for r in case_records if r["status"] == "ok"]
            best = min(ok, key=lambda r: r["median_ms"]) if ok else None
            row.append(f"{best['implementation']} {_x(best['speedup_vs_best_plain'])}" if best else "-")
            row.append(_pct(best["pct_of_roofline"]) if best else "-")
            rows.append(row)
        parts.append(_table(header, rows, markdown=True))
    parts += ["", _autotune_line(run)]
    launches = conv_launch_table(run, markdown=True)
    if launches:
        parts += ["", launches]
    broken = [r for r in run["results"] if r.get("graph_breaks")]
    if broken:
        parts += ["", "Compiled with graph breaks (each graph is entered from Python):"]
        parts += [
            f"- {r['implementation']} on {r['case_id']}: {r['graph_breaks']} breaks, {r['compiled_graphs']} graphs; "
            f"first: `{r['graph_break_reasons'][0]}`"
            for r in broken
        ]
    parts += ["", _targets_text(run, markdown=True)]
    return "\n".join(parts) + "\n"


def _by_case(records: list[dict]) -> list[list[dict]]:
    order, groups = [], {}
    for record in records:
        if record["case_id"] not in groups:
            order.append(record["case_id"])
            groups[record["case_id"]] = []
        groups[record["case_id"]].append(record)
    return [groups[case_id] for case_id in order]


# ----------------------------------------------------------------------------------------------
# Plot


def _headline_series(run: dict) -> tuple[str, list[dict]]:
    """The per-layer series to plot: batch 8 bf16 fwd+bwd L=32 when present, else the biggest series."""
    layer_records = [r for r in run["results"] if r["group"] == "layer"]
    series: dict[str, list[dict]] = {}
    for record in layer_records:
        series.setdefault(_setting(record), []).append(record)
    if not series:
        return "", []
    preferred = [key for key in ("B=8 bf16 fwd+bwd L=32", "B=2 fp32 fwd L=32") if key in series]
    key = preferred[0] if preferred else max(series, key=lambda k: len(series[k]))
    return key, series[key]


def plot(run: dict, path: Path | str) -> Path:
    """PNG: per-layer time by implementation; achieved TFLOP/s against the roofline; whole network."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    setting, records = _headline_series(run)
    generator_records = [r for r in run["results"] if r["group"] == "generator" and r["status"] == "ok"]
    implementations = [impl["name"] for impl in run["implementations"]]
    colors = {name: plt.get_cmap("tab10" if len(implementations) <= 10 else "tab20")(i % 20) for i, name in enumerate(implementations)}

    fig, axes = plt.subplots(1, 3, figsize=(21, 6.5))
    # (a) per-layer time
    ax = axes[0]
    layers = []
    for record in records:
        label = f"{record['layer_kind']} {record['layer_index']}"
        if label not in layers:
            layers.append(label)
    for name in implementations:
        points = [
            (layers.index(f"{r['layer_kind']} {r['layer_index']}"), r["median_ms"])
            for r in records
            if r["implementation"] == name and r["status"] == "ok"
        ]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", ms=4, lw=1.2, label=name, color=colors[name])
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=90, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("median time per call (ms)")
    ax.set_title(f"per layer, {setting}" if setting else "per layer (no layer cases)")
    ax.grid(True, which="both", alpha=0.3)
    if records:
        ax.legend(fontsize=7)

    # (b) roofline
    ax = axes[1]
    peaks = run.get("peaks")
    dtype = records[0]["dtype"] if records else None
    if peaks and dtype and dtype in peaks["matmul_flops_per_s"]:
        peak_flops = peaks["matmul_flops_per_s"][dtype] / 1e12
        bandwidth = peaks["copy_bytes_per_s"] / 1e12
        intensities = [r["model_flops"] / r["model_bytes"] for r in records if r["model_bytes"]]
        low = min(intensities + [1.0]) / 2
        high = max(intensities + [peak_flops / bandwidth]) * 2
        grid = [low * (high / low) ** (i / 200) for i in range(201)]
        ax.plot(grid, [min(peak_flops, bandwidth * g) for g in grid], "k-", lw=2, label="roofline (measured peaks)")
        for name in implementations:
            points = [
                (r["model_flops"] / r["model_bytes"], r["tflops"])
                for r in records
                if r["implementation"] == name and r["status"] == "ok" and r["tflops"]
            ]
            if points:
                xs, ys = zip(*points)
                ax.scatter(xs, ys, s=18, label=name, color=colors[name])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity (model FLOP / least bytes)")
        ax.set_ylabel("achieved TFLOP/s (model FLOPs)")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    ax.set_title("achieved vs roofline, per layer")

    # (c) whole generator
    ax = axes[2]
    cases = _by_case(generator_records)
    width = 0.8 / max(len(implementations), 1)
    for offset, name in enumerate(implementations):
        xs, ys = [], []
        for index, case_records in enumerate(cases):
            for record in case_records:
                if record["implementation"] == name:
                    xs.append(index + offset * width)
                    ys.append(record["median_ms"])
        if xs:
            ax.bar(xs, ys, width=width, label=name, color=colors[name])
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    ax.set_xticklabels([f"{c[0]['generator_size']}px {_setting(c[0])}" for c in cases], rotation=90, fontsize=6)
    times = [r["median_ms"] for r in generator_records]
    if times and max(times) / min(times) > 20:  # bars from zero unless the range needs a log axis
        ax.set_yscale("log")
    ax.set_ylabel("median time per call (ms)")
    ax.set_title("whole synthesis network")
    if cases:
        ax.legend(fontsize=7)

    title = f"{run['environment']['device_name']}, {run['suite']} suite, {run['created'][:10]}"
    if not run["gpu_suite_run"]:
        title += " (GPU suite not run)"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(run: dict, json_path: Path | str, *, png: bool = True) -> dict[str, Path]:
    """JSON, CSV, markdown (and PNG) next to each other: <stem>.json/.csv/.md/.png."""
    json_path = Path(json_path)
    paths = {"json": write_json(run, json_path), "csv": write_csv(run, json_path.with_suffix(".csv"))}
    md = json_path.with_suffix(".md")
    md.write_text(markdown_report(run), encoding="utf-8")
    paths["markdown"] = md
    if png:
        paths["png"] = plot(run, json_path.with_suffix(".png"))
    return paths
