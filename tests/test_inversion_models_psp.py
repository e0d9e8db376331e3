"""pSp and e4e checkpoints load as first stages and compute what pSp and e4e compute.

The reference below rebuilds both encoders' forward from their papers' description with
pSp's own parameter names (input_layer / body trunk, latlayer1 / latlayer2, one gradual
style block per w+ row: stride-2 3x3 convs + LeakyReLU(0.01), then an equalised linear
layer), written as plain functional code: pSp stacks the rows, e4e adds row i's block to
row 0's code; both add latent_avg.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from refinestyle.checkpoints import load_generator
from refinestyle.generator import Generator
from refinestyle.inversion import PSPEncoder, TwoStageInverter, load_inverter, save_inverter
from refinestyle.inversion.encoder import IRSEBase
from refinestyle.inversion.psp import load_psp, trunk_layout
from refinestyle.inversion.style_transformer import load_first_stage

DEPTH, WIDTHS, DIM, INPUT = (1, 2, 1, 1), (8, 16, 24, 32), 32, 64


class ReferenceEncoder(nn.Module):
    """pSp's GradualStyleEncoder / e4e's Encoder4Editing, with their parameter names."""

    def __init__(self, n_latent: int, e4e: bool):
        super().__init__()
        self.e4e = e4e
        trunk = IRSEBase(3, DEPTH, WIDTHS)
        self.input_layer, self.body = trunk.input_layer, trunk.body
        self.stage_ends = trunk.stage_ends
        self.latlayer1 = nn.Conv2d(WIDTHS[2], DIM, 1)
        self.latlayer2 = nn.Conv2d(WIDTHS[1], DIM, 1)
        self.styles = nn.ModuleList()
        for row in range(n_latent):
            spatial = INPUT // 16 * (1 if row < 3 else 2 if row < 7 else 4)
            block = nn.Module()
            convs = []
            for _ in range(int(math.log2(spatial))):
                convs += [nn.Conv2d(DIM, DIM, 3, 2, 1), nn.LeakyReLU()]
            block.convs = nn.Sequential(*convs)
            block.linear = nn.Module()
            block.linear.weight = nn.Parameter(torch.randn(DIM, DIM))
            block.linear.bias = nn.Parameter(torch.randn(DIM) * 0.1)
            self.styles.append(block)

    def style(self, row, features):
        block = self.styles[row]
        x = block.convs(features).reshape(features.shape[0], DIM)
        return x @ (block.linear.weight / math.sqrt(DIM)).t() + block.linear.bias

    def forward(self, images, latent_avg):
        x = self.input_layer(images)
        for index, unit in enumerate(self.body):
            x = unit(x)
            if index == self.stage_ends[1]:
                c1 = x
            elif index == self.stage_ends[2]:
                c2 = x
        c3 = x
        p2 = F.interpolate(c3, size=c2.shape[-2:], mode="bilinear", align_corners=True) + self.latlayer1(c2)
        p1 = F.interpolate(p2, size=c1.shape[-2:], mode="bilinear", align_corners=True) + self.latlayer2(c1)
        rows = []
        for row in range(len(self.styles)):
            features = c3 if row < 3 else p2 if row < 7 else p1
            rows.append(self.style(row, features))
        w = torch.stack(rows, 1)
        if self.e4e:
            w = w[:, :1].repeat(1, w.shape[1], 1)
            for row in range(1, w.shape[1]):
                features = c3 if row < 3 else p2 if row < 7 else p1
                w[:, row] += self.style(row, features)
        return w + latent_avg

    def checkpoint(self, latent_avg, generator, encoder_type, **opts):
        state = {f"encoder.{k}": v for k, v in self.state_dict().items()}
        state.update({f"decoder.{k}": v for k, v in generator.state_dict().items()})
        opts = {"encoder_type": encoder_type, "start_from_latent_avg": True, "input_nc": 3, **opts}
        return {"state_dict": state, "opts": opts, "latent_avg": latent_avg}


def _randomise_batch_norms(module):
    for child in module.modules():
        if isinstance(child, nn.BatchNorm2d):
            child.running_mean.uniform_(-0.2, 0.2)
            child.running_var.uniform_(0.5, 1.5)


@pytest.fixture(scope="module")
def generator():
    torch.manual_seed(0)
    return Generator(64, style_dim=DIM, n_mlp=2, channel_max=16).eval()  # 10 w+ rows: all three levels


@pytest.mark.parametrize("encoder_type", ["GradualStyleEncoder", "Encoder4Editing"])
@pytest.mark.parametrize("latent_avg_rows", [0, 1])
def test_psp_and_e4e_checkpoints_compute_their_encoders(tmp_path, generator, encoder_type, latent_avg_rows):
    torch.manual_seed(1)
    reference = ReferenceEncoder(generator.n_latent, e4e=encoder_type == "Encoder4Editing").eval()
    _randomise_batch_norms(reference)
    # pSp stores latent_avg as [512]; some files repeat it per row
    latent_avg = torch.randn(DIM) if not latent_avg_rows else torch.randn(generator.n_latent, DIM)
    path = tmp_path / "encoder.pt"
    torch.save(reference.checkpoint(latent_avg, generator, encoder_type), path)

    first_stage = load_first_stage(path, generator)
    assert isinstance(first_stage, PSPEncoder)
    assert first_stage.kind == ("e4e" if reference.e4e else "psp")
    assert first_stage.stage_units == DEPTH and first_stage.widths == WIDTHS and first_stage.input_size == INPUT
    assert not any(p.requires_grad for p in first_stage.parameters()) and not first_stage.training
    images = torch.rand(2, 3, INPUT, INPUT) * 2 - 1
    with torch.no_grad():
        expected = reference(images, latent_avg)
        w_plus = first_stage(images)
        # other sizes are resized to the encoder's input first (antialiased bilinear, as our inverters)
        large = torch.rand(2, 3, 2 * INPUT, 2 * INPUT) * 2 - 1
        resized = first_stage(large)
        expected_resized = reference(
            F.interpolate(large, size=(INPUT, INPUT), mode="bilinear", align_corners=False, antialias=True), latent_avg
        )
    assert w_plus.shape == (2, generator.n_latent, DIM)
    assert torch.allclose(w_plus, expected, atol=1e-5), (w_plus - expected).abs().max()
    assert torch.allclose(resized, expected_resized, atol=1e-5)


def test_two_stage_model_stores_its_psp_first_stage(tmp_path, generator):
    torch.manual_seed(2)
    reference = ReferenceEncoder(generator.n_latent, e4e=True).eval()
    path = tmp_path / "e4e.pt"
    torch.save(reference.checkpoint(torch.randn(DIM), generator, "Encoder4Editing"), path)
    first_stage = load_first_stage(path, generator)
    model = TwoStageInverter(
        generator, first_stage, num_refined=2, num_tokens=4, encoder_depth=(1, 1, 1, 1),
        encoder_widths=(8, 8, 16, 32), encoder_size=32, heads=2, head_dim=8, ffn_dim=16,
    )  # fmt: skip
    assert model.config.first_stage["kind"] == "e4e"
    saved = save_inverter(tmp_path / "two.safetensors", model)
    loaded = load_inverter(saved, generator)
    assert isinstance(loaded.first_stage, PSPEncoder) and loaded.first_stage.kind == "e4e"
    assert model.num_parameters() == loaded.num_parameters()  # the first stage is not counted
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        before, after = model.eval()(images), loaded(images)
    assert torch.equal(before.w_plus, after.w_plus)
    assert torch.allclose(before.image, after.image, atol=1e-6)


def test_checkpoint_generator_loads_and_must_match(tmp_path, generator):
    reference = ReferenceEncoder(generator.n_latent, e4e=False)
    path = tmp_path / "psp.pt"
    torch.save(reference.checkpoint(torch.randn(DIM), generator, "GradualStyleEncoder"), path)
    # the checkpoint's decoder is a generator for --generator
    decoder = load_generator(path)
    w_plus = torch.randn(1, generator.n_latent, DIM)
    with torch.no_grad():
        assert torch.allclose(decoder.synthesis(w_plus, randomize_noise=False),
                              generator.synthesis(w_plus, randomize_noise=False), atol=1e-6)  # fmt: skip
    other = Generator(64, style_dim=DIM, n_mlp=2, channel_max=16)
    with pytest.raises(ValueError, match="trained with another generator"):
        load_psp(path, other)


def test_foreign_and_unsupported_checkpoints_are_named(tmp_path, generator):
    reference = ReferenceEncoder(generator.n_latent, e4e=False)

    def saved(name, checkpoint):
        torch.save(checkpoint, tmp_path / name)
        return tmp_path / name

    latent_avg = torch.randn(DIM)
    cases = [
        (reference.checkpoint(latent_avg, generator, "BackboneEncoderUsingLastLayerIntoW"), "not supported"),
        (reference.checkpoint(latent_avg, generator, "GradualStyleEncoder", input_nc=1), "RGB"),
        (reference.checkpoint(latent_avg, generator, "GradualStyleEncoder", label_nc=19), "RGB"),
        ({**reference.checkpoint(latent_avg, generator, "GradualStyleEncoder"), "opts": {}}, "cannot tell pSp from e4e"),
        ({**reference.checkpoint(latent_avg, generator, "GradualStyleEncoder"), "latent_avg": None}, "holds none"),
        ({**reference.checkpoint(torch.randn(3, DIM), generator, "GradualStyleEncoder")}, "latent_avg: expected"),
    ]
    for index, (checkpoint, message) in enumerate(cases):
        with pytest.raises(ValueError, match=message):
            load_psp(saved(f"case{index}.pt", checkpoint), generator)
    with pytest.raises(ValueError, match="w\\+ rows"):
        load_psp(saved("rows.pt", reference.checkpoint(latent_avg, generator, "Encoder4Editing")),
                 Generator(32, style_dim=DIM, n_mlp=2, channel_max=16))  # fmt: skip
    with pytest.raises(FileNotFoundError, match="pSp / e4e checkpoint"):
        load_psp(tmp_path / "absent.pt", generator)
    with pytest.raises(ValueError, match="kind"):
        PSPEncoder("hyperstyle", 10)


def test_trunk_layout_is_read_from_the_weights():
    trunk = IRSEBase(3, (3, 4, 14, 3), (64, 128, 256, 512))
    assert trunk_layout(trunk.state_dict()) == ((3, 4, 14, 3), (64, 128, 256, 512))
    same_widths = IRSEBase(3, (1, 1, 1, 1), (16, 16, 24, 32))  # stages 1 and 2 cannot be told apart
    with pytest.raises(ValueError, match="encoder_depth"):
        trunk_layout(same_widths.state_dict())
