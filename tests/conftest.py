"""Shared test helpers."""

import importlib
import os

import pytest


def require(module_name: str):
  """Imports an optional dependency, skipping (or failing under make test).

  ``make test`` sets OPTAX_PAGED_REQUIRE_PARITY=1 so that the parity oracle
  (torch + bitsandbytes) is never silently skipped there.
  """
  if os.environ.get("OPTAX_PAGED_REQUIRE_PARITY"):
    return importlib.import_module(module_name)
  return pytest.importorskip(
      module_name, reason=f"{module_name} not installed (extra 'parity')"
  )
