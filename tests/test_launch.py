"""Launch scripts parse (`bash -n`), run mmret_jax.main, and keep #SBATCH where sbatch reads it."""

import pathlib
import shutil
import subprocess

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "launch"
SCRIPTS = ["slurm_gpu.sh", "tpu_pod.sh"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("name", SCRIPTS)
def test_bash_syntax(name):
  proc = subprocess.run(["bash", "-n", str(LAUNCH / name)], capture_output=True, text=True,
                        check=False)
  assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_runs_main_entry_point(name):
  text = (LAUNCH / name).read_text()
  assert text.startswith("#!/usr/bin/env bash\n")
  assert "python -m mmret_jax.main" in text
  assert '--workdir=' in text and "--config=" in text


def test_sbatch_directives_precede_commands():
  """sbatch stops reading #SBATCH at the first line that is not a comment or blank."""
  lines = (LAUNCH / "slurm_gpu.sh").read_text().splitlines()
  first_cmd = next(i for i, l in enumerate(lines) if l.strip() and not l.lstrip().startswith("#"))
  sbatch = [i for i, l in enumerate(lines) if l.startswith("#SBATCH")]
  assert sbatch and max(sbatch) < first_cmd
