"""The code books are bitsandbytes' maps, bit for bit, and the encode tables are sound."""

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require
from optax_paged import codebooks
from optax_paged import dynamic_map
from optax_paged import quantization as qz


def _reference_map(signed):
  """bitsandbytes' create_dynamic_map, written out with torch's float32 linspace."""
  torch = require("torch")
  data = []
  for i in range(7):
    items = 2**i + 1 if signed else 2 ** (i + 1) + 1
    boundaries = torch.linspace(0.1, 1, items, dtype=torch.float32)
    means = (boundaries[:-1] + boundaries[1:]) / 2.0
    data += ((10 ** (-6 + i)) * means).tolist()
    if signed:
      data += (-(10 ** (-6 + i)) * means).tolist()
  data += [0, 1.0]
  data.sort()
  return torch.tensor(data, dtype=torch.float32).numpy()


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_bit_identical_to_reference_construction(signed):
  ours = dynamic_map(signed)
  assert ours.dtype == np.float32 and ours.shape == (256,)
  np.testing.assert_array_equal(ours.view(np.uint32), _reference_map(signed).view(np.uint32))


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_bit_identical_to_bitsandbytes(signed):
  require("torch")
  functional = require("bitsandbytes.functional")
  theirs = functional.create_dynamic_map(signed=signed).numpy()
  np.testing.assert_array_equal(dynamic_map(signed).view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("signed", [True, False])
def test_map_structure(signed):
  m = dynamic_map(signed).astype(np.float64)
  assert np.all(np.diff(m) > 0), "strictly increasing, no duplicate codes"
  assert m[-1] == 1.0
  assert m[codebooks.ZERO_CODE[signed]] == 0.0
  if signed:
    # Negative half mirrors the positive half, without -1.0.
    np.testing.assert_array_equal(-m[:127][::-1], m[128:255])
  # Analytic form: decade i (10**(i-6)) holds 2**i (signed) or 2**(i+1)
  # (unsigned) linearly spaced means of [0.1, 1]; float32 rounding only.
  pos = m[m > 0][:-1]
  expected = []
  for i in range(7):
    n = 2**i if signed else 2 ** (i + 1)
    b = np.linspace(0.1, 1.0, n + 1)
    expected += list(10.0 ** (i - 6) * (b[:-1] + b[1:]) / 2)
  np.testing.assert_allclose(pos, np.sort(expected), rtol=2e-7)


def test_dynamic_map_is_read_only():
  with pytest.raises(ValueError):
    dynamic_map(True)[0] = 1.0


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("keep_nonzero", [False, True])
def test_encode_tables_give_nearest_code_for_every_float_near_thresholds(signed, keep_nonzero):
  t = codebooks.encode_tables(signed, keep_nonzero)
  mags = t.magnitudes.astype(np.float64)
  # All floats within 64 ulps of every midpoint, a dense log grid, the ends
  # and the smallest positive floats.
  mids = ((mags[:-1] + mags[1:]) / 2).astype(np.float32)
  around = mids[:, None].view(np.int32) + np.arange(-64, 65, dtype=np.int32)[None]
  grid = np.concatenate([
      around.reshape(-1).view(np.float32),
      np.logspace(-9, 0, 50_001).astype(np.float32),
      np.array([0.0, 1.0, 1e-45, 1e-38, 1e-30, 2.0**-24, 1.0000001], np.float32),
  ])
  grid = grid[(grid >= 0) & (grid < 2)]
  cell = grid.view(np.int32) >> codebooks.CELL_SHIFT
  got = t.cell_code[cell] + (grid >= t.cell_threshold[cell])
  dist = np.abs(np.minimum(grid.astype(np.float64), 1.0)[:, None] - mags[None])
  best = dist.min(axis=1)
  nearest = dist.argmin(axis=1)
  if keep_nonzero:
    nearest = np.where(grid > 0, np.maximum(nearest, 1), nearest)
    np.testing.assert_array_equal(got, nearest)
  else:
    np.testing.assert_array_equal(dist[np.arange(len(grid)), got], best)


def test_encode_tables_hold_at_most_one_threshold_per_cell():
  for signed in (True, False):
    mags = dynamic_map(signed).astype(np.float64)
    mags = mags[mags >= 0]
    thresholds = codebooks._first_float_above((mags[:-1] + mags[1:]) / 2)
    cells = thresholds.view(np.uint32) >> codebooks.CELL_SHIFT
    assert len(np.unique(cells)) == len(cells)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("keep_nonzero", [False, True])
def test_one_gather_table_equals_code_and_threshold_tables(signed, keep_nonzero):
  """cell_carry (XLA path and kernels) against the code and threshold tables.

  Every cell, at the low halves where a result can change: 0, 0xFFFF and
  around the cell's threshold.
  """
  t = codebooks.encode_tables(signed, keep_nonzero)
  cell = np.arange(codebooks.NUM_CELLS, dtype=np.int64)
  thr = t.cell_threshold_bits.astype(np.int64) & 0xFFFF
  lows = np.stack([0 * cell, 0 * cell + 0xFFFF, thr, (thr - 1) & 0xFFFF, (thr + 1) & 0xFFFF], 1)
  bits = (cell[:, None] << codebooks.CELL_SHIFT) | lows
  expected = t.cell_code[:, None] + (bits >= t.cell_threshold_bits[:, None])
  carry = (t.cell_carry[:, None].astype(np.int64) + lows) >> 17
  np.testing.assert_array_equal(carry, expected)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("keep_nonzero", [False, True])
def test_compact_table_reads_the_full_table_entry_of_every_cell(signed, keep_nonzero):
  full = codebooks.encode_tables(signed, keep_nonzero).cell_carry
  compact = codebooks.compact_cell_carry(signed, keep_nonzero)
  index = np.asarray(qz.compact_index(jnp.arange(codebooks.NUM_CELLS), compact.offset))
  assert compact.table.size & (compact.table.size - 1) == 0  # a power of two (Triton)
  assert compact.table.size * 4 <= 16384 < full.size * 4
  np.testing.assert_array_equal(compact.table[index], full)
