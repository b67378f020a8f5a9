"""Native CPU kernel: equal to the XLA path, its rule translated from the same jax rule."""

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_paged as op
from optax_paged import backend as backend_lib
from optax_paged import rules
from optax_paged import transform
from native_kernels import fused
from kernel_checks import assert_matches_xla_path, inputs

pytestmark = [
    pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU kernel"),
    # The project's machines have g++; without a compiler "auto" uses the XLA
    # path, which the rest of the suite then tests.
    pytest.mark.skipif(fused.compiler() is None, reason="no C++ compiler to build the kernel"),
]


def _native(spec, grad, codes, absmax, hparams, block_size):
  guarded = functools.partial(transform._guarded_rule, spec.rule)
  return backend_lib.update_quantized_leaf_native(
      guarded, grad, codes, absmax, spec.signed, hparams, block_size, True)


def _check(name, block_size, shape, dtype, seed=0, edit=None):
  spec = rules.RULES[name]
  grad, codes, absmax = inputs(shape, block_size, spec.signed, dtype, seed)
  grad = grad.at[(0,) * len(shape)].set(jnp.nan)  # the guard runs in both
  if edit is not None:
    grad = edit(grad)
  hparams = {k: jnp.asarray(v, jnp.float32) for k, v in spec.example_hparams(jnp.int32(3)).items()}
  xla = transform.update_quantized_leaf_xla(spec.rule, grad, codes, absmax, spec.signed, hparams,
                                            block_size)
  native = _native(spec, grad, codes, absmax, hparams, block_size)
  assert_matches_xla_path(spec, grad, codes, absmax, hparams, block_size, xla, native)
  return native


# Every rule (each is a different translated loop) over shapes with a partial
# last block, whose tail runs the scalar loops after the vector ones; Adam
# over block sizes, dtypes, and a leaf of several chunks (both threads work).
CASES = (
    [(name, 256, (100, 77), jnp.float32) for name in sorted(rules.RULES)]
    + [(name, 256, (3, 4097), jnp.bfloat16) for name in ("adam", "lion", "ademamix")]
    + [("adam", b, (8, 4096), jnp.float32) for b in (64, 4096)]
    + [("adam", 64, (5000,), jnp.float16), ("adam", 256, (700, 1003), jnp.float32),
       ("rms", 128, (3, 333), jnp.float32)]
)


@pytest.mark.parametrize("name, block_size, shape, dtype", CASES,
                         ids=[f"{n}-{b}-{s}-{jnp.dtype(d).name}" for n, b, s, d in CASES])
def test_native_kernel_equals_xla_path(name, block_size, shape, dtype):
  _check(name, block_size, shape, dtype)


def test_huge_gradients_and_scales():
  # |g| >= 2**64 keeps every moment of that element (Adam's guard), and a
  # block of moments above 2**126 encodes like any other (normalize()).
  def edit(g):
    return g.at[1, 5].set(3e19).at[2].multiply(1e37)
  direction, _, _ = _check("adam", 256, (4, 256), jnp.float32, edit=edit)
  assert np.isnan(np.asarray(direction)[1, 5])
  _check("lion", 256, (4, 256), jnp.float32, edit=edit)


def test_rule_translation_reads_like_the_rule():
  source = fused.rule_source(rules.adam_rule, (True, False), sorted(rules.adam_hparams(0.9, 0.999, 1e-8, 0, 1)))
  assert "constexpr int K = 2;" in source and "SIGNED[K] = {true, false}" in source
  assert "std::sqrt" in source and "// inv_bc2" in source
  with pytest.raises(fused.NativeUnavailable, match="exp"):
    fused.rule_source(lambda g, m, h: (jnp.exp(g), m), (True,), ())
  with pytest.raises(fused.NativeUnavailable, match="moments"):
    fused.rule_source(lambda g, m, h: (g, ()), (True,), ())


def _exp_rule(grad, moments, hparams):
  (mu,) = moments
  mu = hparams["b"] * mu + grad
  return jnp.exp(-jnp.abs(mu)) * mu, (mu,)


class _ExpState(NamedTuple):
  count: jax.Array
  mu: optax.Updates
  mu_absmax: optax.Updates


_ExpState.SIGNED = {"mu": True}


def _rule_8bit(rule, backend):
  return transform.scale_by_rule_8bit(
      rule, [transform.MomentSpec("mu", True)], lambda count: {"b": 0.9}, _ExpState,
      min_8bit_size=0, backend=backend)


def _exp_8bit(backend):
  return _rule_8bit(_exp_rule, backend)


def test_untranslatable_rule_falls_back_to_xla_under_auto(monkeypatch):
  """A rule the kernel cannot translate (``exp``: XLA's differs from libm's)
  runs on the XLA path under "auto", with a warning, and is an error under
  backend="native"."""
  monkeypatch.setattr(backend_lib, "_WARNED", set())
  p = jax.random.normal(jax.random.PRNGKey(0), (8, 256))
  g = jax.random.normal(jax.random.PRNGKey(1), (8, 256))
  tx = _exp_8bit("auto")
  with pytest.warns(UserWarning, match="native CPU kernel is unavailable"):
    u, _ = tx.update(g, tx.init(p), p)
  tx_xla = _exp_8bit("xla")
  u_xla, _ = tx_xla.update(g, tx_xla.init(p), p)
  np.testing.assert_array_equal(np.asarray(u), np.asarray(u_xla))
  tx = _exp_8bit("native")
  with pytest.raises(fused.NativeUnavailable, match="exp"):
    tx.update(g, tx.init(p), p)


def test_no_compiler_means_xla_under_auto(monkeypatch):
  monkeypatch.setattr(fused, "compiler", lambda: None)
  monkeypatch.setattr(backend_lib, "_WARNED", set())
  backend_lib.update_quantized_leaf_native.clear_cache()  # no earlier trace reused
  p = jax.random.normal(jax.random.PRNGKey(0), (4, 256))
  g = jax.random.normal(jax.random.PRNGKey(1), (4, 256))
  tx = op.adamw_8bit(1e-3, b1=0.85, min_8bit_size=0)
  with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
    u, _ = tx.update(g, tx.init(p), p)
  tx_xla = op.adamw_8bit(1e-3, b1=0.85, min_8bit_size=0, backend="xla")
  u_xla, _ = tx_xla.update(g, tx_xla.init(p), p)
  np.testing.assert_array_equal(np.asarray(u), np.asarray(u_xla))
  tx = op.adamw_8bit(1e-3, b1=0.85, min_8bit_size=0, backend="native")
  with pytest.raises(fused.NativeUnavailable, match="compiler"):
    tx.update(g, tx.init(p), p)


@pytest.mark.parametrize("name", ["adamw_8bit", "lion_8bit", "ademamix_8bit", "rmsprop_8bit"])
def test_optimizers_on_native_and_xla_agree_over_steps(name):
  """Several jitted steps with traced hyperparameters (inject_hyperparams): the
  two backends stay together. A code may differ by one where a moment rounds
  to a midpoint; such an element's update then differs by a fraction of the
  learning rate, never more."""
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (64, 384)), "b": jnp.zeros((384,))}
  factory = getattr(op, name)
  out = {}
  for backend in ("native", "xla"):
    tx = optax.inject_hyperparams(factory, static_args=("backend",))(
        learning_rate=1e-2, backend=backend)
    state = tx.init(params)
    p = params
    step = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p))
    for i in range(5):
      g = jax.tree.map(lambda x, i=i: jnp.sin(x * (i + 1)) * 1e-2, p)
      u, state = step(g, state, p)
      p = optax.apply_updates(p, u)
    out[backend] = p
  for a, b in zip(jax.tree.leaves(out["native"]), jax.tree.leaves(out["xla"])):
    a, b = np.asarray(a), np.asarray(b)
    assert np.mean(~np.isclose(a, b, rtol=1e-5, atol=1e-7)) < 1e-3
    assert np.abs(a - b).max() < 5 * 1e-2


def test_auto_picks_the_native_kernel_on_one_cpu(monkeypatch):
  monkeypatch.delenv(backend_lib.ENV_VAR, raising=False)
  assert backend_lib.kernel_for("auto") == "native"
  assert backend_lib.kernel_for("native") == "native"
  assert backend_lib.kernel_for("xla") == "xla"
  with backend_lib.auto_uses_xla():  # paged(): XLA on a GPU, the kernel still on a CPU
    assert backend_lib.kernel_for("auto") == "native"
  monkeypatch.setenv(backend_lib.ENV_VAR, "native")
  assert backend_lib.check_backend("auto") == "native"
  # The jitted step holds one custom call per 8-bit leaf and no gather.
  tx = op.adamw_8bit(1e-3)
  p = jnp.zeros((64, 512))
  hlo = jax.jit(tx.update).lower(p, tx.init(p), p).as_text()
  assert hlo.count("optax_paged_fused_update_") == 1 and "gather" not in hlo


def test_scalar_build_equals_xla_path(monkeypatch, tmp_path):
  """The portable loops (machines without AVX-512) give the same codes."""
  monkeypatch.setenv(fused.FLAGS_ENV, "-DOPTAX_PAGED_SCALAR")
  _check("adam", 256, (100, 77), jnp.float32, seed=1)
  _check("lion", 64, (3, 4097), jnp.bfloat16, seed=2)


def _own_build(monkeypatch, cache, tag):
  """Momentum's kernel, built in ``cache`` under flags no other test uses."""
  monkeypatch.setenv(fused.CACHE_ENV, str(cache))
  monkeypatch.setenv(fused.FLAGS_ENV, f"-DOPTAX_PAGED_{tag}")
  spec = rules.RULES["momentum"]
  return functools.partial(transform._guarded_rule, spec.rule), spec.signed, ("momentum",)


def test_build_is_cached_and_reused(tmp_path, monkeypatch):
  args = _own_build(monkeypatch, tmp_path, "CACHE_TEST")
  name = fused.target(*args)
  libraries = list(tmp_path.glob("fused_update_*.so"))
  assert len(libraries) == 1 and name.endswith(libraries[0].name[len("fused_update_"):-3])
  assert fused.target(*args) == name
  assert not [f for f in os.listdir(tmp_path) if not f.endswith(".so")]  # no build leftovers


def _updates(rule, backend, g):
  tx = _rule_8bit(rule, backend)
  p = jnp.zeros_like(g)
  u, _ = tx.update(g, tx.init(p), p)
  return np.asarray(u)


def _special_grad():
  """Zeros of both signs, a NaN, infinities, denormals, and ordinary values."""
  g = jax.random.normal(jax.random.PRNGKey(5), (4, 256))
  special = jnp.asarray([0.0, -0.0, 1e-40, -1e-40, 3.0, -3.0, jnp.inf, -jnp.inf, jnp.nan, 1e30])
  return g.at[0, :10].set(special)


@pytest.mark.parametrize("case", ["pow4", "pow5", "pow-2", "max-min", "sign", "neg-const", "clamp"])
def test_translated_operations_equal_xla_bit_for_bit(case):
  """Operations without additions (no multiply-add to contract differently)
  give the XLA path's direction exactly, on zeros of both signs, NaN,
  infinities and denormals too."""
  ops = {
      "pow4": lambda g, mu: g ** 4,
      "pow5": lambda g, mu: g ** 5,
      "pow-2": lambda g, mu: jax.lax.integer_pow(g, -2),
      "max-min": lambda g, mu: jnp.maximum(g, -g) * jnp.minimum(g, 0.0),
      "sign": lambda g, mu: jnp.sign(g),
      "neg-const": lambda g, mu: jax.lax.neg(jnp.float32(-2.0)) * g,
      "clamp": lambda g, mu: jax.lax.clamp(-1.0, g, 1.0),
  }

  def rule(grad, moments, hparams):
    (mu,) = moments
    mu = hparams["b"] * mu + grad
    return ops[case](grad, mu), (mu,)

  g = _special_grad()
  if case == "clamp":
    # XLA's clamp flushes a denormal input to zero (its max/min instructions
    # run with denormals-are-zero); the kernel's compares pass it through.
    g = g.at[0, 2:4].set(1e-30)
  native, xla = _updates(rule, "native", g), _updates(rule, "xla", g)
  np.testing.assert_array_equal(native, xla)
  np.testing.assert_array_equal(np.signbit(native), np.signbit(xla))


def _scan_rule(grad, moments, hparams):
  (mu,) = moments
  mu = jax.lax.fori_loop(0, 3, lambda i, x: x * hparams["b"] + grad, mu)
  return mu, (mu,)


def _cond_rule(grad, moments, hparams):
  (mu,) = moments
  a, b = jax.lax.cond(hparams["b"] > 0.5, lambda: (grad, mu), lambda: (mu, grad))
  return a, (b,)


def _closure_rule_factory(scale):
  def rule(grad, moments, hparams):
    (mu,) = moments
    return grad * scale, (mu + grad,)
  return rule


@pytest.mark.parametrize("case", ["scan", "cond", "closure"])
def test_rules_the_kernel_cannot_run_use_the_xla_path(case, monkeypatch):
  """Loops (run once if inlined), multi-output conds and rules closing over
  traced values are refused, never translated wrongly: "auto" falls back."""
  monkeypatch.setattr(backend_lib, "_WARNED", set())
  g = jax.random.normal(jax.random.PRNGKey(1), (8, 256))
  if case == "closure":
    @jax.jit
    def run(g, scale):
      rule = _closure_rule_factory(scale)
      return jnp.asarray(_updates_traced(rule, "auto", g)), jnp.asarray(_updates_traced(rule, "xla", g))
    with pytest.warns(UserWarning, match="native CPU kernel is unavailable"):
      auto, xla = run(g, jnp.float32(0.5))
  else:
    rule = {"scan": _scan_rule, "cond": _cond_rule}[case]
    with pytest.warns(UserWarning, match="native CPU kernel is unavailable"):
      auto = _updates(rule, "auto", g)
    xla = _updates(rule, "xla", g)
  np.testing.assert_array_equal(np.asarray(auto), np.asarray(xla))


def _updates_traced(rule, backend, g):
  tx = _rule_8bit(rule, backend)
  p = jnp.zeros_like(g)
  return tx.update(g, tx.init(p), p)[0]


def test_eager_inject_hyperparams_reuses_the_compiled_update():
  """inject_hyperparams rebuilds the transformation every step; the kernel's
  jitted wrapper must not retrace (and rebuild its rule) each time."""
  tx = optax.inject_hyperparams(op.adamw_8bit)(learning_rate=1e-3)
  p = jnp.ones((8, 512))
  state = tx.init(p)
  u, state = tx.update(p, state, p)
  size = backend_lib.update_quantized_leaf_native._cache_size()
  for _ in range(3):
    u, state = tx.update(p, state, p)
  assert backend_lib.update_quantized_leaf_native._cache_size() == size


def test_a_corrupt_cached_library_is_rebuilt(tmp_path, monkeypatch):
  args = _own_build(monkeypatch, tmp_path, "CORRUPT_TEST")
  key = fused._key(fused.rule_source(*args), fused.compiler(), fused._flags())
  library = tmp_path / f"fused_update_{key}.so"
  library.write_bytes(b"not a library")  # e.g. a build cut short
  name = fused.target(*args)
  assert name.endswith(key) and library.stat().st_size > 1000


def _fake_compiler(tmp_path, body):
  script = tmp_path / "fake-c++"
  script.write_text("#!/bin/sh\n" + body + "\n")
  script.chmod(0o755)
  return str(script)


def test_a_compile_error_is_remembered_but_a_crashed_compiler_is_retried(tmp_path, monkeypatch):
  # A compiler killed by a signal (out of memory, say) is not the source's
  # fault: the next trace builds again, and succeeds with a working compiler.
  args = _own_build(monkeypatch, tmp_path / "cache", "RETRY_TEST")
  monkeypatch.setenv("CXX", _fake_compiler(tmp_path, 'kill -9 $$'))
  with pytest.raises(fused.NativeUnavailable, match="status"):
    fused.target(*args)
  monkeypatch.delenv("CXX")
  assert fused.target(*args).startswith("optax_paged_fused_update_")
  # A compile error names its cause (a missing library here) and is not
  # compiled again on every trace.
  monkeypatch.setenv(fused.FLAGS_ENV, "-loptax_paged_no_such_library")
  with pytest.raises(fused.NativeUnavailable, match="optax_paged_no_such_library"):
    fused.target(*args)
  with pytest.raises(fused.NativeUnavailable, match="an earlier build"):
    fused.target(*args)


def test_bool_to_float_conversions_are_left_to_xla():
  """XLA rewrites ``convert(p) * x`` into a select (+0 where IEEE gives -0)."""
  with pytest.raises(fused.NativeUnavailable, match="convert_element_type"):
    fused.rule_source(lambda g, m, h: ((g > 0).astype(jnp.float32) * g, m), (True,), ())
  source = fused.rule_source(lambda g, m, h: (g ** 9, m), (True,), ())
  assert source.count(" * ") == 4  # square-and-multiply, one statement per product
