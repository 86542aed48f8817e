"""The strict conversion driver shared by every family, and the converted-directory format.

A family module (`convert/bert.py`, ...) declares a list of `Rule`s mapping a
param path of ours to a PyTorch state-dict key plus a value transform. The
driver here consumes every source key or ignores it *by name*, fills every
target leaf, checks shapes, and names the offending keys on any mismatch.

A converted directory holds:
  mmret_jax.json   family, heads, HF key prefix, format version
  config.json      the HF config (field names as in transformers)
  params/          Orbax checkpoint of the plain param pytree
  tokenizer / image-processor files copied from the source
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import pathlib
import shutil
from typing import Any, Callable, Iterable

import numpy as np

FORMAT_VERSION = 1
META_FILE = "mmret_jax.json"
PARAMS_DIR = "params"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json",
                   "sentencepiece.bpe.model", "spiece.model", "preprocessor_config.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class ConversionError(ValueError):
  """A checkpoint does not match the model it is converted to (message names the keys)."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """our param path <-> torch key, with the value transform name (`linear` transposes)."""
  path: tuple[str, ...]
  key: str
  # copy | linear ([out, in] <-> [in, out]) | conv ([O, I, kh, kw] <-> [kh, kw, I, O]) |
  # lead1 / lead2 (torch has 1 / 2 extra leading size-1 dims: BLIP's [1, N, D] / [1, 1, D] params)
  kind: str = "copy"


_NDIM = {"linear": 2, "conv": 4}
_LEAD = {"lead1": 1, "lead2": 2}


def linear_rules(path: tuple[str, ...], key: str, bias: bool = True) -> list[Rule]:
  """torch `key.weight` / `key.bias` <-> our `path/kernel` / `path/bias`."""
  r = [Rule(path + ("kernel",), key + ".weight", "linear")]
  return r + [Rule(path + ("bias",), key + ".bias")] if bias else r


def norm_rules(path: tuple[str, ...], key: str) -> list[Rule]:
  """torch LayerNorm `key.weight` / `key.bias` <-> our `path/scale` / `path/bias`."""
  return [Rule(path + ("scale",), key + ".weight"), Rule(path + ("bias",), key + ".bias")]


def _to_ours(kind: str, x: np.ndarray) -> np.ndarray:
  if kind in _NDIM and x.ndim != _NDIM[kind]:
    raise ConversionError(f"expected a {_NDIM[kind]}-D {kind} weight, got shape {x.shape}")
  if kind in _LEAD:
    n = _LEAD[kind]
    if x.ndim <= n or x.shape[:n] != (1,) * n:
      raise ConversionError(f"expected {n} leading size-1 dims, got shape {x.shape}")
    return x.reshape(x.shape[n:])
  if kind == "linear":
    return np.ascontiguousarray(x.T)
  if kind == "conv":
    return np.ascontiguousarray(x.transpose(2, 3, 1, 0))
  return x


def _to_torch(kind: str, x: np.ndarray) -> np.ndarray:
  if kind == "conv":
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
  if kind in _LEAD:
    return x.reshape((1,) * _LEAD[kind] + x.shape)
  return _to_ours(kind, x)  # copy and linear are involutions


# ----------------------------------------------------------------------------- reading weights

def _torch_to_numpy(t) -> np.ndarray:
  import torch  # pylint: disable=import-outside-toplevel
  if t.dtype == torch.bfloat16:
    t = t.float()
  return t.detach().cpu().numpy()


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a .safetensors / .bin / .pth file, a sharded index, or a model dir, into numpy."""
  path = pathlib.Path(path)
  if path.is_dir():
    for name in WEIGHT_FILES:
      if (path / name).exists():
        return read_state_dict(path / name)
    raise ConversionError(f"No weights in {path}: expected one of {', '.join(WEIGHT_FILES)}")
  if not path.exists():
    raise FileNotFoundError(f"Checkpoint not found: {path}")
  if path.name.endswith(".index.json"):
    index = json.loads(path.read_text())
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(index["weight_map"].values())):
      out.update(read_state_dict(path.parent / shard))
    return out
  if path.suffix == ".safetensors":
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    try:
      return dict(load_file(str(path)))
    except TypeError:  # bf16 tensors: numpy cannot hold them, go through torch
      from safetensors.torch import load_file as load_torch  # pylint: disable=import-outside-toplevel
      return {k: _torch_to_numpy(v) for k, v in load_torch(str(path)).items()}
  if path.suffix in (".bin", ".pth", ".pt", ".ckpt"):
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError(f"Reading {path.name} needs PyTorch: pip install 'mmret_jax[torch]'") from e
    import zipfile  # pylint: disable=import-outside-toplevel
    if zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist()):
      raise ConversionError(
          f"{path.name} is a TorchScript archive (e.g. OpenAI's clip.load download); we never execute "
          "TorchScript. Export its weights once: torch.save(torch.jit.load(PATH, map_location='cpu')"
          ".state_dict(), 'clip.pth') and convert that file")
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model", "module"):
      if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
        obj = obj[wrapper]
    return {k: _torch_to_numpy(v) for k, v in obj.items() if hasattr(v, "detach")}
  raise ConversionError(f"Unknown checkpoint format: {path.name} (.safetensors, .bin, .pth)")


# ----------------------------------------------------------------------------- the strict driver

def _flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    d = out
    for k in path[:-1]:
      d = d.setdefault(k, {})
    d[path[-1]] = v
  return out


def _fmt(keys: Iterable[str], limit: int = 12) -> str:
  keys = sorted(keys)
  s = ", ".join(keys[:limit])
  return s + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def state_dict_to_params(rules: list[Rule], sd: dict[str, np.ndarray],
                         expected: dict | None = None,
                         ignore: Iterable[str] = ()) -> dict:
  """Applies `rules` strictly. `expected`: a pytree of shapes (or arrays) to check against.

  `ignore` holds fnmatch patterns of source keys that are known to be harmless.
  Raises ConversionError naming missing, unexpected and mis-shaped keys.
  """
  ignore = tuple(ignore)
  wanted = {r.key for r in rules}
  missing = sorted(wanted - sd.keys())
  unexpected = sorted(k for k in sd.keys() - wanted if not any(fnmatch.fnmatch(k, p) for p in ignore))
  problems = []
  if missing:
    problems.append(f"missing keys: {_fmt(missing)}")
  if unexpected:
    problems.append(f"unexpected keys: {_fmt(unexpected)}")
  flat = {}
  for r in rules:
    if r.key in sd:
      try:
        flat[r.path] = _to_ours(r.kind, np.asarray(sd[r.key]))
      except ConversionError as e:
        raise ConversionError(f"{r.key}: {e}") from None
  if expected is not None:
    exp = {p: tuple(getattr(v, "shape", v)) for p, v in _flatten(expected).items()}
    bad = [f"{r.key} {tuple(sd[r.key].shape)} -> {'/'.join(r.path)} expects {exp[r.path]}"
           for r in rules if r.path in flat and r.path in exp and flat[r.path].shape != exp[r.path]]
    if bad:
      problems.append("shape mismatches: " + "; ".join(bad[:8]) + (" ..." if len(bad) > 8 else ""))
    unfilled = sorted("/".join(p) for p in exp.keys() - {r.path for r in rules})
    if unfilled:
      problems.append(f"model params with no source key: {_fmt(unfilled)}")
  if problems:
    raise ConversionError("Checkpoint does not match the model:\n  " + "\n  ".join(problems))
  return _unflatten(flat)


def params_to_state_dict(rules: list[Rule], params: dict) -> dict[str, np.ndarray]:
  """Inverse of `state_dict_to_params`; every rule's param must exist."""
  flat = _flatten(params)
  missing = [("/".join(r.path)) for r in rules if r.path not in flat]
  if missing:
    raise ConversionError(f"params lack: {_fmt(missing)}")
  extra = sorted("/".join(p) for p in flat.keys() - {r.path for r in rules})
  if extra:
    raise ConversionError(f"params with no torch key: {_fmt(extra)}")
  out = {}
  for r in rules:
    x = _to_torch(r.kind, np.asarray(flat[r.path], np.float32))
    out[r.key] = np.ascontiguousarray(x).reshape(x.shape)  # ascontiguousarray makes 0-d arrays 1-d
  return out


# ----------------------------------------------------------------------------- converted dirs

def copy_tokenizer_files(src: pathlib.Path, dst: pathlib.Path) -> list[str]:
  copied = []
  if src.is_dir():
    for name in TOKENIZER_FILES:
      if (src / name).exists():
        shutil.copy2(src / name, dst / name)
        copied.append(name)
  return copied


def save_params(path: pathlib.Path, params: dict) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(path).absolute()
  if path.exists():
    shutil.rmtree(path)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, params)
  ckptr.wait_until_finished()


def load_params(path: pathlib.Path) -> dict:
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  ckptr = ocp.StandardCheckpointer()
  tree = ckptr.restore(pathlib.Path(path).absolute())
  return _to_numpy_tree(tree)


def _to_numpy_tree(tree):
  if isinstance(tree, dict):
    return {k: _to_numpy_tree(v) for k, v in tree.items()}
  return np.asarray(tree)


def is_converted_dir(path: str | os.PathLike) -> bool:
  return (pathlib.Path(path) / META_FILE).exists()


def write_converted(dst: str | os.PathLike, *, family: str, hf_config: dict, params: dict,
                    meta: dict, tokenizer_src: str | os.PathLike | None) -> list[str]:
  """Writes a converted dir; returns the tokenizer files copied."""
  dst = pathlib.Path(dst)
  dst.mkdir(parents=True, exist_ok=True)
  (dst / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
  save_params(dst / PARAMS_DIR, params)
  copied = copy_tokenizer_files(pathlib.Path(tokenizer_src), dst) if tokenizer_src else []
  full = {"format_version": FORMAT_VERSION, "family": family, **meta}
  (dst / META_FILE).write_text(json.dumps(full, indent=2, sort_keys=True))
  return copied


def read_converted(src: str | os.PathLike) -> tuple[dict, dict, dict]:
  """Returns (meta, hf_config, params) of a converted dir, with clear errors."""
  src = pathlib.Path(src)
  if not src.is_dir():
    raise FileNotFoundError(f"Model directory not found: {src}")
  if not (src / META_FILE).exists():
    raise ConversionError(f"{src} is not a converted mmret_jax directory (no {META_FILE}); "
                          f"convert it with `python -m mmret_jax.convert to-jax SRC {src}`")
  meta = json.loads((src / META_FILE).read_text())
  if meta.get("format_version", 0) > FORMAT_VERSION:
    raise ConversionError(f"{src} was written by a newer mmret_jax (format {meta['format_version']})")
  hf_config = json.loads((src / "config.json").read_text())
  return meta, hf_config, load_params(src / PARAMS_DIR)


Transform = Callable[[np.ndarray], np.ndarray]
