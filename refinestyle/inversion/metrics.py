"""Inversion metrics as the paper's Table 1 reports them.

Distortion per image (then mean and standard deviation over a folder):
- MSE: mean squared error of images in [-1, 1] (pSp / HyperStyle convention), at the
  loss resolution (256 px, the generator's output average-pooled);
- LPIPS: AlexNet LPIPS (`refinestyle.losses.LPIPSLoss`);
- ID: cosine similarity of ArcFace IR-SE50 embeddings (faces only; `IDLoss.similarity`).
Cost:
- parameters of the inverter (everything but the generator), of the generator, and trainable;
- FLOPs of one image's inversion *and* rendering (encoder + branches + generator), counted by
  torch.utils.flop_counter with the plain-PyTorch backend of the op (Triton kernels are
  opaque to the counter); reported as GFLOPs (2 per multiply-add) and GMACs;
- time per image: batch 1, warm-up first, CUDA-synchronised wall clock (median of repeats).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from refinestyle.imageio import image_size_hw, same_aspect


def pool_to(images: torch.Tensor, size) -> torch.Tensor:
    """Average-pool [B, 3, H, W] images to `size`, an int side or (height, width) (unchanged
    when already that size)."""
    size = image_size_hw(size)
    if images.shape[-2:] == size:
        return images
    return F.adaptive_avg_pool2d(images, size)


class ReconstructionMetrics:
    """Per-image MSE, LPIPS and ID similarity of reconstructions against targets.

    Args:
        lpips: an LPIPSLoss (anything with `distance(x, y) -> [B]`), or None to skip LPIPS.
        identity: an IDLoss (anything with `similarity(x, y) -> [B]`), or None to skip ID
            (non-face domains).

    Calling it with reconstructions and targets, both [B, 3, H, W] float in [-1, 1] of the
    same shape, returns {"mse": [B], "lpips": [B], "id": [B]} (the metrics available), float32
    on the inputs' device, without gradients.
    """

    def __init__(self, lpips=None, identity=None):
        self.lpips = lpips
        self.identity = identity

    @classmethod
    def from_criterion(cls, criterion) -> "ReconstructionMetrics":
        """Reuse the networks of a `refinestyle.losses.ReconstructionLoss`."""
        return cls(getattr(criterion, "lpips_loss", None), getattr(criterion, "id_loss", None))

    @classmethod
    def build(
        cls,
        *,
        lpips_backbone: str | None = None,
        pretrained_lpips: bool = True,
        ir_se50: str | None = None,
        face_domain: bool = True,
        device: str | torch.device = "cpu",
    ) -> "ReconstructionMetrics":
        """Build the metric networks from local weight files (MissingWeightsError when absent).

        lpips_backbone: torchvision AlexNet weights for LPIPS (or pretrained_lpips=False: random, tests).
        ir_se50: model_ir_se50.pth for the ID similarity; needed when face_domain is True.
        """
        from refinestyle.losses import IDLoss, LPIPSLoss

        lpips = LPIPSLoss(lpips_backbone, pretrained_backbone=pretrained_lpips).to(device)
        identity = IDLoss(ir_se50).to(device) if face_domain else None
        return cls(lpips, identity)

    @torch.no_grad()
    def __call__(self, reconstructions: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        if reconstructions.ndim != 4 or reconstructions.shape[1] != 3:
            raise ValueError(f"reconstructions: expected [B, 3, H, W], got {tuple(reconstructions.shape)}")
        if targets.shape != reconstructions.shape:
            raise ValueError(
                f"targets: expected the shape of reconstructions {tuple(reconstructions.shape)}, got {tuple(targets.shape)}"
            )
        reconstructions, targets = reconstructions.float(), targets.float()
        values = {"mse": (reconstructions - targets).pow(2).flatten(1).mean(1)}
        if self.lpips is not None:
            values["lpips"] = self.lpips.distance(reconstructions, targets).float()
        if self.identity is not None:
            values["id"] = self.identity.similarity(reconstructions, targets).float()
        return values


def summarize(per_image: dict[str, torch.Tensor]) -> dict[str, float]:
    """{"mse": [N], ...} -> {"mse_mean", "mse_std", ..., "count"} (std: unbiased, 0 for one image)."""
    summary: dict[str, float] = {}
    count = None
    for key, values in per_image.items():
        values = values.double().flatten()
        count = values.numel()
        summary[f"{key}_mean"] = values.mean().item()
        summary[f"{key}_std"] = values.std().item() if count > 1 else 0.0
    summary["count"] = float(count or 0)
    return summary


# ---------------------------------------------------------------------------------------------
# Cost


def count_parameters(module: nn.Module, *, trainable_only: bool = False, exclude: Sequence[nn.Module] = ()) -> int:
    """Number of scalars in `module`'s parameters (shared ones once), minus those of `exclude` modules."""
    excluded = {id(p) for m in exclude for p in m.parameters()}
    return sum(
        p.numel()
        for p in module.parameters()
        if id(p) not in excluded and (p.requires_grad or not trainable_only)
    )


def count_flops(function: Callable[..., object], *args, **kwargs) -> int:
    """FLOPs (2 per multiply-add) of `function(*args, **kwargs)`, by torch.utils.flop_counter.

    Runs the function once under no_grad with the op's plain-PyTorch backend, whose
    convolutions and matmuls the counter sees (the fused Triton kernels would be invisible).
    """
    from torch.utils.flop_counter import FlopCounterMode

    import refinestyle_kernels

    with torch.no_grad(), refinestyle_kernels.use_backend("torch"):
        with FlopCounterMode(display=False) as counter:
            function(*args, **kwargs)
    return int(counter.get_total_flops())


def time_per_image(function: Callable[[torch.Tensor], object], image: torch.Tensor, *, warmup: int = 3, repeats: int = 10) -> float:
    """Median wall-clock seconds of `function(image)` for one image [1, C, H, W].

    Warms up first; on CUDA every measurement is bracketed by torch.cuda.synchronize so the
    queued kernels are included.
    """
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"image: expected one image [1, C, H, W], got {tuple(image.shape)}")
    cuda = image.device.type == "cuda"
    times = []
    with torch.no_grad():
        for index in range(warmup + repeats):
            if cuda:
                torch.cuda.synchronize(image.device)
            start = time.perf_counter()
            function(image)
            if cuda:
                torch.cuda.synchronize(image.device)
            if index >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class InversionCost:
    """Parameters, FLOPs and time of one inverter on one image (Table 1's cost columns).

    params_inverter: the inverter without the generator (a built-in first stage included).
    params_as_paper: as the paper's Table 1 counts its models: also without a frozen first
        stage and without the w+ branch's copy of the mapping MLP (2.1M at 512-d; the
        paper counts Style Transformer without it).
    params_trainable: what training updates.
    params_generator: the generator's.
    flops: inverting and rendering one image (encoder, branches, generator).
    flops_without_rendering: the same without the final rendering (for a two-stage model
        the first stage's rendering I0 is an input of the encoder and stays counted);
        the number papers usually report as the inverter's FLOPs.
    seconds_per_image: median time of inverting and rendering one image (None: not timed).
    """

    params_inverter: int
    params_as_paper: int
    params_trainable: int
    params_generator: int
    flops: int
    flops_without_rendering: int
    seconds_per_image: float | None

    def as_dict(self) -> dict[str, float]:
        return {
            "params_inverter_M": self.params_inverter / 1e6,
            "params_as_paper_M": self.params_as_paper / 1e6,
            "params_trainable_M": self.params_trainable / 1e6,
            "params_generator_M": self.params_generator / 1e6,
            "gflops": self.flops / 1e9,
            "gmacs": self.flops / 2e9,
            "gmacs_without_rendering": self.flops_without_rendering / 2e9,
            "seconds_per_image": self.seconds_per_image if self.seconds_per_image is not None else float("nan"),
        }


def _not_counted_by_the_paper(inverter: nn.Module) -> list[nn.Module]:
    """The generator, a frozen first stage and the w+ branch's mapping copy of `inverter`."""
    excluded = [inverter.generator]
    first_stage = getattr(inverter, "first_stage", None)
    if isinstance(first_stage, nn.Module):
        excluded.append(first_stage)
    mapping = getattr(getattr(inverter, "latent_branch", None), "mapping", None)
    if isinstance(mapping, nn.Module):
        excluded.append(mapping)
    return excluded


def inversion_cost(inverter: nn.Module, image: torch.Tensor, *, timing: bool = True, repeats: int = 10) -> InversionCost:
    """Cost of inverting and rendering `image` [1, C, H, W] (C = 3: the inverter's input).

    inverter: a OneStageInverter / TwoStageInverter (has `.generator`; forward(images,
        render=False) skips the final rendering).
    """
    generator = inverter.generator
    was_training = inverter.training
    inverter.eval()
    try:
        flops = count_flops(inverter, image)
        flops_without_rendering = count_flops(lambda images: inverter(images, render=False), image)
        seconds = time_per_image(inverter, image, repeats=repeats) if timing else None
    finally:
        inverter.train(was_training)
    return InversionCost(
        params_inverter=count_parameters(inverter, exclude=[generator]),
        params_as_paper=count_parameters(inverter, exclude=_not_counted_by_the_paper(inverter)),
        # an inverter loaded for inference is frozen: it keeps what training updated
        params_trainable=getattr(inverter, "trained_parameter_count", None)
        or count_parameters(inverter, trainable_only=True),
        params_generator=count_parameters(generator),
        flops=flops,
        flops_without_rendering=flops_without_rendering,
        seconds_per_image=seconds,
    )


# ---------------------------------------------------------------------------------------------
# A whole folder


@torch.no_grad()
def evaluate_folder(
    inverter: nn.Module,
    dataset,
    metrics: ReconstructionMetrics,
    *,
    batch_size: int = 8,
    metric_size: int | tuple[int, int] = 256,
    device: str | torch.device = "cpu",
    progress: bool = True,
    progress_desc: str = "eval-inversion",
    progress_leave: bool = True,
    max_images: int | None = None,
    examples: list | None = None,
    max_examples: int = 8,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Invert every image of `dataset` (items [3, H, W] in [-1, 1]) and measure the reconstructions.

    The reconstruction (the render cropped to the pictures' aspect, as the inverters return
    it) is measured as a saved file holds it (`refinestyle.imageio.as_saved`: clamped to
    [-1, 1], 8 bits), as pSp and HyperStyle measure theirs; then it and the input are pooled
    to the smallest of metric_size (an int side or (height, width)) and their sizes. Images
    of another aspect than the renders raise ValueError. Returns (summary, per-image values): summary as
    `summarize` gives it, per-image {"mse": [N], ...}. When `examples` is a list, the first
    `max_examples` (input, reconstruction) pairs are appended to it as [2, 3, s, s] CPU tensors.
    progress shows a tqdm bar labelled progress_desc; progress_leave=False removes it when done
    (training's validation, so the bars do not pile up under the training bar).
    """
    from tqdm.auto import tqdm

    from refinestyle.imageio import as_saved

    count = len(dataset) if max_images is None else min(len(dataset), max_images)
    per_image: dict[str, list[torch.Tensor]] = {}
    was_training = inverter.training
    inverter.eval()
    try:
        for start in tqdm(range(0, count, batch_size), desc=progress_desc, unit="batch", disable=not progress,
                          leave=progress_leave):
            batch = torch.stack([dataset[i] for i in range(start, min(start + batch_size, count))]).to(device)
            result = inverter(batch)
            rendered_h, rendered_w = result.image.shape[-2:]
            if not same_aspect((rendered_h, rendered_w), tuple(batch.shape[-2:])):
                raise ValueError(
                    f"dataset: {batch.shape[-2]} x {batch.shape[-1]} images, but the inverter renders {rendered_h} x "
                    f"{rendered_w} pictures (another aspect); read the images at the inverter's input size"
                )
            metric_h, metric_w = image_size_hw(metric_size, "metric_size")
            size = (min(metric_h, batch.shape[-2], rendered_h), min(metric_w, batch.shape[-1], rendered_w))
            reconstructions, targets = pool_to(as_saved(result.image), size), pool_to(batch, size)
            values = metrics(reconstructions, targets)
            for key, value in values.items():
                per_image.setdefault(key, []).append(value.cpu())
            if examples is not None:
                for target, reconstruction in zip(targets, reconstructions):
                    if len(examples) < max_examples:
                        examples.append(torch.stack([target, reconstruction]).cpu())
    finally:
        inverter.train(was_training)
    values = {key: torch.cat(parts) for key, parts in per_image.items()}
    return summarize(values), values


def format_report(summary: dict[str, float], cost: dict[str, float] | None = None, name: str = "inverter") -> str:
    """A Markdown table in the layout of the paper's Table 1 (mean +- std; cost columns if given)."""
    header = ["method", "images", "MSE", "LPIPS", "ID"]
    row = [name, str(int(summary.get("count", 0)))]
    for key in ("mse", "lpips", "id"):
        if f"{key}_mean" in summary:
            row.append(f"{summary[f'{key}_mean']:.4f} ± {summary[f'{key}_std']:.4f}")
        else:
            row.append("-")
    if cost is not None:
        header += ["Params (M)", "Params as Table 1 (M)", "GFLOPs", "GMACs", "GMACs w/o rendering", "Time (s)"]
        row += [
            f"{cost['params_inverter_M']:.2f}",
            f"{cost['params_as_paper_M']:.2f}",
            f"{cost['gflops']:.2f}",
            f"{cost['gmacs']:.2f}",
            f"{cost['gmacs_without_rendering']:.2f}",
            "-" if math.isnan(cost["seconds_per_image"]) else f"{cost['seconds_per_image']:.4f}",  # not timed
        ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), "| " + " | ".join(row) + " |"]
    return "\n".join(lines)
