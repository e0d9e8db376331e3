"""refinestyle-kernels: StyleGAN2's modulated convolution with RefineStyle's low-rank
kernel residuals, fused in Triton, with a literal reference and a plain-PyTorch path.

Importing never needs a GPU, nvcc or a working Triton: the Triton kernels are
compiled on first use on CUDA tensors.
"""
from refinestyle_kernels.backend import BACKENDS, get_backend, resolve_backend, set_backend, use_backend
from refinestyle_kernels.modules import (
    Blur,
    ConstantInput,
    EqualLinear,
    FusedLeakyReLU,
    LayerTokens,
    ModulatedConv2d,
    NoiseInjection,
    PixelNorm,
    StyledConv,
    ToRGB,
    Upsample,
    swap_rosinality_modules,
)
from refinestyle_kernels.nvlabs import NVlabsSynthesisLayer, NVlabsToRGBLayer, nvlabs_conv_layers, swap_nvlabs_modules
from refinestyle_kernels.ops.bias_act import fused_leaky_relu
from refinestyle_kernels.ops.modulated_conv2d import (
    clear_weight_cache,
    demodulation_coefficients,
    modulated_conv2d,
    styled_conv2d,
)
from refinestyle_kernels.ops.styled_conv2d_to_rgb import styled_conv2d_to_rgb
from refinestyle_kernels.ops.upfirdn2d import make_blur_kernel, upfirdn2d
from refinestyle_kernels.ops.upsample_add import upsample_add

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "Blur",
    "ConstantInput",
    "EqualLinear",
    "FusedLeakyReLU",
    "LayerTokens",
    "ModulatedConv2d",
    "NoiseInjection",
    "PixelNorm",
    "StyledConv",
    "ToRGB",
    "Upsample",
    "clear_weight_cache",
    "demodulation_coefficients",
    "fused_leaky_relu",
    "get_backend",
    "make_blur_kernel",
    "modulated_conv2d",
    "resolve_backend",
    "set_backend",
    "styled_conv2d",
    "styled_conv2d_to_rgb",
    "swap_rosinality_modules",
    "swap_nvlabs_modules",
    "NVlabsSynthesisLayer",
    "NVlabsToRGBLayer",
    "nvlabs_conv_layers",
    "upfirdn2d",
    "upsample_add",
    "use_backend",
]
