"""Why a whole-generator case does not capture as a CUDA graph: the first synchronizing call, then
a capture and a replay checked against the eager result. Needs a CUDA GPU.

    python -m benchmarks.capture_check --impl triton --size 256 --batch 2
    python -m benchmarks.capture_check --impl reference --mode forward --error-mode thread_local

On the H100 in session 24 every `+graph` variant of the 1024 px training step failed with
"operation failed due to a previous error during capture", which names no call: the call that
broke the capture had returned an error nobody raised. This tool looks for it in two ways:

1. one eager step under `torch.cuda.set_sync_debug_mode("error")`, which raises with a traceback
   at any call that synchronizes the device with the host (`.item()`, a host copy, a pageable
   upload), the usual reason a capture breaks;
2. a capture in the chosen `capture_error_mode` ("thread_local" leaves other threads' calls
   alone; "relaxed" allows the unsafe ones), then one replay, compared with the eager step.

Run each implementation in its own process: a failed capture leaves the CUDA context (and the
default generator's capture state) unusable for every later capture in that process.
Exit status: 0 when the capture replays the eager result, 1 when the check or the capture
fails, 2 on bad arguments or without a GPU.
"""
from __future__ import annotations

import argparse
import sys
import traceback

import torch

from benchmarks.cases import DTYPE_SHORT, MODES, Case, GeneratorConfig, TokenSetting
from benchmarks.implementations import registry
from benchmarks.runner import first_error
from benchmarks.timing import relative_error
from benchmarks.workloads import make_workload, patched_op

EAGER_IMPLEMENTATIONS = ("reference", "nvlabs", "torch", "triton")


def _last_lines(text: str, count: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-count:])


def check_capture(impl: str, size: int, batch: int, dtype: str, mode: str, tokens: int, error_mode: str) -> bool:
    """Print what breaks the capture of one generator case; True when the captured graph replays
    the eager outputs (relative error at most 1e-3 per output: the same kernels, the same inputs).

    impl: an eager implementation's name (EAGER_IMPLEMENTATIONS). size: the config-f generator's
    resolution (a power of two). batch: B. dtype: "float32", "bfloat16" or "float16" (weights and
    inputs). mode: "forward" or "forward_backward" (gradients of w+ and the tokens). tokens: L per
    refined layer, per sample (0: no refinement). error_mode: torch.cuda.graph's
    capture_error_mode, "global", "thread_local" or "relaxed". Needs CUDA.
    """
    implementation = registry()[impl]
    case = Case("generator", GeneratorConfig(size), batch, dtype, mode, TokenSetting(tokens, False))
    workload = make_workload(case, torch.device("cuda"))
    workload.ensure_sets(1)
    inputs = workload.sets[0]
    with patched_op(implementation.op):
        forward = workload.forward_fn(implementation)
        # warm up on a side stream, as the suite does: autotuning and lazy set-up stay outside
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                eager = workload.run(forward, inputs)
        torch.cuda.current_stream().wait_stream(side)
        eager = {name: value.detach().clone() for name, value in eager.items()}
        torch.cuda.synchronize()
        print(f"== {case.case_id} {impl}: one eager step with set_sync_debug_mode('error')", flush=True)
        torch.cuda.set_sync_debug_mode("error")
        try:
            workload.run(forward, inputs)
            torch.cuda.synchronize()
            print("   no synchronizing call")
        except Exception:  # noqa: BLE001 - the traceback is the finding
            print(_last_lines(traceback.format_exc()))
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        print(f"== capture (capture_error_mode={error_mode!r}) and one replay", flush=True)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode=error_mode):
                captured = workload.run(forward, inputs)
            graph.replay()
            torch.cuda.synchronize()
        except Exception as error:  # noqa: BLE001
            first = first_error(error)
            if first is not error:  # the capture's end raised again and hid the call that broke it
                print("   FAILED; the first error, which broke the capture:\n"
                      + _last_lines("".join(traceback.format_exception(first))))
            print("   FAILED:\n" + _last_lines(traceback.format_exc(limit=-3, chain=False)))
            return False
        errors = {name: relative_error(captured[name].detach(), eager[name]) for name in eager}
        print("   replayed; relative error against the eager step: "
              + ", ".join(f"{name} {error:.1e}" for name, error in errors.items()))
        return all(error <= 1e-3 for error in errors.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.capture_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", default="triton", choices=EAGER_IMPLEMENTATIONS)
    parser.add_argument("--size", type=int, default=256, help="generator resolution (default 256)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPE_SHORT))
    parser.add_argument("--mode", default="forward_backward", choices=MODES)
    parser.add_argument("--tokens", type=int, default=32, help="L per refined layer, 0 for none (default 32)")
    parser.add_argument("--error-mode", default="global", choices=("global", "thread_local", "relaxed"))
    args = parser.parse_args(argv)
    if args.size < 4 or args.size & (args.size - 1):
        parser.error(f"--size: expected a power of two of at least 4, got {args.size}")
    if args.batch < 1 or args.tokens < 0:
        parser.error("--batch: expected at least 1; --tokens: expected at least 0")
    if not torch.cuda.is_available():
        print("capture_check needs a CUDA GPU: CUDA graphs exist only there", file=sys.stderr)
        return 2
    ok = check_capture(args.impl, args.size, args.batch, args.dtype, args.mode, args.tokens, args.error_mode)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
