#!/usr/bin/env bash
# Run ssapo-train on every worker of a Cloud TPU VM slice (multi-host), creating the slice if needed.
#
# Usage: launch/tpu_pod.sh --name NAME --zone ZONE --accelerator-type TYPE --project PROJECT \
#          --output-dir gs://BUCKET/PATH [options] CONFIG [key=value ...] [ssapo-train flags]
#
#   --version V        TPU VM runtime for a new slice (default: tpu-ubuntu2204-base)
#   --spot             create the slice as Spot capacity
#   --stage URI=DIR    copy URI (gs://...) to DIR on every worker before training; repeatable
#                      (models must be local on each host: --stage gs://b/zephyr=/tmp/zephyr
#                      together with model.path=/tmp/zephyr)
#   --skip-install     reuse the code and virtualenv already on the workers
#   --detach           run in the background on the workers (log: ~/ssapo_train.log)
#   --dry-run          print the mesh the config gets on the slice (first line, a comment) and
#                      the commands, instead of running them
#
# Every worker runs the same command; jax.distributed is initialised on each host (TPU peers are
# auto-detected), outputs and checkpoints go to the gs:// output directory (orbax writes GCS).
set -euo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NAME="" ZONE="" ACCELERATOR="" PROJECT="" OUTPUT_DIR=""
VERSION="tpu-ubuntu2204-base"
SPOT=0 SKIP_INSTALL=0 DETACH=0 DRY_RUN=0
STAGES=()
ARGS=()
need() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }
while (($#)); do
  case "$1" in
    --name) need "$@"; NAME="$2"; shift 2 ;;
    --zone) need "$@"; ZONE="$2"; shift 2 ;;
    --accelerator-type) need "$@"; ACCELERATOR="$2"; shift 2 ;;
    --project) need "$@"; PROJECT="$2"; shift 2 ;;
    --output-dir) need "$@"; OUTPUT_DIR="$2"; shift 2 ;;
    --version) need "$@"; VERSION="$2"; shift 2 ;;
    --stage) need "$@"; STAGES+=("$2"); shift 2 ;;
    --spot) SPOT=1; shift ;;
    --skip-install) SKIP_INSTALL=1; shift ;;
    --detach) DETACH=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
[[ -n "$NAME" ]] || die "--name is required (the TPU VM slice)"
[[ -n "$ZONE" ]] || die "--zone is required (e.g. us-central2-b)"
[[ -n "$ACCELERATOR" ]] || die "--accelerator-type is required (e.g. v4-32, v5p-64)"
[[ -n "$PROJECT" ]] || die "--project is required"
[[ "$OUTPUT_DIR" == gs://* ]] || die "--output-dir must be a gs:// path shared by all workers, got '$OUTPUT_DIR'"
((${#ARGS[@]})) || die "missing CONFIG (a YAML file under configs/)"
CONFIG="${ARGS[0]}"
[[ -f "$CONFIG" ]] || die "config file not found: $CONFIG"
for stage in "${STAGES[@]+"${STAGES[@]}"}"; do
  [[ "$stage" == gs://*=/* ]] || die "--stage expects gs://SRC=/ABSOLUTE/DIR, got '$stage'"
done

REMOTE_DIR="ssapo_jax_src"    # relative to the home directory on each worker
REMOTE_VENV="ssapo_venv"
TARBALL="${TMPDIR:-/tmp}/ssapo_jax_src.tar.gz"
TPU=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE" --project="$PROJECT")

show() { printf '%q ' "$@"; printf '\n'; }

# 0. The mesh the config (with its overrides) resolves to on this slice; a mesh that does not fit
#    the slice's devices stops here. Needs ssapo_jax's dependencies locally (PYTHON, default
#    python3); without them the line says so.
if ((DRY_RUN)); then
  set +e
  MESH_LINE="$(PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" JAX_PLATFORMS=cpu \
    "${PYTHON:-python3}" -m ssapo_jax.pipeline.hosts "$ACCELERATOR" "${ARGS[@]}" 2>&1)"
  status=$?
  set -e
  case $status in
    0) echo "# $MESH_LINE" ;;
    2) die "$(tail -n 1 <<<"$MESH_LINE")" ;;
    *) echo "# mesh: not computed (${PYTHON:-python3} cannot import ssapo_jax: $(tail -n 1 <<<"$MESH_LINE"))" ;;
  esac
fi
run() { if ((DRY_RUN)); then show "$@"; else "$@"; fi; }
ssh_all() { run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$1"; }

# 1. Create the slice unless it exists.
CREATE=("${TPU[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR" --version="$VERSION")
((SPOT)) && CREATE+=(--spot)
DESCRIBE=("${TPU[@]}" describe "$NAME" "${WHERE[@]}")
if ((DRY_RUN)); then
  printf '%s >/dev/null 2>&1 || %s\n' "$(show "${DESCRIBE[@]}")" "$(show "${CREATE[@]}")"
elif ! "${DESCRIBE[@]}" >/dev/null 2>&1; then
  "${CREATE[@]}"
fi

# 2. Ship this checkout (with the config) to every worker and install it in a virtualenv.
if ((!SKIP_INSTALL)); then
  run tar -czf "$TARBALL" -C "$REPO_ROOT" --exclude=.git --exclude=.venv --exclude=runs \
    --exclude=__pycache__ .
  run "${TPU[@]}" scp "$TARBALL" "$NAME:ssapo_jax_src.tar.gz" "${WHERE[@]}" --worker=all
  ssh_all "rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf ssapo_jax_src.tar.gz -C $REMOTE_DIR && python3 -m venv $REMOTE_VENV && $REMOTE_VENV/bin/pip install -q -U pip && $REMOTE_VENV/bin/pip install -q -e './$REMOTE_DIR[tpu]' gcsfs"
  # A config outside the checkout is copied next to it.
  case "$(cd "$(dirname "$CONFIG")" && pwd)/" in
    "$REPO_ROOT"/*) ;;
    *) run "${TPU[@]}" scp "$CONFIG" "$NAME:$REMOTE_DIR/$(basename "$CONFIG")" "${WHERE[@]}" --worker=all
       ARGS[0]="$(basename "$CONFIG")" ;;
  esac
fi
if [[ "$(cd "$(dirname "$CONFIG")" && pwd)/" == "$REPO_ROOT"/* ]]; then
  ARGS[0]="$(python3 -c 'import os,sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' "$CONFIG" "$REPO_ROOT")"
fi

# 3. Stage models/data from GCS onto each worker's local disk.
for stage in "${STAGES[@]+"${STAGES[@]}"}"; do
  src="${stage%%=*}" dst="${stage#*=}"
  ssh_all "mkdir -p $(printf %q "$dst") && gcloud storage cp -r $(printf %q "$src")/* $(printf %q "$dst")/"
done

# 4. The same training command on every worker.
TRAIN=("\$HOME/$REMOTE_VENV/bin/python" -m ssapo_jax.cli "${ARGS[@]}" --output-dir="$OUTPUT_DIR")
TRAIN_LINE="cd \$HOME/$REMOTE_DIR && "
for word in "${TRAIN[@]}"; do
  if [[ "$word" == '$HOME/'* ]]; then TRAIN_LINE+="$word "; else TRAIN_LINE+="$(printf %q "$word") "; fi
done
if ((DETACH)); then
  TRAIN_LINE="cd \$HOME/$REMOTE_DIR && nohup ${TRAIN_LINE#cd \$HOME/$REMOTE_DIR && }> \$HOME/ssapo_train.log 2>&1 &"
fi
ssh_all "$TRAIN_LINE"
