"""mBLIP training (`tasks/mblip.py`, `data/sources/mblip_json.py`, `configs/mblip_*.py`) on the bundled sample:
batches as the seed's `TokenizeCLM` + `DataCollatorForVisualCLM` build them (rebuilt here in plain Python from
the vocabulary), the freezing table of each stage after real optimizer steps, images (missing / corrupt ones
counted, two-image rows, several roots), the smoke config through main (loss falling, an export that
`convert.load_any` and `lora.load_peft` read), and the errors a user meets."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from mmret_jax import convert
from mmret_jax.data.sources import mblip_json
from mmret_jax.models import lora as lora_lib
from mmret_jax.tasks.mblip import flatten
from mmret_jax.train import loop, optim
from mmret_jax.train.metrics import read_metrics
from mmret_jax.train.partitioning import make_mesh

from fixtures import override

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import mblip_bloomz  # noqa: E402  pylint: disable=wrong-import-position
import mblip_mt0  # noqa: E402  pylint: disable=wrong-import-position


def make_task(c, workdir):
  from mmret_jax.tasks.mblip import MBlipTask  # pylint: disable=import-outside-toplevel
  mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  with jax.set_mesh(mesh):
    return MBlipTask(c, mesh, pathlib.Path(workdir))


def config(module, arg="smoke", **over):
  return override(module.get_config(arg), {"checkpoint.async_save": False, **over})


@pytest.fixture(scope="module")
def mt0(tmp_path_factory):
  return make_task(config(mblip_mt0), tmp_path_factory.mktemp("mt0"))


@pytest.fixture(scope="module")
def bloomz(tmp_path_factory):
  return make_task(config(mblip_bloomz), tmp_path_factory.mktemp("bloomz"))


def plain_ids(vocab: dict, text: str) -> list[int]:
  """The sample tokenizer by hand: words split on spaces, each with sentencepiece's '▁'."""
  return [vocab["▁" + w] for w in text.split(" ")]


def test_mt0_batches_follow_the_seed(mt0):
  rows = mt0.train_rows[:6]
  b = mt0.make_batch(rows)
  vocab = mt0.tokenizer.get_vocab()
  assert (vocab["<pad>"], vocab["</s>"], vocab["<unk>"]) == (0, 1, 2)  # mT5's special ids
  ctx = [plain_ids(vocab, r.context) + [1] for r in rows]  # T5 tokenizers append </s> to the prompt too
  tgt = [plain_ids(vocab, r.label) + [1] for r in rows]
  n_in, n_lab = -(-max(map(len, ctx)) // 8) * 8, -(-max(map(len, tgt)) // 8) * 8
  want_ids = np.array([c + [0] * (n_in - len(c)) for c in ctx])  # right padded, multiple of 8
  want_lab = np.array([t + [-100] * (n_lab - len(t)) for t in tgt])
  np.testing.assert_array_equal(b["input_ids"], want_ids)
  np.testing.assert_array_equal(b["attention_mask"], (want_ids != 0).astype(int))
  np.testing.assert_array_equal(b["labels"], want_lab)
  assert b["pixels"].shape == (6, 32, 32, 3) and b["pixels"].dtype == np.float32
  # truncation: context and target separately, to max_len (the T5 </s> kept last)
  ids, labels = mblip_json.tokenize_rows(mt0.tokenizer, ["a b c d e f"], ["red blue green yellow"],
                                         decoder_only=False, max_len=3)
  assert len(ids[0]) == 3 and ids[0][-1] == 1 and labels[0] == plain_ids(vocab, "red blue") + [1]


def test_bloom_batches_are_left_padded_with_masked_prompts(bloomz):
  rows = bloomz.train_rows[:6]
  b = bloomz.make_batch(rows)
  vocab = bloomz.tokenizer.get_vocab()
  eos, pad = vocab["</s>"], vocab["<pad>"]
  assert (vocab["<unk>"], vocab["<s>"], eos, pad) == (0, 1, 2, 3)  # BLOOM's special ids
  seqs = [plain_ids(vocab, r.context) + plain_ids(vocab, r.label) + [eos] for r in rows]
  labs = [[-100] * len(plain_ids(vocab, r.context)) + plain_ids(vocab, r.label) + [eos] for r in rows]
  n = -(-max(map(len, seqs)) // 8) * 8
  np.testing.assert_array_equal(b["input_ids"], np.array([[pad] * (n - len(s)) + s for s in seqs]))
  np.testing.assert_array_equal(b["labels"], np.array([[-100] * (n - len(s)) + s for s in labs]))
  np.testing.assert_array_equal(b["attention_mask"], np.array([[0] * (n - len(s)) + [1] * len(s) for s in seqs]))
  # buckets: the smallest that fits, else a multiple of 8
  assert mblip_json.padded_length(13, 8, (16, 64)) == 16 and mblip_json.padded_length(70, 8, (16, 64)) == 72


def _leaves(tree):
  return {optim.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_two_steps_train_only(task, c, params, trainable: tuple[str, ...]):
  """Two loop steps on the first 16 rows: the leaves under `trainable` change, every other leaf stays bitwise (and
  keeps its dtype); returns the state."""
  tx, _ = optim.make_optimizer(c.optim, 10, task.freeze_patterns())
  state = loop.make_state(task, tx, params, jax.random.PRNGKey(1))
  step = jax.jit(loop.make_train_step(task, tx, 1, "stop"))
  before = _leaves(params)
  for i in range(2):
    b = task.train_batch(np.arange(8 * i, 8 * i + 8), 0)
    b.pop("index")
    state, m = step(state, b)
  assert np.isfinite(float(m["loss"]))
  after = _leaves(state.params)
  for path, x in before.items():
    if path.startswith(trainable):
      assert not np.array_equal(after[path], x), f"{path} did not train"
    else:
      assert after[path].dtype == x.dtype
      np.testing.assert_array_equal(after[path], x, err_msg=f"{path} is frozen")
  return state


@pytest.mark.parametrize("stage", ["warmup", "instruct"])
def test_each_stage_trains_exactly_its_params(stage, tmp_path):
  c = config(mblip_mt0, f"{stage},smoke", **{"optim.warmup_steps": 0})
  task = make_task(c, tmp_path)
  params = nn.unbox(task.init_params(jax.random.PRNGKey(0)))
  if stage == "warmup":
    assert "lora" not in params
  else:  # lora_all: q, k, v, o of encoder self-, decoder self- and cross-attention, and the three FFN matrices
    paths = set(flatten(params["lora"]))
    want = {f"language_model/encoder/block_0/layer_0/SelfAttention/{m}" for m in "qkvo"}
    want |= {f"language_model/decoder/block_0/layer_{i}/{a}/{m}" for i, a in ((0, "SelfAttention"),
                                                                              (1, "EncDecAttention")) for m in "qkvo"}
    want |= {f"language_model/{s}/block_0/layer_{i}/DenseReluDense/{m}" for s, i in (("encoder", 1), ("decoder", 2))
             for m in ("wi_0", "wi_1", "wo")}
    assert paths == want
  trainable = {"warmup": ("model/language_projection/",),
               "instruct": ("model/language_projection/", "model/qformer/", "model/query_tokens", "lora/")}[stage]
  _check_two_steps_train_only(task, c, params, trainable)


def test_instruct_learning_rates_and_weight_decay_groups():
  c = mblip_mt0.get_config("instruct")
  assert c.optim.learning_rate == 1e-5 and c.optim.lr_groups == ((r"^lora/", 20.0, ""),)  # LoRA at 2e-4
  assert (c.optim.weight_decay, c.optim.warmup_steps, c.optim.schedule, c.batch_size) == (0.1, 1000, "cosine", 128)
  no_decay = optim.matches(c.optim.no_decay)
  assert no_decay("model/qformer/encoder/layer_0/output_query/LayerNorm/scale")
  assert no_decay("model/language_projection/bias")
  assert not no_decay("model/qformer/layernorm/scale")  # decayed in the seed (name has no "LayerNorm")
  assert not no_decay("lora/language_model/encoder/block_0/layer_0/SelfAttention/q/lora_A")
  w = mblip_mt0.get_config("warmup")
  assert (w.optim.learning_rate, w.total_steps, w.lora.targets, w.optim.lr_groups) == (5e-3, 8000, "none", ())
  f = mblip_mt0.get_config("finetune,ft=marvl")
  assert (f.batch_size, f.num_epochs, f.optim.learning_rate) == (128, 20.0, 1e-5)
  assert mblip_bloomz.get_config("instruct").mblip.random_projection


def test_images_missing_corrupt_two_image_rows_and_roots(tmp_path):
  root = mblip_json.sample_root()
  (tmp_path / "bad.png").write_bytes(b"not an image")
  imgs = mblip_json.MblipImages(mblip_json.ImageResolver([root / "images", root / "images_extra", tmp_path]), 32, 1)
  px = imgs([("red_circle_0.png",), ("missing/0000.png",), ("bad.png",), ("red_circle_3.png",)])
  assert imgs.bad_loads == 2 and imgs.bad == {"missing/0000.png", "bad.png"}
  assert (px[1] == 0).all() and (px[2] == 0).all() and np.abs(px[0]).sum() > 0 and np.abs(px[3]).sum() > 0
  ref = mblip_json.MblipImages(mblip_json.ImageResolver([root / "images_extra"]), 32, 1)
  np.testing.assert_array_equal(px[3], ref([("red_circle_3.png",)])[0])  # found in the second root
  # the train transform is keyed: same key, same pixels; another epoch, others
  a = imgs([("red_circle_0.png",)], [(42, 0, 5)])
  np.testing.assert_array_equal(a, imgs([("red_circle_0.png",)], [(42, 0, 5)]))
  assert not np.array_equal(a, imgs([("red_circle_0.png",)], [(42, 1, 5)]))
  marvl = mblip_json.JsonRows(root / "marvl.json", {"True": "yes", "False": "no"})
  assert marvl.images_per_row == 2 and marvl.skipped == 0
  two = imgs([r.images for r in marvl.rows[:3]])
  assert two.shape == (3, 2, 32, 32, 3)
  np.testing.assert_array_equal(two[0, 1], imgs([(marvl.rows[0].images[1],)])[0])
  # malformed rows of the bundled train file are counted, not fatal
  rows = mblip_json.JsonRows(root / "train.json")
  assert rows.skipped == 2 and "label" in rows.report()


def test_bad_config_and_data_are_clear_errors(tmp_path):
  with pytest.raises(ValueError, match="Unknown config arg 'instrct'"):
    mblip_mt0.get_config("instrct,smoke")
  with pytest.raises(ValueError, match="one stage"):
    mblip_mt0.get_config("warmup,instruct")
  c = mblip_mt0.get_config("smoke")
  c.lock()
  with pytest.raises(AttributeError):
    c.mblip.stagee = "warmup"
  with pytest.raises(ValueError, match="mblip.stage must be one of"):
    make_task(config(mblip_mt0, **{"mblip.stage": "pretrain"}), tmp_path)
  with pytest.raises(ValueError, match="trains the projection only"):
    make_task(config(mblip_mt0, "warmup,smoke", **{"lora.targets": "lora_all"}), tmp_path)
  mixed = tmp_path / "mixed.json"
  mixed.write_text(json.dumps([{"context": "a", "label": "b", "image_id": "x.png"},
                               {"context": "a", "label": "b", "left_image": "x.png", "right_image": "y.png"}]))
  with pytest.raises(ValueError, match="mixes single-image"):
    mblip_json.JsonRows(mixed)
  with pytest.raises(FileNotFoundError, match="mBLIP data file not found"):
    make_task(config(mblip_mt0, **{"data.train_file": str(tmp_path / "nope.json"),
                                   "data.image_roots": (str(tmp_path),)}), tmp_path)


def test_smoke_config_trains_and_exports(tmp_path):
  """`configs/mblip_mt0.py:smoke` through main: the loss falls, the held-out loss is logged, and the export is an
  mBLIP dir `convert.load_any` reads (LoRA merged) plus a PEFT adapter that `lora.load_peft` reads back."""
  w = tmp_path / "w"
  r = subprocess.run([sys.executable, "-m", "mmret_jax.main", "--config=configs/mblip_mt0.py:smoke",
                      f"--workdir={w}"], capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "1 image(s) missing or unreadable" in r.stderr and "2 malformed skipped" in r.stderr
  rows = read_metrics(w)
  loss = [x["loss"] for x in rows if "loss" in x]
  assert np.mean(loss[-3:]) < 0.5 * np.mean(loss[:2]), loss
  assert any("eval/val_loss" in x for x in rows)
  meta, hf_config, params, _ = convert.load_any(w)
  assert meta["family"] == "mblip" and meta["llm_family"] == "t5" and "lora" not in params
  c = config(mblip_mt0)
  task = make_task(c, tmp_path / "t")
  adapters, cfg = lora_lib.load_peft(w / "model" / "adapter", params["language_model"], task.hf_keys())
  assert (cfg.r, cfg.lora_alpha) == (8, 16.0) and len(adapters) == 18
  assert json.loads((w / "model" / "mblip.json").read_text())["stage"] == "instruct"
  # the export is the trained model with its adapters merged: unmerging gives back a kernel of the init
  init = nn.unbox(jax.jit(task.init_params)(loop.init_and_train_keys(c)[0]))  # the run's init
  assert set(flatten(init["lora"])) == {f"language_model/{k}" for k in adapters}
  base = lora_lib.unmerge(params, {f"language_model/{k}": v for k, v in nn.unbox(adapters).items()}, cfg)
  k = "language_model/encoder/block_0/layer_0/SelfAttention/q/kernel".split("/")
  got, want = base, init["model"]
  for part in k:
    got, want = got[part], want[part]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
  # finetune from it: init_from = the workdir (tokenizer and weights of its export), the adapter merged again
  ft = make_task(config(mblip_mt0, "finetune,smoke", **{"init_from": str(w), "mblip.merge_lora_from":
                                                         str(w / "model" / "adapter")}), tmp_path / "ft")
  assert ft.tokenizer.get_vocab() == task.tokenizer.get_vocab() and ft.meta == {
      k: v for k, v in meta.items() if k not in ("family", "format_version")}
  shapes = jax.eval_shape(lambda: nn.unbox(ft.init_params(jax.random.PRNGKey(0))))
  loaded = ft.load_init(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes))
  twice = lora_lib.merge(params, {f"language_model/{k}": v for k, v in nn.unbox(adapters).items()}, cfg)
  got, want = loaded["model"], twice
  for part in k:
    got, want = got[part], want[part]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
  np.testing.assert_array_equal(loaded["model"]["query_tokens"], params["query_tokens"])
  assert not np.any(loaded["lora"]["language_model"]["encoder"]["block_0"]["layer_0"]["SelfAttention"]["q"]["lora_B"])


def test_int8_llm_instruct_steps_and_loss(tmp_path):
  """mblip.quant_bits=8: the LLM's block kernels are int8 leaves of the train state; the loss is the float model's
  on the dequantized weights (q * scale, <= 1e-5); train steps update LoRA / Q-Former / projection only, the int8
  values and scales stay bitwise; `load_init` quantizes a float init_from; the export is dequantized."""
  from mmret_jax.models import quant  # pylint: disable=import-outside-toplevel
  c8 = config(mblip_mt0, "instruct,smoke", **{"optim.warmup_steps": 0, "mblip.quant_bits": 8})
  task = make_task(c8, tmp_path / "q")
  params = nn.unbox(jax.jit(task.init_params)(jax.random.PRNGKey(0)))
  qpaths = quant.quantized_paths(params["model"]["language_model"])
  assert len(qpaths) == 18  # q, k, v, o x 3 attentions + 2 x (wi_0, wi_1, wo) of the one-block smoke mT5
  int8 = {p: x for p, x in _leaves(params).items() if x.dtype == np.int8}
  assert len(int8) == 18 and all(p.startswith("model/language_model/") for p in int8)
  # the same loss as the float task on the dequantized LLM
  fl = make_task(config(mblip_mt0, "instruct,smoke", **{"optim.warmup_steps": 0}), tmp_path / "f")
  deq = {**params, "model": task.float_model_params(params["model"])}
  b = task.train_batch(np.arange(8), 0)
  b.pop("index")
  rng = jax.random.PRNGKey(2)
  lq = float(jax.jit(lambda p: task.loss_fn(p, b, rng, train=False)[0])(params))
  lf = float(jax.jit(lambda p: fl.loss_fn(p, b, rng, train=False)[0])(deq))
  assert abs(lq - lf) <= 1e-5, (lq, lf)
  # train steps: int8 values and scales bitwise unchanged, the trainable parts move
  state = _check_two_steps_train_only(task, c8, params, ("model/language_projection/", "model/qformer/",
                                                          "model/query_tokens", "lora/"))
  # export: the LLM dequantized, the LoRA merged on top
  task.export(state.params, tmp_path / "export")
  _, _, exported, _ = convert.load_any(tmp_path / "export")
  want = lora_lib.merge(task.float_model_params(jax.device_get(state.params)["model"]),
                        flatten(jax.device_get(state.params)["lora"]), task.lora_cfg)
  k = "language_model/encoder/block_0/layer_0/SelfAttention/q/kernel".split("/")
  got, ref = exported, want
  for part in k:
    got, ref = got[part], ref[part]
  assert np.asarray(got).dtype == np.float32
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-6)
  # init_from a float dir with quant_bits=8: load_init fills the float weights, then quantizes them
  ft = make_task(config(mblip_mt0, "finetune,smoke", **{"init_from": str(tmp_path / "export"),
                                                         "mblip.quant_bits": 8}), tmp_path / "ft")
  shapes = jax.eval_shape(lambda: nn.unbox(ft.init_params(jax.random.PRNGKey(0))))
  loaded = ft.load_init(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes))
  assert jax.tree.structure(loaded) == jax.tree.structure(shapes)
  deq = ft.float_model_params(loaded["model"])
  for part in k:
    deq = deq[part]
  scale = np.max(np.abs(np.asarray(got)), axis=0) / 127  # per output channel
  assert np.all(np.abs(np.asarray(deq) - np.asarray(got)) <= scale / 2 + 1e-7)
  with pytest.raises(ValueError, match="quant_bits"):
    make_task(config(mblip_mt0, "instruct,smoke", **{"mblip.quant_bits": 6}), tmp_path / "bad")
