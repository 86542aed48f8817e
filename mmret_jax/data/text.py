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
