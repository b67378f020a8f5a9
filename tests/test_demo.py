"""The demo command runs end to end, and rejects bad flags clearly."""

import subprocess
import sys

import pytest

from optax_paged import demo


def _run(*args):
  return subprocess.run(
      [sys.executable, "-m", "optax_paged", *args], capture_output=True, text=True, timeout=600
  )


def test_demo_prints_table_and_writes_png(tmp_path):
  out = _run("demo", "--steps", "4", "--model", "tiny", "--out", str(tmp_path))
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  header = next(i for i, l in enumerate(lines) if l.startswith("optimizer"))
  assert "bytes/param" in lines[header] and "median step ms" in lines[header]
  rows = {}
  for line in lines[header + 2:]:
    if "|" not in line:
      break
    cells = [c.strip() for c in line.split("|")]
    rows[cells[0]] = cells
  assert set(rows) == {"adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"}
  bytes_per_param = {k: float(v[5]) for k, v in rows.items()}
  assert bytes_per_param["adamw"] == pytest.approx(8.0, abs=0.01)
  assert bytes_per_param["adamw_8bit"] < 4.0
  on_host = {k: int(v[4].replace(",", "")) for k, v in rows.items()}
  assert on_host["adamw"] == on_host["adamw_8bit"] == 0
  assert on_host["paged_adamw"] > 0.9 * int(rows["paged_adamw"][3].replace(",", ""))
  assert on_host["paged_adamw_8bit"] > 0
  png = tmp_path / "demo.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert str(png.resolve()) in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "0"], "positive integer"),
        (["--steps", "ten"], "positive integer"),
        (["--optimizers", "adamw,sgdx"], "unknown optimizer(s) sgdx"),
        (["--model", "huge"], "invalid choice"),
        (["--lr", "-1"], "positive number"),
        (["--bogus"], "unrecognized arguments"),
        (["--seed", "-1"], "non-negative integer"),
    ],
)
def test_bad_flags_give_a_clear_message(args, message, capsys):
  with pytest.raises(SystemExit) as e:
    demo.main(args)
  assert e.value.code == 2
  assert message in capsys.readouterr().err


def test_bad_flag_message_text():
  out = _run("demo", "--optimizers", "adamw,sgdx")
  assert out.returncode == 2
  assert "unknown optimizer(s) sgdx" in out.stderr and "adamw_8bit" in out.stderr


def test_unknown_command():
  out = _run("frobnicate")
  assert out.returncode == 2 and "unknown command" in out.stderr


def test_bad_inputs_fail_before_training_with_a_message(tmp_path, capsys, monkeypatch):
  short = tmp_path / "short.txt"
  short.write_bytes(b"x" * 300)  # passes a whole-text check, not the 10% validation split
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  cases = [
      (["--text", str(short)], "too short for --model small"),
      (["--text", str(tmp_path / "missing.txt")], "cannot read --text"),
      (["--text", str(tmp_path)], "cannot read --text"),
      (["--out", str(a_file)], "cannot create --out folder"),  # before any training
  ]
  for args, message in cases:
    assert demo.main(args + ["--steps", "2"]) == 2, args
    assert message in capsys.readouterr().err, args
  monkeypatch.setenv("OPTAX_PAGED_BACKEND", "bogus")
  assert demo.main(["--steps", "2"]) == 2
  assert "OPTAX_PAGED_BACKEND must be" in capsys.readouterr().err


def test_one_step_runs(tmp_path):
  """--steps 1: the warm-up takes the step, the cosine decay still gets one."""
  assert demo.main(["--steps", "1", "--model", "tiny", "--optimizers", "adamw_8bit",
                    "--out", str(tmp_path)]) == 0
