"""Sliced Wasserstein style loss on deep features (the one-shot style term L_sty).

A feature map [C, H, W] is read as a cloud of H*W points in R^C; its "style" is
that distribution. The sliced Wasserstein distance (Bonneel et al. 2015)
compares two clouds through many random 1-D projections, where optimal
transport is just sorting:

    SWD(X, Y) = mean_k mean_n ( sort(X d_k)_n - sort(Y d_k)_n )^2,   d_k random unit vectors

When the clouds have different sizes, the sorted reference projections are
resampled (linear interpolation of the quantile function) to the other size.
GOGA uses this on features of LPIPS' VGG16 (relu4_3 and relu5_3, images pooled
to 256 px) with 256 random directions drawn afresh at every step. We keep the
method but take the features from the AlexNet trunk of the LPIPS loss that the
reconstruction term (Eq. 6) already loads: no VGG file is needed, and one local
AlexNet file serves both terms. Default taps: AlexNet's relu2 ... relu5 (192 to
384 channels, 31 to 15 px at 256 px input): mid-level texture and colour
statistics (relu2, relu3) plus the deeper ones GOGA's choice corresponds to.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


# AlexNet ReLU outputs (1..5) compared by the style loss.
DEFAULT_STYLE_LAYERS = (2, 3, 4, 5)


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

    # float32 also under autocast, which would round the projections to bf16 before the sort
    with torch.autocast(features.device.type, enabled=False):
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


class LPIPSFeatures(nn.Module):
    """The frozen AlexNet trunk of an LPIPSLoss as a style feature extractor (images in [-1, 1]).

    lpips_loss: a refinestyle.losses.LPIPSLoss (its AlexNet backbone, loaded from the local
        torchvision file, is shared, not copied: the reconstruction loss and the style loss
        need one weights file between them).
    layers: which of AlexNet's ReLU outputs to return, 1 ... 5 (channels 64, 192, 384, 256, 256;
        at 256 px input 63, 31, 15, 15, 15 pixels a side).
    input_size: images are pooled/resized to input_size x input_size first (GOGA: 256);
        None keeps their size (at least 32 px are needed).
    """

    def __init__(self, lpips_loss: nn.Module, layers: Sequence[int] = DEFAULT_STYLE_LAYERS, input_size: int | None = 256):
        super().__init__()
        layers = tuple(int(layer) for layer in layers)
        if not layers or any(layer not in range(1, 6) for layer in layers):
            raise ValueError(f"layers: expected AlexNet ReLU indices in 1..5, got {list(layers)}")
        inner = getattr(lpips_loss, "lpips", lpips_loss)
        if not hasattr(inner, "net") or not hasattr(inner, "scaling_layer"):
            raise TypeError(f"lpips_loss: expected a refinestyle.losses.LPIPSLoss, got {type(lpips_loss).__name__}")
        self.layers = layers
        if input_size is not None and (isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 32):
            raise ValueError(f"input_size: expected None or at least 32 (AlexNet's smallest input), got {input_size!r}")
        self.input_size = input_size
        self.lpips_loss = lpips_loss

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images: float [B, 3, H, W] in [-1, 1] -> list of float [B, C_l, H_l, W_l], one per layer."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected [B, 3, H, W] in [-1, 1], got {tuple(images.shape)}")
        x = images.float()
        if self.input_size is not None and x.shape[-2:] != (self.input_size, self.input_size):
            if x.shape[-1] == x.shape[-2] > self.input_size and x.shape[-1] % self.input_size == 0:
                x = F.adaptive_avg_pool2d(x, self.input_size)
            else:
                x = F.interpolate(x, size=(self.input_size,) * 2, mode="bilinear", align_corners=False)
        inner = getattr(self.lpips_loss, "lpips", self.lpips_loss)
        outputs = inner.net(inner.scaling_layer(x))
        return [outputs[layer - 1] for layer in self.layers]


class SWDStyleLoss(nn.Module):
    """Sliced Wasserstein style loss between images and one reference image, on deep features.

    features: a module mapping images [B, 3, H, W] in [-1, 1] to a list of feature maps
        [B, C_l, H_l, W_l] (e.g. LPIPSFeatures).
    num_projections: random directions per layer, drawn afresh at every call (GOGA: 256).
    normalize: divide each layer's distance by the mean square of the reference's features
        at that layer (the expected squared projection on a random unit direction, up to C_l),
        so that layers of different magnitude weigh alike and the loss is scale-free
        (about 0 for the same style, O(1) for unrelated ones). GOGA uses raw distances; its
        style weight therefore does not carry over.

    set_reference(reference) stores the reference's features (float [1, 3, H, W] in [-1, 1]);
    forward(images, generator=None) -> scalar: the mean over layers and samples of
    sliced_wasserstein; `generator` (a torch.Generator on the features' device) seeds the directions.
    """

    def __init__(self, features: nn.Module, num_projections: int = 256, normalize: bool = True):
        super().__init__()
        if num_projections < 1:
            raise ValueError(f"num_projections: expected a positive integer, got {num_projections}")
        self.features = features
        self.num_projections = num_projections
        self.normalize = normalize
        self.reference_features: list[torch.Tensor] | None = None
        self.layer_scales: list[float] | None = None

    @torch.no_grad()
    def set_reference(self, reference: torch.Tensor) -> None:
        if reference.ndim != 4 or reference.shape[:2] != (1, 3):
            raise ValueError(f"reference: expected one image [1, 3, H, W], got {tuple(reference.shape)}")
        self.reference_features = [f.detach().float() for f in self.features(reference)]
        self.layer_scales = [
            max(f.square().mean().item(), 1e-12) if self.normalize else 1.0 for f in self.reference_features
        ]

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.reference_features is None:
            raise RuntimeError("SWDStyleLoss: call set_reference(reference_image) before computing the loss")
        features = self.features(images)
        losses = [
            sliced_wasserstein(f, r, self.num_projections, generator=generator).mean() / scale
            for f, r, scale in zip(features, self.reference_features, self.layer_scales)
        ]
        return torch.stack(losses).mean()
