#!/usr/bin/env bash
# On the GPU machine, after `source scripts/gpu/setup_env.sh; source scripts/gpu/te_setup.sh`: the
# Transformer Engine proof and benchmark (issue 17, docs/performance.md).
#   bash scripts/gpu/te_checks.sh [STEP ...]     (default: all steps, in this order)
#   tests    GPU tests with TE: the core attention against ours at head dims 64/128/256 (and TE's own
#            kernel still wrong at 256), poisoned-memory training steps (TE vs local, THD and BSHD),
#            TE's thd_get_partitioned_indices against our THD CP split, the backend choice, the
#            loss through TE's fused cross entropy (--cross-entropy-fusion-impl te) against the unfused
#   bench    train_throughput.py --variant proxy, 4 samples of up to 4,096 tokens, local and TE side by
#            side in one run (ours-* and ours-te-*, BSHD and THD)
#   experts  TE with megatron's own experts loop (--no-grouped-experts --no-sync-free-dispatch): where
#            the time went before our experts were put on the TE spec
#   graphs   the decoder layers replayed from CUDA graphs on the TE spec: layer_graphs_check.py with TE
#            (graphed against eager), then local and TE THD side by side with --cuda-graph-layers
#   gv       the functional layouts that fit one GPU, TE against local (30 iterations of tiny, bf16)
#   thd3     TE THD twice more (three runs with no non-finite gradient: the trainer raises at the first)
# One GPU-machine call runs at most 10 minutes: give each call a few steps. Each step is bounded by
# STEP_S seconds (default 400; a step of two runs gives each half). Logs and JSON under ${OUT:-/tmp/out}.
# scripts/gpu/te_poison_probe.py TRAINER-FLAGS says where non-finite values start, for a new case.
O=${OUT:-/tmp/out}; mkdir -p "$O"; S=${STEP_S:-400}
B="python3 scripts/bench/train_throughput.py --variant proxy --seq-length 4096 --samples-per-step 4 --warmup 3 --steps 10 --skip-hf --no-gemm-check"
for step in ${@:-tests bench graphs experts gv thd3}; do
  echo "== $step"
  case $step in
    tests) timeout "$S" python3 -m pytest -q -s -rs tests/unit/test_te_gpu.py tests/unit/test_qwen35_registry.py \
             "tests/unit/test_cp_split.py::test_matches_transformer_engine_thd_get_partitioned_indices" \
             "tests/unit/test_lm_loss.py::test_qwen35_training_loss_goes_through_tes_fused_cross_entropy" \
             -p no:cacheprovider > "$O/te_tests.log" 2>&1
           grep -E "^[0-9]+ \{|^raw TE|^te |^local |passed|failed|SKIPPED" "$O/te_tests.log" | cut -c1-300 ;;
    bench) timeout "$S" $B --configs ours-bshd,ours-thd,ours-te-bshd,ours-te-thd --json "$O/bench_local_te.json" \
             > "$O/bench_local_te.log" 2>&1; grep -E "^ours-|TE /|FAILED" "$O/bench_local_te.log" ;;
    experts) timeout "$S" $B --configs ours-bshd --megatron-args \
               "--transformer-impl transformer_engine --no-grouped-experts --no-sync-free-dispatch" \
               > "$O/bench_te_megatron_experts.log" 2>&1; grep -E "^ours-|FAILED" "$O/bench_te_megatron_experts.log" ;;
    graphs) timeout $((S / 3)) python3 scripts/bench/layer_graphs_check.py --variant proxy --steps 2 \
              --megatron-args="--transformer-impl transformer_engine" > "$O/layer_graphs_check_te.txt" 2>&1
            grep -E "^batch|RESULT|Error" "$O/layer_graphs_check_te.txt" | cut -c1-200
            # --passes 2: the mix has several packed-row lengths, each captured (~0.4 s) the first time it is
            # met; the second pass of the same steps is the steady state (seventh session: 6 of 10 captured)
            timeout $((S * 2 / 3)) $B --configs ours-thd,ours-te-thd --cuda-graph-layers --passes 2 \
              --json "$O/bench_local_te_graphs.json" > "$O/bench_local_te_graphs.log" 2>&1
            grep -E "^ours-|TE /|FAILED|cuda graphs" "$O/bench_local_te_graphs.log" ;;
    gv) for impl in local transformer_engine; do
          timeout $((S / 2)) python3 scripts/gpu_validation.py run --out "$O" --cases bshd,thd,bshd_no_mask,bshd_distopt \
            --iters 30 --transformer-impl $impl --name "gv_$impl.json" 2>&1 | grep -E "^\["
        done
        python3 scripts/gpu_validation.py report "$O/gv_transformer_engine.json" --against "$O/gv_local.json" | tail -14 ;;
    thd3) for i in 2 3; do
            timeout $((S / 2)) python3 scripts/gpu_validation.py run --out "$O" --cases thd --iters 30 \
              --transformer-impl transformer_engine --name "gv_te_thd_$i.json" 2>&1 | grep -E "^\["
          done ;;
    *) echo "unknown step $step (tests bench graphs experts gv thd3)"; exit 2 ;;
  esac
done
