#!/usr/bin/env bash
# Launch examples/multimodal_dev/pretrain_multimodal.py with torchrun, on one node or several,
# with the recommended parallel layout of $VARIANT (table: layout_flags below; reasoning and
# memory arithmetic: docs/training.md).
#
# Usage:
#   [VARIANT=tiny|proxy|35B-A3B|122B-A10B|397B-A17B] [NPROC_PER_NODE=N] \
#   [NNODES=N NODE_RANK=i MASTER_ADDR=host MASTER_PORT=port] \
#     bash examples/multimodal_dev/scripts/train_torchrun.sh [extra pretrain_multimodal.py flags]
#
# Examples:
#   # CPU (no GPU): 2 gloo processes, tiny variant, expert parallel 2, mock data
#   VARIANT=tiny bash examples/multimodal_dev/scripts/train_torchrun.sh --train-iters 2 --no-progress-bar
#   # one GPU, the ~1.5B proxy, on real shards
#   VARIANT=proxy bash examples/multimodal_dev/scripts/train_torchrun.sh \
#       --dataset-provider webdataset --data-path data/shapes --train-iters 1000
#   # 4 nodes x 8 GPUs (run on every node, NODE_RANK 0..3; or use train_slurm.sbatch)
#   VARIANT=35B-A3B NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 \
#       bash examples/multimodal_dev/scripts/train_torchrun.sh --save ckpt/35b --save-interval 500
#
# Flags given on the command line come after the table's and win (argparse keeps the last value),
# so any layout entry can be overridden, e.g. `--micro-batch-size 1 --seq-length 2048`.
#
# Environment:
#   VARIANT          model size (default tiny)
#   NPROC_PER_NODE   processes per node (default: number of GPUs, or 2 CPU processes without GPUs)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node rendezvous (defaults 1, 0, 127.0.0.1, 29500)
#   PYTHON           interpreter (default .venv/bin/python under the repo root)
#   DEVICE           gpu | cpu (default: gpu when nvidia-smi lists a GPU, else cpu)
#   LAYOUT=none      use no table flags at all (only yours)
#   DRY_RUN=1        print the command instead of running it
#
#   EXIT_SIGNAL_HANDLER=0  do not add --exit-signal-handler (added whenever --save is given)
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds torchrun waits for its workers after a SIGTERM before
#                    it kills them (default here 240: one iteration plus a checkpoint save)
#
# Preemption and time limits: SLURM (or a user) sends SIGTERM to torchrun and its workers. With
# --save, the workers get --exit-signal-handler: they finish the current iteration, save and exit
# 0; resume with the same command plus --load <the --save directory>. torchrun itself then
# reports the signal it received (SignalException) and exits non-zero: the checkpoint is complete
# regardless (the workers' last line says "stopped on SIGTERM after iteration N, saved to ...").
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/../../.." && pwd)"
cd "$ROOT"

PY="${PYTHON:-.venv/bin/python}"
case "$PY" in /*) ;; *) [ -e "$ROOT/$PY" ] && PY="$ROOT/$PY" ;; esac
command -v "$PY" >/dev/null 2>&1 || { echo "train_torchrun.sh: python '$PY' not found (set PYTHON=...)" >&2; exit 1; }

VARIANT="${VARIANT:-tiny}"

# --- device and process count ---------------------------------------------------------------
count_gpus() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}
NGPU="$(count_gpus)"
if [ -z "${DEVICE:-}" ]; then
  if [ "$NGPU" -gt 0 ]; then DEVICE=gpu; else DEVICE=cpu; fi
fi
if [ -z "${NPROC_PER_NODE:-}" ]; then
  if [ "$DEVICE" = gpu ]; then NPROC_PER_NODE="$NGPU"; else NPROC_PER_NODE=2; fi
fi
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
WORLD=$((NPROC_PER_NODE * NNODES))

# --- recommended layouts ----------------------------------------------------------------------
# One line per variant: GPUS TP PP EP CP MBS GBS SEQ (ETP is 1 whenever TP > 1: experts are
# split over EP only, not over TP). Reasoning and per-GPU memory: docs/training.md. Assumes
# 80 GB GPUs (H100-class), bf16 + distributed optimizer, no activation recompute.
layout_row() {
  case "$1" in
    #            GPUS TP PP EP  CP MBS GBS SEQ
    tiny)      echo "2    1  1  2   1  2   4   256" ;;   # CPU, 2 gloo processes
    proxy)     echo "1    1  1  1   1  2   16  4096" ;;  # 1 GPU, ~48 GB
    35B-A3B)   echo "32   2  1  32  1  1   256 4096" ;;  # 4 nodes x 8, ~48 GB
    122B-A10B) echo "128  2  2  64  1  1   512 4096" ;;  # 16 nodes x 8, ~62 GB
    397B-A17B) echo "256  2  4  64  2  1   512 4096" ;;  # 32 nodes x 8, ~63 GB
    *) return 1 ;;
  esac
}

# Prints the flags for variant $1 on $DEVICE with world size $WORLD.
layout_flags() {
  local row gpus tp pp ep cp mbs gbs seq dp flags
  row="$(layout_row "$1")" || { echo "train_torchrun.sh: no layout for VARIANT=$1 (tiny, proxy, 35B-A3B, 122B-A10B, 397B-A17B; or LAYOUT=none)" >&2; return 1; }
  read -r gpus tp pp ep cp mbs gbs seq <<<"$row"
  if [ "$WORLD" -ne "$gpus" ]; then
    echo "train_torchrun.sh: note: the $1 layout is sized for $gpus processes, this run has $WORLD" >&2
  fi
  if [ $((WORLD % (tp * pp * cp))) -ne 0 ]; then
    echo "train_torchrun.sh: $WORLD processes cannot hold TP=$tp x PP=$pp x CP=$cp; give the layout flags" \
         "yourself (after the script's arguments they win) or LAYOUT=none" >&2
    return 1
  fi
  # Halve EP until EP x PP divides the world (e.g. tiny on 1 process: EP 1); fewer experts'
  # shards means more expert memory per GPU, so this is only for trying a layout out small.
  while [ $((WORLD % (ep * pp))) -ne 0 ] && [ "$ep" -gt 1 ]; do ep=$((ep / 2)); done
  dp=$((WORLD / (tp * pp * cp)))
  # The global batch must be a multiple of micro-batch x DP.
  if [ $((gbs % (mbs * dp))) -ne 0 ]; then gbs=$((mbs * dp)); fi
  flags="--variant $1 --tensor-model-parallel-size $tp --pipeline-model-parallel-size $pp"
  flags+=" --expert-model-parallel-size $ep --context-parallel-size $cp"
  flags+=" --micro-batch-size $mbs --global-batch-size $gbs --seq-length $seq"
  if [ "$tp" -gt 1 ]; then
    # megatron-core trains MoE under TP only with sequence parallel; experts are not TP-split.
    flags+=" --sequence-parallel --expert-tensor-parallel-size 1"
  fi
  if [ "$DEVICE" = gpu ]; then
    # GPU only (the trainer rejects both on CPU): bf16 weights, optimizer state sharded over DP.
    flags+=" --bf16 --use-distributed-optimizer"
    # all-to-all dispatch sends each token only to the ranks holding its experts.
    [ "$ep" -gt 1 ] && flags+=" --moe-token-dispatcher-type alltoall"
  fi
  echo "$flags"
}

LAYOUT_FLAGS=()
if [ "${LAYOUT:-}" != none ]; then
  FLAGS_STR="$(layout_flags "$VARIANT")"
  read -r -a LAYOUT_FLAGS <<<"$FLAGS_STR"
else
  LAYOUT_FLAGS=(--variant "$VARIANT")
fi

# --- environment ------------------------------------------------------------------------------
NCPU="$(nproc 2>/dev/null || echo 2)"
THREADS=$((NCPU / NPROC_PER_NODE)); [ "$THREADS" -ge 1 ] || THREADS=1
[ "$DEVICE" = gpu ] && [ "$THREADS" -gt 8 ] && THREADS=8
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$THREADS}"
export PYTHONUNBUFFERED=1
if [ "$DEVICE" = gpu ]; then
  # One hardware queue: keeps TP/SP communication kernels in issue order with the GEMMs they
  # overlap (megatron-core expects it with sequence parallel).
  export CUDA_DEVICE_MAX_CONNECTIONS=1
  export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
  # NCCL hints (set them in your environment to fit the cluster):
  #   export NCCL_DEBUG=WARN                 # INFO to see rings/trees and the transport chosen
  #   export NCCL_SOCKET_IFNAME=^lo,docker0  # the interface for bootstrap traffic
  #   export NCCL_IB_HCA=mlx5                # the InfiniBand / RoCE adapters to use
  #   export NCCL_IB_GID_INDEX=3             # RoCE v2 fabrics
  #   export NCCL_NVLS_ENABLE=0              # if NVLink SHARP / multicast is not allowed
  #   --distributed-timeout-minutes N        raise (default 10) for slow first checkpoint loads
else
  # CPU runs use gloo; on several hosts name the interface: export GLOO_SOCKET_IFNAME=eth0
  export CUDA_VISIBLE_DEVICES=""
fi

# a save on SIGTERM whenever there is somewhere to save to (the trainer refuses the flag without --save)
EXTRA_FLAGS=()
if [ "${EXIT_SIGNAL_HANDLER:-1}" != 0 ]; then
  for a in "$@"; do
    case "$a" in --save|--save=*) EXTRA_FLAGS=(--exit-signal-handler); break ;; esac
  done
fi
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-240}"

CMD=("$PY" -m torch.distributed.run
     --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE"
     --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
     examples/multimodal_dev/pretrain_multimodal.py
     "${LAYOUT_FLAGS[@]}" ${EXTRA_FLAGS[@]+"${EXTRA_FLAGS[@]}"} "$@")

echo "train_torchrun.sh: VARIANT=$VARIANT DEVICE=$DEVICE nodes=$NNODES node_rank=$NODE_RANK" \
     "procs/node=$NPROC_PER_NODE world=$WORLD OMP_NUM_THREADS=$OMP_NUM_THREADS" >&2
echo "+ ${CMD[*]}" >&2
if [ "${DRY_RUN:-0}" = 1 ]; then exit 0; fi
exec "${CMD[@]}"
