"""The device mesh, logical-axis rules, and shardings for params, optimizer state and batches.

Mesh axes are `data`, `fsdp`, `tensor` (sizes from the config; -1 = infer from
the device count). Model code names logical axes (`batch`, `embed`, `mlp`,
`heads`, `kv`, `vocab`, `length`); `RULES` maps them onto mesh axes, so DP, FSDP
and TP are config changes, not code paths.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.experimental.mesh_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. FSDP shards the `embed` dimension of every kernel over `fsdp`;
# TP shards the attention heads and MLP width over `tensor` (Megatron layout).
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("vocab", None),
    ("length", None),
)


def maybe_initialize_distributed() -> None:
  """Calls `jax.distributed.initialize()` when launched multi-process: SLURM with > 1 task, an explicit
  coordinator (`JAX_COORDINATOR_ADDRESS`, as `launch/tpu_pod.sh` sets), GKE TPU env vars, or
  `MMRET_DISTRIBUTED=1` (let JAX auto-detect, e.g. on a TPU VM pod slice)."""
  if getattr(jax.distributed, "is_initialized", lambda: False)():
    return
  launched = int(os.environ.get("SLURM_NTASKS", "1")) > 1 or os.environ.get("MMRET_DISTRIBUTED") == "1" or \
      "JAX_COORDINATOR_ADDRESS" in os.environ or "TPU_WORKER_HOSTNAMES" in os.environ or \
      "MEGASCALE_COORDINATOR_ADDRESS" in os.environ
  if launched:
    jax.distributed.initialize()


def mesh_shape(spec: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
  """Resolves {data, fsdp, tensor} sizes (-1 = infer, at most one) against `num_devices`."""
  unknown = set(spec) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"Unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
  sizes = [int(spec.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"At most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"{num_devices} devices do not divide into mesh {dict(zip(MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"{num_devices} available (--config.mesh.data=-1 takes whatever the other axes leave)")
  return tuple(sizes)  # type: ignore[return-value]


def sync_processes(name: str) -> None:
  """A barrier across processes (no-op in a single-process run)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def make_mesh(spec: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices) if devices is not None else jax.devices()
  shape = mesh_shape(spec, len(devices))
  try:
    arr = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # pylint: disable=broad-except  # CPU / odd topologies: plain order is fine
    arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, MESH_AXES)


def logical_to_sharding(logical_tree: Any, mesh: Mesh, rules=RULES) -> Any:
  """Tree of logical PartitionSpecs -> tree of NamedShardings."""
  specs = nn.logical_to_mesh(logical_tree, rules)
  return jax.tree.map(lambda s: NamedSharding(mesh, _prune(s, mesh)), specs,
                      is_leaf=lambda x: isinstance(x, P))


def _prune(spec: P, mesh: Mesh) -> P:
  """Drops mesh axes of size 1 (keeps specs readable and valid on any mesh)."""
  def keep(a):
    if a is None:
      return None
    if isinstance(a, tuple):
      t = tuple(x for x in a if mesh.shape[x] > 1)
      return t if len(t) > 1 else (t[0] if t else None)
    return a if mesh.shape[a] > 1 else None
  return P(*(keep(a) for a in spec))


def params_logical_specs(boxed_params: Any) -> Any:
  """Logical PartitionSpecs of a boxed (nn.LogicallyPartitioned) param tree; fails on unnamed leaves."""
  unnamed = []

  def spec(path, x):
    if isinstance(x, nn.LogicallyPartitioned):
      return P(*x.names)
    unnamed.append(jax.tree_util.keystr(path))
    return P()
  specs = jax.tree_util.tree_map_with_path(spec, boxed_params,
                                           is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  if unnamed:
    raise ValueError(f"Params without logical axis names: {unnamed[:8]}")
  return specs


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) dim over data x fsdp; the rest replicated."""
  return NamedSharding(mesh, _prune(P(("data", "fsdp"), *([None] * (ndim - 1))), mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def make_global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Per-process batch shards -> global arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
          for k, v in local.items()}
