"""Pictures that are not square: Stanford Cars, as pSp, e4e, HyperStyle and Style Transformer read it.

The LSUN Cars generator draws 512 x 384 cars letterboxed in a 512 x 512 canvas; the encoders
read the photos at 192 x 256, and the losses compare them with rows 32 to 224 of the
render pooled to 256 px. Here a 32 px tiny generator stands in: its pictures are 24 x 32,
rows 4 to 28 of the canvas.
"""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from inversion_fixtures import (
    STYLE_DIM,
    TINY_MODEL_OPTIONS,
    tiny_generator,
    write_generator,
    write_images,
    write_psp_checkpoint,
)
from refinestyle import cli
from refinestyle.imageio import canvas_box, crop_canvas, parse_image_size, pool_or_resize, same_aspect

pytestmark = pytest.mark.usefixtures("one_thread")

CARS_TINY = dict(TINY_MODEL_OPTIONS, encoder_size=(48, 64))  # 3:4, sides multiples of 16


def run(command: str, *argv) -> int:
    return cli.main([command, *(str(a) for a in argv)])


def test_canvas_box_is_the_letterbox_pSp_crops():
    assert canvas_box(256, (192, 256)) == (32, 0, 192, 256)  # HyperStyle: y_hat[:, :, 32:224, :]
    assert canvas_box(512, (192, 256)) == (64, 0, 384, 512)  # LSUN Cars' 512 x 384
    assert canvas_box(1024, 256) == (0, 0, 1024, 1024)
    assert canvas_box(512, (256, 192)) == (0, 64, 512, 384)  # a tall picture: the middle columns
    assert canvas_box(32, (24, 32)) == (4, 0, 24, 32)
    with pytest.raises(ValueError, match="whole"):
        canvas_box(32, (100, 300))  # 32 / 3 rows
    with pytest.raises(ValueError, match="whole"):
        canvas_box(32, (23, 32))  # 9 spare rows: not centred on whole rows


def test_same_aspect():
    assert same_aspect((192, 256), (384, 512)) and same_aspect(256, (32, 32))
    assert not same_aspect((192, 256), 256) and not same_aspect((256, 192), (192, 256))


def test_parse_image_size():
    assert parse_image_size("256") == (256, 256)
    assert parse_image_size("192x256") == (192, 256)
    assert parse_image_size("192X256") == (192, 256)
    assert parse_image_size("192\u00d7256") == (192, 256)
    for bad in ("", "x", "0", "-1", "192x", "1x2x3", "a"):
        with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
            parse_image_size(bad)


def test_crop_canvas_and_pool_or_resize():
    renders = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    picture = crop_canvas(renders, (192, 256))
    assert picture.shape == (2, 3, 24, 32) and torch.equal(picture, renders[:, :, 4:28])
    assert crop_canvas(renders, 256) is renders
    with pytest.raises(ValueError, match="square"):
        crop_canvas(renders[:, :, :24], (192, 256))
    assert pool_or_resize(picture, (12, 16)).shape == (2, 3, 12, 16)
    assert torch.equal(pool_or_resize(picture, (12, 16)), torch.nn.functional.avg_pool2d(picture, 2))
    assert pool_or_resize(picture, (48, 64)).shape == (2, 3, 48, 64)
    assert pool_or_resize(picture, (24, 32)) is picture


def test_one_stage_inverter_returns_the_picture_part_of_the_render():
    generator = tiny_generator()
    model = _one_stage(generator)
    assert model.input_size == (48, 64) and model.config.encoder_size == (48, 64)
    images = torch.rand(2, 3, 24, 32) * 2 - 1
    with torch.no_grad():
        result = model(images)
        canvas = generator.synthesis(result.w_plus, refinement=result.refinement, randomize_noise=False)
    assert result.image.shape == (2, 3, 24, 32)
    assert torch.equal(result.image, canvas[:, :, 4:28])


def test_inverter_file_keeps_the_picture_size(tmp_path):
    from refinestyle.inversion import load_inverter, save_inverter

    generator = tiny_generator()
    model = _one_stage(generator)
    save_inverter(tmp_path / "cars.safetensors", model)
    loaded = load_inverter(tmp_path / "cars.safetensors", generator)
    assert loaded.input_size == (48, 64)
    images = torch.rand(1, 3, 24, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(images).image, model(images).image)


def test_encoder_size_must_be_multiples_of_16():
    with pytest.raises(ValueError, match="multiples of 16"):
        _one_stage(tiny_generator(), encoder_size=(24, 32))


def test_psp_cars_checkpoint_reads_192_by_256_pictures(tmp_path):
    """pSp's and e4e's Cars models read 192 x 256 (their opts say dataset_type cars_encode): their
    style blocks bring the 12 x 16 coarse map to 1 x 1 as they do 16 x 16."""
    from refinestyle.inversion import TwoStageInverter
    from refinestyle.inversion.models import PretrainedEncoderInverter
    from refinestyle.inversion.psp import load_psp

    generator = tiny_generator()
    path = write_psp_checkpoint(generator, tmp_path / "psp_cars.pt", "GradualStyleEncoder", input_size=64,
                                dataset_type="cars_encode")  # fmt: skip
    square = write_psp_checkpoint(generator, tmp_path / "psp.pt", "GradualStyleEncoder", input_size=64)
    cars = load_psp(path, generator)
    assert cars.input_size == (48, 64) and load_psp(square, generator).input_size == 64
    images = torch.rand(2, 3, 48, 64) * 2 - 1
    with torch.no_grad():
        w_plus = cars(images)
        # the same weights read the same 48 x 64 features whatever size the encoder was told
        assert torch.equal(w_plus, load_psp(square, generator, input_size=(48, 64))(images))
    assert w_plus.shape == (2, generator.n_latent, STYLE_DIM)
    baseline = PretrainedEncoderInverter(generator, cars)
    with torch.no_grad():
        assert baseline(images).image.shape == (2, 3, 24, 32)
    two = TwoStageInverter(generator, cars, num_refined=3, num_tokens=4, **CARS_TINY)
    with torch.no_grad():
        result = two(images)
    assert result.initial_image.shape == result.image.shape == (2, 3, 24, 32)
    with pytest.raises(ValueError, match="aspect"):
        TwoStageInverter(generator, cars, num_refined=3, num_tokens=4, **dict(CARS_TINY, encoder_size=32))


def test_gradual_style_block_refuses_features_it_cannot_bring_to_one_pixel():
    from refinestyle.inversion.psp import GradualStyleBlock

    block = GradualStyleBlock(8, 4)
    assert block(torch.randn(2, 8, 3, 4)).shape == (2, 8)
    with pytest.raises(ValueError, match=r"in \(2, 4\]"):
        block(torch.randn(2, 8, 8, 8))
    with pytest.raises(ValueError, match=r"in \(2, 4\]"):
        block(torch.randn(2, 8, 2, 4))


def test_training_derives_the_encoder_size_from_the_picture_size(tmp_path):
    from inversion_fixtures import tiny_train_config
    from refinestyle.inversion.train import build_inverter, loss_size

    generator = tiny_generator()
    generator_path = write_generator(generator, tmp_path / "g.pt")
    options = {k: v for k, v in TINY_MODEL_OPTIONS.items() if k != "encoder_size"}
    config = tiny_train_config(generator_path, tmp_path / "data", tmp_path / "run", image_size=(24, 32),
                               model_options=options)  # fmt: skip
    assert config.image_size == [24, 32]  # as config.json keeps it
    model = build_inverter(config, generator, torch.device("cpu"))
    assert model.input_size == (192, 256)
    mismatched = tiny_train_config(generator_path, tmp_path / "data", tmp_path / "run", image_size=(24, 32),
                                   model_options=dict(options, encoder_size=32))  # fmt: skip
    with pytest.raises(ValueError, match="another aspect"):
        build_inverter(mismatched, generator, torch.device("cpu"))
    assert loss_size((192, 256), 128) == (96, 128) and loss_size(256, 1024) == (256, 256)
    # a two-stage run on a Cars first stage must train on Cars pictures
    cars_e4e = write_psp_checkpoint(generator, tmp_path / "e4e_cars.pt", input_size=64, dataset_type="cars_encode")
    square = tiny_train_config(generator_path, tmp_path / "data", tmp_path / "two", stage="two",
                               first_stage=str(cars_e4e), model_options=options)  # fmt: skip
    with pytest.raises(ValueError, match="--image-size 48x64"):
        build_inverter(square, generator, torch.device("cpu"))
    cars = tiny_train_config(generator_path, tmp_path / "data", tmp_path / "two", stage="two",
                             first_stage=str(cars_e4e), image_size=(48, 64), model_options=options)  # fmt: skip
    assert build_inverter(cars, generator, torch.device("cpu")).input_size == (192, 256)
    assert loss_size((24, 32), 32) == (24, 32)


def test_cars_through_the_command_line(tmp_path, capsys):
    """train-inverter at 48 x 64 (LPIPS needs 32 px), then invert, edit from the codes and
    eval-inversion with the inverter's own size: every picture comes out 48 x 64, the middle
    rows of the 64 px render."""
    generator = _cars_generator()
    generator_path = write_generator(generator, tmp_path / "generator.pt")
    _write_pictures(generator, tmp_path / "train", 4, seed=11)
    _write_pictures(generator, tmp_path / "val", 2, seed=12)
    options = [a for key, value in CARS_TINY.items() for a in ("--model-option", f"{key}={json.dumps(value)}")]
    assert run(
        "train-inverter", "--generator", generator_path, "--data", tmp_path / "train", "--out", tmp_path / "run",
        "--lpips-random-backbone", "--domain", "other", "--image-size", "48x64", "--num-refined", 4,
        "--num-tokens", 4, "--batch-size", 2, "--max-steps", 2, "--workers", 0, "--image-every", 2,
        "--val-every", 0, "--checkpoint-every", 0, "--no-progress", *options,
    ) == 0  # fmt: skip
    assert json.loads((tmp_path / "run" / "config.json").read_text())["image_size"] == [48, 64]
    with Image.open(next((tmp_path / "run" / "images").glob("*.png"))) as grid:
        assert grid.size == (3 * 66 + 2, 2 * 50 + 2)  # rows of input | w+ only | refined, 48 x 64 each

    out = tmp_path / "inverted"
    assert run("invert", "--inverter", tmp_path / "run", "--generator", generator_path, "--input",
               tmp_path / "val", "--out", out, "--no-progress") == 0  # fmt: skip
    with Image.open(out / "reconstructions" / "000.png") as picture:
        assert picture.size == (64, 48)
    from refinestyle.inversion.inference import load_codes

    codes = load_codes(sorted((out / "codes").glob("*.safetensors")))
    assert codes.image_size == (48, 64)

    torch.save(torch.randn(1, STYLE_DIM), tmp_path / "boundary.pt")
    assert run("edit", "--generator", generator_path, "--codes", out / "codes", "--boundary",
               tmp_path / "boundary.pt", "--strengths=-1,1", "--out", tmp_path / "edit", "--no-progress") == 0  # fmt: skip
    with Image.open(tmp_path / "edit" / "000.png") as strip:
        assert strip.size == (3 * 66 + 2, 50 + 2)  # input, two strengths; 48 x 64 each

    capsys.readouterr()
    assert run("eval-inversion", "--inverter", tmp_path / "run", "--generator", generator_path, "--data",
               tmp_path / "val", "--lpips-random-backbone", "--domain", "other", "--no-timing",
               "--no-progress", "--out", tmp_path / "eval") == 0  # fmt: skip
    with Image.open(tmp_path / "eval" / "examples.png") as examples:
        assert examples.size == (2 * 66 + 2, 2 * 50 + 2)  # rows of input | reconstruction at 48 x 64


# ---------------------------------------------------------------------------------------------


def _one_stage(generator, refine: bool = True, **overrides):
    from refinestyle.inversion import OneStageInverter

    return OneStageInverter(generator, 4, 4, refine=refine, **dict(CARS_TINY, **overrides)).eval()


def _cars_generator():
    """A 64 px stand-in for the LSUN Cars generator (pictures: 48 x 64, rows 8 to 56)."""
    from refinestyle.generator import Generator

    torch.manual_seed(0)
    generator = Generator(64, style_dim=STYLE_DIM, n_mlp=2, channel_max=32)
    with torch.no_grad():
        for to_rgb in [generator.to_rgb1, *generator.to_rgbs]:
            to_rgb.conv.weight.mul_(0.5)
        generator.latent_avg = generator.mean_latent(512).reshape(-1)
    return generator.eval()


def _write_pictures(generator, folder, count, seed):
    """The renders' picture part (3:4), saved as the car photos would be."""
    from refinestyle.imageio import save_image

    rendered = write_images(generator, folder, count, seed=seed)
    for index, image in enumerate(rendered):
        save_image(crop_canvas(image[None], (3, 4))[0], folder / f"{index:03d}.png")
