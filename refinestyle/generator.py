"""StyleGAN2's generator (config-f), drop-in for rosinality/stylegan2-pytorch, on the fused op.

The module tree, parameter names and numerics are rosinality's (`style`, `input`,
`conv1`, `to_rgb1`, `convs`, `to_rgbs`, `noises`), so a rosinality `g_ema`
state_dict loads with strict=True and renders the same images. The layers are
refinestyle_kernels' modules: every StyledConv is one fused op, and every one can
take RefineStyle's low-rank kernel refinement (a `Refinement`, see
refinestyle.refinement). With refinement=None the generator is plain StyleGAN2.

Layer numbering: the `num_layers` modulated 3x3 convs are numbered 0 (conv1, 4x4)
then 1, 2, ... for convs[0], convs[1], ... (17 at 1024 px); the toRGB layers are
never refined. The latent code w+ has `n_latent` rows (18 at 1024 px): conv layer i
reads row i, and the toRGB after conv layer i reads row i + 1.
"""
from __future__ import annotations

import math
import operator
import random
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from refinestyle.refinement import Refinement
from refinestyle_kernels import ConstantInput, EqualLinear, PixelNorm, StyledConv, ToRGB
from refinestyle_kernels.backend import check_backend

__all__ = ["COMPILE_MODES", "Generator", "default_channels"]

# the modes of torch.compile that Generator.compile_synthesis accepts
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def default_channels(size: int, channel_multiplier: int = 2, channel_max: int | None = None) -> dict[int, int]:
    """Channels per resolution, 4 ... size: rosinality's table, capped at channel_max if given.

    512 up to 32 px, then 16384 * channel_multiplier / resolution (config-f: 512, 256,
    128, 64, 32 at 64 ... 1024 px), each at most channel_max (None: no cap, as rosinality).
    """
    table = {}
    resolution = 4
    while resolution <= size:
        channels = 512 if resolution <= 32 else 16384 * channel_multiplier // resolution
        table[resolution] = max(1, channels if channel_max is None else min(channel_max, channels))
        resolution *= 2
    return table


class Generator(nn.Module):
    """StyleGAN2 generator with rosinality's names and RefineStyle's kernel refinement.

    Args:
        size: output resolution, a power of two >= 4 (1024 for FFHQ config-f).
        style_dim: dimension of z and w (512).
        n_mlp: number of mapping layers (8).
        channel_multiplier: 2 for config-f (see `default_channels`).
        blur_kernel: FIR taps of the up-sampling filters; the fused op implements
            (1, 3, 3, 1) only.
        lr_mlp: learning-rate multiplier of the mapping layers (0.01).
        channel_max: None (rosinality's table, uncapped) or a cap on every resolution's
            channel count (NVlabs caps at 512; tests build tiny generators such as
            Generator(32, style_dim=32, n_mlp=2, channel_max=16)).
        channels: explicit {resolution: channels} for 4 ... size, overriding the table
            (used by the checkpoint loader for NVlabs tables that rosinality's formula
            cannot express).
        backend: the op's backend for every conv: "auto" (triton on CUDA, torch on CPU),
            "triton", "torch" or "reference". Settable later via `generator.backend`.

    Attributes: size, style_dim, n_mlp, log_size, num_layers (modulated convs, 17 at
    1024 px), n_latent (rows of w+, 18 at 1024 px), channels ({resolution: C}),
    latent_avg (None, or the checkpoint's mean w [style_dim]; a non-persistent buffer that
    moves with .to() but is not part of the state_dict, so g_ema state_dicts load strictly),
    conv_clamp (None, or NVlabs' conv_clamp applied after every conv and toRGB).
    """

    def __init__(
        self,
        size: int,
        style_dim: int = 512,
        n_mlp: int = 8,
        channel_multiplier: int = 2,
        blur_kernel: Sequence[float] = (1, 3, 3, 1),
        lr_mlp: float = 0.01,
        *,
        channel_max: int | None = None,
        channels: Optional[Mapping[int, int]] = None,
        backend: str = "auto",
    ):
        super().__init__()
        if not isinstance(size, int) or size < 4 or size & (size - 1):
            raise ValueError(f"size: expected a power of two >= 4, got {size!r}")
        if not isinstance(style_dim, int) or style_dim < 1:
            raise ValueError(f"style_dim: expected a positive integer, got {style_dim!r}")
        if not isinstance(n_mlp, int) or n_mlp < 1:
            raise ValueError(f"n_mlp: expected a positive integer, got {n_mlp!r}")
        if channel_max is not None and (isinstance(channel_max, bool) or not isinstance(channel_max, int) or channel_max < 1):
            raise ValueError(f"channel_max: expected None or a positive integer, got {channel_max!r}")
        backend = check_backend(backend)
        blur_kernel = tuple(blur_kernel)

        self.size = size
        self.style_dim = style_dim
        self.n_mlp = n_mlp
        self.lr_mlp = lr_mlp
        self.channel_multiplier = channel_multiplier
        self.blur_kernel = blur_kernel
        self.log_size = int(math.log2(size))
        self.num_layers = (self.log_size - 2) * 2 + 1
        self.n_latent = self.log_size * 2 - 2

        if channels is None:
            self.channels = default_channels(size, channel_multiplier, channel_max)
        else:
            expected = [2**i for i in range(2, self.log_size + 1)]
            given = {int(res): int(ch) for res, ch in channels.items()}
            if sorted(given) != expected or min(given.values()) < 1:
                raise ValueError(
                    f"channels: expected positive channel counts for resolutions {expected}, got {dict(channels)}"
                )
            self.channels = given

        self.style = nn.Sequential(
            PixelNorm(),
            *[EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activation="fused_lrelu") for _ in range(n_mlp)],
        )

        self.input = ConstantInput(self.channels[4])
        self.conv1 = StyledConv(
            self.channels[4], self.channels[4], 3, style_dim, blur_kernel=blur_kernel, backend=backend
        )
        self.to_rgb1 = ToRGB(self.channels[4], style_dim, upsample=False, backend=backend)

        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        for layer_index in range(self.num_layers):
            resolution = 2 ** ((layer_index + 5) // 2)
            self.noises.register_buffer(f"noise_{layer_index}", torch.randn(1, 1, resolution, resolution))

        in_channel = self.channels[4]
        for log_resolution in range(3, self.log_size + 1):
            out_channel = self.channels[2**log_resolution]
            self.convs.append(
                StyledConv(
                    in_channel, out_channel, 3, style_dim, upsample=True, blur_kernel=blur_kernel, backend=backend
                )
            )
            self.convs.append(StyledConv(out_channel, out_channel, 3, style_dim, blur_kernel=blur_kernel, backend=backend))
            self.to_rgbs.append(ToRGB(out_channel, style_dim, blur_kernel=blur_kernel, backend=backend))
            in_channel = out_channel

        # the checkpoint's mean w (set by refinestyle.load_generator); not in the state_dict
        self.register_buffer("latent_avg", None, persistent=False)
        self._conv_clamp: Optional[float] = None
        # "rosinality", "safetensors" or "nvlabs" when built by refinestyle.load_generator
        self.checkpoint_format: Optional[str] = None

    # ------------------------------------------------------------------ configuration
    @property
    def backend(self) -> str:
        """The op backend of the conv layers ("auto", "triton", "torch" or "reference")."""
        return self.conv1.backend

    @backend.setter
    def backend(self, value: str) -> None:
        check_backend(value)
        for module in (self.conv1, self.to_rgb1, *self.convs, *self.to_rgbs):
            module.backend = value

    @property
    def conv_clamp(self) -> Optional[float]:
        """NVlabs' conv_clamp: None, or clamp every conv and toRGB output to [-conv_clamp, conv_clamp]."""
        return self._conv_clamp

    @conv_clamp.setter
    def conv_clamp(self, value: Optional[float]) -> None:
        if value is not None and not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"conv_clamp: expected None or a positive number, got {value!r}")
        self._conv_clamp = None if value is None else float(value)
        for layer in [*self.conv_layers(), self.to_rgb1, *self.to_rgbs]:
            layer.clamp = self._conv_clamp

    def conv_layers(self) -> list[StyledConv]:
        """The num_layers modulated StyledConv modules in layer order: conv1, convs[0], convs[1], ..."""
        return [self.conv1, *self.convs]

    def layer_shapes(self, num_refined: Optional[int] = None) -> list[tuple[int, int]]:
        """(Cin, Cout) of the last `num_refined` conv layers (all num_layers of them when None)."""
        if num_refined is None:
            num_refined = self.num_layers
        if not isinstance(num_refined, int) or not 1 <= num_refined <= self.num_layers:
            raise ValueError(f"num_refined: expected an integer in [1, {self.num_layers}], got {num_refined!r}")
        shapes = [(conv.conv.in_channel, conv.conv.out_channel) for conv in self.conv_layers()]
        return shapes[self.num_layers - num_refined :]

    def compile_synthesis(self, mode: Optional[str] = "default", **compile_options) -> "Generator":
        """Compile `synthesis` with torch.compile, in place; returns self.

        Later calls of `synthesis`, and of `forward`, which renders through it, run the compiled
        network. Inductor fuses the small ops between the layers (the style affines, the skip
        upsampling, the adds). The modulated convs stay this package's custom ops, so the Triton
        backend keeps its own kernels. The first call with each new input shape, autocast state
        or grad mode compiles (tens of seconds). The weights and the state_dict do not change;
        `del generator.synthesis` goes back to the eager network, and a copy (copy.deepcopy) or
        pickle of the generator renders eagerly.

        mode: torch.compile's mode, one of COMPILE_MODES, or None. "reduce-overhead" also replays
            the network as CUDA graphs on a GPU, which takes away the host time of launching the
            kernels one by one; an output then lives only until the next call of the same graph.
        compile_options: further keyword arguments of torch.compile (backend, dynamic, options).
            torch.compile takes a mode or Inductor `options`, not both: with `options`, mode
            must be None or "default" (which is what no mode means).
        """
        if mode is not None and mode not in COMPILE_MODES:
            raise ValueError(f"mode: expected None or one of {', '.join(COMPILE_MODES)}, got {mode!r}")
        if compile_options.get("options") is not None:
            if mode not in (None, "default"):
                raise ValueError(f"mode: torch.compile takes a mode or options, not both; got mode={mode!r}")
            mode = None
        if mode is not None:
            compile_options["mode"] = mode
        # the class's function bound to self: compiling twice never wraps a compiled callable
        self.synthesis = torch.compile(type(self).synthesis.__get__(self), **compile_options)
        return self

    @property
    def synthesis_is_compiled(self) -> bool:
        """Whether `compile_synthesis` is in effect."""
        return "synthesis" in self.__dict__

    def __getstate__(self):
        # a compiled synthesis is bound to this instance: copies and pickles render eagerly
        state = dict(super().__getstate__())
        state.pop("synthesis", None)
        return state

    # ------------------------------------------------------------------ latents and noise
    def _device(self) -> torch.device:
        return self.input.input.device

    def make_noise(self) -> list[Tensor]:
        """Fresh standard normal noise maps, one [1, 1, r, r] per conv layer (rosinality's make_noise)."""
        device = self._device()
        noises = [torch.randn(1, 1, 4, 4, device=device)]
        for log_resolution in range(3, self.log_size + 1):
            for _ in range(2):
                noises.append(torch.randn(1, 1, 2**log_resolution, 2**log_resolution, device=device))
        return noises

    def mean_latent(self, n_latent: int) -> Tensor:
        """The mean w of `n_latent` random z: [1, style_dim] (rosinality's truncation_latent)."""
        if not isinstance(n_latent, int) or n_latent < 1:
            raise ValueError(f"n_latent: expected a positive integer, got {n_latent!r}")
        parameter = self.input.input
        latent_in = torch.randn(n_latent, self.style_dim, device=parameter.device, dtype=parameter.dtype)
        return self.style(latent_in).mean(0, keepdim=True)

    def get_latent(self, input: Tensor) -> Tensor:
        """w = mapping(z): z [B, style_dim] -> w [B, style_dim]."""
        if not isinstance(input, Tensor) or input.ndim != 2 or input.shape[1] != self.style_dim:
            shape = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
            raise ValueError(f"input: expected z [B, {self.style_dim}], got {shape}")
        return self.style(input)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        styles: Sequence[Tensor],
        return_latents: bool = False,
        inject_index: Optional[int] = None,
        truncation: float = 1,
        truncation_latent: Optional[Tensor] = None,
        input_is_latent: bool = False,
        noise: Optional[Sequence[Optional[Tensor]]] = None,
        randomize_noise: bool = True,
        refinement: Optional[Refinement] = None,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """Render images, exactly as rosinality's Generator.forward (plus `refinement`).

        Args:
            styles: a list of one or two tensors: z [B, style_dim] (mapped through `style`),
                or with input_is_latent w [B, style_dim] or w+ [B, n_latent, style_dim].
                Two codes mix styles: rows < inject_index from the first, the rest from the second.
            return_latents: also return the w+ code used.
            inject_index: the mixing row for two codes (random in [1, n_latent - 1] when None).
            truncation: psi; below 1 every code is pulled towards truncation_latent.
            truncation_latent: [1, style_dim] or [style_dim] mean w; defaults to `latent_avg`
                when the checkpoint carried one.
            input_is_latent: styles are w / w+ codes rather than z.
            noise: None or num_layers noise maps, each [B or 1, 1, r, r] (None entries draw
                random noise).
            randomize_noise: with noise=None, draw fresh noise (True) or use the stored
                `noises.noise_i` buffers (False).
            refinement: None (plain StyleGAN2) or a Refinement whose tokens refine the last
                refinement.num_refined conv layers; shared or with batch size B.

        Returns:
            (image [B, 3, size, size], w+ [B, n_latent, style_dim] if return_latents else None).
        """
        if isinstance(styles, Tensor) or not isinstance(styles, (list, tuple)):
            raise TypeError(
                "styles: expected a list of one or two tensors, e.g. generator([z]); got "
                f"{type(styles).__name__}"
            )
        if not 1 <= len(styles) <= 2:
            raise ValueError(f"styles: expected one or two codes (style mixing), got {len(styles)}")
        batch = None
        for index, style in enumerate(styles):
            if not isinstance(style, Tensor):
                raise TypeError(f"styles[{index}]: expected a tensor, got {type(style).__name__}")
            allowed = "[B, style_dim] or [B, n_latent, style_dim]" if input_is_latent else "[B, style_dim]"
            if style.shape[-1:] != (self.style_dim,) or style.ndim not in ((2, 3) if input_is_latent else (2,)):
                raise ValueError(
                    f"styles[{index}]: expected {allowed} with style_dim={self.style_dim}, got {tuple(style.shape)}"
                )
            if style.ndim == 3 and style.shape[1] != self.n_latent:
                raise ValueError(
                    f"styles[{index}]: expected w+ [B, n_latent={self.n_latent}, {self.style_dim}], got "
                    f"{tuple(style.shape)}"
                )
            if batch is not None and style.shape[0] != batch:
                raise ValueError(f"styles: all codes need the same batch size, got {[tuple(s.shape) for s in styles]}")
            batch = style.shape[0]

        if not input_is_latent:
            styles = [self.style(s) for s in styles]

        if truncation < 1:
            if truncation_latent is None:
                truncation_latent = self.latent_avg
            if truncation_latent is None:
                raise ValueError(
                    "truncation_latent: required for truncation < 1 (e.g. generator.mean_latent(4096)); this "
                    "generator has no latent_avg"
                )
            if not isinstance(truncation_latent, Tensor):
                raise TypeError(f"truncation_latent: expected a tensor, got {type(truncation_latent).__name__}")
            if truncation_latent.shape[-1] != self.style_dim or truncation_latent.numel() != self.style_dim:
                raise ValueError(
                    f"truncation_latent: expected [1, {self.style_dim}] or [{self.style_dim}], got "
                    f"{tuple(truncation_latent.shape)}"
                )
            styles = [truncation_latent + truncation * (style - truncation_latent) for style in styles]

        if len(styles) < 2:
            inject_index = self.n_latent
            latent = styles[0] if styles[0].ndim == 3 else styles[0].unsqueeze(1).repeat(1, inject_index, 1)
        else:
            if any(style.ndim == 3 for style in styles):
                raise ValueError("styles: style mixing takes two [B, style_dim] codes, not w+ codes")
            if inject_index is None:
                inject_index = random.randint(1, self.n_latent - 1)
            try:  # any integer (a NumPy or 0-d torch one too), not a float
                inject_index = operator.index(inject_index)
            except TypeError:
                raise TypeError(f"inject_index: expected an int, got {type(inject_index).__name__}") from None
            if not 0 <= inject_index <= self.n_latent:
                raise ValueError(f"inject_index: expected an integer in [0, {self.n_latent}], got {inject_index}")
            latent = torch.cat(
                [
                    styles[0].unsqueeze(1).repeat(1, inject_index, 1),
                    styles[1].unsqueeze(1).repeat(1, self.n_latent - inject_index, 1),
                ],
                1,
            )

        image = self.synthesis(latent, refinement=refinement, noise=noise, randomize_noise=randomize_noise)
        return image, (latent if return_latents else None)

    def synthesis(
        self,
        w_plus: Tensor,
        refinement: Optional[Refinement] = None,
        noise: Optional[Sequence[Optional[Tensor]]] = None,
        randomize_noise: bool = True,
    ) -> Tensor:
        """Render a w+ code: w_plus [B, n_latent, style_dim] -> image [B, 3, size, size].

        refinement, noise, randomize_noise: as in `forward`.
        """
        if not isinstance(w_plus, Tensor) or w_plus.ndim != 3 or tuple(w_plus.shape[1:]) != (
            self.n_latent,
            self.style_dim,
        ):
            shape = tuple(w_plus.shape) if isinstance(w_plus, Tensor) else type(w_plus).__name__
            raise ValueError(f"w_plus: expected [B, n_latent={self.n_latent}, style_dim={self.style_dim}], got {shape}")
        batch = w_plus.shape[0]
        if refinement is not None:
            if not isinstance(refinement, Refinement):
                raise TypeError(f"refinement: expected a Refinement or None, got {type(refinement).__name__}")
            refinement.check_layer_shapes(self.layer_shapes(), batch_size=batch)
        noise = self._noise_list(noise, randomize_noise, batch)

        def tokens(index: int):
            return (None, None) if refinement is None else refinement.for_layer(index)

        out = self.input(w_plus)
        # one view per w+ row; unbind's backward stacks the rows' gradients in one launch, where
        # indexing each row adds a zero-filled gradient per row and sums them one by one
        styles = w_plus.unbind(1)
        p, q = tokens(0)
        # each block's last conv and its toRGB run as one op (StyledConv.forward_to_rgb): out
        # feeds both, and the fused backward adds its two gradients without a pass over memory
        out, skip = self.conv1.forward_to_rgb(self.to_rgb1, out, styles[0], styles[1], noise=noise[0], p=p, q=q)

        row = 1
        for block, to_rgb in enumerate(self.to_rgbs):
            up_conv, conv = self.convs[2 * block], self.convs[2 * block + 1]
            p, q = tokens(row)
            out = up_conv(out, styles[row], noise=noise[row], p=p, q=q)
            p, q = tokens(row + 1)
            out, skip = conv.forward_to_rgb(
                to_rgb, out, styles[row + 1], styles[row + 2], skip, noise=noise[row + 1], p=p, q=q
            )
            row += 2
        return skip

    def _noise_list(self, noise, randomize_noise: bool, batch: int) -> list[Optional[Tensor]]:
        if noise is None:
            if randomize_noise:
                return [None] * self.num_layers
            return [getattr(self.noises, f"noise_{i}") for i in range(self.num_layers)]
        if isinstance(noise, Tensor) or len(noise) != self.num_layers:
            raise ValueError(f"noise: expected a list of num_layers={self.num_layers} noise maps (or None)")
        checked = []
        for index, item in enumerate(noise):
            resolution = 2 ** ((index + 5) // 2)
            if item is not None and (
                not isinstance(item, Tensor)
                or item.ndim != 4
                or item.shape[0] not in (1, batch)
                or tuple(item.shape[1:]) != (1, resolution, resolution)
            ):
                shape = tuple(item.shape) if isinstance(item, Tensor) else type(item).__name__
                raise ValueError(f"noise[{index}]: expected [B={batch} or 1, 1, {resolution}, {resolution}], got {shape}")
            checked.append(item)
        return checked

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, style_dim={self.style_dim}, n_mlp={self.n_mlp}, num_layers={self.num_layers}, "
            f"n_latent={self.n_latent}, backend={self.backend!r}"
        )
