"""Edit inverted images (InterFaceGAN, StyleSpace or GANSpace), keeping their RefineStyle residuals.

From images:   refinestyle edit --generator G.pt --inverter runs/one/inverter.safetensors \\
                   --input photos/ --boundary smile.npy --strengths=-3,-1.5,0,1.5,3 --out edits/
From codes:    refinestyle edit --generator G.pt --codes inverted/codes/ --ganspace ganspace.safetensors \\
                   --component 0 --layers 0-5 --out edits/
StyleSpace:    ... --stylespace 6:501   (StyleSpace layer:channel; strengths in channel standard deviations)

Every edit changes w+ (or one style channel) and re-renders with the image's own kernel
residuals, so details the residuals carry survive (--no-refinement renders w+ alone).
Writes edits/strip.png (a row per image: input, then one column per strength),
edits/<name>.png (each image's strip) and edits/edit.json (what was done).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from refinestyle.commands import (
    device_name,
    finite_float,
    image_size,
    int_at_least,
    output_folder,
    positive_int,
    report_error,
    size_for,
    truncation_psi,
)


def _floats(text: str) -> list[float]:
    try:
        values = [finite_float(v) for v in text.split(",") if v.strip()]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one strength")
    return values


def _layer_channel(text: str) -> tuple[int, int]:
    try:
        layer, channel = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LAYER:CHANNEL (e.g. 6:501), got {text!r}") from None
    return layer, channel


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generator", required=True, help="the StyleGAN2 generator checkpoint")
    source = parser.add_argument_group("what to edit (one of)")
    source.add_argument("--codes", help="a code file or folder written by `refinestyle invert` (codes/)")
    source.add_argument("--input", help="images to invert first (needs --inverter)")
    source.add_argument("--inverter", help="inverter.safetensors (or its run folder), or a pSp / e4e / Style Transformer checkpoint, with --input")
    edit = parser.add_argument_group("the edit (one of)")
    edit.add_argument("--boundary", help="InterFaceGAN boundary (.npy/.pt, [1, 512] or [1, n_latent, 512])")
    edit.add_argument("--ganspace", help="GANSpace directions file from `refinestyle ganspace`")
    edit.add_argument("--stylespace", type=_layer_channel, metavar="LAYER:CHANNEL",
                      help="StyleSpace channel (layers count every modulated conv incl. toRGB)")
    parser.add_argument("--component", type=int, default=0, help="GANSpace component index")
    parser.add_argument("--layers", help="w+ rows to edit, e.g. 0-5 or 3,4,7 (InterFaceGAN/GANSpace; default all)")
    parser.add_argument("--strengths", type=_floats, default=[-3.0, -1.5, 0.0, 1.5, 3.0],
                        help="comma-separated edit strengths (default -3,-1.5,0,1.5,3); use --strengths=-3,3")
    parser.add_argument("--stylespace-samples", type=int_at_least(2), default=10_000,
                        help="random images used to measure the StyleSpace channel's standard deviation")
    parser.add_argument("--stylespace-truncation", type=truncation_psi, default=0.7,
                        help="truncation psi of the w that standard deviation is measured over (default 0.7, "
                             "StyleSpace's own unit; 1: untruncated)")
    parser.add_argument("--no-refinement", action="store_true", help="render w+ only (drop the residuals)")
    parser.add_argument("--out", type=output_folder, required=True, help="output folder")
    parser.add_argument("--image-size", type=image_size, metavar="N|HxW",
                        help="size images are read at and shown, N or HEIGHTxWIDTH (default: the inverter's input "
                             "size, or the one the code files store: 256, or 192x256 for Cars)")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--device", type=device_name, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--backend", choices=("auto", "triton", "torch", "reference"), default="auto")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    import refinestyle_kernels
    from refinestyle.checkpoints import load_generator
    from refinestyle.imageio import crop_canvas, list_images, load_image, pool_or_resize, save_grid
    from refinestyle.inversion import editing
    from refinestyle.inversion.data import ImageFolderDataset
    from refinestyle.inversion.inference import load_codes, load_inverter_for_inference, unique_stems
    from refinestyle.weights import default_device

    if (args.codes is None) == (args.input is None):
        return report_error(args, "give exactly one of --codes or --input (with --inverter)")
    if args.input is not None and args.inverter is None:
        return report_error(args, "--input needs --inverter")
    chosen = [flag for flag, value in (("--boundary", args.boundary), ("--ganspace", args.ganspace),
                                        ("--stylespace", args.stylespace)) if value is not None]
    if len(chosen) != 1:
        return report_error(args, f"give exactly one of --boundary, --ganspace, --stylespace (got {chosen or 'none'})")

    if args.codes is not None:
        if not Path(args.codes).exists():
            return report_error(args, f"--codes: {args.codes} not found")
        code_paths = [args.codes] if Path(args.codes).is_file() else sorted(Path(args.codes).glob("*.safetensors"))
        if not code_paths:
            return report_error(args, f"no .safetensors code files in {args.codes}")

    device = torch.device(args.device or default_device())
    out = Path(args.out)
    generator = load_generator(args.generator, device)
    generator.requires_grad_(False).eval()
    layers = editing.parse_layers(args.layers, generator.n_latent)

    with torch.no_grad(), refinestyle_kernels.use_backend(args.backend):
        # the edit first: a wrong direction file is reported before any image is inverted
        if args.boundary is not None:
            spec = editing.EditSpec("interfacegan", boundary=editing.load_boundary(
                args.boundary, generator.n_latent, generator.style_dim), layers=layers)
        elif args.ganspace is not None:
            directions = editing.GANSpaceDirections.load(args.ganspace)
            count, width = directions.components.shape
            if width != generator.style_dim:
                return report_error(args, f"--ganspace: {args.ganspace} holds directions in a {width}-dimensional W, "
                                          f"but this generator's is {generator.style_dim}-dimensional")
            if not 0 <= args.component < count:
                return report_error(args, f"--component: {args.ganspace} has components 0..{count - 1}, "
                                          f"got {args.component}")
            spec = editing.EditSpec("ganspace", directions=directions, component=args.component, layers=layers)
        else:
            layer, channel = args.stylespace
            stddev = editing.style_channel_stddev(generator, layer, num_samples=args.stylespace_samples,
                                                   truncation=args.stylespace_truncation)
            if not 0 <= channel < stddev.numel():
                return report_error(args, f"StyleSpace layer {layer} has {stddev.numel()} channels, got channel {channel}")
            spec = editing.EditSpec("stylespace", style_layer=layer, channel=channel, unit=float(stddev[channel]))

        if args.codes is not None:
            codes = load_codes([Path(p) for p in code_paths], device)
            expected = (generator.n_latent, generator.style_dim)
            if tuple(codes.w_plus.shape[1:]) != expected:
                return report_error(args, f"--codes: w+ codes of shape {list(codes.w_plus.shape[1:])}, but this generator's "
                                          f"are {list(expected)}: codes of another generator")
            names = unique_stems([Path(p) for p in code_paths])
            w_plus, refinement = codes.w_plus, codes.refinement
            picture_size = codes.image_size or args.image_size or (256, 256)  # the part of a render the picture fills
            size = args.image_size or picture_size
            originals = []
            for source in codes.sources:
                try:
                    originals.append(load_image(source, size))
                except (FileNotFoundError, ValueError):
                    originals.append(None)  # the source image moved: show the reconstruction instead
        else:
            paths = list_images(args.input)
            names = unique_stems(paths)
            inverter = load_inverter_for_inference(args.inverter, generator, device)
            picture_size = size_for(inverter, None)
            size = size_for(inverter, args.image_size)
            dataset = ImageFolderDataset(args.input, size)
            w_rows, refinements, originals = [], [], []
            batches = range(0, len(paths), args.batch_size)
            for start in tqdm(batches, desc="invert", unit="batch", disable=args.no_progress):
                images = torch.stack([dataset[i] for i in range(start, min(start + args.batch_size, len(paths)))])
                result = inverter(images.to(device))
                w_rows.append(result.w_plus)
                refinements.append(result.refinement)
                originals.extend(image[None] for image in images)
            w_plus = torch.cat(w_rows)
            refinement = None
            if refinements[0] is not None:
                from refinestyle.refinement import Refinement

                refinement = Refinement.cat(refinements, [w.shape[0] for w in w_rows])
        if args.no_refinement:
            refinement = None

        columns = []
        starts = range(0, w_plus.shape[0], args.batch_size)
        bar = tqdm(total=len(args.strengths) * len(starts), desc="edit", unit="batch", disable=args.no_progress)
        for strength in args.strengths:
            edited = []
            for start in starts:
                stop = min(start + args.batch_size, w_plus.shape[0])
                part = None if refinement is None else refinement.batch_slice(start, stop)
                rendered = editing.render_edit(generator, w_plus[start:stop], part, spec, strength)
                edited.append(crop_canvas(rendered, picture_size))
                bar.update()
            columns.append(pool_or_resize(torch.cat(edited), size).float().cpu())
        bar.close()
        first = []
        for i, original in enumerate(originals):
            if original is None:  # the source image moved: the unedited reconstruction stands in
                part = None if refinement is None else refinement.batch_slice(i, i + 1)
                with torch.no_grad():
                    original = crop_canvas(
                        generator.synthesis(w_plus[i : i + 1], refinement=part, randomize_noise=False), picture_size
                    )
                original = pool_or_resize(original, size).float().cpu()
            first.append(original.to(columns[0]))
        inputs = pool_or_resize(torch.cat(first), size)
        strip = torch.stack([inputs, *columns], 1)  # [B, 1 + S, 3, height, width]

    for name, row in zip(names, strip):
        save_grid(row, out / f"{name}.png", nrow=row.shape[0])
    save_grid(strip.flatten(0, 1), out / "strip.png", nrow=strip.shape[1])
    (out / "edit.json").write_text(editing.edit_metadata(spec, args.strengths) + "\n")
    print(f"{spec.describe()}: {len(names)} image(s) x {len(args.strengths)} strength(s) -> {out / 'strip.png'}")
    return 0
