"""Output paths and names of the `refinestyle` commands: a file where a folder is wanted (or the
reverse) is a one-line error before any work, and images that share a stem never overwrite
each other's results."""
from __future__ import annotations

import pytest
import torch

from refinestyle import cli
from refinestyle.checkpoints import save_rosinality_checkpoint
from refinestyle.generator import Generator
from refinestyle.inversion.inference import CODES_FORMAT, load_codes, unique_stems


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    generator = Generator(16, style_dim=8, n_mlp=1, channel_max=8)
    return save_rosinality_checkpoint(generator, tmp_path_factory.mktemp("ckpt") / "g.pt")


def one_line_error(capsys, argv, *expected):
    with pytest.raises(SystemExit) as exit_info:  # argparse's own error: before anything is loaded
        cli.main(argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2, error
    assert error.strip().splitlines()[-1].startswith(f"refinestyle {argv[0]}: error: "), error
    for text in expected:
        assert text in error, error


def test_a_folder_where_a_file_is_written_and_the_reverse(tmp_path, checkpoint, capsys):
    folder = tmp_path / "grid.png"
    folder.mkdir()
    a_file = tmp_path / "taken"
    a_file.write_text("")
    one_line_error(capsys, ["generate", "--ckpt", str(checkpoint), "--out", str(folder)], "is a folder")
    one_line_error(capsys, ["spectrum", "--ckpt", str(checkpoint), "--out", str(folder)], "is a folder")
    one_line_error(capsys, ["generate", "--ckpt", str(checkpoint), "--out", str(a_file / "grid.png")],
                   "is a file, so no folder can be made there")  # fmt: skip
    one_line_error(capsys, ["invert", "--inverter", "i.safetensors", "--generator", str(checkpoint), "--input",
                            str(tmp_path), "--out", str(a_file)], "is a file; expected a folder")  # fmt: skip
    one_line_error(capsys, ["eval-adapter", "--generator", str(checkpoint), "--adapter", "a.safetensors",
                            "--out", str(folder)], "is a folder")  # fmt: skip


def test_generate_refuses_a_file_where_its_image_folder_goes(tmp_path, checkpoint, capsys):
    """The images go to --out without its suffix by default; a file there is named before rendering."""
    (tmp_path / "grid").write_text("")
    status = cli.main(["generate", "--ckpt", str(checkpoint), "--out", str(tmp_path / "grid.png"), "--device", "cpu"])
    error = capsys.readouterr().err
    assert status == 2 and "--outdir" in error and "is a file" in error
    assert not (tmp_path / "grid.png").exists()


def test_images_that_share_a_stem_get_distinct_output_names():
    """a.png and a.jpg beside a_1.png: the second a is not given a_1, which a_1.png keeps."""
    names = unique_stems(["x/a.png", "x/a.jpg", "x/a_1.png", "y/a.png", "b.png"])
    assert len(set(names)) == 5
    assert names[0] == "a" and names[2] == "a_1" and names[4] == "b"
    assert unique_stems(["a_1.png", "a.png", "a.jpg"]) == ["a_1", "a", "a_2"]
    # one file on case-insensitive file systems (macOS, Windows)
    assert unique_stems(["A.png", "a.png", "A_1.jpg"]) == ["A", "a_2", "A_1"]


def test_a_damaged_code_file_is_named(tmp_path):
    from safetensors.torch import save_file

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(ValueError, match="junk.safetensors: cannot read it as a safetensors code file"):
        load_codes([junk])
    missing_key = tmp_path / "partial.safetensors"  # tokens, but no w_plus
    save_file({"p.3": torch.zeros(2, 4), "q.3": torch.zeros(2, 4)}, str(missing_key),
              metadata={"format": CODES_FORMAT, "num_layers": "4"})  # fmt: skip
    with pytest.raises(ValueError, match="partial.safetensors: a damaged code file"):
        load_codes([missing_key])


def test_codes_of_two_generators_are_refused_by_name(tmp_path):
    """w+ codes of generators with different n_latent cannot share a batch: a named ValueError
    (the command line's one-line error), not torch.stack's RuntimeError."""
    from refinestyle.inversion.inference import save_codes

    small = save_codes(tmp_path / "a", torch.zeros(1, 8, 4), None, ["a"], ["a.png"])
    large = save_codes(tmp_path / "b", torch.zeros(1, 10, 4), None, ["b"], ["b.png"])
    assert load_codes(small + small).w_plus.shape == (2, 8, 4)
    with pytest.raises(ValueError, match=r"b\.safetensors: codes of another generator than .*a\.safetensors"):
        load_codes(small + large)


@pytest.mark.parametrize("argv, expected", [
    (["generate", "--truncation", "nan", "--out", "g.png"], "argument --truncation: expected a finite number, got nan"),
    (["spectrum", "--truncation", "inf"], "argument --truncation: expected a finite number, got inf"),
    (["eval-edit", "--inverter", "i", "--generator", "g", "--data", "d", "--strength", "nan"],
     "argument --strength: expected a finite number, got nan"),
    (["edit", "--generator", "g", "--out", "o", "--strengths=1,nan"], "argument --strengths: expected comma-separated finite"),
    (["eval-adapter", "--adapter", "a", "--grid", "grid.xyz"], "argument --grid: 'grid.xyz': expected an image file name"),
])  # fmt: skip
def test_numbers_and_file_names_that_cannot_work_are_refused_by_argparse(capsys, argv, expected):
    """nan passed `psi < 1` silently (generate), or failed in a linear-algebra routine (eval-edit's
    FID, spectrum's eigenvalues); a grid name PIL cannot write failed after the work."""
    one_line_error(capsys, argv, expected)
