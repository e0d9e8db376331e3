"""FID against pytorch-fid's own code: the same features from the same (random) weights, the same
distances; and the checks of the public functions."""
from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch

from refinestyle.fid import FeatureSet, FIDInception, frechet_distance
from refinestyle.weights import MissingWeightsError

pytestmark = pytest.mark.usefixtures("one_thread")


def random_state(network: FIDInception, seed: int = 0) -> dict:
    """Weights that keep activations O(1) and dependent on the image through 94 layers (He-scaled
    convs, BatchNorm near identity); torchvision's own init is skipped."""
    rng = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in network.net.state_dict().items():
        if name.endswith("running_var"):
            state[name] = torch.rand(value.shape, generator=rng) + 0.5
        elif name.endswith("bn.weight"):
            state[name] = 1 + 0.1 * torch.randn(value.shape, generator=rng)
        elif value.is_floating_point() and value.ndim > 1:
            fan_in = value[0].numel()
            state[name] = torch.randn(value.shape, generator=rng) * (2 / fan_in) ** 0.5
        elif value.is_floating_point():
            state[name] = 0.1 * torch.randn(value.shape, generator=rng)
        else:
            state[name] = value
    return state


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    network = FIDInception(random_weights=True)
    path = tmp_path_factory.mktemp("fid") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(random_state(network), path)
    return path


def test_features_equal_pytorch_fid(weights_file):
    pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")
    state = torch.load(weights_file, weights_only=True)
    with mock.patch.object(pytorch_fid_inception, "load_state_dict_from_url", lambda *args, **kwargs: state):
        theirs = pytorch_fid_inception.InceptionV3([3]).eval()  # their 2015-graph patches, our random weights
    ours = FIDInception(weights_file, quantize=False)
    noise = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ramp = torch.linspace(-1, 1, 64).expand(1, 3, 48, 64) * torch.tensor([1.0, -0.5, 0.2])[:, None, None]
    images = torch.cat([noise, ramp])
    with torch.no_grad():
        expected = theirs((images + 1) / 2)[0].flatten(1)  # pytorch-fid takes images in [0, 1]
    features = ours(images)
    assert features.shape == (2, 2048) and features.dtype == torch.float32
    # the random weights carry the image to the end: other images, other features
    assert (features[0] - features[1]).abs().mean() > 0.1 * features.abs().mean()
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)
    # 8-bit rounding (what a PNG round trip does) is the default
    quantized = ((images + 1) * 127.5).round() / 255
    with torch.no_grad():
        torch.testing.assert_close(FIDInception(weights_file)(images), theirs(quantized)[0].flatten(1),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # scipy, inside pytorch-fid
@pytest.mark.parametrize("count1, count2, dim", [(300, 260, 16), (10, 12, 32)])  # full rank; singular
def test_frechet_distance_equals_pytorch_fid(count1, count2, dim):
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    rng = torch.Generator().manual_seed(dim)
    first, second = FeatureSet(), FeatureSet()
    features1 = torch.randn(count1, dim, generator=rng)
    features2 = torch.randn(count2, dim, generator=rng) * 1.3 + 0.2
    first.add(features1[: count1 // 2])
    first.add(features1[count1 // 2 :])  # batch by batch
    second.add(features2)
    mean1, cov1 = first.statistics()
    mean2, cov2 = second.statistics()
    np.testing.assert_allclose(cov1.numpy(), np.cov(features1.double().numpy(), rowvar=False), rtol=1e-12)
    expected = fid_score.calculate_frechet_distance(mean1.numpy(), cov1.numpy(), mean2.numpy(), cov2.numpy())
    assert first.frechet_distance(second) == pytest.approx(expected, rel=1e-6)  # from the features
    assert frechet_distance(mean1, cov1, mean2, cov2) == pytest.approx(expected, rel=1e-6)  # from the statistics
    first.add(features1[:1])  # the statistics follow what was added
    assert first.frechet_distance(second) != pytest.approx(expected, rel=1e-9)


def test_frechet_distance_closed_forms():
    mean = torch.tensor([1.0, -2.0, 0.5])
    cov = torch.diag(torch.tensor([1.0, 4.0, 9.0]))
    assert frechet_distance(mean, cov, mean, cov) == pytest.approx(0.0, abs=1e-9)
    # diagonal covariances: sum (mu1 - mu2)^2 + sum (sqrt(a) - sqrt(b))^2
    other = torch.diag(torch.tensor([4.0, 1.0, 9.0]))
    assert frechet_distance(mean, cov, mean + 1, other) == pytest.approx(3 + 1 + 1 + 0, rel=1e-9)


def test_bad_inputs_and_missing_weights_are_named(tmp_path, monkeypatch, weights_file):
    monkeypatch.delenv("REFINESTYLE_FID_INCEPTION", raising=False)
    with pytest.raises(MissingWeightsError, match="pt_inception-2015-12-05"):
        FIDInception()
    with pytest.raises(MissingWeightsError, match="file not found"):
        FIDInception(tmp_path / "missing.pth")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not the FID Inception network's weights"):
        FIDInception(tmp_path / "other.pth")
    monkeypatch.setenv("REFINESTYLE_FID_INCEPTION", str(weights_file))
    network = FIDInception()
    with pytest.raises(ValueError, match=r"images: expected \[B, 3, H, W\]"):
        network(torch.zeros(1, 1, 8, 8))
    network.train()
    assert not network.training and not any(p.requires_grad for p in network.parameters())
    features = FeatureSet()
    features.add(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="at least 2 images"):
        features.statistics()
    with pytest.raises(ValueError, match="expected D = 4"):
        features.add(torch.zeros(1, 5))
    with pytest.raises(ValueError, match=r"expected \[B, D\]"):
        features.add(torch.zeros(4))
    with pytest.raises(ValueError, match="of one D"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(2), torch.eye(2))
