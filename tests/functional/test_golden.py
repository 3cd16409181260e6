"""Functional tests: short training runs of every case in ``cases.py``, compared with the golden
values in ``golden/`` and with one another.

What they prove:

* ``test_matches_golden`` / ``test_expert_tokens_match_golden``: the numbers of each layout have
  not moved since the golden files were written (regression: model, router, losses, data,
  loop). Regenerate on purpose with ``scripts/regen_golden.py`` after a deliberate change.
* ``test_layout_agrees_with_reference``: every parallel layout (THD, TP2+SP, EP2 with either
  dispatcher, CP2, PP2) trains exactly like one BSHD process: lm_loss, load_balancing_loss and
  z_loss within ``RTOL``, and tokens per expert *equal*. The last one shows that routing and its
  statistics do not depend on the layout, and (PP2) that the MoE layers of every pipeline stage get
  the padding mask: a stage without it routes the padding and its counts grow.
* ``test_padding_mask_*``: on mostly-padded BSHD rows the mask changes the router's losses and
  counts (it is not a no-op), and with it the run equals the packed (THD, no padding) run and the
  less padded BSHD run: padding no longer dilutes the statistics.

Each case runs once per session (concurrently, one CPU per rank, ``MMDEV_FUNCTIONAL_SLOTS``
processes at a time, default the CPU count + 1) however many tests read it.
"""
from __future__ import annotations

import math
import os
import sys
import warnings

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cases as C  # noqa: E402

pytestmark = pytest.mark.functional

RTOL = 1e-4  # CPU fp32: low bits may differ between CPUs and between layouts (reduction order)
LOSSES = ("lm_loss", "load_balancing_loss", "z_loss")
TIMEOUT_S = float(os.environ.get("MMDEV_FUNCTIONAL_TIMEOUT", "420"))


# ---------------------------------------------------------------------------------------- runs
def _cases_needed(session) -> set[str]:
    """The cases the selected tests read: their ``case`` parameter (and its group's reference)
    and their ``cases`` marker."""
    names: set[str] = set()
    for item in session.items:
        if item.get_closest_marker("functional") is None:
            continue
        cs = getattr(item, "callspec", None)
        if cs is not None and "case" in cs.params:
            c = C.BY_NAME[cs.params["case"]]
            names.add(c.name)
            if item.get_closest_marker("with_reference") and c.group in C.REFERENCE:
                names.add(C.REFERENCE[c.group])
        m = item.get_closest_marker("cases")
        if m is not None:
            names.update(m.args)
    return names


class Runs:
    def __init__(self, names: set[str]):
        slots = int(os.environ.get("MMDEV_FUNCTIONAL_SLOTS", "0")) or None
        todo = [c for c in C.CASES if c.name in names]
        self.futures = C.run_cases(todo, slots=slots, timeout=TIMEOUT_S) if todo else {}

    def __getitem__(self, name: str) -> list[dict]:
        if name not in self.futures:  # a test outside the precomputed set (e.g. run by node id)
            self.futures[name] = C.run_cases([C.BY_NAME[name]], timeout=TIMEOUT_S)[name]
        try:
            return self.futures[name].result()
        except C.RunError as e:
            pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="module")
def runs(request):
    return Runs(_cases_needed(request.session))


# ---------------------------------------------------------------------------------------- compare
def _loss_mismatches(got: list[dict], want: list[dict], keys=LOSSES, rtol=RTOL) -> list[str]:
    out = []
    if len(got) != len(want):
        return [f"{len(got)} iterations, expected {len(want)}"]
    for g, w in zip(got, want):
        for k in keys:
            a, b = g[k], w[k]
            if not (math.isfinite(a) and math.isclose(a, b, rel_tol=rtol, abs_tol=1e-9)):
                rel = abs(a - b) / max(abs(b), 1e-30)
                out.append(f"iteration {g['iteration']} {k}: {a!r} vs {b!r} (rel {rel:.2e} > {rtol:g})")
    return out


def _expert_mismatches(got: list[dict], want: list[dict]) -> list[str]:
    return [
        f"iteration {g['iteration']} expert_tokens: {g['expert_tokens']} vs {w['expert_tokens']}"
        for g, w in zip(got, want)
        if g["expert_tokens"] != w["expert_tokens"]
    ]


def _golden(case: C.Case) -> dict:
    try:
        gold = C.load_golden(case.name)
    except FileNotFoundError:
        pytest.fail(f"no golden file for {case.name}: run scripts/regen_golden.py --case {case.name}", pytrace=False)
    if gold["flags"] != case.golden_argv or gold["nproc"] != case.nproc:
        pytest.fail(f"golden/{case.name}.json was made with other flags than cases.py's: run "
                    f"scripts/regen_golden.py --case {case.name}\n  golden: {gold['nproc']} x {gold['flags']}\n"
                    f"  now:    {case.nproc} x {case.golden_argv}", pytrace=False)
    now = C.versions()
    for k in ("torch", "megatron-core"):
        if gold["versions"].get(k) != now[k]:
            warnings.warn(f"golden/{case.name}.json was made with {k} {gold['versions'].get(k)}, this is {now[k]}")
    return gold


ALL = [c.name for c in C.CASES]
LAYOUTS = [c.name for c in C.CASES if c.group in C.REFERENCE and c.name != C.REFERENCE[c.group]]


# ---------------------------------------------------------------------------------------- golden
@pytest.mark.parametrize("case", ALL)
def test_matches_golden(case, runs):
    c = C.BY_NAME[case]
    gold = _golden(c)
    bad = _loss_mismatches(runs[case], gold["iterations"])
    assert not bad, f"{case} differs from golden/{case}.json:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("case", ALL)
def test_expert_tokens_match_golden(case, runs):
    c = C.BY_NAME[case]
    gold = _golden(c)
    got = runs[case]
    bad = _expert_mismatches(got, gold["iterations"])
    bad += [f"iteration {g['iteration']} tokens {g['tokens']} vs golden {w['tokens']}"
            for g, w in zip(got, gold["iterations"]) if g["tokens"] != w["tokens"]]
    assert not bad, f"{case} differs from golden/{case}.json:\n  " + "\n  ".join(bad)


# ---------------------------------------------------------------------------------------- layouts
@pytest.mark.with_reference
@pytest.mark.parametrize("case", LAYOUTS)
def test_layout_agrees_with_reference(case, runs):
    c = C.BY_NAME[case]
    ref_name = C.REFERENCE[c.group]
    got, ref = runs[case], runs[ref_name]
    # the same samples (the mock stream is DP-invariant; tokens are summed over DP replicas)
    assert [r["tokens"] for r in got] == [r["tokens"] for r in ref], f"{case} trained on other samples than {ref_name}"
    bad = _loss_mismatches(got, ref) + _expert_mismatches(got, ref)
    assert not bad, f"{case} does not agree with {ref_name}:\n  " + "\n  ".join(bad)


# ---------------------------------------------------------------------------------------- padding
def _topk(recs: list[dict]) -> int:
    """Experts per token, from a masked run: every valid token goes to k experts of each layer."""
    r = recs[0]
    total = sum(r["expert_tokens"][0])
    assert total % r["tokens"] == 0, f"{total} dispatched for {r['tokens']} tokens"
    return total // r["tokens"]


@pytest.mark.cases("bshd_pad512", "bshd_pad512_nomask")
def test_padding_mask_changes_the_router_statistics(runs):
    on, off = runs["bshd_pad512"], runs["bshd_pad512_nomask"]
    # the setting really is mostly padding
    assert all(r["padding_tokens"] > r["tokens"] for r in on), [(r["tokens"], r["padding_tokens"]) for r in on]
    # the same samples and, before any update, the same LM loss: the LM loss is masked by the
    # loss mask either way and the padding sits after the causal text
    assert [r["tokens"] for r in on] == [r["tokens"] for r in off]
    assert math.isclose(on[0]["lm_loss"], off[0]["lm_loss"], rel_tol=RTOL)
    # the load-balancing loss (and z-loss) differ well beyond the tolerance at every iteration
    for a, b in zip(on, off):
        for k in ("load_balancing_loss", "z_loss"):
            rel = abs(a[k] - b[k]) / abs(a[k])
            assert rel > 100 * RTOL, f"iteration {a['iteration']} {k}: mask on {a[k]} vs off {b[k]} (rel {rel:.1e})"
    # tokens per expert: with the mask the routers count the valid tokens only, k per token; without
    # it they cannot tell padding apart and count every position of the rows
    k = _topk(on)
    for a, b in zip(on, off):
        for layer, (ea, eb) in enumerate(zip(a["expert_tokens"], b["expert_tokens"])):
            assert sum(ea) == k * a["tokens"], (a["iteration"], layer, ea)
            assert sum(eb) == k * (b["tokens"] + b["padding_tokens"]), (b["iteration"], layer, eb)
    # iteration 1 (same weights): the valid tokens route the same, the padding only adds to counts
    for ea, eb in zip(on[0]["expert_tokens"], off[0]["expert_tokens"]):
        assert all(y >= x for x, y in zip(ea, eb)), (ea, eb)


@pytest.mark.cases("bshd_pad512", "bshd_pad512_nomask", "thd", "bshd")
def test_padding_mask_makes_padded_bshd_equal_packed_thd(runs):
    on, off, thd, bshd = runs["bshd_pad512"], runs["bshd_pad512_nomask"], runs["thd"], runs["bshd"]
    assert all(r["padding_tokens"] == 0 for r in thd)
    assert [r["tokens"] for r in on] == [r["tokens"] for r in thd], "not the same samples"
    # with the mask, 83% padding changes nothing: equal to the packed run and to 256-long rows
    for other, name in ((thd, "thd"), (bshd, "bshd")):
        bad = _loss_mismatches(on, other) + _expert_mismatches(on, other)
        assert not bad, f"bshd_pad512 vs {name}:\n  " + "\n  ".join(bad)
    # without it the padding dilutes the statistics: no longer equal to the packed run
    assert _loss_mismatches(off, thd, keys=("load_balancing_loss",)), "no-mask run equals THD: mask had no effect?"
