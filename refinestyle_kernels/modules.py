"""Drop-in nn.Modules for rosinality/stylegan2-pytorch's StyleGAN2 layers, on the fused op.

Parameter and buffer names and shapes are rosinality's, so a `g_ema` state_dict
loads with strict=True. The conv layers also take RefineStyle's scaled tokens
(p, q) and run through `styled_conv2d`, whose backend every module exposes as a
`backend` attribute ("auto" by default). `StyledConv.forward_to_rgb` runs a conv and the
toRGB reading its output as one op (`styled_conv2d_to_rgb`), as the generator does.

Under torch.autocast the modules cast the op's operands to the autocast dtype
themselves (the op refuses mixed dtypes), so a model runs in bf16/fp16 unchanged.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from refinestyle_kernels.backend import check_backend
from refinestyle_kernels.ops.bias_act import fused_leaky_relu
from refinestyle_kernels.ops.modulated_conv2d import (
    UPSAMPLE_BLUR_PAD,
    UPSAMPLE_BLUR_TAPS,
    UPSAMPLE_FACTOR,
    _check_flag,
    _check_positive,
    _derived_from_weight,
    styled_conv2d,
)
from refinestyle_kernels.ops.styled_conv2d_to_rgb import styled_conv2d_to_rgb
from refinestyle_kernels.ops.upfirdn2d import make_blur_kernel, upfirdn2d
from refinestyle_kernels.ops.upsample_add import upsample_add

DEFAULT_BLUR_KERNEL = (1, 3, 3, 1)


def _autocast_device_types() -> frozenset[str]:
    """The device types autocast knows, asked once: torch.compile (torch 2.11) cannot trace
    `torch.amp.is_autocast_available`, and meta tensors, used to plan memory, have no autocast."""
    known = set()
    for device_type in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla", "privateuseone"):
        try:
            if torch.amp.is_autocast_available(device_type):
                known.add(device_type)
        except (RuntimeError, ValueError):  # a device type this build does not know
            pass
    return frozenset(known)


_AUTOCAST_DEVICE_TYPES = _autocast_device_types()


def _autocasting(x: torch.Tensor) -> bool:
    device_type = x.device.type
    return device_type in _AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(device_type)


def _operand_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the op should run in: autocast's when it is on for x's device, else x's."""
    return torch.get_autocast_dtype(x.device.type) if _autocasting(x) else x.dtype


def _check_image(name: str, value, channels: int, size: tuple[int, int] | None = None, batch: int | None = None):
    """A [B, C, H, W] tensor with C = `channels` (and H, W = `size`, B = `batch` when given)."""
    if not isinstance(value, torch.Tensor) or value.ndim != 4:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{name}: expected a [B, {channels}, H, W] tensor, got {got}")
    expected = (batch if batch is not None else value.shape[0], channels, *(size or value.shape[2:]))
    if tuple(value.shape) != expected:
        names = ("B" if batch is None else f"B={batch}", f"{channels}", *(f"{v}" for v in (size or ("H", "W"))))
        raise ValueError(f"{name}: expected [{', '.join(names)}], got {tuple(value.shape)}")


def _cast(tensor, dtype):
    """A tensor in dtype; anything else (None, or a wrong type the op then names) as it is."""
    return tensor.to(dtype) if isinstance(tensor, torch.Tensor) else tensor


def _weight_as(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight in dtype. A frozen weight's cast (autocast's bf16 copy of an fp32 W0) is made once
    and kept: cast afresh in every call, it would also make the op derive its tap sums and kernel
    layouts afresh from each new copy."""
    if weight.dtype == dtype or weight.requires_grad:
        return weight.to(dtype)
    return _derived_from_weight(weight, ("cast", dtype), lambda w: w.to(dtype))


def _check_clamp(clamp):
    """None or a positive finite number (NVlabs' conv_clamp), checked when the layer is built."""
    return None if clamp is None else _check_positive("clamp", clamp, "None or a positive finite number")


def _check_positive_ints(**values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")


class PixelNorm(nn.Module):
    """Normalise each latent vector to unit RMS: x / sqrt(mean(x^2, dim=1) + 1e-8). x [B, C]."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input * torch.rsqrt(torch.mean(input**2, dim=1, keepdim=True) + 1e-8)


class FusedLeakyReLU(nn.Module):
    """Bias [C] (parameter `bias`), leaky ReLU(negative_slope) and a gain of `scale`."""

    def __init__(self, channel: int, bias: bool = True, negative_slope: float = 0.2, scale: float = math.sqrt(2)):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channel)) if bias else None
        self.negative_slope = negative_slope
        self.scale = scale

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(input.dtype)  # (autocast runs input in half)
        return fused_leaky_relu(input, bias, self.negative_slope, self.scale)


class EqualLinear(nn.Module):
    """Linear layer with equalized learning rate (rosinality's EqualLinear).

    weight [out_dim, in_dim] is drawn from N(0, 1) / lr_mul and used times
    lr_mul / sqrt(in_dim); bias [out_dim] starts at bias_init and is used times lr_mul.
    activation: None or "fused_lrelu" (bias, leaky ReLU(0.2), gain sqrt(2)).
    forward: input [B, in_dim] -> [B, out_dim].
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        bias: bool = True,
        bias_init: float = 0,
        lr_mul: float = 1,
        activation: str | None = None,
    ):
        super().__init__()
        if activation not in (None, "fused_lrelu"):
            raise ValueError(f'activation: expected None or "fused_lrelu", got {activation!r}')
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.zeros(out_dim).fill_(bias_init)) if bias else None
        self.activation = activation
        self.scale = (1 / math.sqrt(in_dim)) * lr_mul
        self.lr_mul = lr_mul

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.ndim != 2 or input.shape[1] != self.weight.shape[1]:
            raise ValueError(f"input: expected [B, {self.weight.shape[1]}], got {tuple(input.shape)}")
        if input.dtype != self.weight.dtype and not _autocasting(input):
            raise TypeError(f"input: expected the weight's dtype {self.weight.dtype} (or autocast), got {input.dtype}")
        if self.activation:
            out = nn.functional.linear(input, self.weight * self.scale)
            bias = None if self.bias is None else (self.bias * self.lr_mul).to(out.dtype)
            return fused_leaky_relu(out, bias)
        if self.bias is None:
            return torch.mm(input, self.weight.t()) * self.scale
        if not self.weight.requires_grad:
            # frozen (RefineStyle's generator): weight * scale made once and kept, rounded as
            # rosinality's F.linear(input, weight * scale) rounds it; then the backward is one mm,
            # where alpha=scale adds a scaling launch (the 26 style affines of a 1024 px generator
            # run once per layer per step)
            scaled = _derived_from_weight(self.weight, ("equal_linear", self.scale), lambda w: w * self.scale)
            return torch.addmm(self.bias, input, scaled.t(), beta=self.lr_mul)
        # one launch, where scaling the weight and the bias first takes three
        return torch.addmm(self.bias, input, self.weight.t(), beta=self.lr_mul, alpha=self.scale)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, activation={self.activation}"


class ConstantInput(nn.Module):
    """The learned 4x4 input of the synthesis network (parameter `input` [1, C, size, size]).

    forward(input) returns it repeated to input's batch size; only input.shape[0] is used.
    """

    def __init__(self, channel: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.input.repeat(input.shape[0], 1, 1, 1)


class NoiseInjection(nn.Module):
    """Per-pixel noise times a learned strength (parameter `weight` [1], zero at init).

    forward(image [B, C, H, W], noise=None | [B or 1, 1, H, W]) -> image + weight * noise,
    drawing standard normal noise when none is given. Inside StyledConv the op adds
    the noise in its epilogue instead; this module is kept for the state_dict names.
    """

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, image: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(image, torch.Tensor) or image.ndim != 4:
            raise ValueError(f"image: expected [B, C, H, W], got {tuple(getattr(image, 'shape', ()))}")
        batch, _, height, width = image.shape
        if noise is None:
            noise = image.new_empty(batch, 1, height, width).normal_()
        # one map for the batch, or one per sample; never broadcast over channels or pixels
        elif not (
            isinstance(noise, torch.Tensor) and noise.ndim == 4 and noise.shape[0] in (1, batch)
            and tuple(noise.shape[1:]) == (1, height, width)
        ):  # fmt: skip
            got = tuple(getattr(noise, "shape", ()))
            raise ValueError(f"noise: expected [B={batch} or 1, 1, {height}, {width}], got {got}")
        return image + self.weight * noise


class Blur(nn.Module):
    """FIR filter (buffer `kernel`, [n, n], sum upsample_factor^2) with padding `pad` = (before, after)."""

    def __init__(self, kernel: Sequence[float], pad: tuple[int, int], upsample_factor: int = 1):
        super().__init__()
        weights = make_blur_kernel(kernel)
        if upsample_factor > 1:
            weights = weights * (upsample_factor**2)
        self.register_buffer("kernel", weights)
        self.pad = pad

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(input, self.kernel, pad=self.pad)


class Upsample(nn.Module):
    """2x FIR upsampling of the toRGB skip (buffer `kernel` [n, n], sum factor^2)."""

    def __init__(self, kernel: Sequence[float], factor: int = 2):
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_blur_kernel(kernel) * (factor**2))
        pad = len(kernel) - factor
        self.pad = ((pad + 1) // 2 + factor - 1, pad // 2)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(input, self.kernel, up=self.factor, down=1, pad=self.pad)


class ModulatedConv2d(nn.Module):
    """StyleGAN2's modulated convolution, optionally refined with RefineStyle tokens.

    Parameters (rosinality's names): `weight` [1, Cout, Cin, k, k] ~ N(0, 1),
    `modulation` = EqualLinear(style_dim, Cin, bias_init=1), and with upsample the
    buffer `blur.kernel`. scale = 1/sqrt(Cin*k*k).

    forward(input [B, Cin, H, W], style w [B, style_dim], p=None, q=None) -> [B, Cout, H', W'],
    with p, q the scaled tokens of `refinestyle_kernels.modulated_conv2d` ([B, L, C] or [L, C]).
    The op runs in input's dtype, or autocast's when autocast is on for its device; the
    weight, the styles, p, q, noise and bias are cast to that dtype (fp32 tokens can drive a
    bf16 generator). style must have the modulation's dtype, unless autocast is on.
    The constructor takes rosinality's arguments in rosinality's order. Only the generator's
    convs are supported: `downsample=True` (the discriminator's) is a ValueError. `fused` is
    accepted and ignored, since rosinality's two forms compute the same function.
    """

    def __init__(
        self,
        in_channel: int,
        out_channel: int,
        kernel_size: int,
        style_dim: int,
        demodulate: bool = True,
        upsample: bool = False,
        downsample: bool = False,
        blur_kernel: Sequence[float] = DEFAULT_BLUR_KERNEL,
        fused: bool = True,
        *,
        backend: str = "auto",
    ):
        super().__init__()
        _check_positive_ints(in_channel=in_channel, out_channel=out_channel, style_dim=style_dim)
        if downsample:  # rosinality's discriminator-side option; the generator never downsamples
            raise ValueError("downsample: the fused op has the generator's convs only; expected False")
        if kernel_size not in (1, 3):
            raise ValueError(f"kernel_size: expected 1 or 3, got {kernel_size}")
        _check_flag("upsample", upsample)
        _check_flag("demodulate", demodulate)
        if upsample and kernel_size != 3:
            raise ValueError(f"upsample: the upsampling conv needs kernel_size 3, got {kernel_size}")
        self.eps = 1e-8
        self.kernel_size = kernel_size
        self.in_channel = in_channel
        self.out_channel = out_channel
        self.upsample = upsample
        self.demodulate = demodulate
        self.backend = check_backend(backend)
        self.scale = 1 / math.sqrt(in_channel * kernel_size**2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1)
        if upsample:
            if tuple(blur_kernel) != UPSAMPLE_BLUR_TAPS:
                raise ValueError(f"blur_kernel: the fused upsampling conv implements {UPSAMPLE_BLUR_TAPS} only")
            # kept for rosinality's state_dict; the op applies the same fixed filter
            self.blur = Blur(blur_kernel, pad=UPSAMPLE_BLUR_PAD, upsample_factor=UPSAMPLE_FACTOR)

    def layer_forward(
        self,
        input: torch.Tensor,
        style: torch.Tensor,
        p: torch.Tensor | None = None,
        q: torch.Tensor | None = None,
        *,
        noise: torch.Tensor | None = None,
        noise_strength: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        activate: bool = False,
        clamp: float | None = None,
        draw_noise: bool = False,
    ) -> torch.Tensor:
        """The conv with a fused epilogue (see `refinestyle_kernels.styled_conv2d`); used by
        StyledConv/ToRGB. draw_noise: standard normal noise at the output resolution when noise
        is None (rosinality's StyledConv default)."""
        self._check_inputs(input, style)
        if draw_noise and noise is None:
            noise = self._drawn_noise(input)
        dtype = _operand_dtype(input)
        styles = self.modulation(style)
        return styled_conv2d(
            input.to(dtype),
            _weight_as(self.weight[0], dtype),
            styles.to(dtype),
            _cast(p, dtype),
            _cast(q, dtype),
            noise=_cast(noise, dtype),
            noise_strength=_cast(noise_strength, dtype),
            bias=_cast(bias, dtype),
            activate=activate,
            clamp=clamp,
            demodulate=self.demodulate,
            upsample=self.upsample,
            eps=self.eps,
            scale=self.scale,
            backend=self.backend,
        )

    def forward(
        self, input: torch.Tensor, style: torch.Tensor, p: torch.Tensor | None = None, q: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.layer_forward(input, style, p, q)

    def _drawn_noise(self, input: torch.Tensor) -> torch.Tensor:
        """Standard normal noise [B, 1, H', W'] at the output resolution of input [B, Cin, H, W]."""
        factor = UPSAMPLE_FACTOR if self.upsample else 1
        batch, _, height, width = input.shape
        return input.new_empty(batch, 1, height * factor, width * factor).normal_()

    def _check_inputs(self, input: torch.Tensor, style: torch.Tensor) -> None:
        """input [B, Cin, H, W] and style [B, style_dim], named as the modules' forward names them."""
        _check_image("input", input, self.in_channel)
        self._check_style("style", style, input)

    def _check_style(self, name: str, style: torch.Tensor, input: torch.Tensor) -> None:
        """style [B, style_dim] in the modulation's dtype (any under autocast), B as input's."""
        style_dim = self.modulation.weight.shape[1]
        if not isinstance(style, torch.Tensor) or tuple(style.shape) != (input.shape[0], style_dim):
            got = tuple(style.shape) if isinstance(style, torch.Tensor) else type(style).__name__
            raise ValueError(f"{name}: expected [B={input.shape[0]}, style_dim={style_dim}], got {got}")
        if style.dtype != self.modulation.weight.dtype and not _autocasting(style):
            raise TypeError(f"{name}: expected the modulation's dtype {self.modulation.weight.dtype} (or autocast), "
                            f"got {style.dtype}")  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"{self.in_channel}, {self.out_channel}, {self.kernel_size}, upsample={self.upsample}, "
            f"demodulate={self.demodulate}, backend={self.backend!r}"
        )


class _ConvBackendMixin:
    """`backend` of a layer is its modulated conv's (settable, e.g. generator-wide)."""

    @property
    def backend(self) -> str:
        return self.conv.backend

    @backend.setter
    def backend(self, value: str) -> None:
        self.conv.backend = check_backend(value)


class StyledConv(_ConvBackendMixin, nn.Module):
    """Modulated conv + noise + bias + leaky ReLU(0.2)*sqrt(2): one fused op per layer.

    Parameters: `conv` (ModulatedConv2d), `noise.weight` [1], `activate.bias` [Cout].
    forward(input [B, Cin, H, W], style [B, style_dim], noise=None | [B or 1, 1, H', W'],
    p=None, q=None) -> [B, Cout, H', W']; standard normal noise is drawn when none is given.
    clamp: None or a positive float, applied after the activation (NVlabs' conv_clamp).
    """

    def __init__(
        self,
        in_channel: int,
        out_channel: int,
        kernel_size: int,
        style_dim: int,
        upsample: bool = False,
        blur_kernel: Sequence[float] = DEFAULT_BLUR_KERNEL,
        demodulate: bool = True,
        *,
        clamp: float | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        self.conv = ModulatedConv2d(
            in_channel, out_channel, kernel_size, style_dim, demodulate=demodulate, upsample=upsample,
            blur_kernel=blur_kernel, backend=backend,
        )  # fmt: skip
        _check_clamp(clamp)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channel)
        self.clamp = clamp

    def forward(
        self,
        input: torch.Tensor,
        style: torch.Tensor,
        noise: torch.Tensor | None = None,
        p: torch.Tensor | None = None,
        q: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.conv.layer_forward(
            input,
            style,
            p,
            q,
            noise=noise,
            draw_noise=True,
            noise_strength=self.noise.weight,
            bias=self.activate.bias,
            activate=True,
            clamp=self.clamp,
        )

    def forward_to_rgb(
        self,
        to_rgb: "ToRGB",
        input: torch.Tensor,
        style: torch.Tensor,
        rgb_style: torch.Tensor,
        skip: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        p: torch.Tensor | None = None,
        q: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`out = self(input, style, noise, p, q)` and `to_rgb(out, rgb_style, skip)` as one op.

        StyleGAN2's last conv of a block feeds both the next block and the block's toRGB; on
        the Triton backend `styled_conv2d_to_rgb` adds the two gradients of out inside the
        conv's epilogue backward instead of in memory. Same results as the two calls.
        Returns (out [B, Cout, H, W], image [B, 3, H, W]).
        """
        conv, rgb_conv = self.conv, to_rgb.conv
        if conv.upsample or conv.backend != rgb_conv.backend:  # nothing to fuse
            out = self(input, style, noise, p, q)
            return out, to_rgb(out, rgb_style, skip)
        conv._check_inputs(input, style)
        rgb_conv._check_style("rgb_style", rgb_style, input)
        to_rgb._check_skip(skip, input)
        dtype = _operand_dtype(input)
        out, image = styled_conv2d_to_rgb(
            input.to(dtype),
            _weight_as(conv.weight[0], dtype),
            conv.modulation(style).to(dtype),
            _cast(p, dtype),
            _cast(q, dtype),
            rgb_weight=_weight_as(rgb_conv.weight[0], dtype),
            rgb_styles=rgb_conv.modulation(rgb_style).to(dtype),
            rgb_bias=to_rgb.bias.reshape(-1).to(dtype),
            noise=_cast(conv._drawn_noise(input) if noise is None else noise, dtype),
            noise_strength=self.noise.weight.to(dtype),
            bias=self.activate.bias.to(dtype),
            activate=True,
            clamp=self.clamp,
            rgb_clamp=to_rgb.clamp,
            demodulate=conv.demodulate,
            eps=conv.eps,
            scale=conv.scale,
            rgb_scale=rgb_conv.scale,
            backend=conv.backend,
        )
        if skip is not None:
            image = to_rgb.add_upsampled_skip(image, skip)
        return out, image


class ToRGB(_ConvBackendMixin, nn.Module):
    """1x1 modulated conv to RGB (demodulate=False, never refined) + bias + the upsampled skip.

    Parameters: `conv` (ModulatedConv2d(in_channel, 3, 1)), `bias` [1, 3, 1, 1]; with
    upsample the buffer `upsample.kernel`.
    forward(input [B, Cin, H, W], style [B, style_dim], skip=None | [B, 3, H/2, W/2]) -> [B, 3, H, W].
    clamp: None or a positive float; clamps conv + bias before the skip is added (NVlabs' conv_clamp).
    """

    def __init__(
        self,
        in_channel: int,
        style_dim: int,
        upsample: bool = True,
        blur_kernel: Sequence[float] = DEFAULT_BLUR_KERNEL,
        *,
        clamp: float | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        self.clamp = _check_clamp(clamp)
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.conv = ModulatedConv2d(in_channel, 3, 1, style_dim, demodulate=False, backend=backend)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, input: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv.layer_forward(input, style, bias=self.bias.reshape(3), activate=False, clamp=self.clamp)
        if skip is not None:
            self._check_skip(skip, out)
            out = self.add_upsampled_skip(out, skip)
        return out

    def add_upsampled_skip(self, image: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """image + self.upsample(skip), as one pass on the Triton backend (`upsample_add`).

        image: [B, 3, H, W], the toRGB's output; skip: [B, 3, H/2, W/2], the previous block's
        image (cast to image's dtype). Returns [B, 3, H, W] in image's dtype."""
        upsample = self.upsample
        return upsample_add(
            skip.to(image.dtype), upsample.kernel, image, up=upsample.factor, pad=upsample.pad, backend=self.backend
        )

    def _check_skip(self, skip: torch.Tensor | None, reference: torch.Tensor) -> None:
        """skip: None or the previous block's image [B, 3, H/2, W/2], where reference (the
        toRGB's input or output) is [B, C, H, W]."""
        if skip is None:
            return
        if not hasattr(self, "upsample"):
            raise ValueError("skip: this ToRGB was built with upsample=False and takes no skip input")
        batch, _, height, width = reference.shape
        if height % 2 or width % 2:
            raise ValueError(f"skip: an upsampled skip needs an even-sized input, got {height} x {width}")
        _check_image("skip", skip, 3, (height // 2, width // 2), batch)


class LayerTokens(nn.Module):
    """One layer's learnable RefineStyle tokens and their scaling vectors (paper Eq. 3-4).

    Parameters: `P` [L, Cout] and `Q` [L, Cin] ~ N(0, 1); `A` and `B` [L], initialised to
    `scale_init` (small, so the refined generator starts at the frozen one).
    forward() -> (p, q) = (A[:, None] * P, B[:, None] * Q), the shared scaled tokens that
    `modulated_conv2d` takes; the residual is dW = p^T q [Cout, Cin], of rank <= L.
    """

    def __init__(self, in_channel: int, out_channel: int, num_tokens: int, scale_init: float = 0.01):
        super().__init__()
        _check_positive_ints(in_channel=in_channel, out_channel=out_channel, num_tokens=num_tokens)
        self.P = nn.Parameter(torch.randn(num_tokens, out_channel))
        self.Q = nn.Parameter(torch.randn(num_tokens, in_channel))
        self.A = nn.Parameter(torch.full((num_tokens,), float(scale_init)))
        self.B = nn.Parameter(torch.full((num_tokens,), float(scale_init)))

    @property
    def num_tokens(self) -> int:
        return self.P.shape[0]

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.A[:, None] * self.P, self.B[:, None] * self.Q

    def extra_repr(self) -> str:
        return f"L={self.P.shape[0]}, Cout={self.P.shape[1]}, Cin={self.Q.shape[1]}"


def swap_rosinality_modules(
    model: nn.Module,
    *,
    class_names: Sequence[str] = ("StyledConv", "ToRGB"),
    backend: str = "auto",
) -> list[str]:
    """Replace, in place, every rosinality StyledConv and ToRGB inside `model` by ours.

    For a model built from rosinality/stylegan2-pytorch's model.py (or code that copies
    it, as pSp and e4e do): its `Generator` keeps its forward,
    which calls the swapped layers with the same arguments, and now runs the fused op.
    Each new layer takes the old one's Parameter and buffer objects themselves (checked by
    load_state_dict strict=True first; an optimizer built before the swap still steps them),
    device, dtype, requires_grad flags and train/eval mode; the model's state_dict keeps
    its keys (rosinality registers an upsampling conv's blur first, so their order may
    differ). The swapped layers also take RefineStyle tokens: `conv(x, w, noise, p=p, q=q)`.

    model: any nn.Module; searched recursively (the model itself is never replaced).
    class_names: the class names (type(m).__name__) of the layers to replace, or one name
        as a string; which of the two a layer is, is read from its structure (a StyledConv
        has `conv`, `noise` and `activate`; a ToRGB has `conv` and a [1, 3, 1, 1] `bias`).
    backend: the new layers' op backend ("auto", "triton", "torch" or "reference").
    Returns the qualified names of the replaced layers, in model order. Raises TypeError
    for a named layer of neither structure and ValueError for one the fused op cannot run
    (a downsampling conv, an upsampling blur filter other than (1, 3, 3, 1)).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    check_backend(backend)
    names = {class_names} if isinstance(class_names, str) else set(class_names)
    return replace_modules(
        model,
        lambda module: type(module).__name__ in names and not isinstance(module, (StyledConv, ToRGB)),
        lambda name, old: _rosinality_replacement(name, old, backend),
    )


def replace_modules(model: nn.Module, selected, replacement) -> list[str]:
    """Replace, in place, every submodule of `model` for which selected(module) is true by
    replacement(qualified name, module); returns the qualified names, in model order."""
    targets = [(name, module) for name, module in model.named_modules() if name and selected(module)]
    for name, old in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement(name, old))
    return [name for name, _ in targets]


def adopt_tensors(old: nn.Module, new: nn.Module) -> nn.Module:
    """Give `new` the very Parameter and buffer objects of `old` under the same names (hence its
    requires_grad flags), and its train/eval mode. Call after new.load_state_dict(old's, strict):
    an optimizer built before the swap, parameter hooks and tied weights then still reach the
    layer. A tensor of another shape or dtype than new's is not taken (new keeps its loaded copy)."""
    for kind, slots in (("parameter", "_parameters"), ("buffer", "_buffers")):
        mine = dict(new.named_parameters() if kind == "parameter" else new.named_buffers())
        theirs = dict(old.named_parameters() if kind == "parameter" else old.named_buffers())
        for key, tensor in mine.items():
            original = theirs.get(key)
            if original is None or original.shape != tensor.shape or original.dtype != tensor.dtype:
                continue
            owner_name, _, leaf = key.rpartition(".")
            getattr(new.get_submodule(owner_name), slots)[leaf] = original
    return new.train(old.training)


def _rosinality_replacement(name: str, old: nn.Module, backend: str) -> nn.Module:
    conv = getattr(old, "conv", None)
    weight = getattr(conv, "weight", None)
    if not (isinstance(weight, torch.Tensor) and weight.ndim == 5 and hasattr(conv, "modulation")):
        raise TypeError(f"{name}: a {type(old).__name__} without rosinality's conv.weight [1, Cout, Cin, k, k]")
    if getattr(conv, "downsample", False):
        raise ValueError(f"{name}: a downsampling modulated conv; the fused op has the generator's convs only")
    _, out_channel, in_channel, kernel_size, _ = weight.shape
    style_dim = conv.modulation.weight.shape[1]
    if hasattr(old, "noise") and hasattr(old, "activate"):
        new = StyledConv(
            in_channel, out_channel, kernel_size, style_dim, upsample=bool(getattr(conv, "upsample", False)),
            demodulate=bool(getattr(conv, "demodulate", True)), backend=backend,
        )
    elif isinstance(getattr(old, "bias", None), torch.Tensor) and tuple(old.bias.shape) == (1, 3, 1, 1):
        new = ToRGB(in_channel, style_dim, upsample=hasattr(old, "upsample"), backend=backend)
    else:
        raise TypeError(f"{name}: a {type(old).__name__} that is neither a StyledConv nor a ToRGB")
    new.to(device=weight.device, dtype=weight.dtype)  # first: loading into float32 would round float64 values
    state = old.state_dict()
    for key, ours in new.state_dict().items():
        # the fused op applies its own fixed FIR filter: a different one in the checkpoint would be ignored
        theirs = state.get(key) if key.endswith("kernel") else None
        if theirs is not None and (theirs.shape != ours.shape or not torch.allclose(theirs.to(ours), ours)):
            raise ValueError(f"{name}: its {key} is not the (1, 3, 3, 1) filter the fused op implements")
    new.load_state_dict(state, strict=True)
    return adopt_tensors(old, new)
