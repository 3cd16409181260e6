#!/usr/bin/env bash
# The main job of the README: train the `tiny` qwen35_vl variant on CPU, on real WebDataset shards.
#
#   bash scripts/setup.sh && bash scripts/train_tiny.sh [extra pretrain_multimodal.py flags]
#
# 1. makes the coloured-shapes dataset (4000 rendered images with questions and answers about
#    them, 8 tar shards) under data/shapes unless it is there already;
# 2. trains for 150 iterations (about a minute on 2 cores): packed THD batches of 16 samples, a
#    progress bar, a log line every 25 iterations, and at the start the unigram baseline (the loss
#    of a model that ignores its inputs) for comparison: the loss falls well below it;
# 3. writes metrics (JSONL, one object per iteration) to runs/tiny/metrics.jsonl, TensorBoard
#    scalars to runs/tiny/tb and a checkpoint to runs/tiny/ckpt. To continue to 300 iterations:
#    `bash scripts/train_tiny.sh --load runs/tiny/ckpt --train-iters 300 --override-opt-param-scheduler`
#    (the flag takes the new schedule; without it the changed --train-iters is refused at load).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || { echo "train_tiny.sh: $PY not found; run 'bash scripts/setup.sh' first" >&2; exit 1; }
DATA="${DATA:-data/shapes}"
RUN="${RUN:-runs/tiny}"
if [ ! -f "$DATA/meta.json" ]; then
  "$PY" examples/multimodal_dev/scripts/make_shapes_dataset.py --out "$DATA" --num-samples 4000 \
    --shard-size 500 --image-size 32 --seed 0
fi
mkdir -p "$RUN"
rm -f "$RUN/metrics.jsonl"
OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" "$PY" examples/multimodal_dev/pretrain_multimodal.py \
  --model-arch qwen35_vl --variant tiny \
  --dataset-provider webdataset --data-path "$DATA" \
  --use-packed-sequence --micro-batch-size 16 --seq-length 256 \
  --train-iters 150 --lr 3e-3 --lr-warmup-iters 10 --log-interval 25 \
  --moe-aux-loss-coeff 1e-2 --moe-z-loss-coeff 1e-3 \
  --metrics-file "$RUN/metrics.jsonl" --tensorboard-dir "$RUN/tb" --save "$RUN/ckpt" \
  "$@"
"$PY" - "$RUN/metrics.jsonl" <<'PYEOF'
import json, sys
recs = [json.loads(line) for line in open(sys.argv[1])]
first, last = recs[0], recs[-1]
tail = recs[-10:]
mean_tail = sum(r["lm_loss"] for r in tail) / len(tail)
print(f"lm loss: {first['lm_loss']:.3f} at iteration {first['iteration']} -> {mean_tail:.3f} "
      f"(mean of the last {len(tail)}); unigram baseline {last['unigram_baseline']:.3f} nats/token")
PYEOF
