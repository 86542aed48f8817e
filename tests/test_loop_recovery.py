"""The loop recovers from damaged checkpoints, records its config, leaves no stray workdir, and
`mmret_jax.main` speaks in one-line errors and meaningful exit statuses."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from mmret_jax import cli
from mmret_jax.train import loop
from mmret_jax.train.metrics import read_metrics

from fixtures import assert_params_equal
from test_train_blair import losses_of, tiny_config, write_pairs

REPO = pathlib.Path(__file__).resolve().parents[1]
TESTS = pathlib.Path(__file__).resolve().parent


def corrupt(step_dir: pathlib.Path, what: str = "array file") -> pathlib.Path:
  """Truncates a file of a checkpoint step, as a full disk or a killed copy does: the largest array
  data file, or the OCDBT manifest (then even the array metadata does not read back)."""
  if what == "manifest":
    victim = step_dir / "state" / "manifest.ocdbt"
  else:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    victim = max(files, key=lambda p: p.stat().st_size)
  with open(victim, "r+b") as f:
    f.truncate(min(100, victim.stat().st_size // 2))
  return victim


def data_position(workdir, step: int) -> str:
  return (pathlib.Path(workdir) / "checkpoints" / str(step) / "data" / "process_0-of-1.json").read_text()


def assert_same_state(a, b):
  assert_params_equal(jax.device_get(a.params), jax.device_get(b.params))
  for x, y in zip(jax.tree.leaves(jax.device_get(a.opt_state)), jax.tree.leaves(jax.device_get(b.opt_state))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert int(a.step) == int(b.step)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 6-step run (checkpoints at 3 and 6)."""
  d = tmp_path_factory.mktemp("ref")
  data = write_pairs(d / "pairs.tsv")
  res = loop.train_and_evaluate(tiny_config(data), d / "w")
  return data, d / "w", res


def restore_warnings(err: str) -> list[str]:
  return [l for l in err.splitlines() if "cannot be restored" in l]


@pytest.mark.parametrize("what,reason", [("array file", "(OUT_OF_RANGE: Error reading"),
                                         ("manifest", "(its array metadata cannot be read)")])
def test_corrupt_newest_checkpoint_falls_back_and_matches_an_uninterrupted_run(reference, tmp_path, capsys,
                                                                               what, reason):
  data, ref_dir, ref = reference
  w = tmp_path / "w"
  shutil.copytree(ref_dir, w)  # a finished run whose newest checkpoint then got damaged
  corrupt(w / "checkpoints" / "6", what)
  capsys.readouterr()
  res = loop.train_and_evaluate(tiny_config(data), w)
  err = capsys.readouterr().err
  [warning] = restore_warnings(err)
  assert warning.startswith(f"warning: checkpoint at step 6 cannot be restored {reason}")
  assert warning.endswith(f"moved to {w.absolute()}/checkpoints/corrupt-6; trying step 3")
  assert "TensorStore details" not in err and "'driver'" not in err and "Traceback" not in err
  assert "never retrieved" not in err
  assert (w / "checkpoints" / "corrupt-6" / "state").is_dir()  # kept, not deleted
  assert_same_state(res.state, ref.state)
  assert data_position(w, 6) == data_position(ref_dir, 6)
  assert losses_of(w) == losses_of(ref_dir)  # steps 4-6 logged once, with the same values
  steps = [r["step"] for r in read_metrics(w) if "loss" in r]
  assert steps == [1, 2, 3, 4, 5, 6]
  assert (w / "model" / "mmret_jax.json").exists()
  # The same command again: step 6 is valid now; nothing to redo, nothing moved.
  again = loop.train_and_evaluate(tiny_config(data), w)
  assert not restore_warnings(capsys.readouterr().err) and int(again.state.step) == 6


def test_only_checkpoint_corrupt_restarts_exactly_as_a_fresh_workdir(reference, tmp_path, capsys):
  data, ref_dir, ref = reference
  w = tmp_path / "w"
  shutil.copytree(ref_dir, w)
  shutil.rmtree(w / "checkpoints" / "6")
  corrupt(w / "checkpoints" / "3")
  capsys.readouterr()
  res = loop.train_and_evaluate(tiny_config(data), w)
  [warning] = restore_warnings(capsys.readouterr().err)
  assert "no valid checkpoint left: starting from scratch, as in a fresh workdir" in warning
  assert_same_state(res.state, ref.state)  # same init, same data order, same numbers
  assert data_position(w, 6) == data_position(ref_dir, 6)
  assert losses_of(w) == losses_of(ref_dir)
  assert sorted(p.name for p in (w / "checkpoints").iterdir()) == ["3", "6", "corrupt-3"]


def test_checkpoint_of_another_model_is_an_error_not_damage(reference, tmp_path):
  data, ref_dir, _ = reference
  w = tmp_path / "w"
  shutil.copytree(ref_dir, w)
  with pytest.raises(loop.CheckpointMismatchError, match=r"different model or optimizer config: .*"
                     r"arrays of this config are not in it \(e.g\. .*logit_scale\).*config\.json"):
    loop.train_and_evaluate(tiny_config(data, **{"loss.learnable_temp": True}), w)
  assert sorted(p.name for p in (w / "checkpoints").iterdir()) == ["3", "6"]  # nothing moved


def test_config_is_recorded_and_result_changes_warned_on_resume(reference, tmp_path, capsys):
  data, ref_dir, _ = reference
  w = tmp_path / "w"
  shutil.copytree(ref_dir, w)
  recorded = json.loads((w / "config.json").read_text())
  assert recorded["total_steps"] == 6 and recorded["optim"]["learning_rate"] == tiny_config(data).optim.learning_rate
  shutil.rmtree(w / "checkpoints" / "6")
  capsys.readouterr()
  loop.train_and_evaluate(tiny_config(data, log_every=2, **{"optim.learning_rate": 0.5, "data.num_threads": 2}), w)
  [line] = [l for l in capsys.readouterr().err.splitlines() if "change the result" in l]
  assert line.startswith("warning: resuming with settings that change the result")
  assert "optim.learning_rate (0.001 -> 0.5)" in line
  assert "log_every" not in line and "num_threads" not in line
  assert json.loads((w / "config.json").read_text())["optim"]["learning_rate"] == 0.5


def test_changed_result_keys():
  old = {"seed": 1, "log_every": 5, "data": {"train_file": "a", "num_threads": 2}, "mesh": {"data": -1}}
  new = {"seed": 2, "log_every": 9, "data": {"train_file": "b", "num_threads": 8}, "mesh": {"data": 2}}
  assert loop.changed_result_keys(old, new) == ["data.train_file ('a' -> 'b')", "seed (1 -> 2)"]
  # keys added since the run began: at their off default they change nothing; set, they do
  added = {**old, "early_stopping": {"patience": 0, "export_best": False}, "eval_every_epochs": 0.0}
  assert loop.changed_result_keys(old, added) == []
  added["early_stopping"]["patience"] = 3
  assert loop.changed_result_keys(old, added) == ["early_stopping.patience ('<unset>' -> 3)"]


@pytest.mark.parametrize("what", ["missing data file", "bad mesh"])
def test_no_workdir_is_left_behind_by_a_setup_error(reference, tmp_path, what):
  data, ref_dir, _ = reference
  cfg = tiny_config(tmp_path / "nope.tsv") if what == "missing data file" else \
      tiny_config(data, **{"mesh.data": 3})
  with pytest.raises((FileNotFoundError, ValueError)):
    loop.train_and_evaluate(cfg, tmp_path / "w")
  assert not (tmp_path / "w").exists()
  # An existing workdir is never removed by an error.
  w = tmp_path / "existing"
  shutil.copytree(ref_dir, w)
  before = sorted(str(p.relative_to(w)) for p in w.rglob("*"))
  with pytest.raises((FileNotFoundError, ValueError)):
    loop.train_and_evaluate(cfg, w)
  assert sorted(str(p.relative_to(w)) for p in w.rglob("*")) == before


# ----------------------------------------------------------------------------- the CLI
def write_config(tmp_path, data, **over) -> pathlib.Path:
  """A config file (as users write them) returning the tiny test config."""
  path = tmp_path / "tiny_config.py"
  path.write_text(textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {str(TESTS)!r})
      from test_train_blair import tiny_config
      def get_config(arg=None):
        return tiny_config({str(data)!r}, **{over!r})
  """))
  return path


def run_main(*args, env=None, **kw):
  return subprocess.run([sys.executable, "-m", "mmret_jax.main", *args], capture_output=True, text=True,
                        cwd=REPO, env={**os.environ, **(env or {})}, **kw)


def test_main_errors_are_one_line_with_status_and_no_workdir(reference, tmp_path):
  data, _, _ = reference
  cfg = write_config(tmp_path, data)
  w = tmp_path / "w"
  r = run_main(f"--config={cfg}", f"--workdir={w}", "--config.totl_steps=5")
  assert r.returncode == 2 and r.stderr.splitlines() == [
      "error: unknown config key 'totl_steps' (in --config.totl_steps=5); did you mean total_steps? "
      "(`--print_config` lists the keys)"]
  r = run_main(f"--config={cfg}", f"--workdir={w}", "--config.optim.learnin_rate=1")
  assert r.returncode == 2 and "did you mean optim.learning_rate?" in r.stderr
  r = run_main(f"--config={cfg}", f"--workdir={w}", "--config.mesh.data=3")
  assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
  assert r.stderr.startswith("error: ") and "mesh" in r.stderr and "Traceback" not in r.stderr
  r = run_main(f"--config={cfg}", f"--workdir={w}", "--config.data.train_file=/no/such.tsv")
  assert r.returncode == 1 and r.stderr.startswith("error: ") and "/no/such.tsv" in r.stderr
  assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
  assert not w.exists()
  r = run_main(f"--config={cfg}", f"--workdir={w}", "--config.mesh.data=3", env={"MMRET_DEBUG": "1"})
  assert r.returncode != 0 and "Traceback" in r.stderr
  r = run_main(f"--config={cfg}", f"--workdir={w}", "--print_config", "--config.total_steps=7")
  assert r.returncode == 0 and "total_steps: 7" in r.stdout and "train_file: " + str(data) in r.stdout
  # checkpoint.async_save can be set on the command line (its former name `async`, a Python keyword, could not)
  r = run_main(f"--config={cfg}", f"--workdir={w}", "--print_config", "--config.checkpoint.async_save=False")
  assert r.returncode == 0 and "  async_save: false" in r.stdout, r.stdout + r.stderr
  assert not w.exists()
  r = run_main("--help", f"--config={cfg}")
  assert r.returncode == 0 and "  optim.learning_rate = 0.001" in r.stdout and "--print_config" in r.stdout
  r = run_main(f"--config={REPO}/configs/blair_base.py:smok")
  assert r.returncode == 2 and r.stderr.splitlines() == [
      f"error: cannot load config {REPO}/configs/blair_base.py:smok: Unknown config arg 'smok'; known: smoke"]


def test_main_sigterm_exit_status_then_corrupt_rerun_finishes(reference, tmp_path):
  """SIGTERM saves and exits 75; the newest checkpoint is then damaged; rerunning the same command
  warns once, resumes from the one before, and finishes with status 0, every step logged once."""
  data, _, _ = reference
  cfg = write_config(tmp_path, data, total_steps=400, checkpoint_every=5, log_every=1)
  w = tmp_path / "w"
  cmd = [sys.executable, "-m", "mmret_jax.main", f"--config={cfg}", f"--workdir={w}"]
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
  deadline = time.time() + 300
  for line in proc.stdout:  # wait until a checkpoint exists and training is under way
    if line.startswith("step 7:") or time.time() > deadline:
      break
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == cli.EXIT_INTERRUPTED, err[-2000:]
  assert "stop requested: saved step" in out and "rerun the same command to resume" in err
  saved = sorted(int(p.name) for p in (w / "checkpoints").iterdir())
  assert saved[-1] >= 7 and 5 in saved
  corrupt(w / "checkpoints" / str(saved[-1]))
  total = saved[-1] + 5  # finish sooner (the signal may land a few steps after step 7 on a busy machine)
  cfg = write_config(tmp_path, data, total_steps=total, checkpoint_every=5, log_every=1)
  r = run_main(f"--config={cfg}", f"--workdir={w}", timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  assert len(restore_warnings(r.stderr)) == 1
  assert "TensorStore details" not in r.stderr and "'driver'" not in r.stderr and "Traceback" not in r.stderr
  assert f"total_steps (400 -> {total})" in r.stderr  # a result-altering change, named
  steps = [row["step"] for row in read_metrics(w) if "loss" in row]
  assert steps == list(range(1, total + 1))
  assert json.loads((w / "config.json").read_text())["total_steps"] == total


def test_slurm_script_requeues_on_the_interrupted_status(tmp_path):
  """launch/slurm_gpu.sh with stand-ins for srun / scontrol: status 75 requeues the job, 0 does not."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/srun.args\nexit ${{FAKE_RC:-0}}\n")
  (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/scontrol.args\n")
  for f in bin_dir.iterdir():
    f.chmod(0o755)
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "activate").write_text("")
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "VENV": str(venv), "SLURM_JOB_ID": "4242",
         "SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_GPUS_ON_NODE": "1"}
  script = REPO / "launch" / "slurm_gpu.sh"
  r = subprocess.run(["bash", str(script)], env={**env, "FAKE_RC": "75"}, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
  assert "mmret_jax.main" in (tmp_path / "srun.args").read_text()
  (tmp_path / "scontrol.args").unlink()
  r = subprocess.run(["bash", str(script)], env={**env, "FAKE_RC": "0"}, capture_output=True, text=True)
  assert r.returncode == 0 and not (tmp_path / "scontrol.args").exists()
  r = subprocess.run(["bash", str(script)], env={**env, "FAKE_RC": "1"}, capture_output=True, text=True)
  assert r.returncode == 1 and not (tmp_path / "scontrol.args").exists()


def test_async_save_and_its_former_name():
  import ml_collections  # pylint: disable=import-outside-toplevel
  ck = lambda **kw: ml_collections.ConfigDict({"keep": 2, **kw})
  assert loop.async_saving(ck()) is True and loop.async_saving(ck(async_save=False)) is False
  assert loop.async_saving(ck(**{"async": False, "async_save": True})) is False  # set in Python by an older config


def test_late_restore_reads_are_not_logged_after_the_warning():
  """What an abandoned restore's pending reads report later through asyncio ("Task exception was never
  retrieved", a TensorStore error with its spec dump) is dropped; other asyncio records pass."""
  import logging  # pylint: disable=import-outside-toplevel
  f = loop._LateRestoreLogFilter()  # pylint: disable=protected-access
  err = ValueError("OUT_OF_RANGE: Error reading ...; See full TensorStore details: {'driver': 'zarr'}")
  late = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "Task exception was never retrieved", None,
                           (ValueError, err, None))
  other = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "Unclosed client session", None, None)
  assert f.filter(late) is False and f.filter(other) is True
