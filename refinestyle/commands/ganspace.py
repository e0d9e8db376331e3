"""Compute GANSpace editing directions: the principal components of the mapping network's w.

    refinestyle ganspace --generator G.pt --out ganspace.safetensors [--num-samples 100000]

Draws --num-samples z ~ N(0, I), maps them to w and keeps the leading principal
components (orthonormal, by decreasing variance) with their standard deviations and the
mean w. `refinestyle edit --ganspace FILE --component K --layers A-B` applies them.
Also writes FILE's name with .png: random images moved along the first components
(a row per component, strengths -2..2 standard deviations).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from refinestyle.commands import device_name, int_at_least, output_file, positive_int, seed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generator", required=True, help="the StyleGAN2 generator checkpoint")
    parser.add_argument("--out", type=output_file, required=True, help="directions file to write (.safetensors)")
    parser.add_argument("--num-samples", type=positive_int, default=100_000, help="z samples (100000)")
    parser.add_argument("--num-components", type=positive_int, default=80, help="components kept (80)")
    parser.add_argument("--batch-size", type=positive_int, default=4096)
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--preview-components", type=int_at_least(0), default=5, help="components in the preview picture (0: none)")
    parser.add_argument("--preview-layers", default=None, help="w+ rows edited in the preview (default all)")
    parser.add_argument("--device", type=device_name, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    import torch

    from refinestyle.checkpoints import load_generator
    from refinestyle.imageio import save_grid
    from refinestyle.inversion import editing
    from refinestyle.weights import default_device

    device = torch.device(args.device or default_device())
    generator = load_generator(args.generator, device)
    generator.requires_grad_(False).eval()
    # checked before the PCA runs and its file is written
    layers = editing.parse_layers(args.preview_layers, generator.n_latent) if args.preview_components else None
    with torch.no_grad():
        directions = editing.compute_ganspace(
            generator.get_latent, generator.style_dim, num_samples=args.num_samples,
            num_components=min(args.num_components, generator.style_dim), batch_size=args.batch_size,
            seed=args.seed, device=device, progress=not args.no_progress,
        )
    out = Path(args.out)
    directions.save(out)
    print(f"{directions.components.shape[0]} components from {directions.num_samples} samples -> {out}")
    print("stddev of the first components: " + ", ".join(f"{v:.3f}" for v in directions.stddev[:8].tolist()))

    count = min(args.preview_components, directions.components.shape[0])
    if count:
        strengths = [-2.0, -1.0, 0.0, 1.0, 2.0]
        rng = torch.Generator().manual_seed(args.seed + 1)
        z = torch.randn(1, generator.style_dim, generator=rng).to(device)
        with torch.no_grad():
            w = generator.get_latent(z)[:, None, :].repeat(1, generator.n_latent, 1)
            rows = []
            for component in range(count):
                spec = editing.EditSpec("ganspace", directions=directions, component=component, layers=layers)
                rows.extend(editing.render_edit(generator, w, None, spec, s).float().cpu() for s in strengths)
        preview = out.with_suffix(".png")
        if preview == out:  # --out x.png: the directions are there, the picture goes beside them
            preview = out.with_name(f"{out.stem}-preview.png")
        save_grid(torch.cat(rows), preview, nrow=len(strengths))
        print(f"preview: {preview} (rows: components 0..{count - 1}; columns: {strengths} stddev)")
    return 0
