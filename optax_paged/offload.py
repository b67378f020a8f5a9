"""Paged optimizer state: keep state in host memory, bring it to the device only to update.

The JAX analogue of bitsandbytes' paged optimizers (which put state in CUDA
unified memory): :func:`paged` wraps any ``GradientTransformation`` so that
the state leaves chosen by an :class:`OffloadPolicy` live in ``pinned_host``
memory between steps. Inside the caller's own ``jax.jit``, each update moves
them to ``device`` memory, runs the wrapped update, and moves the new state
back, with ``jax.device_put`` to a memory *space*, so the leaves keep their
shardings (and partition specs) and nobody passes shardings around.

For elementwise transformations the update runs one parameter at a time,
and each parameter's state moves to the device only after an earlier
parameter's new state is back on the host (``prefetch``), so the device
holds a few parameters' state at once instead of all of it.

Large leaves can be streamed through the device in pages (``page_bytes``):
the update then runs one page of rows at a time, so the device holds a
bounded number of pages of state instead of the whole leaf. Both apply the
wrapped transformation to a part of the tree at a time, so they are only
correct for transformations that act on every element independently (Adam,
AdamW, Lion, SGD and their 8-bit forms); :func:`paged` therefore splits only
when told ``elementwise=True``, which the library's ``paged_*`` aliases do.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import weakref
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_paged import backend as backend_lib

HOST = "pinned_host"
DEVICE = "device"

# bitsandbytes pages only state tensors of at least 1e5 elements.
DEFAULT_MIN_SIZE = 100_000
# Page boundaries fall on multiples of this many elements.
PAGE_ALIGN = 4096
# Share of the device's memory limit that "auto" leaves free for everything
# else (activations, gradients, XLA scratch).
AUTO_RESERVE_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class OffloadPolicy:
  """Decides which optimizer-state leaves live in host memory between steps.

  Attributes:
    min_size: state leaves with fewer elements stay on the device (default
      100,000, bitsandbytes' threshold for paging a state tensor); scalars
      (step counts) and empty leaves always stay.
    device_budget_bytes: ``None`` offloads every eligible leaf. A number keeps
      state on the device while it fits in that many bytes and offloads the
      rest ("page only when memory runs out"): leaves below ``min_size``
      always stay and count first; eligible leaves then stay, in tree order,
      as long as the running total fits (first fit). ``"auto"`` derives the
      budget from the first device's ``memory_stats()``:
      ``bytes_limit - bytes_in_use - 10% of bytes_limit``, read once per
      policy object, when the first transformation is built with it (so
      ``optax.inject_hyperparams``, which builds it again at every trace,
      keeps that reading; a new ``OffloadPolicy`` reads again); where the
      backend reports no statistics (CPU), every eligible leaf is
      offloaded.
    page_bytes: if set, offloaded leaves whose state exceeds this many bytes
      are streamed through the device in pages of about this size (row
      ranges of the parameter), one page at a time. Needs
      ``paged(..., elementwise=True)``.
    prefetch: ordering of the transfers, for elementwise transformations
      (``paged(..., elementwise=True)``, as the ``paged_*`` aliases are). The
      update then runs one parameter at a time (in tree order), and the state
      of the ``i``-th offloaded parameter is moved to the device only once the
      new state of the ``(i - 1 - prefetch)``-th is back in host memory: at most
      ``prefetch + 1`` parameters' state is on the device at once (default
      1: one updating while the next one's state comes in). ``None`` leaves
      the order to XLA, which brings all the state in at once (1B
      parameters of ``paged_adamw``: 12.05 GiB peak on an H200; 5.56 GiB with
      the default, on an H100).
    enabled: ``False`` turns paging off (the wrapped transformation runs
      unchanged).
  """

  min_size: int = DEFAULT_MIN_SIZE
  device_budget_bytes: int | Literal["auto"] | None = None
  page_bytes: int | None = None
  prefetch: int | None = 1
  enabled: bool = True

  def __post_init__(self):
    if not _is_int(self.min_size) or self.min_size < 0:
      raise ValueError(f"min_size must be a non-negative int, got {self.min_size!r}.")
    budget = self.device_budget_bytes
    if budget is not None and budget != "auto" and (not _is_int(budget) or budget < 0):
      raise ValueError(
          "device_budget_bytes must be None, 'auto' or a non-negative int, "
          f"got {budget!r}."
      )
    if self.page_bytes is not None and (not _is_int(self.page_bytes) or self.page_bytes <= 0):
      raise ValueError(f"page_bytes must be None or a positive int, got {self.page_bytes!r}.")
    if self.prefetch is not None and (not _is_int(self.prefetch) or self.prefetch < 0):
      raise ValueError(f"prefetch must be None or a non-negative int, got {self.prefetch!r}.")
    if not isinstance(self.enabled, bool):
      raise ValueError(f"enabled must be a bool, got {self.enabled!r}.")


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


# ---------------------------------------------------------------------------
# Backend facts.

_warned: set[str] = set()


def _warn_once(key: str, message: str):
  if key not in _warned:
    _warned.add(key)
    warnings.warn(message, stacklevel=3)


def host_offload_supported(device=None) -> bool:
  """Whether ``device`` (default: the first device) has ``pinned_host`` memory."""
  device = device or jax.devices()[0]
  try:
    kinds = {m.kind for m in device.addressable_memories()}
  except Exception:  # noqa: BLE001 - backends without the memories API
    return False
  return HOST in kinds


def _auto_budget(memory_stats: Callable[[], dict | None] | None = None) -> int | None:
  """Device bytes the state may use, or ``None`` when the backend cannot say."""
  stats_fn = memory_stats or (lambda: jax.devices()[0].memory_stats())
  try:
    stats = stats_fn()
  except Exception:  # noqa: BLE001 - backends without memory statistics
    stats = None
  if not stats or "bytes_limit" not in stats:
    return None
  limit = int(stats["bytes_limit"])
  in_use = int(stats.get("bytes_in_use", 0))
  return max(0, limit - in_use - int(AUTO_RESERVE_FRACTION * limit))


def _nbytes(leaf) -> int:
  return math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize


def placement(state, policy: OffloadPolicy, budget: int | None = None) -> list[bool]:
  """Which leaves of ``state`` (in ``jax.tree.leaves`` order) go to the host.

  Args:
    state: a state pytree (arrays or ``ShapeDtypeStruct``s).
    policy: the offload policy.
    budget: resolved device budget in bytes (``None``: offload every eligible
      leaf); for ``device_budget_bytes="auto"`` pass the resolved number.

  Returns:
    One bool per leaf: ``True`` means the leaf lives in ``pinned_host`` memory.
  """
  leaves = jax.tree.leaves(state)
  # Scalars (step counts) always stay: offloading them saves nothing, and
  # wrappers such as optax.MultiSteps select between old and new state with
  # jnp.where, which gives a scalar in host memory back in device memory.
  eligible = [len(x.shape) > 0 and math.prod(x.shape) >= max(policy.min_size, 1) for x in leaves]
  if budget is None:
    return eligible
  used = sum(_nbytes(x) for x, e in zip(leaves, eligible) if not e)
  offload = []
  for x, e in zip(leaves, eligible):
    if e and used + _nbytes(x) <= budget:
      used += _nbytes(x)
      offload.append(False)
    else:
      offload.append(e)
  return offload


def _to_space(x, space):
  # Leave concrete arrays that are already there alone: device_put would
  # commit an uncommitted scalar (like a step count) to one device, which a
  # jit over a multi-device mesh then rejects.
  if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
    kind = getattr(x.sharding, "memory_kind", None) or DEVICE
    if kind == (HOST if space == jax.memory.Space.Host else DEVICE):
      return x
  return jax.device_put(x, space)


def _place(state, where: list[bool]):
  leaves, treedef = jax.tree.flatten(state)
  moved = [
      _to_space(x, jax.memory.Space.Host if h else jax.memory.Space.Device)
      for x, h in zip(leaves, where)
  ]
  if any(where) and jax.device_count() == 1:
    # Arrays in host memory are committed to their device, and a jitted step
    # compiles again when its inputs go from partly to wholly committed (its
    # outputs are). So the device leaves are committed too (outside jit;
    # with one device only, see _to_space): with committed parameters the
    # step then compiles once.
    moved = [_commit(x) for x in moved]
  return jax.tree.unflatten(treedef, moved)


def _commit(x):
  if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and not x.committed:
    return jax.device_put(x, jax.devices()[0])
  return x


def place(state, policy: OffloadPolicy | None = None, *, tx=None, params=None, memory_stats=None):
  """Moves ``state``'s leaves to the memory kinds their optimizer keeps them in.

  Use it after restoring a checkpoint to device memory (the portable recipe;
  see the README), or to page an existing state.

  With ``tx`` (the transformation whose state this is) and ``params``
  (arrays or ``jax.ShapeDtypeStruct``s), each leaf goes where ``tx.init``
  puts it: right for any state, including wrappers and chains around a
  paged transformation (``optax.MultiSteps``' accumulated gradients stay on
  the device). With only ``policy``, the policy is applied to every leaf of
  ``state``: right for the state of ``paged(tx, policy)`` itself.

  Args:
    state: an optimizer state.
    policy: an :class:`OffloadPolicy` (default ``OffloadPolicy()``).
    tx: optional transformation whose placement to reproduce.
    params: the parameters (or their shapes), needed with ``tx``.
    memory_stats: as in :func:`paged`, for ``device_budget_bytes="auto"``.

  Returns:
    The state with offloaded leaves in ``pinned_host`` memory and the rest
    in ``device`` memory (unchanged where the backend has no host memory or
    the policy is disabled).
  """
  if tx is not None:
    if params is None:
      raise ValueError("place(state, tx=...) needs params= (the parameters or their shapes) "
                       "to find where tx.init puts each leaf.")
    if not host_offload_supported():
      return state
    shardings = jax.jit(tx.init).lower(params).compile().output_shardings
    kinds = [getattr(s, "memory_kind", None) == HOST for s in jax.tree.leaves(shardings)]
    if len(kinds) != len(jax.tree.leaves(state)):
      raise ValueError(f"state has {len(jax.tree.leaves(state))} leaves but tx.init(params) "
                       f"gives {len(kinds)}: is it the state of this tx?")
    return _place(state, kinds)
  policy = policy or OffloadPolicy()
  if not isinstance(policy, OffloadPolicy):
    raise TypeError(f"policy must be an OffloadPolicy, got {type(policy).__name__}.")
  if not policy.enabled or not host_offload_supported():
    return state
  return _place(state, placement(state, policy, _resolve_budget(policy, memory_stats)))


# "auto" budgets, read once per policy object (and statistics source):
# optax.inject_hyperparams builds the transformation again at init and at
# every update trace, when the state itself already takes device memory; a
# second reading would move leaves. An entry goes with its policy.
_AUTO_BUDGETS: dict[int, tuple[Any, int | None]] = {}


def _stats_source(memory_stats) -> tuple:
  """What a statistics function reads: a bound method (``device.memory_stats``)
  is a new object at each access, the same by its object and function. The
  cache holds these objects, so their ids cannot be reused while it does."""
  owner, func = getattr(memory_stats, "__self__", None), getattr(memory_stats, "__func__", None)
  if owner is not None and func is not None:
    return (owner, func)
  return (memory_stats,)


def _same_source(a: tuple, b: tuple) -> bool:
  return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _resolve_budget(policy: OffloadPolicy, memory_stats=None) -> int | None:
  if policy.device_budget_bytes == "auto":
    source = _stats_source(memory_stats)
    known = _AUTO_BUDGETS.get(id(policy))
    if known is not None and _same_source(known[0], source):
      return known[1]
    budget = _auto_budget(memory_stats)
    if known is None:
      weakref.finalize(policy, _AUTO_BUDGETS.pop, id(policy), None)
    _AUTO_BUDGETS[id(policy)] = (source, budget)
    return budget
  if policy.device_budget_bytes is None:
    return None
  return int(policy.device_budget_bytes)


def _to_device(tree):
  return jax.tree.map(lambda x: _to_space(x, jax.memory.Space.Device), tree)


# ---------------------------------------------------------------------------
# The wrapper.


def paged(
    tx: optax.GradientTransformation,
    policy: OffloadPolicy | None = None,
    *,
    elementwise: bool = False,
    memory_stats: Callable[[], dict | None] | None = None,
) -> optax.GradientTransformation:
  """Keeps ``tx``'s state in host memory between steps (a paged optimizer).

  Args:
    tx: any ``GradientTransformation`` (optax's, the 8-bit ones, chains).
    policy: what to offload; default ``OffloadPolicy()``.
    elementwise: assert that ``tx`` updates every element independently of
      all others (no global norms, no per-leaf statistics). Required for
      ``policy.page_bytes`` streaming, which applies ``tx`` to one page of a
      leaf at a time, and for ordered transfers (``policy.prefetch``), which
      apply it to one parameter at a time; without it the update runs whole
      and XLA orders the transfers.
    memory_stats: where ``device_budget_bytes="auto"`` reads device memory
      statistics (default: ``jax.devices()[0].memory_stats``); for tests.

  Returns:
    A ``GradientTransformation`` with ``tx``'s state structure whose
    offloaded leaves have ``sharding.memory_kind == "pinned_host"`` after
    ``init`` and after every ``update``. Without ``pinned_host`` memory on the
    backend it warns once and returns ``tx`` (as bitsandbytes does on CPU).
  """
  policy = policy or OffloadPolicy()
  if not isinstance(policy, OffloadPolicy):
    raise TypeError(f"policy must be an OffloadPolicy, got {type(policy).__name__}.")
  if not policy.enabled:
    return tx
  if policy.page_bytes is not None and not elementwise:
    raise ValueError(
        "page_bytes streams the update one page at a time, which is only "
        "correct for elementwise transformations (Adam, AdamW, Lion, SGD and "
        "their 8-bit forms). Pass elementwise=True to confirm, or keep "
        "global-norm clipping, LAMB, LARS and the like outside paged()."
    )
  if not host_offload_supported():
    _warn_once(
        "no-host",
        f"{jax.devices()[0].platform} has no pinned_host memory: optimizer "
        "state stays on the device (paging disabled).",
    )
    return tx
  budget = _resolve_budget(policy, memory_stats)

  def init_fn(params):
    if not elementwise:
      state = tx.init(params)
      return _place(state, placement(state, policy, budget))
    template = jax.eval_shape(tx.init, params)
    return _split_init(tx, params, template, placement(template, policy, budget))

  def update_fn(updates, state, params=None, **extra_args):
    with backend_lib.auto_uses_xla():
      return _update(updates, state, params, **extra_args)

  def _update(updates, state, params=None, **extra_args):
    where = placement(state, policy, budget)
    if elementwise and (policy.page_bytes is not None or policy.prefetch is not None):
      tree = jax.tree.structure(updates)
      bare = jax.tree_util.treedef_is_leaf(tree) and tree.num_leaves == 1  # not None
      split = _split_update_of_a_leaf if bare else _split_update
      updates, new_state = split(
          tx, updates, state, params, extra_args, where, policy.page_bytes, policy.prefetch
      )
    else:
      updates, new_state = _whole_update(tx, updates, state, params, extra_args)
    return updates, _place(new_state, where)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _whole_update(tx, updates, state, params, extra_args):
  return optax.with_extra_args_support(tx).update(
      updates, _to_device(state), params, **extra_args
  )


# ---------------------------------------------------------------------------
# One parameter at a time.
#
# For an elementwise transformation the update (and init) can run on a pruned
# tree holding one parameter (every other parameter replaced by None, which
# optax transformations pass through); its state is then the same containers
# with only that parameter's leaves, matched to the full state by key paths.
# That lets the offloaded state move to the device one parameter at a time,
# in an order the transfers must follow, and lets large leaves be streamed
# in pages (ranges of rows).

# Parameters go in tree order. Reverse order (backpropagation produces the
# gradients of a network's last layers first) was the default until measured:
# at 1B parameters, paged steps in tree order were 12% faster on an H200
# (float32 state, same peak) and 9-12% faster on an H100 (float32 and 8-bit
# state; 8-bit peak 4.88 instead of 4.97 GiB), benchmarks/RESULTS.md. A
# switch for benchmarks/paging_gpu.py ("@reverse").
_REVERSE_ORDER = False


def _paths(tree) -> dict:
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _sds(x):
  return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))


def _pruned(treedef, leaves, keep: dict):
  """Tree with leaf ``j`` replaced by ``keep[j]`` and all others by None."""
  return jax.tree.unflatten(treedef, [keep.get(j) for j in range(len(leaves))])


class _Templates:
  """``jax.eval_shape(tx.init, tree with only the kept parameters)``, memoized.

  The state structure of a pruned tree is asked for once per parameter to
  find what it owns, then again to update it: tracing ``tx.init`` each time
  was a quarter of the tracing time of a 200-parameter paged update.
  """

  def __init__(self, tx, leaves, treedef):
    self.tx, self.treedef = tx, treedef
    self.shapes = [_sds(x) for x in leaves]
    self.cache = {}

  def __call__(self, keep: dict):
    """``keep``: ``{index: ShapeDtypeStruct}`` of the parameters (or pages) kept."""
    key = tuple(sorted((j, tuple(x.shape), jnp.dtype(x.dtype).name) for j, x in keep.items()))
    if key not in self.cache:
      self.cache[key] = jax.eval_shape(self.tx.init, _pruned(self.treedef, self.shapes, keep))
    return self.cache[key]


def _owned_state(templates: _Templates, full_paths):
  """The state key paths that belong to each parameter leaf alone.

  Returns ``{parameter index: [key path, ...]}``, or ``None`` when the state
  does not split into per-parameter leaves plus shared ones (a step count...)
  that all parameters read.
  """
  shared = set(_paths(templates({})))
  owned, seen = {}, set(shared)
  for j, s in enumerate(templates.shapes):
    keys = [k for k in _paths(templates({j: s})) if k not in shared]
    if any(k in seen or k not in full_paths for k in keys):
      return None
    seen.update(keys)
    if keys:
      owned[j] = keys
  return owned if seen == set(full_paths) else None


def _with_offloaded_state(owned, offloaded) -> list[int]:
  """Indices of the parameters that own at least one offloaded state leaf."""
  return [j for j in sorted(owned) if any(offloaded[k] for k in owned[j])]


def _space(offloaded: bool):
  return jax.memory.Space.Host if offloaded else jax.memory.Space.Device


def _split_init(tx, params, template, where):
  """``tx.init`` one offloaded parameter at a time, each moved out at once.

  Only one parameter's new state is on the device at a time (outside
  ``jit``), instead of the whole state before it is moved to the host.
  """
  leaves, treedef = jax.tree.flatten(params)
  t_keys = list(_paths(template))
  offloaded = dict(zip(t_keys, where))
  owned = _owned_state(_Templates(tx, leaves, treedef), dict.fromkeys(t_keys))
  if owned is None:
    return _place(tx.init(params), where)
  groups = _with_offloaded_state(owned, offloaded)
  rest = {j: x for j, x in enumerate(leaves) if j not in groups}
  values = _paths(tx.init(_pruned(treedef, leaves, rest)))
  for j in groups:
    new = _paths(tx.init(_pruned(treedef, leaves, {j: leaves[j]})))
    values.update({k: _to_space(new[k], _space(offloaded[k])) for k in owned[j]})
  flat = [values[k] for k in t_keys]
  return _place(jax.tree.unflatten(jax.tree.structure(template), flat), where)


class _PagePlan:
  """How one parameter leaf is cut into row pages, and which state follows."""

  def __init__(self, index, rows, num_full, last_rows, owned, page_len, last_len):
    self.index = index  # parameter leaf index
    self.rows = rows  # rows per full page
    self.num_full = num_full
    self.last_rows = last_rows  # rows of the last, shorter page (0: none)
    self.owned = owned  # key paths of the state leaves of this parameter
    self.page_len = page_len  # axis-0 length of each owned leaf per full page
    self.last_len = last_len  # ... and on the last page


def _plan_pages(templates: _Templates, full_paths, offloaded, page_bytes, owned):
  """Page plans for the parameters whose offloaded state exceeds ``page_bytes``.

  ``owned`` is :func:`_owned_state`'s answer: the state each parameter owns.
  """
  shapes = templates.shapes

  def template(j, rows):
    page = jax.ShapeDtypeStruct((rows,) + tuple(shapes[j].shape[1:]), shapes[j].dtype)
    return _paths(templates({j: page}))

  plans = []
  for j in _with_offloaded_state(owned, offloaded):
    p, keys = shapes[j], owned[j]
    if p.ndim == 0 or p.shape[0] < 2:
      continue
    state_bytes = sum(_nbytes(full_paths[k]) for k in keys)
    if state_bytes <= page_bytes:
      continue
    # Pages start at multiples of 4096 elements, so that blocks of any
    # blockwise-quantized state (block sizes are powers of two <= 4096)
    # never straddle two pages.
    row = math.prod(p.shape[1:])
    step = PAGE_ALIGN // math.gcd(row, PAGE_ALIGN) if row else 1
    rows = max(step, int(p.shape[0] * page_bytes // state_bytes) // step * step)
    plan = _fit_pages(j, p.shape[0], rows, keys, full_paths, template)
    if plan is None:
      _warn_once(
          f"nopage-{p.shape}-{p.dtype}",
          f"The state of a parameter of shape {p.shape} cannot be split into "
          "row pages (e.g. 8-bit blocks cross its rows); it is paged whole.",
      )
      continue
    plans.append(plan)
  return plans


def _sharded(x) -> bool:
  """Whether ``x`` is sharded over several devices, as far as its type says.

  Such a leaf is paged whole, not streamed: slicing row pages out of a
  sharded array fails on explicit mesh axes and gathers it on automatic ones
  (where tracers do not show their sharding: README).
  """
  concrete = isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
  sharding = x.sharding if concrete else getattr(jax.typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  mesh = getattr(sharding, "mesh", None)
  if not spec or getattr(mesh, "size", 1) <= 1 or all(e is None for e in spec):
    return False
  _warn_once("stream-sharded", "A sharded parameter's state is paged whole, not streamed in pages.")
  return True


def _fit_pages(j, total_rows, rows, owned, full_paths, template):
  """A page size from ``rows`` up whose state slices tile the full state exactly."""

  def lengths(t):
    out = []
    for k in owned:
      a, b = t.get(k), full_paths[k]
      if a is None or a.dtype != b.dtype or a.ndim != b.ndim or a.shape[1:] != b.shape[1:]:
        return None
      out.append(a.shape[0])
    return out

  for r in sorted({rows * m for m in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)}):
    if r >= total_rows:
      return None
    page_len = lengths(template(j, r))
    if page_len is None:
      continue
    num_full, last_rows = divmod(total_rows, r)
    last_len = [0] * len(owned)
    if last_rows:
      last_len = lengths(template(j, last_rows))
      if last_len is None:
        continue
    if all(num_full * a + b == full_paths[k].shape[0] for k, a, b in zip(owned, page_len, last_len)):
      return _PagePlan(j, r, num_full, last_rows, owned, page_len, last_len)
  return None


def _split_update_of_a_leaf(tx, update, state, param, extra_args, where, page_bytes, prefetch):
  """:func:`_split_update` for parameters that are one bare array.

  A pruned tree of a bare leaf is ``None``, which optax reads as "no params"
  (``add_decayed_weights`` then refuses). So the update runs on the one-entry
  dict ``{"param": leaf}``, whose state has the same leaves in the same order
  under other paths.
  """
  wrapped = jax.eval_shape(tx.init, {"param": _sds(update)})
  s_leaves, s_def = jax.tree.flatten(state)
  w_def = jax.tree.structure(wrapped)
  if w_def.num_leaves != len(s_leaves):  # a state that is not per-parameter
    return _whole_update(tx, update, state, param, extra_args)
  new_u, new_s = _split_update(
      tx, {"param": update}, jax.tree.unflatten(w_def, s_leaves),
      None if param is None else {"param": param}, extra_args, where, page_bytes, prefetch)
  return new_u["param"], jax.tree.unflatten(s_def, jax.tree.leaves(new_s))


def _split_update(tx, updates, state, params, extra_args, where, page_bytes, prefetch):
  """The update one parameter at a time (see the section comment).

  Parameters without offloaded state, and the shared state, are updated in
  one call first. Then each parameter with offloaded state, in tree
  order: streamed in pages if its state exceeds ``page_bytes``, else whole; with
  ``prefetch`` set, its state moves to the device only after the new state
  of the parameter ``prefetch + 1`` places before it (an optimization
  barrier orders the transfers).
  """
  tx = optax.with_extra_args_support(tx)
  u_leaves, u_def = jax.tree.flatten(updates)
  p_leaves = None if params is None else jax.tree.leaves(params)
  s_flat, s_def = jax.tree_util.tree_flatten_with_path(state)
  s_keys = [jax.tree_util.keystr(p) for p, _ in s_flat]
  full = dict(zip(s_keys, (x for _, x in s_flat)))
  offloaded = dict(zip(s_keys, where))
  templates = _Templates(tx, u_leaves, u_def)
  owned = _owned_state(templates, full)
  if owned is None:
    return _whole_update(tx, updates, state, params, extra_args)
  plans = {} if page_bytes is None else {
      p.index: p for p in _plan_pages(templates, full, offloaded, page_bytes, owned)
      if not _sharded(u_leaves[p.index])}
  groups = [j for j in _with_offloaded_state(owned, offloaded)
            if prefetch is not None or j in plans]
  if not groups:
    return _whole_update(tx, updates, state, params, extra_args)

  def call(keep_u, keep_p, state_by_key):
    """Runs the update on a pruned tree; returns (updates by index, state by key)."""
    u_tree = _pruned(u_def, u_leaves, keep_u)
    p_tree = None if p_leaves is None else _pruned(u_def, u_leaves, keep_p)
    tmpl = templates({j: _sds(x) for j, x in keep_u.items()})
    t_flat, t_def = jax.tree_util.tree_flatten_with_path(tmpl)
    s_in = [_to_space(state_by_key(jax.tree_util.keystr(p)), jax.memory.Space.Device)
            for p, _ in t_flat]
    new_u, new_s = tx.update(u_tree, jax.tree.unflatten(t_def, s_in), p_tree, **extra_args)
    new_u = u_def.flatten_up_to(new_u)
    return {j: new_u[j] for j in keep_u}, _paths(new_s)

  def keep(j, row0=None, rows=None):
    """Parameter ``j``'s update and param (rows ``row0:row0 + rows`` of them)."""
    cut = (lambda x: x) if rows is None else (
        lambda x: jax.lax.dynamic_slice_in_dim(x, row0, rows, 0))
    return ({j: cut(u_leaves[j])},
            {} if p_leaves is None else {j: cut(p_leaves[j])})

  # 1. Every parameter that is not sequenced, and the shared leaves (count...).
  rest = {j: u for j, u in enumerate(u_leaves) if j not in groups}
  rest_p = {} if p_leaves is None else {j: p_leaves[j] for j in rest}
  out_u, out_s = call(rest, rest_p, full.__getitem__)

  # 2. One parameter at a time, transfers ordered.
  done = []  # per group: its new state, where it lives
  for g, j in enumerate(groups[::-1] if _REVERSE_ORDER else groups):
    old = {k: full[k] for k in owned[j]}
    if prefetch is not None and g > prefetch:
      # The barrier sits on the host-memory state, so the move itself waits
      # (on the moved copy only its use would wait: XLA then moves all the
      # state in at once, as unordered).
      old, _ = jax.lax.optimization_barrier((old, done[g - 1 - prefetch]))
    if j in plans:
      out_u[j], placed = _stream(plans[j], call, keep, old, full, offloaded, u_leaves[j])
    else:
      new_u, new_s = call(*keep(j), lambda k: old.get(k, full.get(k)))
      out_u[j] = new_u[j]
      placed = {k: _to_space(new_s[k], _space(offloaded[k])) for k in owned[j]}
    out_s.update(placed)
    done.append(placed)

  new_updates = jax.tree.unflatten(u_def, [out_u[j] for j in range(len(u_leaves))])
  new_state = jax.tree.unflatten(s_def, [out_s[k] for k in s_keys])
  return new_updates, new_state


def _stream(plan, call, keep, old, full, offloaded, update_leaf):
  """One parameter's update, a page of rows at a time: ``(updates, new state)``."""
  j = plan.index

  def run_page(row0, rows, lens, starts, host, buf):
    page_state = {k: jax.lax.dynamic_slice_in_dim(host[k], s, n, 0)
                  for k, s, n in zip(plan.owned, starts, lens)}
    new_u, new_s = call(*keep(j, row0, rows), lambda k: page_state.get(k, full.get(k)))
    buf = jax.lax.dynamic_update_slice_in_dim(buf, new_u[j], row0, 0)
    host = dict(host)
    for k, s in zip(plan.owned, starts):
      page = _to_space(new_s[k], _space(offloaded[k]))
      host[k] = jax.lax.dynamic_update_slice_in_dim(host[k], page, s, 0)
    return host, buf

  out_dtype = jax.eval_shape(
      lambda: run_page(0, plan.rows, plan.page_len, [0] * len(plan.owned), old,
                       jnp.zeros(update_leaf.shape, update_leaf.dtype))[1]).dtype
  carry = (old, jnp.zeros(update_leaf.shape, out_dtype))

  def body(i, carry):
    return run_page(i * plan.rows, plan.rows, plan.page_len,
                    [i * n for n in plan.page_len], *carry)

  carry = jax.lax.fori_loop(0, plan.num_full, body, carry)
  if plan.last_rows:
    carry = run_page(plan.num_full * plan.rows, plan.last_rows, plan.last_len,
                     [plan.num_full * n for n in plan.page_len], *carry)
  host, buf = carry
  return buf, host


# ---------------------------------------------------------------------------
# Reporting.


@dataclasses.dataclass(frozen=True)
class LeafMemory:
  path: str
  shape: tuple
  dtype: str
  memory_kind: str
  nbytes: int


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """Bytes of an optimizer state per leaf, per memory kind and in total.

  Attributes:
    leaves: one ``LeafMemory`` per array leaf.
    by_kind: total bytes per memory kind (``"device"``, ``"pinned_host"``...).
    total: total bytes.
    num_params: number of parameters, when given.
    bytes_per_param: ``total / num_params``, when ``num_params`` is known.
  """

  leaves: tuple[LeafMemory, ...]
  by_kind: dict
  total: int
  num_params: int | None = None

  @property
  def bytes_per_param(self) -> float | None:
    return None if not self.num_params else self.total / self.num_params

  def __str__(self) -> str:
    rows = [(l.path, "x".join(map(str, l.shape)) or "()", l.dtype, l.memory_kind, f"{l.nbytes:,}")
            for l in self.leaves]
    header = ("leaf", "shape", "dtype", "memory", "bytes")
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = lambda r: "  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    lines = [fmt(header), fmt(tuple("-" * w for w in widths))] + [fmt(r) for r in rows]
    lines.append("")
    for kind, n in sorted(self.by_kind.items()):
      lines.append(f"{kind:>12}: {n:>14,} bytes")
    lines.append(f"{'total':>12}: {self.total:>14,} bytes")
    if self.bytes_per_param is not None:
      lines.append(f"{'per param':>12}: {self.bytes_per_param:>14.3f} bytes ({self.num_params:,} parameters)")
    return "\n".join(lines)


def _memory_kind(x) -> str:
  sharding = getattr(x, "sharding", None)
  kind = getattr(sharding, "memory_kind", None)
  return kind or DEVICE


def memory_report(state, params=None) -> MemoryReport:
  """Reports where an optimizer state's bytes live.

  Args:
    state: an optimizer state (concrete arrays).
    params: optional parameters, to report bytes per parameter.

  Returns:
    A :class:`MemoryReport`; ``str()`` of it is a readable table.
  """
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  leaves = []
  for path, x in flat:
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
      continue
    leaves.append(LeafMemory(
        jax.tree_util.keystr(path), tuple(x.shape), str(jnp.dtype(x.dtype)),
        _memory_kind(x), _nbytes(x),
    ))
  by_kind: dict[str, int] = {}
  for leaf in leaves:
    by_kind[leaf.memory_kind] = by_kind.get(leaf.memory_kind, 0) + leaf.nbytes
  num_params = None
  if params is not None:
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  return MemoryReport(tuple(leaves), by_kind, sum(by_kind.values()), num_params)
