"""Blockwise 8-bit quantization of arrays (the XLA path).

An array is cut into blocks of ``block_size`` consecutive elements of its
row-major flattened form (as bitsandbytes does). Each block stores one float32
scale, its largest finite magnitude (``absmax``), and each element stores the
index (``uint8``) of the code-book value nearest to ``x / absmax``.

When the last axis is a multiple of the block size the blocks lie along the
last axis, so ``codes`` keep ``x``'s shape and ``absmax`` has shape
``x.shape[:-1] + (x.shape[-1] // block_size,)``: both can carry the sharding of
``x``. Otherwise ``absmax`` is one-dimensional, ``(ceil(x.size / block_size),)``,
and the last partial block is padded inside the computation (with zeros,
never with uninitialised values).

References:
  Dettmers et al., `8-bit Optimizers via Block-wise Quantization
  <https://arxiv.org/abs/2110.02861>`_, 2022.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_paged import codebooks

MIN_BLOCK_SIZE = 64
MAX_BLOCK_SIZE = 4096


class QuantizedArray(NamedTuple):
  """An array stored as 8-bit codes with one float32 scale per block.

  Attributes:
    codes: ``uint8`` array with the shape of the original array.
    absmax: ``float32`` array, one value per block (see module docstring).
  """

  codes: jax.Array
  absmax: jax.Array


def check_block_size(block_size) -> int:
  """Returns ``block_size`` if it is a power of two in [64, 4096], else raises.

  Args:
    block_size: the requested block size.

  Returns:
    ``block_size`` as an ``int``.

  Raises:
    ValueError: for anything that is not such a power of two.
  """
  ok = (
      isinstance(block_size, (int, np.integer))
      and not isinstance(block_size, bool)
      and MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE
      and block_size & (block_size - 1) == 0
  )
  if not ok:
    raise ValueError(
        f"block_size must be a power of two between {MIN_BLOCK_SIZE} and "
        f"{MAX_BLOCK_SIZE} (e.g. 256, the bitsandbytes default), got "
        f"{block_size!r}."
    )
  return int(block_size)


def blocks_along_last_axis(shape, block_size: int) -> bool:
  """Whether blocks of ``shape`` lie along its last axis (no padding)."""
  return len(shape) >= 1 and shape[-1] % block_size == 0 and shape[-1] > 0


def blocked_shape(shape, block_size: int) -> tuple[int, ...]:
  """Shape of the blocked view: ``absmax`` shape plus ``(block_size,)``."""
  shape = tuple(shape)
  if blocks_along_last_axis(shape, block_size):
    return shape[:-1] + (shape[-1] // block_size, block_size)
  return (-(-math.prod(shape) // block_size), block_size)


def absmax_shape(shape, block_size: int) -> tuple[int, ...]:
  """Shape of the ``absmax`` array for an array of ``shape``."""
  return blocked_shape(shape, block_size)[:-1]


def to_blocks(x: jax.Array, block_size: int, pad_value=0) -> jax.Array:
  """Reshapes ``x`` to its blocked view, padding the last block with ``pad_value``."""
  shape = blocked_shape(x.shape, block_size)
  if blocks_along_last_axis(x.shape, block_size):
    return x.reshape(shape)
  flat = x.reshape(-1)
  pad = shape[0] * block_size - flat.shape[0]
  if pad:
    flat = jnp.pad(flat, (0, pad), constant_values=pad_value)
  return flat.reshape(shape)


def from_blocks(xb: jax.Array, shape) -> jax.Array:
  """Inverse of :func:`to_blocks`: drops the padding and restores ``shape``."""
  shape = tuple(shape)
  n = math.prod(shape)
  if xb.size == n:
    return xb.reshape(shape)
  return xb.reshape(-1)[:n].reshape(shape)


def padding_mask(shape, block_size: int) -> jax.Array | None:
  """Boolean blocked-view mask of real (not padding) elements, or ``None``."""
  bshape = blocked_shape(shape, block_size)
  n = math.prod(tuple(shape))
  if math.prod(bshape) == n:
    return None
  idx = jax.lax.broadcasted_iota(jnp.int32, bshape, 0) * block_size
  idx = idx + jax.lax.broadcasted_iota(jnp.int32, bshape, 1)
  return idx < n


def lookup(table, index: jax.Array) -> jax.Array:
  """``table[index]`` for a small constant table, sharded like ``index``.

  Under a mesh with explicit axes (``jax.make_mesh``'s default) a gather from
  a replicated table must be told that its output follows the index.
  """
  table = jnp.asarray(table)
  sharding = jax.typeof(index).sharding
  mesh = getattr(sharding, "mesh", None)
  if mesh is not None and getattr(mesh, "explicit_axes", ()):
    return table.at[index].get(mode="promise_in_bounds", out_sharding=sharding)
  return table.at[index].get(mode="promise_in_bounds")


def decode(codes: jax.Array, absmax: jax.Array, signed: bool) -> jax.Array:
  """Decodes blocked ``codes`` with per-block ``absmax`` to float32 values."""
  values = lookup(codebooks.dynamic_map(signed), codes.astype(jnp.int32))
  return values * absmax[..., None]


def block_absmax(xb: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Largest finite magnitude of each block of the blocked view ``xb``.

  Non-finite elements (and padding, where ``mask`` is given) are ignored so
  that one bad value cannot change the scale of its 255 neighbours.
  """
  mag = jnp.abs(xb)
  keep = jnp.isfinite(mag)
  if mask is not None:
    keep = keep & mask
  return jnp.max(jnp.where(keep, mag, 0.0), axis=-1)


def _encode_magnitude(r: jax.Array, tables: codebooks.EncodeTables) -> jax.Array:
  """Index into ``tables.magnitudes`` of the value nearest to ``r >= 0``."""
  bits = jax.lax.bitcast_convert_type(r, jnp.int32)
  shift = 23 - tables.mantissa_bits
  cell = (bits >> shift) - (tables.min_exponent << tables.mantissa_bits)
  cell = jnp.clip(cell, 0, tables.cell_code.shape[0] - 1)
  code = lookup(tables.cell_code, cell)
  threshold = lookup(tables.cell_threshold, cell)
  return code + (r >= threshold).astype(jnp.int32)


def encode(
    xb: jax.Array, absmax: jax.Array, signed: bool, keep_nonzero: bool = False
) -> jax.Array:
  """Encodes the blocked float32 values ``xb`` to ``uint8`` codes.

  Each element gets the code nearest to ``x * (1 / absmax)`` (multiplying by
  the reciprocal, as bitsandbytes does); blocks with ``absmax == 0`` encode to
  the zero code. With the unsigned map, negative values encode to zero.

  Args:
    xb: blocked float32 values, finite.
    absmax: per-block scales, ``xb.shape[:-1]``.
    signed: which code book.
    keep_nonzero: if True, a nonzero value never encodes to the zero code but
      to the smallest code of its sign. For first moments this keeps the sign
      (bitsandbytes does this for negative values); for second moments it
      avoids the zero-point problem, where a positive second moment stored as
      zero makes ``m / (sqrt(v) + eps)`` explode (Li et al., 2023,
      https://arxiv.org/abs/2309.01507).

  Returns:
    ``uint8`` codes with ``xb``'s shape.
  """
  tables = codebooks.encode_tables(signed)
  safe = absmax > 0
  inv = jnp.where(safe, 1.0 / jnp.where(safe, absmax, 1.0), 0.0)
  y = xb * inv[..., None]
  mag = jnp.abs(y) if signed else jnp.maximum(y, 0.0)
  t = _encode_magnitude(mag, tables)
  if keep_nonzero:
    t = jnp.maximum(t, (mag > 0).astype(jnp.int32))
  if not signed:
    return t.astype(jnp.uint8)
  zero = codebooks.ZERO_CODE[True]
  # Negative magnitudes have no -1.0 code: clamp to the most negative one.
  return jnp.where(y < 0, zero - jnp.minimum(t, zero), zero + t).astype(jnp.uint8)


def quantize_blockwise(
    x: jax.Array, *, signed: bool = True, block_size: int = 256
) -> QuantizedArray:
  """Quantizes ``x`` to 8-bit dynamic-tree codes with one scale per block.

  Args:
    x: a floating-point array of any shape.
    signed: use the signed map (values in ``[-absmax, absmax]``) or the
      unsigned one (non-negative values; negatives encode to zero).
    block_size: elements per block, a power of two in [64, 4096].

  Returns:
    A ``QuantizedArray``: ``codes`` (``uint8``, ``x.shape``) and ``absmax``
    (float32, :func:`absmax_shape`). Each code is the one nearest to
    ``x * (1 / absmax)``; ties go to the smaller magnitude. ``absmax`` is the
    largest *finite* magnitude of the block; NaN encodes to zero and +-inf to
    the extreme codes, so a non-finite element never rescales its block.
  """
  block_size = check_block_size(block_size)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"quantize_blockwise needs a floating array, got {x.dtype}.")
  return _quantize(x, bool(signed), block_size)


# Jitted so that eager calls compile once per shape instead of once per op.
@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize(x, signed, block_size):
  xb = to_blocks(x.astype(jnp.float32), block_size)
  absmax = block_absmax(xb)
  xb = jnp.where(jnp.isnan(xb), 0.0, xb)
  codes = encode(xb, absmax, signed)
  return QuantizedArray(from_blocks(codes, x.shape), absmax)


def dequantize_blockwise(
    q: QuantizedArray, *, signed: bool = True, block_size: int = 256
) -> jax.Array:
  """Inverse of :func:`quantize_blockwise`: float32 values of ``q``'s shape.

  Args:
    q: a ``QuantizedArray`` (or anything with ``codes`` and ``absmax``).
    signed: the map the codes were made with.
    block_size: the block size the codes were made with.

  Returns:
    A float32 array with ``q.codes.shape``.
  """
  block_size = check_block_size(block_size)
  shape = q.codes.shape
  expected = absmax_shape(shape, block_size)
  if tuple(q.absmax.shape) != expected:
    raise ValueError(
        f"absmax has shape {tuple(q.absmax.shape)} but codes of shape {shape} "
        f"with block_size={block_size} need {expected}: wrong block_size?"
    )
  return _dequantize(q.codes, q.absmax, bool(signed), block_size)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _dequantize(codes, absmax, signed, block_size):
  cb = to_blocks(codes, block_size, pad_value=codebooks.ZERO_CODE[signed])
  return from_blocks(decode(cb, absmax, signed), codes.shape)
