"""The embed CLI / API reproduce PyTorch reference embeddings on tiny HF dirs."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import mmret_jax
from mmret_jax import embed
from mmret_jax.convert.__main__ import main as convert_main

import fixtures

TEXTS = fixtures.CORPUS + ["", "short one", "Great kettle " * 40]


def _reference(model, tok, texts, pooling, max_length, normalize=True):
  b = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
  with torch.no_grad():
    h = model(**b).last_hidden_state
  if pooling == "cls":
    e = h[:, 0]
  else:
    m = b["attention_mask"][..., None].float()
    e = (h * m).sum(1) / m.sum(1)
  if normalize:
    e = e / e.norm(dim=1, keepdim=True)
  return e.numpy()


@pytest.fixture(scope="module", params=["roberta", "bert"])
def hf_dir(request, tmp_path_factory):
  d = tmp_path_factory.mktemp(f"hf_{request.param}")
  model, tok = fixtures.make_hf_dir(d, request.param, max_position_embeddings=80)
  return d, model, tok


def test_cli_matches_pytorch_both_poolings(hf_dir, tmp_path):
  d, model, tok = hf_dir
  conv = tmp_path / "conv"
  assert convert_main(["to-jax", str(d), str(conv)]) == 0
  inp = tmp_path / "texts.txt"
  inp.write_text("\n".join(TEXTS) + "\n")
  for pooling in ("cls", "mean"):
    out = tmp_path / f"{pooling}.npy"
    rc = embed.main(["--model", str(conv), "--input", str(inp), "--output", str(out),
                     "--pooling", pooling, "--max-length", "32", "--batch-size", "4"])
    assert rc == 0
    got = np.load(out)
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), model.config.hidden_size)
    np.testing.assert_allclose(got, _reference(model, tok, TEXTS, pooling, 32), atol=1e-5, rtol=0)


def test_api_on_hf_dir_default_max_length_and_raw(hf_dir):
  d, model, tok = hf_dir
  enc = mmret_jax.load(d)  # HF dir: converted in memory
  got = enc.encode_text(TEXTS, batch_size=3, normalize=False)
  want = _reference(model, tok, TEXTS, "cls", enc.max_positions, normalize=False)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert enc.num_truncated == 1  # only the repeated "Great kettle" text exceeds the limit
  # Order is kept whatever the batching.
  np.testing.assert_allclose(enc.encode_text(TEXTS[::-1], batch_size=5, normalize=False), want[::-1],
                             atol=1e-5, rtol=0)
  assert enc.encode_text([]).shape == (0, model.config.hidden_size)


def test_jsonl_field_and_subprocess(hf_dir, tmp_path):
  d, model, tok = hf_dir
  inp = tmp_path / "rows.jsonl"
  inp.write_text("\n".join(json.dumps({"id": i, "query": t}) for i, t in enumerate(TEXTS[:4])))
  out = tmp_path / "e.npy"
  r = subprocess.run([sys.executable, "-m", "mmret_jax.embed", "--model", str(d), "--input", str(inp),
                      "--field", "query", "--output", str(out), "--max-length", "64"],
                     capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  assert "converted in memory" in r.stderr
  np.testing.assert_allclose(np.load(out), _reference(model, tok, TEXTS[:4], "cls", 64), atol=1e-5, rtol=0)


def test_compiled_shapes_are_reused(hf_dir):
  d, _, _ = hf_dir
  enc = mmret_jax.load(d, verbose=False)
  texts = [f"text number {i} " * (i % 5 + 1) for i in range(50)]
  first = enc.encode_text(texts, batch_size=8, max_length=64)
  lengths = {k[1] for k in enc._executables}  # pylint: disable=protected-access
  need = {embed.round_length(len(ids), 64) for ids in enc.tokenize(texts, 64)}
  assert lengths and all(length % embed.LENGTH_STEP == 0 for length in lengths)
  assert len(lengths) <= len(need) and max(lengths) == max(need)
  enc._compile_s = 1e9  # pylint: disable=protected-access  # compiling is now never worth it
  again = enc.encode_text(texts[::-1], batch_size=8, max_length=64)
  assert {k[1] for k in enc._executables} == lengths  # pylint: disable=protected-access
  np.testing.assert_allclose(again, first[::-1], atol=1e-6, rtol=0)  # other batch mates, same vectors


def test_plan_lengths_trades_padding_for_compiles():
  """Costs: a batch run at length L costs L; a new length costs `compile_cost`."""
  need = {16: 10, 24: 1, 64: 5}
  assert embed.plan_lengths(need, compile_cost=0) == [16, 24, 64]
  assert embed.plan_lengths(need, compile_cost=1e9) == [64]
  # {16, 64}: 2 * 100 + 10 * 16 + 1 * 64 + 5 * 64 = 744 beats {16, 24, 64} (804) and {24, 64} (784)
  assert embed.plan_lengths(need, compile_cost=100) == [16, 64]
  # A compiled 32 is free: 24 runs at 32 (712 < 744).
  assert embed.plan_lengths(need, compiled=[32], compile_cost=100) == [16, 32, 64]
  assert embed.plan_lengths({}, compile_cost=5) == []
  assert embed.round_length(3, 512) == 8 and embed.round_length(17, 512) == 24
  assert embed.round_length(90, 100) == 96 and embed.round_length(99, 100) == 100


def test_bad_inputs(hf_dir, tmp_path, capsys):
  d, _, _ = hf_dir
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  out = str(tmp_path / "o.npy")
  assert embed.main(["--model", str(d), "--input", str(empty), "--output", out]) == 1
  assert "holds no texts" in capsys.readouterr().err
  txt = tmp_path / "t.txt"
  txt.write_text("hello\n")
  assert embed.main(["--model", str(tmp_path / "nope"), "--input", str(txt), "--output", out]) == 1
  assert "not found" in capsys.readouterr().err
  (tmp_path / "notamodel").mkdir()
  assert embed.main(["--model", str(tmp_path / "notamodel"), "--input", str(txt), "--output", out]) == 1
  assert "neither a converted" in capsys.readouterr().err
  other = tmp_path / "gpt2"
  other.mkdir()
  (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  assert embed.main(["--model", str(other), "--input", str(txt), "--output", out]) == 1
  assert "'gpt2' is not supported" in capsys.readouterr().err
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"q": "fine"}\n{broken\n')
  assert embed.main(["--model", str(d), "--input", str(bad), "--field", "q", "--output", out]) == 1
  assert "bad.jsonl:2" in capsys.readouterr().err
  assert embed.main(["--model", str(d), "--input", str(bad), "--output", out]) == 1
  assert "--field" in capsys.readouterr().err
  assert embed.main(["--model", str(d), "--input", str(txt), "--output", out, "--max-length", "4096"]) == 1
  assert "exceeds" in capsys.readouterr().err


def test_truncation_is_reported(hf_dir, tmp_path, capsys):
  d, _, _ = hf_dir
  txt = tmp_path / "t.txt"
  txt.write_text("tiny\n" + "kettle " * 100 + "\n")
  assert embed.main(["--model", str(d), "--input", str(txt), "--output", str(tmp_path / "o.npy"),
                     "--max-length", "16"]) == 0
  assert "1 of 2 texts were longer than 16 tokens" in capsys.readouterr().err
