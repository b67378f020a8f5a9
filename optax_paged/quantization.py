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
from collections.abc import Callable
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


def _layout_problem(shape, mesh, spec, block_size: int, axes) -> str | None:
  """Why blocks of ``shape`` sharded as ``spec`` over mesh ``axes`` straddle shards, or None."""
  def parts(entry):
    names = () if entry is None else entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[n] for n in names if n in axes)

  counts = [parts(e) for e in spec] + [1] * (len(shape) - len(spec))
  if all(c == 1 for c in counts):
    return None
  if not blocks_along_last_axis(shape, block_size):
    return (f"its blocks run over the flattened array (last axis {shape[-1]} is not a "
            f"multiple of block_size={block_size}), which a sharded array is not reshaped into")
  if (shape[-1] // counts[-1]) % block_size:
    return (f"each shard of its last axis holds {shape[-1] // counts[-1]} elements, not a "
            f"multiple of block_size={block_size}")
  return None


def explicit_sharding_problem(x, block_size: int) -> str | None:
  """Why ``x``'s sharding over explicit mesh axes cannot hold whole blocks, or None.

  Blocks must not straddle shards: they lie along the last axis, and each
  shard of that axis holds whole blocks. Under automatic axes XLA reshards
  instead (correct, with the state replicated: see :func:`sharding_problem`);
  explicit axes refuse.
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh, spec = getattr(sharding, "mesh", None), getattr(sharding, "spec", None)
  explicit = set(getattr(mesh, "explicit_axes", None) or ())
  if not explicit or spec is None:
    return None
  return _layout_problem(x.shape, mesh, spec, block_size, explicit)


def sharding_problem(x, block_size: int) -> str | None:
  """:func:`explicit_sharding_problem` for a concrete array, over all its mesh axes."""
  sharding = getattr(x, "sharding", None)
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return None
  return _layout_problem(x.shape, sharding.mesh, sharding.spec, block_size,
                         set(sharding.mesh.axis_names))


SHARDING_ADVICE = ("Shard it so that each shard's last axis is a multiple of the block size "
                   "(e.g. along the first axis, when the last one is), choose a block_size that "
                   "divides it, replicate it, or keep it in float32 (quantize_mask, "
                   "min_8bit_size).")


def to_blocks(x: jax.Array, block_size: int, pad_value=0) -> jax.Array:
  """Reshapes ``x`` to its blocked view, padding the last block with ``pad_value``."""
  problem = explicit_sharding_problem(x, block_size)
  if problem:
    raise ValueError(
        f"An array of shape {tuple(x.shape)} sharded as {jax.typeof(x).sharding.spec} over "
        f"explicit mesh axes cannot be quantized in blocks of {block_size}: {problem}. "
        + SHARDING_ADVICE)
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


def _pow2(exponent: jax.Array) -> jax.Array:
  """Exact float32 ``2.0 ** exponent`` for integer exponents in [-126, 127]."""
  return jax.lax.bitcast_convert_type(jnp.left_shift(exponent + 127, 23), jnp.float32)


def _linspace_point(k: jax.Array, e: jax.Array) -> jax.Array:
  """Point ``k`` of ``torch.linspace(0.1, 1, 2**e + 1)`` in float32, exactly.

  torch rounds ``0.1f + step * k`` (first half) or ``1 - step * (n - k)``
  (second half) once, as a fused multiply-add, with ``step = 0.9f / 2**e``
  exact. With ``0.1f = 13421773 * 2**-27`` and ``0.9f = 15099494 * 2**-24``
  the exact sum is an integer times a power of two that fits in int32 (after
  dividing by 16 when ``e >= 4``); the int32 -> float32 conversion rounds to
  nearest even: the same single rounding, with no float64 and nothing a
  compiler could contract into a differently rounded FMA.
  """
  n = jnp.left_shift(1, e)
  big = e >= 4
  step = jnp.where(big, 7549747, 120795952)  # 0.9f / 2**e in the chosen unit
  low = jnp.where(big, jnp.left_shift(13421773, jnp.maximum(e - 4, 0)),
                  jnp.left_shift(13421773, e)) + step * k
  high = jnp.left_shift(1, jnp.where(big, 23 + e, 27 + e)) - step * (n - k)
  units = jnp.where(k < ((n + 1) >> 1), low, high)  # shift: no sign() (TPU lowering)
  return units.astype(jnp.float32) * _pow2(jnp.where(big, -23 - e, -27 - e))


_DECADE_SCALES = tuple(np.float32(10.0 ** (i - 6)) for i in range(7))


def _select(index: jax.Array, values) -> jax.Array:
  """``values[index]`` for a short tuple of constants, as a chain of selects."""
  out = jnp.float32(values[-1])
  for i in range(len(values) - 2, -1, -1):
    out = jnp.where(index == i, jnp.float32(values[i]), out)
  return out


def magnitude_value(t: jax.Array, signed: bool) -> jax.Array:
  """Value of magnitude index ``t`` (0 = zero, then the positive codes, last = 1.0).

  Arithmetic and bit-identical to :func:`codebooks.dynamic_map`: no table
  gather, so it fuses into reductions on CPU and runs inside Pallas kernels
  (GPU Triton kernels cannot gather). Positive code ``p = t - 1`` lies in
  decade ``i`` holding ``n = 2**i`` (signed) or ``2**(i+1)`` (unsigned)
  means of ``linspace(0.1, 1, n + 1)``, scaled by ``10**(i-6)``.
  """
  t = t.astype(jnp.int32)
  q = jnp.maximum(t if signed else t + 1, 1)  # n + j
  e = (jax.lax.bitcast_convert_type(q.astype(jnp.float32), jnp.int32) >> 23) - 127
  j = q - jnp.left_shift(1, e)
  mean = (_linspace_point(j, e) + _linspace_point(j + 1, e)) * 0.5
  value = _select(e if signed else e - 1, _DECADE_SCALES) * mean
  value = jnp.where(t == 0, 0.0, value)
  return jnp.where(t == codebooks.LAST_MAGNITUDE[signed], 1.0, value)


def code_value(codes: jax.Array, signed: bool) -> jax.Array:
  """``dynamic_map(signed)[codes]``, computed arithmetically (exact)."""
  c = codes.astype(jnp.int32)
  if not signed:
    return magnitude_value(c, False)
  zero = codebooks.ZERO_CODE[True]
  v = magnitude_value(jnp.abs(c - zero), True)
  return jnp.where(c < zero, -v, v)


def decode(codes: jax.Array, absmax: jax.Array, signed: bool) -> jax.Array:
  """Decodes blocked ``codes`` with per-block ``absmax``, arithmetically.

  Equal to :func:`decode_exact` (the table gather) bit for bit; use this one
  where a gather cannot go (reductions on CPU, GPU kernels).
  """
  return code_value(codes, signed) * absmax[..., None]


def decode_exact(
    codes: jax.Array, absmax: jax.Array, signed: bool, table_copy: int = 0
) -> jax.Array:
  """Decodes with the exact code book: ``dynamic_map(signed)[codes] * absmax``.

  Args:
    codes: blocked ``uint8`` codes.
    absmax: per-block scales.
    signed: which code book.
    table_copy: gather from a copy of the code book padded with this many
      unused entries: the same values from a distinct table constant. XLA
      then keeps several decodes of the same codes as separate gathers, each
      fused into its own consumer, instead of sharing one gather and storing
      its float32 result.
  """
  table = np.pad(codebooks.dynamic_map(signed), (0, int(table_copy)))
  return lookup(table, codes.astype(jnp.int32)) * absmax[..., None]


def blocks_absmax(arrays, mask: jax.Array | None = None) -> tuple[jax.Array, ...]:
  """Largest magnitude of each block, for several blocked arrays at once.

  One variadic max/min reduction over all arrays. Besides reading the inputs
  once, a variadic reduce keeps XLA:CPU on its own reduction emitter, which
  fuses the elementwise producer (decode -> rule) into the reduction instead
  of materializing it as a float32 temporary the size of the parameter.

  Args:
    arrays: blocked float32 arrays of equal shape, all finite.
    mask: optional blocked mask of real (non-padding) elements.

  Returns:
    One ``absmax`` array (``shape[:-1]``) per input.
  """
  if mask is not None:
    arrays = [jnp.where(mask, a, 0.0) for a in arrays]
  operands = [x for a in arrays for x in (a, a)]
  inits = [v for _ in arrays for v in (jnp.float32(-jnp.inf), jnp.float32(jnp.inf))]

  def reducer(acc, val):
    out = []
    for i in range(0, len(acc), 2):
      out += [jnp.maximum(acc[i], val[i]), jnp.minimum(acc[i + 1], val[i + 1])]
    return tuple(out)

  res = jax.lax.reduce(tuple(operands), tuple(inits), reducer, (operands[0].ndim - 1,))
  return tuple(jnp.maximum(res[i], -res[i + 1]) for i in range(0, len(res), 2))


def block_absmax(xb: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Largest finite magnitude of each block of the blocked view ``xb``.

  Non-finite elements (and padding, where ``mask`` is given) are ignored so
  that one bad value cannot change the scale of its 255 neighbours.
  """
  (absmax,) = blocks_absmax([jnp.where(jnp.isfinite(xb), xb, 0.0)], mask)
  return absmax


def encode(
    xb: jax.Array, absmax: jax.Array, signed: bool, keep_nonzero: bool = False
) -> jax.Array:
  """Encodes the blocked float32 values ``xb`` to ``uint8`` codes.

  Each element gets the code nearest to ``x * (1 / absmax)`` (multiplying by
  the reciprocal, as bitsandbytes does); blocks with ``absmax == 0`` encode to
  the zero code. With the unsigned map, negative values encode to zero.

  One lookup in a table indexed by the float's exponent and top mantissa
  bits, plus an add that carries into the code exactly when the low mantissa
  bits reach the cell's threshold, gives the exact nearest code, with no
  search over the code book.

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
  carry = codebooks.encode_tables(signed, keep_nonzero).cell_carry
  # One gather with one use, so that XLA fuses it into its consumer (a
  # gather used twice would be stored: 3x slower on CPU; two gathers, code
  # and threshold, measured ~20% slower than this).
  return encode_normalized_lut(normalize(xb, absmax), signed, lambda cell: lookup(carry, cell))


def _safe_inverse(absmax: jax.Array) -> jax.Array:
  """``1 / absmax``, and 0 for empty blocks (``absmax == 0``)."""
  safe = absmax > 0
  return jnp.where(safe, 1.0 / jnp.where(safe, absmax, 1.0), 0.0)


# Above this a block scale's reciprocal is subnormal, which CPUs (and GPU
# kernels) flush to zero: the whole block would encode to the zero code.
_HUGE_SCALE = 2.0**126


def normalize(xb: jax.Array, absmax: jax.Array) -> jax.Array:
  """``xb * (1 / absmax)`` per block, as bitsandbytes rounds it (0 for empty blocks).

  Blocks whose scale exceeds ``2**126`` are first multiplied by ``2**-64``
  (values and scale alike; exact), so that the reciprocal stays a normal
  number; every other block multiplies by exactly 1.
  """
  shrink = jnp.where(absmax > _HUGE_SCALE, 2.0**-64, 1.0)
  return (xb * shrink[..., None]) * _safe_inverse(absmax * shrink)[..., None]


def encode_normalized_lut(y: jax.Array, signed: bool, carry_lookup: Callable) -> jax.Array:
  """Nearest codes of normalized values ``y`` with one table load (kernels).

  Args:
    y: float32 normalized values.
    signed: which code book.
    carry_lookup: ``cell (int32) -> codebooks.encode_tables(signed,
      keep_nonzero).cell_carry[cell]``, e.g. a load from a kernel's table
      input.

  Returns:
    ``uint8`` codes of ``y``'s shape.
  """
  return _encode_with_cells(y, signed, lambda cell, mag_bits: carry_code(carry_lookup(cell), mag_bits))


def _encode_with_cells(y: jax.Array, signed: bool, magnitude_index: Callable) -> jax.Array:
  """Shared body of the table encoders: ``magnitude_index(cell, mag_bits)``."""
  bits = jax.lax.bitcast_convert_type(y, jnp.int32)
  if not signed:
    # Negative values (and -0.0) to zero, on the bits: a float max would
    # also flush subnormals to zero on CPUs that treat them as zero.
    bits = jnp.maximum(bits, 0)
  mag_bits = bits & 0x7FFFFFFF
  # |y| <= 1 up to rounding; min() only guards the table bounds. The compare
  # is on integers: for non-negative floats the order is the same, and CPUs
  # that treat subnormals as zero would otherwise see the smallest threshold
  # (for keep_nonzero) as 0.0 and move exact zeros off the zero code.
  cell = jnp.minimum(mag_bits >> codebooks.CELL_SHIFT, codebooks.NUM_CELLS - 1)
  t = magnitude_index(cell, mag_bits)
  if not signed:
    return t.astype(jnp.uint8)
  # Negative values: code = 127 - t, and there is no -1.0 (t <= 127).
  neg = bits >> 31  # 0 or -1
  t = jnp.minimum(t, codebooks.LAST_MAGNITUDE[True] + neg)
  return (codebooks.ZERO_CODE[True] + ((t ^ neg) - neg)).astype(jnp.uint8)


def compact_index(cell: jax.Array, offset: int) -> jax.Array:
  """Index into ``codebooks.CompactCarry.table`` of an encode-table cell."""
  return jnp.maximum(cell - offset, jnp.minimum(cell, 1))


def carry_code(carry: jax.Array, mag_bits: jax.Array) -> jax.Array:
  """Magnitude index from a ``cell_carry`` entry and the magnitude's bits."""
  return (carry + (mag_bits & 0xFFFF)) >> 17


_DECADE_INVERSE = tuple(np.float32(10.0 ** (6 - i)) for i in range(7))


def _decade_starts(signed: bool) -> tuple:
  """Smallest code value of decades 1..6 (exact float32 constants)."""
  mags = codebooks.encode_tables(signed).magnitudes
  first = [2**i for i in range(1, 7)] if signed else [2 ** (i + 1) - 1 for i in range(1, 7)]
  return tuple(mags[t] for t in first)


def encode_arith(
    xb: jax.Array, absmax: jax.Array, signed: bool, keep_nonzero: bool = False
) -> jax.Array:
  """:func:`encode` without table lookups (for kernels that cannot gather).

  Same codes as :func:`encode`, bit for bit. Args and returns: as :func:`encode`.
  """
  return encode_normalized(normalize(xb, absmax), signed, keep_nonzero)


def encode_normalized(y: jax.Array, signed: bool, keep_nonzero: bool = False) -> jax.Array:
  """Nearest codes of normalized values ``y`` (``|y| <= 1``), arithmetically.

  The decade comes from six compares against exact constants, the position
  in the decade from its linear spacing (an estimate, off by at most one
  right next to a code value, where it cannot change the result), and the
  choice between the two neighbouring codes from an exact comparison with
  their real midpoint: ``2r - (a + b)`` against the rounding error of
  ``a + b`` (TwoSum). Only compares, integer ops and float adds, so no
  compiler contraction can change a result.

  Args:
    y: float32 normalized values (finite).
    signed: which code book.
    keep_nonzero: as in :func:`encode`.

  Returns:
    ``uint8`` codes of ``y``'s shape.
  """
  bits = jax.lax.bitcast_convert_type(y, jnp.int32)
  if not signed:
    bits = jnp.maximum(bits, 0)  # as in _encode_with_cells
  r = jax.lax.bitcast_convert_type(bits & 0x7FFFFFFF, jnp.float32)
  decade = jnp.zeros(r.shape, jnp.int32)
  for start in _decade_starts(signed):
    decade = decade + (r >= start).astype(jnp.int32)
  e = decade if signed else decade + 1
  n = jnp.left_shift(1, e)
  u = (r * _select(decade, _DECADE_INVERSE) - 0.1) * (n.astype(jnp.float32) * (1.0 / 0.9)) - 0.5
  j = jnp.clip(jnp.floor(jnp.minimum(u, 256.0)).astype(jnp.int32), -1, n - 1)
  first = n if signed else n - 1  # magnitude index of the decade's first code
  last = codebooks.LAST_MAGNITUDE[signed]
  t = jnp.clip(first + j, 0, last - 1)
  a = magnitude_value(t, signed)
  b = magnitude_value(t + 1, signed)
  s = a + b
  b_virtual = s - a
  err = (a - (s - b_virtual)) + (b - b_virtual)
  t = t + ((2.0 * r - s) > err).astype(jnp.int32)
  if keep_nonzero:  # on the bits: see encode()
    t = jnp.maximum(t, ((bits & 0x7FFFFFFF) != 0).astype(jnp.int32))
  if not signed:
    return t.astype(jnp.uint8)
  neg = bits >> 31
  t = jnp.minimum(t, last + neg)
  return (codebooks.ZERO_CODE[True] + ((t ^ neg) - neg)).astype(jnp.uint8)


def quantize_blockwise(
    x: jax.Array, *, signed: bool = True, block_size: int = 256, keep_nonzero: bool = False
) -> QuantizedArray:
  """Quantizes ``x`` to 8-bit dynamic-tree codes with one scale per block.

  Args:
    x: a floating-point array of any shape.
    signed: use the signed map (values in ``[-absmax, absmax]``) or the
      unsigned one (non-negative values; negatives encode to zero).
    block_size: elements per block, a power of two in [64, 4096].
    keep_nonzero: if True, a nonzero value never gets the zero code but the
      smallest code of its sign, as the optimizers store their moments (see
      :func:`encode`). False (the default) is bitsandbytes'
      ``quantize_blockwise``.

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
  return _quantize(x, bool(signed), block_size, bool(keep_nonzero))


# Jitted so that eager calls compile once per shape instead of once per op.
@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize(x, signed, block_size, keep_nonzero=False):
  xb = to_blocks(x.astype(jnp.float32), block_size)
  absmax = block_absmax(xb)
  xb = jnp.where(jnp.isnan(xb), 0.0, xb)
  codes = encode(xb, absmax, signed, keep_nonzero=keep_nonzero)
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
  absmax = q.absmax
  if tuple(absmax.shape) != expected and tuple(absmax.shape) == (math.prod(expected),):
    absmax = absmax.reshape(expected)  # bitsandbytes' layout: one flat array of scales
  if tuple(absmax.shape) != expected:
    raise ValueError(
        f"absmax has shape {tuple(q.absmax.shape)} but codes of shape {shape} "
        f"with block_size={block_size} need {expected} (or {math.prod(expected)} scales in "
        "one flat array, as bitsandbytes stores them): wrong block_size?"
    )
  return _dequantize(q.codes, absmax, bool(signed), block_size)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _dequantize(codes, absmax, signed, block_size):
  cb = to_blocks(codes, block_size, pad_value=codebooks.ZERO_CODE[signed])
  return from_blocks(decode_exact(cb, absmax, signed), codes.shape)
