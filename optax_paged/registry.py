"""Optimizers by name, and from Ludwig / bitsandbytes-style configs.

Two entry points:

- :func:`create` ``(name, learning_rate, **kwargs)``: this library's (and
  optax's) constructors by name, with their own keyword arguments.
- :func:`from_config` ``(config, learning_rate=None)``: a Ludwig optimizer
  section (``{"type": "paged_adamw_8bit", "betas": [0.9, 0.999], ...}``) or a
  whole Ludwig document (``trainer: {learning_rate: ..., optimizer: {...}}``),
  as a mapping, YAML text or a YAML file path, with Ludwig's field names
  (``betas``, ``eps``, ``weight_decay``, ``momentum``, ``alpha``, ...).

Ludwig follows PyTorch and bitsandbytes: ``weight_decay`` is an L2 term added
to the gradient for ``sgd``, ``adam``, ``rmsprop``, ``adagrad``, ``adadelta``,
``adamax``, ``nadam``, ``radam`` and ``lars`` (and their 8-bit forms), and
decoupled (AdamW-style) for ``adamw``, ``lion``, ``lamb``, ``adafactor``,
``schedule_free_adamw`` and ``muon``, and for bitsandbytes' Adams:
``adam_8bit``, ``paged_adam`` and ``paged_adam_8bit`` (its Adam kernels decay
the weights, only ``torch.optim.Adam`` adds L2); the configs built here do the
same. Adagrad adds ``eps`` outside the square root, as PyTorch and
bitsandbytes do.

From a whole Ludwig document only ``trainer.learning_rate``,
``trainer.optimizer``, ``trainer.gradient_clipping`` and
``trainer.learning_rate_scheduler`` are read. Gradient clipping is Ludwig's
trainer's, applied before the optimizer: ``clipglobalnorm`` (default 0.5, as
in Ludwig, also when the section is absent; ``null`` or 0 turns it off) and
``clipnorm`` become ``optax.clip_by_global_norm``, ``clipvalue``
``optax.clip``. A scheduler that changes the rate (``decay``, warm-up,
``reduce_on_plateau``) is refused unless ``learning_rate=`` is given (an optax
schedule replaces the document's rate and scheduler); Ludwig's default one,
which changes nothing, is accepted. An optimizer section alone gets no
clipping.
"""

from __future__ import annotations

import inspect
import numbers
import os
from collections.abc import Callable, Mapping

import numpy as np
import optax
import optax.contrib

from optax_paged import alias
from optax_paged.clipping import percentile_clipping
from optax_paged.transform import check_hyperparam

# name -> constructor taking ``learning_rate`` first, optax-style.
OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": optax.sgd,
    "adam": optax.adam,
    "adamw": optax.adamw,
    "adagrad": optax.adagrad,
    "rmsprop": optax.rmsprop,
    "lamb": optax.lamb,
    "lars": optax.lars,
    "lion": optax.lion,
    "adadelta": optax.adadelta,
    "adamax": optax.adamax,
    "nadam": optax.nadam,
    "radam": optax.radam,
    "adafactor": optax.adafactor,
    "ademamix": optax.contrib.ademamix,
    "schedule_free_adamw": optax.contrib.schedule_free_adamw,
    "muon": optax.contrib.muon,
}
# optax's own constructors do not check their learning rate; create() does.
_UNCHECKED = frozenset(OPTIMIZERS)
OPTIMIZERS.update({
    name: getattr(alias, name)
    for name in dir(alias)
    if name.endswith("_8bit") or name.startswith("paged_")
    if callable(getattr(alias, name)) and not name.startswith("_")
})


def names() -> list[str]:
  """All names :func:`create` accepts, sorted."""
  return sorted(OPTIMIZERS)


def create(name: str, learning_rate, **kwargs) -> optax.GradientTransformation:
  """Builds the optimizer called ``name`` with its own keyword arguments.

  Args:
    name: one of :func:`names` (e.g. ``"adamw_8bit"``, ``"paged_lion_8bit"``).
    learning_rate: float or schedule.
    **kwargs: keyword arguments of that optimizer's constructor.

  Returns:
    An ``optax.GradientTransformation``.

  Raises:
    ValueError: for an unknown name (listing the accepted ones), an
      argument the constructor does not take, or a negative (or non-finite)
      learning rate, also for optax's own optimizers (a schedule is checked
      at step 0).
  """
  try:
    ctor = OPTIMIZERS[name]
  except KeyError:
    raise ValueError(f"Unknown optimizer {name!r}; accepted: {', '.join(names())}.") from None
  params = inspect.signature(ctor).parameters
  if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
      raise ValueError(
          f"{name} takes no argument(s) {', '.join(unknown)}; accepted: "
          f"{', '.join(p for p in params if p != 'learning_rate')}.")
  if name in _UNCHECKED:
    check_hyperparam("learning_rate", learning_rate, 0.0)
  return ctor(learning_rate, **kwargs)


# ---------------------------------------------------------------------------
# Ludwig configs.


class _Fields:
  """Reads a Ludwig optimizer section, refusing what it cannot honour."""

  def __init__(self, type_name: str, section: Mapping):
    self.type = type_name
    self.values = dict(section)
    self.used: set[str] = set()

  def get(self, name, default=None):
    self.used.add(name)
    return self.values.get(name, default)

  def default_only(self, name, default, why: str):
    """Accepts ``name`` only at its Ludwig default (which we reproduce)."""
    value = self.get(name, default)
    if value != default:
      raise ValueError(f"{self.type}: {name}={value!r} is not supported ({why}).")

  def number(self, name, default, low=0.0, high=None):
    """A real number in ``[low, high]`` (Ludwig's ranges; YAML strings like ``1e-3`` too).

    ``null`` means the default, as in Ludwig's schema.
    """
    value = self.get(name, default)
    return _number(f"{self.type}: {name}", default if value is None else value, low, high)

  def flag(self, name, default: bool) -> bool:
    """A YAML boolean; anything else (e.g. the string ``"false"``) is refused."""
    value = self.get(name, default)
    if not isinstance(value, bool):
      raise ValueError(f"{self.type}: {name} must be true or false, got {value!r}.")
    return value

  def pair(self, name, default):
    value = tuple(self.get(name, default))
    if len(value) != 2 or None in value:
      raise ValueError(f"{self.type}: {name} must hold two numbers, got {value!r}.")
    return tuple(_number(f"{self.type}: {name}", v, 0.0, 1.0, high_open=True) for v in value)


def _number(what: str, value, low=0.0, high=None, *, high_open=False):
  """``value`` as a float checked against ``[low, high]``; ``None`` stays ``None``."""
  if value is None:
    return None
  if isinstance(value, str):
    value = _parse_number(value, what)
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
    raise ValueError(f"{what} must be a number, got {value!r}.")
  check_hyperparam(what, value, low, high, high_open=high_open)
  return float(value)


def _parse_number(text: str, what: str) -> float:
  """A number written as text (YAML 1.1 reads ``1e-3``, without a dot, as a string)."""
  try:
    return float(text)
  except ValueError:
    raise ValueError(f"{what} must be a number, got {text!r}.") from None


def _coupled_weight_decay(tx, weight_decay: float):
  """PyTorch's L2 ``weight_decay``: added to the gradient before ``tx``."""
  if not weight_decay:
    return tx
  return optax.chain(optax.add_decayed_weights(weight_decay), tx)


def _adam(name, lr, f: _Fields):
  b1, b2 = f.pair("betas", (0.9, 0.999))
  eps = f.number("eps", 1e-8)
  wd = f.number("weight_decay", 0.0)
  amsgrad = f.flag("amsgrad", False)
  # Only torch.optim.Adam adds L2; bitsandbytes' Adam kernels (adam_8bit,
  # paged_adam, paged_adam_8bit) decay the weights like AdamW.
  decoupled = name != "adam"
  if amsgrad:
    if name not in ("adam", "adamw"):
      raise ValueError(f"{name}: amsgrad=True is not supported for 8-bit or paged Adam; "
                       "use type adam or adamw for AMSGrad.")
    tx = optax.chain(optax.scale_by_amsgrad(b1, b2, eps),
                     optax.add_decayed_weights(wd) if decoupled else optax.identity(),
                     optax.scale_by_learning_rate(lr))
    return tx if decoupled else _coupled_weight_decay(tx, wd)
  if decoupled:
    adamw = name if "adamw" in name else name.replace("adam", "adamw")
    return OPTIMIZERS[adamw](lr, b1, b2, eps, weight_decay=wd)
  return _coupled_weight_decay(OPTIMIZERS[name](lr, b1, b2, eps), wd)


def _sgd(name, lr, f: _Fields):
  momentum = f.number("momentum", 0.0) or None
  f.default_only("dampening", 0.0, "optax's momentum has no dampening")
  tx = OPTIMIZERS[name](lr, momentum=momentum, nesterov=f.flag("nesterov", False))
  return _coupled_weight_decay(tx, f.number("weight_decay", 0.0))


def _rmsprop(name, lr, f: _Fields):
  # PyTorch adds eps outside the square root; its smoothing constant is alpha.
  tx = OPTIMIZERS[name](
      lr, decay=f.number("alpha", 0.99, high=1.0), eps=f.number("eps", 1e-8), eps_in_sqrt=False,
      centered=f.flag("centered", False), momentum=f.number("momentum", 0.0) or None)
  return _coupled_weight_decay(tx, f.number("weight_decay", 0.0))


def _adagrad(name, lr, f: _Fields):
  lr_decay = f.number("lr_decay", 0.0)
  if lr_decay:
    base = lr
    lr = lambda step: (base(step) if callable(base) else base) / (1.0 + step * lr_decay)  # noqa: E731
  # PyTorch and bitsandbytes add eps outside the square root: the 8-bit
  # transformation's form, with every leaf in float32 for plain "adagrad".
  kwargs = {} if name.endswith("_8bit") else {"quantize_mask": False}
  tx = alias.adagrad_8bit(lr, initial_accumulator_value=f.number("initial_accumulator_value", 0.0),
                          eps=f.number("eps", 1e-10), eps_in_sqrt=False, **kwargs)
  return _coupled_weight_decay(tx, f.number("weight_decay", 0.0))


def _lion(name, lr, f: _Fields):
  b1, b2 = f.pair("betas", (0.9, 0.999))
  return OPTIMIZERS[name](lr, b1, b2, weight_decay=f.number("weight_decay", 0.0))


def _lamb(name, lr, f: _Fields):
  b1, b2 = f.pair("betas", (0.9, 0.999))
  f.default_only("bias_correction", True, "optax's LAMB always corrects the bias")
  f.default_only("amsgrad", False, "LAMB has no AMSGrad variant here")
  f.default_only("adam_w_mode", True, "weight decay is decoupled, as in optax.lamb")
  f.default_only("max_unorm", 1.0, "the trust ratio is optax's, not bitsandbytes' update-norm clip")
  return OPTIMIZERS[name](lr, b1, b2, eps=f.number("eps", 1e-8),
                          weight_decay=f.number("weight_decay", 0.0))


def _lars(name, lr, f: _Fields):
  f.default_only("dampening", 0.0, "optax's momentum has no dampening")
  f.default_only("max_unorm", 1.0, "the trust ratio is optax's, not bitsandbytes' update-norm clip")
  momentum = f.number("momentum", 0.9, high=1.0)  # Ludwig's default and range
  if not momentum:
    raise ValueError(f"{name}: momentum=0 is not supported (bitsandbytes' LARS, which Ludwig "
                     "runs, refuses LARS without momentum; Ludwig's default is 0.9).")
  return OPTIMIZERS[name](lr, weight_decay=f.number("weight_decay", 0.0),
                          momentum=momentum, nesterov=f.flag("nesterov", False))


def _adadelta(name, lr, f: _Fields):
  return optax.adadelta(lr, rho=f.number("rho", 0.9, high=1.0), eps=f.number("eps", 1e-6),
                        weight_decay=f.number("weight_decay", 0.0))


def _adamax(name, lr, f: _Fields):
  b1, b2 = f.pair("betas", (0.9, 0.999))
  return _coupled_weight_decay(optax.adamax(lr, b1, b2, f.number("eps", 1e-8)),
                               f.number("weight_decay", 0.0))


def _nadam(name, lr, f: _Fields):
  b1, b2 = f.pair("betas", (0.9, 0.999))
  f.default_only("momentum_decay", 4e-3, "optax.nadam has no momentum-decay schedule")
  return _coupled_weight_decay(optax.nadam(lr, b1, b2, f.number("eps", 1e-8)),
                               f.number("weight_decay", 0.0))


def _radam(name, lr, f: _Fields):
  b1, b2 = f.pair("betas", (0.9, 0.999))
  return _coupled_weight_decay(optax.radam(lr, b1, b2, f.number("eps", 1e-8)),
                               f.number("weight_decay", 0.0))


def _adafactor(name, lr, f: _Fields):
  eps = f.get("eps", (1e-30, 1e-3))
  eps = float(eps[0] if isinstance(eps, (list, tuple)) else eps)
  # Ludwig's (and transformers') default is relative_step=True, which derives
  # the step size from the step count and ignores the learning rate: only an
  # explicit relative_step: false can be reproduced.
  if f.get("relative_step", True) is not False:
    raise ValueError(
        f"{name}: relative_step=True (Ludwig's default) is not supported; set relative_step: "
        "false and pass a learning rate (or an optax schedule).")
  f.default_only("warmup_init", False, "use an optax warm-up schedule as the learning rate")
  beta1 = f.get("beta1", None)
  wd = f.number("weight_decay", 0.0)
  return optax.adafactor(
      lr, decay_rate=abs(float(f.get("decay_rate", -0.8))),
      clipping_threshold=f.get("clip_threshold", 1.0),
      momentum=None if beta1 is None else f.number("beta1", None, high=1.0),
      multiply_by_parameter_scale=f.flag("scale_parameter", True),
      weight_decay_rate=wd or None, eps=eps)


def _schedule_free_adamw(name, lr, f: _Fields):
  b1, b2 = f.pair("betas", (0.9, 0.999))
  return optax.contrib.schedule_free_adamw(
      # Ludwig's default warmup_steps is 0, which optax's warm-up schedule
      # would turn into a learning rate of 0 forever: no warm-up is None.
      lr, warmup_steps=int(f.get("warmup_steps", 0) or 0) or None, b1=b1, b2=b2,
      eps=f.number("eps", 1e-8),
      weight_decay=f.number("weight_decay", 0.0),
      weight_lr_power=f.number("weight_lr_power", 2.0))


def _muon(name, lr, f: _Fields):
  b1, b2 = f.pair("adamw_betas", (0.9, 0.999))
  return optax.contrib.muon(
      lr, beta=f.number("momentum", 0.95, high=1.0), nesterov=f.flag("nesterov", True),
      ns_steps=int(f.get("ns_steps", 5)), eps=f.number("eps", 1e-8),
      weight_decay=f.number("weight_decay", 0.0), adam_b1=b1, adam_b2=b2)


def _family(builder, *names):
  return {n: builder for n in names}


# Ludwig optimizer type -> builder(name, learning_rate, fields).
LUDWIG_TYPES: dict[str, Callable] = {
    **_family(_sgd, "sgd", "sgd_8bit"),
    **_family(_adam, "adam", "adam_8bit", "paged_adam", "paged_adam_8bit",
              "adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"),
    **_family(_adagrad, "adagrad", "adagrad_8bit"),
    **_family(_rmsprop, "rmsprop", "rmsprop_8bit"),
    **_family(_lamb, "lamb", "lamb_8bit"),
    **_family(_lars, "lars", "lars_8bit"),
    **_family(_lion, "lion", "lion_8bit", "paged_lion", "paged_lion_8bit"),
    "adadelta": _adadelta,
    "adamax": _adamax,
    "nadam": _nadam,
    "radam": _radam,
    "adafactor": _adafactor,
    "schedule_free_adamw": _schedule_free_adamw,
    "muon": _muon,
}

# Fields each type accepts (Ludwig's names), besides "type".
_BITSANDBYTES = ("block_wise", "percentile_clipping")
LUDWIG_FIELDS: dict[str, tuple[str, ...]] = {
    "sgd": ("momentum", "weight_decay", "dampening", "nesterov"),
    "adam": ("betas", "eps", "weight_decay", "amsgrad"),
    "adagrad": ("initial_accumulator_value", "lr_decay", "weight_decay", "eps"),
    "rmsprop": ("momentum", "alpha", "eps", "centered", "weight_decay"),
    "lamb": ("bias_correction", "betas", "eps", "weight_decay", "amsgrad", "adam_w_mode",
             "max_unorm") + _BITSANDBYTES,
    "lars": ("momentum", "dampening", "weight_decay", "nesterov", "max_unorm") + _BITSANDBYTES,
    "lion": ("betas", "weight_decay") + _BITSANDBYTES,
    "adadelta": ("rho", "eps", "weight_decay"),
    "adamax": ("betas", "eps", "weight_decay"),
    "nadam": ("betas", "eps", "weight_decay", "momentum_decay"),
    "radam": ("betas", "eps", "weight_decay"),
    "adafactor": ("eps", "clip_threshold", "decay_rate", "beta1", "weight_decay",
                  "scale_parameter", "relative_step", "warmup_init"),
    "schedule_free_adamw": ("betas", "eps", "weight_decay", "warmup_steps", "weight_lr_power"),
    "muon": ("momentum", "nesterov", "ns_steps", "eps", "weight_decay", "adamw_betas"),
}


def _accepted_fields(type_name: str) -> tuple[str, ...]:
  base = type_name.removeprefix("paged_").removesuffix("_8bit")
  base = "adam" if base == "adamw" else base
  fields = LUDWIG_FIELDS[base]
  if type_name != base and type_name not in ("adamw",):
    fields = tuple(dict.fromkeys(fields + _BITSANDBYTES))
  return fields


def ludwig_types() -> list[str]:
  """Every Ludwig optimizer type :func:`from_config` accepts, sorted."""
  return sorted(LUDWIG_TYPES)


def _load(config):
  if isinstance(config, Mapping):
    return dict(config)
  if isinstance(config, (str, os.PathLike)):
    import yaml  # PyYAML comes with flax

    text = str(config)
    if isinstance(config, os.PathLike) or ("\n" not in text and os.path.isfile(text)):
      with open(config) as fh:
        text = fh.read()
    loaded = yaml.safe_load(text)
    if not isinstance(loaded, Mapping):
      raise ValueError(f"The config must be a mapping (YAML document), got {type(loaded).__name__}: "
                       f"{str(config)[:80]!r} (a file path that does not exist?).")
    return dict(loaded)
  raise TypeError(f"config must be a mapping, YAML text or a file path, got {type(config).__name__}.")


def from_config(config, learning_rate=None) -> optax.GradientTransformation:
  """Builds an optimizer from a Ludwig (or bitsandbytes-style) config.

  Args:
    config: a mapping, YAML text or YAML file path holding either an optimizer
      section (with ``type``) or a Ludwig document with
      ``trainer: {learning_rate: ..., optimizer: {...}}``.
    learning_rate: overrides the config's ``trainer.learning_rate``; needed
      when the config has none.

  Returns:
    An ``optax.GradientTransformation``; with ``percentile_clipping < 100``
    it is ``optax.chain(percentile_clipping(p), optimizer)``, and from a
    whole Ludwig document Ludwig's gradient clipping (by default
    ``optax.clip_by_global_norm(0.5)``) comes first.

  Raises:
    ValueError: for an unknown type or field (naming it and listing what is
      accepted), ``block_wise: false`` on an 8-bit type, or a value this
      library cannot honour.

  Examples:
    >>> import optax_paged
    >>> tx = optax_paged.from_config(
    ...     {"type": "paged_adamw_8bit", "betas": [0.9, 0.999], "eps": 1e-8,
    ...      "weight_decay": 0.0}, learning_rate=3e-4)
    >>> tx = optax_paged.from_config('''
    ... trainer:
    ...   learning_rate: 0.001
    ...   optimizer:
    ...     type: lion_8bit
    ...     betas: [0.95, 0.98]
    ...     weight_decay: 0.01
    ...     percentile_clipping: 95
    ... ''')
  """
  doc = _load(config)
  section = doc
  clip_trainer = None
  if "trainer" in doc:
    trainer = doc["trainer"] or {}
    if _scheduler_changes_rate(trainer.get("learning_rate_scheduler")) and learning_rate is None:
      raise ValueError(
          "trainer.learning_rate_scheduler is not converted: pass the schedule as "
          "learning_rate= (an optax schedule, e.g. optax.warmup_cosine_decay_schedule), which "
          "replaces trainer.learning_rate and its scheduler.")
    if learning_rate is None:
      learning_rate = trainer.get("learning_rate")
    section = trainer.get("optimizer", {"type": "adam"})
    clip_trainer = _gradient_clipping(trainer.get("gradient_clipping") or {})
  elif "optimizer" in doc and "type" not in doc:
    section = doc["optimizer"]
  if not isinstance(section, Mapping) or "type" not in section:
    raise ValueError("The optimizer section needs a 'type' (one of: " + ", ".join(ludwig_types()) + ").")
  type_name = section["type"]
  if type_name not in LUDWIG_TYPES:
    raise ValueError(f"Unknown optimizer type {type_name!r}; accepted: {', '.join(ludwig_types())}.")
  if learning_rate is None:
    raise ValueError("No learning rate: pass learning_rate= or set trainer.learning_rate.")
  if isinstance(learning_rate, str):
    try:
      learning_rate = float(learning_rate)  # YAML 1.1 reads 1e-3 (no dot) as text
    except ValueError:
      raise ValueError(f"learning_rate {learning_rate!r} is not a number (Ludwig's 'auto' learning "
                       "rate search is not supported: pass a number or a schedule).") from None
  check_hyperparam("learning_rate", learning_rate, 0.0)
  accepted = _accepted_fields(type_name)
  unknown = sorted(set(section) - {"type"} - set(accepted))
  if unknown:
    raise ValueError(f"{type_name} does not take field(s) {', '.join(unknown)}; "
                     f"accepted: {', '.join(accepted)}.")
  fields = _Fields(type_name, {k: v for k, v in section.items() if k != "type"})
  eight_bit = type_name.endswith("_8bit")
  if eight_bit and not fields.flag("block_wise", True):
    raise ValueError(
        f"{type_name}: block_wise=False (one scale per whole tensor) is not supported: "
        "optax-paged always quantizes in blocks of 256 values, which is what makes 8-bit "
        "states as accurate as float32 ones. Remove the field or set it to true.")
  fields.get("block_wise")
  clip = fields.get("percentile_clipping", 100)
  if isinstance(clip, float) and clip.is_integer():  # e.g. 90.0 from a YAML file
    clip = int(clip)
  clipping = percentile_clipping(clip)  # checks it: an int in 0..100
  if isinstance(learning_rate, (int, float)):
    learning_rate = float(learning_rate)
  tx = LUDWIG_TYPES[type_name](type_name, learning_rate, fields)
  tx = optax.chain(clipping, tx) if clip < 100 else tx
  return tx if clip_trainer is None else optax.chain(clip_trainer, tx)


# Ludwig's GradientClippingConfig defaults.
_CLIPPING_DEFAULTS = {"clipglobalnorm": 0.5, "clipnorm": None, "clipvalue": None}


def _gradient_clipping(section) -> optax.GradientTransformation | None:
  """Ludwig's ``trainer.gradient_clipping`` as optax transformations, or None.

  Ludwig's trainer clips with ``torch.nn.utils.clip_grad_norm_`` over all
  parameters for ``clipglobalnorm`` and then ``clipnorm`` (both global
  norms), then ``clip_grad_value_`` for ``clipvalue``; absent fields take
  their defaults (``clipglobalnorm: 0.5``).
  """
  if not isinstance(section, Mapping):
    raise ValueError(f"trainer.gradient_clipping must be a mapping, got {section!r}.")
  unknown = sorted(set(section) - set(_CLIPPING_DEFAULTS))
  if unknown:
    raise ValueError(f"trainer.gradient_clipping does not take field(s) {', '.join(unknown)}; "
                     f"accepted: {', '.join(_CLIPPING_DEFAULTS)}.")
  steps = []
  for name, default in _CLIPPING_DEFAULTS.items():
    value = _number(f"trainer.gradient_clipping.{name}", section.get(name, default))
    if not value:  # Ludwig skips a null or zero threshold
      continue
    steps.append(optax.clip(value) if name == "clipvalue" else optax.clip_by_global_norm(value))
  return optax.chain(*steps) if steps else None


def _scheduler_changes_rate(section) -> bool:
  """Whether a Ludwig ``learning_rate_scheduler`` section changes the rate.

  Ludwig writes the section into every config it saves; its defaults (no
  decay, no warm-up, no reduction on plateau) leave the rate constant.
  """
  if not section:
    return False
  if not isinstance(section, Mapping):
    raise ValueError(f"trainer.learning_rate_scheduler must be a mapping, got {section!r}.")
  return bool(section.get("decay") or section.get("reduce_on_plateau")
              or section.get("warmup_evaluations") or section.get("warmup_fraction"))
