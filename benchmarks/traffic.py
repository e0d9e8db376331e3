"""Bytes and kernel launches of a whole training step, launch by launch, planned on meta tensors.

The roofline floor (`benchmarks.flops.layer_bytes`) is what a fully fused layer must move:
every activation once per pass. The fused path runs several kernels per layer (the conv,
the blur of the upsampling layers, the epilogue backward, the token-gradient reductions), and
each writes what the next one reads back. This module counts what each launch moves at the
least, on meta tensors (no GPU, no compute, a few seconds at 1024 px):

- a Triton launch reads every tensor it is given and writes every tensor it fills, each once
  (the launch sites report them through `modulated_conv2d.LAUNCH_OBSERVER`; re-reads of the
  conv's halo and taps are assumed to come from L1/L2);
- an aten op reads its tensor arguments and writes its results once; views and allocations
  move nothing and launch nothing;
- a tensor counts the elements it addresses: an expanded (stride-0) dimension once.

So the totals are lower bounds of each implementation's HBM traffic (cuDNN and cuBLAS are
credited with reading every operand exactly once), and their ratio to the floor says how far
the kernel structure itself, before any kernel is slow, is from the roofline target. Every
launch is attributed to the generator layer that issued it, in the forward through module
hooks and in the backward through the autograd nodes each layer created.

    python -m benchmarks.traffic [--size 1024 --batch 8 --dtype bfloat16 --tokens 32]
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from benchmarks.cases import GeneratorConfig, TokenSetting
from benchmarks.flops import layer_bytes
from benchmarks.implementations import Implementation
from benchmarks.memory import add_step_arguments, meta_training_step, parse_step_arguments
from benchmarks.workloads import patched_op
from refinestyle_kernels.ops.modulated_conv2d import addressed_bytes, open_profile_range

#: the H100's device-to-device copy bandwidth (read + write) measured by the suite in session 2
#: (BENCHMARKS.md); the default for turning bytes into milliseconds
H100_COPY_BYTES_PER_S = 3.01e12

# aten ops that allocate without writing: no traffic, no kernel
_ALLOCATIONS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}


@dataclass
class Launch:
    """One kernel launch (a Triton kernel or an aten op) of a planned step."""

    phase: str  # "forward" or "backward"
    layer: str  # rosinality's attribute path ("convs.3", "to_rgbs.1") or "other"
    kernel: str  # the Triton kernel ("conv_gemm[mode 0]", "blur", ...) or "aten.<op>"
    read_bytes: int
    write_bytes: int
    # the op's profiler range open at the launch ("conv 128->128 256x256 backward",
    # `modulated_conv2d.profile_range`), or None outside every range: the key on which
    # `benchmarks.profile` sets each layer call's kernel time against its planned bytes
    range_label: str | None = None

    @property
    def bytes(self) -> int:
        return self.read_bytes + self.write_bytes


class TrafficRecorder(TorchDispatchMode):
    """Records every kernel launch inside the mode as a `Launch`; see the module docstring.

    Install it with `recording(model)`, which also labels the launches by layer."""

    def __init__(self) -> None:
        super().__init__()
        self.launches: list[Launch] = []
        self.forward_layer = "other"
        # set while a kernel runs in Triton's interpreter, whose own tensor work is not the step's
        self.paused = False

    def _where(self) -> tuple[str, str]:
        node = torch._C._current_autograd_node()
        if node is not None:
            return "backward", node.metadata.get("layer", "other")
        return "forward", self.forward_layer

    def observe_launch(self, kernel: str, reads: list, writes: list) -> None:
        phase, layer = self._where()
        self.launches.append(
            Launch(phase, layer, kernel, sum(map(addressed_bytes, reads)), sum(map(addressed_bytes, writes)),
                   open_profile_range())
        )  # fmt: skip

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if self.paused or name in _ALLOCATIONS:
            return result
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor)]
        input_storages = {t.untyped_storage()._cdata for t in inputs}
        if not func._schema.is_mutable and all(t.untyped_storage()._cdata in input_storages for t in outputs):
            return result  # a view or alias: metadata only
        self.observe_launch(f"aten.{name}", inputs, outputs)
        return result


def _label_new_nodes(root, layer: str) -> None:
    """Give every autograd node reachable from `root` that has no layer yet the label `layer`."""
    stack = [root] if root is not None else []
    while stack:
        node = stack.pop()
        if node is None or "layer" in node.metadata:
            continue
        node.metadata["layer"] = layer
        stack.extend(next_node for next_node, _ in node.next_functions)


def _layer_modules(model) -> dict[str, torch.nn.Module]:
    names = ["conv1", "to_rgb1"]
    names += [f"convs.{i}" for i in range(len(model.convs))] + [f"to_rgbs.{i}" for i in range(len(model.to_rgbs))]
    return {name: model.get_submodule(name) for name in names}


def _conv_rgb_pairs(model) -> dict[str, str]:
    """{conv name: toRGB name} for the convs the generator runs with their toRGB as one op
    (`StyledConv.forward_to_rgb`): conv1 and the last conv of every block."""
    pairs = {"conv1": "to_rgb1"}
    pairs.update({f"convs.{2 * block + 1}": f"to_rgbs.{block}" for block in range(len(model.to_rgbs))})
    return pairs


def layer_floor(floors: dict[str, int], layer: str) -> int | None:
    """The floor of a launch's layer label: a fused pair "convs.15+to_rgbs.7" has both layers' floors."""
    parts = layer.split("+")
    return sum(floors[part] for part in parts) if all(part in floors for part in parts) else None


class recording:
    """`with recording(model) as recorder:` runs the block under a `TrafficRecorder` whose
    launches carry the name of the layer of `model` (a refinestyle Generator) that issued them.
    A conv run with its toRGB as one op (`StyledConv.forward_to_rgb`) is one layer,
    "convs.15+to_rgbs.7"; where an implementation patched in by `patched_op` runs the pair as two
    module calls, each keeps its own name."""

    def __init__(self, model) -> None:
        self.model = model
        self.recorder = TrafficRecorder()
        self._handles: list = []

    def __enter__(self) -> TrafficRecorder:
        import refinestyle_kernels.ops.modulated_conv2d as op_module

        recorder = self.recorder

        def before(module, args, kwargs, name):
            # what already exists (earlier layers, the network's own glue) is not this layer's
            for value in tree_flatten((args, kwargs))[0]:
                if isinstance(value, torch.Tensor):
                    _label_new_nodes(value.grad_fn, "other")
            recorder.forward_layer = name

        def after(module, args, output, name):
            recorder.forward_layer = "other"
            for value in tree_flatten(output)[0]:
                if isinstance(value, torch.Tensor):
                    _label_new_nodes(value.grad_fn, name)

        for name, module in _layer_modules(self.model).items():
            self._handles.append(module.register_forward_pre_hook(functools.partial(before, name=name), with_kwargs=True))
            self._handles.append(module.register_forward_hook(functools.partial(after, name=name)))
        self._wrapped = []
        for conv_name, rgb_name in _conv_rgb_pairs(self.model).items():
            conv = self.model.get_submodule(conv_name)

            def forward_to_rgb(*args, name=f"{conv_name}+{rgb_name}", original=conv.forward_to_rgb, **kwargs):
                before(None, args, kwargs, name)
                output = original(*args, **kwargs)
                after(None, args, output, name)
                return output

            conv.forward_to_rgb = forward_to_rgb  # an instance attribute, removed on exit
            self._wrapped.append(conv)
        self._op_module = op_module
        self._previous_observer = op_module.LAUNCH_OBSERVER
        self._previous_ranges = op_module.PROFILE_RANGES
        op_module.LAUNCH_OBSERVER = recorder.observe_launch
        op_module.PROFILE_RANGES = True  # each launch learns its layer call's range
        recorder.__enter__()
        return recorder

    def __exit__(self, *exc) -> None:
        self.recorder.__exit__(*exc)
        self._op_module.LAUNCH_OBSERVER = self._previous_observer
        self._op_module.PROFILE_RANGES = self._previous_ranges
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for conv in self._wrapped:
            del conv.forward_to_rgb
        self._wrapped.clear()


def planned_generator_traffic(
    generator: GeneratorConfig,
    batch: int,
    dtype: torch.dtype,
    tokens: TokenSetting,
    implementation: Implementation,
    backward: bool = True,
) -> list[Launch]:
    """The kernel launches of one training step of the synthesis network, planned on meta tensors.

    Arguments as in `benchmarks.memory.planned_generator_memory` (the same step: w+ and the
    tokens need gradients, the weights are frozen, the stored noise is used). The step runs
    twice and the second one is recorded: the steady state, in which what the op derives from
    a frozen weight once (tap sums, kernel layouts) is cached. Returns the launches in issue
    order, each with its phase, layer, kernel and least bytes read and written.
    """
    model, w_plus, refinement, grad_image = meta_training_step(
        generator, batch, dtype, tokens, implementation.backend, backward
    )
    leaves = [w_plus, *(refinement.p if refinement is not None else ()), *(refinement.q if refinement is not None else ())]

    def step():
        for leaf in leaves:
            leaf.grad = None
        image = model.synthesis(w_plus, refinement=refinement, randomize_noise=False)
        if backward:
            image.backward(grad_image)

    with patched_op(implementation.op):
        step()
        with recording(model) as recorder:
            step()
    return recorder.launches


def floor_bytes(generator: GeneratorConfig, batch: int, dtype: torch.dtype, tokens: TokenSetting, backward: bool = True) -> dict[str, int]:
    """The roofline floor's bytes per layer name (`benchmarks.flops.layer_bytes`); each toRGB
    runs inside its block's last conv (`input_resident`), as in the whole network's floor."""
    convs, torgbs = generator.layers()
    element_size = torch.empty((), dtype=dtype).element_size()
    floors = {}
    for spec in convs + torgbs:
        num_tokens = tokens.num_tokens if spec.refinable else 0
        floors[spec.name] = layer_bytes(
            spec, batch, num_tokens, shared_tokens=tokens.shared, element_size=element_size, backward=backward,
            input_resident=spec.kind != "conv",
        )  # fmt: skip
    return floors


def summarize(launches: list[Launch]) -> dict:
    """Totals of a list of launches: {"kernels", "read_bytes", "write_bytes", "bytes"}."""
    return {
        "kernels": len(launches),
        "read_bytes": sum(launch.read_bytes for launch in launches),
        "write_bytes": sum(launch.write_bytes for launch in launches),
        "bytes": sum(launch.bytes for launch in launches),
    }


def per_layer(launches: list[Launch]) -> dict[str, dict[str, dict]]:
    """{layer: {"forward": totals, "backward": totals}} in the order the layers first appear."""
    grouped: dict[str, dict[str, list[Launch]]] = defaultdict(lambda: {"forward": [], "backward": []})
    for launch in launches:
        grouped[launch.layer][launch.phase].append(launch)
    return {layer: {phase: summarize(items) for phase, items in phases.items()} for layer, phases in grouped.items()}


def per_range(launches: list[Launch]) -> dict[str, dict]:
    """{range label: totals + {"layer", "phase"}} for the launches inside the op's profiler
    ranges (`Launch.range_label`), in the order the ranges first appear; the layer and phase
    are those of the range's first launch (a layer call belongs to one layer and one pass)."""
    grouped: dict[str, list[Launch]] = defaultdict(list)
    for launch in launches:
        if launch.range_label is not None:
            grouped[launch.range_label].append(launch)
    return {
        label: {"layer": items[0].layer, "phase": items[0].phase, **summarize(items)}
        for label, items in grouped.items()
    }


def per_kernel(launches: list[Launch]) -> dict[str, dict]:
    """{kernel: totals} over the whole step, largest traffic first."""
    grouped: dict[str, list[Launch]] = defaultdict(list)
    for launch in launches:
        grouped[launch.kernel].append(launch)
    totals = {kernel: summarize(items) for kernel, items in grouped.items()}
    return dict(sorted(totals.items(), key=lambda item: -item[1]["bytes"]))


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:7.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.traffic",
        description="Least bytes and kernel launches of a synthesis-network training step, per implementation, "
        "layer and kernel, from meta tensors (no GPU, no compute), against the roofline floor. "
        "Defaults: the headline case.",
    )
    add_step_arguments(parser)
    parser.add_argument("--forward-only", action="store_true", help="plan the forward alone (the suite's fwd cases)")
    parser.add_argument(
        "--bandwidth", type=float, default=H100_COPY_BYTES_PER_S,
        help="bytes/s (read + write) to turn traffic into time; default: the H100's measured copy peak, 3.01e12",
    )  # fmt: skip
    parser.add_argument("--layers", action="store_true", help="also print the fused path's traffic per layer")
    parser.add_argument("--json", help="write every launch and the totals to this file")
    args = parser.parse_args(argv)
    if args.bandwidth <= 0:
        parser.error(f"--bandwidth: expected a positive number of bytes/s, got {args.bandwidth}")
    generator, dtype, tokens, implementations = parse_step_arguments(parser, args)
    backward = not args.forward_only
    floors = floor_bytes(generator, args.batch, dtype, tokens, backward)
    floor_total = sum(floors.values())
    step = "forward" if args.forward_only else "training step"
    print(f"planned traffic of one {step}, {generator.label}, B={args.batch}, {args.dtype}, {tokens.label}")
    print("(meta tensors; each launch reads and writes every tensor it touches once: lower bounds)")
    print(f"{'implementation':16s} {'kernels':>8s} {'read GB':>8s} {'write GB':>8s} {'total GB':>8s} "
          f"{'x floor':>8s} {'ms at ' + format(args.bandwidth / 1e12, '.2f') + ' TB/s':>16s}")  # fmt: skip
    plans = {}
    for implementation in implementations:
        launches = planned_generator_traffic(generator, args.batch, dtype, tokens, implementation, backward)
        plans[implementation.name] = launches
        total = summarize(launches)
        print(f"{implementation.name:16s} {total['kernels']:8d} {_gb(total['read_bytes']):>8s} "
              f"{_gb(total['write_bytes']):>8s} {_gb(total['bytes']):>8s} {total['bytes'] / floor_total:8.2f} "
              f"{1e3 * total['bytes'] / args.bandwidth:16.2f}")  # fmt: skip
    print(f"{'floor':16s} {'':8s} {'':8s} {'':8s} {_gb(floor_total):>8s} {1.0:8.2f} "
          f"{1e3 * floor_total / args.bandwidth:16.2f}")  # fmt: skip
    fused = next((name for name in ("triton", "compile-triton") if name in plans), None)
    if fused is not None:
        launches = plans[fused]
        print(f"\n{fused}: traffic by kernel")
        print(f"{'kernel':28s} {'launches':>8s} {'GB':>8s} {'share':>6s}")
        total_bytes = summarize(launches)["bytes"]
        for kernel, total in per_kernel(launches).items():
            if total["bytes"] < 1e-3 * total_bytes:
                continue
            print(f"{kernel:28s} {total['kernels']:8d} {_gb(total['bytes']):>8s} {100 * total['bytes'] / total_bytes:5.1f}%")
        if args.layers:
            print(f"\n{fused}: traffic by layer (GB; floor: the layer's roofline bytes)")
            print(f"{'layer':10s} {'fwd':>7s} {'bwd':>7s} {'floor':>7s} {'x floor':>7s} {'kernels':>7s}")
            for layer, phases in per_layer(launches).items():
                moved = phases["forward"]["bytes"] + phases["backward"]["bytes"]
                kernels = phases["forward"]["kernels"] + phases["backward"]["kernels"]
                floor = layer_floor(floors, layer)
                ratio = f"{moved / floor:7.2f}" if floor else f"{'':7s}"
                floor_text = _gb(floor) if floor else f"{'':7s}"
                print(f"{layer:10s} {_gb(phases['forward']['bytes'])} {_gb(phases['backward']['bytes'])} "
                      f"{floor_text} {ratio} {kernels:7d}")  # fmt: skip
    if args.json:
        document = {
            "generator": asdict(generator),
            "batch": args.batch,
            "dtype": args.dtype,
            "tokens": tokens.label,
            "backward": backward,
            "floor_bytes": floors,
            "implementations": {
                name: {"totals": summarize(launches), "launches": [asdict(launch) for launch in launches]}
                for name, launches in plans.items()
            },
        }
        with open(args.json, "w") as handle:
            json.dump(document, handle, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
