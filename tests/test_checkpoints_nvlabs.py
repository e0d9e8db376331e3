"""NVlabs stylegan2-ada-pytorch / stylegan3 pickles: restricted unpickling, conversion, render parity.

The test builds NVlabs-style networks itself: small modules with NVlabs' parameter,
buffer and attribute names and a forward written from NVlabs' documented math
(FullyConnectedLayer gains, demodulated grouped conv with the unscaled weight,
transposed upsampling conv + FIR, const noise, bias_act with gain and clamp, toRGB
styles times 1/sqrt(Cin), FIR upsampling of the skip). They are pickled the way
torch_utils.persistence pickles them: a call of
torch_utils.persistence._reconstruct_persistent_obj(meta) with the module's source
code and state, with stand-in torch_utils/dnnlib modules that exist only while
pickling.
"""
from __future__ import annotations

import collections
import contextlib
import math
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from refinestyle.checkpoints import CheckpointError, load_generator, read_nvlabs_pickle

FIR = torch.tensor([1.0, 3.0, 3.0, 1.0])
FIR = torch.outer(FIR, FIR) / torch.outer(FIR, FIR).sum()  # setup_filter([1, 3, 3, 1])


def lrelu(x, gain=math.sqrt(2)):
    return F.leaky_relu(x, 0.2) * gain


def fir(x, pad0, pad1, gain):
    channels = x.shape[1]
    x = F.pad(x, (pad0, pad1, pad0, pad1))
    return F.conv2d(x, (FIR * gain).flip(0, 1).to(x)[None, None].repeat(channels, 1, 1, 1), groups=channels)


class NVModule(nn.Module):
    """Base of the NVlabs look-alikes; pickled as persistent objects."""


class FullyConnectedLayer(NVModule):
    def __init__(self, in_features, out_features, activation="linear", lr_multiplier=1.0, bias_init=0.0):
        super().__init__()
        self.activation = activation
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], np.float32(bias_init)))
        self.weight_gain = lr_multiplier / np.sqrt(in_features)  # a numpy float, as in NVlabs' pickles
        self.bias_gain = lr_multiplier

    def forward(self, x):
        x = x @ (self.weight * float(self.weight_gain)).t() + self.bias * self.bias_gain
        return lrelu(x) if self.activation == "lrelu" else x


class MappingNetwork(NVModule):
    def __init__(self, z_dim, w_dim, num_ws, num_layers, lr_multiplier=0.01):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws, self.num_layers = z_dim, 0, w_dim, num_ws, num_layers
        self.w_avg_beta = 0.995
        for index in range(num_layers):
            setattr(self, f"fc{index}", FullyConnectedLayer(z_dim, w_dim, "lrelu", lr_multiplier))
        self.register_buffer("w_avg", torch.randn(w_dim))

    def forward(self, z, truncation_psi=1.0):
        x = z * (z.square().mean(1, keepdim=True) + 1e-8).rsqrt()
        for index in range(self.num_layers):
            x = getattr(self, f"fc{index}")(x)
        x = x[:, None].repeat(1, self.num_ws, 1)
        return self.w_avg.lerp(x, truncation_psi) if truncation_psi != 1 else x


class SynthesisLayer(NVModule):
    def __init__(self, in_channels, out_channels, w_dim, resolution, up=1, conv_clamp=None):
        super().__init__()
        self.resolution, self.up, self.use_noise, self.activation, self.conv_clamp = resolution, up, True, "lrelu", conv_clamp
        self.register_buffer("resample_filter", FIR.clone())
        self.padding, self.act_gain = 1, math.sqrt(2)
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 3, 3))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        self.noise_strength = nn.Parameter(0.3 * torch.randn([]))
        self.bias = nn.Parameter(0.2 * torch.randn(out_channels))

    def forward(self, x, w):
        x = self.demodulated_conv(x, w) + self.noise_const * self.noise_strength
        x = lrelu(x + self.bias[None, :, None, None], gain=self.act_gain)
        return x.clamp(-self.conv_clamp, self.conv_clamp) if self.conv_clamp is not None else x

    def demodulated_conv(self, x, w):
        batch, in_channels, height, width = x.shape
        styles = self.affine(w)
        weight = self.weight[None] * styles[:, None, :, None, None]  # not scaled: NVlabs demodulates the raw weight
        weight = weight * (weight.square().sum([2, 3, 4]) + 1e-8).rsqrt()[:, :, None, None, None]
        out_channels = weight.shape[1]
        grouped = x.reshape(1, batch * in_channels, height, width)
        if self.up == 2:
            transposed = weight.transpose(1, 2).reshape(batch * in_channels, out_channels, 3, 3)
            x = F.conv_transpose2d(grouped, transposed, stride=2, groups=batch)
            x = fir(x.reshape(batch, out_channels, *x.shape[2:]), 1, 1, gain=4)
        else:
            x = F.conv2d(grouped, weight.reshape(batch * out_channels, in_channels, 3, 3), padding=1, groups=batch)
            x = x.reshape(batch, out_channels, height, width)
        return x


class ToRGBLayer(NVModule):
    def __init__(self, in_channels, w_dim, conv_clamp=None):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn(3, in_channels, 1, 1))
        self.bias = nn.Parameter(0.2 * torch.randn(3))
        self.weight_gain = 1 / np.sqrt(in_channels)

    def forward(self, x, w):
        styles = self.affine(w) * float(self.weight_gain)
        weight = self.weight[None] * styles[:, None, :, None, None]
        batch, in_channels, height, width = x.shape
        x = F.conv2d(x.reshape(1, -1, height, width), weight.reshape(-1, in_channels, 1, 1), groups=batch)
        x = x.reshape(batch, 3, height, width) + self.bias[None, :, None, None]
        return x.clamp(-self.conv_clamp, self.conv_clamp) if self.conv_clamp is not None else x


class SynthesisBlock(NVModule):
    def __init__(self, in_channels, out_channels, w_dim, resolution, conv_clamp=None):
        super().__init__()
        self.in_channels, self.resolution, self.architecture = in_channels, resolution, "skip"
        self.register_buffer("resample_filter", FIR.clone())
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn(out_channels, resolution, resolution))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=2, conv_clamp=conv_clamp)
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution, conv_clamp=conv_clamp)
        self.torgb = ToRGBLayer(out_channels, w_dim, conv_clamp=conv_clamp)
        self.num_conv = 1 if in_channels == 0 else 2

    def forward(self, x, img, ws):
        if self.in_channels == 0:
            x = self.const[None].repeat(ws.shape[0], 1, 1, 1)
            x = self.conv1(x, ws[:, 0])
        else:
            x = self.conv0(x, ws[:, 0])
            x = self.conv1(x, ws[:, 1])
        if img is not None:
            batch, channels, height, width = img.shape
            up = img.new_zeros(batch, channels, 2 * height, 2 * width)
            up[:, :, ::2, ::2] = img
            img = fir(up, 2, 1, gain=4)
        y = self.torgb(x, ws[:, self.num_conv])
        return x, (y if img is None else img + y)


class SynthesisNetwork(NVModule):
    def __init__(self, w_dim, img_resolution, channel_base, channel_max, conv_clamp=None):
        super().__init__()
        self.w_dim, self.img_resolution = w_dim, img_resolution
        self.block_resolutions = [2**i for i in range(2, int(math.log2(img_resolution)) + 1)]
        channels = {res: min(channel_base // res, channel_max) for res in self.block_resolutions}
        self.num_ws = 0
        for res in self.block_resolutions:
            block = SynthesisBlock(channels[res // 2] if res > 4 else 0, channels[res], w_dim, res, conv_clamp)
            self.num_ws += block.num_conv
            setattr(self, f"b{res}", block)
        self.num_ws += 1

    def forward(self, ws):
        x = img = None
        index = 0
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            x, img = block(x, img, ws[:, index : index + block.num_conv + 1])
            index += block.num_conv
        return img


class Generator(NVModule):
    def __init__(self, z_dim, w_dim, img_resolution, channel_base, channel_max, num_mapping=2, conv_clamp=None,
                 lr_multiplier=0.01):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.img_resolution, self.img_channels = z_dim, 0, w_dim, img_resolution, 3
        self.synthesis = SynthesisNetwork(w_dim, img_resolution, channel_base, channel_max, conv_clamp)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim, w_dim, self.num_ws, num_mapping, lr_multiplier)

    def forward(self, z, truncation_psi=1.0):
        return self.synthesis(self.mapping(z, truncation_psi))


class EasyDict(dict):
    """dnnlib.util.EasyDict look-alike, pickled under that name."""


MODULE_SOURCE_TEMPLATE = "import pathlib\npathlib.Path({marker!r}).write_text('the pickled source code was executed')\n"


def _reconstruct_persistent_obj(meta):  # only its name is pickled; never called by the loader under test
    raise AssertionError("the stand-in reconstruct function must never run")


@contextlib.contextmanager
def nvlabs_names():
    """Stand-in torch_utils.persistence and dnnlib.util modules, present only while pickling."""
    persistence = types.ModuleType("torch_utils.persistence")
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    util = types.ModuleType("dnnlib.util")
    util.EasyDict = EasyDict
    _reconstruct_persistent_obj.__module__, _reconstruct_persistent_obj.__qualname__ = (
        "torch_utils.persistence",
        "_reconstruct_persistent_obj",
    )
    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    names = {
        "torch_utils": types.ModuleType("torch_utils"),
        "torch_utils.persistence": persistence,
        "dnnlib": types.ModuleType("dnnlib"),
        "dnnlib.util": util,
    }
    saved = {name: sys.modules.get(name) for name in names}
    sys.modules.update(names)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


class PersistencePickler(pickle.Pickler):
    def __init__(self, file, protocol, module_source):
        super().__init__(file, protocol=protocol)
        self.module_source = module_source

    def reducer_override(self, obj):
        if isinstance(obj, NVModule):
            meta = dict(
                type="class", version=6, module_src=self.module_source, class_name=type(obj).__name__,
                state=dict(obj.__dict__),
            )
            return _reconstruct_persistent_obj, (meta,)
        return NotImplemented


def write_nvlabs_pickle(path, data, protocol=4, marker="unused-marker"):
    with nvlabs_names(), open(path, "wb") as handle:
        PersistencePickler(handle, protocol, MODULE_SOURCE_TEMPLATE.format(marker=str(marker))).dump(data)


def make_network(seed, conv_clamp=None, size=32, channel_base=256, channel_max=16, lr_multiplier=0.01):
    torch.manual_seed(seed)
    return Generator(16, 16, size, channel_base, channel_max, conv_clamp=conv_clamp,
                     lr_multiplier=lr_multiplier).eval().requires_grad_(False)  # fmt: skip


def snapshot(network):
    return {
        "G": make_network(99, size=network.img_resolution),
        "D": FullyConnectedLayer(4, 4),
        "G_ema": network,
        "augment_pipe": None,
        "training_set_kwargs": EasyDict(path="ffhq.zip", resolution=network.img_resolution, xflip=True),
    }


# a mapping lr multiplier other than rosinality's 0.01 shows whether the loader reads the pickle's
@pytest.mark.parametrize("protocol, conv_clamp, lr_multiplier", [(4, None, 0.01), (2, 0.7, 0.1)])
def test_converted_generator_renders_what_the_nvlabs_network_renders(tmp_path, protocol, conv_clamp, lr_multiplier):
    network = make_network(1, conv_clamp=conv_clamp, lr_multiplier=lr_multiplier)
    marker = tmp_path / "executed.txt"
    path = tmp_path / "network-snapshot.pkl"
    write_nvlabs_pickle(path, snapshot(network), protocol=protocol, marker=marker)
    assert "torch_utils" not in sys.modules and "dnnlib" not in sys.modules

    generator = load_generator(path)
    assert not marker.exists(), "the pickled source code was executed"
    assert "torch_utils" not in sys.modules and "dnnlib" not in sys.modules
    assert generator.checkpoint_format == "nvlabs"
    assert generator.size == 32 and generator.n_latent == network.num_ws
    assert generator.channels == {4: 16, 8: 16, 16: 16, 32: 8}
    assert generator.conv_clamp == conv_clamp and generator.lr_mlp == pytest.approx(lr_multiplier)
    assert torch.equal(generator.latent_avg, network.mapping.w_avg)

    network, generator = network.double(), generator.double()
    z = torch.randn(3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for psi in (1.0, 0.7):
            expected = network(z, truncation_psi=psi)
            image, _ = generator([z], truncation=psi, randomize_noise=False)
            # NVlabs demodulates the unscaled weight, rosinality the scaled one: only the 1e-8 eps weighs differently
            error = ((image - expected).norm() / expected.norm()).item()
            assert error < 1e-7, error
    if conv_clamp is not None:  # the clamp really acts in this network
        network_unclamped = make_network(1, conv_clamp=None, lr_multiplier=lr_multiplier).double()
        assert ((network_unclamped(z) - expected).norm() / expected.norm()) > 1e-3


def test_bare_pickled_generator_and_channel_table_inference(tmp_path):
    network = make_network(3, size=64, channel_base=1024, channel_max=16)
    path = tmp_path / "G.pkl"
    write_nvlabs_pickle(path, network)
    generator = load_generator(path, size=64)
    assert generator.channels == {4: 16, 8: 16, 16: 16, 32: 16, 64: 16}
    z = torch.randn(2, 16)
    with torch.no_grad():
        image, _ = generator([z], randomize_noise=False)
        expected = network(z)
    assert ((image - expected).norm() / expected.norm()).item() < 1e-5  # float32


def test_unpickler_refuses_foreign_globals_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned.txt"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pkl"
    with open(path, "wb") as handle:
        pickle.dump({"G_ema": Exploit()}, handle)
    with pytest.raises(CheckpointError, match="refusing to load (posix|os|nt)\\.system"):
        load_generator(path)
    assert not marker.exists()


def test_tensorflow_pickles_are_named(tmp_path):
    # protocol 2: GLOBAL dnnlib.tflib.network.Network, empty args, NEWOBJ, as in the original TF pickles
    path = tmp_path / "stylegan2-ffhq-config-f.pkl"
    path.write_bytes(b"\x80\x02cdnnlib.tflib.network\nNetwork\n)\x81.")
    with pytest.raises(CheckpointError, match="TensorFlow StyleGAN2 pickle"):
        load_generator(path)


def test_wrong_structures_get_clear_errors(tmp_path):
    path = tmp_path / "no_gema.pkl"
    write_nvlabs_pickle(path, {"G": make_network(4), "training_set_kwargs": EasyDict(xflip=False)})
    with pytest.raises(CheckpointError, match="expected an NVlabs network pickle with 'G_ema'.*found \\['G', 'training_set_kwargs'\\]"):
        load_generator(path)

    # a StyleGAN3 (alias-free) synthesis network has 'input' and L0_... layers, not b4
    network = make_network(5)
    for res in network.synthesis.block_resolutions:
        delattr(network.synthesis, f"b{res}")
    network.synthesis.input = FullyConnectedLayer(2, 2)
    path = tmp_path / "stylegan3.pkl"
    write_nvlabs_pickle(path, {"G_ema": network})
    with pytest.raises(CheckpointError, match="StyleGAN3"):
        load_generator(path)

    network = make_network(6)
    network.mapping.embed = FullyConnectedLayer(10, 16)
    path = tmp_path / "conditional.pkl"
    write_nvlabs_pickle(path, {"G_ema": network})
    with pytest.raises(CheckpointError, match="conditional"):
        load_generator(path)

    network = make_network(7)
    network.synthesis.b16.conv1.weight = nn.Parameter(torch.randn(16, 16, 5, 5))
    path = tmp_path / "kernel5.pkl"
    write_nvlabs_pickle(path, {"G_ema": network})
    with pytest.raises(CheckpointError, match="b16.conv1.weight \\[Cout, Cin, 3, 3\\], found \\(16, 16, 5, 5\\)"):
        load_generator(path)

    path = tmp_path / "size.pkl"
    write_nvlabs_pickle(path, {"G_ema": make_network(8)})
    with pytest.raises(CheckpointError, match="size=1024 was asked for.*32 px"):
        load_generator(path, size=1024)


def _load_in_a_child(path) -> str:
    """load_generator(path) in a fresh interpreter: a crash there fails the test instead of the worker."""
    import subprocess

    code = ("from refinestyle.checkpoints import CheckpointError, load_generator\n"
            f"try:\n    load_generator({str(path)!r})\nexcept CheckpointError as error:\n    print(error)\n"
            "import gc; gc.collect()\n")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, (child.returncode, child.stderr[-2000:])
    return child.stdout


def test_crafted_numpy_and_tensor_payloads_are_refused(tmp_path):
    """Only allowed globals, but data that would make numpy or torch read or free memory they do not own."""
    from numpy._core import multiarray

    class ObjectArray:  # numpy fills an object array from raw bytes: pointers, freed later
        def __reduce__(self):
            return multiarray._reconstruct, (np.ndarray, (2,), b"b"), (1, (2,), np.dtype("O"), False, b"A" * 16)

    class ShortArray:  # fewer bytes than the shape needs
        def __reduce__(self):
            return multiarray._reconstruct, (np.ndarray, (2,), b"b"), (1, (4,), np.dtype("f4"), False, b"A" * 8)

    class ObjectScalar:
        def __reduce__(self):
            return multiarray.scalar, (np.dtype("O"), b"A" * 8)

    class ShortStorage:  # torch would grow the storage to fit the view, with uninitialised memory
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (torch.ones(4).storage(), 0, (16, 16, 3, 3), (144, 9, 3, 1),
                                                     False, collections.OrderedDict())

    network = make_network(11)
    network.synthesis.b8.conv1._parameters["weight"] = ShortStorage()
    cases = {"short_storage": ({"G_ema": network}, "reaches element 2303 of a storage of 4"),
             "object_array": ({"G_ema": ObjectArray()}, "refused a numpy dtype other than a plain number type"),
             "short_array": ({"G_ema": ShortArray()}, "data does not fit its shape (4,)"),
             "object_scalar": ({"G_ema": ObjectScalar()}, "refused a numpy dtype other than a plain number type")}
    for name, (data, expected) in cases.items():
        path = tmp_path / f"{name}.pkl"
        write_nvlabs_pickle(path, data)
        assert expected in _load_in_a_child(path), name
    # the real thing still loads, numpy scalars and arrays included
    path = tmp_path / "network.pkl"
    write_nvlabs_pickle(path, {**snapshot(make_network(11)), "stats": [np.arange(6.0).reshape(2, 3), np.float32(1.5)]})
    load_generator(path)
    import io

    from refinestyle.checkpoints import _RestrictedUnpickler

    for value in (np.arange(6.0).reshape(2, 3), np.arange(4, dtype=np.int16), np.float32(1.5), np.bool_(True)):
        for protocol in (2, 4):
            read = _RestrictedUnpickler(io.BytesIO(pickle.dumps(value, protocol=protocol)), "test").load()
            assert read.dtype == value.dtype and np.array_equal(read, value)


def test_truncated_pickle_is_reported_as_corrupt(tmp_path):
    path = tmp_path / "network.pkl"
    write_nvlabs_pickle(path, {"G_ema": make_network(9)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_generator(path)


def test_read_nvlabs_pickle_returns_inert_records(tmp_path):
    path = tmp_path / "network.pkl"
    write_nvlabs_pickle(path, snapshot(make_network(10)))
    generator = read_nvlabs_pickle(path)
    assert generator.class_name == "Generator"
    assert sorted(generator.modules) == ["mapping", "synthesis"]
    layer = generator.modules["synthesis"].modules["b8"].modules["conv0"]
    assert layer.class_name == "SynthesisLayer" and layer.attribute("up") == 2
    assert set(layer.tensors) == {"weight", "bias", "noise_strength", "noise_const", "resample_filter"}


def test_refinement_on_the_swapped_nvlabs_network_matches_the_converted_generator(tmp_path):
    """The two routes for an NVlabs user: convert the pickle to our Generator, or keep NVlabs'
    network and swap its layers. A refinement (as adapters and inverters make them for the
    converted generator) renders the same images through both."""
    import copy

    from refinestyle import Refinement, set_nvlabs_refinement
    from refinestyle_kernels import nvlabs_conv_layers, swap_nvlabs_modules

    network = make_network(5).double()
    for module in network.modules():
        if isinstance(module, SynthesisLayer):
            module.noise_strength.zero_()  # the look-alike blocks pass no noise_mode: 'random' noise, at strength 0
    path = tmp_path / "network.pkl"
    write_nvlabs_pickle(path, snapshot(network.float()))
    converted = load_generator(path, backend="torch").double()
    network = network.double()
    swapped = copy.deepcopy(network)
    swap_nvlabs_modules(swapped, backend="torch")
    layers = nvlabs_conv_layers(swapped)
    assert [(layer.in_channels, layer.out_channels) for layer in layers] == converted.layer_shapes()

    rng = torch.Generator().manual_seed(0)
    shapes = converted.layer_shapes(3)
    refinement = Refinement(
        [torch.randn(4, cout, generator=rng, dtype=torch.float64) * 0.2 for _, cout in shapes],
        [torch.randn(4, cin, generator=rng, dtype=torch.float64) * 0.2 for cin, _ in shapes],
        converted.num_layers,
    )
    ws = network.mapping(torch.randn(2, 16, generator=rng, dtype=torch.float64))
    with torch.no_grad():
        expected = converted.synthesis(ws, refinement=refinement, randomize_noise=False)
        set_nvlabs_refinement(swapped, refinement)
        refined = swapped.synthesis(ws)
        set_nvlabs_refinement(swapped, None)
        plain = swapped.synthesis(ws)
    # the converted generator demodulates with rosinality's eps (see the conversion table): ~1e-9 apart
    assert torch.allclose(refined, expected, rtol=1e-7, atol=1e-7), (refined - expected).abs().max()
    assert torch.allclose(plain, network.synthesis(ws), rtol=1e-9, atol=1e-9)
    assert not torch.allclose(plain, refined, atol=1e-3)
    with pytest.raises(ValueError, match="conv layers"):
        set_nvlabs_refinement(swapped, Refinement(refinement.p, refinement.q, converted.num_layers + 1))
    with pytest.raises(TypeError, match="swap_nvlabs_modules"):
        nvlabs_conv_layers(network)  # not swapped
