"""Metric writers (console, metrics.jsonl, TensorBoard) and throughput / MFU helpers."""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any, Mapping

import jax

from mmret_jax import storage

# Dense bf16 peak FLOP/s per device, for the MFU estimate (override with config.peak_flops_per_device).
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L4": 121e12,
    "V100": 125e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def peak_flops_per_device(override: float = 0.0) -> float | None:
  if override:
    return float(override)
  kind = jax.devices()[0].device_kind
  for name, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if name.lower() in kind.lower():
      return flops
  return None  # CPU or unknown: no MFU


def compiled_flops(compiled) -> float | None:
  """FLOPs of one call of an AOT-compiled function, per device (XLA cost analysis)."""
  try:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
      ca = ca[0]
    return float(ca.get("flops", 0.0)) or None
  except Exception:  # pylint: disable=broad-except  # not every backend reports costs
    return None


def compiled_memory(compiled) -> dict[str, float]:
  """Per-device memory of an AOT-compiled function from XLA's memory analysis: {"memory/temp_bytes" (scratch:
  activations, gradients in flight), "memory/argument_bytes", "memory/output_bytes", "memory/alias_bytes"
  (outputs donated into arguments), "memory/peak_bytes" (temp + arguments + outputs - aliased)}; {} when the
  backend reports none."""
  try:
    ma = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend reports memory
    return {}
  if ma is None:
    return {}
  if isinstance(ma, (list, tuple)):
    ma = ma[0]
  get = lambda name: float(getattr(ma, name, 0) or 0)
  out = {"memory/temp_bytes": get("temp_size_in_bytes"), "memory/argument_bytes": get("argument_size_in_bytes"),
         "memory/output_bytes": get("output_size_in_bytes"), "memory/alias_bytes": get("alias_size_in_bytes")}
  out["memory/peak_bytes"] = (out["memory/temp_bytes"] + out["memory/argument_bytes"] + out["memory/output_bytes"]
                              - out["memory/alias_bytes"])
  return out


class MetricWriter:
  """Writes scalars to the console, `metrics.jsonl` and TensorBoard event files (process 0 only).

  With a remote workdir (gs://...) both files are written locally and uploaded after every write.
  A run that starts at `start_step` (resumed from that checkpoint, or 0) first drops the rows of
  `metrics.jsonl` logged after it by an earlier attempt (so no step appears twice) and tells
  TensorBoard to hide that attempt's later events (`purge_step`)."""

  def __init__(self, workdir: str | pathlib.Path, enabled: bool = True, console=None, start_step: int = 0):
    self.enabled = enabled
    self.console = console or (lambda s: print(s, file=sys.stderr))
    self._tb = self._mirror = None
    if enabled:
      self._mirror = storage.Mirror(workdir, download=("metrics.jsonl",))  # appended to on resume
      dropped = truncate_metrics(self._mirror.local / "metrics.jsonl", start_step)
      if dropped:
        self.console(f"metrics.jsonl: dropped {dropped} rows logged after step {start_step} by an "
                     "earlier attempt")
      tb_dir = self._mirror.local / "tensorboard"
      earlier = tb_dir.is_dir() and any(tb_dir.iterdir())
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        self._tb = SummaryWriter(str(tb_dir), purge_step=start_step + 1 if earlier else None)
      except ImportError:
        self.console("note: tensorboardX not installed; TensorBoard events are not written")

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items() if v is not None}
    with open(self._mirror.local / "metrics.jsonl", "a", encoding="utf-8") as f:
      f.write(json.dumps({"step": step, **clean}) + "\n")
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(k, v, step)
      self._tb.flush()
    self._mirror.sync()
    self.console(f"step {step}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in clean.items()))

  def close(self):
    if self._tb is not None:
      self._tb.close()
    if self._mirror is not None:
      self._mirror.close()


def _fmt(v: float) -> str:
  return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"


def truncate_metrics(path: pathlib.Path, step: int) -> int:
  """Drops the rows of a metrics.jsonl whose step is > `step` (and unreadable lines, e.g. one cut
  short by a crash); returns how many went."""
  if not path.exists():
    return 0
  keep, dropped = [], 0
  for line in path.read_text(encoding="utf-8").splitlines():
    try:
      row_step = int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
      row_step = None
    if row_step is None or row_step > step:
      dropped += bool(line.strip())
    else:
      keep.append(line)
  if dropped:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(l + "\n" for l in keep), encoding="utf-8")
    tmp.replace(path)
  return dropped


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
  """All rows of `metrics.jsonl` (tests, notebooks)."""
  path = storage.as_path(workdir) / "metrics.jsonl"
  return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
