"""Semantic edits of inverted images: InterFaceGAN, StyleSpace and GANSpace.

An inverter gives each image a code w+ [B, n_latent, style_dim] and, with RefineStyle,
low-rank kernel residuals (a `Refinement`). An edit changes only the code (or, for
StyleSpace, one channel of one layer's style s); the image is re-rendered with the
edited code *and the image's own residuals*, so the details the residuals carry
(hair, accessories, background) survive the edit. This is how the paper edits
(section 4.3).

- InterFaceGAN (Shen et al.): a boundary is the unit normal of a linear attribute
  classifier in W; w+ moves along it: w+ + strength * n. Boundary files are .npy or
  .pt arrays of shape [1, style_dim] (one w direction for every layer) or
  [1, n_latent, style_dim] (per layer).
- StyleSpace (Wu et al.): s_l = A_l(w_l) is the per-channel style of modulated conv l;
  an edit adds strength * sigma to channel c of layer l, sigma being that channel's
  standard deviation over random images. Layers are numbered as in StyleSpace: every
  modulated conv in forward order, toRGB layers included (conv1, to_rgb1, then per
  resolution conv0, conv1, toRGB; 26 layers at 1024 px).
- GANSpace (Harkonen et al.): principal components of w = mapping(z) over many z;
  an edit adds strength * stddev_k * v_k to the codes of a range of layers.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from refinestyle.weights import require_file, save_safetensors, some_of

# ---------------------------------------------------------------------------------------------
# Layer selections


def parse_layers(spec: str | None, n_latent: int) -> list[int] | None:
    """Parse a layer selection such as "0-5", "3,4,7" or "2-4,8"; None or "" or "all" -> None (all).

    Ranges are inclusive. Raises ValueError for indices outside [0, n_latent) and for a range
    that runs backwards ("5-2"), which would select nothing.
    """
    if spec is None or spec.strip() in ("", "all"):
        return None
    layers: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            first, last = (int(v) for v in part.split("-", 1)) if "-" in part else (int(part), int(part))
        except ValueError:
            raise ValueError(f"layers: cannot parse {spec!r}; expected e.g. '0-5' or '3,4,7'") from None
        if first > last:  # an empty range would silently edit nothing
            raise ValueError(f"layers: range {part!r} runs backwards; expected first <= last, e.g. '2-5'")
        layers.extend(range(first, last + 1))
    for layer in layers:
        if not 0 <= layer < n_latent:
            raise ValueError(f"layers: index {layer} outside [0, {n_latent})")
    return sorted(set(layers))


def _layer_mask(layers: Sequence[int] | None, n_latent: int, like: torch.Tensor) -> torch.Tensor:
    """[1, n_latent, 1] mask with ones at the selected layers (all layers for None)."""
    mask = torch.zeros(1, n_latent, 1, dtype=like.dtype, device=like.device)
    if layers is None:
        mask.fill_(1)
    else:
        for layer in layers:
            if not 0 <= layer < n_latent:
                raise ValueError(f"layers: index {layer} outside [0, {n_latent})")
            mask[0, layer] = 1
    return mask


def _strengths(strength: float | torch.Tensor, batch: int, like: torch.Tensor) -> torch.Tensor:
    """A scalar or [B] strength as a [B, 1, 1] tensor."""
    strength = torch.as_tensor(strength, dtype=like.dtype, device=like.device)
    if strength.ndim == 0:
        strength = strength.expand(batch)
    if strength.shape != (batch,):
        raise ValueError(f"strength: expected a number or a [B={batch}] tensor, got {tuple(strength.shape)}")
    return strength[:, None, None]


def _check_w_plus(w_plus: torch.Tensor, style_dim: int | None = None) -> None:
    if not isinstance(w_plus, torch.Tensor) or w_plus.ndim != 3:
        raise ValueError(f"w_plus: expected a [B, n_latent, style_dim] tensor, got {getattr(w_plus, 'shape', w_plus)}")
    if style_dim is not None and w_plus.shape[2] != style_dim:
        raise ValueError(f"w_plus: expected style_dim {style_dim}, got shape {tuple(w_plus.shape)}")


# ---------------------------------------------------------------------------------------------
# InterFaceGAN


def load_boundary(path: str | Path, n_latent: int, style_dim: int) -> torch.Tensor:
    """Read an InterFaceGAN boundary file as a float32 tensor [1, n_latent, style_dim].

    Args:
        path: a .npy file (numpy array) or .pt/.pth file (a tensor, or a dict holding exactly
            one tensor, or one under the key "boundary").
        n_latent: the generator's number of w+ codes (18 at 1024 px).
        style_dim: the generator's w dimension (512).

    A [1, style_dim] boundary is one W direction used for every layer; it is repeated over
    the n_latent layers explicitly. A [1, n_latent, style_dim] boundary is used as is.
    Raises FileNotFoundError for a missing file and ValueError for any other shape or suffix.
    """
    path = Path(path)
    require_file(path, "boundary file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            array = torch.from_numpy(np.load(path, allow_pickle=False))
        except (OSError, ValueError, EOFError) as error:
            raise ValueError(f"{path}: cannot read it as a .npy array ({error})") from None
    elif suffix in (".pt", ".pth"):
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch.load of a broken file raises pickle's, zipfile's or its own errors
            raise ValueError(f"{path}: cannot read it as a torch file ({type(error).__name__}: {error})") from None
        if isinstance(loaded, dict):
            if "boundary" in loaded:
                loaded = loaded["boundary"]
            elif len(loaded) == 1:
                loaded = next(iter(loaded.values()))
            else:
                raise ValueError(f"{path}: a dict boundary file must hold one tensor or a 'boundary' key")
        if not isinstance(loaded, torch.Tensor):
            raise ValueError(f"{path}: expected a tensor, got {type(loaded).__name__}")
        array = loaded
    else:
        raise ValueError(f"{path}: boundary files must be .npy or .pt, got {suffix!r}")
    boundary = array.detach().to(torch.float32)
    if boundary.shape == (1, style_dim):
        return boundary[:, None, :].repeat(1, n_latent, 1)
    if boundary.shape == (1, n_latent, style_dim):
        return boundary.clone()
    raise ValueError(
        f"{path}: expected a boundary of shape [1, {style_dim}] or [1, {n_latent}, {style_dim}], "
        f"got {list(boundary.shape)}"
    )


def interfacegan_edit(
    w_plus: torch.Tensor,
    boundary: torch.Tensor,
    strength: float | torch.Tensor,
    layers: Sequence[int] | None = None,
) -> torch.Tensor:
    """Move codes along an InterFaceGAN boundary: w+ + strength * boundary at the chosen layers.

    Args:
        w_plus: [B, n_latent, style_dim] codes.
        boundary: [1, n_latent, style_dim] from `load_boundary`.
        strength: a number, or a [B] tensor (one strength per code).
        layers: indices of the codes to edit (None: all).
    Returns a new [B, n_latent, style_dim] tensor.
    """
    _check_w_plus(w_plus)
    if boundary.shape != (1,) + tuple(w_plus.shape[1:]):
        raise ValueError(f"boundary: expected [1, {w_plus.shape[1]}, {w_plus.shape[2]}], got {tuple(boundary.shape)}")
    boundary = boundary.to(w_plus)
    mask = _layer_mask(layers, w_plus.shape[1], w_plus)
    return w_plus + _strengths(strength, w_plus.shape[0], w_plus) * boundary * mask


# ---------------------------------------------------------------------------------------------
# GANSpace


@dataclass
class GANSpaceDirections:
    """Principal directions of the mapping network's output distribution.

    components: [K, style_dim] orthonormal rows, by decreasing variance.
    stddev: [K] standard deviation of w along each component.
    mean: [style_dim] mean w.
    num_samples: how many z were drawn to estimate them.
    """

    components: torch.Tensor
    stddev: torch.Tensor
    mean: torch.Tensor
    num_samples: int

    def save(self, path: str | Path) -> None:
        """Write to a safetensors file (tensors `components`, `stddev`, `mean`; metadata num_samples)."""
        tensors = {
            "components": self.components.float().contiguous().cpu(),
            "stddev": self.stddev.float().contiguous().cpu(),
            "mean": self.mean.float().contiguous().cpu(),
        }
        save_safetensors(tensors, path, {"format": "refinestyle-ganspace", "num_samples": str(self.num_samples)})

    @classmethod
    def load(cls, path: str | Path) -> "GANSpaceDirections":
        """Read a file written by `save` (raises FileNotFoundError / ValueError)."""
        from safetensors import safe_open

        path = Path(path)
        require_file(path, "GANSpace directions file")
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as error:  # safetensors raises its own error type for a file of another format
            raise ValueError(
                f"{path}: not a GANSpace directions file (written by `refinestyle ganspace`): {error}"
            ) from None
        with handle:
            keys = set(handle.keys())
            missing = sorted({"components", "stddev", "mean"} - keys)
            if missing:
                raise ValueError(
                    f"{path}: not a GANSpace directions file (written by `refinestyle ganspace`): it has no "
                    f"{', '.join(missing)} tensor; it holds {some_of(sorted(keys))}"
                )
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in ("components", "stddev", "mean")}
        return cls(num_samples=int(metadata.get("num_samples", 0)), **tensors)


@torch.no_grad()
def compute_ganspace(
    mapping: Callable[[torch.Tensor], torch.Tensor],
    style_dim: int,
    *,
    num_samples: int = 100_000,
    num_components: int = 80,
    batch_size: int = 4096,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> GANSpaceDirections:
    """PCA of w = mapping(z), z ~ N(0, I), as GANSpace computes its W-space directions.

    The covariance is accumulated in float64 over batches (exact, constant memory) and
    diagonalised; each component's sign is fixed so its largest-magnitude entry is positive.

    Args:
        mapping: z [N, style_dim] -> w [N, style_dim] (e.g. `generator.style`).
        style_dim: the latent dimension.
        num_samples: number of z drawn.
        num_components: K, how many leading components to keep (<= style_dim).
        batch_size: z per mapping call.
        seed: seed of the z draws (a private generator; global RNG untouched).
        device: where the mapping runs.
        progress: show a progress bar.
    """
    from tqdm.auto import tqdm

    if not 1 <= num_components <= style_dim:
        raise ValueError(f"num_components: expected 1..{style_dim}, got {num_components}")
    if batch_size < 1:  # (0 would never finish)
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size}")
    if num_samples <= num_components:
        # with N samples the centred covariance has rank <= N - 1: later components are noise
        raise ValueError(
            f"num_samples: expected more than num_components={num_components} samples, got {num_samples}"
        )
    generator = torch.Generator(device="cpu").manual_seed(seed)
    total = torch.zeros(style_dim, dtype=torch.float64, device=device)
    outer = torch.zeros(style_dim, style_dim, dtype=torch.float64, device=device)
    done = 0
    with tqdm(total=num_samples, desc="ganspace", unit="z", disable=not progress) as bar:
        while done < num_samples:
            count = min(batch_size, num_samples - done)
            z = torch.randn(count, style_dim, generator=generator).to(device)
            w = mapping(z).to(torch.float64)
            if w.shape != (count, style_dim):
                raise ValueError(f"mapping: expected output [{count}, {style_dim}], got {tuple(w.shape)}")
            total += w.sum(0)
            outer += w.T @ w
            done += count
            bar.update(count)
    mean = total / done
    covariance = (outer - done * torch.outer(mean, mean)) / (done - 1)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    order = torch.argsort(eigenvalues, descending=True)[:num_components]
    components = eigenvectors[:, order].T.contiguous()
    signs = torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True)))
    components = components * signs
    stddev = eigenvalues[order].clamp_min(0).sqrt()
    return GANSpaceDirections(components.float().cpu(), stddev.float().cpu(), mean.float().cpu(), done)


def ganspace_edit(
    w_plus: torch.Tensor,
    directions: GANSpaceDirections,
    component: int,
    strength: float | torch.Tensor,
    layers: Sequence[int] | None = None,
) -> torch.Tensor:
    """Move codes along GANSpace component `component`: w+ + strength * stddev_k * v_k at `layers`.

    Args:
        w_plus: [B, n_latent, style_dim] codes.
        directions: from `compute_ganspace` / `GANSpaceDirections.load`.
        component: index k of the principal component.
        strength: in standard deviations of w along v_k; a number or a [B] tensor.
        layers: indices of the codes to edit (None: all).
    """
    _check_w_plus(w_plus, directions.components.shape[1])
    if not 0 <= component < directions.components.shape[0]:
        raise ValueError(f"component: expected 0..{directions.components.shape[0] - 1}, got {component}")
    direction = (directions.components[component] * directions.stddev[component]).to(w_plus)
    mask = _layer_mask(layers, w_plus.shape[1], w_plus)
    return w_plus + _strengths(strength, w_plus.shape[0], w_plus) * direction[None, None, :] * mask


# ---------------------------------------------------------------------------------------------
# StyleSpace


def style_layers(generator: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """The generator's modulated convs in StyleSpace order: (name, modulated conv, w+ index).

    Order: conv1, to_rgb1, then per resolution convs[2i], convs[2i+1], to_rgbs[i]; the w+
    index is the code that modulates the layer (rosinality's latent indexing). Each module
    has a `modulation` (the affine A_l: w -> s_l).
    """
    layers = [("conv1", generator.conv1.conv, 0), ("to_rgb1", generator.to_rgb1.conv, 1)]
    for i, to_rgb in enumerate(generator.to_rgbs):
        layers.append((f"convs.{2 * i}", generator.convs[2 * i].conv, 2 * i + 1))
        layers.append((f"convs.{2 * i + 1}", generator.convs[2 * i + 1].conv, 2 * i + 2))
        layers.append((f"to_rgbs.{i}", to_rgb.conv, 2 * i + 3))
    return layers


@torch.no_grad()
def style_channel_stddev(
    generator: nn.Module,
    layer: int,
    *,
    num_samples: int = 10_000,
    seed: int = 0,
    batch_size: int = 2048,
    truncation: float = 0.7,
) -> torch.Tensor:
    """Standard deviation over random images of every channel of StyleSpace layer `layer`'s style s.

    Draws num_samples z (private generator), maps them to w, truncates w toward the average
    with psi = `truncation` and applies the layer's affine. StyleSpace (Wu et al.) measures
    its edit unit over w truncated with psi 0.7 (its GetCode.py), hence the default; 1 gives
    the untruncated spread. s is affine in w, so truncation scales the std by exactly psi,
    whatever the average: that is how it is applied.
    Returns a float32 [C_in] tensor on the generator's device.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples: a standard deviation needs at least 2 samples, got {num_samples}")
    if not 0 < truncation <= 1:
        raise ValueError(f"truncation: expected a psi in (0, 1], got {truncation}")
    name, module, _ = _style_layer(generator, layer)
    device = next(generator.parameters()).device
    rng = torch.Generator(device="cpu").manual_seed(seed)
    styles = []
    for start in range(0, num_samples, batch_size):
        count = min(batch_size, num_samples - start)
        z = torch.randn(count, generator.style_dim, generator=rng).to(device)
        styles.append(module.modulation(generator.style(z)).float())
    return torch.cat(styles).std(0) * truncation


def _style_layer(generator: nn.Module, layer: int) -> tuple[str, nn.Module, int]:
    layers = style_layers(generator)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer: StyleSpace layer index must be in [0, {len(layers)}), got {layer}")
    return layers[layer]


@contextlib.contextmanager
def stylespace_edit(
    generator: nn.Module, layer: int, channel: int, delta: float | torch.Tensor
) -> Iterator[None]:
    """Within the block, add `delta` to channel `channel` of StyleSpace layer `layer`'s style s.

    Args:
        generator: a refinestyle Generator (rosinality layout).
        layer: StyleSpace layer index (see `style_layers`).
        channel: input-channel index of that layer's modulated conv.
        delta: the offset in s units; a number or a [B] tensor (one per sample). Multiply a
            strength by `style_channel_stddev(...)[channel]` for StyleSpace's usual units.

    Implemented as a forward hook on the layer's affine (`modulation`); the hook is removed
    when the block ends, even on error. A synthesis compiled by `compile_synthesis` does not
    see a hook added after it was compiled: `render_edit` renders such an edit eagerly.
    """
    name, module, _ = _style_layer(generator, layer)
    in_channels = module.modulation.weight.shape[0]
    if not 0 <= channel < in_channels:
        raise ValueError(f"channel: layer {layer} ({name}) has {in_channels} style channels, got {channel}")

    def add_offset(_module, _inputs, styles):
        offset = torch.as_tensor(delta, dtype=styles.dtype, device=styles.device)
        if offset.ndim == 0:
            offset = offset.expand(styles.shape[0])
        if offset.shape != (styles.shape[0],):
            raise ValueError(f"delta: expected a number or [B={styles.shape[0]}] tensor, got {tuple(offset.shape)}")
        styles = styles.clone()
        styles[:, channel] = styles[:, channel] + offset
        return styles

    handle = module.modulation.register_forward_hook(add_offset)
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------
# Rendering a strip of strengths


@dataclass
class EditSpec:
    """One edit, applicable at any strength.

    kind: "interfacegan", "ganspace" or "stylespace".
    boundary: [1, n_latent, style_dim] for interfacegan.
    directions, component: for ganspace.
    layers: w+ indices for interfacegan/ganspace (None: all).
    style_layer, channel, unit: for stylespace; the offset is strength * unit.
    """

    kind: str
    boundary: torch.Tensor | None = None
    directions: GANSpaceDirections | None = None
    component: int = 0
    layers: Sequence[int] | None = None
    style_layer: int = 0
    channel: int = 0
    unit: float = 1.0

    def describe(self) -> str:
        if self.kind == "interfacegan":
            return f"interfacegan layers={self.layers or 'all'}"
        if self.kind == "ganspace":
            return f"ganspace component={self.component} layers={self.layers or 'all'}"
        return f"stylespace layer={self.style_layer} channel={self.channel} unit={self.unit:.4g}"


@torch.no_grad()
def render_edit(
    generator: nn.Module,
    w_plus: torch.Tensor,
    refinement,
    edit: EditSpec,
    strength: float,
) -> torch.Tensor:
    """Render codes edited at one strength, with the images' residuals; returns [B, 3, R, R].

    Args:
        generator: the frozen generator (its `synthesis(w_plus, refinement=..., randomize_noise=False)`).
        w_plus: [B, n_latent, style_dim] inverted codes.
        refinement: the images' `Refinement` (per-sample tokens), or None for w+ only.
        edit: what to change.
        strength: edit strength (InterFaceGAN: along the unit normal; GANSpace: in stddevs;
            StyleSpace: in units of `edit.unit`).
    Noise inputs are the generator's fixed noise buffers, so strengths differ only by the edit.
    """
    _check_w_plus(w_plus, getattr(generator, "style_dim", None))
    if edit.kind == "interfacegan":
        codes = interfacegan_edit(w_plus, edit.boundary, strength, edit.layers)
    elif edit.kind == "ganspace":
        codes = ganspace_edit(w_plus, edit.directions, edit.component, strength, edit.layers)
    elif edit.kind == "stylespace":
        synthesis = generator.synthesis
        if getattr(generator, "synthesis_is_compiled", False):  # a compiled graph would miss the hook
            synthesis = type(generator).synthesis.__get__(generator)
        with stylespace_edit(generator, edit.style_layer, edit.channel, strength * edit.unit):
            return synthesis(w_plus, refinement=refinement, randomize_noise=False)
    else:
        raise ValueError(f"edit.kind: expected interfacegan, ganspace or stylespace, got {edit.kind!r}")
    return generator.synthesis(codes, refinement=refinement, randomize_noise=False)


def edit_metadata(edit: EditSpec, strengths: Sequence[float]) -> str:
    """A JSON line describing an edit strip (written next to the pictures)."""
    return json.dumps({"edit": edit.describe(), "strengths": list(map(float, strengths))})
