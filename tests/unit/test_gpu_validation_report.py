"""``scripts/gpu_validation.py report``: the tables in docs/gpu-validation.md come from it, so its
arithmetic is checked here on a synthetic results file whose expected figures are worked by hand."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_validation", ROOT / "scripts" / "gpu_validation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _m(lm, lb, pad, tokens, experts):
    return {"lm_loss": lm, "load_balancing_loss": lb, "padding_tokens": pad, "tokens": tokens,
            "expert_tokens": experts}


def _case(gpus, ref, metrics, rc=0):
    return {"gpus": gpus, "flags": [], "ref": ref, "what": "w", "rc": rc, "seconds": 1.0, "metrics": metrics}


def test_report_tables_and_plot(tmp_path):
    gv = _load()
    # 10 real tokens, top-2: 20 assignments per layer when padding is masked out of routing;
    # 30 padding tokens routed as well would give (10 + 30) * 2 = 80.
    results = {
        "gpus": 2, "device": "test GPU", "torch": "t", "megatron_core": "m", "iters": 2, "common": ["--x"],
        "cases": {
            "bshd": _case(1, None, [_m(5.0, 1.0, 30, 10, [[12, 8], [10, 10]]), _m(4.0, 1.0, 30, 10, [[11, 9], [10, 10]])]),
            "thd": _case(1, "bshd", [_m(5.0, 1.0, 0, 10, [[12, 8], [10, 10]]), _m(4.04, 0.99, 0, 10, [[11, 9], [10, 10]])]),
            "bshd_no_mask": _case(1, None, [_m(5.0, 1.25, 30, 10, [[50, 30], [40, 40]]), _m(4.0, 1.2, 30, 10, [[1, 1], [1, 1]])]),
            "tp2_sp": _case(2, "bshd", [_m(5.05, 1.01, 30, 10, [[12, 8], [10, 10]]), _m(4.0, 1.0, 30, 10, [[11, 9], [10, 10]])]),
            "cp2_thd": _case(2, "bshd", [], rc=1),
        },
        "not_run": {"ep8": "needs 8 GPUs, this machine has 2"},
    }
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    doc, svg = tmp_path / "t.md", tmp_path / "c.svg"
    assert gv.main(["report", str(path), "--doc", str(doc), "--svg", str(svg)]) == 0
    text = doc.read_text()
    pad_section = text.split("Padding invariance in every layout")[1]
    rows = {line.split("|")[1].strip(): [x.strip() for x in line.split("|")[1:-1]]
            for line in pad_section.splitlines() if line.startswith("| ") and not line.startswith("| case")}

    # main table: max over iterations of |x - ref| / |ref|
    main = [line for line in text.splitlines() if line.startswith("| thd | 1 |")][0].split("|")
    assert main[4].strip() == "1.00e-02"  # lm: |4.04 - 4.0| / 4.0 (iteration 2; iteration 1 is equal)
    assert main[5].strip() == "1.00e-02"  # LB: |0.99 - 1.0| / 1.0
    tp = [line for line in text.splitlines() if line.startswith("| tp2_sp | 2 |")][0].split("|")
    assert tp[4].strip() == "1.00e-02"  # |5.05 - 5.0| / 5.0
    assert "| cp2_thd | 2 | w | FAILED (rc 1) |" in text
    assert "| ep8 | 8 |" in text and "not run: needs 8 GPUs, this machine has 2" in text

    # padding-invariance table: one row per case that ran (not the failed one)
    assert list(rows) == ["bshd", "thd", "bshd_no_mask", "tp2_sp"]
    assert rows["bshd"][1:] == ["30", "10", "2", "1.00000", "0.0e+00 (thd)"]
    assert rows["thd"][1:] == ["0", "10", "2", "1.00000", "-"]
    # without the mask: 80 assignments over 10 real tokens, LB 1.25 is 25% above THD's
    assert rows["bshd_no_mask"][1:] == ["30", "10", "8", "1.25000", "2.5e-01 (thd)"]
    assert rows["tp2_sp"][1:] == ["30", "10", "2", "1.01000", "1.0e-02 (thd)"]

    body = svg.read_text()
    assert body.startswith("<svg") and body.count("<polyline") == 4  # the four cases that ran
