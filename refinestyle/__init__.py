"""refinestyle: the RefineStyle model package on top of refinestyle_kernels.

- `Generator`, `load_generator`: StyleGAN2 (rosinality names, NVlabs pickles converted)
  on the fused op; `Refinement` / `RefinementTokens`: the low-rank kernel refinement.
- `refinestyle.inversion`: one- and two-stage inverters, training, editing, metrics.
- `refinestyle.adaptation`: token-only domain adaptation and `Adapter` files.
- `kernel_spectrum`: the singular-value analysis of the modulated kernels (paper Fig. 3).
- The `refinestyle` command line (refinestyle.cli).
"""
from refinestyle.adaptation import Adapter, mixed_refinement
from refinestyle.checkpoints import CheckpointError, load_generator, save_rosinality_checkpoint
from refinestyle.generator import Generator
from refinestyle.inversion import (
    FirstStage,
    InversionResult,
    InverterConfig,
    OneStageInverter,
    TwoStageInverter,
    load_first_stage,
    load_inverter,
    save_inverter,
)
from refinestyle.refinement import Refinement, RefinementTokens, refinement_layer_shapes, set_nvlabs_refinement
from refinestyle.spectrum import kernel_spectrum

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "CheckpointError",
    "FirstStage",
    "Generator",
    "InversionResult",
    "InverterConfig",
    "OneStageInverter",
    "Refinement",
    "RefinementTokens",
    "TwoStageInverter",
    "kernel_spectrum",
    "load_first_stage",
    "load_generator",
    "load_inverter",
    "mixed_refinement",
    "refinement_layer_shapes",
    "save_inverter",
    "save_rosinality_checkpoint",
    "set_nvlabs_refinement",
]
