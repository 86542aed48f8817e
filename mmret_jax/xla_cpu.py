"""XLA:CPU flags that the training entry point applies by default (before any JAX backend starts).

jax/jaxlib 0.10 send dots and reductions on CPU to YNNPACK. For our train steps two choices were
faster (benchmarks/train_step.py, roberta-base BLaIR step, 2-core EPYC: ~10% less time per step,
see benchmarks/RESULTS.md):
  -reduce:         reductions by XLA's own emitter (YNNPACK's column sum over [tokens, vocab], the
                   MLM bias gradient, took seconds);
  -individual_dot: plain dots by XLA's Eigen runtime.
Same math, kernel choice only. Applied only to the jaxlib versions they were measured on (an unknown
flag is fatal to XLA); a user's own `--xla_cpu_experimental_ynn_fusion_type` in XLA_FLAGS wins, and
MMRET_XLA_CPU_DEFAULTS=0 turns this off.
"""

from __future__ import annotations

import importlib.metadata
import os

TUNED_XLA_CPU_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=-reduce,-individual_dot"
MEASURED_JAXLIB = ("0.10.",)


def apply_cpu_defaults(env=None) -> bool:
  """Appends TUNED_XLA_CPU_FLAGS to XLA_FLAGS in `env` (default os.environ); True if it did."""
  env = os.environ if env is None else env
  flags = env.get("XLA_FLAGS", "")
  if env.get("MMRET_XLA_CPU_DEFAULTS", "1") == "0" or "xla_cpu_experimental_ynn_fusion_type" in flags:
    return False
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return False
  if not version.startswith(MEASURED_JAXLIB):
    return False
  env["XLA_FLAGS"] = f"{flags} {TUNED_XLA_CPU_FLAGS}".strip()
  return True
