"""Optimisation-based projection of an image into a frozen generator's W / W+ space.

Used by one-shot adaptation to find the reference's code w_r when no trained inverter
is given. The method is the usual StyleGAN2 projector (Karras et al. 2020, as in
rosinality's projector.py), written for this package:

- start from the mean w of many random z (and its spread, sigma_w);
- optimise w (one row, broadcast to all n_latent rows) or w+ (every row) and, optionally,
  the per-layer noise maps with Adam; the learning rate ramps up over the first 5% of
  the steps and down with a cosine over the last 25%;
- during the first 75% of the steps, Gaussian noise of size sigma_w * 0.05 * (1 - t/0.75)^2
  is added to the code, to explore before settling;
- loss = LPIPS(G(w), image) + mse_weight * MSE + noise_weight * noise regularisation, the
  regulariser penalising spatial autocorrelation of every noise map at every scale down
  to 8 px (so that the noise does not absorb the image); noise maps are renormalised
  to zero mean, unit variance after every step.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionResult(NamedTuple):
    """w_plus: float [1, n_latent, style_dim]; noise: list of [1, 1, r, r] (one per conv layer);
    image: float [1, 3, size, size] the generator's rendering of both; loss: the final loss value."""

    w_plus: torch.Tensor
    noise: list
    image: torch.Tensor
    loss: float


def noise_regularisation(noises: list[torch.Tensor]) -> torch.Tensor:
    """Sum over noise maps and scales (down to 8 px) of the squared 1-pixel autocorrelations."""
    total = noises[0].new_zeros(())
    for noise in noises:
        while True:
            total = total + (noise * torch.roll(noise, 1, dims=3)).mean().square()
            total = total + (noise * torch.roll(noise, 1, dims=2)).mean().square()
            if noise.shape[-1] <= 8:
                break
            noise = F.avg_pool2d(noise, 2)
    return total


def _learning_rate(t: float, base: float, rampdown: float = 0.25, rampup: float = 0.05) -> float:
    ramp = min(1.0, (1 - t) / rampdown)
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    return base * ramp * min(1.0, t / rampup)


def project(
    generator: nn.Module,
    image: torch.Tensor,
    lpips_loss: nn.Module,
    *,
    steps: int = 1000,
    w_plus: bool = True,
    lr: float = 0.1,
    mse_weight: float = 0.0,
    noise_weight: float = 1e5,
    optimize_noise: bool = True,
    exploration_noise: float = 0.05,
    exploration_ramp: float = 0.75,
    num_mean_samples: int = 10000,
    loss_size: int = 256,
    seed: int = 0,
    progress: bool = True,
) -> ProjectionResult:
    """Find the code (and noise) with which the frozen `generator` best reproduces `image`.

    generator: a refinestyle.Generator (left unchanged; its parameters get no gradient).
    image: float [1, 3, H, W] in [-1, 1]; resized (area/bilinear) to the generator's size.
    lpips_loss: a callable (x, y) -> scalar, e.g. refinestyle.losses.LPIPSLoss.
    steps: Adam steps (rosinality: 1000).
    w_plus: optimise every row of w+ (True) or one w shared by all rows (False).
    lr: peak learning rate (0.1).
    mse_weight: weight of the pixel MSE next to LPIPS (0: LPIPS only, as rosinality's default).
    noise_weight: weight of the noise regularisation (1e5).
    optimize_noise: also optimise the noise maps (else the generator's stored noise is used).
    exploration_noise, exploration_ramp: size and duration (fraction of steps) of the noise
        added to the code early on.
    num_mean_samples: random z used for the mean w and its spread.
    loss_size: images are compared at min(loss_size, generator.size) px (LPIPS is defined at 256).
    seed: seed of every random draw (z samples, exploration noise, initial noise maps).
    progress: show a tqdm progress bar.
    """
    from tqdm.auto import tqdm

    if image.ndim != 4 or image.shape[:2] != (1, 3):
        raise ValueError(f"image: expected one image [1, 3, H, W] in [-1, 1], got {tuple(image.shape)}")
    if steps < 1:
        raise ValueError(f"steps: expected a positive integer, got {steps}")
    device = next(generator.parameters()).device
    rng = torch.Generator().manual_seed(seed)
    generator.requires_grad_(False)

    size = generator.size
    target = image.to(device, torch.float32)
    if target.shape[-1] != size or target.shape[-2] != size:
        target = F.interpolate(target, size=(size, size), mode="area" if target.shape[-1] > size else "bilinear")
    compare = min(loss_size, size)

    def for_loss(x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, compare) if x.shape[-1] != compare else x

    target_small = for_loss(target)

    with torch.no_grad():
        z = torch.randn(num_mean_samples, generator.style_dim, generator=rng).to(device)
        w_samples = torch.cat([generator.style(chunk) for chunk in z.split(2048)])
        w_mean = w_samples.mean(0)
        w_std = ((w_samples - w_mean).square().sum() / num_mean_samples).sqrt().item()

    rows = generator.n_latent if w_plus else 1
    latent = w_mean.detach().clone()[None, None].repeat(1, rows, 1).requires_grad_(True)
    if optimize_noise:
        noises = [
            torch.randn(1, 1, 2 ** ((i + 5) // 2), 2 ** ((i + 5) // 2), generator=rng).to(device).requires_grad_(True)
            for i in range(generator.num_layers)
        ]
    else:
        noises = [getattr(generator.noises, f"noise_{i}").detach() for i in range(generator.num_layers)]
    parameters = [latent] + (noises if optimize_noise else [])
    optimizer = torch.optim.Adam(parameters, lr=lr)

    def render(code: torch.Tensor) -> torch.Tensor:
        return generator.synthesis(code.expand(1, generator.n_latent, -1), noise=noises)

    loss_value = float("nan")
    bar = tqdm(range(steps), desc="projecting", unit="step", disable=not progress)
    for step in bar:
        t = step / steps
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(t, lr)
        strength = w_std * exploration_noise * max(0.0, 1 - t / exploration_ramp) ** 2
        jitter = torch.randn(latent.shape, generator=rng).to(device) * strength
        generated = render(latent + jitter)
        loss = lpips_loss(for_loss(generated), target_small)
        if mse_weight > 0:
            loss = loss + mse_weight * F.mse_loss(generated, target)
        if optimize_noise and noise_weight > 0:
            loss = loss + noise_weight * noise_regularisation(noises)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if optimize_noise:
            with torch.no_grad():
                for noise in noises:
                    noise.sub_(noise.mean()).div_(noise.std() + 1e-8)
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.4f}")

    with torch.no_grad():
        code = latent.detach().expand(1, generator.n_latent, -1).clone()
        final_noise = [noise.detach().clone() for noise in noises]
        final_image = generator.synthesis(code, noise=final_noise)
    return ProjectionResult(code, final_noise, final_image, loss_value)
