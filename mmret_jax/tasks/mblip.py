"""mBLIP (Geigle et al., arXiv 2307.06930) training (`config.task = "mblip"`): BLIP-2's image side re-aligned to
a multilingual LLM (mT0 / BLOOMZ), in the seed's stages (shared/reference/mblip.md).

Params: {"model": `models/mblip.MBlip` params, "lora": LoRA adapters (`models/lora.py`) on the LLM}; the
adapters are nested by module path (`lora/language_model/encoder/block_0/layer_0/SelfAttention/q/lora_A`),
and the loss runs `lora.apply_with_lora` when there are any. Stages (`mblip.stage`), as the seed's flags:
  warmup    trains `language_projection` only (ViT, Q-Former, query tokens and LLM frozen), no LoRA;
  instruct  trains Q-Former + query tokens + projection + LoRA (`lora.targets`, "lora_all"), ViT and LLM
            frozen; two learning rates (`optim.lr_groups`: the LoRA group at 20 x the main 1e-5 = 2e-4);
  finetune  as instruct, from an instruct model whose LoRA is merged into the LLM (our export is; or
            `mblip.merge_lora_from` = a PEFT adapter dir merged at init) with a fresh LoRA.
Frozen leaves are `freeze_patterns` (zero updates, bitwise unchanged) and are also cut from the backward
pass (`stop_gradient`), so no gradient of the ViT or the LLM weights is computed.

Loss: mean target cross-entropy (data/sources/mblip_json.py builds the seed's ids / labels); mT0: labels
-100-padded, decoder input shift_right(labels); BLOOM: ids = ctx + tgt + eos, left padded, logits of the
visual prefix dropped. Images: the train transform (random resized crop, flip) drawn per (seed, epoch,
row). Evaluation (`evaluate`): the held-out loss over the `data.val_size` first rows (the seed's
`train[:500]`); with `generation.eval_task` set, also beam-search answers scored by the seed's metric of that
task (`generation_metrics`, eval/generation.py).

Export (`{workdir}/model`): a converted mBLIP dir (family "mblip", LoRA merged as the seed's release; `python
-m mmret_jax.convert to-hf` makes an HF `Blip2ForConditionalGeneration` dir of it), the tokenizer, the LoRA
as a PEFT adapter dir (`adapter/`, LLM-relative keys as the seed's `language_model.save_pretrained`) and
`mblip.json` (input settings).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmret_jax import convert
from mmret_jax.convert import bloom as bloom_convert
from mmret_jax.convert import t5 as t5_convert
from mmret_jax.data.pipeline import epoch_batches
from mmret_jax.data.sources import mblip_json
from mmret_jax.data import text as text_lib
from mmret_jax.models import blip2, lora as lora_lib, mblip
from mmret_jax.tasks.base import Task, fill_from
from mmret_jax.train import optim

STAGES = ("warmup", "instruct", "finetune")
LORA_KINDS = ("none", "lora_all", "lora")
AUGMENTS = ("none", "mblip")
SETTINGS_FILE = "mblip.json"
ADAPTER_DIR = "adapter"
# The seed's freezing table: the param-path regexes each stage freezes (LoRA, under `lora/`, always trains).
FROZEN = {
    "warmup": (r"^model/vision_model/", r"^model/qformer/", r"^model/query_tokens$", r"^model/language_model/"),
    "instruct": (r"^model/vision_model/", r"^model/language_model/"),
    "finetune": (r"^model/vision_model/", r"^model/language_model/"),
}
USES_LORA = {"warmup": False, "instruct": True, "finetune": True}
QUANT_BITS = (0, 8, 4)


def nest(flat: dict) -> dict:
  """{"a/b/c": leaves} -> {"a": {"b": {"c": leaves}}} (module paths as a tree: plain checkpoint keys)."""
  out: dict = {}
  for path, leaves in flat.items():
    node = out
    for seg in path.split("/"):
      node = node.setdefault(seg, {})
    node.update(leaves)
  return out


def flatten(tree: dict, prefix: str = "") -> dict:
  """The inverse of `nest`: {module path: {"lora_A", "lora_B"}}."""
  out = {}
  for k, v in tree.items():
    path = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, dict) and "lora_A" in v:
      out[path] = v
    elif isinstance(v, dict):
      out.update(flatten(v, path))
  return out


def scratch_config(c, tokenizer) -> dict:
  """An HF BLIP-2 config dict of a from-scratch mBLIP (`:smoke`), sizes from `config.model`."""
  m = c.model
  vw, qw, lw, heads = int(m.vision_width), int(m.qformer_width), int(m.llm_width), int(m.heads)
  vision = dict(hidden_size=vw, intermediate_size=4 * vw, num_hidden_layers=int(m.vision_layers),
                num_attention_heads=heads, image_size=int(c.data.image_size), patch_size=int(m.patch_size),
                initializer_range=0.02)  # HF's 1e-10 default would make a from-scratch ViT blind
  qformer = dict(hidden_size=qw, intermediate_size=4 * qw, num_hidden_layers=int(m.qformer_layers),
                 num_attention_heads=heads, hidden_dropout_prob=float(m.dropout),
                 attention_probs_dropout_prob=float(m.dropout))
  vocab = len(tokenizer)
  if str(m.llm) == "mt5":
    text = dict(model_type="mt5", d_model=lw, d_ff=2 * lw, num_layers=int(m.llm_layers),
                num_decoder_layers=int(m.llm_layers), num_heads=heads, d_kv=lw // heads, vocab_size=vocab,
                feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=float(m.dropout),
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.pad_token_id, initializer_factor=float(m.llm_init))
  elif str(m.llm) == "bloom":
    text = dict(model_type="bloom", hidden_size=lw, n_layer=int(m.llm_layers), n_head=heads, vocab_size=vocab,
                hidden_dropout=float(m.dropout), attention_dropout=float(m.dropout),
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, initializer_range=float(m.llm_init))
  else:
    raise ValueError(f"model.llm must be 'mt5' or 'bloom' (from-scratch LLM), got {m.llm!r}")
  return {"model_type": blip2.MODEL_TYPE, "vision_config": vision, "qformer_config": qformer, "text_config": text,
          "num_query_tokens": int(m.num_query_tokens)}


def scratch_meta(family: str, config: blip2.Blip2Config) -> dict:
  """The converter meta of a from-scratch model (transformers' own layouts)."""
  llm = ({"seq2seq": True, "tied_lm_head": bool(mblip.llm_config(config).tie_word_embeddings)}
         if family == "t5" else {"hf_prefix": bloom_convert.CAUSAL_LM_PREFIX})
  return {"qkv_layout": "qkv_bias", "language_projection": True, "llm_family": family, "llm_meta": llm}


def _load(path_or_id: str, what: str, families: tuple[str, ...]):
  meta, hf_config, params, _ = convert.load_any(convert.resolve_pretrained(path_or_id))
  if meta.get("family") not in families:
    raise ValueError(f"{what} {path_or_id} is a {meta.get('family')} model, expected one of {families} "
                     f"(convert it with `python -m mmret_jax.convert to-jax SRC DST`)")
  return meta, hf_config, params


class MBlipTask(Task):
  """`config.task = "mblip"` (module docstring)."""

  def __init__(self, config, mesh, workdir):
    super().__init__(config, mesh, workdir)
    c = config
    self.is_main = jax.process_index() == 0
    self.stage = str(c.mblip.stage)
    if self.stage not in STAGES:
      raise ValueError(f"mblip.stage must be one of {STAGES}, got {self.stage!r}")
    kind = str(c.lora.targets)
    if kind not in LORA_KINDS:
      raise ValueError(f"lora.targets must be one of {LORA_KINDS}, got {kind!r}")
    if USES_LORA[self.stage] != (kind != "none"):
      what = ("trains LoRA adapters: set lora.targets to lora_all or lora" if USES_LORA[self.stage]
              else "trains the projection only: set lora.targets=none")
      raise ValueError(f"mblip.stage={self.stage} {what} (got {kind!r}; the seed's freezing table, "
                       "shared/reference/mblip.md)")
    if str(c.data.augment) not in AUGMENTS:
      raise ValueError(f"data.augment must be one of {AUGMENTS}, got {c.data.augment!r}")
    bits = int(c.mblip.get("quant_bits", 0))
    if bits not in QUANT_BITS:
      raise ValueError(f"mblip.quant_bits must be one of {QUANT_BITS} (0 = no quantization), got {bits}")
    if c.mblip.llm_from and not c.init_from:
      raise ValueError("mblip.llm_from needs init_from (the BLIP-2 image side or an mBLIP dir)")
    self._read_data()
    self._setup_model()

  # --------------------------------------------------------------------------- setup
  def _read_data(self):
    d = self.config.data
    root = None
    if not d.train_file or not d.image_roots:
      root = mblip_json.sample_root()
      if self.is_main:
        print(f"note: data.train_file / data.image_roots empty: the bundled mBLIP sample ({root})", file=sys.stderr)
    path = pathlib.Path(str(d.train_file)) if d.train_file else root / "train.json"
    roots = tuple(str(r) for r in d.image_roots) or (str(root / "images"), str(root / "images_extra"))
    label_map = {str(k): str(v) for k, v in tuple(d.label_map)}
    self.rows = mblip_json.JsonRows(path, label_map)
    if self.is_main:
      print(f"note: {self.rows.report()}", file=sys.stderr)
    if d.val_file:  # the fine-tuning recipes: a separate validation file (its first val_size rows; 0 = all)
      val = mblip_json.JsonRows(pathlib.Path(str(d.val_file)), label_map)
      if self.is_main:
        print(f"note: validation: {val.report()}", file=sys.stderr)
      self.train_rows, self.val_rows = list(self.rows.rows), val.rows[:int(d.val_size) or None]
    else:
      self.train_rows, self.val_rows = mblip_json.split_train_val(self.rows.rows, int(d.val_size))
    self.images = mblip_json.MblipImages(mblip_json.ImageResolver(roots), int(d.image_size), int(d.num_threads))

  def _setup_model(self):
    c = self.config
    self._pretrained, tok_dir = None, None
    if c.init_from:
      meta, hf_config, params = _load(str(c.init_from), "init_from", ("mblip", "blip2"))
      tok_dir = convert.localize(str(c.init_from))
      if not convert.is_converted_dir(tok_dir) and convert.is_converted_dir(tok_dir / "model"):  # a workdir
        tok_dir = tok_dir / "model"
      if c.mblip.llm_from:
        llm_meta, llm_hf, llm_params = _load(str(c.mblip.llm_from), "mblip.llm_from", ("t5", "bloom"))
        if llm_meta.get("family") == "t5" and not llm_meta.get("seq2seq"):
          raise ValueError(f"mblip.llm_from {c.mblip.llm_from} is a T5 encoder only; mBLIP needs the whole "
                           "MT5ForConditionalGeneration")
        hf_config = {**hf_config, "text_config": llm_hf}
        params = {**params, "language_model": llm_params}
        fam = "t5" if llm_meta["family"] == "t5" else "bloom"
        meta = {**meta, "family": "mblip", "llm_family": fam, "llm_meta": {k: v for k, v in llm_meta.items()
                                                                            if k not in ("family", "format_version")}}
        meta["language_projection"] = True  # MBlip always has one (random when the image side lacks it)
      elif meta.get("family") != "mblip":
        raise ValueError(f"init_from {c.init_from} is the BLIP-2 image side only: give the LLM with "
                         "mblip.llm_from (a converted mT0 / BLOOMZ dir)")
      self._pretrained, self.hf_config = params, hf_config
      self.meta = {k: v for k, v in meta.items() if k not in ("family", "format_version")}
    tok_src = str(c.tokenizer) or tok_dir
    if tok_src:
      self.tokenizer = text_lib.load_tokenizer(tok_src)
    else:  # offline, from the training texts (smoke runs)
      texts = [t for r in self.rows.rows for t in (r.context, r.label)]
      self.tokenizer = mblip_json.build_sample_tokenizer(texts, "bloom" if str(c.model.llm) == "bloom" else "mt5")
    if self._pretrained is None:
      self.hf_config = scratch_config(c, self.tokenizer)
    try:
      self.model_config = blip2.Blip2Config.from_dict(self.hf_config)
      self.model_config.validate()
      self.family = mblip.llm_family(self.model_config)
    except (TypeError, ValueError) as e:
      raise ValueError(f"unsupported mBLIP config: {e}") from None
    if self._pretrained is None:
      self.meta = scratch_meta(self.family, self.model_config)
    self.decoder_only = self.family == "bloom"
    if self.tokenizer.pad_token_id is None or self.tokenizer.eos_token_id is None:
      raise ValueError("the tokenizer needs a pad and an eos token")
    self.model = mblip.MBlip(self.model_config, dtype=jnp.dtype(c.model.dtype), remat=bool(c.model.remat))
    self.lora_cfg = None
    if USES_LORA[self.stage]:
      self.lora_cfg = lora_lib.LoraConfig.preset(self.family, str(c.lora.targets), r=int(c.lora.r),
                                                 lora_alpha=float(c.lora.alpha), lora_dropout=float(c.lora.dropout))
    self.quant_llm = self.quant_model = None
    bits = int(c.mblip.get("quant_bits", 0))
    if bits:  # the frozen LLM weight-only quantized (models/quant.py); qwix is an optional dependency
      try:
        from mmret_jax.models import quant  # pylint: disable=import-outside-toplevel
      except ImportError as e:
        raise ImportError(f"mblip.quant_bits={bits} needs qwix: pip install -e '.[quant]' ({e})") from None
      self.quant_llm = quant.llm_config(self.family, bits)
      self.quant_model = quant.llm_config(self.family, bits, prefix="language_model/")
    self._frozen = optim.matches(tuple(c.optim.get("freeze", ())) + self.freeze_patterns())
    self._eval_fn = None

  # --------------------------------------------------------------------------- Task API
  @property
  def num_train_examples(self) -> int:
    return len(self.train_rows)

  def steps_per_epoch(self, global_batch: int) -> int:
    return len(self.train_rows) // global_batch

  def freeze_patterns(self) -> tuple[str, ...]:
    return FROZEN[self.stage]

  def init_params(self, rng):
    r_model, r_lora = jax.random.split(rng)
    params = {"model": mblip.init_params(self.model, r_model)}
    if self.quant_llm is not None:
      params["model"] = self._quantize(params["model"])
    if self.lora_cfg is not None:
      flat = lora_lib.init_lora({"language_model": params["model"]["language_model"]}, self.lora_cfg, r_lora)
      params["lora"] = nest(flat)
    return params

  def _quantize(self, model):
    from mmret_jax.models import quant  # pylint: disable=import-outside-toplevel
    return quant.quantize_llm(self.model, model, self.quant_llm)

  def float_model_params(self, model):
    """The model params with the LLM dequantized when it is quantized (q * scale, float32)."""
    if self.quant_llm is None:
      return model
    from mmret_jax.models import quant  # pylint: disable=import-outside-toplevel
    return {**model, "language_model": quant.dequantize_params(model["language_model"])}

  def load_init(self, params):
    if self._pretrained is None:
      return params
    c = self.config
    model = dict(self.float_model_params(params["model"]))  # quantized LLM: filled in float, quantized below
    keep = ("language_projection",) if c.mblip.random_projection else ()
    part = {k: v for k, v in model.items() if k not in keep}
    try:
      model.update(fill_from(part, self._pretrained))
    except ValueError as e:
      hint = (" (a projection of another LLM width: set mblip.random_projection=True, as the seed does for "
              "BLOOMZ)") if "language_projection" in str(e) else ""
      raise ValueError(f"{e}{hint}") from None
    if c.mblip.merge_lora_from:  # finetune from an instruct base + its PEFT adapter
      adapters, cfg = lora_lib.load_peft(str(c.mblip.merge_lora_from), model["language_model"], self.hf_keys())
      adapters = {f"language_model/{k}": v for k, v in nn.unbox(adapters).items()}
      model = lora_lib.merge(model, adapters, cfg)
      if self.is_main:
        print(f"note: merged the LoRA of {c.mblip.merge_lora_from} ({len(adapters)} modules) into the LLM",
              file=sys.stderr)
    self._pretrained = None  # free the host copy
    if self.quant_llm is not None:
      model = nn.unbox(self._quantize(model))
    return {**params, "model": jax.tree.map(np.asarray, model)}

  def _stop_frozen(self, params):
    """Frozen leaves as constants of the loss (no backward through the frozen towers)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jax.lax.stop_gradient(x) if self._frozen(optim.path_str(p)) else x, params)

  def forward(self, params, batch, rng=None, train: bool = False):
    """{"logits", "loss"} of the model (with the LoRA when there is one)."""
    rngs = {"dropout": rng} if train else None
    args = (batch["pixels"], batch["input_ids"], batch["attention_mask"], batch["labels"])
    model = self.model
    if self.quant_model is not None:  # the quantized LLM kernels read through qwix
      from mmret_jax.models import quant  # pylint: disable=import-outside-toplevel
      if "lora" not in params:
        return quant.apply_quantized(model, params["model"], self.quant_model, *args, rngs=rngs,
                                     deterministic=not train)
      model = quant.quantized_model(model, self.quant_model)
    if "lora" in params:
      return lora_lib.apply_with_lora(model, params["model"], flatten(params["lora"]), self.lora_cfg, *args,
                                      rngs=rngs, deterministic=not train)
    return model.apply({"params": params["model"]}, *args, rngs=rngs, deterministic=not train)

  def _target_tokens(self, labels):
    lab = labels[:, 1:] if self.decoder_only else labels
    return jnp.sum(lab != -100)

  def loss_fn(self, params, batch, rng, train: bool = True):
    out = self.forward(self._stop_frozen(params), batch, rng, train)
    return out["loss"], {"tokens": self._target_tokens(batch["labels"]).astype(jnp.float32)}

  # --------------------------------------------------------------------------- data
  def make_batch(self, rows, augment_keys=None) -> dict[str, np.ndarray]:
    d = self.config.data
    ids, labels = mblip_json.tokenize_rows(self.tokenizer, [r.context for r in rows], [r.label for r in rows],
                                           decoder_only=self.decoder_only, max_len=int(d.max_len),
                                           template=str(d.template))
    out = mblip_json.collate(ids, labels, pad_id=self.tokenizer.pad_token_id, decoder_only=self.decoder_only,
                             multiple_of=int(d.pad_multiple), buckets=tuple(int(b) for b in d.buckets))
    out["pixels"] = self.images([r.images for r in rows], augment_keys)
    return out

  def train_batch(self, sel: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
    keys = None
    if str(self.config.data.augment) == "mblip":
      keys = [(int(self.config.seed), epoch, int(i)) for i in sel]
    out = self.make_batch([self.train_rows[int(i)] for i in sel], keys)
    out["index"] = np.asarray(sel, np.int64).copy()
    return out

  def train_iterator(self, per_process_batch: int):
    d = self.config.data
    return epoch_batches(len(self.train_rows), int(self.config.seed), per_process_batch * jax.process_count(),
                         per_process_batch, self.train_batch, int(d.num_threads), int(d.prefetch))

  # --------------------------------------------------------------------------- evaluation
  def held_out_loss(self, params) -> dict[str, float]:
    """Mean target cross-entropy over the validation rows (eval transform, no dropout), token-weighted."""
    if not self.val_rows:
      return {}
    if self._eval_fn is None:
      def fn(p, b):
        return self.forward(p, b)["loss"] * self._target_tokens(b["labels"]), self._target_tokens(b["labels"])
      self._eval_fn = jax.jit(fn)
    bs = int(self.config.data.eval_batch_size)
    total, count = 0.0, 0
    for s in range(0, len(self.val_rows), bs):
      rows = self.val_rows[s:s + bs]
      batch = self.make_batch(rows + [rows[-1]] * (bs - len(rows)))  # static shape; padded rows unlabelled
      batch["labels"][len(rows):] = -100
      loss_sum, n = jax.device_get(self._eval_fn(params, batch))
      total, count = total + float(loss_sum), count + int(n)
    return {"val_loss": total / max(count, 1), "val_tokens": float(count)}

  def generation_metrics(self, params) -> dict[str, float]:
    """With `generation.eval_task` set (vqa / classify / vqav2 / maxm / caption; "" or absent = off): beam-search
    answers for the validation rows (`generation` settings, caption_* for captions) scored by the seed's metric
    of that task against each row's `text_label` (else its label), as {"gen_<metric>": value}
    (eval/generation.py)."""
    g = self.config.get("generation") or {}
    task = str(g.get("eval_task", "") or "")
    if not task or not self.val_rows:
      return {}
    from mmret_jax.eval import generation as gen_eval  # pylint: disable=import-outside-toplevel
    if task not in gen_eval.TASKS:
      raise ValueError(f"generation.eval_task must be one of {gen_eval.TASKS} or empty, got {task!r}")
    model = self.float_model_params(params["model"])
    if "lora" in params:
      model = lora_lib.merge(model, flatten(params["lora"]), self.lora_cfg)
    caption = task == "caption"
    d = self.config.data
    preds = gen_eval.predict(
        self.model, model, self.tokenizer, self.val_rows, self.images, template=str(d.template),
        max_len=int(d.max_len), decoder_only=self.decoder_only, batch_size=int(d.eval_batch_size),
        num_beams=int(g.get("num_beams", 5)), min_new_tokens=int(g.get("min_new_tokens", 1)),
        max_new_tokens=int(g.get("caption_max_new_tokens", 50) if caption else g.get("max_new_tokens", 10)),
        length_penalty=float(g.get("caption_length_penalty", 1.0) if caption else g.get("length_penalty", -1.0)))
    golds = [r.text_label if r.text_label else r.label for r in self.val_rows]
    return {f"gen_{k}": float(v) for k, v in gen_eval.task_metric(task, preds, golds).items()}

  def evaluate(self, params) -> dict[str, float]:
    return {**self.held_out_loss(params), **self.generation_metrics(params)}

  # --------------------------------------------------------------------------- export
  usage = ("python -m mmret_jax.convert to-hf {workdir}/model HF_DIR (a Blip2ForConditionalGeneration dir, LoRA "
           "merged; the PEFT adapter alone: {workdir}/model/adapter)")

  def hf_keys(self) -> dict[str, str]:
    """LLM-relative module path -> HF module key (PEFT adapter keys of the LLM)."""
    cfg = mblip.llm_config(self.model_config)
    rules = t5_convert.seq2seq_rules(cfg) if self.family == "t5" else bloom_convert.rules(cfg)
    return lora_lib.hf_module_keys(rules)

  def export(self, params, dst) -> None:
    from mmret_jax.convert.core import write_converted  # pylint: disable=import-outside-toplevel
    dst = pathlib.Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    params = jax.device_get(params)
    model = self.float_model_params(params["model"])  # a quantized LLM exports dequantized (q * scale)
    if "lora" in params:
      adapters = flatten(params["lora"])
      model = lora_lib.merge(model, adapters, self.lora_cfg)
      llm_adapters = {k[len("language_model/"):]: v for k, v in adapters.items()}
      lora_lib.save_peft(dst / ADAPTER_DIR, llm_adapters, self.lora_cfg, self.hf_keys(),
                         task_type="CAUSAL_LM" if self.decoder_only else "SEQ_2_SEQ_LM")
    self.tokenizer.save_pretrained(dst)
    write_converted(dst, family="mblip", hf_config=self.hf_config, params=jax.tree.map(np.asarray, model),
                    meta=self.meta, tokenizer_src=None)
    d = self.config.data
    settings = {"stage": self.stage, "max_len": int(d.max_len), "template": str(d.template),
                "image_size": int(d.image_size), "decoder_only": self.decoder_only,
                "lora": None if self.lora_cfg is None else dataclasses.asdict(self.lora_cfg)}
    (dst / SETTINGS_FILE).write_text(json.dumps(settings, indent=1, sort_keys=True))
