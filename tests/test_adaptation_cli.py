"""CLI smoke tests: adapt-text, adapt-oneshot, eval-adapter and generate --adapter, on tiny random weights."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from refinestyle import cli
from refinestyle.adaptation import Adapter
from refinestyle.checkpoints import save_rosinality_checkpoint
from refinestyle.generator import Generator

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
SIZE = 32


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny generator checkpoint, a tiny CLIP (config + random weights), a random AlexNet file, a reference."""
    import open_clip
    from torchvision.models import alexnet

    root = tmp_path_factory.mktemp("adaptation_cli")
    torch.manual_seed(0)
    generator = Generator(SIZE, style_dim=16, n_mlp=2, channel_max=8)
    with torch.no_grad():
        for name, parameter in generator.named_parameters():
            if name.endswith("noise.weight"):
                parameter.fill_(0.2)
    checkpoint = save_rosinality_checkpoint(generator, root / "g.pt")

    config = root / "rs-cli-tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    clip_weights = root / "tiny_clip.pt"
    torch.save(open_clip.create_model("rs-cli-tiny-clip", pretrained=None).state_dict(), clip_weights)

    # the AlexNet trunk in torchvision's file layout (features.* only: all that LPIPS reads)
    alexnet_file = root / "alexnet.pth"
    torch.save({f"features.{k}": v for k, v in alexnet(weights=None).features.state_dict().items()}, alexnet_file)

    reference = root / "reference.png"
    pixels = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(reference)
    return {"generator": checkpoint, "clip_config": config, "clip": clip_weights, "alexnet": alexnet_file,
            "reference": reference, "root": root}


def clip_args(files):
    return ["--clip", f"{files['clip_config']}={files['clip']}", "--clip-no-quick-gelu"]


def test_adapt_text_then_eval_adapter_then_generate(files, tmp_path, capsys):
    out = tmp_path / "sketch.safetensors"
    argv = ["adapt-text", "--generator", str(files["generator"]), "--target", "pencil sketch", "--out", str(out),
            "--iterations", "4", "--num-tokens", "8", "--sample-every", "2", "--checkpoint-every", "2",
            "--no-progress", "--device", "cpu", *clip_args(files)]
    assert cli.main(argv) == 0
    assert "trainable parameters" in capsys.readouterr().out
    adapter = Adapter.load(out)
    assert adapter.metadata["kind"] == "text" and adapter.metadata["target_text"] == "pencil sketch"
    assert adapter.metadata["source_text"] == "photo" and adapter.metadata["training"]["steps_done"] == 4
    assert adapter.metadata["training"]["batch_size"] == 2 and adapter.metadata["clip_models"] == ["rs-cli-tiny-clip"]
    # StyleGAN-NADA's optimiser and codes, where the paper says "following StyleGAN-NADA"
    assert adapter.metadata["training"]["betas"] == [0.0, 0.99] and adapter.metadata["training"]["truncation"] == 1.0
    work = tmp_path / "sketch.run"
    assert sorted(p.name for p in (work / "samples").glob("*.png")) == [
        "step_000000.png", "step_000002.png", "step_000004.png"
    ]
    grid = np.asarray(Image.open(work / "samples" / "step_000004.png"))
    assert grid.shape == (2 * (SIZE + 2) + 2, 4 * (SIZE + 2) + 2, 3)  # source row, adapted row, 4 seeds
    assert len((work / "history.jsonl").read_text().splitlines()) == 4

    # a second run into the same work dir must say --resume or --restart; --resume continues to 6 steps
    assert cli.main(argv) == 2
    assert "--resume" in capsys.readouterr().err
    assert cli.main(argv[:argv.index("--iterations") + 1] + ["6"] + argv[argv.index("--iterations") + 2:]
                    + ["--resume"]) == 0
    assert len((work / "history.jsonl").read_text().splitlines()) == 6
    assert Adapter.load(out).metadata["training"]["sample_truncation"] == 0.7
    # --restart of a shorter run: the earlier run's grids and history go too (they passed for the new run's)
    restart = argv[:argv.index("--iterations") + 1] + ["2"] + argv[argv.index("--iterations") + 2:] + ["--restart"]
    assert cli.main(restart) == 0
    assert sorted(p.name for p in (work / "samples").glob("*.png")) == ["step_000000.png", "step_000002.png"]
    assert len((work / "history.jsonl").read_text().splitlines()) == 2
    assert cli.main(argv[:argv.index("--iterations") + 1] + ["6"] + argv[argv.index("--iterations") + 2:]
                    + ["--restart"]) == 0  # back to the 6-step adapter the rest of the test reads
    capsys.readouterr()

    metrics = tmp_path / "metrics.json"
    assert cli.main(["eval-adapter", "--generator", str(files["generator"]), "--adapter", str(out), "--n", "5",
                     "--batch-size", "2", "--out", str(metrics), "--grid", str(tmp_path / "eval.png"),
                     "--no-progress", "--device", "cpu", *clip_args(files)]) == 0
    result = json.loads(metrics.read_text())
    assert result["num_images"] == 5 and result["params"] == Adapter.load(out).num_trainable()
    assert -1 <= result["text_consistency"] <= 1 and result["target_text"] == "pencil sketch"
    assert any("ID skipped" in note for note in result["notes"])
    assert (tmp_path / "eval.png").is_file()

    # generate --adapter A --adapter B: one grid row per domain
    other = tmp_path / "pixar.safetensors"
    adapter = Adapter.load(out)
    with torch.no_grad():
        for layer in adapter.tokens.layers:
            layer.A.mul_(-3)
    adapter.save(other)
    grid_file = tmp_path / "domains.png"
    assert cli.main(["generate", "--ckpt", str(files["generator"]), "--n", "3", "--out", str(grid_file),
                     "--adapter", str(out), "--adapter", str(other), "--device", "cpu", "--no-progress"]) == 0
    assert np.asarray(Image.open(grid_file)).shape == (3 * (SIZE + 2) + 2, 3 * (SIZE + 2) + 2, 3)
    rows = {name: np.asarray(Image.open(tmp_path / "domains" / name / "0000.png")).astype(int)
            for name in ("original", "sketch", "pixar")}
    assert np.abs(rows["sketch"] - rows["pixar"]).max() > 0


def test_adapt_oneshot_with_projection(files, tmp_path, capsys):
    out = tmp_path / "ref.safetensors"
    argv = ["adapt-oneshot", "--generator", str(files["generator"]), "--reference", str(files["reference"]),
            "--out", str(out), "--lpips-backbone", str(files["alexnet"]), "--id-weight", "0",
            "--iterations", "2", "--num-tokens", "4", "--num-refined", "3", "--projection-steps", "3",
            "--style-size", "64", "--swd-projections", "8", "--loss-size", "32", "--sample-every", "2",
            "--num-samples", "2", "--no-progress", "--device", "cpu"]
    assert cli.main(argv) == 0
    adapter = Adapter.load(out)
    assert adapter.metadata["kind"] == "oneshot" and adapter.metadata["w_r_source"] == "projection"
    assert adapter.metadata["reference"] == str(files["reference"]) and adapter.num_refined == 3
    work = tmp_path / "ref.run"
    assert (work / "w_r.pt").is_file()
    with Image.open(work / "projection.png") as picture:  # reference | projection, 2 px padding
        assert picture.size == (2 * (SIZE + 2) + 2, SIZE + 4)
    grid = np.asarray(Image.open(work / "samples" / "step_000002.png"))
    assert grid.shape == (2 * (SIZE + 2) + 2, 3 * (SIZE + 2) + 2, 3)  # reference + 2 seeds, two rows

    # the ID term is on by default and needs IR-SE50: a clear error, not a download
    assert cli.main(argv[:-2] + ["--restart", "--id-weight", "0.1", "--ir-se50", str(tmp_path / "nope.pth"),
                                 "--device", "cpu"]) == 2
    assert "nope.pth" in capsys.readouterr().err


def test_adapt_oneshot_from_an_inverter(files, tmp_path):
    from refinestyle.checkpoints import load_generator
    from refinestyle.inversion.models import FirstStage, OneStageInverter, TwoStageInverter, save_inverter

    tiny = dict(encoder_depth=(1, 1, 1, 1), encoder_widths=(16, 16, 32, 32), encoder_size=32, heads=2,
                head_dim=16, ffn_dim=64)
    generator = load_generator(files["generator"])
    torch.manual_seed(0)
    first = FirstStage(OneStageInverter(generator, refine=False, **tiny))
    inverter = TwoStageInverter(generator, first, num_refined=generator.num_layers, num_tokens=2, **tiny)
    save_inverter(tmp_path / "run" / "inverter.safetensors", inverter)

    out = tmp_path / "ref.safetensors"
    argv = ["adapt-oneshot", "--generator", str(files["generator"]), "--reference", str(files["reference"]),
            "--out", str(out), "--lpips-backbone", str(files["alexnet"]), "--id-weight", "0",
            "--inverter", str(tmp_path / "run"), "--init-from-inverter", "--iterations", "1",  # a run folder, as
            # invert, edit and eval-inversion take it
            "--num-tokens", "4", "--style-size", "64", "--swd-projections", "8", "--loss-size", "32",
            "--sample-every", "0", "--no-progress", "--device", "cpu"]
    assert cli.main(argv) == 0
    adapter = Adapter.load(out)
    assert adapter.metadata["w_r_source"] == "inverter"
    assert adapter.metadata["token_init"]["copied"] == list(range(generator.num_layers))
    assert adapter.metadata["token_init"]["padded"] == list(range(generator.num_layers))
    # a resumed run's adapter still says how its tokens started
    assert cli.main(argv + ["--iterations", "2", "--resume"]) == 0
    resumed = Adapter.load(out).metadata
    assert resumed["token_init"] == adapter.metadata["token_init"] and resumed["training"]["steps_done"] == 2


def test_clear_errors(files, tmp_path, capsys, monkeypatch):
    for env in ("REFINESTYLE_CLIP_VIT_B16", "REFINESTYLE_CLIP_VIT_B32"):
        monkeypatch.delenv(env, raising=False)
    base = ["--no-progress", "--device", "cpu"]
    # no CLIP weights anywhere
    assert cli.main(["adapt-text", "--generator", str(files["generator"]), "--target", "sketch",
                     "--out", str(tmp_path / "a.safetensors"), *base]) == 2
    error = capsys.readouterr().err
    assert error.startswith("refinestyle adapt-text: error: ") and "--clip-vit-b16" in error
    # a missing generator
    assert cli.main(["adapt-text", "--generator", str(tmp_path / "nope.pt"), "--target", "sketch",
                     "--out", str(tmp_path / "a.safetensors"), *clip_args(files), *base]) == 2
    assert "nope.pt" in capsys.readouterr().err
    # a reference that is not an image, and one that does not exist
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"definitely not a png")
    for reference, message in ((broken, "not a readable image"), (tmp_path / "absent.png", "not found")):
        assert cli.main(["adapt-oneshot", "--generator", str(files["generator"]), "--reference", str(reference),
                         "--out", str(tmp_path / "r.safetensors"), "--id-weight", "0", *base]) == 2
        error = capsys.readouterr().err
        assert error.startswith("refinestyle adapt-oneshot: error: ") and "--reference" in error and message in error
    # eval-adapter with an adapter of another generator
    torch.manual_seed(1)
    stranger = Adapter.for_generator(Generator(SIZE, style_dim=16, n_mlp=2, channel_max=8), num_tokens=2)
    stranger.save(tmp_path / "stranger.safetensors")
    assert cli.main(["eval-adapter", "--generator", str(files["generator"]), "--adapter",
                     str(tmp_path / "stranger.safetensors"), "--n", "2", *base]) == 2
    error = capsys.readouterr().err
    assert error.startswith("refinestyle eval-adapter: error: ") and "fingerprint" in error
    # generate names the adapter file that does not fit (with several, which one was unclear)
    smaller = Adapter.for_generator(Generator(SIZE // 2, style_dim=16, n_mlp=2, channel_max=8), num_tokens=2)
    smaller.save(tmp_path / "smaller.safetensors")
    assert cli.main(["generate", "--ckpt", str(files["generator"]), "--n", "1", "--out", str(tmp_path / "g.png"),
                     "--adapter", str(tmp_path / "smaller.safetensors"), *base]) == 2
    error = capsys.readouterr().err
    assert f"--adapter {tmp_path / 'smaller.safetensors'}: adapter: trained for a generator with" in error, error
    # psi above 1 was taken and ignored (the codes truncate only below 1); an empty --text dropped TC silently
    for option, value in (("--truncation", "1.5"), ("--truncation", "0"), ("--text", " ")):
        with pytest.raises(SystemExit):
            cli.main(["eval-adapter", "--generator", str(files["generator"]), "--adapter",
                      str(tmp_path / "stranger.safetensors"), option, value, *base])
        assert f"argument {option}: expected" in capsys.readouterr().err


def test_adapt_commands_under_torchrun_match_one_process(files, tmp_path):
    """`torchrun --nproc_per_node 2 -m refinestyle adapt-...` (gloo on CPU): the adapter of one process
    with the same batch, written once; the one-shot run shares rank 0's projected w_r."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=os.pathsep.join([str(repo), env.get("PYTHONPATH", "")]), CUDA_VISIBLE_DEVICES="",
               OMP_NUM_THREADS="1")
    common = ["--generator", str(files["generator"]), "--iterations", "2", "--num-tokens", "4", "--batch-size", "2",
              "--sample-every", "0", "--no-progress", "--device", "cpu"]
    commands = {
        "text": ["adapt-text", "--target", "pencil sketch", *clip_args(files), *common],
        "oneshot": ["adapt-oneshot", "--reference", str(files["reference"]), "--lpips-backbone", str(files["alexnet"]),
                    "--id-weight", "0", "--num-refined", "3", "--projection-steps", "3", "--style-size", "64",
                    "--swd-projections", "8", "--loss-size", "32", *common],
    }
    for name, argv in commands.items():
        out = tmp_path / f"{name}-ddp.safetensors"
        completed = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             "-m", "refinestyle", *argv, "--out", str(out)],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
        assert completed.stdout.count("wrote ") == 1, completed.stdout + "\nSTDERR\n" + completed.stderr  # rank 0 saves and reports
        single = tmp_path / f"{name}.safetensors"
        assert cli.main([*argv, "--out", str(single)]) == 0
        ours, theirs = Adapter.load(out), Adapter.load(single)
        for key, value in theirs.tokens.state_dict().items():
            torch.testing.assert_close(ours.tokens.state_dict()[key], value, rtol=1e-4, atol=1e-6)
        # both took 2 steps with the same losses, and the steps moved the scales off their initial 0.01
        histories = [[json.loads(line)["loss"] for line in (tmp_path / f"{stem}.run" / "history.jsonl").open()]
                     for stem in (f"{name}-ddp", name)]
        assert len(histories[0]) == 2 and histories[0] == pytest.approx(histories[1], rel=1e-4)
        assert (ours.tokens.state_dict()["layers.0.A"] != 0.01).all()


def test_adapt_text_bf16_flag_reaches_the_training(files, tmp_path):
    out = tmp_path / "bf16.safetensors"
    assert cli.main(["adapt-text", "--generator", str(files["generator"]), "--target", "sketch", "--out", str(out),
                     "--iterations", "1", "--num-tokens", "4", "--sample-every", "0", "--no-progress", "--device", "cpu",
                     "--bf16", *clip_args(files)]) == 0
    adapter = Adapter.load(out)
    assert adapter.metadata["training"]["bf16"] is True and adapter.tokens.layers[0].P.dtype == torch.float32


def test_adapt_text_compile_flag_trains_through_the_compiled_generator(files, tmp_path, monkeypatch):
    """--compile: the generator's synthesis runs through torch.compile (pinned to "aot_eager" here,
    as Inductor's C++ build takes most of a minute on two cores) and the losses are the eager run's."""
    from torch._dynamo.utils import counters

    def history(name, *extra):
        out = tmp_path / f"{name}.safetensors"
        assert cli.main(["adapt-text", "--generator", str(files["generator"]), "--target", "sketch", "--out", str(out),
                         "--iterations", "2", "--num-tokens", "4", "--sample-every", "0", "--no-progress",
                         "--device", "cpu", *extra, *clip_args(files)]) == 0
        lines = (tmp_path / f"{name}.run" / "history.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines]

    eager = history("eager")
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": "aot_eager"}))
    torch._dynamo.reset()
    counters.clear()
    compiled = history("compiled", "--compile")
    assert counters["stats"]["unique_graphs"] >= 1
    torch._dynamo.reset()
    assert len(eager) == 2 and compiled == pytest.approx(eager, rel=1e-5)


def test_batch_size_is_checked_against_the_processes_before_any_work(tmp_path):
    """Under torchrun --batch-size is the batch of all processes together: a remainder is refused at once
    (before adapt-oneshot's projection), naming the option."""
    import argparse

    from refinestyle.commands import adapt_oneshot
    from refinestyle.commands.adapt_text import prepare_run
    from refinestyle.distributed import DistributedContext

    parser = argparse.ArgumentParser()
    adapt_oneshot.add_arguments(parser)
    args = parser.parse_args(["--reference", "r.png", "--out", str(tmp_path / "a.safetensors")])  # batch 1
    with pytest.raises(ValueError, match="--batch-size: the batch of all 2 processes together, so a multiple of 2; got 1"):
        prepare_run(args, DistributedContext(rank=1, world_size=2))
    assert prepare_run(args, None) == (tmp_path / "a.run", False)


def text_argv(files, out, *extra):
    return ["adapt-text", "--generator", str(files["generator"]), "--target", "sketch", "--out", str(out),
            "--num-tokens", "4", "--sample-every", "0", "--no-progress", "--device", "cpu", *clip_args(files), *extra]


def oneshot_argv(files, out, reference, *extra):
    return ["adapt-oneshot", "--generator", str(files["generator"]), "--reference", str(reference), "--out", str(out),
            "--lpips-backbone", str(files["alexnet"]), "--id-weight", "0", "--num-tokens", "4", "--num-refined", "3",
            "--projection-steps", "2", "--style-size", "64", "--swd-projections", "8", "--loss-size", "32",
            "--sample-every", "0", "--no-progress", "--device", "cpu", *extra]


def test_adapt_text_refuses_an_out_that_is_its_run_folder_and_reports_a_diverged_run(files, tmp_path, capsys):
    """--out X.run (the default work folder of X.run is X.run) trained fully, then failed to save;
    a loss that went non-finite ended in a traceback."""
    for argv in (text_argv(files, tmp_path / "sketch.run"),
                 text_argv(files, tmp_path / "same", "--work-dir", str(tmp_path / "same"))):  # fmt: skip
        assert cli.main(argv) == 2
        error = capsys.readouterr().err
        assert error.startswith("refinestyle adapt-text: error: --out: ") and "is also the run's folder" in error
        assert not any(tmp_path.iterdir())  # refused before any work
    assert cli.main(text_argv(files, tmp_path / "a.safetensors", "--iterations", "3", "--lr", "1e30",
                              "--scale-init", "1e30")) == 2  # fmt: skip
    error = capsys.readouterr().err
    assert error.startswith("refinestyle adapt-text: error: step ") and "training diverged" in error, error
    assert "Traceback" not in error and "--restart" in error and not (tmp_path / "a.safetensors").exists()


def test_adapt_text_with_no_iterations_says_no_step_was_taken(files, tmp_path, capsys):
    assert cli.main(text_argv(files, tmp_path / "a.safetensors", "--iterations", "0")) == 0
    out = capsys.readouterr().out
    assert "(no step taken)" in out and "curves" not in out and Adapter.load(tmp_path / "a.safetensors").num_trainable()


def test_adapt_text_resume_keeps_the_checkpoints_settings_and_counts_its_steps(files, tmp_path, capsys):
    out = tmp_path / "sketch.safetensors"
    checkpoint = tmp_path / "sketch.run" / "checkpoint.pt"
    assert cli.main(text_argv(files, out, "--iterations", "2")) == 0
    saved_tokens = torch.load(checkpoint, weights_only=True)["tokens"]
    capsys.readouterr()

    # other training settings: refused before any step, every difference named
    assert cli.main(text_argv(files, out, "--iterations", "4", "--resume", "--lr", "0.5", "--seed", "5",
                              "--batch-size", "3", "--truncation", "0.7")) == 2
    error = capsys.readouterr().err
    assert error.startswith("refinestyle adapt-text: error: --resume: ") and "Traceback" not in error
    for option in ("--lr: 0.001 in the checkpoint, 0.5 in this run", "--seed: 0 in the checkpoint, 5 in this run",
                   "--batch-size: 2 in the checkpoint, 3 in this run", "--truncation: 1.0 in the checkpoint, 0.7"):
        assert option in error, error
    # fewer iterations than the checkpoint holds
    assert cli.main(text_argv(files, out, "--iterations", "1", "--resume")) == 2
    assert "--iterations: " in capsys.readouterr().err
    assert torch.equal(torch.load(checkpoint, weights_only=True)["tokens"]["layers.0.A"], saved_tokens["layers.0.A"])

    # what may change: the iterations, the intervals, the progress display
    assert cli.main(text_argv(files, out, "--iterations", "3", "--resume", "--checkpoint-every", "1",
                              "--sample-every", "1", "--num-samples", "2")) == 0
    training = Adapter.load(out).metadata["training"]
    assert (training["steps_done"], training["iterations"], training["lr"], training["seed"]) == (3, 3, 1e-3, 0)

    # the same CLIP architecture with other weights, or other activations: refused, named
    import open_clip

    torch.manual_seed(7)
    other_weights = tmp_path / "other_clip.pt"
    torch.save(open_clip.create_model("rs-cli-tiny-clip", pretrained=None).state_dict(), other_weights)
    other = ["--clip", f"{files['clip_config']}={other_weights}", "--clip-no-quick-gelu"]
    argv = text_argv(files, out, "--iterations", "4", "--resume")
    assert cli.main([*argv[: argv.index("--clip")], *argv[argv.index("--clip") + 3 :], *other]) == 2
    assert "(the weights file)" in capsys.readouterr().err
    assert cli.main([a for a in argv if a != "--clip-no-quick-gelu"]) == 2
    assert "--clip-no-quick-gelu" in capsys.readouterr().err

    checkpoint.write_text("junk\n")
    assert cli.main(text_argv(files, out, "--iterations", "4", "--resume")) == 2
    error = capsys.readouterr().err
    assert error.startswith("refinestyle adapt-text: error: ") and f"{checkpoint}: not a readable" in error


@pytest.mark.parametrize("extra, option", [
    (["--scale-init", "0"], "--scale-init"),  # A = B = 0: no token gets a gradient
    (["--scale-init", "-0.1"], "--scale-init"),
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--iterations", "-1"], "--iterations"),
    (["--truncation", "0"], "--truncation"),
    (["--truncation", "1.5"], "--truncation"),
    (["--seed", "-1"], "--seed"),
    (["--sample-every", "-1"], "--sample-every"),
    (["--checkpoint-every", "-2"], "--checkpoint-every"),
    (["--num-refined", "0"], "--num-refined"),
    (["--num-refined", "99"], "--num-refined"),
    (["--clip-weights", "-1"], "--clip-weights"),
    (["--clip-weights", "1", "1"], "--clip-weights"),  # two weights, one CLIP model
    (["--out", "{tmp}"], "--out"),  # a folder
    (["--out", "{tmp}/file.txt/a.safetensors"], "--out"),  # below a file
    (["--work-dir", "{tmp}/file.txt"], "--work-dir"),
])
def test_adapt_text_refuses_meaningless_values_before_training(files, tmp_path, capsys, extra, option):
    (tmp_path / "file.txt").write_text("")
    extra = [value.replace("{tmp}", str(tmp_path)) for value in extra]
    assert cli.main(text_argv(files, tmp_path / "a.safetensors", *extra)) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"refinestyle adapt-text: error: {option}: "), error
    assert not (tmp_path / "a.run").exists() and not (tmp_path / "a.safetensors").exists()


@pytest.mark.parametrize("extra, option", [
    (["--l2-weight", "-1"], "--l2-weight"),
    (["--style-weight", "nan"], "--style-weight"),
    (["--style-layers", "2", "6"], "--style-layers"),
    (["--style-layers", "2", "2"], "--style-layers"),  # was counted twice
    (["--l2-weight", "0", "--lpips-weight", "0", "--style-weight", "0"],
     "--l2-weight, --lpips-weight, --id-weight, --style-weight"),  # trained nothing
    (["--lr", "1e-5"], "--lr-min"),
    (["--mix-index", "-1"], "--mix-index"),
    (["--mix-index", "99"], "--mix-index"),
    (["--scale-init", "0"], "--scale-init"),
])
def test_adapt_oneshot_refuses_meaningless_values_before_projecting(files, tmp_path, capsys, extra, option):
    assert cli.main(oneshot_argv(files, tmp_path / "a.safetensors", files["reference"], *extra)) == 2
    assert capsys.readouterr().err.startswith(f"refinestyle adapt-oneshot: error: {option}: ")
    assert not (tmp_path / "a.run").exists()


def other_reference(tmp_path):
    path = tmp_path / "other.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)
    return path


def test_adapt_oneshot_resume_refuses_another_w_r(files, tmp_path, capsys):
    """Resuming a projection run with --inverter would switch w_r's source partway; another reference
    or projection would too. Refused before w_r.pt is rewritten."""
    from refinestyle.adaptation.train import load_w_plus
    from refinestyle.checkpoints import load_generator
    from refinestyle.inversion.models import OneStageInverter, save_inverter

    out, work = tmp_path / "ref.safetensors", tmp_path / "ref.run"
    assert cli.main(oneshot_argv(files, out, files["reference"], "--iterations", "1")) == 0
    first_w_r = load_w_plus(work / "w_r.pt")[0]
    torch.manual_seed(0)
    inverter = OneStageInverter(load_generator(files["generator"]), refine=False, encoder_depth=(1, 1, 1, 1),
                                encoder_widths=(16, 16, 32, 32), encoder_size=32, heads=2, head_dim=16, ffn_dim=64)
    inverter_file = save_inverter(tmp_path / "inverter.safetensors", inverter)
    capsys.readouterr()
    resume = ["--iterations", "2", "--resume"]
    assert cli.main(oneshot_argv(files, out, files["reference"], *resume, "--inverter", str(inverter_file))) == 2
    error = capsys.readouterr().err
    assert "--inverter (w_r_source): 'projection' in the checkpoint, 'inverter' in this run" in error, error
    assert torch.equal(load_w_plus(work / "w_r.pt")[0], first_w_r)
    assert cli.main(oneshot_argv(files, out, other_reference(tmp_path), *resume)) == 2
    assert "--reference (reference_sha256)" in capsys.readouterr().err
    assert cli.main(oneshot_argv(files, out, files["reference"], *resume, "--projection-steps", "3")) == 2
    assert "--projection-steps: 2 in the checkpoint, 3 in this run" in capsys.readouterr().err
    # other LPIPS weights would train the rest of the run under another loss
    from torchvision.models import alexnet

    torch.manual_seed(5)
    other_alexnet = tmp_path / "alexnet2.pth"
    torch.save({f"features.{k}": v for k, v in alexnet(weights=None).features.state_dict().items()}, other_alexnet)
    argv = oneshot_argv(files, out, files["reference"], *resume)
    argv[argv.index(str(files["alexnet"]))] = str(other_alexnet)
    assert cli.main(argv) == 2
    assert "--lpips-backbone / --ir-se50 (the weights files) (loss_networks_sha256)" in capsys.readouterr().err
    assert torch.load(work / "checkpoint.pt", weights_only=True)["step"] == 1


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_adapt_oneshot_stops_cleanly_while_projecting(files, tmp_path, capsys, monkeypatch, signum):
    """Ctrl-C in the projection (up to 1000 steps before training) was a traceback; SIGTERM ended
    the process without a word."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are handled in the main thread only")
    import refinestyle.adaptation.projection as projection

    def signalled_projection(*args, **kwargs):
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler raises here
        raise AssertionError("the signal did not stop the projection")

    monkeypatch.setattr(projection, "project", signalled_projection)
    wide = tmp_path / "wide.png"  # and a reference that is not square is said to be stretched
    Image.fromarray(np.zeros((30, 50, 3), dtype=np.uint8)).save(wide)
    assert cli.main(oneshot_argv(files, tmp_path / "r.safetensors", wide)) == 128 + signum
    error = capsys.readouterr().err
    assert "interrupted while projecting the reference" in error
    assert f"the reference is 30 x 50 pixels; it is resized to the generator's {SIZE} x {SIZE} (stretched" in error
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handlers are put back
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_adapt_oneshot_resume_without_checkpoint_projects_another_reference_again(files, tmp_path, capsys):
    """A work folder holding only w_r.pt of another reference: that w_r is not reused."""
    from refinestyle.adaptation.train import load_w_plus

    out, work = tmp_path / "ref.safetensors", tmp_path / "ref.run"
    assert cli.main(oneshot_argv(files, out, files["reference"], "--iterations", "1")) == 0
    first_w_r = load_w_plus(work / "w_r.pt")[0]
    (work / "checkpoint.pt").unlink()
    capsys.readouterr()
    assert cli.main(oneshot_argv(files, out, other_reference(tmp_path), "--iterations", "1", "--resume")) == 0
    assert "projecting the reference again" in capsys.readouterr().err
    new_w_r = load_w_plus(work / "w_r.pt")[0]
    assert not torch.equal(new_w_r, first_w_r)
    assert load_w_plus(work / "w_r.pt")[2]["reference_sha256"] == Adapter.load(out).metadata["reference_sha256"]
    # w_r.pt of the same reference and settings is used as it is
    (work / "checkpoint.pt").unlink()
    assert cli.main(oneshot_argv(files, out, other_reference(tmp_path), "--iterations", "1", "--resume")) == 0
    assert "projecting" not in capsys.readouterr().err
    assert torch.equal(load_w_plus(work / "w_r.pt")[0], new_w_r)


def test_adapt_text_names_empty_prompts_and_the_clip_option(files, tmp_path, capsys):
    argv = text_argv(files, tmp_path / "a.safetensors", "--iterations", "1")
    argv[argv.index("--target") + 1] = " "  # trained towards nothing, silently
    assert cli.main(argv) == 2
    assert "--target: expected a description of the domain" in capsys.readouterr().err
    argv = text_argv(files, tmp_path / "b.safetensors", "--iterations", "1")
    at = argv.index("--clip")
    argv[at + 1] = f"NoSuchArch={files['clip']}"
    assert cli.main(argv) == 2
    assert f"--clip NoSuchArch={files['clip']}: " in capsys.readouterr().err
