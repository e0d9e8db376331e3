"""How well inverted images survive editing: the editing columns of the paper's Table 1.

Faces: the ID similarity between each edited image and the real image it was inverted
from, averaged over the attributes (the paper uses 5 InterFaceGAN / StyleSpace edits).
Cars and other domains: the FID between the edited images and the real images, averaged
over the attributes (the paper uses 3 GANSpace edits). Every edit is rendered twice when
the inverter has a token branch: with the image's own kernel residuals (RefineStyle) and
with w+ alone, so the table also shows what the residuals keep.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from refinestyle.imageio import as_saved, image_size_hw, same_aspect
from refinestyle.inversion.editing import EditSpec, render_edit
from refinestyle.inversion.metrics import pool_to

RECONSTRUCTION = "reconstruction"  # the unedited rendering, the table's reference row
REFINED, W_PLUS_ONLY = "refined", "w+ only"


@dataclass
class NamedEdit:
    """An edit of the evaluation: its name in the table, what it changes, at which strength."""

    name: str
    spec: EditSpec
    strength: float


@torch.no_grad()
def evaluate_edits(
    inverter: nn.Module,
    generator: nn.Module,
    dataset,
    edits: list[NamedEdit],
    *,
    identity=None,
    inception=None,
    batch_size: int = 8,
    metric_size: int | tuple[int, int] = 256,
    device: str | torch.device = "cpu",
    max_images: int | None = None,
    progress: bool = True,
    examples: list | None = None,
    max_examples: int = 4,
) -> dict[str, dict[str, dict[str, float]]]:
    """Invert every image of `dataset`, apply every edit, and measure ID and/or FID.

    Args:
        inverter: returns an InversionResult (w_plus [B, n_latent, style_dim], refinement or None);
            its `crop_canvas`, when it has one, cuts the pictures out of the renders (Cars).
        generator: the frozen generator the inverter renders with.
        dataset: items [3, H, W] float in [-1, 1] (an ImageFolderDataset) of the renders' aspect.
        edits: the edits, each with its strength; names must be unique and not "reconstruction".
        identity: an IDLoss (its `similarity(x, y) -> [B]`) for the ID metric, or None.
        inception: a refinestyle.fid.FIDInception for the FID metric, or None.
        batch_size, metric_size: images per batch; the size (an int side or (height, width))
            both real and edited images are pooled to before measuring (min with their sizes); rendered images are measured
            as a saved file holds them (clamped to [-1, 1], 8 bits: `refinestyle.imageio.as_saved`).
        max_images: evaluate only the first N images.
        examples: when a list, [1 + 1 + len(edits), 3, s, s] CPU rows (input, reconstruction,
            each edit; refined when there are residuals) of the first `max_examples` images are
            appended to it.

    Returns {row: {variant: {"id_mean", "id_std", "fid", "count"}}} with rows
    "reconstruction", each edit's name and "mean over edits" (the means of the edit rows), and
    variants "refined" and "w+ only" for an inverter with a token branch, "w+ only" alone for
    one without (pSp, e4e). A metric whose network is None is left out.
    """
    from tqdm.auto import tqdm

    from refinestyle.fid import FeatureSet

    names = [edit.name for edit in edits]
    if not edits:
        raise ValueError("edits: expected at least one edit")
    if len(set(names)) != len(names) or RECONSTRUCTION in names:
        raise ValueError(f"edits: names must be unique and not {RECONSTRUCTION!r}, got {names}")
    if identity is None and inception is None:
        raise ValueError("give identity (ID similarity), inception (FID) or both")
    count = len(dataset) if max_images is None else min(len(dataset), max_images)
    if count < 1 or (inception is not None and count < 2):
        raise ValueError(f"dataset: {count} image(s); FID needs at least 2, ID at least 1")

    rows = [RECONSTRUCTION, *names]
    crop_canvas = getattr(inverter, "crop_canvas", lambda renders: renders)
    metric_h, metric_w = image_size_hw(metric_size, "metric_size")
    similarities: dict[tuple[str, str], list[torch.Tensor]] = {}
    features: dict[tuple[str, str], FeatureSet] = {}
    real_features = FeatureSet()
    variants: list[str] = []
    was_training = inverter.training
    inverter.eval()
    try:
        for start in tqdm(range(0, count, batch_size), desc="eval-edit", unit="batch", disable=not progress):
            images = torch.stack([dataset[i] for i in range(start, min(start + batch_size, count))]).to(device)
            result = inverter(images)
            # a w+-only inverter (pSp, e4e, a first stage) has the one variant, named as such
            refinements = {W_PLUS_ONLY: None} if result.refinement is None else {
                REFINED: result.refinement, W_PLUS_ONLY: None}
            variants = list(refinements)
            size = (min(metric_h, images.shape[-2]), min(metric_w, images.shape[-1]))
            targets = pool_to(images.float(), size)
            if inception is not None:
                real_features.add(inception(targets))
            example_rows = [[target] for target in targets[: max(0, max_examples - start)].cpu()]
            for row in rows:
                for variant, refinement in refinements.items():
                    if row == RECONSTRUCTION:
                        rendered = generator.synthesis(result.w_plus, refinement=refinement, randomize_noise=False)
                    else:
                        edit = edits[names.index(row)]
                        rendered = render_edit(generator, result.w_plus, refinement, edit.spec, edit.strength)
                    rendered = crop_canvas(rendered)
                    if not same_aspect(tuple(rendered.shape[-2:]), tuple(images.shape[-2:])):
                        raise ValueError(
                            f"dataset: {images.shape[-2]} x {images.shape[-1]} images, but the inverter renders "
                            f"{rendered.shape[-2]} x {rendered.shape[-1]} pictures (another aspect)"
                        )
                    rendered = pool_to(as_saved(rendered), size)  # as a saved file holds it
                    if identity is not None:
                        similarities.setdefault((row, variant), []).append(identity.similarity(rendered, targets).cpu())
                    if inception is not None:
                        features.setdefault((row, variant), FeatureSet()).add(inception(rendered))
                    if variant == variants[0]:
                        for example, image in zip(example_rows, rendered.cpu()):
                            example.append(image)
            if examples is not None:
                examples.extend(torch.stack(example) for example in example_rows)
    finally:
        inverter.train(was_training)

    report: dict[str, dict[str, dict[str, float]]] = {}
    for row in rows:
        report[row] = {}
        for variant in variants:
            entry: dict[str, float] = {"count": float(count)}
            if identity is not None:
                values = torch.cat(similarities[(row, variant)]).double()
                entry["id_mean"] = values.mean().item()
                entry["id_std"] = values.std().item() if values.numel() > 1 else 0.0
            if inception is not None:
                entry["fid"] = real_features.frechet_distance(features[(row, variant)])
            report[row][variant] = entry
    report["mean over edits"] = {
        variant: {
            key: sum(report[name][variant][key] for name in names) / len(names)
            for key in report[names[0]][variant]
        }
        for variant in variants
    }
    return report


def format_edit_report(report: dict[str, dict[str, dict[str, float]]], name: str = "inverter") -> str:
    """A Markdown table: a row per edit (and the reconstruction, and the mean), a column per metric
    and variant, in the layout of the paper's Table 1 editing columns."""
    first = next(iter(report.values()))
    variants = list(first)
    columns = [(metric, variant) for metric in ("id", "fid") for variant in variants
               if (f"{metric}_mean" if metric == "id" else metric) in first[variant]]
    header = [f"{name}: edit"] + [f"{'ID' if metric == 'id' else 'FID'} ({variant})" for metric, variant in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, entries in report.items():
        cells = [row]
        for metric, variant in columns:
            entry = entries[variant]
            if metric == "id":
                cells.append(f"{entry['id_mean']:.4f} ± {entry['id_std']:.4f}")
            else:
                cells.append(f"{entry['fid']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
