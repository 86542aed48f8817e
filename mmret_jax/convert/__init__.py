"""Hugging Face / PyTorch weights <-> mmret_jax params. CLI: `python -m mmret_jax.convert`."""

from __future__ import annotations

import json
import os
import pathlib
import types

import numpy as np

from mmret_jax import st_config, storage
from mmret_jax.convert import bagformer as bagformer_family
from mmret_jax.convert import bert as bert_family
from mmret_jax.convert import blip as blip_family
from mmret_jax.convert import blip2 as blip2_family
from mmret_jax.convert import bloom as bloom_family
from mmret_jax.convert import clip as clip_family
from mmret_jax.convert import mblip as mblip_family
from mmret_jax.convert import t5 as t5_family
from mmret_jax.convert import uniir as uniir_family
from mmret_jax.convert.core import (ConversionError, META_FILE, copy_tokenizer_files, is_converted_dir,
                                    read_converted, read_state_dict, write_converted)

# family name -> key-map module; HF model_type -> family name.
FAMILIES: dict[str, types.ModuleType] = {"bert": bert_family, "clip": clip_family, "blip": blip_family,
                                         "t5": t5_family, "uniir": uniir_family, "bagformer": bagformer_family,
                                         "bloom": bloom_family, "mblip": mblip_family, "blip2": blip2_family}
MODEL_TYPE_TO_FAMILY = {**{mt: "bert" for mt in bert_family.MODEL_TYPES},
                        **{mt: "clip" for mt in clip_family.MODEL_TYPES},
                        **{mt: "blip" for mt in blip_family.MODEL_TYPES},
                        **{mt: "t5" for mt in t5_family.MODEL_TYPES},
                        **{mt: "uniir" for mt in uniir_family.MODEL_TYPES},
                        **{mt: "bagformer" for mt in bagformer_family.MODEL_TYPES},
                        **{mt: "bloom" for mt in bloom_family.MODEL_TYPES},
                        # a BLIP-2 dir with its LLM (mT5 / BLOOM): mBLIP; `--family blip2` = the image side only
                        **{mt: "mblip" for mt in mblip_family.MODEL_TYPES}}
# Source formats that are not HF layouts: translated to HF keys + config first. `blip` = the original
# salesforce/BLIP .pth (an HF BLIP dir given with --family blip takes the HF path); `uniir` = a UniIR
# checkpoint (clip_sf / clip_ff / blip_sf / blip_ff, detected), or any CLIP for a zero-shot CLIP-SF;
# `bagformer` = a howard-hou/BagFormer (ALBEF-layout) checkpoint.
SOURCE_FORMATS = {"openai-clip": clip_family.openai_to_hf, "blip": blip_family.original_to_hf,
                  "uniir": uniir_family.original_to_ours, "bagformer": bagformer_family.original_to_ours}

__all__ = ["ConversionError", "to_jax", "to_hf", "convert_in_memory", "load_any", "is_converted_dir"]


def _family_for(hf_config: dict, family: str | None) -> tuple[str, types.ModuleType]:
  if family is not None:
    if family not in FAMILIES:
      raise ConversionError(f"Unknown --family {family!r}; known: {', '.join(sorted({*FAMILIES, *SOURCE_FORMATS}))}")
    return family, FAMILIES[family]
  mt = hf_config.get("model_type")
  if mt not in MODEL_TYPE_TO_FAMILY:
    raise ConversionError(
        f"model_type {mt!r} is not supported yet; supported: {', '.join(sorted(MODEL_TYPE_TO_FAMILY))}")
  name = MODEL_TYPE_TO_FAMILY[mt]
  return name, FAMILIES[name]


def _read_hf_config(src: pathlib.Path, config: str | os.PathLike | None) -> dict:
  cfg_path = pathlib.Path(config) if config else (src / "config.json" if src.is_dir() else None)
  if cfg_path is not None and cfg_path.is_dir():
    cfg_path = cfg_path / "config.json"
  if cfg_path is None:
    raise ConversionError(f"{src} is a bare state dict: pass --config CONFIG.json (an HF config)")
  if not cfg_path.exists():
    raise ConversionError(f"No HF config at {cfg_path}")
  try:
    return json.loads(cfg_path.read_text())
  except json.JSONDecodeError as e:
    raise ConversionError(f"{cfg_path} is not valid JSON: {e}") from e


def convert_in_memory(src: str | os.PathLike, *, config: str | os.PathLike | None = None,
                      family: str | None = None, image_size: int | None = None) -> tuple[dict, dict, dict]:
  """HF dir or bare state dict -> (meta, hf_config, params) without writing anything.

  `image_size`: for an original BLIP .pth or a BagFormer checkpoint, the input size its position table is
  resized to (BLIP: 384; BagFormer: --config's, else the checkpoint's own)."""
  src = pathlib.Path(src)
  if not src.exists():
    raise FileNotFoundError(f"Source not found: {src}")
  src = st_config.model_dir(src)  # a sentence-transformers dir: its Transformer module's folder
  sd = read_state_dict(src) if family in SOURCE_FORMATS else None
  if family == "blip" and not blip_family.is_original(sd):
    family = None  # an HF BLIP dir / state dict: its config says the rest
  if image_size is not None and family not in ("blip", "bagformer"):
    raise ConversionError("--image-size applies to original BLIP and BagFormer checkpoints "
                          "(--family blip / bagformer) only")
  if family in SOURCE_FORMATS:  # e.g. an OpenAI CLIP .pt/.pth: config inferred from the weights
    opts = {}
    if family in ("blip", "bagformer"):  # --config (an HF BlipConfig / a BagFormer config) may fix the dims
      has_config = config or (family == "bagformer" and src.is_dir() and (src / "config.json").exists())
      opts = {"image_size": image_size, "hf_config": _read_hf_config(src, config) if has_config else None}
    elif family == "uniir" and (config or (src.is_dir() and (src / "config.json").exists())):
      opts = {"hf_config": _read_hf_config(src, config)}  # an HF CLIPModel (zero-shot CLIP-SF)
    sd, hf_config = SOURCE_FORMATS[family](sd, **opts)
    name, fam = _family_for(hf_config, None)
  else:
    hf_config = _read_hf_config(src, config)
    name, fam = _family_for(hf_config, family)  # an unsupported model type fails before reading weights
    sd = read_state_dict(src) if sd is None else sd
  params, meta = fam.to_params(sd, hf_config)
  return {"family": name, **meta}, hf_config, params


def to_jax(src: str | os.PathLike, dst: str | os.PathLike, *, config=None, family=None,
           tokenizer: str | os.PathLike | None = None, image_size: int | None = None) -> dict:
  """Converts an HF dir (or bare .safetensors/.bin/.pth + config) into a converted dir."""
  meta, hf_config, params = convert_in_memory(src, config=config, family=family, image_size=image_size)
  src = pathlib.Path(src)
  model_src = st_config.model_dir(src)
  tok_src = tokenizer or (model_src if src.is_dir() else (pathlib.Path(config).parent if config else None))
  fam_name = meta.pop("family")
  copied = write_converted(dst, family=fam_name, hf_config=hf_config, params=params, meta=meta,
                           tokenizer_src=tok_src)
  copied += st_config.copy_files(src, dst)  # sentence-transformers pooling / normalisation settings
  return {"family": fam_name, **meta, "tokenizer_files": copied,
          "num_params": int(sum(np.asarray(x).size for x in _leaves(params)))}


def to_hf(src: str | os.PathLike, dst: str | os.PathLike) -> dict:
  """Converted dir -> HF dir (model.safetensors + config.json + tokenizer files)."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  meta, hf_config, params = read_converted(src)
  name, fam = _family_for(hf_config, meta.get("family"))
  sd = fam.to_state_dict(params, hf_config, meta)
  dst = pathlib.Path(dst)
  dst.mkdir(parents=True, exist_ok=True)
  save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
  (dst / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
  copied = copy_tokenizer_files(pathlib.Path(src), dst) + st_config.copy_files(src, dst)
  return {"family": name, "num_keys": len(sd), "tokenizer_files": copied}


def localize(path: str | os.PathLike) -> pathlib.Path:
  """A local path as is; a remote (gs://...) model dir, or a remote training workdir's exported
  `model/`, downloaded once into the local cache (mmret_jax/storage.py)."""
  if not storage.is_remote(path):
    return pathlib.Path(path)
  remote = storage.as_path(path)
  if not (remote / META_FILE).exists() and (remote / "model" / META_FILE).exists():
    remote = remote / "model"
  return storage.local_copy(str(remote))


def load_any(path: str | os.PathLike) -> tuple[dict, dict, dict, bool]:
  """(meta, hf_config, params, converted_on_the_fly) from a converted dir or an HF dir (local or
  remote)."""
  path = localize(path)
  if not path.exists():
    raise FileNotFoundError(f"Model directory not found: {path}")
  if not is_converted_dir(path) and is_converted_dir(path / "model"):  # a training workdir
    path = path / "model"
  if is_converted_dir(path):
    meta, hf_config, params = read_converted(path)
    return meta, hf_config, params, False
  if path.is_dir() and ((path / "config.json").exists() or st_config.is_st_dir(path)):
    meta, hf_config, params = convert_in_memory(path)
    return meta, hf_config, params, True
  raise ConversionError(f"{path} is neither a converted mmret_jax dir ({META_FILE}) nor a Hugging Face "
                        "model dir (config.json + weights)")


def resolve_pretrained(name_or_path: str) -> pathlib.Path:
  """A local dir as is; a hub id (e.g. `roberta-base`) from the local HF cache, or downloaded when
  online; a gs:// dir is downloaded once into the local cache. Offline and not cached -> a clear
  error saying how to supply the weights."""
  if storage.is_remote(name_or_path):
    return localize(name_or_path)
  path = pathlib.Path(name_or_path).expanduser()
  if path.exists():
    return path
  if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
    raise FileNotFoundError(f"init_from: no such directory {name_or_path}")
  try:
    from huggingface_hub import snapshot_download  # pylint: disable=import-outside-toplevel
    return pathlib.Path(snapshot_download(
        name_or_path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "merges.txt"]))
  except Exception as e:  # offline, not cached, gated, ...  pylint: disable=broad-except
    raise FileNotFoundError(
        f"Cannot get {name_or_path!r} from the Hugging Face hub ({type(e).__name__}). On a machine with "
        f"network: `huggingface-cli download {name_or_path} --local-dir DIR` (or `python -m "
        f"mmret_jax.convert to-jax DIR CONVERTED`), then pass --config.init_from=DIR") from None


def build_model(meta: dict, hf_config: dict, **kw):
  """The Flax module for a (meta, hf_config) pair."""
  _, fam = _family_for(hf_config, meta.get("family"))
  return fam.build_model(hf_config, meta, **kw)


def _leaves(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield tree
