"""``scripts/bench/train_throughput.py`` end to end on CPU (tiny, ours only, a few steps): the JSON
has what the docs read from it, and ``--passes 2`` reports the second pass of the same steps while
keeping the first.

The bench's numbers on CPU mean nothing; what is checked is the bookkeeping: each timed step once
per pass, the reported rate computed from the last pass's times, the earlier pass kept apart."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_passes_report_the_last_pass_and_keep_the_first(tmp_path):
    out = tmp_path / "tp.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, str(ROOT / "scripts" / "bench" / "train_throughput.py"), "--variant", "tiny",
           "--seq-length", "256", "--samples-per-step", "2", "--warmup", "1", "--steps", "3", "--passes", "2",
           "--skip-hf", "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("(pass 2/2)") == 2 * 3  # both layouts, every timed step, second pass
    d = json.loads(out.read_text())
    assert d["args"]["passes"] == 2
    by = {x["config"]: x for x in d["results"]}
    assert set(by) == {"ours-bshd", "ours-thd"}
    for rec in by.values():
        assert rec["status"] == "ok"
        assert len(rec["step_ms"]) == 3 and len(rec["step_ms_earlier_passes"]) == 1
        assert len(rec["step_ms_earlier_passes"][0]) == 3
        tokens = rec["real_tokens_per_step"] * 3
        # the reported rate is the last pass's, the first pass's rate is kept apart
        assert abs(rec["tokens_per_s"] - tokens / (sum(rec["step_ms"]) / 1e3)) < 1e-6 * rec["tokens_per_s"]
        first = tokens / (sum(rec["step_ms_earlier_passes"][0]) / 1e3)
        assert abs(rec["tokens_per_s_first_pass"] - first) < 1e-6 * first
        assert len(rec["losses"]) == 3
    assert by["ours-thd"]["padding_share"] == 0.0 and by["ours-bshd"]["padding_share"] > 0.0
