"""What the suites measure: the benchmark cases and the two suites (GPU, CPU reduced).

A case is one shape to run, independent of the implementation: a single layer
(one of the modulated convs or toRGBs of a generator) or a whole synthesis
network, with a batch size, a dtype, forward or forward+backward, and a
refinement setting (L tokens per layer, per sample or shared, or none).

Refinement settings follow the two ways RefineStyle is used: L = 32 per-sample
tokens ([B, L, C], what an inverter predicts for each image) and L = 256 tokens
shared by the batch ([L, C], a domain adapter); toRGB layers are never refined.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

from benchmarks.flops import LayerSpec, generator_layers

GROUPS = ("layer", "generator")
MODES = ("forward", "forward_backward")
MODE_SHORT = {"forward": "fwd", "forward_backward": "fwd+bwd"}
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass(frozen=True)
class TokenSetting:
    """A refinement setting: L tokens per refined layer (0 = none), per sample or shared."""

    num_tokens: int
    shared: bool

    @property
    def label(self) -> str:
        if self.num_tokens == 0:
            return "none"
        return f"L={self.num_tokens} {'shared' if self.shared else 'per-sample'}"

    @property
    def short(self) -> str:
        if self.num_tokens == 0:
            return "L0"
        return f"L{self.num_tokens}{'s' if self.shared else ''}"


def parse_tokens(text: str) -> list[TokenSetting]:
    """Parse "0,32,256s": a number is L (0 = no refinement); a trailing "s" makes the tokens
    shared by the batch, a trailing "p" per sample. Without a suffix, L >= 256 is shared
    (the domain adapter) and smaller L per sample (the inverter)."""
    settings = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        shared = None
        if item[-1] in "sp":
            shared = item[-1] == "s"
            item = item[:-1]
        if not item.isdigit():
            raise ValueError(f"tokens: expected numbers like 0,32,256s, got {text!r}")
        num_tokens = int(item)
        if shared is None:
            shared = num_tokens >= 256
        settings.append(TokenSetting(num_tokens, shared if num_tokens else False))
    if not settings:
        raise ValueError(f"tokens: expected at least one setting, got {text!r}")
    return settings


@dataclass(frozen=True)
class GeneratorConfig:
    """The generator a case belongs to (rosinality's Generator arguments)."""

    size: int
    channel_multiplier: int = 2
    channel_max: int = 512
    style_dim: int = 512
    n_mlp: int = 8

    @property
    def label(self) -> str:
        extra = "" if self.channel_max == 512 and self.channel_multiplier == 2 else (
            f" (cm {self.channel_multiplier}, max {self.channel_max} ch)"
        )
        return f"{self.size}px{extra}"

    def layers(self) -> tuple[list[LayerSpec], list[LayerSpec]]:
        return generator_layers(self.size, self.channel_multiplier, self.channel_max)


@dataclass(frozen=True)
class Case:
    """One benchmark shape.

    group: "layer" or "generator" (the whole synthesis network, w+ to image).
    generator: the generator (for a layer case, the one the layer belongs to).
    layer: the LayerSpec for a layer case, None for a generator case.
    batch: B.
    dtype: "float32" or "bfloat16" (every tensor of the case, weights included).
    mode: "forward" or "forward_backward" (gradients of x or w+, styles, p, q; weights frozen).
    tokens: the refinement setting (ignored, i.e. 0, for toRGB layers).
    """

    group: str
    generator: GeneratorConfig
    batch: int
    dtype: str
    mode: str
    tokens: TokenSetting
    layer: LayerSpec | None = None

    def __post_init__(self):
        if self.group not in GROUPS:
            raise ValueError(f"group: expected one of {GROUPS}, got {self.group!r}")
        if (self.layer is None) != (self.group == "generator"):
            raise ValueError("layer: required for a layer case and only there")
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {self.mode!r}")
        if self.dtype not in DTYPE_SHORT:
            raise ValueError(f"dtype: expected one of {tuple(DTYPE_SHORT)}, got {self.dtype!r}")
        if self.layer is not None and not self.layer.refinable and self.tokens.num_tokens:
            raise ValueError(f"tokens: {self.layer.name} is never refined")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise ValueError(f"batch: expected a positive integer, got {self.batch!r}")
        generator_layers(self.generator.size, self.generator.channel_multiplier, self.generator.channel_max)

    @property
    def backward(self) -> bool:
        return self.mode == "forward_backward"

    @property
    def case_id(self) -> str:
        """A unique, filter-friendly name, e.g. "layer/1024px/convs.6/b8/bf16/fwd+bwd/L32"."""
        where = f"layer/{self.generator.label}/{self.layer.name}" if self.layer else f"generator/{self.generator.label}"
        return "/".join(
            [where, f"b{self.batch}", DTYPE_SHORT[self.dtype], MODE_SHORT[self.mode], self.tokens.short]
        ).replace(" ", "")

    @property
    def config_key(self) -> tuple:
        """Everything but the layer: cases with the same key form one per-layer series."""
        return (self.group, self.generator, self.batch, self.dtype, self.mode, self.tokens)

    def as_dict(self) -> dict:
        """Flat JSON-able fields."""
        row = {
            "case_id": self.case_id,
            "group": self.group,
            "generator_size": self.generator.size,
            "channel_multiplier": self.generator.channel_multiplier,
            "channel_max": self.generator.channel_max,
            "style_dim": self.generator.style_dim,
            "batch": self.batch,
            "dtype": self.dtype,
            "mode": self.mode,
            "num_tokens": self.tokens.num_tokens,
            "token_sharing": ("shared" if self.tokens.shared else "per_sample") if self.tokens.num_tokens else "none",
            "layer_name": None,
            "layer_kind": None,
            "layer_index": None,
            "in_channel": None,
            "out_channel": None,
            "kernel_size": None,
            "upsample": None,
            "in_size": None,
            "out_size": None,
        }
        if self.layer is not None:
            row.update(
                layer_name=self.layer.name,
                layer_kind=self.layer.kind,
                layer_index=self.layer.index,
                in_channel=self.layer.in_channel,
                out_channel=self.layer.out_channel,
                kernel_size=self.layer.kernel_size,
                upsample=self.layer.upsample,
                in_size=self.layer.in_size,
                out_size=self.layer.out_size,
            )
        return row


@dataclass
class SuiteSpec:
    """The grid of a suite: which layers and generators, in which settings.

    layer_generator: the generator whose layers are the layer cases (None: no layer cases).
    layer_names: restrict to these layers (rosinality names, e.g. "convs.6"), None = all.
    generator_sizes: whole-generator sizes (empty: no generator cases).
    batches, dtypes, modes, tokens: the settings grid.
    layer_kinds: "conv" and/or "torgb".
    layer_tokens: refinement settings of the layer cases when they differ from `tokens`
        (toRGB layers always run unrefined).
    """

    layer_generator: GeneratorConfig | None
    generator_sizes: Sequence[int]
    batches: Sequence[int]
    dtypes: Sequence[str]
    modes: Sequence[str]
    tokens: Sequence[TokenSetting]
    layer_names: Sequence[str] | None = None
    layer_kinds: Sequence[str] = ("conv", "torgb")
    layer_tokens: Sequence[TokenSetting] | None = None
    generator_template: GeneratorConfig = field(default_factory=lambda: GeneratorConfig(1024))

    def cases(self) -> list[Case]:
        """All cases, layer cases first (per layer, then per setting), then generator cases."""
        cases = []

        def settings_with(token_settings):
            return [
                (batch, dtype, mode, tokens)
                for dtype in self.dtypes
                for mode in self.modes
                for batch in self.batches
                for tokens in token_settings
            ]

        settings = settings_with(self.tokens)
        layer_settings = settings if self.layer_tokens is None else settings_with(self.layer_tokens)
        if self.layer_generator is not None:
            convs, torgbs = self.layer_generator.layers()
            layers = [spec for spec in convs + torgbs if spec.kind in self.layer_kinds]
            if self.layer_names is not None:
                known = {spec.name for spec in convs + torgbs}
                unknown = sorted(set(self.layer_names) - known)
                if unknown:
                    raise ValueError(f"layers: unknown layer names {unknown}; known: {sorted(known)}")
                layers = [spec for spec in layers if spec.name in self.layer_names]
            for batch, dtype, mode, tokens in layer_settings:
                for spec in layers:
                    if not spec.refinable:
                        # toRGB layers are never refined: one unrefined case per setting
                        tokens = TokenSetting(0, False)
                    cases.append(Case("layer", self.layer_generator, batch, dtype, mode, tokens, spec))
            cases = _dedupe(cases)
        for size in self.generator_sizes:
            config = replace(self.generator_template, size=size)
            for batch, dtype, mode, tokens in settings:
                cases.append(Case("generator", config, batch, dtype, mode, tokens))
        return cases


def _dedupe(cases: Iterable[Case]) -> list[Case]:
    seen, unique = set(), []
    for case in cases:
        if case.case_id not in seen:
            seen.add(case.case_id)
            unique.append(case)
    return unique


def gpu_suite() -> SuiteSpec:
    """The issue's full GPU suite: config-f at 1024 px per layer (17 convs, 9 toRGBs) and the
    whole synthesis network at 1024, 512 and 256 px; batch 1 and 8; fp32 and bf16; forward
    and forward+backward; L = 32 per sample, L = 256 shared and no refinement."""
    return SuiteSpec(
        layer_generator=GeneratorConfig(1024),
        generator_sizes=(1024, 512, 256),
        batches=(1, 8),
        dtypes=("float32", "bfloat16"),
        modes=("forward", "forward_backward"),
        tokens=parse_tokens("0,32,256s"),
    )


def headline_suite() -> SuiteSpec:
    """The cases the targets are about: batch 8, bf16, forward+backward, L = 32 and none;
    every layer of config-f at 1024 px and the whole 1024 px synthesis network."""
    return SuiteSpec(
        layer_generator=GeneratorConfig(1024),
        generator_sizes=(1024,),
        batches=(8,),
        dtypes=("bfloat16",),
        modes=("forward_backward",),
        tokens=parse_tokens("0,32"),
    )


def cpu_suite() -> SuiteSpec:
    """The reduced suite for a machine without a GPU: the layers of a 256 px config-f
    generator with L = 32 per-sample tokens (toRGBs unrefined) and the whole 256 px
    synthesis network unrefined and with L = 32; batch 2, fp32, forward."""
    return SuiteSpec(
        layer_generator=GeneratorConfig(256),
        generator_sizes=(256,),
        batches=(2,),
        dtypes=("float32",),
        modes=("forward",),
        tokens=parse_tokens("0,32"),
        layer_tokens=parse_tokens("32"),
        generator_template=GeneratorConfig(256),
    )


#: the case the issue's targets are stated for
HEADLINE = {
    "group": "generator",
    "generator_size": 1024,
    "batch": 8,
    "dtype": "bfloat16",
    "mode": "forward_backward",
    "num_tokens": 32,
    "token_sharing": "per_sample",
}
