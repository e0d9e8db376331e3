"""RefineStyle's one-stage and two-stage inverters (paper, section 3.3 and appendix A.1).

One-stage (`OneStageInverter`): an image I goes through the feature-pyramid encoder E
(coarse, medium, fine tokens). Two branches read those features:

- the w+ branch (Style Transformer): the queries are the generator's mapping MLP applied
  to learned Gaussian tokens [n_latent, C]; three transformer blocks (self-attention,
  cross-attention to coarse, then medium, then fine features, feed-forward) turn them
  into w+ = output + latent_avg. The MLP (a copy of the generator's) trains with the rest.
- the token branch: learned initial tokens P~, Q~ [Nr, L, C] pass grouped transformer
  blocks (self-attention only within each layer's L tokens, cross-attention to image
  features: by default three blocks reading coarse, medium, fine features in turn;
  `token_levels` picks others), then per-layer heads C -> Cout_n and C -> Cin_n and
  the learnable scales A_n, B_n [L] give p_n = A_n * P_n, q_n = B_n * Q_n: a per-image
  `Refinement` of the generator's last Nr convs.

The generator renders the w+ code with the refinement; it is frozen (its parameters get
requires_grad False), only the inverter trains.

Pictures that are not square (Stanford Cars: `encoder_size=(192, 256)`, as pSp, e4e, HyperStyle
and Style Transformer read them) fill the middle rows of the generator's square canvas; the
inverters render the canvas and return that part of it (`crop_canvas`), so losses, metrics and
saved images compare the picture with the picture.

Two-stage (`TwoStageInverter`): a frozen first stage (any callable image -> w+) gives w0+
and the image I0 = G(w0+); E sees [I, I0] (6 channels); three grouped blocks produce the
tokens; w0+ stays fixed. The built-in first stage is `FirstStage`, a OneStageInverter
trained with refine=False (Style Transformer's design); pretrained pSp and e4e encoders
load as `PSPEncoder` (refinestyle/inversion/psp.py).

P~ and Q~ go through the same grouped blocks as 2*Nr groups of L tokens each (the P
groups of every layer, then the Q groups): a P token attends to the other P tokens of its
layer, a Q token to the Q tokens of its layer. C is the generator's style_dim (512).

Head width: the appendix's "4 heads of dimension 512" is the default (head_dim=512);
the paper's Table 1 parameter counts and FLOPs are matched by head_dim=128 and, for the
one-stage model, token_levels=("fine",) (see docs/inversion-models.md and
tests/test_inversion_models.py::test_paper_table1_sizes_with_head_width_128).

Files: `save_inverter` writes the inverter's own weights (not the generator's) to a
safetensors file with its configuration as JSON in the metadata; `load_inverter` rebuilds
it around a generator.
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from refinestyle.inversion.encoder import IR_SE50_WIDTHS, FeaturePyramidEncoder
from refinestyle.inversion.psp import PSP_KINDS, PSPEncoder
from refinestyle.imageio import crop_canvas, image_size_hw, same_aspect
from refinestyle.inversion.transformer import GroupedTransformerBlock, TransformerBlock
from refinestyle.refinement import Refinement, refinement_layer_shapes
from refinestyle.weights import require_file, save_safetensors

__all__ = [
    "InversionResult",
    "InverterConfig",
    "LatentBranch",
    "TokenBranch",
    "OneStageInverter",
    "TwoStageInverter",
    "FirstStage",
    "PretrainedEncoderInverter",
    "save_inverter",
    "load_inverter",
    "read_inverter_config",
]

FEATURE_LEVELS = ("coarse", "medium", "fine")
FILE_FORMAT = "refinestyle.inverter"
FILE_VERSION = "1"


class InversionResult(NamedTuple):
    """What an inverter returns for a batch of B images.

    w_plus: [B, n_latent, style_dim] the w+ code (the first stage's w0+ for two-stage).
    refinement: the per-image Refinement (tokens [B, L, Cout] / [B, L, Cin] for the last
        Nr convs), or None for an inverter without token branch.
    image: [B, 3, h, w] in about [-1, 1], the frozen generator's rendering of w_plus with
        the refinement at its resolution R: the whole R x R canvas for square pictures, else
        the part of it that holds the picture (`crop_canvas`, e.g. 384 x 512 of a 512 px
        Cars canvas); None when rendering was skipped.
    initial_image: two-stage only: [B, 3, h, w] the first stage's rendering I0 = G(w0+)
        (no refinement, no gradient), cropped the same way; None otherwise.
    """

    w_plus: torch.Tensor
    refinement: Optional[Refinement]
    image: Optional[torch.Tensor]
    initial_image: Optional[torch.Tensor] = None


@dataclass
class InverterConfig:
    """Everything needed to rebuild an inverter around a generator (stored in its weights file).

    stage: "one" or "two".
    refine: whether the model has the token branch (always True for two-stage).
    num_refined, num_tokens: Nr and L (0 and 0 when refine is False).
    style_dim, n_latent, num_layers: the generator's w size, w+ rows and conv count.
    layer_shapes: (Cin, Cout) of the refined convs (the generator's last Nr).
    heads, head_dim, ffn_dim, dropout: the transformer blocks.
    scale_init: initial value of the scales A_n, B_n.
    token_levels: the feature level each grouped block of the token branch attends to.
    encoder_depth, encoder_widths, encoder_size: the IR-SE trunk and the size images are
        resized to before E: an int side (256) or [height, width] ([192, 256] for Cars).
    train_mapping: one-stage: whether the copied mapping MLP trains.
    latent_queries: rows of learned queries of the w+ branch; None: n_latent. More rows than
        n_latent (Style Transformer's files always hold 18) attend to one another, and the
        first n_latent become w+.
    first_stage: two-stage: how to rebuild a stored first stage, else None (an external one):
        a built-in FirstStage's InverterConfig as a dict, or a PSPEncoder's config() (a dict
        with "kind": "psp" or "e4e").
    """

    stage: str
    refine: bool
    num_refined: int
    num_tokens: int
    style_dim: int
    n_latent: int
    num_layers: int
    layer_shapes: list = field(default_factory=list)
    heads: int = 4
    head_dim: int = 512
    ffn_dim: int = 1024
    dropout: float = 0.0
    scale_init: float = 0.01
    token_levels: list = field(default_factory=lambda: list(FEATURE_LEVELS))
    encoder_depth: Any = 50
    encoder_widths: list = field(default_factory=lambda: list(IR_SE50_WIDTHS))
    encoder_size: Any = 256
    train_mapping: bool = True
    first_stage: Optional[dict] = None
    latent_queries: Optional[int] = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "InverterConfig":
        values = json.loads(text)
        values["layer_shapes"] = [tuple(shape) for shape in values.get("layer_shapes", [])]
        if isinstance(values.get("encoder_depth"), list):
            values["encoder_depth"] = tuple(values["encoder_depth"])
        if isinstance(values.get("encoder_size"), list):
            values["encoder_size"] = tuple(values["encoder_size"])
        return cls(**values)


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")


def _encoder_size(value: Any) -> int | tuple[int, int]:
    """encoder_size checked (each side a multiple of 16, the trunk's stride) and in its stored
    form: an int for a square, else (height, width)."""
    try:
        height, width = image_size_hw(value, "encoder_size")
    except TypeError as error:
        raise ValueError(str(error)) from None
    if height % 16 or width % 16:
        raise ValueError(f"encoder_size: expected sides that are multiples of 16, got {value!r}")
    return height if height == width else (height, width)


def input_size_of(encoder: Any) -> Optional[tuple[int, int]]:
    """(height, width) of the pictures a first stage or encoder reads, when it says: an
    inverter's or FirstStage's encoder size, a PSPEncoder's input size; None otherwise."""
    if isinstance(encoder, FirstStage):
        encoder = encoder.inverter
    if isinstance(encoder, _Inverter):
        return encoder.input_size
    if isinstance(encoder, PSPEncoder):
        return image_size_hw(encoder.input_size)
    return None


class LatentBranch(nn.Module):
    """The w+ branch: mapping(learned Gaussian tokens) -> 3 transformer blocks -> + latent_avg.

    mapping: the mapping MLP (a copy of the generator's `style`), [N, C] -> [N, C].
    n_latent, dim: rows of w+ and the style dimension C.
    latent_avg: [C] the generator's mean w, added to the blocks' output.
    heads, head_dim, ffn_dim, dropout: the transformer blocks.
    train_mapping: whether the mapping MLP's parameters train.
    num_queries: rows of learned queries (None: n_latent); the blocks see all of them and the
        first n_latent become w+ (Style Transformer keeps 18 for every resolution).

    forward(features: (coarse [B, N1, C], medium [B, N2, C], fine [B, N3, C])) -> w+ [B, n_latent, C].
    """

    def __init__(
        self,
        mapping: nn.Module,
        n_latent: int,
        dim: int,
        latent_avg: torch.Tensor,
        *,
        heads: int = 4,
        head_dim: int = 512,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        train_mapping: bool = True,
        num_queries: Optional[int] = None,
    ):
        super().__init__()
        num_queries = n_latent if num_queries is None else num_queries
        if not isinstance(num_queries, int) or num_queries < n_latent:
            raise ValueError(f"num_queries: expected at least n_latent={n_latent} rows, got {num_queries!r}")
        self.n_latent = n_latent
        self.mapping = mapping
        self.mapping.requires_grad_(train_mapping)
        self.latent_queries = nn.Parameter(torch.randn(num_queries, dim))
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, head_dim, ffn_dim, dropout) for _ in range(3))
        if latent_avg.shape != (dim,):
            raise ValueError(f"latent_avg: expected [{dim}], got {tuple(latent_avg.shape)}")
        self.register_buffer("latent_avg", latent_avg.detach().clone().float())

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        batch = features[0].shape[0]
        # The queries do not depend on the image: map them once and share them by the batch.
        queries = self.mapping(self.latent_queries)
        codes = queries.unsqueeze(0).expand(batch, -1, -1)
        for block, level in zip(self.blocks, features):
            codes = block(codes, level)
        return codes[:, : self.n_latent] + self.latent_avg


class TokenBranch(nn.Module):
    """The token branch: initial P~, Q~ -> 3 grouped blocks -> per-layer heads and scales.

    layer_shapes: (Cin, Cout) of the Nr refined convs (the generator's last Nr), in order.
    num_layers: the generator's number of convs (for the Refinement).
    num_tokens: L, tokens per layer.
    dim: C, the token width (the generator's style_dim).
    heads, head_dim, ffn_dim, dropout: the grouped transformer blocks.
    scale_init: initial value of every entry of A_n and B_n ("small", paper eq. 4).
    levels: one grouped block per entry, attending to that feature level ("coarse",
        "medium" or "fine"), in order; default all three in turn.

    Parameters: initial_p, initial_q [Nr, L, C]; blocks.{i}; heads_p.{n} (C -> Cout_n),
    heads_q.{n} (C -> Cin_n); scale_p, scale_q [Nr, L] (A_n, B_n as rows).

    forward(features: (coarse, medium, fine), each [B, N_i, C]) -> Refinement with
    per-sample p_n [B, L, Cout_n] = A_n * head_p(P_n) and q_n [B, L, Cin_n] = B_n * head_q(Q_n).
    """

    def __init__(
        self,
        layer_shapes: Sequence[tuple[int, int]],
        num_layers: int,
        num_tokens: int,
        dim: int,
        *,
        heads: int = 4,
        head_dim: int = 512,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        scale_init: float = 0.01,
        levels: Sequence[str] = FEATURE_LEVELS,
    ):
        super().__init__()
        _check_positive_int("num_tokens", num_tokens)
        levels = tuple(levels)
        if not levels or any(level not in FEATURE_LEVELS for level in levels):
            raise ValueError(f"levels: expected a non-empty sequence of {FEATURE_LEVELS}, got {levels!r}")
        self.levels = levels
        layer_shapes = [tuple(int(c) for c in shape) for shape in layer_shapes]
        if not layer_shapes:
            raise ValueError("layer_shapes: expected at least one refined layer")
        self.layer_shapes = layer_shapes
        self.num_layers = num_layers
        self.num_tokens = num_tokens
        self.dim = dim
        count = len(layer_shapes)
        self.initial_p = nn.Parameter(torch.randn(count, num_tokens, dim))
        self.initial_q = nn.Parameter(torch.randn(count, num_tokens, dim))
        self.blocks = nn.ModuleList(
            GroupedTransformerBlock(dim, num_tokens, heads, head_dim, ffn_dim, dropout) for _ in levels
        )
        self.heads_p = nn.ModuleList(nn.Linear(dim, cout) for _, cout in layer_shapes)
        self.heads_q = nn.ModuleList(nn.Linear(dim, cin) for cin, _ in layer_shapes)
        self.scale_p = nn.Parameter(torch.full((count, num_tokens), float(scale_init)))
        self.scale_q = nn.Parameter(torch.full((count, num_tokens), float(scale_init)))

    @property
    def num_refined(self) -> int:
        return len(self.layer_shapes)

    def tokens(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks' output tokens (P [B, Nr, L, C], Q [B, Nr, L, C]) before the heads."""
        batch = features[0].shape[0]
        count, length, dim = self.initial_p.shape
        # 2*Nr groups of L tokens: all P groups, then all Q groups.
        tokens = torch.cat([self.initial_p, self.initial_q], 0).reshape(1, 2 * count * length, dim)
        tokens = tokens.expand(batch, -1, -1)
        for block, level in zip(self.blocks, self.levels):
            tokens = block(tokens, features[FEATURE_LEVELS.index(level)])
        tokens = tokens.reshape(batch, 2, count, length, dim)
        return tokens[:, 0], tokens[:, 1]

    def forward(self, features: Sequence[torch.Tensor]) -> Refinement:
        p_tokens, q_tokens = self.tokens(features)
        p, q = [], []
        for index, (head_p, head_q) in enumerate(zip(self.heads_p, self.heads_q)):
            p.append(self.scale_p[index].unsqueeze(-1) * head_p(p_tokens[:, index]))
            q.append(self.scale_q[index].unsqueeze(-1) * head_q(q_tokens[:, index]))
        return Refinement(p, q, self.num_layers)


class _Inverter(nn.Module):
    """What both inverters share: the frozen generator, the encoder, the token branch, files."""

    config: InverterConfig

    def _setup_generator(self, generator: nn.Module) -> None:
        for name in ("style", "synthesis", "n_latent", "num_layers", "style_dim", "layer_shapes"):
            if not hasattr(generator, name):
                raise TypeError(f"generator: expected a refinestyle.Generator (missing `{name}`), got {type(generator).__name__}")
        generator.requires_grad_(False)
        self.generator = generator

    def _build_encoder(
        self,
        encoder: Optional[FeaturePyramidEncoder],
        in_channels: int,
        ir_se50_path,
        depth,
        widths,
    ) -> FeaturePyramidEncoder:
        if encoder is None:
            return FeaturePyramidEncoder(
                in_channels, ir_se50_path, self.generator.style_dim, depth=depth, widths=widths
            )
        if not isinstance(encoder, FeaturePyramidEncoder):
            raise TypeError(f"encoder: expected a FeaturePyramidEncoder or None, got {type(encoder).__name__}")
        if encoder.in_channels != in_channels or encoder.token_dim != self.generator.style_dim:
            raise ValueError(
                f"encoder: expected {in_channels} input channels and token_dim={self.generator.style_dim}, "
                f"got {encoder.in_channels} and {encoder.token_dim}"
            )
        return encoder

    def _make_config(self, **settings: Any) -> InverterConfig:
        """InverterConfig(**settings) with the generator's sizes and the built encoder's trunk filled in."""
        return InverterConfig(
            style_dim=self.generator.style_dim,
            n_latent=self.generator.n_latent,
            num_layers=self.generator.num_layers,
            encoder_depth=self.encoder.stage_units,
            encoder_widths=list(self.encoder.widths),
            **settings,
        )

    def _build_token_branch(self) -> TokenBranch:
        """The token branch that `self.config` describes."""
        config = self.config
        return TokenBranch(
            config.layer_shapes, config.num_layers, config.num_tokens, config.style_dim,
            heads=config.heads, head_dim=config.head_dim, ffn_dim=config.ffn_dim, dropout=config.dropout,
            scale_init=config.scale_init, levels=config.token_levels,
        )

    def _check_images(self, images: torch.Tensor, name: str = "images") -> None:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"{name}: expected [B, 3, H, W] images in [-1, 1], got {shape}")
        if not images.is_floating_point():
            raise TypeError(f"{name}: expected a floating point tensor, got {images.dtype}")

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) the encoder reads: (256, 256), or (192, 256) for Cars."""
        return image_size_hw(self.config.encoder_size)

    def crop_canvas(self, renders: torch.Tensor) -> torch.Tensor:
        """The part of square renders [B, 3, R, R] that holds a picture of the encoder's aspect
        (all of it for a square encoder size; rows R/8 to 7R/8 for Cars' 3:4)."""
        return crop_canvas(renders, self.input_size)

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        size = self.input_size
        if images.shape[-2:] == size:
            return images
        factor = images.shape[-1] // size[1]
        if factor > 1 and tuple(images.shape[-2:]) == (size[0] * factor, size[1] * factor):
            # average pooling, as pSp's and HyperStyle's face_pool bring 1024 px renders to 256
            return F.adaptive_avg_pool2d(images, size)
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)

    def _render(self, w_plus, refinement, noise, randomize_noise) -> torch.Tensor:
        renders = self.generator.synthesis(w_plus, refinement=refinement, noise=noise, randomize_noise=randomize_noise)
        return self.crop_canvas(renders)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameters of the inverter itself (the generator and a first stage excluded)."""
        excluded = {id(p) for p in self.generator.parameters()}
        first_stage = getattr(self, "first_stage", None)
        if isinstance(first_stage, nn.Module):
            excluded.update(id(p) for p in first_stage.parameters())
        return sum(
            p.numel()
            for p in self.parameters()
            if id(p) not in excluded and (p.requires_grad or not trainable_only)
        )


def _follow_the_generator(model: nn.Module, generator: nn.Module) -> nn.Module:
    """model on the generator's device and in its floating dtype (a float64 generator for exact
    checks gets a float64 encoder); returns model."""
    parameter = next(generator.parameters())
    return model.to(device=parameter.device, dtype=parameter.dtype)


def _default_latent_avg(generator: nn.Module, samples: int = 4096) -> torch.Tensor:
    """The generator's mean w: its `latent_avg` when set, else the mapping's mean over `samples` z.

    The z come from a private RNG (seed 0), so the result is reproducible and the global
    RNG is untouched.
    """
    latent_avg = getattr(generator, "latent_avg", None)
    if latent_avg is not None:
        return latent_avg.detach().reshape(-1)[: generator.style_dim].clone()
    parameter = next(generator.parameters())
    z = torch.randn(samples, generator.style_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return generator.style(z.to(device=parameter.device, dtype=parameter.dtype)).mean(0)


class OneStageInverter(_Inverter):
    """The one-stage RefineStyle inverter (w+ branch and token branch on one encoder).

    generator: a refinestyle.Generator; frozen in place (requires_grad False) and kept as
        `self.generator` (its weights are not part of the inverter's files). The inverter
        is built on the generator's device and in its floating dtype.
    num_refined: Nr, refine the generator's last Nr convs (paper: 10).
    num_tokens: L, tokens per refined layer (paper: 32).
    refine: False builds the w+ branch only (Style Transformer; a first stage).
    encoder: a ready FeaturePyramidEncoder (3 channels, token_dim = style_dim), or None
        to build one from `ir_se50_path`, `encoder_depth`, `encoder_widths`.
    ir_se50_path: ArcFace model_ir_se50.pth to initialise the encoder's trunk; None keeps
        it random.
    encoder_size: what the input images are resized to for E: an int side (256) or
        (height, width), (192, 256) for Stanford Cars; each a multiple of 16. A size that is
        not square also sets the part of the generator's canvas the pictures fill
        (`crop_canvas`): `forward` returns that part of each render.
    heads, head_dim, ffn_dim, dropout: transformer blocks (paper: 4 heads of width 512).
    scale_init: initial A_n, B_n entries (small: the refinement starts close to zero).
    token_levels: the feature level of each grouped block of the token branch (default
        coarse, medium, fine: three blocks).
    latent_avg: [style_dim] mean w added to the w+ branch output; default: the generator's
        `latent_avg`, else the mean of its mapping over 4096 z.
    train_mapping: whether the (copied) mapping MLP of the w+ branch trains (paper: yes).
    latent_queries: query rows of the w+ branch (None: the generator's n_latent; see
        InverterConfig).

    forward(images [B, 3, H, W] float in [-1, 1], *, render=True, noise=None,
    randomize_noise=False) -> InversionResult(w_plus [B, n_latent, style_dim],
    refinement or None, image [B, 3, h, w] or None: the render, cropped to the picture for a
    non-square encoder_size). noise / randomize_noise go to the generator (default: its
    fixed noise buffers, deterministic).
    """

    def __init__(
        self,
        generator: nn.Module,
        num_refined: int = 10,
        num_tokens: int = 32,
        *,
        refine: bool = True,
        encoder: Optional[FeaturePyramidEncoder] = None,
        ir_se50_path: str | os.PathLike | None = None,
        encoder_depth: int | Sequence[int] = 50,
        encoder_widths: Sequence[int] = IR_SE50_WIDTHS,
        encoder_size: int | tuple[int, int] = 256,
        heads: int = 4,
        head_dim: int = 512,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        scale_init: float = 0.01,
        token_levels: Sequence[str] = FEATURE_LEVELS,
        latent_avg: Optional[torch.Tensor] = None,
        train_mapping: bool = True,
        latent_queries: Optional[int] = None,
    ):
        super().__init__()
        self._setup_generator(generator)
        encoder_size = _encoder_size(encoder_size)
        dim = generator.style_dim
        layer_shapes = refinement_layer_shapes(generator, num_refined) if refine else []
        _check_positive_int("num_tokens", num_tokens)
        self.encoder = self._build_encoder(encoder, 3, ir_se50_path, encoder_depth, encoder_widths)
        self.config = self._make_config(
            stage="one",
            refine=bool(refine),
            num_refined=num_refined if refine else 0,
            num_tokens=num_tokens if refine else 0,
            layer_shapes=layer_shapes,
            heads=heads, head_dim=head_dim, ffn_dim=ffn_dim, dropout=dropout, scale_init=scale_init,
            token_levels=list(token_levels),
            encoder_size=encoder_size,
            train_mapping=bool(train_mapping),
            latent_queries=latent_queries,
        )
        if latent_avg is None:
            latent_avg = _default_latent_avg(generator)
        self.latent_branch = LatentBranch(
            copy.deepcopy(generator.style),
            generator.n_latent,
            dim,
            latent_avg.to(next(generator.parameters()).device),
            heads=heads,
            head_dim=head_dim,
            ffn_dim=ffn_dim,
            dropout=dropout,
            train_mapping=train_mapping,
            num_queries=latent_queries,
        )
        self.token_branch = self._build_token_branch() if refine else None
        _follow_the_generator(self, generator)

    @property
    def refine(self) -> bool:
        return self.token_branch is not None

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, Optional[Refinement]]:
        """(w_plus [B, n_latent, style_dim], refinement or None) of images [B, 3, H, W] in [-1, 1]."""
        self._check_images(images)
        features = self.encoder(self._resize(images))
        w_plus = self.latent_branch(features)
        refinement = self.token_branch(features) if self.token_branch is not None else None
        return w_plus, refinement

    def w_plus_only(self, images: torch.Tensor) -> torch.Tensor:
        """The w+ code [B, n_latent, style_dim] of images [B, 3, H, W] (no token branch, no rendering)."""
        self._check_images(images)
        return self.latent_branch(self.encoder(self._resize(images)))

    def forward(
        self,
        images: torch.Tensor,
        *,
        render: bool = True,
        noise: Optional[Sequence[Optional[torch.Tensor]]] = None,
        randomize_noise: bool = False,
    ) -> InversionResult:
        w_plus, refinement = self.encode(images)
        image = self._render(w_plus, refinement, noise, randomize_noise) if render else None
        return InversionResult(w_plus, refinement, image)


class FirstStage(nn.Module):
    """A frozen first stage for TwoStageInverter: images -> w+ from a OneStageInverter's w+ branch.

    inverter: a OneStageInverter (normally trained with refine=False, as Style Transformer).
    The wrapped inverter never trains (requires_grad False) and stays in eval mode.
    forward(images [B, 3, H, W] in [-1, 1]) -> w+ [B, n_latent, style_dim].
    """

    def __init__(self, inverter: OneStageInverter):
        super().__init__()
        if not isinstance(inverter, OneStageInverter):
            raise TypeError(f"inverter: expected a OneStageInverter, got {type(inverter).__name__}")
        self.inverter = inverter
        self.inverter.requires_grad_(False)
        self.inverter.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.inverter.eval()  # frozen: BatchNorm statistics and dropout stay fixed
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.inverter.w_plus_only(images)


class PretrainedEncoderInverter(nn.Module):
    """A pretrained w+ encoder (pSp, e4e, Style Transformer: `load_first_stage`) used on its
    own, as the baselines of the paper's Table 1: images -> w+ -> G(w+), no refinement.

    generator: the refinestyle.Generator the encoder was trained with (frozen).
    encoder: a callable images [B, 3, H, W] in [-1, 1] -> w+ [B, n_latent, style_dim], e.g.
        `load_first_stage(path, generator)`.
    forward(images, *, render=True, noise=None, randomize_noise=False) -> InversionResult(w+,
    None, G(w+) or None, None), as the inverters' (G(w+) cropped to the encoder's aspect, as
    theirs), so `refinestyle invert`, `edit` and
    `eval-inversion` take it (`load_inverter_for_inference` builds it from a .pt file).
    """

    def __init__(self, generator: nn.Module, encoder: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        if not callable(encoder):
            raise TypeError(f"encoder: expected a callable images -> w+, got {type(encoder).__name__}")
        generator.requires_grad_(False)
        self.generator = generator
        self.encoder = encoder

    def forward(
        self,
        images: torch.Tensor,
        *,
        render: bool = True,
        noise: Optional[Sequence[Optional[torch.Tensor]]] = None,
        randomize_noise: bool = False,
    ) -> InversionResult:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected [B, 3, H, W], got {tuple(images.shape)}")
        w_plus = self.encoder(images)
        expected = (images.shape[0], self.generator.n_latent, self.generator.style_dim)
        if tuple(w_plus.shape) != expected:
            raise ValueError(f"encoder: expected w+ of shape {list(expected)}, got {list(w_plus.shape)}")
        image = None
        if render:
            image = self.crop_canvas(self.generator.synthesis(w_plus, noise=noise, randomize_noise=randomize_noise))
        return InversionResult(w_plus, None, image, None)

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) the encoder reads, when it says (a PSPEncoder, a FirstStage); else (256, 256)."""
        return input_size_of(self.encoder) or (256, 256)

    def crop_canvas(self, renders: torch.Tensor) -> torch.Tensor:
        """The part of square renders [B, 3, R, R] that holds a picture of the encoder's aspect."""
        return crop_canvas(renders, self.input_size)


class TwoStageInverter(_Inverter):
    """The two-stage RefineStyle inverter: a frozen first stage's w0+, refined kernels on top.

    generator: a refinestyle.Generator; frozen in place and kept as `self.generator`.
    first_stage: any callable images [B, 3, H, W] -> w0+ [B, n_latent, style_dim], e.g.
        `load_first_stage(path, generator)`: our w+ inverter or Style Transformer (a
        FirstStage), pSp or e4e (a PSPEncoder); those two are stored with the model by
        save_inverter. An nn.Module is frozen and kept in eval mode.
    num_refined: Nr (paper: 17, all convs of a 1024 px generator).
    num_tokens: L (paper: 32).
    encoder, ir_se50_path, encoder_depth, encoder_widths, encoder_size: as OneStageInverter,
        but the encoder takes 6 channels [I, I0]: with ir_se50_path the pretrained first
        conv fills channels 0-2 and channels 3-5 are freshly initialised.
    heads, head_dim, ffn_dim, dropout, scale_init, token_levels: as OneStageInverter.

    forward(images [B, 3, H, W] in [-1, 1], *, render=True, noise=None,
    randomize_noise=False) -> InversionResult(w_plus = w0+ (no gradient), refinement,
    image = G(w0+, refinement) or None, initial_image = I0 = G(w0+)).
    """

    def __init__(
        self,
        generator: nn.Module,
        first_stage: Callable[[torch.Tensor], torch.Tensor],
        num_refined: int = 17,
        num_tokens: int = 32,
        *,
        encoder: Optional[FeaturePyramidEncoder] = None,
        ir_se50_path: str | os.PathLike | None = None,
        encoder_depth: int | Sequence[int] = 50,
        encoder_widths: Sequence[int] = IR_SE50_WIDTHS,
        encoder_size: int | tuple[int, int] = 256,
        heads: int = 4,
        head_dim: int = 512,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        scale_init: float = 0.01,
        token_levels: Sequence[str] = FEATURE_LEVELS,
    ):
        super().__init__()
        self._setup_generator(generator)
        if not callable(first_stage):
            raise TypeError(f"first_stage: expected a callable images -> w+, got {type(first_stage).__name__}")
        encoder_size = _encoder_size(encoder_size)
        first_size = input_size_of(first_stage)
        if first_size is not None and not same_aspect(first_size, encoder_size):
            raise ValueError(
                f"encoder_size: {encoder_size} has another aspect than the first stage's input "
                f"{first_size[0]} x {first_size[1]}; both must crop the same picture from the canvas"
            )
        _check_positive_int("num_tokens", num_tokens)
        layer_shapes = refinement_layer_shapes(generator, num_refined)
        if isinstance(first_stage, nn.Module):
            first_stage.requires_grad_(False)
            first_stage.eval()
        self.first_stage = first_stage
        self.encoder = self._build_encoder(encoder, 6, ir_se50_path, encoder_depth, encoder_widths)
        self.config = self._make_config(
            stage="two",
            refine=True,
            num_refined=num_refined,
            num_tokens=num_tokens,
            layer_shapes=layer_shapes,
            heads=heads, head_dim=head_dim, ffn_dim=ffn_dim, dropout=dropout, scale_init=scale_init,
            token_levels=list(token_levels),
            encoder_size=encoder_size,
            train_mapping=False,
            first_stage=_stored_first_stage_config(first_stage),
        )
        self.token_branch = self._build_token_branch()
        _follow_the_generator(self, generator)

    def train(self, mode: bool = True):
        super().train(mode)
        if isinstance(self.first_stage, nn.Module):
            self.first_stage.eval()  # frozen
        return self

    @property
    def uses_every_trainable_parameter(self) -> bool:
        """Whether every trainable parameter gets a gradient. Only the token branch reads the
        encoder here; without "fine" among its levels the pyramid's lateral convs that make the
        fine (and, with coarse alone, the medium) features are never used, and DDP must be told."""
        return "fine" in self.config.token_levels

    def initial_inversion(
        self,
        images: torch.Tensor,
        noise: Optional[Sequence[Optional[torch.Tensor]]] = None,
        randomize_noise: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(w0+ [B, n_latent, style_dim], I0 [B, 3, h, w]) from the frozen first stage, without
        gradient; I0 is the render cropped to the picture (`crop_canvas`)."""
        self._check_images(images)
        with torch.no_grad():
            w0 = self.first_stage(images)
            expected = (images.shape[0], self.config.n_latent, self.config.style_dim)
            if not isinstance(w0, torch.Tensor) or tuple(w0.shape) != expected:
                shape = tuple(w0.shape) if isinstance(w0, torch.Tensor) else type(w0).__name__
                raise ValueError(f"first_stage: expected w+ of shape {list(expected)}, got {shape}")
            initial = self._render(w0, None, noise, randomize_noise)
        return w0.detach(), initial.detach()

    def refinement_for(self, images: torch.Tensor, initial_images: torch.Tensor) -> Refinement:
        """The Refinement of images [B, 3, H, W] given their first-stage renderings [B, 3, h, w]
        as `initial_inversion` returns them (cropped to the picture)."""
        self._check_images(images)
        self._check_images(initial_images, "initial_images")
        if initial_images.shape[0] != images.shape[0]:
            raise ValueError(
                f"initial_images: expected {images.shape[0]} images (one per input), got {initial_images.shape[0]}"
            )
        pair = torch.cat([self._resize(images), self._resize(initial_images).to(images.dtype)], 1)
        return self.token_branch(self.encoder(pair))

    def w_plus_only(self, images: torch.Tensor) -> torch.Tensor:
        """The first stage's w0+ [B, n_latent, style_dim] (the path without refinement)."""
        return self.initial_inversion(images)[0]

    def forward(
        self,
        images: torch.Tensor,
        *,
        render: bool = True,
        noise: Optional[Sequence[Optional[torch.Tensor]]] = None,
        randomize_noise: bool = False,
    ) -> InversionResult:
        w0, initial = self.initial_inversion(images, noise, randomize_noise)
        refinement = self.refinement_for(images, initial)
        image = self._render(w0, refinement, noise, randomize_noise) if render else None
        return InversionResult(w0, refinement, image, initial)


# ---------------------------------------------------------------------------------------------
# Files


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _stored_first_stage_config(first_stage) -> Optional[dict]:
    """The config that rebuilds a first stage stored with a two-stage model, or None for one
    that is not stored (any other callable: the caller passes it to load_inverter again)."""
    if isinstance(first_stage, FirstStage):
        return asdict(first_stage.inverter.config)
    if isinstance(first_stage, PSPEncoder):
        return first_stage.config()
    return None


def _own_state(model: _Inverter) -> dict[str, torch.Tensor]:
    """The inverter's state without the generator (and without a first stage that is not stored)."""
    state = {}
    stored_first_stage = _stored_first_stage_config(getattr(model, "first_stage", None)) is not None
    for key, value in model.state_dict().items():
        if key.startswith("generator.") or key.startswith("first_stage.inverter.generator."):
            continue
        if key.startswith("first_stage.") and not stored_first_stage:
            continue
        state[key] = value
    return state


def save_inverter(path: str | os.PathLike, model: nn.Module, *, generator_fingerprint: str | None = None) -> Path:
    """Write an inverter's weights and configuration to a safetensors file.

    path: the file to write (conventionally `*.safetensors`); its folder is created.
    model: a OneStageInverter or TwoStageInverter (or a DistributedDataParallel around one).
    The generator's weights are not stored (load_inverter takes the generator); a built-in
    FirstStage of a two-stage model is stored with it (under `first_stage.inverter.`), and so
    is a pSp / e4e PSPEncoder (under `first_stage.`); another first stage is not (pass it to
    load_inverter). The configuration is JSON in
    the file's metadata under "config". generator_fingerprint: the generator's
    `refinestyle.checkpoints.generator_fingerprint`, computed here when None (stored, so that
    loading around other weights warns). Returns the path.
    """
    model = _unwrap(model)
    if not isinstance(model, _Inverter):
        raise TypeError(f"model: expected a OneStageInverter or TwoStageInverter, got {type(model).__name__}")
    # safetensors refuses shared or non-contiguous storage: store plain CPU copies.
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in _own_state(model).items()}
    if generator_fingerprint is None:
        from refinestyle.checkpoints import generator_fingerprint as fingerprint_of

        generator_fingerprint = fingerprint_of(model.generator)
    metadata = {"format": FILE_FORMAT, "version": FILE_VERSION, "config": model.config.to_json(),
                "generator_fingerprint": generator_fingerprint}
    return save_safetensors(tensors, path, metadata)


def read_inverter_config(path: str | os.PathLike) -> InverterConfig:
    """The InverterConfig stored in an inverter file written by save_inverter."""
    from safetensors import safe_open

    path = Path(path)
    require_file(path, "inverter file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for foreign files
        raise ValueError(f"{path}: not a safetensors inverter file ({error})") from error
    if metadata.get("format") != FILE_FORMAT or "config" not in metadata:
        raise ValueError(f"{path}: not an inverter file written by refinestyle (format {metadata.get('format')!r})")
    return InverterConfig.from_json(metadata["config"])


def _check_generator(config: InverterConfig, generator: nn.Module, path: Path) -> None:
    facts = {"style_dim": generator.style_dim, "n_latent": generator.n_latent, "num_layers": generator.num_layers}
    for name, value in facts.items():
        if getattr(config, name) != value:
            raise ValueError(
                f"{path}: the inverter was trained for a generator with {name}={getattr(config, name)}, "
                f"this generator has {name}={value}"
            )
    if config.refine:
        shapes = [tuple(s) for s in refinement_layer_shapes(generator, config.num_refined)]
        if shapes != [tuple(s) for s in config.layer_shapes]:
            raise ValueError(
                f"{path}: the refined convs have (Cin, Cout) {config.layer_shapes} in the inverter, "
                f"{shapes} in this generator"
            )


def _build_from_config(config: InverterConfig, generator: nn.Module, first_stage=None) -> _Inverter:
    options = dict(
        encoder_depth=config.encoder_depth,
        encoder_widths=config.encoder_widths,
        encoder_size=config.encoder_size,
        heads=config.heads,
        head_dim=config.head_dim,
        ffn_dim=config.ffn_dim,
        dropout=config.dropout,
        scale_init=config.scale_init,
        token_levels=config.token_levels,
    )
    if config.stage == "one":
        return OneStageInverter(
            generator,
            config.num_refined if config.refine else 10,
            config.num_tokens if config.refine else 32,
            refine=config.refine,
            # the stored buffer overwrites it: skip computing the mapping's mean
            latent_avg=torch.zeros(config.style_dim),
            train_mapping=config.train_mapping,
            latent_queries=config.latent_queries,
            **options,
        )
    if config.stage == "two":
        if first_stage is None:
            if config.first_stage is None:
                raise ValueError(
                    "first_stage: this two-stage inverter was trained on an external first stage; pass it to "
                    "load_inverter(..., first_stage=...)"
                )
            if config.first_stage.get("kind") in PSP_KINDS:
                first_stage = PSPEncoder(**config.first_stage)
            else:
                first_config = InverterConfig.from_json(json.dumps(config.first_stage))
                first_stage = FirstStage(_build_from_config(first_config, generator))
        return TwoStageInverter(generator, first_stage, config.num_refined, config.num_tokens, **options)
    raise ValueError(f"config.stage: expected 'one' or 'two', got {config.stage!r}")


def load_inverter(
    path: str | os.PathLike,
    generator: nn.Module,
    *,
    first_stage: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> _Inverter:
    """Rebuild an inverter written by save_inverter around `generator`.

    path: the safetensors file.
    generator: the refinestyle.Generator it was trained with (checked: style_dim, n_latent,
        conv count and the refined convs' channels must match).
    first_stage: two-stage only: a first stage to use instead of the stored FirstStage;
        required when the model was trained on an external first stage.
    Returns the OneStageInverter / TwoStageInverter on the generator's device and in its dtype, in eval mode.
    Raises FileNotFoundError for a missing file and ValueError for a foreign or
    mismatching one.
    """
    from safetensors.torch import load_file

    path = Path(path)
    config = read_inverter_config(path)
    _check_generator(config, generator, path)
    model = _build_from_config(config, generator, first_stage)
    state = load_file(str(path))
    expected = _own_state(model)
    if first_stage is not None:
        # the caller's first stage replaces a stored one and keeps its own weights
        state = {key: value for key, value in state.items() if not key.startswith("first_stage.")}
        expected = {key: value for key, value in expected.items() if not key.startswith("first_stage.")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match the stored configuration (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    mismatched = [key for key in state if state[key].shape != expected[key].shape]
    if mismatched:
        key = mismatched[0]
        raise ValueError(f"{path}: {key} has shape {tuple(state[key].shape)}, expected {tuple(expected[key].shape)}")
    model.load_state_dict(state, strict=False)
    _warn_on_other_generator_weights(path, generator)
    return _follow_the_generator(model, generator).eval()


def _warn_on_other_generator_weights(path: Path, generator: nn.Module) -> None:
    """Warn (not refuse: a fine-tuned generator is a legitimate target) when the inverter in
    `path` was trained with other generator weights than `generator`'s; files from before the
    fingerprint was stored hold none."""
    from safetensors import safe_open

    from refinestyle.checkpoints import generator_fingerprint

    with safe_open(str(path), framework="pt") as handle:
        stored = (handle.metadata() or {}).get("generator_fingerprint")
    if stored is not None and stored != generator_fingerprint(generator):
        warnings.warn(
            f"{path}: the inverter was trained with other generator weights than these (same architecture); "
            "its codes will not reconstruct the images well. Give the generator it was trained with",
            stacklevel=3,
        )
