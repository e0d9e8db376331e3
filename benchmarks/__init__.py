"""Benchmarks of refinestyle-kernels: FLOPs, latency and memory of the fused op against the
reference and plain-PyTorch paths, per layer and for the whole generator.

Run `python -m benchmarks` (installed as `refinestyle-bench`); see BENCHMARKS.md.
Modules: flops (analytic counts, FlopCounterMode cross-check), cases (the suites),
implementations (what is compared), nvlabs_style (the NVlabs-style baseline),
workloads (inputs and calls), timing (timers, peaks, correctness guard), runner,
report (table, JSON, CSV, PNG, markdown).
"""
