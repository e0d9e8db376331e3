"""Kernel spectra (the paper's Fig. 3): Gram-route singular values vs explicit SVDs, counts, JSON, plot, CLI."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from refinestyle.checkpoints import save_rosinality_checkpoint
from refinestyle.commands import spectrum as spectrum_command
from refinestyle.generator import Generator
from refinestyle.spectrum import kernel_gram, kernel_spectrum, singular_values


@pytest.fixture(scope="module")
def generator():
    torch.manual_seed(0)
    g = Generator(16, style_dim=12, n_mlp=2, channels={4: 10, 8: 6, 16: 5}).eval()
    with torch.no_grad():
        for conv in g.conv_layers():  # non-trivial styles, as in a trained network
            conv.conv.modulation.bias.normal_(1.0, 0.5)
    return g


def explicit_singular_values(conv, w, demodulate):
    styles = conv.modulation(w).double()
    kernels = conv.scale * conv.weight[0].double()[None] * styles[:, None, :, None, None]
    if demodulate:
        kernels = kernels * torch.rsqrt(kernels.square().sum((2, 3, 4), keepdim=True) + conv.eps)
    return torch.linalg.svdvals(kernels.reshape(kernels.shape[0], kernels.shape[1], -1))


@pytest.mark.parametrize("demodulate", [False, True])
def test_gram_route_equals_explicit_svd(generator, demodulate):
    w = generator.style(torch.randn(5, 12))
    for conv in (layer.conv for layer in generator.conv_layers()):
        gram = kernel_gram(conv.weight[0].detach(), conv.modulation(w).detach(), conv.scale, demodulate=demodulate)
        ours = singular_values(gram)
        expected = explicit_singular_values(conv, w, demodulate).detach()
        assert ours.shape == expected.shape
        assert torch.allclose(ours, expected, rtol=1e-9, atol=1e-12)


def test_spectrum_statistics(generator):
    result = kernel_spectrum(generator, 40, batch_size=16, seed=3, progress=False)
    assert len(result.layers) == generator.num_layers == 5
    expected_shapes = [(10, 10), (10, 6), (6, 6), (6, 5), (5, 5)]
    for layer, (cin, cout) in zip(result.layers, expected_shapes):
        assert (layer.in_channels, layer.out_channels, layer.rank) == (cin, cout, cout)
        assert len(layer.mean) == len(layer.p10) == len(layer.p90) == cout
        mean = torch.tensor(layer.mean)
        assert torch.isfinite(mean).all() and mean[0] == 1.0
        assert (mean[1:] <= mean[:-1] + 1e-12).all(), "not sorted"
        assert (torch.tensor(layer.p10) <= torch.tensor(layer.p90) + 1e-12).all()
        k90, k99 = layer.count(0.9), layer.count(0.99)
        assert 1 <= k90 <= k99 <= layer.rank
        assert layer.counts["0.99"]["max"] <= layer.rank

    # the counts agree with a direct computation on the explicit kernels of the same z
    z = torch.randn(40, 12, generator=torch.Generator().manual_seed(3))
    sigma = explicit_singular_values(generator.conv1.conv, generator.style(z), False).detach()
    energy = sigma.square().cumsum(1) / sigma.square().sum(1, keepdim=True)
    counts = (energy < 0.9).sum(1) + 1
    assert result.layers[0].count(0.9) == pytest.approx(counts.double().mean().item())


def test_low_rank_weights_give_low_counts(generator):
    low = Generator(16, style_dim=12, n_mlp=2, channels={4: 10, 8: 6, 16: 5}).eval()
    low.load_state_dict(generator.state_dict())
    with torch.no_grad():  # conv layer 2: a rank-2 static kernel; modulation scales columns, so rank stays <= 2
        weight = low.convs[1].conv.weight
        weight.copy_((torch.randn(6, 2) @ torch.randn(2, 6 * 9)).reshape(weight.shape))
    result = kernel_spectrum(low, 20, seed=4, progress=False)
    assert result.layers[2].count(0.99) <= 2
    assert max(result.layers[2].mean[2:]) < 1e-6
    assert result.layers[0].count(0.99) > 2  # the untouched layers are not low-rank


def test_spectrum_of_a_float64_generator(generator):
    """The mapping takes z in the generator's dtype: a float64 analysis runs."""
    import copy

    wide = copy.deepcopy(generator).double()
    spectrum = kernel_spectrum(wide, 6, batch_size=4, progress=False)
    reference = kernel_spectrum(generator, 6, batch_size=4, progress=False)
    for ours, theirs in zip(spectrum.layers, reference.layers):
        assert ours.rank == theirs.rank and ours.mean == pytest.approx(theirs.mean, rel=1e-4, abs=1e-5)


def test_table_json_and_plot(tmp_path, generator):
    result = kernel_spectrum(generator, 10, seed=5, progress=False)
    table = result.table()
    assert table.splitlines()[0].split()[:6] == ["layer", "res", "Cin", "Cout", "up", "rank"]
    assert len(table.splitlines()) == 1 + generator.num_layers + 1
    data = json.loads(result.save_json(tmp_path / "s.json").read_text())
    assert data["num_samples"] == 10 and len(data["layers"]) == 5
    assert data["layers"][3]["counts"]["0.9"]["mean"] == result.layers[3].count(0.9)
    png = result.plot(tmp_path / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_spectrum_command(tmp_path, generator, capsys):
    checkpoint = save_rosinality_checkpoint(generator, tmp_path / "g.pt")
    parser = argparse.ArgumentParser()
    spectrum_command.add_arguments(parser)
    out = tmp_path / "fig" / "spectrum.png"
    args = parser.parse_args(["--ckpt", str(checkpoint), "--samples", "12", "--out", str(out), "--device", "cpu",
                              "--no-progress"])
    assert spectrum_command.main(args) == 0
    printed = capsys.readouterr().out
    assert "k90%" in printed and "k99%" in printed and "12 samples" in printed
    data = json.loads(out.with_suffix(".json").read_text())
    assert [layer["rank"] for layer in data["layers"]] == [10, 6, 6, 5, 5]
    assert out.is_file()

    # a figure name matplotlib cannot write is refused before the (long) computation
    for bad in ("spectrum.json", "spectrum"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--ckpt", str(checkpoint), "--out", str(tmp_path / bad)])
        assert "expected a figure file name" in capsys.readouterr().err
    assert parser.parse_args(["--out", str(tmp_path / "s.pdf")]).out.suffix == ".pdf"

    args = parser.parse_args(["--ckpt", str(tmp_path / "missing.pt"), "--out", str(out)])
    assert spectrum_command.main(args) == 2
    assert "missing.pt" in capsys.readouterr().err
    args.command = "spectrum"  # as refinestyle.cli sets it
    assert spectrum_command.main(args) == 2
    assert capsys.readouterr().err.startswith("refinestyle spectrum: error: ")
