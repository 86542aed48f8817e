"""The training entry point's XLA:CPU defaults: applied once, only on measured jaxlib versions,
never over the user's own choice; and a fresh `mmret_jax.main` process really runs with them."""

import importlib.metadata
import os
import subprocess
import sys

from mmret_jax import xla_cpu


def test_apply_cpu_defaults_respects_the_user(monkeypatch):
  monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.10.2")
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert xla_cpu.apply_cpu_defaults(env)
  assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8 " + xla_cpu.TUNED_XLA_CPU_FLAGS
  assert not xla_cpu.apply_cpu_defaults(env)  # idempotent
  assert env["XLA_FLAGS"].count("ynn_fusion_type") == 1
  mine = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=-dot"}
  assert not xla_cpu.apply_cpu_defaults(mine) and mine["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=-dot"
  off = {"MMRET_XLA_CPU_DEFAULTS": "0"}
  assert not xla_cpu.apply_cpu_defaults(off) and "XLA_FLAGS" not in off
  empty = {}
  assert xla_cpu.apply_cpu_defaults(empty) and empty["XLA_FLAGS"] == xla_cpu.TUNED_XLA_CPU_FLAGS
  monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.12.0")  # not measured: untouched
  other = {}
  assert not xla_cpu.apply_cpu_defaults(other) and other == {}


def test_main_process_runs_with_the_flags():
  """Importing mmret_jax.main sets the flags before JAX starts, and XLA accepts them."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "MMRET_XLA_CPU_DEFAULTS")}
  code = ("import os, mmret_jax.main, jax, jax.numpy as jnp; "
          "print(repr(os.environ.get('XLA_FLAGS', ''))); print(float(jnp.ones((64, 64)).sum(0).sum()))")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                       timeout=120).stdout.splitlines()
  measured = importlib.metadata.version("jaxlib").startswith(xla_cpu.MEASURED_JAXLIB)
  assert (xla_cpu.TUNED_XLA_CPU_FLAGS in out[0]) == measured, out
  assert out[1] == "4096.0"
