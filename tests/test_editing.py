"""InterFaceGAN boundaries, GANSpace PCA and StyleSpace channel edits, on a tiny generator."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from inversion_fixtures import planted_refinement, tiny_generator
from refinestyle.inversion import editing

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def generator():
    return tiny_generator()


@pytest.fixture
def w_plus(generator):
    rng = torch.Generator().manual_seed(3)
    w = generator.get_latent(torch.randn(3, generator.style_dim, generator=rng)).detach()
    return w[:, None, :].repeat(1, generator.n_latent, 1) + 0.1 * torch.randn(3, generator.n_latent, 1, generator=rng)


def test_load_boundary_shapes_and_errors(tmp_path):
    n_latent, dim = 8, 32
    direction = np.random.default_rng(0).standard_normal((1, dim)).astype(np.float32)
    np.save(tmp_path / "smile.npy", direction)
    boundary = editing.load_boundary(tmp_path / "smile.npy", n_latent, dim)
    assert boundary.shape == (1, n_latent, dim)
    assert torch.equal(boundary[0, 5], torch.from_numpy(direction[0]))

    per_layer = torch.randn(1, n_latent, dim)
    torch.save(per_layer, tmp_path / "age.pt")
    assert torch.equal(editing.load_boundary(tmp_path / "age.pt", n_latent, dim), per_layer)
    torch.save({"boundary": per_layer}, tmp_path / "dict.pt")
    assert torch.equal(editing.load_boundary(tmp_path / "dict.pt", n_latent, dim), per_layer)

    np.save(tmp_path / "bad.npy", np.ones((2, dim), np.float32))
    with pytest.raises(ValueError, match=r"\[1, 32\] or \[1, 8, 32\]"):
        editing.load_boundary(tmp_path / "bad.npy", n_latent, dim)
    (tmp_path / "x.txt").write_text("0")
    with pytest.raises(ValueError, match=".npy or .pt"):
        editing.load_boundary(tmp_path / "x.txt", n_latent, dim)
    with pytest.raises(FileNotFoundError):
        editing.load_boundary(tmp_path / "missing.npy", n_latent, dim)
    for junk in ("junk.pt", "junk.npy"):  # damaged files are bad input, named, not a traceback
        (tmp_path / junk).write_bytes(b"not a boundary file at all")
        with pytest.raises(ValueError, match=f"{junk}: cannot read it"):
            editing.load_boundary(tmp_path / junk, n_latent, dim)


def test_interfacegan_edit_moves_only_the_chosen_layers(w_plus):
    boundary = torch.randn(1, w_plus.shape[1], w_plus.shape[2])
    edited = editing.interfacegan_edit(w_plus, boundary, torch.tensor([1.0, -2.0, 0.5]), layers=[0, 1, 2])
    expected = w_plus.clone()
    expected[:, :3] += torch.tensor([1.0, -2.0, 0.5])[:, None, None] * boundary[:, :3]
    torch.testing.assert_close(edited, expected)
    with pytest.raises(ValueError, match="strength"):
        editing.interfacegan_edit(w_plus, boundary, torch.ones(2))
    with pytest.raises(ValueError, match="boundary"):
        editing.interfacegan_edit(w_plus, boundary[:, :3], 1.0)


def test_parse_layers():
    assert editing.parse_layers("0-2,5", 8) == [0, 1, 2, 5]
    assert editing.parse_layers(None, 8) is None and editing.parse_layers("all", 8) is None
    with pytest.raises(ValueError, match="outside"):
        editing.parse_layers("3-9", 8)
    with pytest.raises(ValueError, match="cannot parse"):
        editing.parse_layers("a-b", 8)
    with pytest.raises(ValueError, match="'5-2' runs backwards"):  # would select no layer
        editing.parse_layers("0,5-2", 8)


def test_ganspace_recovers_the_principal_axes(tmp_path):
    # A linear "mapping" w = z @ M + c: its covariance is M^T M, its mean c.
    dim = 6
    rng = torch.Generator().manual_seed(0)
    mixing = torch.randn(dim, dim, generator=rng) * torch.tensor([3.0, 2.0, 1.0, 0.5, 0.3, 0.1])[:, None]
    offset = torch.randn(dim, generator=rng)
    directions = editing.compute_ganspace(lambda z: z @ mixing + offset, dim, num_samples=40_000, num_components=3,
                                          batch_size=7000)
    eigenvalues, eigenvectors = torch.linalg.eigh(mixing.T @ mixing)
    for k in range(3):
        truth = eigenvectors[:, -1 - k]
        assert abs(float(directions.components[k] @ truth)) > 0.995
        assert float(directions.stddev[k]) == pytest.approx(float(eigenvalues[-1 - k].sqrt()), rel=0.05)
    torch.testing.assert_close(directions.components @ directions.components.T, torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(directions.mean, offset, atol=0.1, rtol=0)
    assert directions.num_samples == 40_000

    directions.save(tmp_path / "g.safetensors")
    loaded = editing.GANSpaceDirections.load(tmp_path / "g.safetensors")
    assert torch.equal(loaded.components, directions.components) and loaded.num_samples == 40_000

    w_plus = torch.randn(2, 4, dim)
    edited = editing.ganspace_edit(w_plus, loaded, component=1, strength=2.0, layers=[3])
    torch.testing.assert_close(edited[:, 3] - w_plus[:, 3], (2.0 * loaded.stddev[1] * loaded.components[1]).expand(2, dim))
    assert torch.equal(edited[:, :3], w_plus[:, :3])
    with pytest.raises(ValueError, match="component"):
        editing.ganspace_edit(w_plus, loaded, component=3, strength=1.0)
    with pytest.raises(ValueError, match="num_samples"):
        editing.compute_ganspace(lambda z: z, dim, num_samples=3, num_components=3)


def test_style_layers_follow_stylespace_order(generator):
    layers = editing.style_layers(generator)
    # conv1, to_rgb1, then (conv, conv, toRGB) per resolution 8 ... 32
    assert len(layers) == 2 + 3 * (generator.log_size - 2)
    assert [name for name, _, _ in layers[:5]] == ["conv1", "to_rgb1", "convs.0", "convs.1", "to_rgbs.0"]
    assert [index for _, _, index in layers] == [0, 1] + [i for b in range(generator.log_size - 2)
                                                          for i in (2 * b + 1, 2 * b + 2, 2 * b + 3)]
    assert layers[-1][2] == generator.n_latent - 1


def test_stylespace_edit_changes_one_channel_then_cleans_up(generator, w_plus):
    layer, channel = 3, 5  # convs.1, the 8 px conv
    _, module, _ = editing.style_layers(generator)[layer]
    seen = []

    def record(_module, _inputs, styles):
        seen.append(styles.detach().clone())

    with torch.no_grad():
        probe = module.modulation.register_forward_hook(record)
        before = generator.synthesis(w_plus, randomize_noise=False)
        probe.remove()
        with editing.stylespace_edit(generator, layer, channel, torch.tensor([2.0, 0.0, -1.0])):
            # registered after the edit's hook, so it sees the edited styles
            probe = module.modulation.register_forward_hook(record)
            during = generator.synthesis(w_plus, randomize_noise=False)
            probe.remove()
        after = generator.synthesis(w_plus, randomize_noise=False)
    difference = seen[1] - seen[0]
    expected = torch.zeros_like(difference)
    expected[:, channel] = torch.tensor([2.0, 0.0, -1.0])
    torch.testing.assert_close(difference, expected)
    assert torch.equal(before, after)
    changed = (during - before).flatten(1).abs().amax(1)
    assert changed[0] > 1e-3 and changed[2] > 1e-3 and changed[1] == 0
    with pytest.raises(ValueError, match="style channels"):
        with editing.stylespace_edit(generator, layer, 10_000, 1.0):
            pass
    with pytest.raises(ValueError, match="StyleSpace layer index"):
        with editing.stylespace_edit(generator, 99, 0, 1.0):
            pass


def test_style_channel_stddev_matches_direct_sampling(generator):
    """StyleSpace's unit: the std of s over w truncated with psi 0.7 toward the average w."""
    stddev = editing.style_channel_stddev(generator, 1, num_samples=2000, seed=5)
    rng = torch.Generator().manual_seed(5)
    with torch.no_grad():
        w = generator.style(torch.randn(2000, generator.style_dim, generator=rng))
        average = generator.mean_latent(4096)
        truncated = generator.to_rgb1.conv.modulation(average + 0.7 * (w - average))
        untruncated = generator.to_rgb1.conv.modulation(w)
    torch.testing.assert_close(stddev, truncated.std(0))
    torch.testing.assert_close(editing.style_channel_stddev(generator, 1, num_samples=2000, seed=5, truncation=1),
                               untruncated.std(0))  # fmt: skip
    with pytest.raises(ValueError, match="at least 2 samples"):  # one sample's std is NaN
        editing.style_channel_stddev(generator, 1, num_samples=1)
    for psi in (0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="truncation"):
            editing.style_channel_stddev(generator, 1, truncation=psi)


def test_render_edit_sees_stylespace_edits_on_a_compiled_generator(generator, w_plus):
    """A compiled synthesis does not see a forward hook added after compiling; the edit must still
    change the image, as it does eagerly."""
    import copy

    torch._dynamo.reset()
    compiled = copy.deepcopy(generator).compile_synthesis(None, backend="aot_eager")
    spec = editing.EditSpec("stylespace", style_layer=3, channel=5, unit=1.0)
    with torch.no_grad():
        compiled.synthesis(w_plus, randomize_noise=False)  # compiled before the edit's hook exists
        expected = editing.render_edit(generator, w_plus, None, spec, 4.0)
        edited = editing.render_edit(compiled, w_plus, None, spec, 4.0)
        unedited = compiled.synthesis(w_plus, randomize_noise=False)
    assert compiled.synthesis_is_compiled
    assert (expected - unedited).abs().max() > 1e-3
    torch.testing.assert_close(edited, expected, rtol=1e-5, atol=1e-5)


def test_render_edit_keeps_the_residuals(generator, w_plus):
    refinement = planted_refinement(generator).expand(w_plus.shape[0])
    boundary = torch.randn(1, generator.n_latent, generator.style_dim)
    spec = editing.EditSpec("interfacegan", boundary=boundary, layers=[0, 1, 2, 3])
    with torch.no_grad():
        refined = generator.synthesis(w_plus, refinement=refinement, randomize_noise=False)
        unrefined = generator.synthesis(w_plus, randomize_noise=False)
        at_zero = editing.render_edit(generator, w_plus, refinement, spec, 0.0)
        edited = editing.render_edit(generator, w_plus, refinement, spec, 2.0)
        expected = generator.synthesis(w_plus + 2.0 * boundary * (torch.arange(generator.n_latent) < 4)[None, :, None],
                                       refinement=refinement, randomize_noise=False)
    assert torch.equal(at_zero, refined) and not torch.equal(refined, unrefined)
    torch.testing.assert_close(edited, expected)
    stylespace = editing.EditSpec("stylespace", style_layer=2, channel=1, unit=0.5)
    with torch.no_grad():
        assert not torch.equal(editing.render_edit(generator, w_plus, refinement, stylespace, 3.0), refined)
    with pytest.raises(ValueError, match="kind"):
        editing.render_edit(generator, w_plus, refinement, editing.EditSpec("nope"), 1.0)
