"""Evaluate an inverter over a folder as the paper's Table 1: MSE, LPIPS, ID, params, FLOPs, time.

    refinestyle eval-inversion --inverter runs/one/inverter.safetensors --generator G.pt \\
        --data celeba_hq_test/ --lpips-backbone alexnet-owt-7be5be79.pth --ir-se50 model_ir_se50.pth
    # the baselines with the same metrics: a pretrained pSp / e4e / Style Transformer checkpoint
    refinestyle eval-inversion --inverter e4e_ffhq_encode.pt --generator e4e_ffhq_encode.pt ...

MSE, LPIPS and ID similarity (faces; --domain other skips it) are measured per image at
256 px (the generator's output pooled) and reported as mean and standard deviation.
Params counts the inverter without the generator; FLOPs count one image's encoder,
branches and generator rendering (torch.utils.flop_counter, 2 FLOPs per multiply-add);
time is the CUDA-synchronised median per image at batch 1. Prints a Markdown table and,
with --out, writes report.json, report.md, per_image.csv and examples.png (the first
images: input | reconstruction) there.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from refinestyle.commands import device_name, image_size, output_folder, positive_int, size_for


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inverter", required=True, help="inverter.safetensors (or its run folder), or a pretrained pSp / e4e / Style Transformer checkpoint: the paper's baselines")
    parser.add_argument("--generator", required=True, help="the StyleGAN2 generator checkpoint")
    parser.add_argument("--data", required=True, help="a folder of test images")
    parser.add_argument("--out", type=output_folder, help="folder for report.json, report.md, per_image.csv, examples.png")
    parser.add_argument("--lpips-backbone", help="torchvision alexnet-owt-7be5be79.pth (or REFINESTYLE_ALEXNET)")
    parser.add_argument("--lpips-random-backbone", action="store_true", help="random AlexNet (tests only)")
    parser.add_argument("--ir-se50", help="model_ir_se50.pth for the ID similarity (or REFINESTYLE_IR_SE50)")
    parser.add_argument("--domain", choices=("face", "other"), default="face", help="'other' skips the ID metric")
    parser.add_argument("--image-size", type=image_size, metavar="N|HxW",
                        help="size images are read at and metrics compare at, N or HEIGHTxWIDTH (default: the "
                             "inverter's input size: 256, or 192x256 for a Cars model)")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--max-images", type=positive_int, help="evaluate only the first N images")
    parser.add_argument("--no-timing", action="store_true", help="skip the time per image")
    parser.add_argument("--timing-repeats", type=positive_int, default=20)
    parser.add_argument("--name", default=None, help="method name in the table (default: the inverter's run folder name)")
    parser.add_argument("--device", type=device_name, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--backend", choices=("auto", "triton", "torch", "reference"), default="auto")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    import torch

    import refinestyle_kernels
    from refinestyle.checkpoints import load_generator
    from refinestyle.imageio import list_images, save_grid
    from refinestyle.inversion.data import ImageFolderDataset
    from refinestyle.inversion.inference import inverter_name, load_inverter_for_inference
    from refinestyle.inversion.metrics import ReconstructionMetrics, evaluate_folder, format_report, inversion_cost
    from refinestyle.weights import default_device

    device = torch.device(args.device or default_device())
    # weights first: a missing file fails before any work
    metrics = ReconstructionMetrics.build(
        lpips_backbone=args.lpips_backbone, pretrained_lpips=not args.lpips_random_backbone,
        ir_se50=args.ir_se50, face_domain=args.domain == "face", device=device,
    )
    list_images(args.data)  # a missing or empty folder fails before the models load
    generator = load_generator(args.generator, device)
    generator.requires_grad_(False).eval()
    inverter = load_inverter_for_inference(args.inverter, generator, device)
    size = size_for(inverter, args.image_size)
    if min(size) < 32:
        raise ValueError(f"--image-size: LPIPS (AlexNet) needs pictures of at least 32 x 32 pixels, got {size[0]} x {size[1]}")
    dataset = ImageFolderDataset(args.data, size)
    with refinestyle_kernels.use_backend(args.backend):
        examples: list = []
        summary, per_image = evaluate_folder(
            inverter, dataset, metrics, batch_size=args.batch_size, metric_size=size, device=device,
            progress=not args.no_progress, max_images=args.max_images, examples=examples,
        )
        cost = inversion_cost(
            inverter, dataset[0][None].to(device), timing=not args.no_timing, repeats=args.timing_repeats
        ).as_dict()
    name = args.name or inverter_name(args.inverter)
    table = format_report(summary, cost, name=name)
    print(table)
    print(f"device: {device}; FLOPs counted with the torch backend; time per image at batch 1")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report = {"name": name, "device": str(device), **summary, **cost}
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "report.md").write_text(table + "\n")
        save_grid(torch.cat(examples), out / "examples.png", nrow=2)  # rows: input | reconstruction
        count = int(summary["count"])
        with (out / "per_image.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image", *per_image])
            for index in range(count):
                writer.writerow([str(dataset.paths[index]), *(f"{v[index].item():.6f}" for v in per_image.values())])
    return 0
