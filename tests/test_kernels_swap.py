"""swap_rosinality_modules: a rosinality-layout generator keeps its forward, its state_dict and its
outputs, and runs (and refines) through our layers."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from refinestyle_kernels import ModulatedConv2d, StyledConv, ToRGB, swap_rosinality_modules
from rosinality_reference import ReferenceGenerator, RefStyledConv, RefToRGB

SIZE, STYLE_DIM = 16, 8
CHANNELS = {4: 8, 8: 6, 16: 5}  # Cin != Cout: a swapped side cannot pass
REFERENCE_CLASSES = ("RefStyledConv", "RefToRGB")


@pytest.fixture
def reference():
    torch.manual_seed(0)
    reference = ReferenceGenerator(SIZE, STYLE_DIM, 2, CHANNELS).randomize_(torch.Generator().manual_seed(1)).double()
    with torch.no_grad():  # values float32 cannot hold, so that a detour through float32 shows
        for parameter in reference.parameters():
            parameter.add_(1e-9 * torch.randn_like(parameter))
    return reference


def inputs(generator, batch=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    w_plus = torch.randn(batch, generator.n_latent, STYLE_DIM, generator=g, dtype=torch.float64)
    noise = [
        torch.randn(batch, 1, 2 ** ((i + 5) // 2), 2 ** ((i + 5) // 2), generator=g, dtype=torch.float64)
        for i in range(generator.num_layers)
    ]
    convs = [generator.conv1, *generator.convs]
    tokens = [
        tuple(0.1 * torch.randn(batch, 4, c, generator=g, dtype=torch.float64) for c in
              (conv.conv.weight.shape[1], conv.conv.weight.shape[2]))
        for conv in convs
    ]
    return w_plus, noise, tokens


def test_swapped_generator_keeps_its_state_and_outputs(reference):
    swapped = copy.deepcopy(reference)
    reference.conv1.requires_grad_(False)
    swapped.conv1.requires_grad_(False)
    names = swap_rosinality_modules(swapped, class_names=REFERENCE_CLASSES, backend="torch")

    assert names == ["conv1", "to_rgb1", "convs.0", "convs.1", "convs.2", "convs.3", "to_rgbs.0", "to_rgbs.1"]
    assert all(isinstance(swapped.get_submodule(n), StyledConv if "conv" in n and "rgb" not in n else ToRGB)
               for n in names)
    assert swapped.convs[0].conv.upsample and not swapped.convs[1].conv.upsample
    assert not hasattr(swapped.to_rgb1, "upsample") and hasattr(swapped.to_rgbs[0], "upsample")
    before, after = reference.state_dict(), swapped.state_dict()
    assert list(before) == list(after) and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.dtype == torch.float64 for p in swapped.parameters())
    assert [p.requires_grad for p in swapped.parameters()] == [p.requires_grad for p in reference.parameters()]

    w_plus, noise, tokens = inputs(reference)
    for refinement in (None, tokens):
        expected = reference.synthesis(w_plus, noise, refinement)
        torch.testing.assert_close(swapped.synthesis(w_plus, noise, refinement), expected, rtol=1e-10, atol=1e-10)
    # gradients reach the tokens alike through both
    grads = []
    for model in (reference, swapped):
        leaves = [t.clone().requires_grad_(True) for pair in tokens for t in pair]
        pairs = list(zip(leaves[::2], leaves[1::2]))
        model.synthesis(w_plus, noise, pairs).square().mean().backward()
        grads.append([t.grad for t in leaves])
    for ours, theirs in zip(grads[1], grads[0]):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
    # swapping again finds nothing left to swap
    assert swap_rosinality_modules(swapped, class_names=REFERENCE_CLASSES) == []


def test_an_optimizer_built_before_the_swap_still_trains_the_layers(reference):
    """The swapped layers hold the old Parameter objects: an optimizer (or a hook, or a tied
    weight) made before the swap reaches them, and a step moves the swapped generator."""
    objects = dict(reference.named_parameters())
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    swap_rosinality_modules(reference, class_names=REFERENCE_CLASSES, backend="torch")
    assert dict(reference.named_parameters()).keys() == objects.keys()
    assert all(reference.get_parameter(key) is parameter for key, parameter in objects.items())
    w_plus, noise, _ = inputs(reference)
    weight = reference.convs[1].conv.weight
    before = weight.detach().clone()
    reference.synthesis(w_plus, noise).square().mean().backward()
    optimizer.step()
    assert not torch.equal(weight, before)


def test_layers_the_fused_op_cannot_run_are_refused(reference):
    class StyledConv(nn.Module):  # a rosinality name on a foreign structure
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3)

    holder = nn.Sequential(StyledConv())
    with pytest.raises(TypeError, match=r"0: a StyledConv without rosinality's conv.weight"):
        swap_rosinality_modules(holder)
    odd_blur = copy.deepcopy(reference)
    with torch.no_grad():
        odd_blur.convs[0].conv.blur.kernel.fill_(1 / 16)
    with pytest.raises(ValueError, match=r"convs.0: its conv.blur.kernel is not the \(1, 3, 3, 1\) filter"):
        swap_rosinality_modules(odd_blur, class_names=REFERENCE_CLASSES)
    three_tap_blur = copy.deepcopy(reference)  # built with blur_kernel=[1, 2, 1]: a 3x3 filter
    three_tap_blur.convs[0].conv.blur.kernel = torch.full((3, 3), 4 / 9, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"convs.0: its conv.blur.kernel is not the \(1, 3, 3, 1\) filter"):
        swap_rosinality_modules(three_tap_blur, class_names=REFERENCE_CLASSES)
    downsampling = RefStyledConv(4, 4, STYLE_DIM)
    downsampling.conv.downsample = True
    with pytest.raises(ValueError, match="downsampling"):
        swap_rosinality_modules(nn.Sequential(downsampling), class_names=REFERENCE_CLASSES)
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        swap_rosinality_modules("generator")
    with pytest.raises(ValueError, match="backend"):
        swap_rosinality_modules(reference, class_names=REFERENCE_CLASSES, backend="cuda")
    # by default only rosinality's own class names are swapped: the reference's classes are left alone
    assert swap_rosinality_modules(copy.deepcopy(reference)) == []
    torgb = nn.ModuleDict({"rgb": RefToRGB(4, STYLE_DIM)})
    assert swap_rosinality_modules(torgb, class_names=["RefToRGB"]) == ["rgb"] and isinstance(torgb["rgb"], ToRGB)
    one_name = nn.ModuleDict({"conv": RefStyledConv(4, 4, STYLE_DIM)})  # a string is one name, not its letters
    assert swap_rosinality_modules(one_name, class_names="RefStyledConv") == ["conv"]


def test_modulated_conv_takes_rosinalitys_arguments_in_rosinalitys_order():
    """(in, out, k, style_dim, demodulate, upsample, downsample, blur_kernel, fused), as in
    rosinality's model.py; a downsampling conv is refused by name."""
    conv = ModulatedConv2d(4, 5, 3, STYLE_DIM, True, True, False, [1, 3, 3, 1], False)
    assert conv.upsample and conv.demodulate
    with pytest.raises(ValueError, match="downsample"):
        ModulatedConv2d(4, 5, 3, STYLE_DIM, downsample=True)
