"""Training of the RefineStyle inverters, on one device or many (torchrun + DDP).

`train_inverter(TrainConfig(...))` trains a one-stage or two-stage inverter against a
frozen generator (paper section 3.3):

- the generator renders at its own resolution through the fused modulated-conv op
  (forward and backward); its output and the target are average-pooled to the loss
  resolution (256 px, or less for small generators) for L2 + LPIPS + ID;
- Ranger (RAdam + Lookahead), lr 1e-4 one-stage / 1e-3 two-stage, batch 8 per process;
- optional bf16 autocast and gradient checkpointing (the generator's layers);
- every `checkpoint_every` steps an atomic checkpoint (temporary file + os.replace)
  holding the trainable weights, the optimizer, the step, every process's RNG states
  and the position in the data; `resume=True` continues bit-for-bit;
- a tqdm progress bar, a CSV log of every loss term at every step (and TensorBoard
  when the package is installed and asked for), image grids (input | w+ only | refined),
  validation metrics on a held-out folder;
- DDP: run under `torchrun --nproc_per_node N`; the process group is initialised from
  the environment (nccl on GPUs, gloo on CPU), each process reads its own shard
  (DistributedSampler), rank 0 logs and writes checkpoints.

Run layout (`out`): `config.json`, `train_log.csv`, `val_log.csv`, `losses.png` (the
curves, redrawn at every checkpoint), `images/step_*.png`, `checkpoints/latest.pt`
(training state), `inverter.safetensors` (weights + config for `refinestyle invert`).
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import inspect
import json
import math
import os
import pickle
import random
import signal
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from refinestyle.checkpoints import generator_fingerprint
from refinestyle.distributed import DistributedContext, StopOnSignal, mean_over_processes, setup_distributed
from refinestyle.generator import COMPILE_MODES
from refinestyle.imageio import image_size_hw, pool_or_resize, same_aspect
from refinestyle.inversion.data import ImageFolderDataset, ResumableDistributedSampler
from refinestyle.inversion.inference import TRAINING_CHECKPOINT_FORMAT
from refinestyle.inversion.metrics import pool_to
from refinestyle.weights import weights_fingerprint

CHECKPOINT_NAME = "latest.pt"
INVERTER_NAME = "inverter.safetensors"
# Fields a resumed run may change (`out`: the run folder may have moved); the rest is the interrupted run's.
RESUME_OVERRIDABLE = (
    "out", "max_steps", "resume", "workers", "progress", "device", "log_every", "image_every",
    "val_every", "checkpoint_every", "tensorboard", "val_max_images", "compile",
)
# Files a resumed run may find elsewhere: taken from the new config only when the saved path no longer exists.
RESUME_RELOCATABLE = ("generator", "data", "val_data", "first_stage", "ir_se50", "lpips_backbone")
# Keyword arguments of the inverter classes that model_options cannot set: build_inverter sets them from
# other fields, or they take objects rather than JSON values.
_NOT_MODEL_OPTIONS = ("refine", "ir_se50_path", "encoder", "latent_avg", "latent_queries")  # set by loaders


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as `config.json` in the run folder).

    Paths:
        generator: the StyleGAN2 generator checkpoint (rosinality .pt; see refinestyle.checkpoints).
        data: training image folder (any jpg/png, searched recursively).
        out: the run folder.
        val_data: optional held-out image folder for validation metrics.
        first_stage: two-stage only: the frozen first stage: our w+ inverter (the
            `inverter.safetensors` of `refinestyle train-inverter --stage one --no-refine`) or a
            pretrained Style Transformer checkpoint (`best_model.pt`, the paper's setting).
        ir_se50: model_ir_se50.pth (ArcFace IR-SE50): initialises the encoder and drives the
            ID loss. Optional when id_weight is 0 (the encoder then starts from random weights).
        lpips_backbone: torchvision's AlexNet weights (alexnet-owt-*.pth) for LPIPS; required
            unless lpips_weight is 0 or lpips_random_backbone is set (tests only).
    Model:
        stage: "one" or "two".
        refine: one-stage only: False trains the w+ branch alone (Style Transformer's design;
            the result is a first stage for a two-stage model).
        num_refined: Nr, how many of the last conv layers get residuals (default 10 for
            one-stage, or all convs of a generator with fewer; all convs, 17 at 1024 px,
            for two-stage).
        num_tokens: L, tokens per layer (32).
        model_options: extra keyword arguments for the inverter class (e.g. encoder depth,
            attention heads; `model_option_names(stage)` lists them); stored with the weights.
    Losses: l2_weight, lpips_weight, id_weight (1.0 / 0.8 / 0.1); domain "face" or "other"
        ("other" switches the ID loss off). image_size: what images are read at, an int side
        (256) or [height, width] ([192, 256] for Stanford Cars, with domain "other"); the loss
        compares them with the renders at that size (smaller when the generator is). A size
        that is not square also sets the encoder's input size (its longer side 256, unless
        model_options gives `encoder_size`) and with it the part of the square canvas the
        pictures fill (`OneStageInverter.crop_canvas`).
        hflip: random horizontal flips of the training images.
    Optimisation: lr (None: 1e-4 one-stage, 1e-3 two-stage), batch_size per process (8),
        max_steps (None: 1M one-stage, 700k two-stage, as the paper), seed, bf16 (autocast), grad_checkpointing, backend of the modulated conv
        ("auto": Triton on GPU), deterministic (torch.use_deterministic_algorithms), compile
        (None, or a torch.compile mode for the generator's synthesis network, see
        Generator.compile_synthesis; a resumed run takes the value given now).
    Logging: log_every (CSV rows and progress bar; >= 1), image_every, val_every, val_max_images,
        checkpoint_every (0 disables periodic grids/validation/checkpoints; the final
        checkpoint is always written), tensorboard, progress.
    """

    generator: str
    data: str
    out: str
    stage: str = "one"
    val_data: str | None = None
    first_stage: str | None = None
    ir_se50: str | None = None
    lpips_backbone: str | None = None
    lpips_random_backbone: bool = False
    refine: bool = True
    num_refined: int | None = None
    num_tokens: int = 32
    model_options: dict = field(default_factory=dict)
    l2_weight: float = 1.0
    lpips_weight: float = 0.8
    id_weight: float = 0.1
    domain: str = "face"
    image_size: Any = 256
    hflip: bool = True
    lr: float | None = None
    batch_size: int = 8
    max_steps: int | None = None
    seed: int = 0
    workers: int = 4
    bf16: bool = False
    grad_checkpointing: bool = False
    backend: str = "auto"
    deterministic: bool = False
    compile: str | None = None
    device: str | None = None
    log_every: int = 1
    image_every: int = 1000
    val_every: int = 10_000
    val_max_images: int = 1000
    checkpoint_every: int = 1000
    tensorboard: bool = False
    progress: bool = True
    resume: bool = False

    def __post_init__(self):
        if self.stage not in ("one", "two"):
            raise ValueError(f"stage: expected 'one' or 'two', got {self.stage!r}")
        if self.domain not in ("face", "other"):
            raise ValueError(f"domain: expected 'face' or 'other', got {self.domain!r}")
        if self.stage == "two" and self.first_stage is None:
            raise ValueError("first_stage: the two-stage model needs the first-stage inverter file")
        if self.stage == "two" and not self.refine:
            raise ValueError("refine: a two-stage model always refines (refine=False is for one-stage)")
        if self.max_steps is None:  # the paper's schedules (appendix A.1)
            self.max_steps = 1_000_000 if self.stage == "one" else 700_000
        height, width = image_size_hw(self.image_size, "image_size")
        self.image_size = height if height == width else [height, width]  # as JSON keeps it
        for name in ("batch_size", "max_steps", "num_tokens", "log_every", "val_max_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        for name in ("image_every", "val_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected an integer >= 0 (0: none), got {getattr(self, name)}")
        if self.workers < 0:
            raise ValueError(f"workers: expected an integer >= 0, got {self.workers}")
        if not 0 <= self.seed < 2**32:  # numpy's seed range
            raise ValueError(f"seed: expected an integer in [0, 2**32 - 1], got {self.seed}")
        for name in ("l2_weight", "lpips_weight", "id_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")
        if self.l2_weight == self.lpips_weight == 0 and (self.id_weight == 0 or self.domain != "face"):
            raise ValueError(
                "l2_weight, lpips_weight, id_weight: every loss term in use has weight 0 (the ID term counts "
                "for the face domain only): nothing to train"
            )
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ValueError(f"compile: expected None or one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")
        known = model_option_names(self.stage)
        unknown = [name for name in self.model_options if name not in known]
        if unknown:
            raise ValueError(
                f"model_options (--model-option): unknown {', '.join(map(repr, unknown))}; the {self.stage}-stage "
                f"inverter takes {', '.join(known)}"
            )

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else default_learning_rate(self.stage)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def default_learning_rate(stage: str) -> float:
    """The paper's rate for a `stage` ("one" or "two") inverter: 1e-4 one-stage, 1e-3 two-stage."""
    return 1e-4 if stage == "one" else 1e-3


def default_encoder_size(image_size) -> int | tuple[int, int]:
    """The encoder's input size for pictures of `image_size`: 256 for square ones, else the same
    aspect with a longer side of 256 (192 x 256 for Stanford Cars). ValueError when that has
    no sides that are multiples of 16."""
    height, width = image_size_hw(image_size)
    if height == width:
        return 256
    longer = 256
    size = (longer * height // width, longer) if height < width else (longer, longer * width // height)
    if any(side % 16 for side in size) or not same_aspect(size, (height, width)):
        raise ValueError(
            f"image_size: {height} x {width} gives no encoder input of the same aspect with sides that are "
            "multiples of 16 and a longer side of 256; set one with --model-option 'encoder_size=[H, W]'"
        )
    return size


def model_option_defaults(stage: str, image_size=256) -> dict[str, Any]:
    """The value each of `model_option_names(stage)` takes when `model_options` leaves it out."""
    from refinestyle.inversion import models

    inverter_class = models.OneStageInverter if stage == "one" else models.TwoStageInverter
    parameters = inspect.signature(inverter_class.__init__).parameters
    defaults = {name: parameters[name].default for name in model_option_names(stage)}
    try:
        defaults["encoder_size"] = default_encoder_size(image_size)
    except ValueError:  # such a run named its encoder size
        pass
    return defaults


def model_option_names(stage: str) -> list[str]:
    """The names `model_options` may set for a `stage` ("one" or "two") inverter, sorted."""
    from refinestyle.inversion import models

    inverter_class = models.OneStageInverter if stage == "one" else models.TwoStageInverter
    parameters = inspect.signature(inverter_class.__init__).parameters.values()
    return sorted(
        p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _NOT_MODEL_OPTIONS
    )


# ---------------------------------------------------------------------------------------------
# RNG state (for bit-for-bit resume)


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and CUDA generator states of this process."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        # the current device's only: a process trains on cuda:LOCAL_RANK, and a resume may see
        # fewer GPUs than the run it continues
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set this process's generators back to a `capture_rng_state` result."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if not torch.cuda.is_available():
        return
    if "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"])
    elif "cuda" in state:  # checkpoints before 2026-11-26 kept every visible GPU's state
        index = torch.cuda.current_device()
        if index < len(state["cuda"]):
            torch.cuda.set_rng_state(state["cuda"][index])


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then os.replace: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _remove_stale_temporaries(path: Path) -> None:
    """Delete what a killed process left of an earlier write of `path` (a full checkpoint each)."""
    for stale in path.parent.glob(f".{path.name}.tmp*"):
        stale.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Building the parts


def load_frozen_generator(path: str, device: torch.device) -> nn.Module:
    """The generator from a checkpoint file, frozen (no gradients), in eval mode."""
    from refinestyle.checkpoints import load_generator

    generator = load_generator(path, device)
    generator.requires_grad_(False)
    return generator.eval()


def build_inverter(config: TrainConfig, generator: nn.Module, device: torch.device) -> nn.Module:
    """The inverter of `config` around `generator` (the first stage is loaded for two-stage)."""
    from refinestyle.inversion import models

    options = dict(config.model_options)
    height, width = image_size_hw(config.image_size)
    if "encoder_size" not in options:
        options["encoder_size"] = default_encoder_size(config.image_size)
    if config.stage == "one":
        num_refined = config.num_refined if config.num_refined is not None else min(10, generator.num_layers)
        model = models.OneStageInverter(
            generator,
            num_refined=num_refined,
            num_tokens=config.num_tokens,
            ir_se50_path=config.ir_se50,
            refine=config.refine,
            **options,
        )
    else:
        from refinestyle.inversion.style_transformer import load_first_stage

        num_refined = config.num_refined if config.num_refined is not None else generator.num_layers
        first_stage = load_first_stage(config.first_stage, generator)
        first_size = models.input_size_of(first_stage)
        if first_size is not None and not same_aspect(first_size, (height, width)):
            raise ValueError(
                f"image_size: {height} x {width} pictures, but the first stage reads {first_size[0]} x {first_size[1]} "
                f"(another aspect); train on its pictures (--image-size {first_size[0]}x{first_size[1]})"
            )
        model = models.TwoStageInverter(
            generator,
            first_stage,
            num_refined=num_refined,
            num_tokens=config.num_tokens,
            ir_se50_path=config.ir_se50,
            **options,
        )
    if not same_aspect(model.input_size, (height, width)):
        encoder_height, encoder_width = model.input_size
        raise ValueError(
            f"image_size: {height} x {width} pictures, but the encoder reads {encoder_height} x {encoder_width} (another "
            "aspect); the renders are cropped to the encoder's aspect, so both must agree"
        )
    return model.to(device)


def build_criterion(config: TrainConfig, device: torch.device) -> nn.Module:
    """L2 + LPIPS + ID with the configured weights (ID off for non-face domains)."""
    from refinestyle.losses import ReconstructionLoss

    criterion = ReconstructionLoss(
        l2=config.l2_weight,
        lpips=config.lpips_weight,
        id=config.id_weight,
        face_domain=config.domain == "face",
        lpips_backbone_path=config.lpips_backbone,
        pretrained_lpips=not config.lpips_random_backbone,
        ir_se50_path=config.ir_se50,
    )
    criterion.requires_grad_(False)
    return criterion.to(device).eval()


# parameters that stack one vector per refined layer as rows (the paper's A_n, B_n in R^L)
STACKED_VECTOR_PARAMETERS = ("scale_p", "scale_q")


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Ranger over the inverter's trainable parameters at the configured learning rate.

    Ranger centralises the gradient of every tensor of 2+ dimensions (as pSp's does), which
    takes away each row's mean. The token branch's scale_p and scale_q [Nr, L] hold one
    scaling vector per layer as rows; a vector on its own would not be centralised, so they
    are in a second group without it (a whole layer's residual can then grow or shrink).
    """
    from refinestyle.optim import Ranger

    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the inverter has no trainable parameters")
    stacked = [p for name, p in named if name.rsplit(".", 1)[-1] in STACKED_VECTOR_PARAMETERS]
    others = [p for name, p in named if name.rsplit(".", 1)[-1] not in STACKED_VECTOR_PARAMETERS]
    groups = [group for group in ({"params": others}, {"params": stacked, "use_gc": False}) if group["params"]]
    return Ranger(groups, lr=config.learning_rate)


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The entries of model.state_dict() that training can change.

    Every entry except the frozen parameters and the buffers of wholly frozen submodules
    (the generator's synthesis network, a first stage): those come back from their own files.
    """
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    for module in model.modules():
        parameters = list(module.parameters())
        if module is not model and parameters and not any(p.requires_grad for p in parameters):
            frozen.update(id(b) for b in module.buffers())
    return {
        key: value.detach().clone()
        for key, value in model.state_dict(keep_vars=True).items()
        if id(value) not in frozen
    }


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Recompute the generator's StyledConv layers (with the toRGB each block's last conv runs in
    `forward_to_rgb`) in backward instead of keeping their activations.

    The generator's activations at 1024 px dominate training memory. Each StyledConv's
    forward is wrapped in torch.utils.checkpoint (non-reentrant; the RNG state is
    preserved, so randomly drawn noise is drawn again identically). Parameter names and
    state_dicts are unchanged. Layers with BatchNorm (the encoder) are left alone: a
    recomputed forward in training mode would update their running statistics twice.
    Returns how many layers were wrapped.
    """
    from refinestyle_kernels import StyledConv

    count = 0
    for module in model.modules():
        if isinstance(module, StyledConv) and not getattr(module, "_refinestyle_checkpointed", False):
            # both entries: the generator runs each block's last conv with its toRGB (forward_to_rgb)
            module.forward = _checkpointed(module.forward)
            module.forward_to_rgb = _checkpointed(module.forward_to_rgb)
            module._refinestyle_checkpointed = True
            count += 1
    return count


def _checkpointed(forward):
    def run(*args, **kwargs):
        if torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return run


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------------------------------------
# Logs


class CSVLog:
    """Append rows of numbers to a CSV file; on resume, rows after the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        self.fields: list[str] | None = None
        if resume_step is not None and path.is_file():
            with path.open(newline="") as handle:
                rows = list(csv.DictReader(handle))
            rows = [row for row in rows if int(row["step"]) <= resume_step]
            if rows:
                self.fields = list(rows[0].keys())
            with path.open("w", newline="") as handle:
                if self.fields:
                    writer = csv.DictWriter(handle, fieldnames=self.fields)
                    writer.writeheader()
                    writer.writerows(rows)
        elif path.exists():
            path.unlink()

    def write(self, row: dict[str, Any]) -> None:
        if self.fields is None:
            self.fields = list(row.keys())
            with self.path.open("w", newline="") as handle:
                csv.DictWriter(handle, fieldnames=self.fields).writeheader()
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.fields, extrasaction="ignore").writerow(row)


def plot_training_log(run_dir: str | Path) -> Path | None:
    """Draw `losses.png` in a run folder: every loss term of train_log.csv against the step
    (log scale), and the validation means of val_log.csv beside them when there are any.

    Returns the picture's path, or None when the log is still empty.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)

    def columns(path: Path, skip: tuple[str, ...]) -> tuple[list[float], dict[str, list[float]]]:
        if not path.is_file():
            return [], {}
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        steps = [float(row["step"]) for row in rows]
        keys = [k for k in (rows[0] if rows else {}) if k not in skip and not k.endswith("_std")]
        return steps, {k: [float(row[k]) for row in rows] for k in keys}

    steps, losses = columns(run_dir / "train_log.csv", ("step", "epoch", "lr", "seconds"))
    if not steps:
        return None
    val_steps, val = columns(run_dir / "val_log.csv", ("step", "count"))
    figure = Figure(figsize=(11 if val_steps else 6, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 2 if val_steps else 1, 1)
    for key, values in losses.items():
        if all(v > 0 for v in values):
            axes.plot(steps, values, label=key, linewidth=1)
    axes.set(xlabel="step", ylabel="training loss", yscale="log", title="training")
    axes.legend()
    if val_steps:
        axes = figure.add_subplot(1, 2, 2)
        for key, values in val.items():
            axes.plot(val_steps, values, marker="o", label=key.replace("_mean", ""))
        axes.set(xlabel="step", ylabel="mean over the validation images", title="validation")
        axes.legend()
    figure.tight_layout()
    path = run_dir / "losses.png"
    figure.savefig(path)
    return path


def _tensorboard_writer(out: Path, wanted: bool):
    if not wanted:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional; the CSV log always exists
        print("tensorboard is not installed: logging to CSV only")
        return None
    return SummaryWriter(str(out / "tensorboard"))


# ---------------------------------------------------------------------------------------------
# Grids and validation


@torch.no_grad()
def render_comparison(model: nn.Module, images: torch.Tensor, size) -> torch.Tensor:
    """Rows of (input | w+ only | refined) for `images`, each resized to `size` (an int side or
    (height, width)); [3B, 3, height, width]. The renders are cropped to the pictures' aspect."""
    model = _unwrap(model)
    generator = model.generator
    result = model(images)
    plain = model.crop_canvas(generator.synthesis(result.w_plus, refinement=None, randomize_noise=False))
    refined = model.crop_canvas(generator.synthesis(result.w_plus, refinement=result.refinement, randomize_noise=False))
    columns = [pool_or_resize(images, size), pool_or_resize(plain, size), pool_or_resize(refined, size)]
    return torch.stack(columns, 1).flatten(0, 1).float()


def loss_size(image_size, generator_size: int) -> tuple[int, int]:
    """(height, width) the losses and metrics compare at: `image_size` (an int or (height,
    width)), scaled down to fit the generator's canvas when it is larger."""
    height, width = image_size_hw(image_size)
    if max(height, width) <= generator_size:
        return height, width
    return height * generator_size // max(height, width), width * generator_size // max(height, width)


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainSummary:
    """What a run did: steps done now and in total, the loss terms of this run's first and last step,
    the validation metrics of the last validation, and the trained inverter itself (`model`)."""

    step: int
    steps_this_run: int
    first_losses: dict[str, float]
    last_losses: dict[str, float]
    out: str
    checkpoint: str
    inverter: str
    validation: dict[str, float] | None = None
    model: nn.Module | None = field(default=None, repr=False)


def train_inverter(config: TrainConfig) -> TrainSummary:
    """Train an inverter as `config` says; returns a TrainSummary (on every rank).

    With config.resume, the run folder's checkpoint is loaded and training continues from
    the step after it; the result is bit-for-bit what an uninterrupted run would have
    computed (on CPU, or on GPU with config.deterministic). The run keeps its saved config
    except the RESUME_OVERRIDABLE fields, which `config` sets, and the RESUME_RELOCATABLE
    paths, which `config` sets where the saved file no longer exists (moved files). A
    checkpoint that cannot be read, or one written by another number of processes, raises
    ValueError.

    SIGINT (Ctrl-C) or SIGTERM stops the run after the step in progress, on every process at
    the same step: the checkpoint is written and refinestyle.distributed.TrainingInterrupted
    (a KeyboardInterrupt) raised; resume continues bit for bit. A second signal more than 2 s
    later raises KeyboardInterrupt at once and keeps only the last checkpoint written.
    """
    out = Path(config.out)
    checkpoint_path = out / "checkpoints" / CHECKPOINT_NAME
    state = None
    if config.resume:
        if not checkpoint_path.is_file():
            raise FileNotFoundError(f"resume: no checkpoint at {checkpoint_path}")
        state = _load_checkpoint(checkpoint_path)
        config = _merge_resumed_config(state["config"], config)
    elif checkpoint_path.is_file():
        raise FileExistsError(
            f"{out} already holds a run ({checkpoint_path}); resume it (--resume) or choose another --out"
        )

    return _train(config, setup_distributed(config.device), state, out, checkpoint_path)


def _load_checkpoint(path: Path) -> dict[str, Any]:
    """The training state in `path`; ValueError naming the file when it is truncated, corrupt or not ours."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        # torch.load's errors for a damaged file (a truncated zip: RuntimeError) name neither the file nor the cause
        raise ValueError(f"cannot read checkpoint {path}: {error}") from error
    if not isinstance(state, dict) or state.get("format") != TRAINING_CHECKPOINT_FORMAT:
        raise ValueError(f"cannot read checkpoint {path}: not a train-inverter checkpoint")
    return state


def _merge_resumed_config(saved: dict, given: TrainConfig) -> TrainConfig:
    merged = dict(saved)
    for name in RESUME_OVERRIDABLE:
        merged[name] = getattr(given, name)
    for name in RESUME_RELOCATABLE:
        moved_to = getattr(given, name)
        if merged.get(name) is not None and moved_to is not None and not os.path.exists(merged[name]):
            merged[name] = moved_to  # the file moved: the new config says where it is now
    return TrainConfig(**merged)


def _train(config: TrainConfig, context: DistributedContext, state, out: Path, checkpoint_path: Path) -> TrainSummary:
    from tqdm.auto import tqdm

    import refinestyle_kernels

    device = context.device
    if state is not None and len(state["rng"]) != context.world_size:
        # before anything is built or written: the run folder stays as it was
        raise ValueError(
            f"resume: the checkpoint was written by {len(state['rng'])} processes, this run has "
            f"{context.world_size}; bit-for-bit resume needs the same number"
        )
    # The data first (it only lists files): an empty folder or too few images fail at once
    # and leave no run folder behind.
    dataset = ImageFolderDataset(config.data, config.image_size, hflip=config.hflip, seed=config.seed)
    sampler = ResumableDistributedSampler(
        dataset, config.batch_size, context.world_size, context.rank, shuffle=True, seed=config.seed, drop_last=True
    )
    if sampler.batches_per_epoch() < 1:
        raise ValueError(
            f"data: {len(dataset)} images cannot fill one batch of {config.batch_size} on each of "
            f"{context.world_size} processes"
        )
    val_dataset = ImageFolderDataset(config.val_data, config.image_size) if config.val_data else None
    if config.deterministic:
        # cuBLAS needs a fixed workspace to be deterministic (set before its first use)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    # Then the loss networks: a missing weights file fails before the generator loads.
    torch.manual_seed(config.seed)
    criterion = build_criterion(config, device)
    # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    generator = load_frozen_generator(config.generator, device)
    if config.num_refined is not None and not 1 <= config.num_refined <= generator.num_layers:
        raise ValueError(
            f"num_refined (--num-refined): expected 1 to {generator.num_layers} (the {generator.size} px generator's "
            f"modulated convs), got {config.num_refined}"
        )
    model = build_inverter(config, generator, device)
    optimizer = build_optimizer(config, model)
    if config.grad_checkpointing:
        enable_gradient_checkpointing(model)
    if config.compile is not None:
        generator.compile_synthesis(mode=config.compile)
    compare_size = loss_size(config.image_size, generator.size)
    if config.lpips_weight > 0 and min(compare_size) < 32:  # before the run folder is made
        raise ValueError(
            f"image_size (--image-size): LPIPS (AlexNet) needs pictures of at least 32 x 32 pixels; the losses "
            f"compare at {compare_size[0]} x {compare_size[1]} (the picture size fitted to the {generator.size} px "
            f"generator)"
        )

    # The frozen networks a run trains against: a resume must find the same weights (a moved
    # file may be given again, another one is refused).
    fingerprints = {"generator": generator_fingerprint(generator), "losses": weights_fingerprint(criterion),
                    "data": data_fingerprint(dataset)}
    first_stage = getattr(model, "first_stage", None)
    if isinstance(first_stage, nn.Module):
        fingerprints["first_stage"] = weights_fingerprint(first_stage)
    step, epoch, batch_in_epoch = 0, 0, 0
    if state is not None:
        _check_fingerprints(state.get("fingerprints", {}), fingerprints, config)
        try:
            _, unexpected = model.load_state_dict(state["model"], strict=False)
        except RuntimeError as error:  # shapes: another generator or model options
            raise ValueError(
                f"resume: the checkpoint's weights do not fit the model built for this run (another generator "
                f"or first stage?): {str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else error}"
            ) from None
        if unexpected:
            raise ValueError(f"resume: checkpoint holds unknown weights {unexpected[:5]}")
        try:
            optimizer.load_state_dict(state["optimizer"])
        except ValueError as error:  # e.g. one parameter group, from before the scale vectors had theirs
            raise ValueError(f"resume: the checkpoint's optimizer state does not fit this run's ({error})") from None
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        restore_rng_state(state["rng"][context.rank])
    else:
        # Different noise per rank from here on; weights are already identical.
        torch.manual_seed(config.seed + 1_000_003 * (context.rank + 1))
    if context.is_main:  # only now: a resume refused above leaves the run folder as it was
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(config.to_json())

    train_model: nn.Module = model
    if context.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            # DDP's reducer waits for every parameter's gradient unless told some may get none
            find_unused_parameters=not getattr(model, "uses_every_trainable_parameter", True),
        )

    log = tb = None
    if context.is_main:
        log = CSVLog(out / "train_log.csv", resume_step=step if state is not None else None)
        tb = _tensorboard_writer(out, config.tensorboard)
    val_log = CSVLog(out / "val_log.csv", resume_step=step if state is not None else None) if (
        context.is_main and val_dataset is not None
    ) else None

    start_step = step
    first_losses: dict[str, float] = {}
    last_losses: dict[str, float] = {}
    validation = None
    bar = tqdm(
        total=config.max_steps, initial=step, desc=f"train {config.stage}-stage", unit="step",
        disable=not (config.progress and context.is_main), dynamic_ncols=True,
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16)
    train_model.train()
    started = time.perf_counter()
    # Ctrl-C / SIGTERM: every process finishes the step, the checkpoint keeps it, --resume goes on
    with refinestyle_kernels.use_backend(config.backend), StopOnSignal() as stop:
        while step < config.max_steps:
            sampler.set_epoch(epoch, start_batch=batch_in_epoch)
            dataset.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(
                dataset,
                batch_size=config.batch_size,
                sampler=sampler,
                num_workers=config.workers,
                drop_last=True,
                pin_memory=device.type == "cuda",
                # A private generator: creating the iterator must not consume the global RNG.
                generator=torch.Generator().manual_seed(config.seed * 7919 + epoch),
                persistent_workers=False,
                worker_init_fn=_ignore_interrupts,
            )
            for images in _batches(loader):
                images = images.to(device, non_blocking=True)
                targets = pool_to(images, compare_size)
                with autocast:
                    result = train_model(images)
                    reconstruction = pool_to(result.image, compare_size)
                    loss, parts = criterion(reconstruction.float(), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                # every process gets the same values, so all of them raise together and all of them stop
                # after the same step when any was asked to
                values = mean_over_processes({**parts, **stop.vote()}, context)
                stopping = stop.agreed(values)
                if not all(math.isfinite(v) for v in values.values()):
                    # before the update: the last checkpoint and the weights stay usable
                    raise FloatingPointError(
                        f"step {step + 1}: non-finite loss {values}: training diverged; a resumed run keeps its "
                        "config, so start a new run (another --out) with a lower --lr"
                    )
                optimizer.step()
                step += 1
                batch_in_epoch += 1
                if not first_losses:
                    first_losses = values
                last_losses = values
                if context.is_main:
                    bar.update(1)
                    if step % config.log_every == 0 or step == config.max_steps:
                        row = {"step": step, "epoch": epoch, **values, "lr": optimizer.param_groups[0]["lr"],
                               "seconds": round(time.perf_counter() - started, 3)}
                        log.write(row)
                        bar.set_postfix({k: f"{v:.4f}" for k, v in values.items()})
                        if tb is not None:
                            for key, value in values.items():
                                tb.add_scalar(f"train/{key}", value, step)

                last_step = step == config.max_steps
                if context.is_main and config.image_every and (step % config.image_every == 0 or last_step):
                    _save_grid(train_model, images, out / "images" / f"step_{step:07d}.png", config.image_size)
                if val_dataset is not None and config.val_every and (step % config.val_every == 0 or last_step):
                    if context.is_main:
                        validation = _validate(train_model, criterion, val_dataset, config, device, compare_size, step)
                        val_log.write({"step": step, **validation})
                        if tb is not None:
                            for key, value in validation.items():
                                tb.add_scalar(f"val/{key}", value, step)
                    if context.distributed:  # every rank's summary holds the metrics
                        shared = [validation]
                        dist.broadcast_object_list(shared, src=0)
                        validation = shared[0]
                    context.barrier()
                if (config.checkpoint_every and step % config.checkpoint_every == 0) or last_step or stopping:
                    at_epoch_end = batch_in_epoch >= sampler.batches_per_epoch()
                    _save_checkpoint(
                        model, optimizer, config, context, checkpoint_path, out / INVERTER_NAME,
                        step=step, epoch=epoch + 1 if at_epoch_end else epoch,
                        batch_in_epoch=0 if at_epoch_end else batch_in_epoch, fingerprints=fingerprints,
                    )
                if last_step:
                    break
                if stopping:
                    bar.close()
                    if tb is not None:
                        tb.close()
                    raise stop.interrupted(step)
            else:
                epoch += 1
                batch_in_epoch = 0
                continue
            break
    bar.close()
    if tb is not None:
        tb.close()
    return TrainSummary(
        step=step, steps_this_run=step - start_step, first_losses=first_losses, last_losses=last_losses,
        out=str(out), checkpoint=str(checkpoint_path), inverter=str(out / INVERTER_NAME), validation=validation,
        model=model,
    )


_INTERRUPTS = (signal.SIGINT, signal.SIGTERM)


def _ignore_interrupts(worker_id: int) -> None:
    # Ctrl-C reaches the data workers too (the terminal signals the whole process group), and so
    # does a scheduler's SIGTERM (torchrun, Slurm and `kill -- -PGID` signal the group); the
    # workers must keep serving the batches of the step the main process finishes before it
    # stops. (PyTorch's SIGCHLD handler would otherwise fail the run on a killed worker.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        # forked with both held (_interrupts_held); held ones that arrived since are now dropped
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _INTERRUPTS)


def _batches(loader: torch.utils.data.DataLoader):
    """Iterate `loader`, its workers forked with SIGINT and SIGTERM held (_interrupts_held).

    A generator, not a local iterator: a stopping run's exception keeps the training frame
    alive in its traceback, and an iterator held there would outlive it to the interpreter's
    exit, where multiprocessing stops daemon workers with SIGTERM, which ours ignore: a hang.
    The loop's own reference goes as the exception passes. An exception raised by the
    iterator itself (a worker's unreadable image) keeps this frame in its traceback, so the
    workers are shut down here, whatever ends the iteration.
    """
    with _interrupts_held():
        iterator = iter(loader)  # forks the workers
    try:
        yield from iterator
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)  # absent with workers=0
        if shutdown is not None:
            shutdown()


@contextlib.contextmanager
def _interrupts_held():
    """Hold SIGINT and SIGTERM in this thread while it forks the data workers.

    A forked worker starts with the forking thread's mask and ignores both signals before it
    lets them through (_ignore_interrupts), so a group signal sent while the workers start
    cannot kill one before it ignores signals (PyTorch sets its own SIGTERM handler in a worker
    first). The main process still gets its signals: its other threads do not hold them, and
    a signal held here is delivered as the block ends.
    """
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks, no fork
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _INTERRUPTS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _save_grid(model: nn.Module, images: torch.Tensor, path: Path, size) -> None:
    # A private RNG scope: pictures must not change the training's random stream.
    devices = [images.device] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        was_training = model.training
        model.eval()
        rows = render_comparison(model, images[:4], size)
        model.train(was_training)
    from refinestyle.imageio import save_grid

    save_grid(rows, path, nrow=3)


def _validate(model, criterion, dataset, config: TrainConfig, device, compare_size, step: int) -> dict[str, float]:
    """Mean and std of MSE / LPIPS / ID over the validation images (rank 0, a private RNG scope)."""
    from refinestyle.inversion.metrics import ReconstructionMetrics, evaluate_folder

    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        summary, _ = evaluate_folder(
            _unwrap(model), dataset, ReconstructionMetrics.from_criterion(criterion),
            batch_size=config.batch_size, metric_size=compare_size, device=device, progress=config.progress,
            progress_desc=f"validate (step {step})", progress_leave=False, max_images=config.val_max_images,
        )
    return summary


def _check_fingerprints(saved: dict[str, str], now: dict[str, str], config: TrainConfig) -> None:
    """ValueError when a frozen network's weights differ from the interrupted run's (checkpoints
    from before the fingerprints were stored hold none: nothing to compare)."""
    if "data" in saved and "data" in now and saved["data"] != now["data"]:
        then, found = saved["data"].split(" files ")[0], now["data"].split(" files ")[0]
        raise ValueError(
            f"resume: --data {config.data}: other images than the interrupted run trained with ({then} files then, "
            f"{found} now, or other names or sizes); give the folder it used"
        )
    files = {"generator": f"--generator {config.generator}", "first_stage": f"--first-stage {config.first_stage}",
             "losses": f"the loss networks' weights (--ir-se50 {config.ir_se50}, --lpips-backbone {config.lpips_backbone})"}
    changed = [files[name] for name, digest in saved.items() if name in files and name in now and now[name] != digest]
    if changed:
        raise ValueError(
            f"resume: {'; '.join(changed)}: other weights than the interrupted run trained with; give the files it used"
        )


def data_fingerprint(dataset: ImageFolderDataset) -> str:
    """"N files <digest>" of a training folder's image list: each file's path under the folder and
    its size, so a moved folder matches and a folder with other, added or removed images does not
    (the files are not read: a resume must not wait for a data set's bytes)."""
    digest = hashlib.sha256()
    for path in dataset.paths:
        name = path.relative_to(dataset.root).as_posix() if path != dataset.root else path.name
        digest.update(f"{name}\0{path.stat().st_size}\n".encode())
    return f"{len(dataset.paths)} files {digest.hexdigest()[:16]}"


def _save_checkpoint(
    model, optimizer, config, context, checkpoint_path, inverter_path, *, step, epoch, batch_in_epoch, fingerprints
):
    """Write the training state atomically (rank 0), with every rank's RNG state; then the inverter file."""
    rng = capture_rng_state()
    if context.distributed:
        gathered: list[Any] = [None] * context.world_size
        dist.all_gather_object(gathered, rng)
    else:
        gathered = [rng]
    if context.is_main:
        atomic_torch_save(
            {
                "format": TRAINING_CHECKPOINT_FORMAT,
                "config": dataclasses.asdict(config),
                "model": trainable_state_dict(model),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "epoch": epoch,
                "batch_in_epoch": batch_in_epoch,
                "rng": gathered,
                "fingerprints": fingerprints,
            },
            checkpoint_path,
        )
        _export_inverter(model, inverter_path, fingerprints["generator"])
        plot_training_log(inverter_path.parent)  # the run folder
    context.barrier()


def _export_inverter(model: nn.Module, path: Path, generator_fingerprint: str) -> None:
    from refinestyle.inversion.models import save_inverter

    _remove_stale_temporaries(path)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_inverter(temporary, model, generator_fingerprint=generator_fingerprint)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
