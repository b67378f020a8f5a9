"""Drop-in optimizers with optax's signatures: 8-bit state, paged state, or both.

Each ``<name>_8bit`` takes the arguments and defaults of its optax twin
(``optax.<name>``) plus the keyword-only 8-bit options ``block_size``,
``min_8bit_size``, ``quantize_mask`` and ``backend``. Each ``paged_<name>``
takes its unpaged twin's arguments plus ``policy``
(an :class:`~optax_paged.OffloadPolicy`).
"""

from __future__ import annotations

import functools
import inspect

import optax

from optax_paged import transform
from optax_paged.offload import OffloadPolicy, host_offload_supported, paged
from optax_paged.transform import QuantizeMask, check_hyperparam, with_extras_doc


def _check_learning_rate(learning_rate):
  check_hyperparam("learning_rate", learning_rate, 0.0)


def _extras(block_size, min_8bit_size, quantize_mask, backend) -> dict:
  return dict(block_size=block_size, min_8bit_size=min_8bit_size,
              quantize_mask=quantize_mask, backend=backend)


@with_extras_doc
def adam_8bit(
    learning_rate: optax.ScalarOrSchedule,
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
  """Adam with 8-bit blockwise-quantized moments (``optax.adam``'s twin).

  Args:
    learning_rate: a non-negative float or an ``optax`` schedule.
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: term added to the denominator outside the square root.
    eps_root: term added to the second moment inside the square root.
    mu_dtype: only ``None`` (the moments are 8-bit codes); kept so that
      positional arguments line up with optax's.
    nesterov: use Nesterov momentum (NAdam), as in ``optax.adam``.
{extras}

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Kingma & Ba, `Adam <https://arxiv.org/abs/1412.6980>`_, 2014.
    Dettmers et al., `8-bit Optimizers via Block-wise Quantization
    <https://arxiv.org/abs/2110.02861>`_, 2022.
  """
  _check_learning_rate(learning_rate)
  transform.check_no_dtype("mu_dtype", mu_dtype)
  return optax.chain(
      transform.scale_by_adam_8bit(
          b1, b2, eps, eps_root, nesterov=nesterov, **_extras(block_size, min_8bit_size, quantize_mask, backend)),
      optax.scale_by_learning_rate(learning_rate),
  )


@with_extras_doc
def adamw_8bit(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype=None,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask=None,
    *,
    nesterov: bool = False,
    block_size: int | None = None,
    min_8bit_size: int | None = None,
    quantize_mask: QuantizeMask = None,
    backend: str = "auto",
) -> optax.GradientTransformation:
  """AdamW (decoupled weight decay) with 8-bit moments (``optax.adamw``'s twin).

  Args:
    learning_rate: a non-negative float or an ``optax`` schedule.
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: term added to the denominator outside the square root.
    eps_root: term added to the second moment inside the square root.
    mu_dtype: only ``None`` (the moments are 8-bit codes); kept so that
      positional arguments line up with optax's.
    nesterov: use Nesterov momentum (NAdam), as in ``optax.adam``.
    weight_decay: decoupled weight decay strength (float or schedule).
    mask: which parameters get weight decay, as in ``optax.adamw``.
{extras}

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Loshchilov & Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019.
    Dettmers et al., `8-bit Optimizers via Block-wise Quantization
    <https://arxiv.org/abs/2110.02861>`_, 2022.
  """
  _check_learning_rate(learning_rate)
  transform.check_no_dtype("mu_dtype", mu_dtype)
  check_hyperparam("weight_decay", weight_decay, 0.0)
  return optax.chain(
      transform.scale_by_adam_8bit(
          b1, b2, eps, eps_root, nesterov=nesterov, **_extras(block_size, min_8bit_size, quantize_mask, backend)),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


@with_extras_doc
def lion_8bit(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype=None,
    weight_decay: optax.ScalarOrSchedule = 1e-3,
    mask=None,
    *,
    block_size: int | None = None,
    min_8bit_size: int | None = None,
    quantize_mask: QuantizeMask = None,
    backend: str = "auto",
) -> optax.GradientTransformation:
  """Lion with an 8-bit momentum (``optax.lion``'s twin; bitsandbytes' ``Lion8bit``).

  Args:
    learning_rate: a non-negative float or an ``optax`` schedule.
    b1: interpolation weight of the momentum in the update's sign.
    b2: decay of the momentum.
    mu_dtype: only ``None`` (the moments are 8-bit codes); kept so that
      positional arguments line up with optax's.
    weight_decay: decoupled weight decay strength.
    mask: which parameters get weight decay.
{extras}

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Chen et al., `Symbolic Discovery of Optimization Algorithms
    <https://arxiv.org/abs/2302.06675>`_, 2023.
  """
  _check_learning_rate(learning_rate)
  transform.check_no_dtype("mu_dtype", mu_dtype)
  check_hyperparam("weight_decay", weight_decay, 0.0)
  return optax.chain(
      transform.scale_by_lion_8bit(
          b1, b2, **_extras(block_size, min_8bit_size, quantize_mask, backend)),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


@with_extras_doc
def sgd_8bit(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float | None = None,
    nesterov: bool = False,
    accumulator_dtype=None,
    *,
    block_size: int | None = None,
    min_8bit_size: int | None = None,
    quantize_mask: QuantizeMask = None,
    backend: str = "auto",
) -> optax.GradientTransformation:
  """SGD with an 8-bit momentum trace (``optax.sgd``'s twin; bitsandbytes' ``SGD8bit``).

  Without ``momentum`` there is no state to quantize: this is plain SGD.

  Args:
    learning_rate: a non-negative float or an ``optax`` schedule.
    momentum: momentum coefficient, or ``None`` for plain SGD.
    nesterov: Nesterov momentum.
    accumulator_dtype: only ``None`` (the trace is 8-bit codes), as optax's
      ``sgd`` takes it.
{extras}

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Sutskever et al., `On the importance of initialization and momentum in
    deep learning <https://proceedings.mlr.press/v28/sutskever13.html>`_, 2013.
  """
  _check_learning_rate(learning_rate)
  transform.check_no_dtype("accumulator_dtype", accumulator_dtype)
  transform.check_8bit_options(block_size, min_8bit_size, backend)  # also without momentum
  inner = optax.identity() if momentum is None else transform.trace_8bit(
      momentum, nesterov, **_extras(block_size, min_8bit_size, quantize_mask, backend))
  return optax.chain(inner, optax.scale_by_learning_rate(learning_rate))


@with_extras_doc
def rmsprop_8bit(
    learning_rate: optax.ScalarOrSchedule,
    decay: float = 0.9,
    eps: float = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    centered: bool = False,
    momentum: float | None = None,
    nesterov: bool = False,
    bias_correction: bool = False,
    *,
    block_size: int | None = None,
    min_8bit_size: int | None = None,
    quantize_mask: QuantizeMask = None,
    backend: str = "auto",
) -> optax.GradientTransformation:
  """RMSProp with 8-bit state (``optax.rmsprop``'s twin; bitsandbytes' ``RMSprop8bit``).

  The second moment uses the unsigned map; a momentum trace, when asked
  for, uses the signed map. ``centered=True`` is refused, as bitsandbytes
  does: centered RMSProp divides by ``nu - mu**2``, and when the gradient's
  variance is small next to ``nu`` the 8-bit errors of the two moments
  swamp it (measured: the parabola and Rosenbrock problems diverge).

  Args:
    learning_rate: a non-negative float or an ``optax`` schedule.
    decay, eps, initial_scale, eps_in_sqrt, momentum, nesterov,
      bias_correction: as in ``optax.rmsprop``.
    centered: must be False (see above).
{extras}

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Tieleman & Hinton, Lecture 6.5 - RMSProp, COURSERA, 2012.
  """
  _check_learning_rate(learning_rate)
  if centered:
    raise ValueError(
        "rmsprop_8bit: centered=True is not supported (as in bitsandbytes): it divides by "
        "nu - mu**2, which 8-bit errors swamp when the variance is small. Use "
        "centered=False, or optax.rmsprop(centered=True) with float32 state.")
  extras = _extras(block_size, min_8bit_size, quantize_mask, backend)
  return optax.chain(
      transform.scale_by_rms_8bit(decay, eps, initial_scale, eps_in_sqrt, bias_correction, **extras),
      optax.scale_by_learning_rate(learning_rate),
      optax.identity() if momentum is None else transform.trace_8bit(momentum, nesterov, **extras),
  )


@with_extras_doc
def adagrad_8bit(
    learning_rate: optax.ScalarOrSchedule,
    initial_accumulator_value: float = 0.1,
    eps: float = 1e-7,
    *,
    eps_in_sqrt: bool = True,
    block_size: int | None = None,
    min_8bit_size: int | None = None,
    quantize_mask: QuantizeMask = None,
    backend: str = "auto",
) -> optax.GradientTransformation:
  """Adagrad with an 8-bit accumulator (``optax.adagrad``'s twin; ``Adagrad8bit``).

  The accumulator (a sum of squares) uses the unsigned map.

  Args:
    learning_rate: a non-negative float or an ``optax`` schedule.
    initial_accumulator_value: starting value of the accumulator.
    eps: added inside the square root (optax's form); with
      ``eps_in_sqrt=False`` outside it, ``g / (sqrt(sum) + eps)``, as
      PyTorch's and bitsandbytes' Adagrad do.
    eps_in_sqrt: where ``eps`` goes (keyword only: optax's Adagrad has no
      such argument).
{extras}

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Duchi et al., `Adaptive Subgradient Methods for Online Learning and
    Stochastic Optimization <https://jmlr.org/papers/v12/duchi11a.html>`_, 2011.
  """
  _check_learning_rate(learning_rate)
  return optax.chain(
      transform.scale_by_rss_8bit(
          initial_accumulator_value, eps, eps_in_sqrt=eps_in_sqrt,
          **_extras(block_size, min_8bit_size, quantize_mask, backend)),
      optax.scale_by_learning_rate(learning_rate),
  )


@with_extras_doc
def ademamix_8bit(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    b3: optax.ScalarOrSchedule = 0.9999,
    alpha: optax.ScalarOrSchedule = 5.0,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype=None,
    weight_decay: float = 0.0,
    mask=None,
    *,
    block_size: int | None = None,
    min_8bit_size: int | None = None,
    quantize_mask: QuantizeMask = None,
    backend: str = "auto",
) -> optax.GradientTransformation:
  """AdEMAMix with 8-bit moments (``optax.contrib.ademamix``'s twin; ``AdEMAMix8bit``).

  ``b3`` and ``alpha`` take schedules for the paper's warm-ups, e.g.
  ``optax.contrib.ademamix``'s ``alpha_scheduler``/``b3_scheduler`` style
  ``lambda step: ...`` functions.

  Args:
    learning_rate: a non-negative float or an ``optax`` schedule.
    b1, b2, b3, alpha, eps, eps_root: as in ``optax.contrib.ademamix``.
    mu_dtype: only ``None`` (the moments are 8-bit codes); kept so that
      positional arguments line up with optax's.
    weight_decay: decoupled weight decay strength.
    mask: which parameters get weight decay.
{extras}

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Pagliardini et al., `The AdEMAMix Optimizer: Better, Faster, Older
    <https://arxiv.org/abs/2409.03137>`_, 2024.
  """
  _check_learning_rate(learning_rate)
  transform.check_no_dtype("mu_dtype", mu_dtype)
  check_hyperparam("weight_decay", weight_decay, 0.0)
  return optax.chain(
      transform.scale_by_ademamix_8bit(
          b1, b2, b3, alpha, eps, eps_root, **_extras(block_size, min_8bit_size, quantize_mask, backend)),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


@with_extras_doc
def lamb_8bit(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    mask=None,
    *,
    block_size: int | None = None,
    min_8bit_size: int | None = None,
    quantize_mask: QuantizeMask = None,
    backend: str = "auto",
) -> optax.GradientTransformation:
  """LAMB with 8-bit Adam moments (``optax.lamb``'s twin).

  The trust ratio is computed per leaf from the full update (the Adam
  direction of the float32 new moments plus weight decay), as in
  ``optax.lamb``; bitsandbytes has no working 8-bit LAMB on CUDA.

  Args:
    learning_rate: a non-negative float or an ``optax`` schedule.
    b1, b2, eps, eps_root, weight_decay, mask: as in ``optax.lamb``.
{extras}

  Returns:
    An ``optax.GradientTransformation``.

  References:
    You et al., `Large Batch Optimization for Deep Learning: Training BERT in
    76 minutes <https://arxiv.org/abs/1904.00962>`_, 2020.
  """
  _check_learning_rate(learning_rate)
  check_hyperparam("weight_decay", weight_decay, 0.0)
  return optax.chain(
      transform.scale_by_adam_8bit(
          b1, b2, eps, eps_root, **_extras(block_size, min_8bit_size, quantize_mask, backend)),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_trust_ratio(),
      optax.scale_by_learning_rate(learning_rate),
  )


@with_extras_doc
def lars_8bit(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float = 0.0,
    weight_decay_mask=True,
    trust_coefficient: float = 0.001,
    eps: float = 0.0,
    trust_ratio_mask=True,
    momentum: float = 0.9,
    nesterov: bool = False,
    *,
    block_size: int | None = None,
    min_8bit_size: int | None = None,
    quantize_mask: QuantizeMask = None,
    backend: str = "auto",
) -> optax.GradientTransformation:
  """LARS with an 8-bit momentum trace (``optax.lars``'s twin).

  The trust ratio is computed per leaf from the weight-decayed gradient
  before the momentum, as in ``optax.lars``; bitsandbytes has no working
  8-bit LARS on CUDA.

  Args:
    learning_rate: a non-negative float or an ``optax`` schedule.
    weight_decay, weight_decay_mask, trust_coefficient, eps, trust_ratio_mask,
      momentum, nesterov: as in ``optax.lars``.
{extras}

  Returns:
    An ``optax.GradientTransformation``.

  References:
    You et al., `Large Batch Training of Convolutional Networks
    <https://arxiv.org/abs/1708.03888>`_, 2017.
  """
  _check_learning_rate(learning_rate)
  check_hyperparam("weight_decay", weight_decay, 0.0)
  check_hyperparam("trust_coefficient", trust_coefficient, 0.0)
  check_hyperparam("eps", eps, 0.0)
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
      optax.masked(
          optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=eps),
          mask=trust_ratio_mask,
      ),
      optax.scale_by_learning_rate(learning_rate),
      transform.trace_8bit(momentum, nesterov, **_extras(block_size, min_8bit_size, quantize_mask, backend)),
  )


# ---------------------------------------------------------------------------
# Paged variants.


def _paged_variant(fn, *, elementwise: bool, twin: str):
  """``paged_<name>``: ``fn``'s signature plus ``policy``, state paged to host.

  ``elementwise`` says whether ``fn``'s update treats every element on its
  own, which lets ``policy.page_bytes`` stream it (LAMB and LARS compute
  per-leaf trust ratios, so they are paged whole).
  """

  sig = inspect.signature(fn)
  # optax's own constructors accept any learning rate; this module's check theirs.
  unchecked = fn.__module__ != __name__

  @functools.wraps(fn)
  def wrapper(*args, policy: OffloadPolicy | None = None, **kwargs):
    bound = sig.bind_partial(*args, **kwargs).arguments
    if unchecked:
      _check_learning_rate(bound.get("learning_rate"))
    split = elementwise
    if not elementwise and policy is not None and policy.page_bytes is not None:
      raise ValueError(
          f"paged_{fn.__name__}: its trust ratio needs whole leaves, so policy.page_bytes "
          "cannot be used; leave page_bytes unset (the state is then paged whole).")
    if elementwise and callable(bound.get("mask")):
      # A mask function sees the tree it is given: split per parameter or
      # per page it would see other trees (None for the other parameters,
      # row pages), and could decide differently without any error.
      if (policy is not None and policy.enabled and policy.page_bytes is not None
          and host_offload_supported()):
        raise ValueError(
            f"paged_{fn.__name__}: policy.page_bytes streams pages of rows, and a callable mask "
            "would be called on those pages, not on the parameters. Pass mask as a pytree of "
            "bools (e.g. mask(params)), or leave page_bytes unset.")
      split = False  # whole update: the mask sees the parameters
    return paged(fn(*args, **kwargs), policy, elementwise=split)

  policy = inspect.Parameter("policy", inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation="OffloadPolicy | None")
  wrapper.__signature__ = sig.replace(parameters=[*sig.parameters.values(), policy])
  wrapper.__name__ = wrapper.__qualname__ = f"paged_{fn.__name__}"
  wrapper.__wrapped__ = None
  streaming = ("Large leaves can be streamed in pages (``policy.page_bytes``)."
               if elementwise else
               "Its trust ratio needs whole leaves, so ``policy.page_bytes`` cannot be used.")
  wrapper.__doc__ = (
      f"``{twin}`` with its state paged to host memory (bitsandbytes' paged optimizers).\n\n"
      f"  The state lives in ``pinned_host`` memory between steps and moves to the\n"
      f"  device for the update (see :func:`optax_paged.paged`). {streaming}\n\n"
      f"  Args: as ``{twin}``, plus ``policy``: an :class:`~optax_paged.OffloadPolicy`\n"
      f"  (default: offload every state leaf of at least 100,000 elements).\n\n"
      f"  Returns:\n    An ``optax.GradientTransformation``.\n"
  )
  return wrapper


paged_adam = _paged_variant(optax.adam, elementwise=True, twin="optax.adam")
paged_adamw = _paged_variant(optax.adamw, elementwise=True, twin="optax.adamw")
paged_lion = _paged_variant(optax.lion, elementwise=True, twin="optax.lion")
paged_ademamix = _paged_variant(optax.contrib.ademamix, elementwise=True,
                                twin="optax.contrib.ademamix")
paged_adam_8bit = _paged_variant(adam_8bit, elementwise=True, twin="adam_8bit")
paged_adamw_8bit = _paged_variant(adamw_8bit, elementwise=True, twin="adamw_8bit")
paged_lion_8bit = _paged_variant(lion_8bit, elementwise=True, twin="lion_8bit")
paged_sgd_8bit = _paged_variant(sgd_8bit, elementwise=True, twin="sgd_8bit")
paged_rmsprop_8bit = _paged_variant(rmsprop_8bit, elementwise=True, twin="rmsprop_8bit")
paged_adagrad_8bit = _paged_variant(adagrad_8bit, elementwise=True, twin="adagrad_8bit")
paged_ademamix_8bit = _paged_variant(ademamix_8bit, elementwise=True, twin="ademamix_8bit")
paged_lamb_8bit = _paged_variant(lamb_8bit, elementwise=False, twin="lamb_8bit")
paged_lars_8bit = _paged_variant(lars_8bit, elementwise=False, twin="lars_8bit")
