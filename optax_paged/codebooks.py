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


class EncodeTables(NamedTuple):
  """Tables that encode a normalized magnitude ``r`` in ``[0, 1]``.

  ``code = cell_code[cell(r)] + (r >= cell_threshold[cell(r)])`` where
  ``cell(r)`` is read off the float32 bits of ``r`` (exponent and the top
  ``mantissa_bits`` of the mantissa). Codes index ``magnitudes``, the
  non-negative half of the map in increasing order (zero first).
  """

  magnitudes: np.ndarray  # float32, non-negative codes, increasing
  cell_code: np.ndarray  # int32, one entry per cell
  cell_threshold: np.ndarray  # float32, one entry per cell
  min_exponent: int  # biased float32 exponent of the first cell
  mantissa_bits: int


def _first_float_above(x: np.ndarray) -> np.ndarray:
  """Smallest float32 strictly greater than each float64 value in ``x``."""
  y = x.astype(_f32)
  below = y.astype(np.float64) <= x
  return np.where(below, np.nextafter(y, _f32(np.inf)), y).astype(_f32)


@functools.cache
def encode_tables(signed: bool, mantissa_bits: int = 8) -> EncodeTables:
  """Builds the cell tables to encode magnitudes into the nearest code.

  Nearest is measured exactly: the threshold between two neighbouring codes
  ``a < b`` is the smallest float32 strictly above the real midpoint
  ``(a + b) / 2`` (an exact tie goes to the smaller magnitude).

  Args:
    signed: which map.
    mantissa_bits: mantissa bits that index a cell within each binade. Each
      cell must contain at most one threshold; this is checked.

  Returns:
    ``EncodeTables``.
  """
  table = dynamic_map(signed).astype(np.float64)
  mags = table[table >= 0.0]  # zero, then the positive codes, then 1.0
  thresholds = _first_float_above((mags[:-1] + mags[1:]) / 2.0)
  # Everything below 2**-24 encodes to zero (the smallest threshold is ~1.6e-7
  # for the unsigned map, 2.75e-7 for the signed one; both above 2**-23).
  assert thresholds[0] > 2.0**-23
  min_exponent = 127 - 24
  num_cells = (127 - min_exponent + 1) << mantissa_bits
  cell = np.arange(num_cells, dtype=np.int64)
  lower_bits = (cell + (min_exponent << mantissa_bits)) << (23 - mantissa_bits)
  lower = lower_bits.astype(np.uint32).view(_f32)
  # Code of the smallest float in the cell: number of thresholds <= lower.
  cell_code = np.searchsorted(thresholds, lower, side="right").astype(np.int32)
  # Clamp so the "+1" never leaves the table (r <= 1 keeps it exact).
  cell_code = np.minimum(cell_code, len(mags) - 2).astype(np.int32)
  cell_threshold = thresholds[cell_code]
  # Soundness: no cell may contain a second threshold, i.e. the next
  # threshold after the one used lies above the cell's largest float.
  upper_bits = lower_bits + (1 << (23 - mantissa_bits)) - 1
  upper = np.minimum(upper_bits.astype(np.uint32).view(_f32), _f32(1.0))
  nxt = np.append(thresholds, np.inf)[cell_code + 1]
  assert np.all(nxt > upper), "mantissa_bits too small for this map"
  for arr in (cell_code, cell_threshold):
    arr.setflags(write=False)
  return EncodeTables(
      magnitudes=mags.astype(_f32),
      cell_code=cell_code,
      cell_threshold=cell_threshold.astype(_f32),
      min_exponent=min_exponent,
      mantissa_bits=mantissa_bits,
  )
