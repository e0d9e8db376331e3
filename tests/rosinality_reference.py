"""A rosinality-semantics StyleGAN2 generator for parity tests, written independently of refinestyle.

It follows rosinality/stylegan2-pytorch's model.py module tree and parameter names
(so its state_dict is a rosinality g_ema state_dict) and its numerics, but is built
only from plain torch and the literal reference op
(`refinestyle_kernels.modulated_conv2d(..., backend="reference")`, which builds the
per-sample kernels and runs one grouped conv). The toRGB skip upsampling is plain
torch here (zero insertion + padded FIR conv), not refinestyle_kernels' upfirdn2d.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from refinestyle_kernels import modulated_conv2d


def fir_kernel(taps=(1, 3, 3, 1), gain=1.0) -> torch.Tensor:
    taps = torch.tensor(taps, dtype=torch.float32)
    kernel = torch.outer(taps, taps)
    return kernel / kernel.sum() * gain


def upsample_2x(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """rosinality's Upsample: zero-insert 2x, pad (2, 1), convolve with the (x4) FIR kernel."""
    batch, channels, height, width = x.shape
    up = torch.zeros(batch, channels, 2 * height, 2 * width, dtype=x.dtype, device=x.device)
    up[:, :, ::2, ::2] = x
    up = F.pad(up, (2, 1, 2, 1))
    weight = kernel.flip(0, 1).to(x.dtype)[None, None].repeat(channels, 1, 1, 1)
    return F.conv2d(up, weight, groups=channels)


def lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2) * math.sqrt(2)


class RefLinear(nn.Module):
    def __init__(self, in_dim, out_dim, bias_init=0.0, lr_mul=1.0, activate=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.lr_mul = lr_mul
        self.activate = activate

    def forward(self, x):
        out = x @ (self.weight * (self.lr_mul / math.sqrt(self.weight.shape[1]))).t()
        out = out + self.bias * self.lr_mul
        return lrelu(out) if self.activate else out


class RefPixelNorm(nn.Module):
    def forward(self, x):
        return x / torch.sqrt((x * x).mean(1, keepdim=True) + 1e-8)


class RefConstant(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, 4, 4))


class RefBlur(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("kernel", fir_kernel(gain=4.0))


class RefModConv(nn.Module):
    def __init__(self, in_channel, out_channel, kernel_size, style_dim, demodulate=True, upsample=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        self.modulation = RefLinear(style_dim, in_channel, bias_init=1.0)
        self.demodulate = demodulate
        self.upsample = upsample
        if upsample:
            self.blur = RefBlur()

    def forward(self, x, w, p=None, q=None):
        styles = self.modulation(w)
        fan_in = self.weight.shape[2] * self.weight.shape[3] * self.weight.shape[4]
        return modulated_conv2d(
            x, self.weight[0], styles, p, q, demodulate=self.demodulate, upsample=self.upsample,
            scale=1 / math.sqrt(fan_in), backend="reference",
        )


class RefNoise(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))


class RefAct(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))


class RefStyledConv(nn.Module):
    def __init__(self, in_channel, out_channel, style_dim, upsample=False):
        super().__init__()
        self.conv = RefModConv(in_channel, out_channel, 3, style_dim, upsample=upsample)
        self.noise = RefNoise()
        self.activate = RefAct(out_channel)

    def forward(self, x, w, noise, p=None, q=None):
        out = self.conv(x, w, p, q)
        out = out + self.noise.weight * noise
        return lrelu(out + self.activate.bias[None, :, None, None])


class RefUpsample(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("kernel", fir_kernel(gain=4.0))


class RefToRGB(nn.Module):
    def __init__(self, in_channel, style_dim, upsample=True):
        super().__init__()
        if upsample:
            self.upsample = RefUpsample()
        self.conv = RefModConv(in_channel, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x, w, skip=None):
        out = self.conv(x, w) + self.bias
        if skip is not None:
            out = out + upsample_2x(skip, self.upsample.kernel)
        return out


class ReferenceGenerator(nn.Module):
    """rosinality's Generator; channels: {resolution: channels} for 4 ... size."""

    def __init__(self, size, style_dim, n_mlp, channels, lr_mlp=0.01):
        super().__init__()
        self.size, self.style_dim = size, style_dim
        self.log_size = int(math.log2(size))
        self.num_layers = (self.log_size - 2) * 2 + 1
        self.n_latent = self.log_size * 2 - 2
        self.style = nn.Sequential(
            RefPixelNorm(), *[RefLinear(style_dim, style_dim, lr_mul=lr_mlp, activate=True) for _ in range(n_mlp)]
        )
        self.input = RefConstant(channels[4])
        self.conv1 = RefStyledConv(channels[4], channels[4], style_dim)
        self.to_rgb1 = RefToRGB(channels[4], style_dim, upsample=False)
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        for i in range(self.num_layers):
            resolution = 2 ** ((i + 5) // 2)
            self.noises.register_buffer(f"noise_{i}", torch.randn(1, 1, resolution, resolution))
        in_channel = channels[4]
        for log_res in range(3, self.log_size + 1):
            out_channel = channels[2**log_res]
            self.convs.append(RefStyledConv(in_channel, out_channel, style_dim, upsample=True))
            self.convs.append(RefStyledConv(out_channel, out_channel, style_dim))
            self.to_rgbs.append(RefToRGB(out_channel, style_dim))
            in_channel = out_channel

    def randomize_(self, generator: torch.Generator) -> "ReferenceGenerator":
        """Give every zero-initialised parameter (noise strengths, biases) random values, for sharper tests."""
        with torch.no_grad():
            for name, parameter in self.named_parameters():
                if name.endswith("noise.weight") or name.endswith("activate.bias") or name.endswith("rgb1.bias") or (
                    name.startswith("to_rgbs") and name.endswith(".bias")
                ):
                    parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
                elif name.endswith("modulation.bias"):
                    parameter.copy_(1 + 0.2 * torch.randn(parameter.shape, generator=generator))
                elif name.startswith("style.") and name.endswith(".bias"):
                    parameter.copy_(10 * torch.randn(parameter.shape, generator=generator))
        return self

    def mapping(self, z):
        return self.style(z)

    def synthesis(self, w_plus, noise, tokens=None):
        """w_plus [B, n_latent, style_dim]; noise: num_layers maps; tokens: None or num_layers (p, q) pairs."""
        tokens = tokens or [(None, None)] * self.num_layers
        out = self.input.input.repeat(w_plus.shape[0], 1, 1, 1)
        out = self.conv1(out, w_plus[:, 0], noise[0], *tokens[0])
        skip = self.to_rgb1(out, w_plus[:, 1])
        i = 1
        for block, to_rgb in enumerate(self.to_rgbs):
            out = self.convs[2 * block](out, w_plus[:, i], noise[i], *tokens[i])
            out = self.convs[2 * block + 1](out, w_plus[:, i + 1], noise[i + 1], *tokens[i + 1])
            skip = to_rgb(out, w_plus[:, i + 2], skip)
            i += 2
        return skip
