"""Invert images with a trained RefineStyle inverter: reconstructions, codes and a comparison grid.

    refinestyle invert --inverter runs/one/inverter.safetensors --generator G.pt \\
        --input photos/ --out inverted/

Writes, for every image: inverted/reconstructions/<name>.png (the refined reconstruction),
inverted/codes/<name>.safetensors (w+ [n_latent, style_dim] and the tokens p.<layer>
[L, Cout], q.<layer> [L, Cin]; `refinestyle edit --codes` reads them), and one
inverted/comparison.png with a row per image: input | w+ only | refined.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from refinestyle.commands import device_name, image_size, int_at_least, output_folder, positive_int, size_for


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inverter", required=True, help="inverter.safetensors (or its train-inverter run folder), or a pretrained pSp / e4e / Style Transformer checkpoint (w+ only)")
    parser.add_argument("--generator", required=True, help="the StyleGAN2 generator checkpoint it was trained with")
    parser.add_argument("--input", required=True, help="an image file or a folder of images")
    parser.add_argument("--out", type=output_folder, required=True, help="output folder")
    parser.add_argument("--image-size", type=image_size, metavar="N|HxW",
                        help="size images are read at, N or HEIGHTxWIDTH (default: the inverter's input size: 256, "
                             "or 192x256 for a Cars model)")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--grid-max-images", type=int_at_least(0), default=16,
                        help="images shown in comparison.png (0: no comparison.png)")
    parser.add_argument("--device", type=device_name, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--backend", choices=("auto", "triton", "torch", "reference"), default="auto")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    import refinestyle_kernels
    from refinestyle.checkpoints import load_generator
    from refinestyle.imageio import list_images, pool_or_resize, save_grid, save_image
    from refinestyle.inversion.data import ImageFolderDataset
    from refinestyle.inversion.inference import load_inverter_for_inference, save_codes, unique_stems
    from refinestyle.weights import default_device

    device = torch.device(args.device or default_device())
    out = Path(args.out)
    paths = list_images(args.input)
    names = unique_stems(paths)
    generator = load_generator(args.generator, device)
    generator.requires_grad_(False).eval()
    inverter = load_inverter_for_inference(args.inverter, generator, device)
    size = size_for(inverter, args.image_size)
    dataset = ImageFolderDataset(args.input, size)
    earlier_codes = {path.name for path in (out / "codes").glob("*.safetensors")}

    comparison = []
    with torch.no_grad(), refinestyle_kernels.use_backend(args.backend):
        for start in tqdm(range(0, len(paths), args.batch_size), desc="invert", unit="batch", disable=args.no_progress):
            stop = min(start + args.batch_size, len(paths))
            images = torch.stack([dataset[i] for i in range(start, stop)]).to(device)
            result = inverter(images)
            refined = result.image
            for offset, index in enumerate(range(start, stop)):
                save_image(refined[offset], out / "reconstructions" / f"{names[index]}.png")
            save_codes(out / "codes", result.w_plus, result.refinement, names[start:stop],
                       [str(p) for p in paths[start:stop]], image_size=size)
            shown = max(0, min(stop, args.grid_max_images) - start)
            if shown:
                plain = inverter.crop_canvas(generator.synthesis(result.w_plus[:shown], refinement=None, randomize_noise=False))
                comparison.append(
                    torch.stack(
                        [pool_or_resize(images[:shown], size), pool_or_resize(plain, size),
                         pool_or_resize(refined[:shown], size)], 1,
                    ).flatten(0, 1).float().cpu()
                )
    shown = "codes/"
    if comparison:
        save_grid(torch.cat(comparison), out / "comparison.png", nrow=3)
        shown = "codes/, comparison.png: input | w+ only | refined"
    print(f"inverted {len(paths)} images into {out} (reconstructions/, {shown})")
    stale = sorted(earlier_codes - {f"{name}.safetensors" for name in names})
    if stale:  # `edit --codes` reads every file there
        print(f"warning: {out / 'codes'} also holds {len(stale)} code files of an earlier run ({', '.join(stale[:3])}"
              f"{', ...' if len(stale) > 3 else ''}); `refinestyle edit --codes` reads them all", file=sys.stderr)
    return 0
