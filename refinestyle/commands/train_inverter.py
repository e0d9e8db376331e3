"""Train a one-stage or two-stage RefineStyle inverter against a frozen generator.

One GPU:    refinestyle train-inverter --stage one --generator G.pt --data FFHQ/ --out runs/one \\
                --ir-se50 model_ir_se50.pth --lpips-backbone alexnet-owt-7be5be79.pth
Many GPUs:  torchrun --nproc_per_node 4 -m refinestyle train-inverter ...   (batch size is per GPU)
First stage (w+ only, Style Transformer's design): --stage one --no-refine
Two-stage:  --stage two --first-stage runs/first/inverter.safetensors   (or Style Transformer's best_model.pt,
            pSp's psp_ffhq_encode.pt, e4e's e4e_ffhq_encode.pt)
Resume:     refinestyle train-inverter --out runs/one --resume [--max-steps N]
            (the run keeps its config: options that would change it are refused, except run-time ones such as
            --max-steps, --workers, --compile, the logging intervals, and the paths of files that moved)

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

from refinestyle.commands import (
    add_compile_argument,
    device_name,
    image_size,
    int_at_least,
    interrupted_exit_status,
    output_folder,
    positive_int,
)


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
    # The options that describe the run default to None (store_true flags too), so a resumed run can tell the
    # options given on its command line from those left out; a new run gets TrainConfig's defaults.
    paths = parser.add_argument_group("files")
    paths.add_argument("--generator", help="StyleGAN2 generator checkpoint: rosinality .pt / .safetensors or NVlabs .pkl "
                                           "(a pSp / e4e checkpoint holds one too)")
    paths.add_argument("--data", help="training images: a folder of jpg/png (searched recursively)")
    paths.add_argument("--val-data", help="held-out images for validation metrics")
    paths.add_argument("--out", type=output_folder, required=True,
                       help="run folder (created; holds logs, grids, checkpoints)")
    paths.add_argument("--first-stage", help="two-stage: the frozen first stage: our w+ inverter (inverter.safetensors "
                       "of a --no-refine run, or that run's folder), a Style Transformer checkpoint (best_model.pt), or a pSp / e4e one "
                       "(psp_ffhq_encode.pt, e4e_ffhq_encode.pt; the same file loads as --generator)")
    paths.add_argument("--ir-se50", help="model_ir_se50.pth: initialises the encoder, drives the ID loss "
                       "(or set REFINESTYLE_IR_SE50)")
    paths.add_argument("--lpips-backbone", help="torchvision alexnet-owt-7be5be79.pth for LPIPS "
                       "(or set REFINESTYLE_ALEXNET)")
    paths.add_argument("--lpips-random-backbone", action="store_true", default=None,
                       help="LPIPS with a random AlexNet (tests and smoke runs only: not perceptual)")

    model = parser.add_argument_group("model")
    model.add_argument("--stage", choices=("one", "two"), help="one (default) or two")
    model.add_argument("--no-refine", action="store_true", default=None,
                       help="one-stage: train the w+ branch only (a first stage for --stage two)")
    model.add_argument("--num-refined", type=positive_int, help="Nr: refine the last Nr conv layers "
                       "(10 one-stage, or all when the generator has fewer; all two-stage)")
    model.add_argument("--num-tokens", type=positive_int, help="L: tokens per layer (32)")
    model.add_argument("--model-option", type=_model_option, action="append", metavar="KEY=VALUE",
                       help="extra inverter constructor argument, JSON value (repeatable), e.g. encoder_depth=50")

    loss = parser.add_argument_group("losses")
    loss.add_argument("--l2", type=float, help="L2 weight (1.0)")
    loss.add_argument("--lpips", type=float, help="LPIPS weight (0.8)")
    loss.add_argument("--id", type=float, help="ID loss weight (0.1; faces only)")
    loss.add_argument("--domain", choices=("face", "other"), help="face (default) or other: no ID loss")
    loss.add_argument("--image-size", type=image_size, metavar="N|HxW",
                      help="size images are read at and the losses compare at: N or HEIGHTxWIDTH (256; 192x256 for "
                           "Stanford Cars, with --domain other: the encoder then reads 192 x 256 and the renders are "
                           "cropped to their middle 3/4 rows, as pSp and HyperStyle do)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--lr", type=float, help="learning rate (1e-4 one-stage, 1e-3 two-stage)")
    optim.add_argument("--batch-size", type=positive_int, help="images per step per process (8)")
    optim.add_argument("--max-steps", type=positive_int, help="training steps (1M one-stage, 700k two-stage)")
    optim.add_argument("--seed", type=int_at_least(0), help="(0)")
    optim.add_argument("--workers", type=int_at_least(0), default=min(4, os.cpu_count() or 1),
                       help="data-loader worker processes (default: 4, or the CPU count when smaller)")
    optim.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast")
    optim.add_argument("--grad-checkpointing", action="store_true", default=None,
                       help="recompute the generator's StyledConv layers in backward (less memory)")
    optim.add_argument("--backend", choices=("auto", "triton", "torch", "reference"),
                       help="modulated-conv backend (auto, the default: fused Triton kernels on GPU)")
    optim.add_argument("--deterministic", action="store_true", default=None, help="torch.use_deterministic_algorithms")
    add_compile_argument(optim)
    optim.add_argument("--device", type=device_name, help="cpu, cuda, cuda:1 (default: cuda when available; torchrun: the local rank)")

    logging = parser.add_argument_group("logging")
    # default None: a resumed run keeps its own cadence unless one is given
    logging.add_argument("--log-every", type=positive_int, help="CSV row every N steps (1)")
    logging.add_argument("--image-every", type=int_at_least(0),
                         help="image grid (input | w+ only | refined) every N steps and at the end (1000; 0: none)")
    logging.add_argument("--val-every", type=int_at_least(0),
                         help="validation every N steps and at the end (10000; 0: none)")
    logging.add_argument("--val-max-images", type=positive_int, help="images validated at most (1000)")
    logging.add_argument("--checkpoint-every", type=int_at_least(0),
                         help="checkpoint every N steps (1000; 0: only at the end)")
    logging.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard (if installed)")
    logging.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")


# The TrainConfig fields the options that describe the run set (None when not given): option -> field.
RUN_OPTIONS = {
    "--generator": "generator", "--data": "data", "--val-data": "val_data", "--first-stage": "first_stage",
    "--ir-se50": "ir_se50", "--lpips-backbone": "lpips_backbone", "--lpips-random-backbone": "lpips_random_backbone",
    "--stage": "stage", "--no-refine": "refine", "--num-refined": "num_refined", "--num-tokens": "num_tokens",
    "--model-option": "model_options", "--l2": "l2_weight", "--lpips": "lpips_weight", "--id": "id_weight",
    "--domain": "domain", "--image-size": "image_size", "--lr": "lr", "--batch-size": "batch_size",
    "--max-steps": "max_steps", "--seed": "seed", "--bf16": "bf16", "--grad-checkpointing": "grad_checkpointing",
    "--backend": "backend", "--deterministic": "deterministic", "--log-every": "log_every",
    "--image-every": "image_every", "--val-every": "val_every", "--val-max-images": "val_max_images",
    "--checkpoint-every": "checkpoint_every",
}


def given_fields(args: argparse.Namespace) -> dict[str, tuple[str, object]]:
    """{TrainConfig field: (option, value)} of the RUN_OPTIONS given on the command line."""
    given = {}
    for option, field in RUN_OPTIONS.items():
        value = getattr(args, option[2:].replace("-", "_"))
        if value is None:
            continue
        if option == "--no-refine":
            value = False
        elif option == "--model-option":
            value = dict(value)
        elif option == "--image-size":  # as TrainConfig and config.json keep it: 256, or [192, 256]
            value = value[0] if value[0] == value[1] else list(value)
        given[field] = (option, value)
    return given


def config_from_args(args: argparse.Namespace):
    """The TrainConfig the arguments describe (for --resume: the run's saved config plus the run-time options).
    A value TrainConfig refuses is named by its option (`--l2`, not `l2_weight`)."""
    try:
        return _config_from_args(args)
    except ValueError as error:
        message = str(error)
        fields = message.split(": ", 1)[0]
        options = {field: option for option, field in RUN_OPTIONS.items()}
        named = [options.get(field.strip(), field.strip()) for field in fields.split(",")]
        if len(message.split(": ", 1)) == 2 and any(option.startswith("--") for option in named):
            raise ValueError(f"{', '.join(named)}: {message.split(': ', 1)[1]}") from None
        raise


def _config_from_args(args: argparse.Namespace):
    from refinestyle.inversion.train import TrainConfig

    given = given_fields(args)
    run_time = dict(
        workers=args.workers, progress=not args.no_progress, device=args.device, tensorboard=args.tensorboard,
        compile=args.compile,
    )
    if args.resume:
        saved_path = Path(args.out) / "config.json"
        if not saved_path.is_file():
            raise FileNotFoundError(f"--resume: {saved_path} not found; is {args.out} a train-inverter run folder?")
        try:
            fields = json.loads(saved_path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"--resume: {saved_path} is not a readable config ({error})") from None
        fields.update(resumed_changes(given, fields, saved_path), **run_time, out=str(args.out), resume=True)
        return TrainConfig(**fields)
    if "first_stage" in given and given.get("stage", (None, "one"))[1] != "two":
        raise ValueError("--first-stage: only a two-stage run has a first stage (add --stage two)")
    missing = [option for option in ("--generator", "--data") if RUN_OPTIONS[option] not in given]
    if missing:
        raise ValueError(f"{' and '.join(missing)} required (unless --resume)")
    return TrainConfig(**{field: value for field, (_, value) in given.items()}, **run_time, out=str(args.out))


def resumed_changes(given: dict[str, tuple[str, object]], saved: dict, saved_path: Path) -> dict[str, object]:
    """The fields a resumed run takes from the command line (`given`, see given_fields) over its `saved` config.

    Those a resumed run may change (RESUME_OVERRIDABLE: max steps, logging intervals), and the paths of
    files that are no longer where the run saw them (RESUME_RELOCATABLE). Any other option that differs
    from the saved value raises ValueError naming each, with both values.
    """
    from refinestyle.inversion.train import (
        RESUME_OVERRIDABLE,
        RESUME_RELOCATABLE,
        default_learning_rate,
        model_option_defaults,
    )

    def same(a, b) -> bool:  # as config.json keeps them: tuples are lists
        return json.loads(json.dumps(a)) == json.loads(json.dumps(b))

    changes, refused = {}, []
    for field, (option, value) in given.items():
        old = saved.get(field)
        if field == "lr" and old is None:  # the run took the stage's default: restating it changes nothing
            old = default_learning_rate(saved.get("stage", "one"))
        if field == "num_refined" and old is None:  # the default the run took depends on its generator
            old = _num_refined_taken(saved_path.parent)
        if field in RESUME_OVERRIDABLE:
            changes[field] = value
        elif field == "model_options":
            # the keys given must keep their values (left out, a key keeps the run's value, or
            # the constructor's default the run took)
            old = {**model_option_defaults(saved.get("stage", "one"), saved.get("image_size", 256)), **(old or {})}
            refused += [f"{option} {key}={_shown(new)} (the run has {_shown(old.get(key))})"
                        for key, new in value.items() if key not in old or not same(old[key], new)]
        elif field in RESUME_RELOCATABLE and old is not None and value != old:
            if not os.path.exists(old):
                changes[field] = value  # the file moved
            elif not (os.path.exists(value) and os.path.samefile(value, old)):
                refused.append(f"{option} {value} (the run has {old}, which still exists)")
        elif not same(value, old):
            if isinstance(value, bool):  # a flag
                refused.append(f"{option} (the run has {field}={_shown(old)})")
            else:
                refused.append(f"{option} {_shown(value)} (the run has {_shown(old)})")
    if refused:
        raise ValueError(
            f"--resume: a resumed run keeps its config ({saved_path}); the command line changes "
            f"{', '.join(refused)}. Leave these options out, or start a new run with another --out"
        )
    return changes


def _num_refined_taken(run: Path) -> int | None:
    """The number of refined layers a run took by default, from the inverter it saved (None
    before its first checkpoint, or for a run without refinement)."""
    from refinestyle.inversion.models import read_inverter_config
    from refinestyle.inversion.train import INVERTER_NAME

    if not (run / INVERTER_NAME).is_file():
        return None
    config = read_inverter_config(run / INVERTER_NAME)
    return config.num_refined if config.refine else None


def _shown(value) -> str:
    """A config value as the command line spells it (JSON, strings bare)."""
    if value is None:
        return "none"
    return value if isinstance(value, str) else json.dumps(value)


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
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # every rank holds the same summary; rank 0 prints it once
    if summary.steps_this_run:
        last = ", ".join(f"{k} {v:.4f}" for k, v in summary.last_losses.items())
        print(f"step {summary.step} ({summary.steps_this_run} this run): {last}")
    else:
        print(f"step {summary.step}: nothing to do (max steps reached)")
    print(f"inverter: {summary.inverter}")
    return 0
