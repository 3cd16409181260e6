#!/usr/bin/env bash
# On the GPU machine, after `source scripts/gpu/setup_env.sh`: the Gated DeltaNet GPU proof and the
# hybrid benchmark; logs and JSON under ${OUT:-/tmp/out}.
#   1. GPU tests: fla vs our torch kernels in one layer; the other GPU-only tests;
#   2. the multi-rank CPU suites on this GPU machine (their ranks hide the GPU);
#   3. scripts/bench/train_throughput.py --variant proxy-hybrid, text 4 x 2048 (the HF anchor's
#      setting) and the variable-length image+text mix, ours beside HF.
O=${OUT:-/tmp/out}; mkdir -p "$O"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pytest -q -s tests/unit/test_gdn_gpu.py tests/unit/test_layer_graphs.py tests/unit/test_attention.py \
  tests/unit/test_qwen35_vision.py tests/unit/test_sorted_dispatch.py -p no:cacheprovider 2>&1 | tee "$O/gpu_tests.log" | tail -25
timeout 240 python3 -m pytest -q tests/unit/test_cpu_runtime.py tests/unit/test_router_model.py \
  -p no:cacheprovider 2>&1 | tee "$O/cpu_suites_on_gpu.log" | tail -6
B="python3 scripts/bench/train_throughput.py --variant proxy-hybrid --warmup 3 --steps 20 --passes 2 --no-gemm-check"
$B --seq-length 2048 --samples-per-step 4 --min-tokens 2048 --max-tokens 2048 --image-prob 0 \
  --configs ours-bshd,ours-thd,hf-bshd --json "$O/proxy_hybrid_text.json" 2>&1 | tee "$O/bench_text.log" | tail -22
$B --seq-length 4096 --samples-per-step 4 --configs ours-bshd,ours-thd,hf-packed \
  --json "$O/proxy_hybrid_mix.json" 2>&1 | tee "$O/bench_mix.log" | tail -22
