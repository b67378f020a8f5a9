"""Checks shared by the kernel tests: a kernel's fused update against the XLA path."""

import jax
import jax.numpy as jnp
import numpy as np

from optax_paged import dynamic_map
from optax_paged import quantization as qz
from optax_paged import transform


def inputs(shape, block_size, signed, dtype, seed=0):
  """Gradient with scales spread over 4 decades, and a non-trivial state."""
  k = jax.random.split(jax.random.PRNGKey(seed), 4 + len(signed))
  scale = 10.0 ** jax.random.uniform(k[0], shape, minval=-4, maxval=0)
  grad = (jax.random.normal(k[1], shape) * scale).astype(dtype)
  codes, absmax = [], []
  for i, s in enumerate(signed):
    x = jax.random.normal(k[2 + i], shape) * scale
    q = qz.quantize_blockwise(x if s else jnp.abs(x), signed=s, block_size=block_size)
    codes.append(q.codes)
    absmax.append(q.absmax)
  return grad, tuple(codes), tuple(absmax)


def assert_matches_xla_path(spec, grad, codes, absmax, hparams, block_size, xla, kernel):
  """``kernel``'s ``(direction, codes, scales)`` equal the XLA path's ``xla``.

  Codes are identical except where float32 rounding of the new moment (XLA
  contracts multiply-adds into FMAs differently in differently compiled
  bodies) puts it within a few ulps of the midpoint between two codes.
  """
  d_x, c_x, a_x = xla
  d_p, c_p, a_p = kernel
  old = tuple(qz.dequantize_blockwise(qz.QuantizedArray(c, a), signed=s, block_size=block_size)
              for c, a, s in zip(codes, absmax, spec.signed))
  _, new = transform._guarded_rule(spec.rule, grad.astype(jnp.float32), old, hparams)
  for x, p, n, a, s in zip(c_x, c_p, new, a_x, spec.signed):
    x, p = np.asarray(x), np.asarray(p)
    assert x.shape == p.shape and p.dtype == np.uint8
    differ = x != p
    assert differ.mean() < 1e-3
    if differ.any():
      scale = np.repeat(np.asarray(a).reshape(-1), block_size)[: x.size].reshape(x.shape)
      y = np.asarray(n)[differ] / scale[differ]
      table = dynamic_map(s).astype(np.float64)
      mid = (table[x[differ]] + table[p[differ]]) / 2
      assert np.all(np.abs(x[differ].astype(int) - p[differ]) == 1)
      np.testing.assert_allclose(y, mid, rtol=1e-5, atol=1e-9)
  for x, p in zip(a_x, a_p):
    assert x.shape == p.shape
    np.testing.assert_allclose(np.asarray(x), np.asarray(p), rtol=1e-6, atol=0)
  assert d_p.dtype == grad.dtype and d_p.shape == grad.shape
  # Directions to float32 rounding: relative to the largest one, since a rule
  # may cancel (AdEMAMix adds two momenta) and FMA contraction differs.
  dx = np.asarray(d_x.astype(grad.dtype).astype(jnp.float32))
  dp = np.asarray(d_p.astype(jnp.float32))
  finite = np.isfinite(dx)
  np.testing.assert_array_equal(finite, np.isfinite(dp))
  np.testing.assert_allclose(dx[finite], dp[finite], rtol=1e-6 if grad.dtype == jnp.float32 else 1e-2,
                             atol=1e-6 * np.abs(dx[finite]).max())
