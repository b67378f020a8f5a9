"""optax-paged: memory-saving 8-bit and paged optimizer state for Optax."""

import types

from optax_paged.alias import adagrad_8bit
from optax_paged.alias import adam_8bit
from optax_paged.alias import adamw_8bit
from optax_paged.alias import ademamix_8bit
from optax_paged.alias import lamb_8bit
from optax_paged.alias import lars_8bit
from optax_paged.alias import lion_8bit
from optax_paged.alias import paged_adagrad_8bit
from optax_paged.alias import paged_adam
from optax_paged.alias import paged_adam_8bit
from optax_paged.alias import paged_adamw
from optax_paged.alias import paged_adamw_8bit
from optax_paged.alias import paged_ademamix
from optax_paged.alias import paged_ademamix_8bit
from optax_paged.alias import paged_lamb_8bit
from optax_paged.alias import paged_lars_8bit
from optax_paged.alias import paged_lion
from optax_paged.alias import paged_lion_8bit
from optax_paged.alias import paged_rmsprop_8bit
from optax_paged.alias import paged_sgd_8bit
from optax_paged.alias import rmsprop_8bit
from optax_paged.alias import sgd_8bit
from optax_paged.clipping import percentile_clipping
from optax_paged.codebooks import dynamic_map
from optax_paged.conversion import dequantize_state
from optax_paged.conversion import quantize_state
from optax_paged.offload import MemoryReport
from optax_paged.offload import OffloadPolicy
from optax_paged.offload import memory_report
from optax_paged.offload import paged
from optax_paged.offload import place
from optax_paged.quantization import QuantizedArray
from optax_paged.registry import create
from optax_paged.registry import from_config
from optax_paged.quantization import dequantize_blockwise
from optax_paged.quantization import quantize_blockwise
from optax_paged.transform import MomentSpec
from optax_paged.transform import ScaleByAdam8bitState
from optax_paged.transform import ScaleByAdemamix8bitState
from optax_paged.transform import ScaleByLion8bitState
from optax_paged.transform import ScaleByRms8bitState
from optax_paged.transform import ScaleByRss8bitState
from optax_paged.transform import Trace8bitState
from optax_paged.transform import scale_by_adam_8bit
from optax_paged.transform import scale_by_ademamix_8bit
from optax_paged.transform import scale_by_lion_8bit
from optax_paged.transform import scale_by_rms_8bit
from optax_paged.transform import scale_by_rss_8bit
from optax_paged.transform import scale_by_rule_8bit
from optax_paged.transform import trace_8bit

__version__ = "0.1.0"

# The public names, without the submodules (``from optax_paged import *``
# must not bind e.g. ``backend`` or ``transform`` in the caller's namespace).
__all__ = [name for name, value in sorted(globals().items())
           if not name.startswith("_") and not isinstance(value, types.ModuleType)]
