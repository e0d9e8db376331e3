"""`refinestyle generate` on a tiny generator: grid, individual images, seeds, noise, truncation, adapters."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from refinestyle.checkpoints import save_rosinality_checkpoint
from refinestyle import cli
from refinestyle.commands import generate
from refinestyle.generator import Generator
from refinestyle.imageio import to_uint8

SIZE, STYLE_DIM = 16, 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    generator = Generator(SIZE, style_dim=STYLE_DIM, n_mlp=2, channel_max=8)
    with torch.no_grad():
        for name, parameter in generator.named_parameters():
            if name.endswith("noise.weight"):
                parameter.fill_(0.5)  # make the noise visible
    return save_rosinality_checkpoint(generator, tmp_path_factory.mktemp("ckpt") / "g.pt")


def run(argv):
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    return generate.main(parser.parse_args(argv + ["--device", "cpu", "--no-progress"]))


def read(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_grid_and_individual_images(tmp_path, checkpoint):
    out = tmp_path / "grid.png"
    assert run(["--ckpt", str(checkpoint), "--n", "5", "--seed", "1", "--out", str(out), "--batch-size", "2"]) == 0
    files = sorted((tmp_path / "grid").glob("*.png"))
    assert [f.name for f in files] == [f"{i:04d}.png" for i in range(5)]
    grid = read(out)
    assert grid.shape == (2 * (SIZE + 2) + 2, 3 * (SIZE + 2) + 2, 3)  # 3 per row, padding 2
    # image 4 sits in row 1, column 1 of the grid
    assert np.array_equal(grid[SIZE + 4 : 2 * SIZE + 4, SIZE + 4 : 2 * SIZE + 4], read(files[4]))
    images = np.stack([read(f) for f in files]).astype(float)
    assert images.std(0).mean() > 1  # different latents give different pictures

    # the batch size does not change the images; the seed does
    other = tmp_path / "again.png"
    assert run(["--ckpt", str(checkpoint), "--n", "5", "--seed", "1", "--out", str(other), "--batch-size", "5"]) == 0
    assert np.array_equal(read(other), grid)
    assert run(["--ckpt", str(checkpoint), "--n", "5", "--seed", "2", "--out", str(other)]) == 0
    assert not np.array_equal(read(other), grid)


def test_images_match_the_generator(tmp_path, checkpoint):
    from refinestyle.checkpoints import load_generator

    generator = load_generator(checkpoint)
    z = torch.randn(3, STYLE_DIM, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = to_uint8(generator([z], randomize_noise=False)[0])
    out = tmp_path / "g.png"
    assert run(["--ckpt", str(checkpoint), "--n", "3", "--seed", "7", "--out", str(out), "--outdir", str(tmp_path / "o")]) == 0
    for index in range(3):
        assert np.array_equal(read(tmp_path / "o" / f"{index:04d}.png"), expected[index])


def test_random_noise_and_truncation(tmp_path, checkpoint):
    base = ["--ckpt", str(checkpoint), "--n", "4", "--seed", "3"]
    assert run(base + ["--out", str(tmp_path / "const.png")]) == 0
    assert run(base + ["--noise", "random", "--out", str(tmp_path / "random.png")]) == 0
    assert run(base + ["--noise", "random", "--batch-size", "1", "--out", str(tmp_path / "random1.png")]) == 0
    assert not np.array_equal(read(tmp_path / "const.png"), read(tmp_path / "random.png"))
    assert np.array_equal(read(tmp_path / "random.png"), read(tmp_path / "random1.png"))

    # truncation 0 collapses every latent onto the mean w (no latent_avg in the file: a sampled mean)
    assert run(base + ["--truncation", "0", "--truncation-mean", "256", "--out", str(tmp_path / "t0.png")]) == 0
    images = np.stack([read(f) for f in sorted((tmp_path / "t0").glob("*.png"))]).astype(int)
    assert np.abs(images - images[0]).max() <= 1
    # psi above 1 extrapolates away from the mean (rosinality's forward ignores psi >= 1; NVlabs' does not)
    assert run(base + ["--truncation", "1.5", "--truncation-mean", "256", "--out", str(tmp_path / "t15.png")]) == 0
    assert not np.array_equal(read(tmp_path / "t15.png"), read(tmp_path / "const.png"))


def test_truncation_is_the_lerp_of_w_for_any_psi(tmp_path, checkpoint):
    from refinestyle.checkpoints import load_generator
    from refinestyle.imageio import load_image

    generator = load_generator(checkpoint)
    generator.latent_avg = torch.randn(STYLE_DIM)
    path = tmp_path / "with_avg.pt"
    from refinestyle.checkpoints import save_rosinality_checkpoint as save

    save(generator, path)
    z = torch.randn(2, STYLE_DIM, generator=torch.Generator().manual_seed(5))
    for psi in (0.5, 1.5):
        assert run(["--ckpt", str(path), "--n", "2", "--seed", "5", "--truncation", str(psi),
                    "--out", str(tmp_path / f"t{psi}.png")]) == 0
        with torch.no_grad():
            w = generator.latent_avg + psi * (generator.style(z) - generator.latent_avg)
            expected, _ = generator([w], input_is_latent=True, randomize_noise=False)
        for index in range(2):
            written = load_image(tmp_path / f"t{psi}" / f"{index:04d}.png", SIZE)
            assert (written - expected[index].clamp(-1, 1)).abs().max() <= 2 / 255 + 1e-6


def test_seeds_outside_numpys_range_are_refused_by_name(tmp_path, checkpoint, capsys):
    for bad in ("-1", str(2**32), "99999999999999999999"):
        with pytest.raises(SystemExit):
            run(["--ckpt", str(checkpoint), "--seed", bad, "--out", str(tmp_path / "g.png")])
        assert "--seed: expected an integer seed in 0..4294967295" in capsys.readouterr().err
    top = str(2**32 - 1)  # the largest seed works with every derived seed (noise, the sampled mean)
    assert run(["--ckpt", str(checkpoint), "--seed", top, "--noise", "random", "--truncation", "0.5",
                "--truncation-mean", "16", "--n", "2", "--out", str(tmp_path / "top.png")]) == 0


def test_adapters_give_one_row_per_domain(tmp_path, checkpoint, capsys):
    """--adapter: one grid row per domain file, each rendered with that adapter's residuals."""
    from refinestyle.adaptation.adapter import Adapter
    from refinestyle.checkpoints import load_generator

    generator = load_generator(checkpoint)
    tokens = {}
    for name, seed in (("sketch", 1), ("pixar", 2)):
        torch.manual_seed(seed)
        adapter = Adapter.for_generator(generator, num_refined=3, num_tokens=4, scale_init=0.5)
        adapter.save(tmp_path / f"{name}.safetensors")
        tokens[name] = adapter.tokens

    out = tmp_path / "domains.png"
    argv = ["--ckpt", str(checkpoint), "--n", "3", "--seed", "5", "--out", str(out), "--batch-size", "2",
            "--adapter", str(tmp_path / "sketch.safetensors"), "--adapter", str(tmp_path / "pixar.safetensors")]
    assert run(argv) == 0
    grid = read(out)
    assert grid.shape == (3 * (SIZE + 2) + 2, 3 * (SIZE + 2) + 2, 3)  # rows: original, sketch, pixar
    z = torch.randn(3, STYLE_DIM, generator=torch.Generator().manual_seed(5))
    for row, name in enumerate(["original", "sketch", "pixar"]):
        refinement = None if name == "original" else tokens[name]()
        with torch.no_grad():
            expected = to_uint8(generator([z], randomize_noise=False, refinement=refinement)[0])
        for index in range(3):
            saved = read(tmp_path / "domains" / name / f"{index:04d}.png")
            assert np.abs(saved.astype(int) - expected[index].astype(int)).max() <= 1
            top, left = 2 + row * (SIZE + 2), 2 + index * (SIZE + 2)
            assert np.array_equal(grid[top : top + SIZE, left : left + SIZE], saved)
    original = read(tmp_path / "domains" / "original" / "0000.png").astype(int)
    assert np.abs(read(tmp_path / "domains" / "sketch" / "0000.png").astype(int) - original).max() > 10

    assert run(argv[:-1] + [str(tmp_path / "absent.pt")]) == 2
    assert "--adapter file not found" in capsys.readouterr().err
    assert run(argv[:-1] + [str(tmp_path)]) == 2
    assert "is a folder, not a file" in capsys.readouterr().err

    # an adapter of another generator with the same shapes: refused, unless asked for
    torch.manual_seed(7)
    stranger = Adapter.for_generator(Generator(SIZE, style_dim=STYLE_DIM, n_mlp=2, channel_max=8), 3, 4)
    stranger.save(tmp_path / "stranger.safetensors")
    argv = argv[:-1] + [str(tmp_path / "stranger.safetensors")]
    assert run(argv) == 2
    error = capsys.readouterr().err
    assert "stranger.safetensors" in error and "fingerprint" in error and "--ignore-fingerprint" in error
    assert run(argv + ["--ignore-fingerprint"]) == 0
    # a shape mismatch is refused even then
    wider = Adapter.for_generator(Generator(SIZE, style_dim=STYLE_DIM, n_mlp=2, channel_max=16), 3, 4)
    wider.save(tmp_path / "wider.safetensors")
    assert run(argv[:-1] + [str(tmp_path / "wider.safetensors"), "--ignore-fingerprint"]) == 2
    assert "(Cin, Cout)" in capsys.readouterr().err


def test_a_grid_name_pil_cannot_write_is_refused_before_rendering(tmp_path, checkpoint, capsys):
    for bad in ("grid", "grid.txt"):
        with pytest.raises(SystemExit):
            cli.main(["generate", "--ckpt", str(checkpoint), "--out", str(tmp_path / bad), "--device", "cpu"])
        assert "expected an image file name" in capsys.readouterr().err
        assert not (tmp_path / "grid").exists()


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert run(["--ckpt", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "g.png")]) == 2
    assert "nope.pt" in capsys.readouterr().err
    # through the console script the line names the command, as argparse's own errors do
    assert cli.main(["generate", "--ckpt", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "g.png"),
                     "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("refinestyle generate: error: ") and "nope.pt" in error


def test_no_checkpoint_at_all_names_the_commands_option(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("REFINESTYLE_GENERATOR", raising=False)
    assert cli.main(["generate", "--out", str(tmp_path / "g.png"), "--device", "cpu"]) == 2
    assert "no file given. Pass it with --ckpt (or set REFINESTYLE_GENERATOR)" in capsys.readouterr().err
    # called without the console script there is no option to name
    assert run(["--out", str(tmp_path / "g.png")]) == 2
    assert "no file given. Pass its path (or set REFINESTYLE_GENERATOR)" in capsys.readouterr().err
