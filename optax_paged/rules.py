"""Elementwise optimizer rules, shared by every backend.

A rule is a pure elementwise function

    rule(grad, moments, hparams) -> (direction, new_moments)

on float32 arrays of any (equal) shape: ``moments`` is a tuple of the
optimizer's decoded state arrays, ``hparams`` a mapping of float32 scalars
(Python numbers or traced arrays). The rule returns the update direction
(before the learning rate and its sign) and the new moments, in float32.

Each rule comes with a ``*_hparams(..., count)`` function that turns the
optimizer's hyperparameters and the step number (from 1) into the scalars
the rule reads, so that everything depending on the step (bias corrections,
schedules) is computed once per step outside the elementwise work.

A rule must not reduce across elements (the same function runs in the XLA
path and inside the fused Pallas kernel, one tile of blocks at a time), and
must map a zero gradient with zero moments to zero moments (padding of a
last partial block relies on it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

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


def adam_hparams(b1, b2, eps, eps_root, count) -> dict:
  """Scalars of :func:`adam_rule` for step ``count`` (from 1)."""
  count = jnp.asarray(count, jnp.float32)
  return dict(
      b1=b1, b2=b2, eps=eps, eps_root=eps_root,
      inv_bc1=_inverse_bias_correction(b1, count),
      inv_bc2=_inverse_bias_correction(b2, count),
  )


def adam_rule(
    grad: jax.Array, moments: Moments, hparams: Mapping[str, Any]
) -> tuple[jax.Array, Moments]:
  """Adam: exponential moving averages of the gradient and its square.

  ``hparams`` (from :func:`adam_hparams`): ``b1``, ``b2``, ``eps``,
  ``eps_root``, ``inv_bc1``, ``inv_bc2`` (inverse bias corrections).

  References:
    Kingma & Ba, `Adam: A Method for Stochastic Optimization
    <https://arxiv.org/abs/1412.6980>`_, 2014.
  """
  mu, nu = moments
  b1, b2 = hparams["b1"], hparams["b2"]
  mu = b1 * mu + (1.0 - b1) * grad
  nu = b2 * nu + (1.0 - b2) * (grad * grad)
  mu_hat = mu * hparams["inv_bc1"]
  nu_hat = nu * hparams["inv_bc2"]
  direction = mu_hat / (jnp.sqrt(nu_hat + hparams["eps_root"]) + hparams["eps"])
  return direction, (mu, nu)


class RuleSpec(NamedTuple):
  """A rule with its moments' code books and example hyperparameters."""

  rule: Any
  signed: tuple[bool, ...]  # per moment: signed (True) or unsigned map
  example_hparams: Any  # count -> hparams, with the optimizer's defaults


# Every rule of the library, for tests and kernel export checks.
RULES: dict[str, RuleSpec] = {
    "adam": RuleSpec(adam_rule, (True, False), lambda count: adam_hparams(0.9, 0.999, 1e-8, 0.0, count)),
}
