"""Using trained inverters: loading them, inverting images, and storing codes.

A *code file* (safetensors) holds what RefineStyle knows about one image: its w+ code
and the scaled tokens of its kernel refinement, enough to re-render or edit it later.

    w_plus      [n_latent, style_dim]    float32
    p.{layer}   [L, Cout]                one per refined conv layer (generator numbering)
    q.{layer}   [L, Cin]
    metadata: format="refinestyle-codes", num_layers, source (the image file), image_size
              ("HxW" of the pictures, e.g. "192x256" for Cars: the part of the render they fill)

Files without p/q tensors (a w+-only inverter) are valid: their refinement is None.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from refinestyle.imageio import image_size_hw, parse_image_size, same_aspect
from refinestyle.weights import require_file, save_safetensors

# the "format" of train-inverter's training checkpoints (RUN_DIR/checkpoints/*.pt)
TRAINING_CHECKPOINT_FORMAT = "refinestyle-train-inverter"

CODES_FORMAT = "refinestyle-codes"


def resolve_inverter_path(path: str | Path) -> Path:
    """An inverter weights file: `path` itself, or `path/inverter.safetensors` for a run folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "inverter.safetensors"
    return require_file(
        path, "inverter file",
        " (train one with `refinestyle train-inverter`; it writes RUN_DIR/inverter.safetensors; or give a pSp, e4e or "
        "Style Transformer checkpoint)",
    )  # fmt: skip


def _run_of_training_file(path: Path) -> Path | None:
    """The run folder when `path` is a train-inverter run's config.json or training checkpoint
    (told by the format name in its pickle, read as bytes: nothing is unpickled), else None."""
    if path.name == "config.json":
        return path.parent
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") or name == "data.pkl"]
            if not pickles or TRAINING_CHECKPOINT_FORMAT.encode() not in archive.read(pickles[0]):
                return None
    except (zipfile.BadZipFile, OSError):
        return None
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def inverter_name(path: str | Path) -> str:
    """A name for reports: the run folder's for RUN_DIR/inverter.safetensors, else the file's stem."""
    path = resolve_inverter_path(path)
    return path.parent.name if path.name == "inverter.safetensors" else path.stem


def load_inverter_for_inference(path: str | Path, generator: nn.Module, device: str | torch.device) -> nn.Module:
    """Load an inverter around `generator`, on `device`, in eval mode, without gradients.

    path: our inverter (a .safetensors file or its train-inverter run folder), or a pretrained
        pSp / e4e / Style Transformer checkpoint (a torch file), which becomes a
        PretrainedEncoderInverter: w+ only, the paper's baselines.
    Its `trained_parameter_count` keeps how many parameters training updates (the paper's
    "trainable parameters"), counted before everything is frozen for inference (for a
    pretrained encoder: all of its parameters)."""
    from refinestyle.inversion.models import PretrainedEncoderInverter, load_inverter

    resolved = resolve_inverter_path(path)
    run = _run_of_training_file(resolved)
    if run is not None:
        raise ValueError(
            f"{resolved}: a train-inverter run's {'config' if resolved.suffix == '.json' else 'training checkpoint'}, "
            f"not an inverter; give the run folder ({run}) or its inverter.safetensors"
        )
    if resolved.suffix == ".safetensors":
        inverter = load_inverter(resolved, generator)
        trained = sum(p.numel() for p in inverter.parameters() if p.requires_grad)
    else:
        from refinestyle.inversion.style_transformer import NotAnEncoderCheckpoint, load_first_stage

        try:
            encoder = load_first_stage(resolved, generator)
        except NotAnEncoderCheckpoint as error:  # a file of another kind (a pSp / e4e / Style
            # Transformer file with a problem of its own keeps its own message)
            raise ValueError(
                f"{resolved}: neither an inverter file (train-inverter's .safetensors) nor a pSp, e4e or Style "
                f"Transformer checkpoint ({str(error).split(': ', 1)[-1]})"
            ) from None
        inverter = PretrainedEncoderInverter(generator, encoder)
        trained = sum(p.numel() for p in inverter.encoder.parameters())
    inverter.trained_parameter_count = trained
    inverter.requires_grad_(False)
    return inverter.to(device).eval()


@dataclass
class ImageCodes:
    """w+ [B, n_latent, style_dim] and the refinement (per-sample tokens, or None) of B images."""

    w_plus: torch.Tensor
    refinement: object | None
    sources: list[str]
    image_size: tuple[int, int] | None = None  # (height, width) of the pictures; None: not stored (square)


def save_codes(
    directory: str | Path,
    w_plus: torch.Tensor,
    refinement,
    names: list[str],
    sources: list[str],
    image_size: tuple[int, int] | None = None,
) -> list[Path]:
    """Write one code file per image: `directory/<name>.safetensors`.

    w_plus: [B, n_latent, style_dim]; refinement: a Refinement with per-sample or shared
    tokens (or None); names: B file stems; sources: B image paths (metadata); image_size:
    (height, width) the inverter read the pictures at (metadata: which part of a render the
    picture fills, for `refinestyle edit --codes`), or None.
    """
    if w_plus.ndim != 3 or w_plus.shape[0] != len(names) or len(names) != len(sources):
        raise ValueError(f"w_plus: expected [B={len(names)}, n_latent, style_dim], got {tuple(w_plus.shape)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    num_layers = refinement.num_layers if refinement is not None else 0
    metadata = {"format": CODES_FORMAT, "num_layers": str(num_layers)}
    if image_size is not None:
        height, width = image_size_hw(image_size, "image_size")
        metadata["image_size"] = f"{height}x{width}"
    for index, (name, source) in enumerate(zip(names, sources)):
        tensors = {"w_plus": w_plus[index].detach().float().cpu().contiguous()}
        if refinement is not None:
            for offset, (p, q) in enumerate(zip(refinement.p, refinement.q)):
                layer = refinement.first_layer + offset
                tensors[f"p.{layer}"] = (p[index] if p.ndim == 3 else p).detach().float().cpu().contiguous()
                tensors[f"q.{layer}"] = (q[index] if q.ndim == 3 else q).detach().float().cpu().contiguous()
        path = directory / f"{name}.safetensors"
        save_safetensors(tensors, path, {**metadata, "source": source})
        written.append(path)
    return written


def load_codes(paths: list[Path], device: str | torch.device = "cpu") -> ImageCodes:
    """Read code files written by `save_codes` into one batch (all must refine the same layers)."""
    from safetensors import safe_open

    from refinestyle.refinement import Refinement

    if not paths:
        raise ValueError("paths: expected at least one code file")
    w_rows, p_rows, q_rows, sources, sizes = [], [], [], [], []
    layers_seen = None
    num_layers = 0
    first = None  # (path, num_layers, the shapes of w_plus, p and q) of the first file
    for path in paths:
        path = Path(path)
        require_file(path, "code file")
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as error:  # safetensors raises its own SafetensorError for a broken header
            raise ValueError(f"{path}: cannot read it as a safetensors code file ({error})") from None
        with handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != CODES_FORMAT:
                raise ValueError(f"{path}: not a RefineStyle code file (written by `refinestyle invert`)")
            keys = set(handle.keys())
            layers = sorted(int(key.split(".")[1]) for key in keys if key.startswith("p."))
            if layers_seen is None:
                layers_seen = layers
            elif layers != layers_seen:
                raise ValueError(f"{path}: refines layers {layers}, other files refine {layers_seen}")
            num_layers = int(metadata.get("num_layers", "0"))
            try:
                w_rows.append(handle.get_tensor("w_plus"))
                p_rows.append([handle.get_tensor(f"p.{layer}") for layer in layers])
                q_rows.append([handle.get_tensor(f"q.{layer}") for layer in layers])
            except Exception as error:  # a truncated file, or a key missing
                raise ValueError(f"{path}: a damaged code file ({type(error).__name__}: {error})") from None
            sources.append(metadata.get("source", str(path)))
            try:
                sizes.append(parse_image_size(metadata["image_size"]) if "image_size" in metadata else None)
            except ValueError as error:
                raise ValueError(f"{path}: image_size metadata: {error}") from None
            if sizes[-1] is not None and sizes[0] is not None and not same_aspect(sizes[-1], sizes[0]):
                raise ValueError(f"{path}: pictures of another aspect ({sizes[-1]}) than {paths[0]}'s ({sizes[0]})")
        # codes of two generators (another n_latent, style_dim or width) cannot share a batch
        shapes = (num_layers, tuple(w_rows[-1].shape), [tuple(t.shape) for t in p_rows[-1] + q_rows[-1]])
        if first is None:
            first = (path, shapes)
        elif shapes != first[1]:
            raise ValueError(
                f"{path}: codes of another generator than {first[0]}'s (number of layers, w+ [n_latent, "
                f"style_dim], token shapes: {shapes} against {first[1]})"
            )
    w_plus = torch.stack(w_rows).to(device)
    refinement = None
    if layers_seen:
        if layers_seen != list(range(num_layers - len(layers_seen), num_layers)):
            raise ValueError(f"code files: refined layers {layers_seen} are not the last ones of {num_layers}")
        p = [torch.stack([row[i] for row in p_rows]).to(device) for i in range(len(layers_seen))]
        q = [torch.stack([row[i] for row in q_rows]).to(device) for i in range(len(layers_seen))]
        refinement = Refinement(p, q, num_layers)
    return ImageCodes(w_plus, refinement, sources, next((size for size in sizes if size is not None), None))


def unique_stems(paths: list[Path]) -> list[str]:
    """File stems, one output name per path: a stem already given (a.png and a.jpg, or the same
    name in two folders) gets the first counter, _1, _2, ..., that no path's own stem is (so
    a_1.png keeps its name beside a.png and a.jpg). Names are compared without case: A.png and
    a.png would be one file on macOS' and Windows' file systems."""
    taken = {Path(path).stem.casefold() for path in paths}
    given: set[str] = set()
    stems = []
    for path in paths:
        stem = name = Path(path).stem
        count = 0
        while name.casefold() in given or (count and name.casefold() in taken):
            count += 1
            name = f"{stem}_{count}"
        given.add(name.casefold())
        stems.append(name)
    return stems

