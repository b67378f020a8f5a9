"""Pallas kernels for blockwise 8-bit state: quantize, dequantize, fused update.

Arrays are viewed as ``(num_blocks, block_size)``: one quantization block per
row, so a block's maximum is a reduction along the last axis of a tile of
rows. Every grid step loads a tile of whole blocks, so no block is split
between programs.

This module imports only jax and numpy. What is specific to a code book or an
optimizer comes from the caller as functions:

- ``decoders[i](codes_int32) -> values``: the code book of moment ``i``,
  computed arithmetically (GPU Triton kernels cannot gather);
- ``encoders[i](normalized) -> codes``: nearest code of values in [-1, 1];
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


def compiler_params(platform: str | None = None):
  """Compiler parameters for ``platform`` (default: the default backend)."""
  platform = _platform(platform)
  if platform in GPU_PLATFORMS:
    from jax.experimental.pallas import triton as pltriton
    return pltriton.CompilerParams(num_warps=4, num_stages=1)
  return None


def tile_rows(num_blocks: int, block_size: int, platform: str | None = None, interpret: bool = False) -> int:
  """Blocks (rows) per grid step for ``platform``.

  GPU (Triton): a power of two, ~8K elements per program. TPU: a multiple
  of 32 rows (native ``uint8`` tiling), ~64K elements. Interpret mode: large
  tiles, since each grid step is a loop iteration on the host.
  """
  platform = _platform(platform)
  if platform in GPU_PLATFORMS and not interpret:
    rows = max(1, 8192 // block_size)
    return min(rows, pl.next_power_of_2(num_blocks))
  target = 65536 if not interpret else max(65536, 1 << 20)
  rows = max(32, target // block_size)
  return num_blocks if num_blocks <= rows else rows


def _safe_inverse(absmax):
  safe = absmax > 0
  return jnp.where(safe, 1.0 / jnp.where(safe, absmax, 1.0), 0.0)


def _call(kernel, out_shape, in_specs, out_specs, grid, aliases, platform, interpret, name):
  return pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=grid,
      in_specs=in_specs,
      out_specs=out_specs,
      input_output_aliases=aliases,
      interpret=interpret,
      compiler_params=None if interpret else compiler_params(platform),
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
    out_dtype=jnp.float32,
    interpret: bool = False,
    platform: str | None = None,
    rows: int | None = None,
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
    decoders: per moment, ``codes (int32) -> float32 code values``.
    encoders: per moment, ``normalized float32 -> uint8 codes``.
    out_dtype: dtype of the returned direction.
    interpret: run with the Pallas interpreter (any backend, slow).
    platform: lowering target (default: the default backend).
    rows: blocks per grid step (default: :func:`tile_rows`).

  Returns:
    ``(direction, new_codes, new_absmax)`` shaped like the inputs.
  """
  k = len(codes)
  num_blocks, block_size = grad.shape
  names = sorted(hparams)
  hvec = jnp.stack([jnp.asarray(hparams[n], jnp.float32) for n in names]).reshape(1, len(names))
  rows = rows or tile_rows(num_blocks, block_size, platform, interpret)

  def kernel(h_ref, g_ref, *refs):
    c_refs, a_refs = refs[:k], refs[k:2 * k]
    d_ref, oc_refs, oa_refs = refs[2 * k], refs[2 * k + 1:3 * k + 1], refs[3 * k + 1:]
    hp = {n: h_ref[0, i] for i, n in enumerate(names)}
    g = g_ref[...].astype(jnp.float32)
    old = tuple(dec(c[...].astype(jnp.int32)) * a[...] for dec, c, a in zip(decoders, c_refs, a_refs))
    direction, new = rule(g, old, hp)
    d_ref[...] = direction.astype(d_ref.dtype)
    for n, enc, oc, oa in zip(new, encoders, oc_refs, oa_refs):
      scale = jnp.max(jnp.abs(n), axis=1, keepdims=True)
      oa[...] = scale
      oc[...] = enc(n * _safe_inverse(scale))

  tile = pl.BlockSpec((rows, block_size), lambda i: (i, 0))
  scale_tile = pl.BlockSpec((rows, 1), lambda i: (i, 0))
  in_specs = [pl.BlockSpec((1, len(names)), lambda i: (0, 0)), tile] + [tile] * k + [scale_tile] * k
  out_specs = [tile] + [tile] * k + [scale_tile] * k
  out_shape = (
      [jax.ShapeDtypeStruct(grad.shape, out_dtype)]
      + [jax.ShapeDtypeStruct(grad.shape, jnp.uint8)] * k
      + [jax.ShapeDtypeStruct((num_blocks, 1), jnp.float32)] * k
  )
  aliases = {2 + i: 1 + i for i in range(k)} | {2 + k + i: 1 + k + i for i in range(k)}
  out = _call(kernel, out_shape, in_specs, out_specs, (pl.cdiv(num_blocks, rows),), aliases,
              platform, interpret, "optax_paged_fused_update")(
      hvec, grad, *codes, *(a.reshape(num_blocks, 1) for a in absmax))
  direction, new_codes, new_absmax = out[0], out[1:1 + k], out[1 + k:]
  return direction, tuple(new_codes), tuple(a.reshape(num_blocks) for a in new_absmax)


def quantize(
    x: jax.Array,
    *,
    encoder: Callable,
    interpret: bool = False,
    platform: str | None = None,
    rows: int | None = None,
):
  """Blockwise quantization of ``x`` (``(num_blocks, block_size)``).

  The block scale is the largest finite magnitude; NaN encodes like zero
  (the XLA codec's semantics).

  Returns:
    ``(codes uint8 (num_blocks, block_size), absmax float32 (num_blocks,))``.
  """
  num_blocks, block_size = x.shape
  rows = rows or tile_rows(num_blocks, block_size, platform, interpret)

  def kernel(x_ref, c_ref, a_ref):
    v = x_ref[...].astype(jnp.float32)
    mag = jnp.abs(v)
    scale = jnp.max(jnp.where(mag < jnp.inf, mag, 0.0), axis=1, keepdims=True)
    a_ref[...] = scale
    v = jnp.where(v == v, v, 0.0)  # NaN -> 0
    c_ref[...] = encoder(v * _safe_inverse(scale))

  tile = pl.BlockSpec((rows, block_size), lambda i: (i, 0))
  codes, scale = _call(
      kernel,
      [jax.ShapeDtypeStruct(x.shape, jnp.uint8), jax.ShapeDtypeStruct((num_blocks, 1), jnp.float32)],
      [tile], [tile, pl.BlockSpec((rows, 1), lambda i: (i, 0))],
      (pl.cdiv(num_blocks, rows),), {}, platform, interpret, "optax_paged_quantize",
  )(x)
  return codes, scale.reshape(num_blocks)


def dequantize(
    codes: jax.Array,
    absmax: jax.Array,
    *,
    decoder: Callable,
    interpret: bool = False,
    platform: str | None = None,
    rows: int | None = None,
):
  """Inverse of :func:`quantize`: float32 ``(num_blocks, block_size)`` values."""
  num_blocks, block_size = codes.shape
  rows = rows or tile_rows(num_blocks, block_size, platform, interpret)

  def kernel(c_ref, a_ref, o_ref):
    o_ref[...] = decoder(c_ref[...].astype(jnp.int32)) * a_ref[...]

  tile = pl.BlockSpec((rows, block_size), lambda i: (i, 0))
  return _call(
      kernel, jax.ShapeDtypeStruct(codes.shape, jnp.float32),
      [tile, pl.BlockSpec((rows, 1), lambda i: (i, 0))], tile,
      (pl.cdiv(num_blocks, rows),), {}, platform, interpret, "optax_paged_dequantize",
  )(codes, absmax.reshape(num_blocks, 1))
