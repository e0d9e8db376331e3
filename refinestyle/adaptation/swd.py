"""Sliced Wasserstein style loss on deep features (the one-shot style term L_sty).

A feature map [C, H, W] is read as a cloud of H*W points in R^C; its "style" is
that distribution. The sliced Wasserstein distance (Bonneel et al. 2015)
compares two clouds through many random 1-D projections, where optimal
transport is just sorting:

    SWD(X, Y) = mean_k mean_n ( sort(X d_k)_n - sort(Y d_k)_n )^2,   d_k random unit vectors

When the clouds have different sizes, the sorted reference projections are
resampled (linear interpolation of the quantile function) to the other size.
GOGA uses this on features of LPIPS' VGG16 (relu4_3 and relu5_3, images pooled
to 256 px) with 256 random directions drawn afresh at every step; we do the
same with torchvision's VGG16 trunk, loaded from a local ImageNet weights file
(LPIPS' VGG backbone is that same network), so one file serves both.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from refinestyle.weights import resolve_weights

# torchvision vgg16().features index of each ReLU that LPIPS taps.
VGG16_RELU_INDEX = {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 22, "relu5_3": 29}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VGG16_ENV_VAR = "REFINESTYLE_VGG16"
VGG16_OBTAINED_FROM = (
    "torchvision's ImageNet VGG16 weights (vgg16-397923af.pth from download.pytorch.org/models)"
)


def sliced_wasserstein(
    features: torch.Tensor,
    reference: torch.Tensor,
    num_projections: int = 256,
    *,
    directions: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample squared sliced Wasserstein distance between feature clouds and a reference cloud.

    features: float [B, C, H, W] (or [B, N, C] point clouds): one cloud per sample.
    reference: float [1, C, H', W'] (or [1, M, C]): the reference cloud, shared by all samples;
        [B, ...] gives each sample its own reference.
    num_projections: number of random unit directions K (ignored when `directions` is given).
    directions: optional float [C, K] unit columns to project on (random when None).
    generator: torch.Generator for the random directions (on the features' device).
    Returns float [B]: the mean over directions and points of squared sorted differences.
    """
    features = _as_points(features, "features")
    reference = _as_points(reference, "reference")
    batch, _, channels = features.shape
    if reference.shape[2] != channels:
        raise ValueError(
            f"reference: expected {channels} channels like features, got {reference.shape[2]}"
        )
    if reference.shape[0] not in (1, batch):
        raise ValueError(f"reference: expected batch 1 or {batch}, got {reference.shape[0]}")
    if directions is None:
        if num_projections < 1:
            raise ValueError(f"num_projections: expected a positive integer, got {num_projections}")
        directions = torch.randn(
            channels, num_projections, device=features.device, dtype=torch.float32, generator=generator
        )
        directions = directions / directions.norm(dim=0, keepdim=True)
    elif directions.ndim != 2 or directions.shape[0] != channels:
        raise ValueError(f"directions: expected [{channels}, K], got {tuple(directions.shape)}")
    directions = directions.to(features.device, torch.float32)

    projected = torch.sort(features.float() @ directions, dim=1).values  # [B, N, K]
    target = torch.sort(reference.float() @ directions, dim=1).values  # [1 or B, M, K]
    if target.shape[1] != projected.shape[1]:
        # resample the reference quantile function at the features' number of points
        target = F.interpolate(
            target.transpose(1, 2), size=projected.shape[1], mode="linear", align_corners=True
        ).transpose(1, 2)
    return (projected - target).square().mean(dim=(1, 2))


def _as_points(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """[B, C, H, W] feature maps -> [B, H*W, C] point clouds; [B, N, C] passes through."""
    if tensor.ndim == 4:
        return tensor.flatten(2).transpose(1, 2)
    if tensor.ndim == 3:
        return tensor
    raise ValueError(f"{name}: expected [B, C, H, W] feature maps or [B, N, C] points, got {tuple(tensor.shape)}")


class VGG16Features(nn.Module):
    """Frozen VGG16 trunk returning the activations LPIPS uses, from images in [-1, 1].

    weights: path of torchvision's ImageNet VGG16 state dict (vgg16-397923af.pth); None falls back
        to $REFINESTYLE_VGG16. Pass random=True instead for an untrained network (tests only).
    layers: names from VGG16_RELU_INDEX whose activations forward() returns, in order.
    input_size: images are average-pooled/resized to input_size x input_size first (GOGA: 256);
        None keeps their size.
    """

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        layers: Sequence[str] = ("relu4_3", "relu5_3"),
        input_size: int | None = 256,
        *,
        random: bool = False,
    ):
        super().__init__()
        from torchvision.models import vgg16

        unknown = [name for name in layers if name not in VGG16_RELU_INDEX]
        if unknown or not layers:
            raise ValueError(f"layers: expected names from {list(VGG16_RELU_INDEX)}, got {list(layers)}")
        self.layers = tuple(layers)
        self.input_size = input_size
        last = max(VGG16_RELU_INDEX[name] for name in self.layers)
        self.trunk = vgg16(weights=None).features[: last + 1]
        if not random:
            path = resolve_weights(
                weights, what="VGG16 ImageNet weights", env_var=VGG16_ENV_VAR, obtained_from=VGG16_OBTAINED_FROM
            )
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state)
            trunk_state = {
                key[len("features."):]: value for key, value in state.items() if key.startswith("features.")
            }
            trunk_state = {key: value for key, value in trunk_state.items() if int(key.split(".")[0]) <= last}
            self.trunk.load_state_dict(trunk_state, strict=True)
        self.trunk.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):  # frozen feature extractor: always eval
        return super().train(False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images: float [B, 3, H, W] in [-1, 1] -> list of float [B, C_l, H_l, W_l], one per layer."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected [B, 3, H, W] in [-1, 1], got {tuple(images.shape)}")
        x = images.float()
        if self.input_size is not None and x.shape[-1] != self.input_size:
            if x.shape[-1] > self.input_size and x.shape[-1] % self.input_size == 0:
                x = F.adaptive_avg_pool2d(x, self.input_size)
            else:
                x = F.interpolate(x, size=(self.input_size,) * 2, mode="bilinear", align_corners=False)
        x = ((x + 1) / 2 - self.mean) / self.std
        wanted = {VGG16_RELU_INDEX[name]: name for name in self.layers}
        outputs = {}
        for index, module in enumerate(self.trunk):
            x = module(x)
            if index in wanted:
                outputs[wanted[index]] = x
        return [outputs[name] for name in self.layers]


class SWDStyleLoss(nn.Module):
    """Sliced Wasserstein style loss between images and one reference image, on deep features.

    features: a module mapping images [B, 3, H, W] in [-1, 1] to a list of feature maps
        [B, C_l, H_l, W_l] (e.g. VGG16Features).
    num_projections: random directions per layer, drawn afresh at every call (GOGA: 256).

    set_reference(reference) stores the reference's features (float [1, 3, H, W] in [-1, 1]);
    forward(images) -> scalar: the mean over layers and samples of sliced_wasserstein.
    """

    def __init__(self, features: nn.Module, num_projections: int = 256):
        super().__init__()
        if num_projections < 1:
            raise ValueError(f"num_projections: expected a positive integer, got {num_projections}")
        self.features = features
        self.num_projections = num_projections
        self.reference_features: list[torch.Tensor] | None = None

    @torch.no_grad()
    def set_reference(self, reference: torch.Tensor) -> None:
        if reference.ndim != 4 or reference.shape[:2] != (1, 3):
            raise ValueError(f"reference: expected one image [1, 3, H, W], got {tuple(reference.shape)}")
        self.reference_features = [f.detach() for f in self.features(reference)]

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.reference_features is None:
            raise RuntimeError("SWDStyleLoss: call set_reference(reference_image) before computing the loss")
        features = self.features(images)
        losses = [
            sliced_wasserstein(f, r, self.num_projections, generator=generator).mean()
            for f, r in zip(features, self.reference_features)
        ]
        return torch.stack(losses).mean()
