#!/usr/bin/env bash
# Run ssapo-train on one host with all of its local GPUs (one JAX process drives every GPU).
#
# Usage: launch/gpu_node.sh [--dry-run] [--gpus 0,1,2,3] CONFIG [key=value ...] [ssapo-train flags]
#
#   --dry-run    print the environment and the command instead of running them
#   --gpus LIST  restrict to these GPUs (sets CUDA_VISIBLE_DEVICES); default: all visible GPUs
#
# Environment: PYTHON (default python3), XLA_FLAGS (appended to), XLA_PYTHON_CLIENT_MEM_FRACTION
# (default 0.9). Example:
#   launch/gpu_node.sh configs/zephyr_7b_ultrafeedback.yaml \
#     model.path=/data/models/zephyr-7b-sft-full output_dir=/data/runs/zephyr mesh.fsdp=-1
set -euo pipefail

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0
GPUS=""
ARGS=()
while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --gpus) [[ $# -ge 2 ]] || { echo "gpu_node.sh: --gpus needs a value" >&2; exit 2; }
            GPUS="$2"; shift 2 ;;
    --gpus=*) GPUS="${1#--gpus=}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
if ((${#ARGS[@]} == 0)); then
  usage >&2
  exit 2
fi

# XLA flags for GPUs (see docs/running.md): overlap collectives with compute through the latency
# hiding scheduler, give collectives the highest-priority stream, and combine the many small FSDP
# all-gathers / reduce-scatters into larger NCCL calls.
GPU_XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true"
GPU_XLA_FLAGS+=" --xla_gpu_enable_highest_priority_async_stream=true"
GPU_XLA_FLAGS+=" --xla_gpu_all_reduce_combine_threshold_bytes=134217728"
GPU_XLA_FLAGS+=" --xla_gpu_all_gather_combine_threshold_bytes=134217728"
GPU_XLA_FLAGS+=" --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728"

ENV_VARS=(
  "XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }$GPU_XLA_FLAGS"
  "XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
  "PYTHONPATH=$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
)
if [[ -n "$GPUS" ]]; then
  ENV_VARS+=("CUDA_VISIBLE_DEVICES=$GPUS")
fi
CMD=("${PYTHON:-python3}" -m ssapo_jax.cli "${ARGS[@]}")

if ((DRY_RUN)); then
  printf '%q ' env "${ENV_VARS[@]}" "${CMD[@]}"
  printf '\n'
else
  exec env "${ENV_VARS[@]}" "${CMD[@]}"
fi
