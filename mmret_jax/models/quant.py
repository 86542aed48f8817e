"""Weight-only int8 / int4 quantization of the frozen LLM's `layers.Dense` kernels, through qwix (PTQ).

mBLIP loads its frozen mT0 / BLOOMZ in 8 bit (bitsandbytes) and trains LoRA on top. Here the same idea runs on
qwix (google/qwix 0.1.8, checked with jax 0.10.2 / flax 0.12.8), chosen over aqtp because its linen path
wraps our modules unchanged: `qwix.quantize_model(model, qwix.PtqProvider(rules))` intercepts `jnp.einsum`
and `Module.param` inside the modules whose path a rule matches, so the `[in, out]` kernel of a matched
`layers.Dense` becomes a `qwix.QArray` (int8 / int4 values [in, out] + float32 per-output-channel absmax scales
[1, out], or [in / tile, out] with `tile_size`) and `x @ W` runs as qwix's quantized einsum
(x @ q, times the scales). Activations stay in `dtype`; only the weights are quantized. aqtp's linen path needs
its own `AqtEinsum` / `AqtDotGeneral` modules inside the model code instead.

A quantized param tree has the model's layout; each matched `kernel` leaf is a `qwix.WithAux(QArray(qvalue,
scale))` whose `qvalue` [in, out] / `scale` [1, out] stay boxed with the kernel's logical axis names
((in, out) / (None, out)), so the partitioning rules shard them like the float kernel.

Targets are regexes matched in full (`re.fullmatch`, as `lora.TARGETS`) against `layers.Dense` module paths;
`TARGETS` holds the frozen LLM's block matrices (attention + FFN of every block; embeddings, norms and the LM
head stay float, as bitsandbytes' `load_in_8bit` keeps `lm_head`). A matched module must reach its kernel
through `Dense.__call__` (its einsum): the packed projections (`layers.fused_projections`) run unfused here
(`layers.unfused_projections`), and the fused-qkv attention kernels (`implementation="fused_qkv*"`) and
`layers.dense_act`'s biased-GELU path, which read `weights_only`, are not supported on quantized modules.

LoRA composes: `lora.apply_with_lora(quantized_model(model, config), qparams, adapters, lora_config, ...)`
(its `intercept_methods` wrapper calls the quantized `Dense.__call__` and adds the float adapter path), so
QLoRA-style training updates only the adapters while the int8 weights are read.
int4 (`bits=4`) runs the same path but is coarse per channel (tiny mT5: max|diff| / max|logit| 0.26 vs 0.013
for int8); give it a `tile_size` (untested here).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import qwix
from qwix._src.providers import ptq as _qwix_ptq  # WithAux is not exported by qwix 0.1.8

from mmret_jax.models import layers, lora

Array = jax.Array

# The frozen LLM's block matrices: the same module sets as LoRA's `lora_all` (models/lora.py).
TARGETS: dict[str, tuple[str, ...]] = {"mt5": lora.TARGETS[("mt5", "lora_all")],
                                       "t5": lora.TARGETS[("t5", "lora_all")],
                                       "bloom": lora.TARGETS[("bloom", "lora_all")]}
_QTYPES = {8: "int8", 4: "int4"}


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """targets: regexes over `layers.Dense` module paths (full match); bits: 8 or 4; tile_size: None for one
  scale per output channel, else the number of input rows that share a scale (int4 usually wants 32-128)."""
  targets: tuple[str, ...] = ()
  bits: int = 8
  tile_size: int | None = None

  def __post_init__(self):
    if isinstance(self.targets, str):
      raise ValueError(f"QuantConfig.targets must be a sequence of regexes, got the string {self.targets!r}")
    object.__setattr__(self, "targets", tuple(self.targets))
    if not self.targets:
      raise ValueError("QuantConfig.targets is empty: give regexes over Dense module paths (see quant.TARGETS)")
    for t in self.targets:
      try:
        re.compile(t)
      except re.error as e:
        raise ValueError(f"QuantConfig target {t!r} is not a valid regex: {e}") from None
    if self.bits not in _QTYPES:
      raise ValueError(f"QuantConfig.bits must be one of {sorted(_QTYPES)}, got {self.bits}")
    if self.tile_size is not None and (not isinstance(self.tile_size, int) or self.tile_size <= 0):
      raise ValueError(f"QuantConfig.tile_size must be a positive int or None, got {self.tile_size!r}")

  @property
  def qtype(self) -> str:
    return _QTYPES[self.bits]

  def rules(self) -> list[qwix.QuantizationRule]:
    """One qwix weight-only rule per target, on the einsum of the matched module (Dense.__call__)."""
    return [qwix.QuantizationRule(module_path=t, weight_qtype=self.qtype, tile_size=self.tile_size,
                                  op_names=("einsum",)) for t in self.targets]


class _CastFreeWithAux(_qwix_ptq.WithAux):
  """A quantized kernel whose `.astype` is a no-op: `layers.Dense` casts its kernel to `dtype` before the einsum,
  and qwix 0.1.8's `WithAux.astype` fails on an unboxed QArray (`update_boxed`: "Unsupported type: QArray").
  The quantized einsum takes the activations' dtype itself."""

  def astype(self, dtype):
    del dtype
    return self


class _DenseFriendlyPtq(qwix.PtqProvider):
  """qwix's PTQ provider, its `Module.param` hook returning `_CastFreeWithAux` for quantized kernels."""

  def nn_param(self, module: nn.Module, name: str, *args, **kwargs):
    out = super().nn_param(module, name, *args, **kwargs)
    if isinstance(out, _qwix_ptq.WithAux):
      return _CastFreeWithAux(out.array, out.how)
    return out


# The entry methods qwix intercepts (those a model has): `apply(..., method="decode")` by name reaches the
# quantized subclass's method; a base-class function (`method=T5ForConditionalGeneration.decode`) would bypass it.
_METHODS = ("__call__", "encode", "decode")


@functools.lru_cache(maxsize=64)
def quantized_model(model: nn.Module, config: QuantConfig) -> nn.Module:
  """`model` wrapped by qwix's PTQ provider: a linen module (a subclass of the model's class) taking the params
  of `quantize_params`. Cached per (model, config), so jit sees the same static module each call. Trace it
  inside `layers.unfused_projections()` (`apply_quantized` and the generation entry points do)."""
  methods = tuple(m for m in _METHODS if callable(getattr(type(model), m, None)))
  return qwix.quantize_model(model, _DenseFriendlyPtq(config.rules()), methods=methods)


def llm_config(family: str, bits: int = 8, tile_size: int | None = None, prefix: str = "") -> QuantConfig:
  """The frozen LLM's block matrices of `family` ("mt5" / "t5" / "bloom") as a QuantConfig; `prefix`: the LLM's
  module path inside a bigger model ("language_model/" in `mblip.MBlip`)."""
  if family not in TARGETS:
    raise ValueError(f"no quantization targets for LLM family {family!r} (known: {sorted(TARGETS)})")
  return QuantConfig(tuple(prefix + t for t in TARGETS[family]), bits=bits, tile_size=tile_size)


def quantize_llm(model: nn.Module, params: Mapping, config: QuantConfig) -> dict:
  """mBLIP params (`mblip.MBlip` `model`) with `params["language_model"]` quantized by `config` (LLM-relative
  targets, `llm_config(family)`); the image side stays float. Traceable (shapes come from `jax.eval_shape`)."""
  from mmret_jax import generate  # pylint: disable=import-outside-toplevel  (generate imports this lazily)
  lm = generate.language_model(model)
  ids = jnp.ones((1, 8), jnp.int32)
  kwargs = {"decoder_input_ids": ids} if hasattr(type(lm), "decode") else {}
  return {**params, "language_model": quantize_params(lm, params["language_model"], config, ids, **kwargs)}


def _flat_shapes(tree: Mapping) -> dict[str, tuple[int, ...]]:
  flat = flax.traverse_util.flatten_dict(nn.unbox(dict(tree)), sep="/")
  return {k: tuple(np.shape(v)) for k, v in flat.items()}


def _check_params(params: Mapping, expected: Mapping) -> None:
  """`params` has exactly the keys and shapes of `expected` (the model's own init); errors name the keys."""
  got, want = _flat_shapes(params), _flat_shapes(expected)
  missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  bad = [f"{k}: {got[k]} (model wants {want[k]})" for k in sorted(set(got) & set(want)) if got[k] != want[k]]
  problems = []
  if missing:
    problems.append(f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}")
  if unexpected:
    problems.append(f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
  if bad:
    problems.append(f"mis-shaped {bad[:8]}{' ...' if len(bad) > 8 else ''}")
  if problems:
    raise ValueError("params do not fit the model: " + "; ".join(problems))


def _is_quantized(x: Any) -> bool:
  return isinstance(x, qwix.QArray) or isinstance(x, _qwix_ptq.WithAux)


def quantized_paths(qparams: Mapping) -> list[str]:
  """The '/'-joined param paths of the quantized leaves of `qparams` (e.g. "encoder/block_0/.../q/kernel")."""
  flat = flax.traverse_util.flatten_dict(dict(qparams), sep="/", is_leaf=lambda _, v: _is_quantized(v))
  return sorted(k for k, v in flat.items() if _is_quantized(v))


def quantize_params(model: nn.Module, params: Mapping, config: QuantConfig, *example_args,
                    **example_kwargs) -> dict:
  """The float params of `model` (boxed or not) with every kernel of a targeted `layers.Dense` quantized.

  `example_args` / `example_kwargs`: inputs `model.init` takes (only their shapes are traced, under
  `jax.eval_shape`: nothing runs, no weights are drawn); they tell qwix which kernels the targets reach and how
  to quantize them. Wrong keys or shapes, and targets that match no kernel, raise errors naming them."""
  qmodel = quantized_model(model, config)
  key = jax.random.PRNGKey(0)
  with layers.unfused_projections():
    plain = jax.eval_shape(lambda: model.init(key, *example_args, **example_kwargs))["params"]
    abstract = jax.eval_shape(lambda: qmodel.init(key, *example_args, **example_kwargs))["params"]
  _check_params(params, plain)
  if not quantized_paths(abstract):
    sample = ", ".join(sorted(lora.dense_kernels(plain))[:6])
    raise ValueError(f"quantization targets {list(config.targets)} match no Dense kernel of the model "
                     f"(module paths look like: {sample})")
  raw = jax.tree.map(jnp.asarray, nn.unbox(dict(params)))
  quantized = qwix.quantize_params(raw, abstract)

  def rebox(abs_leaf, value):  # the abstract tree's logical names on the quantized values
    return abs_leaf.replace_boxed(value) if isinstance(abs_leaf, nn.Partitioned) else value
  return jax.tree.map(rebox, abstract, quantized, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def apply_quantized(model: nn.Module, qparams: Mapping, config: QuantConfig, *args, method=None,
                    variables: Mapping | None = None, **kwargs):
  """`model.apply({"params": qparams, **variables}, *args, method=method, **kwargs)` with the targeted Dense
  layers running on their quantized kernels. `variables`: other collections (a decoding cache); pass
  `mutable=["cache"]` as for the float model."""
  qmodel = quantized_model(model, config)
  with layers.unfused_projections():
    return qmodel.apply({"params": qparams, **(variables or {})}, *args, method=method, **kwargs)


def dequantize_params(qparams: Mapping) -> dict:
  """The float32 params the quantized model computes with (q * scale per leaf), boxed like `qparams`."""
  def deq(x):
    if not _is_quantized(x):
      return x
    q = nn.unbox(x.array if isinstance(x, _qwix_ptq.WithAux) else x)
    return qwix.dequantize(q).astype(jnp.float32)
  return jax.tree.map(deq, nn.unbox(dict(qparams)), is_leaf=_is_quantized)


def _leaf_bytes(x: Any) -> int:
  dtype = jnp.dtype(x.dtype)
  bits = jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer) else dtype.itemsize * 8
  return (int(np.prod(x.shape)) * bits + 7) // 8


def weight_bytes(tree: Any, paths: Sequence[str] | None = None) -> int:
  """Bytes of the array leaves of a (boxed, quantized or float) param tree, int4 counted at 4 bits (as XLA packs
  it on GPU / TPU); `paths`: only leaves whose '/'-joined path starts with one of them."""
  leaves = jax.tree_util.tree_flatten_with_path(nn.unbox(tree))[0]
  total = 0
  for path, leaf in leaves:
    if leaf is None or not hasattr(leaf, "shape"):
      continue
    name = "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)
    if paths is None or any(name.startswith(p) for p in paths):
      total += _leaf_bytes(leaf)
  return total
