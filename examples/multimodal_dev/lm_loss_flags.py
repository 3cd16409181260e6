"""How the training loss comes from the LM head: ``--chunked-lm-loss`` or megatron-LM's
``--cross-entropy-loss-fusion`` / ``--cross-entropy-fusion-impl``, at most one of them.

The default is megatron-core's ``tensor_parallel.vocab_parallel_cross_entropy`` on the full
``[s, b, V/TP]`` logits: fp32 passes over them (cast, max, subtract, exp, sum, divide in the
forward; scale and cast in the backward). On ``proxy-hybrid``'s graphed text step they keep the GPU
busy ~23 of its 156 ms (docs/performance.md, seventh session).

* ``--chunked-lm-loss`` (``megatron.mcore_ext.lm_loss``): the loss in token chunks, the logits never
  whole in memory; the backward recomputes each chunk's logits (measured 0.89x on that step): for
  memory, not speed.
* ``--cross-entropy-loss-fusion``: megatron-core's fused cross entropy, chosen as megatron-LM does
  through ``TransformerConfig.cross_entropy_loss_fusion`` / ``cross_entropy_fusion_impl`` (read by
  ``LanguageModule.compute_language_model_loss``). ``te``: Transformer Engine's Triton kernel (loss
  and gradient from one read of the logits; the gradient is written into the logits' memory).
  ``native``: megatron-core's ``fused_vocab_parallel_cross_entropy`` (its steps under megatron's
  ``jit_fuser``, torch.compile; its backward casts the gradient to bf16, so bf16 runs only).

Independent of these: the LM head and its loss run on the positions that carry loss only
(``megatron.mcore_ext.lm_head_rows``; the same loss and gradients, the prompt / image / padding
positions' logits are not computed); ``--lm-head-all-positions`` runs them on every position, as
megatron-core does.

Refused (``ArgumentError``, naming the flags): the chunked loss together with a fusion, ``te``
without Transformer Engine, ``native`` without ``--bf16``, either with ``--distill`` (whose KD computes
the LM loss itself from the student's logits, ``distill.loss``).
"""
from __future__ import annotations

import argparse
from typing import Optional

from multimodal_dev.argument_error import ArgumentError

__all__ = ["add_arguments", "fusion_from_flags", "model_options"]


def add_arguments(g) -> None:
    """The flags, into the argument group ``g``."""
    g.add_argument("--chunked-lm-loss", action="store_true",
                   help="compute the training loss from the LM head in token chunks (megatron.mcore_ext."
                        "lm_loss) instead of from full [tokens, vocab] logits: less memory, one more LM-head "
                        "GEMM per step (docs/performance.md)")
    g.add_argument("--lm-head-all-positions", action="store_true",
                   help="run the LM head and its cross entropy on every position, as megatron-core does, "
                        "instead of on the positions that carry loss only (the same loss and gradients)")
    g.add_argument("--cross-entropy-loss-fusion", action="store_true",
                   help="megatron-core's fused cross entropy for the LM loss (--cross-entropy-fusion-impl)")
    g.add_argument("--cross-entropy-fusion-impl", default="native", choices=["native", "te"],
                   help="with --cross-entropy-loss-fusion: te = Transformer Engine's kernel; native = "
                        "megatron-core's torch.compile'd one (bf16 runs only: its gradient is bf16)")


def model_options(a: argparse.Namespace) -> dict:
    """The LM head's fields of ``ModelArgs`` (and so of ``BuildOptions``) from the flags."""
    return dict(chunked_lm_loss=a.chunked_lm_loss, lm_head_loss_rows=not a.lm_head_all_positions,
                cross_entropy_fusion=fusion_from_flags(a))


def fusion_from_flags(a: argparse.Namespace) -> Optional[str]:
    """``None`` (megatron's unfused cross entropy, or the chunked loss) or the fusion's impl,
    ``"native"`` / ``"te"``."""
    if not a.cross_entropy_loss_fusion:
        return None
    impl = a.cross_entropy_fusion_impl
    if a.distill:
        raise ArgumentError("--cross-entropy-loss-fusion with --distill: the KD computes the LM loss itself from the "
                            "student's logits (distill.loss), so the fusion would not be used; leave it out")
    if a.chunked_lm_loss:
        raise ArgumentError("--chunked-lm-loss with --cross-entropy-loss-fusion: each replaces megatron's cross "
                            "entropy on the full logits; choose one")
    if impl == "te":
        from multimodal_dev.models.contract import te_importable

        if not te_importable():
            raise ArgumentError("--cross-entropy-fusion-impl te: Transformer Engine is not importable here "
                                "(use --cross-entropy-fusion-impl native with --bf16, or leave the fusion out)")
    elif not a.bf16:
        raise ArgumentError("--cross-entropy-fusion-impl native casts the logits' gradient to bf16 "
                            "(megatron-core 0.19.2): it needs --bf16")
    return impl
