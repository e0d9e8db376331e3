"""Domain adapters: a frozen generator's learned refinement tokens, in one safetensors file.

An `Adapter` is everything that domain adaptation trains: the tokens P, Q and their
scales A, B of every refined conv layer (a `RefinementTokens`), plus metadata that says
what they belong to and how they were made. The generator itself is never changed,
so one generator serves any number of domains, and `mixed_refinement` renders several
domains in ONE forward pass (each sample with its own domain's tokens), at the memory
cost of the adapters only; StyleGAN-NADA and GOGA need a whole generator per domain.

File layout (safetensors): tensors `tokens.layers.{i}.P` [L, Cout], `.Q` [L, Cin],
`.A` [L], `.B` [L] for the i-th refined layer (float32); metadata (str -> str):
"format" = "refinestyle.adapter", "version" = "1", and JSON strings for every other
key: generator_size, generator_style_dim, generator_num_layers, generator_fingerprint,
num_refined, num_tokens, layer_shapes ([[Cin, Cout], ...]), scale_init, and whatever
the trainer adds (kind, source_text, target_text, reference, training settings, ...).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from refinestyle.checkpoints import generator_fingerprint
from refinestyle.refinement import Refinement, RefinementTokens, refinement_layer_shapes
from refinestyle.weights import require_file, save_safetensors

__all__ = ["Adapter", "AdaptedGenerator", "mixed_refinement", "generator_fingerprint", "FILE_FORMAT"]

FILE_FORMAT = "refinestyle.adapter"
FILE_VERSION = "1"
# the file's own entries, beside the metadata's: a metadata entry of the same name would replace them
FILE_KEYS = ("format", "version")
# metadata keys that describe the tokens and the generator; set by the Adapter itself
STRUCTURAL_KEYS = (
    "generator_size",
    "generator_style_dim",
    "generator_num_layers",
    "generator_fingerprint",
    "num_refined",
    "num_tokens",
    "layer_shapes",
    "scale_init",
)


class Adapter(nn.Module):
    """Learned refinement tokens for one target domain, with their metadata.

    tokens: the RefinementTokens (P, Q, A, B of the last tokens.num_refined conv layers).
    metadata: a JSON-serialisable dict; must hold the STRUCTURAL_KEYS (see `for_generator`),
        may hold anything else (prompt, reference, training settings).

    Build one with `Adapter.for_generator`, read one with `Adapter.load`. Only `tokens`
    has parameters; `num_trainable()` counts them.
    """

    def __init__(self, tokens: RefinementTokens, metadata: dict[str, Any]):
        super().__init__()
        if not isinstance(tokens, RefinementTokens):
            raise TypeError(f"tokens: expected a RefinementTokens, got {type(tokens).__name__}")
        missing = [key for key in STRUCTURAL_KEYS if key not in metadata]
        if missing:
            raise ValueError(f"metadata: missing {', '.join(missing)}")
        reserved = [key for key in FILE_KEYS if key in metadata]
        if reserved:
            raise ValueError(f"metadata: {', '.join(reserved)} are the adapter file's own entries; use other names")
        try:
            json.dumps(metadata)
        except TypeError as error:
            raise TypeError(f"metadata: every value must be JSON-serialisable ({error})") from error
        shapes = [tuple(shape) for shape in metadata["layer_shapes"]]
        if shapes != [tuple(shape) for shape in tokens.shapes] or metadata["num_tokens"] != tokens.num_tokens:
            raise ValueError(
                f"metadata: layer_shapes {metadata['layer_shapes']} / num_tokens {metadata['num_tokens']} do not "
                f"describe the tokens ({tokens.shapes}, L={tokens.num_tokens})"
            )
        self.tokens = tokens
        self.metadata = dict(metadata)

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_generator(
        cls,
        generator: nn.Module,
        num_refined: Optional[int] = None,
        num_tokens: int = 256,
        *,
        scale_init: Optional[float] = None,
        **metadata: Any,
    ) -> "Adapter":
        """Fresh (randomly initialised) tokens for `generator`, on its device.

        generator: the refinestyle.Generator the adapter refines (only read: its size,
            layer shapes and a fingerprint of its weights go into the metadata).
        num_refined: how many of the last conv layers to refine (default: all, 17 at 1024 px).
        num_tokens: L, tokens per layer (the paper's domain adaptation: 256).
        scale_init: initial value of A and B (None: LayerTokens' default, 0.01).
        metadata: extra JSON-serialisable entries (e.g. kind="text", target_text="sketch").
        """
        tokens = RefinementTokens.for_generator(generator, num_refined, num_tokens, scale_init=scale_init)
        clash = [key for key in STRUCTURAL_KEYS if key in metadata]
        if clash:
            raise ValueError(f"metadata: {', '.join(clash)} are set by the adapter itself")
        structural = {
            "generator_size": int(generator.size),
            "generator_style_dim": int(generator.style_dim),
            "generator_num_layers": int(generator.num_layers),
            "generator_fingerprint": generator_fingerprint(generator),
            "num_refined": tokens.num_refined,
            "num_tokens": int(num_tokens),
            "layer_shapes": [list(shape) for shape in tokens.shapes],
            "scale_init": tokens.layers[0].A.detach()[0].item() if scale_init is None else float(scale_init),
        }
        return cls(tokens, {**structural, **metadata})

    # ------------------------------------------------------------------ use
    @property
    def num_refined(self) -> int:
        return self.tokens.num_refined

    @property
    def num_tokens(self) -> int:
        return self.tokens.num_tokens

    def refinement(self) -> Refinement:
        """The shared Refinement of this domain (tokens [L, C]; gradients flow to the tokens)."""
        return self.tokens()

    def num_trainable(self) -> int:
        """Trainable scalars: L * sum_n (Cin_n + Cout_n) + 2 * L * num_refined (2,982,400 for config-f 1024 px, L=256)."""
        return self.tokens.num_trainable()

    def check_compatible(self, generator: nn.Module, *, check_fingerprint: bool = True) -> None:
        """Raise ValueError, naming what differs, unless this adapter fits `generator`.

        Compared: resolution, style_dim, number of conv layers, (Cin, Cout) of the refined
        layers and, with check_fingerprint, the fingerprint of the weights (an adapter
        trained on another generator of the same shape renders, but not what it learned).
        """
        meta = self.metadata
        facts = (
            ("resolution", meta["generator_size"], generator.size),
            ("style_dim", meta["generator_style_dim"], generator.style_dim),
            ("number of conv layers", meta["generator_num_layers"], generator.num_layers),
        )
        for what, ours, theirs in facts:
            if ours != theirs:
                raise ValueError(f"adapter: trained for a generator with {what} {ours}, this generator has {theirs}")
        shapes = [list(shape) for shape in refinement_layer_shapes(generator, self.num_refined)]
        if shapes != [list(shape) for shape in meta["layer_shapes"]]:
            raise ValueError(
                f"adapter: the refined layers have (Cin, Cout) {meta['layer_shapes']} in the adapter, {shapes} in "
                f"this generator"
            )
        if check_fingerprint:
            fingerprint = generator_fingerprint(generator)
            if fingerprint != meta["generator_fingerprint"]:
                raise ValueError(
                    f"adapter: trained on a generator with weights fingerprint {meta['generator_fingerprint'][:16]}..., "
                    f"this generator's is {fingerprint[:16]}... (same architecture, different weights)"
                )

    def apply(self, generator: nn.Module) -> "AdaptedGenerator":
        """`generator` rendering this domain: an AdaptedGenerator (checks compatibility first)."""
        self.check_compatible(generator)
        return AdaptedGenerator(generator, self)

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokens and the metadata to a safetensors file (its folder is created); returns the path."""
        tensors = {
            f"tokens.{key}": value.detach().to("cpu", torch.float32).contiguous().clone()
            for key, value in self.tokens.state_dict().items()
        }
        metadata = {"format": FILE_FORMAT, "version": FILE_VERSION}
        metadata.update({key: json.dumps(value) for key, value in self.metadata.items()})
        return save_safetensors(tensors, path, metadata)

    @classmethod
    def read_metadata(cls, path: str | os.PathLike) -> dict[str, Any]:
        """The metadata dict of an adapter file, without reading the tensors."""
        from safetensors import safe_open

        path = Path(path)
        require_file(path, "adapter file")
        try:
            with safe_open(str(path), framework="pt") as handle:
                raw = handle.metadata() or {}
        except Exception as error:  # safetensors raises its own error types for foreign files
            raise ValueError(f"{path}: not a safetensors adapter file ({error})") from error
        if raw.get("format") != FILE_FORMAT:
            raise ValueError(f"{path}: not an adapter file written by refinestyle (format {raw.get('format')!r})")
        if raw.get("version") != FILE_VERSION:
            raise ValueError(f"{path}: adapter file version {raw.get('version')!r}, this code reads {FILE_VERSION!r}")
        metadata = {}
        for key, value in raw.items():
            if key in FILE_KEYS:
                continue
            try:
                metadata[key] = json.loads(value)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: metadata entry {key!r} is not JSON ({error})") from error
        return metadata

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> "Adapter":
        """Read an adapter file written by `save`.

        path: the safetensors file. device: where the tokens go (default cpu).
        Raises FileNotFoundError for a missing file, ValueError for a foreign or broken one.
        """
        from safetensors.torch import load_file

        metadata = cls.read_metadata(path)
        missing = [key for key in STRUCTURAL_KEYS if key not in metadata]
        if missing:
            raise ValueError(f"{path}: adapter metadata lacks {', '.join(missing)}")
        tokens = RefinementTokens(
            [tuple(shape) for shape in metadata["layer_shapes"]],
            int(metadata["num_tokens"]),
            int(metadata["generator_num_layers"]),
            scale_init=metadata["scale_init"],
        )
        state = load_file(str(path))
        prefix = "tokens."
        foreign = [key for key in state if not key.startswith(prefix)]
        if foreign:
            raise ValueError(f"{path}: unexpected tensors {foreign[:4]} in an adapter file")
        try:
            tokens.load_state_dict({key[len(prefix):]: value for key, value in state.items()}, strict=True)
        except RuntimeError as error:
            raise ValueError(f"{path}: the tensors do not match the metadata ({error})") from error
        adapter = cls(tokens, metadata)
        return adapter.to(device) if device is not None else adapter

    def extra_repr(self) -> str:
        described = {key: self.metadata[key] for key in ("kind", "source_text", "target_text", "reference")
                     if key in self.metadata}
        return f"generator {self.metadata['generator_size']} px, {described}" if described else ""


class AdaptedGenerator(nn.Module):
    """A frozen generator rendering one domain: forward/synthesis pass the adapter's refinement.

    generator: a refinestyle.Generator; adapter: an Adapter compatible with it.
    forward(styles, **kwargs) and synthesis(w_plus, **kwargs) are the generator's, with
    refinement=adapter.refinement() (a `refinement` keyword is refused).
    """

    def __init__(self, generator: nn.Module, adapter: Adapter):
        super().__init__()
        self.generator = generator
        self.adapter = adapter

    def forward(self, styles, **kwargs):
        if "refinement" in kwargs:
            raise TypeError("refinement: an AdaptedGenerator always uses its adapter's refinement")
        return self.generator(styles, refinement=self.adapter.refinement(), **kwargs)

    def synthesis(self, w_plus: torch.Tensor, **kwargs) -> torch.Tensor:
        if "refinement" in kwargs:
            raise TypeError("refinement: an AdaptedGenerator always uses its adapter's refinement")
        return self.generator.synthesis(w_plus, refinement=self.adapter.refinement(), **kwargs)


def mixed_refinement(adapters: Sequence[Optional[Adapter]], batch_sizes: Sequence[int]) -> Refinement:
    """One per-sample Refinement for a batch whose consecutive groups belong to different domains.

    adapters: an Adapter per group, or None for a group rendered by the unrefined generator.
        Adapters may refine different layer ranges and use different L: missing layers and
        tokens are zero, which adds exactly nothing, so each group renders as it would alone.
    batch_sizes: samples per group, in order; sum(batch_sizes) is the batch size.
    Returns a Refinement with per-sample tokens [sum(batch_sizes), L_max, C] (gradients flow
    to every adapter's tokens). Example: a batch of 2 sketch + 3 pixar samples is
    generator.synthesis(w_plus, refinement=mixed_refinement([sketch, pixar], [2, 3])).
    """
    adapters = list(adapters)
    for index, adapter in enumerate(adapters):
        if adapter is not None and not isinstance(adapter, Adapter):
            raise TypeError(f"adapters[{index}]: expected an Adapter or None, got {type(adapter).__name__}")
    return Refinement.cat([None if a is None else a.refinement() for a in adapters], batch_sizes)
