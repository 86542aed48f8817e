"""Remote (gs://) workdirs and model dirs, on etils' mocked bucket filesystem (no network).

`etils.epath.testing.mock_epath` maps `gs://b/x` to the local path `gs:/b/x` under the current
directory. Orbax writes checkpoints to the URL itself through TensorStore, which the mock cannot
reach, so the test hands the checkpoint manager a local dir and checks it was asked for the URL."""

import pathlib

import jax
import numpy as np
import pytest
from etils.epath import testing as epath_testing

import mmret_jax
from mmret_jax import storage
from mmret_jax.train import loop
from mmret_jax.train.metrics import read_metrics
from test_train_blair import tiny_config, write_pairs

URL = "gs://bucket/runs/blair"


@pytest.fixture
def fake_bucket(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(storage, "CACHE_DIR", tmp_path / "cache")
  asked = []
  real = loop.ocp.CheckpointManager

  def manager(directory, **kw):  # Orbax's own gs:// support is not what this test covers
    if not storage.is_remote(directory):
      return real(directory, **kw)
    asked.append(str(directory))
    return real(tmp_path / "orbax_checkpoints", **kw)

  monkeypatch.setattr(loop.ocp, "CheckpointManager", manager)
  with epath_testing.mock_epath():
    yield tmp_path / "gs:" / "bucket" / "runs" / "blair", asked


def test_remote_workdir_trains_resumes_exports_and_embeds(tmp_path, fake_bucket):
  bucket_dir, asked = fake_bucket
  data = write_pairs(tmp_path / "pairs.tsv")
  local = loop.train_and_evaluate(tiny_config(data, eval_every=0), tmp_path / "local")

  loop.train_and_evaluate(tiny_config(data, stop_at_step=3, eval_every=0), URL)
  assert asked == [URL + "/checkpoints"]
  assert (bucket_dir / "tokenizer" / "tokenizer.json").exists()  # built on the first run, uploaded
  assert len(read_metrics(URL)) == 3 and list((bucket_dir / "tensorboard").glob("events.out.tfevents.*"))
  assert not (bucket_dir / "model").exists()

  resumed = loop.train_and_evaluate(tiny_config(data, eval_every=0), URL)  # tokenizer read back
  remote_losses = [r["loss"] for r in read_metrics(URL) if "loss" in r]
  assert remote_losses == [r["loss"] for r in read_metrics(tmp_path / "local") if "loss" in r]
  same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                      local.state.params, resumed.state.params)
  assert all(jax.tree.leaves(same))
  assert (bucket_dir / "model" / "tokenizer.json").exists()  # exported through a local stage

  text = ["my kettle from acme"]
  from_url = mmret_jax.load(URL)  # a remote training workdir: its model/ is downloaded and cached
  assert str(storage.CACHE_DIR) in from_url.path
  np.testing.assert_array_equal(from_url.encode_text(text), mmret_jax.load(tmp_path / "local").encode_text(text))


def test_local_copy_and_errors(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(storage, "CACHE_DIR", tmp_path / "cache")
  with epath_testing.mock_epath():
    with storage.staged_dir("gs://b/d") as stage:
      (stage / "sub").mkdir()
      (stage / "sub" / "x.txt").write_text("one")
      (stage / "y.bin").write_bytes(b"\x00\x01")
    assert (tmp_path / "gs:" / "b" / "d" / "sub" / "x.txt").read_text() == "one"
    got = storage.local_copy("gs://b/d")
    assert pathlib.Path(got).is_relative_to(tmp_path / "cache")
    assert (got / "sub" / "x.txt").read_text() == "one" and (got / "y.bin").read_bytes() == b"\x00\x01"
    (tmp_path / "gs:" / "b" / "d" / "y.bin").write_bytes(b"new")
    assert (storage.local_copy("gs://b/d") / "y.bin").read_bytes() == b"\x00\x01"  # cached
    assert (storage.local_copy("gs://b/d", refresh=True) / "y.bin").read_bytes() == b"new"
    with pytest.raises(FileNotFoundError, match="no such remote directory"):
      storage.local_copy("gs://b/missing")
    with pytest.raises(RuntimeError):  # a failed block uploads nothing
      with storage.staged_dir("gs://b/failed") as stage:
        (stage / "part.txt").write_text("half")
        raise RuntimeError("boom")
    assert not (tmp_path / "gs:" / "b" / "failed").exists()
  assert storage.local_copy(tmp_path) == tmp_path and not storage.is_remote(tmp_path)
