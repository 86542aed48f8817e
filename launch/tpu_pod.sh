#!/usr/bin/env bash
# Training of mmret_jax on a Cloud TPU VM pod slice (every worker runs the same command).
#
#   TPU_NAME=mmret-v4-32 ZONE=us-central2-b WORKDIR=/mnt/gcs/runs/blair \
#     launch/tpu_pod.sh [--config.key=value ...]
#
# Steps (run from the repository root on your workstation, with gcloud authenticated):
#   1. create the slice if TPU_NAME does not exist yet (ACCELERATOR_TYPE, RUNTIME_VERSION);
#   2. copy this working tree to ~/mmret on all workers and `pip install -e '.[tpu,gcs]'` into a venv
#      (skip with INSTALL=0 on reruns);
#   3. run `python -m mmret_jax.main` on all workers at once. Each worker is one JAX process.
#      JAX_COORDINATOR_ADDRESS is set to worker 0 (which makes our code call
#      jax.distributed.initialize()); JAX reads the process count and id from the TPU metadata.
# Extra arguments go to mmret_jax.main.
#
# WORKDIR must be reachable by every worker under the same path: a gcsfuse mount of a bucket or a shared
# filesystem mounted on all workers (not a worker's local disk). Checkpoints from all hosts and
# the resume state live there; rerunning the same command resumes. The command runs in the
# foreground over ssh: use DETACH=1 to run it under nohup on the workers (log in ~/mmret/train.log).
# Delete the slice when done: gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE".

set -euo pipefail

TPU_NAME="${TPU_NAME:-mmret-v4-32}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
CONFIG="${CONFIG:-configs/blair_base.py}"
WORKDIR="${WORKDIR:?set WORKDIR to a shared path every worker sees (gcsfuse mount or NFS)}"
REMOTE_DIR="${REMOTE_DIR:-mmret}"          # code on the workers, relative to ~
REMOTE_VENV="${REMOTE_VENV:-venv-mmret}"   # venv on the workers, relative to ~
COORDINATOR_PORT="${COORDINATOR_PORT:-8482}"  # JAX's default on Cloud TPU
INSTALL="${INSTALL:-1}"
DETACH="${DETACH:-0}"

tpu() { gcloud compute tpus tpu-vm "$@" --zone="${ZONE}"; }
on_all() { tpu ssh "${TPU_NAME}" --worker=all --command="$1"; }

if ! tpu describe "${TPU_NAME}" >/dev/null 2>&1; then
  echo "creating ${ACCELERATOR_TYPE} slice ${TPU_NAME} in ${ZONE}"
  tpu create "${TPU_NAME}" --accelerator-type="${ACCELERATOR_TYPE}" --version="${RUNTIME_VERSION}"
fi

if [[ "${INSTALL}" == "1" ]]; then
  archive="$(mktemp -t mmret.XXXXXX.tgz)"
  trap 'rm -f "${archive}"' EXIT
  tar czf "${archive}" --exclude=.git --exclude='*.egg-info' --exclude=__pycache__ \
    --exclude=venv --exclude=.venv .
  tpu scp "${archive}" "${TPU_NAME}:mmret.tgz" --worker=all
  on_all "set -e; rm -rf ~/${REMOTE_DIR}; mkdir -p ~/${REMOTE_DIR}; \
tar xzf ~/mmret.tgz -C ~/${REMOTE_DIR}; \
[ -d ~/${REMOTE_VENV} ] || python3 -m venv ~/${REMOTE_VENV}; \
~/${REMOTE_VENV}/bin/pip install -q -U pip; \
cd ~/${REMOTE_DIR} && ~/${REMOTE_VENV}/bin/pip install -q -e '.[tpu,gcs]'"
fi

coordinator_ip="$(tpu describe "${TPU_NAME}" --format='value(networkEndpoints[0].ipAddress)')"

# Quote the pass-through arguments once for the remote shell.
extra=""
if (( $# > 0 )); then
  extra="$(printf ' %q' "$@")"
fi
export_coord="export JAX_COORDINATOR_ADDRESS=${coordinator_ip}:${COORDINATOR_PORT}"
train="~/${REMOTE_VENV}/bin/python -m mmret_jax.main --config=$(printf '%q' "${CONFIG}") \
--workdir=$(printf '%q' "${WORKDIR}")${extra}"

if [[ "${DETACH}" == "1" ]]; then
  on_all "cd ~/${REMOTE_DIR} && ${export_coord} && nohup ${train} > train.log 2>&1 < /dev/null &"
  echo "started on all workers; follow with: gcloud compute tpus tpu-vm ssh ${TPU_NAME}" \
    "--zone=${ZONE} --worker=0 --command='tail -f ~/${REMOTE_DIR}/train.log'"
else
  on_all "cd ~/${REMOTE_DIR} && ${export_coord} && ${train}"
fi
