"""Offline demo of the embedding path: `python -m mmret_jax.demo [--workdir DIR]`.

Builds a tiny random RoBERTa and a BPE tokenizer from bundled texts, writes them
as a converted mmret_jax dir, and embeds a query and three items with it (the
same calls as the BLaIR README, with random weights, so scores are arbitrary).
"""

from __future__ import annotations

import pathlib
import sys
import tempfile

import flax.linen as nn
import jax

from mmret_jax import cli
from mmret_jax.convert.core import write_converted
from mmret_jax.models import bert

QUERY = "I need a product that can scoop, measure, and rinse grains in one utensil."
ITEMS = ["Measure Rinse & Strain colander, holds up to 2 cups, dishwasher safe.",
         "Tactical gloves for hiking, cycling and climbing.",
         "Electric kettle, 1.7 L, auto shut-off, stainless steel."]


def main(argv=None) -> int:
  ap = cli.ArgumentParser(prog="python -m mmret_jax.demo", description=__doc__)
  ap.add_argument("--workdir", default=None, help="where to write the tiny converted model")
  args = ap.parse_args(argv)
  return cli.run(lambda: _demo(args))


def _demo(args) -> int:
  from mmret_jax import embed  # pylint: disable=import-outside-toplevel
  from mmret_jax.data.text import build_bpe_tokenizer  # pylint: disable=import-outside-toplevel
  out = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="mmret_demo_")) / "tiny-roberta"
  tok = build_bpe_tokenizer([QUERY, *ITEMS] * 8, vocab_size=400)
  cfg = bert.BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=130, type_vocab_size=1,
                        layer_norm_eps=1e-5, pad_token_id=1, model_type="roberta")
  model = bert.BertModel(cfg, add_pooling_layer=False)
  params = jax.device_get(nn.unbox(bert.init_params(model, jax.random.PRNGKey(0))))
  out.mkdir(parents=True, exist_ok=True)
  tok.save_pretrained(out)
  write_converted(out, family="bert", hf_config={**cfg.to_dict(), "architectures": ["RobertaModel"]},
                  params=params, meta={"hf_prefix": "", "pooler": False, "mlm": False, "cl": False},
                  tokenizer_src=None)
  enc = embed.load(out)
  e = enc.encode_text([QUERY, *ITEMS], pooling="mean")  # random CLS vectors are near-identical
  print(f"tiny converted model: {out}")
  for item, score in zip(ITEMS, e[1:] @ e[0]):
    print(f"  cos(query, item) = {score:+.4f}  {item}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
