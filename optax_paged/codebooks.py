"""Code books of the 8-bit dynamic tree quantization, and tables to encode fast.

Pure numpy, no JAX: the 256-entry maps bitsandbytes uses for its 8-bit
optimizer states, rebuilt bit for bit, plus the lookup tables that turn
encoding into two table lookups and one compare (no search over the code
book at run time).

References:
  Dettmers, `8-Bit Approximations for Parallelism in Deep Learning
  <https://arxiv.org/abs/1511.04561>`_, 2016.
  Dettmers et al., `8-bit Optimizers via Block-wise Quantization
  <https://arxiv.org/abs/2110.02861>`_, 2022.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

_f32 = np.float32

# Index of the zero code in each map. The signed map holds 127 negative
# values, zero, 127 positive values and 1.0 (sorted); the unsigned map holds
# zero, 254 positive values and 1.0.
ZERO_CODE = {True: 127, False: 0}
# Index of 1.0 among the non-negative magnitudes (zero first).
LAST_MAGNITUDE = {True: 128, False: 255}


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
  """``torch.linspace(start, end, steps, dtype=torch.float32)``, bit for bit.

  PyTorch's CPU kernel computes ``start + step * i`` for the first half and
  ``end - step * (steps - 1 - i)`` for the second, in float32 with a fused
  multiply-add (one rounding). Evaluating the product and sum in float64
  (exact for these operands) and rounding once reproduces it; numpy's own
  ``linspace`` rounds differently in about 25 entries of each map.
  """
  start32, end32 = _f32(start), _f32(end)
  step = (end32 - start32) / _f32(steps - 1)
  i = np.arange(steps, dtype=np.float64)
  low = (np.float64(start32) + np.float64(step) * i).astype(_f32)
  high = (np.float64(end32) - np.float64(step) * (steps - 1 - i)).astype(_f32)
  return np.where(np.arange(steps) < steps // 2, low, high)


@functools.cache
def _dynamic_map(signed: bool) -> np.ndarray:
  total_bits, max_exponent_bits = 8, 7
  non_sign_bits = total_bits - 1
  values = []
  for i in range(max_exponent_bits):
    exp = i + non_sign_bits - max_exponent_bits
    fraction_items = 2**exp + 1 if signed else 2 ** (exp + 1) + 1
    boundaries = _torch_linspace_f32(0.1, 1.0, fraction_items)
    means = (boundaries[:-1] + boundaries[1:]) / _f32(2.0)
    scale = _f32(10.0 ** (-(max_exponent_bits - 1) + i))
    values.extend((scale * means).tolist())
    if signed:
      values.extend((-scale * means).tolist())
  # With 8 total bits and 7 exponent bits there are no "additional items".
  values.extend([0.0, 1.0])
  assert len(values) == 2**total_bits, len(values)
  table = np.sort(np.asarray(values, dtype=_f32))
  table.setflags(write=False)
  return table


def dynamic_map(signed: bool = True) -> np.ndarray:
  """Returns the 256-value dynamic tree code book used for 8-bit states.

  Bit-identical to bitsandbytes'
  ``bitsandbytes.functional.create_dynamic_map(signed=signed)`` (8 bits, 7
  maximum exponent bits): sorted float32 values in ``[-1, 1]`` (signed) or
  ``[0, 1]`` (unsigned), with more resolution near zero. The signed map is
  used for first moments (and all one-state optimizers), the unsigned map for
  second moments.

  Args:
    signed: whether the map covers negative values.

  Returns:
    A read-only ``np.ndarray`` of shape ``(256,)`` and dtype float32.
  """
  return _dynamic_map(bool(signed))


# Mantissa bits that, with the 8 exponent bits, index a cell of the encode
# table: cell = (float32 bits of |y|) >> CELL_SHIFT.
MANTISSA_BITS = 7
CELL_SHIFT = 23 - MANTISSA_BITS
# Cells cover every non-negative float32 below 2.0 (exponent field <= 127).
NUM_CELLS = 128 << MANTISSA_BITS


class EncodeTables(NamedTuple):
  """Tables that encode a magnitude ``r = |y|`` in ``[0, 2)`` to the nearest code.

  ``t = cell_code[c] + (r >= cell_threshold[c])`` with
  ``c = bits(r) >> CELL_SHIFT`` is the index of the nearest value in
  ``magnitudes`` (the non-negative half of the map, zero first). A cell holds
  at most one threshold (checked when the table is built); cells without one
  have threshold ``+inf``.
  """

  magnitudes: np.ndarray  # float32, non-negative codes, increasing
  cell_code: np.ndarray  # int32, NUM_CELLS entries
  cell_threshold: np.ndarray  # float32, NUM_CELLS entries
  # The thresholds' float32 bits as int32, with "no threshold" as INT32_MAX
  # (above the bits of +inf and NaN, so those never step past the last code).
  cell_threshold_bits: np.ndarray
  # Code and threshold in one int32, for one gather (XLA keeps a gather
  # fused only when it has one use; kernels make one load): ``code << 17``
  # plus ``2**17 - low``, where ``low`` is the threshold's low 16 bits (its
  # high bits are the cell's own) or 2**16 for "no threshold", so that adding
  # the magnitude's low 16 bits carries into the code exactly when they reach
  # the threshold: ``t = (p + (bits & 0xFFFF)) >> 17``.
  cell_carry: np.ndarray


def _first_float_above(x: np.ndarray) -> np.ndarray:
  """Smallest float32 strictly greater than each float64 value in ``x``."""
  y = x.astype(_f32)
  below = y.astype(np.float64) <= x
  return np.where(below, np.nextafter(y, _f32(np.inf)), y).astype(_f32)


@functools.cache
def encode_tables(signed: bool, keep_nonzero: bool = False) -> EncodeTables:
  """Builds the cell tables that encode magnitudes to the nearest code.

  Nearest is measured exactly: the threshold between neighbouring codes
  ``a < b`` is the smallest float32 strictly above the real midpoint
  ``(a + b) / 2`` (an exact tie goes to the smaller magnitude).

  Args:
    signed: which map.
    keep_nonzero: if True, every positive magnitude encodes to at least the
      smallest nonzero code (zero stays zero).

  Returns:
    ``EncodeTables``.
  """
  table = dynamic_map(signed).astype(np.float64)
  mags = table[table >= 0.0]  # zero, then the positive codes, then 1.0
  thresholds = _first_float_above((mags[:-1] + mags[1:]) / 2.0)
  cell = np.arange(NUM_CELLS, dtype=np.int64)
  lower = (cell << CELL_SHIFT).astype(np.uint32).view(_f32)
  upper = ((cell + 1) << CELL_SHIFT).astype(np.uint32).view(_f32)  # exclusive
  # Index of the nearest code for the smallest float of each cell, then the
  # one threshold (if any) inside the cell.
  code = np.searchsorted(thresholds, lower, side="right")
  nxt = np.append(thresholds, np.inf)[code]
  inside = nxt < upper
  assert np.all(np.append(thresholds, np.inf)[np.minimum(code + 1, len(thresholds))][inside] >= upper[inside]), (
      "a cell holds two thresholds: use more mantissa bits")
  threshold = np.where(inside, nxt, np.inf)
  if keep_nonzero:
    # Positive values below the first threshold still get code 1; cell 0
    # holds zero itself, so it compares against the smallest positive float.
    below_first = (code == 0) & (cell > 0)  # the 0 -> 1 threshold no longer matters
    code = np.where(below_first, 1, code)
    threshold = np.where(below_first, np.inf, threshold)
    threshold[0] = np.array(1, np.uint32).view(_f32)
    code[0] = 0
    assert thresholds[0] >= upper[0]
  cell_code = code.astype(np.int32)
  cell_threshold = threshold.astype(_f32)
  bits = np.where(np.isinf(cell_threshold), np.iinfo(np.int32).max, cell_threshold.view(np.int32))
  bits = bits.astype(np.int32)
  has = ~np.isinf(cell_threshold)
  assert np.all((bits[has] >> CELL_SHIFT) == cell[has]), "a threshold outside its cell"
  assert CELL_SHIFT == 16
  low = np.where(has, bits & 0xFFFF, 1 << 16)
  carry = ((cell_code.astype(np.int64) << 17) + ((1 << 17) - low)).astype(np.int32)
  for arr in (cell_code, cell_threshold, bits, carry):
    arr.setflags(write=False)
  return EncodeTables(mags.astype(_f32), cell_code, cell_threshold, bits, carry)


class CompactCarry(NamedTuple):
  """``cell_carry`` without its long run of equal entries at the low end (kernels).

  ``table[compact_index(cell)] == cell_carry[cell]`` for every cell, with
  ``compact_index(cell) = max(cell - offset, min(cell, 1))``: entry 0 is
  cell 0 (zero and the smallest subnormals), entry 1 every cell from 1 up to
  the first one that differs from cell 1 (all values too small to reach a
  nonzero code, or all keep_nonzero's smallest code), then one entry per cell
  from there to the last, padded with the last entry to a power of two
  (4096). 16 KiB instead of 64: on a GPU the encode gathers stay in the L1
  cache while gradients and codes stream through it.
  """

  table: np.ndarray  # int32
  offset: int


@functools.cache
def compact_cell_carry(signed: bool, keep_nonzero: bool = False) -> CompactCarry:
  """The ``cell_carry`` of :func:`encode_tables` as a :class:`CompactCarry`."""
  carry = encode_tables(signed, keep_nonzero).cell_carry
  first = 1 + int(np.flatnonzero(carry[1:] != carry[1])[0])
  table = np.concatenate([carry[:2], carry[first:]])
  size = 1 << int(np.ceil(np.log2(table.size)))
  table = np.pad(table, (0, size - table.size), mode="edge").astype(np.int32)
  table.setflags(write=False)
  return CompactCarry(table, first - 2)
