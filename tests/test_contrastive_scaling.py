"""Contrastive training beyond memory on 8 simulated CPU devices (data 4 x fsdp 2): the dense loss, the ring loss
(losses.ring_contrastive_loss: no [B, B] matrix) and GradCache (train/grad_cache.py), alone and together, give
the same losses every step (fp32; only the order of reductions differs) for BLaIR and BLaIR-CLIP through the
real loop; a ring + GradCache run stopped and resumed is bitwise equal to an uninterrupted one. The ring loss
itself equals the dense InfoNCE / sigmoid losses and their gradients (masks, both directions)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
       "--xla_llvm_disable_expensive_passes=true"}
LOSS_ATOL = 2e-5

SCRIPT = textwrap.dedent("""
    import json, pathlib, sys
    sys.path.insert(0, {tests!r}); sys.path.insert(0, {configs!r})
    import jax, jax.numpy as jnp, numpy as np
    from mmret_jax import losses
    from mmret_jax.train import loop, partitioning
    import test_train_blair as tb, test_train_blair_clip as tbc
    tmp = pathlib.Path({tmp!r})
    out = {{}}
    # 1. the ring loss alone vs dense, values and gradients
    mesh = partitioning.make_mesh({{"data": 4, "fsdp": 2, "tensor": 1}})
    rng = np.random.default_rng(0)
    q, c = (jnp.asarray(rng.standard_normal((16, 8)), jnp.float32) for _ in range(2))
    valid = jnp.asarray(rng.random(16) > 0.2)
    worst = 0.0
    for kind in ("info_nce", "sigmoid"):
      for sym in (False, True):
        for v in (None, valid):
          def dense(q, c, s):
            lg = s * q @ c.T
            return losses.info_nce(lg, sym, v) if kind == "info_nce" else losses.sigmoid_loss(lg, -1.0, v)
          def ring(q, c, s):
            return losses.ring_contrastive_loss(q, c, s, mesh, kind=kind, symmetric=sym, valid=v, bias=-1.0)
          ld, gd = jax.value_and_grad(dense, argnums=(0, 1, 2))(q, c, 3.0)
          with jax.set_mesh(mesh):
            lr, gr = jax.jit(jax.value_and_grad(ring, argnums=(0, 1, 2)))(q, c, 3.0)
          rel = max([abs(float(lr) - float(ld)) / abs(float(ld))] +
                    [float(jnp.abs(a - b).max() / jnp.abs(b).max()) for a, b in zip(gr, gd)])
          worst = max(worst, rel)
    out["ring_vs_dense_rel"] = worst
    # 2. BLaIR and BLaIR-CLIP through the loop
    mesh_over = {{"mesh.data": 4, "mesh.fsdp": 2}}
    variants = {{"dense": {{}}, "ring": {{"loss.impl": "ring"}}, "gc": {{"grad_cache.chunk_size": 8}},
                 "ring_gc": {{"loss.impl": "ring", "grad_cache.chunk_size": 8}}}}
    data = tb.write_pairs(tmp / "pairs.tsv")
    for name, over in variants.items():
      loop.train_and_evaluate(tb.tiny_config(data, eval_every=0, **mesh_over, **over), tmp / ("blair_" + name))
      out["blair_" + name] = tb.losses_of(tmp / ("blair_" + name))
    # resume: ring + GradCache stopped at step 3, then resumed
    loop.train_and_evaluate(tb.tiny_config(data, eval_every=0, stop_at_step=3, **mesh_over,
                                           **variants["ring_gc"]), tmp / "blair_resumed")
    res = loop.train_and_evaluate(tb.tiny_config(data, eval_every=0, **mesh_over, **variants["ring_gc"]),
                                  tmp / "blair_resumed")
    out["blair_resumed"] = tb.losses_of(tmp / "blair_resumed")
    clip_data = tbc.write_data(tmp, n=48)
    for name in ("dense", "ring_gc"):
      loop.train_and_evaluate(tbc.tiny_config(clip_data, **mesh_over, **variants[name]), tmp / ("clip_" + name))
      out["clip_" + name] = tbc.losses_of(tmp / ("clip_" + name))
    print("RESULT" + json.dumps(out))
""")


def test_dense_ring_and_grad_cache_agree_on_8_devices(tmp_path):
  script = SCRIPT.format(tests=str(REPO / "tests"), configs=str(REPO / "configs"), tmp=str(tmp_path))
  r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=900)
  assert r.returncode == 0, r.stderr[-4000:]
  out = json.loads(r.stdout.split("RESULT", 1)[1])
  assert out["ring_vs_dense_rel"] <= 1e-5, out["ring_vs_dense_rel"]
  ref = out["blair_dense"]
  assert len(ref) == 6 and ref[-1] < ref[0]
  for name in ("blair_ring", "blair_gc", "blair_ring_gc"):
    np.testing.assert_allclose(out[name], ref, rtol=0, atol=LOSS_ATOL, err_msg=name)
  assert out["blair_resumed"] == out["blair_ring_gc"]  # every logged loss, exactly
  assert len(out["clip_dense"]) == 4
  np.testing.assert_allclose(out["clip_ring_gc"], out["clip_dense"], rtol=0, atol=LOSS_ATOL)
