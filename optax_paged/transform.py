"""8-bit optimizer-state transformations built from one elementwise rule.

Every 8-bit optimizer here is ``scale_by_rule_8bit`` applied to a rule from
:mod:`optax_paged.rules`: the state of each large leaf is stored as ``uint8``
codes plus one float32 ``absmax`` per block, and each update runs

    decode (old absmax) -> rule in float32 -> new block absmax -> encode

as bitsandbytes does. Small leaves (fewer than ``min_8bit_size`` elements, e.g.
biases and norms) keep float32 state.

State layout: a ``NamedTuple`` with ``count`` and, for each moment ``name``,
two trees with the parameters' structure: ``name`` (``uint8`` codes for 8-bit
leaves, float32 moments otherwise) and ``name_absmax`` (float32 block scales
for 8-bit leaves, ``None`` otherwise). All leaves are plain arrays, so the
state survives ``flax.nnx.Optimizer``, Orbax and sharding untouched (no
node types or static fields to lose). ``init`` decides which leaves are 8-bit
from the parameters' (global) shapes; ``update`` follows that choice as it
shows in the state's arrays (``uint8`` codes), so it holds inside
``shard_map``, where a leaf's shard may be smaller than ``min_8bit_size``.

Non-finite values: if an element's gradient is not finite (or, for
optimizers with several moments like Adam, so large that its square
overflows float32: ``|g| >= 2**64``, about 1.8e19, where the second moment
would become infinite), that element keeps all its previous moments
(re-encoded with the block's new scale) and its update is NaN, so the
parameter shows the problem as it would with ``optax.adam``; every other
element of the block is updated exactly as if the bad element were absent
from the block maximum. A moment that overflows on its own (values near the
float32 maximum, ~3.4e38) keeps its previous value, and the update is NaN.
Wrap with ``optax.apply_if_finite`` to skip such steps instead.

References:
  Dettmers et al., `8-bit Optimizers via Block-wise Quantization
  <https://arxiv.org/abs/2110.02861>`_, 2022.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_paged import backend as backend_lib
from optax_paged import codebooks
from optax_paged import quantization as qz
from optax_paged import rules

Rule = Callable[..., tuple[jax.Array, tuple[jax.Array, ...]]]
QuantizeMask = Any  # None | pytree of bools | Callable[[key_path, leaf], bool]


class MomentSpec(NamedTuple):
  """One state array of a rule: field name, code book and initial value.

  Attributes:
    name: the state field holding the moment (``name + "_absmax"`` holds the
      block scales).
    signed: signed map (any sign) or unsigned map (non-negative moments).
    init: initial value of every element, >= 0 (e.g. Adagrad's initial
      accumulator); stored exactly, as code 1.0 with scale ``init``.
  """

  name: str
  signed: bool
  init: Any = 0.0


class ScaleByAdam8bitState(NamedTuple):
  """State of :func:`scale_by_adam_8bit`.

  Attributes:
    count: number of updates applied, int32.
    mu: first moments: ``uint8`` codes (signed map) or float32.
    nu: second moments: ``uint8`` codes (unsigned map) or float32.
    mu_absmax: float32 block scales of ``mu`` for 8-bit leaves, else ``None``.
    nu_absmax: float32 block scales of ``nu`` for 8-bit leaves, else ``None``.
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  mu_absmax: optax.Updates
  nu_absmax: optax.Updates


# Which code book each moment field uses: class-level metadata (never part of
# the state's arrays), read by dequantize_state.
ScaleByAdam8bitState.SIGNED = {"mu": True, "nu": False}


# ---------------------------------------------------------------------------
# Argument checks.


def check_hyperparam(name: str, value, low=None, high=None, *, high_open=False):
  """Raises ``ValueError`` if a concrete scalar hyperparameter is out of range.

  A schedule is checked at step 0 (so e.g. a negative
  ``optax.linear_schedule`` fails here, not by ascending the gradient); its
  later values, and traced values (``optax.inject_hyperparams``), are used
  as they come, as in optax.
  """
  if callable(value):
    first = _schedule_start(value)
    if first is not None:
      check_hyperparam(f"{name} (schedule at step 0)", first, low, high, high_open=high_open)
    return
  if value is None or isinstance(value, jax.core.Tracer):
    return
  if isinstance(value, (str, bytes, bool)):  # float() would parse "1e-3" and take True as 1
    raise TypeError(f"{name} must be a real number, got {value!r}.")
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise TypeError(f"{name} must be a real number, got {value!r}.") from None
  if not math.isfinite(v):
    raise ValueError(f"{name} must be finite, got {v}.")
  if low is not None and v < low:
    raise ValueError(f"{name} must be >= {low}, got {v}.")
  if high is not None and (v >= high if high_open else v > high):
    op = "<" if high_open else "<="
    raise ValueError(f"{name} must be {op} {high}, got {v}.")


def _schedule_start(schedule):
  """``schedule(0)`` as a Python float, or ``None`` if it is not a concrete scalar."""
  try:
    value = schedule(jnp.zeros([], jnp.int32))
  except Exception:  # not a count -> scalar schedule; leave it to the step
    return None
  if isinstance(value, jax.core.Tracer) or jnp.ndim(value) != 0:
    return None
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


# bitsandbytes' defaults. The public functions take ``None`` for them, so that
# ``optax.inject_hyperparams`` (which turns every numeric argument, defaults
# included, into a traced array) leaves them alone: they fix the state's
# layout and must stay Python ints.
DEFAULT_BLOCK_SIZE = 256
DEFAULT_MIN_8BIT_SIZE = 4096


def _static_option(name: str, value, default):
  """``value`` (``default`` for ``None``); refuses arrays with a clear error."""
  if value is None:
    return default
  if isinstance(value, (jax.Array, jax.core.Tracer)):
    raise TypeError(
        f"{name} must be a Python int: it fixes the layout of the optimizer "
        f"state, so it cannot be an array or change during training (got "
        f"{type(value).__name__}). Under optax.inject_hyperparams, pass "
        f"static_args=({name!r},).")
  return value


def check_no_dtype(name, value):
  """``mu_dtype`` / ``accumulator_dtype``: only ``None`` (the moments are codes).

  The argument is there so that optax's positional order holds: passed
  positionally as in ``optax.adamw(lr, b1, b2, eps, eps_root, None, 1e-2)``,
  the arguments after it mean what they mean in optax.
  """
  if value is not None:
    raise ValueError(
        f"{name}={value!r}: 8-bit optimizers store their moments as 8-bit codes, so only "
        f"{name}=None is accepted (it keeps optax's argument order).")


def check_8bit_options(block_size, min_8bit_size, backend) -> tuple[int, int, str]:
  """Checks the options every 8-bit transformation takes; returns them resolved."""
  block_size = qz.check_block_size(_static_option("block_size", block_size, DEFAULT_BLOCK_SIZE))
  min_8bit_size = check_min_8bit_size(
      _static_option("min_8bit_size", min_8bit_size, DEFAULT_MIN_8BIT_SIZE))
  return block_size, min_8bit_size, backend_lib.check_backend(backend)


def check_min_8bit_size(min_8bit_size) -> int:
  if (
      not isinstance(min_8bit_size, (int, np.integer))
      or isinstance(min_8bit_size, bool)
      or min_8bit_size < 0
  ):
    raise ValueError(
        f"min_8bit_size must be a non-negative int, got {min_8bit_size!r}."
    )
  return int(min_8bit_size)


def _check_leaf_dtype(path, leaf):
  dtype = jnp.result_type(leaf)  # also Python numbers, as optax takes them
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f"8-bit optimizer state needs real floating-point parameters "
        f"(float32, bfloat16, float16); the leaf at "
        f"{jax.tree_util.keystr(path) or '<root>'} has dtype {dtype}. "
        "Exclude integer or complex leaves with optax.masked or "
        "optax.partition."
    )


def _check_leaf(path, grad, moment, absmax, *, block_size, kernel="xla") -> bool:
  """Checks a gradient leaf against its state; returns whether the leaf is 8-bit.

  Which leaves are 8-bit: ``init`` decided on the parameters' (global)
  shapes, and its choice shows in the state (``uint8`` codes). Deciding again
  from the gradients' shapes would go wrong inside ``shard_map``, where a
  leaf's shard can be smaller than ``min_8bit_size``.

  Raises ``ValueError`` when the gradient's shape is not the state's (a
  transposed gradient of the same size would otherwise be blocked and
  updated element by element in the wrong order, silently), or when an 8-bit
  leaf's scales do not fit the gradient's blocks. Inside ``shard_map`` a
  sharded leaf is updated shard by shard; its blocks are those of the whole
  array only when they lie along the last axis and each shard holds whole
  blocks of it. Blocks over the flattened array (last axis not a multiple of
  the block size) could straddle two shards, so a sharded leaf with them is
  refused rather than quantized differently from the same update outside.
  Replicated leaves (``P()``, ``pmap``'s data parallelism) are whole arrays
  and always fine. Whether a leaf is sharded is read from its varying manual
  axes, which ``shard_map(check_vma=False)`` does not track: there a sharded
  leaf with blocks over the flattened array is right only when every shard
  holds whole blocks (its element count a multiple of the block size).
  """
  name = jax.tree_util.keystr(path) or "<root>"
  if not jnp.issubdtype(jnp.result_type(grad), jnp.floating):
    raise TypeError(
        f"The gradient leaf at {name} has dtype {jnp.result_type(grad)}; the update needs a "
        "real floating-point gradient (an integer one would round the update to whole numbers, "
        "a complex one is not supported).")
  if jnp.shape(grad) != jnp.shape(moment):
    raise ValueError(
        f"The gradient leaf at {jax.tree_util.keystr(path)} has shape "
        f"{tuple(jnp.shape(grad))} but the optimizer state was built for a "
        f"parameter of shape {tuple(jnp.shape(moment))}.")
  if jnp.dtype(moment.dtype) != jnp.uint8:
    return False
  manual = bool(jax.sharding.get_abstract_mesh().manual_axes)
  varying = manual and bool(
      getattr(getattr(jax.typeof(absmax), "manual_axis_type", None), "varying", ()))
  mesh = getattr(getattr(jax.typeof(grad), "sharding", None), "mesh", None)
  custom = {"pallas": "pallas", "interpret": "pallas", "native": "native"}.get(kernel)
  if custom and getattr(mesh, "explicit_axes", None) and getattr(mesh, "size", 1) > 1:
    raise ValueError(
        f"backend={custom!r} cannot update the 8-bit leaf at {name}: it is typed with a mesh "
        f"of explicit axes, and a {custom} kernel call is not split over devices. Use "
        "backend='auto' or 'xla' (shards stay local), or call the update inside "
        "jax.shard_map(..., check_vma=False) or jax.pmap.")
  if varying and custom:
    raise ValueError(
        f"backend={custom!r} cannot update the 8-bit leaf at {name} inside shard_map: it is "
        f"sharded, and a {custom} kernel call there needs check_vma=False (jax.shard_map(..., "
        "check_vma=False)) or jax.pmap. Or use backend='auto' or 'xla'.")
  if varying and not qz.blocks_along_last_axis(grad.shape, block_size):
    raise ValueError(
        f"Inside shard_map the 8-bit leaf at {name} is sharded, with a shard of "
        f"shape {tuple(grad.shape)} whose last axis is not a multiple of "
        f"block_size={block_size}: its blocks, taken over the flattened array, "
        "could straddle shards. Update it outside shard_map (jit with "
        "shardings), replicate it, shard it so each shard's last axis is a "
        "multiple of the block size, or keep it in float32 with quantize_mask.")
  expected = qz.absmax_shape(grad.shape, block_size)
  if tuple(jnp.shape(absmax)) != tuple(expected):
    where = " (inside shard_map: shard the state like its parameter)" if manual else ""
    raise ValueError(
        f"The 8-bit state of the leaf at {name} has block scales of shape "
        f"{tuple(jnp.shape(absmax))}, but a gradient of shape "
        f"{tuple(grad.shape)} in blocks of {block_size} needs {tuple(expected)}"
        f"{where}: was the state built with another block_size?")
  return True


def _check_explicit_sharding(name, x, block_size):
  problem = qz.explicit_sharding_problem(x, block_size)
  if problem:
    raise ValueError(
        f"The 8-bit leaf at {name} (shape {tuple(x.shape)}) is sharded as "
        f"{jax.typeof(x).sharding.spec} over explicit mesh axes, but {problem}. "
        + qz.SHARDING_ADVICE)


def _quantize_flags(tree, min_8bit_size: int, quantize_mask: QuantizeMask):
  """Pytree of Python bools: which leaves of ``tree`` get 8-bit state."""
  big = jax.tree.map(lambda x: math.prod(jnp.shape(x)) >= min_8bit_size, tree)
  if quantize_mask is None:
    return big
  if callable(quantize_mask):
    chosen = jax.tree_util.tree_map_with_path(
        lambda path, x: bool(quantize_mask(path, x)), tree
    )
  else:
    # A prefix of ``tree``: one bool may cover a whole subtree, and subtrees
    # with no leaves (``optax.masked``'s ``MaskedNode``) take any flag.
    chosen = jax.tree.map(
        lambda m, sub: jax.tree.map(lambda _: bool(m), sub), quantize_mask, tree)
  return jax.tree.map(lambda b, c: b and c, big, chosen)


# ---------------------------------------------------------------------------
# Per-leaf updates (XLA path).


def _guard_nonfinite(grad, old, new, direction):
  """Keeps old moments and returns a NaN direction where values are not finite.

  Each moment is guarded by the gradient and that moment only, so that
  computing one moment never needs the others: on the XLA path each output
  is a separate fusion, and this keeps each one reading only what it needs.
  With several moments (Adam, AdEMAMix: a first moment and the square of the
  gradient in a second one) the gradient's test is that its square is
  finite: a finite gradient whose square overflows (``|g| >= 2**64``) would
  leave the first moment updated and the second one kept, and the huge first
  moment would become its block's scale; this way every moment of that
  element is kept. With one moment such a gradient is used as optax uses it
  (Lion, momentum); where that moment squares it (RMSProp, Adagrad) the
  square overflows on its own, so the moment is kept and the update is NaN.
  """
  # |x| < limit is a compare, which every kernel backend lowers; NaN compares
  # False. |g| < 2**64 holds exactly when g*g is finite (testing g*g itself
  # would share the rule's square and change how XLA rounds the second moment).
  limit = 2.0**64 if len(new) > 1 else jnp.inf
  finite_grad = jnp.abs(grad) < limit
  ok_each = [finite_grad & (jnp.abs(n) < jnp.inf) for n in new]
  new = tuple(jnp.where(ok, n, o) for ok, n, o in zip(ok_each, new, old))
  ok_all = ok_each[0]
  for ok in ok_each[1:]:
    ok_all = ok_all & ok
  return jnp.where(ok_all, direction, jnp.nan), new


# Jitted so that eager use compiles once per leaf shape instead of once per op
# (inside the user's jit it is simply inlined).
@functools.partial(jax.jit, static_argnums=(0,))
def _guarded_rule(rule, grad, moments, hparams):
  """``rule`` with :func:`_guard_nonfinite` applied (what the kernels run)."""
  direction, new = rule(grad, moments, hparams)
  return _guard_nonfinite(grad, moments, new, direction)


class _Guarded:
  """``rule`` with :func:`_guard_nonfinite` applied, equal for equal rules.

  The kernels' jitted wrappers take it as a static argument: equality by rule
  (a ``functools.partial`` compares by identity) keeps a transformation
  rebuilt every step (``optax.inject_hyperparams``) from retracing and
  recompiling every step.
  """

  __slots__ = ("rule",)

  def __init__(self, rule):
    self.rule = rule

  @property
  def __name__(self):
    return getattr(self.rule, "__name__", "rule")

  def __call__(self, grad, moments, hparams):
    return _guarded_rule(self.rule, grad, moments, hparams)

  def __eq__(self, other):
    return isinstance(other, _Guarded) and _same(self.rule, other.rule)

  def __hash__(self):
    try:
      return hash(self.rule)
    except TypeError:
      return id(self.rule)


def _same(a, b) -> bool:
  try:
    return a is b or bool(a == b)
  except Exception:  # noqa: BLE001 - an odd __eq__: only identity counts
    return False


def _update_float32_leaf(rule, grad, moments, hparams):
  g = grad.astype(jnp.float32)
  direction, new = rule(g, tuple(moments), hparams)
  return _guard_nonfinite(g, moments, new, direction)


@functools.partial(jax.jit, static_argnums=(0, 4, 6))
def update_quantized_leaf_xla(
    rule: Rule,
    grad: jax.Array,
    codes: Sequence[jax.Array],
    absmax: Sequence[jax.Array],
    signed: Sequence[bool],
    hparams: Mapping[str, Any],
    block_size: int,
):
  """Fused decode -> rule -> absmax -> encode for one leaf, in jax.numpy.

  Args:
    rule: elementwise rule from :mod:`optax_paged.rules`.
    grad: gradient leaf, any float dtype.
    codes: ``uint8`` codes of each moment, ``grad``'s shape.
    absmax: float32 block scales of each moment.
    signed: code book of each moment.
    hparams: scalars passed to the rule.
    block_size: elements per block.

  Returns:
    ``(direction, new_codes, new_absmax)``: float32 direction of ``grad``'s
    shape, and tuples of new codes and scales.
  """
  shape = grad.shape

  def step(grad, codes, absmax, decode):
    gb = qz.to_blocks(grad.astype(jnp.float32), block_size)
    old = tuple(
        decode(qz.to_blocks(c, block_size, codebooks.ZERO_CODE[s]), a, s)
        for c, a, s in zip(codes, absmax, signed)
    )
    direction, new = rule(gb, old, hparams)
    return _guard_nonfinite(gb, old, new, direction)

  # XLA:CPU fuses each consumer of decode -> rule separately, and a float32
  # temporary the size of the parameter costs more (page faults) than doing
  # the arithmetic again, so the step is three recomputations, each fused
  # into one consumer: the block maxima (a reduction), the direction (fused
  # downstream into the caller's parameter update) and the new codes. Each
  # decodes with its own gather from a distinct (differently padded) table,
  # so that XLA neither shares one gather between them nor stores its
  # result (measured: benchmarks/RESULTS.md). XLA still copies the old codes
  # before the encode writes them in place: it shares no buffer between a
  # fusion's output and an operand that reaches a gather (the encode's cell
  # lookup derives from the old codes, however they are decoded), and the
  # direction reads the old codes with no data dependency on the encodes.
  _, new_for_max = step(grad, codes, absmax, functools.partial(qz.decode_exact, table_copy=1))
  new_absmax = qz.blocks_absmax(new_for_max, qz.padding_mask(shape, block_size))
  direction, _ = step(grad, codes, absmax, functools.partial(qz.decode_exact, table_copy=2))
  _, new = step(grad, codes, absmax, qz.decode_exact)
  new_codes = tuple(
      qz.from_blocks(qz.encode(n, a, s, keep_nonzero=True), shape)
      for n, a, s in zip(new, new_absmax, signed)
  )
  return qz.from_blocks(direction, shape), new_codes, new_absmax


# ---------------------------------------------------------------------------
# The generic transformation.


def scale_by_rule_8bit(
    rule: Rule,
    moments: Sequence[MomentSpec],
    hparams_fn: Callable[[jax.Array], Mapping[str, Any]],
    state_cls: type,
    *,
    block_size: int | None = None,
    min_8bit_size: int | None = None,
    quantize_mask: QuantizeMask = None,
    backend: str = "auto",
) -> optax.GradientTransformation:
  """Builds an 8-bit-state ``GradientTransformation`` from an elementwise rule.

  Args:
    rule: ``rule(grad, moments, hparams) -> (direction, moments)``.
    moments: one ``MomentSpec`` per moment, in the rule's order; the state has
      fields ``spec.name`` and ``spec.name + "_absmax"`` for each.
    hparams_fn: maps the new step count (int32, starting at 1) to the rule's
      hyperparameters (``count`` included).
    state_cls: ``NamedTuple`` with fields ``count``, then the moment fields.
    block_size: elements per quantization block, a power of two in [64, 4096]
      (``None``: 256).
    min_8bit_size: leaves with fewer elements keep float32 state (``None``:
      4096).
    quantize_mask: optional pytree of bools (or a prefix of the parameters'
      tree), or callable
      ``(key_path, leaf) -> bool``; ``False`` leaves keep float32 state.
    backend: ``"auto"`` (Pallas on a single GPU/TPU, the native kernel on a
      single CPU, XLA elsewhere), ``"pallas"``, ``"native"`` or ``"xla"``; see
      :mod:`optax_paged.backend`.

  Returns:
    An ``optax.GradientTransformation``.
  """
  block_size, min_8bit_size, backend = check_8bit_options(block_size, min_8bit_size, backend)
  guarded = _Guarded(rule)
  if getattr(state_cls, "SIGNED", None) != {m.name: m.signed for m in moments}:
    raise ValueError(
        f"{state_cls.__name__}.SIGNED must map each moment field to its code book "
        f"({ {m.name: m.signed for m in moments} }): dequantize_state reads it.")
  for m in moments:
    check_hyperparam(f"initial value of {m.name}", m.init, 0.0)
  moments = tuple(moments)
  names = [m.name for m in moments]
  signed = tuple(m.signed for m in moments)

  def init_fn(params):
    jax.tree_util.tree_map_with_path(_check_leaf_dtype, params)
    flags = _quantize_flags(params, min_8bit_size, quantize_mask)

    def leaf_state(p, flag):
      if flag:
        codes = tuple(
            jnp.full_like(p, codebooks.ZERO_CODE[m.signed], dtype=jnp.uint8)
            if _is_zero(m.init) else
            jnp.where(jnp.asarray(m.init) > 0, jnp.uint8(ONE_CODE),
                      jnp.uint8(codebooks.ZERO_CODE[m.signed])) + jnp.zeros_like(p, dtype=jnp.uint8)
            for m in moments
        )
        scales = tuple(
            _zeros_absmax(p, block_size) + jnp.asarray(m.init, jnp.float32) for m in moments
        )
        sharding = _concrete_named_sharding(p)
        if sharding is not None and qz.sharding_problem(p, block_size):
          # Blocks that do not fit the parameter's shards: XLA reshards the
          # update and returns the state replicated, so the codes start
          # replicated like the scales (one compile, no resharding later).
          codes = tuple(jax.device_put(c, _replicated(sharding)) for c in codes)
        return codes + scales
      inits = tuple(jnp.full_like(p, m.init, dtype=jnp.float32) for m in moments)
      return inits + (None,) * len(signed)

    for (path, p), flag in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(flags)):
      if flag:
        _check_explicit_sharding(jax.tree_util.keystr(path) or "<root>", p, block_size)
    per_leaf = jax.tree.map(leaf_state, params, flags)
    fields = _unzip(params, per_leaf, 2 * len(signed))
    return state_cls(
        jnp.zeros([], jnp.int32),
        **dict(zip(names + [n + "_absmax" for n in names], fields)),
    )

  def update_fn(updates, state, params=None):
    del params
    updates = jax.tree.map(jnp.asarray, updates)  # Python numbers too, as optax takes them
    count = optax.safe_increment(state.count)
    # float32 scalars, as the kernels read them: with Python floats XLA would
    # fold e.g. ``1 - b1`` in float64, and the two backends would round apart.
    hparams = {k: jnp.asarray(v, jnp.float32) for k, v in hparams_fn(count).items()}
    moment_trees = [getattr(state, n) for n in names]
    absmax_trees = [getattr(state, n + "_absmax") for n in names]
    k = len(names)
    kernel = backend_lib.kernel_for(backend)
    flags = jax.tree_util.tree_map_with_path(
        functools.partial(_check_leaf, block_size=block_size, kernel=kernel),
        updates, moment_trees[0], absmax_trees[0])

    def leaf_update(g, flag, *leaf_state):
      mom, scales = leaf_state[:k], leaf_state[k:]
      if flag:
        out = None
        if kernel in ("pallas", "interpret"):
          out = backend_lib.update_quantized_leaf_pallas(
              guarded, g, tuple(mom), tuple(scales), signed, hparams, block_size,
              kernel == "interpret")
        elif kernel == "native" and g.size:  # None where the kernel cannot run: XLA
          out = backend_lib.update_quantized_leaf_native(
              guarded, g, tuple(mom), tuple(scales), signed, hparams, block_size,
              backend == "native")
        if out is None:
          out = update_quantized_leaf_xla(
              rule, g, tuple(mom), tuple(scales), signed, hparams, block_size)
        direction, codes, scales = out
        return (direction.astype(g.dtype),) + tuple(codes) + tuple(scales)
      direction, new = _update_float32_leaf(rule, g, tuple(mom), hparams)
      return (direction.astype(g.dtype),) + tuple(new) + (None,) * k

    out = jax.tree.map(leaf_update, updates, flags, *moment_trees, *absmax_trees)
    fields = _unzip(updates, out, 1 + 2 * k)
    new_state = state_cls(
        count, **dict(zip(names + [n + "_absmax" for n in names], fields[1:]))
    )
    return fields[0], new_state

  return optax.GradientTransformation(init_fn, update_fn)


ONE_CODE = 255  # index of 1.0 in both maps


def _is_zero(x) -> bool:
  return not isinstance(x, jax.core.Tracer) and not callable(x) and float(x) == 0.0


def _zeros_absmax(p, block_size):
  shape = qz.absmax_shape(p.shape, block_size)
  typed = getattr(jax.typeof(p), "sharding", None)
  if (isinstance(p, jax.core.Tracer) and getattr(getattr(typed, "mesh", None), "explicit_axes", None)
      and len(shape) == p.ndim):
    # Inside jit on explicit mesh axes: the parameter's type carries its
    # sharding, and init checked that whole blocks fit its shards.
    return jnp.zeros(shape, jnp.float32, out_sharding=typed)
  zeros = jnp.zeros(shape, jnp.float32)
  sharding = _concrete_named_sharding(p)
  if sharding is None:
    return zeros
  if len(shape) == p.ndim and not qz.sharding_problem(p, block_size):
    # Blocks along the last axis, whole in every shard: the parameter's spec.
    return jax.device_put(zeros, sharding)
  # Otherwise replicated over the parameter's mesh (not left on one device,
  # which a jit over the mesh, or paging it to host memory, would reject).
  return jax.device_put(zeros, _replicated(sharding))


def _concrete_named_sharding(p):
  """``p``'s ``NamedSharding`` if it is a concrete array with one, else None."""
  sharding = getattr(p, "sharding", None)
  concrete = isinstance(p, jax.Array) and not isinstance(p, jax.core.Tracer)
  return sharding if concrete and isinstance(sharding, jax.sharding.NamedSharding) else None


def _replicated(sharding):
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())


def _unzip(template, tree_of_tuples, n):
  """Splits a tree (shaped like ``template``) of n-tuples into n trees."""
  return tuple(
      jax.tree.map(lambda _, t, i=i: t[i], template, tree_of_tuples)
      for i in range(n)
  )


def scale_by_adam_8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype=None,
    *,
    nesterov: bool = False,
    block_size: int | None = None,
    min_8bit_size: int | None = None,
    quantize_mask: QuantizeMask = None,
    backend: str = "auto",
) -> optax.GradientTransformation:
  """Rescales updates with Adam, storing both moments in 8 bits.

  The first moment uses the signed dynamic map, the second the unsigned one;
  one float32 scale per block of ``block_size`` elements. Equivalent to
  ``optax.scale_by_adam`` up to quantization error.

  Args:
    b1: decay of the first moment, in [0, 1).
    b2: decay of the second moment, in [0, 1).
    eps: term added to the denominator outside the square root.
    eps_root: term added to the second moment inside the square root.
    nesterov: use Nesterov momentum (NAdam), as ``optax.scale_by_adam``.
    block_size: elements per quantization block (power of two, 64..4096);
      ``None`` means 256, bitsandbytes' default.
    min_8bit_size: leaves with fewer elements keep float32 state; ``None``
      means 4096, bitsandbytes' default.
    quantize_mask: pytree of bools (a prefix of the parameters' tree) or
      ``(key_path, leaf) -> bool``; ``False`` leaves keep float32 state.
    backend: ``"auto"``, ``"pallas"``, ``"native"`` or ``"xla"`` (see
      :mod:`optax_paged.backend`).

  Returns:
    An ``optax.GradientTransformation`` with ``ScaleByAdam8bitState``.

  References:
    Kingma & Ba, `Adam <https://arxiv.org/abs/1412.6980>`_, 2014.
    Dettmers et al., `8-bit Optimizers via Block-wise Quantization
    <https://arxiv.org/abs/2110.02861>`_, 2022.
  """
  check_no_dtype("mu_dtype", mu_dtype)
  check_hyperparam("b1", b1, 0.0, 1.0, high_open=True)
  check_hyperparam("b2", b2, 0.0, 1.0, high_open=True)
  check_hyperparam("eps", eps, 0.0)
  check_hyperparam("eps_root", eps_root, 0.0)
  rule, hparams = ((rules.nadam_rule, rules.nadam_hparams) if nesterov
                   else (rules.adam_rule, rules.adam_hparams))
  return scale_by_rule_8bit(
      rule,
      (MomentSpec("mu", signed=True), MomentSpec("nu", signed=False)),
      lambda count: hparams(b1, b2, eps, eps_root, count),
      ScaleByAdam8bitState,
      block_size=block_size,
      min_8bit_size=min_8bit_size,
      quantize_mask=quantize_mask,
      backend=backend,
  )


class ScaleByLion8bitState(NamedTuple):

  """State of :func:`scale_by_lion_8bit`: count, momentum codes and scales."""

  count: jax.Array
  mu: optax.Updates
  mu_absmax: optax.Updates
ScaleByLion8bitState.SIGNED = {"mu": True}


class Trace8bitState(NamedTuple):

  """State of :func:`trace_8bit`: count, momentum trace codes and scales."""

  count: jax.Array
  trace: optax.Updates
  trace_absmax: optax.Updates
Trace8bitState.SIGNED = {"trace": True}


class ScaleByRms8bitState(NamedTuple):

  """State of :func:`scale_by_rms_8bit` (``nu``: unsigned map)."""

  count: jax.Array
  nu: optax.Updates
  nu_absmax: optax.Updates
ScaleByRms8bitState.SIGNED = {"nu": False}


class ScaleByRss8bitState(NamedTuple):

  """State of :func:`scale_by_rss_8bit` (``sum_of_squares``: unsigned map)."""

  count: jax.Array
  sum_of_squares: optax.Updates
  sum_of_squares_absmax: optax.Updates
ScaleByRss8bitState.SIGNED = {"sum_of_squares": False}


class ScaleByAdemamix8bitState(NamedTuple):

  """State of :func:`scale_by_ademamix_8bit` (``m1``, ``m2`` signed, ``nu`` unsigned)."""

  count: jax.Array
  m1: optax.Updates
  m2: optax.Updates
  nu: optax.Updates
  m1_absmax: optax.Updates
  m2_absmax: optax.Updates
  nu_absmax: optax.Updates
ScaleByAdemamix8bitState.SIGNED = {"m1": True, "m2": True, "nu": False}


_EXTRAS_DOC = """    block_size: elements per quantization block (power of two, 64..4096);
      ``None`` means 256, bitsandbytes' default.
    min_8bit_size: leaves with fewer elements keep float32 state; ``None``
      means 4096, bitsandbytes' default.
    quantize_mask: pytree of bools (a prefix of the parameters' tree) or
      ``(key_path, leaf) -> bool``; ``False`` leaves keep float32 state.
    backend: ``"auto"``, ``"pallas"``, ``"native"`` or ``"xla"`` (see
      :mod:`optax_paged.backend`)."""


def with_extras_doc(fn):
  """Fills the ``{extras}`` placeholder of a docstring with the 8-bit keyword args."""
  fn.__doc__ = fn.__doc__.replace("{extras}", _EXTRAS_DOC)
  return fn


@with_extras_doc
def scale_by_lion_8bit(
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype=None,
    *,
    block_size: int | None = None,
    min_8bit_size: int | None = None,
    quantize_mask: QuantizeMask = None,
    backend: str = "auto",
) -> optax.GradientTransformation:
  """``optax.scale_by_lion`` with its momentum in 8 bits (signed map).

  Args:
    b1: interpolation weight of the momentum in the update's sign.
    b2: decay of the momentum.
    mu_dtype: only ``None``, in optax's position (the moments are 8-bit codes).
    mu_dtype: only ``None``, in optax's position (the moments are 8-bit codes).
{extras}

  Returns:
    An ``optax.GradientTransformation`` with ``ScaleByLion8bitState``.

  References:
    Chen et al., `Symbolic Discovery of Optimization Algorithms
    <https://arxiv.org/abs/2302.06675>`_, 2023.
  """
  check_no_dtype("mu_dtype", mu_dtype)
  check_hyperparam("b1", b1, 0.0, 1.0)
  check_hyperparam("b2", b2, 0.0, 1.0, high_open=True)
  return scale_by_rule_8bit(
      rules.lion_rule, (MomentSpec("mu", signed=True),),
      lambda count: rules.lion_hparams(b1, b2), ScaleByLion8bitState,
      block_size=block_size, min_8bit_size=min_8bit_size,
      quantize_mask=quantize_mask, backend=backend,
  )


@with_extras_doc
def trace_8bit(
    decay: float,
    nesterov: bool = False,
    accumulator_dtype=None,
    *,
    block_size: int | None = None,
    min_8bit_size: int | None = None,
    quantize_mask: QuantizeMask = None,
    backend: str = "auto",
) -> optax.GradientTransformation:
  """``optax.trace`` (momentum) with its trace in 8 bits (signed map).

  Args:
    decay: momentum coefficient.
    nesterov: Nesterov momentum.
    accumulator_dtype: only ``None``, in optax's position (the moments are 8-bit codes).
{extras}

  Returns:
    An ``optax.GradientTransformation`` with ``Trace8bitState``.

  References:
    Sutskever et al., `On the importance of initialization and momentum in
    deep learning <https://proceedings.mlr.press/v28/sutskever13.html>`_, 2013.
  """
  check_no_dtype("accumulator_dtype", accumulator_dtype)
  check_hyperparam("momentum", decay, 0.0)
  rule = rules.nesterov_momentum_rule if nesterov else rules.momentum_rule
  return scale_by_rule_8bit(
      rule, (MomentSpec("trace", signed=True),),
      lambda count: rules.momentum_hparams(decay), Trace8bitState,
      block_size=block_size, min_8bit_size=min_8bit_size,
      quantize_mask=quantize_mask, backend=backend,
  )


@with_extras_doc
def scale_by_rms_8bit(
    decay: float = 0.9,
    eps: float = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
    *,
    block_size: int | None = None,
    min_8bit_size: int | None = None,
    quantize_mask: QuantizeMask = None,
    backend: str = "auto",
) -> optax.GradientTransformation:
  """``optax.scale_by_rms`` with its second moment in 8 bits.

  The second moment is non-negative, so it uses the unsigned map (twice the
  resolution of the signed map bitsandbytes uses for every one-state
  optimizer; ``tests/test_family.py`` measures the difference).

  Args:
    decay: decay of the moving average of squared gradients.
    eps: added to the denominator (inside or outside the square root).
    initial_scale: initial value of the moving average.
    eps_in_sqrt: whether ``eps`` goes inside the square root.
    bias_correction: whether to bias-correct the moving average.
{extras}

  Returns:
    An ``optax.GradientTransformation`` with ``ScaleByRms8bitState``.

  References:
    Tieleman & Hinton, Lecture 6.5 - RMSProp, COURSERA, 2012.
  """
  check_hyperparam("decay", decay, 0.0, 1.0, high_open=True)
  check_hyperparam("eps", eps, 0.0)
  return scale_by_rule_8bit(
      rules.rms_rule, (MomentSpec("nu", signed=False, init=initial_scale),),
      lambda count: rules.rms_hparams(decay, eps, eps_in_sqrt, bias_correction, count),
      ScaleByRms8bitState,
      block_size=block_size, min_8bit_size=min_8bit_size,
      quantize_mask=quantize_mask, backend=backend,
  )


@with_extras_doc
def scale_by_rss_8bit(
    initial_accumulator_value: float = 0.1,
    eps: float = 1e-7,
    *,
    eps_in_sqrt: bool = True,
    block_size: int | None = None,
    min_8bit_size: int | None = None,
    quantize_mask: QuantizeMask = None,
    backend: str = "auto",
) -> optax.GradientTransformation:
  """``optax.scale_by_rss`` (Adagrad) with its accumulator in 8 bits (unsigned map).

  Args:
    initial_accumulator_value: starting value of the sum of squares.
    eps: added inside the square root (optax's form), or outside it with
      ``eps_in_sqrt=False``: ``g / (sqrt(sum) + eps)``, PyTorch's and
      bitsandbytes' Adagrad.
    eps_in_sqrt: where ``eps`` goes.
{extras}

  Returns:
    An ``optax.GradientTransformation`` with ``ScaleByRss8bitState``.

  References:
    Duchi et al., `Adaptive Subgradient Methods for Online Learning and
    Stochastic Optimization <https://jmlr.org/papers/v12/duchi11a.html>`_, 2011.
  """
  check_hyperparam("eps", eps, 0.0)
  return scale_by_rule_8bit(
      rules.rss_rule if eps_in_sqrt else rules.rss_eps_outside_rule,
      (MomentSpec("sum_of_squares", signed=False, init=initial_accumulator_value),),
      lambda count: rules.rss_hparams(eps), ScaleByRss8bitState,
      block_size=block_size, min_8bit_size=min_8bit_size,
      quantize_mask=quantize_mask, backend=backend,
  )


@with_extras_doc
def scale_by_ademamix_8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    b3: optax.ScalarOrSchedule = 0.9999,
    alpha: optax.ScalarOrSchedule = 6.0,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype=None,
    *,
    block_size: int | None = None,
    min_8bit_size: int | None = None,
    quantize_mask: QuantizeMask = None,
    backend: str = "auto",
) -> optax.GradientTransformation:
  """``optax.contrib.scale_by_ademamix`` with its three moments in 8 bits.

  Args:
    b1: decay of the fast first moment.
    b2: decay of the second moment.
    b3: decay of the slow first moment, a float or a schedule (warm-up).
    alpha: weight of the slow moment, a float or a schedule (warm-up).
    eps: term added to the denominator outside the square root.
    eps_root: term added to the second moment inside the square root.
    mu_dtype: only ``None``, in optax's position (the moments are 8-bit codes).
{extras}

  Returns:
    An ``optax.GradientTransformation`` with ``ScaleByAdemamix8bitState``.

  References:
    Pagliardini et al., `The AdEMAMix Optimizer: Better, Faster, Older
    <https://arxiv.org/abs/2409.03137>`_, 2024.
  """
  check_no_dtype("mu_dtype", mu_dtype)
  check_hyperparam("b1", b1, 0.0, 1.0, high_open=True)
  check_hyperparam("b2", b2, 0.0, 1.0, high_open=True)
  check_hyperparam("b3", b3, 0.0, 1.0, high_open=True)
  check_hyperparam("alpha", alpha, 0.0)
  check_hyperparam("eps", eps, 0.0)
  check_hyperparam("eps_root", eps_root, 0.0)
  return scale_by_rule_8bit(
      rules.ademamix_rule,
      (MomentSpec("m1", signed=True), MomentSpec("m2", signed=True), MomentSpec("nu", signed=False)),
      lambda count: rules.ademamix_hparams(b1, b2, b3, alpha, eps, eps_root, count),
      ScaleByAdemamix8bitState,
      block_size=block_size, min_8bit_size=min_8bit_size,
      quantize_mask=quantize_mask, backend=backend,
  )
