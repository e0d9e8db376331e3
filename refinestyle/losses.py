"""Reconstruction losses of the inverters: L2, LPIPS (AlexNet) and the ArcFace identity loss.

    total = l2 * MSE(x, y) + lpips * LPIPS(x, y) + id * (1 - cos(ArcFace(x), ArcFace(y)))

with pSp's weights 1.0 / 0.8 / 0.1 by default (the paper's Eq. 6 names the terms, not their weights). Images are float
tensors in [-1, 1], [B, 3, H, W], normally 256 x 256 (the generator's output pooled to
256). The ID term is for faces only: `face_domain=False` (or id=0) switches it off and
then needs no ArcFace weights.

Pretrained parts come from local files, never from the network:
- LPIPS: the `lpips` package ships its linear heads; the AlexNet backbone is torchvision's
  `alexnet-owt-7be5be79.pth` that torchvision would otherwise download. Pass its path (or
  set REFINESTYLE_ALEXNET), or pretrained_backbone=False for a random backbone (tests).
- ID: ArcFace IR-SE50 `model_ir_se50.pth` (path or REFINESTYLE_IR_SE50).
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from refinestyle.inversion.encoder import (
    IR_SE50_WIDTHS,
    IRSEBackbone,
    load_ir_se50_weights,
    read_state_dict,
)
from refinestyle.weights import resolve_weights

__all__ = ["LPIPSLoss", "IDLoss", "ReconstructionLoss", "ALEXNET_WHAT", "ALEXNET_ENV", "ALEXNET_SOURCE"]

ALEXNET_WHAT = "AlexNet backbone for LPIPS (torchvision's alexnet-owt-7be5be79.pth)"
ALEXNET_ENV = "REFINESTYLE_ALEXNET"
ALEXNET_SOURCE = (
    "torchvision's model zoo (torchvision.models.AlexNet_Weights.IMAGENET1K_V1: "
    "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth, or ~/.cache/torch/hub/checkpoints/ "
    "on a machine where torchvision downloaded it)"
)


def _check_image_pair(x: torch.Tensor, y: torch.Tensor, names: tuple[str, str] = ("generated", "target")) -> None:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{names[0]}: expected [B, 3, H, W], got {tuple(x.shape)}")
    if y.shape != x.shape:
        raise ValueError(f"{names[1]}: expected the shape of {names[0]} {tuple(x.shape)}, got {tuple(y.shape)}")


class _FrozenModule(nn.Module):
    """A pretrained metric network: always in eval mode, no parameter trains."""

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.children():
            module.eval()
        return self

    def _freeze(self) -> None:
        for param in self.parameters():
            param.requires_grad_(False)
        self.eval()


class LPIPSLoss(_FrozenModule):
    """LPIPS distance (the `lpips` package, version 0.1, AlexNet) with a backbone from a local file.

    backbone_path: torchvision's AlexNet state_dict (alexnet-owt-7be5be79.pth, .pth or
        .safetensors); None falls back to the REFINESTYLE_ALEXNET environment variable.
    pretrained_backbone: False keeps a randomly initialised AlexNet (for tests; the
        distance is then not perceptual) and needs no file.

    forward(x, y): x, y [B, 3, H, W] float in [-1, 1], H, W >= 32; returns the mean LPIPS
    over the batch (a scalar that backpropagates into x). distance(x, y) returns [B].
    The metric network never trains and stays in eval mode.
    """

    def __init__(self, backbone_path: str | os.PathLike | None = None, pretrained_backbone: bool = True):
        super().__init__()
        try:
            import lpips
        except ImportError as error:  # an optional dependency ("pip install .[train]")
            raise ImportError("LPIPSLoss needs the lpips package: pip install lpips") from error
        with warnings.catch_warnings():
            # torchvision warns about the deprecated `pretrained` argument lpips passes.
            warnings.simplefilter("ignore")
            # pnet_rand=True: build AlexNet without downloading; the linear heads come from the package.
            self.lpips = lpips.LPIPS(net="alex", version="0.1", pnet_rand=True, verbose=False)
        if pretrained_backbone:
            path = resolve_weights(backbone_path, what=ALEXNET_WHAT, env_var=ALEXNET_ENV, obtained_from=ALEXNET_SOURCE)
            self._load_alexnet(path)
        self._freeze()

    def _load_alexnet(self, path) -> None:
        state = read_state_dict(path)
        # lpips keeps torchvision's `features.{i}` modules under slice1..slice5 with the same indices.
        net_state = self.lpips.net.state_dict()
        targets = {}
        for key in net_state:  # "slice2.3.weight" <- "features.3.weight"
            _, index, kind = key.split(".")
            targets[f"features.{index}.{kind}"] = key
        missing = [key for key in targets if key not in state]
        if missing:
            raise ValueError(
                f"{path}: not a torchvision AlexNet state_dict (missing {', '.join(missing[:4])}); "
                f"expected {ALEXNET_WHAT}"
            )
        with torch.no_grad():
            for source, target in targets.items():
                if state[source].shape != net_state[target].shape:
                    raise ValueError(
                        f"{path}: {source} has shape {tuple(state[source].shape)}, "
                        f"expected {tuple(net_state[target].shape)}"
                    )
                net_state[target].copy_(state[source])

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image LPIPS distance [B] of x and y ([B, 3, H, W] in [-1, 1])."""
        _check_image_pair(x, y, ("x", "y"))
        if min(x.shape[-2:]) < 32:
            raise ValueError(f"x: LPIPS (AlexNet) needs images of at least 32 x 32 pixels, got {tuple(x.shape[-2:])}")
        return self.lpips(x, y).flatten()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.distance(x, y).mean()


class IDLoss(_FrozenModule):
    """Identity loss 1 - cos(ArcFace(x), ArcFace(y)) with pSp's face crop.

    ir_se50_path: ArcFace IR-SE50 weights (model_ir_se50.pth); None falls back to the
        REFINESTYLE_IR_SE50 environment variable. A missing file raises MissingWeightsError.
    depth, widths, embedding_dim: the network's layout (IR-SE50 defaults; smaller ones
        for tests, with a matching file).

    Images [B, 3, H, W] in [-1, 1] are resized to 256 x 256 (area pooling) when needed,
    cropped to rows 35:223 and columns 32:220 (pSp's crop of an FFHQ-aligned face) and
    pooled to 112 x 112, the ArcFace input. forward(generated, target) returns the mean of
    1 - cos over the batch (target features are detached); similarity(x, y) returns the
    cosines [B]. The network stays frozen and in eval mode.
    """

    CROP_ROWS = (35, 223)
    CROP_COLS = (32, 220)

    def __init__(
        self,
        ir_se50_path: str | os.PathLike | None = None,
        *,
        depth: int | Sequence[int] = 50,
        widths: Sequence[int] = IR_SE50_WIDTHS,
        embedding_dim: int = 512,
    ):
        super().__init__()
        self.facenet = IRSEBackbone(depth, widths, input_size=112, embedding_dim=embedding_dim, drop_ratio=0.6)
        load_ir_se50_weights(self.facenet, ir_se50_path)
        self._freeze()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised ArcFace embeddings [B, embedding_dim] of face images [B, 3, H, W] in [-1, 1]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected [B, 3, H, W], got {tuple(images.shape)}")
        if images.shape[-2:] != (256, 256):
            images = F.adaptive_avg_pool2d(images, (256, 256))
        (top, bottom), (left, right) = self.CROP_ROWS, self.CROP_COLS
        faces = F.adaptive_avg_pool2d(images[:, :, top:bottom, left:right], (112, 112))
        return self.facenet(faces)

    def similarity(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cosine similarity [B] of the identities of x and y ([B, 3, H, W] in [-1, 1])."""
        _check_image_pair(x, y, ("x", "y"))
        return (self.embed(x) * self.embed(y)).sum(dim=1)

    def forward(self, generated: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_image_pair(generated, target)
        with torch.no_grad():
            target_features = self.embed(target)
        return (1 - (self.embed(generated) * target_features).sum(dim=1)).mean()


class ReconstructionLoss(nn.Module):
    """Weighted L2 + LPIPS + ID loss of the inverters.

    l2, lpips, id: the weights (pSp's: 1.0, 0.8, 0.1; the paper gives none); a weight of 0 drops
        the term (its network is not built).
    face_domain: False switches the ID term off (cars, churches, ...).
    lpips_backbone_path, pretrained_lpips: passed to LPIPSLoss.
    ir_se50_path: passed to IDLoss (needed only when the ID term is on).
    lpips_module, id_module: ready-made LPIPSLoss / IDLoss instances (or any callables
        (x, y) -> scalar) to use instead of building them, e.g. to share one between losses.

    forward(generated, target), both [B, 3, H, W] float in [-1, 1] (256 px in the paper
    setting), returns (total, parts): total a scalar tensor with gradient, parts a dict of
    detached scalars {"l2", "lpips", "id" (those switched on), "total"} for logging.
    """

    def __init__(
        self,
        l2: float = 1.0,
        lpips: float = 0.8,
        id: float = 0.1,  # noqa: A002 - the loss's name in the paper and in pSp
        *,
        face_domain: bool = True,
        lpips_backbone_path: str | os.PathLike | None = None,
        pretrained_lpips: bool = True,
        ir_se50_path: str | os.PathLike | None = None,
        lpips_module: nn.Module | None = None,
        id_module: nn.Module | None = None,
    ):
        super().__init__()
        for name, weight in (("l2", l2), ("lpips", lpips), ("id", id)):
            # NaN passes `< 0` and would drop the term silently; a bool is no weight
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (0 <= weight < math.inf):
                raise ValueError(f"{name}: expected a finite non-negative loss weight, got {weight!r}")
        self.weights = {"l2": float(l2), "lpips": float(lpips), "id": float(id) if face_domain else 0.0}
        self.lpips_loss = None
        if self.weights["lpips"] > 0:
            self.lpips_loss = lpips_module or LPIPSLoss(lpips_backbone_path, pretrained_backbone=pretrained_lpips)
        self.id_loss = None
        if self.weights["id"] > 0:
            self.id_loss = id_module or IDLoss(ir_se50_path)

    def forward(self, generated: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        _check_image_pair(generated, target)
        terms = {}
        if self.weights["l2"] > 0:
            terms["l2"] = F.mse_loss(generated, target)
        if self.lpips_loss is not None:
            terms["lpips"] = self.lpips_loss(generated, target)
        if self.id_loss is not None:
            terms["id"] = self.id_loss(generated, target)
        total = sum(self.weights[name] * value for name, value in terms.items())
        if not terms:
            total = generated.new_zeros(())
        parts = {name: value.detach() for name, value in terms.items()}
        parts["total"] = total.detach()
        return total, parts
