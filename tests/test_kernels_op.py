"""The reference and torch backends of the op against the literal formula, forward and backward."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernel_cases import Case, literal_per_sample, make_inputs, relative_error
from refinestyle_kernels import StyledConv, demodulation_coefficients, modulated_conv2d, styled_conv2d

CASES = [
    Case(3, 5, 6, 5, 7, 3, False, None),
    Case(3, 5, 6, 5, 7, 3, False, "shared", num_tokens=1),
    Case(2, 7, 4, 6, 5, 3, False, "per_sample", num_tokens=7),
    Case(2, 6, 5, 4, 3, 3, True, "per_sample", num_tokens=32),
    Case(1, 5, 3, 3, 5, 3, True, "shared", num_tokens=7),
    Case(2, 4, 3, 5, 5, 1, False, None, demodulate=False),  # toRGB
    Case(2, 9, 3, 4, 6, 1, False, "per_sample", num_tokens=7, demodulate=False),
    Case(3, 6, 5, 4, 3, 1, False, "shared", num_tokens=2),  # a demodulated 1x1 conv
    Case(2, 5, 7, 3, 4, 1, False, "per_sample", num_tokens=3),
    Case(2, 4, 9, 2, 3, 1, False, "per_sample", num_tokens=3),  # Cout > H * W: the separated 1x1 conv
    Case(2, 6, 8, 3, 4, 3, False, "shared", num_tokens=256),
    Case(2, 6, 8, 3, 3, 3, True, "per_sample", num_tokens=256, demodulate=False),
]


def layer_kwargs(case, inputs, activate=True, clamp=0.8):
    return dict(
        noise=inputs.get("noise"),
        noise_strength=inputs.get("noise_strength"),
        bias=inputs.get("bias"),
        activate=activate,
        clamp=clamp,
        demodulate=case.demodulate,
        upsample=case.upsample,
    )


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_backend_matches_per_sample_literal(case):
    inputs = make_inputs(case, seed=1)
    kwargs = layer_kwargs(case, inputs)
    args = [inputs[k] for k in ("x", "weight", "styles", "p", "q")]
    out = styled_conv2d(*args, backend="reference", **kwargs)
    ref = literal_per_sample(*args, **kwargs)
    assert out.shape == (case.batch, case.out_channels, *case.out_size)
    assert relative_error(out, ref) < 1e-13


@pytest.mark.parametrize("case", CASES, ids=str)
def test_torch_backend_forward_float64(case):
    inputs = make_inputs(case, seed=2)
    kwargs = layer_kwargs(case, inputs)
    args = [inputs[k] for k in ("x", "weight", "styles", "p", "q")]
    out = styled_conv2d(*args, backend="torch", **kwargs)
    ref = styled_conv2d(*args, backend="reference", **kwargs)
    assert relative_error(out, ref) < 1e-12


@pytest.mark.parametrize("case", CASES, ids=str)
def test_torch_backend_float32_against_float64_reference(case):
    inputs = make_inputs(case, seed=3)
    args64 = [inputs[k] for k in ("x", "weight", "styles", "p", "q")]
    args32 = [None if a is None else a.float() for a in args64]
    out = modulated_conv2d(*args32, demodulate=case.demodulate, upsample=case.upsample, backend="torch")
    ref = modulated_conv2d(*args64, demodulate=case.demodulate, upsample=case.upsample, backend="reference")
    assert out.dtype == torch.float32
    assert relative_error(out, ref) < 1e-5


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_torch_backend_without_a_graph_computes_in_place_what_autograd_would(case, memory_format):
    """With no graph to record, the torch backend overwrites its fresh intermediates: the same
    result as the recorded path, the inputs untouched, and fewer tensors made."""
    inputs = make_inputs(case, seed=4)
    kwargs = layer_kwargs(case, inputs)
    args = [inputs[k] for k in ("x", "weight", "styles", "p", "q")]
    args[0] = args[0].contiguous(memory_format=memory_format)
    before = {name: value.clone() for name, value in {**inputs, **kwargs}.items() if torch.is_tensor(value)}
    with AllocationCount() as without_graph:
        out = styled_conv2d(*args, backend="torch", **kwargs)
    assert not out.requires_grad
    recorded_args = [None if a is None else a.detach().requires_grad_() for a in args]
    with AllocationCount() as with_graph:
        recorded = styled_conv2d(*recorded_args, backend="torch", **kwargs)
    assert recorded.requires_grad
    assert relative_error(out, recorded.detach()) < 1e-14
    assert relative_error(out, styled_conv2d(*args, backend="reference", **kwargs)) < 1e-12
    for name, value in {**inputs, **kwargs}.items():
        if torch.is_tensor(value):
            assert torch.equal(value, before[name]), name
    full_size = out.numel()
    assert without_graph.at_least(full_size) < with_graph.at_least(full_size)
    separated = case.kernel > 1 or case.out_channels > case.height * case.width  # not a toRGB-like 1x1
    if case.tokens and separated:  # the low-rank branch added into the conv's result, in either layout
        assert "aten.baddbmm.out" in without_graph.ops and "aten.baddbmm.out" not in with_graph.ops
    # and FlopCounterMode (eval-inversion's FLOPs, the suite's cross-check) sees the same work
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    for call_args in (args, recorded_args):
        with FlopCounterMode(display=False) as counter:
            styled_conv2d(*call_args, backend="torch", **kwargs)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


def test_torch_backend_without_a_graph_under_autocast_returns_what_the_recorded_path_does():
    """Autocast rounds the conv's result to bf16 and the fp32 steps after it promote it back:
    the path without a graph must not keep it in bf16 by overwriting it."""
    case = CASES[3]
    inputs = make_inputs(case, dtype=torch.float32, seed=5)
    kwargs = layer_kwargs(case, inputs)
    args = [inputs[k] for k in ("x", "weight", "styles", "p", "q")]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = styled_conv2d(*args, backend="torch", **kwargs)
        recorded = styled_conv2d(*[a.detach().requires_grad_() for a in args], backend="torch", **kwargs)
    assert out.dtype == recorded.dtype
    assert torch.equal(out, recorded.detach())


@pytest.mark.parametrize("case", CASES, ids=str)
def test_torch_backend_gradients_match_reference(case):
    inputs = make_inputs(case, seed=4)
    names = [k for k in ("x", "weight", "styles", "p", "q", "noise_strength", "bias") if inputs[k] is not None]

    def grads(backend):
        leaves = {k: v.clone().requires_grad_(k in names) if v is not None else None for k, v in inputs.items()}
        out = styled_conv2d(
            leaves["x"], leaves["weight"], leaves["styles"], leaves["p"], leaves["q"],
            backend=backend, **layer_kwargs(case, leaves, clamp=None),
        )
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
        return torch.autograd.grad((out * upstream).sum(), [leaves[k] for k in names])

    for name, g, ref in zip(names, grads("torch"), grads("reference")):
        assert relative_error(g, ref) < 1e-10, name


@pytest.mark.parametrize(
    "case",
    [Case(2, 3, 2, 3, 4, 3, False, "per_sample", num_tokens=2), Case(1, 2, 3, 2, 3, 3, True, "shared", num_tokens=2),
     Case(2, 3, 3, 3, 2, 1, False, "per_sample", num_tokens=1, demodulate=False)],
    ids=str,
)
def test_torch_backend_gradcheck(case):
    """First and second derivatives (path-length regularisation and NVlabs' Greg phase take the
    second through the generator) against finite differences, float64."""
    inputs = make_inputs(case, seed=6)
    names = ["x", "weight", "styles", "p", "q", "noise_strength", "bias"]
    leaves = [inputs[k].clone().requires_grad_() for k in names]

    def layer(x, weight, styles, p, q, noise_strength, bias):
        return styled_conv2d(
            x, weight, styles, p, q, noise=inputs["noise"], noise_strength=noise_strength, bias=bias,
            demodulate=case.demodulate, upsample=case.upsample, backend="torch",
        )

    assert torch.autograd.gradcheck(layer, leaves, eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck(layer, leaves, eps=1e-6, atol=1e-6)


def test_frozen_weight_gets_no_gradient_and_tokens_do():
    case = Case(2, 4, 5, 4, 4, 3, False, "per_sample")
    inputs = make_inputs(case, dtype=torch.float32, seed=7)
    weight = inputs["weight"]  # frozen: requires_grad stays False
    p = inputs["p"].requires_grad_()
    q = inputs["q"].requires_grad_()
    out = modulated_conv2d(inputs["x"], weight, inputs["styles"], p, q, backend="torch")
    out.square().sum().backward()
    assert weight.grad is None
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_channels_last_input_gives_the_same_result():
    case = Case(2, 6, 5, 5, 7, 3, True, "per_sample")
    inputs = make_inputs(case, seed=8)
    args = [inputs[k] for k in ("x", "weight", "styles", "p", "q")]
    out = modulated_conv2d(*args, upsample=True, backend="torch")
    args[0] = args[0].to(memory_format=torch.channels_last)
    assert relative_error(modulated_conv2d(*args, upsample=True, backend="torch"), out) < 1e-14


class LargestAllocation(TorchDispatchMode):
    """Records the numel of the largest tensor any aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for value in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return result


class AllocationCount(TorchDispatchMode):
    """The sizes of the tensors aten ops make (not views, not in-place or out= results)."""

    def __init__(self):
        super().__init__()
        self.sizes, self.ops = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        result = func(*args, **(kwargs or {}))
        for value in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(value, torch.Tensor) and func.overloadpacket not in VIEWS and not func._schema.is_mutable:
                self.sizes.append(value.numel())
        return result

    def at_least(self, numel: int) -> int:
        return sum(size >= numel for size in self.sizes)


VIEWS = {torch.ops.aten.view, torch.ops.aten._unsafe_view, torch.ops.aten.expand, torch.ops.aten.reshape,
         torch.ops.aten.as_strided, torch.ops.aten.transpose, torch.ops.aten.t, torch.ops.aten.permute,
         torch.ops.aten.unsqueeze, torch.ops.aten.squeeze, torch.ops.aten.slice, torch.ops.aten.select,
         torch.ops.aten.alias, torch.ops.aten.detach}


@pytest.mark.parametrize("upsample", [False, True])
def test_torch_backend_never_builds_per_sample_kernels(upsample):
    # per-sample kernels would be 8*64*64*9 = 295k elements; activations are 8*64*4*4*4 = 32k at most
    case = Case(8, 64, 64, 4, 4, 3, upsample, "per_sample", num_tokens=4)
    inputs = make_inputs(case, dtype=torch.float32, seed=9)
    args = [inputs[k].requires_grad_() for k in ("x", "weight", "styles", "p", "q")]
    with LargestAllocation() as forward_mode:
        out = modulated_conv2d(*args, upsample=upsample, backend="torch")
    with LargestAllocation() as backward_mode:
        out.square().sum().backward()
    with torch.no_grad(), LargestAllocation() as inference_mode:
        modulated_conv2d(*args, upsample=upsample, backend="torch")
    per_sample_kernels = 8 * 64 * 64 * 9
    assert forward_mode.largest < per_sample_kernels / 4
    assert backward_mode.largest < per_sample_kernels / 4
    assert inference_mode.largest < per_sample_kernels / 4
    # and the reference does build them, so the probe can see it
    with LargestAllocation() as reference_mode:
        modulated_conv2d(*[a.detach() for a in args], upsample=upsample, backend="reference")
    assert reference_mode.largest >= per_sample_kernels


def test_output_keeps_input_dtype_in_half_precision():
    case = Case(2, 4, 4, 4, 4, 3, False, "shared")
    inputs = make_inputs(case, dtype=torch.bfloat16, seed=10)
    args = [inputs[k] for k in ("x", "weight", "styles", "p", "q")]
    out = modulated_conv2d(*args, backend="torch")
    ref = modulated_conv2d(*[a.double() for a in args], backend="reference")
    assert out.dtype == torch.bfloat16
    assert relative_error(out, ref) < 3e-2


@pytest.mark.parametrize("tokens", [None, "shared", "per_sample"])
@pytest.mark.parametrize("train_weight", [True, False])
def test_demodulation_coefficients_backward_is_the_formulas_gradient(tokens, train_weight):
    """demodulation_coefficients has a hand-written backward (fewer ops than autograd through the
    formula): gradcheck it in float64, and check its values against the formula traced by autograd."""
    from refinestyle_kernels.ops.modulated_conv2d import _demodulation_traced

    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(6, 5, 3, 3, generator=gen, dtype=torch.float64, requires_grad=train_weight)
    styles = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    lead = () if tokens == "shared" else (3,)
    p = q = None
    if tokens:
        p = torch.randn(*lead, 4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
        q = torch.randn(*lead, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)

    def demod(weight, styles, *tokens):
        return demodulation_coefficients(weight, styles, *(tokens or (None, None)), 0.3, 1e-8)

    inputs = (weight, styles) + ((p, q) if tokens else ())
    assert torch.autograd.gradcheck(demod, inputs)
    expected = _demodulation_traced(weight, styles, p, q, 0.3, 1e-8)
    assert torch.allclose(demod(*inputs), expected, rtol=1e-12, atol=0)


def test_demodulation_tap_sums_follow_the_weight():
    """The frozen weight's tap sums are cached: an in-place change or another tensor refreshes them."""
    gen = torch.Generator().manual_seed(8)
    weight = torch.randn(6, 5, 3, 3, generator=gen)
    styles = torch.randn(2, 5, generator=gen)
    first = demodulation_coefficients(weight, styles, None, None, 0.3, 1e-8)
    with torch.no_grad():
        weight.mul_(2.0)  # sum K^2 x4: d halves
    assert torch.allclose(demodulation_coefficients(weight, styles, None, None, 0.3, 1e-8), first / 2, rtol=1e-5)
    other = torch.randn(6, 5, 3, 3, generator=gen)
    expected = torch.rsqrt((styles.square() @ other.square().sum((2, 3)).t()) * 0.09 + 1e-8)
    assert torch.allclose(demodulation_coefficients(other, styles, None, None, 0.3, 1e-8), expected, rtol=1e-5)


def test_weight_derived_tensors_are_cached_across_fresh_views_of_one_parameter():
    """The modules pass `self.weight[0]`, a new view every call: the cache keys on the view's
    base, so a frozen layer derives its tap sums once, and a base changed in place, given new
    data, or another slice of it derives them afresh."""
    from refinestyle_kernels.ops import modulated_conv2d as op_module

    parameter = torch.nn.Parameter(torch.randn(2, 6, 5, 3, 3), requires_grad=False)
    calls = []

    def make(weight):
        calls.append(weight.sum().item())
        return weight.sum((2, 3))

    first = op_module._derived_from_weight(parameter[0], ("test-sums",), make)
    again = op_module._derived_from_weight(parameter[0], ("test-sums",), make)
    assert len(calls) == 1 and again is first
    other_slice = op_module._derived_from_weight(parameter[1], ("test-sums",), make)
    assert len(calls) == 2 and torch.equal(other_slice, parameter[1].sum((2, 3)))
    with torch.no_grad():
        parameter.mul_(2.0)
    refreshed = op_module._derived_from_weight(parameter[0], ("test-sums",), make)
    assert len(calls) == 3 and torch.allclose(refreshed, 2 * first)
    parameter.data = torch.randn(2, 6, 5, 3, 3)  # a new storage under the same object and version
    swapped = op_module._derived_from_weight(parameter[0], ("test-sums",), make)
    assert len(calls) == 4 and torch.equal(swapped, parameter[0].sum((2, 3)))
    trained = parameter[0].detach().requires_grad_(True)
    op_module._derived_from_weight(trained, ("test-sums",), make)
    op_module._derived_from_weight(trained, ("test-sums",), make)
    assert len(calls) == 6  # a weight being trained is never cached


def test_weight_cache_drops_entries_of_freed_weights_and_keeps_autocast_casts():
    """Under autocast the modules cast the fp32 W0 to bf16: the cast is kept, so the derived
    tensors are made once, not once per call; a freed weight's entries go with it."""
    from refinestyle_kernels.modules import _weight_as
    from refinestyle_kernels.ops import modulated_conv2d as op_module

    op_module.clear_weight_cache()
    conv = StyledConv(6, 5, 3, style_dim=4, backend="torch").requires_grad_(False)
    x, w = torch.randn(2, 6, 5, 5), torch.randn(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = conv(x, w)
        entries = len(op_module._WEIGHT_DERIVED)
        for _ in range(3):
            again = conv(x, w)
    assert entries > 0 and len(op_module._WEIGHT_DERIVED) == entries
    assert torch.equal(first, again)
    cast = _weight_as(conv.conv.weight[0], torch.bfloat16)
    assert cast.dtype == torch.bfloat16 and _weight_as(conv.conv.weight[0], torch.bfloat16) is cast
    del conv, cast
    assert len(op_module._WEIGHT_DERIVED) == 0


def test_weight_cache_under_inference_mode_serves_later_training_calls():
    """Derived tensors first made under torch.inference_mode are plain tensors, which a later
    call with autograd on can save for its backward; a layer built under inference_mode runs."""
    from refinestyle_kernels.ops import modulated_conv2d as op_module

    op_module.clear_weight_cache()
    conv = StyledConv(4, 5, 3, style_dim=6, upsample=True, backend="torch").requires_grad_(False)
    x, w = torch.randn(2, 4, 5, 5), torch.randn(2, 6)
    p, q = torch.randn(2, 3, 5, requires_grad=True), torch.randn(2, 3, 4, requires_grad=True)
    with torch.inference_mode():
        expected = conv(x, w, p=p, q=q)
    out = conv(x, w, p=p, q=q)
    out.sum().backward()
    assert torch.allclose(out, expected) and p.grad is not None and q.grad is not None
    with torch.inference_mode():
        built_there = StyledConv(4, 5, 3, style_dim=6, backend="torch").requires_grad_(False)
        assert built_there(x, w).shape == (2, 5, 5, 5)


@pytest.mark.parametrize("options", [{"foreach": False}, {"foreach": True}, {"fused": True}])
def test_a_weight_frozen_between_optimizer_steps_is_derived_again(options):
    """A GAN loop freezes G for the discriminator's step (the derived tensors are kept), then
    trains it. Fused optimizers update the weight without moving its version counter."""
    conv = StyledConv(4, 5, 3, style_dim=6, backend="torch")
    optimizer = torch.optim.Adam(conv.parameters(), lr=0.1, **options)
    x, w, noise = torch.randn(2, 4, 5, 5), torch.randn(2, 6), torch.randn(2, 1, 5, 5)
    conv(x, w, noise).square().sum().backward()
    conv.requires_grad_(False)
    before = conv(x, w, noise)  # frozen: derives and keeps the tensors of this weight
    version = conv.conv.weight._version
    optimizer.step()
    fresh = StyledConv(4, 5, 3, style_dim=6, backend="torch").requires_grad_(False)
    fresh.load_state_dict(conv.state_dict())
    expected = fresh(x, w, noise)
    assert not torch.allclose(before, expected, atol=1e-3)
    torch.testing.assert_close(conv(x, w, noise), expected)
    if options.get("fused"):
        assert conv.conv.weight._version == version  # what makes the hook necessary


def test_clear_weight_cache_sees_a_change_made_through_data():
    """`param.data` has a version counter of its own, so an in-place change through it is not
    seen until `clear_weight_cache`; the same change under no_grad is seen at once."""
    from refinestyle_kernels import clear_weight_cache

    conv = StyledConv(4, 5, 3, style_dim=6, backend="torch").requires_grad_(False)
    x, w = torch.randn(2, 4, 5, 5), torch.randn(2, 6)
    noise = torch.randn(2, 1, 5, 5)
    conv(x, w, noise)  # derives and keeps the frozen layer's tensors
    conv.conv.weight.data.mul_(-1.0).add_(0.5)
    conv.conv.modulation.weight.data.mul_(3.0)
    fresh = StyledConv(4, 5, 3, style_dim=6, backend="torch").requires_grad_(False)
    fresh.load_state_dict(conv.state_dict())
    expected = fresh(x, w, noise)
    clear_weight_cache()
    assert torch.allclose(conv(x, w, noise), expected, atol=1e-6)
    with torch.no_grad():
        conv.conv.weight.mul_(2.0)
        fresh.conv.weight.mul_(2.0)
    assert torch.allclose(conv(x, w, noise), fresh(x, w, noise), atol=1e-6)


def test_weight_cache_sees_parameters_given_new_storage_through_data():
    """`param.data = other` keeps the object and its version: a freed storage's address, handed
    to a later weight, must not find the entry made from the old one (vector_to_parameters
    assigns .data; a search over frozen weights rendered with stale tensors)."""
    from refinestyle_kernels.ops.modulated_conv2d import _WEIGHT_DERIVED

    conv = StyledConv(4, 5, 3, style_dim=6, backend="torch").requires_grad_(False)
    reference = StyledConv(4, 5, 3, style_dim=6, backend="reference").requires_grad_(False)
    x, w, noise = torch.randn(2, 4, 5, 5), torch.randn(2, 6), torch.randn(2, 1, 5, 5)
    generator = torch.Generator().manual_seed(0)
    for _ in range(12):
        vector = torch.randn(sum(p.numel() for p in conv.parameters()), generator=generator)
        torch.nn.utils.vector_to_parameters(vector.clone(), conv.parameters())
        reference.load_state_dict(conv.state_dict())
        assert torch.allclose(conv(x, w, noise), reference(x, w, noise), atol=1e-5)
    own = {id(conv.conv.weight), id(conv.conv.modulation.weight)}
    assert sum(key[0] in own for key in _WEIGHT_DERIVED) <= 2  # entries of old storages dropped


def test_demodulation_coefficients_stay_float32_under_autocast():
    """Autocast would round the closed form's matmuls to bf16; d is computed in float32 anyway."""
    gen = torch.Generator().manual_seed(9)
    weight = torch.randn(6, 5, 3, 3, generator=gen)
    styles = torch.randn(3, 5, generator=gen, requires_grad=True)
    p, q = torch.randn(3, 4, 6, generator=gen), torch.randn(3, 4, 5, generator=gen)
    expected = demodulation_coefficients(weight, styles, p, q, 0.3, 1e-8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        demod = demodulation_coefficients(weight, styles, p, q, 0.3, 1e-8)
    assert demod.dtype == torch.float32
    assert torch.allclose(demod, expected, rtol=1e-6)
    (grad,) = torch.autograd.grad(demod.sum(), styles)
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
