"""CLIP encoders from local weight files and StyleGAN-NADA's directional loss.

The text-driven adaptation (paper Sec. 3.4, Eq. 7) aligns the change of the CLIP
image embedding between the frozen and the adapted generator with the change of
the CLIP text embedding between a source and a target description:

    dI = E_I(G_hat(w)) - E_I(G(w)),   dT = E_T(t_target) - E_T(t_source)
    L_dir = 1 - <dI / |dI|, dT / |dT|>

Image and text embeddings are L2-normalised before the differences are taken,
and every text embedding is the average over a list of prompt templates
("a sketch of a {}.", ...), as StyleGAN-NADA does. The paper uses OpenAI's
ViT-B/16 and ViT-B/32 together; `CLIPDirectionalLoss` averages over any list of
encoders.

Weights are never downloaded: `load_clip` only accepts a path to a local file
(an OpenAI TorchScript archive such as ViT-B-32.pt, or an open_clip state dict
in .bin/.pt/.pth/.safetensors). Tests build random models with `random_clip`.
"""
from __future__ import annotations

import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from refinestyle.weights import require_file, resolve_weights, shorten_state_dict_error

# CLIP's image normalisation (the statistics OpenAI's models were trained with).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The two encoders of the paper, with the environment variables that may point at their weights.
PAPER_CLIP_MODELS = {
    "ViT-B-16": "REFINESTYLE_CLIP_VIT_B16",
    "ViT-B-32": "REFINESTYLE_CLIP_VIT_B32",
}
CLIP_OBTAINED_FROM = (
    "OpenAI's CLIP release (ViT-B-16.pt / ViT-B-32.pt) or the open_clip weights on the Hugging Face hub "
    "(timm/vit_base_patch16_clip_224.openai, timm/vit_base_patch32_clip_224.openai)"
)

# Prompt templates averaged into every text embedding; "{}" is replaced by the description.
TEXT_TEMPLATES = (
    "{}",
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
    "a good photo of a {}.",
    "a bright photo of a {}.",
    "a dark photo of a {}.",
    "a blurry photo of a {}.",
    "a low resolution photo of a {}.",
    "a rendering of a {}.",
    "a drawing of a {}.",
    "art of a {}.",
    "a portrait of a {}.",
    "a painting of a {}.",
)


def canonical_clip_name(name: str) -> str:
    """open_clip's spelling of an architecture name: 'ViT-B/32' -> 'ViT-B-32'."""
    return name.replace("/", "-")


def register_clip_config(path: str | os.PathLike) -> str:
    """Register an open_clip model config JSON file and return the architecture name it defines.

    path: a JSON file with open_clip's keys embed_dim, vision_cfg, text_cfg; the
        architecture is named after the file's stem (open_clip's own convention).
    """
    import open_clip

    path = Path(path)
    require_file(path, "open_clip model config")
    config = json.loads(path.read_text())
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in config]
    if missing:
        raise ValueError(f"{path}: not an open_clip model config, missing {', '.join(missing)}")
    open_clip.add_model_config(path)
    return path.stem


def _is_torchscript_archive(path: Path) -> bool:
    """True for OpenAI's original CLIP files, which are TorchScript zip archives (they hold code/)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.startswith("code/") for name in archive.namelist())


class CLIPEncoder(nn.Module):
    """A frozen CLIP model with differentiable image preprocessing and template-averaged text embeddings.

    model: an open_clip CLIP model (its parameters are frozen here).
    tokenizer: the matching open_clip tokenizer (list of str -> int64 token ids [N, context]).
    name: a label for logs and metadata, e.g. "ViT-B-32".
    quick_gelu: whether the model was built with QuickGELU (None: not known, e.g. a TorchScript
        archive, which carries its own architecture); kept in adapter metadata.
    """

    def __init__(self, model: nn.Module, tokenizer, name: str = "clip", quick_gelu: bool | None = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.quick_gelu = quick_gelu
        size = getattr(model.visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):  # the encoder stays in eval mode (no dropout), whatever the caller does
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Generator images -> CLIP's input, differentiably.

        images: float [B, 3, H, W] in [-1, 1]. Resized so that the short side is the model's
            image size (bicubic, antialiased), center-cropped to a square, normalised with
            CLIP's mean and std. Returns float [B, 3, S, S].
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected [B, 3, H, W] in [-1, 1], got {tuple(images.shape)}")
        images = (images.float() + 1) / 2
        height, width = images.shape[-2:]
        size = self.image_size
        if (height, width) != (size, size):
            scale = size / min(height, width)
            new_size = (max(size, round(height * scale)), max(size, round(width * scale)))
            images = F.interpolate(images, size=new_size, mode="bicubic", align_corners=False, antialias=True)
            top, left = (new_size[0] - size) // 2, (new_size[1] - size) // 2
            images = images[:, :, top : top + size, left : left + size]
        return (images - self.mean) / self.std

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings, float [B, D], differentiable w.r.t. `images` ([B, 3, H, W] in [-1, 1])."""
        features = self.model.encode_image(self.preprocess(images))
        return F.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def encode_text(
        self, texts: Sequence[str], templates: Sequence[str] = TEXT_TEMPLATES, *, normalize_mean: bool = True
    ) -> torch.Tensor:
        """Template-averaged text embeddings, float [len(texts), D].

        texts: descriptions such as "pencil sketch".
        templates: format strings with one "{}"; each text's embedding is the mean of the
            normalised embeddings of all its templated prompts, normalised again unless
            normalize_mean is False (StyleGAN-NADA's text direction is the mean of the
            per-template differences, normalised once: the difference of these means).
        """
        if isinstance(texts, str):
            raise TypeError("texts: expected a list of strings, got one string")
        if not texts or not templates:
            raise ValueError("texts and templates must not be empty")
        embeddings = []
        for text in texts:
            prompts = [template.format(text) for template in templates]
            tokens = self.tokenizer(prompts)
            if bool((tokens[:, -1] != 0).any()):  # the tokenizer cuts what does not fit, silently
                warnings.warn(
                    f"{self.name}: {text!r} in its prompts fills CLIP's {tokens.shape[1]} tokens and is cut there "
                    "(the end of the text is not read); shorten it",
                    stacklevel=2,
                )
            tokens = tokens.to(self.device)
            features = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
            mean = features.mean(0)
            embeddings.append(F.normalize(mean, dim=-1) if normalize_mean else mean)
        return torch.stack(embeddings)


def load_clip(
    name: str,
    weights: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    quick_gelu: bool = True,
) -> CLIPEncoder:
    """Build a CLIP encoder from a LOCAL weights file; nothing is downloaded.

    name: an open_clip architecture ("ViT-B-16", "ViT-B/32", ...) or the path of an open_clip
        model config JSON file (registered under its file stem).
    weights: path of the weights: an OpenAI TorchScript archive (ViT-B-32.pt) or an open_clip
        state dict (.bin/.pt/.pth/.safetensors). None falls back to the environment variable
        of the paper's two models (REFINESTYLE_CLIP_VIT_B16 / _B32); a missing file raises
        refinestyle.weights.MissingWeightsError.
    device: where the model lives.
    quick_gelu: use QuickGELU activations, as OpenAI's CLIP weights need (set False for
        open_clip weights trained with GELU, e.g. LAION ones). Ignored for TorchScript archives,
        which carry their own architecture.

    Raises ValueError for an architecture open_clip does not know, a file that is not CLIP
    weights, or weights of another architecture (the message names the file).
    """
    import open_clip

    if str(name).endswith(".json"):
        name = register_clip_config(name)
    name = canonical_clip_name(name)
    env_var = PAPER_CLIP_MODELS.get(name, "REFINESTYLE_CLIP_" + name.upper().replace("-", "_"))
    path = resolve_weights(
        weights, what=f"CLIP {name} weights", env_var=env_var, obtained_from=CLIP_OBTAINED_FROM
    )
    torchscript = _is_torchscript_archive(path)
    if not torchscript and name not in open_clip.list_models():
        raise ValueError(
            f"name: {name!r} is not an open_clip architecture (e.g. ViT-B-16, ViT-B-32; or pass an open_clip "
            f"model config .json)"
        )
    try:
        if torchscript:
            # absolute: open_clip takes a string naming an OpenAI model ("ViT-B-32") for a download
            model = open_clip.load_openai_model(str(Path(path).resolve()), precision="fp32", device="cpu")
        else:
            # pretrained= is a verified local file here, so open_clip never looks up a download tag.
            model = open_clip.create_model(name, pretrained=str(Path(path).resolve()), force_quick_gelu=quick_gelu)
    except Exception as error:  # torch.load / load_state_dict / TorchScript errors of many types
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if isinstance(error, RuntimeError) and "state_dict" in str(error):
            first_line = shorten_state_dict_error(error)
            raise ValueError(
                f"{path}: these weights do not fit the CLIP architecture {name} ({first_line}); is it the file "
                f"of another model?"
            ) from error
        raise ValueError(
            f"{path}: not a readable CLIP weights file for {name} (expected an OpenAI TorchScript archive such as "
            f"ViT-B-32.pt or an open_clip state dict): {type(error).__name__}: {first_line}"
        ) from error
    tokenizer = open_clip.get_tokenizer(name)
    return CLIPEncoder(model, tokenizer, name=name, quick_gelu=None if torchscript else quick_gelu).to(device)


def random_clip(name: str, *, device: str | torch.device = "cpu", seed: int | None = 0) -> CLIPEncoder:
    """A randomly initialised CLIP encoder (for tests and wiring checks; no weights involved).

    name: an open_clip architecture name or the path of an open_clip model config JSON.
    seed: seeds torch's generator before the random initialisation (None: leave it alone).
    """
    import open_clip

    if str(name).endswith(".json"):
        name = register_clip_config(name)
    name = canonical_clip_name(name)
    if seed is not None:
        torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    return CLIPEncoder(model, open_clip.get_tokenizer(name), name=name).to(device)


def directional_loss(
    source_embeddings: torch.Tensor, adapted_embeddings: torch.Tensor, text_direction: torch.Tensor
) -> torch.Tensor:
    """Per-sample L_dir = 1 - cos(dI, dT) (paper Eq. 7).

    source_embeddings, adapted_embeddings: float [B, D], normalised image embeddings of the
        frozen and the adapted generator's images for the same latents.
    text_direction: float [D] (or [1, D]), E_T(target) - E_T(source).
    Returns float [B].
    """
    if source_embeddings.shape != adapted_embeddings.shape or source_embeddings.ndim != 2:
        raise ValueError(
            "source_embeddings, adapted_embeddings: expected two [B, D] tensors, got "
            f"{tuple(source_embeddings.shape)} and {tuple(adapted_embeddings.shape)}"
        )
    text_direction = text_direction.reshape(-1)
    if text_direction.shape[0] != source_embeddings.shape[1]:
        raise ValueError(
            f"text_direction: expected [{source_embeddings.shape[1]}], got {tuple(text_direction.shape)}"
        )
    image_direction = adapted_embeddings - source_embeddings
    # eps keeps the gradient finite at the start, when the adapted images equal the source ones
    image_direction = image_direction / (image_direction.norm(dim=-1, keepdim=True) + 1e-8)
    text_direction = F.normalize(text_direction, dim=0)
    return 1 - image_direction @ text_direction


class CLIPDirectionalLoss(nn.Module):
    """StyleGAN-NADA's directional CLIP loss, averaged over several CLIP encoders.

    encoders: CLIPEncoder instances (the paper: ViT-B/16 and ViT-B/32).
    source_text, target_text: the domain descriptions, e.g. "photo" and "pencil sketch".
    weights: one non-negative weight per encoder (default: equal weights); normalised to sum 1.
    templates: prompt templates averaged into each text embedding.

    forward(source_images, adapted_images) -> scalar: mean over the batch and the weighted
    mean over encoders of 1 - cos(dI, dT). source_images and adapted_images are float
    [B, 3, H, W] in [-1, 1], images of the frozen and of the adapted generator for the same
    latents and noise; the source side carries no gradient.
    """

    def __init__(
        self,
        encoders: Sequence[CLIPEncoder],
        source_text: str,
        target_text: str,
        weights: Sequence[float] | None = None,
        templates: Sequence[str] = TEXT_TEMPLATES,
    ):
        super().__init__()
        if not encoders:
            raise ValueError("encoders: need at least one CLIP encoder")
        if not isinstance(source_text, str) or not isinstance(target_text, str):
            raise TypeError("source_text, target_text: expected strings")
        if source_text.strip() == target_text.strip():
            raise ValueError(f"source_text and target_text are the same ({source_text!r}): no direction")
        weights = [1.0] * len(encoders) if weights is None else [float(w) for w in weights]
        if len(weights) != len(encoders) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"weights: expected {len(encoders)} non-negative numbers, not all zero, got {weights}")
        self.encoders = nn.ModuleList(encoders)
        self.weights = [w / sum(weights) for w in weights]
        self.source_text, self.target_text = source_text, target_text
        self.templates = tuple(templates)
        for index, encoder in enumerate(self.encoders):
            # NADA's compute_text_direction: normalise(mean over templates of target_t - source_t)
            source, target = encoder.encode_text([source_text, target_text], self.templates, normalize_mean=False)
            self.register_buffer(f"text_direction_{index}", F.normalize(target - source, dim=0), persistent=False)

    def text_direction(self, index: int) -> torch.Tensor:
        """The normalised text direction dT of encoder `index`, float [D]."""
        return getattr(self, f"text_direction_{index}")

    def forward(self, source_images: torch.Tensor, adapted_images: torch.Tensor) -> torch.Tensor:
        if source_images.shape != adapted_images.shape:
            raise ValueError(
                f"source_images, adapted_images: expected equal shapes, got "
                f"{tuple(source_images.shape)} and {tuple(adapted_images.shape)}"
            )
        total = adapted_images.new_zeros((), dtype=torch.float32)
        for index, (encoder, weight) in enumerate(zip(self.encoders, self.weights)):
            if weight == 0:
                continue
            with torch.no_grad():
                source = encoder.encode_images(source_images)
            adapted = encoder.encode_images(adapted_images)
            total = total + weight * directional_loss(source, adapted, self.text_direction(index)).mean()
        return total


@torch.no_grad()
def text_consistency(encoder: CLIPEncoder, images: torch.Tensor, text_embedding: torch.Tensor) -> torch.Tensor:
    """Per-image CLIP cosine between images and a (template-averaged) text embedding (the paper's TC).

    images: float [B, 3, H, W] in [-1, 1]; text_embedding: float [D] normalised
    (from encoder.encode_text([...])[0]). Returns float [B].
    """
    return encoder.encode_images(images) @ text_embedding.reshape(-1).to(images.device)


# ---------------------------------------------------------------------------------------------
# Command-line helpers (shared by adapt-text and eval-adapter)


def add_clip_arguments(parser, *, required_note: str = "") -> None:
    """--clip ARCH=PATH (repeatable), --clip-vit-b16 PATH, --clip-vit-b32 PATH, --clip-no-quick-gelu."""
    parser.add_argument("--clip-vit-b16", default=None, metavar="PATH",
                        help="OpenAI CLIP ViT-B/16 weights, a local file (with no CLIP option at all, both "
                             "paper models come from $REFINESTYLE_CLIP_VIT_B16 and $REFINESTYLE_CLIP_VIT_B32)")
    parser.add_argument("--clip-vit-b32", default=None, metavar="PATH",
                        help="OpenAI CLIP ViT-B/32 weights, a local file (see --clip-vit-b16 for the "
                             "environment variables)")
    parser.add_argument("--clip", action="append", default=[], metavar="ARCH=PATH",
                        help="another CLIP model: an open_clip architecture name (or an open_clip config .json) "
                             "and its local weights file; repeatable" + required_note)
    parser.add_argument("--clip-no-quick-gelu", action="store_true",
                        help="the open_clip weights use GELU (e.g. LAION's), not OpenAI's QuickGELU")


def clip_specs_from_args(args) -> list[tuple[str, str]]:
    """[(architecture, weights path)] from the CLIP options; the paper's two models from their
    environment variables when no option names any. Raises MissingWeightsError when none is found."""
    from refinestyle.weights import MissingWeightsError

    specs = []
    for spec in args.clip:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--clip: expected ARCH=PATH, got {spec!r}")
        specs.append((name, path))
    for name, path in (("ViT-B-16", args.clip_vit_b16), ("ViT-B-32", args.clip_vit_b32)):
        if path is not None:
            specs.append((name, path))
    if not specs:
        for name, env_var in PAPER_CLIP_MODELS.items():
            if os.environ.get(env_var):
                specs.append((name, os.environ[env_var]))
    if not specs:
        raise MissingWeightsError(
            "CLIP weights: none given. Pass --clip-vit-b16 PATH and --clip-vit-b32 PATH (the paper uses both), "
            "or set REFINESTYLE_CLIP_VIT_B16 / REFINESTYLE_CLIP_VIT_B32, or --clip ARCH=PATH. They are usually "
            f"obtained from {CLIP_OBTAINED_FROM}; nothing is downloaded."
        )
    return specs


def clip_encoders_from_args(args, device) -> list[CLIPEncoder]:
    """Load every CLIP model named by the options (see clip_specs_from_args)."""
    encoders = []
    for name, path in clip_specs_from_args(args):
        try:
            encoders.append(load_clip(name, path, device=device, quick_gelu=not args.clip_no_quick_gelu))
        except ValueError as error:  # say which option named the model
            raise ValueError(f"--clip {name}{'=' + str(path) if path else ''}: {error}") from None
    return encoders
