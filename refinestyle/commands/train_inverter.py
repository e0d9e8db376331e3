"""Train a one-stage or two-stage RefineStyle inverter against a frozen generator.

One GPU:    refinestyle train-inverter --stage one --generator G.pt --data FFHQ/ --out runs/one \\
                --ir-se50 model_ir_se50.pth --lpips-backbone alexnet-owt-7be5be79.pth
Many GPUs:  torchrun --nproc_per_node 4 -m refinestyle train-inverter ...   (batch size is per GPU)
First stage (w+ only, Style Transformer's design): --stage one --no-refine
Two-stage:  --stage two --first-stage runs/first/inverter.safetensors   (or Style Transformer's best_model.pt,
            pSp's psp_ffhq_encode.pt, e4e's e4e_ffhq_encode.pt)
Resume:     refinestyle train-inverter --out runs/one --resume [--max-steps N]

The run folder gets config.json, train_log.csv (every loss term at every step),
val_log.csv, losses.png (the curves), images/step_*.png (input | w+ only | refined), checkpoints/latest.pt (the
training state, written atomically) and inverter.safetensors (for `refinestyle invert`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from refinestyle.commands import add_compile_argument, device_name, interrupted_exit_status, positive_int


def _model_option(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    paths = parser.add_argument_group("files")
    paths.add_argument("--generator", help="StyleGAN2 generator checkpoint (rosinality .pt)")
    paths.add_argument("--data", help="training images: a folder of jpg/png (searched recursively)")
    paths.add_argument("--val-data", help="held-out images for validation metrics")
    paths.add_argument("--out", required=True, help="run folder (created; holds logs, grids, checkpoints)")
    paths.add_argument("--first-stage", help="two-stage: the frozen first stage: our w+ inverter (inverter.safetensors "
                       "of a --no-refine run), a Style Transformer checkpoint (best_model.pt), or a pSp / e4e one "
                       "(psp_ffhq_encode.pt, e4e_ffhq_encode.pt; the same file loads as --generator)")
    paths.add_argument("--ir-se50", help="model_ir_se50.pth: initialises the encoder, drives the ID loss "
                       "(or set REFINESTYLE_IR_SE50)")
    paths.add_argument("--lpips-backbone", help="torchvision alexnet-owt-7be5be79.pth for LPIPS "
                       "(or set REFINESTYLE_ALEXNET)")
    paths.add_argument("--lpips-random-backbone", action="store_true",
                       help="LPIPS with a random AlexNet (tests and smoke runs only: not perceptual)")

    model = parser.add_argument_group("model")
    model.add_argument("--stage", choices=("one", "two"), default="one")
    model.add_argument("--no-refine", action="store_true",
                       help="one-stage: train the w+ branch only (a first stage for --stage two)")
    model.add_argument("--num-refined", type=int, help="Nr: refine the last Nr conv layers (10 one-stage, or all when the generator has fewer; all two-stage)")
    model.add_argument("--num-tokens", type=int, default=32, help="L: tokens per layer (32)")
    model.add_argument("--model-option", type=_model_option, action="append", default=[], metavar="KEY=VALUE",
                       help="extra inverter constructor argument, JSON value (repeatable), e.g. encoder_depth=50")

    loss = parser.add_argument_group("losses")
    loss.add_argument("--l2", type=float, default=1.0, help="L2 weight (1.0)")
    loss.add_argument("--lpips", type=float, default=0.8, help="LPIPS weight (0.8)")
    loss.add_argument("--id", type=float, default=0.1, help="ID loss weight (0.1; faces only)")
    loss.add_argument("--domain", choices=("face", "other"), default="face", help="'other' switches the ID loss off")
    loss.add_argument("--image-size", type=int, default=256, help="side images are read at and encoded (256)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--lr", type=float, help="learning rate (1e-4 one-stage, 1e-3 two-stage)")
    optim.add_argument("--batch-size", type=positive_int, default=8, help="images per step per process (8)")
    optim.add_argument("--max-steps", type=int, help="training steps (1M one-stage, 700k two-stage)")
    optim.add_argument("--seed", type=int, default=0)
    optim.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                       help="data-loader worker processes (default: 4, or the CPU count when smaller)")
    optim.add_argument("--bf16", action="store_true", help="bf16 autocast")
    optim.add_argument("--grad-checkpointing", action="store_true",
                       help="recompute generator layers and encoder units in backward (less memory)")
    optim.add_argument("--backend", choices=("auto", "triton", "torch", "reference"), default="auto",
                       help="modulated-conv backend (auto: fused Triton kernels on GPU)")
    optim.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms")
    add_compile_argument(optim)
    optim.add_argument("--device", type=device_name, help="cpu, cuda, cuda:1 (default: cuda when available; torchrun: the local rank)")

    logging = parser.add_argument_group("logging")
    # default None: a resumed run keeps its own cadence unless one is given (LOGGING_DEFAULTS otherwise)
    logging.add_argument("--log-every", type=int, help="CSV row every N steps (1)")
    logging.add_argument("--image-every", type=int, help="image grid (input | w+ only | refined) every N steps and at the end (1000; 0: none)")
    logging.add_argument("--val-every", type=int, help="validation every N steps and at the end (10000; 0: none)")
    logging.add_argument("--val-max-images", type=int, help="images validated at most (1000)")
    logging.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps (1000)")
    logging.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard (if installed)")
    logging.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")


# the logging options' values for a new run; a resumed run keeps those in its config.json
LOGGING_DEFAULTS = {
    "log_every": 1, "image_every": 1000, "val_every": 10_000, "val_max_images": 1000, "checkpoint_every": 1000,
}


def config_from_args(args: argparse.Namespace):
    """The TrainConfig the arguments describe (for --resume: the run's saved config plus overrides)."""
    from refinestyle.inversion.train import TrainConfig

    logging = {name: getattr(args, name) for name in LOGGING_DEFAULTS if getattr(args, name) is not None}
    run_time = dict(
        max_steps=args.max_steps, workers=args.workers, progress=not args.no_progress, device=args.device,
        tensorboard=args.tensorboard, compile=args.compile, **logging,
    )
    if args.resume:
        saved = Path(args.out) / "config.json"
        if not saved.is_file():
            raise FileNotFoundError(f"--resume: {saved} not found; is {args.out} a train-inverter run folder?")
        fields = json.loads(saved.read_text())
        if args.max_steps is None:
            del run_time["max_steps"]  # keep the run's own
        fields.update(run_time, out=args.out, resume=True)
        return TrainConfig(**fields)
    missing = [flag for flag, value in (("--generator", args.generator), ("--data", args.data)) if value is None]
    if missing:
        raise ValueError(f"{' and '.join(missing)} required (unless --resume)")
    run_time = {**LOGGING_DEFAULTS, **run_time}
    return TrainConfig(
        generator=args.generator, data=args.data, out=args.out, stage=args.stage, val_data=args.val_data,
        first_stage=args.first_stage, ir_se50=args.ir_se50, lpips_backbone=args.lpips_backbone,
        lpips_random_backbone=args.lpips_random_backbone, refine=not args.no_refine,
        num_refined=args.num_refined, num_tokens=args.num_tokens, model_options=dict(args.model_option),
        l2_weight=args.l2, lpips_weight=args.lpips, id_weight=args.id, domain=args.domain,
        image_size=args.image_size, lr=args.lr, batch_size=args.batch_size, seed=args.seed, bf16=args.bf16,
        grad_checkpointing=args.grad_checkpointing, backend=args.backend, deterministic=args.deterministic,
        **run_time,
    )


def main(args: argparse.Namespace) -> int:
    from refinestyle.distributed import TrainingInterrupted
    from refinestyle.inversion.train import train_inverter

    config = config_from_args(args)
    try:
        summary = train_inverter(config)
    except KeyboardInterrupt as interrupt:
        if int(os.environ.get("RANK", "0")) == 0:
            where = f"step {interrupt.step}" if isinstance(interrupt, TrainingInterrupted) else "the last checkpoint"
            print(f"interrupted: {config.out} holds the run up to {where}; continue with "
                  f"refinestyle train-inverter --out {config.out} --resume", file=sys.stderr)
        return interrupted_exit_status(interrupt)
    if summary.steps_this_run:
        last = ", ".join(f"{k} {v:.4f}" for k, v in summary.last_losses.items())
        print(f"step {summary.step} ({summary.steps_this_run} this run): {last}")
    else:
        print(f"step {summary.step}: nothing to do (max steps reached)")
    print(f"inverter: {summary.inverter}")
    return 0
