"""optax-paged: memory-saving 8-bit and paged optimizer state for Optax."""

from optax_paged.alias import adam_8bit
from optax_paged.alias import adamw_8bit
from optax_paged.alias import paged_adam
from optax_paged.alias import paged_adam_8bit
from optax_paged.alias import paged_adamw
from optax_paged.alias import paged_adamw_8bit
from optax_paged.codebooks import dynamic_map
from optax_paged.offload import MemoryReport
from optax_paged.offload import OffloadPolicy
from optax_paged.offload import memory_report
from optax_paged.offload import paged
from optax_paged.offload import place
from optax_paged.quantization import QuantizedArray
from optax_paged.quantization import dequantize_blockwise
from optax_paged.quantization import quantize_blockwise
from optax_paged.transform import MomentSpec
from optax_paged.transform import ScaleByAdam8bitState
from optax_paged.transform import scale_by_adam_8bit
from optax_paged.transform import scale_by_rule_8bit

__version__ = "0.1.0"

__all__ = [
    "MemoryReport",
    "MomentSpec",
    "OffloadPolicy",
    "QuantizedArray",
    "ScaleByAdam8bitState",
    "adam_8bit",
    "adamw_8bit",
    "dequantize_blockwise",
    "dynamic_map",
    "memory_report",
    "paged",
    "paged_adam",
    "paged_adam_8bit",
    "paged_adamw",
    "paged_adamw_8bit",
    "place",
    "quantize_blockwise",
    "scale_by_adam_8bit",
    "scale_by_rule_8bit",
]
