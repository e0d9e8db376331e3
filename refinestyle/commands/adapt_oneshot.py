"""Adapt a frozen generator to the style of ONE reference image by training only refinement tokens.

GOGA's setting with RefineStyle's tokens (paper Sec. 3.4): the loss is Eq. 6 (L2 + LPIPS
+ ArcFace ID) between the reference and the refined generator at the reference's code
w_r, plus a sliced Wasserstein style loss between LPIPS-AlexNet features of random
syntheses with the mixed code w_g = [w_c, w_r] (early rows from random content, later
rows from the reference) and those of the reference.

w_r comes from a trained inverter (--inverter, refinestyle train-inverter's file) or, without
one, from an optimisation-based projection (LPIPS, --projection-steps). With
--init-from-inverter the tokens start from the inverter's tokens for the reference
(paper Fig. 8).

Pretrained parts are local files: the LPIPS AlexNet backbone (--lpips-backbone or
$REFINESTYLE_ALEXNET) and, for the ID term (faces; --id-weight 0 turns it off),
IR-SE50 (--ir-se50 or $REFINESTYLE_IR_SE50).

Writes the adapter to --out and, in --work-dir, checkpoint.pt, w_r.pt, samples/step_*.png
(row 1: reference, then frozen samples; row 2: the adapted reconstruction, then adapted
samples), loss.png and history.jsonl. --resume continues an interrupted run
(with the checkpoint's settings; --iterations is the total).

example:
  refinestyle adapt-oneshot --generator ffhq.pt --reference arcane.png --inverter two_stage.safetensors \\
      --init-from-inverter --lpips-backbone alexnet-owt-7be5be79.pth --ir-se50 model_ir_se50.pth --out arcane.safetensors
"""
from __future__ import annotations

import argparse
import hashlib
import math
import sys
from pathlib import Path

import torch

from refinestyle.commands import interrupted_exit_status, report_error
from refinestyle.commands.adapt_text import (
    add_common_training_arguments,
    check_against_generator,
    distributed_context,
    load_frozen_generator,
    prepare_run,
    train_and_save,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reference", type=Path, required=True, help="the reference image (PNG/JPEG)")
    add_common_training_arguments(parser, iterations=600, batch_size=1)
    parser.add_argument("--inverter", default=None, metavar="PATH",
                        help="a trained inverter file giving w_r (default: optimisation-based projection)")
    parser.add_argument("--init-from-inverter", action="store_true",
                        help="initialise the tokens from the inverter's tokens for the reference (paper Fig. 8)")
    parser.add_argument("--projection-steps", type=int, default=1000,
                        help="steps of the projection when no --inverter is given (default 1000)")
    parser.add_argument("--lpips-backbone", default=None, metavar="PATH",
                        help="torchvision AlexNet weights for LPIPS (default: $REFINESTYLE_ALEXNET)")
    parser.add_argument("--ir-se50", default=None, metavar="PATH",
                        help="ArcFace IR-SE50 weights for the ID term (default: $REFINESTYLE_IR_SE50)")
    parser.add_argument("--l2-weight", type=float, default=1.0, help="Eq. 6's L2 weight (default 1.0)")
    parser.add_argument("--lpips-weight", type=float, default=0.8, help="Eq. 6's LPIPS weight (default 0.8)")
    parser.add_argument("--id-weight", type=float, default=0.1,
                        help="Eq. 6's ID weight (default 0.1; 0 for non-face domains, then no IR-SE50 is needed)")
    parser.add_argument("--style-weight", type=float, default=1.0,
                        help="weight of the (normalised) SWD style loss (default 1.0)")
    parser.add_argument("--style-layers", type=int, nargs="+", default=[2, 3, 4, 5], metavar="N",
                        help="AlexNet ReLU layers (1-5) compared by the style loss (default 2 3 4 5)")
    parser.add_argument("--style-size", type=int, default=256,
                        help="images are resized to this size for the style features (default 256)")
    parser.add_argument("--swd-projections", type=int, default=256,
                        help="random directions of the sliced Wasserstein distance (default 256)")
    parser.add_argument("--mix-index", type=int, default=None,
                        help="w_g takes rows < N from random content codes (default: 8 of 18, scaled)")
    parser.add_argument("--loss-size", type=int, default=256,
                        help="the reconstruction loss compares images at this size (default 256)")
    parser.add_argument("--lr-min", type=float, default=1e-4,
                        help="the learning rate falls from --lr to this along a cosine over --iterations, as "
                             "GOGA's (default 1e-4; --lr-min equal to --lr keeps it constant)")
    parser.set_defaults(lr=1e-3)


def check_oneshot_options(args) -> None:
    """ValueError naming the first adapt-oneshot option whose value means nothing (the shared ones:
    adapt_text.check_training_options)."""
    if args.init_from_inverter and args.inverter is None:
        raise ValueError("--init-from-inverter needs --inverter")
    for option, value in (("--projection-steps", args.projection_steps), ("--swd-projections", args.swd_projections)):
        if value < 1:
            raise ValueError(f"{option}: expected a positive integer, got {value}")
    if args.style_size < 32 or args.loss_size < 32:
        raise ValueError(f"--style-size and --loss-size: LPIPS's AlexNet needs at least 32 px, got "
                         f"{args.style_size} and {args.loss_size}")
    for option, value in (("--l2-weight", args.l2_weight), ("--lpips-weight", args.lpips_weight),
                          ("--id-weight", args.id_weight), ("--style-weight", args.style_weight)):
        if not (math.isfinite(value) and value >= 0):  # a negative weight would push away from the reference
            raise ValueError(f"{option}: expected a non-negative number, got {value}")
    if args.l2_weight == args.lpips_weight == args.id_weight == args.style_weight == 0:
        raise ValueError("--l2-weight, --lpips-weight, --id-weight, --style-weight: every loss term has weight 0, "
                         "so nothing would train")
    if not (math.isfinite(args.lr_min) and 0 <= args.lr_min <= args.lr):
        raise ValueError(
            f"--lr-min: expected a rate in [0, --lr={args.lr:g}], got {args.lr_min:g}"
            + (" (its default; give --lr-min with a --lr this low)" if args.lr_min == 1e-4 else "")
        )
    if not all(1 <= layer <= 5 for layer in args.style_layers) or len(set(args.style_layers)) != len(args.style_layers):
        raise ValueError(f"--style-layers: expected distinct AlexNet ReLU layers 1 to 5, got {args.style_layers}")
    if args.mix_index is not None and args.mix_index < 0:
        raise ValueError(f"--mix-index: expected a non-negative integer, got {args.mix_index}")


def file_sha256(path) -> str:
    """The sha256 hex digest of a file's contents, read in 1 MiB blocks (an inverter file is large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def reusable_w_r(cache: Path, origin: dict, announce: bool):
    """(w_r, noise) from w_r.pt when it was made from what this run would make it from (`origin`:
    the reference's contents, the generator, the projection's settings); else None, with a note."""
    from refinestyle.adaptation.train import load_w_plus

    try:
        w_r, noise, saved_origin = load_w_plus(cache)
    except ValueError as error:
        reason = str(error)
    else:
        if saved_origin is None:
            reason = f"{cache} does not record what it was projected from"
        else:
            differing = [key for key in origin if saved_origin.get(key) != origin[key]]
            if not differing:
                return w_r, noise
            reason = f"{cache} was made with another {', '.join(differing)}"
    if announce:
        print(f"note: {reason}; projecting the reference again", file=sys.stderr)
    return None


def main(args: argparse.Namespace) -> int:
    from refinestyle.adaptation import generator_fingerprint
    from refinestyle.adaptation.projection import project
    from refinestyle.adaptation.swd import LPIPSFeatures, SWDStyleLoss
    from refinestyle.adaptation.train import CHECKPOINT_NAME, adapt_oneshot, check_resume, save_w_plus
    from refinestyle.checkpoints import CheckpointError
    from refinestyle.distributed import broadcast_from_main, interrupt_on_signals
    from refinestyle.imageio import load_image, save_grid
    from refinestyle.losses import LPIPSLoss, ReconstructionLoss
    from refinestyle.weights import MissingWeightsError, weights_fingerprint

    context = distributed_context(args)
    device = context.device
    try:
        check_oneshot_options(args)
        work_dir, resume = prepare_run(args, context)
        try:
            reference = load_image(args.reference)
        except (FileNotFoundError, ValueError) as error:
            raise ValueError(f"--reference: {error}") from error
        generator = load_frozen_generator(args, device)
        check_against_generator(args, generator)
        if args.mix_index is not None and args.mix_index > generator.n_latent:
            raise ValueError(f"--mix-index: this generator has {generator.n_latent} latent rows, got {args.mix_index}")
        if reference.shape[-2] != reference.shape[-1] and context.is_main:
            print(f"note: the reference is {reference.shape[-2]} x {reference.shape[-1]} pixels; it is resized to the "
                  f"generator's {generator.size} x {generator.size} (stretched, not cropped)", file=sys.stderr)
        reference = torch.nn.functional.interpolate(
            reference, size=(generator.size,) * 2, mode="area" if reference.shape[-1] > generator.size else "bilinear"
        ).to(device)
        lpips = LPIPSLoss(args.lpips_backbone).to(device)
        reconstruction = ReconstructionLoss(
            args.l2_weight, args.lpips_weight, args.id_weight, lpips_module=lpips, ir_se50_path=args.ir_se50
        ).to(device)
        style = SWDStyleLoss(
            LPIPSFeatures(lpips, args.style_layers, input_size=args.style_size), args.swd_projections
        ).to(device)
        inverter = None
        if args.inverter is not None:
            from refinestyle.inversion.inference import resolve_inverter_path
            from refinestyle.inversion.models import load_inverter

            args.inverter = resolve_inverter_path(args.inverter)  # a train-inverter run folder names its file
            inverter = load_inverter(args.inverter, generator)
        run_metadata = {
            "reference": str(args.reference),
            # what resuming compares: the files' contents, wherever they lie
            "reference_sha256": file_sha256(args.reference),
            "generator_file": str(args.generator) if args.generator else None,
            "w_r_source": "inverter" if inverter is not None else "projection",
            "inverter_file": str(args.inverter) if args.inverter else None,
            "inverter_sha256": file_sha256(args.inverter) if inverter is not None else None,
            "projection_steps": args.projection_steps if inverter is None else None,
            # the LPIPS backbone (and IR-SE50) the losses use: another file would change the rest of the run
            "loss_networks_sha256": weights_fingerprint(reconstruction),
            "style_layers": list(args.style_layers),
            "style_size": args.style_size,
            "swd_projections": args.swd_projections,
        }
        # what a cached w_r.pt must have been made from to be reused
        w_r_origin = {key: run_metadata[key] for key in ("reference_sha256", "w_r_source", "inverter_sha256",
                                                         "projection_steps")}
        w_r_origin.update(generator_fingerprint=generator_fingerprint(generator), loss_size=args.loss_size,
                          seed=args.seed, lpips_sha256=weights_fingerprint(lpips))  # the projection's loss
        if resume and (work_dir / CHECKPOINT_NAME).is_file():
            # now, before w_r is computed again and w_r.pt rewritten; adapt_oneshot checks the other settings
            check_resume(work_dir / CHECKPOINT_NAME, {**run_metadata, **w_r_origin})
    except (MissingWeightsError, CheckpointError, FileNotFoundError, ValueError, TypeError) as error:
        return report_error(args, error)

    # w_r (and, with --init-from-inverter, the reference's tokens); a projection is cached for resumed runs
    cache = work_dir / "w_r.pt"
    init_refinement, reference_noise, cached = None, None, None
    if inverter is None and resume and cache.is_file():
        cached = reusable_w_r(cache, w_r_origin, announce=context.is_main)
    if inverter is not None:
        with torch.no_grad():
            result = inverter(reference, render=False)
        w_r = result.w_plus.detach()
        if args.init_from_inverter:
            if result.refinement is None:
                return report_error(args, "--init-from-inverter: this inverter has no token branch")
            init_refinement = result.refinement.detach()
    elif cached is not None:
        w_r, reference_noise = cached
    else:
        try:
            with interrupt_on_signals():
                projected = project(generator, reference, lpips, steps=args.projection_steps, seed=args.seed,
                                    progress=not args.no_progress and context.is_main, loss_size=args.loss_size)
        except KeyboardInterrupt as interrupt:
            if context.is_main:
                print("interrupted while projecting the reference: nothing is saved yet (w_r.pt is written when the "
                      "projection ends); run the command again", file=sys.stderr)
            return interrupted_exit_status(interrupt)
        w_r, reference_noise = projected.w_plus, projected.noise
        if context.is_main:
            # reference | its projection, to judge w_r before the adaptation starts
            save_grid(torch.cat([reference, projected.image[:1].to(reference.dtype)]).cpu(),
                      work_dir / "projection.png", nrow=2)
    # every process adapts to rank 0's w_r (GPUs may round a projection differently)
    w_r = w_r.to(device).contiguous()
    reference_noise = None if reference_noise is None else [n.to(device).contiguous() for n in reference_noise]
    broadcast_from_main([w_r, *(reference_noise or [])], context)
    context.barrier()  # nobody still reads w_r.pt
    if context.is_main:
        save_w_plus(cache, w_r, reference_noise, origin=w_r_origin)

    return train_and_save(
        args, work_dir, resume, adapt_oneshot, (generator, reference, w_r, reconstruction, style),
        context=context,
        init_refinement=init_refinement,
        reference_noise=reference_noise,
        style_weight=args.style_weight,
        mix_index=args.mix_index,
        loss_size=args.loss_size,
        lr_min=args.lr_min,
        metadata=run_metadata,
    )
