"""Fréchet Inception Distance, as pytorch-fid computes it, from a local weights file.

FID compares two image sets by the Gaussian statistics (mean, covariance) of their 2048-d
Inception pool features. The numbers people report (pytorch-fid, and the papers that
compare edited images with real ones, like the paper's car editing in Table 1) come from
TensorFlow's 2015 Inception graph ported to PyTorch: pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth`. That network is torchvision's Inception-v3 with
1008 classes and three kinds of changed pooling: the average pools of the A, C and first E
blocks do not count the padding, and the last E block max-pools. `FIDInception` builds
exactly that from torchvision's blocks and loads the file; nothing is downloaded.
`tests/test_fid.py` checks features and distances against pytorch-fid's own code.

    inception = FIDInception("pt_inception-2015-12-05-6726825d.pth").to(device)
    real = FeatureSet(); real.add(inception(real_images))
    fake = FeatureSet(); fake.add(inception(fake_images))
    fid = real.frechet_distance(fake)
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from refinestyle.imageio import as_saved
from refinestyle.weights import resolve_weights, state_dict_mismatch

INCEPTION_WHAT = "FID Inception weights (pt_inception-2015-12-05-6726825d.pth)"
INCEPTION_ENV = "REFINESTYLE_FID_INCEPTION"
INCEPTION_SOURCE = "pytorch-fid's releases (github.com/mseitzer/pytorch-fid, fid_weights)"
FEATURE_DIM = 2048
INPUT_SIZE = 299


def _inception_blocks():
    # torchvision is needed only here (it comes with the `train` extra)
    from torchvision.models import inception

    class PoolNoPadA(inception.InceptionA):
        def _forward(self, x):
            pooled = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
            return [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(pooled),
            ]

    class PoolNoPadC(inception.InceptionC):
        def _forward(self, x):
            seven = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            double = self.branch7x7dbl_1(x)
            for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
                double = layer(double)
            pooled = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
            return [self.branch1x1(x), seven, double, self.branch_pool(pooled)]

    class PoolChoiceE(inception.InceptionE):
        def __init__(self, in_channels: int, max_pool: bool):
            super().__init__(in_channels)
            self.max_pool = max_pool

        def _forward(self, x):
            three = self.branch3x3_1(x)
            three = torch.cat([self.branch3x3_2a(three), self.branch3x3_2b(three)], 1)
            double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            double = torch.cat([self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double)], 1)
            if self.max_pool:  # the 2015 graph's last block max-pools here
                pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
            else:
                pooled = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
            return [self.branch1x1(x), three, double, self.branch_pool(pooled)]

    return inception.Inception3, PoolNoPadA, PoolNoPadC, PoolChoiceE


class FIDInception(nn.Module):
    """The Inception network of FID (TensorFlow's 2015 graph), frozen; images -> pool features.

    Args:
        weights_path: pytorch-fid's pt_inception-2015-12-05-6726825d.pth; None falls back to
            the REFINESTYLE_FID_INCEPTION environment variable. A missing file raises
            MissingWeightsError; a file of another network raises ValueError.
        random_weights: build the network without loading weights (tests only).

    forward(images): images [B, 3, H, W] float in [-1, 1] (the generator's range) ->
    [B, 2048] float32 features. As pytorch-fid does for image files, the images are first
    rounded to 8 bits (`quantize=False` skips that), then resized bilinearly to 299 x 299.
    """

    def __init__(self, weights_path: str | os.PathLike | None = None, *, random_weights: bool = False,
                 quantize: bool = True):
        super().__init__()
        inception3, block_a, block_c, block_e = _inception_blocks()
        net = inception3(num_classes=1008, aux_logits=False, init_weights=False, transform_input=False)
        net.Mixed_5b = block_a(192, pool_features=32)
        net.Mixed_5c = block_a(256, pool_features=64)
        net.Mixed_5d = block_a(288, pool_features=64)
        net.Mixed_6b = block_c(768, channels_7x7=128)
        net.Mixed_6c = block_c(768, channels_7x7=160)
        net.Mixed_6d = block_c(768, channels_7x7=160)
        net.Mixed_6e = block_c(768, channels_7x7=192)
        net.Mixed_7b = block_e(1280, max_pool=False)
        net.Mixed_7c = block_e(2048, max_pool=True)
        if not random_weights:
            path = resolve_weights(weights_path, what=INCEPTION_WHAT, env_var=INCEPTION_ENV,
                                   obtained_from=INCEPTION_SOURCE)
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise ValueError(f"{path}: expected a state_dict of the FID Inception network")
            problem = state_dict_mismatch(net.state_dict(), state)
            if problem:
                raise ValueError(f"{path}: not the FID Inception network's weights ({problem})")
            net.load_state_dict(state)
        self.net = net
        self.quantize = quantize
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # BatchNorm statistics are the file's, always

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected [B, 3, H, W] in [-1, 1], got {tuple(images.shape)}")
        x = images.float()
        if self.quantize:  # what saving to PNG and reading back (pytorch-fid's input) does
            x = as_saved(x)
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        net = self.net
        for layer in (net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, net.maxpool1,
                      net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, net.maxpool2,
                      net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b, net.Mixed_6c,
                      net.Mixed_6d, net.Mixed_6e, net.Mixed_7a, net.Mixed_7b, net.Mixed_7c):
            x = layer(x)
        return x.mean((2, 3))


class FeatureSet:
    """Features of one image set, gathered batch by batch; their mean and covariance for FID.

    add(features): features [B, D] (any float dtype, any device; kept on the CPU as float64).
    """

    def __init__(self):
        self._parts: list[torch.Tensor] = []
        self._cache: dict[str, torch.Tensor] = {}

    def add(self, features: torch.Tensor) -> None:
        if features.ndim != 2:
            raise ValueError(f"features: expected [B, D], got {tuple(features.shape)}")
        if self._parts and features.shape[1] != self._parts[0].shape[1]:
            raise ValueError(f"features: expected D = {self._parts[0].shape[1]}, got {features.shape[1]}")
        self._parts.append(features.detach().to("cpu", torch.float64))
        self._cache.clear()

    def __len__(self) -> int:
        return sum(part.shape[0] for part in self._parts)

    def _centred(self) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self) < 2:
            raise ValueError(f"FID needs at least 2 images per set, got {len(self)}")
        if "mean" not in self._cache:
            features = torch.cat(self._parts)
            self._parts = [features]
            self._cache["mean"] = features.mean(0)
            self._cache["centred"] = features - self._cache["mean"]
        return self._cache["mean"], self._cache["centred"]

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean [D], covariance [D, D]) in float64; the covariance unbiased (n - 1), as numpy's."""
        mean, centred = self._centred()
        if "cov" not in self._cache:
            self._cache["cov"] = centred.T @ centred / (centred.shape[0] - 1)
        return mean, self._cache["cov"]

    def _covariance_root(self) -> torch.Tensor:
        if "root" not in self._cache:
            self._cache["root"] = _psd_sqrt(self.statistics()[1])
        return self._cache["root"]

    def frechet_distance(self, other: "FeatureSet") -> float:
        """FID between this set and `other` (the real set first: its covariance root is kept for the next)."""
        mean1, centred1 = self._centred()
        mean2, centred2 = other._centred()
        if mean1.shape != mean2.shape:
            raise ValueError(f"other: features of {mean2.shape[0]} dimensions, this set has {mean1.shape[0]}")
        count1, count2 = centred1.shape[0], centred2.shape[0]
        if min(count1, count2) < mean1.shape[0]:
            # Fewer images than dimensions: with cov = A^T A / (n - 1) for the centred features A,
            # cov1 cov2 has the nonzero eigenvalues of (A1 A2^T)(A2 A1^T) / ((n1 - 1)(n2 - 1)), so the
            # trace of its square root is the nuclear norm of A1 A2^T / sqrt((n1 - 1)(n2 - 1)):
            # exact, and an n1 x n2 problem instead of two D x D ones.
            cross = centred1 @ centred2.T / ((count1 - 1) * (count2 - 1)) ** 0.5
            trace_root = torch.linalg.svdvals(cross).sum()
            trace1 = centred1.pow(2).sum() / (count1 - 1)
            trace2 = centred2.pow(2).sum() / (count2 - 1)
        else:
            cov2 = other.statistics()[1]
            trace_root = _trace_sqrt_product(self._covariance_root(), cov2)
            trace1, trace2 = self.statistics()[1].trace(), cov2.trace()
        difference = mean1 - mean2
        return float(difference @ difference + trace1 + trace2 - 2 * trace_root)


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T


def _trace_sqrt_product(root1: torch.Tensor, cov2: torch.Tensor) -> torch.Tensor:
    # tr((cov1 cov2)^(1/2)) = sum of sqrt(eigenvalues of cov1^(1/2) cov2 cov1^(1/2)), a symmetric matrix
    middle = root1 @ cov2 @ root1
    return torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()


def frechet_distance(mean1: torch.Tensor, cov1: torch.Tensor, mean2: torch.Tensor, cov2: torch.Tensor) -> float:
    """||mean1 - mean2||^2 + tr(cov1) + tr(cov2) - 2 tr((cov1 cov2)^(1/2)), in float64.

    mean1, mean2: [D]; cov1, cov2: [D, D] symmetric positive semi-definite. The trace of the
    product's square root is the sum of the square roots of the eigenvalues of
    cov1^(1/2) cov2 cov1^(1/2), which is symmetric: no complex intermediate and no epsilon
    needed when the covariances are singular (fewer images than dimensions).
    """
    for name, value, ndim in (("mean1", mean1, 1), ("cov1", cov1, 2), ("mean2", mean2, 1), ("cov2", cov2, 2)):
        if value.ndim != ndim:
            raise ValueError(f"{name}: expected {ndim} dimension(s), got shape {tuple(value.shape)}")
    dim = mean1.shape[0]
    if mean2.shape != (dim,) or cov1.shape != (dim, dim) or cov2.shape != (dim, dim):
        raise ValueError(f"expected means [D] and covariances [D, D] of one D, got {tuple(mean1.shape)}, "
                         f"{tuple(cov1.shape)}, {tuple(mean2.shape)}, {tuple(cov2.shape)}")
    mean1, cov1, mean2, cov2 = (t.double() for t in (mean1, cov1, mean2, cov2))
    trace_root = _trace_sqrt_product(_psd_sqrt(cov1), cov2)
    difference = mean1 - mean2
    return float(difference @ difference + cov1.trace() + cov2.trace() - 2 * trace_root)
