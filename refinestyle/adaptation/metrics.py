"""eval-adapter's metrics: identity similarity, CLIP text consistency, trainable parameters.

Following the paper's Tables 2 and 3, for N random codes (2000 by default):
- ID: cosine similarity of the ArcFace IR-SE50 identities of the source image G(w) and
  the adapted image G_hat(w) (same w, same noise), averaged (refinestyle.losses.IDLoss);
- TC (text consistency): CLIP cosine between the adapted image and the target text
  (template-averaged text embedding), averaged; with several CLIP models, per model and
  their mean;
- Params: the adapter's trainable parameter count.
"""
from __future__ import annotations

import random
from typing import Optional, Sequence

import torch
from torch import nn

from refinestyle.adaptation.adapter import Adapter
from refinestyle.adaptation.clip_loss import TEXT_TEMPLATES, CLIPEncoder

__all__ = ["evaluate_adapter"]


@torch.no_grad()
def evaluate_adapter(
    generator: nn.Module,
    adapter: Adapter,
    *,
    num_images: int = 2000,
    batch_size: int = 8,
    id_model: Optional[nn.Module] = None,
    clip_encoders: Sequence[CLIPEncoder] = (),
    target_text: Optional[str] = None,
    templates: Sequence[str] = TEXT_TEMPLATES,
    truncation: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    on_batch=None,
) -> dict:
    """Average ID similarity and text consistency of an adapter over random codes.

    generator: the frozen refinestyle.Generator the adapter was trained on.
    adapter: the Adapter to evaluate.
    num_images: N random codes (the paper: 2000); batch_size: codes per forward pass.
    id_model: an IDLoss (anything with .similarity(x, y) -> [B]); None skips ID.
    clip_encoders: CLIPEncoder instances for TC; empty or target_text None skips TC.
    target_text: the target description (default: the adapter's metadata "target_text").
    truncation: psi of the codes (1: none); seed: seed of codes and noise (image i draws its
        own from (seed, i), so the images do not depend on batch_size; salted, so that they are
        not the codes training steps draw from the same seed).
    on_batch: optional callable(index, source [B, 3, H, W], adapted [B, 3, H, W]) called for
        every batch (e.g. to save examples).

    Returns a dict: num_images, params, and when computed id_similarity, id_similarity_std,
    text_consistency (mean over models), text_consistency_per_model {name: mean},
    target_text.
    """
    from tqdm.auto import tqdm

    from refinestyle.adaptation.train import _mean_latent, _noise, sample_codes

    if num_images < 1 or batch_size < 1:
        raise ValueError(f"num_images, batch_size: expected positive integers, got {num_images}, {batch_size}")
    device = next(generator.parameters()).device
    refinement = adapter.refinement().detach()
    target_text = target_text if target_text is not None else adapter.metadata.get("target_text")
    text_embeddings = []
    if clip_encoders and target_text:
        text_embeddings = [encoder.encode_text([target_text], templates)[0] for encoder in clip_encoders]
    mean = _mean_latent(generator, truncation, seed)

    id_values: list[torch.Tensor] = []
    tc_sums = [0.0] * len(text_embeddings)
    done = 0
    batches = [min(batch_size, num_images - start) for start in range(0, num_images, batch_size)]

    def image_inputs(image: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        # each image its own generator: the same codes and noise whatever the batch size. The
        # seed is salted: training step t draws from (seed, t), and evaluating on the codes an
        # adapter was trained on would flatter it
        rng = torch.Generator().manual_seed(random.Random(f"refinestyle-eval:{seed}:{image}").getrandbits(63))
        return sample_codes(generator, 1, rng, truncation, mean), _noise(generator, 1, rng, device)

    for index, count in enumerate(tqdm(batches, desc="eval-adapter", unit="batch", disable=not progress)):
        inputs = [image_inputs(done + offset) for offset in range(count)]
        codes = torch.cat([codes for codes, _ in inputs])
        noise = [torch.cat(maps) for maps in zip(*(maps for _, maps in inputs))]
        source = generator.synthesis(codes, noise=noise).clamp(-1, 1)
        adapted = generator.synthesis(codes, refinement=refinement, noise=noise).clamp(-1, 1)
        if id_model is not None:
            id_values.append(id_model.similarity(source, adapted).float().cpu())
        for slot, (encoder, embedding) in enumerate(zip(clip_encoders, text_embeddings)):
            tc_sums[slot] += (encoder.encode_images(adapted) @ embedding).sum().item()
        if on_batch is not None:
            on_batch(index, source, adapted)
        done += count

    result: dict = {"num_images": done, "params": adapter.num_trainable()}
    if id_values:
        values = torch.cat(id_values)
        result["id_similarity"] = values.mean().item()
        result["id_similarity_std"] = values.std().item() if values.numel() > 1 else 0.0
    if text_embeddings:
        labels = [encoder.name for encoder in clip_encoders]
        # two models of one architecture (say OpenAI's and LAION's ViT-B-32) keep a value each
        labels = [f"{label}#{labels[:i].count(label) + 1}" if labels.count(label) > 1 else label
                  for i, label in enumerate(labels)]
        per_model = {label: total / done for label, total in zip(labels, tc_sums)}
        result["text_consistency"] = sum(per_model.values()) / len(per_model)
        result["text_consistency_per_model"] = per_model
        result["target_text"] = target_text
    return result
