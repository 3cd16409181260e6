"""Pure-PyTorch Gated DeltaNet kernels with flash-linear-attention's (fla) call signatures.

Why: megatron-core 0.19.2's ``GatedDeltaNet`` (Qwen3.5's linear-attention layers) imports three
kernels from fla -- ``causal_conv1d``, ``l2norm`` and ``chunk_gated_delta_rule`` -- and without fla
it cannot run; its own torch fallback (``torch_chunk_gated_delta_rule``, deterministic mode only)
refuses packed (THD) input. These are drop-ins that run on any device, packed input included,
differentiable through plain autograd, computing in fp32 and returning the input dtype.

Shapes (fla's ``[B, T, ...]`` layout; with ``cu_seqlens`` (int ``[N+1]``) B must be 1 and row 0
holds N packed samples ``[cu[i], cu[i+1])``, zero-length ones allowed):

* ``causal_conv1d``: x ``[B, T, D]``, weight ``[D, W]`` -> ``y[b,t,d] = act(sum_j w[d,j] *
  x[b, t-(W-1)+j, d] + bias[d])``, x = 0 before the start of each sequence / packed sample.
* ``chunk_gated_delta_rule``: q, k ``[B, T, Hk, K]`` (Hk divides H; q/k head ``h // (H/Hk)``
  serves value head h), v ``[B, T, H, V]``, g (log decay <= 0) and beta ``[B, T, H]``. Per
  sequence and head, with a state S ``[K, V]`` starting at 0 (or ``initial_state [N, H, K, V]``)::

      S_t = exp(g_t) S_{t-1};   S_t += k_t (beta_t (v_t - S_t^T k_t))^T;   o_t = S_t^T (scale q_t)

Algorithm (the WY/UT form, as in fla and HF's ``torch_chunk_gated_delta_rule``): within a chunk
of C steps with cumulative log decay G and start state S0, the per-step corrections
``U = (I + A)^-1 (beta V - beta exp(G) K S0)`` with ``A[i,j] = beta_i k_i.k_j exp(G_i - G_j)``
(j < i), solved for all chunks at once with ``solve_triangular``; only the state hand-over is a
Python loop over chunks. Pairwise log decays are masked to -inf above the diagonal *before* exp,
so strong decay never yields inf * 0 = NaN.

Varlen: the packed samples are scattered (one ``index_copy`` by a precomputed index) into a
zero-padded batch ``[N, L, H, ...]``, L = longest sample rounded up to C, run once, and gathered
back. Zero padding means g = 0 and beta = 0 there, so the state passes padded steps unchanged
and the final state is the one at each sample's true end; causality keeps real outputs intact.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["l2norm", "causal_conv1d", "chunk_gated_delta_rule", "rms_norm_gated"]

# fla options that change the computation and that these kernels do not implement
_UNSUPPORTED = ("state_v_first", "transpose_state_layout", "cp_context", "head_first")


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-6, output_dtype: torch.dtype | None = None):
    """``x * rsqrt(sum(x * x, dim) + eps)`` in fp32 (fla's and HF's formula)."""
    xf = x.float()
    y = xf * torch.rsqrt((xf * xf).sum(dim=dim, keepdim=True) + eps)
    return y.to(output_dtype or x.dtype)


def rms_norm_gated(x, gate, weight, eps: float = 1e-6, activation: str = "silu"):
    """``rms_norm(x) * weight * act(gate)`` over the last dim, in fp32, returned in x's dtype
    (fla's ``rms_norm_gated`` with no bias; HF's ``RMSNormGated``). x, gate ``[..., D]``, weight ``[D]``."""
    if activation not in ("silu", "swish", "sigmoid"):
        raise ValueError(f"rms_norm_gated: activation must be 'silu', 'swish' or 'sigmoid', got {activation!r}")
    xf, gf = x.float(), gate.float()
    y = xf * torch.rsqrt((xf * xf).mean(-1, keepdim=True) + eps) * weight.float()
    y = y * (torch.sigmoid(gf) if activation == "sigmoid" else F.silu(gf))
    return y.to(x.dtype)


def _reject(unused: dict, what: str):
    bad = [name for name in _UNSUPPORTED if unused.get(name) not in (None, False)]
    if bad:
        raise NotImplementedError(f"{what}: fla option(s) {bad} are not supported by the torch kernels")


def causal_conv1d(x, weight, bias=None, *, residual=None, activation=None, initial_state=None,
                  output_final_state=False, cu_seqlens=None, **unused):
    """Depthwise causal conv1d, fla-compatible: returns ``(y, None)``. See the module docstring.

    ``residual`` (fla's Canon option) is added after the activation; ``backend`` etc. are ignored."""
    _reject(unused, "causal_conv1d")
    if initial_state is not None or output_final_state:
        raise NotImplementedError(
            "causal_conv1d (torch): initial_state / output_final_state (the conv cache for decoding) "
            "are not implemented; training does not need them")
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"causal_conv1d: activation must be None, 'silu' or 'swish', got {activation!r}")
    B, T, D = x.shape
    if weight.dim() != 2 or weight.shape[0] != D:
        raise ValueError(f"causal_conv1d: weight must be [D={D}, W], got {tuple(weight.shape)}")
    W = weight.shape[1]
    xf, wf = x.float(), weight.float()
    pos = torch.arange(T, device=x.device)  # position of each token inside its sequence
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"causal_conv1d: with cu_seqlens the batch size must be 1 (packed), got {B}")
        cu = cu_seqlens.to(device=x.device, dtype=torch.long)
        pos = pos - cu[torch.searchsorted(cu, pos, right=True) - 1]
    y = torch.zeros_like(xf)
    for j in range(W):  # tap j reads the token s = W-1-j steps back
        s = W - 1 - j
        shifted = F.pad(xf, (0, 0, s, 0))[:, :T]
        if cu_seqlens is not None:  # where(), not a product: an inf elsewhere must not leak as NaN
            shifted = torch.where((pos >= s)[:, None], shifted, 0.0)
        y = y + shifted * wf[:, j]
    if bias is not None:
        y = y + bias.float()
    if activation is not None:
        y = F.silu(y)
    if residual is not None:
        y = y + residual.float()
    return y.to(x.dtype), None


def _chunked_rule(q, k, v, g, beta, state, C):
    """Batched chunked gated delta rule. q, k ``[N, H, T, K]`` (q already scaled), v ``[N, H, T, V]``,
    g, beta ``[N, H, T]``, state ``[N, H, K, V]``; all fp32, T a multiple of C. -> (o, final state)."""
    N, H, T, K = k.shape
    V, n = v.shape[-1], T // C
    q, k, v = (x.reshape(N, H, n, C, x.shape[-1]) for x in (q, k, v))
    g, beta = g.reshape(N, H, n, C), beta.reshape(N, H, n, C)
    G = g.cumsum(-1)  # log of the decay from the chunk start up to and including step i
    upper = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(upper, float("-inf")).exp()  # exp(G_i - G_j), j <= i
    kb = k * beta[..., None]
    A = ((kb @ k.transpose(-1, -2)) * decay).tril(-1)  # strictly lower; the unit diagonal is implied
    rhs = torch.cat([v * beta[..., None], kb * G.exp()[..., None]], dim=-1)
    sol = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    u0, w = sol.split([V, K], dim=-1)  # U = u0 - w @ S0 once the chunk's start state S0 is known
    attn = (q @ k.transpose(-1, -2)) * decay  # intra-chunk, diagonal included
    q_dec = q * G.exp()[..., None]  # reads of the start state
    k_dec = k * (G[..., -1:] - G).exp()[..., None]  # writes, decayed to the chunk end
    end_decay = G[..., -1].exp()[..., None, None]
    out = []
    for c in range(n):
        u = u0[:, :, c] - w[:, :, c] @ state
        out.append(q_dec[:, :, c] @ state + attn[:, :, c] @ u)
        state = state * end_decay[:, :, c] + k_dec[:, :, c].transpose(-1, -2) @ u
    o = torch.stack(out, dim=2).reshape(N, H, T, V) if out else v.new_zeros(N, H, 0, V)
    return o, state


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           use_qk_l2norm_in_kernel=False, *, cu_seqlens=None, chunk_size=64,
                           use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False,
                           use_gate_in_kernel=False, A_log=None, dt_bias=None,
                           cu_seqlens_cpu=None, chunk_indices=None, **unused):
    """Gated delta rule, fla-compatible: returns ``(o [B, T, H, V] in q's dtype, final_state)``,
    final_state fp32 ``[N, H, K, V]`` (N = B, or the number of packed samples) or None.
    See the module docstring for shapes and semantics. fla's fused pre-steps are honoured:
    ``use_qk_l2norm_in_kernel``, ``use_beta_sigmoid_in_kernel`` (beta given as logits) and
    ``use_gate_in_kernel`` (g given raw: ``g = -exp(A_log) * softplus(g + dt_bias)``, A_log and
    dt_bias ``[H]``). ``chunk_indices`` (fla's precomputed varlen chunk map) is not needed here."""
    _reject(unused, "chunk_gated_delta_rule")
    B, T, Hk, K = q.shape
    H, V = v.shape[2], v.shape[3]
    if k.shape != q.shape or v.shape[:2] != (B, T) or H % Hk:
        raise ValueError(f"chunk_gated_delta_rule: q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} "
                         "must be [B, T, Hk, K], [B, T, Hk, K], [B, T, H, V] with Hk dividing H")
    if g.shape != (B, T, H) or beta.shape != (B, T, H):
        raise ValueError(f"chunk_gated_delta_rule: g {tuple(g.shape)} and beta {tuple(beta.shape)} must be {(B, T, H)}")
    C = int(chunk_size)
    dtype = q.dtype
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    if Hk != H:
        q, k = q.repeat_interleave(H // Hk, dim=2), k.repeat_interleave(H // Hk, dim=2)
    if use_beta_sigmoid_in_kernel:
        beta = beta.sigmoid() * (2.0 if allow_neg_eigval else 1.0)
    if use_gate_in_kernel:
        if A_log is None or tuple(A_log.shape) != (H,):
            raise ValueError(f"chunk_gated_delta_rule: use_gate_in_kernel needs A_log of shape {(H,)}, got "
                             f"{None if A_log is None else tuple(A_log.shape)}")
        g = g + dt_bias.float() if dt_bias is not None else g
        g = -A_log.float().exp() * F.softplus(g)
    q = q * (K ** -0.5 if scale is None else scale)

    if cu_seqlens is None:
        N, L = B, -(-T // C) * C
        pad = (0, 0, 0, 0, 0, L - T)
        q, k, v = (F.pad(x, pad) for x in (q, k, v))
        g, beta = (F.pad(x, pad[2:]) for x in (g, beta))
    else:
        if B != 1:
            raise ValueError(f"chunk_gated_delta_rule: with cu_seqlens the batch size must be 1 (packed), got {B}")
        cu_host = (cu_seqlens_cpu if cu_seqlens_cpu is not None else cu_seqlens).tolist()  # the one host sync
        N = len(cu_host) - 1
        if cu_host[0] != 0 or cu_host[-1] != T or any(b < a for a, b in zip(cu_host, cu_host[1:])):
            raise ValueError(f"chunk_gated_delta_rule: cu_seqlens must rise from 0 to T={T}, got {cu_host}")
        lens = [b - a for a, b in zip(cu_host, cu_host[1:])]
        L = -(-max(lens, default=0) // C) * C
        cu = cu_seqlens.to(device=q.device, dtype=torch.long)
        tok = torch.arange(T, device=q.device)
        seg = torch.searchsorted(cu, tok, right=True) - 1
        dest = seg * L + tok - cu[seg]  # token -> row of the flattened [N * L] padded batch

        def to_padded(x):
            return x.new_zeros((N * L,) + x.shape[2:]).index_copy(0, dest, x[0]).view(N, L, *x.shape[2:])

        q, k, v, g, beta = (to_padded(x) for x in (q, k, v, g, beta))
    if initial_state is None:
        state = q.new_zeros(N, H, K, V)
    elif tuple(initial_state.shape) != (N, H, K, V):
        raise ValueError(f"chunk_gated_delta_rule: initial_state must be {(N, H, K, V)}, "
                         f"got {tuple(initial_state.shape)}")
    else:
        state = initial_state.float()
    q, k, v, g, beta = (x.transpose(1, 2) for x in (q, k, v, g, beta))
    o, state = _chunked_rule(q, k, v, g, beta, state, C)
    o = o.transpose(1, 2)  # [N, L, H, V]
    o = o[:, :T] if cu_seqlens is None else o.reshape(N * L, H, V).index_select(0, dest)[None]
    return o.to(dtype), (state if output_final_state else None)
