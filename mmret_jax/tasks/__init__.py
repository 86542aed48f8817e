"""Task registry: `config.task` -> the module implementing it (imported lazily)."""

from __future__ import annotations

import importlib

TASKS = {
    "bagformer": "mmret_jax.tasks.bagformer:BagFormerTask",
    "blair": "mmret_jax.tasks.blair:BlairTask",
    "blair_clip": "mmret_jax.tasks.blair_clip:BlairClipTask",
    "cir": "mmret_jax.tasks.cir:CirTask",
    "mblip": "mmret_jax.tasks.mblip:MBlipTask",
    "seqrec": "mmret_jax.tasks.seqrec:SeqRecTask",
    "uniir": "mmret_jax.tasks.uniir:UniIRTask",
    # The names: the same task, restricted to one backbone family of `uniir.variant`.
    "uniir_clip": "mmret_jax.tasks.uniir:UniIRTask",
    "uniir_blip": "mmret_jax.tasks.uniir:UniIRTask",
}


def get(name: str):
  if name not in TASKS:
    raise ValueError(f"Unknown config.task {name!r}; known: {', '.join(sorted(TASKS))}")
  module, cls = TASKS[name].split(":")
  return getattr(importlib.import_module(module), cls)
