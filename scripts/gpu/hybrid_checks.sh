#!/usr/bin/env bash
# On the GPU machine, after `source scripts/gpu/setup_env.sh` (Triton 3.9 carried: fla refuses 3.6 on
# Hopper): the Gated DeltaNet proof and benchmark (issue 16, docs/performance.md "The hybrid model").
#   bash scripts/gpu/hybrid_checks.sh [STEP ...]     (default: all steps, in this order)
#   tests    fla against our torch kernels on one GDN layer, the no-sync check, and the hybrid layers
#            graphed against eager (tests/unit/test_layer_graphs.py, tiny-hybrid); each compiles fla's
#            kernels for its own shapes, which a fresh machine did not finish in one call's bound, so
#   gtests   test_gdn_gpu.py alone, and
#   ltests   test_layer_graphs.py alone, for one call each
#   units    the short GPU unit tests (no fla): the sorted dispatch and fused SwiGLU against megatron's
#            dispatcher / SequentialMLP, the expert gradients added under a capture, the LM head on
#            the loss rows (bf16, TE's cross entropy, no host sync)
#   check    layer_graphs_check.py on proxy-hybrid: per-layer outputs, loss and gradients, graphed vs eager
#   bench    the text bench of the HF anchor (4 x 2,048 tokens): ours THD eager and HF in one run
#   graphs   the same, ours THD with --cuda-graph-layers (rows padded to 1,024, samples to 64)
#   graphsab the same, ours-thd beside ours-ab-thd: the graphed step with the trainer flags in $AB
#            added, side by side in one run (default: megatron's fused cross entropy,
#            "--cross-entropy-loss-fusion --cross-entropy-fusion-impl native"; with TE carried also
#            AB="--cross-entropy-loss-fusion --cross-entropy-fusion-impl te"; measured: AB=--chunked-lm-loss);
#            $BASEARGS: trainer flags of both sides (e.g. TE's fused cross entropy, with AB adding to it)
#   hfamp    the graphed text step of ours beside HF twice from one seed: bf16 params (the anchor) and
#            fp32 params + bf16 autocast (hf-amp-bshd: our precision, fp32 master weights and moments);
#            $BASEARGS as in graphsab
#   mix      the variable-length image+text mix (4 samples of <= 4,096 tokens): ours BSHD and THD (rows
#            padded to 1,024: few packed lengths, so few of fla's recompilations), two passes of the
#            same steps, the second the steady state (issue 16's goal: THD >= 1.5x BSHD)
#   mixg     the same mix, THD with --cuda-graph-layers, both layouts with the trainer flags in $MIXARGS
#            (default TE's fused cross entropy: "--cross-entropy-loss-fusion --cross-entropy-fusion-impl te",
#            so TE must be carried; measured 1.48x THD / BSHD in the eighth session)
#   profile  where the eager hybrid step waits (gpu_gaps.py; the trace stays out of $OUT)
#   gprofile the same for the step with --cuda-graph-layers (our fastest; where the 2x of issue 16 went);
#            both with the trainer flags in $PROFARGS, e.g. TE's fused cross entropy
#   pack     the Triton cache into $OUT (scripts/gpu/triton_cache.sh), to carry to the next lease
# One GPU-machine call runs at most 10 minutes, and a fresh machine spends 4-6 of them compiling fla's
# kernels unless a Triton cache was carried: give each call a few steps, and end the lease with `pack`.
# Each step is bounded by STEP_S seconds (default 420). Logs and JSON under ${OUT:-/tmp/out}.
O=${OUT:-/tmp/out}; mkdir -p "$O"; S=${STEP_S:-420}
q() { grep -E "^thd|^bshd|^\{|passed|failed|SKIPPED|Error|^ours|^hf|^best|ours/HF|cuda graphs|warm-up|^layer|differ|max " \
  | cut -c1-300 | tail -${1:-20}; }
TXT="--variant proxy-hybrid --seq-length 2048 --samples-per-step 4 --min-tokens 2048 --max-tokens 2048 --image-prob 0 --no-gemm-check"
for step in ${@:-tests check bench graphs mix profile gprofile pack}; do
  echo "== $step"
  case $step in
    tests) timeout "$S" python3 -m pytest -q -s -rs tests/unit/test_gdn_gpu.py tests/unit/test_layer_graphs.py \
             -p no:cacheprovider > "$O/hybrid_tests.log" 2>&1; q < "$O/hybrid_tests.log" ;;
    gtests) timeout "$S" python3 -m pytest -q -s -rs tests/unit/test_gdn_gpu.py -p no:cacheprovider \
              > "$O/gdn_gpu_tests.log" 2>&1; q < "$O/gdn_gpu_tests.log" ;;
    ltests) timeout "$S" python3 -m pytest -q -s -rs tests/unit/test_layer_graphs.py -p no:cacheprovider \
              > "$O/layer_graphs_tests.log" 2>&1; q < "$O/layer_graphs_tests.log" ;;
    units) timeout "$S" python3 -m pytest -q -rs -p no:cacheprovider tests/unit/test_sorted_dispatch.py \
             tests/unit/test_grouped_experts_storage.py tests/unit/test_lm_head_rows.py -k "gpu or capture" > "$O/units.log" 2>&1; q < "$O/units.log" ;;
    check) timeout "$S" python3 scripts/bench/layer_graphs_check.py --variant proxy-hybrid --seq-length 2048 --steps 3 \
             > "$O/layer_graphs_check_hybrid.txt" 2>&1; q 12 < "$O/layer_graphs_check_hybrid.txt" ;;
    bench) timeout "$S" python3 scripts/bench/train_throughput.py $TXT --warmup 3 --steps 15 --configs ours-thd,hf-bshd \
             --json "$O/hybrid_text.json" > "$O/hybrid_text.log" 2>&1; q 12 < "$O/hybrid_text.log" ;;
    graphs) timeout "$S" python3 scripts/bench/train_throughput.py $TXT --warmup 3 --steps 15 --configs ours-thd --skip-hf \
             --cuda-graph-layers --json "$O/hybrid_text_graphs.json" > "$O/hybrid_text_graphs.log" 2>&1
           q 12 < "$O/hybrid_text_graphs.log" ;;
    graphsab) timeout "$S" python3 scripts/bench/train_throughput.py $TXT --warmup 3 --steps 15 --configs ours-thd,ours-ab-thd \
               --skip-hf --cuda-graph-layers --megatron-args="${BASEARGS:-}" --ab-megatron-args="${AB:---cross-entropy-loss-fusion --cross-entropy-fusion-impl native}" --json "$O/hybrid_text_graphs_ab.json" \
               > "$O/hybrid_text_graphs_ab.log" 2>&1; q 14 < "$O/hybrid_text_graphs_ab.log" ;;
    hfamp) timeout "$S" python3 scripts/bench/train_throughput.py $TXT --warmup 3 --steps 15 \
             --configs ours-thd,hf-bshd,hf-amp-bshd --cuda-graph-layers --megatron-args="${BASEARGS:-}" \
             --json "$O/hybrid_text_hf_amp.json" > "$O/hybrid_text_hf_amp.log" 2>&1; q 14 < "$O/hybrid_text_hf_amp.log" ;;
    mix) timeout "$S" python3 scripts/bench/train_throughput.py --variant proxy-hybrid --seq-length 4096 \
           --samples-per-step 4 --warmup 3 --steps 8 --passes 2 --no-gemm-check --configs ours-bshd,ours-thd --skip-hf \
           --thd-row-multiple 1024 --json "$O/hybrid_mix.json" > "$O/hybrid_mix.log" 2>&1; q 12 < "$O/hybrid_mix.log" ;;
    mixg) timeout "$S" python3 scripts/bench/train_throughput.py --variant proxy-hybrid --seq-length 4096 \
            --samples-per-step 4 --warmup 3 --steps 8 --passes 2 --no-gemm-check --configs ours-bshd,ours-thd --skip-hf \
            --thd-row-multiple 1024 --cuda-graph-layers \
            --megatron-args="${MIXARGS:---cross-entropy-loss-fusion --cross-entropy-fusion-impl te}" \
            --json "$O/hybrid_mix_graphs.json" > "$O/hybrid_mix_graphs.log" 2>&1; q 12 < "$O/hybrid_mix_graphs.log" ;;
    profile) timeout "$S" python3 scripts/bench/gpu_gaps.py proxy-hybrid thd 2048 4 /tmp/prof 4 --no-gemm-check ${PROFARGS:+"--megatron-args=$PROFARGS"} \
             --min-tokens 2048 --max-tokens 2048 --image-prob 0 > "$O/gpu_gaps_hybrid.txt" 2>&1
           grep -A14 "steps: wall" "$O/gpu_gaps_hybrid.txt" | cut -c1-200 ;;
    gprofile) timeout "$S" python3 scripts/bench/gpu_gaps.py proxy-hybrid thd 2048 4 /tmp/gprof 4 --no-gemm-check ${PROFARGS:+"--megatron-args=$PROFARGS"} \
                --min-tokens 2048 --max-tokens 2048 --image-prob 0 --cuda-graph-layers > "$O/gpu_gaps_hybrid_graphs.txt" 2>&1
              grep -A14 "steps: wall" "$O/gpu_gaps_hybrid_graphs.txt" | cut -c1-200 ;;
    pack) bash scripts/gpu/triton_cache.sh pack ;;
    *) echo "unknown step $step (tests gtests ltests units check bench graphs graphsab hfamp mix mixg profile gprofile pack)"; exit 2 ;;
  esac
done
