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
  is a loop iteration on the host. Rows beyond the last whole tile are
  handled by :func:`_tiled_call`.
  """
  platform = _platform(platform)
  if platform in GPU_PLATFORMS and not interpret:
    rows = max(1, GPU_TILE_ELEMENTS // block_size)
    return min(rows, 1 << max(num_blocks.bit_length() - 1, 0))
  target = 65536 if not interpret else max(65536, 1 << 20)
  rows = max(32, target // block_size)
  return max(num_blocks, 1) if num_blocks <= rows else rows


def _pad_rows(rows, arrays):
  """Pads ``arrays`` along axis 0 to whole tiles of ``rows`` (TPU)."""
  extra = -arrays[0].shape[0] % rows
  if not extra:
    return arrays
  return [jnp.pad(x, ((0, extra),) + ((0, 0),) * (x.ndim - 1)) for x in arrays]


def _tiled_call(kernel, args, tiled, out_shape, aliases, rows, platform, interpret, name,
                num_warps=None):
  """``kernel`` over the row tiles of the ``tiled`` arguments and of every output.

  Untiled arguments (hyperparameters, tables) are passed whole to every
  program. No program reaches past the end of an array: a compiled GPU
  kernel's last, partial tile wrote past the end of its outputs (seen on an
  H200 with JAX 0.11.2: the rows beyond the array landed in the next buffer,
  another moment's codes). Whole tiles of ``rows`` go in one call; the rows
  left over in further calls with tiles of the largest power of two rows
  that fits and divides the rows done (at most ``log2(rows)`` calls for a
  power-of-two ``rows``), each updating the previous call's outputs in
  place. So nothing is padded or sliced: a padded copy would cost a pass
  over every array and lose the in-place update of the codes. TPU tiles
  must be multiples of 32 rows: there the arrays are padded to whole tiles
  and the results sliced.

  Returns:
    the outputs, with as many rows as the tiled arguments.
  """
  n = next(a.shape[0] for a, t in zip(args, tiled) if t)
  out_shape = _varying_like([a for a, t in zip(args, tiled) if t], list(out_shape))
  if n == 0:
    return [jnp.zeros(o.shape, o.dtype) for o in out_shape]

  def specs(arrays, is_tiled, r, first):
    return [pl.BlockSpec((r,) + x.shape[1:], lambda i, nd=x.ndim: (i + first,) + (0,) * (nd - 1))
            if t else pl.BlockSpec(x.shape, lambda i, nd=x.ndim: (0,) * nd)
            for x, t in zip(arrays, is_tiled)]

  if _platform(platform) == "tpu" and not interpret:
    padded = _pad_rows(rows, [a for a, t in zip(args, tiled) if t])
    it = iter(padded)
    args = [next(it) if t else a for a, t in zip(args, tiled)]
    m = args[tiled.index(True)].shape[0]
    shapes = [jax.ShapeDtypeStruct((m,) + o.shape[1:], o.dtype) for o in out_shape]
    outs = _call(kernel, shapes, specs(args, tiled, rows, 0), specs(shapes, [True] * len(shapes), rows, 0),
                 (m // rows,), aliases, platform, interpret, name, num_warps)(*args)
    return [o[:n] for o in outs]

  outs, done = None, 0
  while done < n:
    rest = n - done
    r = rows if rest >= rows and done % rows == 0 else 1 << (rest.bit_length() - 1)
    if done:
      r = min(r, done & -done)  # tiles start at multiples of their size
    count = rest // r
    call_args, call_aliases, call_kernel = list(args), dict(aliases), kernel
    if outs is not None:
      # Continue the previous call's outputs in place: aliased inputs become
      # those outputs, and the other outputs come in as extra aliased inputs
      # that the kernel does not see.
      for i, j in aliases.items():
        call_args[i] = outs[j]
      extra = [j for j in range(len(out_shape)) if j not in aliases.values()]
      call_aliases |= {len(args) + e: j for e, j in enumerate(extra)}
      call_args += [outs[j] for j in extra]
      call_kernel = functools.partial(_drop_refs, kernel, len(args), len(extra))
    outs = _call(call_kernel, out_shape,
                 specs(call_args, list(tiled) + [True] * (len(call_args) - len(args)), r, done // r),
                 specs(out_shape, [True] * len(out_shape), r, done // r),
                 (count,), call_aliases, platform, interpret, name, num_warps)(*call_args)
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    done += count * r
  return outs


def _varying_like(inputs, out_shape):
  """Inside ``shard_map`` (``check_vma=True``): outputs typed like the inputs.

  ``pallas_call`` needs to be told over which manual axes its outputs vary.
  Only inputs that vary over none are supported (replicated leaves):
  :func:`optax_paged.transform` refuses sharded ones before the call.
  """
  if not jax.sharding.get_abstract_mesh().manual_axes:
    return out_shape
  mats = [getattr(jax.typeof(a), "manual_axis_type", None) for a in inputs]
  if not mats or any(m is None for m in mats):
    return out_shape
  return [jax.ShapeDtypeStruct(o.shape, o.dtype, manual_axis_type=mats[0]) for o in out_shape]


def _drop_refs(kernel, start, count, *refs):
  """Calls ``kernel`` without ``refs[start:start + count]``."""
  return kernel(*refs[:start], *refs[start + count:])


def _safe_inverse(absmax):
  safe = absmax > 0
  return jnp.where(safe, 1.0 / jnp.where(safe, absmax, 1.0), 0.0)


def _normalize(x, absmax):
  """``x * (1 / absmax)``; scales above 2**126 (whose reciprocal would be
  subnormal, flushed to zero) first shrink values and scale by 2**-64, exactly.
  The XLA path's ``quantization.normalize``."""
  shrink = jnp.where(absmax > 2.0**126, 2.0**-64, 1.0)
  return (x * shrink) * _safe_inverse(absmax * shrink)


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
      oc[...] = enc(_normalize(n, scale), t_refs)

  args = [hvec, grad, *tables, *codes, *(a.reshape(num_blocks, 1) for a in absmax)]
  tiled = [False, True] + [False] * nt + [True] * (2 * k)
  out_shape = (
      [jax.ShapeDtypeStruct(grad.shape, out_dtype)]
      + [jax.ShapeDtypeStruct(grad.shape, jnp.uint8)] * k
      + [jax.ShapeDtypeStruct((num_blocks, 1), jnp.float32)] * k
  )
  first = 2 + nt
  aliases = {first + i: 1 + i for i in range(k)} | {first + k + i: 1 + k + i for i in range(k)}
  out = _tiled_call(kernel, args, tiled, out_shape, aliases, rows, platform, interpret,
                    "optax_paged_fused_update", num_warps)
  direction, new_codes, new_absmax = out[0], out[1:1 + k], out[1 + k:]
  return direction, tuple(new_codes), tuple(a.reshape(num_blocks) for a in new_absmax)


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
    c_ref[...] = encoder(_normalize(v, scale), t_refs)

  codes, scale = _tiled_call(
      kernel, [x, *tables], [True] + [False] * nt,
      [jax.ShapeDtypeStruct(x.shape, jnp.uint8), jax.ShapeDtypeStruct((num_blocks, 1), jnp.float32)],
      {}, rows, platform, interpret, "optax_paged_quantize")
  return codes, scale.reshape(num_blocks)


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

  (values,) = _tiled_call(
      kernel, [codes, absmax.reshape(num_blocks, 1), *tables], [True, True] + [False] * nt,
      [jax.ShapeDtypeStruct(codes.shape, jnp.float32)], {}, rows, platform, interpret,
      "optax_paged_dequantize")
  return values
