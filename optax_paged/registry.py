"""Optimizers by name: the names users know from bitsandbytes and Ludwig."""

from __future__ import annotations

from collections.abc import Callable

import optax

from optax_paged import alias

# name -> constructor taking ``learning_rate`` first, optax-style.
OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adam": optax.adam,
    "adamw": optax.adamw,
    "adam_8bit": alias.adam_8bit,
    "adamw_8bit": alias.adamw_8bit,
    "paged_adam": alias.paged_adam,
    "paged_adamw": alias.paged_adamw,
    "paged_adam_8bit": alias.paged_adam_8bit,
    "paged_adamw_8bit": alias.paged_adamw_8bit,
}


def names() -> list[str]:
  """All accepted optimizer names, sorted."""
  return sorted(OPTIMIZERS)


def create(name: str, learning_rate, **kwargs) -> optax.GradientTransformation:
  """Builds the optimizer called ``name``.

  Args:
    name: one of :func:`names`.
    learning_rate: float or schedule.
    **kwargs: keyword arguments of that optimizer's constructor.

  Returns:
    An ``optax.GradientTransformation``.

  Raises:
    ValueError: for an unknown name, listing the accepted ones.
  """
  try:
    ctor = OPTIMIZERS[name]
  except KeyError:
    raise ValueError(
        f"Unknown optimizer {name!r}; accepted: {', '.join(names())}."
    ) from None
  return ctor(learning_rate, **kwargs)
