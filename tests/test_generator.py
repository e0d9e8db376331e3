"""refinestyle.Generator: rosinality parity, refinement plumbing, mixed batches, backward, autocast."""
from __future__ import annotations

import copy

import pytest
import torch

from refinestyle.generator import Generator, default_channels
from refinestyle.refinement import Refinement, RefinementTokens, refinement_layer_shapes
from rosinality_reference import ReferenceGenerator

SIZE, STYLE_DIM, N_MLP = 32, 24, 2
# Cin != Cout somewhere, so a transposed kernel or swapped token side cannot pass
CHANNELS = {4: 16, 8: 12, 16: 10, 32: 6}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module")
def pair():
    """A randomised rosinality-semantics reference and our Generator loaded from its state_dict, in float64."""
    torch.manual_seed(0)
    reference = ReferenceGenerator(SIZE, STYLE_DIM, N_MLP, CHANNELS).randomize_(torch.Generator().manual_seed(1))
    generator = Generator(SIZE, STYLE_DIM, N_MLP, channels=CHANNELS, backend="torch")
    generator.load_state_dict(reference.state_dict(), strict=True)
    return reference.double().eval(), generator.double().eval()


def random_noise(generator, batch, seed):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, 1, 2 ** ((i + 5) // 2), 2 ** ((i + 5) // 2), generator=g, dtype=torch.float64)
        for i in range(generator.num_layers)
    ]


def random_tokens(shapes, batch, tokens, seed, scale=0.05, dtype=torch.float64):
    """Per-layer (p, q): [batch, L, C] when batch is an int, shared [L, C] when None."""
    g = torch.Generator().manual_seed(seed)
    lead = () if batch is None else (batch,)
    p = [scale * torch.randn(*lead, tokens, cout, generator=g, dtype=dtype) for _, cout in shapes]
    q = [scale * torch.randn(*lead, tokens, cin, generator=g, dtype=dtype) for cin, _ in shapes]
    return p, q


def test_state_dict_names_and_shapes_are_rosinalitys(pair):
    reference, generator = pair
    ours = {k: tuple(v.shape) for k, v in generator.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert ours == theirs
    # and the other way round: our weights load strictly into the reference
    ReferenceGenerator(SIZE, STYLE_DIM, N_MLP, CHANNELS).load_state_dict(Generator(
        SIZE, STYLE_DIM, N_MLP, channels=CHANNELS).state_dict(), strict=True)


def test_default_channel_table_is_config_f():
    assert default_channels(1024) == {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128, 512: 64, 1024: 32}
    assert default_channels(256, channel_multiplier=1) == {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64}
    assert default_channels(32, channel_max=16) == {4: 16, 8: 16, 16: 16, 32: 16}
    # rosinality's table has no cap: channel_multiplier=4 takes 1024 channels at 64 px
    assert default_channels(256, channel_multiplier=4) == {4: 512, 8: 512, 16: 512, 32: 512, 64: 1024, 128: 512, 256: 256}
    assert default_channels(256, channel_multiplier=4, channel_max=512)[64] == 512
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="channel_max"):
            Generator(32, style_dim=8, n_mlp=1, channel_max=bad)


def test_config_f_1024_layout():
    with torch.device("meta"):
        generator = Generator(1024)
        tokens = RefinementTokens.for_generator(generator, num_tokens=256)
    assert generator.num_layers == 17 and generator.n_latent == 18
    assert len(generator.conv_layers()) == 17 and len(generator.to_rgbs) == 8
    shapes = generator.layer_shapes()
    assert shapes[:9] == [(512, 512)] * 9
    assert shapes[9:] == [(512, 256), (256, 256), (256, 128), (128, 128), (128, 64), (64, 64), (64, 32), (32, 32)]
    assert refinement_layer_shapes(generator, 10) == shapes[7:]
    # the paper's figure: 17 layers x 256 tokens = 2.98M trainable parameters
    assert tokens.num_trainable() == 2_982_400


def test_image_parity_with_rosinality_float64(pair):
    reference, generator = pair
    z = torch.randn(3, STYLE_DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    noise = random_noise(generator, 3, seed=3)
    image, latent = generator([z], noise=noise, return_latents=True)
    w_plus = reference.mapping(z)[:, None].repeat(1, reference.n_latent, 1)
    expected = reference.synthesis(w_plus, noise)
    assert image.shape == (3, 3, SIZE, SIZE)
    assert relative_error(latent, w_plus) < 1e-13
    assert relative_error(image, expected) < 1e-9
    assert image.std() > 0.1  # a real picture, not a constant

    # stored noise buffers, truncation and style mixing follow rosinality too
    z2 = torch.randn(3, STYLE_DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    mean = generator.mean_latent(64)
    image, _ = generator([z, z2], inject_index=3, truncation=0.6, truncation_latent=mean, randomize_noise=False)
    w1, w2 = (mean + 0.6 * (reference.mapping(code) - mean) for code in (z, z2))
    w_plus = torch.cat([w1[:, None].repeat(1, 3, 1), w2[:, None].repeat(1, reference.n_latent - 3, 1)], 1)
    stored = [getattr(reference.noises, f"noise_{i}") for i in range(reference.num_layers)]
    assert relative_error(image, reference.synthesis(w_plus, stored)) < 1e-9


def test_reference_backend_matches_torch_backend(pair):
    _, generator = pair
    w_plus = torch.randn(2, generator.n_latent, STYLE_DIM, dtype=torch.float64)
    noise = random_noise(generator, 2, seed=5)
    tokens = random_tokens(generator.layer_shapes(4), 2, 3, seed=6)
    refinement = Refinement(*tokens, generator.num_layers)
    fast = generator.synthesis(w_plus, refinement=refinement, noise=noise)
    generator.backend = "reference"
    try:
        literal = generator.synthesis(w_plus, refinement=refinement, noise=noise)
    finally:
        generator.backend = "torch"
    assert relative_error(fast, literal) < 1e-12


@pytest.mark.parametrize("num_refined, shared", [(1, True), (4, False), (7, False)])
def test_refined_synthesis_matches_reference(pair, num_refined, shared):
    reference, generator = pair
    batch = 2
    w_plus = torch.randn(batch, generator.n_latent, STYLE_DIM, dtype=torch.float64)
    noise = random_noise(generator, batch, seed=7)
    p, q = random_tokens(generator.layer_shapes(num_refined), None if shared else batch, 5, seed=num_refined)
    refinement = Refinement(p, q, generator.num_layers)
    image = generator.synthesis(w_plus, refinement=refinement, noise=noise)
    first = generator.num_layers - num_refined
    tokens = [(None, None)] * first + list(zip(p, q))
    expected = reference.synthesis(w_plus, noise, tokens)
    assert relative_error(image, expected) < 1e-9
    # and the refinement really changes the picture
    plain = generator.synthesis(w_plus, noise=noise)
    assert relative_error(image, plain) > 1e-4


def test_refinement_none_and_zero_tokens_are_plain_stylegan2(pair):
    _, generator = pair
    w_plus = torch.randn(2, generator.n_latent, STYLE_DIM, dtype=torch.float64)
    noise = random_noise(generator, 2, seed=8)
    plain = generator.synthesis(w_plus, noise=noise)
    p, q = random_tokens(generator.layer_shapes(), None, 4, seed=9)
    zero = Refinement([torch.zeros_like(t) for t in p], q, generator.num_layers)
    assert torch.equal(generator.synthesis(w_plus, refinement=zero, noise=noise), plain)


def test_mixed_refinement_batch_equals_separate_runs(pair):
    """One forward over [unrefined x2 | domain A (shared, Nr=7, L=4) x2 | per-image (Nr=3, L=2) x3]."""
    _, generator = pair
    sizes = [2, 2, 3]
    w_plus = torch.randn(sum(sizes), generator.n_latent, STYLE_DIM, dtype=torch.float64)
    noise = random_noise(generator, sum(sizes), seed=10)
    domain = Refinement(*random_tokens(generator.layer_shapes(7), None, 4, seed=11), generator.num_layers)
    images = Refinement(*random_tokens(generator.layer_shapes(3), 3, 2, seed=12), generator.num_layers)
    mixed = Refinement.cat([None, domain, images], sizes)
    assert mixed.batch_size == 7 and mixed.num_refined == 7
    together = generator.synthesis(w_plus, refinement=mixed, noise=noise)

    start = 0
    for refinement, size in zip([None, domain, images], sizes):
        rows = slice(start, start + size)
        alone = generator.synthesis(w_plus[rows], refinement=refinement, noise=[n[rows] for n in noise])
        assert relative_error(together[rows], alone) < 1e-12
        start += size
    # the groups really differ from each other
    assert relative_error(together[2:4], generator.synthesis(w_plus[2:4], noise=[n[2:4] for n in noise])) > 1e-4


def test_backward_reaches_tokens_latents_and_matches_reference_backend(pair):
    _, generator = pair
    w_plus = torch.randn(2, generator.n_latent, STYLE_DIM, dtype=torch.float64, requires_grad=True)
    noise = random_noise(generator, 2, seed=13)
    tokens = RefinementTokens.for_generator(generator, num_refined=5, num_tokens=3, scale_init=0.3).double()
    target = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)

    grads = {}
    for backend in ("torch", "reference"):
        generator.backend = backend
        generator.zero_grad()
        tokens.zero_grad()
        w_plus.grad = None
        loss = (generator.synthesis(w_plus, refinement=tokens(), noise=noise) - target).square().mean()
        loss.backward()
        grads[backend] = [w_plus.grad.clone()] + [p.grad.clone() for p in tokens.parameters()]
    generator.backend = "torch"
    for fast, literal in zip(grads["torch"], grads["reference"]):
        assert fast.abs().sum() > 0
        assert relative_error(fast, literal) < 1e-9


def test_compile_synthesis_runs_the_network_compiled_and_matches_eager():
    """compile_synthesis swaps in a torch.compile'd synthesis (Dynamo really captures graphs, for
    synthesis and for forward, which renders through it); image and gradients equal the eager
    network's, the state_dict is untouched, and deleting the attribute goes back to eager.
    Backend "aot_eager" runs the captured aten graph without Inductor's C++ codegen."""
    from torch._dynamo.utils import counters

    torch.manual_seed(15)
    generator = Generator(16, style_dim=8, n_mlp=1, channels={4: 8, 8: 6, 16: 5}, backend="torch").double()
    generator.requires_grad_(False)
    tokens = RefinementTokens.for_generator(generator, num_tokens=3, scale_init=0.3).double()
    w_plus = torch.randn(2, generator.n_latent, 8, dtype=torch.float64)
    noise = random_noise(generator, 2, seed=16)
    state = {k: v.clone() for k, v in generator.state_dict().items()}

    def image_and_gradients():
        tokens.zero_grad()
        image = generator.synthesis(w_plus, refinement=tokens(), noise=noise)
        image.square().mean().backward()
        return [image.detach()] + [p.grad.clone() for p in tokens.parameters()]

    eager = image_and_gradients()
    torch._dynamo.reset()
    counters.clear()
    assert not generator.synthesis_is_compiled
    assert generator.compile_synthesis(backend="aot_eager") is generator and generator.synthesis_is_compiled
    compiled = image_and_gradients()
    assert counters["stats"]["unique_graphs"] >= 1
    for got, expected in zip(compiled, eager):
        assert expected.abs().sum() > 0
        assert relative_error(got, expected) < 1e-12
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        generator([torch.randn(3, 8, dtype=torch.float64)])  # forward goes through the compiled synthesis
    assert counters["stats"]["unique_graphs"] > graphs
    assert all(torch.equal(v, state[k]) for k, v in generator.state_dict().items())
    copied = copy.deepcopy(generator)  # not bound to the original through its compiled synthesis
    assert not copied.synthesis_is_compiled and generator.synthesis_is_compiled
    with torch.no_grad():  # fresh biases and noise strengths are 0: a zero first conv renders black
        copied.conv1.conv.weight.zero_()
        assert copied.synthesis(w_plus, noise=noise).abs().sum() == 0
    with pytest.raises(ValueError, match="mode"):
        generator.compile_synthesis(mode="fastest")
    del generator.synthesis
    assert not generator.synthesis_is_compiled
    torch._dynamo.reset()


def test_compile_synthesis_passes_a_mode_or_inductor_options(monkeypatch):
    """torch.compile refuses a mode together with `options`: the default mode then gives way, and
    a mode asked for explicitly beside them is a ValueError naming mode."""
    calls = []

    def fake_compile(function, **kwargs):
        calls.append(kwargs)
        return function

    monkeypatch.setattr(torch, "compile", fake_compile)
    generator = Generator(16, style_dim=8, n_mlp=1, channel_max=8)
    generator.compile_synthesis(options={"max_autotune": False})
    generator.compile_synthesis(mode=None, backend="aot_eager")
    generator.compile_synthesis("reduce-overhead")
    generator.compile_synthesis()
    assert calls == [{"options": {"max_autotune": False}}, {"backend": "aot_eager"}, {"mode": "reduce-overhead"},
                     {"mode": "default"}]  # fmt: skip
    with pytest.raises(ValueError, match="mode: torch.compile takes a mode or options"):
        generator.compile_synthesis("max-autotune", options={"max_autotune": False})


def test_autocast_bfloat16_on_cpu_runs_and_stays_close():
    torch.manual_seed(14)
    generator = Generator(16, style_dim=16, n_mlp=2, channel_max=16)
    z = torch.randn(2, 16)
    refinement = RefinementTokens.for_generator(generator, num_tokens=4, scale_init=0.2)()
    with torch.no_grad():
        full, _ = generator([z], randomize_noise=False, refinement=refinement)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, _ = generator([z], randomize_noise=False, refinement=refinement)
    assert torch.isfinite(low).all()
    assert relative_error(low.float(), full) < 5e-2


def test_input_validation():
    generator = Generator(16, style_dim=8, n_mlp=1, channel_max=8)
    z = torch.randn(2, 8)
    with pytest.raises(TypeError, match="list of one or two tensors"):
        generator(z)
    with pytest.raises(ValueError, match="style_dim=8"):
        generator([torch.randn(2, 9)])
    with pytest.raises(ValueError, match="w\\+"):
        generator([torch.randn(2, 3, 8)], input_is_latent=True)
    with pytest.raises(ValueError, match="truncation_latent"):
        generator([z], truncation=0.5)
    with pytest.raises(TypeError, match="truncation_latent: expected a tensor, got list"):
        generator([z], truncation=0.5, truncation_latent=[0.0] * 8)
    with pytest.raises(TypeError, match="inject_index: expected an int, got float"):
        generator([z, z], inject_index=2.0)
    generator([z, z], inject_index=torch.tensor(2))  # an integer tensor is an int
    with pytest.raises(ValueError, match="noise\\[1\\]"):
        generator([z], noise=[None, torch.randn(2, 1, 4, 4), None, None, None])
    with pytest.raises(ValueError, match="w_plus"):
        generator.synthesis(torch.randn(2, 8))
    bad = Refinement([torch.randn(2, 5)], [torch.randn(2, 8)], generator.num_layers)  # Cout 8, not 5
    with pytest.raises(ValueError, match="conv layer 4 has Cin=8, Cout=8"):
        generator([z], refinement=bad)
    wrong_batch = Refinement([torch.randn(3, 2, 8)], [torch.randn(3, 2, 8)], generator.num_layers)
    with pytest.raises(ValueError, match="batch size 3"):
        generator([z], refinement=wrong_batch)
    other = Refinement([torch.randn(2, 8)], [torch.randn(2, 8)], 17)
    with pytest.raises(ValueError, match="17 conv layers"):
        generator([z], refinement=other)
    with pytest.raises(ValueError, match="size"):
        Generator(48)


def test_latent_avg_is_not_in_state_dict_and_drives_truncation():
    generator = Generator(16, style_dim=8, n_mlp=1, channel_max=8)
    assert "latent_avg" not in generator.state_dict()
    generator.latent_avg = torch.randn(8)
    z = torch.randn(2, 8)
    implicit, _ = generator([z], truncation=0.0, randomize_noise=False)
    explicit, _ = generator([z], truncation=0.0, truncation_latent=generator.latent_avg, randomize_noise=False)
    assert torch.equal(implicit, explicit)
    assert torch.allclose(implicit[0], implicit[1])  # psi = 0: every sample is the mean
