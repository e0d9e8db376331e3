"""Drop-in nn.Modules for NVlabs' StyleGAN2 layers (stylegan2-ada-pytorch, stylegan3's
networks_stylegan2), on the fused op.

`NVlabsSynthesisLayer` and `NVlabsToRGBLayer` take NVlabs' constructor arguments, parameter
and buffer names (`affine.*`, `weight` [Cout, Cin, k, k], `bias`, `noise_strength`,
`noise_const`, `resample_filter`) and forward signatures, so a network unpickled with NVlabs'
own code keeps its G.mapping / G.synthesis API, its state_dict keys and its pickles'
contents after `swap_nvlabs_modules(G)`. NVlabs' math maps onto the op as follows:

    SynthesisLayer: demodulated conv of `weight` with styles = affine(w). NVlabs demodulates
        the unscaled weight with eps 1e-8; the op runs with rosinality's scale c = 1/sqrt(Cin k^2)
        and eps 1e-8 c^2, which is the same number (c cancels), and keeps RefineStyle's tokens
        meaning what they mean in our Generator (a residual next to c * weight * styles), so a
        refinement made for the generator `load_generator` converts from the same pickle
        applies unchanged. Then + noise * noise_strength, lrelu(0.2)(+ bias) * sqrt(2) * gain,
        clamp(conv_clamp * gain);
        up=2 is the transposed conv with the unflipped weight and the [1, 3, 3, 1] FIR, the
        op's upsample.
    ToRGBLayer: conv of `weight` with styles = affine(w) * 1/sqrt(Cin k^2), not demodulated,
        + bias, clamp(conv_clamp).

The layers also take RefineStyle tokens: `layer(x, w, p=p, q=q)`, or `layer.tokens = (p, q)`
for NVlabs' own SynthesisBlock, which calls its layers without them.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from refinestyle_kernels.backend import check_backend
from refinestyle_kernels.modules import (
    EqualLinear,
    _cast,
    _check_clamp,
    _check_image,
    _operand_dtype,
    _weight_as,
    adopt_tensors,
    replace_modules,
)
from refinestyle_kernels.ops.modulated_conv2d import UPSAMPLE_BLUR_TAPS, styled_conv2d

NOISE_MODES = ("random", "const", "none")
NVLABS_DEMODULATION_EPS = 1e-8  # added to the sum of squares of the unscaled modulated weight


def _fir_filter(taps: Sequence[float]) -> torch.Tensor:
    """NVlabs' upfirdn2d.setup_filter for a separable filter: the outer product, normalised to sum 1."""
    taps = torch.as_tensor(taps, dtype=torch.float32)
    kernel = torch.outer(taps, taps)
    return kernel / kernel.sum()


def _check_w(w, batch: int, w_dim: int) -> None:
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (batch, w_dim):
        got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"w: expected [B={batch}, w_dim={w_dim}], got {got}")


class NVlabsSynthesisLayer(nn.Module):
    """NVlabs' SynthesisLayer (modulated 3x3 conv + noise + bias + lrelu), one fused op.

    Arguments as NVlabs': in_channels, out_channels, w_dim, resolution (the output's side),
    kernel_size (3), up (1 or 2), use_noise, activation ('lrelu' only), resample_filter
    ([1, 3, 3, 1] only: the op's fixed FIR), conv_clamp (None or a positive float),
    channels_last (kept for the signature; the op picks its own layout). backend: the op's.

    forward(x [B, Cin, resolution/up, resolution/up], w [B, w_dim], noise_mode='random' |
    'const' | 'none', fused_modconv=True (ignored: the op is always fused), gain=1 (> 0),
    *, p=None, q=None) -> [B, Cout, resolution, resolution]. p, q: RefineStyle's scaled
    tokens ([L, Cout] / [L, Cin], or [B, L, C] per sample, x's dtype or float32), a residual
    p^T q next to `scale` * weight * styles with scale = 1/sqrt(Cin k^2), as in our Generator;
    when both are None, `self.tokens` (None or a (p, q) pair) is used. 'random' noise is drawn as NVlabs draws it
    (torch.randn([B, 1, resolution, resolution])), so seeded runs match.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        kernel_size: int = 3,
        up: int = 1,
        use_noise: bool = True,
        activation: str = "lrelu",
        resample_filter: Sequence[float] = UPSAMPLE_BLUR_TAPS,
        conv_clamp: float | None = None,
        channels_last: bool = False,
        *,
        backend: str = "auto",
    ):
        super().__init__()
        if activation != "lrelu":
            raise ValueError(f"activation: the fused op implements 'lrelu' only, got {activation!r}")
        if kernel_size != 3:
            raise ValueError(f"kernel_size: the synthesis layers' fused op takes 3, got {kernel_size}")
        if up not in (1, 2):
            raise ValueError(f"up: expected 1 or 2, got {up!r}")
        if tuple(float(t) for t in resample_filter) != tuple(float(t) for t in UPSAMPLE_BLUR_TAPS):
            raise ValueError(f"resample_filter: the fused op implements {list(UPSAMPLE_BLUR_TAPS)} only, got {resample_filter}")
        if not isinstance(resolution, int) or resolution < 1 or resolution % up:
            raise ValueError(f"resolution: expected a positive multiple of up={up}, got {resolution!r}")
        self.in_channels, self.out_channels, self.w_dim = in_channels, out_channels, w_dim
        self.resolution, self.up, self.use_noise, self.activation = resolution, up, bool(use_noise), activation
        self.conv_clamp = _check_clamp(conv_clamp)
        self.padding = kernel_size // 2
        self.act_gain = math.sqrt(2)
        self.backend = check_backend(backend)
        self.tokens: tuple[torch.Tensor, torch.Tensor] | None = None
        self.register_buffer("resample_filter", _fir_filter(resample_filter))  # NVlabs' buffer; the op applies its own
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1)  # NVlabs' FullyConnectedLayer: same names and math
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        if use_noise:
            self.register_buffer("noise_const", torch.randn(resolution, resolution))
            self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def __getstate__(self):
        # tokens made by a graph (LayerTokens' output) are no leaves, which deepcopy refuses: a
        # copy or pickle (NVlabs' training loop makes G_ema = deepcopy(G)) holds their values
        state = dict(super().__getstate__())
        if state.get("tokens") is not None:
            state["tokens"] = tuple(token.detach() for token in state["tokens"])
        return state

    @property
    def scale(self) -> float:
        """rosinality's 1/sqrt(Cin k^2): the tokens' residual sits next to scale * weight * styles."""
        return 1 / math.sqrt(self.weight.shape[1] * self.weight.shape[2] * self.weight.shape[3])

    def forward(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        noise_mode: str = "random",
        fused_modconv: bool = True,
        gain: float = 1,
        *,
        p: torch.Tensor | None = None,
        q: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode: expected one of {NOISE_MODES}, got {noise_mode!r}")
        side = self.resolution // self.up
        _check_image("x", x, self.in_channels, (side, side))
        _check_w(w, x.shape[0], self.w_dim)
        if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not gain > 0 or not math.isfinite(gain):
            raise ValueError(f"gain: expected a positive finite number, got {gain!r}")
        if p is None and q is None and self.tokens is not None:
            p, q = self.tokens
        noise = None
        if self.use_noise and noise_mode == "random":
            noise = torch.randn([x.shape[0], 1, self.resolution, self.resolution], device=x.device)
        elif self.use_noise and noise_mode == "const":
            noise = self.noise_const[None, None]
        dtype = _operand_dtype(x)
        out = styled_conv2d(
            x.to(dtype), _weight_as(self.weight, dtype), self.affine(w).to(dtype), _cast(p, dtype), _cast(q, dtype),
            noise=_cast(noise, dtype), noise_strength=self.noise_strength.to(dtype) if noise is not None else None,
            bias=self.bias.to(dtype), activate=True, clamp=self.conv_clamp, upsample=self.up == 2, scale=self.scale,
            eps=NVLABS_DEMODULATION_EPS * self.scale**2, backend=self.backend,
        )  # fmt: skip
        # NVlabs: clamp(lrelu(.) * sqrt(2) * gain, conv_clamp * gain) = gain * clamp(lrelu(.) * sqrt(2), conv_clamp)
        return out if gain == 1 else out * gain

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, w_dim={self.w_dim}, "
            f"resolution={self.resolution}, up={self.up}, activation={self.activation}, backend={self.backend!r}"
        )


class NVlabsToRGBLayer(nn.Module):
    """NVlabs' ToRGBLayer (modulated 1x1 conv, not demodulated, + bias, clamp), one fused op.

    Arguments as NVlabs': in_channels, out_channels (3), w_dim, kernel_size (1 only),
    conv_clamp, channels_last (kept for the signature). backend: the op's.
    forward(x [B, Cin, H, W], w [B, w_dim], fused_modconv=True (ignored)) -> [B, out_channels, H, W].
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        kernel_size: int = 1,
        conv_clamp: float | None = None,
        channels_last: bool = False,
        *,
        backend: str = "auto",
    ):
        super().__init__()
        if kernel_size != 1:
            raise ValueError(f"kernel_size: the toRGB's fused op takes 1, got {kernel_size}")
        self.in_channels, self.out_channels, self.w_dim = in_channels, out_channels, w_dim
        self.conv_clamp = _check_clamp(conv_clamp)
        self.backend = check_backend(backend)
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)

    def forward(self, x: torch.Tensor, w: torch.Tensor, fused_modconv: bool = True) -> torch.Tensor:
        _check_image("x", x, self.in_channels)
        _check_w(w, x.shape[0], self.w_dim)
        dtype = _operand_dtype(x)
        return styled_conv2d(
            x.to(dtype), _weight_as(self.weight, dtype), self.affine(w).to(dtype), bias=self.bias.to(dtype), activate=False,
            clamp=self.conv_clamp, demodulate=False, scale=self.weight_gain, backend=self.backend,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, w_dim={self.w_dim}, backend={self.backend!r}"


def swap_nvlabs_modules(model: nn.Module, *, backend: str = "auto") -> list[str]:
    """Replace, in place, every NVlabs SynthesisLayer and ToRGBLayer inside `model` by ours.

    For a generator built or unpickled with NVlabs' stylegan2-ada-pytorch or stylegan3 code
    (StyleGAN2 networks): it keeps its forward (G(z, c), G.synthesis(ws, noise_mode=...)),
    which calls the swapped layers with the same arguments, and runs the fused op. Each new
    layer takes over the old one's `affine` module as it is and gets its other parameters
    and buffers (load_state_dict strict=True), device, dtype, requires_grad flags and
    train/eval mode, so the state_dict keeps its keys and values.

    model: any nn.Module; searched recursively (the model itself is never replaced). A layer
        is NVlabs' by its class name (SynthesisLayer, ToRGBLayer) and attributes.
    backend: the new layers' op backend ("auto", "triton", "torch" or "reference").
    Returns the qualified names of the replaced layers, in model order. Raises TypeError for
    a layer of that name without NVlabs' parameters, ValueError for one the fused op cannot
    run (an activation other than lrelu, another resample filter, a kernel size other than
    3 / 1, up other than 1 / 2).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    check_backend(backend)
    return replace_modules(
        model,
        lambda module: type(module).__name__ in ("SynthesisLayer", "ToRGBLayer"),
        lambda name, old: _nvlabs_replacement(name, old, backend),
    )


def nvlabs_conv_layers(network: nn.Module) -> list[NVlabsSynthesisLayer]:
    """The swapped modulated 3x3 convs of an NVlabs generator (or its synthesis network), in
    rosinality's layer order: b4.conv1, b8.conv0, b8.conv1, b16.conv0, ... (17 at 1024 px), the
    order RefineStyle's refinements and adapters number their layers in.

    network: an NVlabs Generator (its `synthesis` is used) or SynthesisNetwork, after
        swap_nvlabs_modules. Raises TypeError for a network without NVlabs' b{res} blocks or
        with layers that are not swapped.
    """
    synthesis = getattr(network, "synthesis", network)
    resolutions = getattr(synthesis, "block_resolutions", None)
    if not resolutions:
        raise TypeError(f"network: expected an NVlabs Generator or SynthesisNetwork (block_resolutions), got {type(network).__name__}")
    layers = []
    for resolution in resolutions:
        block = getattr(synthesis, f"b{resolution}")
        for name in ("conv0", "conv1"):
            layer = getattr(block, name, None)
            if layer is None:
                continue
            if not isinstance(layer, NVlabsSynthesisLayer):
                raise TypeError(f"b{resolution}.{name}: a {type(layer).__name__}; call swap_nvlabs_modules(network) first")
            layers.append(layer)
    return layers


def _nvlabs_replacement(name: str, old: nn.Module, backend: str) -> nn.Module:
    weight = getattr(old, "weight", None)
    affine = getattr(old, "affine", None)
    if not (isinstance(weight, torch.Tensor) and weight.ndim == 4 and isinstance(affine, nn.Module)):
        raise TypeError(f"{name}: a {type(old).__name__} without NVlabs' weight [Cout, Cin, k, k] and affine")
    out_channels, in_channels, kernel_size, _ = weight.shape
    w_dim = affine.weight.shape[1]
    conv_clamp = getattr(old, "conv_clamp", None)
    try:
        if type(old).__name__ == "SynthesisLayer":
            if not hasattr(old, "resolution"):  # StyleGAN3's SynthesisLayer (in_size, out_size, is_torgb)
                raise TypeError(f"{name}: a {type(old).__name__} without `resolution`, not StyleGAN2's")
            new = NVlabsSynthesisLayer(
                in_channels, out_channels, w_dim, int(old.resolution), kernel_size, up=int(getattr(old, "up", 1)),
                use_noise=bool(getattr(old, "use_noise", True)), activation=getattr(old, "activation", "lrelu"),
                conv_clamp=conv_clamp, backend=backend,
            )  # fmt: skip
            filter_ = getattr(old, "resample_filter", None)
            if isinstance(filter_, torch.Tensor) and not (
                filter_.shape == new.resample_filter.shape
                and torch.allclose(filter_.detach().float().cpu(), new.resample_filter, atol=1e-6)
            ):
                raise ValueError(f"resample_filter: the fused op implements {list(UPSAMPLE_BLUR_TAPS)} only")
        else:
            new = NVlabsToRGBLayer(in_channels, out_channels, w_dim, kernel_size, conv_clamp=conv_clamp, backend=backend)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None
    new.to(device=weight.device, dtype=weight.dtype)  # first: loading into float32 would round float64 values
    new.affine = affine  # NVlabs' FullyConnectedLayer as it is (same math, its own gains)
    new.load_state_dict(old.state_dict(), strict=True)
    return adopt_tensors(old, new)
