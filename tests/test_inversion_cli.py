"""Smoke tests of train-inverter, invert, edit, ganspace and eval-inversion on tiny models."""
from __future__ import annotations

import argparse
import csv
import importlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from inversion_fixtures import tiny_generator, write_generator, write_images, write_psp_checkpoint
from refinestyle import cli
from refinestyle.weights import MissingWeightsError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_OPTIONS = [
    "--model-option", "encoder_depth=[1,1,1,1]",
    "--model-option", "encoder_widths=[16,16,32,32]",
    "--model-option", "encoder_size=32",
    "--model-option", "heads=2",
    "--model-option", "head_dim=16",
    "--model-option", "ffn_dim=64",
]


def run(command: str, *argv: str) -> int:
    """Run `refinestyle COMMAND ARGV...` in this process, through the console script's dispatcher."""
    return cli.main([command, *(str(a) for a in argv)])


def test_commands_are_registered_with_help():
    for command in ("train-inverter", "invert", "edit", "ganspace", "eval-inversion", "eval-edit"):
        module = importlib.import_module(cli.COMMANDS[command])
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        assert module.__doc__.strip() and parser.format_help()
    with pytest.raises(SystemExit):
        run("edit", "--help")


@pytest.fixture(autouse=True)
def no_weight_env(monkeypatch):
    for name in ("REFINESTYLE_ALEXNET", "REFINESTYLE_IR_SE50", "REFINESTYLE_GENERATOR", "REFINESTYLE_TRACEBACK"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A generator file, train/val folders and a 3-step one-stage run made through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    generator = tiny_generator()
    generator_path = write_generator(generator, root / "generator.pt")
    write_images(generator, root / "train", 4, seed=11)
    write_images(generator, root / "val", 3, seed=12)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = run(
            "train-inverter", "--generator", generator_path, "--data", root / "train", "--val-data", root / "val",
            "--out", root / "run", "--lpips-random-backbone", "--domain", "other", "--image-size", 32,
            "--num-refined", 4, "--num-tokens", 4, "--batch-size", 2, "--max-steps", 3, "--workers", 0,
            "--image-every", 2, "--val-every", 2, "--checkpoint-every", 2, "--no-progress", *TINY_OPTIONS,
        )
    finally:
        torch.set_num_threads(previous)
    assert code == 0
    return root, generator_path


def test_train_inverter_writes_a_complete_run(trained):
    root, _ = trained
    run_dir = root / "run"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["stage"] == "one" and config["model_options"]["encoder_depth"] == [1, 1, 1, 1]
    with (run_dir / "train_log.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["step"] for r in rows] == ["1", "2", "3"] and "lpips" in rows[0] and "id" not in rows[0]
    with (run_dir / "val_log.csv").open() as handle:
        val_rows = list(csv.DictReader(handle))
    assert [r["step"] for r in val_rows] == ["2", "3"]
    assert float(val_rows[0]["count"]) == 3 and float(val_rows[0]["mse_mean"]) > 0
    grids = sorted(p.name for p in (run_dir / "images").iterdir())
    assert grids == ["step_0000002.png", "step_0000003.png"]
    with Image.open(run_dir / "images" / "step_0000002.png") as grid:
        # 2 images (the batch) x (input | w+ only | refined), 32 px tiles, 2 px padding
        assert grid.size == (3 * 34 + 2, 2 * 34 + 2)
    assert (run_dir / "checkpoints" / "latest.pt").is_file()
    assert (run_dir / "inverter.safetensors").is_file()
    with Image.open(run_dir / "losses.png") as plot:
        assert plot.size[0] > 800  # training and validation panels side by side


def test_train_inverter_resume_through_the_cli(trained, tmp_path, capsys):
    root, _ = trained
    import shutil

    shutil.copytree(root / "run", tmp_path / "run")
    assert run("train-inverter", "--out", tmp_path / "run", "--resume", "--max-steps", 4, "--workers", 0,
               "--no-progress", "--val-every", 0, "--image-every", 0) == 0
    state = torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=False)
    assert state["step"] == 4 and state["config"]["out"] == str(tmp_path / "run")
    # options not given again keep the run's own values (checkpoints every 2, not the default 1000)
    assert state["config"]["checkpoint_every"] == 2 and state["config"]["val_every"] == 0
    # without --max-steps the run keeps its own (now 4): nothing left to do
    capsys.readouterr()
    assert run("train-inverter", "--out", tmp_path / "run", "--resume", "--workers", 0, "--no-progress") == 0
    assert torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=False)["step"] == 4
    assert capsys.readouterr().out.startswith("step 4: nothing to do")
    assert run("train-inverter", "--out", tmp_path / "fresh") == 2
    assert "refinestyle train-inverter: error: --generator and --data required" in capsys.readouterr().err


def test_train_inverter_prints_its_summary_on_rank_0_alone(trained, tmp_path, capsys, monkeypatch):
    """Under torchrun every rank returns the same summary; only rank 0 prints it."""
    import shutil

    import refinestyle.inversion.train as training

    root, _ = trained
    shutil.copytree(root / "run", tmp_path / "run")
    argv = ("--out", tmp_path / "run", "--resume", "--max-steps", 3, "--workers", 0, "--no-progress")
    summaries = []
    real_train_inverter = training.train_inverter
    monkeypatch.setattr(training, "train_inverter", lambda config: summaries.append(real_train_inverter(config))
                        or summaries[-1])
    assert run("train-inverter", *argv) == 0
    assert capsys.readouterr().out.startswith("step 3: nothing to do (max steps reached)\ninverter: ")
    # rank 1 of a torchrun: the same summary (a real run cannot be rank 1 without a process group)
    monkeypatch.setattr(training, "train_inverter", lambda config: summaries[0])
    monkeypatch.setenv("RANK", "1")
    assert run("train-inverter", *argv) == 0
    assert capsys.readouterr().out == ""



def test_train_inverter_compile_option_reaches_the_config_and_a_resume_takes_the_new_value(trained, tmp_path):
    """--compile [MODE] is a run-time choice, like --workers: a resumed run compiles or not as told now."""
    import shutil

    from refinestyle.commands.train_inverter import config_from_args

    root, generator_path = trained

    def config(*argv):
        return config_from_args(cli.build_parser().parse_args(["train-inverter", *(str(a) for a in argv)]))

    fresh = ["--generator", generator_path, "--data", root / "train", "--out", tmp_path / "new"]
    assert config(*fresh).compile is None
    assert config(*fresh, "--compile").compile == "default"
    assert config(*fresh, "--compile", "reduce-overhead").compile == "reduce-overhead"
    shutil.copytree(root / "run", tmp_path / "run")
    assert config("--out", tmp_path / "run", "--resume", "--compile", "max-autotune").compile == "max-autotune"
    assert config("--out", tmp_path / "run", "--resume").compile is None


def test_train_inverter_shows_its_validation_progress(trained, tmp_path, capsys):
    import shutil

    root, _ = trained
    shutil.copytree(root / "run", tmp_path / "run")
    capsys.readouterr()
    assert run("train-inverter", "--out", tmp_path / "run", "--resume", "--max-steps", 4, "--workers", 0,
               "--val-every", 1, "--image-every", 0) == 0
    error = capsys.readouterr().err
    assert "train one-stage" in error and "validate (step 4)" in error


def test_bad_arguments_are_one_line_errors(trained, tmp_path, capsys):
    """A zero batch size (ganspace looped forever), a device this machine lacks or a run folder
    that already holds a run: one line naming the option, exit status 2, no traceback."""
    root, generator_path = trained
    for command, argv, expected in [
        ("ganspace", ["--generator", generator_path, "--out", tmp_path / "g.safetensors", "--batch-size", 0],
         "argument --batch-size: expected a positive integer, got 0"),
        ("invert", ["--inverter", root / "run", "--generator", generator_path, "--input", root / "val",
                    "--out", tmp_path / "i", "--device", "gpu"], "argument --device: expected a torch device"),
        ("generate", ["--ckpt", generator_path, "--n", "-1"], "argument --n: expected a positive integer"),
        ("train-inverter", ["--generator", generator_path, "--data", root / "train", "--out", tmp_path / "t",
                            "--compile", "fastest"], "argument --compile: expected one of default, reduce-overhead"),
        ("adapt-text", ["--generator", generator_path, "--target", "sketch", "--out", tmp_path / "a.safetensors",
                        "--compile", "fastest"], "argument --compile: expected one of default, reduce-overhead"),
    ]:
        with pytest.raises(SystemExit) as info:
            run(command, *argv)
        assert info.value.code == 2
        assert expected in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            run("generate", "--ckpt", generator_path, "--device", "cuda")
        assert "no usable CUDA device" in capsys.readouterr().err
    code = run("train-inverter", "--generator", generator_path, "--data", root / "train", "--out", root / "run")
    assert code == 2 and "already holds a run; resume it (--resume)" in capsys.readouterr().err.replace(
        f" ({root / 'run' / 'checkpoints' / 'latest.pt'})", ""
    )


def _one_line_error(capsys) -> str:
    """The error line of a command that failed on bad input (exit status 2 checked by the caller)."""
    err = capsys.readouterr().err
    assert err.startswith("refinestyle train-inverter: error: ") and "Traceback" not in err, err
    return err.splitlines()[0]


def test_train_inverter_resume_refuses_options_that_change_the_run(trained, tmp_path, capsys):
    """--resume keeps the run's config: a model, loss, optimisation or path option that differs
    from it is refused by name (it was silently ignored); run-time options and the same values are taken."""
    import shutil

    root, generator_path = trained
    shutil.copytree(root / "run", tmp_path / "run")
    saved = (tmp_path / "run" / "config.json").read_text()
    other_generator = shutil.copy(generator_path, tmp_path / "other.pt")
    resume = ["train-inverter", "--out", tmp_path / "run", "--resume", "--workers", 0, "--no-progress"]
    capsys.readouterr()
    assert run(*resume, "--num-tokens", 8, "--lr", 0.5, "--batch-size", 1, "--seed", 9, "--stage", "two",
               "--first-stage", other_generator, "--bf16", "--model-option", "heads=4", "--generator",
               other_generator, "--log-every", 5) == 2  # fmt: skip
    error = _one_line_error(capsys)
    for change in ["--num-tokens 8 (the run has 4)", "--lr 0.5 (the run has 0.0001)", "--batch-size 1 (the run has 2)",
                   "--seed 9 (the run has 0)", "--stage two (the run has one)", "--bf16 (the run has bf16=false)",
                   "--model-option heads=4 (the run has 2)", f"--first-stage {other_generator} (the run has none)",
                   f"--generator {other_generator} (the run has {generator_path}, which still exists)"]:
        assert change in error, (change, error)
    assert "a resumed run keeps its config" in error and "--log-every" not in error  # a run-time option
    assert (tmp_path / "run" / "config.json").read_text() == saved
    # the run's own values given again (a path spelt differently, the defaults it took) are no change;
    # --log-every is taken
    assert run(*resume, "--num-tokens", 4, "--batch-size", 2, "--model-option", "heads=2", "--domain", "other",
               "--lr", "1e-4", "--model-option", "dropout=0.0", "--image-size", "32x32",
               "--lpips-random-backbone", "--generator", root / ".." / root.name / "generator.pt",
               "--data", root / "train", "--log-every", 5) == 0  # fmt: skip
    assert json.loads((tmp_path / "run" / "config.json").read_text())["log_every"] == 5


def test_train_inverter_resume_takes_the_default_num_refined_restated(trained, tmp_path, capsys):
    """A run that took the default --num-refined (it depends on the generator) keeps null in its
    config; restating the value it took was refused as "(the run has none)"."""
    import shutil

    root, _ = trained
    shutil.copytree(root / "run", tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    (tmp_path / "run" / "config.json").write_text(json.dumps(dict(config, num_refined=None)))  # its inverter has 4
    resume = ["train-inverter", "--out", tmp_path / "run", "--resume", "--workers", 0, "--no-progress"]
    capsys.readouterr()
    assert run(*resume, "--num-refined", 5) == 2
    assert "--num-refined 5 (the run has 4)" in _one_line_error(capsys)
    assert run(*resume, "--num-refined", 4, "--max-steps", 4) == 0


def test_train_inverter_resume_refuses_other_weights_at_a_moved_path(trained, tmp_path, capsys):
    """A moved generator may be given again, another one may not: the same architecture with other
    weights trained on silently, another architecture ended in a traceback after config.json had
    been rewritten to name it, so that the right file was then refused too."""
    import shutil

    from refinestyle.generator import Generator

    root, generator_path = trained
    shutil.copy(generator_path, tmp_path / "generator.pt")
    common = ["--out", tmp_path / "run", "--workers", 0, "--no-progress"]
    assert run("train-inverter", "--generator", tmp_path / "generator.pt", "--data", root / "train", *common,
               "--lpips-random-backbone", "--domain", "other", "--image-size", 32, "--num-refined", 4,
               "--num-tokens", 4, "--batch-size", 2, "--max-steps", 1, "--image-every", 0, *TINY_OPTIONS) == 0
    saved = (tmp_path / "run" / "config.json").read_text()
    shutil.move(tmp_path / "generator.pt", tmp_path / "moved.pt")  # the run's generator is gone from its path
    same_shape = write_generator(tiny_generator(seed=5), tmp_path / "same_shape.pt")
    other_shape = write_generator(Generator(32, style_dim=32, n_mlp=2, channel_max=16), tmp_path / "other.pt")
    resume = ["train-inverter", "--resume", "--max-steps", 2, *common]
    capsys.readouterr()
    assert run(*resume, "--generator", same_shape) == 2
    assert f"--generator {same_shape}: other weights than the interrupted run trained with" in _one_line_error(capsys)
    assert run(*resume, "--generator", other_shape) == 2
    assert f"--generator {other_shape}: other weights" in _one_line_error(capsys)
    checkpoint = tmp_path / "run" / "checkpoints" / "latest.pt"
    state = torch.load(checkpoint, weights_only=False)
    torch.save({k: v for k, v in state.items() if k != "fingerprints"}, checkpoint)  # as older runs wrote it
    assert run(*resume, "--generator", other_shape) == 2
    assert "do not fit the model built for this run" in _one_line_error(capsys)
    assert (tmp_path / "run" / "config.json").read_text() == saved  # untouched by the refused resumes
    assert run(*resume, "--generator", tmp_path / "moved.pt") == 0  # the moved file itself


def test_train_inverter_resume_takes_moved_generator_and_data(trained, tmp_path, capsys):
    """A path may change on --resume when the saved one no longer exists (the files moved)."""
    import shutil

    root, generator_path = trained
    shutil.copy(generator_path, tmp_path / "generator.pt")
    shutil.copytree(root / "train", tmp_path / "data")
    common = ["--out", tmp_path / "run", "--workers", 0, "--no-progress"]
    assert run("train-inverter", "--generator", tmp_path / "generator.pt", "--data", tmp_path / "data", *common,
               "--lpips-random-backbone", "--domain", "other", "--image-size", 32, "--num-refined", 4,
               "--num-tokens", 4, "--batch-size", 2, "--max-steps", 1, "--image-every", 0, *TINY_OPTIONS) == 0
    (tmp_path / "moved").mkdir()
    shutil.move(tmp_path / "generator.pt", tmp_path / "moved" / "generator.pt")
    shutil.move(tmp_path / "data", tmp_path / "moved" / "data")
    # a "moved" folder with other images is not the run's data: bit-for-bit resume would silently break
    shutil.copytree(root / "val", tmp_path / "other")
    capsys.readouterr()
    assert run("train-inverter", "--resume", "--max-steps", 2, "--generator", tmp_path / "moved" / "generator.pt",
               "--data", tmp_path / "other", *common) == 2
    assert "other images than the interrupted run trained with (4 files then, 3 now" in _one_line_error(capsys)
    assert run("train-inverter", "--resume", "--max-steps", 2, "--generator", tmp_path / "moved" / "generator.pt",
               "--data", tmp_path / "moved" / "data", *common) == 0
    state = torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=False)
    assert state["step"] == 2 and state["config"]["generator"] == str(tmp_path / "moved" / "generator.pt")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"] == str(tmp_path / "moved" / "data")


@pytest.mark.parametrize("option, value, expected", [
    ("--log-every", 0, "argument --log-every: expected a positive integer, got 0"),
    ("--max-steps", 0, "argument --max-steps: expected a positive integer, got 0"),
    ("--val-max-images", 0, "argument --val-max-images: expected a positive integer, got 0"),
    ("--num-tokens", 0, "argument --num-tokens: expected a positive integer, got 0"),
    ("--num-refined", 0, "argument --num-refined: expected a positive integer, got 0"),
    ("--image-size", -1, "argument --image-size: expected a size in pixels, N or HEIGHTxWIDTH (e.g. 256 or 192x256), got '-1'"),
    ("--image-size", "0x32", "argument --image-size: expected a size in pixels, N or HEIGHTxWIDTH (e.g. 256 or 192x256), got '0x32'"),
    ("--checkpoint-every", -1, "argument --checkpoint-every: expected an integer >= 0, got -1"),
    ("--image-every", -1, "argument --image-every: expected an integer >= 0, got -1"),
    ("--val-every", -2, "argument --val-every: expected an integer >= 0, got -2"),
    ("--workers", -1, "argument --workers: expected an integer >= 0, got -1"),
    ("--seed", -1, "argument --seed: expected an integer >= 0, got -1"),
])  # fmt: skip
def test_train_inverter_refuses_meaningless_numbers(trained, tmp_path, capsys, option, value, expected):
    """--log-every 0 ended in a ZeroDivisionError after the models were built."""
    root, generator_path = trained
    for where in (["--generator", generator_path, "--data", root / "train", "--out", tmp_path / "new"],
                  ["--out", root / "run", "--resume"]):
        with pytest.raises(SystemExit) as info:
            run("train-inverter", *where, option, value)
        assert info.value.code == 2
        assert expected in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_train_inverter_refuses_unknown_model_options_and_a_stray_first_stage(trained, tmp_path, capsys):
    """An unknown --model-option was a TypeError traceback; --first-stage without --stage two was ignored."""
    root, generator_path = trained
    new_run = ["train-inverter", "--generator", generator_path, "--data", root / "train", "--workers", 0,
               "--no-progress", "--lpips-random-backbone", "--domain", "other", *TINY_OPTIONS]
    capsys.readouterr()
    assert run(*new_run, "--out", tmp_path / "a", "--model-option", "foo=1") == 2
    error = _one_line_error(capsys)
    assert "--model-option" in error and "'foo'" in error and "encoder_depth" in error and "heads" in error
    assert run(*new_run, "--out", tmp_path / "b", "--first-stage", generator_path) == 2
    assert "--first-stage: only a two-stage run has a first stage (add --stage two)" in _one_line_error(capsys)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_train_inverter_resume_reports_a_bad_checkpoint_in_one_line(trained, tmp_path, capsys):
    """A truncated checkpoint was an unpickling traceback; a checkpoint of another process count a RuntimeError."""
    import shutil

    root, _ = trained
    shutil.copytree(root / "run", tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoints" / "latest.pt"
    whole = checkpoint.read_bytes()
    resume = ["train-inverter", "--out", tmp_path / "run", "--resume", "--max-steps", 4, "--workers", 0,
              "--no-progress"]
    capsys.readouterr()
    checkpoint.write_bytes(whole[:1000])
    assert run(*resume) == 2
    assert f"cannot read checkpoint {checkpoint}: " in _one_line_error(capsys)
    state = torch.load(io.BytesIO(whole), weights_only=False)
    state["rng"] = state["rng"] * 2  # as if written by a torchrun of 2 processes
    torch.save(state, checkpoint)
    assert run(*resume) == 2
    assert "the checkpoint was written by 2 processes, this run has 1" in _one_line_error(capsys)
    config = tmp_path / "run" / "config.json"
    config.write_text(config.read_text()[:40])  # a damaged config is named too
    assert run(*resume) == 2
    assert f"--resume: {config} is not a readable config" in _one_line_error(capsys)


def test_train_inverter_refuses_a_file_for_its_run_folder(trained, tmp_path, capsys):
    root, generator_path = trained
    taken = tmp_path / "taken"
    taken.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        run("train-inverter", "--generator", generator_path, "--data", root / "train", "--out", taken)
    assert exit_info.value.code == 2 and "is a file; expected a folder" in capsys.readouterr().err


def test_train_inverter_names_an_unreadable_image_in_one_line_with_data_workers(trained, tmp_path, capsys):
    """With --workers N the DataLoader re-raised a bad image's error with the whole worker traceback
    as its message; it is the same one line as with --workers 0."""
    import shutil

    root, generator_path = trained
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(root / "train" / "000.png", data / "000.png")
    (data / "zz.png").write_bytes(b"not an image")
    lines = []
    for workers in (0, 2):
        assert run("train-inverter", "--generator", generator_path, "--data", data, "--out", tmp_path / f"w{workers}",
                   "--workers", workers, "--batch-size", 2, "--max-steps", 1, "--no-progress",
                   "--lpips-random-backbone", "--domain", "other", "--image-size", 32, "--num-refined", 4,
                   "--num-tokens", 4, *TINY_OPTIONS) == 2  # fmt: skip
        lines.append(_one_line_error(capsys))
    assert f"{data / 'zz.png'} is not a readable image: " in lines[0]
    assert lines[1] == lines[0]
    # and the command ends: the workers ignore SIGTERM, so multiprocessing's exit handler waited
    # for them forever when the error's traceback still held the loader's iterator
    import subprocess
    import sys

    command = [sys.executable, "-m", "refinestyle", "train-inverter", "--generator", generator_path, "--data", data,
               "--out", tmp_path / "sub", "--workers", 2, "--batch-size", 2, "--max-steps", 1, "--no-progress",
               "--lpips-random-backbone", "--domain", "other", "--image-size", 32, "--num-refined", 4,
               "--num-tokens", 4, *TINY_OPTIONS]  # fmt: skip
    completed = subprocess.run([str(a) for a in command], capture_output=True, text=True, timeout=180)
    assert completed.returncode == 2 and "is not a readable image" in completed.stderr, completed.stderr[-2000:]


def test_ganspace_keeps_a_png_named_output_and_edit_names_a_wrong_file(trained, tmp_path, capsys):
    root, generator_path = trained
    out = tmp_path / "gs.png"
    assert run("ganspace", "--generator", generator_path, "--out", out, "--num-samples", 1000,
               "--num-components", 4, "--preview-components", 1, "--no-progress") == 0
    from refinestyle.inversion.editing import GANSpaceDirections

    assert GANSpaceDirections.load(out).components.shape == (4, 32)  # not overwritten by the preview
    assert (tmp_path / "gs-preview.png").is_file()
    # preview layers out of range: refused before the PCA runs and its file is written
    assert run("ganspace", "--generator", generator_path, "--out", tmp_path / "bad.safetensors", "--num-samples", 1000,
               "--preview-layers", "0-50", "--no-progress") == 2  # fmt: skip
    assert "layers" in capsys.readouterr().err and not (tmp_path / "bad.safetensors").exists()
    def edit_error(ganspace, *more):
        code = run("edit", "--generator", generator_path, "--inverter", root / "run", "--input", root / "val",
                   "--ganspace", ganspace, "--out", tmp_path / "e", "--image-size", 32, *more)
        error = capsys.readouterr().err.strip()
        assert code == 2 and "batch/s" not in error  # before any image is inverted (no progress bar)
        assert error.splitlines()[1:] in ([], ["(set REFINESTYLE_TRACEBACK=1 for the traceback)"])  # one line
        return error.splitlines()[0]

    assert "not a GANSpace directions file" in edit_error(generator_path)
    # a safetensors file of another kind: the tensors it lacks, and a few of the many it holds
    error = edit_error(root / "run" / "inverter.safetensors")
    assert "not a GANSpace directions file" in error and "no components, mean, stddev tensor" in error
    assert "in all)" in error.split("it holds ")[1]
    error = edit_error(out, "--component", 4)
    assert "--component: " in error and "components 0..3, got 4" in error


def test_invert_writes_reconstructions_codes_and_grid(trained, tmp_path, capsys):
    from refinestyle.inversion.inference import load_codes

    root, generator_path = trained
    out = tmp_path / "inverted"
    assert run("invert", "--inverter", root / "run", "--generator", generator_path, "--input", root / "val",
               "--out", out, "--image-size", 32, "--batch-size", 2, "--no-progress") == 0
    assert sorted(p.name for p in (out / "reconstructions").iterdir()) == ["000.png", "001.png", "002.png"]
    codes = load_codes(sorted((out / "codes").glob("*.safetensors")))
    generator = tiny_generator()
    assert codes.w_plus.shape == (3, generator.n_latent, generator.style_dim)
    assert codes.refinement.num_refined == 4 and codes.refinement.batch_size == 3
    assert codes.refinement.p[0].shape == (3, 4, generator.layer_shapes(4)[0][1])
    # The codes re-render the saved reconstruction (up to 8-bit rounding).
    with torch.no_grad():
        rendered = generator.synthesis(codes.w_plus, refinement=codes.refinement, randomize_noise=False)
    saved = np.asarray(Image.open(out / "reconstructions" / "001.png"), dtype=np.float32) / 127.5 - 1
    assert np.abs(rendered[1].clamp(-1, 1).permute(1, 2, 0).numpy() - saved).max() < 1.5 / 127.5
    with Image.open(out / "comparison.png") as grid:
        assert grid.size == (3 * 34 + 2, 3 * 34 + 2)
    # again into the same folder with one image: the other two codes stay, and it says so
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "001.png").write_bytes((root / "val" / "001.png").read_bytes())
    assert run("invert", "--inverter", root / "run", "--generator", generator_path, "--input", tmp_path / "one",
               "--out", out, "--image-size", 32, "--no-progress") == 0  # fmt: skip
    assert "also holds 2 code files of an earlier run (000.safetensors, 002.safetensors)" in capsys.readouterr().err
    # another generator of the same architecture: the inverter file knows its generator's weights
    other = write_generator(tiny_generator(seed=1), tmp_path / "other.pt")
    with pytest.warns(UserWarning, match="trained with other generator weights than these"):
        assert run("invert", "--inverter", root / "run", "--generator", other, "--input", tmp_path / "one",
                   "--out", tmp_path / "other-out", "--image-size", 32, "--no-progress") == 0  # fmt: skip


def test_two_stage_on_an_e4e_checkpoint_trains_and_inverts(trained, tmp_path):
    """The paper's two-stage setting on a pretrained e4e: its file is both --first-stage and
    --generator; the trained inverter stores the e4e encoder, so invert needs nothing more."""
    from refinestyle.inversion import PSPEncoder, load_inverter

    root, _ = trained
    e4e = write_psp_checkpoint(tiny_generator(), tmp_path / "e4e_tiny.pt")
    assert run(
        "train-inverter", "--stage", "two", "--generator", e4e, "--first-stage", e4e, "--data", root / "train",
        "--out", tmp_path / "two", "--lpips-random-backbone", "--domain", "other", "--image-size", 32,
        "--num-refined", 4, "--num-tokens", 4, "--batch-size", 2, "--max-steps", 2, "--workers", 0,
        "--image-every", 0, "--val-every", 0, "--checkpoint-every", 0, "--no-progress", *TINY_OPTIONS,
    ) == 0  # fmt: skip
    model = load_inverter(tmp_path / "two" / "inverter.safetensors", tiny_generator())
    assert isinstance(model.first_stage, PSPEncoder) and model.first_stage.kind == "e4e"
    out = tmp_path / "inverted"
    assert run("invert", "--inverter", tmp_path / "two", "--generator", e4e, "--input", root / "val",
               "--out", out, "--image-size", 32, "--batch-size", 2, "--no-progress") == 0  # fmt: skip
    assert sorted(p.name for p in (out / "reconstructions").iterdir()) == ["000.png", "001.png", "002.png"]


@pytest.fixture(scope="module")
def codes(trained, tmp_path_factory):
    root, generator_path = trained
    out = tmp_path_factory.mktemp("codes")
    run("invert", "--inverter", root / "run" / "inverter.safetensors", "--generator", generator_path,
        "--input", root / "val", "--out", out, "--image-size", 32, "--no-progress")
    return out / "codes"


def test_edit_with_a_boundary_from_codes(trained, codes, tmp_path, capsys):
    root, generator_path = trained
    np.save(tmp_path / "boundary.npy", np.random.default_rng(0).standard_normal((1, 32)).astype(np.float32))
    out = tmp_path / "edit"
    assert run("edit", "--generator", generator_path, "--codes", codes, "--boundary", tmp_path / "boundary.npy",
               "--strengths=-2,0,2", "--layers", "0-3", "--out", out, "--image-size", 32) == 0
    with Image.open(out / "strip.png") as strip:
        assert strip.size == (4 * 34 + 2, 3 * 34 + 2)  # input + 3 strengths, 3 images
    tiles = np.asarray(Image.open(out / "001.png"), dtype=np.int16)
    minus, zero, plus = (tiles[2:34, 2 + 34 * k : 34 + 34 * k] for k in (1, 2, 3))
    assert np.abs(minus - zero).max() > 0 and np.abs(plus - zero).max() > 0
    meta = json.loads((out / "edit.json").read_text())
    assert meta["strengths"] == [-2.0, 0.0, 2.0] and "interfacegan" in meta["edit"]
    assert "edit: 100%" in capsys.readouterr().err  # one bar step per strength and batch


def test_edit_from_codes_whose_images_moved_shows_the_reconstruction(trained, codes, tmp_path):
    """Code files carry their source image's path; where it is gone, the input column is the
    unedited reconstruction (strength 0), not an edited image."""
    from refinestyle.inversion.inference import load_codes, save_codes

    root, generator_path = trained
    loaded = load_codes(sorted(codes.glob("*.safetensors")))
    moved = tmp_path / "moved"
    save_codes(moved, loaded.w_plus, loaded.refinement, ["a", "b", "c"],
               [str(tmp_path / "gone" / f"{name}.png") for name in "abc"])  # fmt: skip
    np.save(tmp_path / "boundary.npy", np.random.default_rng(0).standard_normal((1, 32)).astype(np.float32))
    out = tmp_path / "edit"
    assert run("edit", "--generator", generator_path, "--codes", moved, "--boundary", tmp_path / "boundary.npy",
               "--strengths=-3,0,3", "--out", out, "--image-size", 32, "--batch-size", 2, "--no-progress") == 0
    for name in "abc":
        tiles = np.asarray(Image.open(out / f"{name}.png"), dtype=np.int16)
        first, minus, zero = (tiles[2:34, 2 + 34 * k : 34 + 34 * k] for k in (0, 1, 2))
        assert np.abs(first - zero).max() <= 1 and np.abs(first - minus).max() > 8


def test_ganspace_then_edit_and_stylespace_from_images(trained, tmp_path):
    root, generator_path = trained
    directions = tmp_path / "ganspace.safetensors"
    assert run("ganspace", "--generator", generator_path, "--out", directions, "--num-samples", 3000,
               "--num-components", 8, "--preview-components", 2, "--no-progress") == 0
    from refinestyle.inversion.editing import GANSpaceDirections

    loaded = GANSpaceDirections.load(directions)
    assert loaded.components.shape == (8, 32) and (loaded.stddev[:-1] >= loaded.stddev[1:]).all()
    with Image.open(directions.with_suffix(".png")) as preview:
        assert preview.size == (5 * 34 + 2, 2 * 34 + 2)
    assert run("edit", "--generator", generator_path, "--inverter", root / "run", "--input", root / "val",
               "--ganspace", directions, "--component", 1, "--strengths=-1,1", "--out", tmp_path / "g",
               "--image-size", 32) == 0
    assert (tmp_path / "g" / "strip.png").is_file()
    assert run("edit", "--generator", generator_path, "--inverter", root / "run", "--input", root / "val" / "000.png",
               "--stylespace", "3:5", "--stylespace-samples", 500, "--strengths=-5,5", "--out", tmp_path / "s",
               "--image-size", 32) == 0
    with Image.open(tmp_path / "s" / "strip.png") as strip:
        assert strip.size == (3 * 34 + 2, 34 + 2)


def test_edit_reports_bad_input_in_one_line(trained, codes, tmp_path, capsys):
    root, generator_path = trained
    for argv, expected in [
        (["--codes", codes], "give exactly one of --boundary, --ganspace, --stylespace (got none)"),
        (["--codes", codes, "--input", root / "val", "--boundary", "b.npy"], "give exactly one of --codes or --input"),
        (["--input", root / "val", "--boundary", "b.npy"], "--input needs --inverter"),
        (["--codes", tmp_path / "absent", "--boundary", "b.npy"], f"--codes: {tmp_path / 'absent'} not found"),
        (["--codes", tmp_path, "--boundary", "b.npy"], f"no .safetensors code files in {tmp_path}"),
        (["--codes", codes, "--stylespace", "3:100000", "--stylespace-samples", 10],
         "StyleSpace layer 3 has 32 channels, got channel 100000"),
    ]:
        assert run("edit", "--generator", generator_path, *argv, "--out", tmp_path / "x", "--no-progress") == 2
        error = capsys.readouterr().err
        assert error.startswith("refinestyle edit: error: ") and expected in error, error
    with pytest.raises(SystemExit) as info:  # argparse's own one-line error, before any model loads
        run("edit", "--generator", generator_path, "--codes", codes, "--stylespace", "3:1",
            "--stylespace-truncation", "0", "--out", tmp_path / "x")  # fmt: skip
    assert info.value.code == 2
    assert "argument --stylespace-truncation: expected a number in (0, 1], got 0.0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_eval_inversion_reports_table_one(trained, tmp_path, capsys):
    root, generator_path = trained
    out = tmp_path / "eval"
    assert run("eval-inversion", "--inverter", root / "run", "--generator", generator_path, "--data", root / "val",
               "--lpips-random-backbone", "--domain", "other", "--image-size", 32, "--timing-repeats", 2,
               "--out", out, "--no-progress") == 0
    printed = capsys.readouterr().out
    assert "| MSE | LPIPS | ID |" in printed.replace("method | images ", "") and "GFLOPs" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["count"] == 3 and report["mse_mean"] > 0 and report["lpips_mean"] > 0
    assert report["gflops"] > 0 and report["params_inverter_M"] > 0 and report["seconds_per_image"] > 0
    # what training updated, not what the frozen inference copy could (it was reported as 0)
    assert 0 < report["params_trainable_M"] <= report["params_inverter_M"]
    assert "id_mean" not in report
    with (out / "per_image.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 and set(rows[0]) == {"image", "mse", "lpips"}
    with Image.open(out / "examples.png") as examples:
        assert examples.size == (2 * 34 + 2, 3 * 34 + 2)  # input | reconstruction, one row per image


def test_missing_weight_files_are_named(trained, tmp_path, capsys):
    root, generator_path = trained

    def error_of(*argv) -> str:
        """Run a command that must fail on bad input: exit status 2 and a one-line error, no traceback."""
        capsys.readouterr()
        assert run(*argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"refinestyle {argv[0]}: error: ") and "Traceback" not in err
        return err

    missing_lpips = error_of(
        "train-inverter", "--generator", generator_path, "--data", root / "train", "--batch-size", 2, "--out", tmp_path / "a",
        "--domain", "other", "--workers", 0, "--no-progress", *TINY_OPTIONS)
    assert "alexnet-owt" in missing_lpips and "Pass it with --lpips-backbone (or set REFINESTYLE_ALEXNET)" in missing_lpips
    assert "model_ir_se50.pth" in error_of(
        "train-inverter", "--generator", generator_path, "--data", root / "train", "--batch-size", 2, "--out", tmp_path / "b",
        "--lpips-random-backbone", "--ir-se50", tmp_path / "model_ir_se50.pth", "--workers", 0,
        "--no-progress", *TINY_OPTIONS)
    missing_id = error_of(
        "eval-inversion", "--inverter", root / "run", "--generator", generator_path, "--data", root / "val",
        "--lpips-random-backbone")
    assert "model_ir_se50.pth" in missing_id and "Pass it with --ir-se50 (or set REFINESTYLE_IR_SE50)" in missing_id
    assert "generator" in error_of(
        "invert", "--inverter", root / "run", "--generator", tmp_path / "G.pt", "--input", root / "val",
        "--out", tmp_path / "c")
    assert "inverter" in error_of(
        "invert", "--inverter", tmp_path, "--generator", generator_path, "--input", root / "val",
        "--out", tmp_path / "d")
    # bad input that is not a file: a ValueError, reported the same way
    assert "num_refined (--num-refined): expected 1 to 7 (the 32 px generator's modulated convs), got 99" in error_of(
        "train-inverter", "--generator", generator_path, "--data", root / "train", "--batch-size", 2, "--out", tmp_path / "e",
        "--lpips-random-backbone", "--domain", "other", "--num-refined", 99, "--workers", 0, "--no-progress",
        *TINY_OPTIONS)


def test_tracebacks_on_request(trained, tmp_path, monkeypatch):
    root, generator_path = trained
    monkeypatch.setenv("REFINESTYLE_TRACEBACK", "1")
    with pytest.raises(MissingWeightsError, match="generator"):
        run("invert", "--inverter", root / "run", "--generator", tmp_path / "G.pt", "--input", root / "val",
            "--out", tmp_path / "c")


def test_pretrained_encoders_invert_edit_and_evaluate_as_baselines(trained, edit_files, tmp_path, capsys,
                                                                    monkeypatch):
    """A pSp checkpoint as --inverter: w+ only (no tokens), through invert, edit, eval-inversion and eval-edit."""
    import refinestyle.fid
    from refinestyle.inversion.inference import load_codes

    monkeypatch.setattr(refinestyle.fid, "INPUT_SIZE", 75)  # Inception's smallest input

    root, _ = trained
    psp = write_psp_checkpoint(tiny_generator(), tmp_path / "psp_tiny.pt", encoder_type="GradualStyleEncoder")
    out = tmp_path / "inverted"
    assert run("invert", "--inverter", psp, "--generator", psp, "--input", root / "val", "--out", out,
               "--image-size", 32, "--batch-size", 2, "--no-progress") == 0  # fmt: skip
    codes = load_codes(sorted((out / "codes").glob("*.safetensors")))
    assert codes.refinement is None and codes.w_plus.shape == (3, 8, 32)
    np.save(tmp_path / "boundary.npy", np.random.default_rng(0).standard_normal((1, 32)).astype(np.float32))
    assert run("edit", "--generator", psp, "--inverter", psp, "--input", root / "val" / "000.png",
               "--boundary", tmp_path / "boundary.npy", "--out", tmp_path / "edit", "--image-size", 32,
               "--no-progress") == 0  # fmt: skip
    assert any((tmp_path / "edit").iterdir())
    capsys.readouterr()
    assert run("eval-inversion", "--inverter", psp, "--generator", psp, "--data", root / "val", "--image-size", 32,
               "--lpips-random-backbone", "--domain", "other", "--no-timing", "--no-progress", "--batch-size", 2) == 0  # fmt: skip
    table = capsys.readouterr().out
    assert "psp_tiny" in table  # the method is named after the checkpoint
    assert run("eval-edit", "--inverter", psp, "--generator", psp, "--data", root / "val", "--image-size", 32,
               "--boundary", tmp_path / "boundary.npy", "--inception", edit_files / "inception.pth",
               "--domain", "other", "--out", tmp_path / "edit_eval", "--no-progress", "--batch-size", 2) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "3 images at 32 px" in printed
    report = json.loads((tmp_path / "edit_eval" / "report.json").read_text())["report"]
    assert all(list(variants) == ["w+ only"] for variants in report.values())


@pytest.fixture(scope="module")
def edit_files(trained, tmp_path_factory):
    """An InterFaceGAN boundary, GANSpace directions and random FID Inception weights."""
    from refinestyle.fid import FIDInception

    root, generator_path = trained
    folder = tmp_path_factory.mktemp("edit_eval")
    np.save(folder / "smile.npy", np.random.default_rng(0).standard_normal((1, 32)).astype(np.float32))
    assert run("ganspace", "--generator", generator_path, "--out", folder / "g.safetensors", "--num-samples", 500,
               "--num-components", 3, "--preview-components", 0, "--no-progress") == 0
    torch.save(FIDInception(random_weights=True).net.state_dict(), folder / "inception.pth")
    return folder


def test_eval_edit_reports_fid_and_id_per_edit(trained, edit_files, tmp_path, capsys, monkeypatch):
    import refinestyle.fid

    monkeypatch.setattr(refinestyle.fid, "INPUT_SIZE", 75)  # Inception's smallest input: 16x less work than 299
    root, generator_path = trained
    out = tmp_path / "edit_eval"

    def evaluate(strength, *extra):
        return run("eval-edit", "--inverter", root / "run", "--generator", generator_path, "--data", root / "val",
                   "--boundary", edit_files / "smile.npy", "--ganspace", edit_files / "g.safetensors",
                   "--components", "0,2", "--stylespace", "0:3", "--stylespace-samples", 200, "--layers", "0-3",
                   "--strength", strength, "--domain", "other", "--inception", edit_files / "inception.pth",
                   "--image-size", 32, "--no-progress", *extra)

    assert evaluate(3, "--out", out) == 0
    table = capsys.readouterr().out
    assert "| run: edit | FID (refined) | FID (w+ only) |" in table
    saved = json.loads((out / "report.json").read_text())
    report = saved["report"]
    edits = ["interfacegan smile", "stylespace 0:3", "ganspace 0", "ganspace 2"]
    assert list(report) == ["reconstruction", *edits, "mean over edits"]
    assert saved["layers"] == [0, 1, 2, 3] and saved["edits"]["ganspace 2"].startswith("ganspace component=2")
    for row, variants in report.items():
        assert list(variants) == ["refined", "w+ only"] and variants["refined"]["count"] == 3
        assert all(entry["fid"] >= 0 for entry in variants.values())
    # an edit moves the images away from the reconstruction's statistics
    assert all(report[edit]["refined"]["fid"] != report["reconstruction"]["refined"]["fid"] for edit in edits)
    assert report["mean over edits"]["refined"]["fid"] == pytest.approx(
        sum(report[edit]["refined"]["fid"] for edit in edits) / 4)
    with Image.open(out / "examples.png") as examples:
        assert examples.size == (6 * 34 + 2, 3 * 34 + 2)  # input | reconstruction | 4 edits, a row per image
    # at strength 0 every edit renders the reconstruction: the same features, the same FID
    assert evaluate(0, "--out", tmp_path / "zero") == 0
    zero = json.loads((tmp_path / "zero" / "report.json").read_text())["report"]
    for edit in edits:
        for variant in ("refined", "w+ only"):
            assert zero[edit][variant]["fid"] == pytest.approx(zero["reconstruction"][variant]["fid"], rel=1e-9)


def test_evaluate_edits_measures_id_against_the_real_images(trained, edit_files):
    """The ID column with a stand-in identity network: its reconstruction row is the mean similarity of
    the inverter's own reconstructions to the real images; with and without the residuals differ."""
    from refinestyle.checkpoints import load_generator
    from refinestyle.imageio import as_saved
    from refinestyle.inversion import editing
    from refinestyle.inversion.data import ImageFolderDataset
    from refinestyle.inversion.edit_metrics import NamedEdit, evaluate_edits, format_edit_report
    from refinestyle.inversion.inference import load_inverter_for_inference
    from refinestyle.inversion.metrics import pool_to

    class PixelCosine:
        def similarity(self, x, y):
            return torch.nn.functional.cosine_similarity(x.flatten(1), y.flatten(1))

    root, generator_path = trained
    generator = load_generator(generator_path, "cpu").eval().requires_grad_(False)
    inverter = load_inverter_for_inference(root / "run", generator, "cpu")
    dataset = ImageFolderDataset(root / "val", 32)
    boundary = editing.load_boundary(edit_files / "smile.npy", generator.n_latent, generator.style_dim)
    edits = [NamedEdit("smile", editing.EditSpec("interfacegan", boundary=boundary), 2.0)]
    examples = []
    report = evaluate_edits(inverter, generator, dataset, edits, identity=PixelCosine(), batch_size=2,
                            metric_size=32, progress=False, examples=examples, max_examples=3)
    images = torch.stack([dataset[i] for i in range(3)])
    with torch.no_grad():
        rendered = inverter(images).image
        expected = PixelCosine().similarity(pool_to(as_saved(rendered), 32), images)
    assert rendered.abs().max() > 1  # so that measuring the saved image, not the raw one, is tested
    assert report["reconstruction"]["refined"]["id_mean"] == pytest.approx(expected.double().mean().item(), rel=1e-5)
    assert report["reconstruction"]["refined"]["id_std"] == pytest.approx(expected.double().std().item(), rel=1e-4)
    assert report["reconstruction"]["w+ only"]["id_mean"] != report["reconstruction"]["refined"]["id_mean"]
    assert report["smile"]["refined"]["id_mean"] != report["reconstruction"]["refined"]["id_mean"]
    assert "fid" not in report["smile"]["refined"]
    assert len(examples) == 3 and examples[0].shape == (3, 3, 32, 32)  # across the batch boundary
    assert "| run: edit | ID (refined) | ID (w+ only) |" in format_edit_report(report, "run")

    class WPlusOnly(torch.nn.Module):  # what pSp / e4e give: no residuals
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, images):
            return self.inner(images)._replace(refinement=None)

    plain = evaluate_edits(WPlusOnly(inverter), generator, dataset, edits, identity=PixelCosine(), progress=False)
    assert list(plain["smile"]) == ["w+ only"]
    assert plain["smile"]["w+ only"]["id_mean"] == pytest.approx(report["smile"]["w+ only"]["id_mean"], rel=1e-6)
    with pytest.raises(ValueError, match="names must be unique"):
        evaluate_edits(inverter, generator, dataset, edits * 2, identity=PixelCosine(), progress=False)
    with pytest.raises(ValueError, match="identity"):
        evaluate_edits(inverter, generator, dataset, edits, progress=False)


def test_eval_edit_names_boundaries_that_share_a_stem_by_their_paths():
    from refinestyle.commands.eval_edit import boundary_names

    assert boundary_names(["a/smile.npy", "age.npy"]) == ["smile", "age"]
    assert boundary_names(["a/smile.npy", "b/smile.npy"]) == ["a/smile", "b/smile"]  # was "an edit is given twice"
    assert boundary_names(["a/smile.npy", "a/smile.npy"]) == ["a/smile", "a/smile"]  # still refused as twice


def test_eval_edit_names_what_is_missing(trained, edit_files, tmp_path, capsys, monkeypatch):
    root, generator_path = trained
    monkeypatch.delenv("REFINESTYLE_FID_INCEPTION", raising=False)
    common = ["--inverter", root / "run", "--generator", generator_path, "--data", root / "val", "--no-progress",
              "--image-size", 32]
    for argv, expected in [
        ([], "give at least one edit"),
        (["--boundary", edit_files / "smile.npy", "--domain", "other"], "--domain other measures FID"),
        (["--boundary", edit_files / "smile.npy"], "model_ir_se50.pth"),
        (["--ganspace", edit_files / "g.safetensors", "--components", "0,7", "--domain", "other", "--inception",
          edit_files / "inception.pth"], "has 3 components, got 7"),
        (["--boundary", edit_files / "smile.npy", "--domain", "other", "--inception", tmp_path / "none.pth"],
         "pt_inception-2015-12-05"),
        (["--boundary", edit_files / "smile.npy", "--boundary", edit_files / "smile.npy", "--domain", "other",
          "--inception", edit_files / "inception.pth"], "an edit is given twice"),
    ]:
        assert run("eval-edit", *common, *argv) == 2, argv
        error = capsys.readouterr().err
        assert error.startswith("refinestyle eval-edit: error: ") and expected in error, error


def test_inference_commands_name_what_does_not_fit(trained, codes, tmp_path, capsys):
    """Codes of another generator were blamed on the boundary; a generator file given as --inverter
    was called "not a Style Transformer checkpoint"; --image-size 16 failed in LPIPS naming `x`."""
    from refinestyle.generator import Generator

    root, generator_path = trained
    larger = write_generator(Generator(64, style_dim=32, n_mlp=2, channel_max=16), tmp_path / "g64.pt")
    np.save(tmp_path / "b.npy", np.zeros((1, 32), np.float32))
    assert run("edit", "--generator", larger, "--codes", codes, "--boundary", tmp_path / "b.npy", "--out",
               tmp_path / "e", "--no-progress") == 2  # fmt: skip
    assert "--codes: w+ codes of shape [8, 32], but this generator's are [10, 32]" in capsys.readouterr().err
    assert run("invert", "--inverter", generator_path, "--generator", generator_path, "--input", root / "val",
               "--out", tmp_path / "i", "--no-progress") == 2  # fmt: skip
    assert "neither an inverter file" in capsys.readouterr().err
    # the run's training checkpoint or config: torch's weights_only paragraphs, which did not say what the file was
    for training_file, kind in ((root / "run" / "checkpoints" / "latest.pt", "training checkpoint"),
                                (root / "run" / "config.json", "config")):  # fmt: skip
        assert run("invert", "--inverter", training_file, "--generator", generator_path, "--input", root / "val",
                   "--out", tmp_path / "i", "--no-progress") == 2  # fmt: skip
        error = capsys.readouterr().err
        assert f"a train-inverter run's {kind}, not an inverter; give the run folder ({root / 'run'})" in error, error
        assert len(error.splitlines()) == 2 and "Traceback" not in error  # the error and the traceback hint
    eval_argv = ["eval-inversion", "--inverter", root / "run", "--generator", generator_path, "--data", root / "val",
                 "--lpips-random-backbone", "--domain", "other", "--no-progress", "--no-timing"]
    assert run(*eval_argv, "--image-size", 16) == 2
    assert "--image-size: LPIPS (AlexNet) needs pictures of at least 32 x 32 pixels, got 16 x 16" in capsys.readouterr().err
    assert run(*eval_argv, "--max-images", 1) == 0
    assert capsys.readouterr().out.splitlines()[2].rstrip().endswith("| - |")  # not timed: no nan
    # another aspect than the inverter's square pictures: its renders are cut square, so the
    # pictures were stretched and the codes' picture size did not match their renders
    assert run("invert", "--inverter", root / "run", "--generator", generator_path, "--input", root / "val",
               "--out", tmp_path / "i", "--image-size", "32x48", "--no-progress") == 2  # fmt: skip
    assert "--image-size 32x48: expected the aspect of the inverter's pictures (32x32)" in capsys.readouterr().err
    assert not (tmp_path / "i").exists()


def test_train_inverter_names_options_not_config_fields(trained, tmp_path, capsys):
    root, generator_path = trained
    base = ["train-inverter", "--generator", generator_path, "--data", root / "train", "--out", tmp_path / "r"]
    for extra, expected in [
        (["--l2", -1], "--l2: expected >= 0, got -1.0"),
        (["--l2", 0, "--lpips", 0, "--domain", "other"], "--l2, --lpips, --id: every loss term in use has weight 0"),
        (["--stage", "two"], "--first-stage: the two-stage model needs the first-stage inverter file"),
    ]:
        assert run(*base, *extra) == 2
        assert expected in _one_line_error(capsys)
    assert not (tmp_path / "r").exists()


def test_train_inverter_reports_a_diverged_run_in_one_line(trained, tmp_path, capsys):
    root, generator_path = trained
    assert run("train-inverter", "--generator", generator_path, "--data", root / "train", "--out", tmp_path / "r",
               "--lpips-random-backbone", "--domain", "other", "--num-tokens", 4, "--batch-size", 2, "--max-steps", 6,
               "--lr", "1e30", "--workers", 0, "--no-progress", *TINY_OPTIONS) == 2  # fmt: skip
    error = capsys.readouterr().err
    assert error.startswith("refinestyle train-inverter: error: step ") and "training diverged" in error, error
    assert "Traceback" not in error


def test_train_inverter_refuses_data_and_sizes_it_cannot_train_on_before_making_the_run(trained, tmp_path, capsys):
    """An empty folder, too few images for a batch, or pictures too small for LPIPS were found
    after the networks loaded (LPIPS at the first step, naming `x`), leaving a run folder behind."""
    root, generator_path = trained
    (tmp_path / "empty").mkdir()
    base = ["train-inverter", "--generator", generator_path, "--out", tmp_path / "r", "--lpips-random-backbone",
            "--domain", "other", "--num-tokens", 4, "--max-steps", 1, "--workers", 0, "--no-progress", *TINY_OPTIONS]
    for extra, expected in [
        (["--data", tmp_path / "empty"], "holds no images"),
        (["--data", root / "train", "--batch-size", 5], "data: 4 images cannot fill one batch of 5"),
        (["--data", root / "train", "--batch-size", 2, "--image-size", 16],
         "image_size (--image-size): LPIPS (AlexNet) needs pictures of at least 32 x 32 pixels; the losses compare at 16 x 16"),
    ]:
        assert run(*base, *extra) == 2
        assert expected in _one_line_error(capsys)
        assert not (tmp_path / "r").exists()
