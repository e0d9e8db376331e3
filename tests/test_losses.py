"""Reconstruction losses: LPIPS with a local AlexNet backbone, the ArcFace ID loss, the weighted sum."""
import pytest
import torch

from refinestyle.inversion.encoder import IRSEBackbone
from refinestyle.losses import IDLoss, LPIPSLoss, ReconstructionLoss
from refinestyle.weights import MissingWeightsError

TINY_ARCFACE = dict(depth=(1, 1, 1, 1), widths=(16, 16, 32, 32), embedding_dim=32)


def images(batch=2, size=64, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def lpips_random():
    torch.manual_seed(0)
    return LPIPSLoss(pretrained_backbone=False)


@pytest.fixture
def tiny_arcface_file(tmp_path):
    torch.manual_seed(1)
    net = IRSEBackbone(TINY_ARCFACE["depth"], TINY_ARCFACE["widths"], embedding_dim=32)
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "tiny_ir_se.pth"
    torch.save(net.state_dict(), path)
    return path


def test_lpips_distance_properties(lpips_random):
    x, y = images(seed=1), images(seed=2)
    assert torch.allclose(lpips_random.distance(x, x), torch.zeros(2), atol=1e-6)
    d = lpips_random.distance(x, y)
    assert d.shape == (2,) and (d > 0).all()
    x.requires_grad_(True)
    lpips_random(x, y).backward()
    assert x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in lpips_random.parameters())
    lpips_random.train()
    assert not lpips_random.lpips.training  # the metric network stays in eval mode
    with pytest.raises(ValueError, match="at least 32"):
        lpips_random(images(size=16), images(size=16))
    with pytest.raises(ValueError, match="shape"):
        lpips_random(images(size=64), images(size=32))


def test_lpips_backbone_from_local_torchvision_file(tmp_path, lpips_random):
    import torchvision

    torch.manual_seed(7)
    alexnet = torchvision.models.alexnet(weights=None)
    # only the convolutional part matters to LPIPS; the file keeps torchvision's names
    state = {k: v for k, v in alexnet.state_dict().items() if k.startswith("features.")}
    path = tmp_path / "alexnet-owt-test.pth"
    torch.save(state, path)
    loss = LPIPSLoss(path)
    net = loss.lpips.net
    assert torch.equal(getattr(net.slice1, "0").weight, state["features.0.weight"])
    assert torch.equal(getattr(net.slice2, "3").weight, state["features.3.weight"])
    assert torch.equal(getattr(net.slice5, "10").bias, state["features.10.bias"])
    x, y = images(seed=3), images(seed=4)
    assert not torch.allclose(loss(x, y), lpips_random(x, y))  # the file's weights are in use

    torch.save({"classifier.1.weight": torch.randn(3, 3)}, tmp_path / "not_alexnet.pth")
    with pytest.raises(ValueError, match="AlexNet"):
        LPIPSLoss(tmp_path / "not_alexnet.pth")


def test_missing_lpips_backbone_names_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("REFINESTYLE_ALEXNET", raising=False)
    with pytest.raises(MissingWeightsError, match=r"alexnet-owt-7be5be79\.pth.*torchvision"):
        LPIPSLoss(tmp_path / "nowhere.pth")
    with pytest.raises(MissingWeightsError, match="REFINESTYLE_ALEXNET"):
        LPIPSLoss()


def test_id_loss_uses_psp_face_crop(tiny_arcface_file):
    loss = IDLoss(tiny_arcface_file, **TINY_ARCFACE)
    x, y = images(size=256, seed=5), images(size=256, seed=6)
    assert loss(x, x).abs() < 1e-5
    value = loss(x, y)
    assert 0 < value <= 2
    # pixels outside rows 35:223 / columns 32:220 do not matter ...
    outside = x.clone()
    outside[:, :, :35] = -1
    outside[:, :, :, 225:] = 1
    assert loss(outside, x).abs() < 1e-5
    # ... pixels inside do
    inside = x.clone()
    inside[:, :, 100:150, 100:150] = 1
    assert loss(inside, x) > 1e-4
    # other sizes are pooled to 256 first
    small = torch.nn.functional.adaptive_avg_pool2d(x, 128)
    assert torch.allclose(loss.embed(small), loss.embed(torch.nn.functional.interpolate(small, 256, mode="nearest")), atol=1e-5)
    sims = loss.similarity(x, y)
    assert sims.shape == (2,) and torch.allclose(value, (1 - sims).mean(), atol=1e-6)

    before = [b.clone() for b in loss.buffers()]
    loss.train()
    loss(x.requires_grad_(True), y).backward()
    assert x.grad.abs().sum() > 0
    assert all(torch.equal(a, b) for a, b in zip(before, loss.buffers()))  # BatchNorm statistics frozen


def test_missing_arcface_file_names_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("REFINESTYLE_IR_SE50", raising=False)
    with pytest.raises(MissingWeightsError, match=r"model_ir_se50\.pth"):
        IDLoss(tmp_path / "nowhere.pth")
    with pytest.raises(MissingWeightsError, match=r"model_ir_se50\.pth"):
        ReconstructionLoss(pretrained_lpips=False)  # the face domain needs the ID network


def test_reconstruction_loss_weights_and_parts(tiny_arcface_file, lpips_random):
    id_loss = IDLoss(tiny_arcface_file, **TINY_ARCFACE)
    criterion = ReconstructionLoss(lpips_module=lpips_random, id_module=id_loss)
    x, y = images(size=256, seed=8), images(size=256, seed=9)
    x.requires_grad_(True)
    total, parts = criterion(x, y)
    assert set(parts) == {"l2", "lpips", "id", "total"}
    expected = torch.mean((x - y) ** 2) + 0.8 * lpips_random(x, y) + 0.1 * id_loss(x, y)
    assert torch.allclose(total, expected, rtol=1e-5)
    assert torch.allclose(parts["total"], total.detach())
    total.backward()
    assert x.grad.abs().sum() > 0

    other = ReconstructionLoss(l2=2.0, lpips=0.5, id=0.1, face_domain=False, lpips_module=lpips_random)
    total, parts = other(x, y)
    assert "id" not in parts and other.id_loss is None  # non-face domains need no ArcFace weights
    assert torch.allclose(total, 2.0 * parts["l2"] + 0.5 * parts["lpips"], rtol=1e-5)
    with pytest.raises(ValueError, match="lpips"):
        ReconstructionLoss(lpips=-1.0, face_domain=False)
    for bad in (float("nan"), float("inf"), True):  # NaN passed `< 0` and dropped the term silently
        with pytest.raises(ValueError, match="l2: expected a finite non-negative loss weight"):
            ReconstructionLoss(l2=bad, lpips=0, id=0, face_domain=False)
