"""BLaIR (Hou et al. 2024, arXiv 2403.03952): SimCSE-style contrastive pretraining of RoBERTa on
(review, item metadata) pairs, plus an auxiliary MLM loss.

Objective (seed `blair/simcse/models.py::cl_forward`, see shared/reference/blair.md §2):
  z1 = tanh(mlp(CLS(review))), z2 = tanh(mlp(CLS(meta)))      (pooler "cls"; the head is train-only)
  L_cl = mean_i CE(cos(z1_i, z2_.) / temp, target i)            one direction: review -> meta
  L = L_cl + mlm_weight * MLM(masked copies of both texts)
Negatives are the whole global batch. Under jit the loss sees the global arrays, so unlike the
seed's DDP gather (where other ranks' shards carry no gradient) the gradient is the exact
full-batch one; the loss value is the same, and on one device so is the gradient.
Options: `loss.symmetric` (add meta -> review), `loss.learnable_temp` (log-scale param).

Evaluation: held-out pairs (the first `valid_fraction` of rows, as the seed), items retrieved from
review text with the inference embedding (CLS of last_hidden_state, L2-normalised, no MLP), exact
inner-product search (faiss): Recall@K, NDCG@K; plus the seed's `cl_loss` on held-out batches.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

from mmret_jax import convert, losses, storage
from mmret_jax.data.sources.amazon_reviews import PairsSource, split_pairs
from mmret_jax.embed import pool as embed_pool
from mmret_jax.models import bert, layers
from mmret_jax.tasks.base import Task
from mmret_jax.train import partitioning


# Seed `Pooler`: cls = MLP(tanh) on CLS (train only), cls_before_pooler = raw CLS, avg = masked mean.
POOLERS = ("cls", "cls_before_pooler", "avg")


@dataclasses.dataclass(frozen=True)
class TokenizePairs(grain.transforms.Map):
  """{review, meta, index} -> padded int32 ids / masks of length `max_length` (+ int64 index)."""
  tokenizer: Any
  max_length: int

  def map(self, row):
    out = {"index": np.int64(row["index"])}
    for field in ("review", "meta"):
      enc = self.tokenizer(row[field], truncation=True, max_length=self.max_length,
                           padding="max_length")
      out[f"{field}_ids"] = np.asarray(enc["input_ids"], np.int32)
      out[f"{field}_mask"] = np.asarray(enc["attention_mask"], np.int32)
    return out


def _load_tokenizer(source: str | pathlib.Path):
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  return AutoTokenizer.from_pretrained(str(source), local_files_only=True)


class BlairTask(Task):
  """`config.task = "blair"`."""

  def __init__(self, config, mesh, workdir):
    super().__init__(config, mesh, workdir)
    c = config
    self.source = self.make_source()
    stats = getattr(self.source, "stats", {})
    if stats.get("skipped"):
      print(f"note: {stats['skipped']} malformed rows skipped in {c.data.train_file} "
            f"({stats.get('rows', len(self.source))} kept)", file=sys.stderr)
    self.train_idx, self.valid_idx = split_pairs(self.source, float(c.data.valid_fraction))
    self._pretrained = None
    if c.init_from:
      path = convert.resolve_pretrained(c.init_from)
      meta, hf_config, params, _ = convert.load_any(path)
      if meta.get("family") != "bert":
        raise ValueError(f"init_from {c.init_from} is a {meta.get('family')} model, BLaIR needs RoBERTa/BERT")
      self._pretrained = params
      self.tokenizer = _load_tokenizer(c.tokenizer or path)
      self.model_config = bert.BertConfig.from_dict(hf_config)
    else:
      self.tokenizer = self._scratch_tokenizer()
      base = bert.PRESETS[c.model.preset]
      self.model_config = dataclasses.replace(base, vocab_size=len(self.tokenizer),
                                              pad_token_id=self.tokenizer.pad_token_id)
    dropout = float(c.model.dropout)
    attention = c.model.get("attention", "auto")
    if attention not in layers.ATTENTION_IMPLS:
      raise ValueError(f"model.attention must be one of {layers.ATTENTION_IMPLS}, got {attention!r}")
    norm = c.model.get("norm", "xla")
    if norm not in layers.NORM_IMPLS:
      raise ValueError(f"model.norm must be one of {layers.NORM_IMPLS}, got {norm!r}")
    self.model_config = dataclasses.replace(self.model_config, hidden_dropout_prob=dropout,
                                            attention_probs_dropout_prob=dropout, attention_impl=attention,
                                            norm_impl=norm)
    if self.model_config.max_position_embeddings < c.data.max_seq_length + 2:
      raise ValueError(f"data.max_seq_length {c.data.max_seq_length} exceeds the model's positions")
    pooler = c.loss.pooler
    if pooler not in POOLERS:
      raise ValueError(f"loss.pooler must be one of {POOLERS}, got {pooler!r}")
    kw = dict(dtype=jnp.dtype(c.model.dtype), remat=bool(c.model.remat))
    self.model = bert.BertModel(self.model_config, add_pooling_layer=False,
                                add_mlm_head=bool(c.loss.do_mlm), add_cl_head=pooler == "cls", **kw)
    self.special_ids = np.asarray(sorted(set(self.tokenizer.all_special_ids)), np.int32)
    self._encoder = None

  # ----------------------------------------------------------------------------- setup helpers
  def make_source(self):
    return PairsSource(self.config.data.train_file)

  def _scratch_tokenizer(self):
    """`config.tokenizer`: a dir, or `bpe:VOCAB` = train a byte-level BPE on the training texts
    (saved to workdir/tokenizer and reused on resume)."""
    spec = self.config.tokenizer
    if spec and not spec.startswith("bpe:"):
      return _load_tokenizer(spec)
    saved = self.workdir / "tokenizer"
    if (saved / "tokenizer.json").exists():
      return _load_tokenizer(storage.local_copy(saved, refresh=True))
    from mmret_jax.data.text import build_bpe_tokenizer  # pylint: disable=import-outside-toplevel
    vocab = int(spec.split(":", 1)[1]) if spec else 8000
    texts = (t for i in self.train_idx for t in (self.source[int(i)]["review"], self.source[int(i)]["meta"]))
    tok = build_bpe_tokenizer(texts, vocab_size=vocab)
    if jax.process_index() == 0:
      with storage.staged_dir(saved) as local:  # uploaded when the workdir is remote
        tok.save_pretrained(local)
    return tok

  @property
  def num_train_examples(self) -> int:
    return len(self.train_idx)

  def init_params(self, rng):
    ids = jnp.ones((1, 8), jnp.int32)
    params = {"encoder": self.model.init(rng, ids, return_mlm_logits=True)["params"]}
    if self.config.loss.learnable_temp:
      params["logit_scale"] = self.param_scalar(np.log(1.0 / self.config.loss.temp))
    return params

  @staticmethod
  def param_scalar(value: float):
    return nn.LogicallyPartitioned(jnp.asarray(value, jnp.float32), ())

  def load_init(self, params):
    """Copies every encoder leaf the checkpoint has (shapes must match); reports fresh leaves."""
    if self._pretrained is None:
      return params
    src, fresh = self._pretrained, []

    def take(path, leaf):
      node = src
      for k in path:
        node = node.get(k.key) if isinstance(node, dict) else None
        if node is None:
          fresh.append("/".join(p.key for p in path))
          return leaf
      if node.shape != leaf.shape:
        raise ValueError(f"init_from: {'/'.join(p.key for p in path)} has shape {node.shape}, "
                         f"the model expects {leaf.shape}")
      return np.asarray(node, leaf.dtype)
    params = dict(params)
    params["encoder"] = jax.tree_util.tree_map_with_path(take, params["encoder"])
    if fresh and jax.process_index() == 0:
      print(f"init_from {self.config.init_from}: {len(fresh)} params freshly initialised "
            f"({', '.join(sorted({f.split('/')[0] for f in fresh}))})", file=sys.stderr)
    return params

  # ----------------------------------------------------------------------------- data
  def train_rows(self) -> grain.MapDataset:
    """Training rows: source -> shuffle(seed) -> repeat -> this process's shard (endless)."""
    ds = grain.MapDataset.source(self.source)[int(self.train_idx[0]):int(self.train_idx[-1]) + 1] \
        if _contiguous(self.train_idx) else grain.MapDataset.source(_Subset(self.source, self.train_idx))
    ds = ds.shuffle(seed=int(self.config.seed)).repeat()
    return ds[jax.process_index()::jax.process_count()]

  def read_options(self) -> grain.ReadOptions:
    d = self.config.data
    return grain.ReadOptions(num_threads=int(d.num_threads), prefetch_buffer_size=int(d.prefetch))

  def train_iterator(self, per_process_batch: int):
    ds = self.train_rows().map(TokenizePairs(self.tokenizer, int(self.config.data.max_seq_length)))
    ds = ds.batch(per_process_batch, drop_remainder=True)
    return iter(ds.to_iter_dataset(self.read_options()))

  # ----------------------------------------------------------------------------- loss
  def embed(self, params, ids, mask, rng=None, *, train=False):
    """[B, L] -> the contrastive representation [B, D] (MLP head applied if pooler == cls)."""
    pooler = self.config.loss.pooler
    # CLS poolers read position 0 of the last layer only: its other positions are not computed.
    out = self.model.apply({"params": params["encoder"]}, ids, mask, deterministic=not train,
                           rngs={"dropout": rng} if train else None, cls_only_last_layer=pooler != "avg")
    if pooler == "cls":
      return out["cl_output"]
    if pooler == "avg":
      return embed_pool(out["last_hidden_state"], mask, "mean")
    return out["last_hidden_state"][:, 0]

  def scale(self, params):
    if self.config.loss.learnable_temp:
      return jnp.minimum(jnp.exp(params["logit_scale"]), 100.0)
    return 1.0 / float(self.config.loss.temp)

  def contrastive(self, q, c, scale, symmetric: bool, valid=None, normalized: bool = False):
    """InfoNCE of queries q [B, P] against candidates c [B, P] (cosine logits x scale): dense, or with
    `loss.impl = ring` through the ring over the data x fsdp devices (no [B, B] matrix; same values)."""
    if (mesh := self.ring_mesh()) is not None:
      if not normalized:
        q, c = losses.l2_normalize(q.astype(jnp.float32)), losses.l2_normalize(c.astype(jnp.float32))
      return losses.ring_contrastive_loss(q, c, scale, mesh, symmetric=symmetric, valid=valid)
    logits = (scale * q.astype(jnp.float32) @ c.astype(jnp.float32).T if normalized
              else losses.cosine_logits(q, c, scale))
    return losses.info_nce(logits, symmetric=symmetric, valid=valid)

  def mask_for_mlm(self, rng, ids, rows=None):
    """BERT masking of `ids` [N, L]; each row's draw is keyed by its batch row (`rows` [N], default 0..N-1:
    fold_in(rng, row)), so a row is masked the same whether the batch is split into chunks or not."""
    rows = jnp.arange(ids.shape[0], dtype=jnp.int32) if rows is None else rows
    special = jnp.isin(ids, jnp.asarray(self.special_ids))
    keys = jax.vmap(lambda r: jax.random.fold_in(rng, r))(rows)
    return jax.vmap(lambda k, x, s: losses.mask_tokens(k, x, s, mask_token_id=int(self.tokenizer.mask_token_id),
                                                       vocab_size=self.model_config.vocab_size,
                                                       probability=float(self.config.loss.mlm_probability))
                    )(keys, ids, special)

  def mlm_terms(self, params, ids, mask, r_mask, r_drop, rows=None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Seed MLM on masked copies of `ids` (a second encoder pass, dropout on): (summed token NLL, number of
    labelled tokens, number of labelled positions left out). The vocab head runs only at the labelled
    positions (a static cap per batch shard, `loss.mlm_max_predictions`; -1 = every position as the seed
    does): the same loss, without [B, L, vocab] logits. Labelled positions beyond the cap (probability < 1e-7
    per shard with the auto cap) are left out of the loss and counted."""
    c = self.config.loss
    mids, labels = self.mask_for_mlm(r_mask, ids, rows)
    # One selection group per batch shard: positions never cross devices.
    groups = partitioning.data_parallel_size(self.mesh)
    if ids.shape[0] % groups:
      groups = ids.shape[0]
    n = ids.shape[0] // groups
    cap = losses.mlm_prediction_cap(n * ids.shape[1], float(c.mlm_probability), int(c.mlm_max_predictions), rows=n)
    if cap >= n * ids.shape[1]:  # every position: the seed's [B, L, V] head
      pos, sel, dropped = None, labels, jnp.zeros((), jnp.int32)
    else:
      pos, sel, dropped = losses.select_mlm_positions(labels, cap, groups)
    out = self.model.apply({"params": params["encoder"]}, mids, mask, deterministic=False,
                           rngs={"dropout": r_drop}, return_mlm_logits=True, mlm_positions=pos)
    count = jnp.sum(sel != -100).astype(jnp.float32)
    return losses.masked_lm_loss(out["mlm_logits"], sel) * jnp.maximum(count, 1.0), count, dropped

  def mlm_loss(self, params, ids, mask, r_mask, r_drop) -> tuple[jax.Array, dict]:
    """The mean MLM token loss of `mlm_terms` and {"mlm_overflow": positions left out}."""
    nll, count, dropped = self.mlm_terms(params, ids, mask, r_mask, r_drop)
    return nll / jnp.maximum(count, 1.0), {"mlm_overflow": dropped.astype(jnp.float32)}

  def _uses_mlm(self, train: bool) -> bool:
    c = self.config.loss
    return bool(c.do_mlm) and train and float(c.mlm_weight) > 0

  def loss_fn(self, params, batch, rng, train: bool = True):
    c = self.config.loss
    b = batch["review_ids"].shape[0]
    ids = jnp.concatenate([batch["review_ids"], batch["meta_ids"]], 0)
    mask = jnp.concatenate([batch["review_mask"], batch["meta_mask"]], 0)
    r_drop, r_mask, r_drop2 = jax.random.split(rng, 3)
    z = self.embed(params, ids, mask, r_drop, train=train)
    cl = self.contrastive(z[:b], z[b:], self.scale(params), bool(c.symmetric), batch.get("valid"))
    aux = {"cl_loss": cl, "tokens": mask.sum().astype(jnp.float32)}
    loss = cl
    if self._uses_mlm(train):
      mlm, extra = self.mlm_loss(params, ids, mask, r_mask, r_drop2)
      aux.update(extra, mlm_loss=mlm)
      loss = cl + float(c.mlm_weight) * mlm
    if c.learnable_temp:
      aux["temperature"] = 1.0 / self.scale(params)
    return loss, aux

  def gc_text_sums(self, params, chunk, ids, mask, r_drop2) -> dict:
    """GradCache per-chunk sums of the text side: token count and (training with MLM) the MLM NLL sum, token
    count and overflow, its masks keyed by batch row as `loss_fn`'s ([reviews; metas] rows)."""
    sums = {"tokens": mask.sum().astype(jnp.float32)}
    if self._uses_mlm(True):
      rows = jnp.concatenate([chunk["_rows"], chunk["_batch_size"] + chunk["_rows"]])
      r_mask = jax.random.split(chunk["_step_rng"], 3)[1]
      nll, count, dropped = self.mlm_terms(params, ids, mask, r_mask, r_drop2, rows)
      sums.update(mlm_nll=nll, mlm_count=count, mlm_overflow=dropped.astype(jnp.float32))
    return sums

  def gc_add_mlm(self, loss, aux: dict, sums: dict):
    """(loss + mlm_weight x MLM mean, aux) from the GradCache sums."""
    if "mlm_nll" not in sums:
      return loss, aux
    mlm = sums["mlm_nll"] / jnp.maximum(sums["mlm_count"], 1.0)
    aux.update(mlm_loss=mlm, mlm_overflow=sums["mlm_overflow"])
    return loss + float(self.config.loss.mlm_weight) * mlm, aux

  def grad_cache_parts(self):
    """`train/grad_cache.Parts` of `loss_fn` (train=True): chunks encode reviews and metas (CLS vectors) and the
    MLM sums; the contrastive loss (every negative of the batch) and the MLM mean come from those. MLM masks are
    keyed by batch row (the same as `loss_fn`'s); dropout by chunk."""
    from mmret_jax.train import grad_cache  # pylint: disable=import-outside-toplevel
    c = self.config.loss

    def encode(params, chunk, rng):
      b = chunk["review_ids"].shape[0]
      ids = jnp.concatenate([chunk["review_ids"], chunk["meta_ids"]], 0)
      mask = jnp.concatenate([chunk["review_mask"], chunk["meta_mask"]], 0)
      r_drop, _, r_drop2 = jax.random.split(rng, 3)
      z = self.embed(params, ids, mask, r_drop, train=True)
      return {"rows": {"review": z[:b], "meta": z[b:]}, "sums": self.gc_text_sums(params, chunk, ids, mask, r_drop2)}

    def loss(params, reps, batch, rng):
      del rng
      r, s = reps["rows"], reps["sums"]
      cl = self.contrastive(r["review"], r["meta"], self.scale(params), bool(c.symmetric), batch.get("valid"))
      out, aux = self.gc_add_mlm(cl, {"cl_loss": cl, "tokens": s["tokens"]}, s)
      if c.learnable_temp:
        aux["temperature"] = 1.0 / self.scale(params)
      return out, aux
    return grad_cache.Parts(encode, loss)

  def export(self, params, dst: pathlib.Path) -> None:
    """Writes the trained encoder (with its MLM / `mlp` heads) as a converted dir that `embed`,
    `mmret_jax.load` and `convert to-hf` read; inference uses CLS of last_hidden_state."""
    from mmret_jax.convert.core import write_converted  # pylint: disable=import-outside-toplevel
    enc = jax.device_get(params["encoder"])
    arch = "RobertaModel" if self.model_config.is_roberta else "BertModel"
    cfg = {**self.model_config.to_dict(), "architectures": [arch]}
    meta = {"hf_prefix": "", "pooler": False, "mlm": "lm_head" in enc or "cls" in enc, "cl": "mlp" in enc}
    dst = pathlib.Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    self.tokenizer.save_pretrained(dst)
    write_converted(dst, family="bert", hf_config=cfg, params=enc, meta=meta, tokenizer_src=None)

  # ----------------------------------------------------------------------------- eval
  def _held_out(self):
    n = int(self.config.data.eval_max_pairs)
    rows = [self.source[int(i)] for i in self.valid_idx[:n]]
    return [r["review"] for r in rows], [r["meta"] for r in rows]

  def evaluate(self, params) -> dict[str, float]:
    from mmret_jax import embed as embed_lib  # pylint: disable=import-outside-toplevel
    from mmret_jax.eval import retrieval  # pylint: disable=import-outside-toplevel
    c = self.config
    if len(self.valid_idx) == 0:
      return {}
    reviews, metas = self._held_out()
    if self._encoder is None:
      inference = bert.BertModel(self.model_config, add_pooling_layer=False, dtype=jnp.dtype(c.model.dtype))
      self._encoder = embed_lib.Encoder(inference, None, self.tokenizer, meta={}, hf_config={}, path="")
    enc_params = {k: v for k, v in params["encoder"].items() if k not in ("mlp", "lm_head", "cls")}
    self._encoder.params = enc_params
    kw = dict(max_length=int(c.data.max_seq_length), batch_size=int(c.data.eval_batch_size),
              pooling="mean" if c.loss.pooler == "avg" else "cls")
    items = sorted(set(metas))
    item_id = {m: i for i, m in enumerate(items)}
    q = self._encoder.encode_text(reviews, **kw)
    d = self._encoder.encode_text(items, **kw)
    ks = tuple(int(k) for k in c.eval.ks)
    out = retrieval.evaluate_text_retrieval(q, d, [{item_id[m]} for m in metas], ks)
    out["num_queries"], out["num_items"] = float(len(reviews)), float(len(items))
    out["cl_loss"] = self._eval_cl_loss(params, reviews, metas)
    if c.eval.get("c4_queries"):
      out.update(self._eval_amazon_c4())
    return out

  def _eval_amazon_c4(self) -> dict[str, float]:
    """Amazon-C4 complex product search (seed `eval_search.py`): queries vs the whole item pool,
    CLS embeddings at `eval.c4_max_length` tokens, NDCG@100 / Recall@100."""
    from mmret_jax.data.sources.amazon_reviews import load_amazon_c4  # pylint: disable=import-outside-toplevel
    from mmret_jax.eval import retrieval  # pylint: disable=import-outside-toplevel
    c = self.config.eval
    if not hasattr(self, "_c4"):
      self._c4 = load_amazon_c4(c.c4_queries, c.c4_pool)
    c4 = self._c4
    keep = np.flatnonzero(c4.target_index >= 0)
    kw = dict(max_length=int(c.c4_max_length), batch_size=int(self.config.data.eval_batch_size))
    q = self._encoder.encode_text([c4.queries[i] for i in keep], **kw)
    d = self._encoder.encode_text(c4.pool_texts, **kw)
    m = retrieval.evaluate_text_retrieval(q, d, c4.target_index[keep], ks=(10, 100))
    m = {f"c4/{k}": v for k, v in m.items() if k.split("@")[0] in ("ndcg", "recall")}
    m["c4/queries_without_target"] = float(len(c4.target_index) - len(keep))
    return m

  def _eval_cl_loss(self, params, reviews, metas) -> float:
    """The seed's validation metric: contrastive loss on held-out batches (no MLM, no dropout).

    Every held-out pair counts: the last, smaller batch is padded to `eval_batch_size` (one
    compilation) with the padding masked out of the loss, and batch losses are averaged weighted by
    their size (as the HF Trainer's evaluation loop does)."""
    bs = int(self.config.data.eval_batch_size)
    tok = TokenizePairs(self.tokenizer, int(self.config.data.max_seq_length))
    if not hasattr(self, "_eval_loss"):
      self._eval_loss = jax.jit(lambda p, b: self.loss_fn(p, b, jax.random.PRNGKey(0), train=False)[0])
    total, count = 0.0, 0
    for s in range(0, len(reviews), bs):
      rows = [tok.map({"review": r, "meta": m, "index": 0}) for r, m in zip(reviews[s:s + bs], metas[s:s + bs])]
      n = len(rows)
      batch = {k: pad_rows(np.stack([r[k] for r in rows]), bs) for k in rows[0] if k != "index"}
      batch["valid"] = np.arange(bs) < n
      total += n * float(self._eval_loss(params, batch))
      count += n
    return total / count if count else float("nan")


def pad_rows(x: np.ndarray, n: int) -> np.ndarray:
  """Appends zero rows to reach `n` rows (fixed eval shapes: one compilation)."""
  if len(x) == n:
    return x
  return np.concatenate([x, np.zeros((n - len(x), *x.shape[1:]), x.dtype)])


def _contiguous(idx: np.ndarray) -> bool:
  return len(idx) > 0 and int(idx[-1]) - int(idx[0]) + 1 == len(idx)


class _Subset:
  """Random-access view of `source` at `indices` (picklable)."""

  def __init__(self, source, indices):
    self.source, self.indices = source, np.asarray(indices)

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[int(self.indices[i])]
