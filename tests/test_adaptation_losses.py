"""The CLIP directional loss (wiring, math, local weights) and the sliced Wasserstein style loss."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from refinestyle.adaptation import Adapter
from refinestyle.adaptation.clip_loss import (
    TEXT_TEMPLATES,
    CLIPDirectionalLoss,
    directional_loss,
    load_clip,
    random_clip,
)
from refinestyle.adaptation.swd import LPIPSFeatures, SWDStyleLoss, sliced_wasserstein
from refinestyle.generator import Generator
from refinestyle.weights import MissingWeightsError

# the smallest open_clip model that exercises both towers: one transformer block each
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny_clip_config(tmp_path):
    path = tmp_path / "rs-test-tiny-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return path


def test_clip_directional_loss_reaches_the_tokens_and_nothing_of_the_generator(tiny_clip_config):
    torch.manual_seed(0)
    generator = Generator(32, style_dim=16, n_mlp=2, channel_max=8).eval().requires_grad_(False)
    adapter = Adapter.for_generator(generator, num_tokens=4, scale_init=0.2)  # a visible residual
    encoders = [random_clip(str(tiny_clip_config), seed=1), random_clip(str(tiny_clip_config), seed=2)]
    loss_fn = CLIPDirectionalLoss(encoders, "photo", "pencil sketch", weights=[1.0, 3.0])

    w = torch.randn(2, generator.n_latent, 16)
    noise = [n.repeat(2, 1, 1, 1) for n in generator.make_noise()]
    with torch.no_grad():
        source = generator.synthesis(w, noise=noise)
    adapted = generator.synthesis(w, refinement=adapter.refinement(), noise=noise)
    loss = loss_fn(source, adapted)
    assert loss.ndim == 0 and 0 <= loss.item() <= 2
    loss.backward()

    for layer in adapter.tokens.layers:
        for parameter in (layer.P, layer.Q, layer.A, layer.B):
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all()
    assert sum(layer.A.grad.abs().sum() for layer in adapter.tokens.layers) > 0
    assert all(p.grad is None for p in generator.parameters())
    assert all(p.grad is None for e in encoders for p in e.parameters())

    # the loss is the weighted mean of 1 - cos(dI, dT) over the encoders, computed by hand here;
    # dT as StyleGAN-NADA's: the mean over templates of the normalised per-template differences
    def per_template(encoder, text):
        tokens = encoder.tokenizer([template.format(text) for template in TEXT_TEMPLATES])
        return F.normalize(encoder.model.encode_text(tokens).float(), dim=-1)

    expected = 0
    for encoder, weight in zip(encoders, (0.25, 0.75)):
        with torch.no_grad():
            d_image = F.normalize(encoder.encode_images(adapted) - encoder.encode_images(source), dim=-1)
            differences = per_template(encoder, "pencil sketch") - per_template(encoder, "photo")
            d_text = F.normalize(differences.mean(0), dim=0)
            text = encoder.encode_text(["photo", "pencil sketch"])  # each mean normalised: not NADA's
            renormalised = F.normalize(text[1] - text[0], dim=0)
        assert not torch.allclose(d_text, renormalised, atol=1e-4)  # the two conventions differ here
        torch.testing.assert_close(loss_fn.text_direction(encoders.index(encoder)), d_text, rtol=0, atol=1e-6)
        expected += weight * (1 - d_image @ d_text).mean()
    assert torch.allclose(loss.detach(), expected, atol=1e-4), (loss.item(), expected.item())


def test_directional_loss_math_and_text_templates(tiny_clip_config):
    direction = F.normalize(torch.randn(8), dim=0)
    source = F.normalize(torch.randn(3, 8), dim=-1)
    along = directional_loss(source, source + 0.1 * direction, direction)
    against = directional_loss(source, source - 0.1 * direction, direction)
    assert torch.allclose(along, torch.zeros(3), atol=1e-6) and torch.allclose(against, torch.full((3,), 2.0), atol=1e-6)
    with pytest.raises(ValueError, match="text_direction"):
        directional_loss(source, source, torch.randn(5))

    encoder = random_clip(str(tiny_clip_config), seed=0)
    one = encoder.encode_text(["sketch"], templates=["a {}"])
    averaged = encoder.encode_text(["sketch"], templates=["a {}", "a drawing of a {}"])
    manual = F.normalize(
        F.normalize(encoder.model.encode_text(encoder.tokenizer(["a sketch", "a drawing of a sketch"])), dim=-1).mean(0),
        dim=0,
    )
    assert torch.allclose(averaged[0], manual, atol=1e-6)
    assert not torch.allclose(one, averaged, atol=1e-3)
    with pytest.warns(UserWarning, match="fills CLIP's 77 tokens and is cut"):  # the target word was lost silently
        encoder.encode_text([" ".join(["very"] * 80) + " sketch"], templates=["a {}"])
    with pytest.raises(TypeError):
        encoder.encode_text("sketch")
    with pytest.raises(ValueError, match="same"):
        CLIPDirectionalLoss([encoder], "photo", "photo")

    # preprocessing: any square size to CLIP's input, differentiable, CLIP-normalised
    images = (torch.rand(2, 3, 48, 48) * 2 - 1).requires_grad_(True)
    prepared = encoder.preprocess(images)
    assert prepared.shape == (2, 3, 32, 32)
    prepared.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    white = encoder.preprocess(torch.ones(1, 3, 32, 32))
    assert torch.allclose(white[0, :, 0, 0], (1 - encoder.mean.flatten()) / encoder.std.flatten(), atol=1e-5)


def test_clip_loads_only_local_files(tiny_clip_config, tmp_path, monkeypatch):
    monkeypatch.delenv("REFINESTYLE_CLIP_VIT_B32", raising=False)
    with pytest.raises(MissingWeightsError, match="REFINESTYLE_CLIP_VIT_B32"):
        load_clip("ViT-B/32")
    with pytest.raises(MissingWeightsError, match="absent.pt"):
        load_clip("ViT-B-16", tmp_path / "absent.pt")

    # an open_clip state dict written to a local file loads back into the same model
    reference = random_clip(str(tiny_clip_config), seed=4)
    weights = tmp_path / "tiny.pt"
    torch.save(reference.model.state_dict(), weights)
    loaded = load_clip(str(tiny_clip_config), weights, quick_gelu=False)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(loaded.encode_images(images), reference.encode_images(images), atol=1e-6)
    assert torch.allclose(loaded.encode_text(["cat"]), reference.encode_text(["cat"]), atol=1e-6)

    # OpenAI's original files are TorchScript archives: they go to open_clip's OpenAI loader, with the local path
    import warnings

    import open_clip

    archive = tmp_path / "ViT-B-32.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated, but it is the format OpenAI shipped
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(archive))
    calls = []

    def fake_openai_loader(name, precision=None, device=None, cache_dir=None):
        calls.append((name, precision))
        return reference.model

    monkeypatch.setattr(open_clip, "load_openai_model", fake_openai_loader)
    load_clip("ViT-B-32", archive)
    assert calls == [(str(archive.resolve()), "fp32")]
    # a relative path named like an OpenAI model ("ViT-B-32") would be a download tag to open_clip
    bare = tmp_path / "ViT-B-32"
    archive.rename(bare)
    monkeypatch.chdir(tmp_path)
    load_clip("ViT-B-32", "ViT-B-32")
    assert calls[-1] == (str(bare.resolve()), "fp32")


def test_clip_bad_files_and_names_are_value_errors(tiny_clip_config, tmp_path):
    weights = tmp_path / "tiny.pt"
    torch.save(random_clip(str(tiny_clip_config), seed=4).model.state_dict(), weights)
    # weights of another architecture
    other = dict(TINY_CLIP, embed_dim=24)
    other_config = tmp_path / "rs-test-other-clip.json"
    other_config.write_text(json.dumps(other))
    with pytest.raises(ValueError, match="do not fit the CLIP architecture rs-test-other-clip") as raised:
        load_clip(str(other_config), weights, quick_gelu=False)
    assert "size mismatch for" in str(raised.value) and "\n" not in str(raised.value)
    # every tensor missing: a few names and the count, not hundreds
    torch.save({"unrelated": torch.zeros(1)}, weights)
    with pytest.raises(ValueError, match=r"Missing key\(s\) in state_dict: .*\(\d+ in all\)") as raised:
        load_clip(str(tiny_clip_config), weights, quick_gelu=False)
    assert len(str(raised.value)) < 500
    # not a weights file at all
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt: not a readable CLIP weights file"):
        load_clip(str(tiny_clip_config), garbage, quick_gelu=False)
    # an architecture open_clip does not know
    with pytest.raises(ValueError, match="name: 'ViT-Q-99' is not an open_clip architecture"):
        load_clip("ViT-Q-99", weights)


def test_sliced_wasserstein_distance():
    torch.manual_seed(0)
    cloud = torch.randn(1, 5, 6, 7)
    shuffled = cloud.flatten(2)[:, :, torch.randperm(42)].reshape(1, 5, 6, 7)
    assert sliced_wasserstein(cloud, shuffled).item() == pytest.approx(0, abs=1e-10)  # a distribution, not an image
    shifted = sliced_wasserstein(cloud + 1.0, cloud, num_projections=4096).item()
    # a shift by t along every axis: E[(t . d)^2] = |t|^2 / C = 1 for a random unit direction d
    assert shifted == pytest.approx(1.0, rel=0.1)

    # one channel: exactly the squared 1-D Wasserstein-2 distance (sorting), also between different sizes
    a, b = torch.randn(1, 1, 100), torch.randn(1, 1, 100) * 2 + 1
    exact = (a.flatten().sort().values - b.flatten().sort().values).square().mean()
    ones = torch.ones(1, 1)
    assert torch.allclose(sliced_wasserstein(a[..., None], b[..., None], directions=ones), exact[None], atol=1e-6)
    b_big = b.repeat_interleave(3, dim=2)  # the same distribution with 300 points
    resampled = sliced_wasserstein(a[..., None], b_big[..., None], directions=ones)
    assert resampled.item() == pytest.approx(exact.item(), rel=0.05)

    per_sample = sliced_wasserstein(torch.cat([cloud, cloud + 3]), cloud, 64)
    assert per_sample.shape == (2,) and per_sample[0] < 1e-10 < per_sample[1]
    with pytest.raises(ValueError, match="channels"):
        sliced_wasserstein(cloud, torch.randn(1, 4, 6, 7))

    # under bf16 autocast (adapt-oneshot --bf16) the projections and the sort stay float32
    near = cloud + 1e-3 * torch.randn_like(cloud)
    directions = torch.nn.functional.normalize(torch.randn(5, 64), dim=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = sliced_wasserstein(near, cloud, directions=directions)
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, sliced_wasserstein(near, cloud, directions=directions), rtol=1e-6, atol=0)


def test_swd_style_loss_on_lpips_features():
    from refinestyle.losses import LPIPSLoss

    torch.manual_seed(0)
    lpips = LPIPSLoss(pretrained_backbone=False)
    style = SWDStyleLoss(LPIPSFeatures(lpips, layers=(2, 3), input_size=64), num_projections=32)
    reference = torch.rand(1, 3, 32, 32) * 2 - 1
    with pytest.raises(RuntimeError, match="set_reference"):
        style(reference)
    style.set_reference(reference)
    assert style(reference).item() == pytest.approx(0, abs=1e-8)  # same features, same sorted projections
    images = (torch.rand(2, 3, 32, 32) * 0.2).requires_grad_(True)
    loss = style(images)
    assert loss.item() > 1e-3
    loss.backward()
    assert images.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips.parameters())
    with pytest.raises(ValueError, match="AlexNet ReLU"):
        LPIPSFeatures(lpips, layers=(0, 6))
    # every image is brought to input_size x input_size, also one whose width alone already fits
    features = LPIPSFeatures(lpips, layers=(2,), input_size=64)
    assert features(torch.rand(1, 3, 48, 64))[0].shape == features(torch.rand(1, 3, 64, 64))[0].shape


def test_evaluate_adapter_id_and_text_consistency(tiny_clip_config, monkeypatch):
    """eval-adapter's numbers: ID is the mean identity cosine of (source, adapted) pairs, TC the mean
    CLIP cosine of the adapted images with the target text; both recomputed here from the images."""
    from refinestyle.adaptation.metrics import evaluate_adapter

    torch.manual_seed(0)
    generator = Generator(32, style_dim=16, n_mlp=2, channel_max=8).eval().requires_grad_(False)
    adapter = Adapter.for_generator(generator, num_tokens=4, scale_init=0.2, target_text="pencil sketch")
    encoder = random_clip(str(tiny_clip_config), seed=1)

    class CosineID:  # a stand-in for IDLoss: cosine of the flattened pixels
        def similarity(self, x, y):
            return F.cosine_similarity(x.flatten(1), y.flatten(1), dim=1)

    seen = []
    result = evaluate_adapter(generator, adapter, num_images=5, batch_size=2, id_model=CosineID(),
                              clip_encoders=[encoder], progress=False,
                              on_batch=lambda index, source, adapted: seen.append((source, adapted)))
    assert [s.shape[0] for s, _ in seen] == [2, 2, 1] and result["num_images"] == 5
    source, adapted = torch.cat([s for s, _ in seen]), torch.cat([a for _, a in seen])
    assert (source - adapted).abs().max() > 1e-3  # the residual is visible
    cosines = F.cosine_similarity(source.flatten(1), adapted.flatten(1), dim=1)
    assert result["id_similarity"] == pytest.approx(cosines.mean().item(), abs=1e-6)
    assert result["id_similarity_std"] == pytest.approx(cosines.std().item(), abs=1e-6)
    with torch.no_grad():
        tc = (encoder.encode_images(adapted) @ encoder.encode_text(["pencil sketch"])[0]).mean().item()
    assert result["text_consistency"] == pytest.approx(tc, abs=1e-5)
    assert result["target_text"] == "pencil sketch" and result["params"] == adapter.num_trainable()
    # two CLIP models of one architecture name: each keeps its own value, the mean covers both
    twin = random_clip(str(tiny_clip_config), seed=2)
    both = evaluate_adapter(generator, adapter, num_images=5, batch_size=2, clip_encoders=[encoder, twin],
                            progress=False)
    per_model = both["text_consistency_per_model"]
    assert len(per_model) == 2 and list(per_model.values())[0] == pytest.approx(tc, abs=1e-5)
    assert both["text_consistency"] == pytest.approx(sum(per_model.values()) / 2)
    # not the codes training drew: step t's first code comes from (seed, t)
    import refinestyle.adaptation.train as training

    drawn = []
    original = training.sample_codes
    monkeypatch.setattr(training, "sample_codes", lambda *args, **kwargs: drawn.append(original(*args, **kwargs)) or drawn[-1])
    evaluate_adapter(generator, adapter, num_images=3, progress=False)
    monkeypatch.undo()
    for step, code in enumerate(drawn):
        trained_on = original(generator, 1, training._step_generator(0, step), 1.0, None)
        assert (code - trained_on).abs().max() > 1e-2
    # the same images in batches of 3: the same codes and noise, so the same numbers
    regrouped = []
    again = evaluate_adapter(generator, adapter, num_images=5, batch_size=3, id_model=CosineID(), progress=False,
                             on_batch=lambda index, source, adapted: regrouped.append(adapted))
    torch.testing.assert_close(torch.cat(regrouped), adapted, rtol=1e-5, atol=1e-5)
    assert again["id_similarity"] == pytest.approx(result["id_similarity"], abs=1e-6)

    # an adapter whose scales are zero changes nothing: ID 1
    with torch.no_grad():
        for layer in adapter.tokens.layers:
            layer.A.zero_()
    same = evaluate_adapter(generator, adapter, num_images=2, id_model=CosineID(), progress=False)
    assert same["id_similarity"] == pytest.approx(1.0, abs=1e-6) and "text_consistency" not in same
