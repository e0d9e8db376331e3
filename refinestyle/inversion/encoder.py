"""IR-SE backbones in the ArcFace layout and the feature-pyramid encoder E of the inverters.

The backbone follows the IR-SE ("improved residual + squeeze-excitation") ResNet of
ArcFace as released in InsightFace_Pytorch and reused by pSp, e4e and Style Transformer.
Parameter names match the usual `model_ir_se50.pth` state_dict:

    input_layer.{0: conv 3x3, 1: BatchNorm2d, 2: PReLU}
    body.{n}.shortcut_layer             MaxPool2d(1, stride), or {0: conv 1x1, 1: BatchNorm2d}
    body.{n}.res_layer.{0: BN, 1: conv 3x3, 2: PReLU, 3: conv 3x3 (stride), 4: BN, 5: SE (fc1, fc2)}
    output_layer.{0: BN2d, 1: Dropout, 2: Flatten, 3: Linear, 4: BN1d}   (face embedding only)

so the ArcFace weights initialise both the encoder (input_layer and body) and the
identity network of the ID loss (everything). `depth` picks the number of units per
stage (50, 100, 152, or any 4-tuple: small ones make tests fast) and `widths` the
channels of the four stages (64, 128, 256, 512 for the pretrained weights).

The feature pyramid (pSp / Style Transformer): the outputs of stages 2, 3, 4 are
c1 [B, w1, H/4, W/4], c2 [B, w2, H/8, W/8], c3 [B, w3, H/16, W/16];
    coarse = c3,  medium = up(coarse) + lateral(c2),  fine = up(medium) + lateral(c1),
each flattened into tokens [B, h*w, token_dim]. At 256 px: 256, 1024 and 4096 tokens.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from refinestyle.weights import resolve_weights

__all__ = [
    "IR_SE50_WIDTHS",
    "STAGE_UNITS",
    "IRSEBase",
    "IRSEBackbone",
    "FeaturePyramidEncoder",
    "load_ir_se50_weights",
    "read_state_dict",
    "IR_SE50_WHAT",
    "IR_SE50_ENV",
    "IR_SE50_SOURCE",
]

# Units per stage of the ArcFace IR-SE variants (InsightFace's get_blocks).
STAGE_UNITS = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 152: (3, 8, 36, 3)}
IR_SE50_WIDTHS = (64, 128, 256, 512)

IR_SE50_WHAT = "IR-SE50 ArcFace weights (model_ir_se50.pth)"
IR_SE50_ENV = "REFINESTYLE_IR_SE50"
IR_SE50_SOURCE = (
    "the pSp repository's pretrained models (github.com/eladrich/pixel2style2pixel, 'IR-SE50 Model', "
    "trained by TreB1eN/InsightFace_Pytorch)"
)


class SqueezeExcite(nn.Module):
    """Channel gating: x * sigmoid(fc2(relu(fc1(mean over pixels of x))))."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, padding=0, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, padding=0, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))
        return x * gate


class BottleneckIRSE(nn.Module):
    """One IR-SE unit: BN-conv-PReLU-conv(stride)-BN-SE plus a (strided) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if in_channels == out_channels:
            # A 1x1 max pool is a plain strided subsampling, as in the ArcFace release.
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False),
            nn.PReLU(out_channels),
            nn.Conv2d(out_channels, out_channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            SqueezeExcite(out_channels, 16),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


def _stage_units(depth: int | Sequence[int]) -> tuple[int, int, int, int]:
    if isinstance(depth, int) and not isinstance(depth, bool):
        if depth not in STAGE_UNITS:
            raise ValueError(f"depth: expected one of {sorted(STAGE_UNITS)} or 4 unit counts, got {depth}")
        return STAGE_UNITS[depth]
    units = tuple(int(u) for u in depth)
    if len(units) != 4 or min(units) < 1:
        raise ValueError(f"depth: expected 4 positive unit counts (one per stage), got {depth!r}")
    return units  # type: ignore[return-value]


def _check_widths(widths: Sequence[int]) -> tuple[int, int, int, int]:
    widths = tuple(int(w) for w in widths)
    if len(widths) != 4 or min(widths) < 1:
        raise ValueError(f"widths: expected 4 positive channel counts (one per stage), got {widths!r}")
    return widths  # type: ignore[return-value]


class IRSEBase(nn.Module):
    """The shared trunk: `input_layer` (conv 3x3, BN, PReLU; 64 channels) and `body` (4 stages).

    in_channels: channels of the input images (3; 6 for the two-stage encoder).
    depth: 50, 100 or 152 (ArcFace layouts), or 4 unit counts, e.g. (1, 1, 1, 1) for tests.
    widths: the channels of the four stages; the input layer has widths[0] channels
        (64 in ArcFace).
    Every stage halves the resolution: the body's output has H/16 x W/16 pixels.
    """

    def __init__(self, in_channels: int = 3, depth: int | Sequence[int] = 50, widths: Sequence[int] = IR_SE50_WIDTHS):
        super().__init__()
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels: expected a positive integer, got {in_channels!r}")
        self.in_channels = in_channels
        self.stage_units = _stage_units(depth)
        self.widths = _check_widths(widths)
        stem = self.widths[0]
        self.input_layer = nn.Sequential(
            nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.PReLU(stem)
        )
        units, stage_ends, channels = [], [], stem
        for width, count in zip(self.widths, self.stage_units):
            # The first unit of every stage halves the resolution (InsightFace's get_block).
            units.append(BottleneckIRSE(channels, width, 2))
            units.extend(BottleneckIRSE(width, width, 1) for _ in range(count - 1))
            channels = width
            stage_ends.append(len(units) - 1)
        self.body = nn.Sequential(*units)
        self.stage_ends = tuple(stage_ends)

    def stage_outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The four stages' outputs: [B, widths[i], H / 2^(i+1), W / 2^(i+1)] for i = 0..3."""
        x = self.input_layer(images)
        outputs = []
        for index, unit in enumerate(self.body):
            x = unit(x)
            if index in self.stage_ends:
                outputs.append(x)
        return outputs


class IRSEBackbone(IRSEBase):
    """ArcFace's IR-SE face-embedding network (pSp's `Backbone(112, 50, 'ir_se')`).

    forward(faces [B, in_channels, input_size, input_size] float in [-1, 1]) returns the
    L2-normalised embedding [B, embedding_dim]. `output_layer` is BN2d, Dropout, Flatten,
    Linear(widths[3] * s * s, embedding_dim), BN1d with s = input_size / 16 (7 at 112 px).
    """

    def __init__(
        self,
        depth: int | Sequence[int] = 50,
        widths: Sequence[int] = IR_SE50_WIDTHS,
        *,
        in_channels: int = 3,
        input_size: int = 112,
        embedding_dim: int = 512,
        drop_ratio: float = 0.6,
    ):
        super().__init__(in_channels, depth, widths)
        if input_size % 16:
            raise ValueError(f"input_size: expected a multiple of 16, got {input_size}")
        self.input_size = input_size
        side = input_size // 16
        last = self.widths[3]
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(last),
            nn.Dropout(drop_ratio),
            nn.Flatten(),
            nn.Linear(last * side * side, embedding_dim),
            nn.BatchNorm1d(embedding_dim),
        )

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        expected = (self.in_channels, self.input_size, self.input_size)
        if faces.ndim != 4 or tuple(faces.shape[1:]) != expected:
            raise ValueError(f"faces: expected [B, {', '.join(map(str, expected))}], got {tuple(faces.shape)}")
        x = self.input_layer(faces)
        x = self.body(x)
        return F.normalize(self.output_layer(x), dim=1)


class FeaturePyramidEncoder(IRSEBase):
    """The encoder E: an IR-SE trunk and a feature pyramid giving three token sets.

    in_channels: 3 (one-stage: the image) or 6 (two-stage: the image and the first-stage
        reconstruction). With pretrained weights, the file's 3-channel first conv fills the
        first 3 input channels and the others keep their fresh random initialisation.
    ir_se50_path: the ArcFace `model_ir_se50.pth` (or a safetensors file with the same
        names) to initialise input_layer and body; None leaves the trunk randomly initialised.
    token_dim: channels of the output tokens (512 = the generator's style_dim in the paper).
    depth, widths: see IRSEBase; the pretrained file needs depth=50 and the default widths.

    forward(images [B, in_channels, H, W] float in [-1, 1], H and W multiples of 16,
    256 x 256 for the pretrained setting) returns (coarse, medium, fine) tokens,
    [B, (H/16)(W/16), token_dim], [B, (H/8)(W/8), token_dim], [B, (H/4)(W/4), token_dim].
    """

    def __init__(
        self,
        in_channels: int = 3,
        ir_se50_path: str | os.PathLike | None = None,
        token_dim: int = 512,
        *,
        depth: int | Sequence[int] = 50,
        widths: Sequence[int] = IR_SE50_WIDTHS,
    ):
        super().__init__(in_channels, depth, widths)
        if not isinstance(token_dim, int) or token_dim < 1:
            raise ValueError(f"token_dim: expected a positive integer, got {token_dim!r}")
        self.token_dim = token_dim
        _, fine_width, medium_width, coarse_width = self.widths
        # The coarse map already has 512 channels with the ArcFace widths (no projection there,
        # as in pSp); other widths or token sizes get a 1x1 projection.
        self.lateral_coarse = (
            nn.Identity() if coarse_width == token_dim else nn.Conv2d(coarse_width, token_dim, 1)
        )
        self.lateral_medium = nn.Conv2d(medium_width, token_dim, 1)
        self.lateral_fine = nn.Conv2d(fine_width, token_dim, 1)
        if ir_se50_path is not None:
            load_ir_se50_weights(self, ir_se50_path)

    def feature_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(coarse, medium, fine) feature maps [B, token_dim, H/16|H/8|H/4, W/16|W/8|W/4]."""
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"images: expected [B, {self.in_channels}, H, W], got {tuple(images.shape)}"
            )
        height, width = images.shape[-2:]
        if height % 16 or width % 16 or height < 16 or width < 16:
            raise ValueError(f"images: height and width must be positive multiples of 16, got {height}x{width}")
        _, c1, c2, c3 = self.stage_outputs(images)
        coarse = self.lateral_coarse(c3)
        medium = _upsample_add(coarse, self.lateral_medium(c2))
        fine = _upsample_add(medium, self.lateral_fine(c1))
        return coarse, medium, fine

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        coarse, medium, fine = self.feature_maps(images)
        # [B, C, h, w] -> [B, h*w, C]: one token per pixel.
        return tuple(level.flatten(2).transpose(1, 2) for level in (coarse, medium, fine))  # type: ignore[return-value]


def _upsample_add(top: torch.Tensor, lateral: torch.Tensor) -> torch.Tensor:
    # Bilinear with align_corners=True, as pSp's and Style Transformer's pyramids.
    return F.interpolate(top, size=lateral.shape[-2:], mode="bilinear", align_corners=True) + lateral


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state_dict from a .safetensors or a torch (.pt/.pth) file, on the CPU.

    A {'state_dict': ...} wrapper and DataParallel's 'module.' prefixes are removed.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # unpickling errors come in many types
            raise ValueError(f"{path}: not a readable torch weights file ({error})") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state_dict (names -> tensors)")
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def load_ir_se50_weights(module: IRSEBase, path: str | os.PathLike | None) -> IRSEBase:
    """Load ArcFace IR-SE weights (model_ir_se50.pth layout) into `module`, in place.

    module: an IRSEBase (IRSEBackbone: input_layer, body and output_layer are loaded;
        FeaturePyramidEncoder: input_layer and body; its pyramid layers keep their values).
    path: the weights file; None falls back to the REFINESTYLE_IR_SE50 environment variable.
    Every trunk parameter and buffer must be in the file with the same shape, with one
    exception: for a module with more input channels than the file (the 6-channel encoder)
    the file's first conv fills the first 3 input channels and the rest keep the module's
    fresh initialisation. A missing file raises MissingWeightsError; a file of another
    layout (depth, widths) raises ValueError naming the first mismatching entries.
    Returns `module`.
    """
    if not isinstance(module, IRSEBase):
        raise TypeError(f"module: expected an IRSEBase (IRSEBackbone or FeaturePyramidEncoder), got {type(module).__name__}")
    resolved = resolve_weights(path, what=IR_SE50_WHAT, env_var=IR_SE50_ENV, obtained_from=IR_SE50_SOURCE)
    source = read_state_dict(resolved)
    has_output = isinstance(module, IRSEBackbone)
    prefixes = ("input_layer.", "body.") + (("output_layer.",) if has_output else ())
    own = {k: v for k, v in module.state_dict().items() if k.startswith(prefixes)}

    merged, missing, mismatched = {}, [], []
    for key, current in own.items():
        if key not in source:
            # Files saved by PyTorch < 0.4.1 lack BatchNorm's step counter; it is unused in eval.
            if key.endswith("num_batches_tracked"):
                continue
            missing.append(key)
            continue
        value = source[key]
        if value.shape == current.shape:
            merged[key] = value
        elif key == "input_layer.0.weight" and value.shape[1] < current.shape[1] and (
            value.shape[0],
            *value.shape[2:],
        ) == (current.shape[0], *current.shape[2:]):
            widened = current.detach().clone()
            widened[:, : value.shape[1]] = value
            merged[key] = widened
        else:
            mismatched.append(f"{key}: file {tuple(value.shape)} vs model {tuple(current.shape)}")
    unexpected = [k for k in source if k.startswith(prefixes) and k not in own]
    if missing or mismatched or unexpected:
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} (e.g. {', '.join(missing[:3])})")
        if mismatched:
            problems.append(f"shape mismatches {len(mismatched)} (e.g. {'; '.join(mismatched[:3])})")
        if unexpected:
            problems.append(f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})")
        raise ValueError(
            f"{resolved} does not match an IR-SE trunk with units {module.stage_units} and widths "
            f"{module.widths}: {'; '.join(problems)}"
        )
    with torch.no_grad():
        state = module.state_dict()
        for key, value in merged.items():
            state[key].copy_(value.to(state[key].dtype))
    return module

