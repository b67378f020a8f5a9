"""Convert optimizer states between float32 and 8-bit forms.

:func:`quantize_state` turns a float32 state (``optax.adam``/``adamw``/
``lion``/... or this library's float32 form) into the state of an 8-bit
transformation, so a running job can switch to 8-bit without losing its
moments; :func:`dequantize_state` goes back, to this library's float32 form
or to any float32 optax transformation's state (fields are matched by name:
``mu``, ``nu``, ``trace``, ``sum_of_squares``...).

Block sizes are not stored in states: they are read off the shapes of codes
and scales (a block count determines a power-of-two block size uniquely,
or any block size gives the same values).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from optax_paged import quantization as qz


def _is_8bit_state(node) -> bool:
  return isinstance(node, tuple) and hasattr(node, "_fields") and isinstance(getattr(node, "SIGNED", None), dict)


def infer_block_size(shape, absmax_shape) -> int:
  """The block size that gives ``absmax_shape`` for an array of ``shape``."""
  shape, absmax_shape = tuple(shape), tuple(absmax_shape)
  n, blocks = math.prod(shape), math.prod(absmax_shape)
  for b in (2**k for k in range(6, 13)):
    if tuple(qz.absmax_shape(shape, b)) == absmax_shape:
      return b
  raise ValueError(f"No block size in 64..4096 gives {blocks} blocks for shape {shape}.")


def _device(x):
  """Moves (paged) host-memory leaves to the device, where math can run."""
  return jax.device_put(x, jax.memory.Space.Device)


def _decode_field(codes_tree, absmax_tree, signed):
  def one(c, a):
    if a is None:
      return jnp.asarray(_device(c), jnp.float32)
    c, a = _device(c), _device(a)
    b = infer_block_size(c.shape, a.shape)
    return qz.dequantize_blockwise(qz.QuantizedArray(c, a), signed=signed, block_size=b)

  return jax.tree.map(one, codes_tree, absmax_tree, is_leaf=lambda x: x is None)


def _float_form(node):
  """Our 8-bit state node -> the same NamedTuple with float32 moments."""
  fields = node._asdict()
  for name, signed in node.SIGNED.items():
    fields[name] = _decode_field(fields[name], fields[name + "_absmax"], signed)
    fields[name + "_absmax"] = jax.tree.map(lambda _: None, fields[name + "_absmax"])
  return type(node)(**fields)


def _zip(template, source, fn, target):
  """Rebuilds ``template``'s containers over ``source``; ``fn`` on target nodes.

  Containers (tuples, NamedTuples, lists, dicts) are walked in parallel;
  where ``target(template_node, source_node)`` holds, the result is
  ``fn(template_node, source_node)``; elsewhere the source node is kept.
  """
  if target(template, source):
    return fn(template, source)
  if isinstance(template, tuple) and isinstance(source, tuple) and len(template) == len(source):
    items = [_zip(t, s, fn, target) for t, s in zip(template, source)]
    return type(template)(*items) if hasattr(template, "_fields") else type(template)(items)
  if isinstance(template, list) and isinstance(source, list) and len(template) == len(source):
    return [_zip(t, s, fn, target) for t, s in zip(template, source)]
  if isinstance(template, dict) and isinstance(source, dict) and template.keys() == source.keys():
    items = [(k, _zip(template[k], source[k], fn, target)) for k in template]
    try:  # the template's type and order (optax.named_chain's OrderedDict)
      return type(template)(items)
    except TypeError:
      return dict(items)
  return source


def _params_like(state):
  """A params-shaped tree found in a state: its first moment fields.

  Under ``optax.multi_transform`` each group's moments hold ``MaskedNode``
  where another group's parameters are: the moments of all groups are merged,
  each parameter taken from the first group that has it.
  """
  found = []

  def visit(node):
    if isinstance(node, tuple) and hasattr(node, "_fields"):
      for name in ("mu", "m1", "trace", "nu", "sum_of_squares"):
        if name in node._fields:
          found.append(getattr(node, name))
          return
    if isinstance(node, (tuple, list)):
      for x in node:
        visit(x)
    elif isinstance(node, dict):
      for x in node.values():
        visit(x)

  visit(state)
  if not found:
    raise ValueError("Cannot find the parameters' shapes in this state: pass params=.")
  masked = lambda x: isinstance(x, optax.MaskedNode)
  try:
    merged = jax.tree.map(lambda *xs: next((x for x in xs if not masked(x)), xs[0]), *found,
                          is_leaf=masked)
  except ValueError:  # moments of different structures: the first one's
    merged = found[0]
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), merged)


def dequantize_state(state, tx=None, params=None):
  """Turns an 8-bit state into a float32 one.

  Args:
    state: a state of an 8-bit transformation (chains and wrappers included).
    tx: optional float32 transformation whose state structure to produce
      (e.g. ``optax.adamw(...)`` for an ``adamw_8bit`` state); by default the
      result is this library's float32 form of the same state (same
      ``NamedTuple`` types, float32 moments, ``None`` scales).
    params: parameters (or their shapes) for ``tx.init``; found in the state
      when omitted.

  Returns:
    The float32 state (in device memory).
  """
  found = []

  def to_float(t, s):
    found.append(s)
    return _float_form(s)

  floats = _zip(state, state, to_float, lambda t, s: _is_8bit_state(s))
  floats = jax.tree.map(_device, floats)  # paged leaves (the count too) included
  if tx is None:
    return floats
  template = jax.eval_shape(tx.init, params if params is not None else _params_like(state))
  copied = []

  def copy(t, s):
    copied.append(type(s).__name__)
    return _copy_fields(t, s)

  out = _zip(template, floats, copy, lambda t, s: _is_8bit_state(s) and hasattr(t, "_fields"))
  _check_all_converted(len(copied), len(found), "8-bit state", "tx's state",
                       "The state holds no 8-bit optimizer state to dequantize.")
  return out


def _check_all_converted(done: int, expected: int, source: str, target: str, empty: str):
  """Raises unless every 8-bit state node found its counterpart."""
  if expected == 0:
    raise ValueError(empty)
  if done != expected:
    raise ValueError(
        f"The {source}'s structure does not match {target}: {done} of {expected} 8-bit "
        "state nodes were matched (chains must line up element by element, e.g. "
        "optax.chain(clip, optax.adamw(...)) with optax.chain(clip, adamw_8bit(...))).")


def _count(node):
  """A state node's step count (0 for states without one, like TraceState).

  Read as a field: ``node.count`` on a NamedTuple without that field is
  ``tuple.count``, a method. Returned as it is (``flax.nnx.Optimizer`` wraps
  it in an ``OptArray``, which the converted state must keep).
  """
  return node.count if "count" in node._fields else jnp.zeros([], jnp.int32)


# State fields that hold moments (the parameters' shapes) in optax and here.
_MOMENT_FIELDS = ("mu", "nu", "m1", "m2", "trace", "sum_of_squares")


def _like(template_leaf, value):
  """``value`` in ``template_leaf``'s dtype when both are floating arrays."""
  dtype = getattr(template_leaf, "dtype", None)
  if (dtype is not None and hasattr(value, "dtype") and value.dtype != dtype
      and jnp.issubdtype(dtype, jnp.floating) and jnp.issubdtype(value.dtype, jnp.floating)):
    return value.astype(dtype)
  return value


def _copy_fields(template_node, source_node):
  """A ``template_node``-typed node with the same-named fields of ``source_node``."""
  values = {}
  for name in template_node._fields:
    if name in source_node._fields:
      # In the template's dtypes (e.g. optax keeps bfloat16 moments for
      # bfloat16 parameters); the decoded moments are float32.
      values[name] = jax.tree.map(_like, getattr(template_node, name), getattr(source_node, name))
    elif name.startswith("count"):
      values[name] = _count(source_node)
    else:
      raise ValueError(f"{type(template_node).__name__}.{name} has no counterpart in "
                       f"{type(source_node).__name__} ({', '.join(source_node._fields)}).")
  return type(template_node)(**values)


def quantize_state(fp32_state, tx, params=None):
  """Turns a float32 state into the state of the 8-bit transformation ``tx``.

  Args:
    fp32_state: the state of the float32 twin (``optax.adamw(...)``'s for
      ``adamw_8bit``, ``optax.lion``'s for ``lion_8bit``...) or this library's
      float32 form; moment fields are matched by name and position in the chain.
    tx: the 8-bit transformation (e.g. ``optax_paged.adamw_8bit(3e-4)``); its
      ``block_size``, ``min_8bit_size`` and ``quantize_mask`` decide which
      leaves get 8-bit codes.
    params: parameters (or their shapes); found in the state when omitted.

  Returns:
    A state of ``tx`` holding the same moments (to the codec's precision)
    and step count, in device memory: for a paged ``tx`` move it with
    ``optax_paged.place(state, policy)`` (or let the first update do it,
    which compiles the step once more). An 8-bit state is decoded first, so
    this also changes a state's ``block_size``.
  """
  template = jax.eval_shape(tx.init, params if params is not None else _params_like(fp32_state))
  encoded = []

  def encode(t_node, s_node):
    if not (isinstance(s_node, tuple) and hasattr(s_node, "_fields")):
      raise ValueError(f"{type(t_node).__name__} lines up with a {type(s_node).__name__} in the "
                       "float32 state, not with an optimizer state.")
    if _is_8bit_state(s_node):  # already 8-bit (e.g. to change block_size): decode first
      s_node = _float_form(s_node)
    unused = [f for f in _MOMENT_FIELDS if f in s_node._fields and f not in t_node.SIGNED]
    if unused:
      raise ValueError(
          f"{type(s_node).__name__} holds moment(s) {', '.join(unused)} that "
          f"{type(t_node).__name__} has no place for: is this the state of another optimizer?")
    values = {"count": _count(s_node)}
    for name, signed in t_node.SIGNED.items():
      if name not in s_node._fields:
        raise ValueError(f"{type(s_node).__name__} has no moment {name!r} for {type(t_node).__name__}.")
      src = getattr(s_node, name)
      t_absmax = getattr(t_node, name + "_absmax")

      def one(path, x, t, a, name=name, signed=signed):
        where = f"{type(s_node).__name__}.{name}{jax.tree_util.keystr(path)}"
        if tuple(jnp.shape(x)) != tuple(t.shape):
          raise ValueError(f"{where} has shape {tuple(jnp.shape(x))}, but {type(t_node).__name__} "
                           f"expects {tuple(t.shape)} (the parameter's).")
        x = jnp.asarray(_device(x), jnp.float32)
        if not isinstance(x, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(x))):
          raise ValueError(f"{where} holds NaN or infinite values: quantizing would hide them "
                           "(NaN -> 0, inf -> the block's largest code).")
        if a is None:
          return x, None
        # As the optimizer stores moments: a nonzero value never gets the zero
        # code (a positive second moment stored as 0 would blow up m / sqrt(v)).
        q = qz.quantize_blockwise(x, signed=signed, block_size=infer_block_size(x.shape, a.shape),
                                  keep_nonzero=True)
        return q.codes, q.absmax

      pairs = jax.tree_util.tree_map_with_path(
          one, src, getattr(t_node, name), t_absmax, is_leaf=lambda v: v is None)
      values[name] = jax.tree.map(lambda _, p: p[0], src, pairs)
      values[name + "_absmax"] = jax.tree.map(lambda _, p: p[1], src, pairs)
    encoded.append(type(t_node).__name__)
    return type(t_node)(**values)

  out = _zip(template, fp32_state, encode, lambda t, s: _is_8bit_state(t))
  targets = []
  _zip(template, template, lambda t, s: targets.append(t), lambda t, s: _is_8bit_state(t))
  _check_all_converted(len(encoded), len(targets), "float32 state", "tx's state",
                       "tx's state holds no 8-bit moments to quantize: pass an optax_paged "
                       "8-bit transformation with state (e.g. adamw_8bit(...); sgd_8bit without "
                       "momentum has none).")
  return out
