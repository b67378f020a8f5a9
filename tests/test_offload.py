"""Paged optimizer state on JAX memory kinds (CPU exposes device/pinned_host)."""

import re
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_paged as op
from optax_paged import offload

SMALL = op.OffloadPolicy(min_size=1000)


def _params():
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  return {
      "w": jax.random.normal(k[0], (512, 1024)),
      "odd": jax.random.normal(k[1], (300, 333)),
      "b": jnp.zeros(64),
  }


def _grads(params, i):
  return jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(100 + i), x.shape) * 0.1, params)


def _kinds(state):
  return [x.sharding.memory_kind for x in jax.tree.leaves(state)]


def _expected_kinds(state, policy):
  return ["pinned_host" if h else "device" for h in offload.placement(state, policy)]


PAGED = {
    "paged_adam": lambda policy: op.paged_adam(1e-3, policy=policy),
    "paged_adamw": lambda policy: op.paged_adamw(1e-3, policy=policy),
    "paged_adam_8bit": lambda policy: op.paged_adam_8bit(1e-3, policy=policy),
    "paged_adamw_8bit": lambda policy: op.paged_adamw_8bit(1e-3, policy=policy),
}


@pytest.mark.parametrize("name", sorted(PAGED))
def test_offloaded_leaves_live_on_pinned_host_after_init_and_every_update(name):
  params = _params()
  tx = PAGED[name](SMALL)
  state = tx.init(params)
  expected = _expected_kinds(state, SMALL)
  assert "pinned_host" in expected and "device" in expected  # count stays
  assert _kinds(state) == expected
  step = jax.jit(tx.update)
  for i in range(3):
    updates, state = step(_grads(params, i), state, params)
    assert _kinds(state) == expected
    assert all(k == "device" for k in _kinds(updates))


def _run(tx, steps=20, params=None):
  params = params or _params()
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for i in range(steps):
    params, state = step(params, state, _grads(params, i))
  return params, state


TWINS = {
    "optax.adamw": lambda: optax.adamw(1e-3),
    "adamw_8bit": lambda: op.adamw_8bit(1e-3),
    "chain with clipping": lambda: optax.chain(optax.clip_by_global_norm(1.0), op.adamw_8bit(1e-3)),
}


@pytest.mark.parametrize("name", sorted(TWINS))
def test_paged_is_bit_identical_to_unpaged(name):
  plain, _ = _run(TWINS[name]())
  paged_params, paged_state = _run(op.paged(TWINS[name](), SMALL))
  chex.assert_trees_all_equal(plain, paged_params)
  assert "pinned_host" in _kinds(paged_state)


def _device(x):
  return jax.device_put(x, jax.memory.Space.Device)


@pytest.mark.parametrize("name", ["paged_adamw", "paged_adamw_8bit", "paged_adam_8bit"])
def test_streaming_small_pages_is_bit_identical_to_whole_leaf_paging(name):
  """Same inputs each step: the streamed update and state equal whole-leaf paging.

  (512, 1024) streams in pages of 8 rows; the (300, 333) leaf's rows cross
  8-bit blocks, so it is paged whole (with a warning).
  """
  params = _params()
  streamed = PAGED[name](op.OffloadPolicy(min_size=1000, page_bytes=64 * 1024))
  whole = PAGED[name](SMALL)
  s_a, s_b = streamed.init(params), whole.init(params)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    step_a = jax.jit(streamed.update)
    step_b = jax.jit(whole.update)
    for i in range(10):
      g = _grads(params, i)
      u_a, s_a = step_a(g, s_a, params)
      u_b, s_b = step_b(g, s_b, params)
      # Whole-leaf paging also updates one parameter at a time, so even
      # optax's float32 rules round the same way in both.
      for x, y in zip(jax.tree.leaves((u_a, s_a)), jax.tree.leaves((u_b, s_b))):
        np.testing.assert_array_equal(np.asarray(_device(x)), np.asarray(_device(y)))
      params = optax.apply_updates(params, u_b)
  assert _kinds(s_a) == _kinds(s_b)


def test_streaming_really_pages():
  params = {"w": jnp.ones((512, 1024))}
  tx = op.paged_adamw_8bit(1e-3, policy=op.OffloadPolicy(min_size=1000, page_bytes=64 * 1024))
  state = tx.init(params)
  hlo = jax.jit(tx.update).lower(params, state, params).as_text()
  assert "while" in hlo  # one loop over the pages
  u_leaves, u_def = jax.tree.flatten(params)
  s_flat = jax.tree_util.tree_flatten_with_path(state)[0]
  full = {jax.tree_util.keystr(p): x for p, x in s_flat}
  where = dict(zip(full, offload.placement(state, tx_policy := op.OffloadPolicy(min_size=1000, page_bytes=64 * 1024))))
  templates = offload._Templates(optax.with_extra_args_support(op.adamw_8bit(1e-3)), u_leaves, u_def)
  plans = offload._plan_pages(templates, full, where, tx_policy.page_bytes,
                              offload._owned_state(templates, full))
  assert len(plans) == 1 and plans[0].rows * 1024 * 2 <= 64 * 1024 * 2
  assert plans[0].num_full * plans[0].rows + plans[0].last_rows == 512


def _four_leaves():
  k = jax.random.split(jax.random.PRNGKey(1), 4)
  return {f"l{i}": jax.random.normal(k[i], (64 * (i + 1), 512)) for i in range(4)}


ORDERED = {
    "paged_adamw": (op.paged_adamw, lambda: optax.adamw(1e-3)),
    "paged_adam_8bit": (op.paged_adam_8bit, lambda: op.adam_8bit(1e-3)),
    "paged_adamw_8bit": (op.paged_adamw_8bit, lambda: op.adamw_8bit(1e-3)),
}


@pytest.mark.parametrize("name", sorted(ORDERED))
@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_ordered_paging_equals_unpaged(name, prefetch):
  """One parameter at a time, transfers ordered: the same training as unpaged."""
  make, twin = ORDERED[name]
  policy = op.OffloadPolicy(min_size=1000, prefetch=prefetch)
  plain, _ = _run(twin(), steps=10, params=_four_leaves())
  paged, state = _run(make(1e-3, policy=policy), steps=10, params=_four_leaves())
  assert _kinds(state) == _expected_kinds(state, policy)
  if name.endswith("8bit"):
    chex.assert_trees_all_equal(plain, paged)
  else:
    # optax.adamw's own code: XLA rewrites a scalar division shared by many
    # leaves differently from one used by a single leaf, so a leaf updated
    # on its own rounds apart by a few ulps (paged(tx) without
    # elementwise=True keeps one update and is bit-identical).
    chex.assert_trees_all_close(plain, paged, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", [n for n in op.registry.names()
                                  if n.startswith("paged_") and n not in PAGED and n not in ORDERED])
def test_every_paged_name_offloads_and_trains_like_its_unpaged_form(name):
  """Each paged_<name> really pages (state on pinned_host) and equals <name>
  (the ones in PAGED and ORDERED are checked more closely above)."""
  kwargs = {"momentum": 0.9} if "sgd" in name else {}
  paged = op.create(name, 1e-3, policy=SMALL, **kwargs)
  plain = op.create(name[len("paged_"):], 1e-3, **kwargs)
  assert "pinned_host" in _kinds(paged.init(_params()))
  state = _steps_side_by_side(paged, plain, _params(), rtol=1e-5, atol=1e-9)
  assert _kinds(state) == _expected_kinds(state, SMALL)


def _steps_side_by_side(paged, plain, params, steps=3, **tolerance):
  """Jitted steps of both on the same gradients; each step's updates must agree.

  Returns the paged state after the last step.
  """
  s_a, s_b = paged.init(params), plain.init(params)
  step_a, step_b = jax.jit(paged.update), jax.jit(plain.update)
  for i in range(steps):
    g = _grads(params, i)
    u_a, s_a = step_a(g, s_a, params)
    u_b, s_b = step_b(g, s_b, params)
    chex.assert_trees_all_close(u_a, u_b, **tolerance)
    params = optax.apply_updates(params, u_b)
  return s_a


@pytest.mark.parametrize("name, policy", [
    ("paged_adamw", op.OffloadPolicy(min_size=1000)),  # default prefetch: one parameter at a time
    ("paged_adamw_8bit", op.OffloadPolicy(min_size=1000)),
    ("paged_adamw_8bit", op.OffloadPolicy(min_size=1000, page_bytes=64 * 1024)),  # streamed
])
def test_params_that_are_one_bare_array(name, policy):
  """A bare array as the whole parameter tree: its pruned tree is None, which
  optax.add_decayed_weights took for "no params" (a ValueError at update)."""
  w = jax.random.normal(jax.random.PRNGKey(0), (512, 1024))
  plain = {"paged_adamw": optax.adamw, "paged_adamw_8bit": op.adamw_8bit}[name](1e-3)
  state = _steps_side_by_side(PAGED[name](policy), plain, w, rtol=1e-6, atol=1e-10)
  assert "pinned_host" in _kinds(state)


@pytest.mark.parametrize("prefetch, chained", [(None, 0), (0, 3), (1, 2), (3, 0)])
def test_prefetch_orders_the_transfers(prefetch, chained):
  """Each parameter's state waits for the new state of the parameter
  ``prefetch + 1`` places before it."""
  params = _four_leaves()
  tx = op.paged_adamw_8bit(1e-3, policy=op.OffloadPolicy(min_size=1000, prefetch=prefetch))
  state = tx.init(params)
  text = jax.jit(tx.update).lower(params, state, params).as_text()
  # "%3:8 = stablehlo.optimization_barrier ...": the 4 state leaves of a
  # parameter and the 4 new state leaves it waits for.
  sizes = re.findall(r"%\d+:(\d+) = stablehlo.optimization_barrier", text)
  assert sizes == ["8"] * chained


@pytest.mark.parametrize("name", sorted(ORDERED))
def test_init_one_parameter_at_a_time_equals_unpaged_init(name):
  make, twin = ORDERED[name]
  params = _four_leaves()
  state = make(1e-3, policy=SMALL).init(params)
  chex.assert_trees_all_equal(jax.tree.map(_device, state), twin().init(params))
  assert _kinds(state) == _expected_kinds(state, SMALL)


def test_page_bytes_needs_elementwise():
  with pytest.raises(ValueError, match="elementwise=True"):
    op.paged(optax.adamw(1e-3), op.OffloadPolicy(page_bytes=1 << 20))


@pytest.mark.parametrize(
    "kwargs",
    [dict(min_size=-1), dict(device_budget_bytes=-5), dict(device_budget_bytes="lots"),
     dict(page_bytes=0), dict(enabled="yes"), dict(min_size=1.5), dict(prefetch=-1),
     dict(prefetch=0.5)],
)
def test_bad_policy_values(kwargs):
  with pytest.raises(ValueError):
    op.OffloadPolicy(**kwargs)


def test_budget_policy_places_leaves_first_fit_in_tree_order():
  state = {
      "a": jax.ShapeDtypeStruct((100_000,), jnp.float32),  # 400 kB, eligible
      "b": jax.ShapeDtypeStruct((10,), jnp.float32),  # small: always device
      "c": jax.ShapeDtypeStruct((200_000,), jnp.float32),  # 800 kB
      "d": jax.ShapeDtypeStruct((50_000,), jnp.float32),  # 200 kB, below min_size
      "e": jax.ShapeDtypeStruct((150_000,), jnp.float32),  # 600 kB
  }
  policy = op.OffloadPolicy(min_size=100_000)
  assert offload.placement(state, policy) == [True, False, True, False, True]
  # Small leaves count first (40 B + 200 kB); then first fit of a, c, e in 1.3 MB.
  budget = 1_300_000
  assert offload.placement(state, op.OffloadPolicy(min_size=100_000, device_budget_bytes=budget), budget) == [
      False, False, True, False, False]
  assert offload.placement(state, policy, 0) == [True, False, True, False, True]
  assert offload.placement(state, policy, 10**9) == [False] * 5


def test_auto_budget_reads_memory_stats_once():
  calls = []

  def stats():
    calls.append(1)
    return {"bytes_limit": 10_000_000, "bytes_in_use": 6_000_000}

  params = {"w": jnp.zeros((1000, 1000)), "v": jnp.zeros((1000, 2000))}
  policy = op.OffloadPolicy(min_size=1000, device_budget_bytes="auto")
  tx = op.paged(optax.adam(1e-3), policy, memory_stats=stats)
  assert calls == [1]
  # Budget 10M - 6M - 1M = 3M bytes: mu['v'] (8 MB) does not fit, mu['w'] (4 MB)
  # neither; nothing eligible fits, so every large leaf is offloaded.
  state = tx.init(params)
  assert _kinds(state[0].mu) == ["pinned_host", "pinned_host"]
  stats_big = lambda: {"bytes_limit": 100_000_000, "bytes_in_use": 0}
  state = op.paged(optax.adam(1e-3), policy, memory_stats=stats_big).init(params)
  # 90 MB budget: everything fits on the device.
  assert set(_kinds(state)) == {"device"}
  # No statistics (CPU): offload every eligible leaf.
  state = op.paged(optax.adam(1e-3), policy, memory_stats=lambda: None).init(params)
  assert _kinds(state[0].nu) == ["pinned_host", "pinned_host"]
  assert offload._auto_budget(stats) == 3_000_000


def test_disabled_policy_and_missing_host_memory(monkeypatch):
  tx = optax.adam(1e-3)
  assert op.paged(tx, op.OffloadPolicy(enabled=False)) is tx
  monkeypatch.setattr(offload, "host_offload_supported", lambda device=None: False)
  offload._warned.discard("no-host")
  with pytest.warns(UserWarning, match="no pinned_host memory"):
    assert op.paged(tx) is tx
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    op.paged(tx)  # warns once only


def test_memory_report_totals_by_kind():
  params = _params()
  tx = op.paged_adamw_8bit(1e-3, policy=SMALL)
  state = tx.init(params)
  report = op.memory_report(state, params)
  leaves = [x for x in jax.tree.leaves(state)]
  assert report.total == sum(x.nbytes for x in leaves)
  for kind in ("device", "pinned_host"):
    assert report.by_kind[kind] == sum(x.nbytes for x in leaves if x.sharding.memory_kind == kind)
  assert report.num_params == sum(x.size for x in jax.tree.leaves(params))
  assert report.bytes_per_param == pytest.approx(report.total / report.num_params)
  text = str(report)
  assert "pinned_host" in text and "per param" in text and "['w']" in text


def test_nnx_optimizer_steps_and_compiles_once():
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Linear(256, 512, rngs=rngs)
      self.b = nnx.Linear(512, 4, rngs=rngs)

    def __call__(self, x):
      return self.b(nnx.relu(self.a(x)))

  model = Model(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, op.paged_adamw_8bit(1e-2, policy=SMALL), wrt=nnx.Param)
  traces = []

  @nnx.jit
  def step(model, optimizer, x, y):
    traces.append(1)
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  x = jax.random.normal(jax.random.PRNGKey(1), (32, 256))
  y = jax.random.normal(jax.random.PRNGKey(2), (32, 4))
  losses = [float(step(model, optimizer, x, y)) for _ in range(5)]
  assert len(traces) == 1
  assert losses[-1] < losses[0]
  kinds = {v.sharding.memory_kind for v in jax.tree.leaves(nnx.state(optimizer, nnx.optimizer.OptState))}
  assert kinds == {"device", "pinned_host"}


@pytest.mark.parametrize("policy", [SMALL, op.OffloadPolicy(min_size=0)], ids=["small", "min_size=0"])
def test_multisteps(policy):
  """min_size=0 once offloaded the step count too, and MultiSteps' select
  between old and new state then failed (its where gave a device scalar)."""
  params = _params()
  tx = optax.MultiSteps(op.paged_adamw_8bit(1e-3, policy=policy), every_k_schedule=2)
  ref = optax.MultiSteps(op.adamw_8bit(1e-3), every_k_schedule=2)
  s, r = tx.init(params), ref.init(params)
  step, ref_step = jax.jit(tx.update), jax.jit(ref.update)
  for i in range(4):
    g = _grads(params, i)
    u, s = step(g, s, params)
    v, r = ref_step(g, r, params)
    chex.assert_trees_all_equal(u, v)
  assert "pinned_host" in _kinds(s)
  assert all(x.sharding.memory_kind == "device" for x in jax.tree.leaves(s) if x.ndim == 0)


@pytest.mark.parametrize("name", ["paged_adamw", "paged_adamw_8bit"])
def test_jitted_step_compiles_once_with_committed_params(name):
  """Host arrays are committed, and a step whose inputs go from partly to
  wholly committed compiles again; so paged init commits its device leaves."""
  params = jax.device_put(_params(), jax.devices()[0])
  grads = [jax.device_put(_grads(params, i), jax.devices()[0]) for i in range(3)]
  tx = op.create(name, 1e-3, policy=SMALL)

  @jax.jit
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  p, s = params, tx.init(params)
  assert "pinned_host" in _kinds(s) and all(x.committed for x in jax.tree.leaves(s))
  compiles, listening = [], [True]
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, *_, **__: compiles.append(event)
      if listening and event == "/jax/core/compile/backend_compile_duration" else None)
  try:
    for g in grads:
      p, s = step(p, s, g)
    jax.block_until_ready(s)
  finally:
    listening.clear()
  assert len(compiles) == 1


def test_orbax_round_trip_restores_bits_and_memory_kinds(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint", reason="orbax-checkpoint comes with flax")
  params = _params()
  tx = op.paged_adamw_8bit(1e-3, policy=SMALL)
  _, state = _run(tx, steps=3, params=params)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "state", state)
  ckpt.wait_until_finished()
  # The portable recipe: restore into device memory, then place by policy.
  on_device = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding.with_memory_kind("device")), state)
  restored = op.place(ckpt.restore(tmp_path / "state", on_device), SMALL)
  assert _kinds(restored) == _kinds(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  # Where the backend allows it (CPU does), restoring straight onto the
  # target memory kinds works too.
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  direct = ckpt.restore(tmp_path / "state", target)
  assert _kinds(direct) == _kinds(state)


def test_auto_backend_is_xla_inside_paged(monkeypatch):
  """With the fused kernel XLA (GPU) keeps every leaf's direction until the
  end of a paged step; inside paged() "auto" picks the XLA path."""
  from optax_paged import backend as backend_lib
  monkeypatch.setattr(backend_lib.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(backend_lib.jax, "device_count", lambda: 1)
  assert backend_lib.kernel_for("auto") == "pallas"
  with backend_lib.auto_uses_xla():
    assert backend_lib.kernel_for("auto") == "xla"
    assert backend_lib.kernel_for("pallas") == "pallas"
  assert backend_lib.kernel_for("auto") == "pallas"
  seen = []
  real = backend_lib.kernel_for
  monkeypatch.setattr(backend_lib, "kernel_for", lambda b: seen.append(real(b)) or "xla")
  params = _four_leaves()
  tx = op.paged_adamw_8bit(1e-3, policy=SMALL)
  jax.jit(tx.update).lower(params, tx.init(params), params)
  assert seen and set(seen) == {"xla"}


def test_place_with_tx_keeps_wrapped_state_where_tx_keeps_it():
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (256, 512))}
  tx = optax.MultiSteps(op.paged_adamw_8bit(1e-3, policy=SMALL), every_k_schedule=2)
  state = tx.init(params)
  on_device = jax.device_put(state, jax.memory.Space.Device)
  placed = op.place(on_device, tx=tx, params=params)
  assert _kinds(placed) == _kinds(state)
  assert "pinned_host" in _kinds(placed)
  step = jax.jit(tx.update)
  _, after = step(_grads(params, 0), placed, params)  # the policy alone would page acc_grads
  assert _kinds(after) == _kinds(state)
  with pytest.raises(ValueError, match="needs params="):
    op.place(on_device, tx=tx)
  with pytest.raises(TypeError, match="policy must be an OffloadPolicy, got dict"):
    op.place(on_device, {"min_size": 0})


def test_callable_masks_of_paged_aliases_see_the_parameters():
  w = jax.random.normal(jax.random.PRNGKey(0), (512, 1024))
  # A shape-dependent mask: on row pages it would drop the weight decay.
  mask = lambda p: jax.tree.map(lambda x: x.ndim > 1 and x.shape[0] >= 512, p)  # noqa: E731
  for params in (w, {"w": w, "b": jnp.ones(64)}):
    paged = op.paged_adamw_8bit(1e-3, weight_decay=0.5, mask=mask, policy=SMALL)
    plain = op.adamw_8bit(1e-3, weight_decay=0.5, mask=mask)
    g = jax.tree.map(lambda x: x * 0.1, params)
    u, _ = jax.jit(paged.update)(g, paged.init(params), params)
    v, _ = jax.jit(plain.update)(g, plain.init(params), params)
    chex.assert_trees_all_equal(u, v)
  with pytest.raises(ValueError, match="callable mask"):
    op.paged_adamw_8bit(1e-3, mask=mask, policy=op.OffloadPolicy(min_size=1000, page_bytes=65536))
  # Nothing streams: no refusal.
  op.paged_adamw_8bit(1e-3, mask=mask, policy=op.OffloadPolicy(page_bytes=65536, enabled=False))
  op.paged_lamb_8bit(1e-3, mask=mask)


def test_auto_budget_is_read_once_per_policy():
  reads = []

  def stats():
    reads.append(1)
    return {"bytes_limit": 2**30, "bytes_in_use": 2**29 * len(reads)}

  policy = op.OffloadPolicy(min_size=0, device_budget_bytes="auto")
  first = offload._resolve_budget(policy, stats)
  assert offload._resolve_budget(policy, stats) == first and len(reads) == 1
  assert offload._resolve_budget(op.OffloadPolicy(min_size=0, device_budget_bytes="auto"), stats) != first
  # A bound method is a new object at each access, but equal: read once.
  device = jax.devices()[0]
  other = op.OffloadPolicy(min_size=0, device_budget_bytes="auto")
  offload._resolve_budget(other, device.memory_stats)
  assert offload._same_source(offload._AUTO_BUDGETS[id(other)][0],
                              offload._stats_source(device.memory_stats))
  key = id(other)
  del other
  import gc
  gc.collect()
  assert key not in offload._AUTO_BUDGETS  # entries go with their policy
  # inject_hyperparams builds the transformation at init and at each trace:
  # the leaves keep their memory kinds.
  tx = optax.inject_hyperparams(op.paged_adamw_8bit, static_args=("policy",))(1e-3, policy=policy)
  params = {"w": jnp.ones((256, 512))}
  state = tx.init(params)
  assert _kinds(jax.jit(tx.update)(params, state, params)[1]) == _kinds(state)


def test_trust_ratio_aliases_say_why_they_refuse_pages():
  with pytest.raises(ValueError, match="paged_lamb_8bit: its trust ratio needs whole leaves"):
    op.paged_lamb_8bit(1e-3, policy=op.OffloadPolicy(page_bytes=65536))
  with pytest.raises(ValueError, match="paged_lars_8bit: its trust ratio needs whole leaves"):
    op.paged_lars_8bit(1e-3, policy=op.OffloadPolicy(page_bytes=65536))
