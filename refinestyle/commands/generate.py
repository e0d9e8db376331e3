"""Generate images with a StyleGAN2 generator, optionally through domain adapters, as a grid and as files.

Draws --n latents z from --seed, renders them (with truncation towards the
checkpoint's latent_avg, or the mean of --truncation-mean random w), and writes the
grid to --out and every image to --outdir. With --adapter (repeatable), the grid
has one row per domain: the first row is the unadapted generator, then one row
per adapter, all from the same latents; every batch renders all domains in one
forward pass (per-sample refinement tokens).

examples:
  refinestyle generate --ckpt G.pt --n 16 --truncation 0.7 --seed 0 --out grid.png
  refinestyle generate --ckpt G.pt --n 8 --adapter sketch.safetensors --adapter pixar.safetensors --out domains.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from refinestyle.commands import device_name, finite_float, image_file, output_folder, positive_int, report_error, seed
from refinestyle.weights import default_device, require_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", default=None, help="generator checkpoint: rosinality .pt / .safetensors or NVlabs .pkl "
                        "(default: $REFINESTYLE_GENERATOR)")
    parser.add_argument("--n", type=positive_int, default=16, help="number of latents / images per domain (default 16)")
    parser.add_argument("--truncation", type=finite_float, default=1.0,
                        help="truncation psi: w = avg + psi (w - avg); default 1 (none), above 1 extrapolates")
    parser.add_argument("--truncation-mean", type=positive_int, default=4096,
                        help="random w averaged for truncation when the checkpoint has no latent_avg (default 4096)")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the latents and noise, 0..2^32-1 (default 0)")
    parser.add_argument("--out", type=image_file, default=Path("grid.png"), help="grid picture to write (default grid.png)")
    parser.add_argument("--outdir", type=output_folder, default=None,
                        help="folder for the individual images (default: --out without its suffix)")
    parser.add_argument("--nrow", type=positive_int, default=None,
                        help="images per grid row (default: --n with adapters, else a square-ish grid)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="latents per forward pass (default 8)")
    parser.add_argument("--noise", choices=("const", "random"), default="const",
                        help="the checkpoint's stored noise maps (const, default) or seeded random noise")
    parser.add_argument("--adapter", action="append", default=[], type=Path, metavar="PATH",
                        help="a domain adapter file (repeatable): one extra grid row per adapter")
    parser.add_argument("--ignore-fingerprint", action="store_true",
                        help="accept an adapter trained on a generator with other weights of the same shape")
    parser.add_argument("--size", type=int, default=None, help="expected output size of the checkpoint")
    parser.add_argument("--device", default=None, type=device_name, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "torch", "reference"),
                        help="op backend (default auto: triton on CUDA, torch on CPU)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _load_adapters(paths: list[Path], generator, device, check_fingerprint: bool = True):
    """[(name, Refinement)] for every --adapter path.

    Raises FileNotFoundError for a missing file (or a folder) and ValueError for an adapter
    that does not fit the generator; a fingerprint mismatch alone passes with
    check_fingerprint=False (--ignore-fingerprint), a shape mismatch never.
    """
    if not paths:
        return []
    try:
        from refinestyle.adaptation.adapter import Adapter
    except ImportError as error:
        raise ValueError(f"--adapter needs refinestyle.adaptation.adapter, which cannot be imported: {error}") from error
    adapters = []
    names: set[str] = {"original"}
    for path in paths:
        require_file(path, "--adapter file")
        adapter = Adapter.load(path, device=device)
        try:  # shape mismatches: no way round them
            adapter.check_compatible(generator, check_fingerprint=False)
        except ValueError as error:
            raise ValueError(f"--adapter {path}: {error}") from None
        if check_fingerprint:
            try:
                adapter.check_compatible(generator)
            except ValueError as error:
                raise ValueError(f"--adapter {path}: {error}; --ignore-fingerprint renders it anyway") from None
        name, suffix = Path(path).stem, 2
        while name in names:  # two adapters with the same file name
            name, suffix = f"{Path(path).stem}-{suffix}", suffix + 1
        names.add(name)
        adapters.append((name, adapter.refinement().detach()))
    return adapters


def _image_noise(generator, seed: int, index: int) -> list[torch.Tensor]:
    """Noise maps of image `index`: seeded per image, so they do not depend on --batch-size."""
    rng = torch.Generator().manual_seed(seed * 1_000_003 + index + 1)
    return [
        torch.randn(1, 1, 2 ** ((i + 5) // 2), 2 ** ((i + 5) // 2), generator=rng) for i in range(generator.num_layers)
    ]


@torch.no_grad()
def main(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from refinestyle.checkpoints import CheckpointError, load_generator
    from refinestyle.imageio import save_grid, save_image
    from refinestyle.refinement import Refinement
    from refinestyle.weights import MissingWeightsError

    outdir = args.outdir if args.outdir is not None else args.out.with_suffix("")
    try:  # the default folder, beside --out, is checked as --outdir would be
        output_folder(str(outdir))
    except argparse.ArgumentTypeError as error:
        return report_error(args, f"--outdir: {error}")
    device = torch.device(args.device or default_device())
    try:
        generator = load_generator(args.ckpt, device=device, size=args.size, backend=args.backend)
        domains = _load_adapters(args.adapter, generator, device, check_fingerprint=not args.ignore_fingerprint)
    except (MissingWeightsError, CheckpointError, FileNotFoundError, ValueError) as error:
        return report_error(args, error)

    # every random draw comes from one CPU generator, so a seed gives the same images on any device
    rng = torch.Generator().manual_seed(args.seed)
    z = torch.randn(args.n, generator.style_dim, generator=rng)
    truncation_latent = None
    if args.truncation != 1:  # psi > 1 extrapolates, as NVlabs' generators do (rosinality's applies psi < 1 only)
        truncation_latent = generator.latent_avg
        if truncation_latent is None:
            mean_rng = torch.Generator().manual_seed(args.seed + 1_000_003)
            samples = torch.randn(args.truncation_mean, generator.style_dim, generator=mean_rng)
            truncation_latent = torch.cat([generator.style(c.to(device)) for c in samples.split(1024)]).mean(0, keepdim=True)

    groups = 1 + len(domains)
    refinements = [None] + [refinement for _, refinement in domains]
    images = [[] for _ in range(groups)]
    chunks = z.split(args.batch_size)
    start = 0
    for chunk in tqdm(chunks, desc="generating", unit="batch", disable=args.no_progress or len(chunks) == 1):
        count = chunk.shape[0]
        latent = chunk.to(device).repeat(groups, 1)
        noise = None
        if args.noise == "random":
            per_image = [_image_noise(generator, args.seed, start + offset) for offset in range(count)]
            noise = [torch.cat(maps).to(device).repeat(groups, 1, 1, 1) for maps in zip(*per_image)]
        start += count
        refinement = Refinement.cat(refinements, [count] * groups) if domains else None
        w = generator.style(latent)
        if truncation_latent is not None:
            w = truncation_latent + args.truncation * (w - truncation_latent)
        output, _ = generator(
            [w],
            input_is_latent=True,
            noise=noise,
            randomize_noise=False,
            refinement=refinement,
        )
        for group, part in enumerate(output.float().cpu().split(count)):
            images[group].append(part)

    names = ["original"] + [name for name, _ in domains]
    everything = []
    for name, parts in zip(names, images):
        batch = torch.cat(parts)
        everything.append(batch)
        folder = outdir / name if domains else outdir
        for index, image in enumerate(batch):
            save_image(image, folder / f"{index:04d}.png")
    nrow = args.nrow or (args.n if domains else None)
    save_grid(torch.cat(everything), args.out, nrow=nrow)
    print(f"wrote {args.out} and {args.n * groups} images in {outdir}")
    return 0
