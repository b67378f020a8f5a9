"""Optimizers by name and from Ludwig configs."""

import doctest

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_paged as op
from optax_paged import registry

LUDWIG_NAMES = [
    "sgd", "sgd_8bit", "adam", "adam_8bit", "paged_adam", "paged_adam_8bit", "adamw", "adamw_8bit",
    "paged_adamw", "paged_adamw_8bit", "adagrad", "adagrad_8bit", "rmsprop", "rmsprop_8bit", "lamb",
    "lamb_8bit", "lars", "lars_8bit", "lion", "lion_8bit", "paged_lion", "paged_lion_8bit",
    "adadelta", "adamax", "nadam", "radam", "adafactor", "schedule_free_adamw", "muon",
]


def test_every_ludwig_name_is_accepted():
  assert set(LUDWIG_NAMES) <= set(registry.ludwig_types())


class _Model(nnx.Module):
  def __init__(self, rngs):
    self.a = nnx.Linear(32, 256, rngs=rngs)  # 8192-element kernel: 8-bit state
    self.b = nnx.Linear(256, 4, rngs=rngs)

  def __call__(self, x):
    return self.b(nnx.relu(self.a(x)))


@pytest.mark.parametrize("name", LUDWIG_NAMES)
def test_from_config_builds_and_trains_three_jitted_steps(name):
  # Ludwig's adafactor default (relative_step: true) ignores the learning rate.
  extra = {"relative_step": False} if name == "adafactor" else {}
  tx = op.from_config({"type": name, **extra}, learning_rate=1e-3)
  model = _Model(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jax.random.normal(jax.random.PRNGKey(1), (16, 32))
  y = jax.random.normal(jax.random.PRNGKey(2), (16, 4))

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
  losses = [float(step(model, optimizer)) for _ in range(3)]
  assert all(np.isfinite(losses))
  after = nnx.state(model, nnx.Param)
  assert any(not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def _updates(tx, steps=3):
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (64, 128)) * 0.1}
  state = tx.init(params)
  out = []
  for i in range(steps):
    g = {"w": jax.random.normal(jax.random.PRNGKey(i + 1), (64, 128))}
    u, state = tx.update(g, state, params)
    out.append(u)
  return out


@pytest.mark.parametrize(
    "section, equivalent",
    [
        ({"type": "adamw_8bit", "betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 0.1},
         lambda: op.adamw_8bit(1e-3, 0.8, 0.99, 1e-6, weight_decay=0.1)),
        # torch's Adam: weight_decay is an L2 term added to the gradient.
        ({"type": "adam", "weight_decay": 0.1},
         lambda: optax.chain(optax.add_decayed_weights(0.1), optax.adam(1e-3))),
        ({"type": "rmsprop_8bit", "alpha": 0.9, "eps": 1e-7, "momentum": 0.5},
         lambda: op.rmsprop_8bit(1e-3, decay=0.9, eps=1e-7, eps_in_sqrt=False, momentum=0.5)),
        ({"type": "lion_8bit", "betas": [0.95, 0.98], "weight_decay": 0.01},
         lambda: op.lion_8bit(1e-3, 0.95, 0.98, weight_decay=0.01)),
        ({"type": "sgd_8bit", "momentum": 0.9, "nesterov": True, "block_wise": True},
         lambda: op.sgd_8bit(1e-3, momentum=0.9, nesterov=True)),
        # PyTorch's and bitsandbytes' Adagrad: eps outside the square root.
        ({"type": "adagrad", "initial_accumulator_value": 0.1, "eps": 1e-2},
         lambda: op.adagrad_8bit(1e-3, 0.1, 1e-2, eps_in_sqrt=False, quantize_mask=False)),
        ({"type": "adagrad_8bit", "eps": 1e-2},
         lambda: op.adagrad_8bit(1e-3, 0.0, 1e-2, eps_in_sqrt=False)),
        # bitsandbytes' Adams decay the weights whatever their name.
        ({"type": "adam_8bit", "weight_decay": 0.1}, lambda: op.adamw_8bit(1e-3, weight_decay=0.1)),
        ({"type": "paged_adam", "weight_decay": 0.1}, lambda: op.paged_adamw(1e-3, weight_decay=0.1)),
        ({"type": "paged_adam_8bit", "weight_decay": 0.1},
         lambda: op.paged_adamw_8bit(1e-3, weight_decay=0.1)),
        ({"type": "lars"}, lambda: optax.lars(1e-3, momentum=0.9)),  # Ludwig's default momentum
        ({"type": "sgd", "weight_decay": "1e-2", "momentum": 0.9},  # YAML 1.1 reads 1e-2 as text
         lambda: optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(1e-3, momentum=0.9))),
    ],
)
def test_ludwig_fields_map_to_the_equivalent_optimizer(section, equivalent):
  chex.assert_trees_all_close(_updates(registry.from_config(section, 1e-3)), _updates(equivalent()),
                              rtol=1e-6, atol=1e-9)


def test_ludwig_document_yaml_text_and_file(tmp_path):
  text = """
model_type: ecd
trainer:
  learning_rate: 0.002
  batch_size: 32
  optimizer:
    type: paged_adamw_8bit
    betas: [0.9, 0.95]
    eps: 1.0e-8
    weight_decay: 0.0
"""
  # Ludwig's trainer clips gradients to global norm 0.5 unless told otherwise.
  clip = optax.clip_by_global_norm(0.5)
  expected = _updates(optax.chain(clip, op.paged_adamw_8bit(0.002, 0.9, 0.95, 1e-8, weight_decay=0.0)))
  chex.assert_trees_all_close(_updates(op.from_config(text)), expected, rtol=1e-6, atol=1e-9)
  path = tmp_path / "ludwig.yaml"
  path.write_text(text)
  chex.assert_trees_all_close(_updates(op.from_config(str(path))), expected, rtol=1e-6, atol=1e-9)
  chex.assert_trees_all_close(_updates(op.from_config(path)), expected, rtol=1e-6, atol=1e-9)
  # An explicit learning rate wins over the document's.
  chex.assert_trees_all_close(
      _updates(op.from_config(text, learning_rate=0.001)),
      _updates(optax.chain(clip, op.paged_adamw_8bit(0.001, 0.9, 0.95, 1e-8, weight_decay=0.0))),
      rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "config, lr, match",
    [
        ({"type": "adamw_9bit"}, 1e-3, r"Unknown optimizer type 'adamw_9bit'; accepted: .*adamw_8bit"),
        ({"type": "adamw_8bit", "betaz": [0.9, 0.99]}, 1e-3, r"betaz.*accepted: betas"),
        ({"type": "adamw_8bit", "block_wise": False}, 1e-3, "block_wise=False .*blocks of 256"),
        ({"type": "adamw_8bit"}, None, "No learning rate"),
        ({"trainer": {"learning_rate": "auto", "optimizer": {"type": "adam"}}}, None, "'auto'"),
        ({"type": "sgd", "dampening": 0.1}, 1e-3, "dampening"),
        ({"type": "adam_8bit", "amsgrad": True}, 1e-3, "amsgrad"),
        ({"type": "rmsprop_8bit", "centered": True}, 1e-3, "centered"),
        ({"type": "adam", "betas": [0.9]}, 1e-3, "two numbers"),
        ({"betas": [0.9, 0.99]}, 1e-3, "needs a 'type'"),
        ("[1, 2, 3]", 1e-3, "must be a mapping"),
        # Values Ludwig and torch refuse, and no silent gradient ascent.
        ({"type": "adam"}, -1e-3, "learning_rate must be >= 0"),
        ({"type": "muon"}, -1e-3, "learning_rate must be >= 0"),
        ({"type": "sgd", "weight_decay": -0.5}, 1e-3, "weight_decay must be >= 0"),
        ({"type": "adam_8bit", "weight_decay": -0.5}, 1e-3, "weight_decay must be >= 0"),
        ({"type": "sgd", "momentum": -0.5}, 1e-3, "momentum must be >= 0"),
        ({"type": "adam", "betas": [0.9, 1.5]}, 1e-3, "betas must be < 1"),
        ({"type": "sgd", "momentum": 0.9, "nesterov": "false"}, 1e-3, "nesterov must be true or false"),
        ({"type": "adamw_8bit", "block_wise": "false"}, 1e-3, "block_wise must be true or false"),
        ({"type": "adamw_8bit", "block_wise": 0}, 1e-3, "block_wise must be true or false"),
        ({"type": "lars", "momentum": 0.0}, 1e-3, "momentum=0 is not supported"),
        ({"type": "adafactor"}, 1e-3, "relative_step=True .*Ludwig's default"),
        ({"type": "adafactor", "relative_step": True}, 1e-3, "relative_step=True"),
        ({"trainer": {"learning_rate": 1e-3, "learning_rate_scheduler": {"decay": "cosine"},
                      "optimizer": {"type": "adam"}}}, None, "learning_rate_scheduler is not converted"),
        ({"trainer": {"learning_rate": 1e-3, "gradient_clipping": {"clipnorms": 1.0},
                      "optimizer": {"type": "adam"}}}, None, "clipnorms"),
        ({"trainer": {"learning_rate": 1e-3, "gradient_clipping": {"clipvalue": -1.0},
                      "optimizer": {"type": "adam"}}}, None, "clipvalue must be >= 0"),
        ({"type": "sgd", "weight_decay": True}, 1e-3, "weight_decay must be a number"),
        ({"type": "lars", "momentum": 1.5}, 1e-3, "momentum must be <= 1"),
    ],
)
def test_bad_configs_are_value_errors(config, lr, match):
  with pytest.raises(ValueError, match=match):
    op.from_config(config, learning_rate=lr)


def test_block_wise_true_and_32bit_block_wise_are_accepted():
  op.from_config({"type": "lion_8bit", "block_wise": True}, 1e-4)
  op.from_config({"type": "lamb", "block_wise": False}, 1e-3)  # no quantization: moot


def test_adagrad_lr_decay_is_a_schedule():
  tx = op.from_config({"type": "adagrad", "lr_decay": 0.5}, 1.0)
  params = {"w": jnp.ones(4)}
  state = tx.init(params)
  norms = []
  for _ in range(3):
    u, state = tx.update({"w": jnp.ones(4)}, state, params)
    norms.append(float(optax.tree.norm(u)))
  ref = optax.adagrad(1.0, initial_accumulator_value=0.0, eps=1e-10)
  s = ref.init(params)
  for step, n in enumerate(norms):
    u, s = ref.update({"w": jnp.ones(4)}, s, params)
    np.testing.assert_allclose(n, float(optax.tree.norm(u)) / (1 + 0.5 * step), rtol=1e-6)


def test_percentile_clipping_in_configs_and_alone():
  tx = op.from_config({"type": "adam_8bit", "percentile_clipping": 50}, 1e-3)
  assert isinstance(tx.init({"w": jnp.ones(3)})[0], op.clipping.PercentileClippingState)
  clip = op.percentile_clipping(50)
  params = {"w": jnp.ones(100)}
  state = clip.init(params)
  seen = []
  for scale in [1.0, 2.0, 3.0, 4.0, 100.0]:
    g = {"w": jnp.full(100, scale)}
    u, state = clip.update(g, state)
    seen.append(float(jnp.linalg.norm(u["w"])))
  norms = [10.0 * s for s in (1.0, 2.0, 3.0, 4.0, 100.0)]
  # Each step clips to the 50th percentile of the norms recorded so far.
  expected = []
  for i, n in enumerate(norms):
    history = sorted(norms[: i + 1])
    expected.append(min(n, history[(50 * (i + 1)) // 100]))
  np.testing.assert_allclose(seen, expected, rtol=1e-5)
  u, _ = op.percentile_clipping(100).update({"w": jnp.full(3, 7.0)}, op.percentile_clipping(100).init(params))
  np.testing.assert_array_equal(np.asarray(u["w"]), 7.0)
  # A fractional or out-of-range percentile: refused when built (it used to
  # fail at the first update with an indexing error).
  for bad in (95.5, -1, 101, True, "90"):
    with pytest.raises(ValueError, match="percentile_clipping must be an int in 0..100"):
      op.percentile_clipping(bad)
  with pytest.raises(ValueError, match="percentile_clipping must be an int"):
    op.from_config({"type": "adam_8bit", "percentile_clipping": 95.5}, 1e-3)
  op.from_config({"type": "adam_8bit", "percentile_clipping": 90.0}, 1e-3)  # YAML's 90.0 is 90


def test_create_by_name():
  tx = op.create("paged_lion_8bit", 1e-4, b1=0.95, policy=op.OffloadPolicy(min_size=1000))
  tx.init({"w": jnp.ones((64, 64))})
  with pytest.raises(ValueError, match="Unknown optimizer 'adam8'; accepted: .*adam_8bit"):
    op.create("adam8", 1e-3)
  with pytest.raises(ValueError, match="takes no argument.*momentun"):
    op.create("sgd_8bit", 1e-3, momentun=0.9)


def test_docstring_examples_run():
  results = doctest.testmod(registry, raise_on_error=False)
  assert results.attempted > 0 and results.failed == 0


@pytest.mark.parametrize("name", registry.names())
@pytest.mark.parametrize("lr", [-1e-3, float("inf"), optax.linear_schedule(-1e-3, 0.0, 10)],
                         ids=["negative", "inf", "negative-schedule"])
def test_every_optimizer_rejects_a_bad_learning_rate(name, lr):
  kwargs = {"momentum": 0.9} if name in ("sgd_8bit", "paged_sgd_8bit") else {}
  with pytest.raises(ValueError, match="learning_rate"):
    op.create(name, lr, **kwargs)


def test_yaml_learning_rate_without_a_dot_is_a_number():
  # YAML 1.1 (PyYAML) reads 1e-3 as the string "1e-3"; Ludwig coerces it.
  text = ("trainer:\n  learning_rate: 1e-3\n  gradient_clipping:\n    clipglobalnorm: null\n"
          "  optimizer:\n    type: adamw_8bit\n")
  chex.assert_trees_all_close(_updates(op.from_config(text)), _updates(op.adamw_8bit(1e-3, weight_decay=0.0)),
                              rtol=1e-6, atol=1e-9)


def test_trainer_gradient_clipping_is_applied_and_scheduler_replaced_by_learning_rate():
  doc = {"trainer": {"learning_rate": 0.1, "optimizer": {"type": "sgd"},
                     "gradient_clipping": {"clipglobalnorm": 1e-3, "clipnorm": None, "clipvalue": 1e-4}}}
  expected = optax.chain(optax.clip_by_global_norm(1e-3), optax.clip(1e-4), optax.sgd(0.1))
  chex.assert_trees_all_close(_updates(op.from_config(doc)), _updates(expected), rtol=1e-6, atol=1e-12)
  doc["trainer"]["learning_rate_scheduler"] = {"decay": "cosine"}
  schedule = optax.cosine_decay_schedule(0.1, 100)
  expected = optax.chain(optax.clip_by_global_norm(1e-3), optax.clip(1e-4), optax.sgd(schedule))
  chex.assert_trees_all_close(_updates(op.from_config(doc, learning_rate=schedule)), _updates(expected),
                              rtol=1e-6, atol=1e-12)


def test_ludwig_defaults_as_ludwig_writes_them():
  # Ludwig saves a no-op scheduler section and null fields in every config.
  doc = {"trainer": {"learning_rate": 0.1, "optimizer": {"type": "sgd", "weight_decay": None},
                     "learning_rate_scheduler": {"decay": None, "warmup_evaluations": 0,
                                                 "warmup_fraction": 0.0, "reduce_on_plateau": 0},
                     "gradient_clipping": {}}}
  expected = optax.chain(optax.clip_by_global_norm(0.5), optax.sgd(0.1))
  chex.assert_trees_all_close(_updates(op.from_config(doc)), _updates(expected), rtol=1e-6, atol=1e-12)
  # schedule_free_adamw with Ludwig's warmup_steps: 0 trains (optax's warm-up
  # schedule over 0 steps is a learning rate of 0).
  u = _updates(op.from_config({"type": "schedule_free_adamw", "warmup_steps": 0}, 1e-3))
  assert float(jnp.abs(u[-1]["w"]).max()) > 0
  # Numbers from numpy (e.g. a config built in code) are numbers too.
  chex.assert_trees_all_close(
      _updates(op.from_config({"type": "sgd", "momentum": np.float32(0.9)}, 1e-3)),
      _updates(optax.sgd(1e-3, momentum=float(np.float32(0.9)))), rtol=1e-6, atol=1e-12)
