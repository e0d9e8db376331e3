"""Evaluate a domain adapter: ID similarity, CLIP text consistency and trainable parameters over N images.

The paper's Tables 2 and 3: for N random codes (2000 by default) the frozen generator's
image G(w) and the adapted image G_hat(w) (same code, same noise) are compared:
- ID: ArcFace IR-SE50 cosine similarity of the two (needs --ir-se50 or $REFINESTYLE_IR_SE50;
  skipped when neither is given, e.g. for non-face generators);
- TC: CLIP cosine between the adapted image and the target text, prompt templates averaged
  (the adapter's target text, or --text; needs CLIP weights, skipped when none are given);
- Params: the adapter's trainable parameter count.
Prints the results as JSON and writes them to --out; --grid writes source | adapted
examples of the first batch.

example:
  refinestyle eval-adapter --generator ffhq.pt --adapter sketch.safetensors --ir-se50 model_ir_se50.pth \\
      --clip-vit-b16 ViT-B-16.pt --clip-vit-b32 ViT-B-32.pt --out sketch_metrics.json
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from refinestyle.adaptation.clip_loss import PAPER_CLIP_MODELS, add_clip_arguments
from refinestyle.commands import device_name, image_file, output_file, positive_int, report_error, seed, truncation_psi
from refinestyle.weights import default_device


def _target_text(text: str) -> str:
    """A non-empty --text (an empty one silently dropped TC)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a target text such as 'pencil sketch', got an empty one")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generator", default=None, metavar="PATH",
                        help="generator checkpoint (default: $REFINESTYLE_GENERATOR)")
    parser.add_argument("--adapter", type=Path, required=True, help="the adapter file (.safetensors)")
    parser.add_argument("--n", type=positive_int, default=2000, help="number of generated images (default 2000, as the paper)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="images per forward pass (default 8)")
    parser.add_argument("--text", type=_target_text, default=None,
                        help="target text for TC (default: the adapter's target text)")
    parser.add_argument("--ir-se50", default=None, metavar="PATH",
                        help="ArcFace IR-SE50 weights for ID (default: $REFINESTYLE_IR_SE50; none: ID skipped)")
    add_clip_arguments(parser, required_note=" (no CLIP model at all: TC skipped)")
    parser.add_argument("--truncation", type=truncation_psi, default=1.0,
                        help="truncation psi of the codes, in (0, 1] (default 1: none, as training draws them)")
    parser.add_argument("--seed", type=seed, default=0, help="seed of codes and noise (default 0)")
    parser.add_argument("--out", type=output_file, default=None, help="write the results as JSON here")
    parser.add_argument("--grid", type=image_file, default=None,
                        help="write source (row 1) | adapted (row 2) images of the first batch here")
    parser.add_argument("--ignore-fingerprint", action="store_true",
                        help="accept an adapter trained on a generator with other weights of the same shape")
    parser.add_argument("--device", default=None, type=device_name, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "torch", "reference"),
                        help="op backend (default auto)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def main(args: argparse.Namespace) -> int:
    from refinestyle.adaptation.adapter import Adapter
    from refinestyle.adaptation.clip_loss import clip_encoders_from_args
    from refinestyle.adaptation.metrics import evaluate_adapter
    from refinestyle.checkpoints import CheckpointError, load_generator
    from refinestyle.imageio import save_grid
    from refinestyle.weights import MissingWeightsError

    device = torch.device(args.device or default_device())
    notes = []
    try:
        generator = load_generator(args.generator, device=device, backend=args.backend).eval().requires_grad_(False)
        adapter = Adapter.load(args.adapter, device=device)
        adapter.check_compatible(generator, check_fingerprint=not args.ignore_fingerprint)
        id_model = None
        if args.ir_se50 is not None or os.environ.get("REFINESTYLE_IR_SE50"):
            from refinestyle.losses import IDLoss

            id_model = IDLoss(args.ir_se50).to(device)
        else:
            notes.append("ID skipped: no IR-SE50 weights (--ir-se50 or $REFINESTYLE_IR_SE50)")
        any_clip = args.clip or args.clip_vit_b16 or args.clip_vit_b32 or any(
            os.environ.get(env) for env in PAPER_CLIP_MODELS.values()
        )
        encoders = clip_encoders_from_args(args, device) if any_clip else []
        if not encoders:
            notes.append("TC skipped: no CLIP weights (--clip-vit-b16 / --clip-vit-b32 / --clip)")
        elif not (args.text or adapter.metadata.get("target_text")):
            notes.append("TC skipped: the adapter has no target text; pass --text")
    except (MissingWeightsError, CheckpointError, FileNotFoundError, ValueError, RuntimeError) as error:
        return report_error(args, error)

    def keep_first(index, source, adapted):
        if index == 0 and args.grid is not None:
            save_grid(torch.cat([source, adapted]), args.grid, nrow=source.shape[0])

    results = evaluate_adapter(
        generator,
        adapter,
        num_images=args.n,
        batch_size=args.batch_size,
        id_model=id_model,
        clip_encoders=encoders,
        target_text=args.text,
        truncation=args.truncation,
        seed=args.seed,
        progress=not args.no_progress,
        on_batch=keep_first,
    )
    results = {"adapter": str(args.adapter), **results, "notes": notes}
    text = json.dumps(results, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0
