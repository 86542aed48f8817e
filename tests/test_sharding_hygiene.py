"""Sharding hygiene of every task's compiled train step (and its evaluation) on 8 simulated CPU devices.

1. On a mixed data=2 x fsdp=2 x tensor=2 mesh, training one step and running the end-of-training evaluation
   (UniIR's included: the whole mini M-BEIR pipeline, whose encoder steps compile on the same mesh) compiles
   without XLA's "Involuntary full rematerialization" warning (the SPMD partitioner replicating an activation it
   cannot reshard: needless all-gathers and memory on a pod). The token-embedding gather used to cause it
   (8 warnings for BLaIR, 4 for CIR, 2 for UniIR CLIP-SF) before `layers.Embed` gathered its table over the embed
   axis. It runs without the persistent XLA cache: an executable loaded from it is not compiled, so it could not
   warn. The same run checks that the train state keeps its sharding through the step (as in 2) and that XLA's
   per-device argument bytes are what the state's and batch's shards predict (within 10%).
2. FSDP keeps the state sharded: on a data=1 x fsdp=8 mesh (the BLaIR smoke step) every param, optimizer and
   task state leaf that enters the compiled step sharded leaves it with an equivalent sharding
   (`compiled.input_shardings` against `compiled.output_shardings` and the returned arrays' `.sharding`), every
   optimizer-state leaf is sharded as the param it belongs to, nearly all of the state's bytes are sharded over
   fsdp, and XLA's per-device argument and output bytes of the compiled step (`metrics.compiled_memory`) are
   < 0.25 x those of the data=8 (replicated state) step, within 10% of the ratio the shardings predict.

Not checked: the compiled HLO's all-gathers themselves. FSDP gathers each weight (some 1-4 times: forward,
backward, small vectors re-gathered) and an all-gather's operand is a parameter, bitcast, copy or fusion of it,
so a gathered optimizer-state tensor cannot be told apart from a gathered weight by the HLO text robustly; a
replicated optimizer state shows up in the argument / output bytes and sharding checks instead.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from fixtures import simulated_devices  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
# (config file, arg, run the end-of-training evaluation too)
TASKS = [("blair_base", "smoke", True), ("blair_clip", "smoke", True), ("cir_cirr", "smoke", True),
         ("uniir_clip_sf", "smoke", True), ("uniir_blip_ff", "smoke", True), ("bagformer_muge", "smoke", True),
         ("mblip_mt0", "instruct,smoke", True), ("seqrec_unisrec", "smoke", True)]
MIXED = (2, 2, 2)  # data, fsdp, tensor
FSDP_TASKS = [("blair_base", "smoke")]  # each task adds two compiled steps (~30 s on 2 cores)


def _run_child(*args, compile_cache: bool = True) -> subprocess.CompletedProcess:
  """Runs `_child(*args)` of this module in a fresh process with 8 simulated CPU devices; `compile_cache=False`
  turns off the persistent XLA cache (conftest.py) that a warm run would load executables from, compiling
  nothing and so printing no compiler warning."""
  code = (f"import sys, json; sys.path[:0] = [{str(REPO / 'tests')!r}, {str(REPO / 'configs')!r}]; "
          f"import test_sharding_hygiene as t; t._child(*json.loads(sys.argv[1]))")
  env = {**os.environ, "XLA_FLAGS": simulated_devices(8)}
  if not compile_cache:
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
  return subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, env=env,
                        cwd=REPO, timeout=1200)


def _child(runs, workdir):
  """In the 8-device process: for each (config, arg, mesh, evaluate) trains one step via `loop.train_and_evaluate`
  (with the evaluation when asked) and prints `REPORT <json>` (`_report` of the step it compiled) to stdout."""
  import importlib  # pylint: disable=import-outside-toplevel
  from mmret_jax.train import loop, metrics  # pylint: disable=import-outside-toplevel
  compiled = []
  memory = metrics.compiled_memory

  def keep(c):  # the loop hands every compiled train step to compiled_memory
    compiled.append(c)
    return memory(c)
  metrics.compiled_memory = keep
  for name, arg, mesh, evaluate in runs:
    c = importlib.import_module(name).get_config(arg)
    with c.unlocked():
      c.total_steps, c.eval_every, c.log_every = 1, 0 if evaluate else -1, 1
      c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
      c.checkpoint.async_save = False
    print("TASK", name, file=sys.stderr, flush=True)
    del compiled[:]
    result = loop.train_and_evaluate(c, pathlib.Path(workdir) / f"{name}-{'x'.join(map(str, mesh))}")
    assert len(compiled) == 1, f"{name}: {len(compiled)} compiled train steps"
    print("REPORT", json.dumps({"task": name, "mesh": mesh, **_report(compiled[0], result.state),
                                **memory(compiled[0])}), flush=True)


def _report(compiled, state) -> dict:
  """How the train state's leaves are sharded entering and leaving the compiled step:
  `leaves`, `sharded` (entering not fully replicated), `bytes` / `sharded_bytes` (global) and `device_bytes` (per
  device, of the state's shards, and `batch_device_bytes` of the batch's); `changed`: leaves whose output sharding
  (compiled or of the returned array) is not equivalent to their input one; `opt_leaves`: optimizer-state leaves
  of a param's path and shape, `opt_unlike_param`: those not sharded as their param."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  flat = lambda tree: jax.tree_util.tree_flatten_with_path(tree)[0]
  args_in, _ = compiled.input_shardings
  ins, outs = flat(args_in[0]), flat(compiled.output_shardings[0])
  arrays = flat(state)
  assert [p for p, _ in ins] == [p for p, _ in outs] == [p for p, _ in arrays], "state trees differ"
  out = {"leaves": len(ins), "sharded": 0, "bytes": 0, "sharded_bytes": 0, "device_bytes": 0, "changed": [],
         "opt_leaves": 0, "opt_unlike_param": []}
  for (path, si), (_, so), (_, x) in zip(ins, outs, arrays):
    nbytes = int(np.prod(x.shape)) * x.dtype.itemsize
    out["bytes"] += nbytes
    out["device_bytes"] += int(np.prod(si.shard_shape(x.shape))) * x.dtype.itemsize
    if not si.is_fully_replicated:
      out["sharded"] += 1
      out["sharded_bytes"] += nbytes
    if not (so.is_equivalent_to(si, x.ndim) and x.sharding.is_equivalent_to(si, x.ndim)):
      out["changed"].append(f"{jax.tree_util.keystr(path)}: {si.spec} -> {so.spec} / {x.sharding.spec}")
  keys = lambda path: tuple(str(k) for k in path)
  params = {keys(p[1:]): (x.shape, si) for (p, si), (_, x) in zip(ins, arrays) if keys(p[:1]) == (".params",)}
  for (path, si), (_, x) in zip(ins, arrays):
    if keys(path[:1]) != (".opt_state",):
      continue
    match = next((params[keys(path[k:])] for k in range(len(path)) if keys(path[k:]) in params), None)
    if match is None or match[0] != x.shape:
      continue
    out["opt_leaves"] += 1
    if not si.is_equivalent_to(match[1], x.ndim):
      out["opt_unlike_param"].append(f"{jax.tree_util.keystr(path)}: {si.spec}, its param {match[1].spec}")
  # batch leaves by path: jit drops the batch entries the step does not use (no sharding, not an argument)
  batch = dict(flat(args_in[1]))
  out["batch_device_bytes"] = sum(int(np.prod(batch[p].shard_shape(a.shape))) * a.dtype.itemsize
                                  for p, a in flat(compiled.args_info[0][1]) if p in batch)
  return out


def _reports(stdout: str) -> list[dict]:
  return [json.loads(line.split(" ", 1)[1]) for line in stdout.splitlines() if line.startswith("REPORT ")]


def _check_state_kept(report: dict) -> None:
  task = f"{report['task']} on {report['mesh']}"
  assert report["sharded"] > 0 and report["sharded_bytes"] > 0, f"{task}: no state leaf is sharded"
  assert not report["changed"], (task, report["changed"][:8])
  assert report["opt_leaves"] > 0, f"{task}: no optimizer-state leaf matched to a param"
  assert not report["opt_unlike_param"], (task, report["opt_unlike_param"][:8])
  # XLA's per-device argument bytes are those of the state's and the batch's shards (nothing gathered whole)
  predicted = report["device_bytes"] + report["batch_device_bytes"]
  assert abs(report["memory/argument_bytes"] / predicted - 1) < 0.1, (task, report["memory/argument_bytes"], predicted)


def test_mixed_mesh_no_involuntary_rematerialization_and_state_keeps_its_sharding(tmp_path):
  r = _run_child([(name, arg, MIXED, evaluate) for name, arg, evaluate in TASKS], str(tmp_path), compile_cache=False)
  assert r.returncode == 0, r.stderr[-4000:]
  assert r.stderr.count("TASK ") == len(TASKS)
  offenders, task = {}, None
  for line in r.stderr.splitlines():
    if line.startswith("TASK "):
      task = line.split()[1]
    elif "Involuntary full rematerialization" in line:
      offenders.setdefault(task, []).append(line.split("HLO operation", 1)[-1][:160])
  assert not offenders, offenders
  reports = _reports(r.stdout)
  assert [x["task"] for x in reports] == [name for name, _, _ in TASKS]
  for report in reports:
    _check_state_kept(report)
  # the evaluation ran (UniIR's M-BEIR pipeline wrote its table)
  for name, _, evaluate in TASKS:
    if name.startswith("uniir") and evaluate:
      assert list((tmp_path / f"{name}-2x2x2").glob("mbeir_eval/**/*.tsv")), f"{name}: no M-BEIR results"


def test_fsdp_keeps_params_and_optimizer_state_sharded(tmp_path):
  runs = [(name, arg, mesh, False) for name, arg in FSDP_TASKS for mesh in ((8, 1, 1), (1, 8, 1))]
  r = _run_child(runs, str(tmp_path))
  assert r.returncode == 0, r.stderr[-4000:]
  reports = {(x["task"], tuple(x["mesh"])): x for x in _reports(r.stdout)}
  assert len(reports) == len(runs)
  for name, _ in FSDP_TASKS:
    dp, fsdp = reports[name, (8, 1, 1)], reports[name, (1, 8, 1)]
    assert dp["sharded"] == 0 and dp["device_bytes"] == dp["bytes"], f"{name}: data=8 should replicate the state"
    _check_state_kept(fsdp)
    assert fsdp["bytes"] == dp["bytes"]
    assert fsdp["sharded_bytes"] >= 0.95 * fsdp["bytes"], (name, fsdp["sharded_bytes"], fsdp["bytes"])
    assert fsdp["device_bytes"] < 0.2 * dp["device_bytes"], (name, fsdp["device_bytes"], dp["device_bytes"])
    # XLA's own per-device figures: the state is most of the step's arguments, and comes back as sharded
    predicted = (fsdp["device_bytes"] + fsdp["batch_device_bytes"]) / (dp["device_bytes"] + dp["batch_device_bytes"])
    for key in ("memory/argument_bytes", "memory/output_bytes"):
      ratio = fsdp[key] / dp[key]
      assert ratio < 0.25, (name, key, fsdp[key], dp[key])
    ratio = fsdp["memory/argument_bytes"] / dp["memory/argument_bytes"]
    assert abs(ratio / predicted - 1) < 0.1, (name, ratio, predicted)
