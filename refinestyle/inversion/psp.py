"""Pretrained pSp and e4e encoders as first stages (the paper's Table 5 ablation, HyperStyle's setting).

The paper's two-stage model refines the w+ of any pretrained inverter, and its Table 5 runs
it on pSp (Richardson et al., CVPR 2021), e4e (Tov et al., SIGGRAPH 2021) and Style
Transformer. pSp's GradualStyleEncoder and e4e's Encoder4Editing share one architecture:
an IR-SE50 trunk, the pSp feature pyramid (our FeaturePyramidEncoder), and one "gradual
style block" per w+ row (stride-2 3x3 convs with LeakyReLU(0.01) down to 1 x 1, then an
equalised linear layer). They differ in how the rows combine:

    pSp:  w+[i] = block_i(level(i))                        (+ latent_avg)
    e4e:  w+[i] = block_0(coarse) + block_i(level(i)) for i > 0, w+[0] = block_0(coarse)
                                                            (+ latent_avg)

with level(i) the coarse map for rows 0-2, the medium map for rows 3-6 and the fine map
for the rest. Checkpoints (`psp_ffhq_encode.pt`, `e4e_ffhq_encode.pt`, ...) are
`{"state_dict": {"encoder.*", "decoder.*"}, "latent_avg": ..., "opts": {...}}`; the names map as

    encoder.input_layer.* / body.*   -> input_layer.* / body.*  (the IR-SE trunk)
    encoder.latlayer1 (256 -> 512)   -> lateral_medium
    encoder.latlayer2 (128 -> 512)   -> lateral_fine
    encoder.styles.{i}.convs.* / .linear.{weight,bias}  -> styles.{i}.* (same names)
    latent_avg [512] or [n_latent, 512]                 -> latent_avg [n_latent, 512]

`opts["encoder_type"]` tells pSp ("GradualStyleEncoder") from e4e ("Encoder4Editing"). The
generator must be the one the encoder was trained with: when the checkpoint carries it
(`decoder.*`), `load_psp` checks it against the generator it is given, and the checkpoint
itself is a valid `--generator` (refinestyle.load_generator reads pSp/e4e files).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from refinestyle.imageio import image_size_hw
from refinestyle.inversion.encoder import IR_SE50_WIDTHS, FeaturePyramidEncoder
from refinestyle.weights import require_file, state_dict_mismatch
from refinestyle_kernels.modules import EqualLinear

__all__ = ["PSP_KINDS", "GradualStyleBlock", "PSPEncoder", "load_psp", "psp_state_dict", "trunk_layout"]

PSP_KINDS = ("psp", "e4e")
_ENCODER_TYPES = {"GradualStyleEncoder": "psp", "Encoder4Editing": "e4e"}
# Rows 0-2 read the coarse map, 3-6 the medium one, the rest the fine one (both papers).
COARSE_ROWS, MEDIUM_ROWS_END = 3, 7


class GradualStyleBlock(nn.Module):
    """One w+ row from a feature map: log2(spatial) stride-2 3x3 convs, each followed by
    LeakyReLU(0.01) (PyTorch's default slope, as pSp), down to 1 x 1, then an equalised
    linear layer (weight * 1/sqrt(channels), lr multiplier 1).

    forward(features [B, channels, h, w]) -> [B, channels], h and w in (spatial / 2, spatial]
    (the convs bring them to 1 x 1: 16 x 16 and Cars' 12 x 16 alike, as in pSp).
    """

    def __init__(self, channels: int, spatial: int):
        super().__init__()
        if spatial < 2 or spatial & (spatial - 1):
            raise ValueError(f"spatial: expected a power of two >= 2, got {spatial}")
        self.channels, self.spatial = channels, spatial
        layers: list[nn.Module] = []
        for _ in range(int(math.log2(spatial))):
            layers += [nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.LeakyReLU()]
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(channels, channels)  # lr multiplier 1, pSp's names

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 4 or not all(self.spatial // 2 < side <= self.spatial for side in features.shape[-2:]):
            raise ValueError(
                f"features: expected [B, {self.channels}, h, w] with h and w in ({self.spatial // 2}, {self.spatial}], "
                f"got {tuple(features.shape)}"
            )
        return self.linear(self.convs(features).flatten(1))


class PSPEncoder(FeaturePyramidEncoder):
    """pSp's or e4e's encoder: images -> w+, optionally around a mean code.

    kind: "psp" (every row from its own block) or "e4e" (row 0's code plus a per-row delta).
    n_latent: rows of w+ (18 for a 1024 px generator: 2 * log2(size) - 2).
    style_dim: width of w (512); the trunk's last stage must have as many channels.
    depth, widths: the IR-SE trunk (IR-SE50 and the ArcFace widths for the released models;
        small ones make tests fast).
    input_size: what images are resized to before the trunk: an int side (256, as both
        papers) or (height, width), (192, 256) for their Stanford Cars models.
    start_from_latent_avg: add `latent_avg` to the encoder's output (True for the released
        inversion models).

    Buffers: latent_avg [n_latent, style_dim] (zeros until loaded).
    forward(images [B, 3, H, W] float in [-1, 1], any H, W) -> w+ [B, n_latent, style_dim].
    `config()` is the JSON-able dict that rebuilds the module (`PSPEncoder(**config)`).
    """

    def __init__(
        self,
        kind: str,
        n_latent: int,
        style_dim: int = 512,
        *,
        depth: int | Sequence[int] = 50,
        widths: Sequence[int] = IR_SE50_WIDTHS,
        input_size: int | tuple[int, int] = 256,
        start_from_latent_avg: bool = True,
    ):
        if kind not in PSP_KINDS:
            raise ValueError(f"kind: expected one of {PSP_KINDS}, got {kind!r}")
        if not isinstance(n_latent, int) or n_latent < 1:
            raise ValueError(f"n_latent: expected a positive integer, got {n_latent!r}")
        try:
            height, width = image_size_hw(input_size, "input_size")
        except TypeError as error:
            raise ValueError(str(error)) from None
        if min(height, width) < 32 or height % 16 or width % 16:
            raise ValueError(f"input_size: expected sides that are multiples of 16 of at least 32, got {input_size!r}")
        super().__init__(3, None, style_dim, depth=depth, widths=widths)
        if self.widths[3] != style_dim:
            raise ValueError(f"widths: the last stage must have style_dim={style_dim} channels, got {self.widths[3]}")
        self.kind, self.n_latent, self.style_dim = kind, n_latent, style_dim
        self.input_size = height if height == width else (height, width)
        self.start_from_latent_avg = bool(start_from_latent_avg)
        # pSp sizes every block for the longer side (16 at 256 px; Cars' 12 x 16 maps too)
        coarse_side = max(height, width) // 16  # the medium map has twice its side, the fine map four times
        self.styles = nn.ModuleList(
            GradualStyleBlock(style_dim, coarse_side * 2 ** self._level(row)) for row in range(n_latent)
        )
        self.register_buffer("latent_avg", torch.zeros(n_latent, style_dim))

    @staticmethod
    def _level(row: int) -> int:
        """The feature map w+ row `row` reads: 0 coarse, 1 medium, 2 fine."""
        return 0 if row < COARSE_ROWS else 1 if row < MEDIUM_ROWS_END else 2

    def config(self) -> dict:
        return dict(
            kind=self.kind, n_latent=self.n_latent, style_dim=self.style_dim, depth=list(self.stage_units),
            widths=list(self.widths), input_size=self.input_size, start_from_latent_avg=self.start_from_latent_avg,
        )  # fmt: skip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected [B, 3, H, W], got {tuple(images.shape)}")
        size = image_size_hw(self.input_size)
        if images.shape[-2:] != size:
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
        levels = self.feature_maps(images)  # coarse, medium, fine
        rows = [block(levels[self._level(row)]) for row, block in enumerate(self.styles)]
        if self.kind == "e4e":
            rows = [rows[0]] + [rows[0] + delta for delta in rows[1:]]
        codes = torch.stack(rows, dim=1)
        if self.start_from_latent_avg:
            codes = codes + self.latent_avg.to(codes.dtype)
        return codes


def picture_size_of(opts: dict, side: int) -> int | tuple[int, int]:
    """What a pSp-family checkpoint (pSp, e4e, Style Transformer, HyperStyle) reads its pictures
    at, given the side its encoder was built for: `side`, or (3/4 side, side) for a Stanford
    Cars model, whose `opts["dataset_type"]` names cars (they Resize((192, 256)))."""
    return (side * 3 // 4, side) if "cars" in str(opts.get("dataset_type", "")) else side


def psp_state_dict(checkpoint: dict, n_latent: int | None = None) -> tuple[str, dict[str, torch.Tensor], dict]:
    """Map a pSp / e4e checkpoint dict onto PSPEncoder names.

    checkpoint: the loaded file ({"state_dict": ..., "latent_avg": ..., "opts": ...}).
    n_latent: rows of w+ expected (checked against the file's style blocks) or None.
    Returns (kind, state, options): `state` holds PSPEncoder's parameters and buffers (the
    latent_avg buffer included, [n_latent, style_dim]; zeros when the file has none),
    `options` the PSPEncoder keyword arguments read from the file (n_latent, style_dim,
    start_from_latent_avg; the trunk's layout: `trunk_layout(state)`). Raises ValueError for another encoder type, an input other than
    RGB, or a file that is not a pSp / e4e checkpoint.
    """
    source = checkpoint.get("state_dict", checkpoint)
    if not isinstance(source, dict):
        raise ValueError("not a pSp / e4e checkpoint: no state_dict")
    encoder = {}
    for key, value in source.items():
        if key.startswith("encoder."):
            rest = key[len("encoder."):]
            encoder[rest[len("module."):] if rest.startswith("module.") else rest] = value
    opts = checkpoint.get("opts") if isinstance(checkpoint.get("opts"), dict) else {}
    encoder_type = opts.get("encoder_type")
    if encoder_type is not None and encoder_type not in _ENCODER_TYPES:
        raise ValueError(
            f"pSp / e4e encoder_type {encoder_type!r} is not supported (only GradualStyleEncoder and Encoder4Editing: "
            "w+ per row)"
        )
    if not any(key.startswith("styles.") for key in encoder) or "latlayer1.weight" not in encoder:
        raise ValueError("not a pSp / e4e checkpoint: no encoder.styles.* / encoder.latlayer1 entries")
    if encoder_type is None:
        raise ValueError("a pSp / e4e checkpoint without opts['encoder_type'] cannot tell pSp from e4e")
    if opts.get("input_nc", 3) != 3 or opts.get("label_nc", 0):
        raise ValueError(
            f"this pSp model takes {opts.get('input_nc')}-channel inputs (label_nc {opts.get('label_nc', 0)}): "
            "a first stage must invert RGB images"
        )
    rows = 1 + max(int(key.split(".")[1]) for key in encoder if key.startswith("styles."))
    if n_latent is not None and rows != n_latent:
        raise ValueError(f"the encoder predicts {rows} w+ rows, the generator has n_latent={n_latent}")
    state = {}
    for key, value in encoder.items():
        if key.startswith(("input_layer.", "body.", "styles.")):
            state[key] = value
    for ours, theirs in (("lateral_medium", "latlayer1"), ("lateral_fine", "latlayer2")):
        for kind in ("weight", "bias"):
            state[f"{ours}.{kind}"] = encoder[f"{theirs}.{kind}"]
    style_dim = encoder["styles.0.linear.weight"].shape[0]
    latent_avg = checkpoint.get("latent_avg")
    start_from_latent_avg = bool(opts.get("start_from_latent_avg", isinstance(latent_avg, torch.Tensor)))
    if isinstance(latent_avg, torch.Tensor):
        latent_avg = latent_avg.float().reshape(-1, latent_avg.shape[-1])
        if latent_avg.shape[0] == 1:
            latent_avg = latent_avg.expand(rows, -1)
        if tuple(latent_avg.shape) != (rows, style_dim):
            raise ValueError(f"latent_avg: expected [{style_dim}] or [{rows}, {style_dim}], got {tuple(latent_avg.shape)}")
        state["latent_avg"] = latent_avg.contiguous()
    elif start_from_latent_avg:
        raise ValueError("the checkpoint starts from latent_avg (opts['start_from_latent_avg']) but holds none")
    else:
        state["latent_avg"] = torch.zeros(rows, style_dim)
    options = dict(n_latent=rows, style_dim=style_dim, start_from_latent_avg=start_from_latent_avg)
    return _ENCODER_TYPES[encoder_type], state, options


def trunk_layout(state: dict[str, torch.Tensor]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(units per stage, channels per stage) of the IR-SE trunk, read from its weights: a
    stage is a run of units with the same output channels (IR-SE50: 3, 4, 14, 3 units of
    64, 128, 256, 512). Raises ValueError when that does not give four stages (two
    neighbouring stages of equal width cannot be told apart)."""
    widths_per_unit = []
    while f"body.{len(widths_per_unit)}.res_layer.1.weight" in state:
        widths_per_unit.append(state[f"body.{len(widths_per_unit)}.res_layer.1.weight"].shape[0])
    runs: list[list[int]] = []
    for width in widths_per_unit:
        if runs and runs[-1][0] == width:
            runs[-1][1] += 1
        else:
            runs.append([width, 1])
    if len(runs) != 4:
        raise ValueError(
            f"the encoder's trunk is not four stages of distinct widths (unit widths {widths_per_unit}); "
            "pass encoder_depth= and encoder_widths="
        )
    return tuple(count for _, count in runs), tuple(width for width, _ in runs)


def _check_decoder(checkpoint: dict, generator: nn.Module, path: Path) -> None:
    """The checkpoint's decoder.* (when stored) must be the generator's weights."""
    source = checkpoint.get("state_dict", checkpoint)
    decoder = {key[len("decoder."):]: value for key, value in source.items() if key.startswith("decoder.")}
    if not decoder:
        return
    own = generator.state_dict()
    for key, value in decoder.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if key in own and "noise" not in key:
            if own[key].shape != value.shape or not torch.allclose(own[key].detach().float().cpu(), value.float(), atol=1e-6):
                raise ValueError(
                    f"{path}: the encoder was trained with another generator ({key} differs from the generator given); "
                    f"pass the generator it was trained with (the checkpoint itself loads as one: --generator {path})"
                )


def load_psp(
    path: str | os.PathLike,
    generator: nn.Module,
    *,
    encoder_depth: int | Sequence[int] | None = None,
    encoder_widths: Sequence[int] | None = None,
    input_size: int | tuple[int, int] | None = None,
) -> PSPEncoder:
    """A pretrained pSp or e4e checkpoint as a PSPEncoder (images -> w+).

    path: the checkpoint (`psp_ffhq_encode.pt`, `e4e_ffhq_encode.pt`, ... torch format).
    generator: the refinestyle.Generator the encoder was trained with; its n_latent must
        match the encoder's rows, and the checkpoint's stored decoder (when present) must
        equal its weights.
    encoder_depth, encoder_widths: the IR-SE trunk; None reads it from the weights (IR-SE50
        for the released models).
    input_size: what images are resized to (an int side or (height, width)); None reads the
        side from the coarse style blocks' conv count (256 for the released models: 4 convs
        from 16 x 16 to 1 x 1) and, for a Cars model (`opts["dataset_type"]` naming cars),
        takes 3/4 of it as the height: 192 x 256, as pSp and e4e read Stanford Cars.
    Returns the encoder in eval mode on the generator's device, with requires_grad False.
    Raises FileNotFoundError for a missing file, ValueError for a foreign or mismatching one.
    """
    path = Path(path)
    require_file(
        path, "pSp / e4e checkpoint",
        " (the released models are linked from github.com/eladrich/pixel2style2pixel and github.com/omertov/encoder4editing)",
    )  # fmt: skip
    try:
        # The file also holds the training options (plain Python values).
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        raise ValueError(f"{path}: not a readable torch checkpoint ({error})") from error
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: not a pSp / e4e checkpoint (a {type(checkpoint).__name__}, not a dict)")
    try:
        kind, state, options = psp_state_dict(checkpoint, generator.n_latent)
        if encoder_depth is None or encoder_widths is None:
            depth, widths = trunk_layout(state)
            encoder_depth = depth if encoder_depth is None else encoder_depth
            encoder_widths = widths if encoder_widths is None else encoder_widths
        if input_size is None:
            convs = sum(1 for key in state if key.startswith("styles.0.convs.") and key.endswith(".weight"))
            opts = checkpoint.get("opts") if isinstance(checkpoint.get("opts"), dict) else {}
            # the coarse map (input / 16) halves to 1 x 1 in `convs` steps
            input_size = picture_size_of(opts, 16 * 2**convs)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    if options["style_dim"] != generator.style_dim:
        raise ValueError(f"{path}: the encoder predicts w of width {options['style_dim']}, the generator's is {generator.style_dim}")
    _check_decoder(checkpoint, generator, path)
    model = PSPEncoder(kind, **options, depth=encoder_depth, widths=encoder_widths, input_size=input_size)
    mismatch = state_dict_mismatch(model.state_dict(), state)
    if mismatch:
        raise ValueError(
            f"{path}: does not match a {kind} encoder with depth {encoder_depth}, widths {tuple(encoder_widths)} and "
            f"input size {input_size} ({mismatch})"
        )
    model.load_state_dict(state)
    model.requires_grad_(False)
    return model.to(next(generator.parameters()).device).eval()
