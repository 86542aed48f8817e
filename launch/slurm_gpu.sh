#!/usr/bin/env bash
# Multi-node GPU training of mmret_jax under SLURM.
#
#   sbatch launch/slurm_gpu.sh [--config.key=value ...]
#   VENV=~/venvs/mmret CONFIG=configs/blair_base.py WORKDIR=/shared/runs/blair sbatch launch/slurm_gpu.sh
#
# Submit from the repository root (the job runs in the submit directory). Default layout: one
# task per GPU (8 per node). For one task per node that drives all its GPUs, submit with
# `sbatch --ntasks-per-node=1 launch/slurm_gpu.sh`; the script then makes every GPU of the node
# visible to that task (JAX_LOCAL_DEVICE_IDS). Extra arguments go to mmret_jax.main.
#
# Each task calls jax.distributed.initialize() (our code does so when SLURM_NTASKS > 1); JAX
# reads the process count and id from SLURM, and the coordinator from JAX_COORDINATOR_ADDRESS,
# set below to the first node of the allocation.
#
# Resume: WORKDIR must be on a filesystem shared by all nodes. Resubmitting the same command
# resumes from the newest checkpoint there. SLURM sends SIGTERM 5 minutes before the time limit
# (--signal), on which the trainer saves a checkpoint and exits with status 75 (mmret_jax.main:
# 0 = finished, 75 = stopped and saved, 1 = error); on 75 this script requeues the job
# (`scontrol requeue`, hence --requeue), which then resumes where it stopped. Set REQUEUE=0 to
# end the job instead.
#
#SBATCH --job-name=mmret
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --output=%x-%j.out

set -euo pipefail

VENV="${VENV:-$HOME/venvs/mmret}"                             # venv with `pip install -e '.[cuda12]'`
CONFIG="${CONFIG:-configs/blair_base.py}"                     # config file (optionally `:arg`)
WORKDIR="${WORKDIR:-$HOME/runs/${SLURM_JOB_NAME:-mmret}}"    # shared FS; same path = resume
COORDINATOR_PORT="${COORDINATOR_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  echo "run this with sbatch (or inside salloc)" >&2
  exit 1
fi

# shellcheck source=/dev/null
source "${VENV}/bin/activate"

NTASKS="${SLURM_NTASKS:-1}"
if (( NTASKS > 1 )); then
  head_node="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | sed -n 1p)"  # not head: SIGPIPE + pipefail
  export JAX_COORDINATOR_ADDRESS="${head_node}:${COORDINATOR_PORT}"
fi

# One task per node: JAX would otherwise give each process only GPU ${SLURM_LOCALID} (= 0).
# One task per GPU: leave it to JAX (device = SLURM_LOCALID); don't use --gpus-per-task, which
# would hide the other GPUs and break that mapping.
if (( NTASKS == ${SLURM_JOB_NUM_NODES:-1} )); then
  gpus="${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L | wc -l)}"
  JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 $((gpus - 1)))"
  export JAX_LOCAL_DEVICE_IDS
fi

# Since SLURM 22.05 srun no longer inherits --cpus-per-task from sbatch.
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
  export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK}"
fi

echo "job ${SLURM_JOB_ID}: ${SLURM_JOB_NUM_NODES} nodes, ${NTASKS} tasks," \
  "coordinator ${JAX_COORDINATOR_ADDRESS:-none}, workdir ${WORKDIR}"

rc=0
srun --kill-on-bad-exit=1 \
  python -m mmret_jax.main --config="${CONFIG}" --workdir="${WORKDIR}" "$@" || rc=$?

EXIT_INTERRUPTED=75  # stopped by SIGTERM/SIGINT after saving a checkpoint
if (( rc == EXIT_INTERRUPTED )) && [[ "${REQUEUE:-1}" != "0" ]]; then
  echo "job ${SLURM_JOB_ID}: stopped and saved; requeueing to resume"
  scontrol requeue "${SLURM_JOB_ID}"
  exit 0
fi
exit "${rc}"
