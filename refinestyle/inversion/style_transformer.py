"""Pretrained Style Transformer checkpoints as first stages (the paper's two-stage setting).

RefineStyle's two-stage model starts from a pretrained Style Transformer (Hu et al.,
CVPR 2022). Its inverter is our one-stage model without the token branch, with 4 heads
of width 128 (PyTorch's nn.MultiheadAttention on 512-d tokens) and feed-forward width
1024, so its weights map one to one onto `OneStageInverter(refine=False, heads=4,
head_dim=128, ffn_dim=1024)`:

    encoder.module.input_layer.* / body.*          -> encoder.input_layer.* / body.*
    encoder.module.latlayer1 (256 -> 512, stage 3)  -> encoder.lateral_medium
    encoder.module.latlayer2 (128 -> 512, stage 2)  -> encoder.lateral_fine
    encoder.module.transformerlayer_{coarse,medium,fine}
        self_attn / multihead_attn .in_proj_{weight,bias} (q, k, v stacked)
                                                    -> latent_branch.blocks.{0,1,2}.{self,cross}_attn.to_{q,k,v}
        .out_proj                                   -> .to_out
        linear1, linear2, norm1-3                   -> feed_forward.0, feed_forward.3, norm1-3
    encoder.module.z [1, n_latent, 512]             -> latent_branch.latent_queries
    decoder.module.style.*  (its trained mapping)   -> latent_branch.mapping.*
    latent_avg [512]                                -> latent_branch.latent_avg

The checkpoint file is `{"state_dict": ..., "opts": ..., "latent_avg": ...}` as written by
Style Transformer's training (`best_model.pt`); the 'module.' infixes of DataParallel are
optional. The generator must be the one Style Transformer was trained with (its
`decoder.module.*` weights are not loaded into it).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from refinestyle.inversion.encoder import IR_SE50_WIDTHS
from refinestyle.inversion.models import FirstStage, OneStageInverter, load_inverter
from refinestyle.inversion.psp import picture_size_of
from refinestyle.weights import require_file, state_dict_mismatch

__all__ = ["load_style_transformer", "load_first_stage", "style_transformer_state_dict", "NotAnEncoderCheckpoint"]


class NotAnEncoderCheckpoint(ValueError):
    """A torch file that holds none of the encoders `load_first_stage` reads (no pSp / e4e style
    blocks, no Style Transformer queries): a file of another kind, not a damaged encoder."""


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key.startswith(prefix):
            rest = key[len(prefix):]
            out[rest[len("module."):] if rest.startswith("module.") else rest] = value
    return out


def style_transformer_state_dict(
    checkpoint: dict, num_blocks: int = 3
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Map a Style Transformer checkpoint dict onto OneStageInverter(refine=False) names.

    checkpoint: the loaded file ({"state_dict": ..., "latent_avg": ...} or a bare state_dict).
    Returns (state, latent_avg): `state` holds every encoder.* and latent_branch.* entry
    of the inverter (the generator excluded); latent_avg is the file's [style_dim] mean w
    or None when the file has none.
    """
    source = checkpoint.get("state_dict", checkpoint)
    encoder = _strip(source, "encoder.")
    mapping = _strip(source, "decoder.")
    if "z" not in encoder or not any(k.startswith("transformerlayer_coarse.") for k in encoder):
        raise NotAnEncoderCheckpoint("not a Style Transformer checkpoint: no encoder.z / encoder.transformerlayer_coarse.* entries")
    state: dict[str, torch.Tensor] = {}
    for key, value in encoder.items():
        if key.startswith(("input_layer.", "body.")):
            state[f"encoder.{key}"] = value
    for ours, theirs in (("lateral_medium", "latlayer1"), ("lateral_fine", "latlayer2")):
        for kind in ("weight", "bias"):
            state[f"encoder.{ours}.{kind}"] = encoder[f"{theirs}.{kind}"]
    for index, level in enumerate(("coarse", "medium", "fine")[:num_blocks]):
        layer = f"transformerlayer_{level}."
        block = f"latent_branch.blocks.{index}."
        for ours, theirs in (("self_attn", "self_attn"), ("cross_attn", "multihead_attn")):
            weight = encoder[f"{layer}{theirs}.in_proj_weight"]
            bias = encoder[f"{layer}{theirs}.in_proj_bias"]
            for name, w, b in zip(("to_q", "to_k", "to_v"), weight.chunk(3, 0), bias.chunk(3, 0)):
                state[f"{block}{ours}.{name}.weight"] = w
                state[f"{block}{ours}.{name}.bias"] = b
            state[f"{block}{ours}.to_out.weight"] = encoder[f"{layer}{theirs}.out_proj.weight"]
            state[f"{block}{ours}.to_out.bias"] = encoder[f"{layer}{theirs}.out_proj.bias"]
        for ours, theirs in (("feed_forward.0", "linear1"), ("feed_forward.3", "linear2"), ("norm1", "norm1"), ("norm2", "norm2"), ("norm3", "norm3")):
            for kind in ("weight", "bias"):
                state[f"{block}{ours}.{kind}"] = encoder[f"{layer}{theirs}.{kind}"]
    state["latent_branch.latent_queries"] = encoder["z"].reshape(-1, encoder["z"].shape[-1])
    for key, value in mapping.items():
        if key.startswith("style."):
            state[f"latent_branch.mapping.{key[len('style.'):]}"] = value
    latent_avg = checkpoint.get("latent_avg") if isinstance(checkpoint.get("latent_avg"), torch.Tensor) else None
    if latent_avg is not None:
        latent_avg = latent_avg.reshape(-1, latent_avg.shape[-1])[0]  # [512] or [n_latent, 512] (all rows equal)
    return state, latent_avg


def load_style_transformer(
    path: str | os.PathLike,
    generator: nn.Module,
    *,
    heads: int = 4,
    encoder_depth: int | Sequence[int] = 50,
    encoder_widths: Sequence[int] = IR_SE50_WIDTHS,
    encoder_size: int | tuple[int, int] | None = None,
) -> OneStageInverter:
    """A pretrained Style Transformer checkpoint as a OneStageInverter(refine=False).

    path: Style Transformer's checkpoint (`best_model.pt`, torch format).
    generator: the refinestyle.Generator it was trained with (FFHQ config-f for the
        released face model).
    heads: attention heads of the checkpoint (4); the head width is 512 / heads.
    encoder_depth, encoder_widths: the IR-SE trunk (IR-SE50 for the released models).
    encoder_size: what images are resized to before the encoder, an int side or (height,
        width); None: 256, or 192 x 256 for a Cars model (`opts["dataset_type"]` naming cars,
        as Style Transformer reads Stanford Cars).
    Returns the inverter in eval mode on the generator's device. Wrap it in FirstStage for
    a TwoStageInverter. Raises FileNotFoundError / ValueError for a missing or foreign file.
    """
    path = Path(path)
    require_file(
        path, "Style Transformer checkpoint", " (the released models are linked from github.com/sapphire497/style-transformer)"
    )
    try:
        # The file also holds the training options (plain Python values).
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        raise ValueError(f"{path}: not a readable torch checkpoint ({error})") from error
    state, latent_avg = style_transformer_state_dict(checkpoint)
    opts = checkpoint.get("opts") if isinstance(checkpoint.get("opts"), dict) else {}
    if encoder_size is None:
        encoder_size = picture_size_of(opts, 256)
    dim = state["latent_branch.latent_queries"].shape[-1]
    if dim % heads:
        raise ValueError(f"heads: {heads} does not divide the token width {dim}")
    rows = state["latent_branch.latent_queries"].shape[0]
    if rows < generator.n_latent:
        raise ValueError(f"{path}: {rows} query rows, fewer than this generator's {generator.n_latent} w+ rows")
    model = OneStageInverter(
        generator,
        refine=False,
        # Style Transformer keeps 18 queries at any resolution (16 used at 512 px): all of them attend
        latent_queries=rows if rows != generator.n_latent else None,
        encoder_depth=encoder_depth,
        encoder_widths=encoder_widths,
        encoder_size=encoder_size,
        heads=heads,
        head_dim=dim // heads,
        ffn_dim=state["latent_branch.blocks.0.feed_forward.0.weight"].shape[0],
        latent_avg=latent_avg,
    )
    if latent_avg is not None:
        state["latent_branch.latent_avg"] = latent_avg
    elif opts.get("start_from_latent_avg", False):
        raise ValueError(f"{path}: starts from latent_avg (opts['start_from_latent_avg']) but holds none")
    elif "start_from_latent_avg" in opts:  # trained without it: nothing is added to the codes
        state["latent_branch.latent_avg"] = torch.zeros_like(model.latent_branch.latent_avg)
    else:  # no options to tell: the generator's mean w, as the released files hold
        state["latent_branch.latent_avg"] = model.latent_branch.latent_avg
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("generator.")}
    mismatch = state_dict_mismatch(own, state)
    if mismatch:
        raise ValueError(
            f"{path}: does not match a Style Transformer with encoder depth {encoder_depth}, widths "
            f"{tuple(encoder_widths)} and this generator ({mismatch})"
        )
    model.load_state_dict(state, strict=False)
    return model.to(next(generator.parameters()).device).eval()


def load_first_stage(path: str | os.PathLike, generator: nn.Module, **encoder_options) -> nn.Module:
    """A frozen first stage (images [B, 3, H, W] in [-1, 1] -> w+) from a file.

    path: `save_inverter`'s safetensors file (a w+-only one-stage model) or the
        train-inverter run folder holding it (`RUN/inverter.safetensors`), Style
        Transformer's `best_model.pt`, or a pSp / e4e checkpoint (`psp_ffhq_encode.pt`,
        `e4e_ffhq_encode.pt`); torch files are told apart by their contents.
    generator: the generator the first stage was trained with.
    encoder_options: passed to load_style_transformer or load_psp for torch files.
    Returns a FirstStage (our inverter, Style Transformer) or a PSPEncoder (pSp, e4e), in
    eval mode with requires_grad False; a TwoStageInverter stores either with its weights.
    """
    path = Path(path)
    if path.is_dir():  # a train-inverter run folder: its final weights
        from refinestyle.inversion.inference import resolve_inverter_path

        path = resolve_inverter_path(path)
    if path.suffix == ".safetensors":
        inverter = load_inverter(path, generator)
        if not isinstance(inverter, OneStageInverter):
            raise ValueError(f"{path}: a first stage must be a one-stage inverter, got a {type(inverter).__name__}")
        return FirstStage(inverter)
    require_file(path, "first-stage checkpoint (Style Transformer, pSp or e4e)")
    if _is_psp_checkpoint(path):
        from refinestyle.inversion.psp import load_psp

        return load_psp(path, generator, **encoder_options)
    return FirstStage(load_style_transformer(path, generator, **encoder_options))


def _is_psp_checkpoint(path: Path) -> bool:
    """Whether a torch file's state_dict has pSp's style blocks (encoder.styles.*), read
    without loading its tensors (the files also hold a whole generator)."""
    try:
        checkpoint = torch.load(path, map_location="meta", weights_only=True)
    except Exception:
        return False  # load_style_transformer reports the unreadable file
    source = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else {}
    return isinstance(source, dict) and any(
        isinstance(key, str) and key.startswith(("encoder.styles.", "encoder.module.styles.")) for key in source
    )
