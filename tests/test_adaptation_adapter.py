"""Adapter files, compatibility checks, the parameter count and batches that mix domains."""
from __future__ import annotations

import json

import pytest
import torch

from refinestyle.adaptation import Adapter, generator_fingerprint, mixed_refinement
from refinestyle.generator import Generator
from refinestyle.refinement import RefinementTokens


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_generator(seed: int = 0, size: int = 16) -> Generator:
    torch.manual_seed(seed)
    generator = Generator(size, style_dim=16, n_mlp=2, channel_max=8).eval().requires_grad_(False)
    with torch.no_grad():
        for name, parameter in generator.named_parameters():
            if name.endswith("noise.weight"):
                parameter.fill_(0.3)
    return generator


def randomise_scales(adapter: Adapter, scale: float, seed: int) -> Adapter:
    """Make an adapter's residual visible (the default scales start it close to the frozen generator)."""
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter.tokens.layers:
            layer.A.copy_(scale * (0.5 + torch.rand(layer.A.shape, generator=rng)))
            layer.B.copy_(scale * (0.5 + torch.rand(layer.B.shape, generator=rng)))
    return adapter


def test_parameter_count_formula_for_config_f_1024():
    # the real 1024 px config-f generator's layer shapes, built on the meta device (no memory, never run)
    with torch.device("meta"):
        generator = Generator(1024)
        tokens = RefinementTokens.for_generator(generator, None, 256)
    shapes = generator.layer_shapes()
    assert len(shapes) == 17
    tokens_count = 256
    formula = tokens_count * sum(cin + cout for cin, cout in shapes) + 2 * tokens_count * len(shapes)
    assert formula == 2_982_400  # the paper's 2.98M
    assert tokens.num_trainable() == formula

    # the same formula for an Adapter over a tiny generator, refining the last 3 layers with L = 5
    generator = tiny_generator()
    adapter = Adapter.for_generator(generator, num_refined=3, num_tokens=5)
    expected = 5 * sum(cin + cout for cin, cout in generator.layer_shapes()[-3:]) + 2 * 5 * 3
    assert adapter.num_trainable() == expected
    assert sum(p.numel() for p in adapter.parameters()) == expected


def test_fingerprint_is_deterministic_and_sees_every_weight():
    generator = tiny_generator(0)
    digest = generator_fingerprint(generator)
    assert digest == generator_fingerprint(tiny_generator(0))
    assert digest == generator_fingerprint(tiny_generator(0).double())  # read in another dtype: same weights
    assert digest != generator_fingerprint(tiny_generator(1))
    changed = tiny_generator(0)
    with torch.no_grad():
        changed.convs[-1].conv.weight[0, 0, 0, 0, 0] += 1e-3
    assert generator_fingerprint(changed) != digest
    # the stored noise maps are buffers, not weights
    with torch.no_grad():
        changed = tiny_generator(0)
        changed.noises.noise_0.normal_()
    assert generator_fingerprint(changed) == digest


def test_safetensors_round_trip_with_metadata(tmp_path):
    from safetensors import safe_open

    generator = tiny_generator()
    torch.manual_seed(3)
    adapter = Adapter.for_generator(
        generator, num_refined=4, num_tokens=3, kind="text", source_text="photo", target_text="pencil sketch",
        training={"lr": 1e-3, "iterations": 300},
    )
    randomise_scales(adapter, 0.3, seed=1)
    path = adapter.save(tmp_path / "sub" / "sketch.safetensors")

    with safe_open(str(path), framework="pt") as handle:
        raw = handle.metadata()
        keys = sorted(handle.keys())
    assert raw["format"] == "refinestyle.adapter" and raw["version"] == "1"
    assert json.loads(raw["target_text"]) == "pencil sketch"
    assert json.loads(raw["generator_size"]) == 16
    assert json.loads(raw["layer_shapes"]) == [list(s) for s in generator.layer_shapes()[-4:]]
    assert keys == sorted(f"tokens.layers.{i}.{n}" for i in range(4) for n in "PQAB")

    loaded = Adapter.load(path)
    assert loaded.metadata == json.loads(json.dumps(adapter.metadata))
    assert loaded.metadata["generator_fingerprint"] == generator_fingerprint(generator)
    for mine, theirs in zip(adapter.tokens.state_dict().values(), loaded.tokens.state_dict().values()):
        assert torch.equal(mine, theirs)
    loaded.check_compatible(generator)
    w = torch.randn(2, generator.n_latent, 16)
    with torch.no_grad():
        expected = generator.synthesis(w, refinement=adapter.refinement(), randomize_noise=False)
        assert torch.equal(loaded.apply(generator).synthesis(w, randomize_noise=False), expected)
        assert not torch.allclose(generator.synthesis(w, randomize_noise=False), expected, atol=1e-2)


def test_incompatible_generators_and_bad_files_are_clear_errors(tmp_path):
    generator = tiny_generator(0)
    adapter = Adapter.for_generator(generator, num_refined=2, num_tokens=2)
    with pytest.raises(ValueError, match="fingerprint"):
        adapter.check_compatible(tiny_generator(1))
    adapter.check_compatible(tiny_generator(1), check_fingerprint=False)
    with pytest.raises(ValueError, match="resolution 16"):
        adapter.check_compatible(tiny_generator(0, size=32))
    other_channels = Generator(16, style_dim=16, n_mlp=2, channel_max=4)
    with pytest.raises(ValueError, match="Cin, Cout"):
        adapter.check_compatible(other_channels)

    with pytest.raises(FileNotFoundError):
        Adapter.load(tmp_path / "absent.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a safetensors adapter file"):
        Adapter.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.ones(2)}, str(tmp_path / "foreign.safetensors"), metadata={"format": "other"})
    with pytest.raises(ValueError, match="not an adapter file"):
        Adapter.load(tmp_path / "foreign.safetensors")
    with pytest.raises(ValueError, match="set by the adapter"):
        Adapter.for_generator(generator, num_tokens=2, num_tokens_extra=1, generator_size=3)
    for reserved in ("format", "version"):  # saved, they replaced the file's own entries: an unreadable file
        with pytest.raises(ValueError, match=f"metadata: {reserved} are the adapter file's own entries"):
            Adapter.for_generator(generator, num_tokens=2, **{reserved: 2})


def test_mixed_domain_batch_equals_separate_runs():
    generator = tiny_generator()
    torch.manual_seed(5)
    # two domains that refine different layer ranges with different token counts
    sketch = randomise_scales(Adapter.for_generator(generator, num_refined=5, num_tokens=3), 0.4, seed=2)
    pixar = randomise_scales(Adapter.for_generator(generator, num_refined=2, num_tokens=6), 0.4, seed=3)
    sizes = [2, 1, 3]  # sketch, original, pixar
    w = torch.randn(sum(sizes), generator.n_latent, 16)
    noise = [torch.randn(sum(sizes), 1, n.shape[-2], n.shape[-1]) for n in generator.make_noise()]

    mixed = generator.synthesis(w, refinement=mixed_refinement([sketch, None, pixar], sizes), noise=noise)

    separate = []
    start = 0
    for adapter, size in zip([sketch, None, pixar], sizes):
        part = slice(start, start + size)
        refinement = None if adapter is None else adapter.refinement()
        with torch.no_grad():
            separate.append(generator.synthesis(w[part], refinement=refinement, noise=[n[part] for n in noise]))
        start += size
    separate = torch.cat(separate)
    assert torch.allclose(mixed, separate, atol=1e-5, rtol=1e-5), (mixed - separate).abs().max()
    # the domains really differ from each other and from the frozen generator
    with torch.no_grad():
        frozen = generator.synthesis(w, noise=noise)
    assert (separate[:2] - frozen[:2]).abs().max() > 0.05 and (separate[3:] - frozen[3:]).abs().max() > 0.05
    assert torch.equal(separate[2], frozen[2]) or torch.allclose(separate[2], frozen[2], atol=1e-6)

    # one backward pass reaches both domains' tokens, and nothing of the generator
    mixed.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (sketch.tokens.layers[0].P, pixar.tokens.layers[1].Q))
    assert all(p.grad is None for p in generator.parameters())

    with pytest.raises(ValueError):
        mixed_refinement([sketch, pixar], [2])
    with pytest.raises(TypeError):
        mixed_refinement([sketch, "pixar"], [1, 1])
