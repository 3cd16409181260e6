"""Where the GPU waits and what it is busy with: profile ours for a few steps, attribute the GPU's idle
time to step phases and host ops, and its busy time to the phase and the op (or autograd node) that
launched each kernel.

The profiled steps have run once before (steady state: no first-use cost of kernels, cuBLAS
heuristics or cuDNN plans for their shapes).

Usage: python scripts/bench/gpu_gaps.py VARIANT LAYOUT SEQ_LENGTH SAMPLES_PER_STEP OUT_DIR [STEPS [BENCH-FLAGS...]]
e.g.   python scripts/bench/gpu_gaps.py proxy thd 4096 4 runs/prof 4   (writes OUT_DIR/trace_LAYOUT.json)
       python scripts/bench/gpu_gaps.py proxy-hybrid thd 2048 4 runs/prof 4 --min-tokens 2048 --max-tokens 2048 --image-prob 0
BENCH-FLAGS are train_throughput.py's (the data mix, --megatron-args, --cuda-graph-layers for the graphed THD
step as the bench times it, ...).
"""
import sys, os, json, collections, re, time
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "examples"), os.path.join(_ROOT, "scripts", "bench")]
import torch
import train_throughput as tt
from torch.profiler import profile, ProfilerActivity, record_function

if len(sys.argv) < 6 or sys.argv[2] not in ("thd", "bshd"):
    raise SystemExit(__doc__)
variant, layout, seq, nsamp, out = sys.argv[1:6]
steps = int(sys.argv[6]) if len(sys.argv) > 6 else 3
args = tt.build_parser().parse_args(["--variant", variant, "--seq-length", seq, "--samples-per-step", nsamp,
                                      "--steps", str(steps + 3), "--warmup", "0", *sys.argv[7:]])
from multimodal_dev import metrics, training
from megatron.core.pipeline_parallel import get_forward_backward_func
import megatron.core.pipeline_parallel.schedules as sch
margs, batches, (ddp, model, optimizer, scheduler, graphs) = tt.build_ours(args, layout)
CUDA = torch.cuda.is_available()
fb = get_forward_backward_func()
orig_bwd = torch.autograd.backward
def bwd(*a, **k):
    with record_function("PHASE:backward"):
        return orig_bwd(*a, **k)
sch.torch.autograd.backward = bwd
# module-level markers for the forward: vision, each decoder layer's attention / mlp, lm head
for n, m in model.named_modules():
    short = n.replace("language_model.decoder.layers.", "L").replace("vision_encoder", "vision")
    if n in ("vision_encoder", "language_model.output_layer", "language_model.embedding") or \
            (n.startswith("language_model.decoder.layers.") and n.count(".") == 4):
        def pre(mod, a, short=short):
            mod._rf = record_function("MOD:" + short); mod._rf.__enter__()
        def post(mod, a, o):
            mod._rf.__exit__(None, None, None)
        m.register_forward_pre_hook(pre); m.register_forward_hook(post)
def step(batch):
    with record_function("PHASE:zero"):
        ddp.zero_grad_buffer(); optimizer.zero_grad()
    with record_function("PHASE:fwd_bwd"):
        tt.one_microbatch(fb, ddp, margs, batch, layout)
    with record_function("PHASE:optimizer"):
        optimizer.step(); scheduler.step(increment=1)
    with record_function("PHASE:after"):
        metrics.moe_losses(model.config, 1)
for b in batches[:3] + batches[3:3 + steps]:  # warm up on the profiled batches too: steady state, every shape seen
    step(b)
tt._sync()
def sync_sites(batch):
    """The host synchronisations of one steady step, by where the host made them (CUDA's sync debug mode
    warns at each; the innermost frames of the warning's stack outside torch name the site)."""
    import traceback, warnings
    sites = collections.Counter()
    def note(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-2] if "/torch/" not in f.filename and "warnings" not in f.filename]
        sites[" <- ".join(f"{f.filename.split('/site-packages/')[-1].replace(_ROOT + '/', '')}:{f.lineno}"
                          for f in reversed(frames[-3:]))] += 1
    show, warnings.showwarning = warnings.showwarning, note
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step(batch)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        warnings.showwarning = show
    tt._sync()
    print(f"host synchronisations in one steady step: {sum(sites.values())} (by site, innermost first):")
    for site, n in sites.most_common(25):
        print(f"  {n:4d}  {site}")
if CUDA:
    sync_sites(batches[3])
import gc
gc_log = []
def _gc_cb(phase, info, t={}):
    if phase == "start": t["s"] = time.perf_counter()
    else: gc_log.append((info.get("generation"), time.perf_counter() - t.get("s", time.perf_counter())))
gc.callbacks.append(_gc_cb)
ms0 = torch.cuda.memory_stats() if CUDA else {}
with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])) as prof:
    for b in batches[3:3 + steps]:
        with record_function("STEP"):
            step(b)
    tt._sync()
gc.callbacks.remove(_gc_cb)
ms1 = torch.cuda.memory_stats() if CUDA else {}
print("GC during the profiled steps:", len(gc_log), "collections,", f"{1e3*sum(d for _, d in gc_log):.1f} ms total;",
      "by generation:", {g: round(1e3 * sum(d for gg, d in gc_log if gg == g), 1) for g in {g for g, _ in gc_log}})
for key in ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams", "segment.all.allocated",
            "segment.all.freed", "num_ooms"):
    print(f"  memory_stats {key}: {ms1.get(key, 0) - ms0.get(key, 0)} during ({ms1.get(key)})")
os.makedirs(out, exist_ok=True)
path = os.path.join(out, f"trace_{layout}.json")
prof.export_chrome_trace(path)
ev = json.load(open(path))["traceEvents"]
gpu = sorted([e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e], key=lambda e: e["ts"])
cpu = [e for e in ev if e.get("cat") == "user_annotation" and "dur" in e]
launch = {e["args"].get("correlation"): e for e in ev if e.get("cat") == "cuda_runtime" and "args" in e}
steps_ev = sorted([e for e in cpu if e["name"] == "STEP"], key=lambda e: e["ts"])
t0, t1 = steps_ev[0]["ts"], steps_ev[-1]["ts"] + steps_ev[-1]["dur"]
busy = 0.0; last_end = t0
gaps = []
for k in gpu:
    if k["ts"] + k["dur"] < t0 or k["ts"] > t1: continue
    s = max(k["ts"], last_end)
    if k["ts"] > last_end:
        gaps.append((last_end, k["ts"], k))
    busy += max(0.0, k["ts"] + k["dur"] - s)
    last_end = max(last_end, k["ts"] + k["dur"])
if t1 > last_end: gaps.append((last_end, t1, None))
wall = t1 - t0
print(f"{steps} steps: wall {wall/1e3:.1f} ms, GPU busy {busy/1e3:.1f} ms ({100*busy/wall:.0f}%), idle {(wall-busy)/1e3:.1f} ms")
# what the GPU is busy with: kernel time by kernel name
# (the kernel's own duration: concurrent kernels count twice)
by_kernel = collections.Counter(); n_kernel = collections.Counter()
for k in gpu:
    if k["ts"] + k["dur"] < t0 or k["ts"] > t1: continue
    by_kernel[k["name"][:70]] += k["dur"]; n_kernel[k["name"][:70]] += 1
print("GPU busy by kernel (ms per step, launches per step):")
for name, d in by_kernel.most_common(30):
    print(f"  {d/1e3/steps:8.2f} ms {n_kernel[name]/steps:7.0f}  {name}")
def enclosing(ts, prefix):
    best = None
    for e in cpu:
        if e["name"].startswith(prefix) and e["ts"] <= ts <= e["ts"] + e["dur"]:
            if best is None or e["dur"] < best["dur"]: best = e
    return best["name"] if best else "-"
by_phase = collections.Counter(); by_mod = collections.Counter(); cnt = collections.Counter()
big = []
for a, b, k in gaps:
    g = b - a
    # the host op that launched the kernel ending the gap tells where the host was
    L = launch.get(k["args"].get("correlation")) if k is not None else None
    ts = L["ts"] if L else a
    ph = enclosing(ts, "PHASE:"); md = enclosing(ts, "MOD:")
    by_phase[ph] += g; cnt[ph] += 1
    if ph == "PHASE:fwd_bwd": by_mod[md] += g
    big.append((g, ph, md, k["name"][:60] if k else "<end>"))
print("GPU idle by host phase (ms, gaps):")
for ph, g in by_phase.most_common(): print(f"  {g/1e3:8.1f} ms {cnt[ph]:6d}  {ph}")
print("GPU idle in forward/backward by the module the host was in (ms):")
for m, g in by_mod.most_common(25): print(f"  {g/1e3:8.1f}  {m}")
print("largest gaps:")
for g, ph, md, kn in sorted(big, reverse=True)[:25]: print(f"  {g/1e3:7.2f} ms  {ph:18s} {md:28s} next kernel {kn}")
hist = collections.Counter()
for a, b, k in gaps:
    g = b - a
    hist["<5us" if g < 5 else "<20us" if g < 20 else "<100us" if g < 100 else "<1ms" if g < 1000 else ">=1ms"] += g
print("idle by gap size (ms):", {k: round(v / 1e3, 1) for k, v in hist.items()})

# what the host did during the long gaps (>= 0.5 ms): runtime calls and top-level host ops overlapping them
rt = [e for e in ev if e.get("cat") == "cuda_runtime" and "dur" in e]
ops = [e for e in ev if e.get("cat") == "cpu_op" and "dur" in e]
rt_sum = collections.Counter(); op_sum = collections.Counter(); long_total = 0.0; covered = 0.0
for a, b, k in gaps:
    if b - a < 500 or b - a > 50_000: continue
    long_total += b - a
    for e in rt:
        o = min(b, e["ts"] + e["dur"]) - max(a, e["ts"])
        if o > 0: rt_sum[e["name"]] += o
    for e in ops:
        o = min(b, e["ts"] + e["dur"]) - max(a, e["ts"])
        if o > 0.5 * (b - a) or (o > 200 and e["dur"] < 2 * (b - a)): op_sum[e["name"]] += o
print(f"long gaps (0.5-50 ms): {long_total/1e3:.1f} ms; runtime calls overlapping them (ms):",
      {k: round(v / 1e3, 1) for k, v in rt_sum.most_common(10)})
print("host ops overlapping them (ms):", {k: round(v / 1e3, 1) for k, v in op_sum.most_common(20)})
for a, b, k in sorted(gaps, key=lambda g: g[0] - g[1])[:6]:
    print(f"gap {(b-a)/1e3:.1f} ms: runtime", [(e["name"], round(e["dur"] / 1e3, 2)) for e in rt if e["ts"] < b and e["ts"] + e["dur"] > a and e["dur"] > 100][:8],
          "ops", sorted([(round(e["dur"] / 1e3, 2), e["name"]) for e in ops if e["ts"] < b and e["ts"] + e["dur"] > a and e["dur"] > 300], reverse=True)[:8])

# attribution of every gap to the host work that ended it: the innermost host op (forward) or
# autograd node (backward) that launched the next kernel, and what the host ran during the gap
evals = [e for e in ops if e["name"].startswith("autograd::engine::evaluate_function:")]
by_node = collections.Counter(); by_launcher = collections.Counter()
import bisect
def _index(pool):
    idx = collections.defaultdict(list)
    for e in pool:
        idx[e.get("tid")].append(e)
    out = {}
    for t, v in idx.items():
        v.sort(key=lambda e: e["ts"])
        out[t] = (v, [e["ts"] for e in v])
    return out
def innermost(ts, tid, index):
    evs, starts = index.get(tid, ([], []))
    i = bisect.bisect_right(starts, ts) - 1
    for j in range(i, max(-1, i - 400), -1):  # host ops nest: the latest-starting enclosing op is innermost
        if evs[j]["ts"] + evs[j]["dur"] >= ts:
            return evs[j]
    return None
ops_index, evals_index = _index(ops), _index(evals)
for a, b, k in gaps:
    if k is None or b - a > 50_000: continue
    L = launch.get(k["args"].get("correlation"))
    if L is None: continue
    node = innermost(L["ts"], L.get("tid"), evals_index)
    if node is not None:
        by_node[node["name"].split(": ", 1)[-1]] += b - a
    else:
        op = innermost(L["ts"], L.get("tid"), ops_index)
        by_launcher[op["name"] if op else "-"] += b - a
print("GPU idle (< 50 ms gaps) by the autograd node whose kernel ended it (ms):",
      {k: round(v / 1e3, 1) for k, v in by_node.most_common(20)})
print("GPU idle (< 50 ms gaps) by the forward/other host op whose kernel ended it (ms):",
      {k: round(v / 1e3, 1) for k, v in by_launcher.most_common(25)})
for a, b, k in sorted([g for g in gaps if 1000 <= g[1] - g[0] <= 50_000], key=lambda g: g[0] - g[1])[:10]:
    started = sorted([e for e in ops if a <= e["ts"] <= b], key=lambda e: -e["dur"])[:6]
    print(f"gap {(b-a)/1e3:.2f} ms before {k['name'][:40] if k else '-'}: host ops started in it",
          [(e["name"][:50], round(e["dur"] / 1e3, 2)) for e in started])

# what the GPU is busy with, by where the host launched it: the step phase, then the autograd node
# (backward) or the innermost host op and the module (forward/other) whose launch call started the
# kernel. Kernels replayed from a CUDA graph carry the graph launch's correlation, so a graphed layer
# shows as the op that replays it.
by_layers_kernel = collections.Counter()  # the same over all decoder layers (index dropped), by kernel
busy_by = collections.Counter(); busy_phase = collections.Counter(); n_by = collections.Counter()
for k in gpu:
    if k["ts"] + k["dur"] < t0 or k["ts"] > t1: continue
    L = launch.get(k["args"].get("correlation"))
    if L is None:
        key = ("-", "-", "(no launch record)")
    else:
        ph = enclosing(L["ts"], "PHASE:")
        node = innermost(L["ts"], L.get("tid"), evals_index)
        if node is not None:
            key = (ph, "bwd", node["name"].split(": ", 1)[-1])
        else:
            op = innermost(L["ts"], L.get("tid"), ops_index)
            key = (ph, enclosing(L["ts"], "MOD:"), op["name"] if op else "-")
    busy_by[key] += k["dur"]; busy_phase[key[0]] += k["dur"]; n_by[key] += 1
    kname = k["name"].split("<")[0].replace("void ", "").split("::")[-1][:34]
    by_layers_kernel[(re.sub(r"MOD:L\d+\.", "MOD:L*.", key[1]), key[2], kname)] += k["dur"]
print("GPU busy by host phase (ms per step):", {p: round(v / 1e3 / steps, 1) for p, v in busy_phase.most_common()})
print("GPU busy by phase / module or 'bwd' / launching op or autograd node (ms per step, kernels per step):")
for (ph, where, what), d in busy_by.most_common(40):
    print(f"  {d/1e3/steps:8.2f} ms {n_by[(ph, where, what)]/steps:7.0f}  {ph:16s} {where[:26]:26s} {what[:60]}")
print("the same with the decoder layers' index dropped, by kernel (ms per step; which op launches the elementwise work):")
for (where, what, kname), d in by_layers_kernel.most_common(45):
    print(f"  {d/1e3/steps:8.2f} ms  {where[:26]:26s} {what[:44]:44s} {kname}")
