"""Loading rosinality-format checkpoints (.pt, bare state_dict, train.py, pSp-style, safetensors) and bad input."""
from __future__ import annotations

import argparse

import pytest
import torch

from refinestyle.checkpoints import (
    CheckpointError,
    generator_fingerprint,
    infer_generator_config,
    load_generator,
    save_rosinality_checkpoint,
)
from refinestyle.generator import Generator
from refinestyle.weights import MissingWeightsError, weights_fingerprint
from rosinality_reference import ReferenceGenerator

STYLE_DIM = 16


@pytest.fixture(scope="module")
def source():
    """A randomised rosinality-semantics generator (32 px, 16 channels) and its state."""
    torch.manual_seed(0)
    channels = {4: 16, 8: 16, 16: 16, 32: 16}
    reference = ReferenceGenerator(32, STYLE_DIM, 3, channels).randomize_(torch.Generator().manual_seed(1))
    return reference, {k: v.clone() for k, v in reference.state_dict().items()}, torch.randn(STYLE_DIM)


def render(generator, z):
    with torch.no_grad():
        return generator([z], randomize_noise=False)[0]


def expected_image(reference, z):
    with torch.no_grad():
        w_plus = reference.mapping(z)[:, None].repeat(1, reference.n_latent, 1)
        noise = [getattr(reference.noises, f"noise_{i}") for i in range(reference.num_layers)]
        return reference.synthesis(w_plus, noise)


def close(a, b, tolerance=1e-5):
    return ((a - b).norm() / b.norm()).item() < tolerance


def test_rosinality_checkpoint_with_latent_avg(tmp_path, source):
    reference, state, latent_avg = source
    path = tmp_path / "550000.pt"
    torch.save({"g_ema": state, "latent_avg": latent_avg}, path)
    generator = load_generator(path, size=32)
    assert isinstance(generator, Generator) and not generator.training
    assert (generator.size, generator.style_dim, generator.n_mlp) == (32, STYLE_DIM, 3)
    assert generator.channels == {4: 16, 8: 16, 16: 16, 32: 16}
    assert torch.equal(generator.latent_avg, latent_avg)
    assert generator.checkpoint_format == "rosinality"
    z = torch.randn(2, STYLE_DIM)
    assert close(render(generator, z), expected_image(reference, z))


def test_bare_state_dict_legacy_format_and_dataparallel_prefix(tmp_path, source):
    reference, state, _ = source
    path = tmp_path / "g_ema_legacy.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, path, _use_new_zipfile_serialization=False)
    generator = load_generator(path)
    assert generator.latent_avg is None
    z = torch.randn(2, STYLE_DIM)
    assert close(render(generator, z), expected_image(reference, z))


def test_train_checkpoint_with_args_namespace(tmp_path, source):
    _, state, latent_avg = source
    path = tmp_path / "train.pt"
    args = argparse.Namespace(size=32, batch=16, r1=10.0)
    torch.save({"g": state, "d": {"convs.0.0.weight": torch.randn(2)}, "g_ema": state, "args": args,
                "ada_aug_p": 0.1}, path)
    generator = load_generator(path)
    assert generator.size == 32


def test_psp_style_checkpoint_with_decoder_prefix(tmp_path, source):
    reference, state, latent_avg = source
    path = tmp_path / "psp_ffhq_encode.pt"
    encoder = {"encoder.input_layer.0.weight": torch.randn(4, 3, 3, 3)}
    rows = latent_avg[None].repeat(reference.n_latent, 1)
    torch.save({"state_dict": {**encoder, **{f"decoder.{k}": v for k, v in state.items()}}, "latent_avg": rows,
                "opts": {"output_size": 32}}, path)
    generator = load_generator(path)
    assert torch.equal(generator.latent_avg, latent_avg)


def test_save_and_reload_round_trip_pt_and_safetensors(tmp_path):
    torch.manual_seed(2)
    generator = Generator(16, style_dim=8, n_mlp=2, channel_multiplier=1, channel_max=8)
    generator.latent_avg = torch.randn(8)
    z = torch.randn(2, 8)
    for name in ("g.pt", "g.safetensors"):
        path = save_rosinality_checkpoint(generator, tmp_path / name)
        loaded = load_generator(path)
        assert loaded.checkpoint_format == ("safetensors" if name.endswith("safetensors") else "rosinality")
        assert torch.equal(loaded.latent_avg, generator.latent_avg)
        assert torch.equal(render(loaded, z), render(generator, z))


def test_round_trip_keeps_an_nvlabs_networks_clamp_and_mapping_lr(tmp_path):
    """A generator converted from NVlabs can have conv_clamp and a mapping lr multiplier other than
    rosinality's 0.01, which a rosinality file cannot record: the mapping's weights are rescaled to
    0.01 and the clamp is kept beside them, so the reloaded generator renders the same images."""
    torch.manual_seed(3)
    generator = Generator(16, style_dim=8, n_mlp=2, channel_multiplier=1, channel_max=8, lr_mlp=0.1)
    generator.conv_clamp = 0.7
    z = torch.randn(2, 8)
    expected = render(generator, z)
    for name in ("g.pt", "g.safetensors"):
        loaded = load_generator(save_rosinality_checkpoint(generator, tmp_path / name))
        assert loaded.conv_clamp == 0.7 and loaded.lr_mlp == 0.01
        # float32 rounding of the rescaled mapping weights; without the two fixes the images differ by ~1
        torch.testing.assert_close(render(loaded, z), expected, rtol=1e-4, atol=1e-5)
        # an adapter or inverter run trained on the NVlabs network accepts the re-saved file
        assert generator_fingerprint(loaded) == generator_fingerprint(generator)
    plain = Generator(16, style_dim=8, n_mlp=2, channel_multiplier=1, channel_max=8)
    assert generator_fingerprint(plain) == weights_fingerprint(plain)  # fingerprints of 0.01 generators unchanged
    with pytest.raises(ValueError, match=r"latent_avg: expected \[style_dim=8\]"):
        save_rosinality_checkpoint(generator, tmp_path / "bad.pt", latent_avg=torch.zeros(9))


def test_config_inference_for_config_f_shapes():
    with torch.device("meta"):
        state = Generator(1024).state_dict()
        config = infer_generator_config(state)
    assert config == {"size": 1024, "style_dim": 512, "n_mlp": 8, "channel_multiplier": 2}
    with torch.device("meta"):
        config = infer_generator_config(Generator(256, channel_multiplier=1).state_dict())
    assert config == {"size": 256, "style_dim": 512, "n_mlp": 8, "channel_multiplier": 1}


@pytest.mark.parametrize("channel_max, expected", [(None, {}), (512, {"channel_max": 512}), (768, {"channel_max": 768})])
def test_config_inference_tells_rosinality_uncapped_table_from_a_capped_one(channel_max, expected):
    """rosinality's channel_multiplier=4 table has 1024 channels at 64 px; NVlabs caps at 512."""
    with torch.device("meta"):
        generator = Generator(256, channel_multiplier=4, channel_max=channel_max)
        config = infer_generator_config(generator.state_dict())
        assert config == {"size": 256, "style_dim": 512, "n_mlp": 8, "channel_multiplier": 4, **expected}
        assert Generator(**config).channels == generator.channels


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(MissingWeightsError, match="nowhere.pt"):
        load_generator(tmp_path / "nowhere.pt")
    # a folder is not "not found": it is there, but it is not a weights file
    with pytest.raises(MissingWeightsError, match="is a folder; give the weights file itself"):
        load_generator(tmp_path)


def test_files_expected_but_folders_given_say_so(tmp_path):
    """Every loader of a user-named file tells a folder from a missing file."""
    from refinestyle.adaptation.adapter import Adapter
    from refinestyle.imageio import load_image
    from refinestyle.inversion.editing import GANSpaceDirections, load_boundary
    from refinestyle.inversion.inference import load_codes
    from refinestyle.inversion.models import read_inverter_config
    from refinestyle.weights import require_file

    loaders = [
        (Adapter.load, "adapter file"), (load_image, "image file"), (GANSpaceDirections.load, "GANSpace directions file"),
        (lambda path: load_boundary(path, 4, 8), "boundary file"), (lambda path: load_codes([path]), "code file"),
        (read_inverter_config, "inverter file"),
    ]
    for load, what in loaders:
        with pytest.raises(FileNotFoundError, match=f"^{what}: .* is a folder, not a file$"):
            load(tmp_path)
        with pytest.raises(FileNotFoundError, match=f"^{what} not found: .*absent$"):
            load(tmp_path / "absent")
    (tmp_path / "present").write_text("x")
    assert require_file(str(tmp_path / "present"), "file") == tmp_path / "present"


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"GIF89a not a checkpoint at all", "not a recognised checkpoint"),
    ],
)
def test_unrecognised_files(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_generator(path)


def test_truncated_checkpoint_is_reported_as_corrupt(tmp_path, source):
    _, state, latent_avg = source
    path = tmp_path / "cut.pt"
    torch.save({"g_ema": state, "latent_avg": latent_avg}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_generator(path)


def test_wrong_content_and_shape_mismatch(tmp_path, source):
    _, state, _ = source
    path = tmp_path / "discriminator.pt"
    torch.save({"d": {"convs.0.0.weight": torch.randn(2)}}, path)
    with pytest.raises(CheckpointError, match="expected a rosinality StyleGAN2 checkpoint.*found \\['d'\\]"):
        load_generator(path)

    broken = dict(state)
    broken["convs.2.conv.modulation.weight"] = torch.randn(16, 15)
    path = tmp_path / "mismatch.pt"
    torch.save({"g_ema": broken}, path)
    with pytest.raises(CheckpointError, match="convs.2.conv.modulation.weight: expected \\(16, 16\\), found \\(16, 15\\)"):
        load_generator(path)

    missing = {k: v for k, v in state.items() if k != "noises.noise_3"}
    torch.save({"g_ema": missing}, path)
    with pytest.raises(CheckpointError, match="missing 1 tensors \\(noises.noise_3\\)"):
        load_generator(path)

    torch.save({"g_ema": state}, path)
    with pytest.raises(CheckpointError, match="size=128 was asked for.*32 px"):
        load_generator(path, size=128)


def test_arbitrary_objects_are_refused(tmp_path):
    path = tmp_path / "whole_module.pt"
    torch.save({"g_ema": torch.nn.Linear(2, 2)}, path)  # a pickled module, not a state_dict
    with pytest.raises(CheckpointError, match="weights_only"):
        load_generator(path)


def test_written_safetensors_files_get_the_usual_mode(tmp_path):
    """safetensors 0.8 leaves its files 0600; ours get 0666 less the umask, like any created file."""
    import os
    import stat

    previous = os.umask(0o027)
    try:
        torch.manual_seed(0)
        path = save_rosinality_checkpoint(Generator(16, style_dim=8, n_mlp=1, channel_max=8), tmp_path / "g.safetensors")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert load_generator(path).size == 16


def test_legacy_files_saved_with_pickle_protocol_4_are_named_as_such(tmp_path, source):
    _, state, latent_avg = source
    for zip_format in (False, True):
        path = tmp_path / f"p4_{zip_format}.pt"
        torch.save({"g_ema": state, "latent_avg": latent_avg}, path, pickle_protocol=4,
                   _use_new_zipfile_serialization=zip_format)
        with pytest.raises(CheckpointError, match="pickle protocol that torch.load\\(weights_only=True\\) cannot read"):
            load_generator(path)  # a legacy file was taken for an NVlabs pickle ("expected ... 'G_ema'")


def test_bad_values_in_the_file_are_checkpoint_errors_naming_it(tmp_path, source):
    _, state, latent_avg = source
    path = tmp_path / "nan_avg.pt"
    torch.save({"g_ema": state, "latent_avg": torch.full_like(latent_avg, float("nan"))}, path)
    with pytest.raises(CheckpointError, match="nan_avg.pt: latent_avg .* holds NaN or inf"):
        load_generator(path)
    for value in (-1.0, "abc", float("inf")):
        path = tmp_path / "clamp.pt"
        torch.save({"g_ema": state, "conv_clamp": value}, path)
        with pytest.raises(CheckpointError, match="clamp.pt: its 'conv_clamp' entry must be a positive number"):
            load_generator(path)
    from safetensors.torch import save_file

    path = tmp_path / "clamp.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"conv_clamp": "nan"})
    with pytest.raises(CheckpointError, match="clamp.safetensors: its 'conv_clamp' entry must be a positive number"):
        load_generator(path)


def test_saving_to_a_home_relative_path_writes_where_loading_looks(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    generator = Generator(16, style_dim=8, n_mlp=2, channel_multiplier=1, channel_max=8)
    written = save_rosinality_checkpoint(generator, "~/models/g.pt")
    assert written == tmp_path / "models" / "g.pt" and not (tmp_path / "~").exists()
    load_generator("~/models/g.pt")


def test_refusals_name_a_few_tensors_and_count_them():
    from refinestyle.weights import shorten_state_dict_error, some_of, state_dict_mismatch

    assert some_of(["a", "b"]) == "a, b"
    assert some_of([f"k{i}" for i in range(10)], keep=3) == "k0, k1, k2, ... (10 in all)"
    expected = {f"layer{i}.weight": torch.zeros(2) for i in range(8)}
    state = {**{f"layer{i}.weight": torch.zeros(2) for i in range(1, 8)}, "extra": torch.zeros(1)}
    state["layer7.weight"] = torch.zeros(3)
    assert state_dict_mismatch(expected, dict(expected)) == ""
    assert state_dict_mismatch(expected, state) == (
        "missing layer0.weight; unexpected extra; shape mismatches layer7.weight")
    many = {f"other{i}": torch.zeros(2) for i in range(5)}
    assert state_dict_mismatch(expected, many).startswith("missing layer0.weight, layer1.weight, layer2.weight, ... (8 in all)")
    try:
        torch.nn.Linear(2, 3).load_state_dict({f"k{i}": torch.zeros(1) for i in range(9)})
    except RuntimeError as error:
        short = shorten_state_dict_error(error)
    assert short == ('Missing key(s) in state_dict: weight, bias; '
                     'Unexpected key(s) in state_dict: k0, k1, k2, k3, ... (9 in all)')
