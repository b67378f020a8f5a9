"""Median jitted step time and state bytes of 8-bit optimizers vs optax.

Every optimizer runs in this one process on the same parameters and
gradients, timed round-robin; the ratios against ``optax.adamw`` are what to
compare across machines. For each JAX optimizer it also reports the step's
temporary memory (XLA's compiled memory analysis: bytes the step allocates
beyond its donated inputs and outputs) and the minor page faults per step
(``getrusage``: a step whose temporaries the allocator maps fresh every time
pays for it in system time). When ``torch`` and ``bitsandbytes``
are importable (the ``parity`` extra), bitsandbytes' CPU ``AdamW8bit`` and
``torch.optim.AdamW`` run on the same shapes in the same rounds. Usage:

    python benchmarks/step_time.py [--repeats 20] [--optimizers adamw,adamw_8bit,...] [--no-torch]

An optimizer name may end in ``:xla``, ``:native`` or ``:pallas`` to force
that backend of an 8-bit optimizer (e.g. ``adamw_8bit:xla``, the jax.numpy
path that ``"auto"`` used on CPU before the native kernel).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_paged as op
from optax_paged import registry


def single_leaf(n=16 * 2**20):
  return {"w": jnp.zeros((n // 4096, 4096), jnp.float32)}


def transformer_like(vocab=8192, d=512, layers=4, mlp=4):
  """~16.8M parameters with realistic leaf shapes."""
  p = {"embed": jnp.zeros((vocab, d)), "final_norm": {"scale": jnp.zeros(d), "bias": jnp.zeros(d)}}
  for i in range(layers):
    p[f"layer_{i}"] = {
        "ln1": {"scale": jnp.zeros(d), "bias": jnp.zeros(d)},
        "qkv": {"kernel": jnp.zeros((d, 3 * d)), "bias": jnp.zeros(3 * d)},
        "out": {"kernel": jnp.zeros((d, d)), "bias": jnp.zeros(d)},
        "ln2": {"scale": jnp.zeros(d), "bias": jnp.zeros(d)},
        "up": {"kernel": jnp.zeros((d, mlp * d)), "bias": jnp.zeros(mlp * d)},
        "down": {"kernel": jnp.zeros((mlp * d, d)), "bias": jnp.zeros(d)},
    }
  return p


WORKLOADS = {"single 16M leaf": single_leaf, "transformer ~16.8M": transformer_like}


def _randomize(tree, seed):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) * 0.02 for k, x in zip(keys, leaves)])


def make_stepper(tx, params, grads):
  """Returns ``(run_once, state_bytes)`` for a donated, jitted step of ``tx``."""

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  carry = [jax.tree.map(jnp.copy, params)]
  carry.append(tx.init(carry[0]))
  nbytes = sum(x.nbytes for x in jax.tree.leaves(carry[1]))
  analysis = step.lower(carry[0], carry[1], grads).compile().memory_analysis()
  temp = getattr(analysis, "temp_size_in_bytes", None)

  def run_once():
    t0 = time.perf_counter()
    carry[0], carry[1] = step(carry[0], carry[1], grads)
    jax.block_until_ready(carry)
    return time.perf_counter() - t0

  for _ in range(3):  # compile and warm up
    run_once()
  return run_once, nbytes, temp


def torch_steppers(params, grads):
  """bitsandbytes' CPU AdamW8bit and torch.optim.AdamW on the same shapes, or {}."""
  try:
    import bitsandbytes as bnb
    import torch
  except ImportError:
    return {}
  out = {}
  for name, make in (("torch AdamW", lambda ps: torch.optim.AdamW(ps, lr=1e-3)),
                     ("bnb AdamW8bit (CPU)", lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3))):
    ps = [torch.nn.Parameter(torch.from_numpy(np.array(x))) for x in jax.tree.leaves(params)]
    for p, g in zip(ps, jax.tree.leaves(grads)):
      p.grad = torch.from_numpy(np.array(g))
    opt = make(ps)

    def run_once(opt=opt):
      t0 = time.perf_counter()
      opt.step()
      return time.perf_counter() - t0

    for _ in range(3):
      run_once()
    nbytes = sum(v.nbytes for st in opt.state.values() for v in st.values() if hasattr(v, "nbytes"))
    out[name] = (run_once, nbytes, None)
  return out


def _minor_faults():
  """Minor page faults of this process so far (0 where ``resource`` is missing)."""
  try:
    import resource
  except ImportError:  # Windows
    return 0
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_steps(txs, params, grads, repeats, with_torch=False):
  """``{name: (median step seconds, state bytes, step temp bytes, median faults)}``.

  Timed round-robin: interleaving the optimizers step by step keeps a noisy
  machine's slow phases from landing on one optimizer only, so the ratios
  are fair.
  """
  steppers = {name: make_stepper(tx, params, grads) for name, tx in txs.items()}
  if with_torch:
    steppers.update(torch_steppers(params, grads))
  times = {name: [] for name in steppers}
  faults = {name: [] for name in steppers}
  for _ in range(repeats):
    for name, (run_once, _, _) in steppers.items():
      before = _minor_faults()
      times[name].append(run_once())
      faults[name].append(_minor_faults() - before)
  return {name: (float(np.median(times[name])),) + steppers[name][1:] + (float(np.median(faults[name])),)
          for name in steppers}


def _create(name):
  """``registry.create(name, 1e-3)``; ``name:backend`` forces an 8-bit backend."""
  base, _, backend = name.partition(":")
  return registry.create(base, 1e-3, **({"backend": backend} if backend else {}))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--optimizers",
                      default="adamw,adamw_8bit,adamw_8bit:xla,lion,lion_8bit,paged_adamw_8bit")
  parser.add_argument("--workloads", default=",".join(WORKLOADS))
  parser.add_argument("--no-torch", action="store_true",
                      help="skip bitsandbytes' AdamW8bit and torch's AdamW even if installed")
  args = parser.parse_args(argv)
  names = [n for n in args.optimizers.split(",") if n]
  if "adamw" not in names:
    names.insert(0, "adamw")
  print(
      f"machine: {platform.machine()} {os.cpu_count()} cores, {platform.system()}; "
      f"JAX {jax.__version__} ({jax.devices()[0].platform}), optax {optax.__version__}, "
      f"optax-paged {op.__version__}"
  )
  for wname in args.workloads.split(","):
    params = _randomize(WORKLOADS[wname](), 0)
    grads = _randomize(params, 1)
    n = sum(x.size for x in jax.tree.leaves(params))
    print(f"\n{wname}: {n / 1e6:.2f}M parameters in {len(jax.tree.leaves(params))} leaves")
    print(f"{'optimizer':<20} {'median ms':>10} {'x adamw':>8} {'state MiB':>10} {'bytes/param':>12} "
          f"{'step temp MiB':>14} {'faults/step':>12}")
    results = time_steps({name: _create(name) for name in names}, params, grads,
                         args.repeats, with_torch=not args.no_torch)
    base = results["adamw"][0]
    for name, (sec, nbytes, temp, faults) in results.items():
      temp = "-" if temp is None else f"{temp / 2**20:.1f}"
      print(f"{name:<20} {sec * 1e3:>10.1f} {sec / base:>8.2f} {nbytes / 2**20:>10.1f} {nbytes / n:>12.3f} "
            f"{temp:>14} {faults:>12.0f}")
    bnb = results.get("bnb AdamW8bit (CPU)")
    if bnb and "adamw_8bit" in results:
      print(f"bitsandbytes' AdamW8bit takes {bnb[0] / results['adamw_8bit'][0]:.2f}x the time of "
            f"adamw_8bit (same rounds)")


if __name__ == "__main__":
  main()
