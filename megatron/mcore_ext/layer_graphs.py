"""CUDA graphs of the language decoder's layers, forward and backward, for packed (THD) rows.

Why: in the steady state the proxy's training step is host-bound (docs/performance.md): the GPU
waits ~160 ms of a ~270 ms THD step while Python issues the layers' small kernels one by one. A
layer replayed from a CUDA graph costs one launch per direction.

What: ``LayerGraphs(layers)`` replaces each ``TransformerLayer``'s ``forward`` with one that, for a
THD call it can graph, replays that layer's graph for the row length (``T``); the first call of a
new length (at the first layer) captures every layer for it with one
``torch.cuda.make_graphed_callables`` call. Every other call (BSHD, evaluation, no grad, a layout
it does not cover) runs the layer as before. Rows come in a few lengths when the collate pads them up
to a multiple (``CollateConfig.row_multiple``; the padding is a segment of its own, flagged in
``padding_mask``, so it changes neither the loss nor the routing statistics).

What a graph needs, and how it is met here:

* static shapes: ``T`` is the key; ``cu_seqlens`` (a different number of samples every row) are
  padded to ``max_segments + 1`` entries by repeating the last one (empty segments), and the
  attention's ``max_seqlen`` is ``T`` (an upper bound for the flash varlen kernel);
* no host synchronisation inside a layer (the sync-free dispatch, the router's fused path and
  the packed RoPE already keep one out);
* persistent side channels, updated in place: megatron's MoE metrics tracker, the aux-loss scale
  (``MoEAuxLossAutoScaler.main_loss_backward_scale``), the router's expert-bias counts and
  diagnostics (buffers), the grouped experts' ``main_grad`` accumulation. Their capture-time
  Python runs once; the kernels they recorded run at every replay;
* warm-up: each layer runs forward and backward once on a side stream before the capture (lazy
  initialisation must not happen inside it), with the experts' ``main_grad`` additions sent to
  scratch buffers and zero incoming gradients; what else it writes in place (the router's buffers,
  the metrics tracker) is restored. The capture itself runs nothing. So capturing leaves no trace
  in the statistics or the gradients;
* the first capture in a process: on the proxy (H100, torch 2.11) the first graph captured had
  NaN in its backward, whichever row came first, and every later graph matched eager exactly;
  a small GEMM graph captured (and kept) before it removes that (``_prime``; measured with
  ``scripts/bench/layer_graphs_check.py``, ``MMDEV_GRAPH_PRIMER=0`` turns it off). The cause is
  state set up lazily in the first capture (our guess: a cuBLAS workspace), not proven;
* the grouped experts' weights have no autograd edge (``expert_weights._StackIntoMainGrad``): their
  ``ANCHOR`` is passed as a graph input so the captured backward reaches that node;
* Gated DeltaNet layers (fla's kernels only): fla sizes its kernel grids by the number of samples
  and of 64-token chunks. The samples are the padded ``max_segments`` (empty trailing segments);
  the chunks are ``T / 64`` when every packed sample is a multiple of 64 tokens
  (``--thd-sample-multiple 64``, the default with graphs), and the chunk map (``[T / 64, 2]``,
  built on the host by the GDN layer's own ``chunk_indices``) is one more graph input. The host
  boundaries a GDN layer reads at capture (its checks) are the capture row's; at replay only the
  device inputs change. fla's identity memo of boundary-derived tensors is off while capturing
  (``_fla_tensor_cache_off``), as our RoPE tables' cache is. (No GPU proof of this path yet:
  docs/performance.md.)

Scope: one GPU per model replica in the model dimensions (TP = CP = EP = PP = 1; data parallelism
is allowed, as the gradient reduction happens outside the layers, but not yet run with graphs on
more than one GPU), no dropout, gradient reduction not overlapped (``skip_param_grad_hooks`` on the
experts). ``check_layer_graphs_supported`` and the capture check these and raise.
Memory: all layers of a row length are captured in one call and every length shares one memory
pool (see ``_capture``), so the graphs need about one step's activations plus, per length, the
layers' inputs, outputs and parameter gradients; ``max_lengths`` bounds the lengths captured (a
new length past that runs eagerly).
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import time
from typing import Optional

import torch

from megatron.mcore_ext import expert_weights

log = logging.getLogger(__name__)

__all__ = ["LayerGraphs", "check_layer_graphs_supported", "layout_problems"]

#: keyword arguments of TransformerLayer.forward that must be None for a graphed call
_MUST_BE_NONE = ("attention_mask", "context", "context_mask", "rotary_pos_cos", "rotary_pos_sin",
                 "rotary_pos_cos_sin", "attention_bias", "inference_context", "sequence_len_offset")


def layout_problems(*, tp: int, cp: int, ep: int, pp: int, cuda: bool, half: bool) -> list[str]:
    """Why ``LayerGraphs`` cannot serve this layout, as "needs ..." phrases (empty: it can). The one
    rule for both the flag check (``arguments.validate_args``, before any model is built) and
    ``check_layer_graphs_supported`` (on the built model)."""
    problems = []
    if not cuda:
        problems.append("needs a GPU (CUDA graphs)")
    if not half:
        problems.append("needs --bf16 (packed attention is captured as the flash varlen kernel; the fp32 path "
                        "reads row lengths on the host)")
    sizes = {"--tensor-model-parallel-size": tp, "--context-parallel-size": cp,
             "--expert-model-parallel-size": ep, "--pipeline-model-parallel-size": pp}
    bad = [f"{k} {v}" for k, v in sizes.items() if v != 1]
    if bad:
        problems.append(f"needs one GPU per model replica; got {', '.join(bad)} (data parallelism is allowed)")
    return problems


def check_layer_graphs_supported(config) -> None:
    """Raise ``ValueError`` naming the setting when ``LayerGraphs`` cannot serve this model."""
    from megatron.core import parallel_state as ps

    problems = layout_problems(
        tp=ps.get_tensor_model_parallel_world_size(), cp=ps.get_context_parallel_world_size(),
        ep=ps.get_expert_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
        cuda=torch.cuda.is_available(), half=bool(getattr(config, "bf16", False) or getattr(config, "fp16", False)))
    if getattr(config, "hidden_dropout", 0.0) or getattr(config, "attention_dropout", 0.0):
        problems.append(f"needs no dropout (hidden {config.hidden_dropout}, attention {config.attention_dropout})")
    if getattr(config, "recompute_granularity", None):
        problems.append(f"needs no activation recomputation ({config.recompute_granularity})")
    if getattr(config, "cuda_graph_impl", "none") not in (None, "none"):
        problems.append(f"cannot run with megatron's own CUDA graphs (cuda_graph_impl={config.cuda_graph_impl})")
    if problems:
        raise ValueError("--cuda-graph-layers " + "; ".join(problems))


def _expert_weights(layer) -> tuple[set, bool]:
    """The grouped experts' weights, which reach ``main_grad`` without an autograd edge, and
    whether every grouped-experts module of the layer takes that path."""
    ids, all_skip = set(), True
    for m in layer.modules():
        if hasattr(m, "skip_param_grad_hooks") and hasattr(m, "local_experts"):
            if not m.skip_param_grad_hooks:
                all_skip = False
                continue
            for e in m.local_experts:
                ids.add(id(e.linear_fc1.weight))
                ids.add(id(e.linear_fc2.weight))
    return ids, all_skip


def _gdn_layers(layers) -> list:
    from megatron.mcore_ext.gdn import KernelGatedDeltaNet

    return [m for layer in layers for m in layer.modules() if isinstance(m, KernelGatedDeltaNet)]


def _pad_cu(cu: torch.Tensor, n: int) -> torch.Tensor:
    """``cu`` (int32, [k + 1]) -> [n] by repeating its last entry: empty trailing segments."""
    cu = cu.to(torch.int32)
    if cu.numel() == n:
        return cu
    return torch.cat([cu, cu[-1:].expand(n - cu.numel())])


class LayerGraphs:
    """Graph the given ``TransformerLayer`` s (see the module docstring); ``remove()`` undoes it.

    ``max_segments``: the most packed samples (plus the row's padding segment) a graphed row may
    hold. ``warmup_calls``: eager calls of a layer before its first capture (lazy initialisation:
    the metrics tracker's entries, the aux-loss scale, library handles). ``stats`` counts captures,
    replays and eager calls (by reason). ``enabled = False`` runs every call eagerly and keeps the
    graphs captured so far.
    """

    def __init__(self, layers, *, max_segments: int = 32, max_lengths: int = 16,
                 warmup_calls: int = 1, num_warmup_iters: int = 1, sample_multiple: int = 1):
        from megatron.mcore_ext.gdn import FLA_CHUNK

        self.layers = list(layers)
        if not self.layers:
            raise ValueError("LayerGraphs: no layers to graph")
        self._gdn = _gdn_layers(self.layers)  # any: the chunk map is a graph input (module docstring)
        if self._gdn:
            if any(m.kernels.name != "fla" for m in self._gdn):
                raise ValueError("--cuda-graph-layers graphs Gated DeltaNet layers with fla's kernels only; these run "
                                 "the torch kernels (--gdn-kernels torch, or fla not usable here)")
            if sample_multiple % FLA_CHUNK:
                raise ValueError(f"--cuda-graph-layers with Gated DeltaNet layers needs every packed sample padded to "
                                 f"a multiple of {FLA_CHUNK} tokens (fla's chunk; its kernel grids then depend on the "
                                 f"row length alone): got --thd-sample-multiple {sample_multiple}")
        self.max_segments = int(max_segments)
        self.max_lengths = int(max_lengths)
        self.warmup_calls = int(warmup_calls)
        self.num_warmup_iters = int(num_warmup_iters)
        self._orig = []
        self._graphs: list[dict] = [dict() for _ in self.layers]
        self._calls = [0] * len(self.layers)
        self._params: list[Optional[tuple]] = [None] * len(self.layers)  # each layer's graph inputs
        self._experts: list[list] = [[] for _ in self.layers]  # weights reaching main_grad without an edge
        self.stats = {"captures": 0, "capture_s": 0.0, "replays": 0, "eager": collections.Counter()}
        self.enabled = True
        self._primer = None  # see _prime
        self._pool = None  # one memory pool for every captured graph (see _capture)
        for i, layer in enumerate(self.layers):
            if "forward" in layer.__dict__:
                raise ValueError(f"LayerGraphs: layer {i} has its forward replaced already")
            self._orig.append(layer.forward)
            layer.forward = self._make_forward(i)

    def remove(self) -> None:
        for layer in self.layers:
            layer.__dict__.pop("forward", None)
        self._graphs = [dict() for _ in self.layers]

    # ---------------------------------------------------------------------------------------------
    def _make_forward(self, i: int):
        def forward(*args, **kwargs):
            return self._forward(i, *args, **kwargs)

        return forward

    def _why_eager(self, i: int, hidden, kw) -> Optional[str]:
        layer = self.layers[i]
        if not self.enabled:
            return "disabled"
        if not (torch.is_grad_enabled() and layer.training):
            return "no grad or eval"
        if hidden is None or not hidden.is_cuda or not hidden.requires_grad:
            return "input not a CUDA tensor that requires grad"
        psp = kw.get("packed_seq_params")
        if psp is None or getattr(psp, "qkv_format", None) != "thd":
            return "not THD"
        if any(kw.get(k) is not None for k in _MUST_BE_NONE):
            return "unsupported argument"
        if not torch.is_tensor(kw.get("rotary_pos_emb")) or not torch.is_tensor(kw.get("padding_mask")):
            return "no rotary angles or padding mask"
        cu = psp.cu_seqlens_q_padded if psp.cu_seqlens_q_padded is not None else psp.cu_seqlens_q
        if cu is None or cu.numel() - 1 > self.max_segments:
            return f"more than max_segments={self.max_segments} segments"
        if self._gdn:
            from megatron.mcore_ext.gdn import FLA_CHUNK

            host = getattr(psp, "cu_seqlens_q_padded_cpu", None)
            if host is None:
                return "no host boundaries for the Gated DeltaNet layers"
            if bool(((host[1:] - host[:-1]) % FLA_CHUNK).any()):
                return f"a packed sample not a multiple of {FLA_CHUNK} tokens (Gated DeltaNet)"
        T = hidden.shape[0]
        if T in self._graphs[i]:
            return None
        if i != 0:  # a row length is captured for all layers at once, at the first layer
            return "row length not captured"
        if self._calls[0] <= self.warmup_calls:
            return "warm-up call"
        if len(self._graphs[0]) >= self.max_lengths:
            return f"max_lengths={self.max_lengths} row lengths captured already"
        return None

    def _forward(self, i: int, *args, **kw):
        if args:  # TransformerBlock passes keywords; accept hidden_states positionally too
            kw = dict(kw, hidden_states=args[0])
            args = args[1:]
        hidden = kw.get("hidden_states")
        self._calls[i] += 1
        why = "positional arguments" if args else self._why_eager(i, hidden, kw)
        if why is not None:
            self.stats["eager"][why] += 1
            return self._orig[i](*args, **kw)
        psp = kw["packed_seq_params"]
        cached = getattr(psp, "derived", None)  # the micro-batch's, shared by its layers
        if cached is not None and "graph_inputs" in cached:
            cu, cu_p, host_p, chunks = cached["graph_inputs"]
        else:
            cu, cu_p, host_p, chunks = self._boundary_inputs(psp)
            if cached is not None:
                cached["graph_inputs"] = (cu, cu_p, host_p, chunks)
        inputs = (hidden, kw["rotary_pos_emb"], cu, cu_p, kw["padding_mask"]) + ((chunks,) if self._gdn else ())
        T = hidden.shape[0]
        if T not in self._graphs[i]:
            self._capture(T, inputs, host_p)
        self.stats["replays"] += 1
        return self._graphs[i][T](*inputs, *self._params[i]), None

    def _boundary_inputs(self, psp):
        """The row's boundaries as graph inputs, once per micro-batch: real and padded ``cu_seqlens``
        padded to ``max_segments + 1`` entries (empty trailing segments), and for GDN layers the
        padded host boundaries and fla's chunk map of the row ``[T / 64, 2]`` (the empty segments
        add no chunk), built by the GDN layer's own ``chunk_indices``; else None, None."""
        n = self.max_segments + 1
        cu = _pad_cu(psp.cu_seqlens_q if psp.cu_seqlens_q is not None else psp.cu_seqlens_q_padded, n)
        cu_p = _pad_cu(psp.cu_seqlens_q_padded if psp.cu_seqlens_q_padded is not None else psp.cu_seqlens_q, n)
        if not self._gdn:
            return cu, cu_p, None, None
        from megatron.mcore_ext.packed_seq import HostPackedSeqParams

        host = psp.cu_seqlens_q_padded_cpu
        host_p = torch.cat([host, host[-1:].expand(n - host.numel())]) if host.numel() < n else host
        padded = HostPackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_p,
                                     cu_seqlens_kv_padded=cu_p, cu_seqlens_q_padded_cpu=host_p)
        return cu, cu_p, host_p, self._gdn[0].chunk_indices(padded, cu_p, host_p)

    # ---------------------------------------------------------------------------------------------
    def _warm_up(self, fns, args, proxies) -> None:
        """What make_graphed_callables' own warm-up does (run each layer forward and backward on a
        side stream, so lazy initialisation happens outside the capture), except that the experts'
        ``main_grad`` additions go to scratch buffers and the incoming gradients are zeros, not
        uninitialised memory: the real gradient buffers are never written."""
        torch.cuda.synchronize()
        stream = torch.cuda.Stream()
        for i, (fn, a) in enumerate(zip(fns, args)):
            real = [(p, p.main_grad) for p in self._experts[i] if getattr(p, "main_grad", None) is not None]
            swapped = _swap_parameters(self.layers[i], proxies)
            try:
                for p, g in real:
                    p.main_grad = torch.zeros_like(g)
                with torch.cuda.stream(stream):
                    for _ in range(max(1, self.num_warmup_iters)):
                        out = fn(*a)
                        surface = tuple(x for x in a if torch.is_tensor(x) and x.requires_grad)
                        torch.autograd.grad(out, surface, grad_outputs=torch.zeros_like(out), allow_unused=True)
                        del out
            finally:
                for p, g in real:
                    p.main_grad = g
                _swap_back(swapped)
        torch.cuda.synchronize()

    def _capture(self, T: int, inputs, host_p=None) -> None:
        """Capture every layer's forward and backward for rows of ``T`` tokens, in one call: the
        forwards in layer order, then the backwards in reverse, which is the order they replay in, so
        they share one memory pool safely. All lengths share that pool too: one length's graphs
        never run while another's activations are alive (each micro-batch's forward is followed by
        its backward; no pipelining), and what a set keeps between replays (its inputs, outputs and
        gradients) stays allocated to it."""
        from megatron.core.packed_seq_params import PackedSeqParams
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        if self._primer is None and os.environ.get("MMDEV_GRAPH_PRIMER", "1") != "0":
            self._primer = _prime(inputs[0])
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        for i, layer in enumerate(self.layers):
            if self._params[i] is None:
                skip_ids, all_skip = _expert_weights(layer)
                if not all_skip:
                    raise ValueError("--cuda-graph-layers: the grouped experts must take the hook-free gradient "
                                     "path (skip_param_grad_hooks; gradient reduction not overlapped)")
                params = tuple(p for p in layer.parameters() if p.requires_grad and id(p) not in skip_ids)
                self._params[i] = params + ((expert_weights.ANCHOR,) if skip_ids else ())
                self._experts[i] = [p for p in layer.parameters() if id(p) in skip_ids]
        if MoEAuxLossAutoScaler.main_loss_backward_scale is None:  # read by the captured backward
            MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1, device=inputs[0].device))

        from megatron.mcore_ext.packed_seq import HostPackedSeqParams

        gdn = bool(self._gdn)

        def make_fn(orig):
            def fn(hidden_states, rotary_pos_emb, cu, cu_p, padding_mask, *rest):
                kw = dict(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_p,
                          cu_seqlens_kv_padded=cu_p, max_seqlen_q=T, max_seqlen_kv=T)
                if gdn:  # the capture row's host boundaries (checks only) and the static chunk map
                    psp = HostPackedSeqParams(**kw, cu_seqlens_q_padded_cpu=host_p)
                    psp.derived["fla_chunk_indices"] = rest[0]
                else:
                    psp = PackedSeqParams(**kw)
                out, _ = orig(hidden_states=hidden_states, rotary_pos_emb=rotary_pos_emb, packed_seq_params=psp,
                              padding_mask=padding_mask)
                return out

            return fn

        # The parameters' AccumulateGrad nodes were created on the default stream and megatron's
        # DDP keeps them alive; a captured backward that ends in them makes autograd synchronise
        # with the default stream, which invalidates the capture. So warm-up and capture run with
        # fresh leaves that share the parameters' storage (a new set for each: a leaf's node keeps
        # the stream it was first used on); at replay the parameters themselves take these slots
        # (same data pointers: nothing is copied), and their gradients reach the real
        # AccumulateGrad nodes and DDP's hooks outside the graph.
        fns = tuple(make_fn(o) for o in self._orig)
        shared = tuple(x.detach().clone() for x in inputs[1:])  # rotary angles, cu_seqlens, padding mask (, chunks)

        def surface():
            proxies = {id(p): _proxy(p) for ps in self._params for p in ps if isinstance(p, torch.nn.Parameter)}
            args = tuple((inputs[0].detach().clone().requires_grad_(True), *shared,
                          *(proxies.get(id(p), p) for p in self._params[i])) for i in range(len(self.layers)))
            return proxies, args

        t0 = time.perf_counter()
        saved = _snapshot(self.layers)
        try:  # graph_form: the warm-up adds the experts' gradients as the capture will
            with _fla_tensor_cache_off(bool(self._gdn)), expert_weights.graph_form():
                proxies, args = surface()
                self._warm_up(fns, args, proxies)
                proxies, args = surface()
                swapped = [_swap_parameters(layer, proxies) for layer in self.layers]
                try:  # capture only: nothing runs, so no gradient buffer or statistic is touched
                    graphed = torch.cuda.make_graphed_callables(fns, args, num_warmup_iters=0,
                                                                allow_unused_input=True, pool=self._pool)
                finally:
                    for sw in swapped:
                        _swap_back(sw)
        finally:
            _restore(saved)
        for i, g in enumerate(graphed):
            self._graphs[i][T] = g
        dt = time.perf_counter() - t0
        self.stats["captures"] += len(self.layers)
        self.stats["capture_s"] += dt
        log.info("cuda graphs: %d layers captured for rows of %d tokens in %.2f s", len(self.layers), T, dt)


@contextlib.contextmanager
def _fla_tensor_cache_off(off: bool):
    """fla memoises what it derives from the packed boundaries (chunk offsets, lengths:
    ``fla.utils.tensor_cache``) by the *identity* of the boundary tensor. The warm-up and the capture
    pass the same static boundary tensor, so the capture would find the warm-up's results, record
    no kernel for them, and every replay would read the capture row's values. fla's own switch
    (``FLA_DISABLE_TENSOR_CACHE``, read from ``fla.utils`` at each call) turns the memo off for the
    warm-up and the capture, so the graphs compute them from their inputs."""
    if not off:
        yield
        return
    import fla.utils

    saved = getattr(fla.utils, "FLA_DISABLE_TENSOR_CACHE", False)
    fla.utils.FLA_DISABLE_TENSOR_CACHE = True
    try:
        yield
    finally:
        fla.utils.FLA_DISABLE_TENSOR_CACHE = saved


def _prime(like: torch.Tensor):
    """Capture (and keep) a small graph with a GEMM forward and backward before the first layer."""
    lin = torch.nn.Linear(256, 256, device=like.device, dtype=like.dtype)
    x = torch.randn(64, 256, device=like.device, dtype=like.dtype, requires_grad=True)
    return torch.cuda.make_graphed_callables(lin, (x,), num_warmup_iters=2)


def _proxy(p: torch.nn.Parameter) -> torch.nn.Parameter:
    """A new leaf on ``p``'s storage (so a graph captured with it reads and, through the optimizer,
    sees ``p``'s values), with ``p``'s attributes (``sequence_parallel``, ``allreduce``, ...)."""
    q = torch.nn.Parameter(p.detach(), requires_grad=True)
    q.__dict__.update(p.__dict__)
    return q


def _swap_parameters(layer, proxies: dict) -> list:
    swapped = []
    for mod in layer.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and id(p) in proxies:
                mod._parameters[name] = proxies[id(p)]
                swapped.append((mod, name, p))
    return swapped


def _swap_back(swapped: list) -> None:
    for mod, name, p in swapped:
        mod._parameters[name] = p


def _snapshot(layers) -> list:
    """What the warm-up passes write in place besides the (redirected) experts' ``main_grad``:
    the router's buffers (expert-bias counts, diagnostics), megatron's MoE metrics, the
    ``grad_added_to_main_grad`` flags."""
    saved = [(b, b.detach().clone()) for layer in layers for b in layer.buffers()]
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        saved += [(e.values, e.values.detach().clone()) for e in get_moe_metrics_tracker()._metrics.values()]
    except (ImportError, AttributeError):
        pass
    flags = [(p, p.grad_added_to_main_grad) for layer in layers for p in layer.parameters()
             if hasattr(p, "grad_added_to_main_grad")]
    return [saved, flags]


def _restore(snap) -> None:
    saved, flags = snap
    with torch.no_grad():
        for t, v in saved:
            t.copy_(v)
    for p, f in flags:
        p.grad_added_to_main_grad = f
    from megatron.mcore_ext import packed_rope

    packed_rope._TABLES.clear()  # the warm-up's tables belong to a static angle tensor
