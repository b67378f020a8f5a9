"""Run in a subprocess with 8 CPU devices (see test_sharding.py).

Prints one JSON line with what the parent test asserts, for a mesh with
explicit axes (``jax.make_mesh``'s default) and one with automatic axes.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import optax_paged as op  # noqa: E402

SPECS = {
    "col": P(None, "model"),  # last axis sharded: 2048 / 4 = 512 per shard
    "row": P("data", None),
    "both": P("data", "model"),
    "rep": P(),
}
SHAPES = {"col": (64, 2048), "row": (128, 1024), "both": (64, 4096), "rep": (32, 512)}


def check(axis_type):
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
  params = {
      k: jax.device_put(
          jax.random.normal(jax.random.PRNGKey(i), SHAPES[k]), NamedSharding(mesh, SPECS[k])
      )
      for i, k in enumerate(SHAPES)
  }
  tx = op.adamw_8bit(1e-3, min_8bit_size=1024)
  state = tx.init(params)

  def same_as_params(tree):
    return {
        k: bool(v.sharding.is_equivalent_to(params[k].sharding, v.ndim)) for k, v in tree.items()
    }

  report = {"init": {f: same_as_params(getattr(state[0], f)) for f in ("mu", "nu", "mu_absmax", "nu_absmax")}}

  def step(params, state, grads):
    u, state = tx.update(grads, state, params)
    return optax.apply_updates(params, u), state

  grads = jax.tree.map(lambda p: p * 0.01, params)
  jitted = jax.jit(step)
  hlo = jitted.lower(params, state, grads).compile().as_text()
  for _ in range(3):
    params, state = jitted(params, state, grads)
  s = state[0]
  report["step"] = {f: same_as_params(getattr(s, f)) for f in ("mu", "nu", "mu_absmax", "nu_absmax")}
  report["collectives"] = {
      name: hlo.count(name + "(") + hlo.count(name + "-start(")
      for name in ("all-gather", "all-to-all")
  }
  # The sharded run equals a single-device run of the same steps.
  host = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), (params, state, grads))
  ref = jax.jit(step)(*host)
  got = jitted(params, state, grads)
  report["max_diff_to_single_device"] = max(
      float(jnp.max(jnp.abs(jnp.asarray(np.asarray(a), jnp.float32) - jnp.asarray(np.asarray(b), jnp.float32))))
      for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got))
  )
  return report


def check_paged(axis_type):
  """Paged 8-bit state on the mesh: memory kinds and partition specs."""
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
  params = {
      k: jax.device_put(
          jax.random.normal(jax.random.PRNGKey(i), SHAPES[k]), NamedSharding(mesh, SPECS[k])
      )
      for i, k in enumerate(SHAPES)
  }
  policy = op.OffloadPolicy(min_size=1000)
  tx = op.paged_adamw_8bit(1e-3, min_8bit_size=1024, policy=policy)
  state = tx.init(params)
  expected = ["pinned_host" if h else "device" for h in op.offload.placement(state, policy)]

  def layout(state):
    s = state[0]
    specs_ok = all(
        bool(getattr(s, f)[k].sharding.is_equivalent_to(params[k].sharding.with_memory_kind(
            getattr(s, f)[k].sharding.memory_kind), params[k].ndim))
        for f in ("mu", "nu", "mu_absmax", "nu_absmax") for k in params
    )
    kinds_ok = [x.sharding.memory_kind for x in jax.tree.leaves(state)] == expected
    return {"specs": specs_ok, "kinds": kinds_ok}

  report = {"init": layout(state), "offloaded": sum(h == "pinned_host" for h in expected)}

  def make_step(tx):
    @jax.jit
    def step(params, state, grads):
      u, state = tx.update(grads, state, params)
      return optax.apply_updates(params, u), state
    return step

  grads = jax.tree.map(lambda p: p * 0.01, params)
  ref_tx = op.adamw_8bit(1e-3, min_8bit_size=1024)
  ref_params, ref_state = params, ref_tx.init(params)
  step, ref_step = make_step(tx), make_step(ref_tx)
  for _ in range(3):
    params, state = step(params, state, grads)
    ref_params, ref_state = ref_step(ref_params, ref_state, grads)
  report["step"] = layout(state)
  report["equal_to_unpaged"] = all(
      bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params))
  )
  return report


def check_shard_map():
  """``tx.update`` inside ``shard_map`` against the same update outside it.

  The leaf is 8-bit (16384 elements) but each of its 8 row shards holds 2048,
  below ``min_8bit_size``: the update must still treat it as 8-bit. A leaf
  whose blocks run over the flattened array (last axis 128 < 256) must be
  refused inside ``shard_map``, since its blocks could straddle shards.
  """
  mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Auto,))
  tx = op.adamw_8bit(1e-3)
  report = {}
  for name, shape in (("whole_blocks", (16, 1024)), ("flat_blocks", (64, 128))):
    params = jax.random.normal(jax.random.PRNGKey(0), shape)
    grads = jax.random.normal(jax.random.PRNGKey(1), shape)
    state = tx.init(params)
    state_spec = jax.tree.map(lambda x: P("d") if x.ndim else P(), state)
    inside = jax.jit(jax.shard_map(
        tx.update, mesh=mesh, in_specs=(P("d"), state_spec, P("d")),
        out_specs=(P("d"), state_spec)))
    try:
      u, s = inside(grads, state, params)
    except ValueError as e:
      report[name] = {"error": str(e)}
      continue
    u0, s0 = jax.jit(tx.update)(grads, state, params)
    codes = [(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(s0))
             if a.dtype == np.uint8]
    report[name] = {
        "codes_dtype_kept": bool(codes) and len(codes) == 2,
        "rel_diff": float(jnp.max(jnp.abs(u - u0)) / jnp.max(jnp.abs(u0))),
        "codes_differing": float(np.mean([np.mean(a != b) for a, b in codes])) if codes else 1.0,
    }
  # Replicated leaves are whole arrays in every program: flattened blocks are
  # fine there (data parallelism with shard_map's P() or with pmap).
  params = jax.random.normal(jax.random.PRNGKey(0), (64, 128))
  grads = jax.random.normal(jax.random.PRNGKey(1), (64, 128))
  state = tx.init(params)
  u0, s0 = jax.jit(tx.update)(grads, state, params)
  rep = jax.jit(jax.shard_map(tx.update, mesh=mesh, in_specs=(P(), P(), P()), out_specs=(P(), P())))
  u1, s1 = rep(grads, state, params)
  stack = lambda t: jax.tree.map(lambda x: jnp.stack([x] * 8), t)  # noqa: E731
  u2, s2 = jax.pmap(tx.update)(stack(grads), stack(state), stack(params))
  report["replicated_flat_blocks"] = {
      "shard_map_equal": all(np.array_equal(a, b) for a, b in zip(
          jax.tree.leaves((u0, s0)), jax.tree.leaves((u1, s1)))),
      "pmap_equal": all(np.array_equal(np.asarray(a), np.asarray(b)[3]) for a, b in zip(
          jax.tree.leaves((u0, s0)), jax.tree.leaves((u2, s2)))),
  }
  return report


def check_layouts():
  """Leaves whose blocks do not fit their shards (a 768-wide last axis in 8
  shards of 96; a 100-wide one, blocks over the flattened array).

  Explicit axes: refused at init with an error naming the leaf. Automatic
  axes: the state starts replicated (XLA would return it so after the first
  step), the update equals the unsharded one, and paging works.
  """
  report = {}
  for name, shape, spec in (("col768", (1024, 768), P(None, "x")), ("flat", (512, 100), P("x", None))):
    explicit = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,))
    p = jax.device_put(jnp.ones(shape), NamedSharding(explicit, spec))
    try:
      op.adamw_8bit(1e-3).init({"w": p})
      report[f"explicit_{name}"] = "no error"
    except ValueError as e:
      report[f"explicit_{name}"] = str(e)
    auto = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
    params = {"w": jax.device_put(jax.random.normal(jax.random.PRNGKey(0), shape), NamedSharding(auto, spec))}
    grads = {"w": jax.device_put(jax.random.normal(jax.random.PRNGKey(1), shape), NamedSharding(auto, spec))}
    out = {}
    for opt in ("adamw_8bit", "paged_adamw_8bit"):
      tx = op.create(opt, 1e-3)
      state = tx.init(params)
      specs = [x.sharding.spec for x in jax.tree.leaves(state) if x.ndim]
      u, s = jax.jit(tx.update)(grads, state, params)
      ref_tx = op.adamw_8bit(1e-3)
      u0, _ = jax.jit(ref_tx.update)(jax.device_get(grads), ref_tx.init(jax.device_get(params)),
                                     jax.device_get(params))
      out[opt] = {
          "init_replicated": all(sp == P() for sp in specs),
          "equal_unsharded": bool(np.allclose(np.asarray(u["w"]), np.asarray(u0["w"]), rtol=1e-6,
                                              atol=1e-6 * float(np.abs(u0["w"]).max()))),
      }
    report[f"auto_{name}"] = out
  return report


def check_jitted_init():
  """jit(tx.init) on explicit axes: block scales sharded like the parameter,
  as with eager init (they came out replicated, and the step compiled twice)."""
  mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,))
  p = jax.device_put(jnp.ones((64, 2048)), NamedSharding(mesh, P(None, "x")))
  tx = op.adamw_8bit(1e-3)
  with jax.set_mesh(mesh):
    jitted = jax.jit(tx.init)(p)
  eager = tx.init(p)
  return [str(x.sharding.spec) for x in jax.tree.leaves(jitted) if x.ndim] == [
      str(x.sharding.spec) for x in jax.tree.leaves(eager) if x.ndim]


def check_streaming():
  """page_bytes with a sharded parameter (explicit axes): paged whole, with a
  warning, equal to whole-leaf paging (slicing pages out of it failed)."""
  import warnings
  mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,))
  p = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (512, 2048)), NamedSharding(mesh, P(None, "x")))
  out = []
  for page_bytes in (200_000, None):
    tx = op.paged_adamw_8bit(1e-3, policy=op.OffloadPolicy(min_size=1000, page_bytes=page_bytes))
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      u, s = jax.jit(lambda p, s, g: tx.update(g, s, p))(p, tx.init(p), p)
    out.append((u, s, [str(w.message) for w in caught]))
  return {
      "equal": all(np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(jax.tree.leaves(out[0][:2]), jax.tree.leaves(out[1][:2]))),
      "warned": any("paged whole" in m for m in out[0][2]),
  }


def check_pallas():
  """backend="pallas" (interpret mode here) with several devices: inside
  shard_map(check_vma=False) and on replicated leaves it equals XLA; a sharded
  leaf under check_vma=True, or one typed with explicit mesh axes, is refused
  with an error that says what works."""
  mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
  params = jax.random.normal(jax.random.PRNGKey(0), (16, 2048))
  grads = jax.random.normal(jax.random.PRNGKey(1), (16, 2048))
  report = {}
  xla = op.adamw_8bit(1e-3, backend="xla")
  ref = xla.update(grads, xla.init(params), params)
  tx = op.adamw_8bit(1e-3, backend="pallas")
  state = tx.init(params)
  sharded = jax.tree.map(lambda x: P("x") if x.ndim else P(), state)
  for name, specs, vma in (("sharded_vma", (P("x"), sharded, P("x")), True),
                           ("sharded_no_vma", (P("x"), sharded, P("x")), False),
                           ("replicated_vma", (P(), P(), P()), True)):
    try:
      out = jax.jit(jax.shard_map(tx.update, mesh=mesh, in_specs=specs, out_specs=specs[:2],
                                  check_vma=vma))(grads, state, params)
      report[name] = {"equal_xla": all(np.allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
                                       for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)))}
    except ValueError as e:
      report[name] = {"error": str(e)}
  explicit = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,))
  p = jax.device_put(params, NamedSharding(explicit, P("x", None)))
  try:
    jax.jit(tx.update)(p, tx.init(p), p)
    report["explicit"] = {"error": "no error"}
  except ValueError as e:
    report["explicit"] = {"error": str(e)}
  return report


def main():
  assert len(jax.devices()) == 8, jax.devices()
  print(json.dumps({
      "explicit": check(AxisType.Explicit),
      "auto": check(AxisType.Auto),
      "paged_explicit": check_paged(AxisType.Explicit),
      "paged_auto": check_paged(AxisType.Auto),
      "shard_map": check_shard_map(),
      "layouts": check_layouts(),
      "pallas": check_pallas(),
      "streaming": check_streaming(),
      "jitted_init": check_jitted_init(),
  }))


if __name__ == "__main__":
  sys.exit(main())
