"""The analytic FLOP and byte counts of benchmarks.flops against FlopCounterMode and the generator."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.flops import (
    CONFIG_F_1024_CONV_GMAC,
    conv_gmac_per_image,
    cross_check_layer,
    flop_counter_grouped_wgrad_excess,
    generator_flops,
    generator_layers,
    layer_bytes,
    layer_flops,
    roofline_floor_seconds,
    torch_backend_form,
)
from refinestyle_kernels import styled_conv2d


def test_config_f_1024_has_17_convs_of_74_06_gmac_and_9_torgbs():
    convs, torgbs = generator_layers(1024)
    assert len(convs) == 17 and len(torgbs) == 9
    assert conv_gmac_per_image() == pytest.approx(CONFIG_F_1024_CONV_GMAC, abs=0.005)
    # the design notes' table: 64 px conv 9.66 GMAC, its upsampling conv 2.42
    by_name = {spec.name: spec for spec in convs}
    assert layer_flops(by_name["convs.7"], 1)["conv"] / 2e9 == pytest.approx(9.664, abs=1e-3)
    assert layer_flops(by_name["convs.6"], 1)["conv"] / 2e9 == pytest.approx(2.416, abs=1e-3)
    assert [s.upsample for s in convs[:4]] == [False, True, False, True]


def test_layer_table_matches_the_real_generator():
    from refinestyle.generator import Generator

    for size, channel_max in ((1024, 512), (64, 24)):
        with torch.device("meta"):
            generator = Generator(size, channel_max=channel_max)
        convs, torgbs = generator_layers(size, channel_max=channel_max)
        assert [(s.in_channel, s.out_channel) for s in convs] == generator.layer_shapes()
        modules = [generator.to_rgb1, *generator.to_rgbs]
        assert [s.in_channel for s in torgbs] == [m.conv.in_channel for m in modules]
        assert [s.upsample for s in convs] == [c.conv.upsample for c in generator.conv_layers()]


def _counted(spec, batch, tokens, shared, backend, backward):
    """FlopCounterMode totals of one real (CPU, float32) call of the op and its backward."""
    torch.manual_seed(batch * 100 + tokens)
    lead = () if shared else (batch,)
    x = torch.randn(batch, spec.in_channel, spec.in_size, spec.in_size, requires_grad=backward)
    weight = torch.randn(spec.out_channel, spec.in_channel, spec.kernel_size, spec.kernel_size)
    styles = torch.randn(batch, spec.in_channel, requires_grad=backward)
    p = torch.randn(*lead, tokens, spec.out_channel, requires_grad=backward) if tokens else None
    q = torch.randn(*lead, tokens, spec.in_channel, requires_grad=backward) if tokens else None
    with FlopCounterMode(display=False) as counter:
        out = styled_conv2d(x, weight, styles, p, q, demodulate=spec.demodulate, upsample=spec.upsample,
                            backend=backend)
    forward = counter.get_total_flops()
    if not backward:
        return forward, None
    leaves = [t for t in (x, styles, p, q) if t is not None]
    with FlopCounterMode(display=False) as counter:
        torch.autograd.grad(out, leaves, torch.randn_like(out))
    return forward, counter.get_total_flops()


SMALL_CASES = [
    (layer, batch, tokens, shared)
    for layer in ("conv1", "convs.0", "convs.3")
    for batch, tokens, shared in ((1, 0, False), (3, 5, False), (2, 7, True))
] + [("to_rgbs.1", 3, 0, False)]


@pytest.mark.parametrize("layer,batch,tokens,shared", SMALL_CASES)
def test_analytic_flops_match_flop_counter_on_small_shapes(layer, batch, tokens, shared):
    convs, torgbs = generator_layers(32, channel_max=12)
    spec = {s.name: s for s in convs + torgbs}[layer]
    for backend in ("reference", "torch"):
        # the torch backend modulates a toRGB's [Cout, Cin] matrix per sample, as the reference does
        form = torch_backend_form(spec) if backend == "torch" else "reference"
        assert form == ("reference" if backend == "reference" or spec.kernel_size == 1 else "separated")
        forward, backward = _counted(spec, batch, tokens, shared, backend, backward=True)
        expected = layer_flops(spec, batch, tokens, shared_tokens=shared, form=form)
        assert forward == expected["visible"], (form, "forward")
        expected_backward = layer_flops(spec, batch, tokens, shared_tokens=shared, form=form, backward=True)["visible"]
        if backend == "reference":  # its grouped conv's weight gradient, as FlopCounterMode counts it
            expected_backward += flop_counter_grouped_wgrad_excess(spec, batch)
        assert backward == expected_backward, (form, "backward")
        # the conv is all of the reference's visible forward work but the residual and the fir
        assert expected["conv"] == 2 * batch * spec.out_channel * spec.in_channel * spec.kernel_size**2 * (
            spec.in_size**2 if spec.upsample else spec.out_size**2
        )


def test_full_config_f_counts_match_flop_counter_on_meta_tensors():
    convs, torgbs = generator_layers(1024)
    for spec in convs + torgbs:
        for tokens, shared in ((32, False), (256, True)) if spec.refinable else ((0, False),):
            check = cross_check_layer(spec, 8, tokens, shared_tokens=shared, backward=True)
            assert check["ok"], check


def test_counts_grow_with_tokens_and_backward_and_separate_forms():
    spec = generator_layers(1024)[0][12]  # convs.11: 256 px, 128 -> 128
    plain = layer_flops(spec, 8)
    refined = layer_flops(spec, 8, 32)
    assert plain["low_rank"] == 0 and refined["low_rank"] > 0
    assert refined["conv"] == plain["conv"]
    # the separated low-rank branch costs ~2L/(9 Cin) of the conv here (plus the box)
    share = refined["low_rank"] / refined["conv"]
    assert 2 * 32 / (9 * 128) < share < 2 * 32 / (9 * 128) + 0.01
    reference = layer_flops(spec, 8, 32, form="reference")
    assert reference["low_rank"] == 2 * 8 * 128 * 32 * 128  # the materialised p^T q
    # the separated backward needs no weight-gradient conv; the reference's does
    assert layer_flops(spec, 8, 32, backward=True)["conv"] == plain["conv"]
    assert layer_flops(spec, 8, 32, form="reference", backward=True)["conv"] == 2 * plain["conv"]
    with pytest.raises(ValueError, match="num_tokens"):
        layer_flops(generator_layers(1024)[1][0], 1, 32)  # a toRGB is never refined
    total = generator_flops(1024, 1)
    torgb_macs = sum(3 * channels * res * res for res, channels in
                     {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128, 512: 64, 1024: 32}.items())
    assert total["conv"] / 2e9 == pytest.approx(CONFIG_F_1024_CONV_GMAC + torgb_macs / 1e9, abs=0.005)


def test_bytes_and_roofline():
    spec = generator_layers(64, channel_max=32)[0][-1]  # 64 px, 32 -> 32, plain 3x3
    nbytes = layer_bytes(spec, 2, 0, element_size=2)
    x = y = 2 * 32 * 64 * 64
    weight = 32 * 32 * 9
    small = 2 * 32 + 32
    noise = 2 * 64 * 64
    assert nbytes == 2 * (x + y + weight + small + noise)
    assert layer_bytes(spec, 2, 0, element_size=2, backward=True) > 2 * nbytes
    # a toRGB inside its conv's kernels moves its input activation neither way: forward read,
    # backward read and input-gradient write drop out
    torgb = generator_layers(64, channel_max=32)[1][-1]
    activation = 2 * 2 * torgb.in_channel * torgb.in_size**2
    alone = layer_bytes(torgb, 2, 0, element_size=2)
    assert alone - layer_bytes(torgb, 2, 0, element_size=2, input_resident=True) == activation
    alone = layer_bytes(torgb, 2, 0, element_size=2, backward=True)
    assert alone - layer_bytes(torgb, 2, 0, element_size=2, backward=True, input_resident=True) == 3 * activation
    # compute bound and memory bound
    assert roofline_floor_seconds(1e12, 1e6, 1e12, 1e12) == pytest.approx(1.0)
    assert roofline_floor_seconds(1e6, 2e12, 1e12, 1e12) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        roofline_floor_seconds(1.0, 1.0, 0.0, 1.0)
