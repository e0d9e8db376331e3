"""Image inversion with RefineStyle: encoders, transformer blocks, one- and two-stage inverters."""
from refinestyle.inversion.encoder import (
    FeaturePyramidEncoder,
    IRSEBackbone,
    load_ir_se50_weights,
)
from refinestyle.inversion.models import (
    FirstStage,
    InversionResult,
    InverterConfig,
    OneStageInverter,
    TwoStageInverter,
    load_inverter,
    read_inverter_config,
    save_inverter,
)
from refinestyle.inversion.psp import PSPEncoder, load_psp
from refinestyle.inversion.style_transformer import load_first_stage, load_style_transformer
from refinestyle.inversion.transformer import GroupedTransformerBlock, TransformerBlock

__all__ = [
    "FeaturePyramidEncoder",
    "IRSEBackbone",
    "load_ir_se50_weights",
    "FirstStage",
    "InversionResult",
    "InverterConfig",
    "OneStageInverter",
    "TwoStageInverter",
    "load_inverter",
    "read_inverter_config",
    "save_inverter",
    "load_first_stage",
    "load_psp",
    "load_style_transformer",
    "PSPEncoder",
    "GroupedTransformerBlock",
    "TransformerBlock",
]
