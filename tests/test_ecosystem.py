"""Flax NNX and Linen training loops, and Orbax checkpoints, with 8-bit and paged state."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import optax_paged as op

POLICY = op.OffloadPolicy(min_size=1000)
OPTIMIZERS = {
    "adamw_8bit": lambda: op.adamw_8bit(3e-3),
    "paged_adamw_8bit": lambda: op.paged_adamw_8bit(3e-3, policy=POLICY),
}

X = jax.random.normal(jax.random.PRNGKey(1), (64, 32))
Y = jnp.sin(X @ jax.random.normal(jax.random.PRNGKey(2), (32, 4)))


class NnxModel(nnx.Module):
  def __init__(self, rngs):
    self.a = nnx.Linear(32, 256, rngs=rngs)
    self.b = nnx.Linear(256, 4, rngs=rngs)

  def __call__(self, x):
    return self.b(nnx.tanh(self.a(x)))


def _loss(model):
  return jnp.mean((model(X) - Y) ** 2)


def _state_kinds(tree):
  return {x.sharding.memory_kind for x in jax.tree.leaves(tree) if hasattr(x, "sharding")}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_nnx_optimizer_under_nnx_jit(name):
  model = NnxModel(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, OPTIMIZERS[name](), wrt=nnx.Param)
  traces = []

  @nnx.jit
  def step(model, optimizer):
    traces.append(1)
    loss, grads = nnx.value_and_grad(_loss)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(12)]
  assert len(traces) == 1
  assert losses[-1] < 0.7 * losses[0]
  kinds = _state_kinds(nnx.state(optimizer, nnx.optimizer.OptState))
  assert kinds == ({"device", "pinned_host"} if name.startswith("paged") else {"device"})


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_nnx_optimizer_under_jax_jit_functional_api(name):
  model = NnxModel(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, OPTIMIZERS[name](), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))

  @jax.jit
  def step(state):
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(_loss)(model)
    optimizer.update(model, grads)
    return loss, nnx.state((model, optimizer))

  losses = []
  for _ in range(12):
    loss, state = step(state)
    losses.append(float(loss))
  assert losses[-1] < 0.7 * losses[0]
  # The same steps under nnx.jit give the same parameters.
  model2 = NnxModel(nnx.Rngs(0))
  optimizer2 = nnx.Optimizer(model2, OPTIMIZERS[name](), wrt=nnx.Param)
  nnx_step = nnx.jit(lambda m, o: o.update(m, nnx.grad(_loss)(m)))
  for _ in range(12):
    nnx_step(model2, optimizer2)
  model, _ = nnx.merge(graphdef, state)
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(model2, nnx.Param))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


class LinenModel(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4)(nn.tanh(nn.Dense(256)(x)))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_linen_train_state(name):
  model = LinenModel()
  params = model.init(jax.random.PRNGKey(0), X)["params"]
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=OPTIMIZERS[name]())

  @jax.jit
  def step(state):
    def loss(p):
      return jnp.mean((state.apply_fn({"params": p}, X) - Y) ** 2)
    value, grads = jax.value_and_grad(loss)(state.params)
    return state.apply_gradients(grads=grads), value

  losses = []
  for _ in range(12):
    state, loss = step(state)
    losses.append(float(loss))
  assert losses[-1] < 0.7 * losses[0]
  assert int(state.step) == 12
  codes = [x for x in jax.tree.leaves(state.opt_state) if x.dtype == jnp.uint8]
  assert codes  # the 32x256 and 256x4 kernels' moments are 8-bit
  if name.startswith("paged"):
    assert "pinned_host" in _state_kinds(state.opt_state)


def _run(tx, params, steps, state=None, start=0):
  state = tx.init(params) if state is None else state

  @jax.jit
  def step(params, state, i):
    g = jax.tree.map(lambda x: jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(7), i), x.shape),
                     params)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  history = []
  for i in range(start, start + steps):
    params, state = step(params, state, i)
    history.append(params)
  return params, state, history


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_orbax_resume_equals_uninterrupted_run(name, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint", reason="orbax-checkpoint comes with flax")
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (256, 512)) * 0.1, "b": jnp.zeros(512)}
  tx = OPTIMIZERS[name]()
  _, _, straight = _run(tx, params, 10)

  p5, s5, _ = _run(tx, params, 5)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "ckpt", {"params": p5, "opt_state": s5})
  ckpt.wait_until_finished()
  # The portable restore: into device memory, then back to the policy's kinds.
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding.with_memory_kind("device")),
      {"params": p5, "opt_state": s5})
  restored = ckpt.restore(tmp_path / "ckpt", target)
  opt_state = op.place(restored["opt_state"], POLICY) if name.startswith("paged") else restored["opt_state"]
  for a, b in zip(jax.tree.leaves(opt_state), jax.tree.leaves(s5)):
    assert a.dtype == b.dtype and a.sharding.memory_kind == b.sharding.memory_kind
    np.testing.assert_array_equal(np.asarray(jax.device_put(a, jax.memory.Space.Device)),
                                  np.asarray(jax.device_put(b, jax.memory.Space.Device)))
  _, _, resumed = _run(tx, restored["params"], 5, state=opt_state, start=5)
  for a, b in zip(resumed, straight[5:]):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
