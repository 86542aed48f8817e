#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md in one go (a lent H100 / H200 with JAX, torch, flax,
# optax, orbax and transformers preinstalled; ml_collections, grain, array-record, tensorboardX and
# portpicker wheels carried in .whl/ when the image lacks them). Logs go to ${OUT:-/tmp/gpu_out}.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/nvidia_smi.txt"
python3 -c "import jax, flax, optax, torch, transformers, grain, ml_collections; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
# The fused attention kernel through Triton: agreement with XLA attention (bf16) and its speed.
python3 benchmarks/fused_attention.py 2>&1 | tee "$OUT/fused_attention.log"
for spec in ${GPU_SHAPES:-384x64 32x64}; do  # pairs x tokens
  b=${spec%x*} l=${spec#*x}
  python3 benchmarks/train_step.py --dtype bfloat16 --batch-size "$b" --seq-len "$l" --steps "${STEPS:-20}" \
    --warmup "${WARMUP:-5}" --rounds 1 --xla-cpu default 2>&1 | tee "$OUT/train_step_b${b}_l${l}.log"
done
# Opt-in kernels not yet timed (model.attention=fused_qkv, model.norm=fused): the JAX step alone at
# the seed's batch for each variant ("+" joins overrides); compare with the JAX line above.
for variant in ${GPU_VARIANTS-model.attention=fused_qkv model.norm=fused model.attention=fused_qkv+model.norm=fused}; do
  sets=(); for kv in ${variant//+/ }; do sets+=(--set "$kv"); done
  python3 benchmarks/train_step.py --dtype bfloat16 --batch-size 384 --seq-len 64 --steps "${STEPS:-20}" \
    --warmup "${WARMUP:-5}" --rounds 1 --xla-cpu default --skip-torch "${sets[@]}" 2>&1 \
    | tee "$OUT/train_step_b384_l64_${variant//[=.+]/_}.log"
done
if [ -n "${GPU_TESTS:-}" ]; then
  timeout "${GPU_TESTS_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider $GPU_TESTS 2>&1 | tee "$OUT/gpu_tests.log" | tail -30
fi
