"""The GPU benchmark scripts run on CPU in their check mode.

A GPU is lent to some sessions only, for minutes: the scripts must not be
found broken then. On CPU each runs its small self-check and says that it
measured no GPU.
"""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(script, *args):
  return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                        capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_kernels_gpu_script_checks_itself_on_cpu():
  out = _run("kernels_gpu.py")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Numbers below are not GPU measurements" in out.stdout
  for row in ("optax.adamw", "adamw_8bit (pallas)", "adamw_8bit (xla)"):
    assert row in out.stdout


def test_paging_gpu_script_runs_its_placement_part_on_cpu():
  out = _run("paging_gpu.py", "--optimizers", "adamw,paged_adamw_8bit@streamed")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Measured no device memory" in out.stdout
  lines = {l.split()[0]: l for l in out.stdout.splitlines() if "state bytes by memory kind" in l}
  assert "ok=True" in lines["adamw"] and "pinned_host" not in lines["adamw"]
  assert "ok=True" in lines["paged_adamw_8bit@streamed"] and "pinned_host" in lines["paged_adamw_8bit@streamed"]
