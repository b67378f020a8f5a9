"""Drop-in optimizers with optax's signatures and 8-bit state."""

from __future__ import annotations

import optax

from optax_paged import transform
from optax_paged.offload import OffloadPolicy, paged
from optax_paged.transform import QuantizeMask, check_hyperparam


def _check_learning_rate(learning_rate):
  check_hyperparam("learning_rate", learning_rate, 0.0)


def adam_8bit(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    block_size: int = 256,
    min_8bit_size: int = 4096,
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
    block_size: elements per quantization block (power of two, 64..4096).
    min_8bit_size: leaves with fewer elements keep float32 state.
    quantize_mask: pytree of bools or ``(key_path, leaf) -> bool``; ``False``
      leaves keep float32 state (e.g. embeddings).
    backend: ``"auto"`` (Pallas on a single GPU/TPU, XLA elsewhere),
      ``"pallas"`` or ``"xla"``.

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Kingma & Ba, `Adam <https://arxiv.org/abs/1412.6980>`_, 2014.
    Dettmers et al., `8-bit Optimizers via Block-wise Quantization
    <https://arxiv.org/abs/2110.02861>`_, 2022.
  """
  _check_learning_rate(learning_rate)
  return optax.chain(
      transform.scale_by_adam_8bit(
          b1, b2, eps, eps_root,
          block_size=block_size,
          min_8bit_size=min_8bit_size,
          quantize_mask=quantize_mask,
          backend=backend,
      ),
      optax.scale_by_learning_rate(learning_rate),
  )


def adamw_8bit(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask=None,
    *,
    block_size: int = 256,
    min_8bit_size: int = 4096,
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
    weight_decay: decoupled weight decay strength (float or schedule).
    mask: which parameters get weight decay, as in ``optax.adamw``.
    block_size: elements per quantization block (power of two, 64..4096).
    min_8bit_size: leaves with fewer elements keep float32 state.
    quantize_mask: pytree of bools or ``(key_path, leaf) -> bool``; ``False``
      leaves keep float32 state (e.g. embeddings).
    backend: ``"auto"`` (Pallas on a single GPU/TPU, XLA elsewhere),
      ``"pallas"`` or ``"xla"``.

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Loshchilov & Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019.
    Dettmers et al., `8-bit Optimizers via Block-wise Quantization
    <https://arxiv.org/abs/2110.02861>`_, 2022.
  """
  _check_learning_rate(learning_rate)
  check_hyperparam("weight_decay", weight_decay, 0.0)
  return optax.chain(
      transform.scale_by_adam_8bit(
          b1, b2, eps, eps_root,
          block_size=block_size,
          min_8bit_size=min_8bit_size,
          quantize_mask=quantize_mask,
          backend=backend,
      ),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def paged_adam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    policy: OffloadPolicy | None = None,
) -> optax.GradientTransformation:
  """``optax.adam`` with its float32 state paged to host memory.

  Args:
    learning_rate: a non-negative float or an ``optax`` schedule.
    b1, b2, eps, eps_root: as in ``optax.adam``.
    policy: an :class:`~optax_paged.OffloadPolicy` (default: offload every
      state leaf of at least 100,000 elements).

  Returns:
    An ``optax.GradientTransformation``.
  """
  _check_learning_rate(learning_rate)
  return paged(optax.adam(learning_rate, b1, b2, eps, eps_root), policy, elementwise=True)


def paged_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask=None,
    *,
    policy: OffloadPolicy | None = None,
) -> optax.GradientTransformation:
  """``optax.adamw`` with its float32 state paged to host memory.

  Args:
    learning_rate: a non-negative float or an ``optax`` schedule.
    b1, b2, eps, eps_root, weight_decay, mask: as in ``optax.adamw``.
    policy: an :class:`~optax_paged.OffloadPolicy`.

  Returns:
    An ``optax.GradientTransformation``.
  """
  _check_learning_rate(learning_rate)
  check_hyperparam("weight_decay", weight_decay, 0.0)
  return paged(
      optax.adamw(learning_rate, b1, b2, eps, eps_root, weight_decay=weight_decay, mask=mask),
      policy,
      elementwise=True,
  )


def paged_adam_8bit(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    block_size: int = 256,
    min_8bit_size: int = 4096,
    quantize_mask: QuantizeMask = None,
    backend: str = "auto",
    policy: OffloadPolicy | None = None,
) -> optax.GradientTransformation:
  """:func:`adam_8bit` with its 8-bit state paged to host memory.

  Args: as :func:`adam_8bit`, plus ``policy`` (an
  :class:`~optax_paged.OffloadPolicy`).

  Returns:
    An ``optax.GradientTransformation``.
  """
  return paged(
      adam_8bit(learning_rate, b1, b2, eps, eps_root, block_size=block_size,
                min_8bit_size=min_8bit_size, quantize_mask=quantize_mask, backend=backend),
      policy,
      elementwise=True,
  )


def paged_adamw_8bit(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask=None,
    *,
    block_size: int = 256,
    min_8bit_size: int = 4096,
    quantize_mask: QuantizeMask = None,
    backend: str = "auto",
    policy: OffloadPolicy | None = None,
) -> optax.GradientTransformation:
  """:func:`adamw_8bit` with its 8-bit state paged to host memory.

  bitsandbytes' ``PagedAdamW8bit``: 8-bit moments (~2 bytes per parameter)
  that live in host memory between steps.

  Args: as :func:`adamw_8bit`, plus ``policy`` (an
  :class:`~optax_paged.OffloadPolicy`).

  Returns:
    An ``optax.GradientTransformation``.
  """
  return paged(
      adamw_8bit(learning_rate, b1, b2, eps, eps_root, weight_decay, mask,
                 block_size=block_size, min_8bit_size=min_8bit_size,
                 quantize_mask=quantize_mask, backend=backend),
      policy,
      elementwise=True,
  )
