"""Plot the singular-value spectra of a generator's dynamic kernels (the paper's Fig. 3).

Samples z, forms each modulated conv layer's kernel W = scale * W0 * s (Eq. 1) as a
Cout x (Cin*k*k) matrix, and summarises its singular values per layer: the sorted
normalised values (plotted), and how many of them hold 90% / 99% of the energy
(printed as a table). The numbers are also saved as JSON.

example:
  refinestyle spectrum --ckpt stylegan2-ffhq-config-f.pt --samples 1000 --out spectrum.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

from refinestyle.commands import device_name, figure_file, finite_float, output_file, positive_int, report_error, seed
from refinestyle.weights import default_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", default=None, help="generator checkpoint: rosinality .pt / .safetensors or NVlabs .pkl "
                        "(default: $REFINESTYLE_GENERATOR)")
    parser.add_argument("--samples", type=positive_int, default=1000, help="number of random z (default 1000)")
    parser.add_argument("--out", type=figure_file, default=Path("spectrum.png"),
                        help="figure to write (default spectrum.png; .pdf, .svg work too)")
    parser.add_argument("--json", type=output_file, default=None, help="numbers to write (default: --out with .json)")
    parser.add_argument("--batch-size", type=positive_int, default=100, help="samples per batch (default 100)")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the z draw (default 0)")
    parser.add_argument("--truncation", type=finite_float, default=1.0, help="truncation psi of w (default 1: none)")
    parser.add_argument("--demodulate", action="store_true", help="analyse the demodulated kernels instead of Eq. (1)'s")
    parser.add_argument("--size", type=int, default=None, help="expected output size of the checkpoint")
    parser.add_argument("--device", default=None, type=device_name, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def main(args: argparse.Namespace) -> int:
    from refinestyle.checkpoints import CheckpointError, load_generator
    from refinestyle.spectrum import kernel_spectrum
    from refinestyle.weights import MissingWeightsError

    device = args.device or default_device()
    try:
        generator = load_generator(args.ckpt, device=device, size=args.size)
    except (MissingWeightsError, CheckpointError) as error:
        return report_error(args, error)
    try:
        spectrum = kernel_spectrum(
            generator,
            args.samples,
            batch_size=args.batch_size,
            truncation=args.truncation,
            demodulate=args.demodulate,
            seed=args.seed,
            progress=not args.no_progress,
        )
    except ValueError as error:
        return report_error(args, error)
    print(spectrum.table())
    numbers = spectrum.save_json(args.json or args.out.with_suffix(".json"))  # first: the numbers took the time
    figure = spectrum.plot(args.out)
    print(f"wrote {figure} and {numbers}")
    return 0
