"""What the Pallas (Triton) kernels share: compiler params and running a kernel per mesh shard.

XLA cannot partition a Pallas call: under a multi-device mesh it would gather every operand onto
every device. `shard_kernel` runs the kernel inside `shard_map` instead, each device on its own
shard, when a multi-device mesh is active (`jax.set_mesh`) and flax's logical axis rules map the
kernel's split dimensions onto it (the training loop sets both).
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import numpy as np

# spec letters -> logical axis names (`train/partitioning.py` RULES); "." = not split
LETTERS = {"b": "batch", "n": "heads"}


def compiler_params(interpret: bool, num_warps: int = 4):
  if interpret:
    return None
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=import-outside-toplevel
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=1)


def kernel_mesh(sizes: Mapping[str, int]):
  """(mesh, {letter: mesh axes or None}) for the split dims `sizes` ({letter: dim size}), or None
  when no multi-device mesh is active or a dim does not divide by its shard count."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or mesh.size == 1:
    return None
  out = {}
  for letter, size in sizes.items():
    axes = nn.logical_to_mesh_axes((LETTERS[letter],))[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a in mesh.axis_names)
    if size % int(np.prod([mesh.shape[a] for a in axes] or [1])):
      return None
    out[letter] = axes or None
  return mesh, out


def shard_count(sizes: Mapping[str, int], letter: str) -> int:
  """How many shards `shard_kernel` splits dim `letter` into (1 without a mesh)."""
  got = kernel_mesh(sizes)
  if got is None or got[1][letter] is None:
    return 1
  mesh, axes = got
  return int(np.prod([mesh.shape[a] for a in axes[letter]]))


def shard_kernel(fn: Callable, in_specs: tuple[str, ...], out_specs: tuple[str, ...],
                 sizes: Mapping[str, int]) -> Callable:
  """`fn` under `shard_map` over the active mesh; specs are strings with one letter per dim (see
  LETTERS). As is when there is nothing to split (see `kernel_mesh`)."""
  got = kernel_mesh(sizes)
  if got is None:
    return fn
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel
  mesh, axes = got
  to_spec = lambda spec: P(*(None if c == "." else axes[c] for c in spec))
  return jax.shard_map(fn, mesh=mesh, in_specs=tuple(map(to_spec, in_specs)),
                       out_specs=tuple(map(to_spec, out_specs)), check_vma=False)
