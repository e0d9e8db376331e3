"""Analytic work and traffic of every modulated conv layer, and the FlopCounterMode cross-check.

All counts are FLOPs = 2 x multiply-accumulates (MACs). Pure scalings (x * s, the
demodulation multiply, noise, bias, activation) are not MACs: they cost memory
traffic, which `layer_bytes` counts, not FLOPs.

Two algorithms compute the same layer, and each has its own count:

- ``"separated"``, the one the fused path (and the torch backend, but on 1x1
  layers) runs and the
  one whose count is the *model FLOPs* of a benchmark case (its achieved
  TFLOP/s and roofline are computed from it, whatever implementation ran):

      conv         the 3x3 (or 1x1) conv of x*s with the shared kernel:
                   B*Cout*Cin*k*k MACs per output pixel (per *input* pixel for the
                   stride-2 transposed upsampling conv, as rosinality computes it)
      fir          the [1,3,3,1] blur after the upsampling conv: 16 MACs per output
                   value
      low_rank     V @ x (L x Cin per input pixel), the k x k all-ones box on the L
                   projected channels, U @ box (Cout x L per conv-output pixel)
      demodulation d in closed form: (s^2) @ S2^T, (q*s) @ S1^T, q q^T and (q q^T) p
                   as matmuls, plus the two L-long dot products per output channel

- ``"reference"``, the literal formula of the reference backend: the same conv
  and fir, the materialised residual p^T q (Cout x L x Cin, once when the tokens
  are shared) and the sum of squares of the materialised [B, Cout, Cin, k, k]
  kernel for the demodulation.

The parts that are matmuls or convolutions are the ones
torch.utils.flop_counter.FlopCounterMode sees; `visible_flops` sums them so the
count can be checked against FlopCounterMode on the real op (`measure_flops`).
The backward counts are those of the gradients RefineStyle training needs:
x, styles, p and q, with the static weight frozen (so no weight-gradient conv in
the separated form; the reference still pays one, for its per-sample kernel).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

#: MACs of one output value of the upsampling FIR (a 4 x 4 filter).
FIR_TAPS = 16

#: the MAC count of the 17 convs of config-f at 1024 px, per image (the design notes' table)
CONFIG_F_1024_CONV_GMAC = 74.06


@dataclass(frozen=True)
class LayerSpec:
    """One modulated conv layer of a rosinality StyleGAN2 synthesis network.

    index: position among the generator's layers of its kind (0..16 for the convs of a
        1024 px generator, 0..8 for its toRGBs).
    name: rosinality's attribute path ("conv1", "convs.3", "to_rgb1", "to_rgbs.2").
    kind: "conv" (a StyledConv: 3x3, demodulated, noise, bias, leaky ReLU; refinable)
        or "torgb" (1x1, not demodulated, bias only; never refined).
    in_channel, out_channel: Cin and Cout.
    kernel_size: k (3 for convs, 1 for toRGB).
    upsample: rosinality's stride-2 transposed conv + blur (output 2x the input size).
    in_size, out_size: input and output spatial size (square).
    """

    index: int
    name: str
    kind: str
    in_channel: int
    out_channel: int
    kernel_size: int
    upsample: bool
    in_size: int
    out_size: int

    @property
    def demodulate(self) -> bool:
        return self.kind == "conv"

    @property
    def refinable(self) -> bool:
        return self.kind == "conv"

    @property
    def label(self) -> str:
        """Short human label, e.g. "conv 7 (64px up, 512->512)"."""
        up = " up" if self.upsample else ""
        return f"{self.kind} {self.index} ({self.out_size}px{up}, {self.in_channel}->{self.out_channel})"

    def as_dict(self) -> dict:
        return asdict(self)


def generator_channels(size: int, channel_multiplier: int = 2, channel_max: int = 512) -> dict[int, int]:
    """rosinality's channel table {resolution: channels} for 4..size px, capped at channel_max."""
    _check_size(size)
    base = {
        4: 512,
        8: 512,
        16: 512,
        32: 512,
        64: 256 * channel_multiplier,
        128: 128 * channel_multiplier,
        256: 64 * channel_multiplier,
        512: 32 * channel_multiplier,
        1024: 16 * channel_multiplier,
        2048: 8 * channel_multiplier,
    }
    return {res: min(channels, channel_max) for res, channels in base.items() if res <= size}


def generator_layers(
    size: int, channel_multiplier: int = 2, channel_max: int = 512
) -> tuple[list[LayerSpec], list[LayerSpec]]:
    """The modulated conv layers of a `size` px generator: (convs, torgbs) in forward order.

    At 1024 px with channel_multiplier=2 (config-f) that is 17 convs and 9 toRGBs.
    """
    channels = generator_channels(size, channel_multiplier, channel_max)
    convs = [LayerSpec(0, "conv1", "conv", channels[4], channels[4], 3, False, 4, 4)]
    torgbs = [LayerSpec(0, "to_rgb1", "torgb", channels[4], 3, 1, False, 4, 4)]
    in_channel = channels[4]
    for level in range(3, int(math.log2(size)) + 1):
        res = 2**level
        out_channel = channels[res]
        block = len(torgbs) - 1
        convs.append(
            LayerSpec(len(convs), f"convs.{2 * block}", "conv", in_channel, out_channel, 3, True, res // 2, res)
        )
        convs.append(LayerSpec(len(convs), f"convs.{2 * block + 1}", "conv", out_channel, out_channel, 3, False, res, res))
        torgbs.append(LayerSpec(len(torgbs), f"to_rgbs.{block}", "torgb", out_channel, 3, 1, False, res, res))
        in_channel = out_channel
    return convs, torgbs


def _check_size(size: int) -> None:
    if not isinstance(size, int) or size < 4 or size & (size - 1):
        raise ValueError(f"size: expected a power of two >= 4, got {size!r}")


def _check_args(spec: LayerSpec, batch: int, num_tokens: int) -> None:
    if not isinstance(spec, LayerSpec):
        raise TypeError(f"spec: expected a LayerSpec, got {type(spec).__name__}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch: expected a positive int, got {batch!r}")
    if not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"num_tokens: expected an int >= 0 (0 = no refinement), got {num_tokens!r}")
    if num_tokens and not spec.refinable:
        raise ValueError(f"num_tokens: {spec.name} ({spec.kind}) is never refined, expected 0, got {num_tokens}")


def _conv_pixels(spec: LayerSpec) -> int:
    """Pixels the k x k conv is evaluated at: the output, or the input of the transposed conv."""
    return spec.in_size**2 if spec.upsample else spec.out_size**2


def _transposed_pixels(spec: LayerSpec) -> int:
    """Pixels of the transposed conv's output before the blur: (2H+1)^2 (padding 0, stride 2, k 3)."""
    return (2 * spec.in_size + 1) ** 2


def layer_flops(
    spec: LayerSpec,
    batch: int,
    num_tokens: int = 0,
    *,
    shared_tokens: bool = False,
    form: str = "separated",
    backward: bool = False,
) -> dict[str, int]:
    """FLOPs (2 x MACs) of one layer, by part.

    spec: the layer.
    batch: B.
    num_tokens: L, the rank of the residual; 0 = no refinement (toRGB always 0).
    shared_tokens: p, q are [L, C] shared by the batch (the domain adapter) instead of
        [B, L, C] per sample (the inverter).
    form: "separated" (the algorithm of the torch/triton backends; the model FLOPs) or
        "reference" (the literal formula with materialised kernels).
    backward: count the backward pass (grads of x, styles, p, q; weight frozen) instead
        of the forward.

    Returns {"conv", "fir", "low_rank", "demodulation", "visible", "total"} as ints, where
    "visible" is the part made of matmuls and convolutions (what FlopCounterMode counts
    for that backend) and "total" the sum of the four parts.
    """
    _check_args(spec, batch, num_tokens)
    if form not in ("separated", "reference"):
        raise ValueError(f'form: expected "separated" or "reference", got {form!r}')
    B, L = batch, num_tokens
    Bt = 1 if shared_tokens else B  # how many token sets
    Cin, Cout, kk = spec.in_channel, spec.out_channel, spec.kernel_size**2
    conv_macs = B * Cout * Cin * kk * _conv_pixels(spec)
    fir_macs = B * Cout * spec.out_size**2 * FIR_TAPS if spec.upsample else 0
    hidden = {}  # parts FlopCounterMode does not see (reductions written as mul + sum)

    if form == "separated":
        if L:
            project = B * L * Cin * spec.in_size**2  # V @ x
            box = B * L * kk * _conv_pixels(spec) if spec.kernel_size > 1 else 0
            expand_pixels = _transposed_pixels(spec) if spec.upsample else spec.out_size**2
            expand = B * Cout * L * expand_pixels  # U @ box(V x)
        else:
            project = box = expand = 0
        if spec.demodulate:
            energy = B * Cout * Cin  # (s^2) @ S2^T
            if L:
                cross = B * L * Cin * Cout  # (q*s) @ S1^T
                gram = Bt * L * L * Cin  # q q^T
                gram_p = Bt * L * L * Cout  # (q q^T) p
                dots = 2 * B * Cout * L  # sum_l p * (.) twice, as mul + sum
            else:
                cross = gram = gram_p = dots = 0
        else:
            energy = cross = gram = gram_p = dots = 0
        if not backward:
            conv = conv_macs
            fir = fir_macs
            low_rank = project + box + expand
            demod_visible = energy + cross + gram + gram_p
            hidden["demodulation"] = dots
        else:
            # weight frozen: only the input gradient of the conv, the fir and the box;
            # both operands of V @ x and U @ (.) need gradients. The demodulation's backward
            # (written by hand, refinestyle_kernels' _Demodulation) is one product per forward
            # product: dE @ S2 and (dE p) @ S1 for grad s and the cross term, then
            # (p dE p^T) and (p dE p^T) q for the residual term's q-gradient (its p-gradient
            # reuses the forward's (q q^T) p). Then the two reductions over pixels that give
            # grad s (x * grad(x*s)) and grad d (g * u).
            conv = conv_macs
            fir = fir_macs
            low_rank = 2 * project + box + 2 * expand
            demod_visible = energy + cross + gram + gram_p
            reductions = B * Cin * spec.in_size**2 + (B * Cout * spec.out_size**2 if spec.demodulate else 0)
            hidden["demodulation"] = 2 * dots + reductions
        parts = {"conv": conv, "fir": fir, "low_rank": low_rank, "demodulation": demod_visible}
    else:
        residual = Bt * Cout * L * Cin if L else 0  # p^T q
        square_sum = B * Cout * Cin * kk if spec.demodulate else 0
        if not backward:
            parts = {"conv": conv_macs, "fir": fir_macs, "low_rank": residual, "demodulation": 0}
            hidden["demodulation"] = square_sum
        else:
            # grad x and grad of the per-sample kernel (styles, p, q need it): two convs
            parts = {"conv": 2 * conv_macs, "fir": fir_macs, "low_rank": 2 * residual, "demodulation": 0}
            hidden["demodulation"] = 2 * square_sum

    visible = sum(parts.values())
    flops = {name: 2 * macs for name, macs in parts.items()}
    for name, macs in hidden.items():
        flops[name] += 2 * macs
    flops["visible"] = 2 * visible
    flops["total"] = sum(flops[name] for name in ("conv", "fir", "low_rank", "demodulation"))
    return flops


def layer_bytes(
    spec: LayerSpec,
    batch: int,
    num_tokens: int = 0,
    *,
    shared_tokens: bool = False,
    element_size: int = 4,
    backward: bool = False,
    input_resident: bool = False,
) -> int:
    """Least bytes one layer must move to and from device memory (the roofline's traffic).

    The model: every activation crosses memory once per pass and nothing in between
    (what a fully fused kernel achieves). Forward: read x, W0, styles, p, q and the
    noise, write y. Backward (grads of x, styles, p, q): read the output gradient g,
    the output y (the activation's sign and the demodulated sum are recovered from it),
    x (for grad s) and W0, write grad x and the small token/style gradients.

    element_size: bytes per element of the case's dtype (4 fp32, 2 bf16).
    input_resident: the layer runs inside the kernels of the layer that makes its input (a
    toRGB fused with its block's last conv, as in the whole network): x is not read in either
    pass and grad x is not written (it joins the conv's output gradient in registers), since
    the conv's own floor already moves that activation.
    Other arguments as in `layer_flops`. Returns an int.
    """
    _check_args(spec, batch, num_tokens)
    B, L = batch, num_tokens
    Bt = 1 if shared_tokens else B
    x = B * spec.in_channel * spec.in_size**2
    y = B * spec.out_channel * spec.out_size**2
    weight = spec.out_channel * spec.in_channel * spec.kernel_size**2
    small = B * spec.in_channel + Bt * L * (spec.in_channel + spec.out_channel) + spec.out_channel
    noise = B * spec.out_size**2 if spec.kind == "conv" else 0
    moved_x = 0 if input_resident else x
    forward = moved_x + weight + small + noise + y
    if not backward:
        return forward * element_size
    return (forward + y + y + moved_x + weight + moved_x + small) * element_size


def generator_flops(
    size: int,
    batch: int,
    num_tokens: int = 0,
    *,
    shared_tokens: bool = False,
    form: str = "separated",
    backward: bool = False,
    channel_multiplier: int = 2,
    channel_max: int = 512,
) -> dict[str, int]:
    """Sum of `layer_flops` over the 17 (at 1024 px) convs, every one refined when
    num_tokens > 0, and the toRGBs (never refined). Same keys as `layer_flops`."""
    convs, torgbs = generator_layers(size, channel_multiplier, channel_max)
    total: dict[str, int] = {}
    for spec in convs + torgbs:
        tokens = num_tokens if spec.refinable else 0
        counts = layer_flops(spec, batch, tokens, shared_tokens=shared_tokens, form=form, backward=backward)
        for name, value in counts.items():
            total[name] = total.get(name, 0) + value
    return total


def conv_gmac_per_image(size: int = 1024, channel_multiplier: int = 2, channel_max: int = 512) -> float:
    """GMACs of the generator's 3x3 convs (no fir, no refinement) for one image; 74.06 for config-f."""
    convs, _ = generator_layers(size, channel_multiplier, channel_max)
    return sum(layer_flops(spec, 1)["conv"] for spec in convs) / 2 / 1e9


def roofline_floor_seconds(flops: float, nbytes: float, peak_flops: float, peak_bytes_per_s: float) -> float:
    """The least time a kernel doing `flops` and moving `nbytes` can take: max(compute, memory)."""
    if peak_flops <= 0 or peak_bytes_per_s <= 0:
        raise ValueError(f"peaks: expected positive numbers, got {peak_flops}, {peak_bytes_per_s}")
    return max(flops / peak_flops, nbytes / peak_bytes_per_s)


def measure_flops(fn: Callable[[], object], backward_of: Callable[[object], object] | None = None) -> dict[str, int]:
    """Count the FLOPs of running fn() (and backward_of(its result)) with FlopCounterMode.

    fn: a zero-argument callable running the op (for example the reference backend).
    backward_of: optional callable taking fn's result and running its backward; its
        FLOPs are counted separately.
    Returns {"forward": int, "backward": int, "by_op": {op name: int}} (the backward key
    is 0 when backward_of is None). Works on meta tensors, so full-size layers can be
    counted without computing anything.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        result = fn()
    forward = counter.get_total_flops()
    by_op = {str(op): count for op, count in counter.get_flop_counts().get("Global", {}).items()}
    backward = 0
    if backward_of is not None:
        with FlopCounterMode(display=False) as counter:
            backward_of(result)
        backward = counter.get_total_flops()
        for op, count in counter.get_flop_counts().get("Global", {}).items():
            by_op[f"{op} (backward)"] = count
    return {"forward": forward, "backward": backward, "by_op": by_op}


def flop_counter_grouped_wgrad_excess(spec: LayerSpec, batch: int) -> int:
    """How many FLOPs FlopCounterMode adds on top of the true count for the reference's backward.

    FlopCounterMode's formula for the weight gradient of a convolution ignores groups,
    so for the reference's grouped conv (groups=B) it counts the kernel gradient B times.
    The analytic count stays the true one; tests add this to compare.
    """
    conv_flops = layer_flops(spec, batch)["conv"]
    return (batch - 1) * conv_flops


def torch_backend_form(spec: LayerSpec) -> str:
    """The form whose arithmetic the torch backend runs on this layer: "separated", but
    "reference" on the 1x1 layers (every toRGB) it runs as one [Cout, Cin] matrix a sample in
    a bmm (whose weight gradient FlopCounterMode counts right: no grouped-conv excess)."""
    from refinestyle_kernels.ops.modulated_conv2d import _torch_modulates_the_matrix

    pixels = spec.in_size * spec.in_size
    return "reference" if _torch_modulates_the_matrix(spec.kernel_size, spec.upsample, spec.out_channel, pixels) else "separated"


def cross_check_layer(
    spec: LayerSpec, batch: int, num_tokens: int = 0, *, shared_tokens: bool = False, backward: bool = False
) -> dict:
    """Compare the analytic counts with FlopCounterMode on the real op, on meta tensors (no compute).

    Runs the reference backend (form "reference") and the torch backend (form
    "separated"; "reference" on 1x1 layers, where it modulates the [Cout, Cin] matrix per
    sample) of `refinestyle_kernels.styled_conv2d` for this layer and compares
    FlopCounterMode's totals with `layer_flops(...)["visible"]`, forward and, with
    `backward`, the backward pass (gradients of x, styles, p, q). For the reference's
    backward, FlopCounterMode's group-unaware weight-gradient formula is accounted for
    (see `flop_counter_grouped_wgrad_excess`).

    Returns {"layer", "batch", "num_tokens", "shared_tokens", "backward", "checks": [
    {"backend", "form", "pass", "analytic", "counted"}], "ok": bool}.
    """
    import torch

    from refinestyle_kernels.ops.modulated_conv2d import styled_conv2d

    _check_args(spec, batch, num_tokens)
    meta = torch.device("meta")
    lead = () if shared_tokens else (batch,)
    x = torch.empty(batch, spec.in_channel, spec.in_size, spec.in_size, device=meta, requires_grad=backward)
    weight = torch.empty(spec.out_channel, spec.in_channel, spec.kernel_size, spec.kernel_size, device=meta)
    styles = torch.empty(batch, spec.in_channel, device=meta, requires_grad=backward)
    p = q = None
    if num_tokens:
        p = torch.empty(*lead, num_tokens, spec.out_channel, device=meta, requires_grad=backward)
        q = torch.empty(*lead, num_tokens, spec.in_channel, device=meta, requires_grad=backward)
    leaves = [t for t in (x, styles, p, q) if t is not None]
    checks = []
    for backend in ("reference", "torch"):
        form = torch_backend_form(spec) if backend == "torch" else "reference"

        def forward():
            return styled_conv2d(
                x, weight, styles, p, q, demodulate=spec.demodulate, upsample=spec.upsample, backend=backend
            )

        def backward_of(out):
            return torch.autograd.grad(out, leaves, torch.empty_like(out))

        counted = measure_flops(forward, backward_of if backward else None)
        for pass_name in ("forward", "backward") if backward else ("forward",):
            analytic = layer_flops(
                spec, batch, num_tokens, shared_tokens=shared_tokens, form=form, backward=pass_name == "backward"
            )["visible"]
            if backend == "reference" and pass_name == "backward":
                analytic += flop_counter_grouped_wgrad_excess(spec, batch)
            checks.append({"backend": backend, "form": form, "pass": pass_name, "analytic": analytic, "counted": counted[pass_name]})
    return {
        "layer": spec.name,
        "batch": batch,
        "num_tokens": num_tokens,
        "shared_tokens": shared_tokens,
        "backward": backward,
        "checks": checks,
        "ok": all(check["analytic"] == check["counted"] for check in checks),
    }
