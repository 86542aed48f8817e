"""Settings of a sentence-transformers model directory (`modules.json` and its module configs).

A sentence-transformers dir (e.g. all-MiniLM-L6-v2) is a Hugging Face model dir plus a pipeline:
`modules.json` lists a Transformer module (the HF model, at the dir's root or in a subfolder such as
`0_Transformer/`), a Pooling module (`1_Pooling/config.json`: which pooling) and optionally a
Normalize module (L2 normalisation). `sentence_bert_config.json` holds `max_seq_length` and
`do_lower_case`. `mmret_jax.load` / `embed` use these settings unless the caller overrides them.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

MODULES_FILE = "modules.json"
ST_FILES = (MODULES_FILE, "sentence_bert_config.json", "config_sentence_transformers.json")
# Pooling config keys, in the order sentence-transformers concatenates them, -> our pooling names.
POOLING_MODES = (("pooling_mode_cls_token", "cls"), ("pooling_mode_max_tokens", "max"),
                 ("pooling_mode_mean_tokens", "mean"), ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len"),
                 ("pooling_mode_weightedmean_tokens", "weightedmean"), ("pooling_mode_lasttoken", "lasttoken"))
SUPPORTED_POOLINGS = ("cls", "mean", "max", "mean_sqrt_len", "lasttoken")


class SentenceTransformersError(ValueError):
  """A sentence-transformers dir this package cannot reproduce (the message says what)."""


@dataclasses.dataclass(frozen=True)
class STSettings:
  """What a sentence-transformers pipeline does around its transformer."""
  pooling: str = "mean"
  normalize: bool = False
  max_length: int | None = None
  do_lower_case: bool = False
  transformer_path: str = ""  # the HF model's folder inside the dir ("" = the dir itself)

  def describe(self) -> str:
    return (f"{self.pooling} pooling, {'L2-normalised' if self.normalize else 'not normalised'}, "
            f"max_length {self.max_length if self.max_length else 'model default'}"
            f"{', lower-cased input' if self.do_lower_case else ''}")


def _module_kind(entry: dict) -> str:
  return str(entry.get("type", "")).rsplit(".", 1)[-1]


def _read_json(path: pathlib.Path) -> dict:
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise SentenceTransformersError(f"cannot read {path}: {e}") from e


def is_st_dir(path) -> bool:
  return (pathlib.Path(path) / MODULES_FILE).is_file()


def read_settings(path) -> STSettings | None:
  """The pipeline settings of a sentence-transformers dir, or None if `path` is not one."""
  path = pathlib.Path(path)
  if not is_st_dir(path):
    return None
  modules = _read_json(path / MODULES_FILE)
  if not isinstance(modules, list):
    raise SentenceTransformersError(f"{path / MODULES_FILE}: expected a list of modules")
  kinds = [_module_kind(m) for m in modules]
  unsupported = [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]
  if unsupported or not kinds or kinds[0] != "Transformer":
    raise SentenceTransformersError(
        f"{path}: sentence-transformers modules {kinds} are not supported (a Transformer, then "
        "Pooling and optionally Normalize, are); embed with the plain Hugging Face model instead")
  transformer_path = str(modules[0].get("path", "") or "")
  cfg = {}
  for folder in (path / transformer_path, path):
    if (folder / "sentence_bert_config.json").is_file():
      cfg = _read_json(folder / "sentence_bert_config.json")
      break
  if "Pooling" not in kinds:  # the pipeline would return token embeddings, not one vector a text
    raise SentenceTransformersError(f"{path}: no Pooling module in {MODULES_FILE}")
  entry = modules[kinds.index("Pooling")]
  pcfg = _read_json(path / entry.get("path", "") / "config.json")
  modes = [name for key, name in POOLING_MODES if pcfg.get(key)]
  if len(modes) != 1 or modes[0] not in SUPPORTED_POOLINGS:
    raise SentenceTransformersError(
        f"{path}: pooling {modes or 'none'} is not supported (one of {', '.join(SUPPORTED_POOLINGS)})")
  pooling = modes[0]
  max_len = cfg.get("max_seq_length")
  return STSettings(pooling=pooling, normalize="Normalize" in kinds,
                    max_length=int(max_len) if max_len else None,
                    do_lower_case=bool(cfg.get("do_lower_case", False)), transformer_path=transformer_path)


def model_dir(path) -> pathlib.Path:
  """The folder holding the HF model of `path` (its Transformer module's folder for an ST dir)."""
  path = pathlib.Path(path)
  if not is_st_dir(path):
    return path
  settings = read_settings(path)
  return path / settings.transformer_path


def copy_files(src, dst) -> list[str]:
  """Copies the pipeline files of an ST dir `src` (modules.json, configs, module folders other than
  the transformer's) into `dst`, rewriting the transformer's path to the root; returns their names."""
  src, dst = pathlib.Path(src), pathlib.Path(dst)
  if not is_st_dir(src):
    return []
  settings = read_settings(src)
  copied = []
  for name in ST_FILES:
    for folder in (src, src / settings.transformer_path):
      if (folder / name).is_file():
        shutil.copy2(folder / name, dst / name)
        copied.append(name)
        break
  modules = _read_json(src / MODULES_FILE)
  for m in modules:
    rel = str(m.get("path", "") or "")
    if _module_kind(m) != "Transformer" and rel and (src / rel).is_dir():
      shutil.copytree(src / rel, dst / rel, dirs_exist_ok=True)
      copied.append(rel + "/")
  modules[0]["path"] = ""  # the converted dir holds the transformer at its root
  (dst / MODULES_FILE).write_text(json.dumps(modules, indent=2), encoding="utf-8")
  return copied
