"""optax-paged: memory-saving 8-bit and paged optimizer state for Optax."""

from optax_paged.alias import adam_8bit
from optax_paged.alias import adamw_8bit
from optax_paged.codebooks import dynamic_map
from optax_paged.quantization import QuantizedArray
from optax_paged.quantization import dequantize_blockwise
from optax_paged.quantization import quantize_blockwise
from optax_paged.transform import MomentSpec
from optax_paged.transform import ScaleByAdam8bitState
from optax_paged.transform import scale_by_adam_8bit
from optax_paged.transform import scale_by_rule_8bit

__version__ = "0.1.0"

__all__ = [
    "MomentSpec",
    "QuantizedArray",
    "ScaleByAdam8bitState",
    "adam_8bit",
    "adamw_8bit",
    "dequantize_blockwise",
    "dynamic_map",
    "quantize_blockwise",
    "scale_by_adam_8bit",
    "scale_by_rule_8bit",
]
