"""benchmarks/kernel_audit.py: what ptxas makes of the kernels for the H100, without a GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks.kernel_audit import PtxasReport, StepLoop, issued_per_block, programs_per_sm
from refinestyle_kernels.ops import modulated_conv2d as op_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SERIALISED_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_conv_gemm_kernel' for 'sm_90a'
ptxas info    : Function properties for _conv_gemm_kernel
ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to non wgmma instructions defining accumulator registers of a wgmma between start and end of the pipeline stage in the function '_conv_gemm_kernel'
    16 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers
"""

CLEAN_LOG = """ptxas info    : Function properties for _blur_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 72 registers, used 1 barriers
"""


def test_ptxas_log_is_read():
    report = PtxasReport.parse(SERIALISED_LOG)
    assert (report.registers, report.spill_bytes, report.stack_bytes) == (255, 20, 16)
    assert report.serialized_wgmma and len(report.notes) == 1
    clean = PtxasReport.parse(CLEAN_LOG)
    assert (clean.registers, clean.spill_bytes, clean.serialized_wgmma, clean.notes) == (72, 0, False, [])
    with pytest.raises(ValueError, match="register count"):
        PtxasReport.parse("ptxas fatal : Unsupported .version 9.4")


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IMAD R2, R3, R4, RZ ;
        /*0020*/                   HGMMA.64x32x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0030*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0040*/                   LDGSTS.E.128 [R7], desc[UR22][R16.64], P4 ;
        /*0050*/                   HGMMA.64x32x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0060*/               @P5 BRA 0x20 ;
        /*0070*/                   IADD3 R5, R5, 0x1, RZ ;
        /*0080*/               @!P1 BRA 0x10 ;
        /*0090*/                   ISETP.GE.AND P0, PT, R5, 0x4, PT ;
        /*00a0*/               @P0 BRA 0x90 ;
        /*00b0*/                   BRA 0xb0;
        /*00c0*/                   EXIT ;
"""


def test_step_loop_is_the_shortest_loop_with_wgmma():
    """Backward branches close loops: the inner one (0x20-0x60) holds two HGMMA in 5
    instructions; the outer one (0x10-0x80) is longer; 0x90-0xa0 and the trap at 0xb0 hold none.
    Ampere-style HMMA (mma.sync) in the step loop is counted apart from the HGMMA."""
    loop = StepLoop.find(SASS)
    assert (loop.instructions, loop.wgmma, loop.mma_sync) == (5, 2, 0)
    assert StepLoop.find(SASS.replace("HGMMA", "HMMA")) is None  # no wgmma: no step loop
    mixed = SASS.replace("IADD3 R2, R2, 0x1, RZ", "HMMA.16816.F32.BF16 R72, R136, R64, R72")
    assert (StepLoop.find(mixed).wgmma, StepLoop.find(mixed).mma_sync) == (2, 1)  # an mma.sync in the step


def test_a_pixel_block_issues_the_kernel_once_and_its_step_loop_per_step():
    """13 instructions listed, less the branch to itself at 0xb0 and the padding, once; the
    5-instruction step loop 8 times more for 9 steps."""
    padded = SASS + "        /*00d0*/                   NOP;\n"
    assert issued_per_block(padded, steps=1) == 12
    assert issued_per_block(padded, steps=9) == 12 + 8 * 5
    assert issued_per_block(SASS.replace("HGMMA", "HMMA"), steps=9) == 12  # no step loop: as listed
    # a program of 4 blocks runs the block loop (0x10-0x80: 8 instructions) once a block and the
    # other 4 listed once: a quarter each
    assert issued_per_block(padded, steps=9, blocks_per_program=4) == 8 * 5 + 8 + 4 / 4


def test_programs_per_sm_takes_the_tightest_limit():
    assert programs_per_sm(registers=128, shared_bytes=48 * 1024, num_warps=4) == 4  # registers and smem: 4
    assert programs_per_sm(registers=255, shared_bytes=8 * 1024, num_warps=4) == 2  # 255 rounds up to 256 a thread
    assert programs_per_sm(registers=64, shared_bytes=100 * 1024, num_warps=4) == 2  # shared memory
    assert programs_per_sm(registers=32, shared_bytes=0, num_warps=8) == 8  # warps: 64 per SM
    assert programs_per_sm(registers=16, shared_bytes=0, num_warps=1) == 32  # programs: 32 per SM


def run_audit(tmp_path, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)  # the interpreter's kernels do not compile
    out = tmp_path / "audit.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.kernel_audit", "--jobs", "1", "--json", str(out), *args],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())["rows"], result.stdout


@pytest.mark.skipif(op_module.triton is None, reason="Triton is not importable here")
def test_forward_with_styles_on_w_keeps_the_wgmma_chain_and_nothing_spills(tmp_path):
    """The audit of the forward's tiles: every variant uses wgmma, fits and does not spill; with
    the styles applied to W no tile serialises its wgmma chain (the reason SCALE_WEIGHT exists:
    with them on A, ptxas serialises the 64-wide tiles)."""
    rows, stdout = run_audit(tmp_path, "--families", "forward, 3x3, unrefined", "--shapes", "128x64x64x4x3,64x64x64x4x3")
    assert "compiled for sm_90a" in stdout and len(rows) == 6  # styles on A, on W, TMA; two tiles
    assert [row["loads"] == "tma" for row in rows] == [False, False, False, False, True, True]
    for row in rows:
        assert row["wgmma"] and row["loads"] in ("cp.async", "tma") and row["fits"] and row["spill_bytes"] == 0, row
        assert row["programs_per_sm"] >= 2, row
    on_w = [row for row in rows if "styles on W" in row["launch"]]  # the pointer and the TMA variants
    assert len(on_w) == 4 and not any(row["serialized_wgmma"] for row in on_w)
    assert all(row["wgmma_ss"] > 0 and row["wgmma_rs"] == 0 for row in on_w)  # A straight from shared memory
    # each has a step loop with the tile's wgmma: 128 x 64 x 64 at 4 warps is 2 x 4 of 64x64x16
    for row in rows:
        assert row["loop_wgmma"] == (8 if row["tile"] == "128x64x64" else 4) and row["loop_instructions"] > 50, row


@pytest.mark.skipif(op_module.triton is None, reason="Triton is not importable here")
def test_box_summing_and_demodulation_kernels_do_not_spill(tmp_path):
    """The launches that sum a 3x3 box on the fly (the wide layers' low-rank input, the pixel
    products) and the demodulation's FMA dots once spilled hundreds of bytes a thread."""
    rows, _ = run_audit(tmp_path, "--families", "separate|pixel|demodulation", "--shapes", "128x64x64x4x3")
    launches = {row["launch"] for row in rows}
    assert any("separate" in name for name in launches) and any("pixel products" in name for name in launches)
    assert any(name.startswith("demodulation") for name in launches)
    for row in rows:
        assert row["spill_bytes"] == 0 and row["fits"], row


@pytest.mark.skipif(op_module.triton is None, reason="Triton is not importable here")
def test_token_product_launches_do_not_spill_and_the_32_channel_one_keeps_to_wgmma(tmp_path):
    """The grad-x launches that also sum the token gradients over 16 pixel blocks a program hold
    ~100 registers more than the plain grad-x launch: at the tiles `_products_blocks` gives them
    (the 512-1024 px layers) they must still fit without spills. The 4-warp alternatives the
    autotuner also times fit too; at 252-255 registers, they issue fewer instructions a pixel
    than the 8-warp tiles. At the 1024 px layer's 64 x 32 x 32 tile and the 8-warp 64 x 64 x 64
    one the step loop sums box(a) by wgmma, and the 4-warp 64 x 64 x 64 one sums grad p's
    products transposed: as u^T a (L = 32 rows) they were 8-16 mma.sync a step."""
    rows, _ = run_audit(tmp_path, "--families", "token products")
    tiles = {(row["tile"], row["warps"]) for row in rows}
    defaults = set()
    for n, k in [(32, 32), (64, 32), (64, 64)]:  # convs.15, convs.14, convs.12/13
        block_n, block_k, warps = op_module._products_blocks(n, k)
        defaults.add((f"64x{block_n}x{block_k}", warps))
        assert (f"64x{block_n}x{block_k}", warps) in tiles, (n, k, tiles)
    for row in rows:
        assert row["fits"] and row["programs_per_sm"] >= 1, row
        if (row["tile"], row["warps"]) in defaults:
            assert row["spill_bytes"] == 0, row
    by_tile = {(row["launch"], row["tile"], row["warps"]): row["issued_per_pixel"] for row in rows}
    for (launch, tile, warps), issued in by_tile.items():
        if warps == 8:
            assert by_tile[(launch, tile, 4)] < issued, (launch, tile)
    narrow = [row for row in rows if row["tile"] == "64x32x32"]
    assert narrow and all(row["loop_mma_sync"] == 0 and row["loop_wgmma"] == 6 for row in narrow), narrow
    # the tiles that sum box(a) by wgmma (`_box_by_mma`: 64 x 64 x 64 at 8 warps too) and those
    # whose 64-channel K block takes grad p's products transposed (a^T u) have no mma.sync left
    # in the step loop; only the 64 x 64 x 32 tiles keep grad p's u^T a (16 a step)
    boxed = {row["tile"] for row in rows if op_module._box_by_mma(True, *map(int, row["tile"].split("x")), row["warps"])}
    assert {"64x32x32", "64x64x64"} <= boxed, boxed
    for row in rows:
        block_m, block_n, block_k = map(int, row["tile"].split("x"))
        by_wgmma = op_module._box_by_mma(True, block_m, block_n, block_k, row["warps"]) or block_k >= 64
        assert (row["loop_mma_sync"] == 0) == by_wgmma, row


@pytest.mark.skipif(op_module.triton is None, reason="Triton is not importable here")
def test_memory_bound_loops_load_by_cp_async_and_the_audit_runs_in_workers(tmp_path):
    """Since session 27 the epilogue backward's block loop and the pixel products' loops are
    `tl.range(..., num_stages=LOAD_STAGES)` loops, whose loads Triton turns into asynchronous
    copies issued ahead (a plain loop without a dot loads each iteration's values when it
    starts). Compiled as a real launch specialises them (strides divisible by 16), in two worker
    processes: the skip-upsample cases once could not be sent to one."""
    rows, _ = run_audit(tmp_path, "--families", "epilogue backward|pixel products|skip upsample", "--jobs", "2")
    by_launch = {row["launch"]: row for row in rows}
    pipelined = [name for name in by_launch if name.startswith("pixel products")] + [
        "epilogue backward", "epilogue backward + toRGB adjoint", "epilogue backward + toRGB adjoint, no grad",
    ]  # fmt: skip
    assert len(pipelined) == 7 and any(name.startswith("skip upsample") for name in by_launch), sorted(by_launch)
    for name in pipelined:
        row = by_launch[name]
        assert row["loads"] == "cp.async" and row["spill_bytes"] == 0 and row["programs_per_sm"] >= 4, row


def test_tap_load_width_follows_the_triton_version(monkeypatch):
    for version, expected in (((3, 6), 8), ((3, 8), 8), ((3, 9), 16), ((4, 0), 16)):
        assert op_module._default_tap_load_bytes(version) == expected, version
    assert op_module.TAP_LOAD_BYTES == op_module._default_tap_load_bytes(op_module._triton_version())
    monkeypatch.setattr(op_module, "TAP_LOAD_BYTES", 8)
    assert (op_module._tap_vector(2), op_module._tap_vector(4)) == (4, 2)
    monkeypatch.setattr(op_module, "TAP_LOAD_BYTES", 16)
    assert op_module._tap_vector(2) == 0
    monkeypatch.setattr(op_module, "TAP_LOAD_BYTES", 12)
    with pytest.raises(ValueError, match="TAP_LOAD_BYTES"):
        op_module._tap_vector(2)


INPUT_COPIES = r"""
import json, re, sys
from refinestyle_kernels.ops import modulated_conv2d as op_module
op_module.TAP_LOAD_BYTES = int(sys.argv[1])  # before the audit's cases read it
from benchmarks.kernel_audit import FAMILIES, OTHER_KERNELS, compile_conv_for_hopper
family = next(family for family in FAMILIES if family.name.startswith("forward, 3x3, unrefined"))
(flags,) = [flags for label, flags in family.variants() if "W" in label and "TMA" not in label]
products = next(case for case in OTHER_KERNELS if case.label.startswith("pixel products M = box(x)^T g"))
# cp.async.ca.shared.global [ %r17 + 0 ], [ %rd14 + 0 ], 0x8, %r38;
pattern = r"cp\.async\.(c[ag])\.shared\.global\S* \[[^\]]+\], \[[^\]]+\], (0x[0-9a-f]+|\d+)"
found = {}
for name, kernel in (("conv", compile_conv_for_hopper(flags, (128, 32, 32, 4, 3), grid_w=1024)), ("products", products.compile())):
    found[name] = sorted({(kind, int(size, 0)) for kind, size in re.findall(pattern, kernel.asm["ptx"])})
print(json.dumps(found))
"""


@pytest.mark.skipif(op_module.triton is None, reason="Triton is not importable here")
@pytest.mark.parametrize("load_bytes", [8, 16])
def test_tap_loads_are_copied_through_l1(load_bytes):
    """The tiles a box's nine taps re-read overlap (the conv's input tile, the pixel products'
    boxed tile): their asynchronous copies must be the L1-caching `.ca` kind. At 8 bytes a copy
    every Triton emits `.ca`; at 16 bytes Triton 3.9 does, while 3.6 emits `.cg` (L2 only),
    which is why the op copies 8 bytes there (`TAP_LOAD_BYTES`)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)  # the interpreter's kernels do not compile
    result = subprocess.run([sys.executable, "-c", INPUT_COPIES, str(load_bytes)], env=env, capture_output=True,
                            text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    for name, pairs in found.items():
        widths = {tuple(pair) for pair in pairs}
        if load_bytes == 8 or op_module._triton_version() >= (3, 9):
            assert ("ca", load_bytes) in widths, (name, widths)
        else:
            assert ("cg", 16) in widths and not any(kind == "ca" for kind, _ in widths), (name, widths)


@pytest.mark.skipif(op_module.triton is None, reason="Triton is not importable here")
def test_epilogue_backward_loops_sum_across_threads_only_once_a_program(tmp_path):
    """The epilogue backward's block loop (with the toRGB's adjoint, and with the token products
    M) keeps every sum's terms unreduced until its last block: summed a block, the toRGB's
    sums cost 24-120 SHFL a trip, and the loop issued 1.9x the plain one's instructions a value."""
    rows, _ = run_audit(tmp_path, "--families", "epilogue backward", "--jobs", "2")
    by_launch = {row["launch"]: row for row in rows}
    assert len(by_launch) == 7, sorted(by_launch)  # plain, + toRGB (2), + toRGB + M (3), + blur^T
    for name, row in by_launch.items():
        assert row["loop_shuffles"] == 0 and row["issued_per_value"] > 0, row
    plain = by_launch["epilogue backward"]["issued_per_value"]
    assert by_launch["epilogue backward + toRGB adjoint"]["issued_per_value"] < 1.5 * plain
