"""Refinement tokens for a StyleGAN2 generator's modulated convolutions.

RefineStyle refines the dynamic kernel of conv layer n with a low-rank residual
built from two token sets (the paper's Eq. 2-4):

    K'_n = scale * W0_n * s_n + (A_n * P_n)^T (B_n * Q_n)     (then demodulated)

A `Refinement` carries the already-scaled tokens p = A*P [.., L, Cout] and
q = B*Q [.., L, Cin] for the LAST `num_refined` of a generator's `num_layers`
modulated 3x3 convs (the paper's N_r; the toRGB layers are never refined). Tokens
are either shared by the whole batch ([L, C], e.g. one domain) or per sample
([B, L, C], e.g. one set per inverted image); `Refinement.cat` mixes several
refinements (domains, images, or none) into one per-sample batch so that a single
generator forward renders them all.

`RefinementTokens` is the all-learnable set (P, Q, A, B per layer) that domain
adaptation optimises directly; its forward() returns a shared `Refinement`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["Refinement", "RefinementTokens", "refinement_layer_shapes", "set_nvlabs_refinement"]


def _describe(tensor: Tensor) -> str:
    return f"{tuple(tensor.shape)} {str(tensor.dtype).replace('torch.', '')}"


class Refinement:
    """Scaled refinement tokens for the last `len(p)` modulated conv layers of a generator.

    Args:
        p: one tensor per refined layer, in layer order; p[i] has shape [B, L_i, Cout_i]
            (per-sample tokens) or [L_i, Cout_i] (shared by the batch), floating point.
            These are the output-side tokens already multiplied by their scales (A * P).
        q: one tensor per refined layer; q[i] has shape [B, L_i, Cin_i] or [L_i, Cin_i]
            (already multiplied by B). p[i] and q[i] must have the same token count L_i.
        num_layers: the generator's number of modulated conv layers (`Generator.num_layers`,
            17 at 1024 px). The tokens refine layers num_layers - len(p) ... num_layers - 1.

    All per-sample tensors must share one batch size B; shared and per-sample tensors
    may be mixed. All tensors must be on one device. The channel counts are checked
    against a generator by `check_layer_shapes` (the generator does this on use).
    """

    def __init__(self, p: Sequence[Tensor], q: Sequence[Tensor], num_layers: int):
        if isinstance(p, Tensor) or isinstance(q, Tensor):
            raise TypeError("p, q: expected sequences with one tensor per refined layer, got a single tensor")
        p, q = tuple(p), tuple(q)
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
            raise ValueError(f"num_layers: expected a positive integer, got {num_layers!r}")
        if len(p) != len(q):
            raise ValueError(f"p and q: expected one tensor per refined layer each, got {len(p)} and {len(q)}")
        if not 1 <= len(p) <= num_layers:
            raise ValueError(f"p, q: expected between 1 and num_layers={num_layers} layers of tokens, got {len(p)}")
        batch_size = None
        device = None
        for index, (p_i, q_i) in enumerate(zip(p, q)):
            for name, tensor in (("p", p_i), ("q", q_i)):
                if not isinstance(tensor, Tensor):
                    raise TypeError(f"{name}[{index}]: expected a tensor, got {type(tensor).__name__}")
                if not tensor.is_floating_point():
                    raise TypeError(f"{name}[{index}]: expected a floating point tensor, got {tensor.dtype}")
                if tensor.ndim not in (2, 3):
                    side = "Cout" if name == "p" else "Cin"
                    raise ValueError(
                        f"{name}[{index}]: expected [B, L, {side}] or [L, {side}], got shape {tuple(tensor.shape)}"
                    )
                if device is None:
                    device = tensor.device
                elif tensor.device != device:
                    raise ValueError(f"{name}[{index}]: expected device {device}, got {tensor.device}")
                if tensor.ndim == 3:
                    if batch_size is None:
                        batch_size = tensor.shape[0]
                    elif tensor.shape[0] != batch_size:
                        raise ValueError(
                            f"{name}[{index}]: per-sample tokens must share one batch size; expected "
                            f"{batch_size}, got shape {tuple(tensor.shape)}"
                        )
            if p_i.shape[-2] != q_i.shape[-2]:
                raise ValueError(
                    f"p[{index}] and q[{index}]: expected the same number of tokens L, got p {tuple(p_i.shape)} "
                    f"and q {tuple(q_i.shape)}"
                )
            if p_i.shape[-2] < 1 or p_i.shape[-1] < 1 or q_i.shape[-1] < 1:
                raise ValueError(f"p[{index}], q[{index}]: empty token tensors {tuple(p_i.shape)}, {tuple(q_i.shape)}")
        self._p = p
        self._q = q
        self._num_layers = num_layers
        self._batch_size = batch_size

    # ------------------------------------------------------------------ properties
    @property
    def p(self) -> tuple[Tensor, ...]:
        """The scaled output-side tokens, one per refined layer ([B, L, Cout] or [L, Cout])."""
        return self._p

    @property
    def q(self) -> tuple[Tensor, ...]:
        """The scaled input-side tokens, one per refined layer ([B, L, Cin] or [L, Cin])."""
        return self._q

    @property
    def num_layers(self) -> int:
        """The generator's number of modulated conv layers."""
        return self._num_layers

    @property
    def num_refined(self) -> int:
        """How many of the last conv layers carry tokens (the paper's N_r)."""
        return len(self._p)

    @property
    def first_layer(self) -> int:
        """Index of the first refined conv layer (num_layers - num_refined)."""
        return self._num_layers - len(self._p)

    @property
    def batch_size(self) -> Optional[int]:
        """The batch size of the per-sample tokens, or None when every tensor is shared."""
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._p[0].device

    @property
    def num_tokens(self) -> tuple[int, ...]:
        """L of each refined layer."""
        return tuple(p_i.shape[-2] for p_i in self._p)

    @property
    def layer_shapes(self) -> list[tuple[int, int]]:
        """(Cin, Cout) of each refined layer, as read from the tokens."""
        return [(q_i.shape[-1], p_i.shape[-1]) for p_i, q_i in zip(self._p, self._q)]

    # ------------------------------------------------------------------ access
    def for_layer(self, index: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """(p, q) for modulated conv layer `index` (0 = the 4x4 conv1), or (None, None) if it is not refined."""
        if not isinstance(index, int) or not 0 <= index < self._num_layers:
            raise IndexError(f"index: expected a conv layer index in [0, {self._num_layers}), got {index!r}")
        if index < self.first_layer:
            return None, None
        p, q = self._p[index - self.first_layer], self._q[index - self.first_layer]
        # the op takes both per-sample or both shared: expand the shared one of a mixed pair
        if p.ndim == 3 and q.ndim == 2:
            q = q.unsqueeze(0).expand(p.shape[0], -1, -1)
        elif p.ndim == 2 and q.ndim == 3:
            p = p.unsqueeze(0).expand(q.shape[0], -1, -1)
        return p, q

    def check_layer_shapes(self, layer_shapes: Sequence[tuple[int, int]], batch_size: Optional[int] = None) -> None:
        """Raise ValueError unless the tokens fit a generator.

        layer_shapes: (Cin, Cout) of ALL the generator's modulated conv layers, in order
            (`Generator.layer_shapes()`); its length must equal num_layers.
        batch_size: when given, per-sample tokens must have this batch size.
        """
        if len(layer_shapes) != self._num_layers:
            raise ValueError(
                f"refinement: built for a generator with {self._num_layers} conv layers, but this generator has "
                f"{len(layer_shapes)}"
            )
        for offset, (p_i, q_i) in enumerate(zip(self._p, self._q)):
            index = self.first_layer + offset
            cin, cout = layer_shapes[index]
            if p_i.shape[-1] != cout or q_i.shape[-1] != cin:
                raise ValueError(
                    f"refinement: conv layer {index} has Cin={cin}, Cout={cout}; expected p [.., L, {cout}] and "
                    f"q [.., L, {cin}], got p {tuple(p_i.shape)} and q {tuple(q_i.shape)}"
                )
        if batch_size is not None and self._batch_size is not None and self._batch_size != batch_size:
            raise ValueError(
                f"refinement: per-sample tokens have batch size {self._batch_size}, but the batch has {batch_size} "
                f"samples"
            )

    # ------------------------------------------------------------------ transforms
    def _map(self, function) -> "Refinement":
        return Refinement([function(t) for t in self._p], [function(t) for t in self._q], self._num_layers)

    def expand(self, batch_size: int) -> "Refinement":
        """Per-sample view with `batch_size` samples: shared [L, C] tensors become [batch_size, L, C] (no copy).

        Raises ValueError when per-sample tensors already have another batch size.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        if self._batch_size is not None and self._batch_size != batch_size:
            raise ValueError(f"batch_size: the tokens are per-sample with batch size {self._batch_size}, got {batch_size}")

        def per_sample(tensor: Tensor) -> Tensor:
            return tensor if tensor.ndim == 3 else tensor.unsqueeze(0).expand(batch_size, -1, -1)

        return self._map(per_sample)

    def batch_slice(self, start: int, stop: int) -> "Refinement":
        """Samples start:stop of a per-sample refinement (shared tensors are kept as they are)."""
        if self._batch_size is None:
            return self
        if not 0 <= start < stop <= self._batch_size:
            raise ValueError(f"start, stop: expected 0 <= start < stop <= {self._batch_size}, got {start}, {stop}")
        return self._map(lambda t: t[start:stop] if t.ndim == 3 else t)

    @staticmethod
    def cat(refinements: Sequence[Optional["Refinement"]], batch_sizes: Sequence[int]) -> "Refinement":
        """Mix refinements into one per-sample batch, in order.

        refinements: Refinement or None (= the unrefined generator) for each group of samples.
            All must be built for the same num_layers. Their refined-layer ranges and token
            counts may differ: layers a group does not refine, and tokens beyond its L, get
            zero tokens, which add exactly nothing (dW = 0), so every group renders exactly
            as it would alone.
        batch_sizes: samples per group; a shared refinement is repeated that many times, a
            per-sample one must have exactly that batch size.

        Returns a per-sample Refinement with sum(batch_sizes) samples on the device and dtype
        of the first non-None refinement. Gradients flow to every input tensor.
        """
        refinements = list(refinements)
        batch_sizes = list(batch_sizes)
        if len(refinements) != len(batch_sizes) or not refinements:
            raise ValueError(
                f"refinements, batch_sizes: expected equally long non-empty sequences, got {len(refinements)} and "
                f"{len(batch_sizes)}"
            )
        for index, size in enumerate(batch_sizes):
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"batch_sizes[{index}]: expected a positive integer, got {size!r}")
        present = [r for r in refinements if r is not None]
        if not present:
            raise ValueError("refinements: expected at least one Refinement (all are None)")
        for index, refinement in enumerate(refinements):
            if refinement is not None and not isinstance(refinement, Refinement):
                raise TypeError(f"refinements[{index}]: expected a Refinement or None, got {type(refinement).__name__}")
        num_layers = present[0].num_layers
        for index, refinement in enumerate(refinements):
            if refinement is None:
                continue
            if refinement.num_layers != num_layers:
                raise ValueError(
                    f"refinements[{index}]: built for {refinement.num_layers} conv layers, refinements[0..] for "
                    f"{num_layers}"
                )
            if refinement.batch_size is not None and refinement.batch_size != batch_sizes[index]:
                raise ValueError(
                    f"refinements[{index}]: per-sample tokens with batch size {refinement.batch_size}, but "
                    f"batch_sizes[{index}] = {batch_sizes[index]}"
                )
        first_layer = min(r.first_layer for r in present)
        reference = present[0].p[0]
        p_out, q_out = [], []
        for layer in range(first_layer, num_layers):
            # token count and channels of this layer, from every refinement that refines it
            owners = [r for r in present if r.first_layer <= layer]
            tokens = max(r.for_layer(layer)[0].shape[-2] for r in owners)
            cout = owners[0].for_layer(layer)[0].shape[-1]
            cin = owners[0].for_layer(layer)[1].shape[-1]
            for r in owners:
                p_l, q_l = r.for_layer(layer)
                if p_l.shape[-1] != cout or q_l.shape[-1] != cin:
                    raise ValueError(
                        f"refinements: conv layer {layer} has inconsistent channels across refinements: "
                        f"p {tuple(p_l.shape)} / q {tuple(q_l.shape)} vs Cout={cout}, Cin={cin}"
                    )
            p_parts, q_parts = [], []
            for refinement, size in zip(refinements, batch_sizes):
                p_l, q_l = (None, None) if refinement is None else refinement.for_layer(layer)
                p_parts.append(_group_tokens(p_l, size, tokens, cout, reference))
                q_parts.append(_group_tokens(q_l, size, tokens, cin, reference))
            p_out.append(torch.cat(p_parts, 0))
            q_out.append(torch.cat(q_parts, 0))
        return Refinement(p_out, q_out, num_layers)

    def to(self, *args, **kwargs) -> "Refinement":
        """Tensor.to(*args, **kwargs) applied to every token tensor."""
        return self._map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> "Refinement":
        """A copy whose tensors are detached from the autograd graph."""
        return self._map(lambda t: t.detach())

    def __repr__(self) -> str:
        batch = "shared" if self._batch_size is None else f"batch {self._batch_size}"
        return (
            f"Refinement(layers {self.first_layer}..{self._num_layers - 1} of {self._num_layers}, "
            f"tokens {list(self.num_tokens)}, {batch})"
        )


def _group_tokens(tokens: Optional[Tensor], size: int, count: int, channels: int, reference: Tensor) -> Tensor:
    """[size, count, channels] tokens for one group of Refinement.cat: repeat shared, zero-pad missing tokens."""
    if tokens is None:
        return reference.new_zeros(size, count, channels)
    tokens = tokens.to(device=reference.device, dtype=reference.dtype)
    if tokens.ndim == 2:
        tokens = tokens.unsqueeze(0).expand(size, -1, -1)
    if tokens.shape[1] < count:
        tokens = torch.cat([tokens, tokens.new_zeros(size, count - tokens.shape[1], channels)], 1)
    return tokens


def refinement_layer_shapes(generator: nn.Module, num_refined: Optional[int] = None) -> list[tuple[int, int]]:
    """(Cin, Cout) of the last `num_refined` modulated conv layers of `generator` (all of them when None).

    generator: a refinestyle.Generator (anything with `layer_shapes()` and `num_layers`).
    num_refined: the paper's N_r, 1 <= num_refined <= generator.num_layers.
    """
    num_layers = generator.num_layers
    if num_refined is None:
        num_refined = num_layers
    if not isinstance(num_refined, int) or not 1 <= num_refined <= num_layers:
        raise ValueError(f"num_refined: expected an integer in [1, {num_layers}], got {num_refined!r}")
    return list(generator.layer_shapes())[num_layers - num_refined :]


class RefinementTokens(nn.Module):
    """All-learnable refinement tokens (P, Q, A, B for every refined layer), for domain adaptation.

    One `refinestyle_kernels.LayerTokens` per refined layer, in `self.layers`; the state_dict
    holds `layers.{i}.P` [L, Cout], `layers.{i}.Q` [L, Cin], `layers.{i}.A` [L], `layers.{i}.B` [L].

    Args:
        shapes: (Cin, Cout) of each refined layer, in order: the last len(shapes) conv layers
            of the generator (see `refinement_layer_shapes`).
        num_tokens: L, tokens per layer (256 in the paper's domain adaptation).
        num_layers: the generator's number of modulated conv layers (17 at 1024 px).
        scale_init: initial value of the scales A and B; None keeps LayerTokens' default.
    """

    def __init__(
        self,
        shapes: Sequence[tuple[int, int]],
        num_tokens: int,
        num_layers: int,
        scale_init: Optional[float] = None,
    ):
        super().__init__()
        from refinestyle_kernels import LayerTokens

        shapes = [tuple(int(c) for c in shape) for shape in shapes]
        if not 1 <= len(shapes) <= num_layers:
            raise ValueError(f"shapes: expected 1..num_layers={num_layers} (Cin, Cout) pairs, got {len(shapes)}")
        for index, shape in enumerate(shapes):
            if len(shape) != 2 or min(shape) < 1:
                raise ValueError(f"shapes[{index}]: expected (Cin, Cout) with positive channels, got {shape}")
        if not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_tokens: expected a positive integer, got {num_tokens!r}")
        self.shapes = shapes
        self.num_tokens = num_tokens
        self.num_layers = num_layers
        self.scale_init = scale_init
        kwargs = {} if scale_init is None else {"scale_init": scale_init}
        self.layers = nn.ModuleList(LayerTokens(cin, cout, num_tokens, **kwargs) for cin, cout in shapes)

    @classmethod
    def for_generator(
        cls,
        generator: nn.Module,
        num_refined: Optional[int] = None,
        num_tokens: int = 256,
        scale_init: Optional[float] = None,
    ) -> "RefinementTokens":
        """Tokens for the last `num_refined` (default: all) conv layers of `generator`, on its device."""
        shapes = refinement_layer_shapes(generator, num_refined)
        tokens = cls(shapes, num_tokens, generator.num_layers, scale_init=scale_init)
        parameter = next(generator.parameters(), None)
        return tokens if parameter is None else tokens.to(parameter.device)

    @property
    def num_refined(self) -> int:
        return len(self.shapes)

    def forward(self) -> Refinement:
        """The shared Refinement: p_i = A_i[:, None] * P_i, q_i = B_i[:, None] * Q_i for every refined layer."""
        pairs = [layer() for layer in self.layers]
        return Refinement([p for p, _ in pairs], [q for _, q in pairs], self.num_layers)

    def num_trainable(self) -> int:
        """Number of trainable scalars (2.98M for config-f 1024 px, all 17 layers, L = 256)."""
        return sum(parameter.numel() for parameter in self.parameters() if parameter.requires_grad)

    def extra_repr(self) -> str:
        return f"layers {self.num_layers - self.num_refined}..{self.num_layers - 1} of {self.num_layers}, L={self.num_tokens}"


def set_nvlabs_refinement(network: nn.Module, refinement: Optional[Refinement]) -> None:
    """Refine an NVlabs generator, swapped with refinestyle_kernels.swap_nvlabs_modules, in place.

    network: the NVlabs Generator (or SynthesisNetwork). Its conv layers are numbered as ours
        (b4.conv1 = 0, b8.conv0 = 1, ...), so a Refinement or an Adapter's refinement made for
        the generator `load_generator` converts from the same pickle applies unchanged.
    refinement: the tokens (shared [L, C], or per sample [B, L, C] for batches of B), or None
        to remove them. Every later forward of the network uses them (`layer.tokens`), until
        the next call.
    Raises ValueError when the refinement's layers or channels do not fit the network.
    """
    from refinestyle_kernels.nvlabs import nvlabs_conv_layers

    layers = nvlabs_conv_layers(network)
    if refinement is None:
        for layer in layers:
            layer.tokens = None
        return
    if not isinstance(refinement, Refinement):
        raise TypeError(f"refinement: expected a Refinement or None, got {type(refinement).__name__}")
    refinement.check_layer_shapes([(layer.in_channels, layer.out_channels) for layer in layers])
    for index, layer in enumerate(layers):
        p, q = refinement.for_layer(index)
        layer.tokens = None if p is None else (p, q)
