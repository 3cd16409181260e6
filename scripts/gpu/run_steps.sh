#!/usr/bin/env bash
# One GPU-machine call (at most 10 minutes) spent on several named steps, each bounded by what is
# left, with the Triton cache packed at the end whatever happened before:
#   bash scripts/gpu/run_steps.sh DEADLINE_S ITEM...
#   ITEM  h:STEP   scripts/gpu/hybrid_checks.sh STEP (tests gtests ltests units check bench graphs graphsab hfamp mix mixg profile gprofile)
#         t:STEP   scripts/gpu/te_checks.sh STEP (tests bench graphs experts gv thd3; needs TE carried)
#         distopt  tests/unit/test_faults.py -k distributed_optimizer (issue 18; 3 cases, ~6 minutes);
#                  with TE carried megatron's Adam is TE's FusedAdam, so `distopt:torch` runs them
#                  with TE hidden (torch's AdamW)
#         impl     tests/unit/test_faults.py -k transformer_impl: a checkpoint resumed across local <-> TE
#                  (4 cases, tiny and tiny-hybrid, ~100 s each; needs TE carried; without Triton carried
#                  the hybrid runs our pure-PyTorch GDN kernels); `impl:ID` only the case(s) whose id
#                  matches ID, e.g. impl:te_to_local-tiny-hybrid
#         pack     scripts/gpu/triton_cache.sh pack (25 s are kept for it)
# An item gets the time left before DEADLINE_S as its bound (STEP_S); one with less than 40 s left is
# skipped, saying so. After each item, trainers it started in sessions of their own (the fault tests
# do) are stopped, so that a timed-out item cannot run on beside the next one. The first call of a
# lease installs what was carried (scripts/gpu/setup_env.sh, and scripts/gpu/te_setup.sh when TE's
# parts are in /tmp/carry/te); later calls of the same lease find it installed. Logs under $OUT;
# only 8 files come back per call, so when there are more the logs are put into one logs.tgz.
# A whole lease (docs/performance.md): the carry calls of ../shared/tools/device-carry.sh, then e.g.
#   bash scripts/gpu/run_steps.sh 590 distopt h:graphs h:tests pack
# Start each call within 30 s of the last one's end: an idle machine is handed back, and the next
# call then starts a bare one without what was carried and installed (seen: a profile taken without
# fla). Read the logs after the lease's last call, not between calls.
start=$SECONDS; deadline=${1:?usage: run_steps.sh DEADLINE_S ITEM...}; shift
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
setup() {  # $1: script, $2: log; run, not sourced, so that its failure is reported here
  bash "$1" > "$OUT/$2" 2>&1 || { echo "## $1 failed:"; tail -20 "$OUT/$2" | cut -c1-300; return 1; }
  tail -2 "$OUT/$2" | cut -c1-200
}
if [ ! -d /tmp/site/megatron ]; then setup scripts/gpu/setup_env.sh setup.log; fi
if [ ! -d /tmp/tesite/transformer_engine ] && compgen -G "/tmp/carry/te/part*" > /dev/null; then
  setup scripts/gpu/te_setup.sh te_setup.log
fi
export PYTHONPATH=/tmp/tesite:/tmp/tsite:/tmp/site:$PWD:$PWD/examples PYTHONUNBUFFERED=1
for item in "$@"; do
  left=$((deadline - 25 - (SECONDS - start)))
  if [ "$item" = pack ]; then bash scripts/gpu/triton_cache.sh pack; continue; fi
  if [ "$left" -lt 40 ]; then echo "## skipped $item: $left s left"; continue; fi
  echo "## $item ($left s left, at $((SECONDS - start)) s)"
  case $item in
    distopt|distopt:torch|impl|impl:*)
      log="$OUT/${item/:/_}.log" path=$PYTHONPATH expr=distributed_optimizer
      [ "$item" = distopt:torch ] && path=${PYTHONPATH#/tmp/tesite:}
      case $item in impl) expr=transformer_impl ;; impl:*) expr="transformer_impl and ${item#impl:}" ;; esac
      # -v: each case's result is in the log as it ends, so a case cut by the bound leaves the others'
      PYTHONPATH=$path timeout $((left < 540 ? left : 540)) python3 -m pytest -v -rs -p no:cacheprovider \
        tests/unit/test_faults.py -k "$expr" > "$log" 2>&1
      grep -E "PASSED|FAILED|passed|failed|^E " "$log" | tail -8 | cut -c1-300 ;;
    h:*) STEP_S=$left bash scripts/gpu/hybrid_checks.sh "${item#h:}" ;;
    t:*) STEP_S=$left bash scripts/gpu/te_checks.sh "${item#t:}" ;;
    *) echo "## unknown item $item (h:STEP t:STEP distopt distopt:torch impl impl:ID pack): skipped" ;;
  esac
  pkill -f "$PWD/examples/multimodal_dev/pretrain_multimodal.py" 2>/dev/null && sleep 2  # this checkout's only
  pkill -9 -f "$PWD/examples/multimodal_dev/pretrain_multimodal.py" 2>/dev/null
done
if [ "$(find "$OUT" -type f | wc -l)" -gt 8 ]; then
  (cd "$OUT" && find . -type f \( -name "*.log" -o -name "*.txt" \) -print0 | tar -czf logs.tgz --null -T - --remove-files)
  echo "## more than 8 files: the logs are in logs.tgz"
fi
echo "## done at $((SECONDS - start)) s"
