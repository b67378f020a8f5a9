"""The demo: a character-level transformer LM trained once per optimizer.

Trains a small Flax NNX transformer on real text that every Python install
carries (the source of a fixed set of standard-library modules), with the
same initial weights and the same batches for each optimizer, and reports
final loss, optimizer-state memory and step time side by side.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
import sysconfig
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from optax_paged import backend as backend_lib
from optax_paged import offload
from optax_paged import registry

# Standard-library modules whose source is the demo's corpus (~0.5 MB).
CORPUS_MODULES = (
    "textwrap.py", "difflib.py", "argparse.py", "csv.py", "heapq.py",
    "bisect.py", "fractions.py", "statistics.py", "string.py", "shlex.py",
    "pprint.py", "functools.py", "calendar.py", "gettext.py",
)

MODEL_SIZES = {
    # name: (d_model, layers, heads, seq_len, batch)
    "tiny": (64, 1, 2, 32, 8),
    "small": (128, 2, 4, 64, 16),
    "base": (256, 4, 8, 128, 16),
}

DEFAULT_OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit")

# The demo model is small: page every state leaf of at least this many
# elements (the library default, bitsandbytes' 100,000, would page none).
DEMO_PAGE_MIN_SIZE = 4096


def load_corpus(path: str | None = None) -> tuple[bytes, str]:
  """Returns the training text as bytes and a description of its source."""
  if path:
    data = pathlib.Path(path).read_bytes()
    return data, path
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  parts = [stdlib / m for m in CORPUS_MODULES if (stdlib / m).is_file()]
  if parts:
    data = b"\n".join(p.read_bytes() for p in parts)
    return data, f"{len(parts)} standard-library modules of Python {sys.version.split()[0]}"
  # Some minimal Python images ship no .py sources: fall back to our own.
  here = pathlib.Path(__file__).parent
  data = b"\n".join(p.read_bytes() for p in sorted(here.glob("*.py")))
  return data, "the optax_paged package source"


class Block(nnx.Module):
  """Pre-norm transformer block."""

  def __init__(self, d: int, heads: int, *, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
        num_heads=heads, in_features=d, decode=False, rngs=rngs
    )
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, 4 * d, rngs=rngs)
    self.down = nnx.Linear(4 * d, d, rngs=rngs)

  def __call__(self, x, mask):
    x = x + self.attn(self.ln1(x), mask=mask)
    return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class CharLM(nnx.Module):
  """Byte-level causal transformer language model."""

  def __init__(self, d: int, layers: int, heads: int, seq_len: int, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(256, d, rngs=rngs)
    self.pos = nnx.Param(jax.random.normal(rngs.params(), (seq_len, d)) * 0.02)
    self.blocks = nnx.List([Block(d, heads, rngs=rngs) for _ in range(layers)])
    self.ln = nnx.LayerNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, 256, rngs=rngs)

  def __call__(self, tokens):
    t = tokens.shape[-1]
    x = self.embed(tokens) + self.pos[:t]
    mask = nnx.make_causal_mask(tokens)
    for block in self.blocks:
      x = block(x, mask)
    return self.head(self.ln(x))


class RunResult(NamedTuple):
  name: str
  losses: list
  val_loss: float
  memory: offload.MemoryReport
  step_times: list

  @property
  def state_bytes(self) -> int:
    return self.memory.total

  @property
  def host_bytes(self) -> int:
    return self.memory.by_kind.get(offload.HOST, 0)

  @property
  def num_params(self) -> int:
    return self.memory.num_params


def batches(data: np.ndarray, steps: int, batch: int, seq_len: int, seed: int):
  rng = np.random.default_rng(seed)
  starts = rng.integers(0, len(data) - seq_len - 1, size=(steps, batch))
  idx = starts[..., None] + np.arange(seq_len + 1)
  return data[idx]  # (steps, batch, seq_len + 1)


def _loss_fn(model, tokens):
  logits = model(tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


class _Progress:
  """A one-line progress bar on a terminal, periodic lines otherwise."""

  def __init__(self, total: int, label: str, stream=sys.stderr):
    self.total, self.label, self.stream = total, label, stream
    self.tty = stream.isatty()
    self.start = time.perf_counter()

  def update(self, i: int, loss: float):
    done = i + 1
    if not self.tty and done % max(1, self.total // 5) and done != self.total:
      return
    width = 30
    filled = int(width * done / self.total)
    rate = done / max(time.perf_counter() - self.start, 1e-9)
    line = (
        f"{self.label:>12} [{'#' * filled}{'.' * (width - filled)}] "
        f"{done}/{self.total} loss {loss:.3f} {rate:.1f} it/s"
    )
    self.stream.write(("\r" + line) if self.tty else line + "\n")
    if self.tty and done == self.total:
      self.stream.write("\n")
    self.stream.flush()


def train_one(name, args, train_tokens, val_tokens, lr) -> RunResult:
  d, layers, heads, seq_len, batch = MODEL_SIZES[args.model]
  model = CharLM(d, layers, heads, seq_len, rngs=nnx.Rngs(args.seed))
  # A warm-up of a tenth of the steps (at least one), then cosine decay over
  # the rest (at least one step, so that --steps 1 works too).
  warmup = max(1, args.steps // 10)
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(args.steps, warmup + 1), lr * 0.1)
  kwargs = {}
  if name.endswith("_8bit") and getattr(args, "backend", "auto") != "auto":
    kwargs["backend"] = args.backend
  if name.startswith("paged_"):
    kwargs["policy"] = offload.OffloadPolicy(min_size=DEMO_PAGE_MIN_SIZE)
  tx = registry.create(name, schedule, **kwargs)
  if name.startswith("paged_") and jax.device_count() == 1:
    # Paged state is committed to its device; commit the parameters first
    # (init takes their placement) so that the step compiles once.
    nnx.update(model, jax.device_put(nnx.state(model), jax.devices()[0]))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  if name.startswith("paged_") and jax.device_count() == 1:
    optimizer.step[...] = jax.device_put(optimizer.step[...], jax.devices()[0])

  @nnx.jit
  def train_step(model, optimizer, tokens):
    loss, grads = nnx.value_and_grad(_loss_fn)(model, tokens)
    optimizer.update(model, grads)
    return loss

  @nnx.jit
  def eval_loss(model, tokens):
    return _loss_fn(model, tokens)

  losses, times = [], []
  progress = _Progress(args.steps, name)
  for i, tokens in enumerate(train_tokens):
    t0 = time.perf_counter()
    loss = float(train_step(model, optimizer, jnp.asarray(tokens)))
    times.append(time.perf_counter() - t0)
    if not math.isfinite(loss):
      raise FloatingPointError(f"{name}: loss became {loss} at step {i}")
    losses.append(loss)
    progress.update(i, loss)
  val = float(np.mean([float(eval_loss(model, jnp.asarray(v))) for v in val_tokens]))
  opt_state = nnx.state(optimizer, nnx.optimizer.OptState)
  params = nnx.state(model, nnx.Param)
  return RunResult(name, losses, val, offload.memory_report(opt_state, params), times)


def format_table(results) -> str:
  header = ("optimizer", "final train loss", "val loss", "state bytes", "on host", "bytes/param",
            "median step ms")
  rows = []
  for r in results:
    tail = r.losses[-min(10, len(r.losses)):]
    rows.append((
        r.name,
        f"{np.mean(tail):.4f}",
        f"{r.val_loss:.4f}",
        f"{r.state_bytes:,}",
        f"{r.host_bytes:,}",
        f"{r.state_bytes / r.num_params:.3f}",
        f"{1e3 * np.median(r.step_times[1:] or r.step_times):.1f}",
    ))
  widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
  line = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths))
  sep = "-+-".join("-" * w for w in widths)
  return "\n".join([line(header), sep] + [line(r) for r in rows])


def plot(results, path: pathlib.Path, title: str) -> pathlib.Path | None:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2, 1]})
  for r in results:
    losses = np.asarray(r.losses)
    k = max(1, len(losses) // 50)
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
    ax1.plot(np.arange(len(smooth)) + k, smooth, label=r.name)
  ax1.set_xlabel("step")
  ax1.set_ylabel("training loss (nats/byte)")
  ax1.set_title(title)
  ax1.legend()
  ax1.grid(alpha=0.3)
  names = [r.name for r in results]
  device_mb = np.array([(r.state_bytes - r.host_bytes) / 2**20 for r in results])
  host_mb = np.array([r.host_bytes / 2**20 for r in results])
  ax2.bar(names, device_mb, color="C0", label="device memory")
  bars = ax2.bar(names, host_mb, bottom=device_mb, color="C1", label="pinned host memory")
  for bar, r, top in zip(bars, results, device_mb + host_mb):
    ax2.annotate(f"{r.state_bytes / r.num_params:.2f} B/param",
                 (bar.get_x() + bar.get_width() / 2, top), ha="center", va="bottom", fontsize=8)
  ax2.set_ylim(0, 1.45 * float(np.max(device_mb + host_mb)))  # room for the legend
  ax2.set_ylabel("optimizer state (MiB)")
  ax2.set_title("state memory by memory kind")
  ax2.legend(fontsize=8, loc="upper left")
  ax2.tick_params(axis="x", rotation=20)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def build_parser(prog="optax-paged demo") -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog=prog,
      description="Train a character-level transformer LM once per optimizer "
      "and compare loss, optimizer-state memory and step time.",
  )
  p.add_argument("--steps", type=_positive_int, default=300, help="training steps per optimizer (default 300)")
  p.add_argument("--model", choices=sorted(MODEL_SIZES), default="small", help="model size (default small)")
  p.add_argument(
      "--optimizers", type=_optimizer_list, default=list(DEFAULT_OPTIMIZERS),
      help=f"comma-separated optimizer names (default {','.join(DEFAULT_OPTIMIZERS)}); "
      f"accepted: {', '.join(registry.names())}",
  )
  p.add_argument("--lr", type=_positive_float, default=3e-3, help="peak learning rate (default 3e-3)")
  p.add_argument("--out", default="demo_output", help="output folder for the PNG (default ./demo_output)")
  p.add_argument("--text", default=None, help="train on this text file instead of the built-in corpus")
  p.add_argument("--seed", type=_non_negative_int, default=0)
  p.add_argument("--backend", choices=("auto", "pallas", "native", "xla"), default="auto",
                 help="8-bit update implementation (default auto: Pallas on one GPU/TPU, the "
                 "native kernel on one CPU, XLA elsewhere; pallas on CPU runs the kernels in "
                 "interpret mode, slowly)")
  return p


def _positive_int(s):
  try:
    v = int(s)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
  if v <= 0:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
  return v


def _non_negative_int(s):
  try:
    v = int(s)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {s!r}") from None
  if v < 0:
    raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {s!r}")
  return v


def _positive_float(s):
  try:
    v = float(s)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
  if not (v > 0 and math.isfinite(v)):
    raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}")
  return v


def _optimizer_list(s):
  names = [n.strip() for n in s.split(",") if n.strip()]
  if not names:
    raise argparse.ArgumentTypeError("expected at least one optimizer name")
  unknown = [n for n in names if n not in registry.OPTIMIZERS]
  if unknown:
    raise argparse.ArgumentTypeError(
        f"unknown optimizer(s) {', '.join(unknown)}; accepted: {', '.join(registry.names())}"
    )
  return names


def _error(message: str) -> int:
  print(f"error: {message}", file=sys.stderr)
  return 2


def run(args) -> int:
  _, _, _, seq_len, batch = MODEL_SIZES[args.model]
  try:
    text, source = load_corpus(args.text)
  except OSError as e:
    return _error(f"cannot read --text {args.text}: {e.strerror or e}")
  data = np.frombuffer(text, dtype=np.uint8)
  split = int(len(data) * 0.9)
  # Each split (the last 10% validates) needs at least one window of
  # seq_len + 1 bytes beyond its start.
  if min(split, len(data) - split) < seq_len + 2:
    need = 10 * (seq_len + 2)
    return _error(f"the text has {len(text)} bytes, too short for --model {args.model} "
                  f"(needs at least {need})")
  out = pathlib.Path(args.out)
  try:  # before training, so that a bad folder fails at once
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    return _error(f"cannot create --out folder {args.out}: {e.strerror or e}")
  train_tokens = batches(data[:split], args.steps, batch, seq_len, args.seed)
  val_tokens = batches(data[split:], 8, batch, seq_len, args.seed + 1)
  print(
      f"optax-paged demo: {args.model} char-level transformer, {args.steps} steps, "
      f"batch {batch}x{seq_len} bytes, on {source} ({len(text) / 1e3:.0f} kB); "
      f"JAX {jax.__version__} on {jax.devices()[0].platform}",
      flush=True,
  )
  results = [train_one(name, args, train_tokens, val_tokens, args.lr) for name in args.optimizers]
  print()
  print(f"model parameters: {results[0].num_params:,}")
  print(format_table(results))
  png = plot(results, out / "demo.png", f"{args.model} char LM, {args.steps} steps")
  if png is None:
    print("matplotlib is not installed: no PNG (pip install 'optax-paged[demo]').")
  else:
    print(f"wrote {png.resolve()}")
  return 0


def main(argv=None, prog="optax-paged demo") -> int:
  args = build_parser(prog).parse_args(argv)
  try:  # OPTAX_PAGED_BACKEND, read for backend="auto"
    backend_lib.check_backend("auto")
  except ValueError as e:
    return _error(str(e))
  return run(args)
