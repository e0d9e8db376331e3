"""Random inputs for the op's tests, and an independent per-sample implementation of the literal formula.

`literal_per_sample` is written without the op's code (one plain conv per sample,
rosinality's upsampling conv spelled out), so the reference backend is itself checked.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode


@dataclass
class Case:
    batch: int
    in_channels: int
    out_channels: int
    height: int
    width: int
    kernel: int
    upsample: bool
    tokens: str | None  # None, "shared" or "per_sample"
    num_tokens: int = 4
    demodulate: bool = True

    @property
    def out_size(self):
        factor = 2 if self.upsample else 1
        return self.height * factor, self.width * factor

    def __str__(self):
        return (
            f"B{self.batch}-{self.in_channels}to{self.out_channels}-{self.height}x{self.width}-k{self.kernel}"
            f"{'-up' if self.upsample else ''}-{self.tokens or 'notok'}-L{self.num_tokens}"
            f"{'' if self.demodulate else '-nodemod'}"
        )


def make_inputs(case: Case, dtype=torch.float64, seed: int = 0, epilogue: bool = True) -> dict:
    """Fresh random inputs (never zeros) for a case, as keyword arguments of styled_conv2d."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    inputs = {
        "x": rand(case.batch, case.in_channels, case.height, case.width),
        "weight": rand(case.out_channels, case.in_channels, case.kernel, case.kernel),
        "styles": rand(case.batch, case.in_channels) + 1.0,
        "p": None,
        "q": None,
    }
    # token magnitudes comparable to the modulated kernel's, so the residual matters
    token_scale = 1.0 / math.sqrt(case.num_tokens * case.in_channels) ** 0.5
    if case.tokens == "shared":
        inputs["p"] = rand(case.num_tokens, case.out_channels, scale=token_scale)
        inputs["q"] = rand(case.num_tokens, case.in_channels, scale=token_scale)
    elif case.tokens == "per_sample":
        inputs["p"] = rand(case.batch, case.num_tokens, case.out_channels, scale=token_scale)
        inputs["q"] = rand(case.batch, case.num_tokens, case.in_channels, scale=token_scale)
    if epilogue:
        inputs["noise"] = rand(case.batch, 1, *case.out_size)
        inputs["noise_strength"] = rand(1, scale=0.5)
        inputs["bias"] = rand(case.out_channels, scale=0.5)
    return inputs


def literal_per_sample(x, weight, styles, p=None, q=None, *, demodulate=True, upsample=False, eps=1e-8,
                       noise=None, noise_strength=None, bias=None, activate=False, clamp=None):
    """The layer computed one sample at a time with an explicitly built kernel (rosinality's math)."""
    out_channels, in_channels, k, _ = weight.shape
    scale = 1 / math.sqrt(in_channels * k * k)
    outputs = []
    for b in range(x.shape[0]):
        kernel = scale * weight * styles[b].reshape(1, -1, 1, 1)
        if p is not None:
            pb = p[b] if p.ndim == 3 else p
            qb = q[b] if q.ndim == 3 else q
            kernel = kernel + (pb.t() @ qb)[:, :, None, None]
        if demodulate:
            kernel = kernel / torch.sqrt(kernel.pow(2).sum(dim=(1, 2, 3), keepdim=True) + eps)
        xb = x[b : b + 1]
        if upsample:
            y = F.conv_transpose2d(xb, kernel.transpose(0, 1), stride=2)
            taps = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=x.dtype)
            fir = torch.outer(taps, taps)
            fir = fir / fir.sum() * 4
            y = F.pad(y, (1, 1, 1, 1))
            y = F.conv2d(y, fir.flip([0, 1]).expand(out_channels, 1, 4, 4), groups=out_channels)
        else:
            y = F.conv2d(xb, kernel, padding=k // 2)
        outputs.append(y)
    y = torch.cat(outputs)
    if noise is not None:
        y = y + noise_strength * noise
    if bias is not None:
        y = y + bias.reshape(1, -1, 1, 1)
    if activate:
        y = F.leaky_relu(y, 0.2) * math.sqrt(2)
    if clamp is not None:
        y = y.clamp(-clamp, clamp)
    return y


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "output has NaN/inf (unwritten or broken elements)"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


class RecordedOps(TorchDispatchMode):
    """`with RecordedOps() as ops:` lists in ops.names the aten ops (names without overload) that
    the block dispatches: what a test of launch counts compares."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def bound_between_values_near_the_median(values: torch.Tensor) -> float | None:
    """A clamp bound halfway between the two middle |values|: it binds on about half of them and
    no value lies on it, where the gradient would depend on how each side rounded. None (no
    clamp) for a single value, which no bound can split."""
    ordered = values.detach().abs().flatten().sort().values
    if ordered.numel() < 2:
        return None
    middle = ordered.numel() // 2
    return 0.5 * (ordered[middle - 1] + ordered[middle]).item()


# The op module's route switches and launch-shape limits (each used on its own by a hand-written
# test), with the values that send a small layer down each route: `random_routes` draws them.
ROUTE_CHOICES = {
    "FUSED_PROJECTION_MAX_COUT": (0, 128),  # the projection z = q x fused into the conv, or its own GEMM
    "EPILOGUE_PRODUCTS_MAX_CHANNELS": (0, 128),  # the token products in the epilogue backward
    "CONV_TOKEN_PRODUCTS_MAX_K": (0, 64),  # ... or summed by the grad-x conv
    "CONV_PRODUCTS_MAX_TILES": (1, 3, 16),  # pixel blocks a token-product program walks
    "CONV_PRODUCTS_MIN_PROGRAMS": (1, 1056),
    "CONV_SCALE_WEIGHT": (False, True),  # the styles on the W tile or on the A tile
    "CONV_TMA": (False, True),  # stride-1 input loads by TMA descriptor where they apply
    "TAP_LOAD_BYTES": (8, 16),  # loads the box's taps re-read: 8 bytes a copy (L1 under Triton 3.6) or 16
    "PIXEL_REDUCTION_PROGRAMS": (3, 528),  # how the separate route splits its sums over pixels
    "PIXEL_REDUCTION_MIN_PIXELS": (16, 1024),
    "BLUR_MAX_ROWS": (1, 3, 32),  # output rows a blur program walks
    "BLUR_PREFETCH": (False, True),  # a blur program loads its next source row ahead, or not
    "EPILOGUE_BACKWARD_BLOCK_VALUES": (16, 512),  # an epilogue backward block: 1 pixel x 16-64 channels, or 8-32
    "EPILOGUE_BACKWARD_MAX_TILES": (1, 3, 32),  # pixel blocks an epilogue backward program walks
    "EPILOGUE_BACKWARD_MIN_PROGRAMS": (1, 2112),
    "LOAD_STAGES": (1, 3),  # the memory-bound loops' pipelining (the interpreter runs both alike)
    "BLUR_MIN_PROGRAMS": (1, 1056),
    "DEMODULATION_PRECISION": ("ieee", "tf32x3"),  # the demodulation's dots and blocks (one math here)
    "TRITON_DEMODULATION_MAX_TOKENS": (2, 64),  # the Triton demodulation, via p^T q, or torch's
    "RGB_EPILOGUE_MAX_COUT": (0, 128),  # a pair's toRGB in its conv's epilogue, or its own launch
}


def random_routes(seed: int) -> dict:
    """One value of each of ROUTE_CHOICES, drawn from `seed`: set them on the op module (with
    pytest's monkeypatch) to run a layer down routes its shape alone would not choose."""
    rng = random.Random(seed)
    return {name: rng.choice(values) for name, values in ROUTE_CHOICES.items()}


def use_routes(monkeypatch, routes: dict) -> None:
    """Set a `random_routes` draw on the op module for one test; printed, so that pytest shows
    it with a failure."""
    from refinestyle_kernels.ops import modulated_conv2d as op_module

    print("routes:", routes)
    for name, value in routes.items():
        monkeypatch.setattr(op_module, name, value)


def record_launches(monkeypatch) -> list[str]:
    """The names of the Triton kernels launched from now on in this test ("conv_gemm[mode 0]"
    for a forward conv, modes 1 and 2 for the backward's grad-x and grad-w convs, "blur", ...),
    through the op module's launch hook: a test of the Triton backend asserts that its kernels
    ran, so a silent fallback to the torch backend cannot pass it."""
    from refinestyle_kernels.ops import modulated_conv2d as op_module

    names: list[str] = []
    monkeypatch.setattr(op_module, "LAUNCH_OBSERVER", lambda kernel, reads, writes: names.append(kernel))
    return names
