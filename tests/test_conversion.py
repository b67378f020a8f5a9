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
  counts = [x for x in jax.tree.leaves(q) if x.shape == () and x.dtype == jnp.int32]
  assert counts and all(int(c) in (5, 0) for c in counts)


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
