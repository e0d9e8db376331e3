"""A Style Transformer checkpoint loads as a first stage and computes what Style Transformer computes.

The reference below rebuilds Style Transformer's forward from its description (IR-SE trunk,
feature pyramid with latlayer1/latlayer2, three post-norm decoder layers, mapping(z)
queries, + latent_avg) on PyTorch's own nn.TransformerDecoderLayer, which has the same
sub-module names (self_attn, multihead_attn, linear1, linear2, norm1-3).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from refinestyle.generator import Generator
from refinestyle.inversion import FirstStage, TwoStageInverter
from refinestyle.inversion.encoder import IRSEBase
from refinestyle.inversion.style_transformer import load_first_stage, load_style_transformer

DEPTH, WIDTHS, DIM = (1, 1, 1, 1), (16, 16, 24, 32), 32


class ReferenceStyleTransformer(nn.Module):
    def __init__(self, mapping: nn.Module, n_latent: int):
        super().__init__()
        self.trunk = IRSEBase(3, DEPTH, WIDTHS)
        self.latlayer1 = nn.Conv2d(WIDTHS[2], DIM, 1)
        self.latlayer2 = nn.Conv2d(WIDTHS[1], DIM, 1)
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(DIM, 4, 48, dropout=0.0, batch_first=True) for _ in range(3)
        )
        self.z = nn.Parameter(torch.randn(1, n_latent, DIM))
        self.mapping = mapping

    def forward(self, images, latent_avg):
        _, c1, c2, c3 = self.trunk.stage_outputs(images)
        p2 = F.interpolate(c3, size=c2.shape[-2:], mode="bilinear", align_corners=True) + self.latlayer1(c2)
        p1 = F.interpolate(p2, size=c1.shape[-2:], mode="bilinear", align_corners=True) + self.latlayer2(c1)
        query = self.mapping(self.z[0]).unsqueeze(0).expand(images.shape[0], -1, -1)
        for layer, features in zip(self.layers, (c3, p2, p1)):
            query = layer(query, features.flatten(2).transpose(1, 2))
        return query + latent_avg

    def checkpoint(self, latent_avg, generator, dataset_type="ffhq_encode"):
        state = {}
        for key, value in self.trunk.state_dict().items():
            state[f"encoder.module.{key}"] = value
        for name in ("latlayer1", "latlayer2"):
            for key, value in getattr(self, name).state_dict().items():
                state[f"encoder.module.{name}.{key}"] = value
        for level, layer in zip(("coarse", "medium", "fine"), self.layers):
            for key, value in layer.state_dict().items():
                state[f"encoder.module.transformerlayer_{level}.{key}"] = value
        state["encoder.module.z"] = self.z.detach()
        decoder = {k: v for k, v in generator.state_dict().items() if not k.startswith("style.")}
        decoder.update({f"style.{k}": v for k, v in self.mapping.state_dict().items()})
        state.update({f"decoder.module.{k}": v for k, v in decoder.items()})
        return {"state_dict": state, "opts": {"learning_rate": 1e-4, "dataset_type": dataset_type}, "latent_avg": latent_avg}


def test_style_transformer_checkpoint_as_first_stage(tmp_path):
    torch.manual_seed(0)
    generator = Generator(32, style_dim=DIM, n_mlp=2, channel_max=16)
    mapping = Generator(32, style_dim=DIM, n_mlp=2, channel_max=16).style  # trained: differs from the generator's
    reference = ReferenceStyleTransformer(mapping, generator.n_latent).eval()
    for module in reference.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    latent_avg = torch.randn(DIM)
    path = tmp_path / "best_model.pt"
    torch.save(reference.checkpoint(latent_avg, generator), path)

    model = load_style_transformer(path, generator, encoder_depth=DEPTH, encoder_widths=WIDTHS, encoder_size=32)
    assert model.config.head_dim == DIM // 4 and model.config.ffn_dim == 48 and not model.refine
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = reference(images, latent_avg)
        w_plus = model.w_plus_only(images)
    assert w_plus.shape == (2, generator.n_latent, DIM)
    assert torch.allclose(w_plus, expected, atol=1e-5), (w_plus - expected).abs().max()

    first = load_first_stage(path, generator, encoder_depth=DEPTH, encoder_widths=WIDTHS, encoder_size=32)
    assert isinstance(first, FirstStage)
    two = TwoStageInverter(generator, first, num_refined=3, num_tokens=4, encoder_depth=DEPTH,
                           encoder_widths=WIDTHS, encoder_size=32, heads=2, head_dim=8, ffn_dim=32)
    assert torch.allclose(two(images).w_plus, expected, atol=1e-5)

    with pytest.raises(ValueError, match="does not match"):
        load_style_transformer(path, generator, encoder_depth=(1, 2, 1, 1), encoder_widths=WIDTHS)
    torch.save({"state_dict": {"encoder.module.input_layer.0.weight": torch.randn(16, 3, 3, 3)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a Style Transformer"):
        load_style_transformer(tmp_path / "other.pt", generator)
    with pytest.raises(FileNotFoundError, match="style-transformer"):
        load_style_transformer(tmp_path / "absent.pt", generator)


def test_style_transformer_cars_checkpoint_reads_192_by_256_pictures(tmp_path):
    """Style Transformer reads Stanford Cars at 192 x 256 (opts["dataset_type"] "cars_encode"): the
    loaded model does too, computes the same codes on such pictures, and returns the render's
    middle 3/4 rows."""
    torch.manual_seed(2)
    generator = Generator(32, style_dim=DIM, n_mlp=2, channel_max=16)
    reference = ReferenceStyleTransformer(generator.style, generator.n_latent).eval()
    latent_avg = torch.randn(DIM)
    torch.save(reference.checkpoint(latent_avg, generator, "cars_encode"), tmp_path / "cars.pt")
    torch.save(reference.checkpoint(latent_avg, generator), tmp_path / "faces.pt")
    model = load_style_transformer(tmp_path / "cars.pt", generator, encoder_depth=DEPTH, encoder_widths=WIDTHS)
    faces = load_style_transformer(tmp_path / "faces.pt", generator, encoder_depth=DEPTH, encoder_widths=WIDTHS)
    assert model.input_size == (192, 256) and faces.input_size == (256, 256)
    images = torch.rand(1, 3, 192, 256) * 2 - 1
    with torch.no_grad():
        expected = reference(images, latent_avg)
        result = model(images)
    assert torch.allclose(result.w_plus, expected, atol=1e-5), (result.w_plus - expected).abs().max()
    assert result.image.shape == (1, 3, 24, 32)


def test_style_transformer_with_more_queries_than_w_rows(tmp_path):
    """Style Transformer keeps 18 queries at any resolution (its 512 px Cars model uses 16 rows):
    every query attends to every other, so all are kept and the first n_latent rows are w+."""
    from refinestyle.inversion.models import load_inverter, save_inverter

    torch.manual_seed(1)
    generator = Generator(32, style_dim=DIM, n_mlp=2, channel_max=16)
    reference = ReferenceStyleTransformer(generator.style, generator.n_latent + 2).eval()
    latent_avg = torch.randn(DIM)
    path = tmp_path / "cars.pt"
    torch.save(reference.checkpoint(latent_avg, generator), path)
    model = load_style_transformer(path, generator, encoder_depth=DEPTH, encoder_widths=WIDTHS, encoder_size=32)
    assert model.config.latent_queries == generator.n_latent + 2
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = reference(images, latent_avg)[:, : generator.n_latent]
        truncated = ReferenceStyleTransformer(generator.style, generator.n_latent).eval()
        truncated.load_state_dict({**reference.state_dict(), "z": reference.z[:, : generator.n_latent]})
        assert (truncated(images, latent_avg) - expected).abs().max() > 1e-4  # the extra rows matter
        torch.testing.assert_close(model.w_plus_only(images), expected, rtol=1e-5, atol=1e-5)
    # stored inside a two-stage model's file, it comes back with its queries
    two = TwoStageInverter(generator, FirstStage(model), num_refined=3, num_tokens=4, encoder_depth=DEPTH,
                           encoder_widths=WIDTHS, encoder_size=32, heads=2, head_dim=8, ffn_dim=32)
    save_inverter(tmp_path / "two.safetensors", two)
    loaded = load_inverter(tmp_path / "two.safetensors", generator)
    with torch.no_grad():
        torch.testing.assert_close(loaded.w_plus_only(images), expected, rtol=1e-5, atol=1e-5)


def test_style_transformer_start_from_latent_avg_option(tmp_path):
    """A file trained without start_from_latent_avg adds nothing to its codes; one trained with it
    must hold latent_avg."""
    torch.manual_seed(2)
    generator = Generator(32, style_dim=DIM, n_mlp=2, channel_max=16)
    reference = ReferenceStyleTransformer(generator.style, generator.n_latent).eval()
    checkpoint = reference.checkpoint(None, generator)
    del checkpoint["latent_avg"]
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    checkpoint["opts"]["start_from_latent_avg"] = False
    torch.save(checkpoint, tmp_path / "plain.pt")
    model = load_style_transformer(tmp_path / "plain.pt", generator, encoder_depth=DEPTH, encoder_widths=WIDTHS,
                                   encoder_size=32)  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(model.w_plus_only(images), reference(images, 0.0), rtol=1e-5, atol=1e-5)
    checkpoint["opts"]["start_from_latent_avg"] = True
    torch.save(checkpoint, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="holds none"):
        load_style_transformer(tmp_path / "missing.pt", generator, encoder_depth=DEPTH, encoder_widths=WIDTHS)
