"""Elementwise optimizer rules, shared by every backend.

A rule is a pure elementwise function

    rule(grad, moments, hparams) -> (direction, new_moments)

on float32 arrays of any (equal) shape: ``moments`` is a tuple of the
optimizer's decoded state arrays, ``hparams`` a mapping of scalars (Python
numbers or traced arrays, including ``"count"``, the step number starting at
1). The rule returns the update direction (before the learning rate and its
sign) and the new moments, in float32. It must not reduce across elements:
the same function runs inside the XLA path and inside the fused Pallas
kernel, one block at a time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

Moments = tuple[jax.Array, ...]


def _inverse_bias_correction(decay, count):
  """Scalar ``1 / (1 - decay**count)``.

  Rules multiply by scalar reciprocals and divide at most once per element:
  XLA rewrites chains of divisions (``a / b / c`` into ``a / (b * c)``) and
  divisions by shared scalars differently depending on what else is in the
  computation, which would make the same update round differently when it
  runs on its own (e.g. one page at a time) or inside a larger step.
  """
  return 1.0 / (1.0 - jnp.asarray(decay, jnp.float32) ** count)


def adam_rule(
    grad: jax.Array, moments: Moments, hparams: Mapping[str, Any]
) -> tuple[jax.Array, Moments]:
  """Adam: exponential moving averages of the gradient and its square.

  ``hparams``: ``b1``, ``b2``, ``eps``, ``eps_root``, ``count``.

  References:
    Kingma & Ba, `Adam: A Method for Stochastic Optimization
    <https://arxiv.org/abs/1412.6980>`_, 2014.
  """
  mu, nu = moments
  b1, b2 = hparams["b1"], hparams["b2"]
  count = jnp.asarray(hparams["count"], jnp.float32)
  mu = b1 * mu + (1.0 - b1) * grad
  nu = b2 * nu + (1.0 - b2) * (grad * grad)
  mu_hat = mu * _inverse_bias_correction(b1, count)
  nu_hat = nu * _inverse_bias_correction(b2, count)
  direction = mu_hat / (jnp.sqrt(nu_hat + hparams["eps_root"]) + hparams["eps"])
  return direction, (mu, nu)
