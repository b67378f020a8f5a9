"""Percentile gradient clipping (bitsandbytes' ``percentile_clipping``).

bitsandbytes' 8-bit optimizers took ``percentile_clipping=p``: each
parameter's gradient norm is recorded in a ring of the last 100 norms, and a
gradient whose norm exceeds the ``p``-th percentile of that history is scaled
down to it (bitsandbytes removed the option in 0.50; Ludwig configs still
carry it). This is that, as an optax transformation to put first in a chain.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax



class PercentileClippingState(NamedTuple):
  """Step count and, per parameter, the last ``history`` squared gradient norms."""

  count: jax.Array
  norms: optax.Updates


def percentile_clipping(percentile: int = 100, history: int = 100) -> optax.GradientTransformation:
  """Clips each leaf's gradient norm to a percentile of its recent norms.

  Differs from bitsandbytes in one respect: the percentile is taken over the
  norms recorded so far (at most ``history``), not over a ring still full of
  zeros, which made bitsandbytes zero out the first updates.

  Args:
    percentile: 0..100; 100 (the default) never clips.
    history: how many recent norms each leaf remembers.

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Dettmers et al., `8-bit Optimizers via Block-wise Quantization
    <https://arxiv.org/abs/2110.02861>`_, 2022 (Section 2.3, percentile clipping).
  """
  if (not isinstance(percentile, (int, np.integer)) or isinstance(percentile, bool)
      or not 0 <= percentile <= 100):
    raise ValueError(
        f"percentile_clipping must be an int in 0..100 (as in bitsandbytes), got {percentile!r}.")
  percentile = int(percentile)
  if not isinstance(history, int) or history < 1:
    raise ValueError(f"history must be a positive int, got {history!r}.")

  def init_fn(params):
    norms = jax.tree.map(lambda _: jnp.zeros((history,), jnp.float32), params)
    return PercentileClippingState(jnp.zeros([], jnp.int32), norms)

  def update_fn(updates, state, params=None):
    del params
    count = state.count
    slot = count % history
    filled = jnp.minimum(count + 1, history)

    def clip(g, ring):
      sq = jnp.sum(jnp.square(g.astype(jnp.float32)))
      ring = ring.at[slot].set(sq)
      # Unfilled slots sort last, so the percentile is over the filled ones.
      recorded = jnp.where(jnp.arange(history) < filled, ring, jnp.inf)
      k = jnp.minimum((percentile * filled) // 100, filled - 1)
      limit = jnp.sort(recorded)[k]
      scale = jnp.where(sq > limit, jnp.sqrt(limit / jnp.maximum(sq, 1e-30)), 1.0)
      return (g * scale).astype(g.dtype), ring

    if percentile >= 100:
      return updates, state
    out = jax.tree.map(clip, updates, state.norms)
    new_updates = jax.tree.map(lambda _, o: o[0], updates, out)
    new_norms = jax.tree.map(lambda _, o: o[1], updates, out)
    return new_updates, PercentileClippingState(optax.safe_increment(count), new_norms)

  return optax.GradientTransformation(init_fn, update_fn)
