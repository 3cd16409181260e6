#!/usr/bin/env python
"""Regenerate the functional tests' golden files (tests/functional/golden/<case>.json).

    .venv/bin/python scripts/regen_golden.py                  # every case
    .venv/bin/python scripts/regen_golden.py --case bshd pp2  # some
    .venv/bin/python scripts/regen_golden.py --list           # the case table
    .venv/bin/python scripts/regen_golden.py --check          # run, compare, write nothing

The cases come from tests/functional/cases.py (the table the test uses). Runs go concurrently,
each rank with OMP_NUM_THREADS=1, at most --slots processes at a time. Prints, per case and
iteration, lm_loss, load_balancing_loss, z_loss and the relative difference of lm_loss from the
case's group reference (bshd for the layouts), so a layout that drifts is visible before it is
written down as golden.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "functional"))
import cases as C  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", nargs="+", metavar="NAME", help=f"cases to run (default all): {', '.join(C.BY_NAME)}")
    ap.add_argument("--list", action="store_true", help="print the case table and exit")
    ap.add_argument("--check", action="store_true", help="compare with the golden files, write nothing")
    ap.add_argument("--slots", type=int, default=None, help="processes at a time (default: CPUs + 1)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    a = ap.parse_args(argv)

    if a.list:
        for c in C.CASES:
            print(f"{c.name:20s} nproc={c.nproc} group={c.group:8s} {' '.join(c.flags) or '(common flags only)'}")
        print("common:", " ".join(C.COMMON))
        return 0
    names = a.case or list(C.BY_NAME)
    unknown = [n for n in names if n not in C.BY_NAME]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {list(C.BY_NAME)}")
    todo = [C.BY_NAME[n] for n in names]
    # the group references run too (for the drift column), but are written only if asked for
    # the padding runs are shown against bshd (the masked one must equal it)
    ref_of = {c.name: C.REFERENCE.get(c.group, "bshd") for c in todo}
    refs = set(ref_of.values()) - set(names)
    t0 = time.time()
    futs = C.run_cases(todo + [C.BY_NAME[r] for r in sorted(refs)], slots=a.slots, timeout=a.timeout)
    results, failed = {}, []
    for name, f in futs.items():
        try:
            results[name] = f.result()
        except C.RunError as e:
            failed.append(name)
            print(e, file=sys.stderr)
    wall = time.time() - t0

    print(f"\n{'case':20s} {'it':>2s} {'lm_loss':>12s} {'lb_loss':>12s} {'z_loss':>12s} {'lm vs ref':>10s} "
          f"{'experts==ref':>12s}  (ref: bshd; bias_ep2: bias)")
    mismatched = []
    for c in todo:
        if c.name not in results:
            print(f"{c.name:20s} FAILED")
            continue
        recs = results[c.name]
        ref = results.get(ref_of[c.name])
        gold = None
        if a.check:
            try:
                gold = C.load_golden(c.name)["iterations"]
            except OSError:
                gold = None
        for i, r in enumerate(recs):
            rel = same = ""
            if ref is not None:
                rel = f"{abs(r['lm_loss'] - ref[i]['lm_loss']) / abs(ref[i]['lm_loss']):.1e}"
                same = str(r["expert_tokens"] == ref[i]["expert_tokens"])
            print(f"{c.name:20s} {r['iteration']:2d} {r['lm_loss']:12.8f} {r['load_balancing_loss']:12.8f} "
                  f"{r['z_loss']:12.8f} {rel:>10s} {same:>12s}")
            if gold is not None:
                g = gold[i]
                for k in ("lm_loss", "load_balancing_loss", "z_loss"):
                    if abs(r[k] - g[k]) > 1e-4 * abs(g[k]) + 1e-12:
                        mismatched.append(f"{c.name} it {i + 1} {k}: {r[k]!r} vs golden {g[k]!r}")
        if not a.check:
            print(f"  -> wrote {C.write_golden(c, recs).relative_to(C.ROOT)}")
    print(f"\n{len(results)} runs in {wall:.1f}s wall")
    if a.check:
        print("golden check:", "OK" if not mismatched else "\n  " + "\n  ".join(mismatched))
    return 1 if failed or mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
