"""Demonstration of the foundation (until the trainer exists): python -m multimodal_dev.demo

1. Starts a one-process world (gloo on CPU, NCCL on GPU) with megatron-core's parallel state; on a
   machine without a GPU the CPU runtime (``megatron.mcore_ext.cpu_runtime``) is applied first.
2. Builds a tiny MoE ``GPTModel`` (local spec with our pure-PyTorch attention and norms).
3. Collates the same variable-length samples (prompt + answer, so loss_mask != ~padding_mask)
   once as a padded BSHD batch and once as a packed THD batch.
4. Runs forward and backward on both and prints the masked LM loss of each: they agree, because
   padding is masked out of the loss and THD attention stays inside each packed sample.
5. Shows how the context-parallel split would cut the THD batch over 2 CP ranks.
"""
from __future__ import annotations

import argparse
import os
import time
import warnings

import torch

# megatron-core warns at import that TE/apex are absent; they are optional accelerators here.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex|absl).*")


def _init_world():
    import torch.distributed as dist

    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron.mcore_ext import cpu_runtime
    from megatron.mcore_ext.netutil import free_port

    on_cpu = cpu_runtime.apply()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group("gloo" if on_cpu else "nccl", rank=0, world_size=1)
    if not on_cpu:
        torch.cuda.set_device(0)
    ps.initialize_model_parallel()
    torch.manual_seed(1234)  # CPU-side init (use_cpu_initialization) draws from the CPU generator
    model_parallel_cuda_manual_seed(1234)
    return on_cpu


def _samples(n: int, vocab: int, gen: torch.Generator):
    out = []
    for i in range(n):
        length = int(torch.randint(6, 29, (1,), generator=gen))
        prompt = int(torch.randint(1, length, (1,), generator=gen))
        tokens = torch.randint(1, vocab, (length,), generator=gen)
        labels = torch.roll(tokens, -1).clone()
        labels[:prompt] = -100  # no loss on the prompt: real tokens all the same
        labels[-1] = -100
        out.append({"tokens": tokens, "labels": labels, "id": f"demo-{i}"})
    return out


def _masked_lm_loss(model, batch, device):
    from megatron.core.packed_seq_params import PackedSeqParams

    tokens = batch["tokens"].to(device)
    psp = None
    if "cu_seqlens_padded" in batch:
        cu, cu_p = batch["cu_seqlens"].to(device), batch["cu_seqlens_padded"].to(device)
        psp = PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_p,
            cu_seqlens_kv_padded=cu_p, max_seqlen_q=batch["max_seqlen"], max_seqlen_kv=batch["max_seqlen"],
        )
    labels = batch["labels"].clamp(min=0).to(device)
    token_losses = model(
        tokens,
        batch["position_ids"][0].to(device),  # text-only: the three MRoPE rows are equal
        None,
        labels=labels,
        packed_seq_params=psp,
        padding_mask=batch["padding_mask"].to(device),
    )
    mask = batch["loss_mask"].to(device)
    loss = (token_losses * mask).sum() / mask.sum()
    loss.backward()
    return loss.detach()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    t0 = time.time()
    on_cpu = _init_world()
    device = torch.device("cpu") if on_cpu else torch.device("cuda")
    from megatron.mcore_ext.cp_split import split_batch_for_cp
    from megatron.mcore_ext.testing import tiny_moe_gpt
    from multimodal_dev.data import CollateConfig, pack_or_pad_batch, required_seq_multiple

    vocab = 128
    model = tiny_moe_gpt(num_layers=2, vocab_size=vocab, max_sequence_length=256).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[demo] device={device.type}  tiny MoE GPTModel: {n_params:,} parameters, 4 experts top-2")

    samples = _samples(args.samples, vocab, torch.Generator().manual_seed(args.seed))
    mult = required_seq_multiple(tensor_parallel_size=1, context_parallel_size=2)
    bshd = pack_or_pad_batch(samples, CollateConfig(layout="bshd", target_seqlen=32, divisible_by=mult))
    thd = pack_or_pad_batch(samples, CollateConfig(layout="thd", divisible_by=mult))
    for name, b in (("BSHD", bshd), ("THD", thd)):
        st = b["stats"]
        print(
            f"[demo] {name:4s} tokens {tuple(b['tokens'].shape)}: {st['tokens']} real, "
            f"{st['padding_tokens']} padding, {int(b['loss_mask'].sum())} with loss "
            f"(prompt tokens: loss_mask 0, padding_mask False)"
        )

    losses = {}
    for name, b in (("BSHD", bshd), ("THD", thd)):
        model.zero_grad(set_to_none=True)
        losses[name] = float(_masked_lm_loss(model, b, device))
        gnorm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters() if p.grad is not None))
        print(f"[demo] {name:4s} forward/backward: masked LM loss {losses[name]:.6f}  grad norm {float(gnorm):.4f}")
    diff = abs(losses["BSHD"] - losses["THD"])
    print(f"[demo] |BSHD - THD| loss difference: {diff:.2e} (same samples, different layout)")

    parts = [split_batch_for_cp(thd, cp_size=2, cp_rank=r) for r in range(2)]
    print(
        "[demo] CP=2 split of the THD batch: rank token counts "
        f"{[p['tokens'].shape[-1] for p in parts]}, padding per rank "
        f"{[int(p['padding_mask'].sum()) for p in parts]}"
    )
    print(f"[demo] done in {time.time() - t0:.1f}s")
    if diff > 1e-4:
        raise SystemExit(f"[demo] BSHD and THD losses disagree by {diff:.2e}")


if __name__ == "__main__":
    main()
