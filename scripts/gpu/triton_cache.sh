#!/usr/bin/env bash
# fla's Triton kernels compile (and autotune) on first use: on a fresh GPU machine that took
# 4-6 minutes of each lease (docs/performance.md). The compiled kernels can travel instead:
#   on the GPU machine, after a run:  bash scripts/gpu/triton_cache.sh pack     -> $OUT/tcache.tgz.part0..3
#   here, from the files that came back:
#       cat tcache.tgz.part* > /tmp/tcache.tgz && ../shared/tools/device-carry.sh tcache /tmp/tcache.tgz
#   next lease, after carrying the parts to /tmp/carry/tcache/ (or, one part, with the wheels:
#   carry [".whl", ".carry/tcache/p1"]): scripts/gpu/setup_env.sh unpacks them.
# fla 0.6 autotunes with Triton's cache_results on (FLA_CACHE_RESULTS, default 1), so the cache holds
# the autotuning results too, not only the compiled kernels. A cache is only reused for the same
# Triton version, GPU and kernel sources (fla 0.6.0); anything else compiles again, so a stale
# cache costs nothing but the carry.
set -euo pipefail
dir=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
case "${1:-}" in
  pack)
    out=${OUT:?set OUT}
    tar -czf /tmp/tcache.tgz -C "$dir" .
    size=$(stat -c %s /tmp/tcache.tgz)
    (cd "$out" && split -b 15m -d -a 1 /tmp/tcache.tgz tcache.tgz.part)
    n=$(ls "$out"/tcache.tgz.part* | wc -l)
    echo "triton cache: $(du -sh "$dir" | cut -f1) in $dir -> $((size / 1048576)) MiB packed, $n parts of 15 MB"
    [ "$n" -le 4 ] || echo "more than 4 parts: only 8 files (64 MiB) come back per call; split the packing over calls"
    ;;
  unpack)  # from /tmp/carry/tcache (carried in calls of its own) or .carry/tcache/p1 (one part of
           # <= 58 MB, carried in the same call as .whl: carry [".whl", ".carry/tcache/p1"])
    parts=$(ls /tmp/carry/tcache/part* 2>/dev/null || ls .carry/tcache/p*/part* 2>/dev/null || true)
    [ -n "$parts" ] || { echo "no carried triton cache"; exit 0; }
    mkdir -p "$dir"; cat $parts | tar -xzf - -C "$dir"
    echo "triton cache: $(ls "$dir" | wc -l) kernels unpacked into $dir"
    ;;
  *) echo "usage: $0 pack|unpack"; exit 2 ;;
esac
