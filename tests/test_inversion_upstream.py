"""pSp, e4e and Style Transformer's own encoders, opt-in: their checkpoints load as our first
stages and give the w+ their code gives; and pSp's ID loss (ArcFace IR-SE50, face crop) is ours.

tests/test_inversion_models_psp.py and tests/test_inversion_models_style_transformer.py
check the loaders against reference forwards written here. These tests run the real encoders
from local checkouts (nothing is downloaded), each when its variable is set:

    REFINESTYLE_PSP_REPO=/path/to/pixel2style2pixel
    REFINESTYLE_E4E_REPO=/path/to/encoder4editing
    REFINESTYLE_STYLE_TRANSFORMER_REPO=/path/to/style-transformer

A subprocess imports the checkout's `models.encoders` with `torch.utils.cpp_extension.load`
replaced by a function returning None (their stylegan2 `op` package builds CUDA extensions at
import; the encoders' EqualLinear never calls them), builds the IR-SE50 encoder, perturbs its
weights and BatchNorm statistics, encodes random images and saves a checkpoint as their
training does. Style Transformer's queries come from a generator mapping of ours, which the
checkpoint stores as its decoder's.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from refinestyle.generator import Generator
from refinestyle.inversion import FirstStage, PSPEncoder, load_first_stage

REPOS = {
    "psp": os.environ.get("REFINESTYLE_PSP_REPO"),
    "e4e": os.environ.get("REFINESTYLE_E4E_REPO"),
    "style_transformer": os.environ.get("REFINESTYLE_STYLE_TRANSFORMER_REPO"),
}
VARIABLES = {"psp": "REFINESTYLE_PSP_REPO", "e4e": "REFINESTYLE_E4E_REPO",
             "style_transformer": "REFINESTYLE_STYLE_TRANSFORMER_REPO"}  # fmt: skip

# Runs inside the checkout. argv: kind out_dir dataset_type. Writes encoder.pt and expected.pt.
# A "cars_encode" model reads 192 x 256 pictures, as the three projects read Stanford Cars.
ENCODE = textwrap.dedent(
    """
    import sys, types
    import torch
    import torch.utils.cpp_extension
    torch.utils.cpp_extension.load = lambda *args, **kwargs: None  # CUDA extensions the encoders never call
    kind, out, dataset_type = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.manual_seed(0)
    if kind == "style_transformer":
        from models.encoders.style_transformer_encoders import GradualStyleEncoder
        encoder = GradualStyleEncoder(50, "ir_se", types.SimpleNamespace(input_nc=3))
    else:
        from models.encoders import psp_encoders
        opts = types.SimpleNamespace(input_nc=3, output_size=256, n_styles=14, stylegan_size=256)
        if kind == "psp":
            encoder = psp_encoders.GradualStyleEncoder(50, "ir_se", opts)
        else:
            encoder = psp_encoders.Encoder4Editing(50, "ir_se", opts)
    encoder.eval()
    with torch.no_grad():
        for t in encoder.parameters():
            t.add_(torch.randn_like(t) * 0.02)
        for m in encoder.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    images = torch.rand(2, 3, *((192, 256) if "cars" in dataset_type else (256, 256))) * 2 - 1
    latent_avg = torch.randn(512)
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    with torch.no_grad():
        if kind == "style_transformer":
            mapping = torch.load(f"{out}/mapping.pt", weights_only=False)
            z = encoder.z.expand(2, -1, -1).flatten(0, 1)
            query = mapping(z).reshape(2, -1, 512)
            codes = encoder(images, query)
            state = {f"encoder.module.{k}": v for k, v in encoder.state_dict().items()}
            state.update({f"decoder.module.style.{k}": v for k, v in mapping.state_dict().items()})
        else:
            codes = encoder(images)
    expected = codes + latent_avg.repeat(2, 1, 1)  # their start_from_latent_avg
    encoder_type = {"psp": "GradualStyleEncoder", "e4e": "Encoder4Editing"}.get(kind)
    opts = {"start_from_latent_avg": True, "input_nc": 3, "dataset_type": dataset_type,
            **({"encoder_type": encoder_type} if encoder_type else {})}
    torch.save({"state_dict": state, "latent_avg": latent_avg, "opts": opts}, f"{out}/encoder.pt")
    torch.save({"images": images, "w_plus": expected}, f"{out}/expected.pt")
    """
)


@pytest.mark.parametrize("dataset_type", ["ffhq_encode", "cars_encode"])
@pytest.mark.parametrize("kind", sorted(REPOS))
def test_upstream_encoder_checkpoints_give_their_w_plus(tmp_path, kind, dataset_type):
    if not REPOS[kind]:
        pytest.skip(f"set {VARIABLES[kind]} to a local checkout to run")
    repo = Path(REPOS[kind])
    if not (repo / "models" / "encoders").is_dir():
        pytest.fail(f"{VARIABLES[kind]}: {repo} has no models/encoders")
    torch.manual_seed(3)
    if kind == "style_transformer":  # 18 queries: a 1024 px generator (narrow, to stay quick)
        generator = Generator(1024, 512, 2, channel_multiplier=1, channel_max=64)
        torch.save(generator.style, tmp_path / "mapping.pt")
    else:  # 256 px: 14 w+ rows
        generator = Generator(256, 512, 2, channel_multiplier=1, channel_max=64)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), str(root)])}
    result = subprocess.run([sys.executable, "-c", ENCODE, kind, str(tmp_path), dataset_type], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    if result.returncode != 0:
        pytest.fail(f"{kind}'s code failed in {repo}:\n{result.stderr[-3000:]}")
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    first_stage = load_first_stage(tmp_path / "encoder.pt", generator)
    assert isinstance(first_stage, FirstStage if kind == "style_transformer" else PSPEncoder)
    size = first_stage.inverter.input_size if isinstance(first_stage, FirstStage) else first_stage.input_size
    assert size == ((192, 256) if dataset_type == "cars_encode" else 256 if kind != "style_transformer" else (256, 256))
    with torch.no_grad():
        w_plus = first_stage(expected["images"])
    error = float((w_plus - expected["w_plus"]).abs().max() / expected["w_plus"].abs().max())
    print(f"\n{kind} ({dataset_type}): relative difference {error:.2e}")
    assert error < 1e-5


# Runs inside pSp's checkout. argv: out_dir. Writes ir_se50.pth (a perturbed random ArcFace in
# model_ir_se50.pth's layout) and id_loss.pt (images, pSp's ID loss and embeddings).
PSP_ID_LOSS = textwrap.dedent(
    """
    import sys
    import torch
    from criteria.id_loss import IDLoss
    from models.encoders.model_irse import Backbone
    out = sys.argv[1]
    torch.manual_seed(0)
    facenet = Backbone(input_size=112, num_layers=50, drop_ratio=0.6, mode="ir_se").eval()
    with torch.no_grad():
        for t in facenet.parameters():
            t.add_(torch.randn_like(t) * 0.02)
        for m in facenet.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    torch.save(facenet.state_dict(), f"{out}/ir_se50.pth")
    id_loss = IDLoss.__new__(IDLoss)  # its __init__ reads a configured path; its methods are what we test
    torch.nn.Module.__init__(id_loss)
    id_loss.facenet, id_loss.face_pool = facenet, torch.nn.AdaptiveAvgPool2d((112, 112))
    y_hat, y, x = (torch.rand(2, 3, 256, 256) * 2 - 1 for _ in range(3))
    with torch.no_grad():
        loss, _, _ = id_loss(y_hat, y, x)
        features = id_loss.extract_feats(y_hat)
    torch.save({"y_hat": y_hat, "y": y, "loss": loss, "features": features}, f"{out}/id_loss.pt")
    """
)


def test_psp_id_loss_is_ours(tmp_path):
    """The ID loss and ID metric of Table 1: pSp's IDLoss with its own Backbone vs our IDLoss
    with the same weights file."""
    from refinestyle.losses import IDLoss

    if not REPOS["psp"]:
        pytest.skip("set REFINESTYLE_PSP_REPO to a local checkout to run")
    repo = Path(REPOS["psp"])
    result = subprocess.run([sys.executable, "-c", PSP_ID_LOSS, str(tmp_path)], cwd=repo,
                            env={**os.environ, "PYTHONPATH": str(repo)}, capture_output=True, text=True, timeout=600)  # fmt: skip
    if result.returncode != 0:
        pytest.fail(f"pSp's code failed in {repo}:\n{result.stderr[-3000:]}")
    expected = torch.load(tmp_path / "id_loss.pt", weights_only=True)
    ours = IDLoss(tmp_path / "ir_se50.pth")
    with torch.no_grad():
        loss = ours(expected["y_hat"], expected["y"])
        features = ours.embed(expected["y_hat"])
    print(f"\nID loss: pSp {float(expected['loss']):.8f}, ours {float(loss):.8f}; "
          f"embeddings {float((features - expected['features']).abs().max()):.2e} apart")  # fmt: skip
    assert torch.allclose(features, expected["features"], atol=1e-5)
    assert abs(float(loss) - float(expected["loss"])) < 1e-5
