"""Inverter parts on tiny configs: encoder, transformer blocks (grouping), one- and two-stage models, files."""
import pytest
import torch

from refinestyle.generator import Generator
from refinestyle.inversion import (
    FeaturePyramidEncoder,
    FirstStage,
    GroupedTransformerBlock,
    InversionResult,
    IRSEBackbone,
    OneStageInverter,
    TransformerBlock,
    TwoStageInverter,
    load_inverter,
    load_ir_se50_weights,
    read_inverter_config,
    save_inverter,
)
from refinestyle.inversion.models import TokenBranch
from refinestyle.refinement import Refinement
from refinestyle.weights import MissingWeightsError

TINY_ENCODER = dict(encoder_depth=(1, 1, 1, 1), encoder_widths=(16, 16, 32, 32), encoder_size=32)
TINY_BLOCKS = dict(heads=2, head_dim=16, ffn_dim=64)
TINY = {**TINY_ENCODER, **TINY_BLOCKS}


def tiny_generator(seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    return Generator(32, style_dim=32, n_mlp=2, channel_max=16)


def random_images(batch: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------------- encoder


def test_ir_se50_layout_matches_arcface_names_and_shapes():
    state = IRSEBackbone().state_dict()
    expected = {
        "input_layer.0.weight": (64, 3, 3, 3),
        "input_layer.2.weight": (64,),  # PReLU
        "body.0.res_layer.1.weight": (64, 64, 3, 3),
        "body.3.shortcut_layer.0.weight": (128, 64, 1, 1),  # the first unit of stage 2
        "body.7.shortcut_layer.1.running_var": (256,),
        "body.23.res_layer.5.fc1.weight": (32, 512, 1, 1),  # squeeze-excitation, reduction 16
        "body.23.res_layer.5.fc2.weight": (512, 32, 1, 1),
        "output_layer.3.weight": (512, 512 * 7 * 7),
        "output_layer.4.running_mean": (512,),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert "body.0.shortcut_layer.0.weight" not in state  # 64 -> 64: a strided 1x1 max pool, no weights
    assert max(int(k.split(".")[1]) for k in state if k.startswith("body.")) == 23  # 3 + 4 + 14 + 3 units
    assert sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k) == 43_797_696


def test_feature_pyramid_shapes_three_and_six_channels():
    for channels in (3, 6):
        encoder = FeaturePyramidEncoder(channels, token_dim=24, depth=(1, 2, 1, 1), widths=(16, 16, 32, 48))
        coarse, medium, fine = encoder(torch.randn(2, channels, 64, 64))
        assert coarse.shape == (2, 16, 24) and medium.shape == (2, 64, 24) and fine.shape == (2, 256, 24)
        assert torch.isfinite(fine).all()
    with pytest.raises(ValueError, match="images"):
        encoder(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="multiples of 16"):
        encoder(torch.randn(2, 6, 40, 40))
    with pytest.raises(ValueError, match="depth"):
        FeaturePyramidEncoder(3, depth=34)


def _tiny_arcface_file(tmp_path, name="tiny_ir_se.pth"):
    torch.manual_seed(3)
    net = IRSEBackbone((1, 1, 1, 1), (16, 16, 32, 32), embedding_dim=32)
    for module in net.modules():  # non-trivial BatchNorm statistics
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    # as in files from old PyTorch versions: no BatchNorm step counters
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / name
    torch.save(state, path)
    return path, state


def test_load_ir_se50_weights_three_and_six_channels(tmp_path):
    path, state = _tiny_arcface_file(tmp_path)
    encoder = FeaturePyramidEncoder(3, path, token_dim=32, depth=(1, 1, 1, 1), widths=(16, 16, 32, 32))
    loaded = encoder.state_dict()
    for key, value in state.items():
        if not key.startswith("output_layer."):
            assert torch.equal(loaded[key], value), key

    torch.manual_seed(5)
    six = FeaturePyramidEncoder(6, token_dim=32, depth=(1, 1, 1, 1), widths=(16, 16, 32, 32))
    fresh = six.input_layer[0].weight.detach().clone()
    load_ir_se50_weights(six, path)
    first_conv = six.input_layer[0].weight
    assert torch.equal(first_conv[:, :3], state["input_layer.0.weight"])
    assert torch.equal(first_conv[:, 3:], fresh[:, 3:])  # re-initialised, not copied
    assert not torch.equal(first_conv[:, 3:], state["input_layer.0.weight"])
    assert torch.equal(six.body[2].res_layer[3].weight, state["body.2.res_layer.3.weight"])

    wrong_depth = FeaturePyramidEncoder(3, token_dim=32, depth=(1, 2, 1, 1), widths=(16, 16, 32, 32))
    with pytest.raises(ValueError, match="missing"):
        load_ir_se50_weights(wrong_depth, path)


def test_missing_ir_se50_file_names_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("REFINESTYLE_IR_SE50", raising=False)
    encoder = FeaturePyramidEncoder(3, token_dim=32, depth=(1, 1, 1, 1), widths=(16, 16, 32, 32))
    with pytest.raises(MissingWeightsError, match=r"model_ir_se50\.pth.*pixel2style2pixel"):
        load_ir_se50_weights(encoder, tmp_path / "nowhere.pth")
    with pytest.raises(MissingWeightsError, match="REFINESTYLE_IR_SE50"):
        load_ir_se50_weights(encoder, None)
    with pytest.raises(MissingWeightsError, match="model_ir_se50"):
        OneStageInverter(tiny_generator(), 2, 4, ir_se50_path=tmp_path / "absent.pth", **TINY)


# ------------------------------------------------------------------------------ transformer blocks


def _input_gradient_by_group(block, group_size, groups=3, watched_group=1):
    torch.manual_seed(0)
    tokens = torch.randn(2, groups * group_size, 16, requires_grad=True)
    features = torch.randn(2, 10, 16, requires_grad=True)
    out = block(tokens, features)
    assert out.shape == tokens.shape
    weights = torch.randn_like(out[:, watched_group * group_size : (watched_group + 1) * group_size])
    (out[:, watched_group * group_size : (watched_group + 1) * group_size] * weights).sum().backward()
    per_group = tokens.grad.reshape(2, groups, group_size, 16).abs().sum(dim=(0, 2, 3))
    return per_group, features.grad


def test_grouped_self_attention_never_mixes_groups():
    grouped = GroupedTransformerBlock(16, group_size=4, heads=2, head_dim=8, ffn_dim=32).eval()
    per_group, feature_grad = _input_gradient_by_group(grouped, 4)
    assert per_group[1] > 0
    assert per_group[0] == 0 and per_group[2] == 0  # exactly: no path from another group
    assert feature_grad.abs().sum() > 0  # cross-attention reaches all image features

    plain = TransformerBlock(16, heads=2, head_dim=8, ffn_dim=32).eval()
    per_group, _ = _input_gradient_by_group(plain, 4)
    assert (per_group > 0).all()  # the ungrouped block does mix: the check above can fail


def test_attention_head_width_is_independent_of_dim():
    block = TransformerBlock(32, heads=4, head_dim=512)
    assert block.self_attn.to_q.weight.shape == (4 * 512, 32)
    assert block.cross_attn.to_out.weight.shape == (32, 4 * 512)
    with pytest.raises(ValueError, match="whole number of groups"):
        GroupedTransformerBlock(32, group_size=5, heads=1, head_dim=8)(torch.randn(1, 12, 32), torch.randn(1, 3, 32))


# ------------------------------------------------------------------------------------ inverters


def test_one_stage_shapes_and_frozen_generator():
    generator = tiny_generator()
    model = OneStageInverter(generator, num_refined=4, num_tokens=8, **TINY)
    images = random_images(3)
    result = model(images)
    assert isinstance(result, InversionResult)
    assert result.w_plus.shape == (3, generator.n_latent, 32)
    assert isinstance(result.refinement, Refinement)
    assert result.refinement.first_layer == generator.num_layers - 4
    assert result.refinement.num_tokens == (8,) * 4 and result.refinement.batch_size == 3
    for (cin, cout), p, q in zip(generator.layer_shapes(4), result.refinement.p, result.refinement.q):
        assert p.shape == (3, 8, cout) and q.shape == (3, 8, cin)
    assert result.image.shape == (3, 3, 32, 32) and result.initial_image is None
    assert model(images, render=False).image is None
    assert model.w_plus_only(images).shape == (3, generator.n_latent, 32)

    # the generator is frozen; the w+ branch trains its own copy of the mapping MLP
    assert not any(p.requires_grad for p in generator.parameters())
    mapping = model.latent_branch.mapping
    assert mapping is not generator.style and all(p.requires_grad for p in mapping.parameters())
    result.image.square().mean().backward()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(model.get_parameter(name).grad is not None for name in trainable)
    assert all(p.grad is None for p in generator.parameters())
    assert model.num_parameters(trainable_only=True) == sum(p.numel() for p in model.parameters() if p.requires_grad)

    plain = OneStageInverter(generator, refine=False, **TINY)
    result = plain(images)
    assert result.refinement is None and plain.token_branch is None and result.image.shape == (3, 3, 32, 32)


def test_inverters_follow_a_float64_generator(tmp_path):
    """Built on a float64 generator (exact checks), the inverter is float64 too, and a saved one
    loads back onto it in float64: a float32 encoder there failed at its first matmul."""
    generator = tiny_generator().double()
    one = OneStageInverter(generator, num_refined=2, num_tokens=4, **TINY)
    two = TwoStageInverter(generator, FirstStage(OneStageInverter(generator, refine=False, **TINY)),
                           num_refined=generator.num_layers, num_tokens=4, **TINY)  # fmt: skip
    images = random_images(2).double()
    for model in (one, two):
        assert {p.dtype for p in model.parameters()} == {torch.float64}
        result = model(images)
        assert result.w_plus.dtype == result.image.dtype == torch.float64
    save_inverter(tmp_path / "one.safetensors", one)
    loaded = load_inverter(tmp_path / "one.safetensors", generator)
    assert {p.dtype for p in loaded.parameters()} == {torch.float64}
    torch.testing.assert_close(loaded(images).image, one.eval()(images).image)


def test_a_first_stage_loads_from_its_run_folder(tmp_path):
    """--first-stage takes a --no-refine run's folder as well as its inverter.safetensors; a folder
    without one is named in the error."""
    from refinestyle.inversion.style_transformer import load_first_stage

    generator = tiny_generator()
    first = OneStageInverter(generator, refine=False, **TINY).eval()
    (tmp_path / "run").mkdir()
    save_inverter(tmp_path / "run" / "inverter.safetensors", first)
    images = random_images(2)
    from_folder = load_first_stage(tmp_path / "run", generator)
    from_file = load_first_stage(tmp_path / "run" / "inverter.safetensors", generator)
    with torch.no_grad():
        expected = first(images, render=False).w_plus
        torch.testing.assert_close(from_folder(images), expected)
        torch.testing.assert_close(from_file(images), expected)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="inverter.safetensors"):
        load_first_stage(tmp_path / "empty", generator)


def test_token_branch_groups_are_independent_layers():
    model = OneStageInverter(tiny_generator(), num_refined=3, num_tokens=4, **TINY).eval()
    result = model(random_images(2), render=False)
    branch = model.token_branch
    # tokens of refined layer 0: depend on their own initial tokens only (P and Q groups apart)
    grads = torch.autograd.grad(result.refinement.p[0].square().sum(), [branch.initial_p, branch.initial_q])
    per_layer_p = grads[0].abs().sum(dim=(1, 2))
    assert per_layer_p[0] > 0 and per_layer_p[1] == 0 and per_layer_p[2] == 0
    assert grads[1].abs().sum() == 0


def test_token_branch_levels_choose_the_features_each_block_reads():
    branch = TokenBranch([(16, 16), (16, 8)], 7, 4, 32, heads=2, head_dim=16, ffn_dim=64, levels=("fine",))
    assert len(branch.blocks) == 1
    features = [torch.randn(2, n, 32, requires_grad=True) for n in (4, 16, 64)]
    refinement = branch(features)
    assert refinement.layer_shapes == [(16, 16), (16, 8)] and refinement.first_layer == 5
    grads = torch.autograd.grad(
        sum(t.square().sum() for t in refinement.p + refinement.q), features, allow_unused=True
    )
    assert grads[0] is None and grads[1] is None and grads[2].abs().sum() > 0
    with pytest.raises(ValueError, match="levels"):
        TokenBranch([(16, 16)], 7, 4, 32, levels=("finest",))


def test_refinement_starts_small():
    generator = tiny_generator()
    model = OneStageInverter(generator, num_refined=7, num_tokens=8, scale_init=0.01, **TINY).eval()
    images = random_images(2)
    with torch.no_grad():
        result = model(images)
        plain = generator.synthesis(result.w_plus, randomize_noise=False)
        big = OneStageInverter(generator, num_refined=7, num_tokens=8, scale_init=1.0, **TINY).eval()
        big_result = big(images)
        big_plain = generator.synthesis(big_result.w_plus, randomize_noise=False)
    small_change = (result.image - plain).norm() / plain.norm()
    large_change = (big_result.image - big_plain).norm() / big_plain.norm()
    assert 0 < small_change < 0.05 < large_change


@pytest.mark.parametrize("levels", [("coarse", "medium", "fine"), ("fine",), ("coarse", "medium"), ("coarse",)])
def test_two_stage_says_whether_every_trainable_parameter_gets_a_gradient(levels):
    """DDP (find_unused_parameters=False) stops at the second step when a parameter gets no
    gradient: train_inverter asks the model, so the answer must be what backward does."""
    generator = tiny_generator()
    first = FirstStage(OneStageInverter(generator, refine=False, **TINY))
    model = TwoStageInverter(generator, first, num_refined=2, num_tokens=4, **{**TINY, "token_levels": levels})
    model(random_images(2)).image.square().mean().backward()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert trainable and model.uses_every_trainable_parameter == (not unused), unused


def test_two_stage_shapes_and_frozen_first_stage():
    generator = tiny_generator()
    first = FirstStage(OneStageInverter(generator, refine=False, **TINY))
    model = TwoStageInverter(generator, first, num_refined=generator.num_layers, num_tokens=4, **TINY)
    assert model.encoder.in_channels == 6
    model.train()
    assert not first.inverter.training  # frozen parts stay in eval mode
    images = random_images(2)
    result = model(images)
    expected_w = first(images)
    assert torch.equal(result.w_plus, expected_w)
    assert result.refinement.first_layer == 0 and result.refinement.num_refined == generator.num_layers
    assert result.image.shape == result.initial_image.shape == (2, 3, 32, 32)
    assert torch.allclose(result.initial_image, generator.synthesis(expected_w, randomize_noise=False))
    result.image.square().mean().backward()
    assert all(p.grad is None for p in first.parameters())
    assert model.token_branch.initial_p.grad is not None and model.encoder.input_layer[0].weight.grad is not None
    # the second image channel triple (the initial image) reaches the encoder
    assert model.encoder.input_layer[0].weight.grad[:, 3:].abs().sum() > 0

    def bad_first_stage(x):
        return torch.zeros(x.shape[0], 3, 32)

    with pytest.raises(ValueError, match="first_stage"):
        TwoStageInverter(generator, bad_first_stage, num_refined=2, num_tokens=4, **TINY)(images)
    with pytest.raises(ValueError, match="num_refined"):
        TwoStageInverter(generator, first, num_refined=17, num_tokens=4, **TINY)
    with pytest.raises(ValueError, match=r"images: expected \[B, 3, H, W\]"):
        model(images[:, :2])


def test_save_and_load_inverters(tmp_path):
    generator = tiny_generator()
    one = OneStageInverter(generator, num_refined=3, num_tokens=4, token_levels=("medium", "fine"), **TINY)
    with torch.no_grad():  # make every parameter differ from a fresh initialisation
        for parameter in one.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.01)
    one.eval()
    images = random_images(2)
    path = save_inverter(tmp_path / "one.safetensors", one)
    assert read_inverter_config(path).stage == "one"
    loaded = load_inverter(path, generator)
    assert isinstance(loaded, OneStageInverter) and not loaded.training
    assert loaded.token_branch.levels == ("medium", "fine") and len(loaded.token_branch.blocks) == 2
    with torch.no_grad():
        a, b = one(images), loaded(images)
    assert torch.equal(a.w_plus, b.w_plus) and torch.equal(a.image, b.image)

    first = FirstStage(OneStageInverter(generator, refine=False, **TINY))
    two = TwoStageInverter(generator, first, num_refined=4, num_tokens=4, **TINY).eval()
    path = save_inverter(tmp_path / "two.safetensors", two)
    loaded = load_inverter(path, generator)
    with torch.no_grad():
        assert torch.equal(loaded(images).image, two(images).image)

    external = TwoStageInverter(generator, lambda x: first(x), num_refined=4, num_tokens=4, **TINY)
    path = save_inverter(tmp_path / "external.safetensors", external)
    with pytest.raises(ValueError, match="first_stage"):
        load_inverter(path, generator)
    assert isinstance(load_inverter(path, generator, first_stage=first), TwoStageInverter)

    other = Generator(32, style_dim=32, n_mlp=2, channel_max=8)
    with pytest.raises(ValueError, match="Cin, Cout"):
        load_inverter(tmp_path / "one.safetensors", other)
    with pytest.raises(FileNotFoundError):
        load_inverter(tmp_path / "missing.safetensors", generator)


def test_paper_table1_sizes_with_head_width_128():
    """Parameters and MACs of E + branches at 1024 px / 256 px input match the paper's Table 1.

    Built on the meta device (no memory, no arithmetic): the counts depend on shapes only.
    """
    from torch.utils.flop_counter import FlopCounterMode

    def giga_macs(function):
        with FlopCounterMode(display=False) as counter:
            function()
        return counter.get_total_flops() / 2e9

    with torch.device("meta"):
        generator = Generator(1024)
        images = torch.empty(1, 3, 256, 256)
        mapping = sum(p.numel() for p in generator.style.parameters())  # the paper counts it with G
        w_only = OneStageInverter(generator, refine=False, head_dim=128, latent_avg=torch.zeros(512))
        one = OneStageInverter(generator, 10, 32, head_dim=128, token_levels=("fine",), latent_avg=torch.zeros(512))
        two = TwoStageInverter(generator, lambda x: None, 17, 32, head_dim=128)
        sizes = {
            "StyleTrans": ((w_only.num_parameters() - mapping) / 1e6, giga_macs(lambda: w_only.w_plus_only(images))),
            "one-stage": ((one.num_parameters() - mapping) / 1e6, giga_macs(lambda: one(images, render=False))),
            "two-stage": (two.num_parameters() / 1e6, giga_macs(lambda: two.refinement_for(images, images))),
        }
    paper = {"StyleTrans": (40.6, 36.3), "one-stage": (46.4, 43.0), "two-stage": (47.1, 51.1)}
    for name, (params, macs) in sizes.items():
        assert abs(params - paper[name][0]) < 0.06, (name, params)
        assert abs(macs - paper[name][1]) < 0.11, (name, macs)
