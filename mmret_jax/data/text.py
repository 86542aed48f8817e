"""Tokenizer helpers: a byte-level BPE built offline from a corpus (for `:smoke` runs and tests)."""

from __future__ import annotations

from typing import Iterable

ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # ids 0..4, as in roberta-base


def build_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1000, model_max_length: int = 512):
  """Trains a RoBERTa-style byte-level BPE on `texts` -> `RobertaTokenizerFast`.

  Special-token ids match roberta-base (`<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, `<mask>`=4).
  """
  import tokenizers  # pylint: disable=import-outside-toplevel
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers
  from transformers import RobertaTokenizerFast
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(ROBERTA_SPECIALS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(texts, trainer)
  # RobertaProcessing takes positional (sep, cls) pairs in tokenizers 0.2x.
  tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
  return RobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                              cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                              model_max_length=model_max_length)


BLIP_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def build_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int = 1000, model_max_length: int = 512):
  """An uncased BERT WordPiece tokenizer over `texts` -> `BertTokenizerFast` with BLIP's extra tokens:
  `[DEC]` (bos) and `[ENC]` appended after the vocabulary (as BLIP's `init_tokenizer` adds them).

  Deterministic (the `tokenizers` WordPiece trainer is not: its ties fall in hash order): the
  vocabulary is the special tokens, every character seen (alone and as a `##` continuation), then the
  most frequent words (ties by spelling) up to `vocab_size`."""
  import collections  # pylint: disable=import-outside-toplevel
  import tokenizers  # pylint: disable=import-outside-toplevel
  from tokenizers import decoders, models, normalizers, pre_tokenizers, processors
  from transformers import BertTokenizerFast
  normalizer, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
  counts = collections.Counter()
  for text in texts:
    counts.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
  chars = sorted({ch for w in counts for ch in w})
  vocab = list(BLIP_SPECIALS) + chars + [f"##{ch}" for ch in chars]
  known = set(vocab)
  for word, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
    if len(vocab) >= vocab_size:
      break
    if word not in known:
      vocab.append(word)
      known.add(word)
  tok = tokenizers.Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
  tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre, decoders.WordPiece()
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
      special_tokens=[("[CLS]", vocab.index("[CLS]")), ("[SEP]", vocab.index("[SEP]"))])
  fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                           cls_token="[CLS]", mask_token="[MASK]", model_max_length=model_max_length)
  fast.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
  return fast


def build_clip_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1000, model_max_length: int = 77):
  """A byte-level BPE with CLIP's special tokens (`<|startoftext|>` = 0, `<|endoftext|>` = 1, also the
  pad token) trained on `texts`: the tokenizer of a from-scratch CLIP (`:smoke` runs)."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast
  tok = tokenizers.Tokenizer(models.BPE())
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<|startoftext|>", "<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  tok.post_processor = processors.TemplateProcessing(
      single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                 pad_token="<|endoftext|>", unk_token="<|endoftext|>",
                                 model_max_length=model_max_length)


def load_tokenizer(path):
  """A saved tokenizer dir, offline. The dir's `config.json` (one of our converted models, whose
  `model_type` transformers does not know) is not consulted: the tokenizer files say what they are."""
  from transformers import AutoTokenizer, PretrainedConfig  # pylint: disable=import-outside-toplevel
  return AutoTokenizer.from_pretrained(str(path), local_files_only=True, config=PretrainedConfig())
