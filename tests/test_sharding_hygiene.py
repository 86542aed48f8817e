"""Every task's compiled train step (and its evaluation) on a mixed data=2 x fsdp=2 x tensor=2 mesh of 8 simulated
CPU devices compiles without XLA's "Involuntary full rematerialization" warning (the SPMD partitioner replicating
an activation it cannot reshard: needless all-gathers and memory on a pod). The token-embedding gather used to
cause it (8 warnings for BLaIR, 4 for CIR) before `layers.Embed` gathered its table over the embed axis."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

REPO = pathlib.Path(__file__).resolve().parents[1]
# (config file, arg, run the end-of-training evaluation too)
TASKS = [("blair_base", "smoke", True), ("blair_clip", "smoke", True), ("cir_cirr", "smoke", True),
         ("uniir_clip_sf", "smoke", False), ("uniir_blip_ff", "smoke", False), ("bagformer_muge", "smoke", True),
         ("mblip_mt0", "instruct,smoke", True)]
SCRIPT = textwrap.dedent("""
    import importlib, pathlib, sys
    sys.path.insert(0, {configs!r})
    from mmret_jax.train import loop
    for name, arg, evaluate in {tasks!r}:
      c = importlib.import_module(name).get_config(arg)
      with c.unlocked():
        c.total_steps, c.eval_every, c.log_every = 1, 0 if evaluate else -1, 1
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
        c.checkpoint["async"] = False
      print("TASK", name, file=sys.stderr, flush=True)
      loop.train_and_evaluate(c, pathlib.Path({tmp!r}) / name)
""")


def test_no_involuntary_rematerialization_on_the_mixed_mesh(tmp_path):
  script = SCRIPT.format(configs=str(REPO / "configs"), tasks=TASKS, tmp=str(tmp_path))
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO, timeout=1200)
  assert r.returncode == 0, r.stderr[-4000:]
  assert r.stderr.count("TASK ") == len(TASKS)
  offenders, task = {}, None
  for line in r.stderr.splitlines():
    if line.startswith("TASK "):
      task = line.split()[1]
    elif "Involuntary full rematerialization" in line:
      offenders.setdefault(task, []).append(line.split("HLO operation", 1)[-1][:160])
  assert not offenders, offenders
