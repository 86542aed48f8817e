"""BLaIR's sequential recommendation (seed `hyp1231/AmazonReviews2023` `seq_rec_results/`): SASRecText or UniSRec
(fine-tuning, `inductive_ft` / `transductive_ft`) over frozen item text features, on the generic loop.

Data: the RecBole files `python -m mmret_jax.data.prepare_seqrec` writes (`{domain}.{train,valid,test}.inter`,
`{domain}.data_maps`, `{domain}.{feature}` from a BLaIR checkpoint): `mmret_jax.data.sources.seqrec`. Each train row
is one example (history -> next item); every epoch is reshuffled and its last partial batch is kept (RecBole's
loader), padded to the static batch with rows of weight 0.

Loss (the seed's `calculate_loss`): cross-entropy of the next item over every item row, [PAD] included, mean over
the batch's real rows; UniSRec uses cosine logits / temperature. Evaluation (RecBole's full sort,
`mmret_jax.eval.seqrec`): Recall@K / NDCG@K, K in `eval.ks`, on the valid and the test split, logged as
`eval/valid/...` and `eval/test/...`; the run keeps the checkpoint with the best `eval/valid/ndcg@10` and stops
when it has not improved for `early_stopping.patience` epochs (RecBole's `stopping_step`); its test figures are the
seed's "test result" (RecBole tests the best valid model), and that model is exported.

Defaults are the seed's (`config/overall.yaml`, `config/{SASRecText,UniSRec}.yaml`) and RecBole 1.2's
(`properties/overall.yaml`: Adam at lr 1e-3, no weight decay, no clipping, batch 2048, 300 epochs, evaluation
every epoch). See docs/blair.md.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import tempfile
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmret_jax.data.sources import seqrec as seqrec_data
from mmret_jax.eval import seqrec as seqrec_eval
from mmret_jax.models import sasrec
from mmret_jax.tasks.base import Task

FEATURE_FILE = "item_features.npy"


def model_config(config, data: seqrec_data.SeqRecData) -> sasrec.SASRecConfig:
  """SASRecConfig from `config.model` (`kind`: sasrectext | unisrec, then the seed's yaml keys as overrides),
  with n_items / plm_size / max_seq_length from the data."""
  m = dict(config.model)
  kind = m.pop("kind", "unisrec")
  m.pop("dtype", None)
  presets = {"sasrectext": sasrec.SASRecConfig.sasrectext, "unisrec": sasrec.SASRecConfig.unisrec}
  if kind not in presets:
    raise ValueError(f"model.kind must be one of {', '.join(presets)}, got {kind!r}")
  if "adaptor_layers" in m:
    m["adaptor_layers"] = tuple(int(x) for x in m["adaptor_layers"])
  if data.plm_table is None:
    raise ValueError("the item features are needed: set data.feature (e.g. blair-roberta-base.feature, written "
                     "by python -m mmret_jax.data.prepare_seqrec --model ...)")
  m.update(n_items=data.n_items, plm_size=data.plm_size, max_seq_length=data.max_seq_length)
  layers_ = m.get("adaptor_layers")
  if layers_ is not None and layers_[0] != data.plm_size:  # the preset's 768 -> the features' width
    m["adaptor_layers"] = (data.plm_size,) + tuple(layers_[1:])
  return presets[kind](**m)


class SeqRecTask(Task):
  """SASRecText / UniSRec fine-tuning on RecBole-format data (module docstring)."""

  usage = "python -m mmret_jax.eval.seqrec --model {workdir}/model --data DATA_ROOT --domain DOMAIN"

  def __init__(self, config, mesh, workdir):
    super().__init__(config, mesh, workdir)
    d = config.data
    root = d.root
    if root == "sample":  # the generated sample (smoke runs): deterministic, written to a local temp dir
      root = seqrec_data.write_sample(tempfile.mkdtemp(prefix="mmret_seqrec_sample_"), d.domain).parent
    self.data_root = pathlib.Path(root).absolute()
    self.data = seqrec_data.load_seqrec(root, d.domain, feature=d.feature or None,
                                        max_seq_length=int(config.model.get("max_seq_length", 50)))
    for name, split in self.data.splits.items():
      if split.counts.get("skipped"):
        print(f"{name}: skipped {split.counts['skipped']} rows ({split.counts['skip_reasons']})")
    self.model_config = model_config(config, self.data)
    self.model = sasrec.SeqRecModel(self.model_config, dtype=jnp.dtype(config.model.get("dtype", "float32")))
    self._score = None

  # The frozen feature table is the param `plm_embedding` (as in the seed's state dict): an argument of the compiled
  # step, never a constant baked into its program (jit embeds closed-over arrays), saved with the checkpoints.
  # `init_params` makes zeros (traceable, no constant) and `load_init` puts the features in, before step 0.
  load_init_always = True

  @property
  def num_train_examples(self) -> int:
    return len(self.data["train"])

  def steps_per_epoch(self, global_batch: int) -> int:
    return seqrec_data.steps_per_epoch(self.num_train_examples, global_batch)

  def init_params(self, rng):
    table = jnp.zeros(self.data.plm_table.shape, jnp.float32)
    return {"model": sasrec.init_params(self.model_config, rng),
            "plm_embedding": nn.LogicallyPartitioned(table, ("vocab", None))}

  def freeze_patterns(self) -> tuple[str, ...]:
    return (r"^plm_embedding$",)

  def load_init(self, params):
    """The item features into the zeros `init_params` made (shapes checked by the loop's restore / here)."""
    table = np.asarray(params["plm_embedding"])
    if table.shape != self.data.plm_table.shape:
      raise ValueError(f"plm_embedding has shape {table.shape}, the features {self.data.plm_table.shape}")
    return {**params, "plm_embedding": np.asarray(self.data.plm_table, table.dtype)}

  def train_iterator(self, per_process_batch: int):
    d = self.config.data
    return seqrec_data.train_batches(self.data, int(self.config.seed), per_process_batch * jax.process_count(),
                                     per_process_batch, jax.process_index(), int(d.num_threads), int(d.prefetch))

  def scores(self, params, item_seq, seq_len, rng=None, train: bool = False):
    """[B, N] float32: the seed's full_sort_predict (train: with dropout and gating noise from `rng`)."""
    plm = jax.lax.stop_gradient(params["plm_embedding"])  # frozen: no gradient computed for the table
    return self.model.apply({"params": params["model"]}, item_seq, seq_len, plm, not train,
                            method=sasrec.SeqRecModel.scores, rngs={"dropout": rng} if train else None)

  def logits(self, params, item_seq, seq_len, rng=None, train: bool = False):
    """[B, N] float32: the seed's training logits (UniSRec: cosine / temperature)."""
    logits = self.scores(params, item_seq, seq_len, rng, train)
    if self.model_config.cosine:
      logits = logits / self.model_config.temperature
    return logits

  def loss_fn(self, params, batch, rng, train: bool = True):
    logits = self.logits(params, batch["item_seq"], batch["seq_len"], rng, train)
    picked = jnp.take_along_axis(logits, batch["target"][:, None], axis=1)[:, 0]
    ce = jax.nn.logsumexp(logits, axis=-1) - picked
    w = batch["weight"].astype(jnp.float32)
    rows = jnp.maximum(w.sum(), 1.0)
    loss = jnp.sum(ce * w) / rows
    return loss, {"rows": w.sum()}

  def evaluate(self, params) -> dict[str, float]:
    ks = tuple(int(k) for k in self.config.eval.ks)
    bs = int(self.config.eval.batch_size)
    if self._score is None:
      self._score = jax.jit(self.scores)
    out = {}
    for name in self.config.eval.splits:
      split = self.data[name]
      m = seqrec_eval.full_sort_metrics(lambda s, l: self._score(params, s, l), split.item_seq, split.seq_len,
                                        split.target, ks=ks, batch_size=min(bs, len(split)),
                                        progress=jax.process_index() == 0, desc=f"{name} full-sort eval")
      out.update({f"{name}/{k}": float(v) for k, v in m.items()})
    return out

  def export(self, params, dst: pathlib.Path) -> None:
    """A converted dir (family `sasrec`: config.json = SASRecConfig fields, params without the feature table) plus
    `seqrec.json` naming the data it was trained on (root, domain, feature file), where the table is read from."""
    from mmret_jax.convert.core import write_converted  # pylint: disable=import-outside-toplevel
    dst = pathlib.Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    write_converted(dst, family="sasrec", hf_config=dataclasses.asdict(self.model_config),
                    params=jax.device_get(params["model"]),
                    meta={"task": "seqrec"}, tokenizer_src=None)
    d = self.config.data
    files = {k: str(pathlib.Path(v).absolute()) for k, v in self.data.files.items()}
    (dst / "seqrec.json").write_text(json.dumps(
        {"root": str(self.data_root), "domain": d.domain, "feature": d.feature, "files": files,
         "n_items": self.data.n_items, "plm_size": self.data.plm_size}, indent=2, sort_keys=True))


def load_exported(path: str | pathlib.Path) -> tuple[sasrec.SASRecConfig, Any, dict]:
  """(config, params, seqrec.json contents or {}) of a dir `SeqRecTask.export` wrote (or a workdir: its model/)."""
  from mmret_jax.convert.core import is_converted_dir, read_converted  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(path)
  if (path / "model").is_dir() and not is_converted_dir(path):
    path = path / "model"
  meta, cfg, params = read_converted(path)
  if meta.get("family") != "sasrec":
    raise ValueError(f"{path} holds a {meta.get('family')} model, not a SASRecText / UniSRec one")
  info = json.loads((path / "seqrec.json").read_text()) if (path / "seqrec.json").exists() else {}
  return sasrec.SASRecConfig(**cfg), params, info
