"""BLaIR-CLIP twin tower (`tasks/blair_clip.py`): loss parity with a PyTorch re-implementation of the
fork's `BlairCLIPDualEncoder.forward` (aokhader/BLAIR-MultiModal `blair/multimodal/blair_clip.py`,
shared/reference/blair.md §7), sharded meshes agree with one device, the tower freezes freeze,
bad images are skipped and counted, and the `:smoke` config learns.

Fork objective: t = normalize(text_projection(mlp(CLS(review)))), v = normalize(image_projection(
CLIPVisionModel.pooler_output)); clip = (CE(s t v^T) + CE(s v t^T)) / 2 with s = exp(logit_scale)
clamped at 100; + w * the same symmetric CE between review and meta (scale text_text_logit_scale);
+ mlm_weight * CE(lm_head(encoder(masked ids))) over both sentences.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import types

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import pytest  # noqa: E402

from fixtures import override, simulated_devices  # noqa: E402
from mmret_jax.data import image as image_lib  # noqa: E402
from mmret_jax.tasks.blair_clip import BlairClipTask, _TokenizeKeepImage  # noqa: E402
from mmret_jax.train import loop  # noqa: E402
from mmret_jax.train.metrics import read_metrics  # noqa: E402
from mmret_jax.train.partitioning import make_mesh  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import blair_clip  # noqa: E402  pylint: disable=wrong-import-position

BRANDS = ["acme", "zeta", "nova", "orbit", "lumen", "terra", "pixel", "vega"]
TYPES = ["kettle", "shoe", "glove", "lamp", "mug", "backpack", "tent", "watch"]
COLORS = [(220, 40, 40), (40, 200, 60), (30, 60, 220), (230, 210, 40), (200, 60, 200), (40, 210, 210),
          (250, 140, 20), (120, 120, 120)]
BATCH = 8
MAX_LEN = 24
TOL = 1e-5


def write_data(root: pathlib.Path, n: int = 48, missing: tuple[int, ...] = ()) -> pathlib.Path:
  """`n` review / meta / image rows + one small PNG per (brand, type) under root/images. Rows in
  `missing` name an image that does not exist. Returns the TSV path (image paths are relative)."""
  rng = np.random.default_rng(0)
  (root / "images").mkdir(parents=True, exist_ok=True)
  lines = ["review\tmeta\timage_path"]
  for i in range(n):
    b, t = int(rng.integers(len(BRANDS))), int(rng.integers(len(TYPES)))
    name = f"images/{BRANDS[b]}_{TYPES[t]}.png"
    if not (root / name).exists():
      # a brand colour background with a type-dependent stripe pattern and pixel noise; not square
      px = np.empty((40, 48, 3), np.uint8)
      px[:] = COLORS[b]
      px[:, (t * 5) % 40:(t * 5) % 40 + 6 + t] = COLORS[(b + t + 1) % len(COLORS)]
      px = np.clip(px.astype(int) + rng.integers(-25, 26, px.shape), 0, 255).astype(np.uint8)
      PIL.Image.fromarray(px).save(root / name)
    if i in missing:
      name = f"images/no_such_image_{i}.png"
    lines.append(f"my {TYPES[t]} from {BRANDS[b]} is nice {i}\t{BRANDS[b].title()} {TYPES[t]}, "
                 f"durable and light, by {BRANDS[b]}.\t{name}")
  path = root / "pairs.tsv"
  path.write_text("\n".join(lines) + "\n")
  return path


def tiny_config(train_file, **over):
  """A from-scratch BLaIR-CLIP config: roberta-tiny text tower, tiny 32x32 ViT, projection 32."""
  c = blair_clip.get_config("smoke")
  c.data.train_file = str(train_file)
  c.data.image_root = str(pathlib.Path(train_file).parent)
  c.tokenizer = "bpe:300"
  c.model.preset = "roberta-tiny"
  c.model.dropout = 0.0
  c.mm.clip_model_name = ""
  c.mm.vision_preset = "tiny"
  c.mm.projection_dim = 32
  c.data.valid_fraction = 0.1
  c.data.max_seq_length = MAX_LEN
  c.data.eval_max_pairs = 8
  c.data.eval_batch_size = 8
  c.data.num_threads = 1
  c.eval.ks = (1, 5)
  c.total_steps = 4
  c.batch_size = 16
  c.log_every = 1
  c.eval_every = -1
  c.checkpoint_every = 100
  c.checkpoint.async_save = False
  c.optim.warmup_steps = 0
  return override(c, over)


def losses_of(workdir):
  return [r["loss"] for r in read_metrics(workdir) if "loss" in r]


# --------------------------------------------------------------------------------------------- parity


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A standalone task (one device), randomised params and a batch of 8 from the task's pipeline."""
  root = tmp_path_factory.mktemp("blair_clip")
  # Row 20 (train part: rows 0..4 validate) names a missing image.
  tsv = write_data(root, n=48, missing=(20,))
  cfg = tiny_config(tsv)
  mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  task = BlairClipTask(cfg, mesh, root / "work")
  params = jax.device_get(nn.unbox(jax.jit(task.init_params)(jax.random.PRNGKey(0))))
  # HF-style inits zero the biases and make LayerNorms identities: randomise every leaf so each
  # weight's mapping matters, and spread the logits (a random tiny tower maps inputs close together).
  rs = np.random.RandomState(0)
  flat, tree = jax.tree_util.tree_flatten_with_path(params)
  leaves = []
  for path, x in flat:
    name = "/".join(p.key for p in path)
    x = np.asarray(x)
    if x.ndim == 0:
      leaves.append(x)
    elif name.endswith("/scale"):  # LayerNorm gains
      leaves.append((1.0 + 0.2 * rs.standard_normal(x.shape)).astype(x.dtype))
    else:
      leaves.append((x + 0.05 * rs.standard_normal(x.shape)).astype(x.dtype))
  params = jax.tree_util.tree_unflatten(tree, leaves)

  prep = image_lib.PreprocessImage(task.image_config)
  tok = _TokenizeKeepImage(task.tokenizer, MAX_LEN)
  rows = [tok.map(prep.map(task.source[int(i)])) for i in task.train_idx[:BATCH]]
  assert all(bool(r["image_ok"]) for r in rows)
  batch = {k: np.stack([r[k] for r in rows]) for k in ("review_ids", "review_mask", "meta_ids", "meta_mask",
                                                       "image")}
  assert batch["image"].shape == (BATCH, 32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["review_ids"].dtype == np.int32 and (batch["review_mask"] == 0).any()
  return types.SimpleNamespace(root=root, tsv=tsv, task=task, params=params, batch=batch)


class TorchBlairClip:
  """The fork's `BlairCLIPDualEncoder` training forward (pooler cls, do_mlm), with our weights."""

  def __init__(self, task, params):
    import torch  # pylint: disable=import-outside-toplevel
    import transformers as tf  # pylint: disable=import-outside-toplevel
    from mmret_jax.convert import bert as bert_conv  # pylint: disable=import-outside-toplevel
    from mmret_jax.convert import clip as clip_conv  # pylint: disable=import-outside-toplevel
    from mmret_jax.convert.core import params_to_state_dict  # pylint: disable=import-outside-toplevel
    from mmret_jax.models import clip as clip_model  # pylint: disable=import-outside-toplevel
    self.torch = torch
    t = lambda x: torch.from_numpy(np.array(x, np.float32))  # noqa: E731

    # Text tower: RobertaModel(add_pooling_layer=False) + MLPLayer + RobertaLMHead (tied decoder).
    hf_cfg = {**task.model_config.to_dict(), "architectures": ["RobertaModel"]}
    meta = {"hf_prefix": "", "pooler": False, "mlm": True, "cl": True}
    sd = {k: t(v) for k, v in bert_conv.to_state_dict(params["encoder"], hf_cfg, meta).items()}
    rcfg = tf.RobertaConfig(**{k: v for k, v in hf_cfg.items() if k != "architectures"},
                            attn_implementation="eager")
    self.text_encoder = tf.RobertaModel(rcfg, add_pooling_layer=False).eval()
    enc_sd = {k: v for k, v in sd.items() if not k.startswith(("mlp.", "lm_head."))}
    missing, unexpected = self.text_encoder.load_state_dict(enc_sd, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    h = rcfg.hidden_size
    self.mlp = torch.nn.Sequential(torch.nn.Linear(h, h), torch.nn.Tanh())  # MLPLayer: dense + tanh
    self.mlp[0].load_state_dict({"weight": sd["mlp.dense.weight"], "bias": sd["mlp.dense.bias"]})
    from transformers.models.roberta.modeling_roberta import RobertaLMHead  # pylint: disable=import-outside-toplevel
    self.lm_head = RobertaLMHead(rcfg).eval()
    self.lm_head.load_state_dict({
        "dense.weight": sd["lm_head.dense.weight"], "dense.bias": sd["lm_head.dense.bias"],
        "layer_norm.weight": sd["lm_head.layer_norm.weight"], "layer_norm.bias": sd["lm_head.layer_norm.bias"],
        "decoder.weight": sd["embeddings.word_embeddings.weight"], "decoder.bias": sd["lm_head.bias"],
        "bias": sd["lm_head.bias"]})

    # Vision tower: HF CLIPVisionModel, weights through the CLIP conversion rules (vision keys only).
    vc = task.vision_config
    vis = dict(hidden_size=vc.hidden_size, intermediate_size=vc.intermediate_size,
               num_hidden_layers=vc.num_hidden_layers, num_attention_heads=vc.num_attention_heads,
               num_channels=vc.num_channels, image_size=vc.image_size, patch_size=vc.patch_size,
               hidden_act=vc.hidden_act, layer_norm_eps=vc.layer_norm_eps)
    rules = [r for r in clip_conv.rules(clip_model.CLIPConfig.from_dict({"vision_config": vis}))
             if r.key.startswith("vision_model.")]
    vsd = {k: t(v) for k, v in params_to_state_dict(rules, {"vision_model": params["vision"]}).items()}
    self.vision_model = tf.CLIPVisionModel(tf.CLIPVisionConfig(**vis, attn_implementation="eager")).eval()
    if not any(k.startswith("vision_model.") for k in self.vision_model.state_dict()):
      vsd = {k[len("vision_model."):]: v for k, v in vsd.items()}  # transformers 5 flattened the module
    missing, unexpected = self.vision_model.load_state_dict(vsd, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)

    heads = params["heads"]
    self.text_projection = torch.nn.Linear(h, heads["text_projection"]["kernel"].shape[1])
    self.image_projection = torch.nn.Linear(vc.hidden_size, heads["image_projection"]["kernel"].shape[1])
    for mod, name in ((self.text_projection, "text_projection"), (self.image_projection, "image_projection")):
      p = heads[name]
      mod.load_state_dict({"weight": t(np.asarray(p["kernel"]).T), "bias": t(p["bias"])})
    self.logit_scale = torch.nn.Parameter(t(heads["logit_scale"]))
    self.text_text_logit_scale = torch.nn.Parameter(t(heads["text_text_logit_scale"]))
    self.cross_entropy = torch.nn.CrossEntropyLoss()

  def forward(self, input_ids, attention_mask, pixel_values, mlm_input_ids, mlm_labels, *,
              text_text_weight, mlm_weight):
    """input_ids / attention_mask / mlm_* [bs, 2, L] (review, meta); pixel_values NCHW."""
    torch, F = self.torch, self.torch.nn.functional
    bs, num_sent, length = input_ids.shape
    flat_mask = attention_mask.view(-1, length)
    out = self.text_encoder(input_ids=input_ids.view(-1, length), attention_mask=flat_mask)
    pooled = out.last_hidden_state[:, 0].view(bs, num_sent, -1)  # Pooler("cls")
    text = F.normalize(self.text_projection(self.mlp(pooled)), dim=-1)  # MLP forced in training
    text_anchor, meta_embeddings = text[:, 0], text[:, 1]
    image = F.normalize(self.image_projection(self.vision_model(pixel_values=pixel_values).pooler_output), dim=-1)
    logit_scale = self.logit_scale.exp().clamp(max=100)
    logits_per_text = logit_scale * text_anchor @ image.t()
    labels = torch.arange(bs)
    clip = (self.cross_entropy(logits_per_text, labels) + self.cross_entropy(logits_per_text.t(), labels)) / 2.0
    loss = clip
    tt = None
    if text_text_weight > 0:
      tt_logits = self.text_text_logit_scale.exp().clamp(max=100) * text_anchor @ meta_embeddings.t()
      tt = (self.cross_entropy(tt_logits, labels) + self.cross_entropy(tt_logits.t(), labels)) / 2.0
      loss = loss + text_text_weight * tt
    mlm_out = self.text_encoder(input_ids=mlm_input_ids.view(-1, length), attention_mask=flat_mask)
    scores = self.lm_head(mlm_out.last_hidden_state)
    mlm = self.cross_entropy(scores.view(-1, scores.size(-1)), mlm_labels.view(-1))
    loss = loss + mlm_weight * mlm
    return {"loss": loss, "clip": clip, "tt": tt, "mlm": mlm, "logits": logits_per_text}


def _pairs_layout(x, b):
  """[2b, L] (reviews then metas, our layout) -> [b, 2, L] (the fork's layout)."""
  import torch  # pylint: disable=import-outside-toplevel
  x = np.asarray(x)
  return torch.from_numpy(np.stack([x[:b], x[b:]], axis=1).astype(np.int64))


@pytest.fixture
def torch_one_thread():
  """Torch intra-op threads spin against XLA's on a 2-core box: one thread is several times faster."""
  import torch  # pylint: disable=import-outside-toplevel
  n = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(n)


@pytest.mark.parametrize("weight,logit_scale", [(0.0, None), (0.5, None), (0.5, float(np.log(150.0)))],
                         ids=["w0", "w0.5", "w0.5-clamped"])
def test_loss_matches_fork_torch(setup, torch_one_thread, weight, logit_scale):  # pylint: disable=unused-argument
  """Loss (clip + w * text-text + 0.1 * MLM) and some gradients, ours vs the fork's forward, on the
  same batch and masked copies. The third case sets exp(logit_scale) = 150 (clamped to 100) and a
  text-text scale of 30."""
  import torch  # pylint: disable=import-outside-toplevel
  task, b = setup.task, BATCH
  task.config.mm.text_text_weight = weight
  params = jax.tree.map(np.asarray, setup.params)
  if logit_scale is not None:
    params["heads"] = {**params["heads"], "logit_scale": np.float32(logit_scale),
                       "text_text_logit_scale": np.float32(np.log(30.0))}
  jparams = jax.tree.map(jnp.asarray, params)
  jbatch = {k: jnp.asarray(v) for k, v in setup.batch.items()}
  rng = jax.random.PRNGKey(7)
  (loss, aux), grads = jax.jit(jax.value_and_grad(lambda p, bt, r: task.loss_fn(p, bt, r, train=True),
                                                  has_aux=True))(jparams, jbatch, rng)

  # The masked copies loss_fn draws (same split: r_towers, r_mask, r_drop2), review ids then meta ids.
  _, r_mask, _ = jax.random.split(rng, 3)
  ids = np.concatenate([setup.batch["review_ids"], setup.batch["meta_ids"]])
  mask = np.concatenate([setup.batch["review_mask"], setup.batch["meta_mask"]])
  mids, labels = (np.asarray(x) for x in task.mask_for_mlm(r_mask, jnp.asarray(ids)))
  assert (labels != -100).sum() > 0

  model = TorchBlairClip(task, params)
  out = model.forward(_pairs_layout(ids, b), _pairs_layout(mask, b),
                      torch.from_numpy(np.ascontiguousarray(setup.batch["image"].transpose(0, 3, 1, 2))),
                      _pairs_layout(mids, b), _pairs_layout(labels, b),
                      text_text_weight=weight, mlm_weight=float(task.config.loss.mlm_weight))
  # Non-degenerate logits: every row spans more than a nat (up to ~9 at scale 100).
  spread = (out["logits"].max(1).values - out["logits"].min(1).values).min().item()
  assert spread > 1.0, spread
  diffs = {"loss": abs(float(loss) - out["loss"].item()), "clip": abs(float(aux["clip_loss"]) - out["clip"].item()),
           "mlm": abs(float(aux["mlm_loss"]) - out["mlm"].item())}
  if weight > 0:
    diffs["text_text"] = abs(float(aux["text_text_loss"]) - out["tt"].item())
  else:
    assert "text_text_loss" not in aux
  print(f"w={weight} scale={float(1 / aux['temperature']):.3f}: loss={float(loss):.6f} torch={out['loss'].item():.6f} "
        f"(clip {float(aux['clip_loss']):.4f}, mlm {float(aux['mlm_loss']):.4f}) logit spread {spread:.2f} "
        f"diffs={ {k: f'{v:.2e}' for k, v in diffs.items()} }")
  # At scale 100 float32 rounding of the cosines (~1e-7) moves the logits by ~1e-5: there the
  # tolerance is relative to the loss (|loss| ~ 8).
  tol = TOL if logit_scale is None else TOL * max(1.0, float(loss))
  for k, d in diffs.items():
    assert d <= tol, (k, d)
  np.testing.assert_allclose(float(aux["temperature"]), 1 / min(np.exp(float(params["heads"]["logit_scale"])), 100),
                             rtol=1e-6)

  out["loss"].backward()
  g = grads["heads"]
  pairs = {
      "text_projection": (g["text_projection"]["kernel"], model.text_projection.weight.grad.T),
      "image_projection": (g["image_projection"]["kernel"], model.image_projection.weight.grad.T),
      "mlp": (grads["encoder"]["mlp"]["dense"]["kernel"], model.mlp[0].weight.grad.T),
      "post_layernorm": (grads["vision"]["post_layernorm"]["scale"], next(
          p.grad for k, p in model.vision_model.named_parameters() if k.endswith("post_layernorm.weight"))),
      "logit_scale": (g["logit_scale"], model.logit_scale.grad),
      "text_text_logit_scale": (g["text_text_logit_scale"], model.text_text_logit_scale.grad
                                if model.text_text_logit_scale.grad is not None else torch.zeros(())),
  }
  for name, (ours, theirs) in pairs.items():
    ours, theirs = np.asarray(ours), theirs.numpy()
    scale = max(np.abs(theirs).max(), 1e-3)
    print(f"  grad {name}: max|diff| {np.abs(ours - theirs).max():.2e} (max|g| {np.abs(theirs).max():.2e})")
    np.testing.assert_allclose(ours, theirs, atol=1e-5 * scale, rtol=1e-4, err_msg=name)
  if logit_scale is not None:  # clamped: no gradient reaches logit_scale (torch clamp / jnp.minimum)
    assert float(g["logit_scale"]) == 0.0
  else:
    assert abs(float(g["logit_scale"])) > 1e-4
  if weight == 0:  # unused scale (a buffer in the fork)
    assert float(g["text_text_logit_scale"]) == 0.0


# --------------------------------------------------------------------------------------------- data


def test_missing_images_black_mode_feeds_a_black_image(tmp_path):
  """data.missing_images=black (the fork's loader): a row with a missing image file or an empty image
  path (an image prepare_blair --images could not download) trains on a black image, counted; with the
  default (skip) the empty-path row is left out of the source and counted as no_image."""
  tsv = write_data(tmp_path, n=48, missing=(20,))
  lines = tsv.read_text().splitlines()
  review, meta, _ = lines[1 + 21].split("\t")
  lines[1 + 21] = f"{review}\t{meta}\t"  # row 21: no image downloaded
  tsv.write_text("\n".join(lines) + "\n")
  mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  skip = BlairClipTask(tiny_config(tsv), mesh, tmp_path / "w_skip")
  assert skip.source.stats["skip_reasons"] == {"no_image": 1} and len(skip.source) == 47
  task = BlairClipTask(tiny_config(tsv, **{"data.missing_images": "black"}), mesh, tmp_path / "w")
  assert len(task.source) == 48 and task.source.stats["rows_without_image"] == 1
  assert task.source[21]["image_path"] == ""
  black = image_lib.black_image(task.image_config)
  np.testing.assert_allclose(black[0, 0], -np.asarray(image_lib.OPENAI_CLIP_MEAN) / np.asarray(image_lib.OPENAI_CLIP_STD),
                             atol=1e-6)
  it = task.train_iterator(BATCH)
  bad = {20, 21} & set(task.train_idx.tolist())
  found = set()
  for _ in range(-(-len(task.train_idx) // BATCH)):  # one epoch of the train rows
    batch = next(it)
    for row, idx in enumerate(batch["index"].tolist()):
      if idx in bad:
        np.testing.assert_array_equal(batch["image"][row], black)
        found.add(idx)
      else:
        assert not np.array_equal(batch["image"][row], black)
  assert found == bad and task.images_skipped == len(bad)
  with pytest.raises(ValueError, match="data.missing_images must be 'skip' or 'black'"):
    BlairClipTask(tiny_config(tsv, **{"data.missing_images": "gray"}), mesh, tmp_path / "w2").make_source()


def test_missing_image_row_is_skipped_and_counted(setup):
  task = setup.task
  bad = 20
  assert bad in set(task.train_idx.tolist())
  it = task.train_iterator(BATCH)
  n_train = len(task.train_idx)
  seen = []
  for _ in range(-(-(n_train + 1) // BATCH)):  # more than one epoch of the train rows
    batch = next(it)
    assert batch["image"].shape == (BATCH, 32, 32, 3)
    seen += batch["index"].tolist()
  assert bad not in seen
  assert task.images_skipped >= 1
  assert set(seen) == set(task.train_idx.tolist()) - {bad}


# --------------------------------------------------------------------------------------------- freezing


def test_freeze_towers(tmp_path):
  data = write_data(tmp_path, n=48)
  cfg = lambda **kw: tiny_config(data, total_steps=3, **kw)  # noqa: E731
  vis_frozen = loop.train_and_evaluate(cfg(**{"mm.freeze_clip_tower": True}), tmp_path / "vis")
  txt_frozen = loop.train_and_evaluate(cfg(**{"mm.freeze_text_tower": True}), tmp_path / "txt")
  # The init, as the loop draws it (same seed, same tokenizer dir).
  mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  task = BlairClipTask(cfg(), mesh, tmp_path / "vis")
  init_rng, _ = jax.random.split(jax.random.PRNGKey(int(task.config.seed)))
  init = jax.device_get(jax.jit(lambda: nn.unbox(task.init_params(init_rng)))())

  def same(a, b):
    fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)
    assert len(fa) == len(fb) and fa
    return {"/".join(p.key for p in path): bool(np.array_equal(np.asarray(x), np.asarray(y)))
            for (path, x), y in zip(fa, fb)}

  def enc_towers(p):
    return {k: p["encoder"][k] for k in ("embeddings", "encoder")}

  pv, pt = jax.device_get(vis_frozen.state.params), jax.device_get(txt_frozen.state.params)
  # freeze_clip_tower: every vision param bitwise at init; text tower and heads train.
  assert all(same(pv["vision"], init["vision"]).values())
  assert not any(same(enc_towers(pv), enc_towers(init)).values())
  assert not any(same(pv["encoder"]["mlp"], init["encoder"]["mlp"]).values())
  # freeze_text_tower: RoBERTa embeddings + blocks bitwise at init; mlp head, projections, vision train.
  assert all(same(enc_towers(pt), enc_towers(init)).values())
  assert not any(same(pt["encoder"]["mlp"], init["encoder"]["mlp"]).values())
  for name in ("text_projection", "image_projection"):
    assert not any(same(pt["heads"][name], init["heads"][name]).values()), name
  assert not any(same(pt["vision"], init["vision"]).values())
  assert float(pt["heads"]["logit_scale"]) != float(init["heads"]["logit_scale"])


# --------------------------------------------------------------------------------------------- meshes


MESH_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    import jax
    from test_train_blair_clip import tiny_config, losses_of
    from mmret_jax.train import loop
    import mmret_jax.train.partitioning as part
    out = {{}}
    orig = part.make_mesh
    for name, mesh in [("single", None), ("dp8", dict(data=8)), ("dp4_fsdp2", dict(data=4, fsdp=2))]:
      cfg = tiny_config({data!r}, **{{"mm.text_text_weight": 0.5}})
      if mesh is None:
        cfg.mesh.data = 1
        part.make_mesh = lambda spec, d=None: orig(spec, jax.devices()[:1])
      else:
        part.make_mesh = orig
        cfg.mesh.data, cfg.mesh.fsdp = mesh["data"], mesh.get("fsdp", 1)
      res = loop.train_and_evaluate(cfg, {workdir!r} + "/" + name)
      k = res.state.params["vision"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"]
      out[name] = dict(losses=losses_of({workdir!r} + "/" + name), spec=str(k.sharding.spec),
                       ndev=len(k.sharding.device_set))
    print("RESULT" + json.dumps(out))
""")


def test_meshes_match_single_device(tmp_path):
  data = write_data(tmp_path, n=48)
  script = MESH_SCRIPT.format(tests=str(REPO / "tests"), data=str(data), workdir=str(tmp_path))
  # Unoptimised XLA codegen compiles the three programs a third faster on a cold cache; every run
  # in the subprocess uses the same flags, so the comparison is unaffected.
  env = {**os.environ, "XLA_FLAGS": simulated_devices(
      8, "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")}
  r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.split("RESULT", 1)[1])
  ref = out["single"]["losses"]
  print({k: v["losses"] for k, v in out.items()})
  assert len(ref) == 4 and ref[-1] < ref[0]
  assert out["single"]["ndev"] == 1 and out["dp8"]["ndev"] == 8 and out["dp4_fsdp2"]["ndev"] == 8
  assert "fsdp" in out["dp4_fsdp2"]["spec"]
  for name in ("dp8", "dp4_fsdp2"):
    # fp32; only the order of sharded reductions differs
    np.testing.assert_allclose(out[name]["losses"], ref, rtol=0, atol=2e-5, err_msg=name)


# --------------------------------------------------------------------------------------------- smoke


def test_smoke_config_learns(tmp_path):
  cfg = blair_clip.get_config("smoke")
  cfg.total_steps = 20
  cfg.log_every = 5
  cfg.eval_every = 0
  cfg.checkpoint_every = 100
  cfg.checkpoint.async_save = False
  cfg.optim.warmup_steps = 5
  res = loop.train_and_evaluate(cfg, tmp_path / "w")
  losses = losses_of(tmp_path / "w")
  print("smoke losses", losses, res.eval)
  assert len(losses) == 4 and all(np.isfinite(losses))
  assert losses[-1] < losses[0] - 0.3
  assert 0.0 <= res.eval["eval/t2i/recall@10"] <= 1.0
  # The sample names one missing image on purpose (`images/missing_chair.png`, a held-out row).
  assert res.eval["eval/images_skipped"] == 1 and res.eval["eval/train_images_skipped"] == 0
  assert res.eval["eval/num_images"] > 10
  assert (tmp_path / "w" / "model" / "twin_tower").exists()


def test_skipped_image_count_survives_resume(tmp_path):
  """The count of training rows dropped for a missing image is part of the checkpointed data state:
  a run stopped after the skip and resumed reports the same total as an uninterrupted run."""
  data = write_data(tmp_path, n=48, missing=(20,))
  cfg = lambda **kw: tiny_config(data, total_steps=6, eval_every=0, **kw)  # noqa: E731
  full = loop.train_and_evaluate(cfg(), tmp_path / "full")
  loop.train_and_evaluate(cfg(stop_at_step=3), tmp_path / "resumed")
  state = json.loads((tmp_path / "resumed" / "checkpoints" / "3" / "data" / "process_0-of-1.json").read_text())
  assert state["skipped"] >= 1  # the skip happened before the stop, so only the checkpoint can carry it
  resumed = loop.train_and_evaluate(cfg(), tmp_path / "resumed")
  total = full.eval["eval/train_images_skipped"]
  print("skipped at the stop:", state["skipped"], "in all:", total)
  assert total >= state["skipped"]
  assert resumed.eval["eval/train_images_skipped"] == total
  assert losses_of(tmp_path / "resumed") == losses_of(tmp_path / "full")
