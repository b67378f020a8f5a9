"""Pallas kernels: equal to the XLA path in interpret mode, and lowerable for GPU and TPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_paged as op
from optax_paged import backend as backend_lib
from optax_paged import codebooks
from optax_paged import dynamic_map
from optax_paged import quantization as qz
from optax_paged import rules
from optax_paged import transform
from pallas_kernels import blockwise
from kernel_checks import assert_matches_xla_path, inputs as _inputs

# On CPU the kernels run in interpret mode; on a GPU or TPU the same tests
# compile them for real (``pytest tests/test_pallas.py`` on the device).
INTERPRET = jax.default_backend() not in backend_lib.KERNEL_PLATFORMS
ON_CPU = jax.default_backend() == "cpu"


SHAPES = [(8, 4096), (100, 77), (3, 4097), (5000,)]


# Adam (both code books) at the extreme block sizes over every shape, and in
# bfloat16 at 256; every other rule on two shapes with partial last blocks,
# one per dtype (the kernel is generic: rules differ only in their
# elementwise arithmetic).
_OTHER = [((100, 77), jnp.float32), ((3, 4097), jnp.bfloat16)]
FUSED_CASES = [
    ("adam", b, shape, jnp.float32) for b in (64, 4096) for shape in SHAPES
] + [("adam", 256, shape, jnp.bfloat16) for shape in SHAPES[1:3]] + [
    (name, 256, shape, dtype)
    for name in sorted(rules.RULES) if name != "adam"
    for shape, dtype in _OTHER
]

# The table codec (GPU) on every case; the compact table (GPU) and the
# arithmetic one (TPU) on a few.
FUSED_CASES = [c + ("table",) for c in FUSED_CASES] + [
    ("adam", 64, (3, 4097), jnp.float32, "compact"), ("adam", 4096, (8, 4096), jnp.float32, "compact"),
    ("lion", 256, (3, 4097), jnp.bfloat16, "compact"), ("ademamix", 256, (5000,), jnp.float32, "compact"),
    ("adam", 64, (3, 4097), jnp.float32, "arith"), ("adam", 4096, (8, 4096), jnp.float32, "arith"),
    ("lion", 256, (3, 4097), jnp.bfloat16, "arith"), ("ademamix", 256, (5000,), jnp.float32, "arith")]


@pytest.mark.parametrize(
    "name, block_size, shape, dtype, codec", FUSED_CASES,
    ids=[f"{n}-{b}-{s}-{jnp.dtype(d).name}-{c}" for n, b, s, d, c in FUSED_CASES])
def test_fused_kernel_equals_xla_path(name, block_size, shape, dtype, codec):
  spec = rules.RULES[name]
  grad, codes, absmax = _inputs(shape, block_size, spec.signed, dtype)
  grad = grad.at[(0,) * len(shape)].set(jnp.nan)  # the guard runs in both
  hparams = spec.example_hparams(jnp.int32(3))
  d_x, c_x, a_x = transform.update_quantized_leaf_xla(
      spec.rule, grad, codes, absmax, spec.signed, hparams, block_size)
  guarded = functools.partial(transform._guarded_rule, spec.rule)
  d_p, c_p, a_p = backend_lib.update_quantized_leaf_pallas(
      guarded, grad, codes, absmax, spec.signed, hparams, block_size, INTERPRET, codec)
  assert_matches_xla_path(spec, grad, codes, absmax, hparams, block_size, (d_x, c_x, a_x),
                          (d_p, c_p, a_p))


CODEC_CASES = [(s, b, shape, "table") for s in (True, False) for b in (64, 4096) for shape in SHAPES] + [
    (s, 256, SHAPES[2], "table") for s in (True, False)] + [
    (s, 256, shape, c) for s in (True, False) for shape in SHAPES[1:3] for c in ("compact", "arith")]


@pytest.mark.parametrize("signed, block_size, shape, codec", CODEC_CASES, ids=str)
def test_codec_kernels_equal_xla_codec(signed, block_size, shape, codec):
  x = jax.random.normal(jax.random.PRNGKey(1), shape) * 10.0 ** jax.random.uniform(
      jax.random.PRNGKey(2), shape, minval=-4, maxval=0)
  if not signed:
    x = jnp.abs(x)
  x = x.at[(0,) * len(shape)].set(jnp.nan).at[(-1,) * len(shape)].set(jnp.inf)
  q = qz.quantize_blockwise(x, signed=signed, block_size=block_size)
  codes, absmax = backend_lib.quantize_pallas(x, signed, block_size, INTERPRET, codec)
  np.testing.assert_array_equal(np.asarray(codes), np.asarray(q.codes))
  np.testing.assert_array_equal(np.asarray(absmax), np.asarray(q.absmax))
  y = qz.dequantize_blockwise(q, signed=signed, block_size=block_size)
  y_p = backend_lib.dequantize_pallas(q.codes, q.absmax, signed, block_size, INTERPRET, codec)
  np.testing.assert_array_equal(np.asarray(y_p), np.asarray(y))


@pytest.mark.parametrize("signed", [True, False])
def test_blocks_with_huge_scales_encode_like_any_other(signed):
  # Above 2**126 a scale's reciprocal is subnormal; flushed to zero it made
  # the whole block encode to the zero code.
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 256))
  x = x.at[1].multiply(1e37).at[2].multiply(1e-30)
  x = x if signed else jnp.abs(x)
  q = qz.quantize_blockwise(x, signed=signed)
  y = qz.dequantize_blockwise(q, signed=signed)
  err = np.abs(np.asarray(y) - np.asarray(x)).max(axis=1) / np.abs(np.asarray(x)).max(axis=1)
  assert np.all(err < 0.01), err
  codes, absmax = backend_lib.quantize_pallas(x, signed, 256, INTERPRET, "table")
  np.testing.assert_array_equal(np.asarray(codes), np.asarray(q.codes))
  np.testing.assert_array_equal(np.asarray(absmax), np.asarray(q.absmax))


def _row_ranges(jaxpr):
  """``(first row, end row, array rows)`` of every tiled operand of every pallas_call."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name != "pallas_call":
      continue
    gm = eqn.params["grid_mapping"]
    (steps,) = gm.grid
    for bm in gm.block_mappings:
      rows, full = getattr(bm.block_shape[0], "block_size", bm.block_shape[0]), bm.array_aval.shape[0]
      if len(bm.array_aval.shape) < 2 or rows == full == 1:
        continue
      index = lambda i: jax.core.eval_jaxpr(bm.index_map_jaxpr.jaxpr, bm.index_map_jaxpr.consts, i)[0]
      out.append((int(index(0)) * rows, (int(index(steps - 1)) + 1) * rows, full))
  return out


@pytest.mark.parametrize("num_blocks", [49, 63])
def test_partial_last_tile_runs_as_smaller_whole_tiles(num_blocks):
  """Blocks in tiles of 8, the rest in tiles of 4, 2, 1: no program past the
  end of an array (a compiled GPU kernel wrote over the next buffer there),
  nothing padded, and the results of one call over all rows."""
  spec = rules.RULES["ademamix"]
  grad, codes, absmax = _inputs((num_blocks, 256), 256, spec.signed, jnp.bfloat16)
  decoders, encoders, tables = backend_lib.codecs(spec.signed, True, "table")
  guarded = functools.partial(transform._guarded_rule, spec.rule)
  hparams = spec.example_hparams(jnp.int32(3))
  absmax = tuple(a.reshape(-1) for a in absmax)

  def fused(rows):
    return blockwise.fused_update(guarded, grad, codes, absmax, hparams, decoders=decoders,
                                  encoders=encoders, tables=tables, interpret=True, rows=rows)

  jaxpr = jax.make_jaxpr(lambda: fused(8))()
  assert "pad" not in str(jaxpr)
  ranges = _row_ranges(jaxpr.jaxpr)
  assert all(end <= full == num_blocks for _, end, full in ranges)
  # Every row once: the calls cover consecutive ranges up to the end.
  covered = sorted({(first, end) for first, end, _ in ranges})
  assert covered[0][0] == 0 and covered[-1][1] == num_blocks
  assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))
  assert len(covered) == 1 + bin(num_blocks % 8).count("1")
  # Tiles of 8 rows, and of 3 (not a power of two: the leftover tiles must
  # still start at multiples of their size).
  for rows in (8, 3):
    for x, y in zip(jax.tree.leaves(fused(rows)), jax.tree.leaves(fused(None))):
      assert x.shape == y.shape
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    x = jnp.asarray(grad, jnp.float32)
    encoder, decoder = encoders[0], decoders[0]
    c_r, a_r = blockwise.quantize(x, encoder=encoder, tables=tables, interpret=True, rows=rows)
    c, a = blockwise.quantize(x, encoder=encoder, tables=tables, interpret=True)
    np.testing.assert_array_equal(np.asarray(c_r), np.asarray(c))
    np.testing.assert_array_equal(np.asarray(a_r), np.asarray(a))
    np.testing.assert_array_equal(
        np.asarray(blockwise.dequantize(c, a, decoder=decoder, tables=tables, interpret=True, rows=rows)),
        np.asarray(blockwise.dequantize(c, a, decoder=decoder, tables=tables, interpret=True)))


def test_empty_8bit_leaf_on_the_kernel_path():
  """A zero-size parameter kept 8-bit (min_8bit_size=0): as on the XLA path."""
  params = {"w": jnp.zeros((0, 256)), "v": jnp.ones((4, 256))}
  grads = jax.tree.map(lambda p: p + 0.5, params)
  out = {}
  for backend in ("pallas", "xla"):
    tx = op.adamw_8bit(1e-2, min_8bit_size=0, backend=backend)
    state = tx.init(params)
    out[backend] = tx.update(grads, state, params)
  for x, y in zip(jax.tree.leaves(out["pallas"]), jax.tree.leaves(out["xla"])):
    assert x.shape == y.shape and x.dtype == y.dtype
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=1e-6)
  assert blockwise.tile_rows(0, 256, "cuda") == 1


def _fused_for(name, platform, block_size=256, num_blocks=64, codec=None):
  spec = rules.RULES[name]
  guarded = functools.partial(transform._guarded_rule, spec.rule)
  decoders, encoders, tables = backend_lib.codecs(
      spec.signed, True, codec or backend_lib.default_codec(platform))

  def step(grad, codes, absmax, count):
    return blockwise.fused_update(
        guarded, grad, codes, absmax, spec.example_hparams(count),
        decoders=decoders, encoders=encoders, tables=tables, platform=platform,
    )

  args = (
      jnp.ones((num_blocks, block_size)),
      tuple(jnp.full((num_blocks, block_size), codebooks.ZERO_CODE[s], jnp.uint8) for s in spec.signed),
      tuple(jnp.ones((num_blocks,)) for _ in spec.signed),
      jnp.int32(5),
  )
  return step, args


def _export(fn, args, platform):
  disabled = []
  if platform == "cuda":
    # Triton IR has no serialization guarantee, so export refuses it unless told.
    disabled = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  export = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=disabled)
  if platform == "cuda" and jax.default_backend() != "gpu":
    # Without a GPU here, the Triton lowering (JAX >= 0.11) needs to be told
    # which GPU it compiles for: an abstract H100.
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="cuda")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
      exported = export(*args)
  else:
    exported = export(*args)
  text = exported.mlir_module()
  assert "tpu_custom_call" in text if platform == "tpu" else "__gpu$xla.gpu.triton" in text
  return exported


EXPORT_CASES = [(n, 256) for n in sorted(rules.RULES)] + [("adam", 4096)]


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("name, block_size", EXPORT_CASES)
def test_fused_update_lowers_for_gpu_and_tpu(platform, name, block_size):
  step, args = _fused_for(name, platform, block_size)
  _export(step, args, platform)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_partial_last_tile_lowers_for_gpu_and_tpu(platform):
  """49 blocks: several calls on GPU (tiles of 16 and 1), padding on TPU."""
  step, args = _fused_for("adam", platform, num_blocks=49)
  text = _export(step, args, platform).mlir_module()
  calls = text.count("tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton")
  assert calls >= (1 if platform == "tpu" else 2)


@pytest.mark.parametrize("codec", backend_lib.CODECS)
def test_every_codec_lowers_for_gpu(codec):
  step, args = _fused_for("adam", "cuda", codec=codec)
  _export(step, args, "cuda")


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("signed", [True, False])
def test_codec_kernels_lower_for_gpu_and_tpu(platform, signed):
  (decoder,), (encoder,), tables = backend_lib.codecs(
      (signed,), False, backend_lib.default_codec(platform))
  x = jnp.ones((64, 256))
  _export(lambda x: blockwise.quantize(x, encoder=encoder, tables=tables, platform=platform),
          (x,), platform)
  _export(lambda c, a: blockwise.dequantize(c, a, decoder=decoder, tables=tables, platform=platform),
          (jnp.zeros((64, 256), jnp.uint8), jnp.ones((64,))), platform)


def test_traced_hyperparameters_are_kernel_inputs():
  """b1 injected as a traced value reaches the kernel: changing it changes the update."""
  p = jax.random.normal(jax.random.PRNGKey(0), (16, 256))
  g = jax.random.normal(jax.random.PRNGKey(1), (16, 256))

  def make(b1, backend):
    return optax.inject_hyperparams(op.adam_8bit, static_args=("backend", "min_8bit_size", "block_size"))(
        learning_rate=1.0, b1=b1, min_8bit_size=0, backend=backend)

  results = {}
  for backend in ("pallas", "xla"):
    tx = make(0.9, backend)
    step = jax.jit(tx.update)
    _, state = step(g, tx.init(p), p)  # a non-trivial state (step 1 is sign(g))
    u_09, _ = step(g * 0.5, state, p)
    state.hyperparams["b1"] = jnp.asarray(0.5)
    u_05, _ = step(g * 0.5, state, p)  # same compiled step, new b1
    results[backend] = (u_09, u_05)
  assert not np.allclose(np.asarray(results["pallas"][0]), np.asarray(results["pallas"][1]))
  for a, b in zip(results["pallas"], results["xla"]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


@pytest.mark.skipif(not ON_CPU, reason="asserts the CPU choices")
def test_backend_choice_and_environment_override(monkeypatch):
  with pytest.raises(ValueError, match="backend"):
    backend_lib.check_backend("cuda")
  monkeypatch.delenv(backend_lib.ENV_VAR, raising=False)
  assert backend_lib.check_backend("auto") == "auto"
  assert backend_lib.kernel_for("auto") == "native"  # CPU: the native kernel, not Pallas
  assert backend_lib.kernel_for("pallas") == "interpret"
  assert backend_lib.kernel_for("xla") == "xla"
  monkeypatch.setenv(backend_lib.ENV_VAR, "pallas")
  assert backend_lib.check_backend("auto") == "pallas"
  assert backend_lib.check_backend("xla") == "xla"  # an explicit choice wins
  monkeypatch.setenv(backend_lib.ENV_VAR, "triton")
  with pytest.raises(ValueError, match=backend_lib.ENV_VAR):
    backend_lib.check_backend("auto")


def test_pallas_and_xla_train_the_demo_model_to_the_same_loss():
  from optax_paged import demo
  args = demo.build_parser().parse_args(["--steps", "6", "--model", "tiny", "--optimizers", "adamw_8bit"])
  text, _ = demo.load_corpus()
  data = np.frombuffer(text, dtype=np.uint8)
  _, _, _, seq_len, batch = demo.MODEL_SIZES["tiny"]
  train = demo.batches(data, args.steps, batch, seq_len, 0)
  val = demo.batches(data, 2, batch, seq_len, 1)
  results = {}
  for backend in ("xla", "pallas"):
    args.backend = backend
    results[backend] = demo.train_one("adamw_8bit", args, train, val, args.lr)
  np.testing.assert_allclose(results["xla"].losses, results["pallas"].losses, rtol=1e-5)
  np.testing.assert_allclose(results["xla"].val_loss, results["pallas"].val_loss, rtol=1e-5)
