"""The fused 8-bit update as a native CPU kernel (an XLA FFI custom call).

XLA:CPU emits a table lookup as one vector insert per element (its loops are
bound by the one shuffle port of x86 cores; benchmarks/RESULTS.md), so the
XLA path decodes and encodes each moment several times per step and is ~3x
slower than ``optax.adamw``. This kernel makes one pass: per block, decode
each moment into a small buffer (hardware gathers), run the rule, take the
block's maximum, encode (``fused_update.cc``).

The rule is not rewritten in C++ by hand: :func:`rule_source` traces the same
jax function that the XLA path and the Pallas kernels run (with the non-finite
guard) on scalars and translates its jaxpr, one C++ statement per equation,
into the kernel's loop body. Only operations that round exactly like XLA's
are translated (arithmetic, ``sqrt``, compares, selects, ...); a rule using
anything else raises :class:`NativeUnavailable` and its caller uses the XLA
path.

The kernel is compiled on first use with the system's C++ compiler (``CXX``,
else ``c++``/``g++``/``clang++``) against the FFI headers shipped with jaxlib,
for the machine it runs on (``-march=native``), and cached under
``OPTAX_PAGED_CACHE_DIR`` (default ``~/.cache/optax_paged``), one library per
rule and build configuration. No compiler: :class:`NativeUnavailable`.

This module imports only jax and numpy; code books and encode tables come
from the caller, as for the Pallas kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.extend  # noqa: F401  (jax.extend.core.Literal)
import jax.numpy as jnp
import numpy as np

KERNEL_SOURCE = pathlib.Path(__file__).with_name("fused_update.cc")
HANDLER_SYMBOL = "OptaxPagedFusedUpdate"
CACHE_ENV = "OPTAX_PAGED_CACHE_DIR"
# Extra compiler flags, e.g. "-DOPTAX_PAGED_SCALAR" (the portable loops only).
FLAGS_ENV = "OPTAX_PAGED_NATIVE_CFLAGS"
# -ffp-contract=off: no fused multiply-adds the rule does not ask for (XLA:CPU
# contracts some; the kernels' tests allow that rounding difference).
# -fno-math-errno: sqrt without a library call, so the loop vectorizes.
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off",
         "-fno-math-errno")


class NativeUnavailable(RuntimeError):
  """The native kernel cannot run this update (no compiler, a rule it cannot
  translate, a build error)."""


# ---------------------------------------------------------------------------
# jaxpr -> C++


def _ctype(aval) -> str:
  if aval.shape != ():
    raise NativeUnavailable(f"the rule makes a non-scalar value of shape {aval.shape}")
  dtype = np.dtype(aval.dtype)
  if dtype == np.float32:
    return "float"
  if dtype == np.bool_:
    return "bool"
  raise NativeUnavailable(
      f"the rule computes in {dtype}; the native kernel translates float32 and bool only")


def _literal(value, aval) -> str:
  if isinstance(value, jax.core.Tracer):
    raise NativeUnavailable("the rule closes over a traced value")
  value = np.asarray(value)
  dtype = np.dtype(aval.dtype)
  if np.shape(value) != ():
    raise NativeUnavailable("the rule closes over a non-scalar constant")
  if dtype == np.bool_:
    return "true" if bool(value) else "false"
  if dtype != np.float32:
    raise NativeUnavailable(f"the rule has a {dtype} constant")
  x = float(np.float32(value))
  if np.isnan(x):
    return '__builtin_nanf("")'
  if np.isinf(x):
    return "__builtin_inff()" if x > 0 else "(-__builtin_inff())"
  return f"{x.hex()}f"


# Operations with exact IEEE semantics in both XLA and C++ (arithmetic,
# square root, compares and selects). Transcendentals (exp, log, pow, tanh)
# are left out: XLA uses its own approximations, which libm's do not match.
# rsqrt is translated as the correctly rounded 1 / sqrt(x); XLA:CPU's may
# differ from it by 1 ulp (Adagrad's rule uses it). max, min and clamp are
# compares and selects: a denormal operand passes through where XLA's
# instructions flush it to zero.
_BINARY = {"add": "+", "sub": "-", "mul": "*", "div": "/", "lt": "<", "le": "<=", "gt": ">",
           "ge": ">=", "eq": "==", "ne": "!=", "and": "&", "or": "|", "xor": "^"}
_CALLS = {"max": "xmax", "min": "xmin", "abs": "std::fabs", "sqrt": "std::sqrt", "sign": "xsign",
          "is_finite": "std::isfinite"}
_SCALAR_SHAPE_OPS = ("broadcast_in_dim", "reshape", "squeeze", "expand_dims", "copy", "copy_p",
                     "stop_gradient")
# Calls whose body runs once, inlined (not loops: scan and while repeat
# theirs, cond chooses; those raise NativeUnavailable).
_INLINED_CALLS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr",
                  "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
                  "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr",
                  "remat": "jaxpr", "remat2": "jaxpr", "checkpoint": "jaxpr"}


class _Emitter:
  """Writes one C++ statement per jaxpr equation."""

  def __init__(self):
    self.lines: list[str] = []
    self.count = 0

  def fresh(self) -> str:
    self.count += 1
    return f"v{self.count}"

  def let(self, ctype: str, value: str) -> str:
    var = self.fresh()
    self.lines.append(f"const {ctype} {var} = {value};")
    return var

  def integer_pow(self, x: str, y: int) -> str:
    """``x ** y`` in jax's square-and-multiply order (its lowering of integer_pow)."""
    if y == 0:
      return "1.0f"
    reciprocal, y = y < 0, abs(y)
    acc, base = None, x
    while y > 0:
      if y & 1:
        acc = base if acc is None else self.let("float", f"({acc} * {base})")
      y >>= 1
      if y > 0:
        base = self.let("float", f"({base} * {base})")
    return f"(1.0f / {acc})" if reciprocal else acc

  def expr(self, env, atom) -> str:
    if isinstance(atom, jax.extend.core.Literal):
      return _literal(atom.val, atom.aval)
    return env[atom]

  def jaxpr(self, jaxpr, consts, args) -> list[str]:
    env = {}
    for var, value in zip(jaxpr.constvars, consts):
      env[var] = _literal(value, var.aval)
    for var, arg in zip(jaxpr.invars, args):
      env[var] = arg
    for eqn in jaxpr.eqns:
      ins = [self.expr(env, a) for a in eqn.invars]
      outs = self.equation(eqn, ins)
      for var, out in zip(eqn.outvars, outs):
        env[var] = out
    return [self.expr(env, a) for a in jaxpr.outvars]

  def equation(self, eqn, ins) -> list[str]:
    name = eqn.primitive.name
    if name in _INLINED_CALLS:
      sub = eqn.params[_INLINED_CALLS[name]]
      closed = sub if hasattr(sub, "consts") else None
      inner = closed.jaxpr if closed is not None else sub
      if len(inner.invars) != len(ins) or len(inner.outvars) != len(eqn.outvars):
        raise NativeUnavailable(f"the rule calls `{name}` with operands the kernel cannot pass")
      return self.jaxpr(inner, closed.consts if closed is not None else (), ins)
    if name in _SCALAR_SHAPE_OPS:
      return list(ins)
    if len(eqn.outvars) != 1:
      raise NativeUnavailable(f"the native kernel has no translation of `{name}`")
    (out_var,) = eqn.outvars
    ctype = _ctype(out_var.aval)
    kinds = {_ctype(atom.aval) for atom in eqn.invars}
    floats = kinds == {"float"}
    logical = name in ("and", "or", "xor") and kinds == {"bool"}
    if name in _BINARY and (floats or logical or (name in ("eq", "ne") and kinds == {"bool"})):
      value = f"({ins[0]} {_BINARY[name]} {ins[1]})"
    elif name in _CALLS and floats:
      value = f"{_CALLS[name]}({ins[0]}" + "".join(f", {x}" for x in ins[1:]) + ")"
    elif name == "neg" and floats:
      value = f"(-({ins[0]}))"
    elif name == "not" and ctype == "bool":
      value = f"(!{ins[0]})"
    elif name == "rsqrt" and floats:
      value = f"(1.0f / std::sqrt({ins[0]}))"
    elif name == "square" and floats:
      value = f"({ins[0]} * {ins[0]})"
    elif name == "integer_pow" and floats:
      value = self.integer_pow(ins[0], int(eqn.params["y"]))
    elif name == "clamp" and ctype == "float":
      value = f"xmin(xmax({ins[1]}, {ins[0]}), {ins[2]})"
    elif name == "select_n" and np.dtype(eqn.invars[0].aval.dtype) == np.bool_:
      value = f"({ins[0]} ? {ins[2]} : {ins[1]})"
    elif name == "convert_element_type" and not (ctype == "float" and kinds == {"bool"}):
      # (bool -> float32 is refused: XLA rewrites convert(p) * x into a
      # select, which gives +0 where the product gives -0.)
      value = f"static_cast<{ctype}>({ins[0]})"
    else:
      raise NativeUnavailable(f"the native kernel has no translation of `{name}`")
    return [self.let(ctype, value)]


def _comment(text) -> str:
  """``text`` safe inside a C++ line comment."""
  return "".join(c if c.isalnum() or c in "_.-" else "?" for c in str(text))


def rule_source(rule: Callable, signed: Sequence[bool], hparam_names: Sequence[str]) -> str:
  """The C++ header that ``fused_update.cc`` includes for ``rule``.

  Args:
    rule: ``rule(grad, moments, hparams) -> (direction, new_moments)``, float32
      elementwise (with its non-finite guard).
    signed: per moment, whether its code book is signed.
    hparam_names: the names of ``hparams``, in the order of the kernel's
      hyperparameter vector.

  Returns:
    C++ source defining ``K``, ``SIGNED``, ``NUM_HPARAMS`` and ``call_rule``.

  Raises:
    NativeUnavailable: the rule uses an operation without a translation.
  """
  k = len(signed)
  names = tuple(hparam_names)
  scalar = jax.ShapeDtypeStruct((), jnp.float32)

  def flat(grad, moments, hvalues):
    direction, new = rule(grad, tuple(moments), dict(zip(names, hvalues)))
    return (direction, *new)

  closed = jax.make_jaxpr(flat)(scalar, (scalar,) * k, (scalar,) * len(names))
  if len(closed.jaxpr.outvars) != 1 + k:
    raise NativeUnavailable(f"the rule returned {len(closed.jaxpr.outvars) - 1} moments, not {k}")
  for var in closed.jaxpr.outvars:
    if _ctype(var.aval) != "float":
      raise NativeUnavailable("the rule must return float32 scalars for scalar inputs")
  emit = _Emitter()
  args = ["g"] + [f"m{i}" for i in range(k)] + [f"h{i}" for i in range(len(names))]
  outs = emit.jaxpr(closed.jaxpr, closed.consts, args)
  old = ", ".join(f"const float* __restrict__ old{i}" for i in range(k))
  new = ", ".join(f"float* __restrict__ new{i}" for i in range(k))
  body = "\n".join(
      [f"  const float h{i} = hparams[{i}];  // {_comment(n)}" for i, n in enumerate(names)]
      + ["  for (int64_t i = 0; i < len; ++i) {",
         "    const float g = load_f32<G>(grad, i);"]
      + [f"    const float m{i} = old{i}[i];" for i in range(k)]
      + [f"    {line}" for line in emit.lines]
      + [f"    direction[i] = store_f32<G>({outs[0]});"]
      + [f"    new{i}[i] = {outs[1 + i]};" for i in range(k)]
      + ["  }"])
  signed_list = ", ".join("true" if s else "false" for s in signed)
  unpack = ", ".join([f"old[{i}]" for i in range(k)] + [f"fresh[{i}]" for i in range(k)])
  inner = getattr(rule, "args", (rule,))[0]  # the guard's partial names the rule
  label = _comment(getattr(rule, "__name__", None) or getattr(inner, "__name__", "a rule"))
  return f"""// Generated by native_kernels/fused.py from {label}.
namespace {{
constexpr int K = {k};
constexpr bool SIGNED[K] = {{{signed_list}}};
constexpr int NUM_HPARAMS = {len(names)};

template <typename G>
void rule_loop(const float* __restrict__ hparams, const G* __restrict__ grad,
               G* __restrict__ direction, {old}, {new}, int64_t len) {{
{body}
}}

template <typename G>
void call_rule(const float* hparams, const G* grad, G* direction, float* const* old,
               float* const* fresh, int64_t len) {{
  rule_loop<G>(hparams, grad, direction, {unpack}, len);
}}
}}  // namespace
"""


# ---------------------------------------------------------------------------
# Build and registration


def cache_dir() -> pathlib.Path:
  """Where compiled kernels are kept (``OPTAX_PAGED_CACHE_DIR``)."""
  root = os.environ.get(CACHE_ENV)
  if root:
    return pathlib.Path(root)
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "optax_paged"


def compiler() -> str | None:
  """The C++ compiler used for the kernel, or None."""
  for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if candidate and shutil.which(candidate):
      return shutil.which(candidate)
  return None


@functools.cache
def _machine_key(cxx: str) -> str:
  """What a library built with ``-march=native`` depends on besides its source."""
  try:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
  except (OSError, subprocess.SubprocessError) as e:
    raise NativeUnavailable(f"the C++ compiler {cxx} does not run: {e}") from e
  cpu = platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu += next((line for line in f if line.startswith(("flags", "Features"))), "")
  except OSError:
    cpu += platform.processor()
  return "\n".join([version, cpu, jax.__version__])


_LOCK = threading.Lock()
_TARGETS: dict[str, str] = {}  # source hash -> registered target name
_FAILED: dict[str, str] = {}  # source hash -> the compiler's error
_LIBRARIES: list[ctypes.CDLL] = []  # kept loaded for the process's life


class _BuildError(NativeUnavailable):
  """The compiler rejected the source: the same build fails again."""


def _build(source: str, key: str, cxx: str, flags: Sequence[str]) -> pathlib.Path:
  """Compiles ``source`` (kernel with its rule) into the cache; returns the library.

  The library is written under a temporary name and renamed into place, so a
  concurrent builder of the same key, or a reader, never sees half a file.
  """
  directory = cache_dir()
  library = directory / f"fused_update_{key}.so"
  if library.exists():
    return library
  try:
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
      header = pathlib.Path(tmp) / "rule.h"
      header.write_text(source)
      out = pathlib.Path(tmp) / library.name
      _compile(cxx, [*flags, "-isystem", jax.ffi.include_dir(), f'-DOPTAX_PAGED_RULE="{header}"',
                     str(KERNEL_SOURCE), "-o", str(out)])
      os.replace(out, library)
  except OSError as e:
    raise NativeUnavailable(f"cannot write the kernel to {directory} ({e}); set {CACHE_ENV}") from e
  return library


def _compile(cxx: str, args: Sequence[str]) -> None:
  try:
    done = subprocess.run([cxx, *args], capture_output=True, text=True, timeout=600)
  except subprocess.TimeoutExpired as e:
    raise NativeUnavailable("compiling the native kernel timed out") from e
  except (OSError, subprocess.SubprocessError) as e:
    raise NativeUnavailable(f"cannot run the C++ compiler {cxx} ({e})") from e
  if done.returncode > 0:
    lines = done.stderr.splitlines()
    cause = ("error", "ld:", "cannot find", "undefined")
    first = next((i for i, line in enumerate(lines) if any(c in line for c in cause)),
                 max(len(lines) - 30, 0))
    raise _BuildError("compiling the native kernel failed:\n" + "\n".join(lines[first:first + 30]))
  if done.returncode != 0:
    raise NativeUnavailable(f"the C++ compiler stopped with status {done.returncode}")


def _flags() -> tuple[str, ...]:
  return FLAGS + tuple(os.environ.get(FLAGS_ENV, "").split())


def target(rule: Callable, signed: Sequence[bool], hparam_names: Sequence[str]) -> str:
  """Name of the registered FFI target running ``rule``; builds it if needed.

  Raises:
    NativeUnavailable: not on a CPU backend, no compiler, an untranslatable
      rule or a failed build.
  """
  try:
    source = rule_source(rule, signed, hparam_names)
  except NativeUnavailable:
    raise
  except Exception as e:  # noqa: BLE001 - any rule the translator cannot read: XLA path
    raise NativeUnavailable(f"the rule could not be translated ({type(e).__name__}: {e})") from e
  cxx = compiler()
  if cxx is None:
    raise NativeUnavailable("no C++ compiler found (set CXX, or install g++ or clang++)")
  flags = _flags()
  key = _key(source, cxx, flags)
  with _LOCK:
    if key in _FAILED:  # a compile error repeats: once per process, not once per trace
      raise NativeUnavailable(f"{_FAILED[key]}\n(an earlier build of this kernel)")
    if key not in _TARGETS:
      try:
        _TARGETS[key] = _load(source, key, cxx, flags)
      except _BuildError as e:
        _FAILED[key] = str(e)
        raise
    return _TARGETS[key]


@functools.cache
def _kernel_text() -> str:
  return KERNEL_SOURCE.read_text()


def _key(source: str, cxx: str, flags: Sequence[str]) -> str:
  """Cache key of a build: rule, kernel source, flags, compiler, CPU, jax."""
  parts = [source, _kernel_text(), " ".join(flags), _machine_key(cxx)]
  return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def _load(source, key, cxx, flags) -> str:
  """Builds (if needed), loads and registers one kernel; returns its target name."""
  path = _build(source, key, cxx, flags)
  try:
    library = ctypes.CDLL(str(path))
    handler = getattr(library, HANDLER_SYMBOL)
  except (OSError, AttributeError):
    # A truncated or foreign file in the cache: build once more over it.
    try:
      path.unlink(missing_ok=True)
    except OSError as e:
      raise NativeUnavailable(f"cannot replace the broken kernel library {path} ({e})") from e
    path = _build(source, key, cxx, flags)
    try:
      library = ctypes.CDLL(str(path))
      handler = getattr(library, HANDLER_SYMBOL)
    except (OSError, AttributeError) as e:
      raise NativeUnavailable(f"cannot load the native kernel {path} ({e})") from e
  name = f"optax_paged_fused_update_{key}"
  jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler), platform="cpu")
  _LIBRARIES.append(library)
  return name


# ---------------------------------------------------------------------------
# The call


def fused_update(
    rule: Callable,
    grad: jax.Array,
    codes: Sequence[jax.Array],
    absmax: Sequence[jax.Array],
    hparams: Mapping[str, jax.Array | float],
    *,
    signed: Sequence[bool],
    books: Sequence[jax.Array],
    carries: Sequence[jax.Array],
    block_size: int,
):
  """One fused pass over a leaf: decode -> rule -> block absmax -> encode.

  Args:
    rule: ``rule(grad, moments, hparams) -> (direction, new_moments)``, float32
      elementwise; it must keep non-finite values out of the new moments.
    grad: the gradient leaf, float32, bfloat16 or float16, any shape.
    codes: per moment, ``uint8`` codes of ``grad``'s shape (updated in place
      when donated).
    absmax: per moment, float32 block scales, one per block of the flattened
      leaf (any shape with that many elements).
    hparams: scalar hyperparameters.
    signed: per moment, its code book (True: signed).
    books: per moment, the 256 float32 code values.
    carries: per moment, the 16384-entry int32 cell table of the encoder
      (``codebooks.encode_tables(signed, keep_nonzero).cell_carry``).
    block_size: elements per block, at most 4096.

  Returns:
    ``(direction, new_codes, new_absmax)``: the direction in ``grad``'s dtype
    and tuples shaped like ``codes`` and ``absmax``.

  Raises:
    NativeUnavailable: the kernel cannot be built for this rule here.
  """
  k = len(codes)
  names = tuple(sorted(hparams))
  name = target(rule, tuple(signed), names)
  hvec = jnp.asarray([jnp.asarray(hparams[n], jnp.float32) for n in names], jnp.float32).reshape(-1)
  out_types = ([jax.ShapeDtypeStruct(grad.shape, grad.dtype)]
               + [jax.ShapeDtypeStruct(c.shape, jnp.uint8) for c in codes]
               + [jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in absmax])
  first = 2 + 2 * k
  aliases = {first + i: 1 + i for i in range(k)} | {first + k + i: 1 + k + i for i in range(k)}
  out = jax.ffi.ffi_call(name, out_types, input_output_aliases=aliases, vmap_method="sequential")(
      hvec, grad, *books, *carries, *codes, *absmax, block_size=np.int64(block_size))
  return out[0], tuple(out[1:1 + k]), tuple(out[1 + k:])
