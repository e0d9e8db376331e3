#!/usr/bin/env bash
# One lent GPU's measurements for issue 4, in four calls of under 10 minutes each (BENCHMARKS.md,
# "Next GPU session"). Run from anywhere; results land in benchmarks/results/ and, where the
# device tool sets $OUT, in $OUT too (at most 8 files a stage: what the tool brings back):
#
#   bash benchmarks/gpu_session.sh 1   # the compiled CUDA tests (and that the refined network compiles into one
#                                      # graph), then the kernel profile of the headline step
#   bash benchmarks/gpu_session.sh 2   # the headline suite, whole network: the fused and plain variants in one
#                                      # process, compile-torch and triton+graph each in their own (a failed
#                                      # capture spoils every later capture in its process: session 24)
#   bash benchmarks/gpu_session.sh 3   # why the captures fail (benchmarks.capture_check), the 256-1024 px
#                                      # layers one by one, then compile-reference (for the vs-plain verdict)
#   bash benchmarks/gpu_session.sh 4   # A/Bs of the headline step: one fusion or kernel switched off a run
#
# Merge a stage's JSON files with `python -m benchmarks report A.json B.json ...` (oldest first).
#
# Each stage prints its summary last. The runs' JSON hold `autotuned_conv_configs`: which tile,
# style placement and loads (pointer or TMA) the autotuner chose per launch shape.
set -uo pipefail
case "${1:-}" in
1 | 2 | 3 | 4) ;;
*)
    echo "usage: bash benchmarks/gpu_session.sh 1|2|3|4" >&2
    exit 2
    ;;
esac
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
python=python3
$python - <<'EOF'
import torch, triton
print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
EOF
parallel=""
# the device tool brings back 8 files of $OUT: runs whose CSV and markdown are not needed there write
# into $scratch, and their JSON is copied to $out as soon as each run ends
scratch="$out"
[ -n "${OUT:-}" ] && scratch="$(mktemp -d)"
keep_json() { [ "$scratch" = "$out" ] || cp "$scratch/$1" "$out/" 2>/dev/null; }
$python -c "import xdist" 2>/dev/null && parallel="-n 8"
# the generator's 256-1024 px convs and toRGBs (config-f at 1024 px has convs.0-15 and to_rgbs.0-7)
layers="convs.10,convs.11,convs.12,convs.13,convs.14,convs.15,to_rgbs.5,to_rgbs.6,to_rgbs.7"
case "${1:-}" in
1)
    # the self-check compiles and autotunes too: bounded, so that the profile keeps its time
    timeout 100 $python -m refinestyle_kernels --dtype fp32,bf16 --json "$out/selfcheck.json" 2>&1 | tail -n 14
    timeout 330 $python -m pytest -q $parallel tests/test_kernels_triton.py tests/test_kernels_to_rgb.py \
        tests/test_generator_gpu.py tests/test_generator_triton.py tests/test_kernels_modules.py tests/test_kernels_nvlabs.py \
        tests/test_kernels_selfcheck.py tests/test_kernels_upsample_add.py 2>&1 |
        tee "$out/cuda-tests.log" | tail -n 30
    # triton first: its kernel table is what this stage is for; the JSON is rewritten after each
    timeout 160 $python -m benchmarks.profile --impls triton,reference,nvlabs,torch --json "$out/profile.json" 2>&1 |
        tee "$out/profile.log"
    ;;
2)
    # L = 32 first: the budget is checked between cases, and that case is what the targets are about;
    # each implementation's record is in the JSON as soon as it is timed, should the call's limit come
    # first. In each case the reference runs first (the guard's tolerances), then the fused variant
    # the targets take, then the plain ones
    timeout 280 $python -m benchmarks --suite headline --groups generator --tokens 32,0 --max-minutes 4 \
        --output "$out/headline-generator.json" --impls reference,triton,nvlabs,torch 2>&1 |
        tee "$out/headline-generator.log" | tail -n 30
    # the fastest plain variant of session 24 (and the longest compile), then the graph variant, each in
    # its own process: a capture that fails leaves its process unable to capture (or to allocate)
    for impls in reference,compile-torch reference,triton+graph; do
        name="headline-generator-${impls#reference,}.json"
        timeout 150 $python -m benchmarks --suite headline --groups generator --tokens 32 --max-minutes 2 --no-plot \
            --output "$scratch/$name" --impls "$impls" 2>&1 | tail -n 14
        keep_json "$name"
    done
    ;;
3)
    # what breaks the captures (session 24: every +graph variant failed; the reference's 256 px step
    # captured in a fresh process): the triton step, then the 1024 px reference step
    timeout 120 $python -m benchmarks.capture_check --impl triton --size 256 --batch 2 2>&1 | tail -n 40 |
        tee "$out/capture-check.log"
    timeout 90 $python -m benchmarks.capture_check --impl reference --size 1024 --batch 8 2>&1 | tail -n 40 |
        tee -a "$out/capture-check.log"
    # L = 32 rows first (the budget is checked between cases); bounded, so the call ends in time
    timeout 200 $python -m benchmarks --suite headline --groups layer --layers "$layers" --tokens 32,0 --max-minutes 3 \
        --no-plot --output "$out/headline-layers.json" --impls reference,nvlabs,torch,triton 2>&1 | tail -n 60
    # the last plain variant the vs-plain verdict waits for (never timed yet), in its own process
    name="headline-generator-compile-reference.json"
    timeout 170 $python -m benchmarks --suite headline --groups generator --tokens 32 --max-minutes 2 --no-plot \
        --output "$scratch/$name" --impls reference,compile-reference 2>&1 | tail -n 14
    keep_json "$name"
    ;;
4)
    # A/Bs against the defaults, one route changed at a time. Session 24: the 256 px layer's
    # epilogue products took 4.1 ms in one launch (of a 40 ms step), and switching off the toRGB
    # epilogue and the epilogue products together saved 6.8 ms where the conv token products were off
    ab() {  # the headline step with the kernel options that follow its name changed
        local name="ab-$1.json"
        shift
        timeout 110 $python -m benchmarks --suite headline --groups generator --tokens 32 --impls triton "$@" \
            --max-minutes 1.5 --no-plot --output "$scratch/$name" 2>&1 | tail -n 3
        keep_json "$name"
    }
    ab all-on  # the baseline, in this call: two processes' medians differed by up to 2 ms in session 24
    # session 28: the loads a box's taps re-read (the conv's input tiles, the pixel products' boxed
    # tiles) copied 8 bytes at a time, which Triton 3.6 caches in L1, against 16-byte copies, which
    # it sends through L2 only (the conv kernels compile anew)
    ab tap-loads-l2 --kernel-option TAP_LOAD_BYTES=16
    # session 25 routed the 256 px layer away from the epilogue products (EPILOGUE_PRODUCTS_MAX_CHANNELS
    # 128 -> 64) on session 24's profile; this times the old route
    ab epilogue-products-128 --kernel-option EPILOGUE_PRODUCTS_MAX_CHANNELS=128
    # session 27: the memory-bound loops' loads pipelined (cp.async), against session 26's plain loads
    ab loads-unpipelined --kernel-option LOAD_STAGES=1
    # session 27: the epilogue backward's programs walk up to 32 blocks of 512 values, against one
    # block of 2048 a program (session 26); session 24 already timed the toRGB epilogue and the
    # conv token products off (h100_2026-11-26_ab-*.json), so those two runs made room for these
    ab epilogue-backward-one-block --kernel-option EPILOGUE_BACKWARD_MAX_TILES=1 \
        --kernel-option EPILOGUE_BACKWARD_BLOCK_VALUES=2048
    # session 28: the blur programs load their next source row ahead, against loads where used
    ab blur-loads-in-place --kernel-option BLUR_PREFETCH=0
    # session 28: the demodulation's fp32 dots on the tensor cores (3xTF32) instead of the FMA units
    # (~1 ms over 17 launches in session 24, most of it the token terms); the CUDA tests of stage 1
    # check its accuracy (`test_triton_demodulation_matches_the_torch_one[...-tf32x3]`)
    ab demodulation-tf32x3 --kernel-option DEMODULATION_PRECISION=tf32x3
    # session 25: the toRGB skip's upsample + add in Triton (`upsample_add`) against cuDNN's ~2.7 ms
    ab upsample-add-off --kernel-option UPSAMPLE_ADD_TRITON=0
    ;;
esac
