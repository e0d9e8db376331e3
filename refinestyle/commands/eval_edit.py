"""Evaluate how inverted images survive edits, as the paper's Table 1: ID (faces) and FID after editing.

Faces (5 InterFaceGAN or StyleSpace attributes; ID between each edited image and its real image):
    refinestyle eval-edit --inverter runs/one/inverter.safetensors --generator G.pt --data celeba_hq_test/ \\
        --boundary smile.npy --boundary age.npy --boundary pose.npy --stylespace 9:6 --stylespace 6:501 \\
        --strength 3 --ir-se50 model_ir_se50.pth --out edit_eval/
Cars (3 GANSpace components; FID between the edited images and the real images):
    refinestyle eval-edit ... --ganspace cars.safetensors --components 0,1,2 --layers 0-7 --domain other \\
        --inception pt_inception-2015-12-05-6726825d.pth

Every edit is rendered with each image's own kernel residuals ("refined") and, for an
inverter with a token branch, with w+ alone ("w+ only"); the unedited reconstruction is
the first row and the mean over the edits the last. FID (with --inception, pytorch-fid's
weights) compares the edited set with the real images at --image-size, both rounded to
8 bits as image files would be. Prints a Markdown table and, with --out, writes
report.json, report.md and examples.png (input | reconstruction | each edit, refined).
"""
from __future__ import annotations

import argparse
import json
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
from refinestyle.commands.edit import _layer_channel


def _pixels(size: tuple[int, int]) -> str:
    return f"{size[0]} px" if size[0] == size[1] else f"{size[0]} x {size[1]} px"


def _indices(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one component")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inverter", required=True, help="inverter.safetensors (or its run folder), or a pretrained pSp / e4e / Style Transformer checkpoint")
    parser.add_argument("--generator", required=True, help="the StyleGAN2 generator checkpoint")
    parser.add_argument("--data", required=True, help="a folder of real test images")
    edits = parser.add_argument_group("the edits (any number of each; at least one in all)")
    edits.add_argument("--boundary", action="append", default=[], help="InterFaceGAN boundary (.npy/.pt); repeat for each attribute (named by the file)")
    edits.add_argument("--stylespace", action="append", default=[], type=_layer_channel, metavar="LAYER:CHANNEL",
                       help="StyleSpace channel; repeat for each attribute")
    edits.add_argument("--ganspace", help="GANSpace directions file from `refinestyle ganspace`")
    edits.add_argument("--components", type=_indices, default=[0], help="GANSpace components to evaluate, e.g. 0,1,2")
    parser.add_argument("--layers", help="w+ rows the InterFaceGAN/GANSpace edits change, e.g. 0-5 (default all)")
    parser.add_argument("--strength", type=finite_float, default=3.0,
                        help="edit strength (InterFaceGAN: along the unit normal; GANSpace and StyleSpace: in standard deviations)")
    parser.add_argument("--stylespace-samples", type=int_at_least(2), default=10_000,
                        help="random images used to measure each StyleSpace channel's standard deviation")
    parser.add_argument("--stylespace-truncation", type=truncation_psi, default=0.7,
                        help="truncation psi of the w that standard deviation is measured over (default 0.7, "
                             "StyleSpace's own unit; 1: untruncated)")
    metrics = parser.add_argument_group("metrics")
    metrics.add_argument("--domain", choices=("face", "other"), default="face", help="'face' measures ID (needs --ir-se50)")
    metrics.add_argument("--ir-se50", help="model_ir_se50.pth for the ID similarity (or REFINESTYLE_IR_SE50)")
    metrics.add_argument("--inception", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth for FID (or REFINESTYLE_FID_INCEPTION); needed with --domain other")
    parser.add_argument("--out", type=output_folder, help="folder for report.json, report.md and examples.png")
    parser.add_argument("--name", help="method name in the table (default: the inverter's run folder name)")
    parser.add_argument("--image-size", type=image_size, metavar="N|HxW",
                        help="size images are read at and the metrics compare at, N or HEIGHTxWIDTH (default: the "
                             "inverter's input size: 256, or 192x256 for a Cars model)")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--max-images", type=positive_int, help="evaluate only the first N images")
    parser.add_argument("--device", type=device_name, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--backend", choices=("auto", "triton", "torch", "reference"), default="auto")
    parser.add_argument("--no-progress", action="store_true")


def boundary_names(paths) -> list[str]:
    """The report's name of each boundary file: its stem, or its path without the suffix where
    two files share a stem (a/smile.npy and b/smile.npy); the same file twice keeps one name."""
    stems = [Path(path).stem for path in paths]
    return [stem if stems.count(stem) == 1 else Path(path).with_suffix("").as_posix() for path, stem in zip(paths, stems)]


def main(args: argparse.Namespace) -> int:
    import os

    import torch

    import refinestyle_kernels
    from refinestyle.checkpoints import load_generator
    from refinestyle.fid import INCEPTION_ENV, FIDInception
    from refinestyle.imageio import list_images, save_grid
    from refinestyle.inversion import editing
    from refinestyle.inversion.data import ImageFolderDataset
    from refinestyle.inversion.edit_metrics import NamedEdit, evaluate_edits, format_edit_report
    from refinestyle.inversion.inference import inverter_name, load_inverter_for_inference
    from refinestyle.losses import IDLoss
    from refinestyle.weights import default_device

    if not (args.boundary or args.stylespace or args.ganspace):
        return report_error(args, "give at least one edit: --boundary, --stylespace or --ganspace (with --components)")
    wants_fid = args.inception is not None or os.environ.get(INCEPTION_ENV) is not None
    if args.domain == "other" and not wants_fid:
        return report_error(args, "--domain other measures FID: give --inception (pytorch-fid's "
                                  "pt_inception-2015-12-05-6726825d.pth) or set " + INCEPTION_ENV)
    device = torch.device(args.device or default_device())
    # weights first: a missing file fails before any work
    identity = IDLoss(args.ir_se50).to(device) if args.domain == "face" else None
    inception = FIDInception(args.inception).to(device) if wants_fid else None
    list_images(args.data)  # a missing or empty folder fails before the models load
    generator = load_generator(args.generator, device)
    generator.requires_grad_(False).eval()
    layers = editing.parse_layers(args.layers, generator.n_latent)

    edits: list[NamedEdit] = []
    for path, name in zip(args.boundary, boundary_names(args.boundary)):
        spec = editing.EditSpec("interfacegan", boundary=editing.load_boundary(path, generator.n_latent,
                                                                              generator.style_dim), layers=layers)
        edits.append(NamedEdit(f"interfacegan {name}", spec, args.strength))
    for layer, channel in args.stylespace:
        stddev = editing.style_channel_stddev(generator, layer, num_samples=args.stylespace_samples,
                                               truncation=args.stylespace_truncation)
        if not 0 <= channel < stddev.numel():
            return report_error(args, f"StyleSpace layer {layer} has {stddev.numel()} channels, got channel {channel}")
        spec = editing.EditSpec("stylespace", style_layer=layer, channel=channel, unit=float(stddev[channel]))
        edits.append(NamedEdit(f"stylespace {layer}:{channel}", spec, args.strength))
    if args.ganspace:
        directions = editing.GANSpaceDirections.load(args.ganspace)
        for component in args.components:
            if not 0 <= component < directions.components.shape[0]:
                return report_error(args, f"--components: {args.ganspace} has {directions.components.shape[0]} "
                                          f"components, got {component}")
            spec = editing.EditSpec("ganspace", directions=directions, component=component, layers=layers)
            edits.append(NamedEdit(f"ganspace {component}", spec, args.strength))
    names = [edit.name for edit in edits]
    if len(set(names)) != len(names):
        return report_error(args, f"an edit is given twice: {names}")

    inverter = load_inverter_for_inference(args.inverter, generator, device)
    size = size_for(inverter, args.image_size)
    dataset = ImageFolderDataset(args.data, size)
    examples: list = []
    with refinestyle_kernels.use_backend(args.backend):
        report = evaluate_edits(
            inverter, generator, dataset, edits, identity=identity, inception=inception,
            batch_size=args.batch_size, metric_size=size, device=device, max_images=args.max_images,
            progress=not args.no_progress, examples=examples,
        )
    name = args.name or inverter_name(args.inverter)
    table = format_edit_report(report, name=name)
    print(table)
    print(f"strength {args.strength:g}; {int(next(iter(report['reconstruction'].values()))['count'])} images at "
          f"{_pixels(size)}; device {device}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        settings = {"name": name, "strength": args.strength, "layers": layers, "domain": args.domain,
                    "edits": {edit.name: edit.spec.describe() for edit in edits}, "device": str(device)}
        (out / "report.json").write_text(json.dumps({**settings, "report": report}, indent=2) + "\n")
        (out / "report.md").write_text(table + "\n")
        save_grid(torch.cat(examples), out / "examples.png", nrow=examples[0].shape[0])
    return 0
