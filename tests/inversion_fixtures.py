"""Tiny generators, image folders and configs shared by the inversion training/CLI/editing tests.

Everything is small enough for a 2-core CPU: a 32 px generator with 32 channels and
style_dim 32, a 4-unit IR-SE encoder with 16-32 channels, 2 attention heads of width 16.
"""
from __future__ import annotations

from pathlib import Path

import torch

from refinestyle.checkpoints import save_rosinality_checkpoint
from refinestyle.generator import Generator
from refinestyle.imageio import save_image
from refinestyle.refinement import Refinement

STYLE_DIM = 32
SIZE = 32
NUM_REFINED = 4
NUM_TOKENS = 4

# Inverter options for tests (InverterConfig / OneStageInverter keywords).
TINY_MODEL_OPTIONS = {
    "encoder_depth": [1, 1, 1, 1],
    "encoder_widths": [16, 16, 32, 32],
    "encoder_size": 32,
    "heads": 2,
    "head_dim": 16,
    "ffn_dim": 64,
}


def tiny_generator(seed: int = 0) -> Generator:
    """A random 32 px generator whose images mostly lie in [-1, 1], with latent_avg set."""
    torch.manual_seed(seed)
    generator = Generator(SIZE, style_dim=STYLE_DIM, n_mlp=2, channel_max=32)
    with torch.no_grad():
        # Random toRGB weights give images of variance ~1.6; halve them so PNGs clip little.
        for to_rgb in [generator.to_rgb1, *generator.to_rgbs]:
            to_rgb.conv.weight.mul_(0.5)
        generator.latent_avg = generator.mean_latent(512).reshape(-1)
    return generator.eval()


def planted_refinement(generator: Generator, strength: float = 0.07, seed: int = 1) -> Refinement:
    """A shared rank-NUM_TOKENS kernel residual on the generator's last NUM_REFINED convs."""
    rng = torch.Generator().manual_seed(seed)
    shapes = generator.layer_shapes(NUM_REFINED)
    p = [torch.randn(NUM_TOKENS, cout, generator=rng) * strength for _, cout in shapes]
    q = [torch.randn(NUM_TOKENS, cin, generator=rng) * strength for cin, _ in shapes]
    return Refinement(p, q, generator.num_layers)


@torch.no_grad()
def write_images(
    generator: Generator,
    folder: Path,
    count: int,
    *,
    seed: int = 2,
    truncation: float = 0.5,
    refinement: Refinement | None = None,
) -> torch.Tensor:
    """Render `count` images (optionally with a planted refinement) to folder/NNN.png.

    Returns the rendered float images [count, 3, 32, 32] (before 8-bit quantisation).
    """
    rng = torch.Generator().manual_seed(seed)
    w = generator.get_latent(torch.randn(count, STYLE_DIM, generator=rng))
    w = generator.latent_avg + truncation * (w - generator.latent_avg)
    w_plus = w[:, None, :].repeat(1, generator.n_latent, 1)
    images = generator.synthesis(
        w_plus, refinement=None if refinement is None else refinement.expand(count), randomize_noise=False
    )
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        save_image(image, folder / f"{index:03d}.png")
    return images


def write_generator(generator: Generator, path: Path) -> Path:
    return save_rosinality_checkpoint(generator, path)


def tiny_train_config(generator_path: Path, data: Path, out: Path, **overrides):
    """A TrainConfig for a few fast CPU steps (L2 + random-backbone LPIPS, no ID, no flips)."""
    from refinestyle.inversion.train import TrainConfig

    fields = dict(
        generator=str(generator_path),
        data=str(data),
        out=str(out),
        num_refined=NUM_REFINED,
        num_tokens=NUM_TOKENS,
        model_options=dict(TINY_MODEL_OPTIONS),
        id_weight=0.0,
        lpips_random_backbone=True,
        image_size=SIZE,
        batch_size=4,
        max_steps=4,
        workers=0,
        hflip=False,
        image_every=0,
        val_every=0,
        checkpoint_every=0,
        progress=False,
        device="cpu",
        lr=1e-3,
    )
    fields.update(overrides)
    return TrainConfig(**fields)


def write_psp_checkpoint(
    generator: Generator,
    path: Path,
    encoder_type: str = "Encoder4Editing",
    seed: int = 3,
    *,
    input_size: int = SIZE,
    dataset_type: str | None = None,
) -> Path:
    """A pSp / e4e training checkpoint (random encoder, pSp's names) for `generator`, with the
    generator itself as its decoder, as pSp and e4e save them: a valid --first-stage and --generator.
    input_size: the side its style blocks are built for; dataset_type: opts["dataset_type"]
    ("cars_encode" makes a Cars model, read at 3/4 of input_size by input_size)."""
    from refinestyle.inversion.psp import PSPEncoder

    torch.manual_seed(seed)
    kind = {"GradualStyleEncoder": "psp", "Encoder4Editing": "e4e"}[encoder_type]
    encoder = PSPEncoder(kind, generator.n_latent, STYLE_DIM, depth=(1, 1, 1, 1), widths=(8, 16, 24, STYLE_DIM),
                         input_size=input_size)  # fmt: skip
    renamed = {"lateral_medium.": "latlayer1.", "lateral_fine.": "latlayer2."}
    state = {}
    for key, value in encoder.state_dict().items():
        if key == "latent_avg":
            continue
        for ours, theirs in renamed.items():
            key = theirs + key[len(ours):] if key.startswith(ours) else key
        state[f"encoder.{key}"] = value
    state.update({f"decoder.{key}": value for key, value in generator.state_dict().items()})
    opts = {"encoder_type": encoder_type, "start_from_latent_avg": True, "input_nc": 3, "output_size": SIZE}
    if dataset_type is not None:
        opts["dataset_type"] = dataset_type
    torch.save({"state_dict": state, "latent_avg": generator.latent_avg.clone(), "opts": opts}, path)
    return path
