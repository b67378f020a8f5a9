"""Step time and achieved bandwidth of the fused 8-bit AdamW kernel (run on a GPU).

For 64M, 256M and 1B parameters (one leaf, 4096 wide) it times, in one
process and round-robin:

- ``adamw_8bit`` with ``backend="pallas"`` (the fused kernel),
- ``adamw_8bit`` with ``backend="xla"`` (the jax.numpy path, on the GPU),
- ``optax.adamw``,

each as a jitted ``update + apply_updates`` step with params and state
donated, and prints the achieved bandwidth: modelled bytes read and written
per step divided by the step time, against the device's peak and against a
measured copy (``x * 2``) on the same device.

With ``--sweep`` it first times the kernel alone over codecs, tile sizes and
warps (checking each one's codes against the XLA path), then times the
library's defaults and the fastest configuration side by side in the step.

On a machine without a GPU it runs a small size (kernels in interpret mode)
to show the script works, and says so.

Usage:
    python benchmarks/kernels_gpu.py [--sizes 64e6,256e6,1e9] [--repeats 20] [--sweep]
"""

from __future__ import annotations

import argparse
import functools
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_paged as op

# HBM peak bandwidth by device kind (bytes/s), from the vendors' data sheets.
PEAK_BANDWIDTH = {
    "H100 80GB HBM3": 3.35e12,  # SXM
    "NVIDIA H100 80GB HBM3": 3.35e12,
    "NVIDIA H100 PCIe": 2.0e12,
    "NVIDIA H100 NVL": 3.9e12,
    "NVIDIA H200": 4.8e12,
    "NVIDIA A100-SXM4-80GB": 2.04e12,
    "NVIDIA A100-SXM4-40GB": 1.555e12,
}

# Modelled bytes moved per parameter by one step (float32 params and grads).
BYTES_PER_PARAM = {
    # read grad, param, mu, nu; write param, mu, nu
    "optax.adamw": 4 * 4 + 3 * 4,
    # kernel: read grad + 2 codes, write direction + 2 codes; apply: read
    # direction + param (weight decay reads it too, fused), write param
    "adamw_8bit (pallas)": (4 + 2 + 4 + 2) + (4 + 4 + 4),
    # ideal XLA fusion: read grad, param, 2 codes; write param, 2 codes
    "adamw_8bit (xla)": (4 + 4 + 2) + (4 + 2),
}


def _stepper(tx, n, seed):
  params = {"w": jax.random.normal(jax.random.PRNGKey(seed), (n // 4096, 4096)) * 0.02}
  grads = {"w": jax.random.normal(jax.random.PRNGKey(seed + 1), (n // 4096, 4096)) * 0.02}

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  carry = [params, tx.init(params)]

  def run():
    t0 = time.perf_counter()
    carry[0], carry[1] = step(carry[0], carry[1], grads)
    jax.block_until_ready(carry)
    return time.perf_counter() - t0

  for _ in range(3):
    run()
  return run


def _median_time(fn, args, repeats):
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), out


# A kernel configuration: (codec, elements per program, warps per program).
SWEEP = [(codec, elements, warps) for codec in ("table", "compact")
         for elements, warps in ((2048, 4), (4096, 4), (4096, 8), (8192, 8))]


def _library_config():
  from optax_paged import backend as backend_lib
  from pallas_kernels import blockwise
  return backend_lib.GPU_CODEC, blockwise.GPU_TILE_ELEMENTS, blockwise.GPU_NUM_WARPS


def _set_library_config(config):
  """Makes ``config`` the kernels' GPU defaults for the steps traced next."""
  from optax_paged import backend as backend_lib
  from pallas_kernels import blockwise
  backend_lib.GPU_CODEC, blockwise.GPU_TILE_ELEMENTS, blockwise.GPU_NUM_WARPS = config
  # The jitted leaf update caches its trace, which read the old defaults.
  backend_lib.update_quantized_leaf_pallas.clear_cache()


def sweep(n, repeats, peak):
  """The fused AdamW kernel alone over codecs, tiles and warps.

  Checks each configuration's codes and scales against the XLA path on the
  same inputs, and returns ``(seconds, config)`` of the fastest correct one.
  """
  from optax_paged import backend as backend_lib
  from optax_paged import rules
  from optax_paged import transform
  from pallas_kernels import blockwise

  spec = rules.RULES["adam"]
  guarded = functools.partial(transform._guarded_rule, spec.rule)
  shape = (n // 256, 256)
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  grad = jax.random.normal(k[0], shape) * 1e-2
  qm = op.quantize_blockwise(jax.random.normal(k[1], shape) * 1e-2, signed=True)
  qv = op.quantize_blockwise(jax.random.normal(k[2], shape) ** 2 * 1e-4, signed=False)
  codes, absmax = (qm.codes, qv.codes), (qm.absmax.reshape(-1), qv.absmax.reshape(-1))
  hparams = spec.example_hparams(jnp.int32(3))
  ref = jax.jit(lambda g, c, a: transform.update_quantized_leaf_xla(
      spec.rule, g, c, a, spec.signed, hparams, 256))(grad, codes, (qm.absmax, qv.absmax))
  print(f"\nkernel sweep, fused AdamW update alone, {n / 1e6:.0f}M elements, not donated "
        f"(bytes: grad 4 + codes 2 in, direction 4 + codes 2 out)")
  print(f"{'codec':<8} {'elements':>8} {'warps':>5} {'ms':>8} {'TB/s':>7} "
        f"{'% peak':>7} {'codes differ':>12}")
  best = None
  for config in SWEEP:
    codec, elements, warps = config
    decoders, encoders, tables = backend_lib.codecs(spec.signed, True, codec)
    fn = jax.jit(lambda g, c, a, decoders=decoders, encoders=encoders, tables=tables,
                 elements=elements, warps=warps: blockwise.fused_update(
        guarded, g, c, a, hparams, decoders=decoders, encoders=encoders, tables=tables,
        rows=max(1, elements // 256), num_warps=warps))
    label = f"{codec:<8} {elements:>8} {warps:>5}"
    try:
      t, out = _median_time(fn, (grad, codes, absmax), repeats)
    except Exception as e:  # noqa: BLE001
      print(f"{label} failed: {type(e).__name__}: {str(e)[:300]}")
      continue
    differ = float(np.mean([np.mean(np.asarray(a) != np.asarray(b)) for a, b in zip(out[1], ref[1])]))
    scales_equal = all(np.allclose(np.asarray(a), np.asarray(b).reshape(-1), rtol=1e-6)
                       for a, b in zip(out[2], ref[2]))
    bw = 12 * n / t
    pct = "n/a" if peak is None else f"{100 * bw / peak:.0f}%"
    print(f"{label} {t * 1e3:>8.3f} {bw / 1e12:>7.3f} {pct:>7} "
          f"{differ:>12.2e}{'' if scales_equal else '  SCALES DIFFER'}")
    if differ < 1e-4 and scales_equal and (best is None or t < best[0]):
      best = (t, config)
  return best


def copy_bandwidth(n, repeats):
  x = jnp.ones((n // 4096, 4096))
  f = jax.jit(lambda x: x * 2, donate_argnums=0)
  x = f(x)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    x = f(x)
    jax.block_until_ready(x)
    times.append(time.perf_counter() - t0)
  return 8 * n / float(np.median(times))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes", default="64e6,256e6,1e9")
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--sweep", action="store_true",
                 help="first time the kernel alone over codecs, tile sizes and warps, then time "
                      "the library's defaults and the fastest in the full step")
  a = p.parse_args(argv)
  dev = jax.devices()[0]
  sizes = [int(float(s)) // 4096 * 4096 for s in a.sizes.split(",")]
  if dev.platform == "cpu":
    print("No GPU here: running 256K parameters with the kernels in interpret mode, "
          "to check the script. Numbers below are not GPU measurements.")
    sizes, a.repeats = [2**18], 3
  peak = PEAK_BANDWIDTH.get(dev.device_kind)
  print(f"device: {dev.device_kind} ({dev.platform}), JAX {jax.__version__}, "
        f"peak bandwidth {'unknown' if peak is None else f'{peak / 1e12:.2f} TB/s'}")
  library = _library_config()
  # Kernel configurations timed in the full step: the library's defaults and,
  # with --sweep, the fastest of the sweep.
  configs = {"adamw_8bit (pallas)": library}
  if a.sweep and dev.platform != "cpu":
    best = sweep(sizes[0], a.repeats, peak)
    if best is not None and best[1] != library:
      print(f"fastest: {best[1]} (codec, elements, warps per program); "
            f"the library's defaults are {library}")
      configs = {"adamw_8bit (pallas, defaults)": library, "adamw_8bit (pallas, fastest)": best[1]}
  for n in sizes:
    copy_bw = copy_bandwidth(n, a.repeats)
    makers = {"optax.adamw": (lambda: optax.adamw(1e-4), None)}
    makers |= {k: (lambda: op.adamw_8bit(1e-4, backend="pallas"), c) for k, c in configs.items()}
    makers["adamw_8bit (xla)"] = (lambda: op.adamw_8bit(1e-4, backend="xla"), None)
    runs = {}
    for k, (make, config) in makers.items():
      try:
        if config is not None:
          _set_library_config(config)
        runs[k] = _stepper(make(), n, 0)
      except Exception as e:  # noqa: BLE001 - report the row, time the others
        print(f"{k}: failed at {n / 1e6:.0f}M parameters: {type(e).__name__}: {str(e)[:500]}")
      finally:
        _set_library_config(library)
    times = {k: [] for k in runs}
    for _ in range(a.repeats):
      for k, run in runs.items():
        times[k].append(run())
    print(f"\n{n / 1e6:.1f}M parameters; measured copy bandwidth {copy_bw / 1e12:.3f} TB/s")
    print(f"{'step':<30} {'median ms':>10} {'x adamw':>8} {'TB/s':>7} {'% peak':>7} {'% copy':>7}")
    base = float(np.median(times["optax.adamw"])) if "optax.adamw" in times else float("nan")
    for k, ts in times.items():
      t = float(np.median(ts))
      bw = BYTES_PER_PARAM[re.sub(r", [^)]*\)", ")", k)] * n / t
      pct = "n/a" if peak is None else f"{100 * bw / peak:.0f}%"
      print(f"{k:<30} {t * 1e3:>10.2f} {t / base:>8.2f} {bw / 1e12:>7.3f} {pct:>7} {100 * bw / copy_bw:>6.0f}%")


if __name__ == "__main__":
  main()
