"""Blockwise codec: error bounds, nearest-code exactness, shapes, bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_paged import QuantizedArray
from optax_paged import dequantize_blockwise
from optax_paged import dynamic_map
from optax_paged import quantize_blockwise
from optax_paged import quantization as qz


def _nearest_reference(x, block_size, signed):
  """Exact nearest code (argmin over all 256 values) in numpy float64."""
  x = np.asarray(x, np.float32).reshape(-1)
  n = x.size
  nb = -(-n // block_size)
  xb = np.zeros(nb * block_size, np.float32)
  xb[:n] = x
  xb = xb.reshape(nb, block_size)
  absmax = np.abs(xb).max(axis=1)
  inv = np.where(absmax > 0, np.float32(1) / np.where(absmax > 0, absmax, 1), 0).astype(np.float32)
  y = (xb * inv[:, None]).astype(np.float32).reshape(-1)[:n].astype(np.float64)
  table = dynamic_map(signed).astype(np.float64)
  if not signed:
    y = np.maximum(y, 0.0)
  dist = np.abs(y[:, None] - table[None])
  return dist, absmax


def _data(kind, shape, seed=0):
  rng = np.random.default_rng(seed)
  if kind == "normal":
    return rng.standard_normal(shape).astype(np.float32)
  if kind == "lognormal":
    return (rng.lognormal(-4, 3, shape) * rng.choice([-1, 1], shape)).astype(np.float32)
  if kind == "uniform":
    return rng.uniform(-1, 1, shape).astype(np.float32)
  raise ValueError(kind)


def test_error_bounds_standard_normal():
  # bitsandbytes' own bound for its dynamic blockwise quantization.
  x = jax.random.normal(jax.random.PRNGKey(0), (1024, 1024))
  y = dequantize_blockwise(quantize_blockwise(x))
  err = jnp.abs(x - y)
  assert float(err.mean()) < 0.011
  assert float((err / (jnp.abs(x) + 1e-8)).mean()) < 0.018


def test_error_bounds_unsigned():
  x = jnp.abs(jax.random.normal(jax.random.PRNGKey(1), (1024, 1024)))
  y = dequantize_blockwise(quantize_blockwise(x, signed=False), signed=False)
  err = jnp.abs(x - y)
  assert float(err.mean()) < 0.011
  assert float((err / (x + 1e-8)).mean()) < 0.018


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("kind", ["normal", "lognormal", "uniform"])
@pytest.mark.parametrize("block_size", [64, 256, 4096])
def test_codes_are_exact_nearest(signed, kind, block_size):
  x = _data(kind, (37, 1000), seed=block_size)
  if not signed:
    x = np.abs(x)
  q = quantize_blockwise(jnp.asarray(x), signed=signed, block_size=block_size)
  dist, absmax = _nearest_reference(x, block_size, signed)
  np.testing.assert_array_equal(np.asarray(q.absmax).reshape(-1), absmax)
  codes = np.asarray(q.codes).reshape(-1).astype(np.int64)
  chosen = dist[np.arange(codes.size), codes]
  best = dist.min(axis=1)
  # Equal distance: the nearest code, or the other side of an exact tie.
  np.testing.assert_array_equal(chosen, best)
  ties = (dist == best[:, None]).sum(axis=1) > 1
  assert ties.mean() < 1e-3


@pytest.mark.parametrize("signed", [True, False])
def test_encode_decode_encode_is_stable(signed):
  x = jax.random.normal(jax.random.PRNGKey(2), (512, 768))
  if not signed:
    x = jnp.abs(x)
  q1 = quantize_blockwise(x, signed=signed)
  y1 = dequantize_blockwise(q1, signed=signed)
  # Re-encoding decoded values with the same scales gives the same codes.
  yb = qz.to_blocks(y1, 256)
  again = qz.from_blocks(qz.encode(yb, q1.absmax, signed), y1.shape)
  np.testing.assert_array_equal(np.asarray(again), np.asarray(q1.codes))
  # A full second round trip is a fixed point where the block scale is kept
  # (blocks whose largest element is positive: it decodes to exactly absmax).
  q2 = quantize_blockwise(y1, signed=signed)
  y2 = dequantize_blockwise(q2, signed=signed)
  same = np.asarray(q2.absmax == q1.absmax)
  assert same.mean() > 0.4
  c1 = np.asarray(qz.to_blocks(q1.codes, 256))
  c2 = np.asarray(qz.to_blocks(q2.codes, 256))
  np.testing.assert_array_equal(c1[same], c2[same])
  # Elsewhere (largest element negative: no -1.0 code) values move by less
  # than the codec's resolution, and a third trip changes nothing further.
  assert float(jnp.abs(y2 - y1).max()) < 0.02 * float(jnp.abs(x).max())
  q3 = quantize_blockwise(y2, signed=signed)
  np.testing.assert_array_equal(np.asarray(q3.codes), np.asarray(q2.codes))


@pytest.mark.parametrize(
    "shape", [(), (1,), (255,), (257,), (3, 5, 7), (4, 512), (1000, 300), (2, 3, 1024)]
)
@pytest.mark.parametrize("block_size", [64, 256, 1024, 4096])
def test_any_shape_and_block_size(shape, block_size):
  x = jnp.asarray(_data("normal", shape, seed=len(shape)))
  q = quantize_blockwise(x, block_size=block_size)
  assert q.codes.shape == x.shape and q.codes.dtype == jnp.uint8
  assert q.absmax.dtype == jnp.float32
  assert q.absmax.size == math.ceil(x.size / block_size)
  if len(shape) and shape[-1] % block_size == 0:
    assert q.absmax.shape == shape[:-1] + (shape[-1] // block_size,)
  else:
    assert q.absmax.shape == (math.ceil(x.size / block_size),)
  y = dequantize_blockwise(q, block_size=block_size)
  assert y.shape == x.shape and y.dtype == jnp.float32
  # Largest gap between neighbouring codes is 0.9/64: half of it bounds the
  # error relative to the block scale.
  scale = np.repeat(np.asarray(q.absmax).reshape(-1), block_size)[: x.size]
  err = np.abs(np.asarray(y - x)).reshape(-1)
  assert np.all(err <= scale * (0.9 / 64 / 2 + 1e-6))


def test_blocks_along_the_last_axis_are_the_flattened_blocks():
  # Blocks along the last axis are the same elements as blocks of the
  # row-major flattened array, bitsandbytes' layout (compared with
  # bitsandbytes itself in test_parity_bitsandbytes.py).
  x = jnp.asarray(_data("lognormal", (8, 1024)))
  q = quantize_blockwise(x)
  flat = quantize_blockwise(x.reshape(-1))
  np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1), np.asarray(flat.codes))
  np.testing.assert_array_equal(np.asarray(q.absmax).reshape(-1), np.asarray(flat.absmax))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_input(dtype):
  x = jax.random.normal(jax.random.PRNGKey(3), (64, 256)).astype(dtype)
  q = quantize_blockwise(x)
  ref = quantize_blockwise(x.astype(jnp.float32))
  np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(ref.codes))


@pytest.mark.parametrize("block_size", [0, 32, 100, 255, 8192, 256.0, True, "256", None])
def test_bad_block_size_is_value_error(block_size):
  with pytest.raises(ValueError, match="block_size"):
    quantize_blockwise(jnp.ones(512), block_size=block_size)
  with pytest.raises(ValueError, match="block_size"):
    dequantize_blockwise(QuantizedArray(jnp.zeros(512, jnp.uint8), jnp.ones(2)), block_size=block_size)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.complex64, jnp.bool_])
def test_non_float_input_is_type_error(dtype):
  with pytest.raises(TypeError, match="floating"):
    quantize_blockwise(jnp.zeros(256, dtype))


def test_mismatched_block_size_on_decode_is_value_error():
  q = quantize_blockwise(jnp.ones(1000), block_size=64)
  with pytest.raises(ValueError, match="wrong block_size"):
    dequantize_blockwise(q, block_size=128)


def test_non_finite_elements_do_not_rescale_their_block():
  x = np.asarray(_data("normal", (4, 256)))
  bad = x.copy()
  bad[0, 3], bad[1, 7], bad[2, 9] = np.nan, np.inf, -np.inf
  q, qb = quantize_blockwise(jnp.asarray(x)), quantize_blockwise(jnp.asarray(bad))
  ok = np.isfinite(bad)
  ok_x = np.where(ok, x, 0)
  np.testing.assert_array_equal(np.asarray(qb.absmax).reshape(-1), np.abs(ok_x).max(axis=1))
  # Same scale where the removed element was not the block max: same codes.
  keep = np.asarray(q.absmax).reshape(-1) == np.asarray(qb.absmax).reshape(-1)
  codes, codes_bad = np.asarray(q.codes), np.asarray(qb.codes)
  assert np.array_equal(codes[keep][ok[keep]], codes_bad[keep][ok[keep]])
  table = dynamic_map(True)
  assert table[codes_bad[0, 3]] == 0.0
  assert table[codes_bad[1, 7]] == 1.0
  assert table[codes_bad[2, 9]] == table[0]
  # Unsigned: +inf takes the top code, never wraps around to zero.
  qu = quantize_blockwise(jnp.abs(jnp.asarray(bad)), signed=False)
  assert dynamic_map(False)[np.asarray(qu.codes)[1, 7]] == 1.0


def test_zero_block_encodes_to_zero():
  x = jnp.zeros((2, 256)).at[1, 0].set(3.0)
  q = quantize_blockwise(x)
  assert float(q.absmax[0, 0]) == 0.0
  y = dequantize_blockwise(q)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


def test_codec_works_under_jit():
  """Inside a user's jit (traced, inlined): the nearest codes, decoded exactly."""
  f = jax.jit(lambda x: dequantize_blockwise(quantize_blockwise(x, block_size=128), block_size=128))
  x = jax.random.normal(jax.random.PRNGKey(4), (3, 1000))
  dist, absmax = _nearest_reference(x, 128, True)
  nearest = dynamic_map(True)[np.argmin(dist, axis=1)]  # ties: either code is nearest
  expected = nearest * np.repeat(absmax, 128)[: x.size]
  got = np.asarray(f(x)).reshape(-1)
  tie = np.sort(dist, axis=1)[:, 1] - np.sort(dist, axis=1)[:, 0] < 1e-12
  np.testing.assert_allclose(got[~tie], expected[~tie].astype(np.float32), rtol=1e-6, atol=0)


@pytest.mark.parametrize("signed", [True, False])
def test_arithmetic_decode_is_the_table(signed):
  values = np.asarray(qz.code_value(jnp.arange(256), signed))
  np.testing.assert_array_equal(values.view(np.uint32), dynamic_map(signed).view(np.uint32))


def _hard_values(signed, seed=0):
  """Floats within 40 ulps of every midpoint, a log grid, normals, edge values."""
  from optax_paged import codebooks
  rng = np.random.default_rng(seed)
  mags = codebooks.encode_tables(signed).magnitudes.astype(np.float64)
  mids = ((mags[:-1] + mags[1:]) / 2).astype(np.float32)
  around = (mids[:, None].view(np.int32) + np.arange(-40, 41, dtype=np.int32)[None]).reshape(-1).view(np.float32)
  vals = np.concatenate([
      around, -around, np.logspace(-9, 0, 50_000).astype(np.float32),
      rng.standard_normal(50_000).astype(np.float32) / 5,
      np.array([0, -0.0, 1, -1, 1e-45, -1e-45, 1e-30, 0.9999999, -0.9999999], np.float32),
  ])
  if not signed:
    vals = np.abs(vals)
  return np.clip(vals, -1, 1).astype(np.float32)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("keep_nonzero", [False, True])
def test_arithmetic_encode_equals_table_encode(signed, keep_nonzero):
  x = jnp.asarray(_hard_values(signed))[None]
  one = jnp.ones((1,))
  np.testing.assert_array_equal(
      np.asarray(qz.encode_arith(x, one, signed, keep_nonzero)), np.asarray(qz.encode(x, one, signed, keep_nonzero))
  )


@pytest.mark.parametrize("signed", [True, False])
def test_keep_nonzero_keeps_zero_at_zero_and_lifts_tiny_values(signed):
  zero = 127 if signed else 0
  x = jnp.asarray([[0.0, -0.0, 1e-9, 1e-30, 0.5]], jnp.float32)
  for enc in (qz.encode, qz.encode_arith):
    codes = np.asarray(enc(x, jnp.ones((1,)), signed, True))[0]
    assert codes[0] == codes[1] == zero
    assert codes[2] == codes[3] == zero + 1
    plain = np.asarray(enc(x, jnp.ones((1,)), signed, False))[0]
    assert plain[2] == zero and plain[4] == codes[4]


@pytest.mark.parametrize("signed", [True, False])
def test_codec_against_bitsandbytes_quantize_blockwise(signed):
  """bitsandbytes' own CPU codec on the same tensor: the same blocks and scales
  bit for bit; the codes equal, except where bitsandbytes' search lands one code
  off the nearest (~0.1% of elements here) and ours is the nearer one."""
  from conftest import require
  torch = require("torch")
  functional = require("bitsandbytes.functional")
  rng = np.random.default_rng(7)
  x = (rng.standard_normal((8, 1024)) * np.logspace(-3, 0, 1024)).astype(np.float32)
  if not signed:
    x = np.abs(x)
  code = functional.create_dynamic_map(signed=signed)
  theirs, stats = functional.quantize_blockwise(torch.from_numpy(x), code=code, blocksize=256)
  ours = quantize_blockwise(jnp.asarray(x), signed=signed, block_size=256)
  np.testing.assert_array_equal(np.asarray(ours.absmax).reshape(-1), stats.absmax.numpy())
  a, b = np.asarray(ours.codes).reshape(-1).astype(int), theirs.numpy().reshape(-1).astype(int)
  differ = a != b
  assert differ.mean() < 0.01 and np.all(np.abs(a - b)[differ] == 1)
  table = dynamic_map(signed).astype(np.float64)
  y = (x.reshape(-1, 256) * (np.float32(1) / stats.absmax.numpy()[:, None])).reshape(-1).astype(np.float64)
  assert np.all(np.abs(y - table[a])[differ] < np.abs(y - table[b])[differ])
