"""The training's parts: the image-folder dataset, the resumable sampler, metrics and cost counting."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inversion_fixtures import TINY_MODEL_OPTIONS, tiny_generator
from refinestyle.inversion.data import ImageFolderDataset, ResumableDistributedSampler
from refinestyle.inversion.metrics import (
    ReconstructionMetrics,
    count_flops,
    count_parameters,
    evaluate_folder,
    format_report,
    inversion_cost,
    summarize,
)
from refinestyle.losses import LPIPSLoss

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "sub").mkdir()
    for index in range(6):
        pixels = rng.integers(0, 256, size=(20, 28, 3), dtype=np.uint8)  # not square: resized
        suffix = ".png" if index % 2 else ".jpg"
        where = tmp_path / "sub" if index == 5 else tmp_path
        Image.fromarray(pixels).save(where / f"img{index}{suffix}", quality=95)
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_dataset_reads_resizes_and_flips_deterministically(folder):
    plain = ImageFolderDataset(folder, 16)
    assert len(plain) == 6  # recursive, jpg and png, the .txt ignored
    image = plain[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert -1 <= image.min() < image.max() <= 1

    flipping = ImageFolderDataset(folder, 16, hflip=True, seed=3)
    flips = [flipping.is_flipped(i) for i in range(len(flipping))]
    assert 0 < sum(flips) < len(flips)  # seed 3 flips some images and not others
    assert 900 < sum(flipping.is_flipped(i) for i in range(2000)) < 1100  # about half
    for index, flipped in enumerate(flips):
        expected = plain[index].flip(-1) if flipped else plain[index]
        assert torch.equal(flipping[index], expected)
    again = ImageFolderDataset(folder, 16, hflip=True, seed=3)
    assert [again.is_flipped(i) for i in range(6)] == flips
    epochs = []
    for epoch in range(8):
        again.set_epoch(epoch)
        epochs.append(tuple(again.is_flipped(i) for i in range(6)))
    assert len(set(epochs)) > 1  # fresh flips every epoch
    again.set_epoch(0)
    assert [again.is_flipped(i) for i in range(6)] == flips


def test_images_are_read_upright_and_16_bit_scaled(tmp_path):
    """The dataset and load_image read pictures the way viewers show them: a 16-bit grayscale
    PNG scaled to 8 bits (PIL's convert clips it at 255: nearly white), a phone photo turned
    by its EXIF orientation; a folder named like an image is not an image."""
    from refinestyle.imageio import load_image

    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    Image.fromarray((ramp // 257).astype(np.uint8)).save(tmp_path / "flat.png")
    pixels = np.zeros((16, 24, 3), dtype=np.uint8)
    pixels[:, :12] = 255  # left half white, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to show
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=100)
    (tmp_path / "folder.png").mkdir()
    dataset = ImageFolderDataset(tmp_path, (24, 16))  # (height, width): the upright phone photo
    assert [path.name for path in dataset.paths] == ["deep.png", "flat.png", "phone.jpg"]
    deep, flat, phone = dataset[0], dataset[1], dataset[2]
    assert (deep - flat).abs().max() <= 1 / 127.5
    torch.testing.assert_close(load_image(tmp_path / "deep.png"), load_image(tmp_path / "flat.png"), atol=1 / 127.5, rtol=0)
    assert phone[:, :12].mean() > 0.9 and phone[:, 12:].mean() < -0.9  # upright: the white half on top
    assert load_image(tmp_path / "phone.jpg").shape == (1, 3, 24, 16)
    Image.fromarray(np.zeros((4, 4), dtype=np.float32)).save(tmp_path / "float.tiff")
    with pytest.raises(ValueError, match="floating-point"):
        load_image(tmp_path / "float.tiff")


def test_32_bit_grayscale_reads_by_the_range_of_its_values(tmp_path):
    """A 32-bit TIFF (PIL mode I) states no range: 8-bit values stay as they are (they used to be
    divided as if 16-bit: nearly black), 16-bit ones are scaled like a 16-bit PNG, wider ones
    over the int32 range; negative samples are refused."""
    from refinestyle.imageio import load_image

    flat = np.linspace(0, 255, 16 * 16).reshape(16, 16).astype(np.uint8)
    Image.fromarray(flat).save(tmp_path / "flat.png")
    expected = load_image(tmp_path / "flat.png")
    for name, values in (("eight.tif", flat.astype(np.int32)), ("sixteen.tif", flat.astype(np.int32) * 257),
                         ("wide.tif", (flat.astype(np.int64) * ((2**31 - 1) // 255)).astype(np.int32))):  # fmt: skip
        Image.fromarray(values, mode="I").save(tmp_path / name)
        assert Image.open(tmp_path / name).mode == "I"
        torch.testing.assert_close(load_image(tmp_path / name), expected, atol=1 / 127.5, rtol=0, msg=name)
    Image.fromarray(np.full((4, 4), -3, dtype=np.int32), mode="I").save(tmp_path / "negative.tif")
    with pytest.raises(ValueError, match="negative 32-bit samples"):
        load_image(tmp_path / "negative.tif")


def test_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        ImageFolderDataset(tmp_path / "missing")
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="not a readable image"):
        ImageFolderDataset(tmp_path, 8)[0]
    with pytest.raises(ValueError, match="size"):
        ImageFolderDataset(tmp_path, 0)


def test_sampler_resumes_mid_epoch_and_shards_ranks(folder):
    dataset = ImageFolderDataset(folder, 8)
    full = ResumableDistributedSampler(dataset, batch_size=2, seed=1)
    full.set_epoch(4)
    order = list(full)
    assert sorted(order) == list(range(6)) and full.batches_per_epoch() == 3
    full.set_epoch(4, start_batch=2)
    assert list(full) == order[4:] and len(full) == 2
    full.set_epoch(5)
    assert list(full) != order  # another epoch, another order (6! orders: a clash is 1/720)

    ranks = [ResumableDistributedSampler(dataset, 1, num_replicas=2, rank=r, seed=1) for r in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(4)
    shards = [list(sampler) for sampler in ranks]
    assert sorted(shards[0] + shards[1]) == list(range(6))
    with pytest.raises(ValueError, match="start_batch"):
        full.set_epoch(0, start_batch=-1)


def test_reconstruction_metrics_and_summary():
    rng = torch.Generator().manual_seed(0)
    targets = torch.rand(3, 3, 32, 32, generator=rng) * 2 - 1
    reconstructions = targets + 0.1 * torch.randn(3, 3, 32, 32, generator=rng)
    torch.manual_seed(0)
    lpips = LPIPSLoss(pretrained_backbone=False)
    metrics = ReconstructionMetrics(lpips=lpips)
    values = metrics(reconstructions, targets)
    assert set(values) == {"mse", "lpips"}
    torch.testing.assert_close(values["mse"], ((reconstructions - targets) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(values["lpips"], lpips.distance(reconstructions, targets))
    assert (values["lpips"] > 0).all()
    assert float(metrics(targets, targets)["lpips"].abs().max()) < 1e-6

    summary = summarize(values)
    assert summary["count"] == 3
    assert summary["mse_mean"] == pytest.approx(values["mse"].mean().item())
    assert summary["mse_std"] == pytest.approx(values["mse"].std().item())
    table = format_report(summary, name="tiny")
    assert "| tiny | 3 |" in table and "±" in table and table.count("\n") == 2
    with pytest.raises(ValueError, match="targets"):
        metrics(reconstructions, targets[:2])


def test_evaluate_folder_measures_reconstructions_as_saved_files():
    """The generator overshoots [-1, 1]; pSp and HyperStyle measure saved 8-bit files, and so do we:
    the reconstruction is clamped and rounded before the metrics see it."""
    from types import SimpleNamespace

    from refinestyle.imageio import as_saved

    rng = torch.Generator().manual_seed(0)
    images = as_saved(torch.rand(5, 3, 16, 16, generator=rng) * 2 - 1)  # what image files hold

    class Overshooting(torch.nn.Module):
        def forward(self, batch):
            return SimpleNamespace(image=batch * 1.5 + 0.003)

    def mse(reconstructions, targets):
        return {"mse": ((reconstructions - targets) ** 2).mean(dim=(1, 2, 3))}

    summary, per_image = evaluate_folder(Overshooting(), list(images), mse, batch_size=2, progress=False)
    expected = ((as_saved(images * 1.5 + 0.003) - images) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(per_image["mse"], expected)
    assert summary["count"] == 5
    raw = ((images * 0.5 + 0.003) ** 2).mean(dim=(1, 2, 3))
    assert (per_image["mse"] < raw).all()  # clamping brings overshooting pixels back
    levels = as_saved(torch.linspace(-2, 2, 1001)).add(1).mul(127.5)  # the 256 levels of a PNG, nothing between
    assert torch.allclose(levels, levels.round(), atol=1e-4) and levels.min() == 0 and levels.max() == 255


def test_ranger_leaves_the_per_layer_scale_vectors_uncentralised():
    """scale_p / scale_q [Nr, L] stack the paper's per-layer vectors A_n, B_n; gradient
    centralisation would take each row's mean gradient away, so a uniform gradient could never
    scale a layer's residual up. The other weights keep it, as in pSp."""
    from types import SimpleNamespace

    from refinestyle.inversion.models import OneStageInverter
    from refinestyle.inversion.train import build_optimizer

    model = OneStageInverter(tiny_generator(), num_refined=2, num_tokens=4, **TINY_MODEL_OPTIONS)
    optimizer = build_optimizer(SimpleNamespace(learning_rate=0.01), model)
    scales = {id(model.token_branch.scale_p), id(model.token_branch.scale_q)}
    for group in optimizer.param_groups:
        assert group["use_gc"] == (not any(id(p) in scales for p in group["params"]))
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(
        [p for p in model.parameters() if p.requires_grad])
    before = model.token_branch.scale_p.detach().clone()
    model.token_branch.scale_p.grad = torch.ones_like(before)  # every row: its mean alone
    optimizer.step()
    assert (model.token_branch.scale_p < before).all()


def test_gradient_checkpointing_recomputes_every_conv_of_the_generator():
    """Each block's last conv runs with its toRGB through forward_to_rgb: both entries must be
    recomputed in backward, or half the layers keep their activations."""
    from collections import Counter

    from refinestyle.inversion.train import enable_gradient_checkpointing
    from refinestyle_kernels import StyledConv

    generator = tiny_generator()
    calls = Counter()
    for name, module in generator.named_modules():
        if isinstance(module, StyledConv):
            for entry in ("forward", "forward_to_rgb"):
                def counted(*args, _run=getattr(module, entry), _key=name, **kwargs):
                    calls[_key] += 1
                    return _run(*args, **kwargs)

                setattr(module, entry, counted)
    assert enable_gradient_checkpointing(generator) == generator.num_layers
    w_plus = torch.randn(2, generator.n_latent, generator.style_dim, requires_grad=True)
    image = generator.synthesis(w_plus, randomize_noise=False)
    assert set(calls.values()) == {1} and len(calls) == generator.num_layers
    image.square().mean().backward()
    assert set(calls.values()) == {2}  # every conv ran again in backward


def test_count_flops_and_parameters():
    layer = torch.nn.Linear(8, 4)
    assert count_flops(layer, torch.randn(3, 8)) == 2 * 3 * 8 * 4
    conv = torch.nn.Conv2d(2, 5, 3, padding=1)
    assert count_flops(conv, torch.randn(1, 2, 7, 7)) == 2 * 5 * 2 * 9 * 49
    model = torch.nn.Sequential(layer, torch.nn.Linear(4, 2))
    model[1].requires_grad_(False)
    assert count_parameters(model) == 8 * 4 + 4 + 4 * 2 + 2
    assert count_parameters(model, trainable_only=True) == 8 * 4 + 4
    assert count_parameters(model, exclude=[layer]) == 4 * 2 + 2


def test_inversion_cost_counts_encoder_branches_and_generator():
    from refinestyle.inversion.models import OneStageInverter

    generator = tiny_generator()
    inverter = OneStageInverter(generator, 4, 4, **TINY_MODEL_OPTIONS)
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    cost = inversion_cost(inverter, image, repeats=2)
    generator_flops = count_flops(
        lambda w: generator.synthesis(w, randomize_noise=False), torch.zeros(1, generator.n_latent, generator.style_dim)
    )
    encoder_flops = count_flops(inverter.encoder, image)
    assert cost.flops > generator_flops + encoder_flops > generator_flops > 0
    with torch.no_grad():
        codes = inverter(image, render=False)
    refined_rendering_flops = count_flops(
        lambda w: generator.synthesis(w, refinement=codes.refinement, randomize_noise=False), codes.w_plus
    )
    assert refined_rendering_flops > generator_flops  # the low-rank branch costs a little
    assert cost.flops - cost.flops_without_rendering == refined_rendering_flops  # one rendering less
    assert cost.flops_without_rendering > encoder_flops
    assert cost.params_inverter == inverter.num_parameters()
    mapping = sum(p.numel() for p in inverter.latent_branch.mapping.parameters())
    assert cost.params_as_paper == cost.params_inverter - mapping > 0  # Table 1 counts no mapping copy
    assert cost.params_generator == sum(p.numel() for p in generator.parameters())
    assert cost.seconds_per_image > 0
    report = cost.as_dict()
    assert report["gmacs"] == pytest.approx(report["gflops"] / 2)


def test_paper_parameter_count_leaves_out_a_two_stage_models_first_stage():
    from refinestyle.inversion.models import FirstStage, OneStageInverter, TwoStageInverter

    generator = tiny_generator()
    first = FirstStage(OneStageInverter(generator, refine=False, **TINY_MODEL_OPTIONS))
    two = TwoStageInverter(generator, first, 4, 4, **TINY_MODEL_OPTIONS)
    cost = inversion_cost(two, torch.rand(1, 3, 32, 32) * 2 - 1, timing=False)
    first_count = count_parameters(first, exclude=[generator])  # it holds the same generator
    assert cost.params_inverter == two.num_parameters() + first_count  # the stored first stage counts here
    assert cost.params_as_paper == two.num_parameters()  # and not in the paper's count


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    from refinestyle.inversion import train

    path = tmp_path / "checkpoints" / "latest.pt"
    path.parent.mkdir()
    (path.parent / ".latest.pt.tmp4242").write_bytes(b"a killed process's half checkpoint")
    train.atomic_torch_save({"step": 1}, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["latest.pt"]  # no stale copy piles up
    assert torch.load(path)["step"] == 1

    def crash_midway(obj, target):
        Path(target).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(train.torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        train.atomic_torch_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1  # the previous checkpoint survives intact
    assert [p.name for p in path.parent.iterdir()] == ["latest.pt"]  # no temporary left behind


def test_default_num_refined_fits_small_generators(tmp_path):
    """One-stage default Nr = 10, or every conv of a generator with fewer (7 at 32 px); two-stage: all."""
    from refinestyle.inversion.train import TrainConfig, build_inverter

    generator = tiny_generator()
    assert generator.num_layers == 7
    config = TrainConfig(generator="unused.pt", data=str(tmp_path), out=str(tmp_path / "run"), num_tokens=2,
                         model_options=dict(TINY_MODEL_OPTIONS), id_weight=0.0, lpips_random_backbone=True)
    model = build_inverter(config, generator, torch.device("cpu"))
    assert model.config.num_refined == 7
    import dataclasses

    model = build_inverter(dataclasses.replace(config, num_refined=3), generator, torch.device("cpu"))
    assert model.config.num_refined == 3
