"""What ptxas makes of each Triton kernel for the H100, without a GPU.

    python -m benchmarks.kernel_audit                  # the headline layers' launches, a few tiles
    python -m benchmarks.kernel_audit --shapes all     # every tile the autotuner may try (minutes)
    python -m benchmarks.kernel_audit --markdown       # the table for BENCHMARKS.md

Triton compiles for a GPU it does not have: source -> TTGIR -> PTX -> cubin, with the ptxas it
ships. For every launch family of a config-f training step in bf16 (the forward of a plain and
of an upsampling layer, refined or not, with the styles applied to the A or to the W tile, and
with pointer or TMA loads where TMA applies; grad x of both) and for each tile config, this
compiles `_conv_gemm_kernel` for sm_90a, and the op's other kernels (pixel products, blur,
epilogue backward, demodulation) with their launchers' blocks, and reports what decides their
speed before any timing does:

- shared memory per program, and registers and spills per thread (from `ptxas -v`);
- whether the dots became Hopper wgmma instructions, with A from shared memory (SS) or from
  registers (RS), and whether the main loop's loads are asynchronous copies or TMA;
- ptxas's C7515 note: the wgmma chain serialised because non-wgmma instructions write its
  accumulator registers. It appears when A is scaled in registers (an RS wgmma) for some tiles;
- programs per SM that registers, shared memory and warps allow (the H100's limits);
- the step loop's SASS (instructions a warp issues a trip, and the wgmma among them), and for
  the families that name their K, the warp instructions a pixel issues in all (a pixel block's
  instructions x warps / pixels): at the 32-64 channel layers the issue rate, not the tensor
  cores, bounds the conv;
- for the memory-bound loops (blur, epilogue backward, epilogue products) their innermost
  loop: its instructions, its cross-thread shuffles, and the warp instructions a value issues
  (`/v` in the table), which at 1-2 a value decide whether the H100 can issue them as fast as
  it moves their bytes.

It makes no speed claim: timings come from `python -m benchmarks` on a GPU. It says which
configs can be fast, and catches a kernel change that spills or serialises its MMAs.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile

from refinestyle_kernels.ops import modulated_conv2d as op_module
from refinestyle_kernels.ops import upsample_add as upsample_module

# the H100 (sm_90) per-SM and per-program limits the occupancy estimate uses
H100_REGISTERS_PER_SM = 65536
H100_SHARED_MEMORY_PER_SM = 233472  # 228 KB
H100_SHARED_MEMORY_PER_PROGRAM = 232448  # 227 KB, the opt-in maximum
H100_WARPS_PER_SM = 64
H100_PROGRAMS_PER_SM = 32
SHARED_MEMORY_RESERVED_PER_PROGRAM = 1024  # what the runtime keeps per block

# the argument names of `_conv_gemm_kernel` that are pointers
CONV_POINTERS = ("a_ptr", "a_scale_ptr", "w_ptr", "z_ptr", "r_ptr", "q_ptr", "alpha_ptr", "beta_ptr", "out_ptr",
                 "noise_ptr", "noise_strength_ptr", "bias_ptr", "x_ptr", "reduce_ptr", "rgb_mix_ptr", "rgb_bias_ptr",
                 "rgb_ptr", "grad_p_ptr", "grad_q_ptr")  # fmt: skip
# always fp32, whatever the activations' dtype (z, the projected input, is in theirs)
CONV_FP32_POINTERS = ("alpha_ptr", "beta_ptr", "reduce_ptr", "noise_strength_ptr", "rgb_mix_ptr", "grad_p_ptr",
                      "grad_q_ptr")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Family:
    """One kind of `_conv_gemm_kernel` launch: its constexpr flags, as the op sets them."""

    name: str
    flags: dict
    grid_w: int  # the pixel grid's width at 1024 px, for the pixel block's width
    # the only tiles audited, instead of any --shapes: the token-product launches' (fixed by
    # `_products_blocks`, not autotuned), the one-K-block forward's (the 32-channel layer's)
    shapes: tuple = ()
    # the launch's input channels K, where the audit estimates what a pixel block issues
    # (`issued_per_block`; the steps are the K blocks x taps); the families whose one K block
    # holds every input channel (SINGLE_K_BLOCK) take K from each tile's BLOCK_K
    k: int | None = None

    def variants(self) -> list[tuple[str, dict]]:
        """(label, flags) for each variant the autotuner tries: the styles on A or on W, and for
        stride-1 launches the TMA loads (with the styles on W)."""
        scaled = self.flags["HAS_A_SCALE"]
        if not scaled:
            found = [(self.name, dict(self.flags, SCALE_WEIGHT=False, A_TMA=False))]
        else:
            found = [(f"{self.name}, styles on {where}", dict(self.flags, SCALE_WEIGHT=on_w, A_TMA=False))
                     for where, on_w in (("A", False), ("W", True))]  # fmt: skip
        if self.flags["MODE"] == 0:
            found.append((f"{self.name}, TMA" + (", styles on W" if scaled else ""),
                          dict(self.flags, SCALE_WEIGHT=scaled, A_TMA=True)))  # fmt: skip
        return found


_COMMON = dict(KSIZE=3, HAS_CLAMP=False, INPUT_PRECISION=None, BLOCK_L=32, RGB_CHANNELS=0, HAS_RGB_BIAS=False,
               HAS_RGB_CLAMP=False, TOKEN_PRODUCTS=False, TILES_PER_PROGRAM=1)  # fmt: skip
_STYLED_EPILOGUE = dict(HAS_NOISE=True, HAS_BIAS=True, ACTIVATE=True)
_NO_EPILOGUE = dict(HAS_NOISE=False, HAS_BIAS=False, ACTIVATE=False)

# the launches of a config-f training step with L = 32 per-sample tokens (docs/kernels.md)
FAMILIES = (
    Family("forward, 3x3, L=32 fused", dict(_COMMON, **_STYLED_EPILOGUE, MODE=0, HAS_A_SCALE=True, HAS_LOWRANK=True,
                                            BOX_Z=True, FUSE_PROJECTION=True, REDUCE_X=False), 1024),
    # a block's last conv with its toRGB in the epilogue (the autotuner keeps N tiles of all Cout)
    Family("forward + toRGB, 3x3, L=32 fused", dict(_COMMON, **_STYLED_EPILOGUE, MODE=0, HAS_A_SCALE=True,
                                                    HAS_LOWRANK=True, BOX_Z=True, FUSE_PROJECTION=True,
                                                    REDUCE_X=False, RGB_CHANNELS=3, HAS_RGB_BIAS=True), 1024),
    # the 1024 px layer (32 channels): one K block, the projection and style tiles loaded once
    Family("forward + toRGB, 3x3, L=32 fused, one K block", dict(_COMMON, **_STYLED_EPILOGUE, MODE=0, HAS_A_SCALE=True,
                                                                 HAS_LOWRANK=True, BOX_Z=True, FUSE_PROJECTION=True,
                                                                 REDUCE_X=False, RGB_CHANNELS=3, HAS_RGB_BIAS=True,
                                                                 SINGLE_K_BLOCK=True), 1024,
           shapes=((64, 32, 32, 4, 3), (128, 32, 32, 4, 3), (256, 32, 32, 4, 3), (256, 32, 32, 8, 3)), k=32),
    Family("forward, 3x3, unrefined", dict(_COMMON, **_STYLED_EPILOGUE, MODE=0, HAS_A_SCALE=True, HAS_LOWRANK=False,
                                           BOX_Z=True, FUSE_PROJECTION=False, REDUCE_X=False), 1024),
    Family("forward, upsampling, L=32 fused", dict(_COMMON, **_NO_EPILOGUE, MODE=2, HAS_A_SCALE=True, HAS_LOWRANK=True,
                                                   BOX_Z=True, FUSE_PROJECTION=True, REDUCE_X=False), 513),
    Family("forward, 3x3, L=32 separate z", dict(_COMMON, **_STYLED_EPILOGUE, MODE=0, HAS_A_SCALE=True,
                                                 HAS_LOWRANK=True, BOX_Z=True, FUSE_PROJECTION=False,
                                                 REDUCE_X=False), 64),
    Family("grad x, 3x3, L=32 fused", dict(_COMMON, **_NO_EPILOGUE, MODE=0, HAS_A_SCALE=False, HAS_LOWRANK=True,
                                           BOX_Z=True, FUSE_PROJECTION=True, REDUCE_X=True), 1024),
    # the fused route's grad x of the 512-1024 px layers, which also sums the token gradients
    # (one K block: BLOCK_K = Cout; 16 pixel blocks a program)
    Family("grad x + token products, 3x3, L=32 fused", dict(_COMMON, **_NO_EPILOGUE, MODE=0, HAS_A_SCALE=False,
                                                           HAS_LOWRANK=True, BOX_Z=True, FUSE_PROJECTION=True,
                                                           REDUCE_X=True, TOKEN_PRODUCTS=True, TILES_PER_PROGRAM=16, SINGLE_K_BLOCK=True),
           1024, shapes=((64, 32, 32, 4, 3), (64, 64, 32, 8, 3), (64, 64, 64, 8, 3), (64, 64, 32, 4, 3), (64, 64, 64, 4, 3))),
    Family("grad x + token products, stride 2, L=32 fused", dict(_COMMON, **_NO_EPILOGUE, MODE=1, HAS_A_SCALE=False,
                                                                HAS_LOWRANK=True, BOX_Z=True, FUSE_PROJECTION=True,
                                                                REDUCE_X=True, TOKEN_PRODUCTS=True,
                                                                TILES_PER_PROGRAM=16, SINGLE_K_BLOCK=True), 512,
           shapes=((64, 64, 32, 8, 3), (64, 64, 64, 8, 3), (64, 64, 32, 4, 3), (64, 64, 64, 4, 3))),
    Family("grad x, stride 2, L=32 separate gz", dict(_COMMON, **_NO_EPILOGUE, MODE=1, HAS_A_SCALE=False,
                                                      HAS_LOWRANK=True, BOX_Z=True, FUSE_PROJECTION=False,
                                                      REDUCE_X=True), 64),
)

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) audited by default: the big square tile,
# the tiles of the 64- and 32-channel layers, and the tile of launches that are not autotuned
DEFAULT_SHAPES = ((128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (128, 32, 64, 4, 3), (64, 64, 64, 4, 3))


def compile_for_hopper(fn, pointers: dict, constexprs: dict, num_warps: int, num_stages: int, divisible=()):
    """Compile a @triton.jit function for sm_90 without a GPU; returns Triton's compiled kernel.

    fn: the kernel. pointers: argument name -> Triton pointer type ("*bf16") for every pointer
    argument; other arguments are i32 (fp32 for `clamp_value`, `scale`, `alpha_scale`, `eps` and
    `taps`).
    constexprs: every constexpr argument's value. divisible: arguments the JIT would see as
    divisible by 16 at a real launch (16-byte aligned pointers, channel counts): without the
    hint 2-byte loads are too narrow for asynchronous copies.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not isinstance(fn, triton.runtime.jit.JITFunction) or type(fn).__name__ == "InterpretedFunction":
        raise RuntimeError(
            f"{getattr(fn, '__name__', fn)} was made by Triton's interpreter (TRITON_INTERPRET=1 at import): "
            "compile in a process without it"
        )

    scalars = {"clamp_value": "fp32", "rgb_clamp_value": "fp32", "scale": "fp32", "alpha_scale": "fp32", "eps": "fp32",
               "taps": "fp32"}  # fmt: skip
    signature = {
        name: "constexpr" if name in constexprs else pointers.get(name, scalars.get(name, "i32"))
        for name in fn.arg_names
    }
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    source = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", 90, 32)
    return triton.compile(source, target=target, options={"num_warps": num_warps, "num_stages": num_stages})


def compile_conv_for_hopper(flags: dict, shape: tuple, dtype: str = "bf16", grid_w: int = 1024):
    """`compile_for_hopper` for `_conv_gemm_kernel`: flags as `Family.flags` (with SCALE_WEIGHT),
    shape (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), activations of Triton type dtype."""
    block_m, block_n, block_k, warps, stages = shape
    tma = flags.get("A_TMA", False)
    # A's copy width as the op would launch it under this Triton (`TAP_LOAD_BYTES`)
    a_vector = op_module._tap_vector(4 if dtype == "fp32" else 2)
    # config-f's channel counts are whole numbers of every tile here; one K block holding every
    # input channel (SINGLE_K_BLOCK) only where the family says so; box(a) by wgmma where the op
    # would sum it so (`_box_by_mma`); flags may override any of these
    constexprs = dict(A_VECTOR=a_vector, EVEN_K=True, EVEN_N=True, SINGLE_K_BLOCK=False,
                      BOX_BY_MMA=op_module._box_by_mma(flags["TOKEN_PRODUCTS"], block_m, block_n, block_k, warps))
    constexprs.update(flags, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                      TILE_W=block_m if tma else op_module._tile_width(block_m, grid_w))  # fmt: skip
    pointers = {name: "*fp32" if name in CONV_FP32_POINTERS else f"*{dtype}" for name in CONV_POINTERS}
    if not flags["HAS_A_SCALE"]:  # a grad-x launch: alpha is the styles, in the activations' dtype
        pointers["alpha_ptr"] = f"*{dtype}"
    # the input's TMA descriptor: [B, H, W, K] in row strips of BLOCK_M pixels
    pointers["a_desc"] = f"tensordesc<{dtype}[1, 1, {block_m}, {block_k}]>" if tma else f"*{dtype}"
    fn = op_module._conv_gemm_kernel
    divisible = [name for name in fn.arg_names if name.endswith("_ptr") or name in ("K", "N", "L", "stride_rb", "stride_qb")]
    return compile_for_hopper(fn, pointers, constexprs, warps, stages, divisible)


@dataclasses.dataclass
class PtxasReport:
    """What `ptxas -v` says about one kernel: per-thread registers, spill and stack bytes, and
    its performance notes (C7515: the wgmma chain serialised)."""

    registers: int
    spill_bytes: int  # spill stores + spill loads
    stack_bytes: int
    serialized_wgmma: bool  # ptxas note C7515 (or another "wgmma ... serialized" note)
    notes: list

    @classmethod
    def parse(cls, log: str) -> "PtxasReport":
        """Read `ptxas -v`'s log: registers, spills, stack frame and the performance notes."""
        registers = re.search(r"Used (\d+) registers", log)
        if registers is None:
            raise ValueError(f"no register count in the ptxas log:\n{log}")
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        stack = re.search(r"(\d+) bytes stack frame", log)
        notes = [line.strip() for line in log.splitlines() if "Performance Loss" in line or "warning" in line.lower()]
        return cls(
            registers=int(registers.group(1)),
            spill_bytes=int(spills.group(1)) + int(spills.group(2)) if spills else 0,
            stack_bytes=int(stack.group(1)) if stack else 0,
            serialized_wgmma=any("wgmma" in note and "serialized" in note for note in notes),
            notes=notes,
        )


def run_ptxas(ptx: str) -> PtxasReport:
    """Assemble PTX for sm_90a with the ptxas Triton uses, verbosely, and parse its log."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as handle:
            handle.write(ptx)
        result = subprocess.run(
            [get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", source, "-o", os.path.join(folder, "kernel.cubin")],
            capture_output=True, text=True,
        )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{result.stderr}")
    return PtxasReport.parse(result.stdout + result.stderr)


@dataclasses.dataclass(frozen=True)
class StepLoop:
    """The innermost loop of a kernel's SASS that issues wgmma (HGMMA): a conv launch's step
    loop. Its instructions per trip are what a warp issues per (K block, tap) step; at the small
    tiles of the 32-64 channel layers they, not the tensor cores, bound the step."""

    instructions: int  # SASS instructions in the loop body, the branch back included
    wgmma: int  # HGMMA instructions among them
    start: int = 0  # the addresses of its first instruction and of its branch back
    end: int = 0
    # Ampere-style HMMA (mma.sync) among them: a dot with fewer than 64 rows, which a Hopper
    # wgmma cannot take, and which costs its shared-memory loads (LDSM) besides
    mma_sync: int = 0

    @staticmethod
    def loops(sass: str) -> list[tuple[int, int, list[str]]]:
        """Every loop of a `cuobjdump -sass` listing: (first address, address of the backward
        branch, the instructions from the one to the other)."""
        code = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", re.MULTILINE)
        listing = [(int(address, 16), text) for address, text in code.findall(sass)]
        found = []
        for address, text in listing:
            branch = re.match(r"(?:@!?U?P\w+\s+)?BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
            if branch is None or int(branch.group(1), 16) >= address:
                continue
            start = int(branch.group(1), 16)
            found.append((start, address, [line for at, line in listing if start <= at <= address]))
        return found

    @classmethod
    def find(cls, sass: str) -> "StepLoop | None":
        """The shortest loop (a backward branch and what lies between its target and it) that
        holds an HGMMA, in `cuobjdump -sass` text; None if there is none."""
        best = None
        for start, end, body in cls.loops(sass):
            wgmma = sum(1 for line in body if re.search(r"\bHGMMA\b", line))
            if wgmma and (best is None or len(body) < best.instructions):
                mma_sync = sum(1 for line in body if re.search(r"\bHMMA\b", line))
                best = cls(instructions=len(body), wgmma=wgmma, start=start, end=end, mma_sync=mma_sync)
        return best


def issued_per_block(sass: str, steps: float, blocks_per_program: int = 1) -> float:
    """SASS instructions a warp issues for one pixel block of a conv launch that runs `steps`
    steps (K blocks x taps; for the transposed conv, its phases' average): every instruction of
    the kernel once, and its step loop `steps` - 1 times more (a loop the compiler unrolled is
    in the listing as often as it runs). A program that walks `blocks_per_program` pixel blocks
    (the token-product launches) runs the loop around the step loop once a block and the rest
    once: a block pays its share of the rest. An estimate: it counts both sides of every branch;
    it leaves the padding out (NOP, the closing branch to itself)."""
    code = re.findall(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", sass, re.MULTILINE)

    def padding(address: str, text: str) -> bool:  # NOP, or the end's unconditional branch to itself
        to_itself = re.fullmatch(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)\s*", text)
        return text.startswith("NOP") or (to_itself is not None and int(to_itself.group(1), 16) == int(address, 16))

    listed = len([text for address, text in code if not padding(address, text)])
    loop = StepLoop.find(sass)
    if loop is None:
        return listed
    per_block = (steps - 1) * loop.instructions
    # the block loop: the shortest loop around the step loop
    around = [body for start, end, body in StepLoop.loops(sass)
              if start <= loop.start and end >= loop.end and (start, end) != (loop.start, loop.end)]  # fmt: skip
    if blocks_per_program > 1 and around:
        block = len(min(around, key=len))
        return per_block + block + (listed - block) / blocks_per_program
    return per_block + listed


def sass_of(cubin: bytes) -> str:
    """The SASS of a cubin, by the cuobjdump Triton ships beside its ptxas."""
    from triton.backends.nvidia.compiler import get_ptxas

    tool = os.path.join(os.path.dirname(get_ptxas(90).path), "cuobjdump")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as handle:
            handle.write(cubin)
        result = subprocess.run([tool, "-sass", path], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"cuobjdump failed:\n{result.stderr[-2000:]}")
    return result.stdout


def programs_per_sm(registers: int, shared_bytes: int, num_warps: int) -> int:
    """Programs (thread blocks) one H100 SM holds at once, limited by registers (allocated per
    warp in units of 256), shared memory and warps."""
    registers_per_warp = -(-registers * 32 // 256) * 256
    by_registers = H100_REGISTERS_PER_SM // (registers_per_warp * num_warps)
    by_shared = H100_SHARED_MEMORY_PER_SM // (shared_bytes + SHARED_MEMORY_RESERVED_PER_PROGRAM)
    by_warps = H100_WARPS_PER_SM // num_warps
    return min(by_registers, by_shared, by_warps, H100_PROGRAMS_PER_SM)


@dataclasses.dataclass(frozen=True)
class OtherKernel:
    """A launch of one of the op's other kernels, with the blocks its launcher picks."""

    label: str
    kernel: str  # its name in `module`
    constexprs: dict
    pointers: dict  # pointer arguments that are not bf16
    num_warps: int = 4
    # the name of the op module holding it (a name, so that a case pickles to a --jobs worker);
    # None: refinestyle_kernels.ops.modulated_conv2d
    module: str | None = None
    # the constexprs whose product is the values one trip of its innermost loop covers (a pixel
    # block, or a row for the blur): with them the audit reports what a value issues
    values_per_trip: tuple[str, ...] = ()

    def compile(self):
        """Compile it as the JIT specialises a launch of the benchmarked shapes: pointers and
        channel counts divisible by 16, unit strides as given in `constexprs`, and every other
        stride divisible by 16 except the toRGB tensors' (3 channels). Without the strides'
        divisibility the loads look unaligned and narrow, and Triton would not pipeline them
        into asynchronous copies as it does at a real launch."""
        fn = getattr(importlib.import_module(self.module) if self.module else op_module, self.kernel)
        pointers = {name: self.pointers.get(name, "*bf16") for name in fn.arg_names if name.endswith("_ptr")}
        divisible = [
            name for name in fn.arg_names
            if name.endswith("_ptr") or name in ("N", "C", "L", "CIN", "COUT")
            or (name.startswith("stride_") and "rgb" not in name and name not in self.constexprs)
        ]  # fmt: skip
        return compile_for_hopper(fn, pointers, self.constexprs, self.num_warps, 3, divisible)


_FP32 = "*fp32"



# channels-last operands: the JIT specialises their unit channel strides
# (and the box's tap loads as wide as the op makes them under this Triton: `TAP_LOAD_BYTES`)
_PIXEL_PRODUCTS = dict(KSIZE=3, INPUT_PRECISION=None, BLOCK_P=64, LOAD_STAGES=op_module.LOAD_STAGES, stride_al=1, stride_bc=1,
                       TAP_VECTOR=op_module._tap_vector(2))
_DEMODULATION_POINTERS = dict.fromkeys(("s1_ptr", "s2_ptr", "demod_ptr", "energy_ptr", "u_ptr", "gp_ptr", "p_ptr",
                                        "q_ptr", "styles_ptr", "grad_demod_ptr", "grad_styles_ptr", "grad_p_ptr",
                                        "grad_q_ptr", "t_ptr", "c_ptr", "grad_energy_ptr"), _FP32)  # fmt: skip

# the memory-bound kernels of the same step, with the blocks of the 1024 px layers (64 channels)
OTHER_KERNELS = (
    OtherKernel("pixel products M = box(x)^T g, same box", "_pixel_products_kernel",
                dict(_PIXEL_PRODUCTS, BOX=0, BLOCK_L=64, BLOCK_C=64), dict(partial_ptr=_FP32)),
    OtherKernel("pixel products, upsampling M = (stride-2 box of g)^T x", "_pixel_products_kernel",
                dict(_PIXEL_PRODUCTS, BOX=1, BLOCK_L=32, BLOCK_C=64), dict(partial_ptr=_FP32)),
    OtherKernel("pixel products, stride-2 box (separate gz)", "_pixel_products_kernel",
                dict(_PIXEL_PRODUCTS, BOX=1, BLOCK_L=32, BLOCK_C=64), dict(partial_ptr=_FP32)),
    OtherKernel("pixel products, no box", "_pixel_products_kernel",
                dict(_PIXEL_PRODUCTS, BOX=-1, BLOCK_L=32, BLOCK_C=64, TAP_VECTOR=0), dict(partial_ptr=_FP32)),
    *(
        OtherKernel(label, "_blur_kernel",
                    # channels-last tensors: the JIT specialises their unit channel stride
                    dict(TAPS=4, EPILOGUE_BACKWARD=backward, INPUT_PRECISION=None, HAS_DEMOD=backward, HAS_NOISE=epilogue,
                         HAS_BIAS=epilogue, ACTIVATE=epilogue, HAS_CLAMP=False, PREFETCH=op_module.BLUR_PREFETCH,
                         stride_sn=1, stride_vn=1,
                         **dict(zip(("BLOCK_W", "BLOCK_N"), op_module._blur_blocks(8, 1024, 1024, 32, backward)[:2]))),
                    dict(taps_ptr=_FP32, noise_strength_ptr=_FP32, demod_ptr=_FP32, sums_ptr=_FP32),
                    values_per_trip=("BLOCK_W", "BLOCK_N"))
        for label, backward, epilogue in (("blur 4x4 + epilogue", False, True), ("epilogue backward + blur^T 4x4", True, True))
    ),
    OtherKernel("epilogue backward", "_epilogue_backward_kernel",
                dict(HAS_DEMOD=True, HAS_NOISE=True, HAS_BIAS=True, ACTIVATE=True, HAS_CLAMP=False, HAS_GRAD=True,
                     RGB_CHANNELS=0, RGB_CLAMP=False, LOAD_STAGES=op_module.LOAD_STAGES, stride_gn=1, stride_on=1,
                     stride_noise_w=1,
                     **dict(zip(("BLOCK_M", "BLOCK_N"), op_module._pointwise_blocks(512 * 512, 64, op_module.EPILOGUE_BACKWARD_BLOCK_VALUES))), BLOCK_RGB=1),
                dict(demod_ptr=_FP32, noise_strength_ptr=_FP32, sums_ptr=_FP32), values_per_trip=("BLOCK_M", "BLOCK_N")),
    *(
        # the last conv of a block with its toRGB's adjoint (1024 px: out feeds only the toRGB)
        OtherKernel(f"epilogue backward + toRGB adjoint{'' if has_grad else ', no grad'}", "_epilogue_backward_kernel",
                    dict(HAS_DEMOD=True, HAS_NOISE=True, HAS_BIAS=True, ACTIVATE=True, HAS_CLAMP=False,
                         HAS_GRAD=has_grad, RGB_CHANNELS=3, RGB_CLAMP=False, LOAD_STAGES=op_module.LOAD_STAGES,
                         stride_gn=1, stride_on=1, stride_noise_w=1,
                         **dict(zip(("BLOCK_M", "BLOCK_N"), op_module._pointwise_blocks(size * size, channels, op_module.EPILOGUE_BACKWARD_BLOCK_VALUES))),
                         BLOCK_RGB=4),
                    dict(demod_ptr=_FP32, noise_strength_ptr=_FP32, sums_ptr=_FP32, rgb_mix_ptr=_FP32),
                    values_per_trip=("BLOCK_M", "BLOCK_N"))
        for has_grad, size, channels in ((True, 512, 64), (False, 1024, 32))
    ),
    *(
        # the same with the token gradients' product M = box(x)^T g in the pass (fused route),
        # at 1024 px (32 channels, no output gradient), 512 px (64) and 256 px (128)
        OtherKernel(f"epilogue backward + toRGB adjoint + M, {channels} ch{'' if has_grad else ', no grad'}",
                    "_epilogue_products_kernel",
                    # channels-last tensors: the JIT specialises their unit channel strides
                    dict(HAS_DEMOD=True, HAS_NOISE=True, HAS_BIAS=True, ACTIVATE=True, HAS_CLAMP=False,
                         HAS_GRAD=has_grad, RGB_CHANNELS=3, RGB_CLAMP=False, KSIZE=3, INPUT_PRECISION=None,
                         stride_xc=1, stride_gn=1, stride_on=1,
                         **dict(zip(("BLOCK_P", "BLOCK_L", "BLOCK_N"), blocks[:3])), BLOCK_RGB=4),
                    dict(demod_ptr=_FP32, noise_strength_ptr=_FP32, sums_ptr=_FP32, partial_ptr=_FP32, rgb_mix_ptr=_FP32),
                    num_warps=blocks[3], values_per_trip=("BLOCK_P", "BLOCK_N"))
        for has_grad, channels in ((False, 32), (True, 64), (True, 128))
        for blocks in [op_module._epilogue_products_blocks(channels, channels)]
    ),
    *(
        # the backward as eager training runs it: adding into the conv's gradients of s, p, q
        # (and with its dots on the tensor cores, `DEMODULATION_PRECISION="tf32x3"`)
        OtherKernel(f"demodulation{' backward' if backward else ''}, L={rank}{', tf32x3' if precision == 'tf32x3' else ''}",
                    "_demodulation_backward_kernel" if backward else "_demodulation_kernel",
                    dict(HAS_TOKENS=True, HAS_RESIDUAL=False, **dict(zip(("BLOCK_O", "BLOCK_I", "BLOCK_L"), blocks[:3])),
                         DOT_PRECISION=precision,
                         **(dict(ACCUMULATE_STYLES=True, ACCUMULATE_TOKENS=True) if backward else {})),
                    _DEMODULATION_POINTERS, num_warps=blocks[3])
        for precision in ("ieee", "tf32x3") for rank in (32, 64) for backward in (False, True)
        for blocks in [op_module._demodulation_blocks(512, 512, rank, backward, precision)]
    ),
    # a 1024 px layer's per-program partials (L = 32, 32 channels), grad s, p and q finished
    # together in bf16 by one launch
    OtherKernel("sum of per-program partials (3 jobs)", "_sum_partials_kernel", dict(BLOCK_R=8, BLOCK_I=256),
                dict.fromkeys(("partial_ptr", "partial1_ptr", "partial2_ptr"), _FP32)),
    *(
        OtherKernel(f"demodulation{' backward' if backward else ''}, shared residual",
                    "_demodulation_backward_kernel" if backward else "_demodulation_kernel",
                    dict(HAS_TOKENS=False, HAS_RESIDUAL=True, **dict(zip(("BLOCK_O", "BLOCK_I", "BLOCK_L"), blocks[:3])),
                         DOT_PRECISION="ieee",
                         **(dict(ACCUMULATE_STYLES=True, ACCUMULATE_TOKENS=False) if backward else {})),
                    _DEMODULATION_POINTERS, num_warps=blocks[3])
        for backward in (False, True)
        for blocks in [op_module._demodulation_blocks(512, 512, 1, backward, "ieee")]
    ),
    # the toRGB skip's 2x upsample + add (contiguous output planes: unit column strides)
    OtherKernel("skip upsample + add, 4x4 taps", "_upsample_add_kernel",
                dict(UP=2, PAD=2, KH=4, KW=4, HAS_BASE=True, stride_xw=1,
                     **dict(zip(("BLOCK_H", "BLOCK_W"), upsample_module.FORWARD_BLOCK))),
                dict(taps_ptr=_FP32), module=upsample_module.__name__),
    OtherKernel("skip upsample backward (adjoint), 4x4 taps", "_upsample_add_backward_kernel",
                dict(UP=2, PAD=2, KH=4, KW=4, stride_gw=1, **dict(zip(("BLOCK_H", "BLOCK_W"), upsample_module.BACKWARD_BLOCK))),
                dict(taps_ptr=_FP32), module=upsample_module.__name__),
)


def audit_one(label: str, flags: dict, shape: tuple, grid_w: int, k: int | None = None) -> dict:
    """Compile one (family variant, tile) and return its row of the audit; with the launch's
    input channels k, also what a pixel block issues (`issued_per_block`)."""
    kernel = compile_conv_for_hopper(flags, shape, grid_w=grid_w)
    row = _row(label, "x".join(str(v) for v in shape[:3]), shape[3], shape[4], kernel)
    if k is None and flags.get("SINGLE_K_BLOCK"):
        k = shape[2]
    if k is not None:
        # the transposed conv's pixel blocks belong to one of four phases, which share the taps
        taps = flags["KSIZE"] ** 2 / (4 if flags["MODE"] == 2 else 1)
        steps = -(-k // shape[2]) * taps
        issued = issued_per_block(sass_of(kernel.asm["cubin"]), steps, flags.get("TILES_PER_PROGRAM", 1))
        # warp instructions a pixel issues: the block's warps over its pixels
        row.update(steps=steps, issued_per_pixel=round(issued * shape[3] / shape[0], 1))
    return row


def audit_other(case: OtherKernel) -> dict:
    """Compile one of the other kernels and return its row of the audit; for the memory-bound
    loops (`OtherKernel.values_per_trip`), also their innermost loop: its instructions, its
    cross-thread shuffles, and the warp instructions a value issues (`issued_per_value`)."""
    blocks = "x".join(str(value) for name, value in case.constexprs.items() if name.startswith("BLOCK_"))
    kernel = case.compile()
    row = _row(case.label, blocks, case.num_warps, 3, kernel)
    if case.values_per_trip:
        values = math.prod(case.constexprs[name] for name in case.values_per_trip)
        row.update(innermost_loop(sass_of(kernel.asm["cubin"]), case.num_warps, values))
    return row


def innermost_loop(sass: str, warps: int, values: int) -> dict:
    """The shortest loop of a SASS listing, taken as one trip over `values` values by `warps`
    warps: its instructions (`loop_instructions`), its SHFL (`loop_shuffles`: sums across the
    threads, which a loop that keeps its sums unreduced until the end has none) and the warp
    instructions a value issues in it (`issued_per_value`). The rest of the kernel, run once a
    program, is left out."""
    loops = StepLoop.loops(sass)
    if not loops:
        return dict(loop_instructions=None, loop_shuffles=None, issued_per_value=None)
    body = min((body for start, end, body in loops), key=len)
    shuffles = sum(1 for line in body if re.search(r"\bSHFL\.", line))
    return dict(loop_instructions=len(body), loop_shuffles=shuffles, issued_per_value=round(len(body) * warps / values, 2))


def _row(label: str, tile: str, warps: int, stages: int, kernel) -> dict:
    ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
    report = run_ptxas(ptx)
    shared = kernel.metadata.shared
    loop = StepLoop.find(sass_of(kernel.asm["cubin"])) if "wgmma.mma_async" in ptx else None
    return dict(
        launch=label,
        tile=tile,
        warps=warps,
        stages=stages,
        shared_kib=round(shared / 1024, 1),
        registers=report.registers,
        spill_bytes=report.spill_bytes,
        wgmma="wgmma.mma_async" in ptx,
        # wgmma instructions by where A comes from: shared memory (SS) or registers (RS: an
        # operand built in registers, such as a scaled input tile or a projected low-rank input)
        wgmma_ss=len(re.findall(r"wgmma\.mma_async\S* \{[^}]*\}, %rd", ptx)),
        wgmma_rs=len(re.findall(r"wgmma\.mma_async\S* \{[^}]*\}, \{", ptx)),
        # how the main loop's tiles arrive: TMA bulk copies, asynchronous copies, or plain loads
        loads="tma" if "async_tma_copy_global_to_local" in ttgir else
              "cp.async" if "async_copy_global_to_local" in ttgir else "sync",
        serialized_wgmma=report.serialized_wgmma,
        # the step loop's SASS: instructions a warp issues per trip, the wgmma and mma.sync among them
        loop_instructions=loop.instructions if loop else None,
        loop_wgmma=loop.wgmma if loop else None,
        loop_mma_sync=loop.mma_sync if loop else None,
        programs_per_sm=programs_per_sm(report.registers, shared, warps),
        fits=shared <= H100_SHARED_MEMORY_PER_PROGRAM,
    )


def audit(families=FAMILIES, shapes=DEFAULT_SHAPES, others=OTHER_KERNELS, jobs: int = 1, progress: bool = True):
    """Audit every (family variant, shape) of the conv kernel and every other kernel, in `jobs`
    processes. Returns one dict per compiled kernel, in a stable order."""
    tasks = [(audit_one, (label, flags, shape, family.grid_w, family.k)) for family in families
             for label, flags in family.variants()
             for shape in (family.shapes or shapes)]  # fmt: skip
    tasks += [(audit_other, (case,)) for case in others]
    rows: list = [None] * len(tasks)
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), desc="compiling for sm_90a", disable=not progress, file=sys.stderr)
    if jobs <= 1:
        for index, (function, task) in enumerate(tasks):
            rows[index] = function(*task)
            bar.update()
    else:
        with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
            futures = {pool.submit(function, *task): index for index, (function, task) in enumerate(tasks)}
            for future in concurrent.futures.as_completed(futures):
                rows[futures[future]] = future.result()
                bar.update()
    bar.close()
    return rows


def _loop_cell(row: dict) -> str:
    """The conv's step loop as SASS / wgmma (+ mma.sync, if any); a memory-bound kernel's
    innermost loop as SASS."""
    if not row.get("loop_instructions"):
        return ""
    if not row.get("loop_wgmma"):
        return str(row["loop_instructions"])
    mma_sync = f" + {row['loop_mma_sync']} mma.sync" if row.get("loop_mma_sync") else ""
    return f"{row['loop_instructions']} / {row['loop_wgmma']}{mma_sync}"


def _issued_cell(row: dict) -> str:
    """Warp instructions issued a pixel (the conv launches) or a value (`/v`, the memory-bound loops)."""
    if row.get("issued_per_pixel"):
        return str(row["issued_per_pixel"])
    return f"{row['issued_per_value']}/v" if row.get("issued_per_value") else ""


def _wgmma_cell(row: dict) -> str:
    return f"{row['wgmma_ss']}/{row['wgmma_rs']}" if row["wgmma"] else "none"


def markdown(rows: list[dict]) -> str:
    """The audit's rows (as `audit` returns them) as a markdown table."""
    lines = [
        "| launch | tile MxNxK | warps | stages | smem KiB | regs | spills B | loads | wgmma SS/RS | serialised | "
        "loop: SASS / wgmma (+ mma.sync) | issued a pixel (/v: a value) | programs/SM |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        loop = _loop_cell(row) or "—"
        lines.append(
            f"| {row['launch']} | {row['tile']} | {row['warps']} | {row['stages']} | {row['shared_kib']} | "
            f"{row['registers']} | {row['spill_bytes']} | {row['loads']} | {_wgmma_cell(row)} | "
            f"{'SERIALISED' if row['serialized_wgmma'] else 'no'} | {loop} | {_issued_cell(row) or '—'} | "
            f"{row['programs_per_sm']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="default",
                        help="default: four representative tiles; all: every tile in the autotuner's list; or "
                             "tiles as MxNxKxWARPSxSTAGES, comma-separated (128x64x64x4x3)")
    parser.add_argument("--families", default="", help="only the launches whose name contains this text (or one of several, separated by |)")
    parser.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)), help="compiler processes")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table instead of plain text")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("TRITON_INTERPRET=1 makes the kernels interpreter functions, which do not compile: unset it")

    if op_module.triton is None:
        parser.error("Triton is not importable here")
    if args.shapes in ("default", "all"):
        shapes = tuple(op_module._CONV_SHAPES) if args.shapes == "all" else DEFAULT_SHAPES
    else:
        try:
            shapes = tuple(tuple(int(v) for v in spec.split("x")) for spec in args.shapes.split(","))
        except ValueError:
            shapes = ()
        if not shapes or any(len(shape) != 5 for shape in shapes):
            parser.error(f"--shapes: expected default, all or MxNxKxWARPSxSTAGES[,...], got {args.shapes!r}")
    wanted = args.families.split("|")
    families = [family for family in FAMILIES if any(part in family.name for part in wanted)]
    others = [case for case in OTHER_KERNELS if any(part in case.label for part in wanted)]
    if not families and not others:
        names = [family.name for family in FAMILIES] + [case.label for case in OTHER_KERNELS]
        parser.error(f"no launch matches {args.families!r}; they are: " + "; ".join(names))
    import triton

    rows = audit(families, shapes, others, jobs=args.jobs)
    print(f"Triton {triton.__version__}, compiled for sm_90a (H100) without a GPU; bf16 activations")
    if args.markdown:
        print(markdown(rows))
    else:
        header = (f"{'launch':<48} {'tile':>10} {'w':>2} {'st':>2} {'smem KiB':>8} {'regs':>4} {'spill':>5} "
                  f"{'loads':>8} {'wgmma SS/RS':>11} {'serialised':>10} {'loop SASS/wgmma':>26} {'issued':>7} "
                  f"{'prog/SM':>7}")  # fmt: skip
        print(header)
        for row in rows:
            print(f"{row['launch']:<48} {row['tile']:>10} {row['warps']:>2} {row['stages']:>2} {row['shared_kib']:>8} "
                  f"{row['registers']:>4} {row['spill_bytes']:>5} {row['loads']:>8} {_wgmma_cell(row):>11} "
                  f"{'SERIALISED' if row['serialized_wgmma'] else 'no':>10} "
                  f"{_loop_cell(row) or '-':>26} {_issued_cell(row) or '-':>7} {row['programs_per_sm']:>7}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(dict(triton=triton.__version__, target="sm_90a", rows=rows), handle, indent=1)
    bad = [row for row in rows if row["spill_bytes"] or not row["fits"]]
    if bad:
        print(f"{len(bad)} configs spill registers or overflow shared memory", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
