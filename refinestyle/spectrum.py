"""Singular-value spectra of StyleGAN2's dynamic kernels (the paper's Fig. 3).

For random z, each modulated conv layer n has the dynamic kernel of Eq. (1),

    W_n = scale * W0_n * s_n        [Cout, Cin, k, k],  s_n = modulation_n(w),

seen as a Cout x (Cin*k*k) matrix. Its singular values, sorted and divided by the
largest, fall off fast: a few hold most of the energy (sum of squares), which is why
a rank-L residual P^T Q is enough to refine it.

The singular values come from the Cout x Cout Gram matrix without building any
kernel: G_b = W_b W_b^T = scale^2 * sum_i s_{b,i}^2 M_i with M_i = W0[:, i] W0[:, i]^T
(summed over taps) precomputed once per layer, so a sample costs one [Cin] x
[Cin, Cout^2] product and one symmetric eigensolve. With demodulate=True the rows
are normalised as the generator does (G -> D G D, D = diag(G + eps)^-1/2).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["KernelSpectrum", "LayerSpectrum", "kernel_gram", "kernel_spectrum", "singular_values"]


def _layer_gram_basis(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """M [Cin, Cout*Cout] with M[i] = sum_taps W0[:, i] W0[:, i]^T, from weight [Cout, Cin, k, k]."""
    out_channels, in_channels = weight.shape[:2]
    per_input = weight.to(dtype).permute(1, 0, 2, 3).reshape(in_channels, out_channels, -1)  # [Cin, Cout, taps]
    return (per_input @ per_input.transpose(1, 2)).reshape(in_channels, out_channels * out_channels)


def kernel_gram(
    weight: Tensor,
    styles: Tensor,
    scale: float,
    demodulate: bool = False,
    eps: float = 1e-8,
    basis: Optional[Tensor] = None,
) -> Tensor:
    """Gram matrices W_b W_b^T [B, Cout, Cout] of the modulated kernels, without building them.

    weight: [Cout, Cin, k, k] static kernel W0 (the raw parameter, rosinality's weight[0]).
    styles: [B, Cin] modulation s_b.
    scale: the equalized-lr multiplier of W0 (1/sqrt(Cin*k*k) in StyleGAN2).
    demodulate: normalise every kernel row to unit norm first (with eps, as the generator does).
    basis: optional precomputed `_layer_gram_basis(weight, dtype)`; its dtype is the compute dtype.
    """
    if weight.ndim != 4:
        raise ValueError(f"weight: expected [Cout, Cin, k, k], got {tuple(weight.shape)}")
    if styles.ndim != 2 or styles.shape[1] != weight.shape[1]:
        raise ValueError(f"styles: expected [B, Cin={weight.shape[1]}], got {tuple(styles.shape)}")
    if basis is None:
        basis = _layer_gram_basis(weight, torch.promote_types(weight.dtype, torch.float64))
    out_channels = weight.shape[0]
    gram = (scale**2) * (styles.to(basis.dtype).square() @ basis).reshape(-1, out_channels, out_channels)
    if demodulate:
        d = torch.rsqrt(torch.diagonal(gram, dim1=1, dim2=2) + eps)
        gram = gram * d[:, :, None] * d[:, None, :]
    return gram


def singular_values(gram: Tensor) -> Tensor:
    """Singular values, descending, from Gram matrices [B, n, n] -> [B, n] (sqrt of the eigenvalues)."""
    if gram.device.type == "cpu":
        # LAPACK through numpy: torch's CPU float64 eigvalsh was ~30x slower on 512 x 512 in our measurements
        eigenvalues = torch.from_numpy(np.linalg.eigvalsh(gram.detach().numpy()))  # ascending
    else:
        eigenvalues = torch.linalg.eigvalsh(gram)
    return eigenvalues.clamp_min(0).flip(-1).sqrt()


def _energy_counts(sigma: Tensor, level: float) -> Tensor:
    """Per sample, the number of leading singular values holding `level` of the energy sum(sigma^2)."""
    energy = sigma.square()
    fraction = energy.cumsum(-1) / energy.sum(-1, keepdim=True).clamp_min(torch.finfo(energy.dtype).tiny)
    return (fraction < level - 1e-12).sum(-1) + 1


@dataclass
class LayerSpectrum:
    """The spectrum statistics of one modulated conv layer over the sampled kernels.

    index: conv layer number (0 = conv1); resolution: output resolution in px;
    in_channels, out_channels, kernel_size, upsample: the layer's shape;
    rank: min(Cout, Cin*k*k), the number of singular values;
    mean, p10, p90: the mean and the 10th/90th percentiles over samples of the sorted
        normalised singular values sigma_i / sigma_1 (each a list of `rank` floats);
    counts: {level: statistics} of the number of leading singular values that hold
        `level` of the energy, with "mean", "std", "min", "max" over samples.
    """

    index: int
    resolution: int
    in_channels: int
    out_channels: int
    kernel_size: int
    upsample: bool
    rank: int
    mean: list[float]
    p10: list[float]
    p90: list[float]
    counts: dict[str, dict[str, float]] = field(default_factory=dict)

    def count(self, level: float) -> float:
        """The mean number of singular values holding `level` (e.g. 0.9) of the energy."""
        return self.counts[_level_key(level)]["mean"]


def _level_key(level: float) -> str:
    return f"{level:g}"


@dataclass
class KernelSpectrum:
    """Spectra of every modulated conv layer: `layers` (LayerSpectrum each) and how they were sampled."""

    layers: list[LayerSpectrum]
    num_samples: int
    truncation: float
    demodulate: bool
    seed: int
    levels: tuple[float, ...] = (0.9, 0.99)

    def to_dict(self) -> dict:
        return {
            "num_samples": self.num_samples,
            "truncation": self.truncation,
            "demodulate": self.demodulate,
            "seed": self.seed,
            "energy_levels": list(self.levels),
            "layers": [vars(layer) for layer in self.layers],
        }

    def save_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    def table(self) -> str:
        """A plain-text table: per layer its shape, rank and the counts for each energy level."""
        level_names = [f"k{level * 100:g}%" for level in self.levels]
        header = ["layer", "res", "Cin", "Cout", "up", "rank", *level_names, "s2/s1", "s10/s1"]
        rows = []
        for layer in self.layers:
            rows.append(
                [
                    str(layer.index),
                    str(layer.resolution),
                    str(layer.in_channels),
                    str(layer.out_channels),
                    "yes" if layer.upsample else "no",
                    str(layer.rank),
                    *[f"{layer.count(level):.1f}" for level in self.levels],
                    f"{layer.mean[1]:.3f}" if layer.rank > 1 else "-",
                    f"{layer.mean[9]:.3f}" if layer.rank > 9 else "-",
                ]
            )
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
        lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
        note = (
            f"{self.num_samples} samples, truncation {self.truncation:g}, "
            f"{'demodulated' if self.demodulate else 'modulated (Eq. 1)'} kernels; k = mean number of singular "
            "values holding that share of the energy"
        )
        return "\n".join(lines + [note])

    def plot(self, path: str | os.PathLike) -> Path:
        """Write the figure: normalised singular values per layer (left), energy counts per layer (right)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
        colours = plt.cm.viridis(np.linspace(0, 0.95, len(self.layers)))
        for layer, colour in zip(self.layers, colours):
            x = np.arange(1, layer.rank + 1)
            left.plot(x, layer.mean, color=colour, lw=1.4, label=f"{layer.index} ({layer.resolution}px)")
            left.fill_between(x, np.maximum(layer.p10, 1e-12), np.maximum(layer.p90, 1e-12), color=colour, alpha=0.12)
        left.set_xscale("log")
        left.set_yscale("log")
        left.set_xlabel("singular value index (sorted)")
        left.set_ylabel("sigma_i / sigma_1 (mean, 10-90% band)")
        left.set_title("Sorted normalised singular values of the dynamic kernels")
        left.grid(True, which="both", alpha=0.3)
        left.legend(fontsize=7, ncol=2, title="conv layer", title_fontsize=8)

        positions = np.arange(len(self.layers))
        width = 0.8 / len(self.levels)
        for offset, level in enumerate(self.levels):
            right.bar(
                positions + (offset - (len(self.levels) - 1) / 2) * width,
                [layer.count(level) for layer in self.layers],
                width,
                label=f"{level * 100:g}% of the energy",
            )
        right.plot(positions, [layer.rank for layer in self.layers], "k_", markersize=12, label="rank (all values)")
        right.set_ylim(bottom=0)
        right.set_xticks(positions, [str(layer.index) for layer in self.layers])
        right.set_xlabel("conv layer")
        right.set_ylabel("number of singular values")
        right.set_title("Singular values holding the energy")
        right.grid(True, axis="y", alpha=0.3)
        right.legend(fontsize=8)
        figure.suptitle(
            f"Kernel spectra over {self.num_samples} random z (truncation {self.truncation:g}"
            f"{', demodulated' if self.demodulate else ''})"
        )
        figure.tight_layout()
        figure.savefig(path, dpi=130)
        plt.close(figure)
        return path


@torch.no_grad()
def kernel_spectrum(
    generator,
    num_samples: int = 1000,
    *,
    batch_size: int = 100,
    truncation: float = 1.0,
    truncation_latent: Optional[Tensor] = None,
    demodulate: bool = False,
    seed: int = 0,
    levels: Sequence[float] = (0.9, 0.99),
    dtype: torch.dtype = torch.float64,
    progress: bool = True,
) -> KernelSpectrum:
    """Sample z, form every conv layer's modulated kernel, and summarise its singular values.

    Args:
        generator: a refinestyle.Generator (any device).
        num_samples: number of random z (each gives one kernel per layer).
        batch_size: samples per eigensolve batch.
        truncation: psi applied to w (1 = none); below 1 it needs truncation_latent or the
            generator's latent_avg.
        truncation_latent: [1, style_dim] or [style_dim] mean w for truncation.
        demodulate: analyse the demodulated kernels instead of Eq. (1)'s modulated ones.
        seed: seed of the z draw (drawn on the CPU, so results do not depend on the device).
        levels: energy shares to count singular values for.
        dtype: compute dtype of the Gram matrices and eigensolves (float64 by default).
        progress: show a tqdm progress bar.

    Returns:
        A KernelSpectrum with one LayerSpectrum per conv layer (toRGB layers excluded).
    """
    from tqdm.auto import tqdm

    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples: expected a positive integer, got {num_samples!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    levels = tuple(float(level) for level in levels)
    if not levels or any(not 0 < level <= 1 for level in levels):
        raise ValueError(f"levels: expected energy shares in (0, 1], got {levels}")
    device = generator.input.input.device
    z = torch.randn(num_samples, generator.style_dim, generator=torch.Generator().manual_seed(seed))
    mapping_dtype = generator.input.input.dtype  # z in the mapping's own dtype (float64, bf16 generators too)
    w = torch.cat([generator.style(chunk.to(device, mapping_dtype)) for chunk in z.split(batch_size)]).float()
    if truncation != 1:
        if truncation_latent is None:
            truncation_latent = generator.latent_avg
        if truncation_latent is None:
            raise ValueError("truncation_latent: required for truncation != 1 (the generator has no latent_avg)")
        w = truncation_latent.reshape(1, -1).to(w) + truncation * (w - truncation_latent.reshape(1, -1).to(w))

    conv_layers = generator.conv_layers()
    batches = math.ceil(num_samples / batch_size)
    bar = tqdm(total=len(conv_layers) * batches, desc="kernel spectra", unit="batch", disable=not progress)
    layers = []
    for index, styled_conv in enumerate(conv_layers):
        conv = styled_conv.conv
        weight = conv.weight[0]
        basis = _layer_gram_basis(weight, dtype)
        sigmas = []
        for chunk in w.split(batch_size):
            styles = conv.modulation(chunk.to(conv.modulation.weight.dtype))
            gram = kernel_gram(weight, styles, conv.scale, demodulate=demodulate, eps=conv.eps, basis=basis)
            sigmas.append(singular_values(gram).cpu())
            bar.update(1)
        sigma = torch.cat(sigmas)  # [N, Cout]
        rank = min(conv.out_channel, conv.in_channel * conv.kernel_size**2)
        sigma = sigma[:, :rank]
        normalised = sigma / sigma[:, :1].clamp_min(torch.finfo(sigma.dtype).tiny)
        counts = {}
        for level in levels:
            per_sample = _energy_counts(sigma, level).double()
            counts[_level_key(level)] = {
                "mean": per_sample.mean().item(),
                "std": per_sample.std(unbiased=False).item(),
                "min": per_sample.min().item(),
                "max": per_sample.max().item(),
            }
        layers.append(
            LayerSpectrum(
                index=index,
                resolution=2 ** ((index + 5) // 2),
                in_channels=conv.in_channel,
                out_channels=conv.out_channel,
                kernel_size=conv.kernel_size,
                upsample=bool(conv.upsample),
                rank=rank,
                mean=normalised.mean(0).tolist(),
                p10=torch.quantile(normalised, 0.1, dim=0).tolist(),
                p90=torch.quantile(normalised, 0.9, dim=0).tolist(),
                counts=counts,
            )
        )
    bar.close()
    return KernelSpectrum(layers, num_samples, float(truncation), demodulate, seed, levels)
