"""Tiny Hugging Face model directories built offline: random weights + real tokenizer files."""

from __future__ import annotations

import os
import pathlib

import numpy as np

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

CORPUS = [
    "Great kettle boils fast and the handle stays cool.",
    "AcmeBrew 1.7L Electric Kettle Auto shut-off BPA free stainless steel body with blue LED.",
    "These running shoes are light, comfortable and true to size.",
    "Trail runner shoe with breathable mesh upper and grippy rubber outsole.",
    "I need a product that can scoop, measure, and rinse grains without multiple utensils.",
    "Measure rinse and strain colander for the kitchen sink, dishwasher safe, dark blue.",
    "Tactical gloves for hiking cycling climbing outdoor camping sports.",
    "The phone case cracked after a week; would not buy again.",
]


def simulated_devices(n: int, extra: str = "", rendezvous_timeout: int = 900) -> str:
  """XLA_FLAGS for a subprocess with `n` simulated CPU devices. XLA's in-process collectives abort the program when
  one device thread is 40 s late to a rendezvous; on a loaded 2-core CI machine (xdist workers side by side) one
  can be, so the wait before aborting is raised (a real deadlock still ends, after `rendezvous_timeout` s)."""
  return (f"--xla_force_host_platform_device_count={n} "
          f"--xla_cpu_collective_call_terminate_timeout_seconds={rendezvous_timeout} {extra}").strip()


# How XLA:CPU ends a program whose device threads wait at a collective rendezvous past the terminate timeout.
XLA_CPU_RENDEZVOUS_ABORT = "exceeded. Exiting to ensure a consistent program state"


def roberta_tokenizer(vocab_size: int = 300):
  """A real byte-level BPE RobertaTokenizerFast trained on CORPUS (vocab <= vocab_size)."""
  from mmret_jax.data.text import build_bpe_tokenizer  # pylint: disable=import-outside-toplevel
  return build_bpe_tokenizer(CORPUS * 4, vocab_size)


def bert_tokenizer():
  """A real WordPiece BertTokenizerFast over the words of CORPUS."""
  from transformers import BertTokenizerFast  # pylint: disable=import-outside-toplevel
  words = sorted({w.strip(".,;").lower() for s in CORPUS for w in s.split()} | set("abcdefghijklmnopqrstuvwxyz"))
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", ";", "-"] + words
  return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True,
                           model_max_length=512)


def make_hf_dir(path: str | os.PathLike, family: str = "roberta", *, hidden_size: int = 32,
                num_hidden_layers: int = 2, num_attention_heads: int = 4, intermediate_size: int = 37,
                max_position_embeddings: int = 80, layer_norm_eps: float | None = None,
                head: str | None = None, seed: int = 0, safe_serialization: bool = True):
  """Writes a tiny HF dir (config, weights, tokenizer); returns (torch model, tokenizer).

  `head`: None (AutoModel with pooler), "mlm" (ForMaskedLM).
  """
  import torch  # pylint: disable=import-outside-toplevel
  import transformers as tf
  path = pathlib.Path(path)
  tok = roberta_tokenizer() if family == "roberta" else bert_tokenizer()
  cfg_cls = tf.RobertaConfig if family == "roberta" else tf.BertConfig
  extra = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1) if family == "roberta" else {}
  cfg = cfg_cls(vocab_size=len(tok), hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                max_position_embeddings=max_position_embeddings,
                layer_norm_eps=layer_norm_eps or (1e-5 if family == "roberta" else 1e-12), **extra)
  torch.manual_seed(seed)
  if head == "mlm":
    model = (tf.RobertaForMaskedLM if family == "roberta" else tf.BertForMaskedLM)(cfg)
  else:
    model = (tf.RobertaModel if family == "roberta" else tf.BertModel)(cfg)
  # HF zero-inits biases and sets LN to identity: randomise everything so parity is meaningful.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "LayerNorm" in name or "layer_norm" in name:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.05 * torch.randn_like(p))
  model.eval()
  model.save_pretrained(path, safe_serialization=safe_serialization)
  tok.save_pretrained(path)
  return model, tok


CLIP_CORPUS = ["a red mug", "a blue lamp on a table", "green box", "photo of a cat", "a purple vase"]


def clip_tokenizer(vocab_size: int = 200):
  """A real byte-level BPE with CLIP's special tokens (<|startoftext|>=0, <|endoftext|>=1 = pad)."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(CLIP_CORPUS * 4, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<|startoftext|>", "<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  tok.post_processor = processors.TemplateProcessing(
      single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                 pad_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=40)


def make_clip_dir(path: str | os.PathLike, *, image_size: int = 32, patch_size: int = 8, seed: int = 0):
  """A tiny HF CLIPModel dir (random weights incl. norms/biases, tokenizer, preprocessor config);
  returns (torch model, tokenizer, CLIPImageProcessor)."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers as tf
  path = pathlib.Path(path)
  tok = clip_tokenizer()
  cfg = tf.CLIPConfig(
      text_config=dict(vocab_size=len(tok), hidden_size=40, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=5, max_position_embeddings=40, bos_token_id=0, eos_token_id=1,
                       pad_token_id=1),
      vision_config=dict(hidden_size=48, intermediate_size=50, num_hidden_layers=2, num_attention_heads=3,
                         image_size=image_size, patch_size=patch_size),
      projection_dim=24)
  torch.manual_seed(seed)
  model = tf.CLIPModel(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.05 * torch.randn_like(p))
  model.save_pretrained(path)
  tok.save_pretrained(path)
  proc_cls = getattr(tf, "CLIPImageProcessorPil", tf.CLIPImageProcessor)
  proc = proc_cls(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
  proc.save_pretrained(path)
  return model, tok, proc


def flat_params(tree, prefix=()) -> dict:
  """Nested param dict -> {"a/b/c": np.ndarray}."""
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(flat_params(v, prefix + (k,)))
    return out
  return {"/".join(prefix): np.asarray(tree)}


def assert_params_equal(a, b) -> None:
  """Same keys, float32 everywhere, bitwise equal values."""
  fa, fb = flat_params(a), flat_params(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    assert fa[k].dtype == fb[k].dtype == np.float32, k
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def override(config, over: dict):
  """Sets dotted keys ("optim.learning_rate") of an ml_collections config; returns it."""
  for k, v in over.items():
    node = config
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return config


def blip_tokenizer():
  """BLIP's text tokenizer layout: a WordPiece BERT tokenizer + `[DEC]` (bos) + `[ENC]`."""
  tok = bert_tokenizer()
  tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
  return tok


def randomize_(model, seed: int = 0):
  """Overwrites every param of a torch model (HF inits zero the biases, make LayerNorms identities and,
  in BLIP's ViT, use std 1e-10): LayerNorms near identity, small biases, fan-in scaled weights."""
  import torch  # pylint: disable=import-outside-toplevel
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "LayerNorm" in name or "layer_norm" in name or "layernorm" in name:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.05 * torch.randn_like(p))
      elif "embedding" in name and "patch" not in name:
        p.copy_(0.5 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
  return model.eval()


def make_blip_dir(path, text: dict, vision: dict, width: int = 16, *, seed: int = 0, with_processor: bool = True):
  """A tiny HF `BlipForImageTextRetrieval` dir: random weights, BLIP-style tokenizer (vocab = its size unless
  `text` sets vocab_size and no tokenizer is wanted), `BlipImageProcessor` config. Returns (model, tok, proc)."""
  import transformers as tf  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(path)
  tok = blip_tokenizer() if "vocab_size" not in text else None
  text = {"vocab_size": len(tok), **text} if tok is not None else text
  cfg = tf.BlipConfig(text_config={**text, "encoder_hidden_size": vision["hidden_size"]}, vision_config=vision,
                      image_text_hidden_size=width)
  model = randomize_(tf.BlipForImageTextRetrieval(cfg), seed)
  model.save_pretrained(path)
  proc = None
  if tok is not None:
    tok.save_pretrained(path)
  if with_processor:
    proc_cls = getattr(tf, "BlipImageProcessorPil", tf.BlipImageProcessor)
    proc = proc_cls(size={"height": vision["image_size"], "width": vision["image_size"]})
    proc.save_pretrained(path)
  return model, tok, proc
