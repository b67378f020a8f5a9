"""Peak device memory and step time of paged optimizers (run it on a GPU).

For ``optax.adamw``, ``adamw_8bit``, ``paged_adamw`` and ``paged_adamw_8bit``
(and the paged ones streamed in pages) it trains an MLP stack of about
``--params`` parameters (default 1e9) for a few steps and reports, each in a
fresh process so that peaks do not mix:

- peak device bytes (``device.memory_stats()["peak_bytes_in_use"]``),
- median step time and its ratio to ``optax.adamw``,
- optimizer-state bytes per memory kind,
- the transfer lower bound of a paged step: offloaded state bytes moved to
  the device and back, divided by the measured host<->device bandwidth,
- with ``--search``, the largest model (in layers of ``--width``) that
  trains without running out of memory, per optimizer.

On a machine without an accelerator it runs the placement part only (state
bytes per memory kind for a small model) and says that it measured no
device memory.

Usage:
    python benchmarks/paging_gpu.py [--params 1e9] [--steps 5] [--search]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit",
              "paged_adamw@streamed", "paged_adamw_8bit@streamed")
STREAM_PAGE_BYTES = 256 * 2**20


# Variants, as "name@mode+mode":
#   streamed   stream leaves in pages of STREAM_PAGE_BYTES;
#   unordered  prefetch=None: one update, XLA orders the transfers;
#   p0, p2     prefetch=0 / 2 (default 1);
#   reverse    parameters in reverse tree order (the default is tree order);
#   xla        backend="xla" (8-bit optimizers; unpaged "auto" is the kernel).
MODES = ("streamed", "unordered", "p0", "p2", "reverse", "xla")


def _build(name):
  import optax_paged as op
  from optax_paged import offload, registry
  base, _, modes = name.partition("@")
  modes = set(filter(None, modes.split("+")))
  if modes - set(MODES):
    raise SystemExit(f"unknown modes {sorted(modes - set(MODES))} in {name!r}; known: {MODES}")
  kwargs = {"backend": "xla"} if "xla" in modes else {}
  if base.startswith("paged_"):
    prefetch = {"unordered": None, "p0": 0, "p2": 2}
    kwargs["policy"] = op.OffloadPolicy(
        page_bytes=STREAM_PAGE_BYTES if "streamed" in modes else None,
        prefetch=next((prefetch[m] for m in modes if m in prefetch), 1))
    offload._REVERSE_ORDER = "reverse" in modes
  return registry.create(base, 1e-4, **kwargs)


def _model(tx, layers, width, batch):
  """A tanh MLP of ``layers`` ``width`` x ``width`` layers: ``(params, jitted donated train step)``."""
  import jax
  import jax.numpy as jnp
  import optax

  key = jax.random.PRNGKey(0)
  # Zero-padded names: tree order is the layers' order.
  params = {f"layer_{i:03d}": jax.random.normal(jax.random.fold_in(key, i), (width, width),
                                                jnp.float32) * (1.0 / width**0.5)
            for i in range(layers)}
  x = jax.random.normal(key, (batch, width))

  def loss_fn(params):
    h = x
    for i in range(layers):
      h = jnp.tanh(h @ params[f"layer_{i:03d}"])
    return jnp.mean(h**2)

  def train_step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  return params, jax.jit(train_step, donate_argnums=(0, 1))


def worker(args):
  """One optimizer, one model size, in this process: prints one JSON line."""
  import jax
  import numpy as np

  import optax_paged as op

  dev = jax.devices()[0]
  tx = _build(args.optimizer)
  params, step = _model(tx, args.layers, args.width, args.batch)
  result = {"optimizer": args.optimizer, "layers": args.layers, "width": args.width,
            "params": args.layers * args.width**2, "platform": dev.platform}
  peak = lambda: (dev.memory_stats() or {}).get("peak_bytes_in_use")
  try:
    state = tx.init(params)
    jax.block_until_ready(state)
    result["init_peak_bytes"] = peak()
    report = op.memory_report(state, params)
    result["state_bytes"] = report.by_kind
    compiled = step.lower(params, state).compile()
    analysis = compiled.memory_analysis()
    if analysis is not None:
      result["compiled"] = {k: getattr(analysis, k) for k in dir(analysis)
                            if k.endswith("_in_bytes") and isinstance(getattr(analysis, k), int)}
    times = []
    for _ in range(args.steps):
      t0 = time.perf_counter()
      params, state, loss = compiled(params, state)
      jax.block_until_ready((params, state, loss))
      times.append(time.perf_counter() - t0)
    result["step_s"] = float(np.median(times[1:] or times))
    result["loss"] = float(loss)
    result["peak_bytes"] = peak()
    result["ok"] = True
  except Exception as e:  # noqa: BLE001 - OOM or anything else is the result
    result["ok"] = False
    result["error"] = f"{type(e).__name__}: {str(e)[:300]}"
  print(json.dumps(result), flush=True)


def bandwidth():
  """Host<->device bandwidth in bytes/s for a 1 GiB pinned_host array."""
  import jax
  import jax.numpy as jnp
  x = jnp.ones((2**28,), jnp.float32)
  host = jax.device_put(x, x.sharding.with_memory_kind("pinned_host"))
  jax.block_until_ready(host)
  out = {}
  for name, src, kind in (("h2d", host, "device"), ("d2h", x, "pinned_host")):
    times = []
    for _ in range(5):
      t0 = time.perf_counter()
      jax.block_until_ready(jax.device_put(src, src.sharding.with_memory_kind(kind)))
      times.append(time.perf_counter() - t0)
    out[name] = x.nbytes / min(times)
  del x, host
  return out


def _spawn(optimizer, layers, a, extra=()):
  cmd = [sys.executable, __file__, "--worker", "--optimizer", optimizer, "--layers", str(layers),
         "--width", str(a.width), "--batch", str(a.batch), "--steps", str(a.steps), *extra]
  env = dict(os.environ)
  env.pop("XLA_PYTHON_CLIENT_PREALLOCATE", None)
  if "--search-worker" in extra:
    # A smaller "device": the search stays quick and its answer scales.
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(a.search_fraction)
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=env)
    stdout, stderr = out.stdout, out.stderr
  except subprocess.TimeoutExpired as e:  # keep what it printed (search progress)
    stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    stderr = f"timed out after {a.timeout} s"
  lines = [l for l in stdout.splitlines() if l.startswith("{")]
  if lines and stderr.startswith("timed out"):
    return {**json.loads(lines[-1]), "error": stderr}
  if not lines:
    return {"optimizer": optimizer, "layers": layers, "ok": False,
            "error": (stderr or "no output")[-300:]}
  return json.loads(lines[-1])


def _out_of_memory(e: Exception) -> bool:
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def search_worker(args):
  """Largest number of layers that trains (2 steps), searched in this process.

  Starts from a guess, walks up while models train and down while they run
  out of memory; every tried size is built, initialized and stepped for
  real. Prints one JSON line.
  """
  import gc

  import jax

  tx = _build(args.optimizer)

  def attempt(layers):
    params = None
    try:
      params, step = _model(tx, layers, args.width, args.batch)
      state = tx.init(params)
      for _ in range(2):
        params, state, loss = step(params, state)
      jax.block_until_ready(loss)
      return True, None
    except Exception as e:  # noqa: BLE001
      if not _out_of_memory(e):
        return False, f"{type(e).__name__}: {str(e)[:300]}"
      return False, "out of memory"
    finally:
      del params
      jax.clear_caches()
      gc.collect()

  # No statistics (CPU): a nominal 1 GiB, to check the search itself runs.
  limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit") or 2**30
  per_layer = args.width**2
  # Guess: device bytes per parameter (params + grads + device-resident state).
  guess_bpp = {"adamw": 18, "adamw_8bit": 12, "paged_adamw": 10, "paged_adamw_8bit": 10}
  base = args.optimizer.split("@")[0]
  n = max(1, int(0.9 * limit / (guess_bpp.get(base, 18) * per_layer)))
  tried, error = {}, None

  def report():
    best = max((k for k, v in tried.items() if v), default=0)
    print(json.dumps({"optimizer": args.optimizer, "bytes_limit": limit, "largest_layers": best,
                      "largest_params": best * per_layer, "tried": tried, "error": error}), flush=True)

  def run(n):
    nonlocal error
    ok, err = attempt(n)
    tried[n] = ok
    if err and err != "out of memory":
      error = err
    report()  # progress: the last line is the answer so far
    return ok

  # Gallop from the guess until a size fails (or trains), then bisect.
  lo, hi, step = 0, None, max(1, n // 8)
  if run(n):
    lo = n
    while error is None and hi is None and len(tried) < 12:
      n, step = n + step, step * 2
      lo, hi = (n, hi) if run(n) else (lo, n)
  else:
    hi = n
    while error is None and lo == 0 and len(tried) < 12 and n > 1:
      n, step = max(1, n - step), step * 2
      lo, hi = (n, hi) if run(n) else (lo, n)
  while error is None and hi is not None and hi - lo > 1 and len(tried) < 14:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if run(mid) else (lo, mid)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--params", type=float, default=1e9)
  p.add_argument("--width", type=int, default=8192)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--search", action="store_true", help="find the largest model per optimizer")
  p.add_argument("--no-table", action="store_true", help="only the --search part")
  p.add_argument("--optimizers", default=",".join(OPTIMIZERS))
  p.add_argument("--timeout", type=int, default=900)
  p.add_argument("--json", default=None, help="also write the results here")
  p.add_argument("--search-width", type=int, default=4096, help="layer width of the --search models")
  p.add_argument("--search-fraction", type=float, default=0.05,
                 help="share of the device's memory the --search runs may use")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--search-worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--optimizer", default="adamw", help=argparse.SUPPRESS)
  p.add_argument("--layers", type=int, default=0, help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if a.worker:
    return search_worker(a) if a.search_worker else worker(a)

  # This process measures bandwidth only; the workers (fresh processes) get
  # the device's memory. Without this, JAX here would preallocate 75% of it.
  os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  import jax
  platform = jax.devices()[0].platform
  names = [n for n in a.optimizers.split(",") if n]
  if platform == "cpu":
    a.width, a.layers, a.steps, a.batch = 1024, 8, 2, 8
    print("No accelerator: running the placement part only on a small model "
          f"({a.layers} x {a.width}^2 parameters). Measured no device memory.")
    for name in names:
      r = _spawn(name, a.layers, a)
      print(f"{name:<28} state bytes by memory kind: {r.get('state_bytes')}  ok={r['ok']}")
    return 0

  a.layers = a.layers or max(1, round(a.params / a.width**2))
  print(f"{jax.devices()[0].device_kind}: {a.layers} layers x {a.width}^2 = "
        f"{a.layers * a.width**2 / 1e9:.2f}B parameters, batch {a.batch}, {a.steps} steps")
  bw = bandwidth()
  print(f"host->device {bw['h2d'] / 1e9:.1f} GB/s, device->host {bw['d2h'] / 1e9:.1f} GB/s")
  results = []

  def save():  # after every worker, so that a run cut off keeps what it measured
    if a.json:
      with open(a.json, "w") as f:
        json.dump({"bandwidth": bw, "results": results}, f, indent=1)

  for name in [] if a.no_table else names:
    results.append(_spawn(name, a.layers, a))
    print(f"  {name}: done", flush=True)
    save()
  base = next((r["step_s"] for r in results if r["optimizer"] == "adamw" and r["ok"]), None)
  print(f"{'optimizer':<34} {'peak GiB':>9} {'init peak':>9} {'step temp':>9} {'step ms':>9} "
        f"{'x adamw':>8} {'host GiB':>9} {'device state GiB':>17} {'transfer bound ms':>18}")
  for r in results:
    if not r["ok"]:
      print(f"{r['optimizer']:<34} failed: {r.get('error')}")
      continue
    host = r["state_bytes"].get("pinned_host", 0)
    dev_state = r["state_bytes"].get("device", 0)
    bound = host / bw["h2d"] + host / bw["d2h"]
    ratio = r["step_s"] / base if base else float("nan")
    gib = lambda b: "n/a" if b is None else f"{b / 2**30:.2f}"
    temp = r.get("compiled", {}).get("temp_size_in_bytes")
    print(f"{r['optimizer']:<34} {gib(r['peak_bytes']):>9} {gib(r.get('init_peak_bytes')):>9} "
          f"{gib(temp):>9} {r['step_s'] * 1e3:>9.1f} "
          f"{ratio:>8.2f} {host / 2**30:>9.2f} {dev_state / 2**30:>17.2f} {bound * 1e3:>18.1f}")
  if a.search:
    print(f"\nLargest model that trains (2 steps), device memory capped at "
          f"{a.search_fraction:.0%} of the GPU (XLA_PYTHON_CLIENT_MEM_FRACTION):")
    for name in names:
      r = _spawn(name, 0, a, extra=("--search-worker", "--width", str(a.search_width)))
      if "largest_layers" not in r:
        print(f"{name:<28} search failed: {r.get('error')}")
        continue
      note = f"  (stopped: {r['error']})" if r.get("error") else ""
      print(f"{name:<28} {r['largest_layers']:>4} layers = {r['largest_params'] / 1e9:.2f}B parameters "
            f"under {r['bytes_limit'] / 2**30:.1f} GiB; tried {r['tried']}{note}")
      results.append(r)
      save()
  return 0


if __name__ == "__main__":
  sys.exit(main())
