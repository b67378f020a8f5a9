#!/usr/bin/env bash
# The GPU measurements of benchmarks/RESULTS.md in one go (about 9 minutes
# on one H100/H200), with the machine's own JAX for CUDA and this checkout on
# PYTHONPATH. Logs go to $OUT (default: gpu-results/).
#
#   1. tests/test_pallas.py with the kernels compiled for the GPU (not
#      interpreted): Pallas path == XLA path for every rule and the codec;
#   2. benchmarks/kernels_gpu.py: fused 8-bit AdamW vs XLA path vs
#      optax.adamw at 64M, 256M, 1B parameters, achieved bandwidth;
#   3. benchmarks/paging_gpu.py --search: peak device memory and step time
#      at 1B parameters, host<->device bandwidth, largest trainable model.
set -u
OUT=${OUT:-gpu-results}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
{ nvidia-smi -L; $PY -c "import jax, optax, flax; print('jax', jax.__version__, jax.devices(), 'optax', optax.__version__, 'flax', flax.__version__)"; } 2>&1 | tee "$OUT/env.log"
timeout 130 $PY -m pytest -q -p no:cacheprovider -k "not lowers" tests/test_pallas.py 2>&1 | tee "$OUT/pallas_tests.log" | tail -30
timeout 110 $PY benchmarks/kernels_gpu.py 2>&1 | tee "$OUT/kernels.log"
timeout 290 $PY benchmarks/paging_gpu.py --search --timeout 120 \
  --optimizers adamw,adamw_8bit,paged_adamw,paged_adamw_8bit,paged_adamw@streamed,paged_adamw_8bit@streamed \
  --json "$OUT/paging.json" 2>&1 | tee "$OUT/paging.log"
