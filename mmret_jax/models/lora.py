"""LoRA adapters (Hu et al. 2022) on any model built from `layers.Dense`, as mBLIP trains its frozen LLM.

A transform outside the model code: the models stay as they are, their params stay frozen, and the adapters
are a separate pytree. For a targeted `layers.Dense` with kernel W [in, out] (bias b):
  lora_A [in, r]  (PEFT init: torch's kaiming_uniform(a=sqrt 5) on [r, in], i.e. U(-1/sqrt(in), 1/sqrt(in)))
  lora_B [r, out] (zeros: a fresh adapter leaves the model unchanged)
  y = x W + b + scale * dropout(x) A B,  scale = lora_alpha / r
PEFT's `LoraLayer` math (`bias="none"`, dropout on the adapter's input only, active in training only).

`apply_with_lora` runs `model.apply` with the adapters injected by `flax.linen.intercept_methods` around
`layers.Dense.__call__` of the adapted modules, so the base kernels are only read (they could be int8 later).
Packed projections (`layers.fused_projections`: T5's self-attention q/k/v, cross-attention k/v and gated
`wi_0`/`wi_1`) run as separate Dense calls inside `apply_with_lora` (`layers.unfused_projections`), so every
adapted module gets PEFT's adapter dropout; a `Dense` still asked for its weights (`weights_only=True`, e.g.
the fused-attention kernels' packed path) returns W + scale * A B.
`merge` folds the adapters into the kernels (mBLIP's release `merge_lora_all`), `unmerge` takes them out.

The lora pytree is flat: {module path "a/b/c" (the Dense's param path without `kernel`): {"lora_A", "lora_B"}},
float32, each leaf boxed with logical axis names (the kernel's in-axis, None) / (None, the kernel's out-axis).
Targets are regexes matched in full (`re.fullmatch`) against those module paths; `TARGETS` holds mBLIP's sets.

Training: put {"params": base, "lora": adapters} in one tree and wrap the optimizer in `freeze_all_but`, so only
leaves whose '/'-joined path matches (`^lora/` plus a stage's own regexes) update; the rest stay bitwise.

PEFT adapter dirs (`adapter_config.json` + `adapter_model.safetensors`, keys `base_model.model.<HF module
key>.lora_A.weight` [r, in] / `.lora_B.weight` [out, r]) are written by `save_peft` and read by `load_peft`; the
HF module key of each of our module paths comes from a family's converter rules (`hf_module_keys`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import zlib
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmret_jax.models import layers

Array = jax.Array

LORA_KEY = "lora"  # the adapters' key in a {"params": ..., "lora": ...} training tree
PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
TASK_TYPES = ("SEQ_2_SEQ_LM", "CAUSAL_LM", "FEATURE_EXTRACTION", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")

_T5_BLOCK = r"(.*/)?block_\d+/layer_\d+"
_BLOOM_BLOCK = r"(.*/)?h_\d+"
# (family, mBLIP's `use_lora` value) -> target regexes over our module paths (models/t5.py, models/bloom.py).
# mT0 `lora_all`: q, k, v, o of the encoder self-, decoder self- and decoder cross-attention, and every FFN
# matrix (the reference's ".k" / ".o" entries, listed plainly); `lora`: q and v. The LM head and the
# embeddings never match.
TARGETS: dict[tuple[str, str], tuple[str, ...]] = {
    ("mt5", "lora_all"): (_T5_BLOCK + r"/(SelfAttention|EncDecAttention)/(q|k|v|o)",
                          _T5_BLOCK + r"/DenseReluDense/(wi_0|wi_1|wo)"),
    ("mt5", "lora"): (_T5_BLOCK + r"/(SelfAttention|EncDecAttention)/(q|v)",),
    ("bloom", "lora_all"): (_BLOOM_BLOCK + r"/self_attention/(query_key_value|dense)",
                            _BLOOM_BLOCK + r"/mlp/(dense_h_to_4h|dense_4h_to_h)"),
    ("bloom", "lora"): (_BLOOM_BLOCK + r"/self_attention/query_key_value",),
}
TARGETS[("t5", "lora_all")], TARGETS[("t5", "lora")] = TARGETS[("mt5", "lora_all")], TARGETS[("mt5", "lora")]


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """PEFT `LoraConfig` fields (names as in adapter_config.json) but `targets`: regexes over our module paths,
  matched in full (PEFT's `target_modules` names HF modules; `save_peft` writes those)."""
  r: int = 8
  lora_alpha: float = 16.0
  lora_dropout: float = 0.05
  targets: tuple[str, ...] = ()

  def __post_init__(self):
    if isinstance(self.targets, str) or not all(isinstance(t, str) for t in self.targets):
      raise ValueError(f"LoraConfig.targets must be a sequence of regexes, got {self.targets!r}")
    object.__setattr__(self, "targets", tuple(self.targets))
    if int(self.r) != self.r or self.r < 1:
      raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
    if not 0.0 <= self.lora_dropout < 1.0:
      raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
    for t in self.targets:
      try:
        re.compile(t)
      except re.error as e:
        raise ValueError(f"LoraConfig target {t!r} is not a valid regex: {e}") from None

  @property
  def scale(self) -> float:
    """PEFT's `scaling`: lora_alpha / r."""
    return self.lora_alpha / self.r

  @classmethod
  def preset(cls, family: str, kind: str = "lora_all", **fields) -> "LoraConfig":
    """mBLIP's targets for `family` ("mt5", "t5", "bloom") and `kind` ("lora_all", "lora"), with mBLIP's
    r = 8, lora_alpha = 16, lora_dropout = 0.05 unless `fields` say otherwise."""
    if (family, kind) not in TARGETS:
      raise ValueError(f"No LoRA preset for ({family!r}, {kind!r}); known: {sorted(TARGETS)}")
    return cls(targets=TARGETS[(family, kind)], **fields)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "LoraConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"Unknown LoraConfig fields {unknown}; known: {sorted(names)}")
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["targets"] = list(self.targets)
    return d


# ----------------------------------------------------------------------------- trees

def _value(x: Any) -> Any:
  return x.value if isinstance(x, nn.Partitioned) else x


def _kernel_names(x: Any) -> tuple[str | None, str | None]:
  return tuple(x.names) if isinstance(x, nn.Partitioned) else (None, None)


def dense_kernels(params: Mapping) -> dict[str, Any]:
  """{module path: kernel leaf (boxed or not)} of every 2-D `kernel` in a (possibly boxed) param tree."""
  out = {}

  def walk(node: Mapping, prefix: str):
    for k, v in node.items():
      path = f"{prefix}/{k}" if prefix else str(k)
      if isinstance(v, Mapping):
        walk(v, path)
      elif k == "kernel" and np.ndim(_value(v)) == 2:
        out[prefix] = v
  walk(params, "")
  return out


def target_paths(params: Mapping, targets: Sequence[str]) -> list[str]:
  """The module paths of the `Dense` kernels in `params` that a target regex matches in full, sorted."""
  compiled = [re.compile(t) for t in targets]
  return sorted(p for p in dense_kernels(params) if any(c.fullmatch(p) for c in compiled))


def _box(a: Array, b: Array, kernel: Any) -> dict[str, nn.LogicallyPartitioned]:
  in_axis, out_axis = _kernel_names(kernel)
  return {"lora_A": nn.LogicallyPartitioned(a, (in_axis, None)),
          "lora_B": nn.LogicallyPartitioned(b, (None, out_axis))}


def init_lora(params: Mapping, config: LoraConfig, rng: Array) -> dict[str, dict[str, nn.LogicallyPartitioned]]:
  """Fresh adapters for every `Dense` kernel of `params` (boxed or not) that `config.targets` match:
  {path: {"lora_A": U(-1/sqrt(in), 1/sqrt(in)) [in, r], "lora_B": zeros [r, out]}}, boxed with logical axis
  names. Each path's A is drawn from `rng` folded with a hash of the path, so adding a target leaves the others'
  draws alone."""
  kernels = dense_kernels(params)
  paths = target_paths(params, config.targets)
  if not paths:
    sample = ", ".join(sorted(kernels)[:6])
    raise ValueError(f"LoRA targets {list(config.targets)} match no Dense kernel of the params "
                     f"(module paths look like: {sample}{', ...' if len(kernels) > 6 else ''})")
  out = {}
  for path in paths:
    d_in, d_out = np.shape(_value(kernels[path]))
    bound = 1.0 / np.sqrt(d_in)  # kaiming_uniform(a=sqrt(5)): gain sqrt(1/3) * sqrt(3 / fan_in)
    key = jax.random.fold_in(rng, zlib.crc32(path.encode()) & 0x7FFFFFFF)
    a = jax.random.uniform(key, (d_in, config.r), jnp.float32, -bound, bound)
    out[path] = _box(a, jnp.zeros((config.r, d_out), jnp.float32), kernels[path])
  return out


def _check_against(params: Mapping, lora: Mapping[str, Mapping[str, Array]]) -> None:
  """Every adapter sits on a Dense kernel of `params`, with matching in / out widths; errors name the paths."""
  kernels = dense_kernels(params)
  missing = sorted(set(lora) - set(kernels))
  if missing:
    raise ValueError(f"LoRA params for modules without a Dense kernel in the params: {missing[:8]}"
                     f"{' ...' if len(missing) > 8 else ''}")
  bad = []
  for path, ab in lora.items():
    if set(ab) != {"lora_A", "lora_B"}:
      raise ValueError(f"LoRA params at {path} must be {{lora_A, lora_B}}, got {sorted(ab)}")
    (d_in, d_out), a, b = np.shape(_value(kernels[path])), np.shape(ab["lora_A"]), np.shape(ab["lora_B"])
    if len(a) != 2 or len(b) != 2 or a[0] != d_in or b[1] != d_out or a[1] != b[0]:
      bad.append(f"{path}: lora_A {a}, lora_B {b} for a kernel [{d_in}, {d_out}]")
  if bad:
    raise ValueError("LoRA params do not fit the kernels: " + "; ".join(bad[:8]))


# ----------------------------------------------------------------------------- injection

def _adapted_dense(module: layers.Dense, next_fun: Callable, args: tuple, kwargs: dict, ab: Mapping[str, Array],
                   scale: float, rate: float):
  """A targeted `layers.Dense.__call__`: dense(x) + scale * dropout(x) A B, or with `weights_only` the kernel
  W + scale * A B (module docstring)."""
  a, b = ab["lora_A"], ab["lora_B"]
  if kwargs.get("weights_only", False):
    kernel, bias = next_fun(*args, **kwargs)
    delta = scale * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))
    return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype), bias
  x = args[0] if args else kwargs["x"]
  y = next_fun(*args, **kwargs)
  if rate > 0:
    x = layers.dropout(module.make_rng("dropout"), x, rate)
  dt = module.dtype
  h = jnp.einsum("...d,dr->...r", x.astype(dt), a.astype(dt))
  return y + (scale * jnp.einsum("...r,rf->...f", h, b.astype(dt))).astype(y.dtype)


def apply_with_lora(model: nn.Module, params: Mapping, lora_params: Mapping, config: LoraConfig, *args,
                    rngs: Mapping[str, Array] | None = None, deterministic: bool = True, method=None,
                    variables: Mapping | None = None, **kw):
  """`model.apply({"params": params, **variables}, *args, deterministic=deterministic, method=method, **kw)`
  with every `layers.Dense` whose module path is a key of `lora_params` adapted (module docstring). The
  adapter dropout (`config.lora_dropout`) runs when not `deterministic`, from the 'dropout' RNG of `rngs`
  (each module folds in its own path). `variables`: other collections (a decoding cache)."""
  lora = nn.unbox(lora_params)
  _check_against(params, lora)
  rate = 0.0 if deterministic else float(config.lora_dropout)
  if rate > 0 and "dropout" not in (rngs or {}):
    raise ValueError("apply_with_lora(deterministic=False) with lora_dropout > 0 needs rngs={'dropout': key}")

  def interceptor(next_fun, args_, kwargs_, context):
    if context.method_name != "__call__" or not isinstance(context.module, layers.Dense):
      return next_fun(*args_, **kwargs_)
    ab = lora.get("/".join(context.module.path))
    if ab is None:
      return next_fun(*args_, **kwargs_)
    return _adapted_dense(context.module, next_fun, args_, kwargs_, ab, config.scale, rate)

  # packed projections (T5's q/k/v, wi_0/wi_1) call each Dense on its own, so each gets its adapter dropout
  with nn.intercept_methods(interceptor), layers.unfused_projections():
    return model.apply({"params": params, **(variables or {})}, *args, rngs=rngs, method=method,
                       deterministic=deterministic, **kw)


# ----------------------------------------------------------------------------- merging

def _add_to_kernels(params: Mapping, lora_params: Mapping, config: LoraConfig, sign: float) -> dict:
  lora = nn.unbox(lora_params)
  _check_against(params, lora)

  def update(node: Mapping, prefix: str) -> dict:
    out = {}
    for k, v in node.items():
      path = f"{prefix}/{k}" if prefix else str(k)
      if isinstance(v, Mapping):
        out[k] = update(v, path)
      elif k == "kernel" and prefix in lora:
        w = _value(v)
        ab = lora[prefix]
        delta = jnp.matmul(ab["lora_A"].astype(jnp.float32), ab["lora_B"].astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)
        new = (w.astype(jnp.float32) + sign * config.scale * delta).astype(w.dtype)
        out[k] = v.replace_boxed(new) if isinstance(v, nn.Partitioned) else new
      else:
        out[k] = v
    return out
  return update(params, "")


def merge(params: Mapping, lora_params: Mapping, config: LoraConfig) -> dict:
  """params with each adapted kernel W <- W + scale * A B (boxes kept): `model.apply` on it gives
  `apply_with_lora`'s outputs (evaluation)."""
  return _add_to_kernels(params, lora_params, config, 1.0)


def unmerge(params: Mapping, lora_params: Mapping, config: LoraConfig) -> dict:
  """The inverse of `merge` (up to float32 rounding): W <- W - scale * A B."""
  return _add_to_kernels(params, lora_params, config, -1.0)


# ----------------------------------------------------------------------------- freezing

def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def trainable_mask(tree: Any, patterns: Sequence[str] = (r"^lora/",)) -> Any:
  """A bool pytree like `tree` (boxes are leaves): True where a regex finds (`re.search`) the leaf's
  '/'-joined path, e.g. `lora/h_0/self_attention/query_key_value/lora_A` in {"params": ..., "lora": ...}."""
  compiled = [re.compile(p) for p in patterns]
  return jax.tree_util.tree_map_with_path(lambda p, _: any(c.search(_path_str(p)) for c in compiled), tree,
                                          is_leaf=lambda x: isinstance(x, nn.Partitioned))


def freeze_all_but(tx, patterns: Sequence[str] = (r"^lora/",)):
  """`tx` on the leaves `trainable_mask(patterns)` marks, zero updates (and no optimizer state) elsewhere, so
  those stay bitwise. Raises when the patterns match no leaf."""
  import optax  # pylint: disable=import-outside-toplevel

  def labels(tree):
    mask = trainable_mask(tree, patterns)
    if not any(jax.tree.leaves(mask)):
      raise ValueError(f"trainable patterns {list(patterns)} match no leaf of the tree")
    return jax.tree.map(lambda m: "train" if m else "frozen", mask)
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


# ----------------------------------------------------------------------------- PEFT adapter dirs

def hf_module_keys(rules: Sequence[Any]) -> dict[str, str]:
  """{our module path: HF module key} of every linear `convert.core.Rule` (`path/kernel` <-> `key.weight`),
  e.g. `hf_module_keys(convert.t5.seq2seq_rules(config))` or `hf_module_keys(convert.bloom.rules(config))`."""
  return {"/".join(r.path[:-1]): r.key[:-len(".weight")] for r in rules
          if r.kind == "linear" and r.path[-1] == "kernel" and r.key.endswith(".weight")}


def _peft_list_matches(key: str, names: Sequence[str]) -> bool:
  """PEFT's rule for a list of `target_modules`: the key is a name or ends with '.' + a name."""
  return any(key == n or key.endswith("." + n) for n in names)


def _target_modules(adapted: Sequence[str], all_keys: Sequence[str]) -> list[str]:
  """The module names PEFT should target: the adapted keys' last components when they select exactly the
  adapted keys among all linear modules, else the full keys."""
  names = sorted({k.rsplit(".", 1)[-1] for k in adapted})
  if {k for k in all_keys if _peft_list_matches(k, names)} == set(adapted):
    return names
  return sorted(adapted)


def save_peft(directory: str | os.PathLike, lora_params: Mapping, config: LoraConfig,
              hf_key_of_path: Mapping[str, str], base_model_name_or_path: str | None = None,
              task_type: str | None = None) -> pathlib.Path:
  """Writes a PEFT LoRA adapter dir (`PeftModel.from_pretrained` loads it): adapter_config.json and
  adapter_model.safetensors with `base_model.model.<HF key>.lora_A.weight` [r, in] / `.lora_B.weight`
  [out, r]. `hf_key_of_path`: our module path -> HF module key (`hf_module_keys`); `task_type`:
  SEQ_2_SEQ_LM (mT0), CAUSAL_LM (BLOOM), ..."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  if task_type is not None and task_type not in TASK_TYPES:
    raise ValueError(f"task_type must be one of {TASK_TYPES} or None, got {task_type!r}")
  lora = jax.device_get(nn.unbox(lora_params))
  unknown = sorted(set(lora) - set(hf_key_of_path))
  if unknown:
    raise ValueError(f"No HF module key for the LoRA modules {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
  tensors = {}
  for path, ab in lora.items():
    a, b = np.asarray(ab["lora_A"], np.float32), np.asarray(ab["lora_B"], np.float32)
    if a.shape[1] != config.r or b.shape[0] != config.r:
      raise ValueError(f"{path}: lora_A {a.shape} / lora_B {b.shape} do not have rank r = {config.r}")
    key = PEFT_PREFIX + hf_key_of_path[path]
    tensors[key + ".lora_A.weight"] = np.ascontiguousarray(a.T)
    tensors[key + ".lora_B.weight"] = np.ascontiguousarray(b.T)
  adapted = [hf_key_of_path[p] for p in lora]
  peft_config = {
      "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
      "r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout, "bias": "none",
      "target_modules": _target_modules(adapted, list(hf_key_of_path.values())), "fan_in_fan_out": False,
      "use_rslora": False, "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
      "inference_mode": True}
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2, sort_keys=True))
  save_file(tensors, str(directory / ADAPTER_WEIGHTS[0]), metadata={"format": "pt"})
  return directory


# adapter_config.json fields whose non-default values change the math or the modules: refused by load_peft.
_UNSUPPORTED = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "bias": "none",
                "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
                "layer_replication": None, "lora_bias": False, "target_parameters": None, "use_qalora": False,
                "trainable_token_indices": None}


def _read_adapter_config(directory: pathlib.Path) -> dict:
  path = directory / ADAPTER_CONFIG
  if not path.exists():
    raise FileNotFoundError(f"Not a PEFT adapter dir: no {ADAPTER_CONFIG} in {directory}")
  cfg = json.loads(path.read_text())
  if cfg.get("peft_type") != "LORA":
    raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
  odd = {k: cfg[k] for k, default in _UNSUPPORTED.items() if k in cfg and cfg[k] != default
         and cfg[k] not in (None, {}, [])}
  if odd:
    raise ValueError(f"{path}: unsupported LoRA options {odd} (plain LoRA only: {_UNSUPPORTED})")
  return cfg


def _targeted(key: str, target_modules: Any) -> bool:
  if isinstance(target_modules, str):  # PEFT: a regex matched in full
    return re.fullmatch(target_modules, key) is not None
  return _peft_list_matches(key, target_modules or ())


def load_peft(directory: str | os.PathLike, params: Mapping, hf_key_of_path: Mapping[str, str]
              ) -> tuple[dict[str, dict[str, nn.LogicallyPartitioned]], LoraConfig]:
  """Reads a PEFT LoRA adapter dir for the model whose (possibly boxed) params are `params`: (boxed lora
  params as `init_lora` makes them, LoraConfig). Strict: a key of no module of ours, a module without its
  A or B, a module `target_modules` selects but the file lacks, or a shape that does not fit the kernel and
  r is an error naming the key."""
  from mmret_jax.convert.core import read_state_dict  # pylint: disable=import-outside-toplevel
  directory = pathlib.Path(directory)
  cfg = _read_adapter_config(directory)
  weights = next((directory / n for n in ADAPTER_WEIGHTS if (directory / n).exists()), None)
  if weights is None:
    raise FileNotFoundError(f"No adapter weights in {directory}: expected one of {ADAPTER_WEIGHTS}")
  sd = read_state_dict(weights)
  r = int(cfg["r"])
  kernels = dense_kernels(params)
  ours = {hf_key_of_path[p]: p for p in kernels if p in hf_key_of_path}
  found: dict[str, dict[str, np.ndarray]] = {}
  unexpected, bad = [], []
  for key, value in sd.items():
    m = re.fullmatch(re.escape(PEFT_PREFIX) + r"(.+)\.(lora_A|lora_B)\.weight", key)
    if m is None or m.group(1) not in ours:
      unexpected.append(key)
      continue
    path, which = ours[m.group(1)], m.group(2)
    d_in, d_out = np.shape(_value(kernels[path]))
    want = (r, d_in) if which == "lora_A" else (d_out, r)
    if tuple(np.shape(value)) != want:
      bad.append(f"{key} {tuple(np.shape(value))}, expected {want}")
    found.setdefault(path, {})[which] = np.asarray(value, np.float32).T
  targeted = {p for k, p in ours.items() if _targeted(k, cfg.get("target_modules"))}
  missing = [f"{PEFT_PREFIX}{hf_key_of_path[p]}.{w}.weight" for p in sorted(targeted | set(found))
             for w in ("lora_A", "lora_B") if w not in found.get(p, {})]
  problems = []
  for what, keys in (("unexpected keys", unexpected), ("missing keys", missing), ("shape mismatches", bad)):
    if keys:
      problems.append(f"{what}: {', '.join(sorted(keys)[:8])}{' ...' if len(keys) > 8 else ''}")
  if problems:
    raise ValueError(f"PEFT adapter {weights} does not match the model:\n  " + "\n  ".join(problems))
  config = LoraConfig(r=r, lora_alpha=float(cfg["lora_alpha"]), lora_dropout=float(cfg.get("lora_dropout", 0.0)),
                      targets=_our_targets(sorted(found), cfg.get("target_modules"), params))
  lora = {p: _box(jnp.asarray(ab["lora_A"]), jnp.asarray(ab["lora_B"]), kernels[p]) for p, ab in found.items()}
  return lora, config


def _our_targets(paths: list[str], target_modules: Any, params: Mapping) -> tuple[str, ...]:
  """Regexes over our module paths selecting exactly `paths`: PEFT's plain names as last path components when
  they do, else the paths themselves."""
  if isinstance(target_modules, (list, tuple)) and all(re.fullmatch(r"\w+", n) for n in target_modules):
    targets = (r"(.*/)?(" + "|".join(sorted(target_modules)) + ")",)
    if target_paths(params, targets) == paths:
      return targets
  return tuple(re.escape(p) for p in paths)
