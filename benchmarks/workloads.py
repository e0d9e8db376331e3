"""Inputs and calls of a case: one layer through the op, or the whole synthesis network.

A workload draws the case's inputs (fresh random numbers from a seeded generator,
never zeros: activations, the static weight, styles around 1 as the affine layers
give them, tokens scaled so the residual p^T q is as large as the modulated kernel,
noise, bias and an output gradient), runs an implementation on them, and computes
the truth the correctness guard compares against: the reference backend in
float64 on the same (rounded) inputs.
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable, Iterator

import torch

from benchmarks.cases import Case
from benchmarks.implementations import REFERENCE, Implementation
from benchmarks.timing import DTYPES

#: whole-generator truths in float64 up to this many output pixels (batch x size^2);
#: above it the truth is the reference in float32 with TF32 off (memory)
FLOAT64_TRUTH_PIXELS = 2 * 1024 * 1024


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """Turn TF32 off for matmuls and cuDNN convs inside the block."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


@contextlib.contextmanager
def patched_op(op: Callable | None) -> Iterator[None]:
    """Make the generator's layers call `op` instead of refinestyle_kernels.styled_conv2d.

    refinestyle_kernels.modules looks the ops up as module globals at call time, so
    replacing them swaps the implementation of every StyledConv and ToRGB: `styled_conv2d`
    by `op`, and the conv + toRGB pairs (`styled_conv2d_to_rgb`) by two calls of `op`.
    """
    if op is None:
        yield
        return
    import refinestyle_kernels.modules as modules
    from refinestyle_kernels.ops.styled_conv2d_to_rgb import composed_styled_conv2d_to_rgb

    originals = modules.styled_conv2d, modules.styled_conv2d_to_rgb
    modules.styled_conv2d, modules.styled_conv2d_to_rgb = op, composed_styled_conv2d_to_rgb(op)
    try:
        yield
    finally:
        modules.styled_conv2d, modules.styled_conv2d_to_rgb = originals


def token_std(num_tokens: int, in_channel: int, kernel_size: int) -> float:
    """Std of p and q that makes p^T q about as large as scale * W0 * s (entries ~ 1/sqrt(Cin k^2))."""
    return (num_tokens * in_channel * kernel_size**2) ** -0.25


class Workload:
    """Base class: input sets, the call of an implementation, outputs for the guard."""

    def __init__(self, case: Case, device: torch.device, seed: int = 0):
        self.case = case
        self.device = device
        self.dtype = DTYPES[case.dtype]
        self.seed = seed
        self.sets: list[dict] = []

    # subclasses: draw(index, dtype) -> dict of input tensors; tensor_args(inputs) -> tuple;
    # forward_fn(implementation, dtype) -> callable(*tensor_args) -> output;
    # leaves(inputs) -> {name: tensor needing a gradient}; set_bytes() -> int

    def _generator(self, index: int) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self.seed * 1000 + index)
        return generator

    def _randn(self, generator: torch.Generator, *shape, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
        sample = torch.randn(*shape, generator=generator, device=self.device, dtype=torch.float32)
        return (sample * std + mean).to(self.dtype)

    def ensure_sets(self, count: int) -> None:
        """Draw input sets until there are `count` of them."""
        while len(self.sets) < count:
            self.sets.append(self.draw(len(self.sets)))

    def drop_sets(self, keep: int = 1) -> None:
        del self.sets[keep:]

    def cast(self, inputs: dict, dtype: torch.dtype) -> dict:
        """A detached copy of an input set in another dtype, with the same leaves needing gradients."""
        needs_grad = {name for name in self.leaves(inputs)}
        cast = {}
        for name, value in inputs.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().to(dtype).requires_grad_(name in needs_grad)
            elif isinstance(value, list):
                value = [
                    t.detach().to(dtype).requires_grad_(f"{name}{i}" in needs_grad) for i, t in enumerate(value)
                ]
            cast[name] = value
        return cast

    def run(self, forward: Callable, inputs: dict) -> dict[str, torch.Tensor]:
        """One call: the output, and in a forward+backward case the gradients of every leaf.

        Returns {"out": output} plus {"grad_<leaf>": gradient} for forward+backward.
        """
        out = forward(*self.tensor_args(inputs))
        if not self.case.backward:
            return {"out": out}
        leaves = self.leaves(inputs)
        grads = torch.autograd.grad(out, list(leaves.values()), inputs["grad_out"])
        return {"out": out, **self.group_grads(dict(zip(leaves, grads)))}

    def group_grads(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {f"grad_{name}": grad for name, grad in grads.items()}

    def truth(self) -> dict[str, torch.Tensor]:
        """The reference backend on input set 0, in float64 (or float32 without TF32, see subclasses)."""
        dtype = self.truth_dtype()
        inputs = self.cast(self.sets[0], dtype)
        with exact_float32():
            outputs = self.run(self.forward_fn(REFERENCE, dtype), inputs)
        return {name: value.detach() for name, value in outputs.items()}

    def truth_dtype(self) -> torch.dtype:
        return torch.float64

    def num_rotating_sets(self, cache_bytes: int) -> int:
        """Enough sets that consecutive calls never share cached inputs: >= 3 x cache, 2..16 sets."""
        return int(min(max(math.ceil(3 * cache_bytes / max(self.set_bytes(), 1)), 2), 16))

    def release(self, implementation: Implementation) -> None:
        """Undo what bind() changed."""


class LayerWorkload(Workload):
    """One StyledConv (conv: noise, bias, leaky ReLU) or ToRGB (bias only) layer through the op."""

    def __init__(self, case: Case, device: torch.device, seed: int = 0):
        super().__init__(case, device, seed)
        self.spec = case.layer

    def draw(self, index: int) -> dict:
        spec, case = self.spec, self.case
        generator = self._generator(index)
        batch, tokens = case.batch, case.tokens
        k = spec.kernel_size
        inputs = {
            "x": self._randn(generator, batch, spec.in_channel, spec.in_size, spec.in_size),
            "weight": self._randn(generator, spec.out_channel, spec.in_channel, k, k),
            "styles": self._randn(generator, batch, spec.in_channel, std=0.2, mean=1.0),
            "p": None,
            "q": None,
            "noise": None,
            "noise_strength": None,
            "bias": self._randn(generator, spec.out_channel, std=0.1),
        }
        if tokens.num_tokens:
            lead = () if tokens.shared else (batch,)
            std = token_std(tokens.num_tokens, spec.in_channel, k)
            inputs["p"] = self._randn(generator, *lead, tokens.num_tokens, spec.out_channel, std=std)
            inputs["q"] = self._randn(generator, *lead, tokens.num_tokens, spec.in_channel, std=std)
        if spec.kind == "conv":
            inputs["noise"] = self._randn(generator, batch, 1, spec.out_size, spec.out_size)
            inputs["noise_strength"] = self._randn(generator, 1, std=0.1, mean=0.2)
        if case.backward:
            inputs["grad_out"] = self._randn(generator, batch, spec.out_channel, spec.out_size, spec.out_size)
            for name in self._leaf_names(inputs):
                inputs[name].requires_grad_(True)
        return inputs

    def _leaf_names(self, inputs: dict) -> list[str]:
        return [name for name in ("x", "styles", "p", "q") if inputs[name] is not None]

    def leaves(self, inputs: dict) -> dict[str, torch.Tensor]:
        if not self.case.backward:
            return {}
        return {name: inputs[name] for name in self._leaf_names(inputs)}

    def tensor_args(self, inputs: dict) -> tuple:
        names = ("x", "weight", "styles", "p", "q", "noise", "noise_strength", "bias")
        return tuple(inputs[name] for name in names)

    def forward_fn(self, implementation: Implementation, dtype: torch.dtype | None = None) -> Callable:
        op = implementation.layer_op()
        spec = self.spec
        conv = spec.kind == "conv"

        def forward(x, weight, styles, p, q, noise, noise_strength, bias):
            return op(
                x,
                weight,
                styles,
                p,
                q,
                noise=noise,
                noise_strength=noise_strength,
                bias=bias,
                activate=conv,
                demodulate=spec.demodulate,
                upsample=spec.upsample,
            )

        return forward

    def set_bytes(self) -> int:
        return sum(
            value.numel() * value.element_size()
            for value in self.sets[0].values()
            if isinstance(value, torch.Tensor)
        )


class GeneratorWorkload(Workload):
    """The whole synthesis network: w+ [B, n_latent, style_dim] (and tokens) to the image.

    The generator is random (rosinality's initialisation, seeded), frozen, uses its
    stored noise maps (randomize_noise=False, as inversion does) and is converted to
    the case's dtype. The refinement is `refinestyle.Refinement` with per-layer p, q on
    every conv layer.
    """

    _models: dict = {}  # (generator config, dtype, device) -> Generator, shared by the cases of a run

    def __init__(self, case: Case, device: torch.device, seed: int = 0):
        super().__init__(case, device, seed)

    @classmethod
    def clear_models(cls) -> None:
        cls._models.clear()

    def model(self, dtype: torch.dtype):
        key = (self.case.generator, dtype, str(self.device))
        if key not in self._models:
            from refinestyle.generator import Generator

            config = self.case.generator
            base_key = (config, torch.float32, str(self.device))
            if base_key not in self._models:
                # the CPU generator is seeded so every dtype and backend gets the same weights
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.seed)
                    model = Generator(
                        config.size,
                        style_dim=config.style_dim,
                        n_mlp=config.n_mlp,
                        channel_multiplier=config.channel_multiplier,
                        channel_max=config.channel_max,
                    )
                self._models[base_key] = model.to(self.device).eval().requires_grad_(False)
            if dtype != torch.float32:
                self._models[key] = copy.deepcopy(self._models[base_key]).to(dtype)
        return self._models[key]

    def layer_shapes(self) -> list[tuple[int, int]]:
        convs, _ = self.case.generator.layers()
        return [(spec.in_channel, spec.out_channel) for spec in convs]

    def draw(self, index: int) -> dict:
        case = self.case
        config = case.generator
        generator = self._generator(index)
        num_latent = int(math.log2(config.size)) * 2 - 2
        inputs = {
            "w_plus": self._randn(generator, case.batch, num_latent, config.style_dim),
            "p": [],
            "q": [],
        }
        tokens = case.tokens
        if tokens.num_tokens:
            lead = () if tokens.shared else (case.batch,)
            for in_channel, out_channel in self.layer_shapes():
                std = token_std(tokens.num_tokens, in_channel, 3)
                inputs["p"].append(self._randn(generator, *lead, tokens.num_tokens, out_channel, std=std))
                inputs["q"].append(self._randn(generator, *lead, tokens.num_tokens, in_channel, std=std))
        if case.backward:
            inputs["grad_out"] = self._randn(generator, case.batch, 3, config.size, config.size)
            for leaf in self.leaves(inputs).values():
                leaf.requires_grad_(True)
        return inputs

    def leaves(self, inputs: dict) -> dict[str, torch.Tensor]:
        if not self.case.backward:
            return {}
        leaves = {"w_plus": inputs["w_plus"]}
        for name in ("p", "q"):
            for index, tensor in enumerate(inputs[name]):
                leaves[f"{name}{index}"] = tensor
        return leaves

    def group_grads(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # one flat vector per kind of leaf, so the guard reports three errors, not 35
        grouped = {"grad_w_plus": grads["w_plus"]}
        for name in ("p", "q"):
            parts = [grad.reshape(-1) for key, grad in grads.items() if key[0] == name and key[1:].isdigit()]
            if parts:
                grouped[f"grad_{name}"] = torch.cat(parts)
        return grouped

    def tensor_args(self, inputs: dict) -> tuple:
        return (inputs["w_plus"], *inputs["p"], *inputs["q"])

    def forward_fn(self, implementation: Implementation, dtype: torch.dtype | None = None) -> Callable:
        from refinestyle.refinement import Refinement

        model = self.model(dtype or self.dtype)
        model.backend = implementation.backend
        num_refined = len(self.layer_shapes()) if self.case.tokens.num_tokens else 0

        # an implementation with its own op (nvlabs) runs inside patched_op(implementation.op),
        # which the runner holds for as long as the implementation is bound
        def forward(w_plus, *tokens):
            refinement = None
            if num_refined:
                refinement = Refinement(tokens[:num_refined], tokens[num_refined:], model.num_layers)
            return model.synthesis(w_plus, refinement=refinement, randomize_noise=False)

        return forward

    def truth_dtype(self) -> torch.dtype:
        pixels = self.case.batch * self.case.generator.size**2
        return torch.float64 if pixels <= FLOAT64_TRUTH_PIXELS else torch.float32

    def set_bytes(self) -> int:
        inputs = self.sets[0]
        tensors = [inputs["w_plus"], *inputs["p"], *inputs["q"]]
        if "grad_out" in inputs:
            tensors.append(inputs["grad_out"])
        return sum(t.numel() * t.element_size() for t in tensors)

    def num_rotating_sets(self, cache_bytes: int) -> int:
        # the generator's own weights (tens of MB at 1024 px) dominate what a call reads and
        # are one copy for every set; rotating the small inputs between two sets suffices
        return 2


def make_workload(case: Case, device: torch.device, seed: int = 0) -> Workload:
    return LayerWorkload(case, device, seed) if case.group == "layer" else GeneratorWorkload(case, device, seed)
