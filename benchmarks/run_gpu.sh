#!/usr/bin/env bash
# The GPU measurements of benchmarks/RESULTS.md in one go (about 9 minutes
# on one H100/H200), with the machine's own JAX for CUDA and this checkout on
# PYTHONPATH. Logs go to $OUT (default: gpu-results/), each part under its
# own time limit, most important first:
#
#   1. benchmarks/paging_gpu.py at 1B parameters: peak device memory (the
#      process's, after init, and the compiled step's) and step time of the
#      unpaged and paged optimizers, and of the transfer orderings;
#   2. benchmarks/kernels_gpu.py --sweep: the fused kernel alone over codecs,
#      tiles and warps (256M elements), then fused 8-bit
#      AdamW (the library's defaults and the sweep's fastest) vs XLA path vs
#      optax.adamw at 256M, 64M, 1B parameters, achieved bandwidth;
#   3. tests/test_pallas.py with the kernels compiled for the GPU (not
#      interpreted): Pallas path == XLA path for every rule and the codec;
#   4. paging_gpu.py --search: the largest model that trains under a cap.
#
# PARTS="paging kernels" runs only those parts.
set -u
PARTS=${PARTS:-paging kernels tests search}
part() { [[ " $PARTS " == *" $1 "* ]]; }
OUT=${OUT:-gpu-results}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
{ nvidia-smi -L; $PY -c "import jax, optax, flax; print('jax', jax.__version__, jax.devices(), 'optax', optax.__version__, 'flax', flax.__version__)"; } 2>&1 | tee "$OUT/env.log"
part paging && timeout 240 $PY benchmarks/paging_gpu.py --timeout 60 --optimizers \
adamw,adamw_8bit,paged_adamw,paged_adamw_8bit,paged_adamw@unordered,paged_adamw@reverse,\
paged_adamw_8bit@reverse,paged_adamw@p0,paged_adamw_8bit@streamed --json "$OUT/paging.json" 2>&1 | tee "$OUT/paging.log"
part kernels && timeout 200 $PY benchmarks/kernels_gpu.py --sweep --sizes 256e6,64e6,1e9 --repeats 10 2>&1 | tee "$OUT/kernels.log"
part tests && timeout 110 $PY -m pytest -q -p no:cacheprovider -k "not lowers and not demo_model" tests/test_pallas.py 2>&1 | tee "$OUT/pallas_tests.log" | tail -30
part search && timeout 100 $PY benchmarks/paging_gpu.py --no-table --search --timeout 24 --search-fraction 0.03 \
  --optimizers adamw,adamw_8bit,paged_adamw,paged_adamw_8bit --json "$OUT/search.json" 2>&1 | tee "$OUT/search.log"
