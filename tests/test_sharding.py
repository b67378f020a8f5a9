"""8-bit state keeps its parameter's NamedSharding over an 8-device CPU mesh.

The mesh needs --xla_force_host_platform_device_count=8, which must be set
before JAX starts: the check runs in a subprocess (sharded_check.py).
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

# One pytest-xdist worker runs the whole module, so the 8-device subprocess
# behind the module fixture runs once (make test uses --dist loadgroup).
pytestmark = pytest.mark.xdist_group("sharding")


@pytest.fixture(scope="module")
def report():
  script = pathlib.Path(__file__).with_name("sharded_check.py")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
      [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600
  )
  assert out.returncode == 0, out.stderr[-4000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("axes", ["explicit", "auto"])
def test_state_takes_parameter_sharding_at_init_and_after_jitted_steps(report, axes):
  for when in ("init", "step"):
    for field, leaves in report[axes][when].items():
      assert all(leaves.values()), (when, field, leaves)


@pytest.mark.parametrize("axes", ["explicit", "auto"])
def test_update_has_no_all_gather_or_all_to_all(report, axes):
  assert report[axes]["collectives"] == {"all-gather": 0, "all-to-all": 0}


@pytest.mark.parametrize("axes", ["explicit", "auto"])
def test_sharded_step_equals_single_device_step(report, axes):
  # Codes are compared too (as floats): any code difference would be >= 1e-7
  # relative to the block scale; the float leaves differ by rounding only.
  assert report[axes]["max_diff_to_single_device"] < 1e-6


@pytest.mark.parametrize("axes", ["paged_explicit", "paged_auto"])
def test_paged_state_keeps_partition_specs_on_host_and_device(report, axes):
  r = report[axes]
  assert r["offloaded"] > 0
  assert r["init"] == {"specs": True, "kinds": True}
  assert r["step"] == {"specs": True, "kinds": True}
  assert r["equal_to_unpaged"]
