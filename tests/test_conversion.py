"""quantize_state / dequantize_state between float32 optax states and 8-bit ones."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_paged as op

PARAMS = {
    "w": jax.random.normal(jax.random.PRNGKey(0), (128, 512)) * 0.1,
    "odd": jax.random.normal(jax.random.PRNGKey(1), (77, 100)) * 0.1,
    "b": jnp.zeros(16),
}

# 8-bit optimizer, its optax twin (same hyperparameters), the moment fields.
PAIRS = {
    "adamw": (lambda: op.adamw_8bit(1e-3), lambda: optax.adamw(1e-3), ("mu", "nu")),
    "lion": (lambda: op.lion_8bit(1e-4), lambda: optax.lion(1e-4), ("mu",)),
    "sgd": (lambda: op.sgd_8bit(1e-2, momentum=0.9), lambda: optax.sgd(1e-2, momentum=0.9), ("trace",)),
    "rmsprop": (lambda: op.rmsprop_8bit(1e-3), lambda: optax.rmsprop(1e-3), ("nu",)),
    "adagrad": (lambda: op.adagrad_8bit(1e-2), lambda: optax.adagrad(1e-2), ("sum_of_squares",)),
    "ademamix": (lambda: op.ademamix_8bit(1e-3), lambda: optax.contrib.ademamix(1e-3), ("m1", "m2", "nu")),
}


def _train(tx, state, steps, params=PARAMS, seed=0):
  step = jax.jit(tx.update)
  for i in range(steps):
    g = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(seed + i), x.shape) * 0.01, params)
    u, state = step(g, state, params)
    params = optax.apply_updates(params, u)
  return params, state


def _fields(state, names):
  """The named moment trees of the first state node that has them."""
  for node in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "_fields")):
    if hasattr(node, "_fields") and all(n in node._fields for n in names):
      return {n: getattr(node, n) for n in names}
  raise AssertionError(names)


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_round_trip_float32_to_8bit_to_float32_within_codec_bound(name):
  make8, make32, names = PAIRS[name]
  _, fp32 = _train(make32(), make32().init(PARAMS), 5)
  q = op.quantize_state(fp32, make8())
  assert jax.tree.structure(q) == jax.tree.structure(make8().init(PARAMS))
  back = op.dequantize_state(q, make32())
  assert jax.tree.structure(back) == jax.tree.structure(fp32)
  original, restored = _fields(fp32, names), _fields(back, names)
  for n in names:
    for a, b in zip(jax.tree.leaves(original[n]), jax.tree.leaves(restored[n])):
      a, b = np.asarray(a), np.asarray(b)
      # Half the widest gap between neighbouring codes, relative to the block
      # scale (<= the leaf's largest magnitude); float32 leaves are exact.
      assert np.abs(a - b).max() <= np.abs(a).max() * (0.9 / 64 / 2) + 1e-12
  # The step count carries over (5 steps) where the twin keeps one; twins
  # without a counter (sgd's trace, rmsprop, adagrad) give 0.
  def counts(state):
    return [int(x) for x in jax.tree.leaves(state) if x.shape == () and x.dtype == jnp.int32]
  expected = 5 if 5 in counts(fp32) else 0
  assert counts(q) == [expected], (counts(q), counts(fp32))


def test_switching_a_running_job_to_8bit_keeps_its_moments():
  _, fp32 = _train(optax.adamw(1e-3), optax.adamw(1e-3).init(PARAMS), 20)
  p32, _ = _train(optax.adamw(1e-3), fp32, 10, seed=100)
  p8, s8 = _train(op.adamw_8bit(1e-3), op.quantize_state(fp32, op.adamw_8bit(1e-3)), 10, seed=100)
  fresh, _ = _train(op.adamw_8bit(1e-3), op.adamw_8bit(1e-3).init(PARAMS), 10, seed=100)
  keep = float(jnp.abs(p8["w"] - p32["w"]).mean())
  lose = float(jnp.abs(fresh["w"] - p32["w"]).mean())
  assert keep < 0.05 * lose, (keep, lose)  # restarting the moments would cost far more
  assert int(s8[0].count) == 30


def test_default_form_is_the_float32_state_of_the_same_transformation():
  tx = op.adamw_8bit(1e-3)
  _, s8 = _train(tx, tx.init(PARAMS), 3)
  floats = op.dequantize_state(s8)
  assert type(floats[0]) is type(s8[0])
  assert all(a is None for a in jax.tree.leaves(floats[0].mu_absmax, is_leaf=lambda x: x is None))
  assert floats[0].mu["w"].dtype == jnp.float32
  # It is exactly the state of the float32 form, so that form continues from it.
  fp32_form = op.adamw_8bit(1e-3, min_8bit_size=2**62)
  assert jax.tree.structure(floats) == jax.tree.structure(fp32_form.init(PARAMS))
  fp32_form.update(jax.tree.map(jnp.ones_like, PARAMS), floats, PARAMS)
  # ... and quantizing it again gives back the same values (codes too, except
  # in blocks whose largest element is negative: the signed map has no -1.0,
  # so that block's scale shrinks by 0.8% and its codes may shift by one).
  again = op.dequantize_state(op.quantize_state(floats, tx))
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(floats)):
    a, b = np.asarray(a), np.asarray(b)
    assert np.abs(a - b).max() <= np.abs(b).max() * (0.9 / 64) + 1e-12


def test_paged_states_convert_too():
  tx = op.paged_adamw_8bit(1e-3, policy=op.OffloadPolicy(min_size=1000))
  _, state = _train(tx, tx.init(PARAMS), 2)
  floats = op.dequantize_state(state)
  assert {x.sharding.memory_kind for x in jax.tree.leaves(floats)} == {"device"}


def test_block_size_is_read_off_the_shapes():
  from optax_paged.conversion import infer_block_size
  assert infer_block_size((4, 1024), (4, 4)) == 256
  assert infer_block_size((77, 100), (31,)) == 256
  assert infer_block_size((1000,), (16,)) == 64
  assert infer_block_size((100,), (1,)) in (128, 256, 512, 1024, 2048, 4096)
  with pytest.raises(ValueError):
    infer_block_size((1000,), (3,))


def test_quantized_moments_keep_nonzero_values_off_the_zero_code():
  """As the optimizer stores them: a small positive second moment next to a
  large one in its block must not become 0 (then m / sqrt(v) explodes)."""
  scale = jnp.tile(jnp.logspace(-4, 0, 256), (64, 1))  # magnitudes over 4 decades per block
  params = {"w": jnp.zeros((64, 256))}
  fp32 = optax.adam(1e-3)
  state = fp32.init(params)
  for i in range(5):
    g = {"w": jax.random.normal(jax.random.PRNGKey(i), (64, 256)) * scale}
    _, state = fp32.update(g, state, params)
  nu = state[0].nu["w"]
  q = op.quantize_state(state, op.adam_8bit(1e-3))
  assert int(jnp.sum((q[0].nu["w"] == 0) & (nu > 0))) == 0
  g = {"w": jax.random.normal(jax.random.PRNGKey(9), (64, 256)) * scale}
  u8, _ = op.adam_8bit(1e-3).update(g, q, params)
  u32, _ = fp32.update(g, state, params)
  assert float(jnp.abs(u8["w"]).max()) < 2 * float(jnp.abs(u32["w"]).max())  # was ~4600x


def test_mismatched_states_are_refused():
  params = {"w": jnp.ones((64, 256))}
  clipped = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)).init(params)
  with pytest.raises(ValueError, match="0 of 1 8-bit state nodes were matched"):
    op.quantize_state(clipped, op.adamw_8bit(1e-3))  # used to return the float32 state unchanged
  with pytest.raises(ValueError, match="holds no 8-bit moments"):
    op.quantize_state(optax.adamw(1e-3).init(params), optax.adamw(1e-3))
  # Another optimizer's state whose names happen to fit: Adam's nu would be dropped.
  with pytest.raises(ValueError, match="moment.* nu .*another optimizer"):
    op.quantize_state(optax.adamw(1e-3).init(params), op.lion_8bit(1e-3))
  with pytest.raises(ValueError, match="moment.* mu .*another optimizer"):
    op.quantize_state(optax.adamw(1e-3).init(params), op.rmsprop_8bit(1e-3))
  with pytest.raises(ValueError, match="0 of 1 8-bit state nodes were matched"):
    op.dequantize_state(op.adamw_8bit(1e-3).init(params), optax.chain(optax.clip(1.0), optax.adam(1e-3)))
  # A moment of another shape (same number of blocks once a block size is guessed).
  wide = optax.adam(1e-3).init({"w": jnp.ones((64, 512))})
  with pytest.raises(ValueError, match=r"has shape \(64, 512\), but .* expects \(64, 256\)"):
    op.quantize_state(wide, op.adam_8bit(1e-3), params=params)


def test_non_finite_moments_are_refused():
  params = {"w": jnp.ones((64, 256))}
  state = optax.adam(1e-3).init(params)
  bad = state[0]._replace(mu={"w": state[0].mu["w"].at[3, 7].set(jnp.nan)})
  with pytest.raises(ValueError, match=r"mu\['w'\] holds NaN or infinite values"):
    op.quantize_state((bad,) + tuple(state[1:]), op.adam_8bit(1e-3))


def test_dequantized_state_takes_the_target_state_dtypes():
  """optax keeps bfloat16 moments for bfloat16 parameters: so does the conversion."""
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
  state = op.adamw_8bit(1e-3).init(params)
  back = op.dequantize_state(state, optax.adamw(1e-3), params=params)
  twin = optax.adamw(1e-3).init(params)
  dtypes = lambda s: jax.tree.map(lambda x: jnp.dtype(x.dtype), s)  # noqa: E731
  assert dtypes(back) == dtypes(twin)
  optax.adamw(1e-3).update(params, back, params)  # and optax takes it


def test_multi_transform_groups_convert_without_params():
  """Each group's moments hold MaskedNode for the other groups' parameters:
  the shapes come from all groups (once only from the first, which failed)."""
  labels = {"w": "a", "odd": "b", "b": "b"}
  tx8 = optax.multi_transform({"a": op.adamw_8bit(1e-3), "b": op.lion_8bit(1e-4)}, labels)
  tx32 = optax.multi_transform({"a": optax.adamw(1e-3), "b": optax.lion(1e-4)}, labels)
  _, s8 = _train(tx8, tx8.init(PARAMS), 3)
  chex.assert_trees_all_equal(op.dequantize_state(s8, tx32),
                              op.dequantize_state(s8, tx32, params=PARAMS))
  _, s32 = _train(tx32, tx32.init(PARAMS), 3)
  chex.assert_trees_all_equal(op.quantize_state(s32, tx8), op.quantize_state(s32, tx8, params=PARAMS))


def _moments_of(state):
  return [np.asarray(x) for x in jax.tree.leaves(op.dequantize_state(state)) if np.ndim(x) == 2]


def test_an_8bit_state_is_decoded_first_so_block_size_can_change():
  params = {"w": jnp.ones((64, 1024))}
  tx = op.adamw_8bit(1e-3)
  state = tx.init(params)
  for i in range(3):
    _, state = tx.update({"w": jax.random.normal(jax.random.PRNGKey(i), (64, 1024))}, state, params)
  again = op.quantize_state(state, tx)  # used to quantize the codes 0..255 as if they were moments
  for a, b in zip(_moments_of(state), _moments_of(again)):
    np.testing.assert_allclose(b, a, atol=0.02 * np.abs(a).max())  # one more rounding at most
  reblocked = op.quantize_state(state, op.adamw_8bit(1e-3, block_size=64))
  assert reblocked[0].mu_absmax["w"].shape == (64, 16)
  for a, b in zip(_moments_of(state), _moments_of(reblocked)):
    np.testing.assert_allclose(b, a, atol=0.02 * np.abs(a).max())


def test_converted_states_keep_container_types_and_nnx_wrappers():
  params = {"w": jnp.ones((64, 256))}
  fp32 = optax.named_chain(("zz", optax.clip(1.0)), ("adam", optax.adam(1e-3)))
  ours = optax.named_chain(("zz", optax.clip(1.0)), ("adam", op.adam_8bit(1e-3, min_8bit_size=0)))
  converted = op.quantize_state(fp32.init(params), ours)
  assert jax.tree.structure(converted) == jax.tree.structure(ours.init(params))
  back = op.dequantize_state(converted, fp32)
  assert jax.tree.structure(back) == jax.tree.structure(fp32.init(params))

  from flax import nnx
  model = nnx.Linear(256, 64, rngs=nnx.Rngs(0))
  opt32 = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  opt8 = nnx.Optimizer(model, op.adam_8bit(1e-3, min_8bit_size=0), wrt=nnx.Param)
  opt8.opt_state = op.quantize_state(opt32.opt_state, op.adam_8bit(1e-3, min_8bit_size=0))
  grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
  opt8.update(model, grads)  # a bare count used to make the assignment above fail
  assert int(opt8.opt_state[0].count[...]) == 1
  opt32.opt_state = op.dequantize_state(opt8.opt_state, optax.adam(1e-3))
  opt32.update(model, grads)


def test_bitsandbytes_flat_absmax_is_accepted():
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 1024))
  q = op.quantize_blockwise(x)
  flat = op.QuantizedArray(q.codes, q.absmax.reshape(-1))
  np.testing.assert_array_equal(np.asarray(op.dequantize_blockwise(flat)),
                                np.asarray(op.dequantize_blockwise(q)))
