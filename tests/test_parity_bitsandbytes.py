"""Parity with bitsandbytes' AdamW8bit (extra 'parity': torch CPU + bitsandbytes).

Same initial parameters and gradient sequence for 100 steps, no re-sync. We
compare parameters, not codes: bitsandbytes' CPU codec is approximate. Each
8-bit optimizer is measured against its own float32 twin (ours against
``optax.adamw``, bitsandbytes' against ``torch.optim.AdamW``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_paged as op
from conftest import require

LR, WD, STEPS = 1e-3, 1e-2, 100


def _gradients(shape, hetero, seed=0):
  rng = np.random.default_rng(seed)
  p0 = (rng.standard_normal(shape) * 0.1).astype(np.float32)
  # Step 1 is exact for both up to float32 rounding (|update| = lr * sign(g)).
  rounding = 1e-7
  if hetero:
    # Scales spread over four decades inside every block: the case where a
    # second moment can round to the zero code (the zero-point problem).
    scale = (10.0 ** rng.uniform(-4, 0, shape)).astype(np.float32)
  else:
    scale = np.full(shape, 0.01, np.float32)
  grads = [(rng.standard_normal(shape) * scale).astype(np.float32) for _ in range(STEPS)]
  return p0, grads


def _torch_trajectory(cls, p0, grads):
  torch = require("torch")
  p = torch.nn.Parameter(torch.tensor(p0.copy()))
  opt = cls([p], lr=LR, weight_decay=WD)
  out = []
  for g in grads:
    p.grad = torch.tensor(g)
    opt.step()
    out.append(p.detach().numpy().copy())
  return out


def _jax_trajectory(tx, p0, grads):
  @jax.jit
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  p = jnp.asarray(p0)
  s = tx.init(p)
  out = []
  for g in grads:
    p, s = step(p, s, jnp.asarray(g))
    out.append(np.asarray(p))
  return out


def _distances(a, b):
  return np.array([np.abs(x - y).mean() for x, y in zip(a, b)])


@pytest.mark.parametrize("hetero", [True, False], ids=["heterogeneous", "normal"])
def test_adamw8bit_trajectory_at_least_as_close_as_bitsandbytes(hetero):
  torch = require("torch")
  bnb = require("bitsandbytes")
  p0, grads = _gradients((1024, 1024), hetero)
  theirs = _distances(
      _torch_trajectory(bnb.optim.AdamW8bit, p0, grads),
      _torch_trajectory(torch.optim.AdamW, p0, grads),
  )
  ours = _distances(
      _jax_trajectory(op.adamw_8bit(LR, weight_decay=WD), p0, grads),
      _jax_trajectory(optax.adamw(LR, weight_decay=WD), p0, grads),
  )
  # The two float32 references agree far below the 8-bit error.
  assert theirs[-1] > 100 * 2e-7
  # Step 1 is exact for both up to float32 rounding (|update| = lr * sign(g)).
  rounding = 1e-7
  if hetero:
    # Never rounding a positive second moment to zero beats bitsandbytes
    # clearly here (measured ~0.58x); require it at every step.
    assert np.all(ours <= theirs + rounding), (ours - theirs).max()
    assert ours[-1] < 0.8 * theirs[-1]
  else:
    # Standard-normal gradients: both codecs are at the same error (ratio
    # ~1.0001 measured; bitsandbytes' CPU codec is not exactly nearest).
    assert np.all(ours <= 1.01 * theirs + rounding), (ours - theirs).max()
