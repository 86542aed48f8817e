"""HF `Blip2ForConditionalGeneration` dirs (model_type "blip-2") <-> `models/mblip.MBlip`, both ways.

A BLIP-2 state dict is the image side (`vision_model.*`, `query_tokens`, `qformer.*`,
`language_projection.*`: convert/blip2.py) plus the LLM under `language_model.` with the standalone
model's own keys (`MT5ForConditionalGeneration`: convert/t5.py; `BloomForCausalLM`: convert/bloom.py).
Each part goes through its family's strict converter; the meta records both parts' layouts so that
`to_state_dict` writes the same keys back. mBLIP's releases (`Gregor/mblip-mt0-xl`, `-bloomz-7b`) are
such dirs with the LoRA merged.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import numpy as np

from mmret_jax.convert import blip2 as blip2_family
from mmret_jax.convert import bloom as bloom_family
from mmret_jax.convert import t5 as t5_family
from mmret_jax.convert.core import ConversionError, read_state_dict, state_dict_to_params, write_converted
from mmret_jax.models import blip2, lora as lora_lib, mblip

MODEL_TYPES = (blip2.MODEL_TYPE,)
LLM_PREFIX = "language_model."
_LLM_FAMILIES = {"t5": t5_family, "bloom": bloom_family}


def _llm(hf_config: dict):
  config = blip2.Blip2Config.from_dict(hf_config)
  try:
    name = mblip.llm_family(config)
  except ValueError as e:
    raise ConversionError(str(e)) from e
  return name, _LLM_FAMILIES[name], dict(config.text_config)


def build_model(hf_config: dict, meta: dict, **kw) -> mblip.MBlip:
  config = blip2_family.config_from_hf(hf_config, bool(meta.get("language_projection", True)))
  return mblip.MBlip(config, add_language_projection=bool(meta.get("language_projection", True)), **kw)


def to_params(sd: dict[str, np.ndarray], hf_config: dict) -> tuple[dict, dict]:
  """(params, meta) of a BLIP-2 state dict with its LLM; errors name the offending keys."""
  name, fam, text_config = _llm(hf_config)
  llm_sd = {k[len(LLM_PREFIX):]: v for k, v in sd.items() if k.startswith(LLM_PREFIX)}
  if not llm_sd:
    raise ConversionError(f"no {LLM_PREFIX}* keys: this is the image side of BLIP-2 only (convert it with "
                          "--family blip2)")
  image_sd = {k: v for k, v in sd.items() if not k.startswith(LLM_PREFIX)}
  params, image_meta = blip2_family.to_params(image_sd, hf_config)
  if not image_meta.get("language_projection", True):
    raise ConversionError("language_projection.* is missing: mBLIP needs the projection to the LLM")
  llm_params, llm_meta = fam.to_params(llm_sd, text_config)
  if name == "t5" and "lm_head" not in llm_params and not text_config.get("tie_word_embeddings", True):
    raise ConversionError("the mT5 LLM has tie_word_embeddings=False but no lm_head.weight")
  return {**params, "language_model": llm_params}, {**image_meta, "llm_family": name, "llm_meta": llm_meta}


def to_state_dict(params: dict, hf_config: dict, meta: dict) -> dict[str, np.ndarray]:
  _, fam, text_config = _llm(hf_config)
  image = {k: v for k, v in params.items() if k != "language_model"}
  sd = blip2_family.to_state_dict(image, hf_config, meta)
  llm = fam.to_state_dict(params["language_model"], text_config, meta.get("llm_meta", {}))
  return {**sd, **{LLM_PREFIX + k: v for k, v in llm.items()}}


# ----------------------------------------------------------------------------- the seed's training checkpoints
# The seed (Lightning, src/tasks/vllm/checkpoint.py) saves `<epoch>-<step>.ckpt` whose `state_dict` keeps only
# the unfrozen non-LLM modules, keys prefixed `model.model.` (`query_tokens` [1, Q, D], `qformer.*`,
# `language_projection.*`, each module whole or absent), and, when the LLM has LoRA, the PEFT adapter
# (`save_pretrained` of the LLM) in the sibling folder `<epoch>-<step>`. `load_seed_checkpoint` puts both onto
# the params of a converted base mBLIP; `python -m mmret_jax.convert.mblip seed CKPT BASE DST [--adapter auto]`
# writes the result as a converted dir (`python -m mmret_jax.eval.generation --model DST` reads it).

SEED_PREFIX = "model.model."
SEED_MODULES = ("query_tokens", "qformer", "language_projection")


def adapter_dir_of(ckpt_path: str | os.PathLike) -> pathlib.Path | None:
  """The seed's PEFT adapter folder next to `<epoch>-<step>.ckpt` (`<epoch>-<step>/`), or None if absent."""
  p = pathlib.Path(ckpt_path)
  d = p.parent / p.name.split(".")[0]
  return d if (d / lora_lib.ADAPTER_CONFIG).exists() else None


def llm_hf_keys(hf_config: dict) -> dict[str, str]:
  """LLM-relative module path -> HF module key (the PEFT adapter keys of mBLIP's LLM)."""
  name, fam, _ = _llm(hf_config)
  cfg = mblip.llm_config(blip2.Blip2Config.from_dict(hf_config))
  return lora_lib.hf_module_keys(fam.seq2seq_rules(cfg) if name == "t5" else fam.rules(cfg))


def _module_of(key: str) -> str:
  return key.split(".", 1)[0]


def read_seed_state_dict(ckpt_path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The `model.model.*` tensors of a seed ckpt (a dict with "state_dict", or a bare state dict), prefix
  stripped; everything else (optimizer states, loops, callbacks) is ignored."""
  import pickle  # pylint: disable=import-outside-toplevel
  try:
    sd = read_state_dict(ckpt_path)
  except pickle.UnpicklingError as e:
    raise ConversionError(
        f"{ckpt_path}: torch.load(weights_only=True) refused an object in the checkpoint ({str(e)[:200]}); "
        "we never unpickle arbitrary objects. Extract the weights once: "
        "torch.save(torch.load(PATH, weights_only=False)['state_dict'], 'seed_state_dict.pt')") from None
  out = {k[len(SEED_PREFIX):]: v for k, v in sd.items() if k.startswith(SEED_PREFIX)}
  if not out:
    sample = ", ".join(sorted(sd)[:5])
    raise ConversionError(f"{ckpt_path}: no {SEED_PREFIX}* weights (keys look like: {sample or 'none'}); is this "
                          "an mBLIP training checkpoint?")
  return out


def load_seed_checkpoint(ckpt_path: str | os.PathLike, base_params: dict, hf_config: dict, *,
                         adapter_dir: str | os.PathLike | None = None, hf_keys: dict[str, str] | None = None,
                         merge: bool = True):
  """Base mBLIP params with the seed ckpt's modules put in, and its LoRA adapter.

  base_params: `MBlip` params (of a converted BLIP-2 / mBLIP dir); hf_config: its HF config. Each of
  `query_tokens`, `qformer`, `language_projection` present in the ckpt replaces the base's whole (strict:
  a `model.model.*` key of no such module, a module with keys missing, or a shape that differs from the base is
  an error naming the key); the absent ones (frozen in that stage) stay. `adapter_dir`: a PEFT adapter of the
  LLM (`lora.load_peft`; "auto": the ckpt's sibling `<epoch>-<step>/`, which must exist); `hf_keys`: LLM module
  path -> HF key (default `llm_hf_keys(hf_config)`).
  Returns the new params (adapter merged into the LLM kernels), or with `merge=False` a tuple (params, adapters,
  LoraConfig) with adapters keyed by full module path (`language_model/...`, for `lora.apply_with_lora`; None,
  None without an adapter). The base params are not modified.
  """
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  base = nn.unbox(base_params)
  sd = read_seed_state_dict(ckpt_path)
  modules = sorted({_module_of(k) for k in sd})
  unknown = sorted(k for k in sd if _module_of(k) not in SEED_MODULES)
  if unknown:
    raise ConversionError(f"{ckpt_path}: {SEED_PREFIX}* keys outside {', '.join(SEED_MODULES)} (a ViT / full-LLM "
                          f"checkpoint is not a seed Q-Former checkpoint): "
                          f"{', '.join(SEED_PREFIX + k for k in unknown[:8])}{' ...' if len(unknown) > 8 else ''}")
  config = blip2.Blip2Config.from_dict(hf_config)
  if "language_projection" not in base:
    raise ConversionError("base params have no language_projection: mBLIP needs the projection to the LLM")
  rules = [r for r in blip2_family.rules(config, True) if _module_of(r.key) in modules]
  expected = {m: base[m] for m in modules}
  try:
    part = state_dict_to_params(rules, sd, expected=expected)
  except ConversionError as e:
    raise ConversionError(f"{ckpt_path} (keys without {SEED_PREFIX}): {e}") from None
  params = {**base, **part}
  if adapter_dir is None:
    return params if merge else (params, None, None)
  if str(adapter_dir) == "auto":
    adapter_dir = adapter_dir_of(ckpt_path)
    if adapter_dir is None:
      raise FileNotFoundError(f"no PEFT adapter folder next to {ckpt_path} (expected "
                              f"{pathlib.Path(ckpt_path).parent / pathlib.Path(ckpt_path).name.split('.')[0]}/"
                              f"{lora_lib.ADAPTER_CONFIG})")
  adapters, lora_cfg = lora_lib.load_peft(adapter_dir, params["language_model"], hf_keys or llm_hf_keys(hf_config))
  adapters = {f"language_model/{k}": v for k, v in nn.unbox(adapters).items()}
  if not merge:
    return params, adapters, lora_cfg
  merged = lora_lib.merge(params, adapters, lora_cfg)
  return jax.tree.map(np.asarray, nn.unbox(merged))


def write_seed_checkpoint(ckpt_path: str | os.PathLike, base: str | os.PathLike, dst: str | os.PathLike, *,
                          adapter_dir: str | os.PathLike | None = None) -> dict:
  """`load_seed_checkpoint` on `base` (a converted or HF mBLIP / BLIP-2 dir), written as a converted dir at
  `dst` with the base's tokenizer files; returns a summary."""
  from mmret_jax import convert  # pylint: disable=import-outside-toplevel
  meta, hf_config, params, _ = convert.load_any(base)
  if meta.get("family") != "mblip":
    raise ConversionError(f"{base} is a {meta.get('family')!r} model; the seed checkpoint needs an mBLIP base")
  new = load_seed_checkpoint(ckpt_path, params, hf_config, adapter_dir=adapter_dir)
  meta = {k: v for k, v in meta.items() if k not in ("family", "format_version")}
  tok = convert.localize(base)
  copied = write_converted(dst, family="mblip", hf_config=hf_config, params=new, meta=meta, tokenizer_src=tok)
  return {"dst": str(dst), "tokenizer_files": copied, "adapter": None if adapter_dir is None else str(adapter_dir)}


def main(argv=None) -> None:
  import argparse  # pylint: disable=import-outside-toplevel
  ap = argparse.ArgumentParser(prog="python -m mmret_jax.convert.mblip",
                               description="mBLIP checkpoint tools")
  sub = ap.add_subparsers(dest="cmd", required=True)
  s = sub.add_parser("seed", help="the seed's Lightning ckpt (+ PEFT adapter) on a base mBLIP -> converted dir")
  s.add_argument("ckpt", help="<epoch>-<step>.ckpt")
  s.add_argument("base", help="converted or HF mBLIP / BLIP-2 dir the run started from")
  s.add_argument("dst", help="output converted dir")
  s.add_argument("--adapter", default=None, help="PEFT adapter dir to merge into the LLM, or 'auto' (the ckpt's "
                 "sibling <epoch>-<step>/)")
  a = ap.parse_args(argv)
  try:
    info = write_seed_checkpoint(a.ckpt, a.base, a.dst, adapter_dir=a.adapter)
  except (ConversionError, FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None
  print(json.dumps(info, indent=1))


if __name__ == "__main__":
  main()
