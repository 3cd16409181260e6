"""How many ops one training step of our trainer dispatches, and where (CPU or GPU).

Forward: ops per module (with the module's inclusive host time, which the counting itself
inflates); backward: ops per autograd node; the optimizer's ops apart. On a GPU nearly every
counted op is a kernel launch, so this is the host's launch budget by module. Views and other
metadata-only ops are not counted.

Usage: python scripts/bench/op_census.py VARIANT LAYOUT SEQ_LENGTH SAMPLES_PER_STEP ["MEGATRON ARGS"]
e.g.   python scripts/bench/op_census.py proxy thd 4096 4
"""
import sys, collections, time, os
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "examples"), os.path.join(_ROOT, "scripts", "bench")]
import torch
from torch.utils._python_dispatch import TorchDispatchMode
import train_throughput as tt

if len(sys.argv) < 5 or sys.argv[2] not in ("thd", "bshd"):
    raise SystemExit(__doc__)
variant, layout, seq, nsamp = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
extra = sys.argv[5] if len(sys.argv) > 5 else ""
VIEWISH = {"view", "_unsafe_view", "expand", "t", "transpose", "permute", "unsqueeze", "squeeze", "select", "slice",
           "split", "split_with_sizes", "unbind", "as_strided", "alias", "detach", "reshape", "narrow", "chunk",
           "_reshape_alias", "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty", "sym_size", "is_same_size",
           "view_as_real", "view_as_complex", "diagonal", "unfold", "movedim", "flatten", "_has_compatible_shallow_copy_type",
           "record_stream", "set_", "_record_function_enter_new", "_record_function_exit"}
stack = ["<top>"]
fwd_ops = collections.Counter(); bwd_ops = collections.Counter(); other = collections.Counter()
host = collections.Counter(); calls = collections.Counter()
phase = ["fwd"]
class Mode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in VIEWISH:
            if phase[0] == "fwd":
                fwd_ops[(stack[-1], name)] += 1
            elif phase[0] == "bwd":
                node = torch._C._current_autograd_node()
                bwd_ops[(node.name() if node is not None else "<engine>", name)] += 1
            else:
                other[(phase[0], name)] += 1
        return func(*args, **(kwargs or {}))

t0s = []
def attach(model):
    for n, m in model.named_modules():
        if not n: continue
        key = ".".join(p if not p.isdigit() else "N" for p in n.split("."))
        def pre(mod, a, key=key):
            stack.append(key); t0s.append(time.perf_counter())
        def post(mod, a, o, key=key):
            stack.pop(); host[key] += time.perf_counter() - t0s.pop(); calls[key] += 1
        m.register_forward_pre_hook(pre); m.register_forward_hook(post)

args = tt.build_parser().parse_args(["--variant", variant, "--seq-length", seq, "--samples-per-step", nsamp,
                                      "--steps", "3", "--warmup", "0"] + (["--fp32"] if not torch.cuda.is_available() else [])
                                     + (["--megatron-args=" + extra] if extra else []))
from multimodal_dev import metrics, training
from megatron.core.pipeline_parallel import get_forward_backward_func
margs, batches, (ddp, model, optimizer, scheduler, graphs) = tt.build_ours(args, layout)
fb = get_forward_backward_func()
import megatron.core.pipeline_parallel.schedules as sch
orig_bwd = torch.autograd.backward
def bwd(*a, **k):
    old = phase[0]; phase[0] = "bwd"
    try: return orig_bwd(*a, **k)
    finally: phase[0] = "post-bwd"
def step(batch):
    ddp.zero_grad_buffer(); optimizer.zero_grad()
    phase[0] = "fwd"
    tt.one_microbatch(fb, ddp, margs, batch, layout)
    phase[0] = "opt"
    optimizer.step(); scheduler.step(increment=1)
    phase[0] = "after"
    metrics.moe_losses(model.config, 1)
step(batches[0]); step(batches[1])
attach(model)
torch.autograd.backward = bwd; sch.torch.autograd.backward = bwd
if torch.cuda.is_available(): torch.cuda.synchronize()
t = time.perf_counter()
with Mode():
    step(batches[2])
if torch.cuda.is_available(): torch.cuda.synchronize()
print(f"census step wall {1e3*(time.perf_counter()-t):.0f} ms (dispatch mode on, hooks on)")
print("totals: fwd", sum(fwd_ops.values()), "bwd", sum(bwd_ops.values()), {k: v for k, v in collections.Counter({p: c for (p, _), c in other.items()}).items()})
ph = collections.Counter()
for (p, op), c in other.items(): ph[p] += c
print("other phases:", dict(ph))
per_mod = collections.Counter()
for (m, op), c in fwd_ops.items(): per_mod[m] += c
print("--- forward ops (self) per module, with inclusive host ms and calls")
for m, c in sorted(per_mod.items(), key=lambda x: -x[1])[:45]:
    print(f"{c:6d}  {1e3*host[m]:8.1f} ms {calls[m]:4d}x  {m}")
print("--- forward op detail of the top modules")
for m, _ in sorted(per_mod.items(), key=lambda x: -x[1])[:12]:
    ops = collections.Counter({op: c for (mm, op), c in fwd_ops.items() if mm == m})
    print(m, ops.most_common(30))
per_node = collections.Counter()
for (n, op), c in bwd_ops.items(): per_node[n] += c
print("--- backward ops per autograd node")
for n, c in per_node.most_common(45):
    ops = collections.Counter({op: cc for (nn, op), cc in bwd_ops.items() if nn == n})
    print(f"{c:6d}  {n}  {ops.most_common(6)}")
print("--- other phases detail")
for (p, op), c in sorted(other.items(), key=lambda x: -x[1])[:30]:
    print(f"{c:6d} {p} {op}")
