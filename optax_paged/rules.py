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


def _complement(decay):
  """``1 - decay``, in double precision when ``decay`` is a Python number.

  The kernels read float32 scalars; ``1 - float32(0.999)`` in float32 is off
  by 5e-5 relative, so complements are computed here, as optax does.
  """
  return 1.0 - decay


def adam_hparams(b1, b2, eps, eps_root, count) -> dict:
  """Scalars of :func:`adam_rule` for step ``count`` (from 1)."""
  count = jnp.asarray(count, jnp.float32)
  return dict(
      b1=b1, b2=b2, eps=eps, eps_root=eps_root,
      one_minus_b1=_complement(b1), one_minus_b2=_complement(b2),
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
  mu, nu = _adam_moments(grad, moments, hparams)
  return _adam_direction(mu * hparams["inv_bc1"], nu, hparams), (mu, nu)


def _adam_moments(grad, moments, hparams):
  """Adam's (and NAdam's) new first and second moments."""
  mu, nu = moments
  mu = hparams["b1"] * mu + hparams["one_minus_b1"] * grad
  nu = hparams["b2"] * nu + hparams["one_minus_b2"] * (grad * grad)
  return mu, nu


def _adam_direction(mu_hat, nu, hparams):
  """``mu_hat / (sqrt(nu_hat + eps_root) + eps)`` with the bias-corrected ``nu``."""
  nu_hat = nu * hparams["inv_bc2"]
  return mu_hat / (jnp.sqrt(nu_hat + hparams["eps_root"]) + hparams["eps"])


def nadam_hparams(b1, b2, eps, eps_root, count) -> dict:
  """Scalars of :func:`nadam_rule`: :func:`adam_hparams` and the next step's
  inverse first-moment bias correction."""
  hparams = adam_hparams(b1, b2, eps, eps_root, count)
  hparams["inv_bc1_next"] = _inverse_bias_correction(b1, jnp.asarray(count, jnp.float32) + 1.0)
  return hparams


def nadam_rule(
    grad: jax.Array, moments: Moments, hparams: Mapping[str, Any]
) -> tuple[jax.Array, Moments]:
  """Adam with Nesterov momentum, as ``optax.scale_by_adam(nesterov=True)``.

  The first moment in the direction looks one step ahead:
  ``b1 * mu / (1 - b1**(t+1)) + (1 - b1) * g / (1 - b1**t)``. The stored
  moments are Adam's. ``hparams``: as :func:`nadam_hparams`.

  References:
    Dozat, `Incorporating Nesterov Momentum into Adam
    <https://openreview.net/pdf?id=OM0jvwB8jIp57ZJjtNEZ>`_, 2016.
  """
  mu, nu = _adam_moments(grad, moments, hparams)
  mu_hat = (hparams["b1"] * (mu * hparams["inv_bc1_next"])
            + hparams["one_minus_b1"] * (grad * hparams["inv_bc1"]))
  return _adam_direction(mu_hat, nu, hparams), (mu, nu)


def _sign(x):
  """``sign(x)`` with compares (TPU kernels lower ``sign`` only on a device)."""
  return jnp.where(x > 0, 1.0, jnp.where(x < 0, -1.0, 0.0))


def lion_hparams(b1, b2) -> dict:
  """Scalars of :func:`lion_rule`."""
  return dict(b1=b1, b2=b2, one_minus_b1=_complement(b1), one_minus_b2=_complement(b2))


def lion_rule(grad, moments, hparams):
  """Lion: the update is the sign of an interpolation; then the momentum moves.

  bitsandbytes' and optax's order: direction from
  ``sign(b1 * m + (1 - b1) * g)``, then ``m = b2 * m + (1 - b2) * g``.

  References:
    Chen et al., `Symbolic Discovery of Optimization Algorithms
    <https://arxiv.org/abs/2302.06675>`_, 2023.
  """
  (mu,) = moments
  direction = _sign(hparams["one_minus_b1"] * grad + hparams["b1"] * mu)
  mu = hparams["b2"] * mu + hparams["one_minus_b2"] * grad
  return direction, (mu,)


def momentum_hparams(momentum) -> dict:
  """Scalars of :func:`momentum_rule` and :func:`nesterov_momentum_rule`."""
  return dict(momentum=momentum)


def momentum_rule(grad, moments, hparams):
  """Heavy-ball momentum (``optax.trace``): ``t = g + momentum * t``."""
  (trace,) = moments
  trace = grad + hparams["momentum"] * trace
  return trace, (trace,)


def nesterov_momentum_rule(grad, moments, hparams):
  """Nesterov momentum (``optax.trace(nesterov=True)``)."""
  (trace,) = moments
  trace = grad + hparams["momentum"] * trace
  return grad + hparams["momentum"] * trace, (trace,)


def rms_hparams(decay, eps, eps_in_sqrt, bias_correction, count) -> dict:
  """Scalars of :func:`rms_rule`.

  ``eps`` goes inside the square root (``eps_in_sqrt``) or outside it, so one
  rule covers both forms: ``g / (sqrt(nu + eps_inside) + eps_outside)``.
  """
  count = jnp.asarray(count, jnp.float32)
  inv_bc = _inverse_bias_correction(decay, count) if bias_correction else 1.0
  return dict(
      decay=decay,
      one_minus_decay=_complement(decay),
      eps_inside=eps if eps_in_sqrt else 0.0,
      eps_outside=0.0 if eps_in_sqrt else eps,
      inv_bc=inv_bc,
  )


def rms_rule(grad, moments, hparams):
  """RMSProp (``optax.scale_by_rms``).

  References:
    Tieleman & Hinton, Lecture 6.5 - RMSProp, COURSERA, 2012.
  """
  (nu,) = moments
  nu = hparams["decay"] * nu + hparams["one_minus_decay"] * (grad * grad)
  denom = jnp.sqrt(nu * hparams["inv_bc"] + hparams["eps_inside"]) + hparams["eps_outside"]
  return grad / denom, (nu,)


def rss_hparams(eps) -> dict:
  """Scalars of :func:`rss_rule`."""
  return dict(eps=eps)


def rss_rule(grad, moments, hparams):
  """Adagrad (``optax.scale_by_rss``): divides by the root of the sum of squares.

  References:
    Duchi et al., `Adaptive Subgradient Methods for Online Learning and
    Stochastic Optimization <https://jmlr.org/papers/v12/duchi11a.html>`_, 2011.
  """
  (sum_of_squares,) = moments
  sum_of_squares = sum_of_squares + grad * grad
  scale = jnp.where(sum_of_squares > 0, jax.lax.rsqrt(sum_of_squares + hparams["eps"]), 0.0)
  return scale * grad, (sum_of_squares,)


def rss_eps_outside_rule(grad, moments, hparams):
  """Adagrad as PyTorch and bitsandbytes write it: ``g / (sqrt(sum) + eps)``.

  :func:`rss_rule` (optax's form) adds ``eps`` inside the square root, so a
  small accumulator is floored at ``sqrt(eps)`` instead of ``eps``.
  """
  (sum_of_squares,) = moments
  sum_of_squares = sum_of_squares + grad * grad
  return grad / (jnp.sqrt(sum_of_squares) + hparams["eps"]), (sum_of_squares,)


def ademamix_hparams(b1, b2, b3, alpha, eps, eps_root, count) -> dict:
  """Scalars of :func:`ademamix_rule`; ``b3`` and ``alpha`` may be schedules.

  Schedules are evaluated at the number of steps already taken (``count - 1``),
  as ``optax.contrib.ademamix`` does.
  """
  step = jnp.asarray(count, jnp.int32) - 1
  count = jnp.asarray(count, jnp.float32)
  b3 = b3(step) if callable(b3) else b3
  return dict(
      b1=b1, b2=b2, eps=eps, eps_root=eps_root,
      one_minus_b1=_complement(b1), one_minus_b2=_complement(b2), one_minus_b3=_complement(b3),
      b3=b3,
      alpha=alpha(step) if callable(alpha) else alpha,
      inv_bc1=_inverse_bias_correction(b1, count),
      inv_bc2=_inverse_bias_correction(b2, count),
  )


def ademamix_rule(grad, moments, hparams):
  """AdEMAMix: Adam plus a slow momentum (``b3``) mixed in with weight ``alpha``.

  The slow momentum is not bias-corrected (as in the paper and optax).

  References:
    Pagliardini et al., `The AdEMAMix Optimizer: Better, Faster, Older
    <https://arxiv.org/abs/2409.03137>`_, 2024.
  """
  m1, m2, nu = moments
  m1 = hparams["b1"] * m1 + hparams["one_minus_b1"] * grad
  m2 = hparams["b3"] * m2 + hparams["one_minus_b3"] * grad
  nu = hparams["b2"] * nu + hparams["one_minus_b2"] * (grad * grad)
  numerator = m1 * hparams["inv_bc1"] + hparams["alpha"] * m2
  direction = numerator / (jnp.sqrt(nu * hparams["inv_bc2"] + hparams["eps_root"]) + hparams["eps"])
  return direction, (m1, m2, nu)


class RuleSpec(NamedTuple):
  """A rule with its moments' code books and example hyperparameters."""

  rule: Any
  signed: tuple[bool, ...]  # per moment: signed (True) or unsigned map
  example_hparams: Any  # count -> hparams, with the optimizer's defaults


# Every rule of the library, for tests and kernel export checks.
RULES: dict[str, RuleSpec] = {
    "adam": RuleSpec(adam_rule, (True, False), lambda c: adam_hparams(0.9, 0.999, 1e-8, 0.0, c)),
    "nadam": RuleSpec(nadam_rule, (True, False), lambda c: nadam_hparams(0.9, 0.999, 1e-8, 0.0, c)),
    "lion": RuleSpec(lion_rule, (True,), lambda c: lion_hparams(0.9, 0.99)),
    "momentum": RuleSpec(momentum_rule, (True,), lambda c: momentum_hparams(0.9)),
    "nesterov_momentum": RuleSpec(nesterov_momentum_rule, (True,), lambda c: momentum_hparams(0.9)),
    "rms": RuleSpec(rms_rule, (False,), lambda c: rms_hparams(0.9, 1e-8, True, False, c)),
    "rss": RuleSpec(rss_rule, (False,), lambda c: rss_hparams(1e-7)),
    "rss_eps_outside": RuleSpec(rss_eps_outside_rule, (False,), lambda c: rss_hparams(1e-10)),
    "ademamix": RuleSpec(ademamix_rule, (True, True, False),
                         lambda c: ademamix_hparams(0.9, 0.999, 0.9999, 5.0, 1e-8, 0.0, c)),
}
