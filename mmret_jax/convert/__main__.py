"""`python -m mmret_jax.convert {to-jax,to-hf} SRC DST`."""

from __future__ import annotations

import os
import pathlib
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from mmret_jax import cli  # pylint: disable=wrong-import-position


def main(argv=None) -> int:
  ap = cli.ArgumentParser(prog="python -m mmret_jax.convert", description=__doc__)
  sub = ap.add_subparsers(dest="cmd", required=True)
  a = sub.add_parser("to-jax", help="Hugging Face / PyTorch weights -> converted mmret_jax dir")
  a.add_argument("src", help="HF model dir (config.json + model.safetensors|pytorch_model.bin) "
                             "or a bare .safetensors/.bin/.pth state dict (needs --config)")
  a.add_argument("dst", help="output dir (created)")
  a.add_argument("--config", help="HF config.json (or a dir holding one) for a bare state dict")
  a.add_argument("--family", help="force the key map (default: from config model_type); "
                                  "`openai-clip` reads an OpenAI CLIP state dict, `blip` an original "
                                  "salesforce/BLIP .pth (model_base.pth, ...); neither needs --config; "
                                  "`uniir` a UniIR checkpoint (clip_sf_large.pth, ..., variant detected) "
                                  "or, from a CLIP dir / state dict, a zero-shot CLIP-SF; `bagformer` a "
                                  "howard-hou/BagFormer or ALBEF-layout checkpoint; a BLIP-2 dir (mBLIP: "
                                  "Blip2ForConditionalGeneration with an mT5 / BLOOM LLM) is `mblip` by its "
                                  "model_type, `blip2` converts its image side alone")
  a.add_argument("--image-size", type=int, default=None,
                 help="original BLIP .pth / BagFormer checkpoint only: input size the position table is "
                      "resized to (default: BLIP 384, BagFormer the checkpoint's own)")
  a.add_argument("--tokenizer", help="dir with tokenizer files (default: SRC, or --config's dir)")
  a.add_argument("--overwrite", action="store_true", help="replace an existing DST")
  b = sub.add_parser("to-hf", help="converted mmret_jax dir -> Hugging Face dir (safetensors)")
  b.add_argument("src", help="converted mmret_jax dir (or a training workdir's model/)")
  b.add_argument("dst", help="output Hugging Face dir (created)")
  b.add_argument("--overwrite", action="store_true", help="replace an existing DST")
  args = ap.parse_args(argv)

  dst = pathlib.Path(args.dst)
  if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not args.overwrite:
    return cli.error(f"{dst} exists and is not empty (pass --overwrite)", cli.EXIT_USAGE)
  return cli.run(lambda: _convert(args, dst))


def _convert(args, dst: pathlib.Path) -> int:
  from mmret_jax import convert  # pylint: disable=import-outside-toplevel
  if args.cmd == "to-jax":
    info = convert.to_jax(args.src, dst, config=args.config, family=args.family, tokenizer=args.tokenizer,
                          image_size=args.image_size)
    layout = (f" prefix={info['hf_prefix']!r} heads(pooler={info['pooler']}, mlm={info['mlm']}, "
              f"cl={info['cl']})") if "hf_prefix" in info else ""
    print(f"converted {args.src} -> {dst}: family={info['family']}{layout} "
          f"params={info['num_params']:,} tokenizer files={info['tokenizer_files'] or 'none'}")
    if not info["tokenizer_files"]:
      print("warning: no tokenizer files copied; pass --tokenizer DIR to embed text with this model",
            file=sys.stderr)
  else:
    info = convert.to_hf(args.src, dst)
    print(f"wrote {dst}: {info['num_keys']} tensors, tokenizer files={info['tokenizer_files'] or 'none'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
