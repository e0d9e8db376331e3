#!/usr/bin/env bash
# One lent GPU's measurements for issue 4, in three calls of under 10 minutes each (BENCHMARKS.md,
# "Next GPU session"). Run from anywhere; results land in benchmarks/results/ and, where the
# device tool sets $OUT, in $OUT too (at most 7 files a stage: the tool brings back 8):
#
#   bash benchmarks/gpu_session.sh 1   # the compiled CUDA tests (and that the refined network compiles into one
#                                      # graph), then the kernel profile of the headline step
#   bash benchmarks/gpu_session.sh 2   # the headline suite, whole network: the fused variants and the plain ones
#                                      # that fit (the vs-plain target stays provisional until the issue's
#                                      # plain variants are all timed; see BENCHMARKS.md)
#   bash benchmarks/gpu_session.sh 3   # the headline suite, the 256-1024 px layers one by one, then an
#                                      # A/B of the headline step with the newest fusions switched off
#
# Each stage prints its summary last. The runs' JSON hold `autotuned_conv_configs`: which tile,
# style placement and loads (pointer or TMA) the autotuner chose per launch shape.
set -uo pipefail
case "${1:-}" in
1 | 2 | 3) ;;
*)
    echo "usage: bash benchmarks/gpu_session.sh 1|2|3" >&2
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
$python -c "import xdist" 2>/dev/null && parallel="-n 8"
# the generator's 256-1024 px convs and toRGBs (config-f at 1024 px has convs.0-15 and to_rgbs.0-7)
layers="convs.10,convs.11,convs.12,convs.13,convs.14,convs.15,to_rgbs.5,to_rgbs.6,to_rgbs.7"
case "${1:-}" in
1)
    # the self-check compiles and autotunes too: bounded, so that the profile keeps its time
    timeout 90 $python -m refinestyle_kernels --dtype fp32,bf16,fp16 --json "$out/selfcheck.json" 2>&1 | tail -n 14
    timeout 330 $python -m pytest -q $parallel tests/test_kernels_triton.py tests/test_kernels_to_rgb.py \
        tests/test_generator_gpu.py tests/test_generator_triton.py tests/test_kernels_modules.py tests/test_kernels_nvlabs.py \
        tests/test_kernels_selfcheck.py 2>&1 |
        tee "$out/cuda-tests.log" | tail -n 30
    # triton first: its kernel table is what this stage is for; the JSON is rewritten after each
    timeout 160 $python -m benchmarks.profile --impls triton,reference,nvlabs,torch --json "$out/profile.json" 2>&1 |
        tee "$out/profile.log"
    ;;
2)
    # L = 32 first: the budget is checked between cases, and that case is what the targets are about;
    # each implementation's record is in the JSON as soon as it is timed, should the call's limit come
    # first. In each case the reference runs first (the guard's tolerances), then the fused variants
    # the targets take, the plain ones, and last the variant with the longest compile
    timeout 580 $python -m benchmarks --suite headline --groups generator --tokens 32,0 --max-minutes 8 \
        --output "$out/headline-generator.json" \
        --impls reference,triton,triton+graph,nvlabs,torch,reference+graph,torch+graph,compile-torch,compile-triton+graph 2>&1 |
        tee "$out/headline-generator.log" | tail -n 40
    ;;
3)
    # L = 32 rows first (the budget is checked between cases); bounded, so the A/B runs keep their time
    timeout 280 $python -m benchmarks --suite headline --groups layer --layers "$layers" --tokens 32,0 --max-minutes 4 \
        --output "$out/headline-layers.json" --impls reference,nvlabs,torch,triton 2>&1 |
        tee "$out/headline-layers.log" | tail -n 60
    # A/B against stage 2 (everything on): the headline step without the seventh session's token
    # products in the grad-x conv (fewer bytes, but 8 warps an SM against 12), then also without
    # the sixth session's fusions (toRGB forward in the conv epilogue, epilogue products)
    # with $OUT, their CSV and markdown stay on the machine and only the JSON goes there: 5 + 2 files
    ab="$out"
    [ -n "${OUT:-}" ] && ab="$(mktemp -d)"
    # each JSON goes to $OUT as soon as its run ends: a stage cut short keeps the finished one
    timeout 130 $python -m benchmarks --suite headline --groups generator --tokens 32 --impls triton \
        --kernel-option CONV_TOKEN_PRODUCTS_MAX_K=0 \
        --max-minutes 2 --no-plot --output "$ab/ab-conv-products-off.json" 2>&1 | tail -n 12
    [ "$ab" = "$out" ] || cp "$ab"/ab-conv-products-off.json "$out"/ 2>/dev/null
    timeout 130 $python -m benchmarks --suite headline --groups generator --tokens 32 --impls triton \
        --kernel-option CONV_TOKEN_PRODUCTS_MAX_K=0 --kernel-option RGB_EPILOGUE_MAX_COUT=0 \
        --kernel-option EPILOGUE_PRODUCTS_MAX_CHANNELS=0 \
        --max-minutes 2 --no-plot --output "$ab/ab-fusions-off.json" 2>&1 | tail -n 12
    [ "$ab" = "$out" ] || cp "$ab"/ab-fusions-off.json "$out"/ 2>/dev/null
    ;;
esac
