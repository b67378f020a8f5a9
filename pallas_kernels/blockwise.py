"""Pallas kernels for blockwise 8-bit state: quantize, dequantize, fused update.

Arrays are viewed as ``(num_blocks, block_size)``: one quantization block per
row, so a block's maximum is a reduction along the last axis of a tile of
rows. Every grid step loads a tile of whole blocks, so no block is split
between programs.

This module imports only jax and numpy. What is specific to a code book or an
optimizer comes from the caller as functions:

- ``decoders[i](codes_int32, tables) -> values``: the code book of moment
  ``i``;
- ``encoders[i](normalized, tables) -> codes``: nearest code of values in
  [-1, 1];
- ``tables``: small constant arrays (code books, encode tables) passed whole
  to every grid step; decoders and encoders receive their refs and may
  gather from them (GPU: a load at computed addresses, served from cache).
  TPU kernels cannot gather from a ref: there the codecs are arithmetic and
  ``tables`` is empty;
- ``rule(grad, moments, hparams) -> (direction, new_moments)``: the
  optimizer's elementwise rule; ``hparams`` values arrive as kernel inputs,
  so traced hyperparameters (schedules, ``optax.inject_hyperparams``) work.

Adding an optimizer never touches these kernels.

Lowering: TPU uses Mosaic TPU (tiles of whole blocks, rows in multiples of
32 so that ``uint8`` tiles fit the native (32, 128) layout); GPU uses the
Triton lowering, because Mosaic GPU (the default since JAX 0.9) rejects the
in-kernel reduction along an axis. Rounding is written with compares, never
``round`` (Triton has none).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

GPU_PLATFORMS = ("cuda", "rocm", "gpu")


def _platform(platform: str | None) -> str:
  return platform or jax.default_backend()


def compiler_params(platform: str | None = None, num_warps: int | None = None):
  """Compiler parameters for ``platform`` (default: the default backend)."""
  platform = _platform(platform)
  if platform in GPU_PLATFORMS:
    from jax.experimental.pallas import triton as pltriton
    return pltriton.CompilerParams(num_warps=num_warps or GPU_NUM_WARPS, num_stages=1)
  return None


# GPU (Triton) programs: elements per program and warps per program (the
# fastest of sweeps at 256M elements on an H200 and an H100,
# benchmarks/RESULTS.md).
GPU_TILE_ELEMENTS = 4096
GPU_NUM_WARPS = 8


def tile_rows(num_blocks: int, block_size: int, platform: str | None = None, interpret: bool = False) -> int:
  """Blocks (rows) per grid step for ``platform``.

  GPU (Triton): a power of two, ``GPU_TILE_ELEMENTS`` elements per program
  (at least one block). TPU: a multiple of 32 rows (native ``uint8``
  tiling), ~64K elements. Interpret mode: large tiles, since each grid step
  is a loop iteration on the host.
  """
  platform = _platform(platform)
  if platform in GPU_PLATFORMS and not interpret:
    rows = max(1, GPU_TILE_ELEMENTS // block_size)
    return min(rows, pl.next_power_of_2(num_blocks))
  target = 65536 if not interpret else max(65536, 1 << 20)
  rows = max(32, target // block_size)
  return num_blocks if num_blocks <= rows else rows


def _whole_tiles(rows, *arrays):
  """Pads ``arrays`` along axis 0 to whole tiles of ``rows``: ``(original rows, arrays)``.

  A compiled GPU kernel's last, partial tile wrote past the end of its
  outputs (seen on an H200 with JAX 0.11.2: the rows beyond the array landed
  in the next buffer, another moment's codes). With whole tiles no program
  reaches past the end. Interpret mode pads too, so that CPU tests run the
  same code.
  """
  n = arrays[0].shape[0]
  extra = -n % rows
  if not extra:
    return n, arrays
  pad = lambda x: jnp.pad(x, ((0, extra),) + ((0, 0),) * (x.ndim - 1))
  return n, tuple(pad(x) for x in arrays)


def _safe_inverse(absmax):
  safe = absmax > 0
  return jnp.where(safe, 1.0 / jnp.where(safe, absmax, 1.0), 0.0)


def _call(kernel, out_shape, in_specs, out_specs, grid, aliases, platform, interpret, name,
          num_warps=None):
  return pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=grid,
      in_specs=in_specs,
      out_specs=out_specs,
      input_output_aliases=aliases,
      interpret=interpret,
      compiler_params=None if interpret else compiler_params(platform, num_warps),
      name=name,
  )


def fused_update(
    rule: Callable,
    grad: jax.Array,
    codes: Sequence[jax.Array],
    absmax: Sequence[jax.Array],
    hparams: Mapping[str, jax.Array | float],
    *,
    decoders: Sequence[Callable],
    encoders: Sequence[Callable],
    tables: Sequence[jax.Array] = (),
    out_dtype=jnp.float32,
    interpret: bool = False,
    platform: str | None = None,
    rows: int | None = None,
    num_warps: int | None = None,
):
  """One fused pass: decode -> rule -> new block absmax -> encode, per tile.

  Args:
    rule: ``rule(grad, moments, hparams) -> (direction, new_moments)``, float32
      elementwise (it must keep non-finite values out of the new moments).
    grad: ``(num_blocks, block_size)`` gradient, any float dtype.
    codes: per moment, ``(num_blocks, block_size)`` ``uint8`` codes; updated
      in place (aliased to the outputs).
    absmax: per moment, ``(num_blocks,)`` float32 block scales; in place too.
    hparams: scalar hyperparameters, passed as one float32 kernel input.
    decoders: per moment, ``(codes int32, table refs) -> float32 code values``.
    encoders: per moment, ``(normalized float32, table refs) -> uint8 codes``.
    tables: 1-D constant arrays (power-of-two sizes on GPU) whose refs the
      decoders and encoders receive.
    out_dtype: dtype of the returned direction.
    interpret: run with the Pallas interpreter (any backend, slow).
    platform: lowering target (default: the default backend).
    rows: blocks per grid step (default: :func:`tile_rows`).
    num_warps: GPU only, warps per program (default ``GPU_NUM_WARPS``).

  Returns:
    ``(direction, new_codes, new_absmax)`` shaped like the inputs.
  """
  k = len(codes)
  num_blocks, block_size = grad.shape
  names = sorted(hparams)
  hvec = jnp.stack([jnp.asarray(hparams[n], jnp.float32) for n in names]).reshape(1, len(names))
  rows = rows or tile_rows(num_blocks, block_size, platform, interpret)
  n, (grad, *state) = _whole_tiles(rows, grad, *codes,
                                   *(a.reshape(num_blocks, 1) for a in absmax))
  padded_blocks = grad.shape[0]

  nt = len(tables)

  def kernel(h_ref, g_ref, *refs):
    t_refs, refs = refs[:nt], refs[nt:]
    c_refs, a_refs = refs[:k], refs[k:2 * k]
    d_ref, oc_refs, oa_refs = refs[2 * k], refs[2 * k + 1:3 * k + 1], refs[3 * k + 1:]
    hp = {n: h_ref[0, i] for i, n in enumerate(names)}
    g = g_ref[...].astype(jnp.float32)
    old = tuple(dec(c[...].astype(jnp.int32), t_refs) * a[...]
                for dec, c, a in zip(decoders, c_refs, a_refs))
    direction, new = rule(g, old, hp)
    d_ref[...] = direction.astype(d_ref.dtype)
    for n, enc, oc, oa in zip(new, encoders, oc_refs, oa_refs):
      scale = jnp.max(jnp.abs(n), axis=1, keepdims=True)
      oa[...] = scale
      oc[...] = enc(n * _safe_inverse(scale), t_refs)

  tile = pl.BlockSpec((rows, block_size), lambda i: (i, 0))
  scale_tile = pl.BlockSpec((rows, 1), lambda i: (i, 0))
  table_specs = [pl.BlockSpec(t.shape, lambda i: (0,)) for t in tables]
  in_specs = ([pl.BlockSpec((1, len(names)), lambda i: (0, 0)), tile] + table_specs
              + [tile] * k + [scale_tile] * k)
  out_specs = [tile] + [tile] * k + [scale_tile] * k
  out_shape = (
      [jax.ShapeDtypeStruct(grad.shape, out_dtype)]
      + [jax.ShapeDtypeStruct(grad.shape, jnp.uint8)] * k
      + [jax.ShapeDtypeStruct((padded_blocks, 1), jnp.float32)] * k
  )
  first = 2 + nt
  aliases = {first + i: 1 + i for i in range(k)} | {first + k + i: 1 + k + i for i in range(k)}
  out = _call(kernel, out_shape, in_specs, out_specs, (padded_blocks // rows,), aliases,
              platform, interpret, "optax_paged_fused_update", num_warps)(hvec, grad, *tables, *state)
  direction, new_codes, new_absmax = out[0][:n], out[1:1 + k], out[1 + k:]
  return (direction, tuple(c[:n] for c in new_codes),
          tuple(a[:n].reshape(num_blocks) for a in new_absmax))


def quantize(
    x: jax.Array,
    *,
    encoder: Callable,
    tables: Sequence[jax.Array] = (),
    interpret: bool = False,
    platform: str | None = None,
    rows: int | None = None,
):
  """Blockwise quantization of ``x`` (``(num_blocks, block_size)``).

  The block scale is the largest finite magnitude; NaN encodes like zero
  (the XLA codec's semantics). ``encoder(normalized, table_refs)`` and
  ``tables`` are as in :func:`fused_update`.

  Returns:
    ``(codes uint8 (num_blocks, block_size), absmax float32 (num_blocks,))``.
  """
  num_blocks, block_size = x.shape
  rows = rows or tile_rows(num_blocks, block_size, platform, interpret)
  nt = len(tables)

  def kernel(x_ref, *refs):
    t_refs, (c_ref, a_ref) = refs[:nt], refs[nt:]
    v = x_ref[...].astype(jnp.float32)
    mag = jnp.abs(v)
    scale = jnp.max(jnp.where(mag < jnp.inf, mag, 0.0), axis=1, keepdims=True)
    a_ref[...] = scale
    v = jnp.where(v == v, v, 0.0)  # NaN -> 0
    c_ref[...] = encoder(v * _safe_inverse(scale), t_refs)

  tile = pl.BlockSpec((rows, block_size), lambda i: (i, 0))
  n, (x,) = _whole_tiles(rows, x)
  codes, scale = _call(
      kernel,
      [jax.ShapeDtypeStruct(x.shape, jnp.uint8), jax.ShapeDtypeStruct((x.shape[0], 1), jnp.float32)],
      [tile] + [pl.BlockSpec(t.shape, lambda i: (0,)) for t in tables],
      [tile, pl.BlockSpec((rows, 1), lambda i: (i, 0))],
      (pl.cdiv(x.shape[0], rows),), {}, platform, interpret, "optax_paged_quantize",
  )(x, *tables)
  return codes[:n], scale[:n].reshape(num_blocks)


def dequantize(
    codes: jax.Array,
    absmax: jax.Array,
    *,
    decoder: Callable,
    tables: Sequence[jax.Array] = (),
    interpret: bool = False,
    platform: str | None = None,
    rows: int | None = None,
):
  """Inverse of :func:`quantize`: float32 ``(num_blocks, block_size)`` values."""
  num_blocks, block_size = codes.shape
  rows = rows or tile_rows(num_blocks, block_size, platform, interpret)
  nt = len(tables)

  def kernel(c_ref, a_ref, *refs):
    t_refs, o_ref = refs[:nt], refs[nt]
    o_ref[...] = decoder(c_ref[...].astype(jnp.int32), t_refs) * a_ref[...]

  tile = pl.BlockSpec((rows, block_size), lambda i: (i, 0))
  n, (codes, absmax) = _whole_tiles(rows, codes, absmax.reshape(num_blocks, 1))
  return _call(
      kernel, jax.ShapeDtypeStruct(codes.shape, jnp.float32),
      [tile, pl.BlockSpec((rows, 1), lambda i: (i, 0))]
      + [pl.BlockSpec(t.shape, lambda i: (0,)) for t in tables], tile,
      (pl.cdiv(codes.shape[0], rows),), {}, platform, interpret, "optax_paged_dequantize",
  )(codes, absmax, *tables)[:n]
