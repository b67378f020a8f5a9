"""8-bit Adam/AdamW against optax's float32 optimizers."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_paged as op
from optax_paged import quantization as qz

PAIRS = {
    "adam": (op.adam_8bit, optax.adam),
    "adamw": (op.adamw_8bit, optax.adamw),
}


def _dequantized_moments(state):
  """float32 ``(mu, nu)`` trees of a ScaleByAdam8bitState."""
  floats = op.dequantize_state(state)
  return floats.mu, floats.nu


def _parabola(dtype):
  init = jnp.array([-1.0, 10.0, 1.0], dtype)
  final = jnp.array([1.0, -1.0, 1.0], dtype)
  return init, final, lambda x: jnp.sum((x - final) ** 2)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_converges_with_bfloat16_params(name):
  """optax's alias convergence test (the parabola) in bfloat16 (float32:
  tests/test_family.py, Rosenbrock included).

  No Rosenbrock here: in bfloat16 parameters optax's own Adam stalls at
  (0.977, 0.949) and every variant wanders in the valley at bf16 resolution.
  """
  dtype = jnp.bfloat16
  init, final, loss = _parabola(dtype)
  tx = PAIRS[name][0](1e-1, min_8bit_size=0, block_size=64)
  state = tx.init(init)
  assert state[0].mu.dtype == jnp.uint8

  @jax.jit
  def run(params, state):
    def body(_, carry):
      params, state = carry
      g = jax.grad(loss)(params)
      u, state = tx.update(g, state, params)
      return optax.apply_updates(params, u), state
    return jax.lax.fori_loop(0, 10_000, body, (params, state))

  params, _ = run(init, state)
  assert params.dtype == dtype
  chex.assert_trees_all_close(params.astype(jnp.float32), final.astype(jnp.float32), rtol=1e-1, atol=1e-1)


def _tree_params(dtype=jnp.float32):
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  return {
      "dense": {"kernel": jax.random.normal(k[0], (64, 512)).astype(dtype), "bias": jnp.zeros(512, dtype)},
      "odd": jax.random.normal(k[1], (77, 100)).astype(dtype),
      "scale": jnp.ones((), dtype),
  }


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtypes_math_in_float32_updates_in_param_dtype(dtype):
  params = _tree_params(dtype)
  tx = op.adamw_8bit(1e-3, min_8bit_size=1000)
  state = tx.init(params)
  grads = jax.tree.map(lambda p: (jnp.ones_like(p) * 0.1).astype(dtype), params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  jax.tree.map(lambda u, p: chex.assert_equal(u.dtype, p.dtype), updates, params)
  s = state[0]
  assert s.mu["dense"]["kernel"].dtype == jnp.uint8 and s.nu["odd"].dtype == jnp.uint8
  assert s.mu["dense"]["bias"].dtype == jnp.float32 and s.mu_absmax["dense"]["bias"] is None
  assert s.mu_absmax["dense"]["kernel"].shape == (64, 2)
  assert s.mu_absmax["odd"].shape == (31,)
  # Against optax in float32 on the same low-precision inputs, over steps with
  # fresh random gradients (Adam's first step is sign(g) whatever the betas
  # and bias corrections, so one constant-gradient step would prove nothing).
  as32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)  # noqa: E731
  ref = optax.adamw(1e-3)
  state, ref_state = tx.init(params), ref.init(as32(params))
  for i in range(4):
    grads = jax.tree.map(
        lambda p, k=jax.random.PRNGKey(i): (jax.random.normal(k, p.shape) * 0.1).astype(dtype), params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    ref_u, ref_state = ref.update(as32(grads), ref_state, as32(params))
    for u, r in zip(jax.tree.leaves(as32(updates)), jax.tree.leaves(ref_u)):
      # 8-bit moments: ~1% error per element; a wrong beta or bias correction
      # is off by tens of percent from step 2 on.
      assert float(jnp.linalg.norm(u - r) / jnp.linalg.norm(r)) < 0.03, (dtype, i)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.complex64])
def test_integer_or_complex_params_raise_at_init(dtype):
  params = {"ok": jnp.zeros(8), "bad": jnp.zeros(8, dtype)}
  with pytest.raises(TypeError, match=r"\['bad'\].*" + jnp.dtype(dtype).name):
    op.adamw_8bit(1e-3).init(params)


def test_none_leaves_and_masked_pass_through():
  params = {"a": jnp.ones((64, 256)), "b": None, "c": jnp.ones(3)}
  tx = op.adam_8bit(1e-2, min_8bit_size=16)
  state = tx.init(params)
  grads = {"a": jnp.ones((64, 256)), "b": None, "c": jnp.ones(3)}
  updates, _ = tx.update(grads, state, params)
  assert updates["b"] is None and updates["a"].shape == (64, 256)

  masked = optax.masked(op.adamw_8bit(1e-2, min_8bit_size=16), {"a": True, "b": False, "c": False})
  params = {"a": jnp.ones((64, 256)), "b": jnp.ones(5, jnp.int32), "c": jnp.ones(3)}
  state = masked.init(params)  # the integer leaf is masked out: no error
  updates, _ = masked.update(jax.tree.map(jnp.ones_like, params), state, params)
  np.testing.assert_array_equal(np.asarray(updates["b"]), np.ones(5))
  assert float(updates["a"][0, 0]) < 0


# 1e20 and -3e19 are finite, but their squares overflow: Adam's second moment
# would be infinite while its first moment became the block's scale.
@pytest.mark.parametrize("backend", ["xla", "pallas"])
@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf, 1e20, -3e19])
def test_non_finite_gradient_element_touches_nothing_else(bad, backend):
  tx = op.adam_8bit(1e-2, min_8bit_size=0, backend=backend)
  p = jax.random.normal(jax.random.PRNGKey(0), (4, 256))
  g0 = jax.random.normal(jax.random.PRNGKey(1), (4, 256))
  state = tx.init(p)
  _, state = tx.update(g0, state, p)  # non-trivial previous state
  g1 = jax.random.normal(jax.random.PRNGKey(2), (4, 256))
  where = (1, 17)
  clean_g = g1.at[where].set(0.0)  # same block maximum as if it were absent
  bad_g = g1.at[where].set(bad)
  u_clean, s_clean = tx.update(clean_g, state, p)
  u_bad, s_bad = tx.update(bad_g, state, p)
  others = np.ones((4, 256), bool)
  others[where] = False
  for field in ("mu", "nu"):
    a, b = np.asarray(getattr(s_clean[0], field)), np.asarray(getattr(s_bad[0], field))
    np.testing.assert_array_equal(a[others], b[others])
    np.testing.assert_array_equal(
        np.asarray(getattr(s_clean[0], field + "_absmax")), np.asarray(getattr(s_bad[0], field + "_absmax"))
    )
  np.testing.assert_array_equal(np.asarray(u_clean)[others], np.asarray(u_bad)[others])
  assert np.isnan(np.asarray(u_bad)[where])
  # Its own moments keep their previous values (re-encoded with the new scale).
  old_mu, old_nu = _dequantized_moments(state[0])
  new_mu, new_nu = _dequantized_moments(s_bad[0])
  for old, new, scale in ((old_mu, new_mu, s_bad[0].mu_absmax), (old_nu, new_nu, s_bad[0].nu_absmax)):
    np.testing.assert_allclose(float(new[where]), float(old[where]), atol=float(scale[1, 0]) * 0.9 / 64)
  assert np.all(np.isfinite(np.asarray(new_mu))) and np.all(np.isfinite(np.asarray(new_nu)))


@pytest.mark.parametrize("name", ["adam_8bit", "ademamix_8bit", "lion_8bit", "sgd_8bit", "adagrad_8bit"])
@pytest.mark.parametrize("quantized", [True, False])
def test_gradient_whose_square_overflows_keeps_every_moment(name, quantized):
  kwargs = {"momentum": 0.9} if name == "sgd_8bit" else {}
  tx = op.registry.create(name, 1e-2, min_8bit_size=0 if quantized else 10**9, **kwargs)
  p = jnp.zeros((2, 256))
  g = jax.random.normal(jax.random.PRNGKey(0), (2, 256))
  _, state = tx.update(g, tx.init(p), p)
  u, new = tx.update(jnp.ones((2, 256)).at[0, 5].set(3e19), state, p)  # g**2 overflows float32
  if name in ("lion_8bit", "sgd_8bit"):  # no square: the gradient is used, as optax uses it
    twin = {"lion_8bit": optax.lion(1e-2), "sgd_8bit": optax.sgd(1e-2, momentum=0.9)}[name]
    v, _ = twin.update(jnp.ones((2, 256)).at[0, 5].set(3e19), twin.update(g, twin.init(p), p)[1], p)
    assert np.isfinite(np.asarray(u)).all()
    np.testing.assert_allclose(np.asarray(u)[0, 5], np.asarray(v)[0, 5], rtol=1e-5)
    return
  assert np.isnan(np.asarray(u)[0, 5]) and np.isfinite(np.asarray(u)).sum() == 511
  moments = [jax.tree.leaves(op.dequantize_state(s)) for s in (state, new)]
  moments = [[np.asarray(x) for x in ms if np.shape(x) == (2, 256)] for ms in moments]
  assert len(moments[1]) == {"ademamix_8bit": 3, "adam_8bit": 2, "adagrad_8bit": 1}[name]
  for before, after in zip(*moments):  # every moment kept, and no huge block scale
    # kept up to the rounding of the block's new scale
    np.testing.assert_allclose(after[0, 5], before[0, 5], atol=0.02 * np.abs(after[0]).max())
    assert np.abs(after).max() < 1e3


def test_state_structure_is_stable_and_cond_traces():
  params = _tree_params()
  tx = op.adamw_8bit(1e-3, min_8bit_size=1000)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, new_state = tx.update(grads, state, params)
  assert jax.tree.structure(state) == jax.tree.structure(new_state)
  jax.tree.map(lambda a, b: chex.assert_equal((a.shape, a.dtype), (b.shape, b.dtype)), state, new_state)

  @jax.jit
  def pick(flag):
    return jax.lax.cond(flag, lambda: state, lambda: tx.update(grads, state, params)[1])

  chex.assert_trees_all_equal_shapes_and_dtypes(pick(True), state)


def test_jitted_step_compiles_once():
  params = _tree_params()
  tx = op.adamw_8bit(1e-3, min_8bit_size=1000)
  traces = []

  @jax.jit
  def step(params, state, grads):
    traces.append(1)
    u, state = tx.update(grads, state, params)
    return optax.apply_updates(params, u), state

  state = tx.init(params)
  for i in range(10):
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01 * (i + 1)), params)
    params, state = step(params, state, grads)
  assert len(traces) == 1
  assert int(state[0].count) == 10


def test_inject_hyperparams_and_schedules():
  params = _tree_params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  injected = optax.inject_hyperparams(op.adamw_8bit, static_args=("block_size", "min_8bit_size"))(
      learning_rate=1e-2, b1=0.8, weight_decay=1e-3, block_size=128, min_8bit_size=1000
  )
  plain = op.adamw_8bit(1e-2, b1=0.8, weight_decay=1e-3, block_size=128, min_8bit_size=1000)
  s_inj, s_plain = injected.init(params), plain.init(params)
  step_inj, step_plain = jax.jit(injected.update), jax.jit(plain.update)
  for _ in range(3):
    u_inj, s_inj = step_inj(grads, s_inj, params)
    u_plain, s_plain = step_plain(grads, s_plain, params)
    # Hyperparameters arrive as float32 arrays instead of Python floats.
    chex.assert_trees_all_close(u_inj, u_plain, rtol=1e-4, atol=1e-9)
  s_inj.hyperparams["learning_rate"] = jnp.asarray(0.0)
  u_zero, _ = step_inj(grads, s_inj, params)
  assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(u_zero))
  # With the defaults no static_args are needed (inject_hyperparams turns
  # every numeric argument, defaults included, into an array).
  for name, kwargs in (("adam_8bit", {}), ("adamw_8bit", {}), ("lion_8bit", {}),
                       ("ademamix_8bit", {}), ("sgd_8bit", {"momentum": 0.9})):
    tx = optax.inject_hyperparams(getattr(op, name))(learning_rate=1e-2, **kwargs)
    state = tx.init(params)
    assert any(x.dtype == jnp.uint8 for x in jax.tree.leaves(state.inner_state)), name
    jax.jit(tx.update)(grads, state, params)
  # A block size set under it without static_args: a clear error, not a crash
  # deep inside (it fixes the state's layout, so it cannot be traced).
  with pytest.raises(TypeError, match=r"static_args=\('block_size',\)"):
    optax.inject_hyperparams(op.adamw_8bit)(learning_rate=1e-2, block_size=128).init(params)
  # A schedule as learning rate.
  sched = optax.linear_schedule(1e-2, 0.0, 4)
  tx = op.adam_8bit(sched, min_8bit_size=1000)
  st = tx.init(params)
  norms = []
  for _ in range(5):
    u, st = tx.update(grads, st, params)
    norms.append(float(optax.tree.norm(u)))
  assert norms[0] > norms[1] > norms[2] > norms[3] > 0 and norms[4] == 0


def test_quantize_mask_and_min_8bit_size_pick_leaves():
  params = _tree_params()
  tx = op.adam_8bit(1e-3, min_8bit_size=0, quantize_mask=lambda path, leaf: "dense" not in jax.tree_util.keystr(path))
  s = tx.init(params)[0]
  assert s.mu["dense"]["kernel"].dtype == jnp.float32 and s.mu["odd"].dtype == jnp.uint8
  assert s.mu["scale"].dtype == jnp.uint8
  tx = op.adam_8bit(1e-3, quantize_mask={"dense": {"kernel": True, "bias": True}, "odd": False, "scale": True})
  s = tx.init(params)[0]
  assert s.mu["dense"]["kernel"].dtype == jnp.uint8
  assert s.mu["odd"].dtype == jnp.float32  # masked off
  assert s.mu["dense"]["bias"].dtype == jnp.float32  # below min_8bit_size
  u, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  assert jax.tree.structure(u) == jax.tree.structure(params)


def test_quantize_mask_as_a_prefix_under_masked_and_partition():
  """A pytree quantize_mask may be a prefix of the parameters' tree, and works
  under optax.masked / optax.partition, whose inner trees hold MaskedNodes."""
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  params = {"w": jax.random.normal(k[0], (64, 128)), "step": jnp.zeros((), jnp.int32),
            "emb": {"a": jax.random.normal(k[1], (64, 128)), "b": jax.random.normal(k[2], (64, 128))}}
  grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.1 if p.dtype == jnp.float32 else p, params)
  which = {"w": True, "step": False, "emb": True}
  inner = op.adamw_8bit(1e-2, min_8bit_size=0, quantize_mask={"w": True, "step": False, "emb": False})
  tx = optax.masked(inner, which)
  state = tx.init(params)
  mu = state.inner_state[0].mu
  assert mu["w"].dtype == jnp.uint8
  assert mu["emb"]["a"].dtype == jnp.float32 and mu["emb"]["b"].dtype == jnp.float32
  updates, _ = jax.jit(tx.update)(grads, state, params)
  twin, _ = optax.masked(optax.adamw(1e-2), which).update(
      grads, optax.masked(optax.adamw(1e-2), which).init(params), params)
  chex.assert_trees_all_close(updates["emb"], twin["emb"], rtol=1e-6)  # float32 state: exact math
  assert updates["step"].dtype == jnp.int32  # masked out: passed through untouched
  tx = optax.partition({"opt": inner, "frozen": optax.set_to_zero()},
                       {"w": "opt", "step": "frozen", "emb": "opt"})
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  chex.assert_trees_all_close(updates["emb"], twin["emb"], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(learning_rate=-1e-3), "learning_rate"),
        (dict(learning_rate=float("nan")), "learning_rate"),
        (dict(learning_rate=1e-3, b1=1.0), "b1"),
        (dict(learning_rate=1e-3, b2=-0.1), "b2"),
        (dict(learning_rate=1e-3, eps=-1.0), "eps"),
        (dict(learning_rate=1e-3, weight_decay=-1.0), "weight_decay"),
        (dict(learning_rate=1e-3, block_size=300), "block_size"),
        (dict(learning_rate=1e-3, min_8bit_size=-1), "min_8bit_size"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    op.adamw_8bit(**kwargs)


def test_state_bytes_per_parameter():
  p = {"w": jnp.zeros((4096, 4096))}
  state = op.adamw_8bit(1e-3).init(p)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  assert abs(nbytes / p["w"].size - (2 + 8 / 256)) < 1e-3


def test_gradient_dtype_is_checked():
  params = {"w": jnp.ones((64, 128)), "b": jnp.ones(3)}
  tx = op.adam_8bit(1e-2, min_8bit_size=16)
  state = tx.init(params)
  for dtype in (jnp.int32, jnp.complex64):
    grads = {"w": jnp.ones((64, 128), dtype), "b": jnp.ones(3)}
    with pytest.raises(TypeError, match=r"\['w'\] has dtype " + jnp.dtype(dtype).name):
      tx.update(grads, state, params)


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit", "paged_adamw"])
def test_python_number_leaves_work_as_in_optax(name):
  params = {"w": jnp.ones((64, 128)), "temperature": 1.0}
  grads = {"w": jnp.ones((64, 128)), "temperature": 0.5}
  extra = {"min_8bit_size": 16} if name == "adamw_8bit" else {}
  ours, theirs = op.registry.create(name, 1e-2, **extra), optax.adamw(1e-2)
  u, _ = ours.update(grads, ours.init(params), params)
  v, _ = theirs.update(grads, theirs.init(params), params)
  np.testing.assert_allclose(float(u["temperature"]), float(v["temperature"]), rtol=1e-6)


def test_star_import_binds_no_submodules():
  assert not [n for n in op.__all__ if isinstance(getattr(op, n), type(op))]
  assert {"adamw_8bit", "paged", "from_config"} <= set(op.__all__)


def test_string_hyperparameters_are_refused_when_built():
  with pytest.raises(TypeError, match="learning_rate must be a real number"):
    op.adamw_8bit("1e-3")
  with pytest.raises(TypeError, match="b1 must be a real number"):
    op.adam_8bit(1e-3, b1=True)
