"""Which implementation runs the 8-bit update: Pallas, native CPU kernel or XLA.

``backend="auto"`` (the default of every 8-bit transformation) uses the
Pallas kernels on a single GPU or TPU, the native CPU kernel
(:mod:`native_kernels.fused`, compiled on first use) on a single CPU device,
and the XLA (``jax.numpy``) path everywhere else: when the process sees
several devices (a Pallas or native call is not split by the SPMD
partitioner, so a sharded leaf would be gathered, while the XLA path keeps
shards local), inside ``shard_map``, and on a CPU where the native kernel
cannot be built (no C++ compiler: a warning says so once). ``"pallas"``
forces the kernels (interpret mode on CPU: slow, for tests); ``"native"``
forces the CPU kernel (an error where it cannot be built or the default
backend is not the CPU); ``"xla"`` forces XLA. The environment variable
``OPTAX_PAGED_BACKEND`` (``pallas``, ``native``, ``xla`` or ``auto``)
replaces ``"auto"`` when the transformation is built.

Inside :func:`optax_paged.paged` on a GPU or TPU, ``"auto"`` uses XLA: with the kernel, XLA
on the GPU schedules every parameter update (``apply_updates`` of the
kernel's direction) at the end of the step, so each leaf's float32 direction
stays on the device until then (4 bytes per parameter: 7.88 GiB peak
instead of 4.97 GiB for 1B parameters on an H200, where the fused XLA
update leaves no direction behind). A paged step is bound by the host
transfers anyway (97 ms instead of 88 ms there).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
import warnings

import jax
import jax.numpy as jnp

from optax_paged import codebooks
from optax_paged import quantization as qz
from native_kernels import fused as native
from pallas_kernels import blockwise

BACKENDS = ("auto", "pallas", "native", "xla")
ENV_VAR = "OPTAX_PAGED_BACKEND"
KERNEL_PLATFORMS = ("gpu", "cuda", "rocm", "tpu")


def check_backend(backend: str) -> str:
  """Validates ``backend`` and applies the environment override to "auto"."""
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
  if backend == "auto":
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env:
      if env not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {env!r}.")
      return env
  return backend


_AUTO_USES_XLA = contextvars.ContextVar("optax_paged_auto_uses_xla", default=False)


@contextlib.contextmanager
def auto_uses_xla():
  """Within this context ``backend="auto"`` means XLA (see the module docstring)."""
  token = _AUTO_USES_XLA.set(True)
  try:
    yield
  finally:
    _AUTO_USES_XLA.reset(token)


def kernel_for(backend: str) -> str:
  """What runs an 8-bit leaf now, for a checked backend.

  Returns ``"pallas"``, ``"interpret"`` (Pallas interpreter), ``"native"`` or
  ``"xla"``. ``"native"`` under ``"auto"`` still falls back to XLA where the
  kernel cannot be built (:func:`update_quantized_leaf_native`).
  """
  platform = jax.default_backend()
  if backend == "xla":
    return "xla"
  if backend == "pallas":
    return "pallas" if platform in KERNEL_PLATFORMS else "interpret"
  if backend == "native":
    if platform != "cpu":
      raise ValueError(
          f"backend='native' is the CPU kernel; the default backend here is {platform!r}. "
          "Use backend='auto' or 'pallas'.")
    return "native"
  if jax.device_count() != 1 or (_AUTO_USES_XLA.get() and platform in KERNEL_PLATFORMS):
    return "xla"
  if jax.sharding.get_abstract_mesh().manual_axes:
    return "xla"
  if platform in KERNEL_PLATFORMS:
    return "pallas"
  return "native" if platform == "cpu" else "xla"


def _flat_blocks(x, block_size, pad_value):
  n = x.size
  num_blocks = -(-n // block_size)
  flat = x.reshape(-1)
  if num_blocks * block_size != n:
    flat = jnp.pad(flat, (0, num_blocks * block_size - n), constant_values=pad_value)
  return flat.reshape(num_blocks, block_size)


def _unflat(xb, shape):
  n = math.prod(shape)
  return xb.reshape(-1)[:n].reshape(shape)


CODECS = ("table", "compact", "arith")


def default_codec(platform: str | None = None) -> str:
  """The kernels' codec for ``platform``: TPU kernels cannot gather from a ref."""
  return "arith" if (platform or jax.default_backend()) == "tpu" else GPU_CODEC


# The GPU kernels' codec: the compact table (4% faster than the full one in
# the 1B-parameter step on an H100, within 1.1% of it on an H200;
# benchmarks/RESULTS.md).
GPU_CODEC = "compact"


def _decoder(signed):
  """Arithmetic decode (no table)."""
  return lambda c, tables: qz.code_value(c, signed)


def _encoder(signed, keep_nonzero):
  """Arithmetic encode (no table)."""
  return lambda y, tables: qz.encode_normalized(y, signed, keep_nonzero)


def codecs(signed: tuple[bool, ...], keep_nonzero: bool, codec: str):
  """``(decoders, encoders, tables)`` for the kernels, one per moment.

  ``"table"``: decode gathers from the 256-value code book and encode from
  the cell table (one load each, from cache; 64 KiB per code book);
  ``"compact"``: the same with the cell table's long low run of equal entries cut
  (:class:`optax_paged.codebooks.CompactCarry`, 16 KiB, three integer
  operations more per element); ``"arith"``: both computed arithmetically,
  no tables (TPU). All give the same codes.
  """
  if codec not in CODECS:
    raise ValueError(f"codec must be one of {CODECS}, got {codec!r}.")
  if codec == "arith":
    return [_decoder(s) for s in signed], [_encoder(s, keep_nonzero) for s in signed], ()
  k = len(signed)
  tables = [jnp.asarray(codebooks.dynamic_map(s)) for s in signed]
  if codec == "table":
    tables += [jnp.asarray(codebooks.encode_tables(s, keep_nonzero).cell_carry) for s in signed]
    index = [lambda cell: cell] * k
  else:
    compact = [codebooks.compact_cell_carry(s, keep_nonzero) for s in signed]
    tables += [jnp.asarray(c.table) for c in compact]
    index = [functools.partial(qz.compact_index, offset=c.offset) for c in compact]

  def decoder(i):
    return lambda c, refs: refs[i][c]

  def encoder(i, s):
    return lambda y, refs: qz.encode_normalized_lut(y, s, lambda cell: refs[k + i][index[i](cell)])

  return ([decoder(i) for i in range(k)], [encoder(i, s) for i, s in enumerate(signed)], tuple(tables))


@functools.partial(jax.jit, static_argnums=(0, 4, 6, 7, 8))
def update_quantized_leaf_pallas(rule, grad, codes, absmax, signed, hparams, block_size, interpret,
                                 codec=None):
  """:func:`optax_paged.transform.update_quantized_leaf_xla` with the fused kernel.

  ``rule`` must already keep non-finite values out of the new moments;
  ``codec`` is one of :data:`CODECS` (default: :func:`default_codec`).
  """
  shape = grad.shape
  g = _flat_blocks(grad, block_size, 0)
  c = tuple(_flat_blocks(x, block_size, codebooks.ZERO_CODE[s]) for x, s in zip(codes, signed))
  a = tuple(x.reshape(-1) for x in absmax)
  decoders, encoders, tables = codecs(signed, True, codec or default_codec())
  direction, new_codes, new_absmax = blockwise.fused_update(
      rule, g, c, a, hparams,
      decoders=decoders,
      encoders=encoders,
      tables=tables,
      out_dtype=grad.dtype,
      interpret=interpret,
  )
  return (
      _unflat(direction, shape),
      tuple(_unflat(x, shape) for x in new_codes),
      tuple(x.reshape(a0.shape) for x, a0 in zip(new_absmax, absmax)),
  )


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def quantize_pallas(x, signed, block_size, interpret, codec=None):
  (_,), (encoder,), tables = codecs((signed,), False, codec or default_codec())
  codes, absmax = blockwise.quantize(
      _flat_blocks(x.astype(jnp.float32), block_size, 0),
      encoder=encoder, tables=tables, interpret=interpret)
  return _unflat(codes, x.shape), absmax.reshape(qz.absmax_shape(x.shape, block_size))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def dequantize_pallas(codes, absmax, signed, block_size, interpret, codec=None):
  (decoder,), _, tables = codecs((signed,), False, codec or default_codec())
  values = blockwise.dequantize(
      _flat_blocks(codes, block_size, codebooks.ZERO_CODE[signed]), absmax.reshape(-1),
      decoder=decoder, tables=tables, interpret=interpret)
  return _unflat(values, codes.shape)


_WARNED: set[str] = set()


@functools.partial(jax.jit, static_argnums=(0, 4, 6, 7))
def update_quantized_leaf_native(rule, grad, codes, absmax, signed, hparams, block_size, required):
  """:func:`optax_paged.transform.update_quantized_leaf_xla` with the native CPU kernel.

  ``rule`` must already keep non-finite values out of the new moments. Where
  the kernel cannot be built (no compiler, a rule it cannot translate) this
  raises :class:`native_kernels.fused.NativeUnavailable` if ``required``, and
  otherwise warns once per reason and returns ``None`` (the caller runs the
  XLA path).
  """
  if grad.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    if required:
      raise native.NativeUnavailable(f"the native kernel takes float32, bfloat16 or float16 "
                                     f"gradients, not {grad.dtype}")
    return None
  _, _, tables = codecs(signed, True, "table")  # code books, then full cell tables
  k = len(signed)
  try:
    return native.fused_update(rule, grad, tuple(codes), tuple(absmax), hparams, signed=signed,
                               books=tables[:k], carries=tables[k:], block_size=block_size)
  except native.NativeUnavailable as e:
    if required:
      raise
    if str(e) not in _WARNED:
      _WARNED.add(str(e))
      warnings.warn(f"optax_paged: the native CPU kernel is unavailable ({e}); the 8-bit "
                    "update runs on the XLA path, which is ~2x slower on CPU.", stacklevel=2)
    return None
