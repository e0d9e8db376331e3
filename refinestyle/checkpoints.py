"""Load StyleGAN2 generators from local checkpoint files: rosinality .pt and NVlabs .pkl.

`load_generator(path)` detects the format from the file's first bytes:

- PyTorch checkpoints (torch.save, zip or legacy format), read with
  torch.load(weights_only=True): rosinality/stylegan2-pytorch's
  {"g_ema": state_dict, "latent_avg": [512], ...} (convert_weight.py output and
  train.py checkpoints, whose argparse `args` are allowed), a bare g_ema
  state_dict, or a pSp/e4e/HyperStyle-style {"state_dict": {"decoder.*": ...},
  "latent_avg": ...}. Size, style_dim, n_mlp and the channel table are read from
  the tensors.
- safetensors files holding a g_ema state_dict (and optionally "latent_avg"),
  as written by `save_rosinality_checkpoint(..., "g.safetensors")`.
- NVlabs stylegan2-ada-pytorch / stylegan3 network pickles (StyleGAN2 config):
  {"G_ema": Generator, ...}. They are read with a restricted unpickler that never
  imports NVlabs' dnnlib/torch_utils/training code and never executes the source
  code the pickle carries: NVlabs' persistent classes become inert records of their
  state, tensors are rebuilt with torch's own allow-listed rebuild functions, and
  any other global is refused. The tensors are then renamed to rosinality's names;
  the conversion is a renaming because NVlabs' gains equal rosinality's (see
  `convert_nvlabs_generator`).

Nothing is downloaded; a missing file raises MissingWeightsError, and a file in
the wrong format, corrupt or with mismatched shapes raises CheckpointError (a
ValueError) that says what was expected and what was found.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import math
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from refinestyle.generator import Generator, default_channels
from refinestyle_kernels import EqualLinear
from refinestyle.weights import resolve_weights, save_safetensors, weights_fingerprint

__all__ = [
    "CheckpointError",
    "NVlabsObject",
    "convert_nvlabs_generator",
    "generator_fingerprint",
    "infer_generator_config",
    "load_generator",
    "read_nvlabs_pickle",
    "read_rosinality_state",
    "save_rosinality_checkpoint",
]

GENERATOR_ENV_VAR = "REFINESTYLE_GENERATOR"
OBTAINED_FROM = (
    "a StyleGAN2 training run or a published checkpoint: rosinality/stylegan2-pytorch (.pt, e.g. the output of "
    "its convert_weight.py) or NVlabs/stylegan2-ada-pytorch / stylegan3 (.pkl)"
)
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# rosinality's mapping lr multiplier, which its files do not record; and where our files record conv_clamp
ROSINALITY_LR_MLP = 0.01
CONV_CLAMP_KEY = "conv_clamp"
_DEFAULT_FIR = (1.0, 3.0, 3.0, 1.0)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded as a StyleGAN2 generator (wrong format, corrupt, mismatched)."""


# ============================================================================ public API


def load_generator(
    path: Optional[str | os.PathLike],
    device: str | torch.device = "cpu",
    size: Optional[int] = None,
    *,
    backend: str = "auto",
) -> Generator:
    """Build a refinestyle.Generator from a local checkpoint file and load its weights.

    Args:
        path: a rosinality .pt, a safetensors file or an NVlabs .pkl (see the module
            docstring); None falls back to the REFINESTYLE_GENERATOR environment variable.
        device: where the generator goes ("cpu" by default).
        size: the expected output resolution; None accepts whatever the file holds, an
            integer raises CheckpointError when the file holds another size.
        backend: the op backend of the generator's convs ("auto": triton on CUDA, torch on CPU).

    Returns:
        The generator in eval mode, float32, with
        - `latent_avg` [style_dim]: the checkpoint's mean w (rosinality's "latent_avg",
          NVlabs' mapping.w_avg), or None when the file has none; forward() uses it as the
          default truncation_latent;
        - `conv_clamp`: NVlabs' conv_clamp (None for rosinality's own files; the files
          `save_rosinality_checkpoint` writes record it);
        - `checkpoint_format`: "rosinality", "safetensors" or "nvlabs".
        The mapping's lr multiplier cannot be read from a rosinality file and is taken
        as 0.01 (rosinality's default); NVlabs pickles record theirs.

    Raises:
        MissingWeightsError: no file at `path`.
        CheckpointError: an unrecognised, corrupt or mismatched file (the message says
            what was expected and what was found).
    """
    path = resolve_weights(
        path, what="StyleGAN2 generator checkpoint", env_var=GENERATOR_ENV_VAR, obtained_from=OBTAINED_FROM
    )
    file_format = _sniff_format(path)
    if file_format == "nvlabs":
        state_dict, latent_avg, config = convert_nvlabs_generator(read_nvlabs_pickle(path), source=str(path))
    else:
        if file_format == "safetensors":
            state_dict, latent_avg, conv_clamp = _read_safetensors(path)
        else:
            checkpoint = _torch_load(path)
            state_dict, latent_avg = read_rosinality_state(checkpoint, source=str(path))
            # our own addition to the format (save_rosinality_checkpoint); rosinality's code ignores it
            conv_clamp = checkpoint.get(CONV_CLAMP_KEY) if isinstance(checkpoint, dict) else None
        config = infer_generator_config(state_dict, source=str(path))
        config["conv_clamp"] = _stored_conv_clamp(conv_clamp, source=str(path))
    if size is not None and config["size"] != size:
        raise CheckpointError(f"size={size} was asked for, but {path} holds a {config['size']} px generator")
    conv_clamp = config.pop("conv_clamp", None)
    generator = Generator(**config, backend=backend)
    _load_state_checked(generator, state_dict, source=str(path))
    generator.conv_clamp = conv_clamp
    if latent_avg is not None:
        latent_avg = _normalise_latent_avg(latent_avg, generator, source=str(path))
        generator.latent_avg = latent_avg
    generator.checkpoint_format = file_format if file_format != "torch" else "rosinality"
    return generator.to(device).eval()


def save_rosinality_checkpoint(
    generator: Generator, path: str | os.PathLike, latent_avg: Optional[torch.Tensor] = None
) -> Path:
    """Write `generator` as a rosinality checkpoint: {"g_ema": state_dict, "latent_avg": [style_dim]}.

    path: a ".safetensors" suffix writes a safetensors file (tensors named as in the
        state_dict, plus "latent_avg"); anything else writes torch.save's format, which
        rosinality's code and `load_generator` read.
    latent_avg: [style_dim] mean w; defaults to generator.latent_avg (omitted when None).
    Returns the path written.

    `load_generator` reads the file back into a generator that renders the same images:
    a mapping lr multiplier other than rosinality's 0.01 (an NVlabs network's, say) is folded
    into the stored mapping weights, and a conv_clamp is recorded (the "conv_clamp" entry of
    the .pt dict, the safetensors metadata), which rosinality's own code ignores.
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    if latent_avg is None:
        latent_avg = getattr(generator, "latent_avg", None)
    if latent_avg is not None and latent_avg.numel() != generator.style_dim:
        raise ValueError(f"latent_avg: expected [style_dim={generator.style_dim}], got {tuple(latent_avg.shape)}")
    state_dict = {key: value.detach().cpu() for key, value in generator.state_dict().items()}
    _fold_mapping_lr(state_dict, generator)
    conv_clamp = generator.conv_clamp
    if path.suffix == ".safetensors":
        tensors = {key: value.contiguous() for key, value in state_dict.items()}
        if latent_avg is not None:
            tensors["latent_avg"] = latent_avg.detach().cpu().reshape(-1).contiguous()
        metadata = {"format": "rosinality-g_ema", "size": str(generator.size)}
        if conv_clamp is not None:
            metadata[CONV_CLAMP_KEY] = repr(conv_clamp)
        save_safetensors(tensors, path, metadata)
    else:
        checkpoint: dict[str, Any] = {"g_ema": state_dict}
        if latent_avg is not None:
            checkpoint["latent_avg"] = latent_avg.detach().cpu().reshape(-1)
        if conv_clamp is not None:
            checkpoint[CONV_CLAMP_KEY] = conv_clamp
        torch.save(checkpoint, path)
    return path


def generator_fingerprint(generator: Generator) -> str:
    """A deterministic sha256 hex digest of a generator's weights (`refinestyle.weights.weights_fingerprint`:
    parameters only; the stored noise maps and mean w are not weights, and some checkpoints lack
    them), as `save_rosinality_checkpoint` stores them: a mapping lr multiplier other than 0.01
    (an NVlabs network's) is folded in first, so the re-saved file keeps the digest. Tells whether
    an adapter or a resumed inverter run meets the generator it was trained with."""
    parameters = dict(generator.named_parameters())
    if getattr(generator, "lr_mlp", ROSINALITY_LR_MLP) != ROSINALITY_LR_MLP:
        _fold_mapping_lr(parameters, generator)
    return weights_fingerprint(generator, parameters)


def _fold_mapping_lr(state_dict: dict[str, torch.Tensor], generator: Generator) -> None:
    """Rescale the mapping's stored weights and biases, in place, so that rosinality's lr
    multiplier (ROSINALITY_LR_MLP, which a loader assumes) gives the generator's own products:
    EqualLinear uses weight * lr_mul / sqrt(in) and bias * lr_mul."""
    factor = generator.lr_mlp / ROSINALITY_LR_MLP
    if factor == 1:
        return
    for name, module in generator.style.named_children():
        if isinstance(module, EqualLinear):
            for kind in ("weight", "bias"):
                key = f"style.{name}.{kind}"
                if key in state_dict:
                    state_dict[key] = state_dict[key] * factor


# ============================================================================ format detection


def _sniff_format(path: Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(64)
    if not head:
        raise CheckpointError(f"{path} is empty: expected a StyleGAN2 checkpoint (.pt, .safetensors or .pkl)")
    if head.startswith(b"PK\x03\x04"):
        return "torch"  # torch.save's zip format
    if head[:1] == b"\x80":  # a pickle (protocol >= 2)
        body = head[2:]
        if body[:1] == b"\x95":  # protocol >= 4 opens with a FRAME opcode and its 8-byte length
            body = body[9:]
        if body[:2] == b"\x8a\x0a" and int.from_bytes(body[2:12], "little") == _TORCH_LEGACY_MAGIC:
            return "torch"  # torch.save's legacy format starts with its magic number
        return "nvlabs"
    if len(head) > 8 and head[8:9] == b"{":
        return "safetensors"  # 8-byte header length, then the JSON header
    raise CheckpointError(
        f"{path} is not a recognised checkpoint: expected a PyTorch checkpoint (torch.save, zip or legacy), a "
        f"safetensors file or an NVlabs network pickle; the file starts with {head[:16]!r}"
    )


# ============================================================================ rosinality / PyTorch


@contextlib.contextmanager
def _rosinality_safe_globals():
    # rosinality's train.py stores its argparse arguments; a Namespace only holds attributes
    allowed = [argparse.Namespace]
    if hasattr(torch.serialization, "safe_globals"):
        with torch.serialization.safe_globals(allowed):
            yield
    else:  # torch 2.4
        torch.serialization.add_safe_globals(allowed)
        yield


def _torch_load(path: Path) -> Any:
    try:
        with _rosinality_safe_globals():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported operand" in str(error):  # e.g. 149, FRAME: torch.save(..., pickle_protocol=4)
            raise CheckpointError(
                f"{path}: written with a pickle protocol that torch.load(weights_only=True) cannot read (it stops "
                "at an opcode of protocol 4 or later); load it once in a trusted session and save it again with "
                "torch.save's default protocol, or use save_rosinality_checkpoint"
            ) from error
        raise CheckpointError(
            f"{path}: torch.load(weights_only=True) refused an object in the file ({error}). A StyleGAN2 "
            "checkpoint holds tensors, dicts and plain values only; nothing else is unpickled."
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as error:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (corrupt or truncated?): {error}") from error


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], Optional[torch.Tensor], Optional[float]]:
    """(state_dict, latent_avg or None, conv_clamp or None) of a safetensors generator file."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file (corrupt or truncated?): {error}") from error
    latent_avg = tensors.pop("latent_avg", None)
    return tensors, latent_avg, metadata.get(CONV_CLAMP_KEY)  # checked by _stored_conv_clamp


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) for k in obj) and any(
        k.endswith("style.1.weight") for k in obj
    )


def _strip_prefix(state_dict: dict, prefix: str) -> dict:
    if state_dict and all(key.startswith(prefix) for key in state_dict):
        return {key[len(prefix) :]: value for key, value in state_dict.items()}
    return state_dict


def read_rosinality_state(checkpoint: Any, source: str = "checkpoint") -> tuple[dict, Optional[torch.Tensor]]:
    """The g_ema state_dict and latent_avg (or None) of a loaded rosinality-style checkpoint object.

    checkpoint: what torch.load returned: {"g_ema": ..., "latent_avg": ...}, a bare g_ema
        state_dict, or {"state_dict": {"decoder.<name>": ...}, "latent_avg": ...} (pSp/e4e).
    """
    latent_avg = None
    if isinstance(checkpoint, dict) and "g_ema" in checkpoint:
        state_dict = checkpoint["g_ema"]
        latent_avg = checkpoint.get("latent_avg")
    elif _is_state_dict(checkpoint):
        state_dict = checkpoint
    elif isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict) and any(
        str(key).startswith("decoder.") for key in checkpoint["state_dict"]
    ):
        state_dict = {k[len("decoder.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("decoder.")}
        latent_avg = checkpoint.get("latent_avg")
    else:
        found = sorted(map(str, checkpoint))[:12] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(
            f"{source}: expected a rosinality StyleGAN2 checkpoint ({{'g_ema': state_dict, 'latent_avg': ...}} or a "
            f"bare g_ema state_dict with keys like 'style.1.weight'); found {found}"
        )
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{source}: expected 'g_ema' to be a state_dict, found {type(state_dict).__name__}")
    state_dict = _strip_prefix(dict(state_dict), "module.")  # saved from DataParallel
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
    if latent_avg is not None and not isinstance(latent_avg, torch.Tensor):
        raise CheckpointError(f"{source}: expected 'latent_avg' to be a tensor, found {type(latent_avg).__name__}")
    return state_dict, latent_avg


def infer_generator_config(state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, Any]:
    """Generator(...) keyword arguments for a rosinality-named g_ema state_dict.

    Reads style_dim and n_mlp from `style.{i}.weight`, the size from the number of
    `to_rgbs`, and the channel table from `input.input` and the convs; expresses the
    table as channel_multiplier/channel_max when rosinality's formula gives it, else
    as an explicit `channels` dict.
    """

    def tensor(key: str) -> torch.Tensor:
        if key not in state_dict:
            sample = ", ".join(sorted(state_dict)[:8])
            raise CheckpointError(
                f"{source}: expected a rosinality StyleGAN2 g_ema state_dict with {key!r}; found keys {sample}, ..."
            )
        return state_dict[key]

    style = tensor("style.1.weight")
    if style.ndim != 2 or style.shape[0] != style.shape[1]:
        raise CheckpointError(f"{source}: expected 'style.1.weight' [style_dim, style_dim], found {tuple(style.shape)}")
    style_dim = style.shape[1]
    n_mlp = 0
    while f"style.{n_mlp + 1}.weight" in state_dict:
        n_mlp += 1
    num_blocks = 0
    while f"to_rgbs.{num_blocks}.conv.weight" in state_dict:
        num_blocks += 1
    size = 2 ** (num_blocks + 2)
    constant = tensor("input.input")
    if constant.ndim != 4 or tuple(constant.shape[2:]) != (4, 4):
        raise CheckpointError(f"{source}: expected 'input.input' [1, C, 4, 4], found {tuple(constant.shape)}")
    channels = {4: int(constant.shape[1])}
    for block in range(num_blocks):
        weight = tensor(f"convs.{2 * block + 1}.conv.weight")
        if weight.ndim != 5:
            raise CheckpointError(
                f"{source}: expected 'convs.{2 * block + 1}.conv.weight' [1, Cout, Cin, 3, 3], found {tuple(weight.shape)}"
            )
        channels[2 ** (block + 3)] = int(weight.shape[1])
    return dict(size=size, style_dim=style_dim, n_mlp=n_mlp, **_channel_arguments(channels, size))


def _channel_arguments(channels: dict[int, int], size: int) -> dict[str, Any]:
    multipliers = [2, 1]
    if size >= 64:
        multipliers.insert(0, max(1, channels[size] * size // 16384))
    for multiplier in multipliers:
        for channel_max in (None, 512, max(channels.values())):  # rosinality's (uncapped), NVlabs' cap, any cap
            if default_channels(size, multiplier, channel_max) == channels:
                if channel_max is None:
                    return {"channel_multiplier": multiplier}
                return {"channel_multiplier": multiplier, "channel_max": channel_max}
    return {"channels": channels}


def _load_state_checked(generator: Generator, state_dict: dict[str, torch.Tensor], source: str) -> None:
    expected = generator.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key}: expected {tuple(expected[key].shape)}, found {tuple(state_dict[key].shape)}"
        for key in expected
        if key in state_dict and tuple(state_dict[key].shape) != tuple(expected[key].shape)
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} tensors ({', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''})")
        if unexpected:
            problems.append(
                f"{len(unexpected)} unexpected tensors ({', '.join(unexpected[:6])}{', ...' if len(unexpected) > 6 else ''})"
            )
        if mismatched:
            problems.append(f"shape mismatches: {'; '.join(mismatched[:6])}{'; ...' if len(mismatched) > 6 else ''}")
        raise CheckpointError(
            f"{source} does not match a StyleGAN2 generator of size {generator.size} with channels "
            f"{generator.channels}: " + "; ".join(problems)
        )
    for key in expected:
        if key.endswith("blur.kernel") or key.endswith("upsample.kernel"):
            if not torch.allclose(state_dict[key].float(), expected[key].float(), atol=1e-6):
                raise CheckpointError(
                    f"{source}: {key} is not the [1, 3, 3, 1] FIR filter (x4) that the fused op implements; found "
                    f"{state_dict[key].tolist()}"
                )
    for key, value in state_dict.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"{source}: tensor {key} holds NaN or infinite values")
    generator.load_state_dict({key: value.float() for key, value in state_dict.items()}, strict=True)


def _stored_conv_clamp(value, source: str) -> Optional[float]:
    """The conv_clamp recorded in one of our .pt / .safetensors files: None or a positive finite number."""
    if value is None:
        return None
    try:
        clamp = float(value)
    except (TypeError, ValueError):
        clamp = math.nan
    if not (math.isfinite(clamp) and clamp > 0):
        raise CheckpointError(f"{source}: its {CONV_CLAMP_KEY!r} entry must be a positive number, found {value!r}")
    return clamp


def _normalise_latent_avg(latent_avg: torch.Tensor, generator: Generator, source: str) -> Optional[torch.Tensor]:
    latent_avg = latent_avg.detach().float()
    if latent_avg.shape[-1:] != (generator.style_dim,):
        raise CheckpointError(
            f"{source}: expected latent_avg [{generator.style_dim}] (the mean w), found {tuple(latent_avg.shape)}"
        )
    if not torch.isfinite(latent_avg).all():
        raise CheckpointError(f"{source}: latent_avg (the mean w that truncation pulls towards) holds NaN or inf")
    rows = latent_avg.reshape(-1, generator.style_dim)
    if rows.shape[0] > 1 and not torch.allclose(rows, rows[:1].expand_as(rows)):
        warnings.warn(f"{source}: latent_avg has {rows.shape[0]} different rows; it is not attached", stacklevel=3)
        return None
    return rows[0].clone()


# ============================================================================ NVlabs pickles


class _Refused(pickle.UnpicklingError):
    """The restricted unpickler refused something in the file (as opposed to a damaged file)."""


class NVlabsObject:
    """Inert record of a pickled NVlabs object (a persistent nn.Module such as Generator).

    Nothing of NVlabs' code is imported or executed: `class_name` is the name the pickle
    gives, `state` the object's pickled __dict__ (for a torch module: `_parameters`,
    `_buffers`, `_modules` and plain attributes such as `conv_clamp`).
    """

    __slots__ = ("module_name", "class_name", "state", "args")

    def __init__(self, module_name: str, class_name: str, state: Any = None, args: tuple = ()):
        self.module_name = module_name
        self.class_name = class_name
        self.state = state if state is not None else {}
        self.args = args

    def __setstate__(self, state):  # for objects pickled by their class rather than through persistence
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = state[0]
        self.state = state

    # -- navigation helpers (nn.Module layout)
    def _section(self, name: str) -> dict:
        section = self.state.get(name) if isinstance(self.state, dict) else None
        return section if isinstance(section, dict) else {}

    @property
    def modules(self) -> dict:
        return self._section("_modules")

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        found = {**self._section("_parameters"), **self._section("_buffers")}
        return {k: v for k, v in found.items() if isinstance(v, torch.Tensor)}

    def attribute(self, name: str, default: Any = None) -> Any:
        return self.state.get(name, default) if isinstance(self.state, dict) else default

    def __repr__(self) -> str:
        return f"NVlabsObject({self.module_name}.{self.class_name})"


def _persistent_object(meta: Any) -> NVlabsObject:
    """Stands in for torch_utils.persistence._reconstruct_persistent_obj: records, never runs module_src."""
    if not isinstance(meta, dict) or not isinstance(meta.get("class_name"), str):
        raise _Refused("malformed NVlabs persistent object (expected a meta dict with 'class_name')")
    state = meta.get("state")
    if isinstance(state, tuple) and len(state) == 2:
        state = state[0]
    return NVlabsObject("<persistent>", meta["class_name"], state if isinstance(state, dict) else {})


class _EasyDict(dict):
    """Stands in for dnnlib.EasyDict (a dict with attribute access); only its items are kept."""


def _latin1_encode(text, encoding="latin1"):
    # protocol-2 pickles store bytes as _codecs.encode(str, "latin1")
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused("refused _codecs.encode call that is not a latin1 bytes literal")
    return text.encode("latin1")


def _load_storage_from_bytes(data: bytes):
    # torch pickles a storage as torch.save's legacy bytes; read them with torch's weights-only unpickler
    if not isinstance(data, (bytes, bytearray)):
        raise _Refused("torch storage payload is not bytes")
    try:
        storage = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise _Refused(f"torch's weights-only loader refused a storage payload: {error}") from error
    if not isinstance(storage, (torch.UntypedStorage, torch.TypedStorage)):
        raise _Refused(f"torch storage payload held a {type(storage).__name__}, not a storage")
    return storage


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    if not isinstance(storage, torch.TypedStorage):
        raise _Refused(f"tensor rebuilt from a {type(storage).__name__}, not a typed torch storage")
    geometry = (storage_offset, *size, *stride)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in geometry) or len(size) != len(stride):
        raise _Refused(f"tensor with an invalid geometry (offset {storage_offset!r}, size {size!r}, stride {stride!r})")
    # torch would grow a storage too short for the view, with uninitialised memory: refuse it
    last = storage_offset + sum((extent - 1) * step for extent, step in zip(size, stride))
    elements = storage._untyped_storage.nbytes() // storage.dtype.itemsize  # (TypedStorage.size() warns)
    if all(size) and last >= elements:
        raise _Refused(f"tensor of size {tuple(size)} reaches element {last} of a storage of {elements}")
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, False, collections.OrderedDict())


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    if not isinstance(data, torch.Tensor):
        raise _Refused(f"parameter rebuilt from a {type(data).__name__}, not a tensor")
    return data  # a plain tensor is all the conversion needs


def _plain_numeric_dtype(dtype) -> np.dtype:
    """dtype itself if it is a plain number type (bool, int, uint, float, complex); numpy fills
    arrays of object or structured dtypes from the pickle's bytes unchecked (a crash, at best)."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc" or dtype.hasobject or dtype.fields is not None:
        raise _Refused(f"refused a numpy dtype other than a plain number type: {dtype!r}")
    return dtype


def _numpy_dtype(spec, align=False, copy=False):
    return _plain_numeric_dtype(np.dtype(spec, align, copy))


class _CheckedArray(np.ndarray):
    """What `_numpy_reconstruct` makes: numpy's own array, whose pickled state (filled in by the
    unpickler's BUILD) is checked first: a plain number dtype, and exactly the bytes it needs."""

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5):
            raise _Refused("refused a numpy array state of an unknown form")
        _version, shape, dtype, _fortran, data = state
        _plain_numeric_dtype(dtype)
        if not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)):
            raise _Refused(f"refused a numpy array of shape {shape!r}")
        if not isinstance(data, (bytes, bytearray)) or len(data) != math.prod(shape) * dtype.itemsize:
            raise _Refused(f"refused a numpy array whose data does not fit its shape {shape} and dtype {dtype}")
        super().__setstate__(state)


def _numpy_reconstruct(subtype, shape, dtype_code):
    if subtype is not np.ndarray:
        raise _Refused("refused a numpy array subclass")
    return np.ndarray.__new__(_CheckedArray, (0,), np.uint8)


def _numpy_scalar(dtype, data=None):
    _plain_numeric_dtype(dtype)
    if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
        raise _Refused(f"refused a numpy scalar whose data does not fit its dtype {dtype}")
    return _numpy_multiarray().scalar(dtype, data)


def _numpy_multiarray():
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    return multiarray


_NVLABS_PACKAGES = ("dnnlib", "torch_utils", "training", "metrics", "legacy", "networks")


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles an NVlabs network pickle without importing or running anything of NVlabs'."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source
        self.allowed = {
            ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_object,
            ("dnnlib.util", "EasyDict"): _EasyDict,
            ("dnnlib", "EasyDict"): _EasyDict,
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
            ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("builtins", "set"): set,
            ("builtins", "frozenset"): frozenset,
            ("builtins", "slice"): slice,
            ("_codecs", "encode"): _latin1_encode,
            ("numpy", "dtype"): _numpy_dtype,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy.core.multiarray", "scalar"): _numpy_scalar,
            ("numpy._core.multiarray", "scalar"): _numpy_scalar,
            ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
        }

    def find_class(self, module: str, name: str):
        if module == "__builtin__":  # protocol-2 pickles written by Python 2 naming
            module = "builtins"
        found = self.allowed.get((module, name))
        if found is not None:
            return found
        if module.startswith("dnnlib.tflib"):
            raise CheckpointError(
                f"{self.source} is a TensorFlow StyleGAN2 pickle ({module}.{name}); convert it first, e.g. with "
                "rosinality/stylegan2-pytorch's convert_weight.py or NVlabs stylegan2-ada-pytorch's legacy.py"
            )
        if module.split(".")[0] in _NVLABS_PACKAGES:
            # an NVlabs class pickled by reference: an inert record class, never the real one
            return type(name, (NVlabsObject,), {"__slots__": (), "__new__": _stand_in_new(module, name)})
        raise _Refused(
            f"refusing to load {module}.{name} from {self.source}: an NVlabs network pickle only needs torch tensors, "
            "numpy scalars and NVlabs' own (inert) classes"
        )


def _stand_in_new(module: str, name: str):
    def __new__(cls, *args, **kwargs):
        return NVlabsObject(module, name, args=args)

    return __new__


def read_nvlabs_pickle(path: str | os.PathLike) -> NVlabsObject:
    """The G_ema of an NVlabs stylegan2-ada-pytorch / stylegan3 network pickle, as an inert NVlabsObject tree.

    Accepts the training snapshot {"G": ..., "D": ..., "G_ema": ..., ...} or a pickled
    generator alone. Raises CheckpointError for anything else, corrupt files included.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = _RestrictedUnpickler(handle, str(path)).load()
    except CheckpointError:
        raise
    except _Refused as error:
        raise CheckpointError(f"{path}: {error}") from error
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError, OverflowError) as error:
        raise CheckpointError(f"{path} is not a readable pickle (corrupt or truncated?): {type(error).__name__}: {error}") from error
    if isinstance(data, dict) and "G_ema" in data:
        generator = data["G_ema"]
    elif isinstance(data, NVlabsObject):
        generator = data
    else:
        found = sorted(map(str, data))[:12] if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(
            f"{path}: expected an NVlabs network pickle with 'G_ema' (stylegan2-ada-pytorch / stylegan3); found {found}"
        )
    if not isinstance(generator, NVlabsObject) or generator.class_name != "Generator":
        raise CheckpointError(f"{path}: expected G_ema to be an NVlabs Generator, found {generator!r}")
    return generator


def _as_float(value: Any, default: float) -> float:
    if value is None:
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def convert_nvlabs_generator(
    generator: NVlabsObject, source: str = "NVlabs pickle"
) -> tuple[dict[str, torch.Tensor], Optional[torch.Tensor], dict[str, Any]]:
    """Rename an NVlabs StyleGAN2 G_ema's tensors to rosinality's g_ema names.

    Returns (state_dict, latent_avg (w_avg) or None, Generator keyword arguments with
    "conv_clamp").

    No gain has to move: NVlabs' FullyConnectedLayer uses weight * lr/sqrt(in) and
    bias * lr like rosinality's EqualLinear; the affine layers (bias_init 1) are the
    `modulation` layers; SynthesisLayer's demodulated conv does not scale its weight
    while rosinality multiplies by 1/sqrt(Cin*9) before demodulating, which changes only
    the weight of the 1e-8 eps (relative effect ~1e-9); ToRGBLayer multiplies its styles
    by 1/sqrt(Cin), which is rosinality ToRGB's `scale`. NVlabs' upsampling conv
    (transposed, unflipped weight, then the FIR with padding (1, 1) and gain 4) and its
    skip upsampling (padding (2, 1)) are rosinality's. Kernels keep their layout
    [Cout, Cin, k, k] and gain a leading 1; noise_const [r, r] becomes noises.noise_i
    [1, 1, r, r]; noise_strength [] becomes noise.weight [1].
    """

    def child(parent: NVlabsObject, name: str, what: str) -> NVlabsObject:
        found = parent.modules.get(name)
        if not isinstance(found, NVlabsObject):
            raise CheckpointError(f"{source}: expected {what} ('{name}' in {parent.class_name}), found none")
        return found

    def tensor(module: NVlabsObject, name: str, where: str) -> torch.Tensor:
        found = module.tensors.get(name)
        if found is None:
            raise CheckpointError(f"{source}: expected tensor {where}.{name}, found {sorted(module.tensors)}")
        return found

    mapping = child(generator, "mapping", "a mapping network")
    synthesis = child(generator, "synthesis", "a synthesis network")
    if "b4" not in synthesis.modules:
        kind = "a StyleGAN3 (alias-free) synthesis network" if "input" in synthesis.modules else "no StyleGAN2 blocks"
        raise CheckpointError(
            f"{source}: expected a StyleGAN2 synthesis network with blocks b4, b8, ...; found {kind} "
            f"({', '.join(sorted(synthesis.modules)[:6])})"
        )
    if "embed" in mapping.modules or int(_as_float(mapping.attribute("c_dim"), 0)) > 0:
        raise CheckpointError(f"{source}: conditional generators (c_dim > 0) are not StyleGAN2 as rosinality builds it")

    state: dict[str, torch.Tensor] = {}
    # mapping: fc{i} -> style.{i+1}
    n_mlp = 0
    lr_multipliers = set()
    while f"fc{n_mlp}" in mapping.modules:
        layer = child(mapping, f"fc{n_mlp}", "a mapping layer")
        weight = tensor(layer, "weight", f"mapping.fc{n_mlp}")
        if weight.ndim != 2 or weight.shape[0] != weight.shape[1]:
            raise CheckpointError(
                f"{source}: expected mapping.fc{n_mlp}.weight [w_dim, w_dim] (z_dim = w_dim, as rosinality's "
                f"mapping), found {tuple(weight.shape)}"
            )
        if layer.attribute("activation", "lrelu") != "lrelu":
            raise CheckpointError(f"{source}: mapping.fc{n_mlp} uses activation {layer.attribute('activation')!r}, not lrelu")
        state[f"style.{n_mlp + 1}.weight"] = weight
        state[f"style.{n_mlp + 1}.bias"] = tensor(layer, "bias", f"mapping.fc{n_mlp}")
        lr_multipliers.add(round(_as_float(layer.attribute("bias_gain"), 0.01), 12))
        n_mlp += 1
    if n_mlp == 0:
        raise CheckpointError(f"{source}: expected mapping layers fc0, fc1, ...; found {sorted(mapping.modules)}")
    if len(lr_multipliers) != 1:
        raise CheckpointError(f"{source}: mapping layers use different lr multipliers {sorted(lr_multipliers)}")
    style_dim = state["style.1.weight"].shape[0]
    latent_avg = mapping.tensors.get("w_avg")

    # synthesis: b{res}.conv0/conv1/torgb
    resolutions = []
    resolution = 4
    while f"b{resolution}" in synthesis.modules:
        resolutions.append(resolution)
        resolution *= 2
    size = resolutions[-1]
    declared = synthesis.attribute("img_resolution")
    if declared is not None and int(declared) != size:
        raise CheckpointError(f"{source}: synthesis declares img_resolution={declared} but has blocks up to b{size}")

    clamps = set()
    channels = {}
    fir = torch.tensor(_DEFAULT_FIR)
    fir = torch.outer(fir, fir) / torch.outer(fir, fir).sum()

    def convert_layer(layer: NVlabsObject, where: str, target: str, noise_index: int, resolution: int) -> int:
        weight = tensor(layer, "weight", where)
        if weight.ndim != 4 or tuple(weight.shape[2:]) != (3, 3):
            raise CheckpointError(f"{source}: expected {where}.weight [Cout, Cin, 3, 3], found {tuple(weight.shape)}")
        if layer.attribute("activation", "lrelu") != "lrelu":
            raise CheckpointError(f"{source}: {where} uses activation {layer.attribute('activation')!r}, not lrelu")
        affine = child(layer, "affine", f"{where}'s affine layer")
        state[f"{target}.conv.weight"] = weight[None]
        state[f"{target}.conv.modulation.weight"] = tensor(affine, "weight", f"{where}.affine")
        state[f"{target}.conv.modulation.bias"] = tensor(affine, "bias", f"{where}.affine")
        state[f"{target}.activate.bias"] = tensor(layer, "bias", where)
        if "noise_const" in layer.tensors:
            state[f"{target}.noise.weight"] = tensor(layer, "noise_strength", where).reshape(1)
            state[f"noises.noise_{noise_index}"] = layer.tensors["noise_const"].reshape(1, 1, resolution, resolution)
        else:  # use_noise=False: no noise at all
            state[f"{target}.noise.weight"] = torch.zeros(1)
            state[f"noises.noise_{noise_index}"] = torch.zeros(1, 1, resolution, resolution)
        filt = layer.tensors.get("resample_filter")
        if filt is not None and (filt.shape != fir.shape or not torch.allclose(filt.float(), fir, atol=1e-6)):
            raise CheckpointError(f"{source}: {where} resamples with {filt.tolist()}, not the [1, 3, 3, 1] filter")
        clamps.add(layer.attribute("conv_clamp"))
        return int(weight.shape[0])

    def convert_torgb(block: NVlabsObject, where: str, target: str) -> None:
        torgb = child(block, "torgb", f"a toRGB layer in {where} (only the 'skip' architecture is supported)")
        weight = tensor(torgb, "weight", f"{where}.torgb")
        if weight.ndim != 4 or weight.shape[0] != 3 or tuple(weight.shape[2:]) != (1, 1):
            raise CheckpointError(f"{source}: expected {where}.torgb.weight [3, Cin, 1, 1], found {tuple(weight.shape)}")
        affine = child(torgb, "affine", f"{where}.torgb's affine layer")
        state[f"{target}.conv.weight"] = weight[None]
        state[f"{target}.conv.modulation.weight"] = tensor(affine, "weight", f"{where}.torgb.affine")
        state[f"{target}.conv.modulation.bias"] = tensor(affine, "bias", f"{where}.torgb.affine")
        state[f"{target}.bias"] = tensor(torgb, "bias", f"{where}.torgb").reshape(1, 3, 1, 1)
        clamps.add(torgb.attribute("conv_clamp"))

    for resolution in resolutions:
        where = f"synthesis.b{resolution}"
        block = child(synthesis, f"b{resolution}", f"block {where}")
        architecture = block.attribute("architecture", "skip")
        if architecture != "skip" or "skip" in block.modules:
            raise CheckpointError(f"{source}: {where} uses the {architecture!r} architecture; only 'skip' (StyleGAN2's) is supported")
        if resolution == 4:
            constant = tensor(block, "const", where)
            if constant.ndim != 3 or tuple(constant.shape[1:]) != (4, 4):
                raise CheckpointError(f"{source}: expected {where}.const [C, 4, 4], found {tuple(constant.shape)}")
            state["input.input"] = constant[None]
            channels[4] = convert_layer(child(block, "conv1", f"{where}.conv1"), f"{where}.conv1", "conv1", 0, 4)
            convert_torgb(block, where, "to_rgb1")
        else:
            index = int(math.log2(resolution)) - 3
            convert_layer(child(block, "conv0", f"{where}.conv0"), f"{where}.conv0", f"convs.{2 * index}", 2 * index + 1, resolution)
            channels[resolution] = convert_layer(
                child(block, "conv1", f"{where}.conv1"), f"{where}.conv1", f"convs.{2 * index + 1}", 2 * index + 2, resolution
            )
            convert_torgb(block, where, f"to_rgbs.{index}")
            fir4 = (fir * 4).float()
            state[f"convs.{2 * index}.conv.blur.kernel"] = fir4.clone()
            state[f"to_rgbs.{index}.upsample.kernel"] = fir4.clone()

    if len(clamps) != 1:
        raise CheckpointError(f"{source}: layers use different conv_clamp values {sorted(map(str, clamps))}")
    conv_clamp = clamps.pop()
    config = dict(
        size=size,
        style_dim=style_dim,
        n_mlp=n_mlp,
        lr_mlp=float(lr_multipliers.pop()),
        conv_clamp=None if conv_clamp is None else float(conv_clamp),
        **_channel_arguments(channels, size),
    )
    return state, latent_avg, config
