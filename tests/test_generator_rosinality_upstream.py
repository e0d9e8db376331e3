"""rosinality/stylegan2-pytorch's own model.py, opt-in: its checkpoints load into our
Generator, and its Generator runs on our swapped layers, rendering the same images.

tests/test_generator.py checks parity against a rosinality-semantics reference written here
(tests/rosinality_reference.py). This file checks it against the real model.py when you point
it at a local checkout (nothing is downloaded):

    REFINESTYLE_ROSINALITY_REPO=/path/to/stylegan2-pytorch python -m pytest tests/test_generator_rosinality_upstream.py

Without the variable the tests skip and say so. A subprocess imports the checkout's model.py
with its own `op` package; only `torch.utils.cpp_extension.load` is replaced (by a function
returning None), because its CUDA extensions cannot be built without nvcc and op's CPU paths
(upfirdn2d_native, the CPU fused_leaky_relu, F.conv2d in conv2d_gradfix) never use them. The
subprocess builds a small generator in float64, perturbs every parameter, renders it (stored
noise; truncation; style mixing), saves it as convert_weight.py / train.py do, swaps its
layers with `swap_rosinality_modules` and renders again.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from refinestyle.checkpoints import load_generator
from refinestyle.generator import Generator

ENV_VAR = "REFINESTYLE_ROSINALITY_REPO"
REPO = Path(os.environ[ENV_VAR]) if os.environ.get(ENV_VAR) else None

pytestmark = pytest.mark.skipif(REPO is None, reason=f"set {ENV_VAR} to a local rosinality/stylegan2-pytorch checkout to run")

# Runs inside the checkout. argv: out_dir. Writes g.pt and renders.npz.
RENDER = textwrap.dedent(
    """
    import sys
    import numpy as np, torch
    import torch.utils.cpp_extension
    torch.utils.cpp_extension.load = lambda *args, **kwargs: None  # op's CUDA extensions; CPU paths never use them
    from model import Generator
    from refinestyle_kernels import swap_rosinality_modules
    out = sys.argv[1]
    torch.manual_seed(0)
    g = Generator(64, 32, 2, channel_multiplier=1).double().eval()
    with torch.no_grad():
        for name, t in g.named_parameters():
            t.add_(torch.randn_like(t) * (0.3 if name.endswith(("bias", "noise.weight")) else 0.1))
    rng = torch.Generator().manual_seed(1)
    z1, z2 = (torch.randn(2, 32, generator=rng, dtype=torch.float64) for _ in range(2))
    noise = [getattr(g.noises, f"noise_{i}") for i in range(g.num_layers)]
    with torch.no_grad():  # mean_latent draws float32
        mean = g.style(torch.randn(64, 32, generator=rng, dtype=torch.float64)).mean(0, keepdim=True)

    def renders(g):
        with torch.no_grad():
            return dict(
                plain=g([z1], noise=noise, randomize_noise=False)[0],
                truncated=g([z1], noise=noise, randomize_noise=False, truncation=0.6, truncation_latent=mean)[0],
                mixed=g([z1, z2], noise=noise, randomize_noise=False, inject_index=3)[0],
            )

    before = renders(g)
    torch.save({"g_ema": g.state_dict(), "latent_avg": mean[0]}, f"{out}/g.pt")
    names = swap_rosinality_modules(g, backend="torch")
    after = renders(g)
    arrays = {"z1": z1.numpy(), "z2": z2.numpy(), "mean": mean.numpy(), "swapped": np.array(len(names))}
    arrays.update({k: v.numpy() for k, v in before.items()})
    arrays.update({f"swapped_{k}": v.numpy() for k, v in after.items()})
    # a wider table: rosinality's has no channel cap (1024 channels at 64 px here)
    with torch.device("meta"):
        wide = Generator(64, 32, 2, channel_multiplier=4).state_dict()
    arrays["wide_shapes"] = np.array(repr(sorted((name, tuple(t.shape)) for name, t in wide.items())))
    np.savez(f"{out}/renders.npz", **arrays)
    """
)


def relative_error(ours: torch.Tensor, theirs: np.ndarray) -> float:
    theirs = torch.from_numpy(theirs)
    return float((ours - theirs).abs().max() / theirs.abs().max())


def test_rosinality_generator_and_checkpoint_render_the_same_images(tmp_path):
    if not (REPO / "model.py").is_file() or not (REPO / "op").is_dir():
        pytest.fail(f"{ENV_VAR}: {REPO} is not a rosinality/stylegan2-pytorch checkout (no model.py / op)")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(root)])}
    result = subprocess.run([sys.executable, "-c", RENDER, str(tmp_path)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    if result.returncode != 0:
        pytest.fail(f"rosinality's code failed in {REPO}:\n{result.stderr[-3000:]}")
    renders = np.load(tmp_path / "renders.npz")
    # their Generator on our layers: 64 px has conv1, to_rgb1 and 4 blocks of 2 convs and a toRGB
    assert int(renders["swapped"]) == 2 + 4 * 3
    for kind in ("plain", "truncated", "mixed"):
        assert relative_error(torch.from_numpy(renders[f"swapped_{kind}"]), renders[kind]) < 1e-10, kind

    # the drop-in: our Generator with rosinality's arguments takes its state_dict strictly (float64),
    # and load_generator reads the file (into float32, as checkpoints are)
    with torch.device("meta"):
        wide = Generator(64, 32, 2, channel_multiplier=4).state_dict()
    assert repr(sorted((name, tuple(t.shape)) for name, t in wide.items())) == str(renders["wide_shapes"])
    exact = Generator(64, 32, 2, channel_multiplier=1, backend="torch").double().eval()
    exact.load_state_dict(torch.load(tmp_path / "g.pt", weights_only=True)["g_ema"], strict=True)
    loaded = load_generator(tmp_path / "g.pt", backend="torch").eval()
    for generator, tolerance in ((exact, 1e-10), (loaded, 1e-5)):
        dtype = next(generator.parameters()).dtype
        noise = [getattr(generator.noises, f"noise_{i}") for i in range(generator.num_layers)]
        z1, z2, mean = (torch.from_numpy(renders[k]).to(dtype) for k in ("z1", "z2", "mean"))
        with torch.no_grad():
            ours = dict(
                plain=generator([z1], noise=noise, randomize_noise=False)[0],
                truncated=generator([z1], noise=noise, randomize_noise=False, truncation=0.6, truncation_latent=mean)[0],
                mixed=generator([z1, z2], noise=noise, randomize_noise=False, inject_index=3)[0],
            )
        errors = {kind: relative_error(image.double(), renders[kind]) for kind, image in ours.items()}
        print(f"\nrosinality model.py vs our Generator ({dtype}): {errors}")
        for kind, error in errors.items():
            assert error < tolerance, (kind, errors)
