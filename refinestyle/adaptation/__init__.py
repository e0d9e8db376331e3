"""Token-only domain adaptation of a frozen StyleGAN2 (paper Sec. 3.4).

- `Adapter` (adapter.py): the learned tokens P, Q, A, B of one domain plus metadata, in a
  safetensors file; `mixed_refinement` renders several domains in one batch.
- `adapt_text` / `adapt_oneshot` (train.py): text-driven (CLIP directional loss) and
  one-shot (Eq. 6 reconstruction + sliced Wasserstein style loss) training.
- clip_loss.py, swd.py, projection.py, metrics.py: the losses, the optimisation-based
  projection used when no inverter is given, and eval-adapter's metrics.

Heavy dependencies (open_clip, lpips, torchvision) are imported only where they are used.
"""
from refinestyle.adaptation.adapter import Adapter, AdaptedGenerator, generator_fingerprint, mixed_refinement

__all__ = [
    "Adapter",
    "AdaptedGenerator",
    "generator_fingerprint",
    "mixed_refinement",
    "adapt_text",
    "adapt_oneshot",
]


def __getattr__(name):  # train.py is imported on first use only
    if name in ("adapt_text", "adapt_oneshot"):
        from refinestyle.adaptation import train

        return getattr(train, name)
    raise AttributeError(f"module 'refinestyle.adaptation' has no attribute {name!r}")
