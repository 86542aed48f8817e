"""One error style across the command-line tools (`mmret_jax/cli.py`): `error: ...` on one line,
a non-zero exit status, no traceback unless MMRET_DEBUG=1."""

import os
import subprocess
import sys

import pytest

from mmret_jax import cli


def run_module(module, *args, env=None):
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                        env={**os.environ, **(env or {})})


def test_messages_are_one_line():
  assert cli.one_line("first\n\n  second  \nthird") == "first; second; third"
  assert cli.one_line("bad read. See full TensorStore details: {\n 'a': 1}") == "bad read."
  assert cli.one_line("OUT_OF_RANGE: no [source locations='a/b.cc:1\na/c.cc:2'] [tensorstore_spec='{}']") == \
      "OUT_OF_RANGE: no"
  assert len(cli.one_line("x" * 5000)) == 600
  assert cli.describe(KeyError("no such key")) == "no such key"
  assert cli.describe(FileNotFoundError(2, "No such file or directory", "/x/y")) == \
      "No such file or directory: /x/y"
  try:
    try:
      raise ValueError("OUT_OF_RANGE: the real reason")
    except ValueError as inner:
      raise RuntimeError("wrapper") from inner
  except RuntimeError as outer:
    assert cli.describe(cli.root_cause(outer)) == "OUT_OF_RANGE: the real reason"


def test_close_matches():
  keys = ["total_steps", "stop_at_step", "optim.learning_rate", "optim.end_lr_factor", "mesh.data", "mesh"]
  assert cli.close_matches("totl_steps", keys) == ["total_steps"]
  assert cli.close_matches("optim.learnin_rate", keys) == ["optim.learning_rate"]
  assert cli.close_matches("learning_rate", keys) == ["optim.learning_rate"]
  assert cli.suggest("zzz", keys) == ""


def test_run_reports_user_and_internal_errors(capsys, monkeypatch):
  monkeypatch.delenv(cli.DEBUG_ENV, raising=False)

  def user_error():
    raise FileNotFoundError("input not found: a.tsv")

  def bug():
    return None + 1

  assert cli.run(user_error) == 1
  assert capsys.readouterr().err == "error: input not found: a.tsv\n"
  assert cli.run(bug) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: internal error (TypeError: ") and "MMRET_DEBUG=1" in err
  assert err.count("\n") == 1
  assert cli.run(lambda: 3) == 3
  monkeypatch.setenv(cli.DEBUG_ENV, "1")
  with pytest.raises(TypeError):
    cli.run(bug)


def test_embed_convert_demo_command_lines(tmp_path):
  r = run_module("mmret_jax.embed", "--model", str(tmp_path / "nope"), "--input", str(tmp_path / "t.txt"),
                 "--output", str(tmp_path / "o.npy"))
  assert r.returncode == 1 and r.stderr.splitlines() == [f"error: Input file not found: {tmp_path}/t.txt"]
  r = run_module("mmret_jax.embed", "--model", "m")
  assert r.returncode == 2 and len(r.stderr.splitlines()) == 1
  assert r.stderr.startswith("error: the following arguments are required: --output")
  r = run_module("mmret_jax.convert", "to-jax", str(tmp_path / "nope"), str(tmp_path / "out"))
  assert r.returncode == 1 and r.stderr.splitlines() == [f"error: Source not found: {tmp_path}/nope"]
  r = run_module("mmret_jax.convert", "to-jax", str(tmp_path / "nope"), str(tmp_path / "out"),
                 env={cli.DEBUG_ENV: "1"})
  assert r.returncode == 1 and "Traceback" in r.stderr
  r = run_module("mmret_jax.convert", "to-onnx", "a", "b")
  assert r.returncode == 2 and r.stderr.startswith("error: argument cmd: invalid choice: 'to-onnx'")
  r = run_module("mmret_jax.embed", "--help")
  assert r.returncode == 0 and "(default: 32)" in r.stdout
  r = run_module("mmret_jax.demo", "--workdir", str(tmp_path / "demo"))
  assert r.returncode == 0, r.stderr
  assert r.stdout.count("cos(query, item)") == 3
