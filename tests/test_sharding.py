"""8-bit state keeps its parameter's NamedSharding over an 8-device CPU mesh.

The mesh needs --xla_force_host_platform_device_count=8, which must be set
before JAX starts: the check runs in a subprocess (sharded_check.py).
"""

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  """The subprocess's JSON report, computed once per test run.

  Under pytest-xdist the first worker to get here runs the check and the
  others wait for its file (all workers share the base temp folder's
  parent), so the 8-device check does not run once per worker.
  """
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent
  result, lock = root / "sharded_check.json", root / "sharded_check.lock"
  try:
    os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
  except FileExistsError:
    deadline = time.monotonic() + 900
    while not result.exists():
      assert time.monotonic() < deadline, "timed out waiting for sharded_check.py"
      time.sleep(0.2)
  else:
    try:
      text = json.dumps({"ok": _run_check()})
    except BaseException as e:  # the waiting workers must fail too, not hang
      text = json.dumps({"error": repr(e)[-4000:]})
    tmp = result.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(result)  # atomic: waiters never read half a file
  data = json.loads(result.read_text())
  assert "ok" in data, data["error"]
  return data["ok"]


def _run_check():
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


def test_update_inside_shard_map_follows_the_state_not_the_shard_shape(report):
  # Each shard (2 x 1024) is below min_8bit_size; before the fix the update
  # took the uint8 codes for float32 moments and returned updates ~1e4.
  r = report["shard_map"]["whole_blocks"]
  assert r["codes_dtype_kept"], r
  assert r["rel_diff"] < 1e-6, r
  assert r["codes_differing"] < 1e-3, r


def test_blocks_over_the_flattened_array_are_refused_inside_shard_map(report):
  error = report["shard_map"]["flat_blocks"].get("error", "")
  assert "shard_map" in error and "block_size=256" in error, report["shard_map"]


def test_replicated_leaves_with_flattened_blocks_work_under_shard_map_and_pmap(report):
  assert report["shard_map"]["replicated_flat_blocks"] == {"shard_map_equal": True, "pmap_equal": True}


@pytest.mark.parametrize("layout", ["col768", "flat"])
def test_blocks_that_do_not_fit_the_shards(report, layout):
  """Explicit axes: a clear error at init; automatic axes: replicated state, right updates, paging works."""
  error = report["layouts"][f"explicit_{layout}"]
  assert "over explicit mesh axes" in error and "['w']" in error, error
  for opt, result in report["layouts"][f"auto_{layout}"].items():
    assert result == {"init_replicated": True, "equal_unsharded": True}, (opt, result)


def test_pallas_backend_with_several_devices(report):
  r = report["pallas"]
  assert r["sharded_no_vma"] == {"equal_xla": True} and r["replicated_vma"] == {"equal_xla": True}, r
  assert "check_vma=False" in r["sharded_vma"].get("error", ""), r
  assert "explicit axes" in r["explicit"]["error"] and "backend='auto'" in r["explicit"]["error"], r


def test_streaming_a_sharded_parameter_pages_it_whole(report):
  assert report["streaming"] == {"equal": True, "warned": True}, report["streaming"]


def test_jitted_init_shards_scales_like_eager_init(report):
  assert report["jitted_init"] is True
